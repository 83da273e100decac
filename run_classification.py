#!/usr/bin/env python
"""Fine-tune a HiViT-MAE encoder for image classification with the 🤗 Trainer.

The defaults reproduce mmpretrain 1.2.0's HiViT classification recipe (`configs/hivit/hivit-base-p16_16xb64_in1k.py`
with `_base_/datasets/imagenet_bs64_hivit_224.py` and `_base_/schedules/imagenet_bs1024_adamw_hivit.py`), with
torchvision's implementations of its augmentations:

- RandomResizedCrop(224, bicubic), horizontal flip, RandAugment (2 operations, magnitude 9), ImageNet
  normalisation, RandomErasing(p=0.25); evaluation: resize the short side to 256, centre crop 224;
- Mixup(alpha=0.8) or CutMix(alpha=1.0) on every batch, one of the two at random; label smoothing 0.1;
- AdamW(lr=5e-4 x total batch / 512, weight_decay=0.05) without decay on norms, biases, one-dimensional
  parameters, position tables and relative position bias tables; gradients clipped at norm 5;
- linear warm-up over the first 20 of 300 epochs, then cosine decay to 1 % of the peak (mmpretrain's 1e-5 at its
  batch of 1024);
- HiViT with relative position bias, LayerNorm eps 1e-5 and mmpretrain's drop path rate for the size (0.05 tiny,
  0.3 small, 0.5 base and large).

Data: `--train_dir` (a folder with one sub-folder per class, read with datasets' `imagefolder`) or `--dataset_name` (a
Hub dataset with an image and a class-label column). Evaluation uses `--validation_dir`, the dataset's
`--validation_split`, or a `--validation_fraction` held out of the training set.

    python run_classification.py --model_name_or_path hivit-mae-base --train_dir data/train \
        --validation_dir data/val --output_dir outputs/hivit-base-ft --per_device_train_batch_size 128 --bf16
"""

import logging
import sys
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Optional

import datasets
import numpy as np
import torch
import torch.nn.functional as F
import transformers
from datasets import Dataset, load_dataset
from torchvision import transforms
from torchvision.transforms import v2
from transformers import BitImageProcessor, Trainer, TrainingArguments, set_seed
from transformers.trainer_utils import IntervalStrategy

from configuration_hivit_mae import HIVIT_ARCHS, HiViTMAEConfig
from hivit_mae_tools.cli import UserError, check_model_path, run_cli
from hivit_mae_tools.conversion.writer import IMAGENET_MEAN, IMAGENET_STD, preprocessor_config
from hivit_mae_tools.images import check_dataset_images, load_image
from hivit_mae_tools.outputs import staged_output
from hivit_mae_tools.training import (
    CheckpointCompleteCallback,
    check_training_output,
    parse_training_args,
    resolve_resume,
)
from modeling_hivit_mae import HiViTMAEForImageClassification
from run_pretraining import (
    apply_config_overrides,
    check_image_folder,
    find_image_column,
    parse_config_overrides,
    scale_learning_rate,
)

logger = logging.getLogger(__name__)

# mmpretrain's recipe as Trainer arguments; anything on the command line comes after and wins.
RECIPE_ARGS = [
    "--weight_decay", "0.05",
    "--adam_beta1", "0.9",
    "--adam_beta2", "0.999",
    "--adam_epsilon", "1e-8",
    "--max_grad_norm", "5.0",
    "--num_train_epochs", "300",
    "--warmup_ratio" if "warmup_ratio" in TrainingArguments.__dataclass_fields__ else "--warmup_steps", str(20 / 300),
    "--lr_scheduler_type", "cosine_with_min_lr",
    # mmpretrain's eta_min=1e-5 is 1 % of its lr at its batch of 1024; as a ratio it scales with the batch, as lr does.
    "--lr_scheduler_kwargs", '{"min_lr_rate": 0.01}',
    "--eval_strategy", "epoch",
    "--save_strategy", "epoch",
    "--logging_steps", "10",
    "--remove_unused_columns", "False",
    "--report_to", "none",
]  # fmt: skip
# mmpretrain's configs/hivit drop path rates (large has no classification config; it follows base; sizes of one's own
# get 0.1).
DROP_PATH_RATES = {"tiny": 0.05, "small": 0.3, "base": 0.5, "large": 0.5}


