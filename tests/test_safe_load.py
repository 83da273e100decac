"""Tests of `hivit_mae_tools.conversion.safe_load`: the original HiViT repository's checkpoint layout loads on a
CPU-only machine, nothing that could run code is unpickled (also hidden in that layout), and a file that declares
more data than it holds is refused before anything is allocated (peak memory of a subprocess measured)."""

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from hivit_mae_tools.conversion.safe_load import load_checkpoint
from hivit_mae_tools.conversion.types import CheckpointError

ROOT = Path(__file__).resolve().parents[1]


def rewrite_pickle(path: Path, edit):
    """Rewrite the `data.pkl` record of the `torch.save` archive `path` with `edit(bytes) -> bytes`, keeping every
    other record as it is."""
    with zipfile.ZipFile(path) as archive:
        records = [(info, archive.read(info.filename)) for info in archive.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for info, data in records:
            archive.writestr(info, edit(data) if info.filename.endswith("/data.pkl") else data)


def data_pickle(path: Path) -> bytes:
    with zipfile.ZipFile(path) as archive:
        return archive.read(next(name for name in archive.namelist() if name.endswith("/data.pkl")))


def original_layout(**args) -> dict:
    """A checkpoint as the original HiViT repository's `misc.save_model` writes it."""
    model = collections.OrderedDict(
        [("patch_embed.proj.weight", torch.randn(16, 3, 4, 4)), ("absolute_pos_embed", torch.randn(1, 196, 64))]
    )
    settings = dict(model="mae_hivit_base_dec512d6b", input_size=224, mask_ratio=0.75, norm_pix_loss=True)
    settings.update(blr=1.5e-4, betas=[0.9, 0.95], resume="", device="cuda", dist_on_itp=False, output_dir=None)
    settings.update(args)
    optimizer = {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 1e-4, "params": [0]}]}
    return dict(
        model=model, optimizer=optimizer, epoch=99, scaler={"scale": 65536.0}, args=argparse.Namespace(**settings)
    )


