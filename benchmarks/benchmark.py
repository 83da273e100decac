"""Speed and memory of HiViT-MAE against mmpretrain's MAE-HiViT and transformers' ViTMAE, side by side.

    python benchmarks/benchmark.py --arch base --batch-size 8                  # CPU, float32
    python benchmarks/benchmark.py --device cuda --dtype bf16 --batch-size 256 --compile

In one process, with the same weights, images and masks for this project and mmpretrain (ViTMAE-B, the plain-ViT
peer of about the same FLOPs, has its own random weights), it interleaves the contenders repeat by repeat so that
machine noise falls on all alike, and prints a markdown table:

- pre-training step (forward + backward, mask ratio 0.75) and feature extraction (no masking) in images/s, the
  median of `--repeats` with the spread (min - max);
- peak memory of each, measured in a fresh subprocess per contender and mode after one warm-up call: on CUDA
  `torch.cuda.max_memory_allocated` over one call minus what was allocated before it; on the CPU (Linux, glibc) the
  same for the resident set: the peak resident size over one call (reset through `/proc/self/clear_refs`) minus
  the resident size before it, with glibc's mmap threshold fixed (`MALLOC_MMAP_THRESHOLD_`) and free memory
  trimmed first, so that every tensor buffer is mapped when allocated and unmapped when freed and the figure
  follows live tensors, not the allocator's caches;
- achieved TFLOP/s from FLOPs counted by `torch.utils.flop_counter.FlopCounterMode` (on the eager model, with
  attention through the math backend so that it is counted at all on the CPU), as a fraction of the
  device's dense peak on a GPU, and on the CPU as a fraction of a large square matmul timed between the contenders
  in the same run (the median; the practical roofline).

Ratios (this project / peer) are the headline. `--profile` writes a profiler trace of this project's step and
prints the top operators.
"""

import argparse
import contextlib
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from configuration_hivit_mae import HiViTMAEConfig  # noqa: E402
from hivit_mae_tools.conversion.mmpretrain import convert_state_dict, mmpretrain_config  # noqa: E402
from modeling_hivit_mae import HiViTMAEForPreTraining, random_masking  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Dense (no sparsity) peak TFLOP/s by GPU name fragment and dtype, from the vendors' data sheets.
GPU_PEAKS = {
    "H100": {"fp32": 67.0, "bf16": 989.0, "fp16": 989.0},
    "H200": {"fp32": 67.0, "bf16": 989.0, "fp16": 989.0},
    "A100": {"fp32": 19.5, "bf16": 312.0, "fp16": 312.0},
}
CONTENDERS = ("hivit-mae (ours)", "mmpretrain MAE-HiViT", "transformers ViTMAE-B")
# With --compile, mmpretrain's model compiled too, beside its eager run (what mmpretrain's users run).
COMPILED_REFERENCE = "mmpretrain MAE-HiViT compiled"


class Contender:
    """One model with a pre-training step and a feature extraction call on fixed inputs; `eager` holds the same two
    calls without `torch.compile`, on which FLOPs are counted (the work is the same). `compiled` says which of the
    two `step` and `extract` are."""

    def __init__(self, name, model, step, extract, eager=None, compiled=False):
        self.name, self.model, self.step, self.extract = name, model, step, extract
        self.eager = eager or {"step": step, "extract": extract}
        self.compiled = compiled


