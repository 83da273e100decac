"""The two fine-tuning recipes of `run_classification.py`, which one fits a starting folder, and the optimizer they
share: which tensors decay, and the original HiViT repository's layer-wise learning-rate decay (`LayerDecayTrainer`).

- `original`: the fine-tuning recipe of the original HiViT repository (github.com/zhangxiaosong18/hivit,
  `self_supervised/main_finetune.py` with the command of `get_started.md`), the only published recipe for fine-tuning
  an MAE-pre-trained HiViT. mmpretrain has none: its HiViT classification configs train from scratch, and their head
  (average pooling, then a linear layer, no norm) on MAE features gives logits in the tens at step 0.
- `mmpretrain`: mmpretrain 1.2.0's HiViT classification recipe (`configs/hivit`), for classifiers built that way
  (a converted mmpretrain HiViT classifier keeps its own head exactly).

A starting folder is recognised by its `config.json`: `architectures` (written by every `save_pretrained`) says
whether it holds a classifier, and for a classifier `use_fc_norm` says whose (the original's classifier has a
LayerNorm before the head, mmpretrain's has none). A pre-training or encoder folder is MAE-pre-trained, whichever
MAE recipe made it (`use_hifeat` / `decoder_first_token_as_cls=False` mark the original repository's).
"""

import re
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from configuration_hivit_mae import HIVIT_ARCHS

# What a starting folder can be, by its config; each maps to the recipe that fits it.
START_DESCRIPTIONS = {
    "mae-original": "an MAE pre-trained with the original HiViT repository: hifeat, aligned decoder",
    "mae-mmpretrain": "an MAE pre-trained with mmpretrain's MAE-HiViT recipe or run_pretraining.py",
    "classifier-fc-norm": "a classifier with fc_norm: the original repository's, or fine-tuned with its recipe",
    "classifier": "a classifier without fc_norm: mmpretrain's HiViT ImageClassifier, or fine-tuned like it",
}
RECIPE_FOR_START = {
    "mae-original": "original",
    "mae-mmpretrain": "original",
    "classifier-fc-norm": "original",
    "classifier": "mmpretrain",
}


def starting_point(config) -> str:
    """One of `START_DESCRIPTIONS`' keys for a `HiViTMAEConfig` loaded from the starting folder."""
    if "HiViTMAEForImageClassification" in (config.architectures or []):
        return "classifier-fc-norm" if config.use_fc_norm else "classifier"
    if config.use_hifeat or not config.decoder_first_token_as_cls:
        return "mae-original"
    return "mae-mmpretrain"


@dataclass(frozen=True)
class FineTuningRecipe:
    """The settings of one recipe; `run_classification.py`'s flags override each of them."""

    name: str
    source: str
    # Trainer arguments, placed before the command line's (which win).
    trainer_args: tuple[str, ...]
    # learning_rate = base_learning_rate * total batch / learning_rate_per_images
    base_learning_rate: float
    learning_rate_per_images: int
    # Layer-wise learning-rate decay (None: one learning rate for all parameters).
    layer_decay: Optional[float]
    # Stochastic depth; None: per HiViT size (`drop_path_rate_for`).
    drop_path_rate: Optional[float]
    # Standard deviation of a fresh classifier's truncated normal (None: the config's `initializer_range`).
    head_init_std: Optional[float]
    # Whether relative position bias tables that the starting folder lacks start at zero (else truncated normal).
    zero_fresh_relative_position_bias: bool
    # Config fields set on the starting folder's config (the classifier the recipe trains) ...
    config: dict = field(default_factory=dict)
    # ... unless the folder already holds a classifier that this recipe keeps as it is.
    keeps_classifier: bool = False

    def config_overrides(self, start: str) -> dict:
        """The config fields this recipe sets for a starting point (`starting_point`)."""
        return {} if self.keeps_classifier and start.startswith("classifier") else dict(self.config)

    def drop_path_rate_for(self, config) -> float:
        """The recipe's stochastic depth for a config's size."""
        if self.drop_path_rate is not None:
            return self.drop_path_rate
        arch = next(
            (
                name
                for name, sizes in HIVIT_ARCHS.items()
                if (sizes["hidden_size"], sizes["depths"]) == (config.hidden_size, list(config.depths))
            ),
            None,
        )
        return MMPRETRAIN_DROP_PATH_RATES.get(arch, 0.1)


# mmpretrain's configs/hivit drop path rates (large has no classification config; it follows base; sizes of one's own
# get 0.1).
MMPRETRAIN_DROP_PATH_RATES = {"tiny": 0.05, "small": 0.3, "base": 0.5, "large": 0.5}

