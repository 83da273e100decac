"""Behaviour of the config and model classes: masking semantics, shapes, errors, gradients, saving and loading."""

import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from configuration_hivit_mae import HiViTMAEConfig
from modeling_hivit_mae import (
    HiViTMAEEncoder,
    HiViTMAEForImageClassification,
    HiViTMAEForPreTraining,
    HiViTMAEModel,
    interpolate_pos_encoding,
    random_masking,
)


def seeded(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------- configuration


def test_archs_are_mmpretrain_archs():
    from mmpretrain.models import HiViT

    for arch in ("tiny", "small", "base", "large"):
        config = HiViTMAEConfig.from_arch(arch)
        expected = HiViT.arch_zoo[arch]
        assert (config.hidden_size, config.depths, config.num_attention_heads) == (
            expected["embed_dims"],
            expected["depths"],
            expected["num_heads"],
        )
        # mmpretrain's MAE-HiViT decoder, whatever the encoder size.
        assert (config.decoder_hidden_size, config.decoder_num_hidden_layers) == (512, 6)
        assert (config.decoder_num_attention_heads, config.decoder_mlp_ratio) == (16, 4.0)
    assert HiViTMAEConfig().to_diff_dict() == HiViTMAEConfig.from_arch("base").to_diff_dict()
    assert HiViTMAEConfig.from_arch("tiny", mask_ratio=0.5).mask_ratio == 0.5


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"hidden_size": 98, "num_attention_heads": 2}, "divisible by 2 ** (len(depths) - 1)"),
        ({"num_attention_heads": 7}, "not divisible by num_attention_heads"),
        ({"decoder_num_attention_heads": 5}, "decoder_num_attention_heads"),
        ({"inner_patches": 2}, "inner_patches=2 must be"),
        ({"depths": [2, 2]}, "inner_patches=4 must be"),
        ({"depths": [2, 0, 24]}, "positive integers"),
        ({"image_size": 100}, "multiple of patch_size"),
        ({"patch_size": 18}, "not divisible by inner_patches"),
        ({"mask_ratio": 1.0}, "mask_ratio"),
        ({"drop_path_rate": -0.1}, "drop_path_rate"),
        ({"decoder_hidden_size": 66, "decoder_num_attention_heads": 2}, "divisible by 4"),
    ],
)
def test_invalid_config_raises(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        HiViTMAEConfig(**overrides)


def test_unknown_arch_raises():
    with pytest.raises(ValueError, match="Unknown HiViT arch 'huge'"):
        HiViTMAEConfig.from_arch("huge")


def test_config_round_trip(tmp_path, config):
    config.save_pretrained(tmp_path)
    loaded = HiViTMAEConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "hivit_mae"


# ----------------------------------------------------------------------------------------------- masking


@torch.no_grad()
def test_encoder_does_not_mask_by_default(config, images):
    model = HiViTMAEModel(config).eval()
    first, second = model(images), model(images)
    assert first.last_hidden_state.shape == (2, 16, 64)
    assert torch.equal(first.last_hidden_state, second.last_hidden_state)
    assert not first.mask.any()
    assert torch.equal(first.ids_restore, torch.arange(16).expand(2, -1))
    # False means no masking too (mmpretrain's `if mask is None or False` masks on False).
    assert torch.equal(model(images, mask=False).last_hidden_state, first.last_hidden_state)


@torch.no_grad()
def test_pretraining_masks_at_mask_ratio_by_default(config, images):
    model = HiViTMAEForPreTraining(config).eval()
    outputs = model(images)
    num_keep = int(16 * (1 - config.mask_ratio))
    assert outputs.mask.sum(dim=1).tolist() == [16 - num_keep] * 2
    assert outputs.logits.shape == (2, 16, 16 * 16 * 3)
    # ids_restore undoes the shuffle: visible patches (mask 0) come first.
    ids_shuffle = torch.argsort(outputs.ids_restore, dim=1)
    assert not torch.gather(outputs.mask, 1, ids_shuffle)[:, :num_keep].any()
    assert outputs.loss.ndim == 0 and torch.isfinite(outputs.loss)


@torch.no_grad()
def test_noise_makes_masking_deterministic(config, images):
    model = HiViTMAEForPreTraining(config).eval()
    noise = torch.rand(2, 16, generator=torch.Generator().manual_seed(1))
    first, second = model(images, noise=noise), model(images, noise=noise)
    assert torch.equal(first.logits, second.logits) and torch.equal(first.mask, second.mask)
    # The patches with the smallest noise stay visible.
    visible = torch.argsort(noise, dim=1)[:, : int(16 * (1 - config.mask_ratio))]
    assert not torch.gather(first.mask, 1, visible).any()
    other = model(images, noise=torch.rand(2, 16, generator=torch.Generator().manual_seed(2)))
    assert not torch.equal(other.mask, first.mask)


@torch.no_grad()
def test_explicit_mask_is_used_exactly(make_config, images):
    model = HiViTMAEForPreTraining(make_config(mask_ratio=0.5)).eval()
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, [0, 3, 5, 6, 9, 10, 12, 15]] = True
    mask[1, 8:] = True
    outputs = model(images, mask=mask)
    assert torch.equal(outputs.mask, mask.float())
    assert model.hivit(images, mask=mask).last_hidden_state.shape == (2, 8, 64)
    # Random masking whose noise keeps the same patches, in patch order, gives the same result.
    noise = mask.float() + torch.arange(16) / 100
    via_noise = model(images, noise=noise)
    assert torch.equal(via_noise.mask, outputs.mask)
    torch.testing.assert_close(via_noise.logits, outputs.logits)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mask": torch.zeros(2, 15, dtype=torch.bool)}, "mask has shape"),
        ({"mask": torch.zeros(2, 16)}, "bool tensor"),
        ({"mask": torch.tensor([[True] * 8 + [False] * 8, [True] * 7 + [False] * 9])}, "same number"),
        ({"mask": torch.ones(2, 16, dtype=torch.bool)}, "hides every patch"),
        ({"mask": "yes"}, "bool tensor"),
        ({"noise": torch.rand(2, 15)}, "noise must be a float tensor"),
        ({"noise": torch.ones(2, 16, dtype=torch.long)}, "noise must be a float tensor"),
        ({"noise": torch.rand(2, 16), "mask": False}, "needs mask=True"),
    ],
)
def test_bad_mask_or_noise_raises(config, images, kwargs, message):
    model = HiViTMAEForPreTraining(config).eval()
    with pytest.raises(ValueError, match=message):
        model(images, **kwargs)


