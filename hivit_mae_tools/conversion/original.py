"""The original HiViT repository's checkpoints (github.com/zhangxiaosong18/hivit, folder `self_supervised/`).

Its training scripts save `{"model", "optimizer", "epoch", "scaler", "args"}` (plus `model_ema` with `--model-ema`),
where `model` is the state dict of `HiViTMaskedAutoencoder` (MAE pre-training: `decoder_*` keys) or of `HiViT` (the
fine-tuned classifier: `fc_norm` and `head`). Everything about the architecture is read off the weights; the head
counts, which no weight shows, are the original factories' unless a relative position table shows them. `args.model`
is not trusted: it names a factory, and factories can be edited.

The original code differs from mmpretrain's port in ways that change the numbers, and the converted config says so:
the encoder output is `hifeat` (a LayerNorm over all stages' features) where the decoder is that wide, the decoder
puts every token at its own patch position (no class slot), the absolute position table is used as stored, the
classifier normalises the pooled features (`fc_norm`), and every LayerNorm has eps 1e-6.
"""

import collections.abc
import math
import re
from typing import Optional

import torch

from configuration_hivit_mae import HiViTMAEConfig

from .types import CheckpointError, ConversionOptions, SourceConversion

NAME = "original HiViT"

SOURCE_URL = "https://github.com/zhangxiaosong18/hivit"

# Head counts of the original factories (`mae_hivit_base_dec512d6b`, `hivit_base`): 64-wide encoder heads, 16
# decoder heads. The weights do not store them.
ENCODER_HEAD_WIDTH = 64
DECODER_HEADS = 16

# The original `PatchEmbed` always cuts a patch into a 4x4 grid of stem tokens, so the trunk has exactly two patch
# merges (three stages) before the main stage's one token per patch.
INNER_PATCHES = 4
NUM_STAGES = 3

# `partial(nn.LayerNorm, eps=1e-6)` in every original factory.
LAYER_NORM_EPS = 1e-6

