"""Reading checkpoint files without running pickled code: the one place where the converter opens a `.pth` or
`.safetensors` file.

`.pth` files go through torch's weights-only unpickler with `map_location="cpu"`; the few classes that training
checkpoints pickle besides tensors are read into inert stand-ins or allow-listed as plain data.
"""

import argparse
import collections.abc
import hashlib
import io
import pickle
import re
import zipfile
from pathlib import Path

import torch

from .types import CheckpointError


class _Opaque:
    """Inert stand-in for a class pickled into a training checkpoint (mmengine's `HistoryBuffer`, ...): it keeps the
    state it is given and runs no code of the original class."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state


# Classes that mmengine training checkpoints pickle outside the weights (in `message_hub` and `meta`). torch's
# weights-only unpickler maps them to the inert stand-in instead of importing (and running) mmengine.
_MMENGINE_GLOBALS = [
    "mmengine.logging.history_buffer.HistoryBuffer",
    "mmengine.logging.message_hub.MessageHub",
    "mmengine.config.config.ConfigDict",
    "mmengine.config.config.Config",
]


def _stand_in_getattr(obj, name: str):
    """Replaces `getattr` for the unpickler. Training checkpoints pickle methods of mmengine classes (the statistics
    methods of `HistoryBuffer`) as `getattr(HistoryBuffer, "mean")`; on a stand-in class this gives a placeholder
    string, on anything else it refuses, so the general attribute lookup that exploits need is never available."""
    if obj is _Opaque or isinstance(obj, _Opaque):
        return f"<{name} of a pickled mmengine object>"
    raise pickle.UnpicklingError(f"getattr({type(obj).__name__}, {name!r}) is not allowed")


def _numpy_globals() -> list:
    """numpy's pickle helpers, which mmengine's logs use for arrays and scalars; they build data, not code."""
    try:
        import numpy as np
    except ImportError:
        return []
    core = getattr(np, "_core", None) or np.core
    found = [core.multiarray._reconstruct, core.multiarray.scalar, np.ndarray, np.dtype]
    found += [type(np.dtype(name)) for name in ("float64", "float32", "int64", "int32", "bool")]
    # Checkpoints written with numpy 1.x name the module `numpy.core`, with numpy 2.x `numpy._core`.
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        found += [(core.multiarray._reconstruct, f"{module}._reconstruct")]
        found += [(core.multiarray.scalar, f"{module}.scalar")]
    return found


def _load_failure(error: Exception) -> str:
    """One line saying why `torch.load(weights_only=True)` failed."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    if match := re.search(r"unsupported (?:global: )?GLOBAL (\S+?)[ .]*(?:whose|was|$)", text, re.IGNORECASE | re.M):
        return f"it pickles `{match.group(1)}`, which could run code when loaded, so it was not unpickled"
    if match := re.search(r"WeightsUnpickler error:(.*?)(?:Check the documentation|$)", text, re.S):
        detail = " ".join(match.group(1).split()) or "unknown reason"
        return f"it pickles objects that could run code when loaded, so it was not unpickled ({detail})"
    if isinstance(error, pickle.UnpicklingError):  # raised by the stand-ins or torch's unpickler directly
        return f"it pickles objects that could run code when loaded, so it was not unpickled ({text})"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


class _PlainNamespace(argparse.Namespace):
    """Stand-in for `argparse.Namespace`, which the original HiViT repository pickles as its checkpoints' `args`: it
    takes a state of plain values only (str, int, float, bool, None and lists / tuples / dicts of them), so nothing
    else can hide in the same place."""

    def __setstate__(self, state):
        if not isinstance(state, dict) or not all(isinstance(key, str) for key in state):
            raise pickle.UnpicklingError(f"an argparse.Namespace with a {type(state).__name__} state")
        for name, value in state.items():
            if not _is_plain(value):
                raise pickle.UnpicklingError(f"argparse.Namespace.{name} holds a {type(value).__name__}")
        self.__dict__.update(state)


def _is_plain(value) -> bool:
    if value is None or isinstance(value, (str, int, float, bool)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_plain(item) for item in value)
    if isinstance(value, dict):
        return all(isinstance(key, (str, int)) and _is_plain(item) for key, item in value.items())
    return False


def _safe_globals() -> list:
    """What the weights-only unpickler may build besides tensors, state dicts and plain containers (which torch
    allows itself: `collections.OrderedDict`, `torch._utils._rebuild_tensor_v2`, `torch.FloatStorage`, ...)."""
    safe = [(_Opaque, name) for name in _MMENGINE_GLOBALS] + _numpy_globals()
    safe += [(_stand_in_getattr, "__builtin__.getattr"), (_stand_in_getattr, "builtins.getattr")]
    return safe + [(_PlainNamespace, "argparse.Namespace")]


