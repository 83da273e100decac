"""Convert mmpretrain (mmengine) MAE-HiViT checkpoints into Hugging Face `from_pretrained` folders.

    python convert_checkpoint.py --checkpoint mae_hivit-base.pth --output_dir hivit-mae-base

Reads mmengine training checkpoints, published mmpretrain checkpoints, bare state dicts and `.safetensors` files,
for the whole MAE (encoder + decoder) or the encoder alone, without executing pickled code and without mmengine. It
infers the architecture from the weights, writes `model.safetensors`, `config.json` (with `auto_map`), the model code,
`preprocessor_config.json` and a model card, and verifies the written folder before moving it into place.

The importable pieces: `load_checkpoint` reads a checkpoint safely, `infer_config` reads the architecture off the
weights, `convert_state_dict` maps mmpretrain's keys to this model's and `convert` runs the whole conversion.
"""

import argparse
import collections.abc
import hashlib
import json
import math
import os
import pickle
import re
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

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


def infer_config(state_dict: dict, arch: Optional[str] = None, **overrides) -> HiViTMAEConfig:
    """Read the HiViT-MAE architecture off mmpretrain weights.

    Head counts are not stored in weights: they are mmpretrain's for its four sizes, otherwise 64-wide encoder heads
    and 16 decoder heads, unless a relative position table shows them. `arch` (`"tiny"`, `"small"`, `"base"`,
    `"large"`) imposes one of mmpretrain's sizes and `overrides` set any config field; weights that then do not fit
    are reported by `check_weights`. Raises `CheckpointError` for weights that are not HiViT's.
    """
    try:
        return _infer_config(_strip_prefixes(state_dict), arch, overrides)
    except KeyError as error:
        raise CheckpointError(f"the checkpoint lacks {error.args[0]}, which a HiViT checkpoint has") from None


def _infer_config(state_dict: dict, arch: Optional[str], overrides: dict) -> HiViTMAEConfig:
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
    if "head.fc.weight" in state_dict:
        if state_dict["head.fc.weight"].shape[1] != hidden_size:
            raise CheckpointError(
                f"head.fc takes {state_dict['head.fc.weight'].shape[1]} features but the encoder gives {hidden_size}"
            )
        config["num_labels"] = state_dict["head.fc.weight"].shape[0]
        # mmpretrain's `HiViT` (its classifiers' backbone) builds its LayerNorms with eps 1e-5, `MAEHiViT` with 1e-6.
        config["layer_norm_eps"] = 1e-5
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
    for settings in HIVIT_ARCHS.values():
        if settings["hidden_size"] == hidden_size and settings["depths"] == depths:
            config["num_attention_heads"] = settings["num_attention_heads"]
    if arch is not None:
        if arch not in HIVIT_ARCHS:
            raise CheckpointError(f"unknown arch {arch!r}; choose one of {', '.join(HIVIT_ARCHS)}")
        config.update(HIVIT_ARCHS[arch], inner_patches=2 ** (len(HIVIT_ARCHS[arch]["depths"]) - 1))
        config["patch_size"] = kernel * config["inner_patches"]
    config.update({key: value for key, value in overrides.items() if value is not None})
    try:
        return HiViTMAEConfig(**config)
    except ValueError as error:
        raise CheckpointError(str(error)) from None


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
    "head.fc": "classifier",
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
    """Map mmpretrain MAE-HiViT (or HiViT classifier) weights to `HiViTMAEForPreTraining`
    (`HiViTMAEForImageClassification`) keys.

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


def checkpoint_kind(state_dict: dict) -> str:
    """What mmpretrain weights hold: `"pretraining"` (a whole MAE: `neck.` decoder weights), `"classification"` (an
    `ImageClassifier` with a `LinearClsHead`: `head.fc` weights) or `"encoder"` (the backbone alone)."""
    has_decoder = any(key.startswith("neck.") for key in state_dict)
    has_classifier = any(key.startswith("head.fc.") for key in state_dict)
    if has_decoder and has_classifier:
        raise CheckpointError("the checkpoint holds both an MAE decoder (neck.) and a classification head (head.fc)")
    return "pretraining" if has_decoder else "classification" if has_classifier else "encoder"


def check_weights(converted: dict, model: torch.nn.Module):
    """Raise `CheckpointError` unless `converted` holds every weight of `model`, each with the model's shape: no
    target weight may be left at its random initialisation."""
    expected = model.state_dict()
    wrong = [
        f"{key} {tuple(value.shape)} (model: {tuple(expected[key].shape)})"
        for key, value in converted.items()
        if key in expected and value.shape != expected[key].shape
    ]
    if wrong:
        more = f" and {len(wrong) - 3} more" if len(wrong) > 3 else ""
        raise CheckpointError(
            f"{len(wrong)} weights have the wrong shape for the inferred/overridden config: "
            f"{'; '.join(wrong[:3])}{more}"
        )
    missing = sorted(set(expected) - set(converted))
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(
            f"the checkpoint lacks {len(missing)} weights the model needs: {', '.join(missing[:5])}{more}"
        )


def _model_class(kind: str):
    import modeling_hivit_mae

    names = {
        "pretraining": "HiViTMAEForPreTraining",
        "encoder": "HiViTMAEModel",
        "classification": "HiViTMAEForImageClassification",
    }
    return getattr(modeling_hivit_mae, names[kind])


def _for_model(converted: dict, kind: str) -> dict:
    """`convert_state_dict`'s keys as the model of `kind` names them (the bare encoder has no `hivit.` prefix)."""
    if kind == "encoder":
        return {key.removeprefix("hivit."): value for key, value in converted.items()}
    return converted


