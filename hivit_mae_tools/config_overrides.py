"""`--config_overrides` of the training scripts: `key=value` lists (or a JSON object) applied to a HiViT-MAE config."""

import json
import re
from typing import Any, Optional

from configuration_hivit_mae import HiViTMAEConfig

from .cli import UserError


def parse_config_overrides(text: Optional[str]) -> dict[str, Any]:
    """`"a=1,b=[1,2],c=gelu"` or `'{"a": 1}'` -> dict; values are parsed as JSON when they can be."""
    if not text:
        return {}
    text = text.strip()
    if text.startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            raise UserError(f"--config_overrides is not a valid JSON object: {error}", usage=True) from error
    overrides = {}
    for item in re.split(r",(?![^\[]*\])", text):
        if not item.strip():
            continue
        if "=" not in item:
            raise UserError(f"--config_overrides item {item!r} is not of the form key=value", usage=True)
        key, value = (part.strip() for part in item.split("=", 1))
        try:
            overrides[key] = json.loads(value.replace("True", "true").replace("False", "false"))
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


def apply_config_overrides(config: HiViTMAEConfig, overrides: dict[str, Any]):
    """Set `overrides` on a loaded config; unknown fields and invalid architectures raise a usage `UserError`."""
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise UserError(f"--config_overrides: HiViTMAEConfig has no field {key!r}", usage=True)
        setattr(config, key, value)
    try:
        config.validate_architecture()
    except ValueError as error:
        raise UserError(str(error), usage=True) from error
