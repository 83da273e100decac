"""Convert mmpretrain (mmengine) MAE-HiViT checkpoints into `from_pretrained` folders.

    python convert_checkpoint.py --checkpoint mae_hivit-base.pth --output_dir hivit-mae-base

The importable pieces: `load_checkpoint` reads a checkpoint without executing pickled code (and without mmengine),
`infer_config` reads the architecture off the weights, `convert_state_dict` maps mmpretrain's keys to this model's.
"""

import argparse
import collections
import math
import re
import sys
from pathlib import Path

import torch

from configuration_hivit_mae import HIVIT_ARCHS, HiViTMAEConfig


class CheckpointError(ValueError):
    """A checkpoint that cannot be converted; the message says why."""


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
    try:
        with torch.serialization.safe_globals(safe):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for bad files
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if "Unsupported global" in str(error) or "weights_only" in str(error):
            reason = "it pickles objects that could run code when loaded: " + reason
        raise CheckpointError(f"{path}: cannot be read as a PyTorch checkpoint; {reason}") from None
    if not isinstance(checkpoint, collections.abc.Mapping):
        raise CheckpointError(f"{path}: holds a {type(checkpoint).__name__}, not a checkpoint dict")
    return dict(checkpoint)


def extract_state_dict(checkpoint: dict) -> dict:
    """The model weights of a loaded checkpoint: its `state_dict` (or `model`) entry, or the dict itself."""
    for key in ("state_dict", "model"):
        if key in checkpoint and isinstance(checkpoint[key], collections.abc.Mapping):
            checkpoint = checkpoint[key]
            break
    weights = {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}
    if not weights:
        raise CheckpointError("the checkpoint holds no tensors")
    return weights


def _strip_prefixes(state_dict: dict) -> dict:
    """Encoder keys under `backbone.` (mmpretrain's full MAE) or bare (an exported backbone)."""
    if any(key.startswith("backbone.") for key in state_dict):
        return state_dict
    return {("backbone." + k if not k.startswith(("neck.", "head.")) else k): v for k, v in state_dict.items()}