def build_model(config: HiViTMAEConfig, converted: dict, kind: str) -> torch.nn.Module:
    """The model for a `checkpoint_kind` (`HiViTMAEForPreTraining`, `HiViTMAEModel` or
    `HiViTMAEForImageClassification`) holding exactly the `converted` weights (keys as `convert_state_dict` names
    them)."""
    converted = _for_model(converted, kind)
    model = _model_class(kind)(config)
    check_weights(converted, model)
    model.load_state_dict(converted, strict=True)
    return model.eval()


def _random_inputs(config: HiViTMAEConfig, batch_size: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    size = config.image_size
    images = torch.randn(batch_size, config.num_channels, size, size, generator=generator)
    noise = torch.rand(batch_size, config.num_patches, generator=generator)
    return images, noise


def verify_folder(folder: Path, expected: dict, config: HiViTMAEConfig, kind: str, dtype: torch.dtype) -> int:
    """Reload `folder` and check every tensor bit for bit against `expected` (the converted source weights cast to
    `dtype`) and that a forward pass is finite. Returns the number of tensors checked."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _model_class(kind).from_pretrained(folder, dtype=dtype)
    expected = _for_model(expected, kind)
    reloaded = model.state_dict()
    if set(reloaded) != set(expected):
        diff = sorted(set(reloaded) ^ set(expected))
        raise CheckpointError(f"the written folder reloads with other weights than converted: {', '.join(diff[:5])}")
    for key, value in expected.items():
        value = value.to(dtype)
        if reloaded[key].dtype != value.dtype or not torch.equal(reloaded[key], value):
            raise CheckpointError(f"the written folder's {key} differs from the source checkpoint's")
    images, noise = _random_inputs(config, 1, seed=0)
    with torch.no_grad():
        if kind == "classification":
            outputs = model.float()(images)
        else:
            outputs = model.float()(images, mask=True, noise=noise)
    for name, value in outputs.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise CheckpointError(f"a forward pass of the converted model gives non-finite {name}")
    return len(expected)


def mmpretrain_config(config: HiViTMAEConfig, kind: str = "pretraining") -> dict:
    """mmpretrain config dict of the model that `config` describes: the MAE-HiViT (`kind="pretraining"`), its
    `MAEHiViT` backbone alone (`"encoder"`) or a HiViT `ImageClassifier` (`"classification"`)."""
    unsupported = {
        "num_channels": 3,
        "stem_mlp_ratio": 3.0,
        "mlp_ratio": 4.0,
        "qkv_bias": True,
        "hidden_act": "gelu",
        "decoder_first_token_as_cls": True,
        "legacy_position_encoding": True,
    }
    for name, value in unsupported.items():
        if getattr(config, name) != value:
            raise CheckpointError(
                "--verify-against-mmpretrain: mmpretrain's MAEHiViT cannot be built with "
                f"{name}={getattr(config, name)}"
            )
    norm = dict(type="LN", eps=config.layer_norm_eps)
    backbone = dict(
        type="HiViT" if kind == "classification" else "MAEHiViT",
        arch=dict(embed_dims=config.hidden_size, depths=list(config.depths), num_heads=config.num_attention_heads),
        img_size=config.image_size,
        patch_size=config.patch_size,
        inner_patches=config.inner_patches,
        out_indices=[config.depths[-1] - 1],
        norm_cfg=norm,
        ape=config.use_absolute_position_embeddings,
        rpe=config.use_relative_position_bias,
        layer_scale_init_value=config.layer_scale_init_value,
    )
    if kind == "encoder":
        return dict(backbone, mask_ratio=config.mask_ratio)
    if kind == "classification":
        return dict(
            type="ImageClassifier",
            backbone=backbone,
            neck=dict(type="GlobalAveragePooling"),
            head=dict(type="LinearClsHead", num_classes=config.num_labels, in_channels=config.hidden_size),
        )
    return dict(
        type="MAE",
        backbone=dict(backbone, mask_ratio=config.mask_ratio),
        neck=dict(
            type="MAEPretrainDecoder",
            num_patches=config.num_patches,
            patch_size=config.patch_size,
            in_chans=config.num_channels,
            embed_dim=config.hidden_size,
            decoder_embed_dim=config.decoder_hidden_size,
            decoder_depth=config.decoder_num_hidden_layers,
            decoder_num_heads=config.decoder_num_attention_heads,
            mlp_ratio=config.decoder_mlp_ratio,
            norm_cfg=norm,
        ),
        head=dict(
            type="MAEPretrainHead",
            norm_pix=config.norm_pix_loss,
            patch_size=config.patch_size,
            loss=dict(type="PixelReconstructionLoss", criterion="L2"),
        ),
    )


def verify_against_mmpretrain(state_dict: dict, model: torch.nn.Module, config: HiViTMAEConfig, kind: str) -> dict:
    """Build mmpretrain's model from the same source weights, run it and `model` (float32) on the same random images
    with the same mask, and return the largest absolute differences by output; raises `CheckpointError` above 1e-4.

    Compares the masked encoder features and, for a full MAE, the decoder's pixel predictions and the loss; the
    unmasked features too where mmpretrain's `HiViT.out_indices` bookkeeping allows (all four mmpretrain sizes). A
    classifier is compared on its unmasked features and its logits.
    """
    from modeling_hivit_mae import random_masking

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from mmengine.logging import MMLogger
            from mmpretrain.registry import MODELS
            from mmpretrain.utils import register_all_modules

            register_all_modules()
            MMLogger.get_current_instance().setLevel("ERROR")
    except ImportError as error:
        raise CheckpointError(f"--verify-against-mmpretrain needs mmpretrain installed ({error})") from None
    # mmpretrain's `HiViT.out_indices` counts the stem's blocks too: its unmasked forward only works when the last
    # main block's index lies past them.
    num_stem_blocks = 2 * sum(config.depths[:-1]) + len(config.depths) - 1
    unmasked_runs = config.depths[-1] - 1 >= num_stem_blocks
    if kind == "classification" and not unmasked_runs:
        raise CheckpointError(
            f"--verify-against-mmpretrain: mmpretrain's HiViT cannot run depths {config.depths} unmasked (its "
            f"out_indices needs more than {num_stem_blocks} main blocks)"
        )
    source = _strip_prefixes(state_dict)
    if kind == "encoder":
        source = {key.removeprefix("backbone."): value for key, value in source.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = MODELS.build(mmpretrain_config(config, kind))
    reference.eval()  # not chained: mmpretrain's `HiViT.train` returns None
    missing, _ = reference.load_state_dict(source, strict=False)
    missing = [key for key in missing if not key.endswith("relative_position_index")]
    if missing:
        raise CheckpointError(f"mmpretrain's model needs weights the checkpoint lacks: {', '.join(missing[:5])}")
    backbone = reference if kind == "encoder" else reference.backbone

    images, noise = _random_inputs(config, 2, seed=0)

    def masking_id(batch_size, mask_ratio):
        return random_masking(noise, int(noise.shape[1] * (1 - mask_ratio)))

    ours = model.float().eval()
    encoder = ours if kind == "encoder" else ours.hivit
    diffs = {}
    with torch.no_grad():
        if kind != "classification":
            backbone.masking_id = masking_id
            latent, mask, ids_restore = backbone(images)
            features = encoder(images, mask=True, noise=noise)
            diffs["masked encoder features"] = (latent - features.last_hidden_state).abs().max().item()
        if kind == "pretraining":
            pred = reference.neck(latent, ids_restore)
            loss = reference.head.loss(pred, images, mask)
            outputs = ours(images, mask=True, noise=noise)
            diffs["decoder pixel predictions"] = (pred - outputs.logits).abs().max().item()
            diffs["loss"] = (loss - outputs.loss).abs().item()
        if unmasked_runs:
            unmasked = backbone(images, mask=None) if kind != "classification" else backbone(images)
            unmasked = unmasked[-1].flatten(2).transpose(1, 2)
            features = encoder(images, mask=None).last_hidden_state
            diffs["unmasked encoder features"] = (unmasked - features).abs().max().item()
        if kind == "classification":
            logits = reference(images, mode="tensor")
            diffs["classification logits"] = (logits - ours(images).logits).abs().max().item()
    worst = max(diffs, key=diffs.get)
    if not diffs[worst] <= PARITY_TOLERANCE:
        raise CheckpointError(
            f"outputs differ from mmpretrain's: max abs diff of the {worst} is {diffs[worst]:.3g} > {PARITY_TOLERANCE}"
        )
    return diffs


PARITY_TOLERANCE = 1e-4

# mmpretrain's HiViT evaluation pipeline (configs/_base_/datasets/imagenet_bs64_hivit_224.py): ResizeEdge(256, short
# edge, pillow, bicubic), CenterCrop(224), then the data preprocessor's RGB mean / std on the 0-255 scale.
IMAGENET_MEAN = [123.675 / 255, 116.28 / 255, 103.53 / 255]
IMAGENET_STD = [58.395 / 255, 57.12 / 255, 57.375 / 255]
CROP_RATIO = 224 / 256


def preprocessor_config(image_size: int) -> dict:
    """`BitImageProcessor` settings reproducing mmpretrain's HiViT evaluation preprocessing at `image_size` (also
    what `run_pretraining.py` saves beside its weights)."""
    return {
        "image_processor_type": "BitImageProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"shortest_edge": round(image_size / CROP_RATIO)},
        "resample": 3,  # PIL.Image.BICUBIC
        "do_center_crop": True,
        "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": IMAGENET_MEAN,
        "image_std": IMAGENET_STD,
    }


def sha256sum(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _known_dataset(checkpoint: dict) -> Optional[str]:
    """`"imagenet-1k"` when the training config stored in an mmengine checkpoint's `meta` uses ImageNet."""
    meta = checkpoint.get("meta")
    text = meta.get("cfg") if isinstance(meta, collections.abc.Mapping) else None
    if isinstance(text, str) and re.search(r"""type\s*=\s*['"]ImageNet['"]""", text):
        return "imagenet-1k"
    return None


