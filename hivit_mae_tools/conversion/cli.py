"""The converter's command line: `python convert_checkpoint.py --checkpoint FILE --output_dir FOLDER`.

Loads the checkpoint safely, picks the source format whose `detect` accepts it (`FORMATS`), converts it, writes and
verifies the folder, and optionally uploads it. Every refusal is one `error: ...` line, exit status 2 for a bad
argument and 1 otherwise (`--debug` shows the traceback instead).
"""

import argparse
import collections.abc
import dataclasses
from pathlib import Path
from typing import Optional

import torch

from configuration_hivit_mae import HIVIT_ARCHS

from ..cli import raise_usage_errors, run_cli
from ..outputs import check_output_dir, staged_output
from . import card, mmpretrain, original, writer
from .safe_load import check_checkpoint_file, load_checkpoint, sha256sum
from .types import CheckpointError, ConversionOptions, ConversionReport

# The source formats, tried in order: the first whose `detect` accepts the loaded checkpoint converts it. mmpretrain's
# `detect` takes whatever is not the original repository's, so it comes last.
FORMATS = [original, mmpretrain]


def _progress(step: int, total: int, message: str):
    print(f"[{step}/{total}] {message}", flush=True)


def read_labels(labels_file: Path) -> list[str]:
    """Class names from a text file, one per line in class-index order (blank lines ignored)."""
    try:
        return [line.strip() for line in Path(labels_file).read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as error:
        raise CheckpointError(f"--labels {labels_file}: cannot be read ({error})") from None


def source_format(checkpoint: dict):
    """The first module of `FORMATS` whose `detect` accepts `checkpoint`; raises `CheckpointError` if none does."""
    for source in FORMATS:
        if source.detect(checkpoint):
            return source
    values = list(checkpoint.values())
    values += [v for value in values if isinstance(value, collections.abc.Mapping) for v in value.values()]
    if not any(isinstance(value, torch.Tensor) for value in values):
        raise CheckpointError("the checkpoint holds no tensors")
    names = " or ".join(source.NAME for source in FORMATS)
    keys = ", ".join(str(key) for key in list(checkpoint)[:5])
    raise CheckpointError(f"the checkpoint is not one of the formats this converter reads ({names}); its keys: {keys}")


def convert(
    checkpoint_path,
    output_dir,
    options: Optional[ConversionOptions] = None,
    dtype: str = "float32",
    allow_unused: Optional[str] = None,
    overwrite: bool = False,
    verify_mmpretrain: bool = False,
    max_shard_size="5GB",
    dataset: Optional[str] = None,
    model_id: Optional[str] = None,
    labels_file: Optional[Path] = None,
    total_steps: int = 4,
) -> ConversionReport:
    """Convert `checkpoint_path` into the `from_pretrained` folder `output_dir`; see the command-line help.
    `options` go to the source format (`allow_unused` and `labels` are set from `allow_unused` and `labels_file`).

    `output_dir` is checked before anything is read (`hivit_mae_tools.outputs.check_output_dir`: never the current or
    home directory, never a folder holding the checkpoint or the labels, a non-empty one only with `overwrite`); the
    folder is written next to it under a temporary name, verified, and only then moved into place. Raises a
    `UserError` (`CheckpointError` for the checkpoint itself) with a one-line reason for anything that cannot be
    converted.
    """
    checkpoint_path = check_checkpoint_file(checkpoint_path)
    output_dir = check_output_dir(
        output_dir,
        inputs=[checkpoint_path, labels_file],
        must_be_empty=True,
        allow_existing=overwrite,
        allow_flag="--overwrite",
    )
    options = dataclasses.replace(options or ConversionOptions(), allow_unused=allow_unused is not None)
    if labels_file is not None:
        options.labels = read_labels(labels_file)

    _progress(1, total_steps, f"loading {checkpoint_path}")
    checkpoint = load_checkpoint(checkpoint_path)
    sha256 = sha256sum(checkpoint_path)
    source = source_format(checkpoint)
    conversion = source.convert(checkpoint, options)
    config, converted, kind, unused = conversion.config, conversion.state_dict, conversion.kind, conversion.unused
    if options.labels is not None:
        if kind != "classification":
            raise CheckpointError("--labels names classes, but the checkpoint has no classification head")
        if len(options.labels) != config.num_labels:
            raise CheckpointError(
                f"--labels {labels_file} names {len(options.labels)} classes but the classification head has "
                f"{config.num_labels}"
            )
        config.id2label = dict(enumerate(options.labels))
        config.label2id = {name: index for index, name in config.id2label.items()}
    if kind == "classification":
        names = [config.id2label[index] for index in range(config.num_labels)]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:  # `label2id` would lose a class
            raise CheckpointError(
                f"the class names {', '.join(duplicates)} stand for more than one class; give each class its own "
                "name (--labels FILE, one per line)"
            )
    if unused and not options.allow_unused:
        more = f" and {len(unused) - 5} more" if len(unused) > 5 else ""
        raise CheckpointError(
            f"{len(unused)} checkpoint tensors map to no weight of HiViT-MAE: {', '.join(unused[:5])}{more} "
            "(pass --allow-unused REASON to leave them out)"
        )
    if verify_mmpretrain and source is not mmpretrain:
        raise CheckpointError(f"--verify-against-mmpretrain: this is not an mmpretrain checkpoint ({source.NAME})")
    writer.check_finite(converted)
    model = writer.build_model(config, converted, kind)
    num_parameters = sum(parameter.numel() for parameter in model.parameters())
    _progress(
        2,
        total_steps,
        f"mapping: {len(converted)} tensors ({source.NAME}) to {type(model).__name__} (hidden size "
        f"{config.hidden_size}, depths {config.depths}, image size {config.image_size}"
        + (", encoder only" if kind == "encoder" else "")
        + (f", {config.num_labels} classes" if kind == "classification" else "")
        + (f"; {len(unused)} tensors left out: {', '.join(unused[:5])}" if unused else "")
        + "".join(f"; {note}" for note in conversion.notes)
        + ")",
    )

    with staged_output(output_dir, replace=overwrite) as staging:
        _progress(3, total_steps, f"writing {dtype} weights, config, code and image processor to {staging}")
        writer.save_folder(model, staging, writer.DTYPES[dtype], max_shard_size)

        _progress(4, total_steps, f"verifying {staging}")
        checked = writer.verify_folder(staging, converted, config, kind, writer.DTYPES[dtype])
        parity = None
        if verify_mmpretrain:  # on the float32 mapping: the stored weights equal it cast to `dtype` (checked above)
            if dtype != "float32":
                model = writer.build_model(config, converted, kind)
            parity = mmpretrain.verify_against_mmpretrain(
                mmpretrain.extract_state_dict(checkpoint), model, config, kind
            )
        report = ConversionReport(
            source=checkpoint_path,
            sha256=sha256,
            output_dir=output_dir,
            conversion=conversion,
            dtype=dtype,
            num_parameters=num_parameters,
            num_tensors_checked=checked,
            unused_reason=allow_unused,
            parity=parity,
            dataset=dataset or conversion.dataset,
            model_id=model_id,
        )
        (staging / "README.md").write_text(card.model_card(report))
    checks = f"{checked} tensors identical after reload, forward pass finite"
    if parity:
        checks += f", max abs diff vs mmpretrain {max(parity.values()):.2e}"
    print(f"  {checks}", flush=True)
    return report


def _positive(kind):
    """argparse type: a positive `kind` (int or float)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value > 0:
            raise argparse.ArgumentTypeError(f"must be a positive {kind.__name__}, not {text!r}")
        return value

    return parse


def _file_size(text: str) -> str:
    """argparse type: a size as transformers' `max_shard_size` takes it (`500MB`, `5GB`)."""
    from transformers.utils.hub import convert_file_size_to_int

    try:
        size = convert_file_size_to_int(text)
    except ValueError:
        size = None
    if size is None or size <= 0:
        raise argparse.ArgumentTypeError(f"must be a size such as 500MB or 5GB, not {text!r}")
    return text


EPILOG = """\
examples:
  # mmpretrain's published MAE-HiViT-base checkpoint, verified against mmpretrain (needs it installed)
  python convert_checkpoint.py --checkpoint mae_hivit-base-p16_8xb512-amp-coslr-400e_in1k.pth \\
      --output_dir hivit-mae-base --verify-against-mmpretrain

  # a training checkpoint (epoch_400.pth) in bfloat16, published as a private Hub repo
  python convert_checkpoint.py --checkpoint work_dirs/mae_hivit/epoch_400.pth --output_dir hivit-mae-base \\
      --dtype bfloat16 --push_to_hub me/hivit-mae-base --private

  # an encoder-only export with 12 heads that the weights cannot show; overwrite an earlier conversion
  python convert_checkpoint.py --checkpoint backbone.safetensors --output_dir hivit-enc --num_attention_heads 12 \\
      --overwrite

  # a HiViT classifier fine-tuned with mmpretrain (class names from the checkpoint's meta, else --labels)
  python convert_checkpoint.py --checkpoint work_dirs/hivit-base_in1k/epoch_100.pth --output_dir hivit-base-in1k \
      --verify-against-mmpretrain

  # the original HiViT repository's released weights (github.com/zhangxiaosong18/hivit): nothing else to say
  python convert_checkpoint.py --checkpoint mae_hivit_base_1600ep_ft100ep.pth --output_dir hivit-base-in1k

inputs: mmengine training checkpoints (meta, state_dict, message_hub, optimizer, param_schedulers), published
checkpoints (meta, state_dict), bare state dicts and .safetensors files, of the whole MAE (backbone./neck./head.
keys), of the encoder alone (backbone. keys or none) or of an mmpretrain ImageClassifier with a HiViT backbone and
a LinearClsHead (backbone./head.fc. keys; written as HiViTMAEForImageClassification). Pickles are read with torch's
weights-only unpickler: no pickled code runs, and mmengine need not be installed. A file that declares more data than
it holds is refused before anything is allocated. Checkpoints of the original HiViT repository (model, optimizer,
epoch, scaler, args, and model_ema; or the model state dict alone) are recognised by their key names: MAE
pre-training (decoder_* keys) or the fine-tuned classifier (fc_norm, head).
"""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="convert_checkpoint.py",
        description="Convert an MAE-HiViT (or HiViT classifier) checkpoint of mmpretrain or of the original HiViT "
        "repository into a Hugging Face transformers model folder (model.safetensors, config.json, model code, "
        "preprocessor_config.json, README.md model card).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--checkpoint", required=True, help="mmpretrain checkpoint: .pth / .pt / .ckpt or .safetensors"
    )
    parser.add_argument(
        "--output_dir", required=True, help="folder to write; refused if it exists and is not empty (see --overwrite)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --output_dir")
    parser.add_argument(
        "--arch",
        choices=sorted(HIVIT_ARCHS),
        help="impose one of mmpretrain's HiViT sizes instead of inferring it from the weights",
    )
    parser.add_argument(
        "--num_attention_heads",
        type=_positive(int),
        help="encoder attention heads (weights do not show them; default: mmpretrain's for its sizes, else width/64)",
    )
    parser.add_argument(
        "--decoder_num_attention_heads",
        type=_positive(int),
        help="decoder attention heads (default: 16, as mmpretrain's)",
    )
    parser.add_argument(
        "--layer_norm_eps",
        type=_positive(float),
        help="LayerNorm epsilon (weights do not show it; default: mmpretrain's, 1e-6 for MAE-HiViT, 1e-5 for its "
        "HiViT classifiers)",
    )
    parser.add_argument(
        "--image_size",
        type=_positive(int),
        help="pre-training image size (default: read off the position tables, else 224)",
    )
    parser.add_argument(
        "--norm_pix_loss",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="whether the loss reconstructs per-patch normalised pixels (default: yes, as mmpretrain's recipe)",
    )
    parser.add_argument(
        "--use_ema",
        action="store_true",
        help="convert the checkpoint's EMA weights (the original HiViT repository's `model_ema`) instead of the "
        "model's",
    )
    parser.add_argument(
        "--dtype",
        choices=sorted(writer.DTYPES),
        default="float32",
        help="dtype of the stored weights (default: float32)",
    )
    parser.add_argument(
        "--allow-unused",
        metavar="REASON",
        dest="allow_unused",
        help="leave out checkpoint tensors that map to no model weight (an error otherwise); REASON goes into the "
        "model card",
    )
    parser.add_argument(
        "--verify-against-mmpretrain",
        dest="verify_mmpretrain",
        action="store_true",
        help=f"also build mmpretrain's model from the same weights and fail if outputs differ by more than "
        f"{mmpretrain.PARITY_TOLERANCE} (needs mmpretrain); the figures go into the model card",
    )
    parser.add_argument(
        "--max_shard_size",
        type=_file_size,
        default="5GB",
        help="largest weight file before sharding, e.g. 500MB (default: 5GB)",
    )
    parser.add_argument(
        "--dataset",
        help="Hub id of the pre-training data set for the card (default: imagenet-1k when the checkpoint's "
        "stored config says ImageNet, else none)",
    )
    parser.add_argument(
        "--labels",
        metavar="FILE",
        type=Path,
        help="classifiers: a text file with one class name per line, in class-index order (default: the class names "
        "an mmengine training checkpoint stores in meta.dataset_meta, else LABEL_0, LABEL_1, ...)",
    )
    parser.add_argument(
        "--push_to_hub", metavar="REPO_ID", help="after converting, upload the folder to this Hub repo"
    )
    parser.add_argument("--private", action="store_true", help="with --push_to_hub: create the repo private")
    parser.add_argument(
        "--commit-message", dest="commit_message", help="with --push_to_hub: commit message of the upload"
    )
    return raise_usage_errors(parser).parse_args(argv)


