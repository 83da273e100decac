"""PyTorch HiViT-MAE: the HiViT encoder with masked-autoencoder pre-training, numerically matching mmpretrain 1.2.0's
`MAE` with `MAEHiViT`, `MAEPretrainDecoder` and `MAEPretrainHead`."""

import collections.abc
import math
import re
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BackboneOutput, ImageClassifierOutput
from transformers.utils import ModelOutput, logging

try:  # transformers >= 5: these skip tensors that `from_pretrained` has already loaded
    from transformers import initialization as init
except ImportError:  # transformers 4.x guards whole modules instead
    from torch.nn import init

try:  # transformers >= 5
    from transformers.backbone_utils import BackboneMixin
except ImportError:  # transformers 4.x
    from transformers.utils.backbone_utils import BackboneMixin

try:  # relative import when loaded as Hub remote code (a transformers dynamic module)
    from .configuration_hivit_mae import HiViTMAEConfig
except ImportError:  # absolute import when installed as a top-level module
    from configuration_hivit_mae import HiViTMAEConfig

logger = logging.get_logger(__name__)


@dataclass
class HiViTMAEModelOutput(ModelOutput):
    r"""
    Output of [`HiViTMAEModel`].

    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(batch_size, num_visible_patches, encoder_output_size)`):
            Features of the visible patches, in the order of `ids_restore`'s shuffle (patch order when nothing is
            masked): the last main-stage layer's output (HiViT has no final norm), or with `config.use_hifeat` the
            layer-normalised concatenation of every stage's output (`config.encoder_output_size` channels).
        mask (`torch.FloatTensor` of shape `(batch_size, num_patches)`):
            1 for masked patches, 0 for visible ones, in patch (raster) order.
        ids_restore (`torch.LongTensor` of shape `(batch_size, num_patches)`):
            Position of each patch in the shuffled sequence (visible patches first).
        hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned when `output_hidden_states=True`):
            One tensor per stem stage, taken before its patch merge, of shape
            `(batch_size, num_visible_patches, inner, inner, stage_hidden_size)`; then the main-stage input and the
            output of every main-stage layer, of shape `(batch_size, num_visible_patches, hidden_size)`.
        reshaped_hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned when `output_hidden_states=True`
            and nothing is masked):
            The same states as feature maps `(batch_size, stage_hidden_size, height / stride, width / stride)`:
            strides 4, 8 and 16 for the default three stages, a feature pyramid for dense tasks.
        attentions (`tuple(torch.FloatTensor)`, *optional*, returned when `output_attentions=True`):
            Attention probabilities of every main-stage layer, `(batch_size, num_heads, seq_len, seq_len)`; for a
            layer attending within windows (`config.window_size`), `(batch_size * num_windows, num_heads,
            window_size ** 2, window_size ** 2)`.
    """

    last_hidden_state: Optional[torch.FloatTensor] = None
    mask: Optional[torch.FloatTensor] = None
    ids_restore: Optional[torch.LongTensor] = None
    hidden_states: Optional[tuple[torch.FloatTensor, ...]] = None
    reshaped_hidden_states: Optional[tuple[torch.FloatTensor, ...]] = None
    attentions: Optional[tuple[torch.FloatTensor, ...]] = None


@dataclass
class HiViTMAEForPreTrainingOutput(ModelOutput):
    r"""
    Output of [`HiViTMAEForPreTraining`].

    Args:
        loss (`torch.FloatTensor` of shape `()`):
            Mean squared error of the predicted pixels (per-patch normalised when `config.norm_pix_loss`) over the
            masked patches; over all patches when nothing is masked.
        logits (`torch.FloatTensor` of shape `(batch_size, num_patches, patch_size ** 2 * num_channels)`):
            Predicted pixels of every patch, in patch order (see [`HiViTMAEForPreTraining.unpatchify`]).
        mask, ids_restore, hidden_states, reshaped_hidden_states, attentions:
            As in [`HiViTMAEModelOutput`].
    """

    loss: Optional[torch.FloatTensor] = None
    logits: Optional[torch.FloatTensor] = None
    mask: Optional[torch.FloatTensor] = None
    ids_restore: Optional[torch.LongTensor] = None
    hidden_states: Optional[tuple[torch.FloatTensor, ...]] = None
    reshaped_hidden_states: Optional[tuple[torch.FloatTensor, ...]] = None
    attentions: Optional[tuple[torch.FloatTensor, ...]] = None