@pytest.mark.parametrize(
    "pixel_values, message",
    [
        (torch.randn(2, 1, 64, 64), "1 channels but the model expects num_channels=3"),
        (torch.randn(2, 3, 64, 60), "not a positive multiple of the patch size 16"),
        (torch.randn(3, 64, 64), "must have shape"),
    ],
)
def test_bad_images_raise(config, pixel_values, message):
    for model in (HiViTMAEModel(config), HiViTMAEForPreTraining(config)):
        with pytest.raises(ValueError, match=message):
            model(pixel_values)


def test_too_few_patches_for_mask_ratio_raises(make_config):
    model = HiViTMAEForPreTraining(make_config(mask_ratio=0.9))
    with pytest.raises(ValueError, match="leaves no visible patch"):
        model(torch.randn(1, 3, 16, 32))


def test_random_masking_by_hand():
    noise = torch.tensor([[0.5, 0.1, 0.9, 0.3]])
    ids_keep, ids_restore, mask = random_masking(noise, 2)
    assert ids_keep.tolist() == [[1, 3]]
    assert mask.tolist() == [[1.0, 0.0, 1.0, 0.0]]
    assert ids_restore.tolist() == [[2, 0, 3, 1]]


# ----------------------------------------------------------------------------------------------- shapes and sizes


