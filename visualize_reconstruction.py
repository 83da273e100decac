#!/usr/bin/env python
"""Draw what a HiViT-MAE model reconstructs from a masked image.

For each image, one row: the original (resized and centre-cropped to the model's size), the masked input the encoder
sees, the reconstruction of every patch, and the reconstruction of the masked patches pasted between the visible
ones (the drawing is `hivit_mae_tools.reconstruction`, which says how normalised-pixel predictions are shown). Masking
noise comes from a fixed seed, so the same command draws the same masks.

    python visualize_reconstruction.py --model outputs/hivit-mae-default --image cat.jpg dog.png --output recon.png
"""

import argparse
import sys
from pathlib import Path

from transformers.utils import logging as transformers_logging

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hivit_mae_tools.cli import UserError, check_model_path, raise_usage_errors, run_cli  # noqa: E402
from hivit_mae_tools.images import load_image  # noqa: E402
from hivit_mae_tools.reconstruction import visualize  # noqa: E402
from modeling_hivit_mae import HiViTMAEForPreTraining  # noqa: E402


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def unit_ratio(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    raise_usage_errors(parser)
    parser.add_argument("--model", required=True, help="Folder (or Hub id) of a HiViTMAEForPreTraining model.")
    parser.add_argument("--image", nargs="+", required=True, help="One or more image files.")
    parser.add_argument("--output", default="reconstruction.png", help="PNG file to write.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the masking noise (image i uses seed + i).")
    parser.add_argument("--mask_ratio", type=unit_ratio, default=None, help="Override the model's mask ratio.")
    parser.add_argument("--scale", type=positive_int, default=None, help="Integer upscaling of each panel.")
    parser.add_argument("--debug", action="store_true", help="Show the traceback of an error.")
    return parser.parse_args(argv)


def load_pretraining_model(name_or_path: str, **kwargs) -> HiViTMAEForPreTraining:
    """Load a HiViTMAEForPreTraining folder; a folder without trained decoder weights (an encoder-only or classifier
    folder) is refused: its reconstructions would come from a randomly initialised decoder."""
    check_model_path(name_or_path, "--model")
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # the load report; missing decoder weights are our error below
    try:
        model, info = HiViTMAEForPreTraining.from_pretrained(name_or_path, output_loading_info=True, **kwargs)
    finally:
        transformers_logging.set_verbosity(verbosity)
    missing = [key for key in info["missing_keys"] if key.startswith("decoder.")]
    if missing:
        kind = ", ".join(getattr(model.config, "architectures", None) or ["no decoder"])
        raise UserError(
            f"--model {name_or_path} holds no trained decoder weights ({kind}; missing {missing[0]} and "
            f"{len(missing) - 1} more): reconstructions need a HiViTMAEForPreTraining folder (encoder + decoder)"
        )
    return model


def main(argv=None):
    args = parse_args(argv)
    output = Path(args.output)
    if not args.output.strip() or output.is_dir():
        raise UserError(f"--output {args.output!r} must name a PNG file", usage=True)
    if any(output.resolve() == Path(path).resolve() for path in args.image):
        raise UserError(f"--output {args.output} is one of the --image files; write the figure elsewhere", usage=True)
    images = [load_image(path) for path in args.image]
    kwargs = {} if args.mask_ratio is None else {"mask_ratio": args.mask_ratio}
    model = load_pretraining_model(args.model, **kwargs)
    _, loss = visualize(model, images, args.output, seed=args.seed, scale=args.scale)
    print(f"Wrote {args.output} ({len(images)} image(s), masked-patch loss {loss:.4f})")


def cli(argv=None) -> int:
    """Console entry point (`hivit-mae-visualize`): exit status, one `error:` line for bad input (`--debug`: the
    traceback)."""
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