def get_2d_sincos_position_embedding(grid_size: int, embed_dim: int, add_cls_token: bool = False) -> torch.Tensor:
    """Fixed 2-D sin-cos table of shape `(1, grid_size ** 2 (+1), embed_dim)`, laid out as mmpretrain's
    `build_2d_sincos_position_embedding`: `[sin(row), cos(row), sin(col), cos(col)]` with temperature 10000, and an
    all-zero class-token row in front when `add_cls_token`."""
    omega = 1.0 / 10000.0 ** (torch.arange(embed_dim // 4, dtype=torch.float32) / (embed_dim // 4))
    coords = torch.arange(grid_size, dtype=torch.float32)
    rows = torch.outer(coords.repeat_interleave(grid_size), omega)
    cols = torch.outer(coords.repeat(grid_size), omega)
    table = torch.cat([rows.sin(), rows.cos(), cols.sin(), cols.cos()], dim=1)[None]
    if add_cls_token:
        table = torch.cat([table.new_zeros(1, 1, embed_dim), table], dim=1)
    return table


def interpolate_pos_encoding(
    table: torch.Tensor, grid_size: tuple[int, int], num_tokens: int, legacy: bool
) -> torch.Tensor:
    """Resample a square position table `(1, N, dim)` to a `grid_size` patch grid, giving `(1, height * width, dim)`.

    `legacy=True` reproduces mmpretrain's `HiViT.interpolate_pos_encoding`: the table is returned unchanged only when
    `num_tokens` (the tokens actually present, so the *visible* ones on the masked path) equals `N` and the grid is
    square; otherwise it is resampled with `scale_factor=(height + 0.1) / sqrt(N)`, which shifts the sampling points
    even when the output grid equals the table's. `legacy=False` resamples only when the grid differs, to exactly it.
    """
    num_positions, dim = table.shape[1], table.shape[2]
    side = math.isqrt(num_positions)
    height, width = grid_size
    grid = table.reshape(1, side, side, dim).permute(0, 3, 1, 2)
    if legacy:
        if num_tokens == num_positions and height == width:
            return table
        scale = ((height + 0.1) / math.sqrt(num_positions), (width + 0.1) / math.sqrt(num_positions))
        grid = F.interpolate(grid, scale_factor=scale, mode="bicubic")
    else:
        if (height, width) == (side, side):
            return table
        grid = F.interpolate(grid, size=(height, width), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, height * width, dim)


def relative_position_index(height: int, width: int, device=None) -> torch.Tensor:
    """`(height * width, height * width)` index into a `(2 * height - 1) * (2 * width - 1)` bias table, as in
    Swin / BEiT / mmpretrain's HiViT `Attention`."""
    coords = torch.stack(
        torch.meshgrid(torch.arange(height, device=device), torch.arange(width, device=device), indexing="ij")
    ).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
    return (relative[..., 0] + height - 1) * (2 * width - 1) + relative[..., 1] + width - 1


def drop_path(input: torch.Tensor, drop_prob: float = 0.0, training: bool = False) -> torch.Tensor:
    """Stochastic depth per sample, applied in the residual branch."""
    if drop_prob == 0.0 or not training:
        return input
    keep_prob = 1 - drop_prob
    shape = (input.shape[0],) + (1,) * (input.ndim - 1)
    random_tensor = keep_prob + torch.rand(shape, dtype=input.dtype, device=input.device)
    return input.div(keep_prob) * random_tensor.floor_()


class HiViTMAEDropPath(nn.Module):
    """Stochastic depth per sample, applied in the residual branch."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return drop_path(hidden_states, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"p={self.drop_prob}"


class HiViTMAELayerScale(nn.Module):
    """Per-channel learned scale of a residual branch (mmpretrain's `gamma_1` / `gamma_2`)."""

    def __init__(self, hidden_size: int, init_value: float):
        super().__init__()
        self.init_value = init_value
        self.lambda1 = nn.Parameter(torch.full((hidden_size,), init_value))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states * self.lambda1


class HiViTMAEPatchEmbeddings(nn.Module):
    """Embeds every `patch_size` patch as an `inner x inner` grid of stem tokens.

    `(batch_size, num_channels, height, width)` -> `(batch_size, num_patches, inner, inner, stage_0_hidden_size)`,
    patches in raster order.
    """

    def __init__(self, config: HiViTMAEConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.inner_patches = config.inner_patches
        self.num_channels = config.num_channels
        stride = config.patch_size // config.inner_patches
        self.projection = nn.Conv2d(
            config.num_channels, config.stage_hidden_sizes[0], kernel_size=stride, stride=stride
        )
        self.layernorm = nn.LayerNorm(config.stage_hidden_sizes[0], eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        batch_size, _, height, width = pixel_values.shape
        grid_h, grid_w = height // self.patch_size, width // self.patch_size
        inner = self.inner_patches
        embeddings = self.projection(pixel_values)
        embeddings = embeddings.view(batch_size, -1, grid_h, inner, grid_w, inner)
        embeddings = embeddings.permute(0, 2, 4, 3, 5, 1).reshape(batch_size, grid_h * grid_w, inner, inner, -1)
        return self.layernorm(embeddings)


class HiViTMAEAttention(nn.Module):
    """Multi-head self-attention with an optional learned relative position bias and an optional additive
    `attention_mask` broadcastable to `(batch_size, num_heads, seq_len, seq_len)`.

    `(batch_size, seq_len, hidden_size)` -> `(batch_size, seq_len, hidden_size)`, plus the attention probabilities
    `(batch_size, num_heads, seq_len, seq_len)` when asked for.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        qkv_bias: bool,
        attention_dropout: float,
        dropout: float,
        relative_position_grid: Optional[int] = None,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.scale = self.head_dim**-0.5
        self.attention_dropout = attention_dropout
        self.qkv = nn.Linear(hidden_size, hidden_size * 3, bias=qkv_bias)
        self.proj = nn.Linear(hidden_size, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.relative_position_grid = relative_position_grid
        if relative_position_grid is not None:
            table_side = 2 * relative_position_grid - 1
            self.relative_position_bias_table = nn.Parameter(torch.zeros(table_side * table_side, num_heads))

    def relative_position_bias(self, position_index: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
        """Bias `(num_heads, n, n)` or `(batch_size, num_heads, n, n)` for a `relative_position_index` of the
        `grid_size` grid (optionally gathered to the visible tokens); the table is resized bicubically for a grid
        other than the one it was trained on."""
        table = self.relative_position_bias_table
        height, width = grid_size
        if (height, width) != (self.relative_position_grid,) * 2:
            side = 2 * self.relative_position_grid - 1
            table = table.T.reshape(1, self.num_heads, side, side)
            table = F.interpolate(table, size=(2 * height - 1, 2 * width - 1), mode="bicubic", align_corners=False)
            table = table.reshape(self.num_heads, -1).T
        bias = table[position_index]  # (..., n, n, num_heads)
        return bias.movedim(-1, -3)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_index: Optional[torch.Tensor] = None,
        grid_size: Optional[tuple[int, int]] = None,
        output_attentions: bool = False,
        attention_mask: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        batch_size, seq_len, hidden_size = hidden_states.shape
        qkv = self.qkv(hidden_states).reshape(batch_size, seq_len, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)

        bias = None
        if position_index is not None and self.relative_position_grid is not None:
            bias = self.relative_position_bias(position_index, grid_size).to(query.dtype)
        if attention_mask is not None:
            bias = attention_mask if bias is None else bias + attention_mask

        dropout = self.attention_dropout if self.training else 0.0
        if output_attentions:
            scores = (query * self.scale) @ key.transpose(-2, -1)
            if bias is not None:
                scores = scores + bias
            probs = scores.softmax(dim=-1)
            context = F.dropout(probs, dropout, self.training) @ value
        else:
            probs = None
            context = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, dropout_p=dropout)

        context = context.transpose(1, 2).reshape(batch_size, seq_len, hidden_size)
        return self.dropout(self.proj(context)), probs


class HiViTMAEMLP(nn.Module):
    """`(..., hidden_size)` -> `(..., hidden_size)` through a `mlp_ratio` times wider hidden layer."""

    def __init__(self, hidden_size: int, mlp_ratio: float, hidden_act: str, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, int(hidden_size * mlp_ratio))
        self.act = ACT2FN[hidden_act]
        self.fc2 = nn.Linear(int(hidden_size * mlp_ratio), hidden_size)
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.act(self.fc1(hidden_states))))


class HiViTMAELayer(GradientCheckpointingLayer):
    """Pre-norm transformer block: `x + attention(norm1(x))`, then `x + mlp(norm2(x))`, each branch with optional
    layer scale and drop path. HiViT's stem blocks are the same block without attention (`num_heads=0`); they act on
    `(..., hidden_size)` tensors of any leading shape. The MAE decoder uses it too.
    """

    def __init__(
        self,
        config: HiViTMAEConfig,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float,
        qkv_bias: bool = True,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        drop_path_rate: float = 0.0,
        layer_scale_init_value: float = 0.0,
        relative_position_grid: Optional[int] = None,
    ):
        super().__init__()
        self.norm1 = self.attention = self.layer_scale1 = None
        if num_heads > 0:
            self.norm1 = nn.LayerNorm(hidden_size, eps=config.layer_norm_eps)
            self.attention = HiViTMAEAttention(
                hidden_size, num_heads, qkv_bias, attention_dropout, dropout, relative_position_grid
            )
            self.layer_scale1 = (
                HiViTMAELayerScale(hidden_size, layer_scale_init_value) if layer_scale_init_value > 0 else None
            )
        self.norm2 = nn.LayerNorm(hidden_size, eps=config.layer_norm_eps)
        self.mlp = HiViTMAEMLP(hidden_size, mlp_ratio, config.hidden_act, dropout)
        self.layer_scale2 = (
            HiViTMAELayerScale(hidden_size, layer_scale_init_value) if layer_scale_init_value > 0 else None
        )
        self.drop_path = HiViTMAEDropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_index: Optional[torch.Tensor] = None,
        grid_size: Optional[tuple[int, int]] = None,
        output_attentions: bool = False,
        attention_mask: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        probs = None
        if self.attention is not None:
            attended, probs = self.attention(
                self.norm1(hidden_states), position_index, grid_size, output_attentions, attention_mask
            )
            if self.layer_scale1 is not None:
                attended = self.layer_scale1(attended)
            hidden_states = hidden_states + self.drop_path(attended)
        transformed = self.mlp(self.norm2(hidden_states))
        if self.layer_scale2 is not None:
            transformed = self.layer_scale2(transformed)
        return hidden_states + self.drop_path(transformed), probs


class HiViTMAEPatchMerge(nn.Module):
    """Merges each 2x2 group of stem tokens inside a patch and doubles the width:
    `(batch_size, num_patches, inner, inner, dim)` -> `(batch_size, num_patches, inner / 2, inner / 2, 2 * dim)`."""

    def __init__(self, hidden_size: int, layer_norm_eps: float):
        super().__init__()
        self.layernorm = nn.LayerNorm(4 * hidden_size, eps=layer_norm_eps)
        self.reduction = nn.Linear(4 * hidden_size, 2 * hidden_size, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch_size, num_patches, inner, _, dim = hidden_states.shape
        # mmpretrain (like Swin) concatenates the 2x2 neighbours in (row, col) order (0, 0), (1, 0), (0, 1), (1, 1),
        # i.e. column offset major: one permute gives that layout with a single copy instead of four slices.
        merged = hidden_states.reshape(batch_size, num_patches, inner // 2, 2, inner // 2, 2, dim)
        merged = merged.permute(0, 1, 2, 4, 5, 3, 6).reshape(batch_size, num_patches, inner // 2, inner // 2, 4 * dim)
        return self.reduction(self.layernorm(merged))


class HiViTMAEStemStage(nn.Module):
    """One stem stage: `2 * depth` MLP blocks on the stem tokens, then a patch merge. [`HiViTMAEModel.iter_blocks`]
    runs the blocks one after the other, so that no reference holds a stage's input for the whole stage."""

    def __init__(self, config: HiViTMAEConfig, stage: int, drop_path_rates: list[float]):
        super().__init__()
        hidden_size = config.stage_hidden_sizes[stage]
        self.blocks = nn.ModuleList(
            [
                HiViTMAELayer(
                    config,
                    hidden_size,
                    num_heads=0,
                    mlp_ratio=config.stem_mlp_ratio,
                    dropout=config.hidden_dropout_prob,
                    drop_path_rate=rate,
                    layer_scale_init_value=config.layer_scale_init_value,
                )
                for rate in drop_path_rates
            ]
        )
        self.merge = HiViTMAEPatchMerge(hidden_size, config.layer_norm_eps)


class HiViTMAEEncoder(nn.Module):
    """The main stage: `depths[-1]` transformer layers on one token per visible patch (run by
    [`HiViTMAEModel.iter_blocks`])."""

    def __init__(self, config: HiViTMAEConfig, drop_path_rates: list[float]):
        super().__init__()
        grid = config.image_size // config.patch_size if config.use_relative_position_bias else None
        self.layers = nn.ModuleList(
            [
                HiViTMAELayer(
                    config,
                    config.hidden_size,
                    num_heads=config.num_attention_heads,
                    mlp_ratio=config.mlp_ratio,
                    qkv_bias=config.qkv_bias,
                    dropout=config.hidden_dropout_prob,
                    attention_dropout=config.attention_probs_dropout_prob,
                    drop_path_rate=rate,
                    layer_scale_init_value=config.layer_scale_init_value,
                    relative_position_grid=grid,
                )
                for rate in drop_path_rates
            ]
        )


class HiViTMAEWindows:
    """ViTDet-style window partition of a `grid_size` patch grid into `window_size x window_size` windows, the grid
    zero-padded at the bottom and right to whole windows; with `mask_padding`, an additive attention mask keeps the
    padding out of every window's attention (the original detection backbone lets it take part)."""

    def __init__(self, grid_size: tuple[int, int], window_size: int, mask_padding: bool, dtype, device):
        self.grid_size, self.window_size = grid_size, window_size
        height, width = grid_size
        self.padded_size = (-(-height // window_size) * window_size, -(-width // window_size) * window_size)
        self.attention_mask = None
        if mask_padding and self.padded_size != grid_size:
            real = torch.ones(1, height * width, 1, dtype=dtype, device=device)
            real = self.partition(real)[..., 0] > 0  # (num_windows, window_size ** 2)
            mask = torch.zeros(real.shape, dtype=dtype, device=device).masked_fill(~real, float("-inf"))
            self.attention_mask = mask[:, None, None, :]

    def partition(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`(batch_size, height * width, dim)`, patches in raster order -> `(batch_size * num_windows,
        window_size ** 2, dim)`."""
        batch_size, _, dim = hidden_states.shape
        (height, width), (padded_h, padded_w), size = self.grid_size, self.padded_size, self.window_size
        grid = hidden_states.view(batch_size, height, width, dim)
        grid = F.pad(grid, (0, 0, 0, padded_w - width, 0, padded_h - height))
        windows = grid.view(batch_size, padded_h // size, size, padded_w // size, size, dim).transpose(2, 3)
        return windows.reshape(-1, size * size, dim)

    def unpartition(self, windows: torch.Tensor) -> torch.Tensor:
        """Inverse of [`partition`], the padding cropped: `(batch_size, height * width, dim)`."""
        (height, width), (padded_h, padded_w), size = self.grid_size, self.padded_size, self.window_size
        dim = windows.shape[-1]
        grid = windows.view(-1, padded_h // size, padded_w // size, size, size, dim).transpose(2, 3)
        grid = grid.reshape(-1, padded_h, padded_w, dim)[:, :height, :width]
        return grid.reshape(-1, height * width, dim)

    def batch_mask(self, batch_size: int) -> Optional[torch.Tensor]:
        """The attention mask of `batch_size` images' windows, `(batch_size * num_windows, 1, 1, window_size ** 2)`,
        or `None` when nothing is masked."""
        return None if self.attention_mask is None else self.attention_mask.repeat(batch_size, 1, 1, 1)


def random_masking(noise: torch.Tensor, num_keep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MAE's per-sample random masking from `noise` `(batch_size, num_patches)`: the `num_keep` patches with the
    smallest noise stay visible, in ascending-noise order. Returns `ids_keep` `(batch_size, num_keep)`,
    `ids_restore` `(batch_size, num_patches)` and the 0/1 `mask` `(batch_size, num_patches)` (1 = masked)."""
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones_like(noise)
    mask[:, :num_keep] = 0
    return ids_shuffle[:, :num_keep], ids_restore, torch.gather(mask, 1, ids_restore)


class HiViTMAEEncoderStep(NamedTuple):
    """One state of the encoder, as [`HiViTMAEModel.iter_blocks`] yields it."""

    stage: int
    """Stage index: `0 .. len(depths) - 2` the stem stages, `len(depths) - 1` the main stage."""
    block: int
    """Blocks of the stage that have run: 0 for the stage's input, the stage's block count for its output."""
    hidden_states: torch.Tensor
    attentions: Optional[torch.Tensor] = None
    """Attention probabilities of the main-stage layer that just ran, when asked for."""


class HiViTMAEPreTrainedModel(PreTrainedModel):
    """Base class of the HiViT-MAE models: weight initialisation, and a `from_pretrained` that refuses weights that do
    not fit the config.

    What a folder may lack or hold beyond a model's weights is declared per class with transformers' own attributes:
    keys matching a pattern of `_keys_to_ignore_on_load_missing` may start newly initialised (a subclass declares its
    new layers there, e.g. per-level norms of a backbone), keys matching `_keys_to_ignore_on_load_unexpected` may be
    left out (the decoder when the encoder is loaded alone). Each class declares its own patterns: those of a
    sub-model (the encoder inside a task model) do not carry over, as in transformers 4 (transformers 5 would merge
    them, and the encoder's "leave the decoder out" would then hide a decoder of another depth).
    """

    config_class = HiViTMAEConfig
    base_model_prefix = "hivit"
    main_input_name = "pixel_values"
    supports_gradient_checkpointing = True
    _no_split_modules = ["HiViTMAELayer", "HiViTMAEPatchMerge"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module):
        """mmpretrain's MAE-HiViT initialisation: `MAEHiViT.init_weights` re-applies HiViT's truncated normal to the
        encoder's linear layers after the config's Xavier, so only the decoder's linear layers end up Xavier-uniform;
        the patch projection is Xavier-uniform on its flattened `(out, in * k * k)` view with PyTorch's default
        bias; position tables are fixed 2-D sin-cos; the mask token is normal(0.02); LayerNorms are 1 / 0."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, HiViTMAELayerScale):
            init.constant_(module.lambda1, module.init_value)
        elif isinstance(module, HiViTMAEAttention) and module.relative_position_grid is not None:
            init.trunc_normal_(module.relative_position_bias_table, std=0.02)
        elif isinstance(module, nn.Conv2d):  # the patch projection
            fan_out, fan_in = module.weight.shape[0], module.weight[0].numel()
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            init.uniform_(module.weight, -bound, bound)
            init.uniform_(module.bias, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
        elif isinstance(module, HiViTMAEModel) and module.position_embeddings is not None:
            table = get_2d_sincos_position_embedding(
                self.config.image_size // self.config.patch_size, self.config.hidden_size
            )
            _copy(module.position_embeddings, table)
        elif isinstance(module, HiViTMAEDecoder):
            # Runs after the children (post-order), so it overrides their truncated normal.
            for linear in module.modules():
                if isinstance(linear, nn.Linear):
                    init.xavier_uniform_(linear.weight)
                    init.zeros_(linear.bias)
            init.normal_(module.mask_token, std=std)
            table = get_2d_sincos_position_embedding(
                self.config.image_size // self.config.patch_size,
                self.config.decoder_hidden_size,
                add_cls_token=self.config.decoder_first_token_as_cls,
            )
            _copy(module.decoder_pos_embed, table)

    def post_init(self):
        super().post_init()
        # transformers >= 5 adds the sub-models' ignore patterns to this model's (see the class docstring). Keep the
        # container type each version adds to: 5.x a set (`|`), 4.x the class's list (`+`).
        for name in ("_keys_to_ignore_on_load_missing", "_keys_to_ignore_on_load_unexpected"):
            own = getattr(type(self), name) or ()
            setattr(self, name, set(own) if isinstance(getattr(self, name), set) else list(own))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        r"""
        As [`~PreTrainedModel.from_pretrained`], but a folder whose config (its `config.json`, or the `config` passed)
        does not describe its weights is an error instead of a model with newly initialised layers: another depth,
        width, decoder depth, or relative position bias or layer scale switched on or off. The `ValueError` names the
        weights that are missing, unexpected or of another shape.

        Allowed, besides what the class declares (see [`HiViTMAEPreTrainedModel`]):

        - a *head* (a top-level module besides the encoder `hivit`) that the folder holds no weights for at all starts
          newly initialised, with a warning: the classifier on an encoder or pre-training folder, the decoder on an
          encoder-only folder. A head the folder holds only some weights for (another decoder depth) is an error.
        - weights of another shape only with `ignore_mismatched_sizes=True`, which re-initialises them (a classifier
          for other classes).

        `output_loading_info=True` returns `(model, loading_info)` as usual; newly initialised heads are listed in
        its `missing_keys`.
        """
        output_loading_info = kwargs.pop("output_loading_info", False)
        ignore_mismatched_sizes = kwargs.pop("ignore_mismatched_sizes", False)
        # Shapes are compared by transformers only when told to ignore mismatches (4.x raises on the first otherwise,
        # 5.x refers to a logged table); they are judged below, together with missing and unexpected weights.
        model, info = super().from_pretrained(
            pretrained_model_name_or_path,
            *model_args,
            output_loading_info=True,
            ignore_mismatched_sizes=True,
            **kwargs,
        )
        model._check_loaded_weights(pretrained_model_name_or_path, info, ignore_mismatched_sizes)
        return (model, info) if output_loading_info else model

    def _check_loaded_weights(self, source, info: dict, ignore_mismatched_sizes: bool):
        """Raise a `ValueError` for weights in `info` (`from_pretrained`'s loading info) that do not fit this model;
        warn about heads that start newly initialised."""

        def undeclared(keys, patterns):
            return {key for key in keys if not any(re.search(pattern, key) for pattern in patterns or ())}

        model_keys = list(self.state_dict())
        missing = undeclared(info["missing_keys"], self._keys_to_ignore_on_load_missing)
        unexpected = undeclared(info["unexpected_keys"], self._keys_to_ignore_on_load_unexpected)
        mismatched = [] if ignore_mismatched_sizes else sorted(info["mismatched_keys"], key=str)

        new_heads = []
        heads = [] if self.base_model is self else self.named_children()  # the encoder alone has no heads
        for name, head in heads:
            head_keys = {f"{name}.{key}" for key in head.state_dict()}
            if head is not self.base_model and head_keys and head_keys <= missing:
                missing -= head_keys
                new_heads.append(name)
        if not (missing or unexpected or mismatched):
            for name in new_heads:
                logger.warning(
                    f"{type(self).__name__}: {source} holds no `{name}` weights; `{name}` is newly initialised and "
                    "must be trained before its outputs mean anything."
                )
            return

        def under(prefix, keys):
            return [key for key in keys if key == prefix or key.startswith(prefix + ".")]

        def wholly_missing(prefix):
            return set(under(prefix, model_keys)) <= missing

        # Loading the encoder alone, transformers 5 reports unexpected keys under the task model's prefix.
        prefixed_keys = model_keys + [f"{self.base_model_prefix}.{key}" for key in model_keys]

        def not_in_model(prefix):
            return not under(prefix, prefixed_keys)

        problems = []
        if missing:
            problems.append(f"missing from the weights: {_summarise(missing, wholly_missing)}")
        if unexpected:
            problems.append(f"in the weights but not in the model: {_summarise(unexpected, not_in_model)}")
        if mismatched:  # (key, weights' shape, model's shape) in transformers 5, the key alone in 4.x
            shown = [
                f"{entry[0]} {tuple(entry[1])} in the weights, {tuple(entry[2])} in the model"
                if isinstance(entry, tuple)
                else entry
                for entry in mismatched
            ]
            problems.append(
                f"of another shape: {', '.join(shown[:3])}{f' and {len(shown) - 3} more' if len(shown) > 3 else ''} "
                "(ignore_mismatched_sizes=True re-initialises them on purpose, e.g. a classifier for other classes)"
            )
        raise ValueError(
            f"{type(self).__name__}: the weights in {source} do not fit its config; {'; '.join(problems)}. "
            "config.json (or the config passed to from_pretrained) does not match the weights: load them with the "
            "config they were saved with"
        )


def _summarise(keys: set[str], whole: Callable[[str], bool]) -> str:
    """`keys` shortened to the modules they belong to: the shortest dotted prefix of each for which `whole(prefix)`
    holds (`hivit.encoder.layers.2` for all of that layer's weights), at most six listed."""
    groups = []
    for key in sorted(keys):
        parts = key.split(".")
        prefixes = (".".join(parts[:end]) for end in range(1, len(parts) + 1))
        group = next((prefix for prefix in prefixes if whole(prefix)), key)
        if group not in groups:
            groups.append(group)
    more = f" and {len(groups) - 6} more" if len(groups) > 6 else ""
    return f"{', '.join(groups[:6])}{more} ({len(keys)} tensor{'s' if len(keys) > 1 else ''})"


def _copy(parameter: nn.Parameter, value: torch.Tensor):
    if hasattr(init, "copy_"):  # transformers >= 5: skips a parameter loaded from a checkpoint
        init.copy_(parameter, value)
    else:
        with torch.no_grad():
            parameter.copy_(value)


def check_pixel_values(pixel_values: torch.Tensor, config: HiViTMAEConfig):
    """Raise a `ValueError` naming what is wrong with `pixel_values` for this config."""
    if not isinstance(pixel_values, torch.Tensor):
        raise ValueError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
    if pixel_values.ndim != 4:
        raise ValueError(
            f"pixel_values must have shape (batch_size, num_channels, height, width), got {tuple(pixel_values.shape)}"
        )
    _, channels, height, width = pixel_values.shape
    if channels != config.num_channels:
        raise ValueError(
            f"pixel_values has {channels} channels but the model expects num_channels={config.num_channels}"
        )
    if height == 0 or width == 0 or height % config.patch_size or width % config.patch_size:
        raise ValueError(
            f"Image size {height}x{width} is not a positive multiple of the patch size {config.patch_size} in both "
            "dimensions; resize or crop the images (the image processor of a converted model does this)"
        )


class HiViTMAEModel(HiViTMAEPreTrainedModel):
    """The HiViT encoder (mmpretrain's `MAEHiViT`). By default it does not mask: it returns features of every patch,
    deterministically, for feature extraction and fine-tuning. `add_hifeat_layernorm=False` leaves out the
    `config.use_hifeat` output norm, for models that read the stages themselves ([`HiViTMAEBackbone`])."""

    # The encoder loads from pre-training and classifier folders alike, leaving their heads out.
    _keys_to_ignore_on_load_unexpected = [r"^decoder\.", r"^fc_norm\.", r"^classifier\."]

    def __init__(self, config: HiViTMAEConfig, add_hifeat_layernorm: bool = True):
        super().__init__(config)
        stem_blocks = [2 * depth for depth in config.depths[:-1]]
        rates = torch.linspace(0, config.drop_path_rate, sum(stem_blocks) + config.depths[-1]).tolist()
        self.patch_embeddings = HiViTMAEPatchEmbeddings(config)
        self.stem = nn.ModuleList()
        for stage, num_blocks in enumerate(stem_blocks):
            start = sum(stem_blocks[:stage])
            self.stem.append(HiViTMAEStemStage(config, stage, rates[start : start + num_blocks]))
        self.position_embeddings = None
        if config.use_absolute_position_embeddings:
            # Fixed 2-D sin-cos table, not trained (mmpretrain sets requires_grad=False).
            self.position_embeddings = nn.Parameter(
                torch.zeros(1, config.num_patches, config.hidden_size), requires_grad=False
            )
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.encoder = HiViTMAEEncoder(config, rates[sum(stem_blocks) :])
        self.hifeat_layernorm = None
        if config.use_hifeat and add_hifeat_layernorm:
            self.hifeat_layernorm = nn.LayerNorm(config.encoder_output_size, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> HiViTMAEPatchEmbeddings:
        return self.patch_embeddings

    def save_pretrained(self, save_directory, *args, **kwargs):
        """As `PreTrainedModel.save_pretrained`, but an encoder folder never maps `AutoModelForPreTraining`: the
        config may be shared with the pre-training model this encoder came from, and its decoder is not saved."""
        auto_map = getattr(self.config, "auto_map", None)
        if auto_map and "AutoModelForPreTraining" in auto_map:
            self.config.auto_map = {k: v for k, v in auto_map.items() if k != "AutoModelForPreTraining"}
        try:
            return super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            if auto_map is not None:
                self.config.auto_map = auto_map

    def _masking(
        self,
        batch_size: int,
        num_patches: int,
        mask: Union[bool, torch.Tensor, None],
        noise: Optional[torch.Tensor],
        device: torch.device,
    ) -> tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
        """`(ids_keep or None, ids_restore, mask)` for the `mask` argument of `forward`."""
        if noise is not None and mask is not True:
            raise ValueError("noise drives random masking and needs mask=True")
        if mask is None or mask is False:
            ids = torch.arange(num_patches, device=device).expand(batch_size, -1)
            return None, ids, torch.zeros(batch_size, num_patches, device=device)
        if mask is True:
            num_keep = int(num_patches * (1 - self.config.mask_ratio))
            if num_keep < 1:
                raise ValueError(
                    f"mask_ratio={self.config.mask_ratio} leaves no visible patch of the {num_patches} in this image"
                )
            if noise is None:
                noise = torch.rand(batch_size, num_patches, device=device)
            elif noise.shape != (batch_size, num_patches) or not noise.is_floating_point():
                raise ValueError(
                    f"noise must be a float tensor of shape (batch_size, num_patches) = {(batch_size, num_patches)}, "
                    f"got {noise.dtype} {tuple(noise.shape)}"
                )
            return random_masking(noise.to(device), num_keep)
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(
                "mask must be True (random masking), None / False (no masking) or a bool tensor of shape "
                f"(batch_size, num_patches) with True = masked; got {got}"
            )
        if mask.shape != (batch_size, num_patches):
            raise ValueError(
                f"mask has shape {tuple(mask.shape)} but this batch needs (batch_size, num_patches) = "
                f"{(batch_size, num_patches)}"
            )
        counts = mask.sum(dim=1)
        if (counts != counts[0]).any():
            raise ValueError(f"every row of mask must mask the same number of patches, got {counts.tolist()}")
        num_keep = num_patches - int(counts[0])
        if num_keep < 1:
            raise ValueError("mask hides every patch; at least one must stay visible")
        # Visible patches first, each group in patch order.
        ids_shuffle = torch.argsort(mask.to(torch.uint8), dim=1, stable=True).to(device)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        return ids_shuffle[:, :num_keep], ids_restore, mask.to(device=device, dtype=torch.float32)

    def iter_blocks(
        self, pixel_values: torch.Tensor, ids_keep: Optional[torch.Tensor] = None, output_attentions: bool = False
    ) -> collections.abc.Iterator[HiViTMAEEncoderStep]:
        """Run the encoder on `pixel_values` (already checked), keeping only the patches `ids_keep`
        `(batch_size, num_visible_patches)` if given, and yield a [`HiViTMAEEncoderStep`] at every point where a
        model takes features: for each stage (the stem stages, then the main stage) its input (`block=0`: the patch
        embeddings, a patch merge's output, the position-embedded main-stage tokens), then its state after each block
        (`block=k`; with `config.window_size`, the layers not in `config.global_attn_indexes` attend within windows).
        Stem states are `(batch_size, num_visible_patches, inner, inner, stage_hidden_size)`, main-stage states
        `(batch_size, num_visible_patches, hidden_size)`.

        [`HiViTMAEModel`], [`HiViTMAEForImageClassification`] and [`HiViTMAEBackbone`] read their features here. The
        generator holds nothing but the current state, so each block's input is released as soon as the block is done
        unless the caller keeps it (a stage-level call would hold the stage's input, at the stride-4 stage the largest
        tensor of an inference forward).
        """
        if ids_keep is not None and self.config.window_size > 0:
            raise ValueError("window attention (config.window_size > 0) needs every patch: it cannot run masked")
        batch_size, _, height, width = pixel_values.shape
        grid_size = (height // self.config.patch_size, width // self.config.patch_size)
        hidden_states = self.patch_embeddings(pixel_values)
        if ids_keep is not None:
            hidden_states = torch.gather(
                hidden_states, 1, ids_keep[:, :, None, None, None].expand(-1, -1, *hidden_states.shape[2:])
            )
        for stage_index, stage in enumerate(self.stem):
            yield HiViTMAEEncoderStep(stage_index, 0, hidden_states)
            for block_index, block in enumerate(stage.blocks, start=1):
                hidden_states = block(hidden_states)[0]
                yield HiViTMAEEncoderStep(stage_index, block_index, hidden_states)
            hidden_states = stage.merge(hidden_states)
        hidden_states = hidden_states.flatten(2)  # the merges leave a 1x1 inner grid

        legacy = self.config.legacy_position_encoding or self.config.legacy_detection_backbone
        if self.position_embeddings is not None:
            position_embeddings = interpolate_pos_encoding(
                self.position_embeddings, grid_size, hidden_states.shape[1], legacy
            )
            if ids_keep is not None:
                position_embeddings = torch.gather(
                    position_embeddings.expand(batch_size, -1, -1),
                    1,
                    ids_keep[:, :, None].expand(-1, -1, position_embeddings.shape[2]),
                )
            hidden_states = hidden_states + position_embeddings
        hidden_states = self.dropout(hidden_states)

        position_index = None
        # mmpretrain's masked path calls the main blocks without `rpe_index`, so no relative position bias there.
        if self.config.use_relative_position_bias and (ids_keep is None or not legacy):
            position_index = relative_position_index(*grid_size, device=hidden_states.device)
            if ids_keep is not None:
                position_index = position_index[ids_keep[:, :, None], ids_keep[:, None, :]]

        windows = window_position_index = window_mask = None
        if self.config.window_size > 0:
            size = self.config.window_size
            windows = HiViTMAEWindows(
                grid_size, size, not self.config.legacy_detection_backbone, hidden_states.dtype, hidden_states.device
            )
            window_mask = windows.batch_mask(batch_size)
            if self.config.use_relative_position_bias:
                window_position_index = relative_position_index(size, size, device=hidden_states.device)

        main_stage = len(self.stem)
        yield HiViTMAEEncoderStep(main_stage, 0, hidden_states)
        for block_index, layer in enumerate(self.encoder.layers):
            if windows is None or block_index in self.config.global_attn_indexes:
                hidden_states, probs = layer(hidden_states, position_index, grid_size, output_attentions)
            else:
                hidden_states, probs = layer(
                    windows.partition(hidden_states),
                    window_position_index,
                    (windows.window_size,) * 2,
                    output_attentions,
                    window_mask,
                )
                hidden_states = windows.unpartition(hidden_states)
            yield HiViTMAEEncoderStep(main_stage, block_index + 1, hidden_states, probs)

    def forward(
        self,
        pixel_values: torch.Tensor,
        mask: Union[bool, torch.Tensor, None] = None,
        noise: Optional[torch.Tensor] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
    ) -> Union[tuple, HiViTMAEModelOutput]:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
                Normalised images; height and width must be multiples of `config.patch_size`.
            mask (`bool` or `torch.BoolTensor` of shape `(batch_size, num_patches)`, *optional*):
                `None` / `False`: no masking (the default here). `True`: random masking at `config.mask_ratio`. A
                bool tensor: exactly this mask, `True` = masked, with the same number of masked patches per row.
            noise (`torch.FloatTensor` of shape `(batch_size, num_patches)`, *optional*):
                Makes random masking deterministic: the patches with the smallest noise stay visible.
        """
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        check_pixel_values(pixel_values, self.config)

        batch_size, _, height, width = pixel_values.shape
        grid_size = (height // self.config.patch_size, width // self.config.patch_size)
        num_patches = grid_size[0] * grid_size[1]
        ids_keep, ids_restore, mask = self._masking(batch_size, num_patches, mask, noise, pixel_values.device)

        all_hidden_states, all_attentions, stem_outputs = [], [], []
        for step in self.iter_blocks(pixel_values, ids_keep, output_attentions):
            if step.stage < len(self.stem):
                if step.block < len(self.stem[step.stage].blocks):
                    continue  # only a stem stage's output (before its merge) is a hidden state
                if self.hifeat_layernorm is not None:
                    stem_outputs.append(step.hidden_states.flatten(2))  # (inner row, inner column, channel) per patch
            elif output_attentions and step.block > 0:
                all_attentions.append(step.attentions)
            if output_hidden_states:
                all_hidden_states.append(step.hidden_states)
        hidden_states = step.hidden_states
        if self.hifeat_layernorm is not None:
            hidden_states = self.hifeat_layernorm(torch.cat([*stem_outputs, hidden_states], dim=-1))

        reshaped = None
        if output_hidden_states and ids_keep is None:
            reshaped = tuple(_to_feature_map(state, grid_size) for state in all_hidden_states)
        outputs = HiViTMAEModelOutput(
            last_hidden_state=hidden_states,
            mask=mask,
            ids_restore=ids_restore,
            hidden_states=tuple(all_hidden_states) if output_hidden_states else None,
            reshaped_hidden_states=reshaped,
            attentions=tuple(all_attentions) if output_attentions else None,
        )
        return outputs if return_dict else outputs.to_tuple()


def _to_feature_map(hidden_states: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
    """`(batch, num_patches, [inner, inner,] dim)` in patch order -> `(batch, dim, height, width)` feature map."""
    batch_size, dim = hidden_states.shape[0], hidden_states.shape[-1]
    inner = hidden_states.shape[2] if hidden_states.ndim == 5 else 1
    grid_h, grid_w = grid_size
    feature_map = hidden_states.reshape(batch_size, grid_h, grid_w, inner, inner, dim)
    return feature_map.permute(0, 5, 1, 3, 2, 4).reshape(batch_size, dim, grid_h * inner, grid_w * inner)


class HiViTMAEDecoder(nn.Module):
    """mmpretrain's `MAEPretrainDecoder`: `(batch_size, num_visible_patches, hidden_size)` encoder features ->
    `(batch_size, num_patches, patch_size ** 2 * num_channels)` predicted pixels in patch order."""

    def __init__(self, config: HiViTMAEConfig):
        super().__init__()
        self.config = config
        width = config.decoder_hidden_size
        self.decoder_embed = nn.Linear(config.encoder_output_size, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        # Fixed sin-cos table; with `decoder_first_token_as_cls` it has the leading all-zero class-token row that
        # mmpretrain keeps.
        num_positions = config.num_patches + int(config.decoder_first_token_as_cls)
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_positions, width), requires_grad=False)
        self.decoder_layers = nn.ModuleList(
            [
                HiViTMAELayer(config, width, config.decoder_num_attention_heads, config.decoder_mlp_ratio)
                for _ in range(config.decoder_num_hidden_layers)
            ]
        )
        self.decoder_norm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.decoder_pred = nn.Linear(width, config.patch_size**2 * config.num_channels)

    def forward(
        self, hidden_states: torch.Tensor, ids_restore: torch.Tensor, grid_size: tuple[int, int]
    ) -> torch.Tensor:
        hidden_states = self.decoder_embed(hidden_states)
        batch_size, num_visible, width = hidden_states.shape
        num_patches = ids_restore.shape[1]
        restore_index = ids_restore[:, :, None].expand(-1, -1, width)
        first_token_as_cls = self.config.decoder_first_token_as_cls
        position_embeddings = interpolate_pos_encoding(
            self.decoder_pos_embed[:, int(first_token_as_cls) :], grid_size, num_patches, legacy=False
        )
        if first_token_as_cls:
            # mmpretrain's decoder was written for ViT: it takes token 0 for a class token, which HiViT does not
            # have. The first visible token goes to the class slot, the rest are shifted one place early, and one
            # extra mask token fills the gap; the class slot is dropped from the output.
            mask_tokens = self.mask_token.expand(batch_size, num_patches + 1 - num_visible, -1)
            tokens = torch.gather(torch.cat([hidden_states[:, 1:], mask_tokens], dim=1), 1, restore_index)
            hidden_states = torch.cat([hidden_states[:, :1], tokens], dim=1)
            position_embeddings = torch.cat([self.decoder_pos_embed[:, :1], position_embeddings], dim=1)
        else:
            mask_tokens = self.mask_token.expand(batch_size, num_patches - num_visible, -1)
            hidden_states = torch.gather(torch.cat([hidden_states, mask_tokens], dim=1), 1, restore_index)
        hidden_states = hidden_states + position_embeddings

        for layer in self.decoder_layers:
            hidden_states = layer(hidden_states)[0]
        if first_token_as_cls:
            hidden_states = hidden_states[:, 1:]  # the class slot predicts nothing (the norm works per token)
        return self.decoder_pred(self.decoder_norm(hidden_states))


class HiViTMAEForPreTraining(HiViTMAEPreTrainedModel):
    """HiViT encoder + MAE decoder + pixel reconstruction loss (mmpretrain's `MAE` with `MAEHiViT`,
    `MAEPretrainDecoder` and `MAEPretrainHead`). By default it masks `config.mask_ratio` of the patches at random."""

    # The encoder of a classifier continues pre-training.
    _keys_to_ignore_on_load_unexpected = [r"^fc_norm\.", r"^classifier\."]

    def __init__(self, config: HiViTMAEConfig):
        super().__init__(config)
        self.hivit = HiViTMAEModel(config)
        self.decoder = HiViTMAEDecoder(config)
        self.post_init()

    def get_input_embeddings(self) -> HiViTMAEPatchEmbeddings:
        return self.hivit.patch_embeddings

    def patchify(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`(batch_size, num_channels, height, width)` -> `(batch_size, num_patches, patch_size ** 2 * num_channels)`,
        each patch flattened as `(row, col, channel)` like mmpretrain's and transformers' MAE."""
        check_pixel_values(pixel_values, self.config)
        batch_size, channels, height, width = pixel_values.shape
        p = self.config.patch_size
        patches = pixel_values.reshape(batch_size, channels, height // p, p, width // p, p)
        patches = torch.einsum("nchpwq->nhwpqc", patches)
        return patches.reshape(batch_size, (height // p) * (width // p), p * p * channels)

    def unpatchify(
        self, patches: torch.Tensor, image_size: Optional[Union[int, tuple[int, int]]] = None
    ) -> torch.Tensor:
        """Inverse of [`patchify`]: `(batch_size, num_patches, patch_size ** 2 * num_channels)` ->
        `(batch_size, num_channels, height, width)`. `image_size` `(height, width)` defaults to a square image."""
        p, channels = self.config.patch_size, self.config.num_channels
        if patches.ndim != 3 or patches.shape[2] != p * p * channels:
            raise ValueError(
                f"patches must have shape (batch_size, num_patches, {p * p * channels}), got {tuple(patches.shape)}"
            )
        batch_size, num_patches = patches.shape[:2]
        if image_size is None:
            side = math.isqrt(num_patches) * p
            image_size = (side, side)
        elif not isinstance(image_size, collections.abc.Iterable):
            image_size = (image_size, image_size)
        height, width = image_size
        if height % p or width % p or (height // p) * (width // p) != num_patches:
            raise ValueError(f"{num_patches} patches of size {p} do not tile an image of size {height}x{width}")
        images = patches.reshape(batch_size, height // p, width // p, p, p, channels)
        images = torch.einsum("nhwpqc->nchpwq", images)
        return images.reshape(batch_size, channels, height, width)

    def forward_loss(self, pixel_values: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error per patch, averaged over the masked patches (over all patches when none is masked:
        mmpretrain divides by zero there)."""
        target = self.patchify(pixel_values)
        if self.config.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = ((logits - target) ** 2).mean(dim=-1)
        num_masked = mask.sum()
        # A select rather than a Python branch keeps the forward free of host syncs and graph breaks.
        return torch.where(num_masked > 0, (loss * mask).sum() / num_masked.clamp(min=1), loss.mean())

    def forward(
        self,
        pixel_values: torch.Tensor,
        mask: Union[bool, torch.Tensor, None] = True,
        noise: Optional[torch.Tensor] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
    ) -> Union[tuple, HiViTMAEForPreTrainingOutput]:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
                Normalised images; height and width must be multiples of `config.patch_size`.
            mask (`bool` or `torch.BoolTensor` of shape `(batch_size, num_patches)`, *optional*, defaults to `True`):
                As in [`HiViTMAEModel.forward`], but masking at random by default.
            noise (`torch.FloatTensor` of shape `(batch_size, num_patches)`, *optional*):
                Makes random masking deterministic.

        Example:

        ```python
        >>> import torch
        >>> from configuration_hivit_mae import HiViTMAEConfig
        >>> from modeling_hivit_mae import HiViTMAEForPreTraining

        >>> model = HiViTMAEForPreTraining(HiViTMAEConfig.from_arch("tiny"))
        >>> outputs = model(torch.randn(2, 3, 224, 224))
        >>> outputs.logits.shape, outputs.mask.sum(dim=1)
        (torch.Size([2, 196, 768]), tensor([147., 147.]))
        ```
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.hivit(
            pixel_values,
            mask=mask,
            noise=noise,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        grid_size = (pixel_values.shape[2] // self.config.patch_size, pixel_values.shape[3] // self.config.patch_size)
        logits = self.decoder(outputs.last_hidden_state, outputs.ids_restore, grid_size)
        loss = self.forward_loss(pixel_values, logits, outputs.mask)
        result = HiViTMAEForPreTrainingOutput(
            loss=loss,
            logits=logits,
            mask=outputs.mask,
            ids_restore=outputs.ids_restore,
            hidden_states=outputs.hidden_states,
            reshaped_hidden_states=outputs.reshaped_hidden_states,
            attentions=outputs.attentions,
        )
        return result if return_dict else result.to_tuple()


class HiViTMAEForImageClassification(HiViTMAEPreTrainedModel):
    """HiViT encoder + average pooling of the encoder's tokens + a linear classifier, as mmpretrain's HiViT
    classification configs (`GlobalAveragePooling` neck, `LinearClsHead`) fine-tune it; with `config.use_fc_norm` a
    LayerNorm between pooling and classifier, as the original HiViT repository's classifier (`fc_norm`). Loads its
    encoder from any HiViT-MAE folder; the classifier starts at truncated normal(0.02) weights and zero bias. It never
    masks. Unlike in pre-training, the absolute position table is trained, as both sources' classifiers do."""

    # A classifier may start from a pre-training folder; the original recipe fine-tunes without `use_hifeat`.
    _keys_to_ignore_on_load_unexpected = [r"^decoder\.", r"^hivit\.hifeat_layernorm\."]
    # mmpretrain's HiViT fine-tuning adds a relative position bias that MAE pre-training does not have.
    _keys_to_ignore_on_load_missing = [r"\.relative_position_bias_table$"]

    def __init__(self, config: HiViTMAEConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.hivit = HiViTMAEModel(config)
        if self.hivit.position_embeddings is not None:
            self.hivit.position_embeddings.requires_grad_(True)
        width = config.encoder_output_size
        self.fc_norm = nn.LayerNorm(width, eps=config.layer_norm_eps) if config.use_fc_norm else None
        self.classifier = nn.Linear(width, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
    ) -> Union[tuple, ImageClassifierOutput]:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
                Normalised images; height and width must be multiples of `config.patch_size`.
            labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
                Class indices for a cross-entropy loss (`config.problem_type` `"single_label_classification"`), or
                float targets for `"regression"` / `"multi_label_classification"`; inferred as in transformers'
                image classifiers when unset.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.hivit(
            pixel_values,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        pooled = outputs.last_hidden_state.mean(dim=1)
        if self.fc_norm is not None:
            pooled = self.fc_norm(pooled)
        logits = self.classifier(pooled)

        loss = None
        if labels is not None:
            labels = labels.to(logits.device)
            if self.config.problem_type is None:
                if self.num_labels == 1:
                    self.config.problem_type = "regression"
                elif labels.dtype in (torch.long, torch.int):
                    self.config.problem_type = "single_label_classification"
                else:
                    self.config.problem_type = "multi_label_classification"
            if self.config.problem_type == "regression":
                loss = F.mse_loss(logits.squeeze(-1), labels.squeeze(-1).to(logits.dtype))
            elif self.config.problem_type == "single_label_classification":
                loss = F.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1))
            else:
                loss = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))

        result = ImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )
        return result if return_dict else result.to_tuple()


class HiViTMAEBackbone(BackboneMixin, HiViTMAEPreTrainedModel):
    """HiViT as a backbone for detection and segmentation, after the original HiViT repository's detection backbone:
    feature maps of the stages in `config.out_features` (by default strides 4, 8, 16 and 32 with `C / 4`, `C / 2`,
    `C` and `C` channels for `C = hidden_size`; the stride-32 map is the last stage's, 2x2 max-pooled), each through
    its own LayerNorm over the channels (the original's `fpn1` .. `fpn4`). Any image size that is a multiple of the
    patch size works; `config.window_size` / `config.global_attn_indexes` give ViTDet-style window attention for
    large inputs, and `config.legacy_detection_backbone` reproduces the original exactly.

    It loads the encoder of any HiViT-MAE folder (pre-training, encoder, classifier); the per-level norms, which only
    a backbone has, then start as LayerNorms do (weight 1, bias 0) and the load says so. As in the original, the
    absolute position table is trained.
    """

    # Heads of the other models, and the norms of levels that a saved backbone returned but this one does not.
    _keys_to_ignore_on_load_unexpected = [
        r"^decoder\.",
        r"^fc_norm\.",
        r"^classifier\.",
        r"hifeat_layernorm\.",
        r"^hidden_states_norms\.",
    ]
    _keys_to_ignore_on_load_missing = [r"^hidden_states_norms\."]

    def __init__(self, config: HiViTMAEConfig):
        super().__init__(config)
        if hasattr(BackboneMixin, "_init_backbone"):  # transformers 4.x: the mixin has no __init__
            self._init_backbone(config)
        self.num_features = config.backbone_channels
        self.hivit = HiViTMAEModel(config, add_hifeat_layernorm=False)
        if self.hivit.position_embeddings is not None:
            self.hivit.position_embeddings.requires_grad_(True)
        channels = dict(zip(self.stage_names, self.num_features))
        self.hidden_states_norms = nn.ModuleDict(
            {stage: nn.LayerNorm(channels[stage], eps=config.layer_norm_eps) for stage in self.out_features}
        )
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """As [`~PreTrainedModel.from_pretrained`]; per-level norms that the folder holds no weights for (all of them
        unless it was saved by a backbone) start newly initialised, and a warning names them."""
        loaded = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        fresh = [stage for stage, norm in model.hidden_states_norms.items() if getattr(norm, "_starts_fresh", False)]
        if fresh:
            logger.warning(
                f"{cls.__name__}: {pretrained_model_name_or_path} holds no weights for the per-level norms "
                f"{', '.join(f'hidden_states_norms.{stage}' for stage in fresh)}; they start newly initialised "
                "(weight 1, bias 0) and are trained with the detection or segmentation head."
            )
        return loaded

    def _init_weights(self, module: nn.Module):
        super()._init_weights(module)
        # Marks what `from_pretrained` initialised rather than loaded: transformers 4.x calls this only for modules
        # it loaded nothing into, 5.x for all but flags each loaded parameter.
        if isinstance(module, nn.LayerNorm) and not getattr(module.weight, "_is_hf_initialized", False):
            module._starts_fresh = True

    @property
    def strides(self) -> list[int]:
        """Stride, in pixels, of each feature map of `out_features`."""
        strides = dict(zip(self.stage_names, self.config.backbone_strides))
        return [strides[stage] for stage in self.out_features]

    def get_input_embeddings(self) -> HiViTMAEPatchEmbeddings:
        return self.hivit.patch_embeddings

    def tap_points(self) -> dict[tuple[int, int], str]:
        """Where each stage's map is taken: `(stage, block)` of [`HiViTMAEModel.iter_blocks`] -> name in
        `stage_names` (the last name, a pooled map, has none)."""
        blocks = [len(stage.blocks) for stage in self.hivit.stem] + [len(self.hivit.encoder.layers)]
        points = [(0, 0)] + [(stage, count) for stage, count in enumerate(blocks)]
        if self.config.legacy_detection_backbone:
            # The original taps `blocks[depths[0] - 1]` and `blocks[depths[0] + depths[1]]` of its flat list of stem
            # blocks and merges (`merge_indices`): after depths[0] blocks of stage 0, and after depths[1] - depths[0]
            # blocks of stage 1 (its input, the first merge's output, when the two are equal).
            first, second = self.config.depths[:2]
            points[1:3] = [(0, first), (1, second - first)]
        return dict(zip(points, self.stage_names))

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        return_dict: Optional[bool] = None,
    ) -> Union[tuple, BackboneOutput]:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
                Normalised images; height and width must be multiples of `config.patch_size`.

        Returns:
            [`~modeling_outputs.BackboneOutput`]: `feature_maps`, one `(batch_size, channels, height / stride,
            width / stride)` map per stage of `out_features` (see `channels` and `strides`); with
            `output_hidden_states`, `hidden_states`: the maps of every stage of `stage_names` before the norms; with
            `output_attentions`, `attentions` as in [`HiViTMAEModelOutput`].

        Example:

        ```python
        >>> import torch
        >>> from configuration_hivit_mae import HiViTMAEConfig
        >>> from modeling_hivit_mae import HiViTMAEBackbone

        >>> backbone = HiViTMAEBackbone(HiViTMAEConfig.from_arch("tiny"))
        >>> feature_maps = backbone(torch.randn(1, 3, 256, 320)).feature_maps
        >>> [tuple(feature_map.shape) for feature_map in feature_maps], backbone.channels, backbone.strides
        ([(1, 96, 64, 80), (1, 192, 32, 40), (1, 384, 16, 20), (1, 384, 8, 10)], [96, 192, 384, 384], [4, 8, 16, 32])
        ```
        """
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        check_pixel_values(pixel_values, self.config)
        grid_size = (pixel_values.shape[2] // self.config.patch_size, pixel_values.shape[3] // self.config.patch_size)

        # Keep only the maps asked for: the stem's are the largest tensors of the forward.
        wanted = set(self.stage_names) if output_hidden_states else set(self.out_features)
        pooled_stage, last_stage = self.stage_names[-1], self.stage_names[-2]
        if pooled_stage in wanted:
            wanted.add(last_stage)
        tap_points = self.tap_points()
        maps, attentions = {}, []
        for step in self.hivit.iter_blocks(pixel_values, output_attentions=output_attentions):
            stage = tap_points.get((step.stage, step.block))
            if stage in wanted:
                maps[stage] = _to_feature_map(step.hidden_states, grid_size)
            if step.attentions is not None:
                attentions.append(step.attentions)
        if pooled_stage in wanted:
            maps[pooled_stage] = F.max_pool2d(maps[last_stage], kernel_size=2, stride=2)

        feature_maps = tuple(
            self.hidden_states_norms[stage](maps[stage].permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            for stage in self.out_features
        )
        outputs = BackboneOutput(
            feature_maps=feature_maps,
            hidden_states=tuple(maps[stage] for stage in self.stage_names) if output_hidden_states else None,
            attentions=tuple(attentions) if output_attentions else None,
        )
        return outputs if return_dict else outputs.to_tuple()


HiViTMAEModel.register_for_auto_class("AutoModel")
HiViTMAEForPreTraining.register_for_auto_class("AutoModelForPreTraining")
HiViTMAEForImageClassification.register_for_auto_class("AutoModelForImageClassification")
HiViTMAEBackbone.register_for_auto_class("AutoBackbone")

__all__ = [
    "HiViTMAEPreTrainedModel",
    "HiViTMAEModel",
    "HiViTMAEForPreTraining",
    "HiViTMAEForImageClassification",
    "HiViTMAEBackbone",
]
