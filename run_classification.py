#!/usr/bin/env python
"""Fine-tune a HiViT-MAE encoder for image classification with the 🤗 Trainer.

Two recipes (`hivit_mae_tools/finetune_recipes.py`), picked by the starting folder (`--recipe` overrides; every
setting below has its own flag):

- `original`, for an MAE-pre-trained folder (this project's pre-training or encoder folders, converted mmpretrain or
  original-repository MAE checkpoints) or a classifier with `fc_norm`: the original HiViT repository's fine-tuning
  (`self_supervised/main_finetune.py` with `get_started.md`'s command): mean pool -> `fc_norm` -> head (fresh head
  truncated normal(2e-5)), relative position bias, position table as stored, no hifeat; AdamW(lr=5e-4 x total batch
  / 256, weight_decay=0.05) with layer-wise learning-rate decay 0.85, no decay on 1-D parameters, the position table
  and relative position bias tables, no gradient clipping; drop path 0.2; 100 epochs, 5 of linear warm-up, cosine
  to 1e-6.
- `mmpretrain`, for a classifier without `fc_norm` (one converted from mmpretrain keeps its own head exactly):
  mmpretrain 1.2.0's HiViT classification recipe (`configs/hivit/hivit-base-p16_16xb64_in1k.py`,
  `_base_/schedules/imagenet_bs1024_adamw_hivit.py`): AdamW(lr=5e-4 x total batch / 512, weight_decay=0.05), the
  same tensors without decay, gradients clipped at norm 5; 300 epochs, 20 of warm-up, cosine to 1 % of the peak;
  from an MAE folder: relative position bias, LayerNorm eps 1e-5, mmpretrain's drop path for the size (0.05 tiny,
  0.3 small, 0.5 base and large), average pooling straight into the head.

Both share their data recipe (the original's timm `create_transform` and mmpretrain's `imagenet_bs64_hivit_224.py`
are the same policy), with torchvision's implementations: RandomResizedCrop(224, bicubic), horizontal flip, timm's
RandAugment "rand-m9-mstd0.5-inc1" approximated (see `build_train_transform`), ImageNet normalisation,
RandomErasing(p=0.25); evaluation: resize the short side to 256, centre crop 224; Mixup(alpha=0.8) or
CutMix(alpha=1.0) on every batch, one of the two at random; label smoothing 0.1.

Data: `--train_dir` (a folder with one sub-folder per class, read with datasets' `imagefolder`) or `--dataset_name` (a
Hub dataset with an image and a class-label column). Evaluation uses `--validation_dir`, the dataset's
`--validation_split`, or a `--validation_fraction` held out of the training set.

    python run_classification.py --model_name_or_path hivit-mae-base --train_dir data/train \
        --validation_dir data/val --output_dir outputs/hivit-base-ft --per_device_train_batch_size 128 --bf16
"""

import json
import logging
import os
import sys
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset
from torchvision import transforms
from torchvision.transforms import v2
from transformers import TrainingArguments, set_seed
from transformers.trainer_utils import IntervalStrategy

from configuration_hivit_mae import HiViTMAEConfig
from hivit_mae_tools.cli import UserError, check_model_path, run_cli
from hivit_mae_tools.config_overrides import apply_config_overrides, parse_config_overrides
from hivit_mae_tools.data import (
    DatasetArguments,
    class_names,
    find_image_column,
    find_label_column,
    load_hub_split,
    load_image_folder,
    validation_label_map,
)
from hivit_mae_tools.finetune_recipes import (
    START_DESCRIPTIONS,
    FineTuningRecipe,
    LayerDecayTrainer,
    choose_recipe,
    initialise_fresh_weights,
)
from hivit_mae_tools.images import load_image
from hivit_mae_tools.outputs import staged_output
from hivit_mae_tools.preprocessing import IMAGENET_MEAN, IMAGENET_STD, image_processor
from hivit_mae_tools.training import (
    CheckpointCompleteCallback,
    check_training_output,
    finish_processes,
    parse_training_args,
    resolve_resume,
    scale_learning_rate,
    setup_logging,
)
from modeling_hivit_mae import HiViTMAEForImageClassification

