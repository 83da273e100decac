"""HiViTMAEBackbone: the original HiViT detection backbone's outputs, stage-end taps, window attention, loading from
every kind of folder, and UperNet trained with Trainer on it."""

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from configuration_hivit_mae import HiViTMAEConfig
from hivit_mae_tools.conversion import original
from modeling_hivit_mae import (
    HiViTMAEBackbone,
    HiViTMAEForImageClassification,
    HiViTMAEForPreTraining,
    relative_position_index,
)

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "original_hivit_backbone"


def seeded(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def layer_norm_2d(feature_map, norm):
    """LayerNorm over the channels of `(batch, channels, height, width)`, by hand."""
    mean = feature_map.mean(dim=1, keepdim=True)
    var = feature_map.var(dim=1, keepdim=True, unbiased=False)
    normed = (feature_map - mean) / torch.sqrt(var + norm.eps)
    return normed * norm.weight[:, None, None] + norm.bias[:, None, None]


def feature_map(tokens, grid):
    """`(batch, patches, [inner, inner,] dim)` in raster patch order -> `(batch, dim, height, width)`, by hand."""
    batch, dim, (rows, cols) = tokens.shape[0], tokens.shape[-1], grid
    inner = tokens.shape[2] if tokens.ndim == 5 else 1
    out = torch.empty(batch, dim, rows * inner, cols * inner)
    for patch in range(rows * cols):
        row, col = divmod(patch, cols)
        block = tokens[:, patch].reshape(batch, inner, inner, dim).permute(0, 3, 1, 2)
        out[:, :, row * inner : (row + 1) * inner, col * inner : (col + 1) * inner] = block
    return out


# ------------------------------------------------------------------------------------ the original backbone


def original_config(**overrides):
    """The fixture's backbone: `HiViT(embed_dim=64, depths=[1, 1, 4], num_heads=2, window_size=7,
    global_indices=[1, 3], out_indices=['H', 'M', 3, 3])`, eps 1e-6."""
    settings = dict(
        hidden_size=64,
        depths=[1, 1, 4],
        num_attention_heads=2,
        image_size=224,
        window_size=7,
        global_attn_indexes=[1, 3],
        legacy_detection_backbone=True,
    )
    return HiViTMAEConfig(**{**settings, **overrides})


def original_weights(config):
    """The fixture's state dict under our names: the encoder through the converter's mapping of the original
    repository's keys, `fpn1` .. `fpn4` as the per-level norms."""
    weights = load_file(FIXTURE / "backbone_tiny.safetensors")
    levels = {"fpn1": "stage1", "fpn2": "stage2", "fpn3": "stage3", "fpn4.1": "stage4"}
    norms = {}
    for key in [key for key in weights if key.startswith("fpn")]:
        module, _, parameter = key.rpartition(".")
        norms[f"hidden_states_norms.{levels[module]}.{parameter}"] = weights.pop(key)
    # The pre-training model's keys: its encoder is `hivit.*`, as the backbone's.
    converted, left_out, unknown = original.convert_state_dict(weights, config, "pretraining")
    assert not left_out and not unknown, (left_out, unknown)
    return {**converted, **norms}


@pytest.fixture(scope="module")
def original_outputs():
    """The fixture's inputs, drawn again by its recipe, and the original backbone's outputs for them."""
    expected = load_file(FIXTURE / "backbone_tiny_expected.safetensors")
    torch.manual_seed(1)
    inputs = {"": torch.randn(2, 3, 320, 448), "_224": torch.randn(2, 3, 224, 224)}
    for suffix, pixel_values in inputs.items():
        assert torch.equal(pixel_values[0, 0, 0, :8], expected[f"pixel_values{suffix}_corner"])
    return inputs, expected


def test_legacy_detection_backbone_matches_the_original(original_outputs):
    """With `legacy_detection_backbone`, the original repository's four outputs within 1e-4, for a 320x448 input
    (20x28 patches: padded 7x7 windows, a resized position table) and for 224x224."""
    config = original_config()
    backbone = HiViTMAEBackbone(config).eval()
    backbone.load_state_dict(original_weights(config), strict=True)
    inputs, expected = original_outputs
    for suffix, pixel_values in inputs.items():
        with torch.no_grad():
            feature_maps = backbone(pixel_values).feature_maps
        for level, actual in enumerate(feature_maps):
            torch.testing.assert_close(actual, expected[f"p{level}{suffix}"], atol=1e-4, rtol=0)


def test_default_backbone_differs_from_the_original_only_where_documented(original_outputs):
    """Without the switch, at 224x224 (whole windows, the table as stored) the main-stage levels are the original's;
    the stem levels are tapped at the stage ends instead. At 320x448 the masked padding and the table resized to the
    grid change the main stage too."""
    config = original_config(legacy_detection_backbone=False)
    backbone = HiViTMAEBackbone(config).eval()
    backbone.load_state_dict(original_weights(config), strict=True)
    inputs, expected = original_outputs
    with torch.no_grad():
        at_224 = backbone(inputs["_224"]).feature_maps
        at_320x448 = backbone(inputs[""]).feature_maps
    for level in (2, 3):
        torch.testing.assert_close(at_224[level], expected[f"p{level}_224"], atol=1e-4, rtol=0)
        assert (at_320x448[level] - expected[f"p{level}"]).abs().max() > 1e-3
    for level in (0, 1):
        assert (at_224[level] - expected[f"p{level}_224"]).abs().max() > 1e-2


# ------------------------------------------------------------------------------------------- default backbone


def test_feature_maps_are_the_stage_outputs(make_config):
    """Every stage's map is the encoder's state at the end of the stage (the patch embeddings for `stem`), laid out
    as an image, the last one 2x2 max-pooled; each feature map is its stage's map through a LayerNorm over channels."""
    config = make_config(out_features=["stem", "stage1", "stage2", "stage3", "stage4"])
    backbone = HiViTMAEBackbone(config).eval()
    for norm in backbone.hidden_states_norms.values():  # not the identity they start as
        torch.nn.init.normal_(norm.weight)
        torch.nn.init.normal_(norm.bias)
    pixel_values = seeded(2, 3, 48, 80)
    grid = (3, 5)
    with torch.no_grad():
        outputs = backbone(pixel_values, output_hidden_states=True)
        encoder = backbone.hivit(pixel_values, output_hidden_states=True).hidden_states
        embeddings = backbone.hivit.patch_embeddings(pixel_values)
    stem_stage0, stem_stage1, main_output = encoder[0], encoder[1], encoder[-1]
    expected = [feature_map(state, grid) for state in (embeddings, stem_stage0, stem_stage1, main_output)]
    expected.append(F.max_pool2d(expected[-1], 2))
    assert len(outputs.hidden_states) == len(expected) == len(outputs.feature_maps)
    for stage, actual, hidden, reference in zip(
        backbone.out_features, outputs.feature_maps, outputs.hidden_states, expected
    ):
        torch.testing.assert_close(hidden, reference)
        torch.testing.assert_close(actual, layer_norm_2d(reference, backbone.hidden_states_norms[stage]))
    assert [tuple(m.shape[1:]) for m in outputs.feature_maps] == [
        (16, 12, 20),
        (16, 12, 20),
        (32, 6, 10),
        (64, 3, 5),
        (64, 1, 2),
    ]


def test_out_features_channels_and_strides(make_config):
    config = make_config()
    assert config.stage_names == ["stem", "stage1", "stage2", "stage3", "stage4"]
    assert config.out_features == ["stage1", "stage2", "stage3", "stage4"] and config.out_indices == [1, 2, 3, 4]
    backbone = HiViTMAEBackbone(config)
    assert backbone.channels == [16, 32, 64, 64] and backbone.strides == [4, 8, 16, 32]
    picked = HiViTMAEBackbone(make_config(out_indices=[3]))
    assert (
        picked.out_features == ["stage3"] and picked.channels == [64] and set(picked.hidden_states_norms) == {"stage3"}
    )
    with torch.no_grad():
        (feature_map_,) = picked(seeded(1, 3, 64, 32)).feature_maps
    assert feature_map_.shape == (1, 64, 4, 2)
    with pytest.raises(ValueError, match="out_features"):
        make_config(out_features=["stage9"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"window_size": -1}, "window_size"),
        ({"window_size": 2, "global_attn_indexes": [2]}, "global_attn_indexes"),
        ({"legacy_detection_backbone": True, "depths": [2, 1, 2]}, "legacy_detection_backbone"),
    ],
)
def test_invalid_backbone_config_raises(make_config, overrides, message):
    with pytest.raises(ValueError, match=message):
        make_config(**overrides)