# Shared by both recipes: AdamW(0.9, 0.999, eps 1e-8), weight decay 0.05, warm-up then cosine decay.
_COMMON_TRAINER_ARGS = (
    "--weight_decay", "0.05",
    "--adam_beta1", "0.9",
    "--adam_beta2", "0.999",
    "--adam_epsilon", "1e-8",
    "--lr_scheduler_type", "cosine_with_min_lr",
)  # fmt: skip
# transformers 5 folds --warmup_ratio into --warmup_steps (a float below 1 is a fraction of training).
_WARMUP_FLAG = "--warmup_ratio" if "warmup_ratio" in TrainingArguments.__dataclass_fields__ else "--warmup_steps"
# The original: 100 epochs, 5 of warm-up, cosine to main_finetune's --min_lr (absolute; scaled per layer like the
# peak), no gradient clipping (its --clip_grad defaults to None).
_ORIGINAL_SCHEDULE = (
    "--num_train_epochs", "100",
    _WARMUP_FLAG, str(5 / 100),
    "--lr_scheduler_kwargs", '{"min_lr": 1e-06}',
    "--max_grad_norm", "0",
)  # fmt: skip
# mmpretrain: 300 epochs, 20 of warm-up, cosine to eta_min=1e-5, which is 1 % of its lr at its batch of 1024 (as a
# ratio it scales with the batch, as the lr does); gradients clipped at norm 5.
_MMPRETRAIN_SCHEDULE = (
    "--num_train_epochs", "300",
    _WARMUP_FLAG, str(20 / 300),
    "--lr_scheduler_kwargs", '{"min_lr_rate": 0.01}',
    "--max_grad_norm", "5.0",
)  # fmt: skip

ORIGINAL = FineTuningRecipe(
    name="original",
    source="the original HiViT repository's MAE fine-tuning, self_supervised/main_finetune.py and get_started.md",
    trainer_args=_COMMON_TRAINER_ARGS + _ORIGINAL_SCHEDULE,
    base_learning_rate=5e-4,
    learning_rate_per_images=256,
    layer_decay=0.85,
    drop_path_rate=0.2,
    head_init_std=2e-5,  # trunc_normal_(model.head.weight, std=2e-5) after loading the pre-trained weights
    zero_fresh_relative_position_bias=True,  # Attention's torch.zeros table, which HiViT._init_weights leaves alone
    # `hivit_base`: mean pool -> fc_norm -> head over the last main block's tokens (no hifeat), rpe=True, and the
    # position table as stored (no resampling at the pre-training size).
    config={
        "use_fc_norm": True,
        "use_hifeat": False,
        "use_relative_position_bias": True,
        "legacy_position_encoding": False,
    },
)

MMPRETRAIN = FineTuningRecipe(
    name="mmpretrain",
    source="mmpretrain 1.2.0's HiViT classification recipe, configs/hivit and imagenet_bs1024_adamw_hivit.py",
    trainer_args=_COMMON_TRAINER_ARGS + _MMPRETRAIN_SCHEDULE,
    base_learning_rate=5e-4,
    learning_rate_per_images=512,
    layer_decay=None,
    drop_path_rate=None,
    head_init_std=None,
    zero_fresh_relative_position_bias=False,
    # mmpretrain's HiViT classifier: rpe=True, LayerNorm eps 1e-5, average pooling straight into the head.
    config={
        "use_fc_norm": False,
        "use_hifeat": False,
        "use_relative_position_bias": True,
        "layer_norm_eps": 1e-5,
    },
    keeps_classifier=True,  # a classifier folder keeps its architecture and head exactly
)

RECIPES = {recipe.name: recipe for recipe in (ORIGINAL, MMPRETRAIN)}


def choose_recipe(config, requested: str = "auto") -> tuple[FineTuningRecipe, str]:
    """The recipe for a starting folder's config (`requested`: `"auto"`, `"original"` or `"mmpretrain"`) and the
    kind of starting point (`starting_point`)."""
    start = starting_point(config)
    if requested == "auto":
        requested = RECIPE_FOR_START[start]
    if requested not in RECIPES:
        raise ValueError(f"--recipe {requested!r}: choose auto, {' or '.join(RECIPES)}")
    return RECIPES[requested], start