logger = logging.getLogger(__name__)

# The script's own Trainer arguments; the recipe's come after them and the command line's last (the last one wins).
SCRIPT_ARGS = [
    "--eval_strategy", "epoch",
    "--save_strategy", "epoch",
    "--logging_steps", "10",
    "--remove_unused_columns", "False",
    "--report_to", "none",
]  # fmt: skip


@dataclass
class ModelArguments:
    """Which encoder to fine-tune."""

    model_name_or_path: str = field(
        metadata={"help": "A HiViT-MAE folder or Hub id (pre-training, encoder or classifier); it picks the recipe."}
    )
    recipe: str = field(
        default="auto",
        metadata={
            "help": "Fine-tuning recipe: `original` (the original HiViT repository's MAE fine-tuning), `mmpretrain` "
            "(mmpretrain's HiViT classification) or `auto`: `mmpretrain` for a classifier without fc_norm (as "
            "converted from mmpretrain), `original` for everything else (MAE-pre-trained folders).",
            "choices": ["auto", "original", "mmpretrain"],
        },
    )
    drop_path_rate: Optional[float] = field(
        default=None,
        metadata={
            "help": "Stochastic depth; default: original 0.2, mmpretrain its rate for the size (0.05 / 0.3 / 0.5; "
            "0.1 if custom)."
        },
    )
    layer_decay: Optional[float] = field(
        default=None,
        metadata={"help": "Layer-wise learning-rate decay; default: original 0.85, mmpretrain none (1.0)."},
    )
    head_init_std: Optional[float] = field(
        default=None,
        metadata={
            "help": "Standard deviation of a fresh head's truncated normal; default: original 2e-5, mmpretrain the "
            "config's initializer_range (0.02)."
        },
    )
    config_overrides: Optional[str] = field(
        default=None,
        metadata={
            "help": "Further config fields, as `key=value,key=value` or a JSON object; they override the recipe's "
            "(original: use_fc_norm, use_relative_position_bias, no use_hifeat, legacy_position_encoding=False; "
            "mmpretrain from an MAE folder: use_relative_position_bias, layer_norm_eps=1e-5)."
        },
    )
    base_learning_rate: Optional[float] = field(
        default=None,
        metadata={
            "help": "learning_rate = base_learning_rate * total batch / 256 (original) or / 512 (mmpretrain); default "
            "5e-4 for both. Ignored when --learning_rate is given."
        },
    )
    label_smoothing: float = field(default=0.1, metadata={"help": "Label smoothing of the targets (mmpretrain: 0.1)."})
    mixup_alpha: float = field(default=0.8, metadata={"help": "Mixup alpha; 0 turns Mixup off."})
    cutmix_alpha: float = field(default=1.0, metadata={"help": "CutMix alpha; 0 turns CutMix off."})
    cache_dir: Optional[str] = field(default=None, metadata={"help": "Cache folder for Hub models and datasets."})


@dataclass
class DataArguments(DatasetArguments):
    """Which labelled images to train and evaluate on."""

    validation_dir: Optional[str] = field(
        default=None, metadata={"help": "Folder with one sub-folder of images per class, for evaluation."}
    )
    validation_split: Optional[str] = field(default=None, metadata={"help": "Split of the dataset to evaluate on."})
    validation_fraction: float = field(
        default=0.0, metadata={"help": "Without a validation set: hold out this fraction of the training set."}
    )
    label_column_name: Optional[str] = field(
        default=None, metadata={"help": "Column holding the class indices; default: the only ClassLabel column."}
    )
    augment: bool = field(
        default=True, metadata={"help": "RandAugment and RandomErasing (random crop and flip are always on)."}
    )


