"""What a careless user can do to the command-line tools, and what they must get: one `error:` line (exit 2 for a bad
argument, 1 otherwise) and no traceback, their files untouched, no silently wrong training data."""

import json
import os
import re
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_pretraining import TINY, TINY_CONFIG, make_images

import convert_checkpoint
import run_classification
import run_pretraining
import visualize_reconstruction
from configuration_hivit_mae import HiViTMAEConfig
from hivit_mae_tools import images as image_tools
from hivit_mae_tools.cli import UserError, check_model_path
from hivit_mae_tools.data import class_names, validation_label_map
from hivit_mae_tools.images import load_image
from hivit_mae_tools.outputs import STAGING_MARKER, check_output_dir, clean_stale_staging, staged_output
from hivit_mae_tools.training import COMPLETE_MARKER, resolve_resume
from modeling_hivit_mae import HiViTMAEForImageClassification, HiViTMAEForPreTraining, HiViTMAEModel


@pytest.fixture(autouse=True)
def offline_and_private_cache(tmp_path, monkeypatch):
    """No Hub access, and the image-check cache in this test's own folder."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HIVIT_MAE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Tiny saved models of each kind and small image folders."""
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    config = HiViTMAEConfig.from_arch("tiny", **TINY_CONFIG)
    HiViTMAEForPreTraining(config).save_pretrained(root / "mae")
    HiViTMAEModel(config).save_pretrained(root / "encoder")
    HiViTMAEForImageClassification(HiViTMAEConfig.from_arch("tiny", **TINY_CONFIG, num_labels=2)).save_pretrained(
        root / "classifier"
    )
    make_images(root / "train", 8)
    for folder, names in (("classes", "cat dog fish"), ("other_classes", "bird dog"), ("fewer_classes", "cat dog")):
        for name in names.split():
            make_images(root / folder / name, 2)
    return root


def pretrain_args(train_dir, output_dir, *extra):
    return [
        "--train_dir", str(train_dir), "--arch", "tiny", "--config_overrides", TINY, "--output_dir", str(output_dir),
        "--per_device_train_batch_size", "4", "--max_steps", "1", "--save_strategy", "no",
        "--dataloader_num_workers", "0", "--use_cpu", "True", "--reconstruction_figure", "False", *extra,
    ]  # fmt: skip


def finetune_args(model, train_dir, output_dir, *extra):
    return [
        "--model_name_or_path", str(model), "--train_dir", str(train_dir), "--output_dir", str(output_dir),
        "--per_device_train_batch_size", "4", "--max_steps", "1", "--save_strategy", "no", "--use_cpu", "True",
        "--config_overrides", "image_size=32", *extra,
    ]  # fmt: skip


def run(cli, args, capsys):
    """Run a script's console entry point in-process; returns (exit status, stderr)."""
    status = cli([str(arg) for arg in args])
    return status, capsys.readouterr().err


def assert_one_error(status, err, pattern, expected_status=None):
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, err
    assert re.search(pattern, errors[0]), errors[0]
    assert status == (expected_status or status) and status != 0


def readonly_folder(tmp_path) -> Path:
    """A folder this process cannot write into: a read-only directory, or (as root, who may write anywhere) a place
    the kernel refuses."""
    folder = tmp_path / "readonly"
    folder.mkdir()
    folder.chmod(0o555)
    return folder / "out" if not os.access(folder, os.W_OK) else Path("/proc/sys/hivit-mae-out")


@pytest.fixture(scope="module")
def mmpretrain_checkpoint(tmp_path_factory):
    """A small, valid mmpretrain MAE-HiViT checkpoint for the converter."""
    from reference import build_mmpretrain_mae

    arch = dict(embed_dims=128, depths=[1, 1, 2], num_heads=2)
    path = tmp_path_factory.mktemp("checkpoint") / "mae.pth"
    torch.save(build_mmpretrain_mae(arch, 64, 0, decoder_dim=32, decoder_depth=1).state_dict(), path)
    return path


