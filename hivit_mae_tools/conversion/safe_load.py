"""Reading checkpoint files without running pickled code: the one place where the converter opens a `.pth` or
`.safetensors` file.

`.pth` files go through torch's weights-only unpickler with `map_location="cpu"`; the few classes that training
checkpoints pickle besides tensors are read into inert stand-ins or allow-listed as plain data.
"""

import collections.abc
import hashlib
import pickle
import re
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
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def load_checkpoint(path) -> dict:
    """Read a `.pth` / `.safetensors` checkpoint into a dict without executing any pickled code.

    `.pth` files go through torch's weights-only unpickler; the mmengine classes of training checkpoints are read into
    inert stand-ins, numpy arrays as arrays. Anything else that would need code raises `CheckpointError`.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as error:
            raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from None
    safe = [(_Opaque, name) for name in _MMENGINE_GLOBALS] + _numpy_globals()
    safe += [(_stand_in_getattr, "__builtin__.getattr"), (_stand_in_getattr, "builtins.getattr")]
    try:
        with torch.serialization.safe_globals(safe):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
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