def load_splits(data_args: DataArguments, cache_dir: Optional[str]) -> tuple[Dataset, Optional[Dataset]]:
    """The training set and the validation set (None without one)."""
    if data_args.dataset_name is not None:
        train = load_hub_split(data_args, data_args.train_split, cache_dir)
        validation = (
            load_hub_split(data_args, data_args.validation_split, cache_dir) if data_args.validation_split else None
        )
    elif data_args.train_dir is not None:

        def load(folder: str, flag: str) -> Dataset:
            return load_image_folder(folder, flag, data_args.image_column_name, data_args.skip_bad_images, cache_dir)

        train = load(data_args.train_dir, "--train_dir")
        validation = load(data_args.validation_dir, "--validation_dir") if data_args.validation_dir else None
    else:
        raise UserError("give the labelled training images: --train_dir or --dataset_name", usage=True)
    if validation is None and data_args.validation_fraction > 0:
        held_out = train.train_test_split(test_size=data_args.validation_fraction, seed=0)
        train, validation = held_out["train"], held_out["test"]
    if data_args.max_train_samples is not None:
        train = train.select(range(min(data_args.max_train_samples, len(train))))
    return train, validation


class LabelledImageTransform:
    """`dataset.set_transform` function: decode and transform a batch of rows into `pixel_values` and `labels`;
    `label_map[i]` is the training class index of the dataset's class `i` (validation classes are matched by name)."""

    def __init__(
        self, image_column: str, label_column: str, transform, num_labels: int, label_map: Optional[list[int]] = None
    ):
        self.image_column, self.label_column = image_column, label_column
        self.transform, self.num_labels, self.label_map = transform, num_labels, label_map

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        labels = batch[self.label_column]
        if self.label_map is not None:
            labels = [self.label_map[label] for label in labels]
        wrong = [label for label in labels if not 0 <= label < self.num_labels]
        if wrong:
            raise ValueError(f"class label {wrong[0]} is outside 0 .. {self.num_labels - 1}")
        images = [self.transform(load_image(value)) for value in batch[self.image_column]]
        return {"pixel_values": images, "labels": labels}


