"""The evaluation preprocessing that every folder of this project carries (`preprocessor_config.json`): mmpretrain's
HiViT evaluation pipeline as a `BitImageProcessor`, and the ImageNet statistics the training pipelines normalise
with."""

from transformers import BitImageProcessor

# mmpretrain's HiViT evaluation pipeline (configs/_base_/datasets/imagenet_bs64_hivit_224.py): ResizeEdge(256, short
# edge, pillow, bicubic), CenterCrop(224), then the data preprocessor's RGB mean / std on the 0-255 scale.
IMAGENET_MEAN = [123.675 / 255, 116.28 / 255, 103.53 / 255]
IMAGENET_STD = [58.395 / 255, 57.12 / 255, 57.375 / 255]
CROP_RATIO = 224 / 256


def preprocessor_config(image_size: int) -> dict:
    """`BitImageProcessor` settings reproducing mmpretrain's HiViT evaluation preprocessing at `image_size`, as
    written to `preprocessor_config.json` by the converter and the training scripts."""
    return {
        "image_processor_type": "BitImageProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"shortest_edge": round(image_size / CROP_RATIO)},
        "resample": 3,  # PIL.Image.BICUBIC
        "do_center_crop": True,
        "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": IMAGENET_MEAN,
        "image_std": IMAGENET_STD,
    }


def image_processor(image_size: int) -> BitImageProcessor:
    """The image processor of [`preprocessor_config`] at `image_size`."""
    settings = preprocessor_config(image_size)
    del settings["image_processor_type"]
    return BitImageProcessor(**settings)