def test_window_attention_by_hand(make_config):
    """A windowed layer equals the same layer run on each window's real patches alone (padding masked out), a
    global layer is untouched, and a window covering the whole grid is global attention."""
    config = make_config(depths=[1, 1, 2], window_size=2, global_attn_indexes=[1], use_relative_position_bias=True)
    backbone = HiViTMAEBackbone(config).eval()
    pixel_values = seeded(2, 3, 48, 80)  # a 3x5 grid: 2x2 windows, the last row and column padded
    grid = (3, 5)
    steps = {(s.stage, s.block): s.hidden_states for s in backbone.hivit.iter_blocks(pixel_values)}
    windowed, global_layer = backbone.hivit.encoder.layers
    tokens = steps[(2, 0)]
    expected = torch.empty_like(tokens)
    with torch.no_grad():
        for top in range(0, 3, 2):
            for left in range(0, 5, 2):
                rows = range(top, min(top + 2, 3))
                cols = range(left, min(left + 2, 5))
                patches = [r * 5 + c for r in rows for c in cols]
                # relative positions inside the window: a 2x2 window's index cropped to the real patches
                inside = [(r - top) * 2 + (c - left) for r in rows for c in cols]
                index = relative_position_index(2, 2)[inside][:, inside]
                expected[:, patches] = windowed(tokens[:, patches], index, (2, 2))[0]
        torch.testing.assert_close(steps[(2, 1)], expected)
        full = relative_position_index(*grid)
        torch.testing.assert_close(steps[(2, 2)], global_layer(expected, full, grid)[0])

    whole = HiViTMAEBackbone(make_config(window_size=5)).eval()
    plain = HiViTMAEBackbone(make_config()).eval()
    plain.load_state_dict(whole.state_dict())
    with torch.no_grad():
        for actual, reference in zip(whole(pixel_values).feature_maps, plain(pixel_values).feature_maps):
            torch.testing.assert_close(actual, reference)