def read_labels(checkpoint: dict, labels_file: Optional[Path], num_labels: int) -> Optional[list]:
    """Class names of a classifier: one per line of `labels_file`, else the `dataset_meta` classes that mmengine
    stores in a training checkpoint's `meta`, else None. Raises `CheckpointError` when their count is not the
    head's."""
    if labels_file is not None:
        try:
            names = [line.strip() for line in Path(labels_file).read_text().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as error:
            raise CheckpointError(f"--labels {labels_file}: cannot be read ({error})") from None
        source = f"--labels {labels_file}"
    else:
        meta = checkpoint.get("meta")
        dataset_meta = meta.get("dataset_meta") if isinstance(meta, collections.abc.Mapping) else None
        names = dataset_meta.get("classes") if isinstance(dataset_meta, collections.abc.Mapping) else None
        if not isinstance(names, (list, tuple)) or not all(isinstance(name, str) for name in names):
            return None
        source = "the checkpoint's meta.dataset_meta.classes"
    if len(names) != num_labels:
        raise CheckpointError(f"{source} names {len(names)} classes but the classification head has {num_labels}")
    return list(names)


@dataclass
class ConversionReport:
    """What `convert` did; it also feeds the model card."""

    source: Path
    sha256: str
    output_dir: Path
    config: HiViTMAEConfig
    kind: str
    dtype: str
    num_parameters: int
    num_tensors_checked: int = 0
    unused_keys: list = field(default_factory=list)
    unused_reason: Optional[str] = None
    parity: Optional[dict] = None
    dataset: Optional[str] = None
    model_id: Optional[str] = None


PAPER = '"HiViT: A Simple and More Efficient Design of Hierarchical Vision Transformer", ICLR 2023'


def model_card(report: ConversionReport) -> str:
    """README.md of a converted folder: Hub metadata, description, a usage snippet that runs as written, provenance
    and the verification figures."""
    from huggingface_hub import ModelCard, ModelCardData

    config = report.config
    arch = next(
        (
            name
            for name, settings in HIVIT_ARCHS.items()
            if settings["hidden_size"] == config.hidden_size and settings["depths"] == config.depths
        ),
        "custom",
    )
    classifier = report.kind == "classification"
    data = ModelCardData(
        license="apache-2.0",
        library_name="transformers",
        pipeline_tag="image-classification" if classifier else "image-feature-extraction",
        tags=["vision", "hivit", "mmpretrain"]
        + (["image-classification"] if classifier else ["mae", "self-supervised", "masked-image-modeling"]),
        datasets=[report.dataset] if report.dataset else None,
    )
    model_id = report.model_id or str(report.output_dir)
    grid = config.image_size // config.patch_size
    if classifier:
        title = f"HiViT-{arch} image classifier"
        summary = (
            f"A HiViT ({PAPER}) image classifier over {config.num_labels} classes, converted from an "
            "[mmpretrain](https://github.com/open-mmlab/mmpretrain) `ImageClassifier` checkpoint (HiViT backbone, "
            "global average pooling, linear head)."
        )
        contents = (
            "Load it with `HiViTMAEForImageClassification` / `AutoModelForImageClassification`; `AutoModel` / "
            "`HiViTMAEModel` loads its encoder alone."
        )
        usage_class = "AutoModelForImageClassification"
        usage = (
            "    logits = model(**inputs).logits  # (batch_size, num_labels)\n"
            "print(model.config.id2label[logits.argmax(-1).item()])"
        )
    else:
        title = f"HiViT-{arch} MAE ({'encoder' if report.kind == 'encoder' else 'encoder + decoder'})"
        summary = (
            f"A HiViT ({PAPER}) image encoder pre-trained with masked autoencoding (MAE), converted from an "
            "[mmpretrain](https://github.com/open-mmlab/mmpretrain) checkpoint. The model was not fine-tuned: use "
            "its features, or fine-tune it on a downstream task."
        )
        if report.kind == "encoder":
            contents = (
                "This folder holds the **encoder only** (the source checkpoint has no decoder weights). Load it "
                "with `HiViTMAEModel` / `AutoModel`; `HiViTMAEForPreTraining` would leave the decoder randomly "
                "initialised."
            )
        else:
            contents = (
                "This folder holds the encoder and the MAE decoder. `AutoModel` / `HiViTMAEModel` loads the encoder "
                "for features; `AutoModelForPreTraining` / `HiViTMAEForPreTraining` adds the decoder and the pixel "
                "reconstruction loss (it masks 75% of the patches at random by default)."
            )
        usage_class = "AutoModel"
        usage = (
            f"    features = model(**inputs).last_hidden_state  # (batch_size, {grid**2}, {config.hidden_size})\n"
            "print(features.shape)"
        )
    if report.parity:
        figures = "\n".join(f"| {name} | {value:.2e} |" for name, value in report.parity.items())
        parity = (
            f"Outputs were compared with mmpretrain {_version('mmpretrain')}'s model built from the same weights, on "
            f"the same random images{'' if classifier else ' and mask'}, in float32 "
            f"(tolerance {PARITY_TOLERANCE}):\n\n"
            f"| output | max abs diff |\n|---|---|\n{figures}"
        )
    else:
        parity = "The outputs were not compared with mmpretrain's (`--verify-against-mmpretrain` was not given)."
    unused = "None: every tensor of the source checkpoint was converted."
    if report.unused_keys:
        listed = ", ".join(f"`{key}`" for key in report.unused_keys[:20])
        more = f" and {len(report.unused_keys) - 20} more" if len(report.unused_keys) > 20 else ""
        unused = (
            f"{len(report.unused_keys)} source tensors were left out ({listed}{more}). Reason: {report.unused_reason}"
        )
    body = f"""
# {title}

{summary}

{contents}

Architecture: hidden size {config.hidden_size}, depths {config.depths}, {config.num_attention_heads} attention heads,
patch size {config.patch_size}, image size {config.image_size} ({grid}x{grid} patches),
{report.num_parameters:,} parameters stored in {report.dtype}.

## Usage

The model code ships with the weights, so loading needs `trust_remote_code=True`.

```python
import torch
from PIL import Image
from transformers import AutoImageProcessor, {usage_class}

model_id = {json.dumps(model_id)}
processor = AutoImageProcessor.from_pretrained(model_id)
model = {usage_class}.from_pretrained(model_id, trust_remote_code=True).eval()

image = Image.new("RGB", (640, 480), (124, 116, 104))  # or Image.open("your_image.jpg")
inputs = processor(images=image, return_tensors="pt").to(model.dtype)
with torch.no_grad():
{usage}
```

The image processor reproduces mmpretrain's HiViT evaluation preprocessing: resize the short side to
{round(config.image_size / CROP_RATIO)} (bicubic), center-crop {config.image_size}x{config.image_size}, normalise with
the ImageNet mean and standard deviation.

## Conversion

- Source checkpoint: `{report.source.name}`
- SHA-256: `{report.sha256}`
- Stored dtype: {report.dtype}
- Tensors left out: {unused}
- Check: the written folder was reloaded and all {report.num_tensors_checked} tensors compared bit for bit with the
  source checkpoint's (cast to {report.dtype}); a forward pass gives finite outputs.

{parity}
"""
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}"))


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "(unknown version)"