@pytest.mark.parametrize("size", [(64, 64), (96, 96), (48, 80), (16, 16)])
@torch.no_grad()
def test_any_multiple_of_the_patch_size_works(config, size):
    height, width = size
    num_patches = (height // 16) * (width // 16)
    images = seeded(2, 3, height, width)
    model = HiViTMAEForPreTraining(config).eval()
    features = model.hivit(images, output_hidden_states=True)
    assert features.last_hidden_state.shape == (2, num_patches, 64)
    # Feature pyramid: strides 4, 8 (stem stages) and 16 (main-stage input and layers).
    shapes = [tuple(state.shape) for state in features.reshaped_hidden_states]
    assert shapes[:2] == [(2, 16, height // 4, width // 4), (2, 32, height // 8, width // 8)]
    assert shapes[2:] == [(2, 64, height // 16, width // 16)] * 3
    torch.testing.assert_close(features.reshaped_hidden_states[-1].flatten(2).transpose(1, 2), features[0])
    if num_patches >= 4:
        outputs = model(images, output_hidden_states=True)
        num_keep = int(num_patches * 0.25)
        assert outputs.logits.shape == (2, num_patches, 768)
        assert outputs.mask.sum(1).tolist() == [num_patches - num_keep] * 2
        assert outputs.hidden_states[0].shape == (2, num_keep, 4, 4, 16)
        assert outputs.hidden_states[-1].shape == (2, num_keep, 64)
        assert outputs.reshaped_hidden_states is None  # masked tokens have no feature map
        assert torch.isfinite(outputs.loss)


def test_stem_feature_map_is_in_image_layout(config):
    """The stride-4 map must follow the image: shifting the image by one patch shifts the map by 4 cells."""
    model = HiViTMAEModel(config).eval()
    images = seeded(1, 3, 64, 64)
    shifted = torch.roll(images, shifts=16, dims=3)
    with torch.no_grad():
        first = model(images, output_hidden_states=True).reshaped_hidden_states[0]
        second = model(shifted, output_hidden_states=True).reshaped_hidden_states[0]
    torch.testing.assert_close(torch.roll(first, shifts=4, dims=3), second)


def test_patchify_round_trip(config):
    model = HiViTMAEForPreTraining(config)
    images = seeded(2, 3, 32, 48)
    patches = model.patchify(images)
    assert patches.shape == (2, 6, 768)
    # Patch 1 is the second patch of the first row, flattened as (row, col, channel).
    assert torch.equal(patches[0, 1], images[0, :, :16, 16:32].permute(1, 2, 0).reshape(-1))
    assert torch.equal(model.unpatchify(patches, image_size=(32, 48)), images)
    square = seeded(1, 3, 64, 64)
    assert torch.equal(model.unpatchify(model.patchify(square)), square)
    with pytest.raises(ValueError, match="do not tile"):
        model.unpatchify(patches, image_size=(32, 32))
    with pytest.raises(ValueError, match="patches must have shape"):
        model.unpatchify(patches[..., :10])


def test_loss_by_hand(config, images):
    model = HiViTMAEForPreTraining(config).eval()
    with torch.no_grad():
        outputs = model(images, noise=torch.rand(2, 16, generator=torch.Generator().manual_seed(3)))
    patches = torch.stack(
        [images[:, :, r * 16 : (r + 1) * 16, c * 16 : (c + 1) * 16] for r in range(4) for c in range(4)], dim=1
    ).permute(0, 1, 3, 4, 2)  # (batch, patch, row, col, channel)
    target = patches.reshape(2, 16, -1)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    per_patch = ((outputs.logits - target) ** 2).mean(-1)
    expected = (per_patch * outputs.mask).sum() / outputs.mask.sum()
    torch.testing.assert_close(outputs.loss, expected)
    # Nothing masked: the loss averages over all patches instead of dividing by zero.
    with torch.no_grad():
        unmasked = model(images, mask=False)
    assert torch.isfinite(unmasked.loss)


# ----------------------------------------------------------------------------------------------- mmpretrain quirks


@torch.no_grad()
def test_decoder_first_token_as_cls(make_config, images):
    """With mmpretrain's decoder the logits depend on which visible token comes first; the textbook decoder only on
    which patches are visible."""
    noise = torch.rand(2, 16, generator=torch.Generator().manual_seed(4))
    # The same kept set in another order: reverse the ranks of the four kept patches.
    kept = torch.argsort(noise, dim=1)[:, :4]
    reordered = noise.clone()
    reordered.scatter_(1, kept, torch.gather(noise, 1, kept.flip(1)))
    for quirk in (True, False):
        model = HiViTMAEForPreTraining(make_config(decoder_first_token_as_cls=quirk)).eval()
        first, second = model(images, noise=noise), model(images, noise=reordered)
        assert torch.equal(first.mask, second.mask)
        assert torch.allclose(first.logits, second.logits, atol=1e-5) is not quirk


@torch.no_grad()
def test_position_encoding_on_the_masked_path(make_config, images):
    """The stem works per patch, so on the masked path the main stage's input is the unmasked one gathered at the
    visible patches, except that mmpretrain resamples the position table there (legacy default)."""
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, ::2] = True
    for legacy in (True, False):
        model = HiViTMAEModel(make_config(legacy_position_encoding=legacy)).eval()
        inputs = []
        first_layer = model.encoder.layers[0]
        hook = first_layer.register_forward_pre_hook(lambda module, args, inputs=inputs: inputs.append(args[0]))
        model(images)
        model(images, mask=mask)
        hook.remove()
        expected = inputs[0][:, 1::2]
        assert torch.allclose(inputs[1], expected, atol=1e-6) is not legacy
        torch.testing.assert_close(inputs[1], expected, atol=0.1, rtol=0)  # a small shift, not a different table


# ----------------------------------------------------------------------------------- original HiViT repository


@torch.no_grad()
def test_hifeat_output_by_hand(make_config, images):
    """`use_hifeat`: the encoder output is LayerNorm(concat of each stem stage's pre-merge output, flattened per patch
    row-major, and the last main layer's output), as the original repository's `forward_encoder` builds it."""
    config = make_config(use_hifeat=True)
    assert config.encoder_output_size == 16 * 16 + 4 * 32 + 64 == 7 * config.hidden_size
    model = HiViTMAEModel(config).eval()
    torch.nn.init.normal_(model.hifeat_layernorm.weight)
    torch.nn.init.normal_(model.hifeat_layernorm.bias)
    outputs = model(images, output_hidden_states=True)
    stem_1, stem_2, last = outputs.hidden_states[0], outputs.hidden_states[1], outputs.hidden_states[-1]
    assert stem_1.shape == (2, 16, 4, 4, 16) and stem_2.shape == (2, 16, 2, 2, 32)
    concatenated = torch.cat([stem_1.reshape(2, 16, -1), stem_2.reshape(2, 16, -1), last], dim=-1)
    norm = model.hifeat_layernorm
    mean = concatenated.mean(-1, keepdim=True)
    variance = ((concatenated - mean) ** 2).mean(-1, keepdim=True)
    expected = (concatenated - mean) / torch.sqrt(variance + config.layer_norm_eps) * norm.weight + norm.bias
    torch.testing.assert_close(outputs.last_hidden_state, expected, atol=1e-5, rtol=1e-5)
    # The pre-training model's decoder embeds the 7C-channel features.
    pretraining = HiViTMAEForPreTraining(config).eval()
    assert pretraining.decoder.decoder_embed.in_features == 7 * config.hidden_size
    assert pretraining(images).logits.shape == (2, 16, 16 * 16 * 3)


def test_decoder_without_class_slot_has_no_class_row(make_config):
    """The original decoder's position table has one row per patch; mmpretrain's keeps a leading class row."""
    with_cls = HiViTMAEForPreTraining(make_config()).decoder.decoder_pos_embed
    aligned = HiViTMAEForPreTraining(make_config(decoder_first_token_as_cls=False)).decoder.decoder_pos_embed
    assert with_cls.shape == (1, 17, 32) and aligned.shape == (1, 16, 32)
    assert torch.equal(with_cls[:, 0], torch.zeros(1, 32))
    torch.testing.assert_close(aligned, with_cls[:, 1:])  # the same sin-cos rows


@torch.no_grad()
def test_fc_norm_by_hand(make_config, images):
    model = HiViTMAEForImageClassification(make_config(use_fc_norm=True, num_labels=3)).eval()
    torch.nn.init.normal_(model.fc_norm.weight)
    pooled = model.hivit(images).last_hidden_state.mean(dim=1)
    normed = torch.nn.functional.layer_norm(pooled, (64,), eps=1e-6) * model.fc_norm.weight + model.fc_norm.bias
    torch.testing.assert_close(model(images).logits, normed @ model.classifier.weight.T + model.classifier.bias)
    assert HiViTMAEForImageClassification(make_config(num_labels=3)).fc_norm is None


def test_interpolate_pos_encoding():
    table = seeded(1, 16, 8)
    assert interpolate_pos_encoding(table, (4, 4), 16, legacy=False) is table
    assert interpolate_pos_encoding(table, (4, 4), 16, legacy=True) is table
    assert not torch.equal(interpolate_pos_encoding(table, (4, 4), 5, legacy=True), table)
    for legacy in (True, False):
        assert interpolate_pos_encoding(table, (6, 3), 18, legacy=legacy).shape == (1, 18, 8)


@torch.no_grad()
def test_relative_position_bias(make_config, images):
    config = make_config(use_relative_position_bias=True, legacy_position_encoding=False)
    model = HiViTMAEModel(config).eval()
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, :8] = True
    before = [model(images).last_hidden_state, model(images, mask=mask).last_hidden_state]
    before.append(model(seeded(2, 3, 96, 64)).last_hidden_state)  # table resized to another grid
    for layer in model.encoder.layers:
        layer.attention.relative_position_bias_table.data.zero_()
    after = [model(images).last_hidden_state, model(images, mask=mask).last_hidden_state]
    after.append(model(seeded(2, 3, 96, 64)).last_hidden_state)
    for used, unused in zip(before, after):
        assert not torch.allclose(used, unused, atol=1e-4)
    # The attention-weights path agrees with SDPA.
    outputs = model(images, output_attentions=True)
    assert len(outputs.attentions) == 2 and outputs.attentions[0].shape == (2, 4, 16, 16)
    torch.testing.assert_close(outputs.attentions[0].sum(-1), torch.ones(2, 4, 16))
    torch.testing.assert_close(outputs.last_hidden_state, after[0], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------- training


def test_every_trainable_parameter_gets_a_gradient(make_config, images):
    for overrides in ({}, {"use_relative_position_bias": True, "legacy_position_encoding": False}):
        model = HiViTMAEForPreTraining(make_config(layer_scale_init_value=0.1, **overrides)).train()
        model(images).loss.backward()
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
            else:
                assert "position_embeddings" in name or "pos_embed" in name, name


def test_gradient_checkpointing_gives_the_same_gradients(config, images):
    noise = torch.rand(2, 16, generator=torch.Generator().manual_seed(5))
    gradients = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = HiViTMAEForPreTraining(config).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
            assert all(layer.gradient_checkpointing for layer in model.hivit.encoder.layers)
        model(images, noise=noise).loss.backward()
        gradients.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for name, gradient in gradients[0].items():
        torch.testing.assert_close(gradients[1][name], gradient, msg=name)


def test_drop_path_and_dropout_only_in_training(make_config, images):
    model = HiViTMAEModel(make_config(drop_path_rate=0.5, hidden_dropout_prob=0.1)).train()
    assert not torch.equal(model(images).last_hidden_state, model(images).last_hidden_state)
    model.eval()
    assert torch.equal(model(images).last_hidden_state, model(images).last_hidden_state)
    # Linear from 0 to 0.5 over the 4 stem blocks and then the 2 main layers.
    assert [layer.drop_path.drop_prob for layer in model.encoder.layers] == pytest.approx([0.4, 0.5])


# ----------------------------------------------------------------------------------------------- save and load


def test_save_and_load_round_trip(tmp_path, config, images):
    torch.manual_seed(0)
    model = HiViTMAEForPreTraining(config).eval()
    noise = torch.rand(2, 16, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = model(images, noise=noise)
        features = model.hivit(images).last_hidden_state
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["auto_map"] == {
        "AutoConfig": "configuration_hivit_mae.HiViTMAEConfig",
        "AutoModel": "modeling_hivit_mae.HiViTMAEModel",
        "AutoBackbone": "modeling_hivit_mae.HiViTMAEBackbone",
        "AutoModelForPreTraining": "modeling_hivit_mae.HiViTMAEForPreTraining",
    }
    assert (tmp_path / "modeling_hivit_mae.py").is_file() and (tmp_path / "configuration_hivit_mae.py").is_file()
    # An encoder folder does not claim AutoModelForPreTraining: its decoder would be random.
    HiViTMAEModel(config).save_pretrained(tmp_path / "encoder")
    assert "AutoModelForPreTraining" not in json.loads((tmp_path / "encoder" / "config.json").read_text())["auto_map"]

    loaded = HiViTMAEForPreTraining.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        actual = loaded(images, noise=noise)
    assert torch.equal(actual.logits, expected.logits) and torch.equal(actual.loss, expected.loss)
    encoder = HiViTMAEModel.from_pretrained(tmp_path).eval()  # the encoder alone, from a pre-training folder
    with torch.no_grad():
        assert torch.equal(encoder(images).last_hidden_state, features)


def test_remote_code_loading_without_the_project(tmp_path, config, images):
    """A saved folder is self-contained: Auto classes load it with trust_remote_code in a process that cannot
    import this project."""
    folder = tmp_path / "model"
    torch.manual_seed(0)
    model = HiViTMAEForPreTraining(config).eval()
    model.save_pretrained(folder)
    torch.save(images, tmp_path / "images.pt")
    with torch.no_grad():
        torch.save(
            {"features": model.hivit(images).last_hidden_state, "logits": model(images, mask=False).logits},
            tmp_path / "expected.pt",
        )
    script = textwrap.dedent(
        """
        import sys
        # Make the project unimportable even if it is installed: only the folder's copy may be used.
        sys.modules["modeling_hivit_mae"] = sys.modules["configuration_hivit_mae"] = None
        import torch
        from transformers import AutoConfig, AutoModel, AutoModelForPreTraining

        config = AutoConfig.from_pretrained("model", trust_remote_code=True)
        assert type(config).__name__ == "HiViTMAEConfig", type(config)
        encoder = AutoModel.from_pretrained("model", trust_remote_code=True).eval()
        pretraining = AutoModelForPreTraining.from_pretrained("model", trust_remote_code=True).eval()
        assert type(encoder).__module__.startswith("transformers_modules"), type(encoder).__module__
        images = torch.load("images.pt")
        expected = torch.load("expected.pt")
        with torch.no_grad():
            assert torch.equal(encoder(images).last_hidden_state, expected["features"])
            assert torch.equal(pretraining(images, mask=False).logits, expected["logits"])
        print("remote code ok")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "remote code ok" in result.stdout


def test_encoder_class_is_the_main_stage(config):
    model = HiViTMAEModel(config)
    assert isinstance(model.encoder, HiViTMAEEncoder) and len(model.encoder.layers) == config.depths[-1]
    assert [len(stage.blocks) for stage in model.stem] == [2 * depth for depth in config.depths[:-1]]


def test_compiles_without_graph_breaks(config, images):
    """`torch.compile(fullgraph=True)` must trace the whole forward (Dynamo's eager backend: no code generation)
    for random masking with noise and for no masking."""
    torch._dynamo.reset()
    model = HiViTMAEForPreTraining(config).eval()
    noise = torch.rand(2, 16, generator=torch.Generator().manual_seed(7))
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    encoder = torch.compile(model.hivit, fullgraph=True, backend="eager")
    with torch.no_grad():
        for kwargs in ({"noise": noise}, {"mask": False}):
            expected = model(images, **kwargs)
            actual = compiled(images, **kwargs)
            torch.testing.assert_close(actual.logits, expected.logits)
            torch.testing.assert_close(actual.loss, expected.loss)
        torch.testing.assert_close(encoder(images).last_hidden_state, model.hivit(images).last_hidden_state)


# ----------------------------------------------------------------------------------------------- fine-tuning


def test_image_classification_head(tmp_path, make_config, images):
    pretraining = HiViTMAEForPreTraining(make_config())
    pretraining.save_pretrained(tmp_path / "pretrained")
    model = HiViTMAEForImageClassification.from_pretrained(tmp_path / "pretrained", num_labels=3).eval()
    for name, value in pretraining.hivit.state_dict().items():
        assert torch.equal(model.hivit.state_dict()[name], value), name
    # Fine-tuning trains the absolute position table that pre-training keeps fixed (see test_parity).
    assert model.hivit.position_embeddings.requires_grad
    assert not pretraining.hivit.position_embeddings.requires_grad
    labels = torch.tensor([0, 2])
    with torch.no_grad():
        outputs = model(images, labels=labels)
        pooled = pretraining.hivit.eval()(images).last_hidden_state.mean(dim=1)
    expected = pooled @ model.classifier.weight.T + model.classifier.bias
    torch.testing.assert_close(outputs.logits, expected)
    torch.testing.assert_close(outputs.loss, -torch.log_softmax(expected, -1)[[0, 1], labels].mean())

    # Multi-label and regression targets follow transformers' problem types.
    multi = HiViTMAEForImageClassification(make_config(num_labels=3))
    targets = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    logits = multi(images).logits
    torch.testing.assert_close(
        multi(images, labels=targets).loss, torch.nn.functional.binary_cross_entropy_with_logits(logits, targets)
    )
    regression = HiViTMAEForImageClassification(make_config(num_labels=1))
    values = torch.tensor([0.5, -1.0])
    assert torch.allclose(
        regression(images, labels=values).loss, ((regression(images).logits[:, 0] - values) ** 2).mean()
    )

    model.save_pretrained(tmp_path / "classifier")
    auto_map = json.loads((tmp_path / "classifier" / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForImageClassification"] == "modeling_hivit_mae.HiViTMAEForImageClassification"


def test_fine_tuning_with_trainer(tmp_path, make_config):
    """`Trainer` fine-tunes the classifier from a pre-trained folder on a `datasets` image set preprocessed by the
    converter's image processor: two colour classes become separable, and the encoder trains too."""
    from datasets import Dataset
    from PIL import Image
    from transformers import BitImageProcessor, Trainer, TrainingArguments

    from hivit_mae_tools.preprocessing import preprocessor_config

    HiViTMAEForPreTraining(make_config()).save_pretrained(tmp_path / "pretrained")
    rng = np.random.RandomState(0)

    def image(label):  # noise, plus a red (0) or blue (1) cast
        rgb = rng.randint(0, 128, (80, 72, 3))
        rgb[..., 2 * label] += 127
        return Image.fromarray(rgb.astype(np.uint8))

    labels = [0, 1] * 8
    data = Dataset.from_dict({"image": [image(label) for label in labels], "label": labels})
    settings = preprocessor_config(64)
    del settings["image_processor_type"]
    processor = BitImageProcessor(**settings)
    data.set_transform(
        lambda batch: {
            "pixel_values": processor(images=batch["image"], return_tensors="pt")["pixel_values"],
            "labels": batch["label"],
        }
    )
    model = HiViTMAEForImageClassification.from_pretrained(
        tmp_path / "pretrained", num_labels=2, id2label={0: "red", 1: "blue"}, label2id={"red": 0, "blue": 1}
    )
    encoder_weight = model.hivit.encoder.layers[0].mlp.fc1.weight.detach().clone()
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=12,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        remove_unused_columns=False,  # the transform needs the raw columns
        use_cpu=True,
        seed=0,
    )

    def accuracy(prediction):
        return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}

    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data, compute_metrics=accuracy)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3]), losses
    assert trainer.evaluate()["eval_accuracy"] == 1.0
    assert not torch.equal(model.hivit.encoder.layers[0].mlp.fc1.weight.detach(), encoder_weight)
