"""Smoke test of benchmarks/benchmark.py at a tiny size, so that it cannot rot. It asserts what the benchmark must
get right, never how fast anything is."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import benchmark  # noqa: E402

TINY = ["--arch", "tiny", "--batch-size", "2", "--image-size", "32", "--repeats", "2", "--iterations", "1"]


def test_benchmark_runs_and_reports_every_contender(tmp_path, capsys):
    output = tmp_path / "results.json"
    benchmark.main([*TINY, "--no-memory", "--json", str(output)])
    printed = capsys.readouterr().out
    assert "| hivit-mae (ours) | pre-training step |" in printed
    # Each ratio says what ran on each side.
    assert "speed ours (eager) / mmpretrain MAE-HiViT (eager), step:" in printed
    results = {(r["model"], r["mode"]): r for r in json.loads(output.read_text())["results"]}
    assert set(results) == {(name, mode) for name in benchmark.CONTENDERS for mode in ("step", "extract")}
    for result in results.values():
        assert len(result["images_per_second"]) == 2 and min(result["images_per_second"]) > 0
    # Same architecture, same work: the FLOP counts of this project and mmpretrain agree.
    for mode in ("step", "extract"):
        ours = results[benchmark.CONTENDERS[0], mode]["flops_per_image"]
        assert ours == pytest.approx(results[benchmark.CONTENDERS[1], mode]["flops_per_image"], rel=0.01)
    # The step (forward + backward, 25 % of the patches) and the extraction (all patches) both cost something.
    assert results[benchmark.CONTENDERS[0], "step"]["flops_per_image"] > 0


def test_peak_memory_subprocess(tmp_path):
    command = [sys.executable, str(ROOT / "benchmarks" / "benchmark.py"), *TINY, "--only", benchmark.CONTENDERS[0]]
    result = subprocess.run([*command, "--memory-of", "step"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    # At least the gradients of every trainable parameter are alive at the peak of a training step.
    from configuration_hivit_mae import HiViTMAEConfig
    from modeling_hivit_mae import HiViTMAEForPreTraining

    model = HiViTMAEForPreTraining(HiViTMAEConfig.from_arch("tiny", image_size=32))
    gradient_bytes = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    assert int(result.stdout.strip().splitlines()[-1]) >= 0.9 * gradient_bytes


def test_compiled_ratios_say_what_ran_on_each_side(monkeypatch, capsys):
    """--compile adds mmpretrain compiled beside mmpretrain eager and labels every ratio. Compiling takes minutes on
    this CPU, so `torch.compile` is replaced: by the identity, then by a compiler that fails for mmpretrain's model,
    which must leave that contender out with the reason and keep the rest."""
    only = ["--only", benchmark.CONTENDERS[0], benchmark.CONTENDERS[1], benchmark.COMPILED_REFERENCE]
    monkeypatch.setattr(benchmark.torch, "compile", lambda function, **kwargs: function)
    benchmark.main([*TINY, "--no-memory", "--compile", *only])
    printed = capsys.readouterr().out
    assert "speed ours (compiled) / mmpretrain MAE-HiViT (eager), step:" in printed
    assert "speed ours (compiled) / mmpretrain MAE-HiViT (compiled), extract:" in printed

    def fails_for_mmpretrain(function, **kwargs):
        if getattr(function, "__name__", "") != "reference_loss":
            return function

        def failing():
            raise RuntimeError("cannot compile this")

        return failing

    monkeypatch.setattr(benchmark.torch, "compile", fails_for_mmpretrain)
    benchmark.main([*TINY, "--no-memory", "--compile", *only])
    printed = capsys.readouterr().out
    reason = "torch.compile failed: RuntimeError: cannot compile this"
    assert f"mmpretrain MAE-HiViT compiled: left out, {reason}" in printed
    assert "speed ours (compiled) / mmpretrain MAE-HiViT (eager), step:" in printed
    assert "(compiled) / mmpretrain MAE-HiViT (compiled)" not in printed