def build_train_transform(image_size: int, augment: bool) -> transforms.Compose:
    """Both recipes' training augmentation (timm's `create_transform` as the original calls it, and mmpretrain's
    `imagenet_bs64_hivit_224.py`) with torchvision's transforms.

    RandAugment is timm's "rand-m9-mstd0.5-inc1": two operations drawn at random, each applied with probability 0.5, at
    magnitude 9 of 10, bicubic, filled with the mean pixel. torchvision spreads the magnitude over 31 bins, so 9 / 10
    is bin 27, which gives the same ranges (rotate 27 degrees, shear 0.27, translate 0.41 of the side, enhancements
    1 +- 0.81, solarize below 26). What differs: no noise on the magnitude (mstd 0.5), Posterize keeps 4 bits where
    timm keeps 1, and torchvision draws from Identity where timm has Invert and SolarizeAdd."""
    steps = [
        transforms.RandomResizedCrop(image_size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
    ]
    if augment:
        mean_pixel = [round(255 * value) for value in IMAGENET_MEAN]
        operation = transforms.RandAugment(
            num_ops=1,
            magnitude=27,
            num_magnitude_bins=31,
            interpolation=transforms.InterpolationMode.BICUBIC,
            fill=mean_pixel,
        )
        steps += [transforms.RandomApply([operation], p=0.5) for _ in range(2)]
    steps += [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if augment:
        steps.append(transforms.RandomErasing(p=0.25, value="random"))
    return transforms.Compose(steps)


class ProcessorTransform:
    """One image through an image processor, as a picklable callable (for dataloader workers)."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, image) -> torch.Tensor:
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]


def collate_fn(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    return {
        "pixel_values": torch.stack([example["pixel_values"] for example in examples]),
        "labels": torch.tensor([example["labels"] for example in examples]),
    }


def batch_mix(num_labels: int, mixup_alpha: float, cutmix_alpha: float) -> Optional[v2.Transform]:
    """Mixup or CutMix, one of the two at random for each batch (mmpretrain's `RandomBatchAugment`): maps
    `(pixel_values, class indices)` to `(mixed pixel_values, soft targets (batch_size, num_labels))`."""
    mixes = []
    if mixup_alpha > 0:
        mixes.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_labels))
    if cutmix_alpha > 0:
        mixes.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_labels))
    return v2.RandomChoice(mixes) if mixes else None


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, smoothing: float) -> torch.Tensor:
    """mmpretrain's `LabelSmoothLoss(mode='original')`: cross entropy against `targets * (1 - smoothing) + smoothing /
    num_labels`, for class indices `(batch_size,)` or soft targets `(batch_size, num_labels)`."""
    if targets.ndim == 1:
        targets = F.one_hot(targets, logits.shape[-1])
    targets = targets.float() * (1 - smoothing) + smoothing / logits.shape[-1]
    return -(targets * logits.float().log_softmax(dim=-1)).sum(dim=-1).mean()


class ClassificationTrainer(LayerDecayTrainer):
    """The recipes' optimizer (`LayerDecayTrainer`), batch mixing in training, a label-smoothed soft-target loss, and a
    model card that names the recipe."""

    def __init__(
        self,
        *args,
        label_smoothing: float = 0.0,
        mix: Optional[v2.Transform] = None,
        recipe_card: Optional[str] = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.label_smoothing, self.mix, self.recipe_card = label_smoothing, mix, recipe_card

    def create_model_card(self, *args, **kwargs):
        super().create_model_card(*args, **kwargs)
        if self.recipe_card is not None and self.is_world_process_zero():
            with open(os.path.join(self.args.output_dir, "README.md"), "a", encoding="utf-8") as card:
                card.write(self.recipe_card)

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        pixel_values, labels = inputs["pixel_values"], inputs["labels"]
        if model.training and self.mix is not None:
            pixel_values, labels = self.mix(pixel_values, labels)
        outputs = model(pixel_values=pixel_values)
        loss = soft_target_cross_entropy(outputs.logits, labels, self.label_smoothing)
        return (loss, outputs) if return_outputs else loss


def accuracy(prediction) -> dict[str, float]:
    logits, labels = prediction.predictions, prediction.label_ids
    metrics = {"accuracy": float((logits.argmax(-1) == labels).mean())}
    if logits.shape[-1] > 5:
        top5 = np.argsort(-logits, axis=-1)[:, :5]
        metrics["top5_accuracy"] = float((top5 == labels[:, None]).any(-1).mean())
    return metrics


def build_model(
    model_args: ModelArguments, recipe: FineTuningRecipe, start: str, id2label: dict[int, str]
) -> HiViTMAEForImageClassification:
    """The classifier the recipe trains, from the `start` kind of folder (`starting_point`); `model_args` carries the
    recipe's defaults (`apply_recipe_defaults`)."""
    config = HiViTMAEConfig.from_pretrained(model_args.model_name_or_path, cache_dir=model_args.cache_dir)
    had_fc_norm = config.use_fc_norm
    overrides = {
        **recipe.config_overrides(start),
        "drop_path_rate": model_args.drop_path_rate,
        **parse_config_overrides(model_args.config_overrides),
    }
    apply_config_overrides(config, overrides)
    config.num_labels = len(id2label)
    config.id2label, config.label2id = id2label, {name: index for index, name in id2label.items()}
    model, info = HiViTMAEForImageClassification.from_pretrained(
        model_args.model_name_or_path,
        config=config,
        cache_dir=model_args.cache_dir,
        ignore_mismatched_sizes=True,  # the head of a classifier for other classes
        output_loading_info=True,
    )
    # Only the head, fc_norm and relative position tables the source lacks may start afresh; any other encoder weight
    # that is missing or of another shape means the source does not fit this config.
    allowed = ("classifier.", "fc_norm.", "relative_position_bias_table")
    mismatched = sorted(entry[0] if isinstance(entry, tuple) else entry for entry in info["mismatched_keys"])
    fresh = set(info["missing_keys"]) | set(mismatched)
    unfit = sorted(key for key in fresh if not key.startswith(allowed[:2]) and allowed[2] not in key)
    if unfit:
        missing = [key for key in unfit if key in info["missing_keys"]]
        mismatched = [key for key in unfit if key not in info["missing_keys"]]
        raise ValueError(
            f"{model_args.model_name_or_path} does not fit the fine-tuning config: "
            f"{'missing ' + ', '.join(missing[:5]) if missing else ''}"
            f"{'; ' if missing and mismatched else ''}"
            f"{'other shapes for ' + ', '.join(mismatched[:5]) if mismatched else ''}"
        )
    if config.use_fc_norm and not had_fc_norm:
        fresh |= {"classifier.weight", "classifier.bias"}  # a head trained without fc_norm does not fit its output
    initialise_fresh_weights(model, recipe, fresh, model_args.head_init_std)
    logger.info("New weights: %s", ", ".join(sorted(fresh)) or "none")
    return model


def parse_args(
    user_args: list[str],
) -> tuple[ModelArguments, DataArguments, TrainingArguments, FineTuningRecipe, str]:
    """The arguments with the recipe's defaults under the command line's, the recipe and the kind of starting folder
    (`starting_point`)."""
    types = (ModelArguments, DataArguments, TrainingArguments)
    # The recipe depends on the starting folder, and its Trainer defaults must come before the command line's.
    model_args = parse_training_args(types, SCRIPT_ARGS + user_args)[0]
    check_model_path(model_args.model_name_or_path)
    source_config = HiViTMAEConfig.from_pretrained(model_args.model_name_or_path, cache_dir=model_args.cache_dir)
    recipe, start = choose_recipe(source_config, model_args.recipe)
    model_args, data_args, training_args = parse_training_args(
        types, SCRIPT_ARGS + list(recipe.trainer_args) + user_args
    )
    apply_recipe_defaults(model_args, recipe, source_config)
    return model_args, data_args, training_args, recipe, start


def apply_recipe_defaults(model_args: ModelArguments, recipe: FineTuningRecipe, config: HiViTMAEConfig):
    """Give every recipe setting that the command line left unset the recipe's value."""
    if model_args.base_learning_rate is None:
        model_args.base_learning_rate = recipe.base_learning_rate
    if model_args.layer_decay is None:
        model_args.layer_decay = recipe.layer_decay
    if model_args.head_init_std is None:
        model_args.head_init_std = recipe.head_init_std
    if model_args.drop_path_rate is None:
        model_args.drop_path_rate = recipe.drop_path_rate_for(config)


def recipe_card(
    recipe: FineTuningRecipe, chosen_by: str, model_args: ModelArguments, training_args: TrainingArguments, batch: int
) -> str:
    """The model card's section on the fine-tuning recipe, with the values this run used."""
    scheduler = getattr(training_args.lr_scheduler_type, "value", training_args.lr_scheduler_type)
    rows = {
        "recipe": f"`{recipe.name}`: {recipe.source}; {chosen_by}",
        "started from": f"`{model_args.model_name_or_path}`",
        "learning rate": f"{training_args.learning_rate:.3g} at total batch {batch} (base "
        f"{model_args.base_learning_rate:g} x batch / {recipe.learning_rate_per_images} unless given)",
        "layer-wise learning-rate decay": model_args.layer_decay or "none",
        "weight decay": f"{training_args.weight_decay} (none on 1-D parameters, position tables)",
        "schedule": f"{scheduler} {json.dumps(training_args.lr_scheduler_kwargs)}, warm-up "
        f"{training_args.warmup_steps or getattr(training_args, 'warmup_ratio', 0)}, "
        f"{training_args.num_train_epochs:g} epochs",
        "gradient clipping": training_args.max_grad_norm or "none",
        "drop path": model_args.drop_path_rate,
        "fresh head": f"truncated normal({model_args.head_init_std or 'initializer_range'})",
        "Mixup / CutMix / label smoothing": f"{model_args.mixup_alpha} / {model_args.cutmix_alpha} / "
        f"{model_args.label_smoothing}",
    }
    table = "\n".join(f"| {key} | {value} |" for key, value in rows.items())
    return f"\n## Fine-tuning recipe\n\n| | |\n|---|---|\n{table}\n"


def main(args: Optional[list[str]] = None) -> dict[str, float]:
    """Parse `args` (default: the command line), fine-tune, evaluate and return the final metrics."""
    user_args = list(sys.argv[1:] if args is None else args)
    model_args, data_args, training_args, recipe, start = parse_args(user_args)
    setup_logging(training_args, logger)
    chosen_by = "picked by --recipe" if model_args.recipe != "auto" else f"picked for {START_DESCRIPTIONS[start]}"
    logger.info("Fine-tuning recipe: %s (%s), %s", recipe.name, recipe.source, chosen_by)

    total_batch = scale_learning_rate(
        training_args, user_args, model_args.base_learning_rate, recipe.learning_rate_per_images
    )
    resume = resolve_resume(training_args)
    check_training_output(
        training_args,
        resume,
        inputs=[data_args.train_dir, data_args.validation_dir],
        source_model=model_args.model_name_or_path,
    )
    set_seed(training_args.seed)

    train, validation = load_splits(data_args, model_args.cache_dir)
    image_column = find_image_column(train, data_args.image_column_name)
    label_column = find_label_column(train, data_args.label_column_name)
    names = class_names(train, label_column)
    if names is not None:
        id2label = dict(enumerate(names))
    else:
        id2label = {index: f"LABEL_{index}" for index in range(max(train[label_column]) + 1)}
    if len(id2label) < 2:
        raise ValueError(f"The training set has {len(id2label)} class; classification needs at least 2")
    if validation is not None:
        validation_label_column = find_label_column(validation, data_args.label_column_name)
        label_map = validation_label_map(names, class_names(validation, validation_label_column)) if names else None
    if validation is None and training_args.eval_strategy != IntervalStrategy.NO:
        training_args.eval_strategy = IntervalStrategy.NO
        logger.info("No validation set (--validation_dir, --validation_split, --validation_fraction): no evaluation")

    model = build_model(model_args, recipe, start, id2label)
    size = model.config.image_size
    processor = image_processor(size)

    num_labels = len(id2label)
    train.set_transform(
        LabelledImageTransform(image_column, label_column, build_train_transform(size, data_args.augment), num_labels)
    )
    if validation is not None:
        validation.set_transform(
            LabelledImageTransform(
                find_image_column(validation, data_args.image_column_name),
                validation_label_column,
                ProcessorTransform(processor),
                num_labels,
                label_map,
            )
        )
    logger.info(
        "Fine-tuning %s on %d images of %d classes (total batch %d, learning rate %.3g)",
        model_args.model_name_or_path,
        len(train),
        num_labels,
        total_batch,
        training_args.learning_rate,
    )

    trainer = ClassificationTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=validation,
        data_collator=collate_fn,
        processing_class=processor,
        compute_metrics=accuracy,
        label_smoothing=model_args.label_smoothing,
        mix=batch_mix(num_labels, model_args.mixup_alpha, model_args.cutmix_alpha),
        callbacks=[CheckpointCompleteCallback()],
        layer_decay=model_args.layer_decay,
        recipe_card=recipe_card(recipe, chosen_by, model_args, training_args, total_batch),
    )
    result = trainer.train(resume_from_checkpoint=resume)
    # The final model goes to a staging folder and moves into place once complete.
    is_main = trainer.is_world_process_zero()
    with staged_output(training_args.output_dir) if is_main else nullcontext(training_args.output_dir) as final_dir:
        trainer.save_model(str(final_dir))
    metrics = dict(result.metrics)
    trainer.log_metrics("train", metrics)
    if validation is not None:
        evaluation = trainer.evaluate()
        trainer.log_metrics("eval", evaluation)
        trainer.save_metrics("eval", evaluation)
        metrics.update(evaluation)
    trainer.save_state()
    if not training_args.push_to_hub:  # pushing writes the card itself
        # A Hub id becomes the card's base model; a local folder is named in the recipe section.
        hub_id = None if os.path.isdir(model_args.model_name_or_path) else model_args.model_name_or_path
        trainer.create_model_card(
            finetuned_from=hub_id, tasks="image-classification", tags=["hivit", "image-classification"]
        )
    finish_processes()
    return metrics


def cli(argv: Optional[list[str]] = None) -> int:
    """Console entry point (`hivit-mae-finetune`): exit status, one `error:` line for bad input (`--debug`: the
    traceback)."""
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