def _progress(step: int, total: int, message: str):
    print(f"[{step}/{total}] {message}", flush=True)


def _prepare_output(output_dir: Path, overwrite: bool):
    if output_dir.exists() and not output_dir.is_dir():
        raise CheckpointError(f"--output_dir {output_dir} exists and is not a folder")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise CheckpointError(f"--output_dir {output_dir} exists and is not empty; pass --overwrite to replace it")


def _make_readable(folder: Path):
    """`tempfile.mkdtemp` creates a private (0700) folder; give the output the permissions of the umask."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _move_into_place(staging: Path, output_dir: Path):
    """Replace `output_dir` by the complete `staging` folder (same parent, so the renames are atomic)."""
    old = None
    if output_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.old-", dir=output_dir.parent))
        os.replace(output_dir, old / output_dir.name)
    os.replace(staging, output_dir)
    if old is not None:
        shutil.rmtree(old)


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def convert(
    checkpoint_path,
    output_dir,
    arch: Optional[str] = None,
    overrides: Optional[dict] = None,
    dtype: str = "float32",
    allow_unused: Optional[str] = None,
    overwrite: bool = False,
    verify_mmpretrain: bool = False,
    max_shard_size="5GB",
    dataset: Optional[str] = None,
    model_id: Optional[str] = None,
    labels_file: Optional[Path] = None,
    total_steps: int = 4,
) -> ConversionReport:
    """Convert `checkpoint_path` into the `from_pretrained` folder `output_dir`; see the command-line help.

    The folder is written next to `output_dir` under a temporary name, verified, and only then moved into place.
    Raises `CheckpointError` with a one-line reason for anything that cannot be converted.
    """
    checkpoint_path, output_dir = Path(checkpoint_path), Path(output_dir).absolute()
    _prepare_output(output_dir, overwrite)

    _progress(1, total_steps, f"loading {checkpoint_path}")
    checkpoint = load_checkpoint(checkpoint_path)
    state_dict = extract_state_dict(checkpoint)
    sha256 = sha256sum(checkpoint_path)

    config = infer_config(state_dict, arch=arch, **(overrides or {}))
    kind = checkpoint_kind(_strip_prefixes(state_dict))
    if kind != "classification" and labels_file is not None:
        raise CheckpointError("--labels names classes, but the checkpoint has no classification head (head.fc)")
    if kind == "classification" and (names := read_labels(checkpoint, labels_file, config.num_labels)):
        config.id2label = dict(enumerate(names))
        config.label2id = {name: index for index, name in config.id2label.items()}
    converted, unused = convert_state_dict(state_dict, config)
    if unused and allow_unused is None:
        more = f" and {len(unused) - 5} more" if len(unused) > 5 else ""
        raise CheckpointError(
            f"{len(unused)} checkpoint tensors map to no weight of HiViT-MAE: {', '.join(unused[:5])}{more} "
            "(pass --allow-unused REASON to leave them out)"
        )
    model = build_model(config, converted, kind)
    num_parameters = sum(parameter.numel() for parameter in model.parameters())
    _progress(
        2,
        total_steps,
        f"mapping: {len(converted)} tensors to {type(model).__name__} (hidden size {config.hidden_size}, depths "
        f"{config.depths}, image size {config.image_size}"
        + (", encoder only" if kind == "encoder" else "")
        + (f", {config.num_labels} classes" if kind == "classification" else "")
        + (f"; {len(unused)} tensors left out: {', '.join(unused[:5])}" if unused else "")
        + ")",
    )

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    try:
        _progress(3, total_steps, f"writing {dtype} weights, config, code and image processor to {staging}")
        model.to(DTYPES[dtype]).save_pretrained(staging, max_shard_size=max_shard_size)
        with open(staging / "preprocessor_config.json", "w") as file:
            json.dump(preprocessor_config(config.image_size), file, indent=2)
            file.write("\n")

        _progress(4, total_steps, f"verifying {staging}")
        checked = verify_folder(staging, converted, config, kind, DTYPES[dtype])
        parity = None
        if verify_mmpretrain:  # on the float32 mapping: the stored weights equal it cast to `dtype` (checked above)
            if dtype != "float32":
                model = build_model(config, converted, kind)
            parity = verify_against_mmpretrain(state_dict, model, config, kind)
        report = ConversionReport(
            source=checkpoint_path,
            sha256=sha256,
            output_dir=output_dir,
            config=config,
            kind=kind,
            dtype=dtype,
            num_parameters=num_parameters,
            num_tensors_checked=checked,
            unused_keys=unused,
            unused_reason=allow_unused,
            parity=parity,
            dataset=dataset or _known_dataset(checkpoint),
            model_id=model_id,
        )
        (staging / "README.md").write_text(model_card(report))
        _make_readable(staging)
        _move_into_place(staging, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    checks = f"{checked} tensors identical after reload, forward pass finite"
    if parity:
        checks += f", max abs diff vs mmpretrain {max(parity.values()):.2e}"
    print(f"  {checks}", flush=True)
    return report


def push_to_hub(folder, repo_id: str, private: bool = False, commit_message: Optional[str] = None):
    """Create the Hub model repo `repo_id` (if needed) and upload `folder` to it; returns `upload_folder`'s result."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    return api.upload_folder(
        folder_path=str(folder),
        repo_id=repo_id,
        repo_type="model",
        commit_message=commit_message or "Upload HiViT-MAE converted from mmpretrain",
    )