@dataclass
class ModelArguments:
    """Which encoder to fine-tune."""

    model_name_or_path: str = field(
        metadata={"help": "A HiViT-MAE folder or Hub id (pre-training, encoder or classifier; heads are replaced)."}
    )
    drop_path_rate: Optional[float] = field(
        default=None,
        metadata={"help": "Stochastic depth; default: mmpretrain's for the size (0.05 / 0.3 / 0.5; 0.1 if custom)."},
    )
    config_overrides: Optional[str] = field(
        default=None,
        metadata={
            "help": "Further config fields, as `key=value,key=value` or a JSON object. The recipe sets "
            "use_relative_position_bias=True and layer_norm_eps=1e-5, as mmpretrain's HiViT classifiers."
        },
    )
    base_learning_rate: float = field(
        default=5e-4,
        metadata={
            "help": "Learning rate per 512 images: learning_rate = base_learning_rate * total batch / 512. Ignored "
            "when --learning_rate is given."
        },
    )
    label_smoothing: float = field(default=0.1, metadata={"help": "Label smoothing of the targets (mmpretrain: 0.1)."})
    mixup_alpha: float = field(default=0.8, metadata={"help": "Mixup alpha; 0 turns Mixup off."})
    cutmix_alpha: float = field(default=1.0, metadata={"help": "CutMix alpha; 0 turns CutMix off."})
    cache_dir: Optional[str] = field(default=None, metadata={"help": "Cache folder for Hub models and datasets."})


@dataclass
class DataArguments:
    """Which labelled images to train and evaluate on."""

    train_dir: Optional[str] = field(
        default=None, metadata={"help": "Folder with one sub-folder of images per class."}
    )
    validation_dir: Optional[str] = field(default=None, metadata={"help": "The same layout, for evaluation."})
    dataset_name: Optional[str] = field(default=None, metadata={"help": "Hub dataset (or local dataset script)."})
    dataset_config_name: Optional[str] = field(default=None, metadata={"help": "Configuration of the dataset."})
    train_split: str = field(default="train", metadata={"help": "Split of the dataset to train on."})
    validation_split: Optional[str] = field(default=None, metadata={"help": "Split of the dataset to evaluate on."})
    validation_fraction: float = field(
        default=0.0, metadata={"help": "Without a validation set: hold out this fraction of the training set."}
    )
    image_column_name: Optional[str] = field(default=None, metadata={"help": "Column holding the images."})
    label_column_name: Optional[str] = field(
        default=None, metadata={"help": "Column holding the class indices; default: the only ClassLabel column."}
    )
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Truncate the training set."})
    augment: bool = field(
        default=True, metadata={"help": "RandAugment and RandomErasing (random crop and flip are always on)."}
    )
    skip_bad_images: bool = field(
        default=False,
        metadata={
            "help": "Drop the files of --train_dir / --validation_dir that cannot be decoded (and say how many) "
            "instead of stopping before training with their list."
        },
    )


def load_splits(data_args: DataArguments, cache_dir: Optional[str]) -> tuple[Dataset, Optional[Dataset]]:
    """The training set and the validation set (None without one)."""
    if data_args.dataset_name is not None:
        sources = (data_args.train_split, data_args.validation_split)

        def load(name: str) -> Dataset:
            return load_dataset(data_args.dataset_name, data_args.dataset_config_name, split=name, cache_dir=cache_dir)

    elif data_args.train_dir is not None:
        sources = (data_args.train_dir, data_args.validation_dir)

        def load(folder: str) -> Dataset:
            check_image_folder(folder)
            dataset = load_dataset("imagefolder", data_dir=folder, split="train", cache_dir=cache_dir)
            # Every file decoded once before training; then decoded again in our transform, naming the file.
            column = find_image_column(dataset, data_args.image_column_name)
            dataset = dataset.cast_column(column, datasets.Image(decode=False))
            flag = "--train_dir" if folder == data_args.train_dir else "--validation_dir"
            return check_dataset_images(dataset, column, f"{flag} {folder}", data_args.skip_bad_images)

    else:
        raise UserError("give the labelled training images: --train_dir or --dataset_name", usage=True)
    train = load(sources[0])
    validation = load(sources[1]) if sources[1] else None
    if validation is None and data_args.validation_fraction > 0:
        held_out = train.train_test_split(test_size=data_args.validation_fraction, seed=0)
        train, validation = held_out["train"], held_out["test"]
    if data_args.max_train_samples is not None:
        train = train.select(range(min(data_args.max_train_samples, len(train))))
    return train, validation


def find_label_column(dataset: Dataset, requested: Optional[str]) -> str:
    columns = dataset.column_names
    if requested is not None:
        if requested not in columns:
            raise ValueError(f"--label_column_name {requested!r} is not a column of the dataset; columns: {columns}")
        return requested
    labels = [name for name, feature in dataset.features.items() if isinstance(feature, datasets.ClassLabel)]
    if len(labels) == 1:
        return labels[0]
    if "label" in columns:
        return "label"
    raise ValueError(f"Cannot tell which column holds the class labels; pass --label_column_name (columns: {columns})")


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


def decay_parameter_names(model: torch.nn.Module) -> list[str]:
    """The trainable parameters that decay under mmpretrain's HiViT `paramwise_cfg`: the weight matrices (norms,
    biases and other one-dimensional parameters get `*_decay_mult=0`), less the position and relative position
    bias tables."""
    no_decay = ("position_embeddings", "relative_position_bias_table")
    return [
        name
        for name, parameter in model.named_parameters()
        if parameter.requires_grad and parameter.ndim > 1 and not any(part in name for part in no_decay)
    ]