def test_window_attention_needs_every_patch(make_config, images):
    model = HiViTMAEForPreTraining(make_config(window_size=2))
    with pytest.raises(ValueError, match="window attention"):
        model(images)


def test_gradient_checkpointing_gives_the_same_gradients(make_config):
    config = make_config(window_size=2, global_attn_indexes=[1], drop_path_rate=0.0)
    torch.manual_seed(0)
    backbone = HiViTMAEBackbone(config).train()
    pixel_values = seeded(2, 3, 48, 80)

    def gradients():
        backbone.zero_grad()
        sum(m.square().mean() for m in backbone(pixel_values).feature_maps).backward()
        return {n: p.grad.clone() for n, p in backbone.named_parameters() if p.grad is not None}

    plain = gradients()
    backbone.gradient_checkpointing_enable()
    checkpointed = gradients()
    assert plain.keys() == checkpointed.keys() and "hivit.position_embeddings" in plain
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], msg=name)


def test_compiles_without_graph_breaks(make_config):
    torch._dynamo.reset()
    backbone = HiViTMAEBackbone(make_config(window_size=2, global_attn_indexes=[1])).eval()
    compiled = torch.compile(backbone, fullgraph=True, backend="eager")
    pixel_values = seeded(2, 3, 48, 80)
    with torch.no_grad():
        for actual, expected in zip(compiled(pixel_values).feature_maps, backbone(pixel_values).feature_maps):
            torch.testing.assert_close(actual, expected)


# ---------------------------------------------------------------------------------------------------- loading


def test_loads_the_encoder_of_every_folder(tmp_path, make_config, caplog):
    """From pre-training (with `use_hifeat` too), encoder and classifier folders the backbone takes the encoder's
    weights; the per-level norms start as LayerNorms do, and the load report names them and nothing else."""
    torch.manual_seed(0)
    pretraining = HiViTMAEForPreTraining(make_config(use_hifeat=True, decoder_first_token_as_cls=False))
    pretraining.save_pretrained(tmp_path / "pretraining")
    pretraining.hivit.save_pretrained(tmp_path / "encoder")
    classifier = HiViTMAEForImageClassification(make_config(num_labels=3))
    classifier.save_pretrained(tmp_path / "classifier")
    sources = {"pretraining": pretraining.hivit, "encoder": pretraining.hivit, "classifier": classifier.hivit}
    for folder, encoder in sources.items():
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="transformers"):
            backbone = HiViTMAEBackbone.from_pretrained(tmp_path / folder)
        expected = {k: v for k, v in encoder.state_dict().items() if not k.startswith("hifeat_layernorm")}
        actual = backbone.hivit.state_dict()
        assert actual.keys() == expected.keys()
        for key in expected:
            assert torch.equal(actual[key], expected[key]), (folder, key)
        for norm in backbone.hidden_states_norms.values():
            assert torch.equal(norm.weight, torch.ones_like(norm.weight))
            assert torch.equal(norm.bias, torch.zeros_like(norm.bias))
        report = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(report) == 1 and "hidden_states_norms" in report[0], (folder, report)
        assert all(stage in report[0] for stage in backbone.out_features), report