def bad_input(case, root, tmp_path, request):
    """(entry point, arguments, expected exit status, pattern of the error line) of one bad-input case."""
    out = tmp_path / "out"
    image = root / "train" / "000.png"
    broken = tmp_path / "broken_images"
    if case.endswith("unreadable-image"):
        make_images(broken, 2)
        (broken / "broken.jpg").write_bytes(b"this is not a JPEG")
    pretrain, finetune, visualize = run_pretraining.cli, run_classification.cli, visualize_reconstruction.cli
    cases = {
        "pretrain-missing-model": lambda: (
            pretrain, ["--model_name_or_path", "./no/such/model", *pretrain_args(root / "train", out)], 1, "no such"),
        "pretrain-unreadable-image": lambda: (
            pretrain, pretrain_args(broken, out), 1, r"1 unreadable image file.*broken\.jpg: not an image file"),
        "pretrain-mask-ratio": lambda: (
            pretrain, pretrain_args(root / "train", out, "--mask_ratio", "1.5"), 2, r"mask_ratio=1\.5 must be in"),
        "pretrain-unknown-arch": lambda: (
            pretrain, pretrain_args(root / "train", out, "--arch", "huge"), 2, "invalid choice: 'huge'"),
        "pretrain-missing-train-dir": lambda: (
            pretrain, pretrain_args(tmp_path / "missing", out), 1, "--train_dir .*missing' is not a folder"),
        "pretrain-config-overrides-typo": lambda: (
            pretrain, pretrain_args(root / "train", out, "--config_overrides", "imagesize=32"), 2, "no field"),
        "pretrain-read-only-output": lambda: (
            pretrain, pretrain_args(root / "train", readonly_folder(tmp_path)), 1, "is not writable"),
        "pretrain-empty-output": lambda: (pretrain, pretrain_args(root / "train", ""), 2, "--output_dir is empty"),
        "pretrain-unknown-argument": lambda: (
            pretrain, pretrain_args(root / "train", out, "--bogus", "1"), 2, r"unknown arguments.*--bogus"),
        "finetune-missing-model": lambda: (
            finetune, finetune_args(tmp_path / "nope", root / "classes", out), 1, "no such local folder"),
        "finetune-output-is-source": lambda: (
            finetune, finetune_args(root / "mae", root / "classes", root / "mae"), 2, "is the source model"),
        "finetune-missing-train-dir": lambda: (
            finetune, finetune_args(root / "mae", tmp_path / "missing", out), 1, "is not a folder"),
        "visualize-scale-0": lambda: (
            visualize, ["--model", root / "mae", "--image", image, "--scale", "0"], 2, "--scale: must be a positive"),
        "visualize-mask-ratio": lambda: (
            visualize, ["--model", root / "mae", "--image", image, "--mask_ratio", "1.5"], 2, r"in \[0, 1\)"),
        "visualize-missing-model": lambda: (
            visualize, ["--model", "~/no-such-model", "--image", image], 1, "no such local folder"),
        "visualize-unreadable-image": lambda: (
            visualize, ["--model", root / "mae", "--image", broken / "broken.jpg"], 1, "cannot read image"),
        "visualize-encoder-folder": lambda: (
            visualize, ["--model", root / "encoder", "--image", image], 1, "no trained decoder weights"),
        "visualize-no-model": lambda: (visualize, ["--image", image], 2, "required: --model"),
        "convert-missing-file": lambda: (
            convert_checkpoint.main, ["--checkpoint", tmp_path / "missing.pth", "--output_dir", out], 1, "missing"),
        # An unset shell variable: must not delete the current directory (the test runs in a scratch one).
        "convert-empty-output": lambda: (
            convert_checkpoint.main,
            ["--checkpoint", request.getfixturevalue("mmpretrain_checkpoint"), "--output_dir", "", "--overwrite"],
            None,
            "output_dir",
        ),
    }  # fmt: skip
    return cases[case]()


BAD_INPUT_CASES = [
    "pretrain-missing-model", "pretrain-unreadable-image", "pretrain-mask-ratio", "pretrain-unknown-arch",
    "pretrain-missing-train-dir", "pretrain-config-overrides-typo", "pretrain-read-only-output",
    "pretrain-empty-output", "pretrain-unknown-argument", "finetune-missing-model", "finetune-output-is-source",
    "finetune-missing-train-dir", "visualize-scale-0", "visualize-mask-ratio", "visualize-missing-model",
    "visualize-unreadable-image", "visualize-encoder-folder", "visualize-no-model", "convert-missing-file",
    "convert-empty-output",
]  # fmt: skip


