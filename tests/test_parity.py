"""Numerical parity with mmpretrain 1.2.0 (installed in CI): the same weights, images and mask must give the same
encoder features, decoder logits and loss, for every arch, within 1e-4 in float32; and the same classification
logits and trainable parameters as mmpretrain's HiViT `ImageClassifier`."""

import pytest
import torch
from reference import MMPRETRAIN_ARCHS, build_mmpretrain_classifier, build_mmpretrain_mae, mmpretrain_masked_encoder

from hivit_mae_tools.conversion.mmpretrain import convert_state_dict, infer_config
from modeling_hivit_mae import HiViTMAEForImageClassification, HiViTMAEForPreTraining

TOLERANCE = 1e-4


def converted_pair(arch="tiny", **backbone_kwargs):
    reference = build_mmpretrain_mae(arch, **backbone_kwargs)
    state_dict = reference.state_dict()
    config = infer_config(state_dict)
    converted, unused = convert_state_dict(state_dict, config)
    assert unused == []
    model = HiViTMAEForPreTraining(config).eval()
    missing, unexpected = model.load_state_dict(converted, strict=False)
    assert (missing, unexpected) == ([], [])
    return reference, model


def feature_map_to_tokens(feature_map):
    return feature_map.flatten(2).transpose(1, 2)


def max_diff(a, b):
    return (a - b).abs().max().item()


def layer_norm_eps(model):
    return {module.eps for module in model.modules() if isinstance(module, torch.nn.LayerNorm)}


@pytest.mark.parametrize("arch", MMPRETRAIN_ARCHS)
@torch.no_grad()
def test_parity_with_mmpretrain(arch):
    reference, model = converted_pair(arch)
    assert layer_norm_eps(model) == layer_norm_eps(reference) == {1e-6}
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 224, 224, generator=generator)

    # Unmasked features (mmpretrain's `extract_feat`), at the pre-training size and at another size.
    expected = feature_map_to_tokens(reference.backbone(images, mask=None)[0])
    assert max_diff(model.hivit(images).last_hidden_state, expected) < TOLERANCE
    larger = torch.randn(2, 3, 256, 256, generator=generator)
    expected = feature_map_to_tokens(reference.backbone(larger, mask=None)[0])
    assert max_diff(model.hivit(larger).last_hidden_state, expected) < TOLERANCE

    # Masked pre-training step with mmpretrain's own random mask, our forward given the same noise: the same mask,
    # encoder, decoder and loss.
    latent, mask, ids_restore, noise = mmpretrain_masked_encoder(reference, images, seed=5)
    assert mask.sum(dim=1).tolist() == [147, 147]
    logits = reference.neck(latent, ids_restore)
    loss = reference.head.loss(logits, images, mask)
    outputs = model(images, noise=noise)
    assert torch.equal(outputs.mask, mask)
    assert torch.equal(outputs.ids_restore, ids_restore)
    assert max_diff(model.hivit(images, mask=True, noise=noise).last_hidden_state, latent) < TOLERANCE
    assert max_diff(outputs.logits, logits) < TOLERANCE
    assert abs(outputs.loss.item() - loss.item()) < TOLERANCE


@torch.no_grad()
def test_parity_with_relative_position_bias_and_layer_scale():
    """mmpretrain's classification configs use `rpe=True`; layer scale is a HiViT option too."""
    reference, model = converted_pair("tiny", rpe=True, layer_scale_init_value=0.1)
    assert model.config.use_relative_position_bias and model.config.layer_scale_init_value > 0
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    expected = feature_map_to_tokens(reference.backbone(images, mask=None)[0])
    assert max_diff(model.hivit(images).last_hidden_state, expected) < TOLERANCE
    # The same through the explicit attention path that returns attention weights.
    outputs = model.hivit(images, output_attentions=True)
    assert max_diff(outputs.last_hidden_state, expected) < TOLERANCE

    # mmpretrain's masked path calls the main blocks without the relative position bias; so do we by default.
    latent, mask, ids_restore, noise = mmpretrain_masked_encoder(reference, images, seed=3)
    outputs = model.hivit(images, mask=True, noise=noise)
    assert torch.equal(outputs.mask, mask) and torch.equal(outputs.ids_restore, ids_restore)
    assert max_diff(outputs.last_hidden_state, latent) < TOLERANCE


def test_classifier_parity_with_mmpretrain():
    """mmpretrain's HiViT classifier (its `configs/hivit` model: relative and learned absolute position embeddings,
    average pooling, linear head): the same logits and the same trainable tensors. (mmpretrain's relative position
    bias only runs at the size it was built for.)"""
    reference = build_mmpretrain_classifier("tiny", num_classes=7)
    state_dict = reference.state_dict()
    config = infer_config(state_dict)
    converted, unused = convert_state_dict(state_dict, config)
    assert unused == [] and config.num_labels == 7
    model = HiViTMAEForImageClassification(config).eval()
    model.load_state_dict(converted, strict=True)

    # mmpretrain's `HiViT` builds its LayerNorms with eps 1e-5, unlike `MAEHiViT` (1e-6): too small a difference
    # for the tolerance to see at this size, so compared directly.
    assert layer_norm_eps(model) == layer_norm_eps(reference) == {1e-5}
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = feature_map_to_tokens(reference.backbone(images)[0])
        assert max_diff(model.hivit(images).last_hidden_state, expected) < TOLERANCE
        assert max_diff(model(images).logits, reference(images, mode="tensor")) < TOLERANCE

    trainable = {
        key
        for name, parameter in reference.named_parameters()
        if parameter.requires_grad
        for key in convert_state_dict({name: parameter}, config)[0]
    }
    assert trainable == {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert "hivit.position_embeddings" in trainable


def test_initialisation_matches_mmpretrain():
    """A from-scratch model is initialised as mmpretrain's MAE-HiViT config initialises its model: the same fixed
    tensors exactly, the same distributions for the random ones."""
    reference = build_mmpretrain_mae("tiny", perturb=False)
    config = infer_config(reference.state_dict())
    expected, _ = convert_state_dict(reference.state_dict(), config)
    torch.manual_seed(0)
    actual = HiViTMAEForPreTraining(config).state_dict()
    assert set(actual) == set(expected)
    for key, value in expected.items():
        ours = actual[key]
        # Fixed tables, LayerNorms and zero biases are exact; the random tensors must share their distribution.
        if "pos_embed" in key or "position_embeddings" in key or "norm" in key or not value.any():
            assert torch.equal(ours, value), key
        elif value.numel() > 1000:
            for statistic in (torch.std, torch.mean):
                assert abs(statistic(ours).item() - statistic(value).item()) < 0.1 * value.std().item() + 1e-3, key
            assert abs(ours.abs().max().item() - value.abs().max().item()) < 0.3 * value.abs().max().item(), key
