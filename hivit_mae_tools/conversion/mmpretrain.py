"""The mmpretrain source format: MAE-HiViT checkpoints (mmengine training checkpoints, published checkpoints, bare
state dicts, `.safetensors`) of the whole MAE, its encoder alone, or a HiViT `ImageClassifier`.

`infer_config` reads the architecture off the weights, `convert_state_dict` maps mmpretrain's keys to this model's,
`verify_against_mmpretrain` compares the converted model with mmpretrain's own (when it is installed).
"""

import collections.abc
import math
import re
import warnings
from typing import Optional

import torch

from configuration_hivit_mae import HIVIT_ARCHS, HiViTMAEConfig

from .types import CheckpointError, ConversionOptions, SourceConversion
from .writer import random_inputs

NAME = "mmpretrain"


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
    except (ValueError, TypeError, ZeroDivisionError) as error:
        raise CheckpointError(f"the config is invalid: {error}") from None


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

    images, noise = random_inputs(config, 2, seed=0)

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


def _known_dataset(checkpoint: dict) -> Optional[str]:
    """`"imagenet-1k"` when the training config stored in an mmengine checkpoint's `meta` uses ImageNet."""
    meta = checkpoint.get("meta")
    text = meta.get("cfg") if isinstance(meta, collections.abc.Mapping) else None
    if isinstance(text, str) and re.search(r"""type\s*=\s*['"]ImageNet['"]""", text):
        return "imagenet-1k"
    return None


def dataset_classes(checkpoint: dict, num_labels: int) -> Optional[list]:
    """The class names that mmengine stores in a training checkpoint's `meta.dataset_meta.classes`, else None.
    Raises `CheckpointError` when their count is not the head's."""
    meta = checkpoint.get("meta")
    dataset_meta = meta.get("dataset_meta") if isinstance(meta, collections.abc.Mapping) else None
    names = dataset_meta.get("classes") if isinstance(dataset_meta, collections.abc.Mapping) else None
    if not isinstance(names, (list, tuple)) or not all(isinstance(name, str) for name in names):
        return None
    if len(names) != num_labels:
        raise CheckpointError(
            f"the checkpoint's meta.dataset_meta.classes names {len(names)} classes but the classification head has "
            f"{num_labels}"
        )
    return list(names)


# Keys that only the original HiViT repository's checkpoints have (its format is registered before this one).
_ORIGINAL_ONLY = re.compile(r"(absolute_pos_embed|decoder_embed\.|fc_norm\.)")


def detect(checkpoint: dict) -> bool:
    """Whether `checkpoint` (as `safe_load.load_checkpoint` returns it) holds mmpretrain weights: a state dict under
    `state_dict` (mmengine) or `model`, or the dict itself, with tensors and none of the original HiViT repository's
    own key names. Other models' checkpoints are accepted here and refused by `convert` with the reason."""
    try:
        state_dict = extract_state_dict(checkpoint)
    except CheckpointError:
        return False
    return "args" not in checkpoint and not any(_ORIGINAL_ONLY.match(key) for key in state_dict)


def source_description(kind: str) -> str:
    """The model card's paragraph on where the weights come from."""
    if kind == "classification":
        return (
            "Converted from an [mmpretrain](https://github.com/open-mmlab/mmpretrain) `ImageClassifier` checkpoint "
            "(HiViT backbone, global average pooling, linear head)."
        )
    return "Converted from an [mmpretrain](https://github.com/open-mmlab/mmpretrain) checkpoint."


def convert(checkpoint: dict, options: ConversionOptions) -> SourceConversion:
    """Convert a loaded mmpretrain checkpoint: infer the config (with `options.arch` / `options.overrides`), map the
    weights, and name the classes (`meta.dataset_meta.classes`, unless `options.labels` is given)."""
    if options.use_ema:
        raise CheckpointError("--use_ema: mmpretrain checkpoints hold no EMA weights that this converter reads")
    state_dict = extract_state_dict(checkpoint)
    config = infer_config(state_dict, arch=options.arch, **(options.overrides or {}))
    kind = checkpoint_kind(_strip_prefixes(state_dict))
    if kind == "classification" and options.labels is None:
        if names := dataset_classes(checkpoint, config.num_labels):
            config.id2label = dict(enumerate(names))
            config.label2id = {name: index for index, name in config.id2label.items()}
    converted, unused = convert_state_dict(state_dict, config)
    return SourceConversion(
        config=config,
        state_dict=converted,
        kind=kind,
        unused=unused,
        source_description=source_description(kind),
        dataset=_known_dataset(checkpoint),
        # mmpretrain's code and its published weights are Apache-2.0.
        license="apache-2.0",
        tags=["mmpretrain"],
    )