def infer_config(state_dict: dict, **overrides) -> HiViTMAEConfig:
    """Read the HiViT-MAE architecture off mmpretrain weights. Head counts are not stored in weights: they default
    to mmpretrain's (64-wide encoder heads, 16 decoder heads) unless a relative position table shows them;
    `overrides` set any config field."""
    state_dict = _strip_prefixes(state_dict)
    if "backbone.patch_embed.proj.weight" not in state_dict or not any(
        re.match(r"backbone\.blocks\.\d+\.", k) for k in state_dict
    ):
        hint = " (it looks like a plain ViT / MAE-ViT)" if "backbone.cls_token" in state_dict else ""
        raise CheckpointError(f"this is not a HiViT checkpoint{hint}: no `patch_embed.proj` and `blocks.N` weights")
    stem_width = state_dict["backbone.patch_embed.proj.weight"].shape[0]
    kernel = state_dict["backbone.patch_embed.proj.weight"].shape[-1]
    num_channels = state_dict["backbone.patch_embed.proj.weight"].shape[1]

    # Walk `blocks`: stem MLP blocks, patch merges (they have `reduction`), then main blocks (they have `attn`).
    indices = sorted({int(m.group(1)) for k in state_dict if (m := re.match(r"backbone\.blocks\.(\d+)\.", k))})
    depths, count = [], 0
    for index in indices:
        prefix = f"backbone.blocks.{index}."
        if prefix + "reduction.weight" in state_dict:
            if count % 2:
                raise CheckpointError(f"stem stage {len(depths)} has an odd number ({count}) of MLP blocks")
            depths.append(count // 2)
            count = 0
        else:
            count += 1
    depths.append(count)
    hidden_size = stem_width * 2 ** (len(depths) - 1)
    first_main = f"backbone.blocks.{indices[-1] - depths[-1] + 1}."
    if first_main + "attn.qkv.weight" not in state_dict:
        raise CheckpointError("the last stage has no attention weights: not a HiViT checkpoint")

    config = dict(
        hidden_size=hidden_size,
        depths=depths,
        num_attention_heads=max(1, hidden_size // 64),
        num_channels=num_channels,
        inner_patches=2 ** (len(depths) - 1),
        patch_size=kernel * 2 ** (len(depths) - 1),
        qkv_bias=first_main + "attn.qkv.bias" in state_dict,
        mlp_ratio=state_dict[first_main + "mlp.fc1.weight"].shape[0] / hidden_size,
        use_absolute_position_embeddings="backbone.pos_embed" in state_dict,
        use_relative_position_bias=first_main + "attn.relative_position_bias_table" in state_dict,
    )
    if len(depths) > 1:
        config["stem_mlp_ratio"] = state_dict["backbone.blocks.0.mlp.fc1.weight"].shape[0] / stem_width
    if first_main + "gamma_2" in state_dict:
        # Only the initial value is lost; it matters for training from scratch alone.
        config["layer_scale_init_value"] = 1e-5
    if "backbone.pos_embed" in state_dict:
        config["image_size"] = math.isqrt(state_dict["backbone.pos_embed"].shape[1]) * config["patch_size"]
    if config["use_relative_position_bias"]:
        table = state_dict[first_main + "attn.relative_position_bias_table"]
        config["num_attention_heads"] = table.shape[1]
        config["image_size"] = (math.isqrt(table.shape[0]) + 1) // 2 * config["patch_size"]
    if "neck.decoder_embed.weight" in state_dict:
        width = state_dict["neck.decoder_embed.weight"].shape[0]
        decoder_layers = {int(m.group(1)) for k in state_dict if (m := re.match(r"neck\.decoder_blocks\.(\d+)\.", k))}
        config.update(
            decoder_hidden_size=width,
            decoder_num_hidden_layers=len(decoder_layers),
            decoder_num_attention_heads=16 if width % 16 == 0 else max(1, width // 32),
        )
        if decoder_layers:
            config["decoder_mlp_ratio"] = state_dict["neck.decoder_blocks.0.ffn.layers.0.0.weight"].shape[0] / width
    for arch, settings in HIVIT_ARCHS.items():
        if settings["hidden_size"] == hidden_size and settings["depths"] == depths:
            config["num_attention_heads"] = settings["num_attention_heads"]
            config.setdefault("name_or_path", f"hivit-mae-{arch}")
    config.pop("name_or_path", None)
    config.update(overrides)
    return HiViTMAEConfig(**config)


_MAIN_KEYS = {
    "norm1": "norm1",
    "attn.qkv": "attention.qkv",
    "attn.proj": "attention.proj",
    "attn.relative_position_bias_table": "attention.relative_position_bias_table",
    "norm2": "norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "gamma_1": "layer_scale1.lambda1",
    "gamma_2": "layer_scale2.lambda1",
}
_MERGE_KEYS = {"norm": "layernorm", "reduction": "reduction"}
_DECODER_LAYER_KEYS = {
    "ln1": "norm1",
    "attn.qkv": "attention.qkv",
    "attn.proj": "attention.proj",
    "ln2": "norm2",
    "ffn.layers.0.0": "mlp.fc1",
    "ffn.layers.1": "mlp.fc2",
}
_FIXED_KEYS = {
    "backbone.patch_embed.proj": "hivit.patch_embeddings.projection",
    "backbone.patch_embed.norm": "hivit.patch_embeddings.layernorm",
    "backbone.pos_embed": "hivit.position_embeddings",
    "neck.decoder_embed": "decoder.decoder_embed",
    "neck.mask_token": "decoder.mask_token",
    "neck.decoder_pos_embed": "decoder.decoder_pos_embed",
    "neck.ln1": "decoder.decoder_norm",
    "neck.decoder_pred": "decoder.decoder_pred",
}


def _rename(key: str, table: dict, new_prefix: str):
    """`key` is `<module path>[.weight|.bias]`; map its module path through `table`."""
    for old, new in table.items():
        if key == old or key.startswith(old + "."):
            return new_prefix + new + key[len(old) :]
    return None


def _block_targets(config: HiViTMAEConfig) -> list:
    """For each index of mmpretrain's flat `backbone.blocks`, the (renaming table, our module prefix)."""
    targets = []
    for stage, depth in enumerate(config.depths[:-1]):
        targets += [(_MAIN_KEYS, f"hivit.stem.{stage}.blocks.{j}.") for j in range(2 * depth)]
        targets.append((_MERGE_KEYS, f"hivit.stem.{stage}.merge."))
    targets += [(_MAIN_KEYS, f"hivit.encoder.layers.{j}.") for j in range(config.depths[-1])]
    return targets


def convert_state_dict(state_dict: dict, config: HiViTMAEConfig) -> tuple[dict, list]:
    """Map mmpretrain MAE-HiViT weights to `HiViTMAEForPreTraining` keys.

    Returns the converted weights and the source keys that map nowhere. Relative position indices (buffers that
    mmpretrain stores) are checked against the ones this model computes and dropped.
    """
    from modeling_hivit_mae import relative_position_index

    state_dict = _strip_prefixes(state_dict)
    blocks = _block_targets(config)
    grid = config.image_size // config.patch_size
    converted, unused = {}, []
    for key, value in state_dict.items():
        new_key = _rename(key, _FIXED_KEYS, "")
        if (match := re.match(r"backbone\.blocks\.(\d+)\.(.+)", key)) and int(match.group(1)) < len(blocks):
            table, prefix = blocks[int(match.group(1))]
            new_key = _rename(match.group(2), table, prefix)
        elif match := re.match(r"neck\.decoder_blocks\.(\d+)\.(.+)", key):
            new_key = _rename(match.group(2), _DECODER_LAYER_KEYS, f"decoder.decoder_layers.{match.group(1)}.")
        if key.endswith("relative_position_index"):
            if not torch.equal(value, relative_position_index(grid, grid)):
                raise CheckpointError(f"{key} does not match a {grid}x{grid} relative position index")
            continue
        if new_key is None:
            unused.append(key)
        else:
            converted[new_key] = value
    return converted, unused


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="mmpretrain .pth (or .safetensors) checkpoint")
    parser.add_argument("--output_dir", required=True, help="folder to write; loads with from_pretrained")
    args = parser.parse_args(argv)
    from modeling_hivit_mae import HiViTMAEForPreTraining

    try:
        state_dict = extract_state_dict(load_checkpoint(args.checkpoint))
        config = infer_config(state_dict)
        converted, unused = convert_state_dict(state_dict, config)
    except CheckpointError as error:
        sys.exit(f"error: {error}")
    if unused:
        sys.exit(f"error: {len(unused)} checkpoint keys map nowhere: {', '.join(unused[:10])}")
    model = HiViTMAEForPreTraining(config)
    model.load_state_dict(converted, strict=False)
    model.save_pretrained(args.output_dir)


if __name__ == "__main__":
    main()
