"""The input pipeline of `run_pretraining.py`: dataloader workers decode and crop images to uint8, the training device
normalises them.

Per image, a worker runs one decode (the caller's `decode`, e.g. `hivit_mae_tools.images.load_image`), mmpretrain's MAE
augmentation on the uint8 pixels (RandomResizedCrop(scale 0.2-1, bicubic) + horizontal flip, torchvision's v2
transforms) and hands over a `(3, height, width)` uint8 tensor; `collate_fn` stacks those straight into the shared
memory that carries the batch to the training process. There `normalize_pixel_values` turns the batch into the
model's float `pixel_values` with ImageNet's statistics, on the device, after the copy: a quarter of the bytes of
float32 cross the process boundary and the host-to-device link, and no worker spends time on float arithmetic.

Numerics. The normalisation is exactly torchvision's `ToTensor()` + `Normalize(mean, std)` (the same operations in the
same order, bit for bit on the same device). The crop is resampled from the uint8 image by torch's antialiased bicubic
uint8 kernel (Pillow's algorithm in fixed point, vectorised) where the previous pipeline called Pillow itself: for
the same crop box the two agree exactly on most values and otherwise differ by a few levels of 255, at sharp edges
(the filter weights' fixed-point rounding and the rounding between the horizontal and vertical passes differ).
`tests/test_pretraining_data.py` bounds that difference and checks the augmentation statistically against
torchvision's float pipeline.
"""

from functools import cache
from typing import Any, Callable, Optional

import datasets
import torch
from torch.utils.data import default_collate
from torchvision.transforms import v2

from .preprocessing import IMAGENET_MEAN, IMAGENET_STD


def build_transform(image_size: int, augment: bool = True, crop_min_scale: float = 0.2) -> v2.Compose:
    """PIL image -> `(3, image_size, image_size)` uint8 tensor: mmpretrain's MAE augmentation (RandomResizedCrop with
    area fraction in `[crop_min_scale, 1]`, aspect ratio in `[3/4, 4/3]`, bicubic, then a horizontal flip with
    probability 0.5), or with `augment=False` a deterministic resize of the short side + centre crop."""
    bicubic = v2.InterpolationMode.BICUBIC
    if augment:
        steps = [
            v2.RandomResizedCrop(image_size, scale=(crop_min_scale, 1.0), interpolation=bicubic, antialias=True),
            v2.RandomHorizontalFlip(),
        ]
    else:
        steps = [v2.Resize(image_size, interpolation=bicubic, antialias=True), v2.CenterCrop(image_size)]
    # To a tensor first, so that the resampling runs on uint8 tensors (torch's vectorised kernels), not in Pillow.
    return v2.Compose([v2.PILToTensor(), *steps])


@cache
def _statistics(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Built once per device, so that normalising a batch does not copy the statistics to the GPU every step.
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(-1, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(-1, 1, 1)
    return mean, std


def normalize_pixel_values(pixel_values: torch.Tensor) -> torch.Tensor:
    """uint8 images `(batch, 3, height, width)` in 0-255 -> float32 `(value / 255 - mean) / std`, the model's
    `pixel_values`, on the images' device. The operations of torchvision's `ToTensor` + `Normalize`, in their order,
    so that the result is the same to the bit. Float input is returned as is (already normalised)."""
    if pixel_values.is_floating_point():
        return pixel_values
    mean, std = _statistics(pixel_values.device)
    return pixel_values.float().div_(255).sub_(mean).div_(std)


def seeded_noise(seed: int, index: int, num_patches: int) -> torch.Tensor:
    """Masking noise of one image that depends only on `(seed, index)`."""
    return torch.rand(num_patches, generator=torch.Generator().manual_seed(seed * 1_000_003 + index))


class ImageTransform:
    """Batch function of the training set: decode each value of `image_column` with `decode` (value -> RGB PIL image),
    augment it with `transform` into uint8 `pixel_values`, and with `masking_seed` draw per-image `noise` from the
    `sample_index` column. A class so that dataloader workers can pickle it."""

    def __init__(
        self,
        image_column: str,
        transform: Callable,
        num_patches: int,
        masking_seed: Optional[int] = None,
        *,
        decode: Callable[[Any], Any],
    ):
        self.image_column = image_column
        self.transform = transform
        self.num_patches = num_patches
        self.masking_seed = masking_seed
        self.decode = decode

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        output = {"pixel_values": [self.transform(self.decode(value)) for value in batch[self.image_column]]}
        if self.masking_seed is not None:
            output["noise"] = [seeded_noise(self.masking_seed, i, self.num_patches) for i in batch["sample_index"]]
        return output


def set_train_transform(dataset, transform: ImageTransform):
    """Apply `transform` lazily, at loading time in the dataloader workers: `set_transform` on a `Dataset`, a batched
    `map` on a streamed `IterableDataset`. Returns the dataset to train on."""
    if isinstance(dataset, datasets.IterableDataset):
        return dataset.map(transform, batched=True, remove_columns=list(dataset.column_names))
    dataset.set_transform(transform)
    return dataset


def collate_fn(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack the transformed examples into the batch's `pixel_values` (uint8, `(batch, 3, height, width)`) and
    `noise`. `default_collate` stacks straight into shared memory inside a dataloader worker: no second copy to send
    the batch to the training process."""
    return default_collate(examples)
