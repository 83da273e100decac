#!/usr/bin/env python
"""Masked-autoencoder pre-training of HiViT-MAE with the 🤗 Trainer.

The defaults reproduce mmpretrain 1.2.0's MAE-HiViT recipe
(`configs/mae/mae_hivit-base-p16_8xb512-amp-coslr-400e_in1k.py` with `_base_/datasets/imagenet_bs512_mae.py`):
RandomResizedCrop(224, scale=(0.2, 1.0), bicubic), horizontal flip, ImageNet normalisation, AdamW(betas=(0.9, 0.95),
weight_decay=0.05) without decay on norms, biases, position tables and the mask token, learning rate
1.5e-4 x total batch / 256, 10 % linear warm-up then cosine decay, 400 epochs.

Data: `--dataset_name` (a Hub dataset, `--image_column_name`), `--train_dir` (a local folder of images, read with
datasets' `imagefolder`) or, with neither, a built-in demo: a small HiViT-MAE trained for a few minutes on CPU on the
photographs that ship with scikit-image, ending with a before/after reconstruction figure.

    python run_pretraining.py                                        # built-in demo
    python run_pretraining.py --train_dir /data/imagenet/train --arch base --output_dir outputs/hivit-mae-base \
        --per_device_train_batch_size 256 --bf16 --dataloader_num_workers 8
    torchrun --nproc_per_node 8 run_pretraining.py --dataset_name ILSVRC/imagenet-1k ...
"""

import contextlib
import dataclasses
import json
import logging
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import datasets
import torch
from datasets import Dataset
from PIL import Image
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

from configuration_hivit_mae import HIVIT_ARCHS, HiViTMAEConfig
from hivit_mae_tools.cli import UserError, check_model_path, run_cli
from hivit_mae_tools.config_overrides import apply_config_overrides, parse_config_overrides
from hivit_mae_tools.data import DatasetArguments, find_image_column, load_hub_split, load_image_folder
from hivit_mae_tools.images import load_image
from hivit_mae_tools.outputs import staged_output
from hivit_mae_tools.preprocessing import image_processor
from hivit_mae_tools.pretraining_data import (
    ImageTransform,
    build_transform,
    collate_fn,
    normalize_pixel_values,
    set_train_transform,
)
from hivit_mae_tools.reconstruction import stack_vertically, visualize
from hivit_mae_tools.sample_images import SAMPLE_IMAGES, sample_images
from hivit_mae_tools.training import (
    CheckpointCompleteCallback,
    check_training_output,
    finish_processes,
    parse_training_args,
    resolve_resume,
    scale_learning_rate,
    setup_logging,
)
from modeling_hivit_mae import HiViTMAEForPreTraining

logger = logging.getLogger(__name__)

# Held out of the demo's training set, shown in its figure next to training images.
BUILTIN_HELD_OUT = ("chelsea",)
BUILTIN_FIGURE_IMAGES = ("astronaut", "coffee", "chelsea")

# mmpretrain's recipe, as Trainer arguments; anything on the command line overrides them.
RECIPE_ARGS = [
    "--output_dir",
    "outputs/hivit-mae-default",
    "--adam_beta1",
    "0.9",
    "--adam_beta2",
    "0.95",
    "--weight_decay",
    "0.05",
    "--lr_scheduler_type",
    "cosine",
    # Warm-up over 40 of 400 epochs. transformers 5 folds `warmup_ratio` into a fractional `warmup_steps`.
    *(
        ["--warmup_ratio", "0.1"]
        if "warmup_ratio" in {f.name for f in dataclasses.fields(TrainingArguments)}
        else ["--warmup_steps", "0.1"]
    ),
    "--num_train_epochs",
    "400",
    "--save_total_limit",
    "3",
    "--seed",
    "0",
    "--logging_steps",
    "10",
    "--remove_unused_columns",
    "False",
    "--report_to",
    "none",
    # Full batches only: a last, smaller batch of an epoch would make a compiled model compile again for its shape.
    "--dataloader_drop_last",
    "True",
]

