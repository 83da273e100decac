"""HiViT-MAE model configuration."""

from transformers import PretrainedConfig

try:  # transformers >= 5
    from transformers.backbone_utils import BackboneConfigMixin

    get_aligned_output_features_output_indices = None
except ImportError:  # transformers 4.x
    from transformers.utils.backbone_utils import BackboneConfigMixin, get_aligned_output_features_output_indices

# The four HiViT sizes of mmpretrain's `HiViT.arch_zoo` (mmpretrain 1.2.0).
HIVIT_ARCHS = {
    "tiny": {"hidden_size": 384, "depths": [1, 1, 10], "num_attention_heads": 6},
    "small": {"hidden_size": 384, "depths": [2, 2, 20], "num_attention_heads": 6},
    "base": {"hidden_size": 512, "depths": [2, 2, 24], "num_attention_heads": 8},
    "large": {"hidden_size": 768, "depths": [2, 2, 40], "num_attention_heads": 12},
}


# Written into every saved config: the encoder loads from any HiViT-MAE folder, so a folder saved by
# `HiViTMAEForPreTraining` (whose `save_pretrained` adds `AutoModelForPreTraining`) also loads with `AutoModel`.
AUTO_MAP = {
    "AutoConfig": "configuration_hivit_mae.HiViTMAEConfig",
    "AutoModel": "modeling_hivit_mae.HiViTMAEModel",
    "AutoBackbone": "modeling_hivit_mae.HiViTMAEBackbone",
}


