"""Throughput of `run_pretraining.py`'s training DataLoader, for 1..N workers, beside the decode-only ceiling.

    python benchmarks/benchmark_data.py --baseline               # 1 .. all cores, and the previous pipeline
    python benchmarks/benchmark_data.py --workers 1 2 4 8 14 --images 3072 --device cuda

It writes ImageNet-like JPEGs (500x375 by default: smooth colour fields, shapes and sensor-like noise, quality 90;
256 different ones, hard-linked as often as needed) into a temporary folder, or reads `--train_dir`, and builds the
DataLoader the way `run_pretraining.py` does: its argument defaults, `load_train_dataset`, `prepare_train_dataset`,
`build_trainer` and the Trainer's own `get_train_dataloader()` (so `accelerate` moves each batch to `--device` as in
training). For each worker count it times the batches after each worker's first one (worker start-up excluded),
`--repeats` times interleaved over the settings, and prints the median images/s with its spread, the scaling
efficiency (images/s over `workers` x the one-worker rate) and the fraction of the ceiling: `workers` x the rate at
which one process only decodes (`load_image`) the same files. `--baseline` also times the previous pipeline
(Pillow's crop, `ToTensor` and `Normalize` in the workers, float32 batches) through the same DataLoader.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import run_pretraining  # noqa: E402
from configuration_hivit_mae import HiViTMAEConfig  # noqa: E402
from hivit_mae_tools.data import IMAGE_EXTENSIONS  # noqa: E402
from hivit_mae_tools.images import load_image  # noqa: E402
from hivit_mae_tools.preprocessing import IMAGENET_MEAN as IMAGE_MEAN  # noqa: E402
from hivit_mae_tools.preprocessing import IMAGENET_STD as IMAGE_STD  # noqa: E402
from hivit_mae_tools.pretraining_data import ImageTransform, set_train_transform  # noqa: E402
from hivit_mae_tools.training import parse_training_args  # noqa: E402
from modeling_hivit_mae import HiViTMAEForPreTraining  # noqa: E402


def make_jpegs(folder: Path, count: int, size: tuple[int, int], seed: int = 0, unique: int = 256) -> Path:
    """`count` JPEGs of `size` (width, height) with the content photographs have: smooth colour gradients, a few
    sharp-edged shapes and noise, so that they compress (and decode) like photographs, not like flat colour. The
    first `unique` are drawn, the others are hard links to them (decoding costs the same; writing is quicker)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    width, height = size
    for index in range(count):
        if index >= unique:
            os.link(folder / f"{index % unique:05d}.jpg", folder / f"{index:05d}.jpg")
            continue
        x = np.linspace(0, 1, width, dtype=np.float32)[None, :, None] * rng.random(3, dtype=np.float32)
        y = np.linspace(0, 1, height, dtype=np.float32)[:, None, None] * rng.random(3, dtype=np.float32)
        array = (x + y) * 120 + 10
        for _ in range(4):
            top, left = rng.integers(0, height - height // 4), rng.integers(0, width - width // 4)
            array[top : top + height // 4, left : left + width // 4] = rng.random(3) * 255
        array += rng.normal(0, 12, size=array.shape).astype(np.float32)
        Image.fromarray(array.clip(0, 255).astype(np.uint8)).save(folder / f"{index:05d}.jpg", quality=90)
    return folder


def previous_transform(image_size: int, crop_min_scale: float) -> transforms.Compose:
    """The pipeline before uint8 batches (commit 78f9531), for comparison: Pillow crops, the worker normalises."""
    bicubic = transforms.InterpolationMode.BICUBIC
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(image_size, scale=(crop_min_scale, 1.0), interpolation=bicubic),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(IMAGE_MEAN, IMAGE_STD),
        ]
    )


def previous_collate(examples):
    """The collate function before uint8 batches: a plain `torch.stack` (shared memory is filled afterwards)."""
    return {"pixel_values": torch.stack([example["pixel_values"] for example in examples])}


def build_loader(args, model, workers: int, pipeline: str):
    """The training DataLoader of `run_pretraining.py` for `args.train_dir` with `workers` workers (`model` only
    sizes the Trainer's image processor)."""
    user_args = [
        "--train_dir",
        str(args.train_dir),
        "--output_dir",
        str(args.scratch),
        "--per_device_train_batch_size",
        str(args.batch_size),
        "--dataloader_num_workers",
        str(workers),
        "--use_cpu",
        str(args.device == "cpu"),
    ]
    types = (run_pretraining.ModelArguments, run_pretraining.DataTrainingArguments, run_pretraining.TrainingArguments)
    model_args, data_args, training_args = parse_training_args(types, run_pretraining.RECIPE_ARGS + user_args)
    config = model.config
    raw, column, _ = run_pretraining.load_train_dataset(data_args, model_args)
    if pipeline == "current":
        dataset = run_pretraining.prepare_train_dataset(raw, column, config, data_args, training_args.seed)
    else:
        transform = previous_transform(args.image_size, data_args.crop_min_scale)
        decode = load_image
        dataset = set_train_transform(raw, ImageTransform(column, transform, config.num_patches, decode=decode))
    trainer = run_pretraining.build_trainer(model, training_args, dataset)
    if pipeline == "previous":
        trainer.data_collator = previous_collate
    return trainer.get_train_dataloader()