# The built-in demo (no --dataset_name / --train_dir): a small model that visibly learns in a few minutes on 2 CPU
# cores. Also overridable from the command line.
DEMO_ARGS = [
    "--max_steps",
    "300",
    "--per_device_train_batch_size",
    "16",
    "--base_learning_rate",
    "2.4e-2",  # 1.5e-3 at batch 16: a short run needs a much larger rate than a 400-epoch one
    "--logging_steps",
    "10",
    "--save_strategy",
    "no",
]
DEMO_CONFIG_OVERRIDES = (
    "image_size=112,decoder_hidden_size=256,decoder_num_hidden_layers=2,decoder_num_attention_heads=8"
)


@dataclass
class ModelArguments:
    """Which model to pre-train."""

    arch: str = field(
        default="base",
        metadata={
            "help": f"HiViT size to build from scratch, one of {sorted(HIVIT_ARCHS)} (the demo uses tiny).",
            "choices": sorted(HIVIT_ARCHS),
        },
    )
    model_name_or_path: Optional[str] = field(
        default=None,
        metadata={"help": "Continue pre-training from this HiViTMAEForPreTraining folder or Hub id instead."},
    )
    config_overrides: Optional[str] = field(
        default=None,
        metadata={
            "help": "Config fields to override, as `key=value,key=value` (values parsed as JSON, e.g. "
            "`image_size=64,depths=[1,1,2]`) or a JSON object."
        },
    )
    mask_ratio: Optional[float] = field(default=None, metadata={"help": "Override the config's mask ratio (0.75)."})
    norm_pix_loss: Optional[bool] = field(
        default=None, metadata={"help": "Override whether the target is per-patch normalised pixels (True)."}
    )
    base_learning_rate: float = field(
        default=1.5e-4,
        metadata={
            "help": "Learning rate per 256 images: learning_rate = base_learning_rate * total batch / 256, total "
            "batch = per-device batch * gradient accumulation * world size. Ignored when --learning_rate is given."
        },
    )
    cache_dir: Optional[str] = field(default=None, metadata={"help": "Cache folder for Hub models and datasets."})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Passed to `datasets.load_dataset` (script datasets, datasets < 4)."}
    )


@dataclass
class DataTrainingArguments(DatasetArguments):
    """Which images to train on and how to augment them."""

    streaming: bool = field(
        default=False,
        metadata={
            "help": "Stream --dataset_name instead of downloading it whole first (datasets' `streaming=True`); "
            "needs --max_steps, since a stream has no length."
        },
    )
    shuffle_buffer_size: int = field(
        default=10_000, metadata={"help": "With --streaming: images in the buffer that shuffles the stream."}
    )
    crop_min_scale: float = field(
        default=0.2, metadata={"help": "Smallest area fraction of RandomResizedCrop (mmpretrain: 0.2)."}
    )
    augment: bool = field(
        default=True,
        metadata={
            "help": "RandomResizedCrop + horizontal flip. --augment False: deterministic resize + centre crop "
            "(for reproducibility tests)."
        },
    )
    masking_seed: Optional[int] = field(
        default=None,
        metadata={
            "help": "Draw each image's masking noise from (masking_seed, index of the image in the dataset) instead "
            "of the global RNG: the same masks whatever the number of processes (for reproducibility tests)."
        },
    )
    reconstruction_figure: bool = field(
        default=True,
        metadata={"help": "Write reconstruction figures (before/after training) into the output folder."},
    )


# ----------------------------------------------------------------------------------------------------------- data


def builtin_dataset(repeats: int = 16) -> Dataset:
    """The demo's training set: the built-in photographs (minus the held-out ones), each listed `repeats` times so
    that an epoch holds many different random crops."""
    images = sample_images([name for name in SAMPLE_IMAGES if name not in BUILTIN_HELD_OUT])
    dataset = Dataset.from_dict(
        {"image": list(images.values()), "name": list(images)},
        features=datasets.Features({"image": datasets.Image(), "name": datasets.Value("string")}),
    )
    return datasets.concatenate_datasets([dataset] * repeats)


