"""Tests of the pre-training input pipeline (`hivit_mae_tools/pretraining_data.py`): uint8 batches normalised on the
device give the model what torchvision's float pipeline gave, and the augmentation follows torchvision's
RandomResizedCrop(0.2-1, bicubic) + flip statistically."""

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import ks_2samp
from torchvision import transforms

from hivit_mae_tools.preprocessing import IMAGENET_MEAN as IMAGE_MEAN
from hivit_mae_tools.preprocessing import IMAGENET_STD as IMAGE_STD
from hivit_mae_tools.pretraining_data import build_transform, normalize_pixel_values
from hivit_mae_tools.sample_images import sample_images

BICUBIC = transforms.InterpolationMode.BICUBIC


def previous_transform(image_size, augment=True):
    """torchvision's float pipeline, as `run_pretraining.py` had it: Pillow resamples, then ToTensor + Normalize."""
    if augment:
        steps = [
            transforms.RandomResizedCrop(image_size, scale=(0.2, 1.0), interpolation=BICUBIC),
            transforms.RandomHorizontalFlip(),
        ]
    else:
        steps = [transforms.Resize(image_size, interpolation=BICUBIC), transforms.CenterCrop(image_size)]
    return transforms.Compose([*steps, transforms.ToTensor(), transforms.Normalize(IMAGE_MEAN, IMAGE_STD)])


@pytest.fixture(autouse=True)
def one_thread():
    # As in a dataloader worker; several threads per resize only wait on each other on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def photos():
    return list(sample_images(("astronaut", "coffee", "rocket"), max_side=200).values())


def test_normalisation_is_torchvisions_to_the_bit(photos):
    crop = transforms.RandomResizedCrop(48, scale=(0.2, 1.0), interpolation=BICUBIC)(photos[0])
    expected = transforms.Normalize(IMAGE_MEAN, IMAGE_STD)(transforms.ToTensor()(crop))
    uint8 = transforms.PILToTensor()(crop)
    assert uint8.dtype == torch.uint8
    assert torch.equal(normalize_pixel_values(uint8[None])[0], expected)
    # mmpretrain's data preprocessor: (value - 255 mean) / (255 std), within float rounding.
    mean, std = torch.tensor([123.675, 116.28, 103.53]), torch.tensor([58.395, 57.12, 57.375])
    torch.testing.assert_close(expected, (uint8.float() - mean[:, None, None]) / std[:, None, None])


@pytest.mark.parametrize("augment", [True, False])
def test_model_input_matches_the_previous_float_pipeline(photos, augment):
    """Same seed, same crop box and flip; the crop is resampled by torch's uint8 kernel instead of Pillow. On real
    photographs most values are identical and the rest differ by a few levels of 255 (README, Performance)."""
    new, old = build_transform(64, augment), previous_transform(64, augment)
    differences = []
    for seed in range(8):
        for photo in photos:
            torch.manual_seed(seed)
            pixel_values = normalize_pixel_values(new(photo)[None])[0]
            torch.manual_seed(seed)
            expected = old(photo)
            std = torch.tensor(IMAGE_STD)[:, None, None]
            differences.append(((pixel_values - expected) * std * 255).abs().flatten())
    levels = torch.cat(differences)
    assert levels.max() <= 12, levels.max()  # a wrong crop box or flip would differ by up to 255
    assert (levels < 0.01).float().mean() >= 0.85  # identical values
    assert (levels < 1.01).float().mean() >= 0.99  # within one level of 255
    assert levels.mean() < 0.1


def crop_statistics(transform, count: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Crop area fraction, log aspect ratio, centre and flip of `count` draws of `transform` (PIL image ->
    `(3, h, w)` tensor on any scale), read back from an image whose red channel is the column index and green the row
    index: a least-squares line through the interior of the output gives the crop's extent, position and direction."""
    width, height, out = 240, 180, 32
    x = np.broadcast_to(np.arange(width)[None, :], (height, width))
    y = np.broadcast_to(np.arange(height)[:, None], (height, width))
    image = Image.fromarray(np.stack([x, y, np.full_like(x, 128)], axis=-1).astype(np.uint8))
    torch.manual_seed(seed)
    interior = np.arange(3, out - 3)
    rows = {"area": [], "log_ratio": [], "center_x": [], "flip": []}
    for _ in range(count):
        output = transform(image).double().numpy()
        scale = 255.0 if output[2].mean() < 2 else 1.0  # ToTensor's 0-1 range or uint8 levels
        columns = np.polyfit(interior, output[0, out // 2, interior] * scale, 1)
        lines = np.polyfit(interior, output[1, interior, out // 2] * scale, 1)
        crop_width, crop_height = abs(columns[0]) * out, lines[0] * out
        rows["area"].append(crop_width * crop_height / (width * height))
        rows["log_ratio"].append(np.log(crop_width / crop_height))
        rows["center_x"].append(np.polyval(columns, (out - 1) / 2))
        rows["flip"].append(columns[0] < 0)
    return {key: np.array(values) for key, values in rows.items()}


def test_augmentation_statistics_match_torchvision():
    """Ours against torchvision's float RandomResizedCrop(scale 0.2-1, ratio 3/4-4/3, bicubic) + flip(p=0.5) on a
    float tensor: the same distributions of crop area, aspect ratio, position and flip (two-sample Kolmogorov-Smirnov
    and a binomial bound). Controls with a wrong scale, ratio or flip rate must be told apart by the same checks."""

    def reference(scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), flip=0.5):
        crop = transforms.RandomResizedCrop(32, scale=scale, ratio=ratio, interpolation=BICUBIC, antialias=True)
        float_tensor = transforms.Lambda(lambda image: transforms.functional.pil_to_tensor(image).float())
        return transforms.Compose([float_tensor, crop, transforms.RandomHorizontalFlip(flip)])

    count = 1500
    expected = crop_statistics(reference(), count, seed=1)

    def agrees(statistics) -> bool:
        ks = [ks_2samp(statistics[key], expected[key]).pvalue for key in ("area", "log_ratio", "center_x")]
        # torchvision flips with probability 0.5: a binomial bound of 3.5 standard deviations.
        return min(ks) > 1e-3 and abs(statistics["flip"].mean() - 0.5) < 3.5 * np.sqrt(0.25 / count)

    assert agrees(expected)
    ours = crop_statistics(build_transform(32), count, seed=2)
    assert agrees(ours)
    assert 0.18 < ours["area"].min() and ours["area"].max() < 1.02
    assert np.abs(ours["log_ratio"]).max() < np.log(4 / 3) + 0.05
    for wrong in (dict(scale=(0.08, 1.0)), dict(scale=(0.3, 1.0)), dict(ratio=(0.6, 1.6)), dict(flip=0.4)):
        assert not agrees(crop_statistics(reference(**wrong), count, seed=3)), wrong
