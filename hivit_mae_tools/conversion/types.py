"""The shapes of data passed between the converter's parts: what the command line asks of a source format
(`ConversionOptions`), what a source format hands back (`SourceConversion`), what a conversion did
(`ConversionReport`), and the error that every part raises for input it cannot convert (`CheckpointError`)."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from configuration_hivit_mae import HiViTMAEConfig

from ..cli import UserError


class CheckpointError(UserError):
    """A checkpoint that cannot be converted; the message says why (the command line prints it as one `error:`
    line)."""


@dataclass
class ConversionOptions:
    """What the command line passes down to a source format's `convert`."""

    arch: Optional[str] = None  # impose one of mmpretrain's sizes (`HIVIT_ARCHS`) instead of inferring it
    overrides: dict = field(default_factory=dict)  # config fields set by the user; None values are ignored
    use_ema: bool = False  # convert the EMA weights where the checkpoint has them
    allow_unused: bool = False  # the user accepts source tensors that map nowhere (the CLI checks `unused`)
    labels: Optional[list[str]] = None  # class names given by the user; the CLI checks and applies them

    def __post_init__(self):
        for name, value in (self.overrides or {}).items():
            if value is None or name not in _POSITIVE_OVERRIDES:
                continue
            kind = _POSITIVE_OVERRIDES[name]
            if isinstance(value, bool) or not isinstance(value, kind) or not value > 0:
                raise CheckpointError(f"{name} must be a positive {kind[0].__name__}, not {value!r}")


# Config fields that a conversion may override and that must be positive numbers (checked before any config is
# built: `HiViTMAEConfig` would divide by them).
_POSITIVE_OVERRIDES = {
    "hidden_size": (int,),
    "num_attention_heads": (int,),
    "decoder_hidden_size": (int,),
    "decoder_num_attention_heads": (int,),
    "decoder_num_hidden_layers": (int,),
    "image_size": (int,),
    "patch_size": (int,),
    "layer_norm_eps": (float, int),
}


@dataclass
class SourceConversion:
    """What a source format makes of a loaded checkpoint."""

    config: HiViTMAEConfig  # inferred from the weights, overrides applied
    state_dict: dict[str, torch.Tensor]  # keys of HiViTMAEForPreTraining / ...ForImageClassification / HiViTMAEModel
    kind: str  # "pretraining" | "classification" | "encoder"
    unused: list[str]  # source keys that map to no weight, let through by --allow-unused (reported)
    source_description: str  # markdown paragraph for the model card: where the weights come from
    notes: list[str] = field(default_factory=list)  # facts for the card / log (e.g. "model_ema used")
    dataset: Optional[str] = None  # Hub id of the training data set, where the checkpoint tells
    license: str = "other"  # the card's license field: the weights' license as their authors state it
    tags: list[str] = field(default_factory=list)  # extra Hub tags (e.g. the training framework)
    arch: Optional[str] = None  # the source's own name of the size, where it is one (the card's title)


@dataclass
class ConversionReport:
    """What a conversion did; it also feeds the model card."""

    source: Path
    sha256: str
    output_dir: Path
    conversion: SourceConversion
    dtype: str
    num_parameters: int
    num_tensors_checked: int = 0
    unused_reason: Optional[str] = None
    parity: Optional[dict] = None
    dataset: Optional[str] = None
    model_id: Optional[str] = None

    @property
    def config(self) -> HiViTMAEConfig:
        return self.conversion.config

    @property
    def kind(self) -> str:
        return self.conversion.kind
