"""Conversion of the original HiViT repository's checkpoints (github.com/zhangxiaosong18/hivit), checked against the
outputs that the original code computed for the fixtures in `tests/fixtures/original_hivit/` (see its README)."""

import argparse
import copy
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hivit_mae_tools.conversion import original
from hivit_mae_tools.conversion.safe_load import load_checkpoint
from hivit_mae_tools.conversion.types import CheckpointError, ConversionOptions
from modeling_hivit_mae import HiViTMAEForImageClassification, HiViTMAEForPreTraining, HiViTMAEModel

FIXTURES = Path(__file__).parent / "fixtures" / "original_hivit"
ATOL = 1e-4
# `mae_tiny.pth` was built with 2 encoder and 2 decoder heads (fixture README); no weight shows head counts.
MAE_TINY_HEADS = {"num_attention_heads": 2, "decoder_num_attention_heads": 2}


def load_fixture(name: str):
    """A checkpoint (`.pth`) as the converter reads it (its `args` is an `argparse.Namespace`, its storages are tagged
    cuda:0), or the inputs and expected outputs (`.pt`)."""
    if name.endswith(".pth"):
        return load_checkpoint(FIXTURES / name)
    return torch.load(FIXTURES / name, weights_only=True)


@pytest.fixture(scope="module")
def pixel_values():
    return load_fixture("inputs.pt")["pixel_values"]


@pytest.fixture(scope="module")
def mae_checkpoint():
    return load_fixture("mae_tiny.pth")


@pytest.fixture(scope="module")
def classifier_checkpoint():
    return load_fixture("classifier_tiny.pth")


def convert(checkpoint, **options):
    return original.convert(checkpoint, ConversionOptions(**options))


def load(model_class, conversion):
    model = model_class(conversion.config).eval()
    model.load_state_dict(conversion.state_dict, strict=True)
    return model


def max_diff(a, b) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


def test_pretraining_outputs_equal_the_original(mae_checkpoint, pixel_values):
    expected = load_fixture("mae_tiny_expected.pt")
    conversion = convert(mae_checkpoint, overrides=MAE_TINY_HEADS)
    assert conversion.kind == "pretraining" and conversion.unused == []
    model = load(HiViTMAEForPreTraining, conversion)
    with torch.no_grad():
        outputs = model(pixel_values, noise=expected["noise"])
        unmasked = model.hivit(pixel_values, output_hidden_states=True)
        masked = model.hivit(pixel_values, mask=True, noise=expected["noise"])
    assert torch.equal(outputs.mask, expected["mask"])
    assert torch.equal(outputs.ids_restore, expected["ids_restore"])
    assert max_diff(outputs.logits, expected["pred"]) < ATOL
    assert abs(outputs.loss.item() - expected["loss"].item()) < ATOL
    assert max_diff(unmasked.last_hidden_state, expected["unmasked_hifeat_normed"]) < ATOL
    assert max_diff(unmasked.hidden_states[-1], expected["unmasked_last"]) < ATOL
    assert max_diff(masked.last_hidden_state, expected["latent"]) < ATOL


def test_encoder_only_checkpoint_gives_the_original_features(mae_checkpoint, pixel_values):
    """The pre-training weights without the decoder: an encoder whose hifeat is recognised from `norm`'s width."""
    expected = load_fixture("mae_tiny_expected.pt")
    weights = {k: v for k, v in mae_checkpoint["model"].items() if not k.startswith(("decoder_", "mask_token"))}
    conversion = convert(weights, overrides={"num_attention_heads": 2})
    assert conversion.kind == "encoder" and conversion.config.use_hifeat
    model = load(HiViTMAEModel, conversion)
    with torch.no_grad():
        assert max_diff(model(pixel_values).last_hidden_state, expected["unmasked_hifeat_normed"]) < ATOL


def test_classifier_outputs_equal_the_original(classifier_checkpoint, pixel_values):
    expected = load_fixture("classifier_tiny_expected.pt")
    conversion = convert(classifier_checkpoint)  # heads come from the relative position table
    assert conversion.kind == "classification" and conversion.unused == []
    model = load(HiViTMAEForImageClassification, conversion)
    with torch.no_grad():
        outputs = model(pixel_values, output_hidden_states=True)
    assert max_diff(outputs.logits, expected["logits"]) < ATOL
    assert max_diff(outputs.hidden_states[-1], expected["last_hidden_state"]) < ATOL


