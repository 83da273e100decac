"""One image loader for every HiViT-MAE command, and a pre-flight check of image folders.

[`to_rgb`] converts every PIL mode to 8-bit RGB without losing the picture: 16-bit and 32-bit integer and float
greyscale are scaled to 0-255 by their bit depth or real range (PIL's own `convert("RGB")` clips them, so a 16-bit
PNG becomes white), and transparent images are composited onto white, as transformers 5's `convert_to_rgb` does.

[`check_image_files`] decodes every file once, in parallel, before training starts, and remembers the files that
decoded (by path, size and modification time) in a small cache file under the user's cache folder, never in the
data folder; a second run over the same data only looks at the files that changed.
"""

import hashlib
import io
import json
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
from PIL import Image

from .cli import UserError

PathLike = Union[str, os.PathLike]

logger = logging.getLogger(__name__)

# Modes PIL's `convert("RGB")` handles without losing range (alpha is composited first).
_CONVERTIBLE = {"RGB", "L", "1", "P", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"}
_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N"}
_TRANSPARENT = {"RGBA", "LA", "PA", "RGBa", "La"}


class UnreadableImageError(UserError):
    """An image file that cannot be decoded; the message names the file."""


def _greyscale_to_uint8(image: Image.Image) -> Image.Image:
    """16-bit (`I;16*`), 32-bit integer (`I`) and float (`F`) greyscale -> 8-bit `L`, scaled, never clipped.

    16-bit images are scaled by their bit depth (0-65535 -> 0-255), as a viewer shows them. `I` holds 16-bit PNG and
    TIFF data in older Pillow versions: within 0-65535 it is scaled as 16-bit, otherwise by its own minimum and
    maximum. `F` within 0-1 is scaled by 255; any other float range by its own minimum and maximum.
    """
    array = np.asarray(image, dtype=np.float64)
    low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
    if image.mode in _SIXTEEN_BIT or (image.mode == "I" and low >= 0 and high <= 65535):
        scaled = array / 65535.0
    elif image.mode == "F" and low >= 0 and high <= 1:
        scaled = array
    else:
        scaled = (array - low) / (high - low) if high > low else np.zeros_like(array)
    return Image.fromarray(np.round(scaled * 255).astype(np.uint8), mode="L")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit RGB. Transparency is composited onto white; 16-bit, 32-bit and float greyscale are
    scaled, not clipped (see [`_greyscale_to_uint8`])."""
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in _TRANSPARENT:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in _SIXTEEN_BIT or image.mode in ("I", "F"):
        return _greyscale_to_uint8(image).convert("RGB")
    if image.mode in _CONVERTIBLE:
        return image.convert("RGB")
    raise ValueError(f"unsupported image mode {image.mode}")


def load_image(value: Any) -> Image.Image:
    """Decode one image (a PIL image, a datasets `{"bytes", "path"}` dict, or a file path) to RGB with [`to_rgb`];
    an [`UnreadableImageError`] names the file when it cannot be read."""
    if isinstance(value, Image.Image):
        return to_rgb(value)
    path, data = None, None
    if isinstance(value, dict):
        path, data = value.get("path"), value.get("bytes")
    elif isinstance(value, (str, os.PathLike)):
        path = value
    else:
        raise ValueError(f"an image column holds a {type(value).__name__}, expected an image, bytes or a path")
    try:
        with Image.open(io.BytesIO(data) if data is not None else path) as image:
            image.load()
            return to_rgb(image)
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise UnreadableImageError(f"cannot read image {str(path or '<bytes>')!r}: {_describe(error)}") from error


def _describe(error: Exception) -> str:
    if isinstance(error, FileNotFoundError):
        return "no such file"
    text = str(error)
    if "cannot identify image file" in text:
        return "not an image file"
    return text or type(error).__name__


def check_image_file(path: PathLike) -> Optional[str]:
    """`None` if the file decodes fully (header and pixels) to a convertible mode, else the reason it does not."""
    try:
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
        with Image.open(path) as image:
            image.load()
            if not (image.mode in _CONVERTIBLE | _SIXTEEN_BIT | _TRANSPARENT or image.mode in ("I", "F")):
                return f"unsupported image mode {image.mode}"
    except Exception as error:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError, ...
        return _describe(error)
    return None


def default_cache_dir() -> Path:
    """`$HIVIT_MAE_CACHE`, else `$XDG_CACHE_HOME/hivit_mae`, else `~/.cache/hivit_mae`."""
    if os.environ.get("HIVIT_MAE_CACHE"):
        return Path(os.environ["HIVIT_MAE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hivit_mae"


def _cache_file(cache_dir: Path, paths: Sequence[str]) -> Path:
    # One cache file per data folder: keyed by the folder that holds all the files.
    root = os.path.commonpath([os.path.dirname(path) for path in paths]) if paths else ""
    return cache_dir / "image-checks" / f"{hashlib.sha256(root.encode()).hexdigest()[:20]}.json"


def check_image_files(
    paths: Sequence[PathLike], cache_dir: Optional[PathLike] = None, num_workers: Optional[int] = None
) -> dict[str, str]:
    """Decode every file of `paths` once and return `{path: reason}` for those that cannot be read (corrupt,
    truncated, empty, not an image). Files that decoded before with the same size and modification time are not
    decoded again (cache under `cache_dir`, default [`default_cache_dir`]); the rest are decoded by `num_workers`
    threads (default: one per CPU core, up to 32; Pillow decodes without holding the GIL)."""
    paths = [os.path.abspath(path) for path in paths]
    cache_file = _cache_file(Path(cache_dir) if cache_dir is not None else default_cache_dir(), paths)
    try:
        known = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        known = {}
    stats, bad = {}, {}
    for path in paths:
        try:
            stat = os.stat(path)
            stats[path] = [stat.st_size, stat.st_mtime_ns]
        except OSError as error:
            bad[path] = _describe(error)
    todo = [path for path in stats if known.get(path) != stats[path]]
    workers = num_workers or min(32, os.cpu_count() or 1)
    if workers > 1 and len(todo) > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            reasons = list(pool.map(check_image_file, todo))
    else:
        reasons = [check_image_file(path) for path in todo]
    bad.update({path: reason for path, reason in zip(todo, reasons) if reason is not None})
    known = {path: stat for path, stat in known.items() if path not in bad}
    known.update({path: stat for path, stat in stats.items() if path not in bad})
    if todo:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            temporary = cache_file.with_suffix(f".tmp{os.getpid()}")
            temporary.write_text(json.dumps(known))
            os.replace(temporary, cache_file)
        except OSError:
            pass  # a read-only cache only costs time
    return bad


def bad_images_message(bad: dict[str, str], where: str, limit: int = 5) -> str:
    """One line naming the unreadable files of `where` (the first `limit`) and why."""
    shown = "; ".join(f"{path}: {reason}" for path, reason in sorted(bad.items())[:limit])
    more = f"; and {len(bad) - limit} more" if len(bad) > limit else ""
    return f"{len(bad)} unreadable image file(s) in {where}: {shown}{more}"


def check_dataset_images(
    dataset, column: str, where: str, skip_bad: bool = False, cache_dir: Optional[PathLike] = None
):
    """Pre-flight check of a datasets `Dataset` read from image files (`imagefolder`) whose `column` is cast to
    `datasets.Image(decode=False)`: every file is decoded once with [`check_image_files`] before training starts.
    Unreadable files raise one [`UserError`] naming them (`where` says which argument they came from); with
    `skip_bad` they are dropped and their number logged. Images stored as bytes (Hub datasets) are left to decode
    when their batch comes."""
    paths = [value.get("path") if isinstance(value, dict) else None for value in dataset[column]]
    if not paths or not all(paths):
        return dataset
    bad = check_image_files(paths, cache_dir)
    if not bad:
        return dataset
    if not skip_bad:
        raise UserError(bad_images_message(bad, where) + "; fix or remove them, or pass --skip_bad_images")
    keep = [index for index, path in enumerate(paths) if os.path.abspath(path) not in bad]
    if not keep:
        raise UserError(bad_images_message(bad, where) + "; no readable image is left")
    logger.warning("Skipped %d unreadable image file(s) of %s (--skip_bad_images)", len(paths) - len(keep), where)
    return dataset.select(keep)
