"""Reading the training scripts' image data: the data arguments they share, image folders (checked before training),
Hub dataset splits, which column holds the images or the labels, and class names matched by name between splits."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import datasets
from datasets import Dataset, load_dataset

from .cli import UserError
from .images import check_dataset_images

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


@dataclass
class DatasetArguments:
    """Where the training images come from: a Hub dataset or a local folder (the data arguments every training script
    has; each script's own come after them)."""

    dataset_name: Optional[str] = field(default=None, metadata={"help": "Hub dataset (or local dataset script)."})
    dataset_config_name: Optional[str] = field(default=None, metadata={"help": "Configuration of the dataset."})
    train_split: str = field(default="train", metadata={"help": "Split of the dataset to train on."})
    train_dir: Optional[str] = field(
        default=None,
        metadata={
            "help": "Local folder of images (sub-folders allowed; where classes are used, one sub-folder per class), "
            "read with datasets' `imagefolder`."
        },
    )
    image_column_name: Optional[str] = field(
        default=None,
        metadata={"help": "Column holding the images; default: the dataset's only Image column, or 'image'/'img'."},
    )
    max_train_samples: Optional[int] = field(
        default=None, metadata={"help": "Truncate the training set to this many images (debugging)."}
    )
    skip_bad_images: bool = field(
        default=False,
        metadata={
            "help": "Drop the files of the image folders that cannot be decoded (and say how many) instead of "
            "stopping before training with their list."
        },
    )


def check_image_folder(folder: str, flag: str = "--train_dir"):
    """Raise unless `folder` is a folder holding at least one image file (by extension)."""
    path = Path(folder)
    if not path.is_dir():
        raise FileNotFoundError(f"{flag} {folder!r} is not a folder")
    if not any(file.suffix.lower() in IMAGE_EXTENSIONS for file in path.rglob("*") if file.is_file()):
        raise ValueError(f"{flag} {folder!r} holds no image files (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")


def find_image_column(dataset: Dataset, requested: Optional[str]) -> str:
    """The column holding the images: `requested`, else the only `Image` column, else `image` / `img`."""
    columns = dataset.column_names or []
    if requested is not None:
        if requested not in columns:
            raise ValueError(f"--image_column_name {requested!r} is not a column of the dataset; columns: {columns}")
        return requested
    features = dataset.features or {}  # a stream may not know its features
    image_columns = [name for name, feature in features.items() if isinstance(feature, datasets.Image)]
    if len(image_columns) == 1:
        return image_columns[0]
    for name in ("image", "img"):
        if name in columns:
            return name
    raise ValueError(f"Cannot tell which column holds the images; pass --image_column_name (columns: {columns})")


def find_label_column(dataset: Dataset, requested: Optional[str]) -> str:
    """The column holding the class labels: `requested`, else the only `ClassLabel` column, else `label`."""
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


def load_image_folder(
    folder: str,
    flag: str,
    image_column_name: Optional[str],
    skip_bad_images: bool,
    cache_dir: Optional[str],
    max_samples: Optional[int] = None,
) -> Dataset:
    """The images of `folder` (given with the command-line flag `flag`) as datasets' `imagefolder` reads them (one
    class per sub-folder; the first `max_samples` only when given), every file decoded once first
    (`check_dataset_images`: the bad ones listed, or dropped with `skip_bad_images`); the image column is left
    undecoded, for the scripts' transforms to decode naming the file."""
    check_image_folder(folder, flag)
    dataset = load_dataset("imagefolder", data_dir=folder, split="train", cache_dir=cache_dir)
    column = find_image_column(dataset, image_column_name)
    if max_samples is not None:
        dataset = dataset.select(range(min(max_samples, len(dataset))))
    dataset = dataset.cast_column(column, datasets.Image(decode=False))
    return check_dataset_images(dataset, column, f"{flag} {folder}", skip_bad_images)


def load_hub_split(
    data_args: DatasetArguments,
    split: str,
    cache_dir: Optional[str],
    streaming: bool = False,
    trust_remote_code: bool = False,
):
    """Split `split` of `data_args.dataset_name` (an `IterableDataset` with `streaming`)."""
    return load_dataset(
        data_args.dataset_name,
        data_args.dataset_config_name,
        split=split,
        cache_dir=cache_dir,
        streaming=streaming,
        **({"trust_remote_code": True} if trust_remote_code else {}),
    )


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