@pytest.mark.parametrize("case", BAD_INPUT_CASES)
def test_every_cli_gives_one_error_line(case, folders, tmp_path, capsys, monkeypatch, request):
    """Every command, given a mistake, prints exactly one `error:` line and no traceback, exits 2 for a bad argument
    and 1 otherwise, and writes nothing: not its output folder, not a file of the current directory."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "precious.txt").write_text("the user's file")
    monkeypatch.chdir(cwd)
    cli, args, expected, pattern = bad_input(case, folders, tmp_path, request)
    status, err = run(cli, args, capsys)
    assert (cwd / "precious.txt").is_file(), "deleted the current directory"
    assert_one_error(status, err, pattern, expected)
    assert not (tmp_path / "out").exists(), "wrote its output folder"


def test_debug_shows_the_traceback(folders, capsys):
    status, err = run(visualize_reconstruction.cli, ["--model", folders / "encoder", "--image", "x.png", "--debug"],
                      capsys)  # fmt: skip
    assert status == 1 and "Traceback" in err and err.strip().splitlines()[-1].startswith("error: ")


def test_local_model_path_typo_is_reported_at_once(tmp_path, monkeypatch):
    """A path that can only be local is reported as missing, without asking the Hub (30 s of retries online)."""
    monkeypatch.delenv("HF_HUB_OFFLINE")
    (tmp_path / "outputs").mkdir()
    monkeypatch.chdir(tmp_path)
    for path in ("./model", "../model", "/no/such/model", "~/model", "outputs/run1", "a/b/c"):
        start = time.time()
        with pytest.raises(UserError, match="no such local folder"):
            check_model_path(path)
        assert time.time() - start < 1
    (tmp_path / "model.bin").write_bytes(b"")
    with pytest.raises(UserError, match="is a file"):
        check_model_path("model.bin")
    assert check_model_path("org/name") == "org/name"  # a Hub id is left to the Hub


# ------------------------------------------------------------------------------------------------ output folders
def test_output_dir_rules(tmp_path, monkeypatch):
    work = tmp_path / "home" / "work"
    (work / "data").mkdir(parents=True)
    (tmp_path / "model").mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "runs").mkdir()
    inputs = [work / "data", tmp_path / "runs" / "checkpoint.pth"]
    (tmp_path / "runs" / "checkpoint.pth").write_bytes(b"x")
    refused = {
        "": "is empty",
        " ": "is empty",
        ".": "is the current directory",
        "..": "a parent of the current directory",
        str(tmp_path / "home"): "parent of the current directory",
        "/": "parent of the current directory",
        "data": "is an input",
        "data/out": "is inside an input folder",
        str(tmp_path / "runs"): r"contains an input \(.*checkpoint.pth\)",
        str(tmp_path / "model"): "is the source model",
    }
    for output_dir, message in refused.items():
        with pytest.raises(UserError, match=message):
            check_output_dir(output_dir, inputs=inputs, source_model=tmp_path / "model")
    monkeypatch.chdir(tmp_path.parent)  # outside the fake home
    for home in ("~", str(tmp_path)):
        with pytest.raises(UserError, match="home directory"):
            check_output_dir(home)

    assert check_output_dir(work / "new") == work / "new"
    (work / "full").mkdir()
    (work / "full" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"is not empty \(notes.txt\).*--overwrite_output_dir"):
        check_output_dir(work / "full", must_be_empty=True)
    assert check_output_dir(work / "full", must_be_empty=True, allow_existing=True) == work / "full"


def test_symlinked_output_dir_stays_a_link(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert check_output_dir(tmp_path / "link") == tmp_path / "real"
    with staged_output(tmp_path / "link") as staging:
        (staging / "model.txt").write_text("new")
    assert (tmp_path / "link").is_symlink() and (tmp_path / "real" / "model.txt").read_text() == "new"

    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    with pytest.raises(UserError, match="is a symlink to .*gone, which does not exist"):
        check_output_dir(tmp_path / "dangling")


def test_staging_moves_into_place_and_cleans_only_its_own_leftovers(tmp_path):
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    (output_dir / "model.txt").write_text("old")
    (output_dir / "user.txt").write_text("the user's")
    with pytest.raises(RuntimeError):
        with staged_output(output_dir) as staging:
            (staging / "model.txt").write_text("half-writ")
            raise RuntimeError("killed")
    assert (output_dir / "model.txt").read_text() == "old"  # a failure leaves the earlier result
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    with staged_output(output_dir) as staging:
        assert staging.parent == tmp_path and staging.name.startswith(".out.")
        (staging / "model.txt").write_text("new")
        assert (output_dir / "model.txt").read_text() == "old"  # nothing moves before the end
    assert (output_dir / "model.txt").read_text() == "new" and (output_dir / "user.txt").read_text() == "the user's"

    # A SIGKILLed run's staging folder (its process is gone) is ours: removed by the next run. A look-alike
    # without our marker, or a live process's, is not.
    host = socket.gethostname()
    dead = tmp_path / f".out.hivit-mae-staging-{host}-999999999-abc"
    alive = tmp_path / f".out.hivit-mae-staging-{host}-{os.getpid()}-def"
    unmarked = tmp_path / f".out.hivit-mae-staging-{host}-999999998-ghi"
    for folder in (dead, alive, unmarked):
        folder.mkdir()
        (folder / "model.txt").write_text("x")
    (dead / STAGING_MARKER).touch()
    (alive / STAGING_MARKER).touch()
    assert clean_stale_staging(output_dir) == [dead]
    assert alive.exists() and unmarked.exists() and not dead.exists()


def test_pretraining_never_overwrites_an_earlier_run_or_its_source(folders, tmp_path, capsys):
    """Issue 3: a folder holding an earlier run is refused (its files untouched) unless --overwrite_output_dir;
    checkpoints of an earlier run are refused even then (rotation would delete them); the source model is never
    the output."""
    first = tmp_path / "first"
    assert run(run_pretraining.cli, pretrain_args(folders / "train", first), capsys)[0] == 0
    weights = (first / "model.safetensors").read_bytes()
    (first / "notes.txt").write_text("the user's notes")
    status, err = run(run_pretraining.cli, pretrain_args(folders / "train", first, "--seed", "1"), capsys)
    assert_one_error(status, err, r"is not empty .*--overwrite_output_dir", 1)
    assert (first / "model.safetensors").read_bytes() == weights

    args = pretrain_args(folders / "train", first, "--seed", "1", "--overwrite_output_dir", "True")
    assert run(run_pretraining.cli, args, capsys)[0] == 0
    assert (first / "model.safetensors").read_bytes() != weights  # asked for: replaced
    assert (first / "notes.txt").read_text() == "the user's notes"  # not ours: kept
    assert not [p for p in tmp_path.iterdir() if "staging" in p.name]

    (first / "checkpoint-5").mkdir()
    saving = [*args, "--save_strategy", "steps", "--save_steps", "1"]
    assert_one_error(*run(run_pretraining.cli, saving, capsys), "holds checkpoints of an earlier run")
    assert (first / "checkpoint-5").is_dir()

    status, err = run(run_pretraining.cli, ["--model_name_or_path", folders / "mae", *pretrain_args(
        folders / "train", folders / "mae")], capsys)  # fmt: skip
    assert_one_error(status, err, "is the source model", 2)
    status, err = run(run_pretraining.cli, pretrain_args(folders / "train", folders / "train" / "out"), capsys)
    assert_one_error(status, err, "contains an input|is an input|inside", 2)


def test_pretraining_into_a_symlink_and_after_a_killed_run(folders, tmp_path, capsys):
    """Issue 12 for training: a symlinked --output_dir stays a link; a staging folder of a killed run is removed."""
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    leftover = tmp_path / f".real.hivit-mae-staging-{socket.gethostname()}-999999999-x"
    leftover.mkdir()
    (leftover / STAGING_MARKER).touch()
    assert run(run_pretraining.cli, pretrain_args(folders / "train", tmp_path / "link"), capsys)[0] == 0
    assert (tmp_path / "link").is_symlink() and (tmp_path / "real" / "model.safetensors").is_file()
    assert not leftover.exists()
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    status, err = run(run_pretraining.cli, pretrain_args(folders / "train", tmp_path / "dangling"), capsys)
    assert_one_error(status, err, "which does not exist", 1)


# ------------------------------------------------------------------------------------------------------ resume
def test_resume_latest_skips_a_half_written_checkpoint(folders, tmp_path, capsys, caplog):
    """Issue 7: after a SIGKILL during a checkpoint save, `latest` takes the newest complete checkpoint, says so, and
    the run finishes."""
    output_dir = tmp_path / "run"
    args = pretrain_args(folders / "train", output_dir, "--max_steps", "2", "--save_strategy", "steps",
                         "--save_steps", "1")  # fmt: skip
    assert run(run_pretraining.cli, args, capsys)[0] == 0
    assert all((output_dir / f"checkpoint-{step}" / COMPLETE_MARKER).is_file() for step in (1, 2))
    # What a kill during the save of step 3 leaves: the weights half-written, nothing after them.
    half = output_dir / "checkpoint-3"
    half.mkdir()
    (half / "model.safetensors").write_bytes((output_dir / "checkpoint-2" / "model.safetensors").read_bytes()[:100])
    resumed = run_pretraining.main([*args, "--max_steps", "3", "--resume_from_checkpoint", "latest"])
    out = caplog.text
    assert "Skipping checkpoint-3: interrupted while saving" in out and "checkpoint-2, the newest complete" in out
    assert resumed["global_step"] == 3 and (half / COMPLETE_MARKER).is_file()

    status, err = run(run_pretraining.cli, [*args, "--resume_from_checkpoint", str(tmp_path / "nope")], capsys)
    assert_one_error(status, err, "is not a folder", 1)


def test_resume_latest_without_markers_uses_the_trainers_last_file(tmp_path):
    """Checkpoints written by a plain Trainer have no marker: complete when `trainer_state.json`, the last file the
    Trainer writes, is readable."""
    from transformers import TrainingArguments

    for step, state in ((1, "{}"), (2, "{}"), (3, '{"global_step": 3, "log_hist')):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    (tmp_path / "checkpoint-4").mkdir()  # killed before its trainer state
    args = TrainingArguments(output_dir=str(tmp_path), resume_from_checkpoint="latest", report_to="none")
    assert resolve_resume(args) == str(tmp_path / "checkpoint-2")
    (tmp_path / "checkpoint-1" / COMPLETE_MARKER).write_text("{}")  # a run with markers: only marked ones count
    assert resolve_resume(args) == str(tmp_path / "checkpoint-1")
    args.resume_from_checkpoint = str(tmp_path / "checkpoint-3")
    with pytest.raises(UserError, match="checkpoint-3 is incomplete"):
        resolve_resume(args)


# ------------------------------------------------------------------------------------------------------ images
def test_bad_images_are_listed_before_training_or_skipped(tmp_path, capsys, caplog, monkeypatch):
    """Issue 9: corrupt, empty and text-named-.jpg files are all listed before training starts; --skip_bad_images
    drops them with a count; the check is cached outside the data folder and not repeated for unchanged files."""
    folder = make_images(tmp_path / "data", 4)
    (folder / "text.jpg").write_text("hello")
    (folder / "empty.png").write_bytes(b"")
    good = (folder / "000.png").read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    output_dir = tmp_path / "out"
    status, err = run(run_pretraining.cli, pretrain_args(folder, output_dir), capsys)
    assert_one_error(status, err, r"3 unreadable image file\(s\) in --train_dir", 1)
    for name, reason in (("empty.png", "empty file"), ("text.jpg", "not an image file"), ("truncated.png", "trunc")):
        assert re.search(rf"{name}: [^;]*{reason}", err), (name, err)
    assert not output_dir.exists()

    result = run_pretraining.main(pretrain_args(folder, output_dir, "--skip_bad_images", "True"))
    assert "Skipped 3 unreadable image file(s)" in caplog.text and result["global_step"] == 1
    assert {p.name for p in folder.iterdir()} == {"000.png", "001.png", "002.png", "003.png", "text.jpg",
                                                  "empty.png", "truncated.png"}  # fmt: skip
    assert list((tmp_path / "cache" / "image-checks").glob("*.json"))

    decoded = []
    monkeypatch.setattr(image_tools, "check_image_file", lambda path: decoded.append(path))
    assert image_tools.check_image_files(sorted(map(str, folder.glob("0*.png")))) == {}
    assert decoded == []  # cached: unchanged files are not decoded again
    os.utime(folder / "001.png", ns=(0, 0))
    image_tools.check_image_files(sorted(map(str, folder.glob("0*.png"))))
    assert decoded == [str(folder / "001.png")]


def test_unreadable_image_in_a_dataset_is_one_line_also_from_a_worker(folders, tmp_path, capsys):
    """Images stored as bytes (a Hub-style dataset) are decoded when their batch comes; an unreadable one, raised in
    a dataloader worker, still ends in one `error:` line naming it."""
    import datasets

    good = (folders / "train" / "000.png").read_bytes()
    rows = [{"bytes": good, "path": "good.png"}] * 3 + [{"bytes": b"not an image", "path": "bad.png"}]
    (tmp_path / "data").mkdir()
    dataset = datasets.Dataset.from_dict({"image": rows}, features=datasets.Features({"image": datasets.Image()}))
    dataset.to_parquet(str(tmp_path / "data" / "train.parquet"))
    args = pretrain_args(folders / "train", tmp_path / "out", "--dataloader_num_workers", "1", "--augment", "False")
    args[:2] = ["--dataset_name", str(tmp_path / "data")]
    status, err = run(run_pretraining.cli, args, capsys)
    assert_one_error(status, err, r"cannot read image 'bad.png': not an image file$", 1)


def test_parallel_check_finds_the_same_files(tmp_path):
    folder = make_images(tmp_path / "data", 6)
    (folder / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    paths = sorted(map(str, folder.iterdir()))
    serial = image_tools.check_image_files(paths, tmp_path / "c1", num_workers=1)
    parallel = image_tools.check_image_files(paths, tmp_path / "c2", num_workers=3)
    assert serial == parallel and list(parallel) == [str(folder / "bad.png")]


def test_image_modes_convert_without_clipping(tmp_path):
    """Issue 5: a 16-bit PNG keeps its picture (PIL's own convert clips it white); every mode converts as an
    independent computation says."""
    ramp16 = np.linspace(0, 65535, 48 * 32).reshape(32, 48).astype(np.uint16)
    Image.fromarray(ramp16).save(tmp_path / "ramp16.png")
    with Image.open(tmp_path / "ramp16.png") as raw:
        assert (np.asarray(raw.convert("RGB")) == 255).mean() > 0.9  # what used to happen
    rgb = np.asarray(image_tools.load_image(tmp_path / "ramp16.png"))
    expected = np.round(ramp16 / 65535 * 255)
    assert rgb.shape == (32, 48, 3) and np.array_equal(rgb[..., 0], expected) and np.array_equal(rgb[..., 2], expected)
    # Older Pillow opens 16-bit PNGs as 32-bit `I`: scaled the same way.
    as_i = Image.fromarray(ramp16.astype(np.int32))
    assert as_i.mode == "I" and np.array_equal(np.asarray(image_tools.to_rgb(as_i))[..., 1], expected)
    floats = np.linspace(-2.0, 6.0, 32 * 48).reshape(32, 48).astype(np.float32)
    assert np.array_equal(np.asarray(image_tools.to_rgb(Image.fromarray(floats)))[..., 0],
                          np.round((floats.astype(np.float64) + 2.0) / 8.0 * 255))  # fmt: skip

    # Transparency composited onto white (as transformers 5's `convert_to_rgb` does; 4.x drops the alpha instead):
    # colour * alpha + white * (1 - alpha), within PIL's integer rounding.
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (16, 16, 4), dtype=np.uint8)
    alpha = pixels[..., 3:].astype(np.float64) / 255
    composite = pixels[..., :3] * alpha + 255 * (1 - alpha)
    converted = np.asarray(image_tools.to_rgb(Image.fromarray(pixels, "RGBA"))).astype(np.float64)
    assert np.abs(converted - composite).max() <= 1.0
    la = Image.fromarray(np.dstack([np.full((4, 4), 10, np.uint8), np.full((4, 4), 0, np.uint8)]), "LA")
    assert (np.asarray(image_tools.to_rgb(la)) == 255).all()  # fully transparent: the white background
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0])
    palette.info["transparency"] = 0
    assert (np.asarray(image_tools.to_rgb(palette)) == 255).all()
    bilevel = Image.fromarray(np.array([[0, 255]], np.uint8)).convert("1")
    assert np.asarray(image_tools.to_rgb(bilevel)).tolist() == [[[0, 0, 0], [255, 255, 255]]]
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))
    assert np.asarray(image_tools.to_rgb(cmyk))[0, 0].tolist() == [255, 0, 0]

    # The visualiser reads the same 16-bit file correctly.
    assert np.array_equal(np.asarray(load_image(tmp_path / "ramp16.png")), rgb)


# -------------------------------------------------------------------------------------------- classification
def test_validation_classes_are_matched_by_name(folders, tmp_path, capsys):
    """Issue 4: validation classes that differ from the training classes are refused before training, with their
    names, and nothing is written; matching names in another order are mapped by name."""
    output_dir = tmp_path / "out"
    for validation, message in (
        ("other_classes", r"not in training: \['bird'\]; missing from validation: \['cat', 'fish'\]"),
        ("fewer_classes", r"do not match the training classes: missing from validation: \['fish'\]"),
    ):
        args = finetune_args(
            folders / "mae", folders / "classes", output_dir, "--validation_dir", folders / validation
        )
        assert_one_error(*run(run_classification.cli, args, capsys), message)
        assert not output_dir.exists()

    assert validation_label_map(["cat", "dog"], ["dog", "cat"]) == [1, 0]
    transform = run_classification.LabelledImageTransform("image", "label", lambda image: image, 2, [1, 0])
    batch = transform({"image": [Image.new("RGB", (4, 4))] * 2, "label": [0, 1]})
    assert batch["labels"] == [1, 0]  # validation "dog" (0) is training class 1


def test_duplicate_class_names_are_refused():
    """Issue 8: `label2id` would lose a class. datasets refuses duplicate `ClassLabel` names itself; a dataset whose
    feature was built around that check is refused by the fine-tuning script too."""
    import datasets

    feature = datasets.ClassLabel(names=["a", "b"])
    feature.names = ["a", "b", "a"]  # e.g. a feature deserialised by an older datasets
    dataset = datasets.Dataset.from_dict({"label": [0, 1]}, features=datasets.Features({"label": feature}))
    with pytest.raises(UserError, match=r"class names \['a'\] occur more than once"):
        class_names(dataset, "label")


# -------------------------------------------------------------------------------------------------- visualiser
def test_visualizer_refuses_folders_without_a_trained_decoder(folders, tmp_path, capsys):
    """Issue 11: an encoder-only or classifier folder would be drawn with a random decoder."""
    image = folders / "train" / "000.png"
    for kind in ("encoder", "classifier"):
        output = tmp_path / f"{kind}.png"
        status, err = run(visualize_reconstruction.cli, ["--model", folders / kind, "--image", image, "--output",
                                                        output], capsys)  # fmt: skip
        assert_one_error(status, err, rf"--model .*{kind} holds no trained decoder weights", 1)
        assert not output.exists()
    output = tmp_path / "mae.png"
    assert run(visualize_reconstruction.cli, ["--model", folders / "mae", "--image", image, "--output", output],
               capsys)[0] == 0  # fmt: skip
    assert output.is_file()
    status, err = run(visualize_reconstruction.cli, ["--model", folders / "mae", "--image", output, "--output",
                                                    output], capsys)  # fmt: skip
    assert_one_error(status, err, "is one of the --image files", 2)
    assert json.loads((folders / "mae" / "config.json").read_text())["architectures"] == ["HiViTMAEForPreTraining"]
