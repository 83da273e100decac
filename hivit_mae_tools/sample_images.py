"""The photographs that ship inside scikit-image's wheel: real colour scenes for the scripts' built-in defaults, with
no download."""

from PIL import Image

from .cli import UserError

SAMPLE_IMAGES = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "immunohistochemistry",
    "hubble_deep_field",
    "retina",
    "camera",
    "moon",
    "coins",
    "grass",
    "gravel",
    "brick",
)


def sample_images(names=SAMPLE_IMAGES, max_side: int = 320) -> dict[str, Image.Image]:
    """scikit-image's bundled photographs `names` as RGB PIL images, downscaled to at most `max_side` pixels."""
    try:
        from skimage import data as skimage_data
    except ImportError as error:
        raise UserError(
            "the built-in default trains on scikit-image's sample photographs: `pip install scikit-image`, or pass "
            "--train_dir / --dataset_name"
        ) from error
    images = {}
    for name in names:
        array = getattr(skimage_data, name)()
        if array.ndim == 2:
            array = array[:, :, None].repeat(3, axis=2)
        image = Image.fromarray(array[:, :, :3].astype("uint8")).convert("RGB")
        image.thumbnail((max_side, max_side), Image.BICUBIC)
        images[name] = image
    return images