def test_original_layout_with_cuda_storages_loads_on_the_cpu(tmp_path):
    checkpoint = original_layout(nested={"a": [1, 2.0, None, (True, "x")]})
    path = tmp_path / "checkpoint-99.pth"
    torch.save(checkpoint, path)
    # Saved by rank 0 from GPU tensors: every storage is tagged cuda:0 (as in the released files).
    rewrite_pickle(path, lambda data: data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0"))
    assert b"cuda:0" in data_pickle(path) and b"X\x03\x00\x00\x00cpu" not in data_pickle(path)
    # torch's own weights-only loading refuses the file because of `args`.
    with pytest.raises(Exception, match="argparse.Namespace"):
        torch.load(path, map_location="cpu", weights_only=True)

    loaded = load_checkpoint(path)
    assert isinstance(loaded["args"], argparse.Namespace)
    assert vars(loaded["args"]) == vars(checkpoint["args"])
    assert isinstance(loaded["model"], collections.OrderedDict) and list(loaded["model"]) == list(checkpoint["model"])
    for key, value in checkpoint["model"].items():
        assert loaded["model"][key].device.type == "cpu" and torch.equal(loaded["model"][key], value)
    assert loaded["epoch"] == 99 and torch.equal(loaded["optimizer"]["state"][0]["step"], torch.tensor(3.0))


@pytest.mark.parametrize("name", ["mae_tiny.pth", "classifier_tiny.pth"])
def test_files_saved_by_the_original_code_load(name):
    """The fixtures made with the original repository's own scripts (storages on cuda:0, `args` a Namespace) load on
    this CPU with the values the zip records hold, read here byte for byte."""
    path = ROOT / "tests" / "fixtures" / "original_hivit" / name
    pickled = data_pickle(path)
    assert b"cuda:0" in pickled and b"argparse\nNamespace" in pickled
    loaded = load_checkpoint(path)
    assert set(loaded) == {"model", "optimizer", "epoch", "scaler", "args"}
    assert isinstance(loaded["args"], argparse.Namespace) and isinstance(loaded["args"].model, str)
    weight = loaded["model"]["patch_embed.proj.weight"]
    assert weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.is_contiguous()
    # Where the storage of this tensor lives in the archive, from the pickle's persistent id, read independently.
    with zipfile.ZipFile(path) as archive:
        records = {name.rsplit("/data/", 1)[-1]: archive.read(name) for name in archive.namelist() if "/data/" in name}
    raw = [torch.frombuffer(bytearray(data), dtype=torch.float32) for data in records.values() if len(data) % 4 == 0]
    assert any(
        value.numel() >= weight.numel() and torch.equal(value[: weight.numel()], weight.flatten()) for value in raw
    )


class _ArgsThatRunCode(argparse.Namespace):
    """An `args` object whose pickle calls a function: a plain unpickler would create the marker file."""

    def __init__(self, marker):
        super().__init__(model="mae_hivit_base_dec512d6b")
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_code_hidden_in_the_original_layout_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save(dict(original_layout(), args=_ArgsThatRunCode(marker)), path)
    with pytest.raises(CheckpointError, match=r"evil\.pth.*pickles `(posix|os)\.system`.*not unpickled"):
        load_checkpoint(path)
    assert not marker.exists()

    # A Namespace may hold plain values only: not a function, and not an object that is allowed elsewhere.
    torch.save(original_layout(hook=print), path)
    with pytest.raises(CheckpointError, match=r"pickles `(builtins\.)?print`.*not unpickled"):
        load_checkpoint(path)
    torch.save(original_layout(weights=torch.zeros(1)), path)
    with pytest.raises(CheckpointError, match=r"not unpickled.*argparse\.Namespace\.weights holds a Tensor"):
        load_checkpoint(path)


def test_the_same_file_without_the_claims_loads(tmp_path):
    """The control for the next test: the unmodified file loads, with the original values."""
    path = tmp_path / "small.pth"
    weights = {"w": torch.randn(1, 1000, 128)}
    torch.save(weights, path)
    assert torch.equal(load_checkpoint(path)["w"], weights["w"])


# Runs in a fresh process: loads each file, reports the error and how far the peak resident memory rose.
MEASURE = """
import json, resource, sys
sys.path.insert(0, {root!r})
from hivit_mae_tools.conversion.safe_load import load_checkpoint
from hivit_mae_tools.conversion.types import CheckpointError
results = {{}}
for path in sys.argv[1:]:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        load_checkpoint(path)
        error = None
    except CheckpointError as exc:
        error = str(exc)
    results[path] = (error, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
print(json.dumps(results))
"""


def test_declared_sizes_are_checked_before_allocating(tmp_path):
    """A 500 kB file whose tensor claims shape [1, 1e8, 128] (51 GB), one whose storage claims 51 GB, the same
    claim in PyTorch's legacy format, and a 2 MB zip holding a 2 GiB compressed record are refused at once, and
    loading them raises the peak memory by less than 100 MB."""
    small = tmp_path / "small.pth"
    torch.save({"w": torch.zeros(1, 1000, 128)}, small)
    pickled = data_pickle(small)
    shape, numel = b"K\x01M\xe8\x03K\x80\x87", b"J\x00\xf4\x01\x00"  # (1, 1000, 128) and 128000 as pickled
    assert pickled.count(shape) == 1 and pickled.count(numel) == 2  # the storage's size and the first stride

    big_shape = tmp_path / "big_shape.pth"
    big_shape.write_bytes(small.read_bytes())
    rewrite_pickle(
        big_shape, lambda data: data.replace(shape, b"K\x01J" + (10**8).to_bytes(4, "little") + b"K\x80\x87")
    )
    big_storage = tmp_path / "big_storage.pth"
    big_storage.write_bytes(small.read_bytes())
    # The storage's element count is the one followed by `t` (the end of the persistent id tuple).
    rewrite_pickle(
        big_storage, lambda data: data.replace(numel + b"t", b"\x8a\x05" + (128 * 10**8).to_bytes(5, "little") + b"t")
    )
    # PyTorch's pre-1.6 format (a bare pickle stream) allocates each storage before reading it.
    legacy = tmp_path / "legacy.pth"
    torch.save({"w": torch.zeros(1, 1000, 128)}, legacy, _use_new_zipfile_serialization=False)
    assert legacy.read_bytes().count(shape) == 1
    legacy.write_bytes(legacy.read_bytes().replace(shape, b"K\x01J" + (10**8).to_bytes(4, "little") + b"K\x80\x87"))
    bomb = tmp_path / "bomb.pth"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/version", "3\n", compress_type=zipfile.ZIP_STORED)
        with archive.open("archive/data.pkl", "w", force_zip64=True) as record:
            for _ in range(128):
                record.write(bytes(1 << 24))
    assert bomb.stat().st_size < 3 * 2**20

    files = [big_shape, big_storage, legacy, bomb]
    result = subprocess.run(
        [sys.executable, "-c", MEASURE.format(root=str(ROOT)), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(result.stdout)
    patterns = {
        big_shape: r"shape and strides reach 51,200,000,000 bytes into storage 0, which holds 512,000",
        big_storage: r"storage 0 claims 51,200,000,000 bytes but the file holds 512,000",
        legacy: r"not a PyTorch checkpoint .*a bare pickle, e\.g\. PyTorch's pre-1\.6 format",
        bomb: r"record archive/data\.pkl claims 2,147,483,648 bytes in a [0-9,]+-byte file",
    }
    for path, pattern in patterns.items():
        error, growth = results[str(path)]
        assert error is not None and path.name in error, error
        assert re.search(pattern, error), error
        assert growth < 100 * 2**20, f"{path.name}: peak memory rose by {growth / 2**20:.0f} MB"


def test_not_a_checkpoint(tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("these are my notes, not a checkpoint\n")
    with pytest.raises(CheckpointError, match=r"notes\.pth: not a PyTorch checkpoint"):
        load_checkpoint(text)
    with pytest.raises(CheckpointError, match=r"is a directory"):
        load_checkpoint(tmp_path)