EPILOG = """\
examples:
  # mmpretrain's published MAE-HiViT-base checkpoint, verified against mmpretrain (needs it installed)
  python convert_checkpoint.py --checkpoint mae_hivit-base-p16_8xb512-amp-coslr-400e_in1k.pth \\
      --output_dir hivit-mae-base --verify-against-mmpretrain

  # a training checkpoint (epoch_400.pth) in bfloat16, published as a private Hub repo
  python convert_checkpoint.py --checkpoint work_dirs/mae_hivit/epoch_400.pth --output_dir hivit-mae-base \\
      --dtype bfloat16 --push_to_hub me/hivit-mae-base --private

  # an encoder-only export with 12 heads that the weights cannot show; overwrite an earlier conversion
  python convert_checkpoint.py --checkpoint backbone.safetensors --output_dir hivit-enc --num_attention_heads 12 \\
      --overwrite

  # a HiViT classifier fine-tuned with mmpretrain (class names from the checkpoint's meta, else --labels)
  python convert_checkpoint.py --checkpoint work_dirs/hivit-base_in1k/epoch_100.pth --output_dir hivit-base-in1k \
      --verify-against-mmpretrain

inputs: mmengine training checkpoints (meta, state_dict, message_hub, optimizer, param_schedulers), published
checkpoints (meta, state_dict), bare state dicts and .safetensors files, of the whole MAE (backbone./neck./head.
keys), of the encoder alone (backbone. keys or none) or of an mmpretrain ImageClassifier with a HiViT backbone and
a LinearClsHead (backbone./head.fc. keys; written as HiViTMAEForImageClassification). Pickles are read with torch's
weights-only unpickler: no pickled code runs, and mmengine need not be installed.
"""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="convert_checkpoint.py",
        description="Convert an mmpretrain MAE-HiViT (or HiViT classifier) checkpoint into a Hugging Face "
        "transformers model folder (model.safetensors, config.json, model code, preprocessor_config.json, README.md "
        "model card).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--checkpoint", required=True, help="mmpretrain checkpoint: .pth / .pt / .ckpt or .safetensors"
    )
    parser.add_argument(
        "--output_dir", required=True, help="folder to write; refused if it exists and is not empty (see --overwrite)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --output_dir")
    parser.add_argument(
        "--arch",
        choices=sorted(HIVIT_ARCHS),
        help="impose one of mmpretrain's HiViT sizes instead of inferring it from the weights",
    )
    parser.add_argument(
        "--num_attention_heads",
        type=int,
        help="encoder attention heads (weights do not show them; default: mmpretrain's for its sizes, else width/64)",
    )
    parser.add_argument(
        "--decoder_num_attention_heads", type=int, help="decoder attention heads (default: 16, as mmpretrain's)"
    )
    parser.add_argument(
        "--layer_norm_eps",
        type=float,
        help="LayerNorm epsilon (weights do not show it; default: mmpretrain's, 1e-6 for MAE-HiViT, 1e-5 for its "
        "HiViT classifiers)",
    )
    parser.add_argument(
        "--image_size",
        type=int,
        help="pre-training image size (default: read off the position tables, else 224)",
    )
    parser.add_argument(
        "--norm_pix_loss",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="whether the loss reconstructs per-patch normalised pixels (default: yes, as mmpretrain's recipe)",
    )
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the stored weights (default: float32)"
    )
    parser.add_argument(
        "--allow-unused",
        metavar="REASON",
        dest="allow_unused",
        help="leave out checkpoint tensors that map to no model weight (an error otherwise); REASON goes into the "
        "model card",
    )
    parser.add_argument(
        "--verify-against-mmpretrain",
        dest="verify_mmpretrain",
        action="store_true",
        help=f"also build mmpretrain's model from the same weights and fail if outputs differ by more than "
        f"{PARITY_TOLERANCE} (needs mmpretrain); the figures go into the model card",
    )
    parser.add_argument(
        "--max_shard_size", default="5GB", help="largest weight file before sharding, e.g. 500MB (default: 5GB)"
    )
    parser.add_argument(
        "--dataset",
        help="Hub id of the pre-training data set for the card (default: imagenet-1k when the checkpoint's "
        "stored config says ImageNet, else none)",
    )
    parser.add_argument(
        "--labels",
        metavar="FILE",
        type=Path,
        help="classifiers: a text file with one class name per line, in class-index order (default: the class names "
        "an mmengine training checkpoint stores in meta.dataset_meta, else LABEL_0, LABEL_1, ...)",
    )
    parser.add_argument(
        "--push_to_hub", metavar="REPO_ID", help="after converting, upload the folder to this Hub repo"
    )
    parser.add_argument("--private", action="store_true", help="with --push_to_hub: create the repo private")
    parser.add_argument(
        "--commit-message", dest="commit_message", help="with --push_to_hub: commit message of the upload"
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    """Command-line entry point; returns the exit status (0, or 1 with one `error: ...` line on stderr)."""
    args = parse_args(argv)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    overrides = {
        "num_attention_heads": args.num_attention_heads,
        "decoder_num_attention_heads": args.decoder_num_attention_heads,
        "layer_norm_eps": args.layer_norm_eps,
        "image_size": args.image_size,
        "norm_pix_loss": args.norm_pix_loss,
    }
    total_steps = 5 if args.push_to_hub else 4
    try:
        report = convert(
            args.checkpoint,
            args.output_dir,
            arch=args.arch,
            overrides=overrides,
            dtype=args.dtype,
            allow_unused=args.allow_unused,
            overwrite=args.overwrite,
            verify_mmpretrain=args.verify_mmpretrain,
            max_shard_size=args.max_shard_size,
            dataset=args.dataset,
            model_id=args.push_to_hub,
            labels_file=args.labels,
            total_steps=total_steps,
        )
        if args.push_to_hub:
            _progress(5, total_steps, f"uploading {report.output_dir} to https://huggingface.co/{args.push_to_hub}")
            push_to_hub(report.output_dir, args.push_to_hub, args.private, args.commit_message)
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    kind = {
        "pretraining": "encoder + decoder",
        "encoder": "encoder only, load with HiViTMAEModel / AutoModel",
        "classification": f"image classifier, {report.config.num_labels} classes",
    }[report.kind]
    print(f"done: {report.num_parameters / 1e6:.1f}M parameters ({kind}) written to {report.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