def main(argv=None) -> int:
    """Command-line entry point; returns the exit status: 0, or with one `error: ...` line on stderr 2 for a bad
    argument and 1 for anything else (`--debug` shows the traceback instead)."""
    return run_cli(_main, argv)


def _main(argv: list[str]) -> int:
    args = parse_args(argv)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    overrides = {
        "num_attention_heads": args.num_attention_heads,
        "decoder_num_attention_heads": args.decoder_num_attention_heads,
        "layer_norm_eps": args.layer_norm_eps,
        "image_size": args.image_size,
        "norm_pix_loss": args.norm_pix_loss,
    }
    total_steps = 5 if args.push_to_hub else 4
    report = convert(
        args.checkpoint,
        args.output_dir,
        ConversionOptions(arch=args.arch, overrides=overrides, use_ema=args.use_ema),
        dtype=args.dtype,
        allow_unused=args.allow_unused,
        overwrite=args.overwrite,
        verify_mmpretrain=args.verify_mmpretrain,
        max_shard_size=args.max_shard_size,
        dataset=args.dataset,
        model_id=args.push_to_hub,
        labels_file=args.labels,
        total_steps=total_steps,
    )
    if args.push_to_hub:
        _progress(5, total_steps, f"uploading {report.output_dir} to https://huggingface.co/{args.push_to_hub}")
        writer.push_to_hub(report.output_dir, args.push_to_hub, args.private, args.commit_message)
    kind = {
        "pretraining": "encoder + decoder",
        "encoder": "encoder only, load with HiViTMAEModel / AutoModel",
        "classification": f"image classifier, {report.config.num_labels} classes",
    }[report.kind]
    print(f"done: {report.num_parameters / 1e6:.1f}M parameters ({kind}) written to {report.output_dir}")
    return 0
