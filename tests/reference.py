"""mmpretrain 1.2.0 reference models for the parity tests."""

import warnings

import torch

MMPRETRAIN_ARCHS = ("tiny", "small", "base", "large")


def _mmpretrain_models():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from mmengine.logging import MMLogger
        from mmpretrain.registry import MODELS
        from mmpretrain.utils import register_all_modules

        register_all_modules()
        MMLogger.get_current_instance().setLevel("ERROR")
    return MODELS


def _build(cfg: dict, seed: int, perturb: bool):
    """Build `cfg`, run mmpretrain's own `init_weights`, then (``perturb``) move every tensor away from its init value
    so that no parity check can pass on structurally equal initialisations."""
    models = _mmpretrain_models()
    torch.manual_seed(seed)
    model = models.build(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.init_weights()
    if perturb:
        generator = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for tensor in model.state_dict(keep_vars=True).values():
                if tensor.is_floating_point():
                    tensor.add_(0.02 * torch.randn(tensor.shape, generator=generator))
    model.eval()  # not chained: mmpretrain's `HiViT.train` returns None
    return model


def build_mmpretrain_classifier(arch="tiny", img_size=224, num_classes=10, seed=0, perturb=True, **backbone_kwargs):
    """mmpretrain's HiViT `ImageClassifier` as its `configs/hivit` build it (`HiViT` backbone with absolute and
    relative position embeddings, `GlobalAveragePooling`, `LinearClsHead`), initialised and perturbed as
    `build_mmpretrain_mae` does."""
    from configuration_hivit_mae import HIVIT_ARCHS

    hidden = arch["embed_dims"] if isinstance(arch, dict) else HIVIT_ARCHS[arch]["hidden_size"]
    depths = arch["depths"] if isinstance(arch, dict) else HIVIT_ARCHS[arch]["depths"]
    backbone = dict(type="HiViT", arch=arch, img_size=img_size, ape=True, rpe=True, out_indices=[depths[-1] - 1])
    cfg = dict(
        type="ImageClassifier",
        backbone=dict(backbone, **backbone_kwargs),
        neck=dict(type="GlobalAveragePooling"),
        head=dict(type="LinearClsHead", num_classes=num_classes, in_channels=hidden, init_cfg=None),
        init_cfg=[
            dict(type="TruncNormal", layer="Linear", std=0.02, bias=0.0),
            dict(type="Constant", layer="LayerNorm", val=1.0, bias=0.0),
        ],
    )
    return _build(cfg, seed, perturb)


def build_mmpretrain_mae(
    arch="tiny", img_size=224, seed=0, perturb=True, decoder_dim=512, decoder_depth=6, **backbone_kwargs
):
    """mmpretrain's `MAE` with `MAEHiViT`, `MAEPretrainDecoder` and `MAEPretrainHead` as its MAE-HiViT config
    builds it (``arch``: one of mmpretrain's names, or a dict of `embed_dims`, `depths`, `num_heads`; the decoder
    is mmpretrain's MAE-HiViT one unless ``decoder_dim`` / ``decoder_depth`` say otherwise), initialised by its own
    `init_weights`, then (``perturb``) every tensor moved away from its init value so that no parity check can pass
    on structurally equal initialisations."""
    from configuration_hivit_mae import HIVIT_ARCHS

    hidden = arch["embed_dims"] if isinstance(arch, dict) else HIVIT_ARCHS[arch]["hidden_size"]
    depths = arch["depths"] if isinstance(arch, dict) else HIVIT_ARCHS[arch]["depths"]
    cfg = dict(
        type="MAE",
        backbone=dict(
            type="MAEHiViT",
            patch_size=16,
            arch=arch,
            mask_ratio=0.75,
            img_size=img_size,
            # Given explicitly: mmpretrain writes into its mutable default list.
            out_indices=[depths[-1] - 1],
            **backbone_kwargs,
        ),
        neck=dict(
            type="MAEPretrainDecoder",
            num_patches=(img_size // 16) ** 2,
            patch_size=16,
            in_chans=3,
            embed_dim=hidden,
            decoder_embed_dim=decoder_dim,
            decoder_depth=decoder_depth,
            decoder_num_heads=16,
            mlp_ratio=4.0,
        ),
        head=dict(
            type="MAEPretrainHead",
            norm_pix=True,
            patch_size=16,
            loss=dict(type="PixelReconstructionLoss", criterion="L2"),
        ),
        init_cfg=[
            dict(type="Xavier", layer="Linear", distribution="uniform"),
            dict(type="Constant", layer="LayerNorm", val=1.0, bias=0.0),
        ],
    )
    return _build(cfg, seed, perturb)


@torch.no_grad()
def mmpretrain_masked_encoder(mm_model, images, seed):
    """mmpretrain's own masked encoder pass, masked by its own `MAEHiViT.masking_id` from a seeded global generator;
    returns its `(latent, mask, ids_restore)` and the noise it drew. `masking_id` draws `torch.rand(batch_size,
    num_patches)` before anything else, so the same draw after the same seed reproduces that noise (the mask checks
    fail if it does not)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        outputs = mm_model.backbone(images)
        torch.manual_seed(seed)
        noise = torch.rand(images.shape[0], mm_model.backbone.pos_embed.shape[1])
    return (*outputs, noise)