def test_config_inferred_as_the_fixture_readme_states(mae_checkpoint, classifier_checkpoint):
    # mae_tiny: HiViTMaskedAutoencoder(embed_dim=64, depths=[1,1,1], stem_mlp_ratio=3, mlp_ratio=4,
    # decoder_embed_dim=32, decoder_depth=1, hifeat=True, rpe=False, eps 1e-6); heads are not in the weights, so the
    # original factories' defaults apply: 64 // 64 = 1 encoder head, 16 decoder heads.
    conversion = convert(mae_checkpoint)
    config = conversion.config
    assert (config.hidden_size, config.depths, config.stem_mlp_ratio, config.mlp_ratio) == (64, [1, 1, 1], 3, 4)
    assert (config.decoder_hidden_size, config.decoder_num_hidden_layers, config.decoder_mlp_ratio) == (32, 1, 4)
    assert config.use_hifeat and config.encoder_output_size == 448
    assert not config.use_relative_position_bias and config.layer_norm_eps == 1e-6
    assert not config.decoder_first_token_as_cls and not config.legacy_position_encoding
    assert (config.image_size, config.patch_size, config.norm_pix_loss) == (224, 16, True)
    assert (config.num_attention_heads, config.decoder_num_attention_heads) == (1, 16)
    assert any("encoder attention heads assumed" in note for note in conversion.notes)
    assert any("decoder attention heads assumed" in note for note in conversion.notes)
    overridden = convert(mae_checkpoint, overrides={**MAE_TINY_HEADS, "mask_ratio": None}).config
    assert (overridden.num_attention_heads, overridden.decoder_num_attention_heads) == (2, 2)

    # classifier_tiny: HiViT(embed_dim=64, depths=[1,1,2], num_heads=2, rpe=True, eps 1e-6, num_classes=5).
    conversion = convert(classifier_checkpoint)
    config = conversion.config
    assert (config.hidden_size, config.depths, config.num_attention_heads) == (64, [1, 1, 2], 2)
    assert config.use_relative_position_bias and config.use_fc_norm and not config.use_hifeat
    assert config.layer_norm_eps == 1e-6 and config.num_labels == 5
    assert config.id2label == {i: f"LABEL_{i}" for i in range(5)}
    assert not any("heads assumed" in note for note in conversion.notes)


def original_base_weights(decoder_depth=6, num_classes=None, embed_dim=512, depths=(2, 2, 20), heads=8):
    """The state-dict layout of the original `mae_hivit_base_dec512d6b` (or, with `num_classes`, `hivit_base`), written
    from the original constructors in `models_hivit_mae.py` / `models_hivit.py`: shapes only (meta tensors), except
    the relative position index, built with the original formula."""
    meta = dict(device="meta")
    weights = {"absolute_pos_embed": torch.empty(1, 196, embed_dim, **meta)}
    width = embed_dim // 4
    weights["patch_embed.proj.weight"] = torch.empty(width, 3, 4, 4, **meta)
    for name in ("patch_embed.proj.bias", "patch_embed.norm.weight", "patch_embed.norm.bias"):
        weights[name] = torch.empty(width, **meta)

    def block(prefix, dim, ratio, attention, rpe=False):
        if attention:
            weights[prefix + "norm1.weight"] = weights[prefix + "norm1.bias"] = torch.empty(dim, **meta)
            weights[prefix + "attn.qkv.weight"] = torch.empty(3 * dim, dim, **meta)
            weights[prefix + "attn.qkv.bias"] = torch.empty(3 * dim, **meta)
            weights[prefix + "attn.proj.weight"] = torch.empty(dim, dim, **meta)
            weights[prefix + "attn.proj.bias"] = torch.empty(dim, **meta)
            if rpe:
                weights[prefix + "attn.relative_position_bias_table"] = torch.empty(27 * 27, heads, **meta)
        weights[prefix + "norm2.weight"] = weights[prefix + "norm2.bias"] = torch.empty(dim, **meta)
        weights[prefix + "mlp.fc1.weight"] = torch.empty(int(dim * ratio), dim, **meta)
        weights[prefix + "mlp.fc1.bias"] = torch.empty(int(dim * ratio), **meta)
        weights[prefix + "mlp.fc2.weight"] = torch.empty(dim, int(dim * ratio), **meta)
        weights[prefix + "mlp.fc2.bias"] = torch.empty(dim, **meta)

    index = 0
    for depth in depths[:-1]:
        for _ in range(2 * depth):
            block(f"blocks.{index}.", width, 3.0, attention=False)
            index += 1
        weights[f"blocks.{index}.norm.weight"] = weights[f"blocks.{index}.norm.bias"] = torch.empty(4 * width, **meta)
        weights[f"blocks.{index}.reduction.weight"] = torch.empty(2 * width, 4 * width, **meta)
        index, width = index + 1, 2 * width
    for _ in range(depths[-1]):
        block(f"blocks.{index}.", width, 4.0, attention=True, rpe=num_classes is not None)
        index += 1
    if num_classes is not None:
        coords = torch.stack(torch.meshgrid([torch.arange(14), torch.arange(14)], indexing="ij")).flatten(1)
        relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
        relative[:, :, 0] += 13
        relative[:, :, 1] += 13
        relative[:, :, 0] *= 27
        weights["relative_position_index"] = relative.sum(-1)
        weights["fc_norm.weight"] = weights["fc_norm.bias"] = torch.empty(embed_dim, **meta)
        weights["head.weight"] = torch.empty(num_classes, embed_dim, **meta)
        weights["head.bias"] = torch.empty(num_classes, **meta)
        return weights
    weights["norm.weight"] = weights["norm.bias"] = torch.empty(7 * embed_dim, **meta)
    weights["mask_token"] = torch.empty(1, 1, 512, **meta)
    weights["decoder_pos_embed"] = torch.empty(1, 196, 512, **meta)
    weights["decoder_embed.weight"] = torch.empty(512, 7 * embed_dim, **meta)
    weights["decoder_embed.bias"] = torch.empty(512, **meta)
    for j in range(decoder_depth):
        block(f"decoder_blocks.{j}.", 512, 4.0, attention=True)
    weights["decoder_norm.weight"] = weights["decoder_norm.bias"] = torch.empty(512, **meta)
    weights["decoder_pred.weight"] = torch.empty(768, 512, **meta)
    weights["decoder_pred.bias"] = torch.empty(768, **meta)
    return weights