def test_save_and_load_round_trip(tmp_path, make_config, caplog):
    torch.manual_seed(0)
    backbone = HiViTMAEBackbone(make_config(out_indices=[2, 4], window_size=2)).eval()
    for norm in backbone.hidden_states_norms.values():
        torch.nn.init.normal_(norm.weight)
    backbone.save_pretrained(tmp_path / "backbone")
    with caplog.at_level(logging.WARNING, logger="transformers"):
        reloaded = HiViTMAEBackbone.from_pretrained(tmp_path / "backbone").eval()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert reloaded.out_features == ["stage2", "stage4"] and reloaded.config.window_size == 2
    pixel_values = seeded(1, 3, 48, 80)
    with torch.no_grad():
        for actual, expected in zip(reloaded(pixel_values).feature_maps, backbone(pixel_values).feature_maps):
            assert torch.equal(actual, expected)


def test_auto_backbone_with_remote_code(tmp_path, make_config):
    """Every folder maps `AutoBackbone`; a process that cannot import this project builds the backbone from the
    folder's code and loads its weights. (`AutoBackbone.from_pretrained` itself takes only Hub repos in transformers
    5.x: it asks the Hub whether the name is a repo, and otherwise loads a timm model.)"""
    torch.manual_seed(0)
    HiViTMAEForPreTraining(make_config()).save_pretrained(tmp_path / "model")
    script = textwrap.dedent(
        """
        import sys
        sys.modules["modeling_hivit_mae"] = sys.modules["configuration_hivit_mae"] = None
        import torch
        from transformers import AutoBackbone, AutoConfig

        config = AutoConfig.from_pretrained("model", trust_remote_code=True, out_indices=[1, 3])
        backbone_class = type(AutoBackbone.from_config(config, trust_remote_code=True))
        backbone = backbone_class.from_pretrained("model", config=config)
        assert type(backbone).__name__ == "HiViTMAEBackbone", type(backbone)
        assert type(backbone).__module__.startswith("transformers_modules"), type(backbone).__module__
        maps = backbone(torch.randn(1, 3, 64, 96)).feature_maps
        print([tuple(m.shape) for m in maps], backbone.channels)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[(1, 16, 16, 24), (1, 64, 4, 6)] [16, 64]" in result.stdout


# ----------------------------------------------------------------------------------------------------- UperNet


def register_auto_classes():
    """What a user writes once so that transformers' dense-prediction models can build and reload this backbone
    from its config (the README shows the same lines)."""
    from transformers import AutoBackbone, AutoConfig

    AutoConfig.register("hivit_mae", HiViTMAEConfig, exist_ok=True)
    AutoBackbone.register(HiViTMAEConfig, HiViTMAEBackbone, exist_ok=True)


def test_upernet_trains_with_trainer_and_reloads(tmp_path, make_config):
    """UperNet on this backbone: Trainer fits generated segmentation masks (the loss falls), and the saved model
    reloads with the same predictions."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments, UperNetConfig, UperNetForSemanticSegmentation

    register_auto_classes()
    config = UperNetConfig(
        backbone_config=make_config(),
        hidden_size=16,
        auxiliary_in_channels=64,
        auxiliary_channels=8,
        pool_scales=[1, 2],
        num_labels=2,
        use_auxiliary_head=False,
    )
    torch.manual_seed(0)
    model = UperNetForSemanticSegmentation(config)
    assert isinstance(model.backbone, HiViTMAEBackbone)

    rng = np.random.RandomState(0)
    images, masks = [], []
    for _ in range(16):  # a bright rectangle (class 1) on noise (class 0)
        image = rng.normal(0, 0.3, (3, 32, 32)).astype(np.float32)
        mask = np.zeros((32, 32), dtype=np.int64)
        top, left = rng.randint(0, 16, 2)
        mask[top : top + 16, left : left + 16] = 1
        image[:, mask == 1] += 1.5
        images.append(image)
        masks.append(mask)
    data = Dataset.from_dict({"pixel_values": images, "labels": masks}).with_format("torch")
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=12,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
    )
    stem_weight = model.backbone.hivit.stem[0].blocks[0].mlp.fc1.weight.detach().clone()
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert np.mean(losses[-3:]) < 0.75 * np.mean(losses[:3]), losses
    assert not torch.equal(model.backbone.hivit.stem[0].blocks[0].mlp.fc1.weight.detach(), stem_weight)

    model.save_pretrained(tmp_path / "upernet")
    reloaded = UperNetForSemanticSegmentation.from_pretrained(tmp_path / "upernet").eval()
    assert isinstance(reloaded.backbone, HiViTMAEBackbone)
    pixel_values = torch.stack([torch.as_tensor(image) for image in images[:2]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values).logits, model.eval()(pixel_values).logits)