def layer_ids(model: nn.Module) -> tuple[dict[str, int], int]:
    """The original repository's `get_layer_id` for every parameter of a `HiViTMAEForImageClassification`, and the
    number of layers `num_layers` (stem MLP blocks and main-stage layers). Patch embedding and absolute position
    table: 0; every stem MLP block and every main-stage layer its own id, 1, 2, ... in depth order (the original's
    `main_block` counts all of them); a patch merge the id of the stem block before it; everything after the trunk
    (fc_norm, head): `num_layers + 1`."""
    config = model.config
    stem_blocks = [2 * depth for depth in config.depths[:-1]]
    num_layers = sum(stem_blocks) + config.depths[-1]
    ids = {}
    for name, _ in model.named_parameters():
        stem = re.match(r"hivit\.stem\.(\d+)\.(?:blocks\.(\d+)|merge)\.", name)
        main = re.match(r"hivit\.encoder\.layers\.(\d+)\.", name)
        if name.startswith(("hivit.patch_embeddings.", "hivit.position_embeddings")):
            ids[name] = 0
        elif stem:
            stage = int(stem.group(1))
            before = sum(stem_blocks[:stage])
            ids[name] = before + (int(stem.group(2)) + 1 if stem.group(2) is not None else stem_blocks[stage])
        elif main:
            ids[name] = sum(stem_blocks) + int(main.group(1)) + 1
        else:
            ids[name] = num_layers + 1
    return ids, num_layers


def decay_parameter_names(model: nn.Module) -> list[str]:
    """The trainable parameters that decay under mmpretrain's HiViT `paramwise_cfg`: the weight matrices (norms,
    biases and other one-dimensional parameters get `*_decay_mult=0`), less the position and relative position
    bias tables. The original repository's `param_groups_lrd` exempts the same tensors (1-D parameters,
    `absolute_pos_embed`, `*.relative_position_bias_table`)."""
    no_decay = ("position_embeddings", "relative_position_bias_table")
    return [
        name
        for name, parameter in model.named_parameters()
        if parameter.requires_grad and parameter.ndim > 1 and not any(part in name for part in no_decay)
    ]


def layer_decay_parameter_groups(
    model: nn.Module, learning_rate: float, weight_decay: float, layer_decay: float, decay_names: list[str]
) -> list[dict]:
    """Optimizer parameter groups with the original's layer-wise learning-rate decay (`util/lr_decay.py`,
    `param_groups_lrd`): a parameter of layer id `i` (`layer_ids`) learns at `learning_rate * layer_decay **
    (num_layers + 1 - i)`; the parameters in `decay_names` get `weight_decay`, the others none. Trainer schedulers
    scale every group's rate by the same factor, so the ratios hold throughout. The top group (the head, at the full
    rate) comes first, so that the rate the Trainer logs (group 0's) is the peak."""
    ids, num_layers = layer_ids(model)
    top = num_layers + 1
    decayed = set(decay_names)
    groups: dict[tuple[int, bool], dict] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        key = (ids[name], name in decayed)
        if key not in groups:
            groups[key] = {
                "params": [],
                "lr": learning_rate * layer_decay ** (top - ids[name]),
                "weight_decay": weight_decay if name in decayed else 0.0,
            }
        groups[key]["params"].append(parameter)
    return [groups[key] for key in sorted(groups, key=lambda key: (-key[0], not key[1]))]


class LayerDecayTrainer(Trainer):
    """Trainer with the fine-tuning recipes' optimizer: weight decay on [`decay_parameter_names`] only, and with
    `layer_decay` (other than None or 1) the layer-wise learning rates of [`layer_decay_parameter_groups`]."""

    def __init__(self, *args, layer_decay: Optional[float] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.layer_decay = layer_decay

    def get_decay_parameter_names(self, model) -> list[str]:
        return decay_parameter_names(model)

    def create_optimizer(self, *args, **kwargs):
        if self.optimizer is None and self.layer_decay is not None and self.layer_decay != 1.0:
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
            groups = layer_decay_parameter_groups(
                self.model,
                self.args.learning_rate,
                self.args.weight_decay,
                self.layer_decay,
                decay_parameter_names(self.model),
            )
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return super().create_optimizer(*args, **kwargs)


def initialise_fresh_weights(
    model: nn.Module, recipe: FineTuningRecipe, fresh_keys: set[str], head_init_std: Optional[float]
):
    """Re-initialise what starts afresh (`fresh_keys`: weights not taken from the starting folder) as the recipe
    does: the classifier's weight truncated normal(`head_init_std`) with zero bias, and with
    `zero_fresh_relative_position_bias` the relative position bias tables at zero."""
    with torch.no_grad():
        if head_init_std is not None and "classifier.weight" in fresh_keys:
            nn.init.trunc_normal_(model.classifier.weight, std=head_init_std)
            nn.init.zeros_(model.classifier.bias)
        if recipe.zero_fresh_relative_position_bias:
            for name, parameter in model.named_parameters():
                if name.endswith("relative_position_bias_table") and name in fresh_keys:
                    parameter.zero_()