class ClassificationTrainer(Trainer):
    """Trainer with mmpretrain's weight-decay grouping, batch mixing in training and its label-smoothed soft-target
    loss."""

    def __init__(self, *args, label_smoothing: float = 0.0, mix: Optional[v2.Transform] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.label_smoothing, self.mix = label_smoothing, mix

    def get_decay_parameter_names(self, model) -> list[str]:
        return decay_parameter_names(model)

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


def class_names(dataset: Dataset, label_column: str) -> Optional[list[str]]:
    """The class names of a `ClassLabel` column (None for plain integer labels); duplicates are refused, since
    `label2id` would silently lose a class."""
    feature = dataset.features[label_column]
    if not isinstance(feature, datasets.ClassLabel):
        return None
    duplicated = sorted({name for name in feature.names if feature.names.count(name) > 1})
    if duplicated:
        raise UserError(f"class names {duplicated} occur more than once in column {label_column!r}")
    return list(feature.names)


def validation_label_map(train_names: list[str], validation_names: Optional[list[str]]) -> Optional[list[int]]:
    """Map the validation set's class indices to the training set's by class name. Classes that only one of the two
    sets has are refused with their names: scoring by position would compare different classes."""
    if validation_names is None:
        return None
    unknown = [name for name in validation_names if name not in train_names]
    missing = [name for name in train_names if name not in validation_names]
    if unknown or missing:
        raise UserError(
            "the validation classes do not match the training classes:"
            + (f" not in training: {unknown}" if unknown else "")
            + (";" if unknown and missing else "")
            + (f" missing from validation: {missing}" if missing else "")
        )
    return [train_names.index(name) for name in validation_names]


def build_model(model_args: ModelArguments, id2label: dict[int, str]) -> HiViTMAEForImageClassification:
    config = HiViTMAEConfig.from_pretrained(model_args.model_name_or_path, cache_dir=model_args.cache_dir)
    size = (config.hidden_size, config.depths)
    arch = next((name for name, sizes in HIVIT_ARCHS.items() if (sizes["hidden_size"], sizes["depths"]) == size), None)
    drop_path_rate = DROP_PATH_RATES.get(arch, 0.1) if model_args.drop_path_rate is None else model_args.drop_path_rate
    overrides = {
        "use_relative_position_bias": True,
        "layer_norm_eps": 1e-5,
        "drop_path_rate": drop_path_rate,
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
    # Only the head and relative position tables the source lacks may start afresh; any other encoder weight that
    # is missing or of another shape means the source does not fit this config.
    fresh = ("classifier.", "relative_position_bias_table")
    missing = sorted(key for key in info["missing_keys"] if not key.startswith(fresh[0]) and fresh[1] not in key)
    mismatched = sorted(entry[0] if isinstance(entry, tuple) else entry for entry in info["mismatched_keys"])
    mismatched = [key for key in mismatched if not key.startswith(fresh[0])]
    if missing or mismatched:
        raise ValueError(
            f"{model_args.model_name_or_path} does not fit the fine-tuning config: "
            f"{'missing ' + ', '.join(missing[:5]) if missing else ''}"
            f"{'; ' if missing and mismatched else ''}"
            f"{'other shapes for ' + ', '.join(mismatched[:5]) if mismatched else ''}"
        )
    logger.info("New weights: %s", ", ".join(sorted(info["missing_keys"])) or "none")
    return model


def main(args: Optional[list[str]] = None) -> dict[str, float]:
    """Parse `args` (default: the command line), fine-tune, evaluate and return the final metrics."""
    user_args = list(sys.argv[1:] if args is None else args)
    model_args, data_args, training_args = parse_training_args(
        (ModelArguments, DataArguments, TrainingArguments), RECIPE_ARGS + user_args
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    datasets.utils.logging.set_verbosity(logging.WARNING)
    transformers.utils.logging.set_verbosity(logging.WARNING)

    total_batch = scale_learning_rate(training_args, user_args, model_args.base_learning_rate, 512)
    resume = resolve_resume(training_args)
    check_training_output(
        training_args,
        resume,
        inputs=[data_args.train_dir, data_args.validation_dir],
        source_model=model_args.model_name_or_path,
    )
    check_model_path(model_args.model_name_or_path)
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

    model = build_model(model_args, id2label)
    size = model.config.image_size
    settings = preprocessor_config(size)
    del settings["image_processor_type"]
    processor = BitImageProcessor(**settings)

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
    return metrics


def cli(argv: Optional[list[str]] = None) -> int:
    """Console entry point (`hivit-mae-finetune`): exit status, one `error:` line for bad input (`--debug`: the
    traceback)."""
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