@pytest.mark.parametrize("decoder_depth", [6, 8])  # mae_hivit_base_1600ep.pth, ..._dec512d8b_hifeat_p1600lr10.pth
def test_released_pretraining_layouts_give_the_original_factory(decoder_depth):
    conversion = convert({"model": original_base_weights(decoder_depth), "args": argparse.Namespace(model="x")})
    config = conversion.config
    assert conversion.kind == "pretraining" and conversion.unused == []
    assert (config.hidden_size, config.depths, config.num_attention_heads) == (512, [2, 2, 20], 8)
    assert config.use_hifeat and config.encoder_output_size == 3584 and config.layer_norm_eps == 1e-6
    assert (config.decoder_hidden_size, config.decoder_num_hidden_layers, config.decoder_num_attention_heads) == (
        512,
        decoder_depth,
        16,
    )
    assert len(conversion.state_dict) == len(original_base_weights(decoder_depth))


def test_released_classifier_layout_gives_hivit_base_with_imagenet_names():
    weights = original_base_weights(num_classes=1000)
    conversion = convert({"model": weights})
    config = conversion.config
    assert conversion.kind == "classification"
    assert (config.hidden_size, config.depths, config.num_attention_heads) == (512, [2, 2, 20], 8)
    assert config.use_relative_position_bias and config.use_fc_norm and not config.use_hifeat
    assert config.num_labels == 1000 and conversion.dataset == "imagenet-1k"
    # ImageNet-1k's class order (synset order): n01440764 tench, n01443537 goldfish, ..., n15075141 toilet tissue.
    assert (config.id2label[0], config.id2label[1], config.id2label[999]) == ("tench", "goldfish", "toilet tissue")
    # The relative position index buffer is checked and dropped; everything else converts.
    assert len(conversion.state_dict) == len(weights) - 1

    named = convert({"model": weights}, labels=[f"c{i}" for i in range(1000)]).config
    assert named.id2label[999] == "c999"


def test_detect():
    mae = load_fixture("mae_tiny.pth")
    classifier = load_fixture("classifier_tiny.pth")
    for checkpoint in (mae, mae["model"], classifier, classifier["model"]):
        assert original.detect(checkpoint)
    # mmpretrain's layouts: a `backbone.`/`neck.` MAE, and a bare exported backbone (`pos_embed`, no original name).
    mmpretrain = {"backbone." + k.replace("absolute_pos_embed", "pos_embed"): v for k, v in mae["model"].items()}
    assert not original.detect({"state_dict": mmpretrain})
    encoder = {k: v for k, v in mae["model"].items() if k.startswith(("blocks.", "patch_embed.", "absolute_pos"))}
    bare_backbone = {k.replace("absolute_pos_embed", "pos_embed"): v for k, v in encoder.items()}
    assert not original.detect(bare_backbone)
    assert not original.detect({"model": {"absolute_pos_embed": torch.zeros(1)}})