def load_train_dataset(data_args: DataTrainingArguments, model_args: ModelArguments) -> tuple[Dataset, str, str]:
    """The training split (an `IterableDataset` with --streaming), its image column and a short description of where
    it came from."""
    if data_args.streaming and data_args.dataset_name is None:
        raise ValueError("--streaming streams a --dataset_name; a --train_dir is read in place already")
    if data_args.streaming and data_args.masking_seed is not None:
        raise ValueError("--masking_seed needs the index of every image, which a stream (--streaming) does not give")
    if data_args.dataset_name is not None:
        dataset = load_hub_split(
            data_args, data_args.train_split, model_args.cache_dir, data_args.streaming, model_args.trust_remote_code
        )
        source = f"Hub dataset `{data_args.dataset_name}` (split `{data_args.train_split}`)"
    elif data_args.train_dir is not None:
        dataset = load_image_folder(
            data_args.train_dir,
            "--train_dir",
            data_args.image_column_name,
            data_args.skip_bad_images,
            model_args.cache_dir,
            data_args.max_train_samples,
        )
        source = f"image folder `{data_args.train_dir}`"
    else:
        dataset = builtin_dataset()
        source = "scikit-image's sample photographs (built-in demo)"
    streamed = isinstance(dataset, datasets.IterableDataset)
    if not streamed and len(dataset) == 0:
        raise ValueError(f"The training set from {source} is empty")
    column = find_image_column(dataset, data_args.image_column_name)
    if data_args.max_train_samples is not None:
        if streamed:
            dataset = dataset.take(data_args.max_train_samples)
        else:
            dataset = dataset.select(range(min(data_args.max_train_samples, len(dataset))))
    if isinstance((dataset.features or {}).get(column), datasets.Image) and dataset.features[column].decode:
        # Decode in our transform, so that an unreadable file is reported with its path.
        dataset = dataset.cast_column(column, datasets.Image(decode=False))
    if data_args.masking_seed is not None:
        dataset = dataset.add_column("sample_index", list(range(len(dataset))))
    return dataset, column, source


# ------------------------------------------------------------------------------------------------ optimisation
NO_DECAY_NAME_PARTS = ("position_embeddings", "pos_embed", "mask_token", "relative_position_bias_table")


def decay_parameter_names(model: torch.nn.Module) -> list[str]:
    """Names of the trainable parameters that get weight decay under mmpretrain's MAE `paramwise_cfg`: everything
    but LayerNorm weights and biases, all biases, position tables and the mask token."""
    no_decay = set()
    for module_name, module in model.named_modules():
        for name, _ in module.named_parameters(recurse=False):
            full_name = f"{module_name}.{name}" if module_name else name
            if (
                isinstance(module, (torch.nn.LayerNorm, torch.nn.GroupNorm))
                or name == "bias"
                or any(part in full_name for part in NO_DECAY_NAME_PARTS)
            ):
                no_decay.add(full_name)
    return [name for name, parameter in model.named_parameters() if parameter.requires_grad and name not in no_decay]


