"""Writing a converted model: the model built from converted weights, the output folder (written to a temporary
sibling, verified, then moved into place), its image-processor config, dtype and sharding, and the Hub upload."""

import json
import warnings
from pathlib import Path
from typing import Optional

import torch

from configuration_hivit_mae import HiViTMAEConfig

from ..preprocessing import preprocessor_config
from .types import CheckpointError


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
    unexpected = sorted(set(converted) - set(expected))
    if unexpected:
        more = f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
        raise CheckpointError(
            f"the checkpoint has {len(unexpected)} weights that the inferred model has no place for: "
            f"{', '.join(unexpected[:5])}{more}"
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


def check_finite(converted: dict):
    """Raise `CheckpointError` naming the tensors that hold NaN or infinite values (a diverged training run)."""
    bad = [key for key, value in converted.items() if value.is_floating_point() and not torch.isfinite(value).all()]
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise CheckpointError(
            f"the checkpoint holds NaN or infinite values in {len(bad)} tensors: {', '.join(bad[:5])}{more}"
        )


def build_model(config: HiViTMAEConfig, converted: dict, kind: str) -> torch.nn.Module:
    """The model for a `checkpoint_kind` (`HiViTMAEForPreTraining`, `HiViTMAEModel` or
    `HiViTMAEForImageClassification`) holding exactly the `converted` weights (keys as `convert_state_dict` names
    them)."""
    converted = _for_model(converted, kind)
    model = _model_class(kind)(config)
    check_weights(converted, model)
    model.load_state_dict(converted, strict=True)
    return model.eval()


def random_inputs(config: HiViTMAEConfig, batch_size: int, seed: int):
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
    images, noise = random_inputs(config, 1, seed=0)
    with torch.no_grad():
        if kind == "classification":
            outputs = model.float()(images)
        else:
            outputs = model.float()(images, mask=True, noise=noise)
    for name, value in outputs.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise CheckpointError(f"a forward pass of the converted model gives non-finite {name}")
    return len(expected)


def save_folder(model: torch.nn.Module, folder: Path, dtype: torch.dtype, max_shard_size):
    """Write `model` in `dtype` (weights sharded above `max_shard_size`, config, model code) and its image-processor
    config to `folder`."""
    model.to(dtype).save_pretrained(folder, max_shard_size=max_shard_size)
    with open(folder / "preprocessor_config.json", "w") as file:
        json.dump(preprocessor_config(model.config.image_size), file, indent=2)
        file.write("\n")


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def push_to_hub(folder, repo_id: str, private: bool = False, commit_message: Optional[str] = None):
    """Create the Hub model repo `repo_id` (if needed) and upload `folder` to it; returns `upload_folder`'s result."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    return api.upload_folder(
        folder_path=str(folder),
        repo_id=repo_id,
        repo_type="model",
        commit_message=commit_message or "Upload converted HiViT-MAE",
    )