def test_model_ema_is_offered_and_used_on_request(classifier_checkpoint):
    checkpoint = dict(classifier_checkpoint)
    checkpoint["model_ema"] = {k: v + 1 if v.is_floating_point() else v for k, v in checkpoint["model"].items()}
    plain = convert(checkpoint)
    assert "model_ema present; pass --use_ema to convert it" in plain.notes
    assert torch.equal(plain.state_dict["classifier.weight"], checkpoint["model"]["head.weight"])
    ema = convert(checkpoint, use_ema=True)
    assert any("model_ema used" in note for note in ema.notes)
    assert torch.equal(ema.state_dict["classifier.weight"], checkpoint["model_ema"]["head.weight"])
    with pytest.raises(CheckpointError, match="no model_ema"):
        convert(classifier_checkpoint, use_ema=True)


def test_final_norm_without_hifeat_is_left_out(mae_checkpoint):
    """Without hifeat the pre-training model builds `norm` (hidden_size wide) but never applies it."""
    weights = dict(mae_checkpoint["model"])
    weights["norm.weight"], weights["norm.bias"] = torch.ones(64), torch.zeros(64)
    weights["decoder_embed.weight"] = torch.zeros(32, 64)
    conversion = convert(weights, overrides=MAE_TINY_HEADS)
    assert not conversion.config.use_hifeat
    # Left out on purpose, so the command line needs no --allow-unused for it; the card's notes say why.
    assert conversion.unused == [] and not any(key.startswith("norm.") for key in conversion.state_dict)
    assert any("never applies" in note for note in conversion.notes)
    load(HiViTMAEForPreTraining, conversion)  # every model weight is there


def renumbered(weights: dict, drop: int) -> dict:
    """`weights` without `blocks.{drop}`, the later blocks moved one index down."""
    out = {}
    for key, value in weights.items():
        if key.startswith("blocks."):
            index, rest = key.split(".", 2)[1:]
            if int(index) == drop:
                continue
            key = f"blocks.{int(index) - (int(index) > drop)}.{rest}"
        out[key] = value
    return out


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda w: renumbered(w, drop=0), "odd number of MLP blocks"),
        (lambda w: renumbered(w, drop=2), "1 patch merges"),  # the first merge
        (lambda w: {k: v for k, v in w.items() if not k.startswith("blocks.1.")}, "not numbered consecutively"),
        (lambda w: {**w, "blocks.0.attn.qkv.weight": torch.zeros(48, 16)}, "not stem MLP blocks"),
        (lambda w: {**w, "decoder_embed.weight": torch.zeros(32, 100)}, "encoder output is 100 wide"),
        (lambda w: {**w, "head.weight": torch.zeros(5, 64)}, "both an MAE decoder"),
        (lambda w: {**w, "extra.weight": torch.zeros(1)}, "map to no weight of HiViT-MAE: extra.weight"),
        (lambda w: {**w, "absolute_pos_embed": torch.zeros(1, 195, 64)}, "not a square patch grid"),
    ],
)
def test_refuses_what_the_model_cannot_express(mae_checkpoint, edit, message):
    with pytest.raises(CheckpointError, match=message):
        convert(edit(dict(mae_checkpoint["model"])), overrides=MAE_TINY_HEADS)


def test_refusals_of_options(mae_checkpoint, classifier_checkpoint):
    with pytest.raises(CheckpointError, match="--arch"):
        convert(mae_checkpoint, arch="base")
    with pytest.raises(CheckpointError, match="decoder_num_attention_heads"):
        convert(mae_checkpoint, overrides={"decoder_num_attention_heads": 3})  # 32 is not divisible by 3
    bad_index = copy.deepcopy(classifier_checkpoint)
    bad_index["model"]["relative_position_index"] = bad_index["model"]["relative_position_index"].flip(0)
    with pytest.raises(CheckpointError, match="relative_position_index"):
        convert(bad_index)