class HiViTMAEConfig(BackboneConfigMixin, PretrainedConfig):
    r"""
    Configuration of a HiViT encoder pre-trained with masked autoencoding (mmpretrain's `MAEHiViT` backbone,
    `MAEPretrainDecoder` neck and `MAEPretrainHead` head). The defaults are mmpretrain's MAE-HiViT-base recipe;
    [`HiViTMAEConfig.from_arch`] gives the other sizes.

    HiViT ("HiViT: A Simpler and More Efficient Design of Hierarchical Vision Transformer", ICLR 2023) embeds each
    `patch_size` patch as an `inner_patches x inner_patches` grid of small tokens, runs MLP-only *stem* stages on them
    with patch merging in between, and then a plain ViT *main* stage with one token per patch. Because the stem never
    mixes information across patches, masked patches can be dropped before the stem, exactly as in a ViT-MAE.

    Args:
        hidden_size (`int`, *optional*, defaults to 512):
            Width of the main (last) stage. Stage `i` of `len(depths)` has width
            `hidden_size // 2 ** (len(depths) - 1 - i)`.
        depths (`list[int]`, *optional*, defaults to `[2, 2, 24]`):
            Blocks per stage, as mmpretrain counts them: each stem stage `i < len(depths) - 1` holds
            `2 * depths[i]` MLP blocks, the main stage `depths[-1]` transformer layers.
        num_attention_heads (`int`, *optional*, defaults to 8):
            Attention heads of the main-stage layers.
        stem_mlp_ratio (`float`, *optional*, defaults to 3.0):
            MLP hidden width over input width in the stem blocks.
        mlp_ratio (`float`, *optional*, defaults to 4.0):
            MLP hidden width over input width in the main-stage layers.
        image_size (`int`, *optional*, defaults to 224):
            Pre-training image size; it sets the size of the position tables. Other sizes (multiples of
            `patch_size`) work at run time through interpolation.
        patch_size (`int`, *optional*, defaults to 16):
            Side of the patch that becomes one main-stage token (and one masking unit).
        inner_patches (`int`, *optional*, defaults to 4):
            Side of the grid of stem tokens inside a patch; must equal `2 ** (len(depths) - 1)` so that the patch
            merges reduce it to one token.
        num_channels (`int`, *optional*, defaults to 3):
            Image channels.
        qkv_bias (`bool`, *optional*, defaults to `True`):
            Whether the query/key/value projections of the encoder have a bias.
        hidden_act (`str`, *optional*, defaults to `"gelu"`):
            MLP activation of encoder and decoder.
        hidden_dropout_prob (`float`, *optional*, defaults to 0.0):
            Dropout after the MLPs, the attention projections and the absolute position embedding (mmpretrain's
            `drop_rate`).
        attention_probs_dropout_prob (`float`, *optional*, defaults to 0.0):
            Dropout on the attention probabilities (mmpretrain's `attn_drop_rate`).
        drop_path_rate (`float`, *optional*, defaults to 0.0):
            Stochastic depth, rising linearly over all stem blocks and main layers.
        layer_norm_eps (`float`, *optional*, defaults to 1e-6):
            Epsilon of every LayerNorm.
        use_absolute_position_embeddings (`bool`, *optional*, defaults to `True`):
            Add a (fixed, 2-D sin-cos initialised) absolute position table after the stem (mmpretrain's `ape`).
        use_relative_position_bias (`bool`, *optional*, defaults to `False`):
            Learned relative position bias in every main-stage layer (mmpretrain's `rpe`, used by its HiViT
            classification configs).
        layer_scale_init_value (`float`, *optional*, defaults to 0.0):
            Initial value of the per-channel layer scale; 0 disables layer scale.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the truncated normal that initialises the encoder's linear layers and of the
            normal that initialises the mask token.
        mask_ratio (`float`, *optional*, defaults to 0.75):
            Fraction of patches masked by random masking.
        decoder_hidden_size (`int`, *optional*, defaults to 512):
            Width of the MAE decoder.
        decoder_num_hidden_layers (`int`, *optional*, defaults to 6):
            Layers of the MAE decoder.
        decoder_num_attention_heads (`int`, *optional*, defaults to 16):
            Attention heads of the MAE decoder.
        decoder_mlp_ratio (`float`, *optional*, defaults to 4.0):
            MLP hidden width over input width in the decoder layers.
        norm_pix_loss (`bool`, *optional*, defaults to `True`):
            Reconstruct per-patch normalised pixels, as mmpretrain's MAE-HiViT recipe does.
        use_hifeat (`bool`, *optional*, defaults to `False`):
            Make the encoder output the original HiViT repository's hierarchical features (`hifeat`): the output of
            every stem stage (taken before its patch merge, flattened per patch in (inner row, inner column,
            channel) order) and of the last main-stage layer, concatenated per patch and layer-normalised
            (`hifeat_layernorm`). That is `(2 ** len(depths) - 1) * hidden_size` channels (7 x 512 = 3584 for base),
            and the MAE decoder embeds these. The released MAE-HiViT weights of the original repository use it;
            mmpretrain's `MAEHiViT` does not.
        decoder_first_token_as_cls (`bool`, *optional*, defaults to `True`):
            Reproduce mmpretrain's `MAEPretrainDecoder`, which was written for ViT and assumes a class token in front
            of the visible tokens. HiViT has none, so the first visible token takes the class-token slot (and its
            position embedding, all zeros), the other visible tokens are written one place early in the unshuffled
            sequence, and one extra mask token fills the gap. Weights trained with mmpretrain expect this. `False`
            gives the textbook MAE decoder of the original HiViT repository: every visible token at its own patch
            position, and a decoder position table without the class row (`num_patches` rows).
        legacy_position_encoding (`bool`, *optional*, defaults to `True`):
            Reproduce how mmpretrain's `MAEHiViT` encodes positions: the absolute table is resampled (bicubic, with
            DINO's `+0.1` scale-factor trick) whenever the number of tokens differs from the table's, so on the
            masked path even at the pre-training size; and the masked path applies no relative position bias.
            `False`: the table is used as stored (gathered to the visible patches) and resampled only when the patch
            grid differs, to exactly that grid, and the relative position bias is applied among the visible tokens
            too, as the original HiViT repository does.
        use_fc_norm (`bool`, *optional*, defaults to `False`):
            In [`HiViTMAEForImageClassification`], layer-normalise the pooled features before the classifier (the
            original repository's `fc_norm`, used by its fine-tuning recipe). mmpretrain's HiViT classifier has no
            such norm.
        window_size (`int`, *optional*, defaults to 0):
            Side, in patches, of the windows that the main-stage layers attend within (ViTDet-style window attention
            for large inputs; the patch grid is zero-padded to whole windows and the padding is masked out of
            attention). 0 attends globally in every layer. It needs every patch, so it rules out masking.
        global_attn_indexes (`list[int]`, *optional*, defaults to `[]`):
            Main-stage layers (0-based) that attend globally although `window_size` is set.
        legacy_detection_backbone (`bool`, *optional*, defaults to `False`):
            Reproduce the original HiViT repository's detection backbone exactly: [`HiViTMAEBackbone`] takes its
            stride-4 map half-way through the first stem stage (after `depths[0]` of its blocks) and its stride-8 map
            after `depths[0] + depths[1] + 1` of the stem's blocks and merges (right after the first patch merge when
            `depths[0] == depths[1]`) instead of at the stage ends; the padding of the windows takes part in attention;
            and the position table is resized with a scale factor, as `legacy_position_encoding` does. Needs three
            stages and `depths[1] >= depths[0]`.
        out_features (`list[str]`, *optional*):
            Stages whose feature maps [`HiViTMAEBackbone`] returns, from `stage_names`: `"stem"` (the patch
            embeddings, stride 4), `"stage1"` .. `"stage{len(depths)}"` (the output of each stage, stride 4, 8, 16 for
            three stages) and `"stage{len(depths) + 1}"` (the last stage 2x2 max-pooled, stride 32). Defaults to all
            but `"stem"`, the original repository's four levels.
        out_indices (`list[int]`, *optional*):
            The same stages by index into `stage_names`; set either.

    Example:

    ```python
    >>> from configuration_hivit_mae import HiViTMAEConfig
    >>> from modeling_hivit_mae import HiViTMAEForPreTraining

    >>> config = HiViTMAEConfig.from_arch("tiny")
    >>> model = HiViTMAEForPreTraining(config)
    ```
    """

    model_type = "hivit_mae"

    def __init__(
        self,
        hidden_size=512,
        depths=(2, 2, 24),
        num_attention_heads=8,
        stem_mlp_ratio=3.0,
        mlp_ratio=4.0,
        image_size=224,
        patch_size=16,
        inner_patches=4,
        num_channels=3,
        qkv_bias=True,
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        drop_path_rate=0.0,
        layer_norm_eps=1e-6,
        use_absolute_position_embeddings=True,
        use_relative_position_bias=False,
        layer_scale_init_value=0.0,
        initializer_range=0.02,
        mask_ratio=0.75,
        decoder_hidden_size=512,
        decoder_num_hidden_layers=6,
        decoder_num_attention_heads=16,
        decoder_mlp_ratio=4.0,
        norm_pix_loss=True,
        use_hifeat=False,
        decoder_first_token_as_cls=True,
        legacy_position_encoding=True,
        use_fc_norm=False,
        window_size=0,
        global_attn_indexes=(),
        legacy_detection_backbone=False,
        out_features=None,
        out_indices=None,
        **kwargs,
    ):
        self.hidden_size = hidden_size
        self.depths = list(depths)
        self.num_attention_heads = num_attention_heads
        self.stem_mlp_ratio = stem_mlp_ratio
        self.mlp_ratio = mlp_ratio
        self.image_size = image_size
        self.patch_size = patch_size
        self.inner_patches = inner_patches
        self.num_channels = num_channels
        self.qkv_bias = qkv_bias
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.drop_path_rate = drop_path_rate
        self.layer_norm_eps = layer_norm_eps
        self.use_absolute_position_embeddings = use_absolute_position_embeddings
        self.use_relative_position_bias = use_relative_position_bias
        self.layer_scale_init_value = layer_scale_init_value
        self.initializer_range = initializer_range
        self.mask_ratio = mask_ratio
        self.decoder_hidden_size = decoder_hidden_size
        self.decoder_num_hidden_layers = decoder_num_hidden_layers
        self.decoder_num_attention_heads = decoder_num_attention_heads
        self.decoder_mlp_ratio = decoder_mlp_ratio
        self.norm_pix_loss = norm_pix_loss
        self.use_hifeat = use_hifeat
        self.decoder_first_token_as_cls = decoder_first_token_as_cls
        self.legacy_position_encoding = legacy_position_encoding
        self.use_fc_norm = use_fc_norm
        self.window_size = window_size
        self.global_attn_indexes = list(global_attn_indexes)
        self.legacy_detection_backbone = legacy_detection_backbone
        kwargs.setdefault("auto_map", dict(AUTO_MAP))
        kwargs.pop("stage_names", None)  # derived from depths
        super().__init__(**kwargs)
        self.validate_architecture()
        self.stage_names = ["stem"] + [f"stage{index}" for index in range(1, self.num_stages + 2)]
        if out_features is None and out_indices is None:
            out_features = self.stage_names[1:]
        out_indices = list(out_indices) if out_indices is not None else None
        if get_aligned_output_features_output_indices is None:
            self.set_output_features_output_indices(out_features, out_indices)
        else:
            self._out_features, self._out_indices = get_aligned_output_features_output_indices(
                out_features=out_features, out_indices=out_indices, stage_names=self.stage_names
            )

    @classmethod
    def from_arch(cls, arch: str, **kwargs) -> "HiViTMAEConfig":
        """The configuration of one of mmpretrain's HiViT sizes (`"tiny"`, `"small"`, `"base"`, `"large"`) with
        mmpretrain's MAE-HiViT decoder; `kwargs` override any field."""
        if arch not in HIVIT_ARCHS:
            raise ValueError(f"Unknown HiViT arch {arch!r}; choose one of {sorted(HIVIT_ARCHS)}.")
        return cls(**{**HIVIT_ARCHS[arch], **kwargs})

    @property
    def num_stages(self) -> int:
        return len(self.depths)

    @property
    def stage_hidden_sizes(self) -> list[int]:
        """Width of each stage, from the first stem stage to the main stage."""
        return [self.hidden_size // 2 ** (self.num_stages - 1 - i) for i in range(self.num_stages)]

    @property
    def encoder_output_size(self) -> int:
        """Channels of the encoder's `last_hidden_state`: `hidden_size`, or with `use_hifeat` the stem stages'
        flattened outputs (`inner ** 2 * width` each) plus the main stage's, `(2 ** len(depths) - 1) * hidden_size`."""
        if not self.use_hifeat:
            return self.hidden_size
        return (2**self.num_stages - 1) * self.hidden_size

    @property
    def backbone_channels(self) -> list[int]:
        """Channels of the feature map of each of `stage_names`."""
        return [self.stage_hidden_sizes[0], *self.stage_hidden_sizes, self.hidden_size]

    @property
    def backbone_strides(self) -> list[int]:
        """Stride, in pixels, of the feature map of each of `stage_names`."""
        first = self.patch_size // self.inner_patches
        return [first] + [first * 2**stage for stage in range(self.num_stages)] + [2 * self.patch_size]

    @property
    def num_patches(self) -> int:
        """Patches at `image_size`: the length of the position tables."""
        return (self.image_size // self.patch_size) ** 2

    def validate_architecture(self):
        """Raise a `ValueError` naming the first inconsistent hyper-parameter."""

        def check(condition, message):
            if not condition:
                raise ValueError(f"Invalid HiViTMAEConfig: {message}")

        check(
            len(self.depths) >= 1 and all(isinstance(d, int) and d > 0 for d in self.depths),
            f"depths must be a non-empty list of positive integers, got {self.depths}",
        )
        check(
            self.hidden_size % 2 ** (self.num_stages - 1) == 0,
            f"hidden_size={self.hidden_size} must be divisible by 2 ** (len(depths) - 1) = "
            f"{2 ** (self.num_stages - 1)} so that every stage has an integer width",
        )
        check(
            self.hidden_size % self.num_attention_heads == 0,
            f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}",
        )
        check(
            self.decoder_hidden_size % self.decoder_num_attention_heads == 0,
            f"decoder_hidden_size={self.decoder_hidden_size} is not divisible by "
            f"decoder_num_attention_heads={self.decoder_num_attention_heads}",
        )
        for name in ("hidden_size", "decoder_hidden_size"):
            check(getattr(self, name) % 4 == 0, f"{name}={getattr(self, name)} must be divisible by 4 (2-D sin-cos)")
        check(
            self.inner_patches == 2 ** (self.num_stages - 1),
            f"inner_patches={self.inner_patches} must be 2 ** (len(depths) - 1) = {2 ** (self.num_stages - 1)}: "
            "each patch merge halves the inner grid and the main stage needs one token per patch",
        )
        check(
            self.patch_size % self.inner_patches == 0,
            f"patch_size={self.patch_size} is not divisible by inner_patches={self.inner_patches}",
        )
        check(
            self.image_size > 0 and self.image_size % self.patch_size == 0,
            f"image_size={self.image_size} is not a positive multiple of patch_size={self.patch_size}",
        )
        check(0.0 <= self.mask_ratio < 1.0, f"mask_ratio={self.mask_ratio} must be in [0, 1)")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "drop_path_rate"):
            check(0.0 <= getattr(self, name) < 1.0, f"{name}={getattr(self, name)} must be in [0, 1)")
        check(self.layer_scale_init_value >= 0.0, "layer_scale_init_value must be >= 0")
        for name in ("mlp_ratio", "stem_mlp_ratio", "decoder_mlp_ratio"):
            check(getattr(self, name) > 0, f"{name}={getattr(self, name)} must be positive")
        check(self.num_channels > 0, f"num_channels={self.num_channels} must be positive")
        check(self.decoder_num_hidden_layers >= 0, "decoder_num_hidden_layers must be >= 0")
        check(self.window_size >= 0, f"window_size={self.window_size} must be >= 0 (0: global attention)")
        check(
            all(0 <= index < self.depths[-1] for index in self.global_attn_indexes),
            f"global_attn_indexes={self.global_attn_indexes} must index the {self.depths[-1]} main-stage layers",
        )
        check(
            not self.legacy_detection_backbone or (self.num_stages == 3 and self.depths[1] >= self.depths[0]),
            f"legacy_detection_backbone needs three stages with depths[1] >= depths[0] (where the original taps its "
            f"stride-8 map), got depths={self.depths}",
        )
