"""Smoke test of benchmarks/benchmark_data.py at a tiny size, so that it cannot rot. It asserts what the benchmark must
get right (the DataLoader of `run_pretraining.py`, every setting timed), never how fast anything is."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import benchmark_data  # noqa: E402


def test_data_benchmark_runs_every_setting(tmp_path, capsys):
    output = tmp_path / "results.json"
    benchmark_data.main(
        ["--images", "12", "--jpeg-size", "80x60", "--image-size", "32", "--batch-size", "4"]
        + ["--workers", "1", "2", "--repeats", "1", "--baseline", "--json", str(output)]
    )
    printed = capsys.readouterr().out
    assert "decode only (`load_image`, one process):" in printed
    assert "| uint8 (current) | 2 |" in printed and "| float32 (previous) | 1 |" in printed
    assert "current / previous pipeline, 1 worker(s):" in printed
    results = json.loads(output.read_text())["results"]
    settings = {(pipeline, workers) for pipeline in ("current", "previous") for workers in (1, 2)}
    assert {(r["pipeline"], r["workers"]) for r in results} == settings
    assert all(len(r["images_per_second"]) == 1 and r["images_per_second"][0] > 0 for r in results)


def test_generated_jpegs_look_like_photographs(tmp_path):
    from PIL import Image

    folder = benchmark_data.make_jpegs(tmp_path, 2, (500, 375))
    for path in sorted(folder.iterdir()):
        with Image.open(path) as image:
            assert (image.format, image.size, image.mode) == ("JPEG", (500, 375), "RGB")
        # Compressed like a photograph (tens of kB), not like a flat image (a few kB).
        assert path.stat().st_size > 20_000