def test_unknown_tensors_pass_with_allow_unused(mae_checkpoint):
    weights = {**mae_checkpoint["model"], "extra.weight": torch.zeros(1)}
    conversion = convert(weights, overrides=MAE_TINY_HEADS, allow_unused=True)
    assert conversion.unused == ["extra.weight"] and "extra.weight" not in conversion.state_dict


def test_source_description_names_source_files_and_license():
    for kind in ("pretraining", "classification", "encoder"):
        text = original.source_description(kind)
        assert "github.com/zhangxiaosong18/hivit" in text and "MIT" in text
        assert "do not state a license" in text
    assert "mae_hivit_base_1600ep.pth" in original.source_description("pretraining")
    assert "mae_hivit_base_dec512d8b_hifeat_p1600lr10.pth" in original.source_description("pretraining")
    assert "mae_hivit_base_1600ep_ft100ep.pth" in original.source_description("classification")


def test_labels_must_fit_the_head(mae_checkpoint, classifier_checkpoint):
    assert convert(classifier_checkpoint, labels=list("abcde")).config.id2label[4] == "e"
    with pytest.raises(CheckpointError, match="--labels names 4 classes, but the checkpoint has a head of 5"):
        convert(classifier_checkpoint, labels=list("abcd"))
    with pytest.raises(CheckpointError, match="no classification head"):
        convert(mae_checkpoint, overrides=MAE_TINY_HEADS, labels=["a"])


# ---------------------------------------------------------------------------------------------------------------
# End to end: `python convert_checkpoint.py` on the original files, then transformers' Auto classes with remote code


ROOT = Path(__file__).resolve().parents[1]


def run_converter(tmp_path, checkpoint: str, *flags: str) -> Path:
    """Run `python convert_checkpoint.py` as a user of a clone would, in a process that imports nothing else of the
    test environment (no PYTHONPATH, Hub offline, its own HF cache); returns the output folder."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PYTHONPATH", "HF_"))}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    output_dir = tmp_path / Path(checkpoint).stem
    command = [sys.executable, str(ROOT / "convert_checkpoint.py"), "--checkpoint", str(FIXTURES / checkpoint)]
    result = subprocess.run(
        [*command, "--output_dir", str(output_dir), *flags], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert result.returncode == 0, result.stderr
    assert "(original HiViT)" in result.stdout
    return output_dir


def check_card(folder: Path, checkpoint: str) -> str:
    card = (folder / "README.md").read_text()
    assert "github.com/zhangxiaosong18/hivit" in card and "MIT" in card
    assert "do not state a license" in card and "license: unknown" in card
    assert f"`{checkpoint}`" in card
    assert hashlib.sha256((FIXTURES / checkpoint).read_bytes()).hexdigest() in card
    return card


def test_converter_command_on_the_original_classifier(tmp_path, pixel_values):
    from transformers import AutoModelForImageClassification

    folder = run_converter(tmp_path, "classifier_tiny.pth")  # no other flag: heads from the relative position table
    expected = load_fixture("classifier_tiny_expected.pt")
    model = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        assert max_diff(model(pixel_values).logits, expected["logits"]) < ATOL
    check_card(folder, "classifier_tiny.pth")


def test_converter_command_on_the_original_pretraining_checkpoint(tmp_path, pixel_values):
    from transformers import AutoModel, AutoModelForPreTraining

    # The head counts of the tiny fixture (2 and 2) differ from the original factories' defaults that a flag-less
    # conversion assumes (hidden_size // 64 = 1 and 16; right for the released base files), and no weight shows them.
    folder = run_converter(
        tmp_path, "mae_tiny.pth", "--num_attention_heads", "2", "--decoder_num_attention_heads", "2"
    )
    expected = load_fixture("mae_tiny_expected.pt")
    model = AutoModelForPreTraining.from_pretrained(folder, trust_remote_code=True).eval()
    encoder = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        outputs = model(pixel_values, noise=expected["noise"])
        features = encoder(pixel_values, output_hidden_states=True)
    assert torch.equal(outputs.mask, expected["mask"])
    assert max_diff(outputs.logits, expected["pred"]) < ATOL
    assert abs(outputs.loss.item() - expected["loss"].item()) < ATOL
    assert max_diff(features.last_hidden_state, expected["unmasked_hifeat_normed"]) < ATOL
    assert max_diff(features.hidden_states[-1], expected["unmasked_last"]) < ATOL
    card = check_card(folder, "mae_tiny.pth")
    assert "last_hidden_state  # (batch_size, 196, 448)" in card  # the card's snippet states the hifeat width
