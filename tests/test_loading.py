"""`from_pretrained` refuses a folder whose config.json does not describe its weights (each case as a user makes it:
save a model, edit its config.json, load), and still loads the heads that are meant to start new."""

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import small_config
from safetensors.torch import load_file
from torch import nn

from modeling_hivit_mae import HiViTMAEForImageClassification, HiViTMAEForPreTraining, HiViTMAEModel

HINT = "config.json (or the config passed to from_pretrained) does not match the weights"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A pre-training, an encoder-only and a 3-class classifier folder of the same tiny model (depths [1, 1, 2],
    decoder depth 2)."""
    root = tmp_path_factory.mktemp("saved")
    torch.manual_seed(0)
    pretraining = HiViTMAEForPreTraining(small_config())
    pretraining.save_pretrained(root / "pretraining")
    pretraining.hivit.save_pretrained(root / "encoder")
    classifier = HiViTMAEForImageClassification(small_config(num_labels=3))
    classifier.hivit.load_state_dict(pretraining.hivit.state_dict())
    classifier.save_pretrained(root / "classifier")
    return root


def edited(folders, tmp_path, source="pretraining", **changes):
    """A copy of `folders / source` whose config.json says `changes`."""
    folder = tmp_path / f"{source}-edited"
    shutil.copytree(folders / source, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


ALL_CLASSES = [HiViTMAEModel, HiViTMAEForPreTraining, HiViTMAEForImageClassification]


@pytest.mark.parametrize(
    "changes, classes, named",
    [
        # A deeper config than the weights: the extra layer would be random.
        ({"depths": [1, 1, 3]}, ALL_CLASSES, ["missing from the weights: ", "encoder.layers.2 (12 tensors)"]),
        # A shallower one: a truncated model.
        (
            {"depths": [1, 1, 1]},
            ALL_CLASSES,
            ["in the weights but not in the model: ", "encoder.layers.1 (12 tensors)"],
        ),
        ({"depths": [2, 1, 2]}, ALL_CLASSES, ["missing from the weights: ", "stem.0.blocks.2, ", "stem.0.blocks.3"]),
        ({"decoder_num_hidden_layers": 3}, [HiViTMAEForPreTraining], ["missing", "decoder.decoder_layers.2 (12"]),
        ({"decoder_num_hidden_layers": 1}, [HiViTMAEForPreTraining], ["not in the model: decoder.decoder_layers.1 ("]),
        (
            {"use_relative_position_bias": True},
            [HiViTMAEModel, HiViTMAEForPreTraining],
            ["missing", "encoder.layers.0.attention.relative_position_bias_table, ", "(2 tensors)"],
        ),
        ({"layer_scale_init_value": 0.1}, ALL_CLASSES, ["missing", "encoder.layers.1.layer_scale2", "(8 tensors)"]),
        (
            {"use_absolute_position_embeddings": False},
            ALL_CLASSES,
            ["in the weights but not in the model: ", "position_embeddings (1 tensor)"],
        ),
        (
            {"hidden_size": 128},
            ALL_CLASSES,
            ["of another shape: ", "encoder.layers.0.attention.proj.weight", "ignore_mismatched_sizes=True"],
        ),
        (
            {"decoder_hidden_size": 64},
            [HiViTMAEForPreTraining],
            ["of another shape: decoder.decoder_embed.bias", "decoder.decoder_embed.weight"],
        ),
    ],
)
def test_config_that_does_not_match_the_weights_is_an_error(folders, tmp_path, changes, classes, named):
    folder = edited(folders, tmp_path, **changes)
    for model_class in classes:
        with pytest.raises(ValueError) as error:
            model_class.from_pretrained(folder)
        message = str(error.value)
        assert "\n" not in message  # one line, for the CLIs' `error:` line
        assert message.startswith(f"{model_class.__name__}: the weights in {folder} do not fit its config; ")
        assert HINT in message
        for part in named:
            assert part in message, (part, message)


def test_shapes_are_named_with_both_sizes(folders, tmp_path):
    # transformers 5 reports the two shapes; 4.x only the key.
    folder = edited(folders, tmp_path, hidden_size=128)
    with pytest.raises(ValueError, match=r"proj\.weight( \(64, 64\) in the weights, \(128, 128\) in the model)?,"):
        HiViTMAEModel.from_pretrained(folder)


def test_output_loading_info_still_returns_the_info_and_still_checks(folders, tmp_path):
    model, info = HiViTMAEForPreTraining.from_pretrained(folders / "pretraining", output_loading_info=True)
    assert isinstance(model, HiViTMAEForPreTraining)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    with pytest.raises(ValueError, match="encoder.layers.2"):
        HiViTMAEForPreTraining.from_pretrained(edited(folders, tmp_path, depths=[1, 1, 3]), output_loading_info=True)


def test_new_decoder_on_an_encoder_folder_loads_with_a_warning(folders, caplog):
    encoder = HiViTMAEModel.from_pretrained(folders / "encoder")
    with caplog.at_level(logging.WARNING, logger="modeling_hivit_mae"):
        model, info = HiViTMAEForPreTraining.from_pretrained(folders / "encoder", output_loading_info=True)
    assert "holds no `decoder` weights; `decoder` is newly initialised" in caplog.text
    assert {key for key in info["missing_keys"]} == {f"decoder.{key}" for key in model.decoder.state_dict()}
    for name, value in encoder.state_dict().items():
        assert torch.equal(model.hivit.state_dict()[name], value), name
    # A pre-training folder has a decoder: nothing to warn about.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="modeling_hivit_mae"):
        HiViTMAEForPreTraining.from_pretrained(folders / "pretraining")
    assert "newly initialised" not in caplog.text


def test_new_classifier_and_relative_position_bias_for_fine_tuning(folders, tmp_path, caplog):
    """The classifier starts new on a pre-training folder, and mmpretrain's fine-tuning recipe may add a relative
    position bias that MAE pre-training does not have (`run_classification.py` does)."""
    with caplog.at_level(logging.WARNING, logger="modeling_hivit_mae"):
        model = HiViTMAEForImageClassification.from_pretrained(
            folders / "pretraining", num_labels=5, use_relative_position_bias=True
        )
    assert "holds no `classifier` weights" in caplog.text
    assert model.classifier.out_features == 5
    # The encoder of the pre-training model, the decoder left out.
    pretraining = HiViTMAEForPreTraining.from_pretrained(folders / "pretraining")
    for name, value in pretraining.hivit.state_dict().items():
        assert torch.equal(model.hivit.state_dict()[name], value), name
    # Relative position bias is still refused where it was not asked for on purpose.
    with pytest.raises(ValueError, match="relative_position_bias_table"):
        HiViTMAEModel.from_pretrained(folders / "pretraining", use_relative_position_bias=True)


def test_classifier_for_other_classes_needs_ignore_mismatched_sizes(folders):
    with pytest.raises(ValueError, match=r"of another shape: classifier\.bias.*ignore_mismatched_sizes=True"):
        HiViTMAEForImageClassification.from_pretrained(folders / "classifier", num_labels=5)
    model = HiViTMAEForImageClassification.from_pretrained(
        folders / "classifier", num_labels=5, ignore_mismatched_sizes=True
    )
    assert model.classifier.out_features == 5
    # Same classes: the classifier is loaded, not new.
    saved = load_file(folders / "classifier" / "model.safetensors")["classifier.weight"]
    assert torch.equal(HiViTMAEForImageClassification.from_pretrained(folders / "classifier").classifier.weight, saved)


def test_encoder_and_pretraining_load_from_a_classifier_folder(folders):
    encoder = HiViTMAEModel.from_pretrained(folders / "encoder")
    for model in (
        HiViTMAEModel.from_pretrained(folders / "classifier"),
        HiViTMAEForPreTraining.from_pretrained(folders / "classifier").hivit,
    ):
        for name, value in encoder.state_dict().items():
            assert torch.equal(model.state_dict()[name], value), name


def test_subclass_declares_its_new_layers(folders):
    """A subclass declares what it adds with transformers' `_keys_to_ignore_on_load_missing` (as a backbone with
    per-level norms does); undeclared additions to the encoder are refused like any other mismatch."""

    class WithNorm(HiViTMAEModel):
        def __init__(self, config):
            super().__init__(config)
            self.extra_norm = nn.LayerNorm(config.hidden_size)
            self.post_init()

    class DeclaredNorm(WithNorm):
        _keys_to_ignore_on_load_missing = [r"^extra_norm\."]

    with pytest.raises(ValueError, match=r"missing from the weights: extra_norm \(2 tensors\)"):
        WithNorm.from_pretrained(folders / "encoder")
    model = DeclaredNorm.from_pretrained(folders / "encoder")
    assert torch.equal(model.extra_norm.weight, torch.ones(small_config().hidden_size))


def test_remote_code_loading_is_checked_too(folders, tmp_path):
    """`AutoModel.from_pretrained(..., trust_remote_code=True)` runs the folder's own copy of the model code, which
    refuses the edited config as well."""
    edited(folders, tmp_path, depths=[1, 1, 3])
    shutil.copytree(folders / "pretraining", tmp_path / "intact")
    script = textwrap.dedent(
        """
        import sys
        sys.modules["modeling_hivit_mae"] = sys.modules["configuration_hivit_mae"] = None
        from transformers import AutoModel, AutoModelForPreTraining

        model = AutoModelForPreTraining.from_pretrained("intact", trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        for auto in (AutoModel, AutoModelForPreTraining):
            try:
                auto.from_pretrained("pretraining-edited", trust_remote_code=True)
            except ValueError as error:
                print("refused:", error)
            else:
                print("loaded")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert len(lines) == 2, result.stdout
    assert lines[0].startswith("refused: HiViTMAEModel: the weights in pretraining-edited do not fit its config")
    assert lines[1].startswith("refused: HiViTMAEForPreTraining: the weights in pretraining-edited do not fit")
    assert all("missing from the weights: " in line and "encoder.layers.2 (12 tensors)" in line for line in lines)