def build_contenders(args) -> list[Contender]:
    """The contenders named by `args.only` (all by default): this project and mmpretrain with the same weights,
    ViTMAE-B with its own."""
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from mmengine.logging import MMLogger
        from mmpretrain.registry import MODELS
        from mmpretrain.utils import register_all_modules

        register_all_modules()
        MMLogger.get_current_instance().setLevel("ERROR")
    names = args.only or (*CONTENDERS, *([COMPILED_REFERENCE] if args.compile else []))
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    config = HiViTMAEConfig.from_arch(args.arch, image_size=args.image_size)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=generator).to(device)
    num_patches = (args.image_size // 16) ** 2
    noise = torch.rand(args.batch_size, num_patches, generator=generator).to(device)
    # Autocast for every contender, as mmpretrain's AMP configs run it.
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype != torch.float32 else contextlib.nullcontext
    contenders = []

    if {CONTENDERS[0], CONTENDERS[1], COMPILED_REFERENCE} & set(names):
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reference = MODELS.build(mmpretrain_config(config))
            reference.init_weights()
        reference.backbone.masking_id = lambda batch_size, mask_ratio: random_masking(
            noise, int(num_patches * (1 - mask_ratio))
        )
        ours = HiViTMAEForPreTraining(config)
        ours.load_state_dict(convert_state_dict(reference.state_dict(), config)[0])
        ours.to(device).train()
        reference.to(device).train()

        def ours_calls(model, encoder):
            def step():
                with autocast():
                    loss = model(images, noise=noise).loss
                loss.backward()

            def extract():
                with torch.no_grad(), autocast():
                    encoder(images)

            return {"step": step, "extract": extract}

        eager = ours_calls(ours, ours.hivit)
        # The encoder is compiled on its own for extraction: `compiled.hivit` would reach the eager submodule.
        timed = ours_calls(torch.compile(ours), torch.compile(ours.hivit)) if args.compile else eager

        def reference_loss():
            latent, mask, ids_restore = reference.backbone(images)
            return reference.head.loss(reference.neck(latent, ids_restore), images, mask)

        def reference_calls(loss_function, backbone):
            def step():
                with autocast():
                    loss = loss_function()
                loss.backward()

            def extract():
                with torch.no_grad(), autocast():
                    backbone(images, mask=None)

            return {"step": step, "extract": extract}

        reference_eager = reference_calls(reference_loss, reference.backbone)
        contenders += [
            Contender(CONTENDERS[0], ours, timed["step"], timed["extract"], eager, compiled=args.compile),
            Contender(CONTENDERS[1], reference, reference_eager["step"], reference_eager["extract"]),
        ]
        if args.compile:
            calls = reference_calls(torch.compile(reference_loss), torch.compile(reference.backbone))
            compiled = Contender(COMPILED_REFERENCE, reference, calls["step"], calls["extract"], reference_eager, True)
            contenders.append(compiled)

    if CONTENDERS[2] in names:
        vit = ViTMAEForPreTraining(ViTMAEConfig(image_size=args.image_size, mask_ratio=0.75, norm_pix_loss=True))
        vit.to(device).train()

        def vit_step():
            with autocast():
                loss = vit(images, noise=noise).loss
            loss.backward()

        def vit_extract():
            vit.config.mask_ratio = 0.0  # ViTMAE has no switch to turn masking off but its ratio
            try:
                with torch.no_grad(), autocast():
                    vit.vit(images)
            finally:
                vit.config.mask_ratio = 0.75

        contenders.append(Contender(CONTENDERS[2], vit, vit_step, vit_extract))
    return [c for c in contenders if c.name in names]


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_call(function, device, iterations: int) -> float:
    synchronize(device)
    start = time.perf_counter()
    for _ in range(iterations):
        function()
    synchronize(device)
    return (time.perf_counter() - start) / iterations


def count_flops(function) -> int:
    # With the math backend, as matmuls: FlopCounterMode counts nothing for the CPU's fused attention kernel, and
    # counting all contenders' attention the same way keeps their figures comparable.
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        function()
    return counter.get_total_flops()


def matmul_roofline(device, dtype, size: int = 2048):
    """A timed call of a large square matmul, the practical peak of this device, and its FLOPs."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    return (lambda: a @ b), 2 * size**3


def peak_memory(argv: list[str], name: str, mode: str) -> int:
    """Bytes of peak memory growth of one call (see the module docstring), in a fresh process."""
    command = [sys.executable, __file__, *argv, "--only", name, "--memory-of", mode]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    result = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
    return int(result.stdout.strip().splitlines()[-1])


def measure_memory_here(args) -> int:
    contender = build_contenders(args)[0]
    function = contender.step if args.memory_of == "step" else contender.extract
    device = torch.device(args.device)
    if device.type == "cuda":
        function()  # warm-up: the CUDA caching allocator and cuBLAS workspaces
        contender.model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        function()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    function()  # warm-up: oneDNN's caches and other one-time allocations
    contender.model.zero_grad(set_to_none=True)
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    # Linux: writing 5 to clear_refs resets the peak resident set size (VmHWM) to the current one.
    Path("/proc/self/clear_refs").write_text("5")
    base = _status_kib("VmRSS")
    function()
    return (_status_kib("VmHWM") - base) * 1024


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def profile(args, contender: Contender):
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    contender.step()
    with profile(activities=activities, record_shapes=True) as profiler:
        contender.step()
    trace = Path(args.profile)
    profiler.export_chrome_trace(str(trace))
    sort = "cuda_time_total" if args.device == "cuda" else "cpu_time_total"
    print(profiler.key_averages().table(sort_by=sort, row_limit=25))
    print(f"trace written to {trace}")


def summarize(samples: list[float]) -> str:
    return f"{statistics.median(samples):.1f} ({min(samples):.1f} - {max(samples):.1f})"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="base", choices=["tiny", "small", "base", "large"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile this project's model; mmpretrain's runs eager and, as a further contender, compiled",
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per contender (median and spread)")
    parser.add_argument("--iterations", type=int, default=2, help="calls per timed repeat")
    parser.add_argument(
        "--only", nargs="+", choices=(*CONTENDERS, COMPILED_REFERENCE), help="a subset of the contenders"
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--profile", metavar="TRACE.json", help="profile this project's step, write a trace")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--memory-of", choices=["step", "extract"], help=argparse.SUPPRESS)  # internal
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    torch.set_float32_matmul_precision("high")

    if args.memory_of:
        print(measure_memory_here(args))
        return
    device = torch.device(args.device)
    contenders = build_contenders(args)
    if args.profile:
        profile(args, contenders[0])
        return

    flops = {}
    for contender in list(contenders):
        try:
            for mode, function in (("step", contender.step), ("extract", contender.extract)):
                function()  # warm-up (and compilation)
                flops[contender.name, mode] = count_flops(contender.eager[mode]) / args.batch_size
                contender.model.zero_grad(set_to_none=True)
        except Exception as error:  # only a peer's compilation may fail: its figures are left out, with the reason
            if contender.name != COMPILED_REFERENCE:
                raise
            print(f"{COMPILED_REFERENCE}: left out, torch.compile failed: {type(error).__name__}: {error}")
            contenders.remove(contender)
    throughput = {(c.name, mode): [] for c in contenders for mode in ("step", "extract")}
    matmul, matmul_flops = matmul_roofline(device, DTYPES[args.dtype])
    matmul()
    roofline = []  # timed between the contenders too, so that it sees the same machine noise
    for repeat in range(args.repeats):
        order = contenders[repeat % len(contenders) :] + contenders[: repeat % len(contenders)]
        for contender in order:
            for mode, function in (("step", contender.step), ("extract", contender.extract)):
                seconds = time_call(function, device, args.iterations)
                throughput[contender.name, mode].append(args.batch_size / seconds)
            contender.model.zero_grad(set_to_none=True)
            roofline.append(matmul_flops / time_call(matmul, device, 3))
    memory = {}
    if not args.no_memory:
        memory = {(c.name, m): peak_memory(argv, c.name, m) for c in contenders for m in ("step", "extract")}

    if device.type == "cuda":
        name = torch.cuda.get_device_name()
        peak = next((p[args.dtype] * 1e12 for k, p in GPU_PEAKS.items() if k in name), None)
        peak_label = f"{name} dense {args.dtype} peak"
    else:
        name = f"CPU ({torch.get_num_threads()} threads)"
        peak = statistics.median(roofline)
        peak_label = f"2048^3 matmul in this run ({peak / 1e12:.3f} TFLOP/s)"
    print(
        f"\n{name}, {args.arch}, batch {args.batch_size}, {args.image_size}px, {args.dtype}"
        f"{', compiled' if args.compile else ''}, torch {torch.__version__}, {args.repeats} repeats\n"
    )
    print(f"| model | mode | images/s (median, min - max) | peak memory MiB | TFLOP/s | of {peak_label} |")
    print("|---|---|---|---|---|---|")
    results = []
    for contender in contenders:
        for mode in ("step", "extract"):
            samples = throughput[contender.name, mode]
            achieved = flops[contender.name, mode] * statistics.median(samples)
            mib = memory.get((contender.name, mode))
            results.append(
                dict(
                    model=contender.name,
                    mode=mode,
                    compiled=contender.compiled,
                    images_per_second=samples,
                    flops_per_image=flops[contender.name, mode],
                    peak_memory_bytes=mib,
                )
            )
            print(
                f"| {contender.name} | {'pre-training step' if mode == 'step' else 'feature extraction'} | "
                f"{summarize(samples)} | {'-' if mib is None else f'{mib / 2**20:.0f}'} | {achieved / 1e12:.3f} | "
                f"{'-' if peak is None else f'{achieved / peak:.0%}'} |"
            )
    ours = contenders[0].name
    if ours == CONTENDERS[0]:
        print()
        for peer in contenders[1:]:
            for mode in ("step", "extract"):
                ratio = statistics.median(throughput[ours, mode]) / statistics.median(throughput[peer.name, mode])
                # What ran on each side: --compile compiles ours, mmpretrain's users run it eager.
                sides = [("compiled" if c.compiled else "eager") for c in (contenders[0], peer)]
                peer_name = CONTENDERS[1] if peer.name == COMPILED_REFERENCE else peer.name
                line = f"speed ours ({sides[0]}) / {peer_name} ({sides[1]}), {mode}: {ratio:.2f}x"
                if memory:
                    line += f"; memory ours / theirs: {memory[ours, mode] / max(memory[peer.name, mode], 1):.2f}x"
                print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(args=vars(args), device=name, results=results), indent=2))


if __name__ == "__main__":
    main()