def _check_sizes(path: Path):
    """Refuse, before anything is allocated, a `torch.save` archive that declares more data than it holds.

    Every record's size must fit in the file, and every record must be stored uncompressed (as `torch.save` writes
    them), so reading one cannot inflate it. Then the pickle is run with storages on the meta device (nothing
    allocated, but the same restricted unpickler): each storage it declares must fit in its record, and each tensor's
    shape and strides must fit in its storage (rebuilding the tensor would grow it).
    """
    from torch import _weights_only_unpickler

    file_size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
            for record in records:
                if record.file_size > file_size:
                    raise CheckpointError(
                        f"{path}: its record {record.filename} claims {record.file_size:,} bytes in a "
                        f"{file_size:,}-byte file, so it was not read"
                    )
                if record.compress_type != zipfile.ZIP_STORED:
                    raise CheckpointError(
                        f"{path}: its record {record.filename} is compressed, which torch.save never does, so it "
                        "was not read"
                    )
            pickles = [record.filename for record in records if record.filename.endswith("/data.pkl")]
            if not pickles:
                raise CheckpointError(f"{path}: a zip archive without data.pkl, so not a PyTorch checkpoint")
            prefix = pickles[0][: -len("data.pkl")]
            sizes = {record.filename: record.file_size for record in records}
            data = archive.read(pickles[0])
    except zipfile.BadZipFile as error:
        raise CheckpointError(f"{path}: a damaged zip archive ({error})") from None

    def persistent_load(saved_id):
        _, storage_type, key, _, numel = saved_id
        dtype = torch.uint8 if storage_type is torch.UntypedStorage else storage_type.dtype
        nbytes = numel * torch._utils._element_size(dtype)
        held = sizes.get(f"{prefix}data/{key}")
        if held is None or nbytes > held:
            raise CheckpointError(
                f"{path}: tensor storage {key} claims {nbytes:,} bytes but the file holds "
                f"{'none' if held is None else f'{held:,}'} for it, so it was not read"
            )
        storage = torch.UntypedStorage(nbytes, device="meta")
        declared.append((key, storage, nbytes))
        return torch.storage.TypedStorage(wrap_storage=storage, dtype=dtype, _internal=True)

    declared = []
    unpickler = _weights_only_unpickler.Unpickler(io.BytesIO(data), encoding="utf-8")
    unpickler.persistent_load = persistent_load
    with torch.serialization.safe_globals(_safe_globals()):
        unpickler.load()
    # Rebuilding a tensor whose shape and strides reach past its storage grows the storage (on meta: no memory).
    for key, storage, nbytes in declared:
        if storage.nbytes() != nbytes:
            raise CheckpointError(
                f"{path}: a tensor's shape and strides reach {storage.nbytes():,} bytes into storage {key}, which "
                f"holds {nbytes:,}, so it was not read"
            )


def check_checkpoint_file(path) -> Path:
    """`path` as a `Path` if it names an existing file; else `CheckpointError` saying what it is instead."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    return path


def load_checkpoint(path) -> dict:
    """Read a `.pth` / `.safetensors` checkpoint into a dict without executing any pickled code, on the CPU.

    `.pth` files go through torch's weights-only unpickler with `map_location="cpu"` (storages saved on a GPU load
    on a machine without one); the mmengine classes of training checkpoints are read into inert stand-ins, numpy
    arrays as arrays, `argparse.Namespace` (the original HiViT repository's `args`) only with plain values. Anything
    else that would need code raises `CheckpointError`, as does a file that declares more data than it holds
    (checked before anything is allocated; storages are then memory-mapped from the file).
    """
    path = check_checkpoint_file(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as error:
            raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from None
    try:
        with open(path, "rb") as file:
            head = file.read(4)
    except OSError as error:
        raise CheckpointError(f"{path}: cannot be read ({error.strerror})") from None
    if head != b"PK\x03\x04":
        # torch.save has written zip archives since PyTorch 1.6 (2020); the older format declares its storage sizes
        # in a stream that cannot be checked before reading.
        legacy = head[:1] == b"\x80"
        raise CheckpointError(
            f"{path}: not a PyTorch checkpoint (torch.save writes a zip archive; this file is "
            + (
                "a bare pickle, e.g. PyTorch's pre-1.6 format: re-save it with torch.save in a newer PyTorch)"
                if legacy
                else "not one)"
            )
        )
    try:
        _check_sizes(path)
        with torch.serialization.safe_globals(_safe_globals()):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except CheckpointError:
        raise
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for bad files
        raise CheckpointError(f"{path}: cannot be read as a PyTorch checkpoint; {_load_failure(error)}") from None
    if not isinstance(checkpoint, collections.abc.Mapping):
        raise CheckpointError(f"{path}: holds a {type(checkpoint).__name__}, not a checkpoint dict")
    return dict(checkpoint)


def sha256sum(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