def time_batches(loader, workers: int, device: torch.device) -> float:
    """Images/s in the steady state: the first batch of every worker is skipped (worker start-up), then the next
    `max(4, 2 * workers)` batches are timed (fewer if the epoch ends first)."""
    iterator = iter(loader)
    for _ in range(max(workers, 1)):
        next(iterator)
    images, start = 0, time.perf_counter()
    for _, batch in zip(range(max(4, 2 * workers)), iterator):
        images += len(batch["pixel_values"])
    if device.type == "cuda":
        torch.cuda.synchronize()
    return images / (time.perf_counter() - start)


def decode_rate(files: list[Path], repeats: int) -> float:
    """Images/s of `load_image` alone in this process (one core): the ceiling of one worker."""
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for path in files:
            load_image(str(path))
        rates.append(len(files) / (time.perf_counter() - start))
    return statistics.median(rates)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train_dir", type=Path, help="a folder of images (default: generate JPEGs)")
    parser.add_argument("--images", type=int, default=512, help="JPEGs to generate")
    parser.add_argument("--jpeg-size", default="500x375", help="width x height of the generated JPEGs")
    parser.add_argument("--image-size", type=int, default=224, help="crop size (the model's image size)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=list(range(1, (os.cpu_count() or 1) + 1)))
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per setting (median and spread)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--baseline", action="store_true", help="also time the previous float32 pipeline")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    device = torch.device(args.device)

    with tempfile.TemporaryDirectory() as scratch:
        args.scratch = Path(scratch) / "output"
        source = str(args.train_dir)
        if args.train_dir is None:
            source = f"generated JPEGs of {args.jpeg_size}"
            width, height = (int(side) for side in args.jpeg_size.split("x"))
            args.train_dir = make_jpegs(Path(scratch) / "jpegs", args.images, (width, height))
        files = sorted(p for p in args.train_dir.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        ceiling = decode_rate(files, args.repeats)
        settings = [("current", workers) for workers in args.workers]
        if args.baseline:
            settings += [("previous", workers) for workers in args.workers]
        # A minimal model: the DataLoader does not depend on it.
        config = HiViTMAEConfig(
            image_size=args.image_size,
            hidden_size=32,
            depths=[1, 1, 1],
            num_attention_heads=1,
            decoder_hidden_size=16,
            decoder_num_hidden_layers=1,
            decoder_num_attention_heads=1,
        )
        model = HiViTMAEForPreTraining(config)
        loaders = {setting: build_loader(args, model, setting[1], setting[0]) for setting in settings}
        rates = {setting: [] for setting in settings}
        for _ in range(args.repeats):
            for setting in settings:
                rates[setting].append(time_batches(loaders[setting], setting[1], device))

    print(
        f"\n{len(files)} images ({source}), crop {args.image_size}, "
        f"batch {args.batch_size}, device {device}, {os.cpu_count()} CPU cores, torch {torch.__version__}\n"
        f"decode only (`load_image`, one process): {ceiling:.0f} images/s\n"
    )
    print("| pipeline | workers | images/s (median, min - max) | scaling efficiency | of the decode-only ceiling |")
    print("|---|---|---|---|---|")
    results = []
    for pipeline, workers in settings:
        samples = rates[pipeline, workers]
        one_worker = statistics.median(rates[pipeline, min(args.workers)]) / min(args.workers)
        rate = statistics.median(samples)
        efficiency = rate / (workers * one_worker)
        name = "uint8 (current)" if pipeline == "current" else "float32 (previous)"
        print(
            f"| {name} | {workers} | {rate:.0f} ({min(samples):.0f} - {max(samples):.0f}) | {efficiency:.0%} | "
            f"{rate / (workers * ceiling):.0%} |"
        )
        results.append(dict(pipeline=pipeline, workers=workers, images_per_second=samples, efficiency=efficiency))
    if args.baseline:
        print()
        for workers in args.workers:
            ratio = statistics.median(rates["current", workers]) / statistics.median(rates["previous", workers])
            print(f"current / previous pipeline, {workers} worker(s): {ratio:.2f}x")
    if args.json:
        Path(args.json).write_text(
            json.dumps(dict(args={k: str(v) for k, v in vars(args).items()}, decode_only=ceiling, results=results))
        )


if __name__ == "__main__":
    main()
