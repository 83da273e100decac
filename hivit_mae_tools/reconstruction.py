"""Reconstruction figures of a HiViT-MAE model: for each image one row with the original (resized and centre-cropped
to the model's size), the masked input the encoder sees, the reconstruction of every patch, and the reconstruction of
the masked patches pasted between the visible ones. Used by `visualize_reconstruction.py` and by `run_pretraining.py`
(its before / after figures).

When the model predicts per-patch normalised pixels (`norm_pix_loss`, mmpretrain's default) the predictions are
un-normalised with the mean and variance of the target patch, as the MAE papers' figures do: one mean and one variance
per patch over all its pixels and channels, so each patch's mean brightness and contrast come from the original, its
colours and structure from the model. Masking noise comes from a fixed seed, so the same call draws the same masks.
Only PIL is needed for drawing.
"""

from collections.abc import Sequence
from pathlib import Path
from typing import Optional, Union

import torch
from PIL import Image, ImageDraw

from modeling_hivit_mae import HiViTMAEForPreTraining

from .preprocessing import IMAGENET_MEAN, IMAGENET_STD

# mmpretrain's `SelfSupDataPreprocessor` statistics (ImageNet, 0-255 scale) divided by 255.
IMAGE_MEAN, IMAGE_STD = tuple(IMAGENET_MEAN), tuple(IMAGENET_STD)

COLUMN_TITLES = ("original", "masked input", "reconstruction", "reconstruction + visible")


def preprocess(images: Sequence[Image.Image], image_size: int) -> torch.Tensor:
    """Resize the shorter side to `image_size` (bicubic), centre-crop a square and normalise:
    `(batch_size, 3, image_size, image_size)`."""
    tensors = []
    for image in images:
        image = image.convert("RGB")
        scale = image_size / min(image.size)
        width, height = max(image_size, round(image.width * scale)), max(image_size, round(image.height * scale))
        image = image.resize((width, height), Image.BICUBIC)
        left, top = (width - image_size) // 2, (height - image_size) // 2
        image = image.crop((left, top, left + image_size, top + image_size))
        data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(image_size, image_size, 3)
        tensors.append(data.permute(2, 0, 1).float() / 255)
    pixels = torch.stack(tensors)
    mean, std = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    return (pixels - mean) / std


def masking_noise(batch_size: int, num_patches: int, seed: int = 0) -> torch.Tensor:
    """Masking noise `(batch_size, num_patches)` where row `i` depends only on `seed + i`."""
    rows = [torch.rand(num_patches, generator=torch.Generator().manual_seed(seed + i)) for i in range(batch_size)]
    return torch.stack(rows)


@torch.no_grad()
def reconstruct(
    model: HiViTMAEForPreTraining, pixel_values: torch.Tensor, seed: int = 0
) -> tuple[dict[str, torch.Tensor], float]:
    """Run `model` with masking noise from `seed` and return the four panels of [`COLUMN_TITLES`] as
    `(batch_size, 3, height, width)` images in [0, 1], and the model's loss on this batch."""
    model.eval()
    parameter = next(model.parameters())
    pixel_values = pixel_values.to(device=parameter.device, dtype=parameter.dtype)
    batch_size, _, height, width = pixel_values.shape
    patch_size = model.config.patch_size
    num_patches = (height // patch_size) * (width // patch_size)
    noise = masking_noise(batch_size, num_patches, seed).to(parameter.device)
    outputs = model(pixel_values, mask=True, noise=noise)

    predictions = outputs.logits.float()
    if model.config.norm_pix_loss:
        # The model predicts each patch normalised by its own mean and variance (one of each per patch, over all its
        # pixels and channels); undo it with the target's.
        target = model.patchify(pixel_values.float())
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        predictions = predictions * (var + 1.0e-6) ** 0.5 + mean
    reconstruction = model.unpatchify(predictions, (height, width))

    # (batch_size, num_patches) -> per-pixel mask, 1 = masked.
    mask = outputs.mask.float()[:, :, None].expand(-1, -1, patch_size * patch_size * 3)
    mask = model.unpatchify(mask, (height, width))

    mean = torch.tensor(IMAGE_MEAN, device=mask.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD, device=mask.device).view(1, 3, 1, 1)

    def to_unit(image):
        return (image.float() * std + mean).clamp(0, 1).cpu()

    original = to_unit(pixel_values)
    reconstruction = to_unit(reconstruction)
    mask = mask.cpu()
    panels = {
        "original": original,
        "masked input": original * (1 - mask) + 0.35 * mask,
        "reconstruction": reconstruction,
        "reconstruction + visible": original * (1 - mask) + reconstruction * mask,
    }
    return panels, float(outputs.loss)


def to_pil(image: torch.Tensor) -> Image.Image:
    """`(3, height, width)` in [0, 1] -> PIL image."""
    return Image.fromarray((image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())


def render_grid(panels: dict[str, torch.Tensor], scale: int = 1, title: Optional[str] = None) -> Image.Image:
    """One row per image, one column per panel, with column titles (and an optional title line) on top."""
    titles = list(panels)
    batch_size, _, height, width = panels[titles[0]].shape
    cell_w, cell_h, gap, header = width * scale, height * scale, 4, 14 + (14 if title else 0)
    canvas = Image.new(
        "RGB", (len(titles) * (cell_w + gap) + gap, header + batch_size * (cell_h + gap) + gap), "white"
    )
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((gap, 1), title, fill="black")
    for column, name in enumerate(titles):
        x = gap + column * (cell_w + gap)
        draw.text((x, header - 13), name, fill="black")
        for row in range(batch_size):
            cell = to_pil(panels[name][row])
            if scale != 1:
                cell = cell.resize((cell_w, cell_h), Image.NEAREST)
            canvas.paste(cell, (x, header + gap + row * (cell_h + gap)))
    return canvas


def stack_vertically(figures: Sequence[Image.Image]) -> Image.Image:
    """Stack figures top to bottom on a white background."""
    width = max(figure.width for figure in figures)
    canvas = Image.new("RGB", (width, sum(figure.height for figure in figures)), "white")
    top = 0
    for figure in figures:
        canvas.paste(figure, (0, top))
        top += figure.height
    return canvas


def visualize(
    model: HiViTMAEForPreTraining,
    images: Sequence[Image.Image],
    output: Optional[Union[str, Path]] = None,
    seed: int = 0,
    scale: Optional[int] = None,
    title: Optional[str] = None,
) -> tuple[Image.Image, float]:
    """Draw the reconstruction figure of `images` (PIL images) and write it to `output` as PNG when given.
    Returns the figure and the model's loss on these images with this masking."""
    if not images:
        raise ValueError("visualize needs at least one image")
    image_size = model.config.image_size
    pixel_values = preprocess(images, image_size)
    panels, loss = reconstruct(model, pixel_values, seed=seed)
    if scale is None:
        scale = max(1, 160 // image_size)
    figure = render_grid(panels, scale=scale, title=title)
    if output is not None:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        figure.save(output, format="PNG", optimize=True)
    return figure, loss