# Parameters of the model itself, and modules outside `blocks` / `decoder_blocks`, by their names in the original
# code -> ours. `norm` (the encoder's final norm) is mapped separately: it is applied only with hifeat.
_PARAMETERS = {
    "absolute_pos_embed": "hivit.position_embeddings",
    "mask_token": "decoder.mask_token",
    "decoder_pos_embed": "decoder.decoder_pos_embed",
}
_MODULES = {
    "patch_embed.proj": "hivit.patch_embeddings.projection",
    "patch_embed.norm": "hivit.patch_embeddings.layernorm",
    "decoder_embed": "decoder.decoder_embed",
    "decoder_norm": "decoder.decoder_norm",
    "decoder_pred": "decoder.decoder_pred",
    "fc_norm": "fc_norm",
    "head": "classifier",
}
# Submodules of the original `BlockWithRPE` in the main stage and the decoder (`attn` holds the relative position
# bias table), of its MLP-only variant in the stem, and of `PatchMerge`.
_MAIN = {
    "norm1": "norm1",
    "attn": "attention",
    "attn.qkv": "attention.qkv",
    "attn.proj": "attention.proj",
    "norm2": "norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_STEM = {"norm2": "norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
_MERGE = {"norm": "layernorm", "reduction": "reduction"}

_BLOCK_INDEX = re.compile(r"blocks\.(\d+)\.")


def _weights(entry) -> Optional[dict]:
    """The tensors of a state-dict mapping, or None when `entry` is not one."""
    if not isinstance(entry, collections.abc.Mapping):
        return None
    return {key: value for key, value in entry.items() if isinstance(value, torch.Tensor)}


def _model_weights(checkpoint: dict) -> Optional[dict]:
    """The `model` state dict of a training checkpoint, or the checkpoint itself when it is a bare state dict."""
    return _weights(checkpoint["model"]) if "model" in checkpoint else _weights(checkpoint)


def detect(checkpoint: dict) -> bool:
    """Whether `checkpoint` (a training checkpoint or a bare state dict) holds an original HiViT model: a
    `patch_embed.proj` and a flat `blocks.N` trunk, plus a name only the original code uses (`absolute_pos_embed`,
    `decoder_embed` without mmpretrain's `neck.`, `head` / `fc_norm` without mmpretrain's `head.fc`)."""
    weights = _model_weights(checkpoint)
    if not weights or "patch_embed.proj.weight" not in weights:
        return False
    if not any(_BLOCK_INDEX.match(key) for key in weights):
        return False
    markers = ("absolute_pos_embed", "decoder_embed.weight", "head.weight", "fc_norm.weight")
    return any(marker in weights for marker in markers)


def _block_kind(weights: dict, index: int) -> str:
    prefix = f"blocks.{index}."
    if prefix + "reduction.weight" in weights:
        return "merge"
    if prefix + "attn.qkv.weight" in weights:
        return "main"
    if prefix + "mlp.fc1.weight" in weights:
        return "stem"
    raise CheckpointError(f"blocks.{index} is neither an MLP block, an attention block nor a patch merge")


def read_trunk(weights: dict) -> tuple[list[int], list[tuple[str, dict]]]:
    """Read the flat `blocks` list of the original code: stem stages of MLP-only blocks, each closed by a patch merge
    (it has `reduction`), then the main stage's attention blocks.

    Returns the depths as the original (and our config) counts them, each stem unit being two MLP blocks, and for
    each block index our module prefix and its renaming table. Raises `CheckpointError` for a layout our
    model cannot express.
    """
    indices = sorted({int(match.group(1)) for key in weights if (match := _BLOCK_INDEX.match(key))})
    if indices != list(range(len(indices))):
        missing = sorted(set(range(indices[-1] + 1)) - set(indices))
        raise CheckpointError(f"the trunk's blocks are not numbered consecutively (missing blocks.{missing[0]})")
    kinds = [_block_kind(weights, index) for index in indices]
    layout = "".join({"stem": "s", "merge": "m", "main": "a"}[kind] for kind in kinds)
    if not re.fullmatch(r"(s+m)*a+", layout):
        raise CheckpointError(
            "the trunk's blocks are not stem MLP blocks with patch merges followed by attention blocks "
            f"(block kinds in order: {', '.join(kinds)})"
        )
    stem_runs = [len(run) for run in layout.rstrip("a").split("m")[:-1]]
    if len(stem_runs) != NUM_STAGES - 1:
        raise CheckpointError(
            f"the trunk has {len(stem_runs)} patch merges; the original code cuts each patch into a "
            f"{INNER_PATCHES}x{INNER_PATCHES} grid, which needs {NUM_STAGES - 1} merges to reach one token per patch"
        )
    if any(run % 2 for run in stem_runs):
        raise CheckpointError(
            f"a stem stage has an odd number of MLP blocks ({stem_runs}); the original code builds two per unit of "
            "depth"
        )
    depths = [run // 2 for run in stem_runs] + [layout.count("a")]

    targets = []
    for stage, run in enumerate(stem_runs):
        targets += [(f"hivit.stem.{stage}.blocks.{j}.", _STEM) for j in range(run)]
        targets.append((f"hivit.stem.{stage}.merge.", _MERGE))
    targets += [(f"hivit.encoder.layers.{j}.", _MAIN) for j in range(depths[-1])]
    return depths, targets


def _grid_side(rows: int, name: str) -> int:
    side = math.isqrt(rows)
    if side * side != rows:
        raise CheckpointError(f"{name} has {rows} rows, not a square patch grid")
    return side


def infer_config(weights: dict, overrides: Optional[dict] = None) -> tuple[HiViTMAEConfig, list[str]]:
    """The `HiViTMAEConfig` of original HiViT weights, with `overrides` (config fields; None values ignored) applied,
    and notes on what the weights could not show. Raises `CheckpointError` for weights the model cannot express."""
    overrides = {key: value for key, value in (overrides or {}).items() if value is not None}
    depths, targets = read_trunk(weights)
    projection = weights["patch_embed.proj.weight"]
    stem_width = projection.shape[0]
    hidden_size = stem_width * 2 ** (NUM_STAGES - 1)
    patch_size = projection.shape[-1] * INNER_PATCHES
    first_main = f"blocks.{len(targets) - depths[-1]}."
    rpe_table = weights.get(first_main + "attn.relative_position_bias_table")
    config = dict(
        hidden_size=hidden_size,
        depths=depths,
        num_channels=projection.shape[1],
        patch_size=patch_size,
        inner_patches=INNER_PATCHES,
        stem_mlp_ratio=weights["blocks.0.mlp.fc1.weight"].shape[0] / stem_width,
        mlp_ratio=weights[first_main + "mlp.fc1.weight"].shape[0] / hidden_size,
        qkv_bias=first_main + "attn.qkv.bias" in weights,
        layer_norm_eps=LAYER_NORM_EPS,
        use_absolute_position_embeddings="absolute_pos_embed" in weights,
        use_relative_position_bias=rpe_table is not None,
        use_fc_norm="fc_norm.weight" in weights,
        decoder_first_token_as_cls=False,
        legacy_position_encoding=False,
        norm_pix_loss=True,  # `MaskedAutoencoder.__init__` sets it whatever `--norm_pix_loss` says
    )
    notes = []
    if rpe_table is not None:
        config["num_attention_heads"] = rpe_table.shape[1]
        table_side = _grid_side(rpe_table.shape[0], "the relative position bias table")
        config["image_size"] = (table_side + 1) // 2 * patch_size
    else:
        config["num_attention_heads"] = max(1, hidden_size // ENCODER_HEAD_WIDTH)
        if "num_attention_heads" not in overrides:
            notes.append(
                f"{config['num_attention_heads']} encoder attention heads assumed (the original factories' "
                f"hidden_size // {ENCODER_HEAD_WIDTH}; the weights do not show it, --num_attention_heads overrides)"
            )
    for name in ("absolute_pos_embed", "decoder_pos_embed"):
        if name in weights:
            config["image_size"] = _grid_side(weights[name].shape[1], name) * patch_size
            break

    # hifeat: the final `norm` (and the decoder input) spans all stages' features, 7 x hidden_size, not the last one.
    hifeat_size = (2**NUM_STAGES - 1) * hidden_size
    encoder_output = weights.get("decoder_embed.weight", weights.get("norm.weight"))
    if encoder_output is not None:
        width = encoder_output.shape[-1]
        if width not in (hidden_size, hifeat_size):
            raise CheckpointError(
                f"the encoder output is {width} wide; the original code gives {hidden_size} (last stage) or "
                f"{hifeat_size} (hifeat: all stages)"
            )
        config["use_hifeat"] = width == hifeat_size

    if "decoder_embed.weight" in weights:
        width = weights["decoder_embed.weight"].shape[0]
        layers = {int(m.group(1)) for key in weights if (m := re.match(r"decoder_blocks\.(\d+)\.", key))}
        config.update(
            decoder_hidden_size=width,
            decoder_num_hidden_layers=len(layers),
            decoder_num_attention_heads=DECODER_HEADS,
        )
        if layers:
            config["decoder_mlp_ratio"] = weights["decoder_blocks.0.mlp.fc1.weight"].shape[0] / width
            if "decoder_num_attention_heads" not in overrides:
                notes.append(
                    f"{DECODER_HEADS} decoder attention heads assumed (the original factory's; the weights do not "
                    "show it, --decoder_num_attention_heads overrides)"
                )
    if "head.weight" in weights:
        if weights["head.weight"].shape[1] != hidden_size:
            raise CheckpointError(
                f"head takes {weights['head.weight'].shape[1]} features but the encoder gives {hidden_size}"
            )
        config["num_labels"] = weights["head.weight"].shape[0]
    config.update(overrides)
    try:
        return HiViTMAEConfig(**config), notes
    except ValueError as error:
        hint = ""
        if "attention_heads" in str(error):
            hint = " (the weights do not store head counts: --num_attention_heads and --decoder_num_attention_heads)"
        raise CheckpointError(f"{error}{hint}") from None


def checkpoint_kind(weights: dict) -> str:
    """`"pretraining"` (`HiViTMaskedAutoencoder`: decoder weights), `"classification"` (the fine-tuned `HiViT`:
    `head`) or `"encoder"` (neither)."""
    has_decoder = "decoder_embed.weight" in weights
    has_head = "head.weight" in weights
    if has_decoder and has_head:
        raise CheckpointError("the checkpoint holds both an MAE decoder (decoder_embed) and a classification head")
    return "pretraining" if has_decoder else "classification" if has_head else "encoder"


def _target(key: str, targets: list, use_hifeat: bool) -> Optional[str]:
    """Our name (in `HiViTMAEForPreTraining` / `HiViTMAEForImageClassification`) for the original parameter `key`, or
    None when it has none."""
    if key in _PARAMETERS:
        return _PARAMETERS[key]
    module, _, parameter = key.rpartition(".")
    if match := re.fullmatch(r"blocks\.(\d+)\.(.+)", module):
        prefix, table = targets[int(match.group(1))]
        new = prefix + table[match.group(2)] if match.group(2) in table else None
    elif match := re.fullmatch(r"decoder_blocks\.(\d+)\.(.+)", module):
        new = f"decoder.decoder_layers.{match.group(1)}.{_MAIN[match.group(2)]}" if match.group(2) in _MAIN else None
    elif module == "norm":
        new = "hivit.hifeat_layernorm" if use_hifeat else None
    else:
        new = _MODULES.get(module)
    return None if new is None else f"{new}.{parameter}"


def _model_keys(config: HiViTMAEConfig, kind: str) -> set:
    """The state-dict keys of the model of `kind`, built without allocating its weights."""
    from accelerate import init_empty_weights

    import modeling_hivit_mae

    name = {
        "pretraining": "HiViTMAEForPreTraining",
        "classification": "HiViTMAEForImageClassification",
        "encoder": "HiViTMAEModel",
    }[kind]
    with init_empty_weights():
        return set(getattr(modeling_hivit_mae, name)(config).state_dict())


def convert_state_dict(weights: dict, config: HiViTMAEConfig, kind: str) -> tuple[dict, list[str], list[str]]:
    """Map original HiViT weights to the keys of the model of `kind` (`HiViTMAEForPreTraining`,
    `HiViTMAEForImageClassification`, or `HiViTMAEModel`, whose keys have no `hivit.` prefix).

    Returns the converted weights, the source keys left out on purpose (the final `norm` that the original code
    applies only with hifeat, an `fc_norm` without a head) and the keys that map to no weight of the model. The
    stored `relative_position_index` is checked against the one our model computes and dropped.
    """
    from modeling_hivit_mae import relative_position_index

    _, targets = read_trunk(weights)
    grid = config.image_size // config.patch_size
    model_keys = _model_keys(config, kind)
    converted, left_out, unknown = {}, [], []
    for key, value in weights.items():
        if key == "relative_position_index":
            if not torch.equal(value, relative_position_index(grid, grid)):
                raise CheckpointError(f"relative_position_index does not match a {grid}x{grid} patch grid")
            continue
        new_key = _target(key, targets, config.use_hifeat)
        if new_key is not None and kind == "encoder":
            new_key = new_key.removeprefix("hivit.")
        if new_key in model_keys:
            converted[new_key] = value
        elif key.startswith("norm.") and kind != "classification" or key.startswith("fc_norm.") and kind == "encoder":
            left_out.append(key)
        else:
            unknown.append(key)
    return converted, left_out, unknown


def imagenet_class_names() -> list[str]:
    """ImageNet-1k's 1000 class names in class-index order, as torchvision ships them (no download)."""
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


def source_description(kind: str) -> str:
    """The model card's paragraph on where the weights come from."""
    released = {
        "pretraining": "`mae_hivit_base_1600ep.pth` (MAE pre-training on ImageNet-1k, 1600 epochs) and the "
        "third-party `mae_hivit_base_dec512d8b_hifeat_p1600lr10.pth` (Spatial-Transform-Decoupling, 8 decoder "
        "blocks)",
        "classification": "`mae_hivit_base_1600ep_ft100ep.pth` (the MAE model fine-tuned on ImageNet-1k for 100 "
        "epochs, 84.6% top-1 reported)",
        "encoder": "the encoder of `mae_hivit_base_1600ep.pth`",
    }[kind]
    return (
        f"Converted from a checkpoint of the original HiViT implementation ([{SOURCE_URL.removeprefix('https://')}]"
        f"({SOURCE_URL}), "
        "`self_supervised/`; its code is MIT-licensed), in the format of its released weights: "
        f"{released}. The authors of the weights do not state a license for them. The converted model reproduces "
        "the original code's outputs (equal within 1e-4 in float32, tested on tiny checkpoints made with that code): "
        "it keeps the original's architecture choices, which differ from mmpretrain's port (the `use_hifeat` encoder "
        "output, the decoder without a class slot, the position table used as stored, `use_fc_norm`, LayerNorm eps "
        "1e-6)."
    )


# The sizes of the original repository's factories (`hivit_base`, `mae_hivit_base_dec512d6b`), by (width, depths).
ORIGINAL_ARCHS = {(512, (2, 2, 20)): "base"}


def convert(checkpoint: dict, options: ConversionOptions) -> SourceConversion:
    """Convert a loaded original HiViT checkpoint (see `detect`). `options.use_ema` takes the `model_ema` weights;
    `options.allow_unused` lets tensors that map nowhere through (listed in `unused`); `options.overrides` set config
    fields (head counts, which the weights cannot show); `options.arch` is refused (it names mmpretrain's sizes)."""
    if options.arch is not None:
        raise CheckpointError(
            "--arch imposes one of mmpretrain's HiViT sizes; an original HiViT checkpoint's architecture is read off "
            "its weights (--num_attention_heads and --decoder_num_attention_heads set the head counts)"
        )
    notes = []
    ema = _weights(checkpoint.get("model_ema")) if "model" in checkpoint else None
    if options.use_ema:
        if not ema:
            raise CheckpointError("--use_ema: the checkpoint holds no model_ema weights")
        weights = ema
        notes.append("model_ema used (the exponential moving average of the weights)")
    else:
        weights = _model_weights(checkpoint)
        if ema:
            notes.append("model_ema present; pass --use_ema to convert it")

    config, inferred = infer_config(weights, options.overrides)
    notes += inferred
    kind = checkpoint_kind(weights)
    converted, left_out, unknown = convert_state_dict(weights, config, kind)
    if unknown and not options.allow_unused:
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise CheckpointError(
            f"{len(unknown)} tensors of the original HiViT checkpoint map to no weight of HiViT-MAE: "
            f"{', '.join(unknown[:5])}{more} (pass --allow-unused REASON to leave them out)"
        )
    if any(key.startswith("norm.") for key in left_out):
        notes.append("`norm` left out: without hifeat the original code never applies the encoder's final norm")
    if any(key.startswith("fc_norm.") for key in left_out):
        notes.append("`fc_norm` left out: it normalises the input of a classification head the checkpoint lacks")

    dataset = None
    names = options.labels
    if names is not None:
        if kind != "classification" or len(names) != config.num_labels:
            heads = f"a head of {config.num_labels} classes" if kind == "classification" else "no classification head"
            raise CheckpointError(f"--labels names {len(names)} classes, but the checkpoint has {heads}")
    elif kind == "classification" and config.num_labels == 1000:
        names, dataset = imagenet_class_names(), "imagenet-1k"
        notes.append("1000 classes: named with ImageNet-1k's class names (from torchvision); --labels overrides")
    if names is not None:
        config.id2label = dict(enumerate(names))
        config.label2id = {name: index for index, name in config.id2label.items()}
    return SourceConversion(
        config=config,
        state_dict=converted,
        kind=kind,
        unused=unknown,  # what `left_out` drops on purpose is explained in `notes`, and needs no --allow-unused
        source_description=source_description(kind),
        notes=notes,
        dataset=dataset,
        license="unknown",
        tags=["original-hivit"],
        arch=ORIGINAL_ARCHS.get((config.hidden_size, tuple(config.depths))),
    )