def get_parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups: `[{params with decay, weight_decay}, {params without, 0.0}]` (frozen ones left out)."""
    decay = set(decay_parameter_names(model))
    trainable = [(name, parameter) for name, parameter in model.named_parameters() if parameter.requires_grad]
    return [
        {"params": [p for n, p in trainable if n in decay], "weight_decay": weight_decay},
        {"params": [p for n, p in trainable if n not in decay], "weight_decay": 0.0},
    ]


class MAETrainer(Trainer):
    """Trainer with mmpretrain's weight-decay grouping, the uint8 batches of `hivit_mae_tools.pretraining_data`
    normalised on the training device, and a model card describing the run."""

    model_card_text: Optional[str] = None

    def get_decay_parameter_names(self, model) -> list[str]:
        return decay_parameter_names(model)

    def compute_loss(self, model, inputs, *args, **kwargs):
        # The batch is already on the device here: normalising after the copy moves a quarter of float32's bytes.
        inputs = {**inputs, "pixel_values": normalize_pixel_values(inputs["pixel_values"])}
        return super().compute_loss(model, inputs, *args, **kwargs)

    def create_model_card(self, *args, **kwargs):
        if self.model_card_text is None:
            return super().create_model_card(*args, **kwargs)
        if self.is_world_process_zero():
            Path(self.args.output_dir, "README.md").write_text(self.model_card_text, encoding="utf-8")


class RankSeedCallback(TrainerCallback):
    """Different random crops and masks on every process (mmpretrain's `diff_rank_seed=True`); the Trainer seeds all
    processes alike. On resume the Trainer later restores each process's own saved RNG state."""

    def on_train_begin(self, args, state, control, **kwargs):
        if args.world_size > 1:
            torch.manual_seed(args.seed + args.process_index)


class StepTimeCallback(TrainerCallback):
    """Times the optimizer steps end to end (data loading included) and logs the first against the median of the later
    ones: with --torch_compile the difference is the compilation time. The figures land in `seconds`, with the
    steady-state throughput in images/s."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.durations: list[float] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.last = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self.durations.append(now - self.last)
        self.last = now

    def on_train_end(self, args, state, control, **kwargs):
        if len(self.durations) < 2:
            return
        first, later = self.durations[0], statistics.median(self.durations[1:])
        total_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        self.seconds = {
            "first_step_seconds": first,
            "median_step_seconds": later,
            "images_per_second": total_batch / later,
        }
        if args.torch_compile:
            self.seconds["compile_seconds"] = first - later
            logger.info("torch.compile: %.1f s (first step %.1f s, later steps %.3f s)", first - later, first, later)
        else:
            logger.info("First step %.2f s, later steps %.3f s (not compiled)", first, later)


def compile_by_default(training_args: TrainingArguments, user_args: list[str]) -> bool:
    """Whether to turn on `--torch_compile`: on CUDA, unless the command line sets it (`--torch_compile False` opts
    out) or a compile backend / mode, which turn it on anyway."""
    if training_args.torch_compile or training_args.use_cpu or not torch.cuda.is_available():
        return False
    flags = ("--torch_compile", "--torch_compile_backend", "--torch_compile_mode")
    return not any(arg.split("=")[0] in flags for arg in user_args)


def prepare_train_dataset(
    dataset, image_column: str, config: HiViTMAEConfig, data_args: DataTrainingArguments, seed: int
):
    """The dataset the Trainer loads from: `dataset` (from `load_train_dataset`) decoding and augmenting on access,
    a stream shuffled through a buffer first."""
    if isinstance(dataset, datasets.IterableDataset):
        dataset = dataset.shuffle(seed=seed, buffer_size=data_args.shuffle_buffer_size)
    transform = ImageTransform(
        image_column,
        build_transform(config.image_size, data_args.augment, data_args.crop_min_scale),
        config.num_patches,
        data_args.masking_seed,
        decode=load_image,
    )
    return set_train_transform(dataset, transform)


def build_trainer(model, training_args: TrainingArguments, train_dataset, callbacks=()) -> "MAETrainer":
    """The Trainer of `main`; `trainer.get_train_dataloader()` is the training DataLoader (benchmarks use it)."""
    return MAETrainer(
        model=model,
        args=training_args,
        # Saved with the weights and every checkpoint, so that `AutoImageProcessor` loads from them downstream.
        processing_class=image_processor(model.config.image_size),
        train_dataset=train_dataset,
        data_collator=collate_fn,
        callbacks=[RankSeedCallback(), CheckpointCompleteCallback(), *callbacks],
    )


# ------------------------------------------------------------------------------------------------------- model
def build_model(model_args: ModelArguments) -> HiViTMAEForPreTraining:
    overrides = parse_config_overrides(model_args.config_overrides)
    if model_args.mask_ratio is not None:
        overrides["mask_ratio"] = model_args.mask_ratio
    if model_args.norm_pix_loss is not None:
        overrides["norm_pix_loss"] = model_args.norm_pix_loss
    if model_args.model_name_or_path:
        check_model_path(model_args.model_name_or_path)
        config = HiViTMAEConfig.from_pretrained(model_args.model_name_or_path, cache_dir=model_args.cache_dir)
        apply_config_overrides(config, overrides)
        return HiViTMAEForPreTraining.from_pretrained(
            model_args.model_name_or_path, config=config, cache_dir=model_args.cache_dir
        )
    unknown = [key for key in overrides if not hasattr(HiViTMAEConfig(), key)]
    if unknown:
        raise UserError(f"--config_overrides: HiViTMAEConfig has no field(s) {unknown}", usage=True)
    try:
        config = HiViTMAEConfig.from_arch(model_args.arch, **overrides)
    except ValueError as error:
        raise UserError(str(error), usage=True) from error
    return HiViTMAEForPreTraining(config)


# ------------------------------------------------------------------------------------------------------ report
def model_card(model, model_args, data_args, training_args, source, summary, command) -> str:
    config = model.config
    arch = f"continued from `{model_args.model_name_or_path}`" if model_args.model_name_or_path else model_args.arch
    figure = "\n![before / after](reconstruction_before_after.png)\n" if summary.get("figure") else ""
    rows = "\n".join(f"| {key} | {value} |" for key, value in summary["table"].items())
    return f"""---
library_name: transformers
tags:
- hivit
- mae
- image-pretraining
- masked-image-modeling
---

# HiViT-MAE ({arch})

HiViT encoder + MAE decoder pre-trained with masked autoencoding by `run_pretraining.py` (🤗 Trainer port of
mmpretrain's MAE-HiViT recipe) on {source}.

| | |
|---|---|
{rows}

Encoder: width {config.hidden_size}, depths {config.depths}, {config.num_attention_heads} heads; decoder: width
{config.decoder_hidden_size}, {config.decoder_num_hidden_layers} layers; image size {config.image_size}, patch size
{config.patch_size}, mask ratio {config.mask_ratio}, norm-pix loss {config.norm_pix_loss}.
{figure}
## Use

```python
from transformers import AutoModelForPreTraining

model = AutoModelForPreTraining.from_pretrained("PATH_OR_HUB_ID", trust_remote_code=True)
```

## Command

```bash
{command}
```
"""


def main(args: Optional[list[str]] = None, callbacks: Optional[list[TrainerCallback]] = None) -> dict[str, Any]:
    """Parse `args` (default: the command line), pre-train and return a summary (losses, timings, paths)."""
    user_args = list(sys.argv[1:] if args is None else args)
    types = (ModelArguments, DataTrainingArguments, TrainingArguments)
    model_args, data_args, training_args = parse_training_args(types, RECIPE_ARGS + user_args)
    demo = data_args.dataset_name is None and data_args.train_dir is None
    defaults = []
    if demo:
        defaults += DEMO_ARGS + ["--arch", "tiny"]
        if model_args.model_name_or_path is None:
            defaults += ["--config_overrides", DEMO_CONFIG_OVERRIDES]
    if compile_by_default(training_args, user_args):
        defaults += ["--torch_compile", "True"]
    if defaults:
        model_args, data_args, training_args = parse_training_args(types, RECIPE_ARGS + defaults + user_args)
    if data_args.streaming and training_args.max_steps <= 0:
        raise UserError(
            "--streaming needs --max_steps: a stream has no length, so epochs cannot be counted", usage=True
        )

    setup_logging(training_args, logger)

    total_batch = scale_learning_rate(training_args, user_args, model_args.base_learning_rate, 256)
    logger.info(
        "Total batch %d, learning rate %.3g, process %d of %d",
        total_batch,
        training_args.learning_rate,
        training_args.process_index,
        training_args.world_size,
    )

    resume = resolve_resume(training_args)
    check_training_output(
        training_args, resume, inputs=[data_args.train_dir], source_model=model_args.model_name_or_path
    )
    set_seed(training_args.seed)
    model = build_model(model_args)
    config = model.config
    with training_args.main_process_first(desc="loading the dataset"):
        raw_dataset, image_column, source = load_train_dataset(data_args, model_args)
    train_dataset = prepare_train_dataset(raw_dataset, image_column, config, data_args, training_args.seed)
    streamed = isinstance(train_dataset, datasets.IterableDataset)
    logger.info("Training on %s images from %s", "streamed" if streamed else len(train_dataset), source)
    if training_args.torch_compile:
        logger.info("Compiling the model (--torch_compile False to run eagerly); the first step includes compilation")

    is_main = training_args.process_index == 0
    output_dir = Path(training_args.output_dir)
    figure_images = None
    summary: dict[str, Any] = {"table": {}}
    if data_args.reconstruction_figure and is_main:
        if demo:
            figure_images = list(sample_images(BUILTIN_FIGURE_IMAGES).values())
        else:
            if streamed:
                rows = raw_dataset.take(3)
            else:
                rows = raw_dataset.with_format(None).select(range(min(3, len(raw_dataset))))
            figure_images = [load_image(row[image_column]) for row in rows]
        if resume is None:
            before, summary["figure_loss_before"] = visualize(model, figure_images, title="step 0")
            output_dir.mkdir(parents=True, exist_ok=True)
            before.save(output_dir / "reconstruction_step0.png", optimize=True)

    step_times = StepTimeCallback()
    trainer = build_trainer(model, training_args, train_dataset, [step_times, *(callbacks or [])])
    start = time.time()
    train_result = trainer.train(resume_from_checkpoint=resume)
    elapsed = time.time() - start
    trainer.log_metrics("train", train_result.metrics)
    trainer.save_metrics("train", train_result.metrics)
    trainer.save_state()

    losses = [(entry["step"], entry["loss"]) for entry in trainer.state.log_history if "loss" in entry]
    summary.update(
        {
            "output_dir": str(output_dir),
            "losses": losses,
            "first_loss": losses[0][1] if losses else None,
            "last_loss": losses[-1][1] if losses else None,
            "train_loss": train_result.metrics.get("train_loss"),
            "global_step": trainer.state.global_step,
            "train_seconds": elapsed,
            "learning_rate": training_args.learning_rate,
            "total_batch": total_batch,
            **step_times.seconds,
        }
    )
    # The final model, figures, card and summary go to a staging folder and move into place together at the end.
    with staged_output(output_dir) if is_main else contextlib.nullcontext(output_dir) as final_dir:
        trainer.save_model(str(final_dir))
        if is_main:
            if figure_images is not None:
                after, summary["figure_loss_after"] = visualize(
                    trainer.model, figure_images, title=f"step {trainer.state.global_step}"
                )
                after.save(final_dir / "reconstruction.png", optimize=True)
                if (output_dir / "reconstruction_step0.png").exists():
                    with Image.open(output_dir / "reconstruction_step0.png") as before:
                        stack_vertically([before.convert("RGB"), after]).save(
                            final_dir / "reconstruction_before_after.png", optimize=True
                        )
                    summary["figure"] = str(output_dir / "reconstruction_before_after.png")
            table = summary["table"]
            table["training data"] = source + (f" ({len(train_dataset)} samples)" if demo else "")
            table["steps"] = trainer.state.global_step
            table["total batch"] = f"{total_batch} ({training_args.world_size} process(es))"
            table["learning rate"] = (
                f"{training_args.learning_rate:.3g} (base {model_args.base_learning_rate:g} x batch / 256)"
            )
            table["optimizer"] = (
                f"AdamW betas ({training_args.adam_beta1}, {training_args.adam_beta2}), weight decay "
                f"{training_args.weight_decay} (none on norms, biases, position tables, mask token)"
            )
            scheduler = getattr(training_args.lr_scheduler_type, "value", training_args.lr_scheduler_type)
            table["schedule"] = f"{scheduler} with linear warm-up"
            if summary["first_loss"] is not None:
                table["train loss (first / last logged)"] = f"{summary['first_loss']:.4f} / {summary['last_loss']:.4f}"
            if "figure_loss_after" in summary:
                before_text = f"{summary['figure_loss_before']:.4f} -> " if "figure_loss_before" in summary else ""
                table["loss on figure images, fixed masks"] = before_text + f"{summary['figure_loss_after']:.4f}"
            table["training time"] = f"{elapsed / 60:.1f} min"
            command = "python run_pretraining.py " + " ".join(shlex.quote(arg) for arg in user_args)
            trainer.model_card_text = model_card(
                model, model_args, data_args, training_args, source, summary, command.strip()
            )
            (final_dir / "README.md").write_text(trainer.model_card_text, encoding="utf-8")
            (final_dir / "pretraining_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    if is_main:
        logger.info(
            "Done in %.1f s: loss %s -> %s; model in %s",
            elapsed,
            summary["first_loss"],
            summary["last_loss"],
            output_dir,
        )
    if training_args.push_to_hub:
        trainer.push_to_hub(tags=["hivit", "mae", "image-pretraining"])
    finish_processes()
    return summary


def cli(argv: Optional[list[str]] = None) -> int:
    """Console entry point (`hivit-mae-pretrain`): exit status, one `error:` line for bad input (`--debug`: the
    traceback)."""
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
