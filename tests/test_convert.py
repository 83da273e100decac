"""Tests of `convert_checkpoint.py` (the package `hivit_mae_tools.conversion`): every kind of input, every refusal,
the written folder, and parity of converted folders with mmpretrain 1.2.0 (the independent reference). Most tests use
a small custom HiViT built by mmpretrain itself; one converts mmpretrain's `tiny` arch at 224."""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from reference import build_mmpretrain_classifier, build_mmpretrain_mae, mmpretrain_masked_encoder
from safetensors.torch import save_file

import convert_checkpoint
from hivit_mae_tools.conversion import cli, writer
from hivit_mae_tools.conversion import mmpretrain as mmpretrain_format
from hivit_mae_tools.conversion.safe_load import sha256sum
from hivit_mae_tools.conversion.types import CheckpointError, ConversionOptions
from modeling_hivit_mae import HiViTMAEForImageClassification, HiViTMAEForPreTraining, HiViTMAEModel

ROOT = Path(__file__).resolve().parents[1]

# A small HiViT that mmpretrain builds in well under a second: 64x64 images, 4x4 patches.
SMALL = dict(embed_dims=128, depths=[1, 1, 2], num_heads=2, img_size=64, decoder_dim=32, decoder_depth=1)


def build_small_mmpretrain_mae(seed=0):
    """mmpretrain's MAE at the `SMALL` size, every tensor moved away from its initial value."""
    arch = {key: SMALL[key] for key in ("embed_dims", "depths", "num_heads")}
    return build_mmpretrain_mae(
        arch, SMALL["img_size"], seed, decoder_dim=SMALL["decoder_dim"], decoder_depth=SMALL["decoder_depth"]
    )


@pytest.fixture(scope="module")
def small_mm():
    return build_small_mmpretrain_mae()


@pytest.fixture(scope="module")
def small_state_dict(small_mm):
    return {key: value.clone() for key, value in small_mm.state_dict().items()}


def run_main(args, capsys):
    """Run the converter's CLI in-process; returns (exit status, stdout, stderr)."""
    status = convert_checkpoint.main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def assert_refused(status, err, pattern, output_dir=None):
    """One `error: ...` line matching `pattern`, a non-zero status, no traceback and nothing left behind."""
    assert status != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert re.search(pattern, lines[0]), lines[0]
    if output_dir is not None:
        assert not Path(output_dir).exists()
        assert not list(Path(output_dir).parent.glob(f".{Path(output_dir).name}.*")), "temp folder left behind"


def max_diff_vs_mmpretrain(folder, mm_model, encoder_only=False, image_size=64):
    """Largest abs difference between the converted folder and mmpretrain on the same images and mask (masked
    encoder features, plus decoder predictions and loss for a full MAE)."""
    images = torch.randn(1, 3, image_size, image_size, generator=torch.Generator().manual_seed(123))
    latent, mask, ids_restore, noise = mmpretrain_masked_encoder(mm_model, images, seed=123)
    model = (HiViTMAEModel if encoder_only else HiViTMAEForPreTraining).from_pretrained(folder).eval()
    with torch.no_grad():
        if encoder_only:
            return (model(images, mask=True, noise=noise).last_hidden_state - latent).abs().max().item()
        outputs = model(images, mask=True, noise=noise)
        pred = mm_model.neck(latent, ids_restore)
        loss = mm_model.head.loss(pred, images, mask)
    assert torch.equal(outputs.mask, mask)
    return max((outputs.logits - pred).abs().max().item(), (outputs.loss - loss).abs().item())


def clean_env(tmp_path):
    """Environment for subprocesses: no PYTHONPATH (so /work/main is not importable), HF caches under tmp_path."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PYTHONPATH", "HF_"))}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    return env


# ---------------------------------------------------------------------------------------------------------------
# Inputs


def test_mmengine_training_checkpoint_loads_without_mmengine(tmp_path, small_mm, small_state_dict):
    """A real mmengine training checkpoint (MessageHub with HistoryBuffers and numpy arrays, AdamW and scheduler
    states) converts in a process where mmengine cannot be imported, and the folder matches mmpretrain."""
    from mmengine.logging import MessageHub

    hub = MessageHub.get_instance("test_convert_training_checkpoint")
    for step in range(3):
        hub.update_scalar("train/loss", 1.0 / (step + 1))
        hub.update_scalar("train/lr", np.float64(1e-4 * step))
    hub.update_info("iter", 3)
    optimizer = torch.optim.AdamW(small_mm.parameters(), lr=1e-3)
    for parameter in small_mm.parameters():
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()  # fills exp_avg / exp_avg_sq (zero gradients leave the weights unchanged)
    optimizer.zero_grad(set_to_none=True)
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.1)
    checkpoint = dict(
        meta=dict(epoch=1, iter=3, seed=0, cfg="train_dataloader = dict(dataset=dict(type='ImageNet'))"),
        state_dict=small_state_dict,
        message_hub=hub.state_dict(),
        optimizer=optimizer.state_dict(),
        param_schedulers=[scheduler.state_dict()],
    )
    path, output_dir = tmp_path / "epoch_1.pth", tmp_path / "out"
    torch.save(checkpoint, path)

    script = (
        "import sys\n"
        "sys.modules['mmengine'] = None  # any `import mmengine...` now raises ImportError\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "import convert_checkpoint\n"
        "from hivit_mae_tools.conversion.safe_load import load_checkpoint\n"
        "checkpoint = load_checkpoint(sys.argv[1])\n"
        "assert type(checkpoint['message_hub']['log_scalars']['train/loss']).__name__ == '_Opaque'\n"
        "sys.exit(convert_checkpoint.main(['--checkpoint', sys.argv[1], '--output_dir', sys.argv[2]]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(path), str(output_dir)], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert [line.split("]")[0] for line in result.stdout.splitlines() if line.startswith("[")] == [
        "[1/4",
        "[2/4",
        "[3/4",
        "[4/4",
    ]
    assert f"written to {output_dir}" in result.stdout
    assert max_diff_vs_mmpretrain(output_dir, small_mm) < 1e-4
    card = (output_dir / "README.md").read_text()
    assert "imagenet-1k" in card and sha256sum(path) in card


@pytest.mark.parametrize("kind", ["published", "bare", "safetensors"])
def test_full_mae_inputs(tmp_path, capsys, small_mm, small_state_dict, kind):
    if kind == "safetensors":
        path = tmp_path / "mae.safetensors"
        save_file(small_state_dict, str(path))
    else:
        path = tmp_path / "mae.pth"
        torch.save(
            dict(meta=dict(epoch=400), state_dict=small_state_dict) if kind == "published" else small_state_dict, path
        )
    status, out, err = run_main(["--checkpoint", path, "--output_dir", tmp_path / "out"], capsys)
    assert status == 0, err
    assert "done: " in out and "M parameters" in out
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == ["HiViTMAEForPreTraining"]
    assert (config["hidden_size"], config["depths"], config["image_size"]) == (128, [1, 1, 2], 64)
    assert config["num_attention_heads"] == 2 and config["decoder_num_attention_heads"] == 16
    assert max_diff_vs_mmpretrain(tmp_path / "out", small_mm) < 1e-4
    # The encoder of a full folder loads on its own too.
    HiViTMAEModel.from_pretrained(tmp_path / "out")


@pytest.mark.parametrize("prefix", ["backbone.", ""])
def test_encoder_only_inputs(tmp_path, capsys, small_mm, small_state_dict, prefix):
    encoder = {
        prefix + key[len("backbone.") :]: value for key, value in small_state_dict.items() if "backbone." in key
    }
    path = tmp_path / "encoder.pth"
    torch.save(encoder, path)
    args = ["--checkpoint", path, "--output_dir", tmp_path / "out", "--verify-against-mmpretrain"]
    status, out, err = run_main(args, capsys)
    assert status == 0, err
    assert "encoder only" in out and "max abs diff vs mmpretrain" in out
    folder = tmp_path / "out"
    config = json.loads((folder / "config.json").read_text())
    # Only the encoder is written: nothing would be left at random initialisation.
    assert config["architectures"] == ["HiViTMAEModel"]
    assert "AutoModelForPreTraining" not in config["auto_map"]
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as file:
        assert not any(key.startswith("decoder") for key in file.keys())
    assert "encoder only" in (folder / "README.md").read_text()
    assert max_diff_vs_mmpretrain(folder, small_mm, encoder_only=True) < 1e-4


def test_dtype_sharding_and_overrides(tmp_path, capsys, small_state_dict):
    path = tmp_path / "mae.pth"
    torch.save(small_state_dict, path)
    folder = tmp_path / "out"
    args = ["--checkpoint", path, "--output_dir", folder, "--dtype", "bfloat16", "--max_shard_size", "300KB"]
    args += ["--num_attention_heads", "4", "--decoder_num_attention_heads", "8", "--no-norm_pix_loss"]
    status, _, err = run_main(args + ["--verify-against-mmpretrain"], capsys)
    assert status == 0, err
    assert "| loss |" in (folder / "README.md").read_text()
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    model = HiViTMAEForPreTraining.from_pretrained(folder, dtype=torch.bfloat16)
    config = model.config
    assert (config.num_attention_heads, config.decoder_num_attention_heads, config.norm_pix_loss) == (4, 8, False)
    # Round trip: every stored tensor is the source tensor rounded to bfloat16.
    assert torch.equal(
        model.hivit.encoder.layers[1].attention.qkv.weight,
        small_state_dict["backbone.blocks.7.attn.qkv.weight"].bfloat16(),
    )
    assert torch.equal(model.decoder.decoder_pred.bias, small_state_dict["neck.decoder_pred.bias"].bfloat16())


def test_allow_unused_and_overwrite(tmp_path, capsys, small_state_dict):
    path = tmp_path / "mae.pth"
    torch.save({**small_state_dict, "data_preprocessor.mean": torch.zeros(3)}, path)
    folder = tmp_path / "out"
    status, _, err = run_main(["--checkpoint", path, "--output_dir", folder], capsys)
    assert_refused(
        status, err, r"1 checkpoint tensors map to no weight.*data_preprocessor\.mean.*--allow-unused", folder
    )

    folder.mkdir()
    (folder / "old.txt").write_text("from an earlier conversion")
    args = ["--checkpoint", path, "--output_dir", folder, "--allow-unused", "normalisation constants, not weights"]
    status, _, err = run_main(args, capsys)
    assert_refused(status, err, r"is not empty.*--overwrite")
    assert (folder / "old.txt").exists()

    status, out, err = run_main(args + ["--overwrite"], capsys)
    assert status == 0, err
    assert "data_preprocessor.mean" in out
    assert not (folder / "old.txt").exists()
    assert not list(tmp_path.glob(".out.*"))
    card = (folder / "README.md").read_text()
    assert "`data_preprocessor.mean`" in card and "normalisation constants, not weights" in card


def test_failed_verification_leaves_nothing(tmp_path, capsys, small_state_dict, monkeypatch):
    path = tmp_path / "mae.pth"
    torch.save(small_state_dict, path)

    def broken(*args, **kwargs):
        raise CheckpointError("the written folder's hivit.x differs from the source checkpoint's")

    monkeypatch.setattr(writer, "verify_folder", broken)
    status, out, err = run_main(["--checkpoint", path, "--output_dir", tmp_path / "out"], capsys)
    assert_refused(status, err, "differs from the source", tmp_path / "out")
    assert "[4/4] verifying" in out


def test_verification_against_mmpretrain_catches_a_wrong_mapping(tmp_path, capsys, small_state_dict, monkeypatch):
    """Swapping the two LayerNorms of the decoder layers keeps every shape, so only the outputs can tell."""
    path = tmp_path / "mae.pth"
    torch.save(small_state_dict, path)
    swapped = {**mmpretrain_format._DECODER_LAYER_KEYS, "ln1": "norm2", "ln2": "norm1"}
    monkeypatch.setattr(mmpretrain_format, "_DECODER_LAYER_KEYS", swapped)
    args = ["--checkpoint", path, "--output_dir", tmp_path / "out", "--verify-against-mmpretrain"]
    status, _, err = run_main(args, capsys)
    assert_refused(
        status, err, r"outputs differ from mmpretrain's: max abs diff of the .* > 0\.0001", tmp_path / "out"
    )


# ---------------------------------------------------------------------------------------------------------------
# Refusals


def test_not_a_checkpoint_truncated_and_wrong_model(tmp_path, capsys, small_state_dict):
    folder = tmp_path / "out"
    text = tmp_path / "notes.pth"
    text.write_text("these are my notes, not a checkpoint\n")
    assert_refused(
        *run_main(["--checkpoint", text, "--output_dir", folder], capsys)[::2], r"notes\.pth: not a PyTorch checkpoint"
    )

    whole = tmp_path / "whole.pth"
    torch.save(small_state_dict, whole)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    assert_refused(*run_main(["--checkpoint", truncated, "--output_dir", folder], capsys)[::2], r"truncated\.pth")

    bad_safetensors = tmp_path / "bad.safetensors"
    bad_safetensors.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    args = ["--checkpoint", bad_safetensors, "--output_dir", folder]
    assert_refused(*run_main(args, capsys)[::2], r"not a readable safetensors file")

    missing = tmp_path / "missing.pth"
    assert_refused(*run_main(["--checkpoint", missing, "--output_dir", folder], capsys)[::2], r"no such file")
    assert_refused(*run_main(["--checkpoint", tmp_path, "--output_dir", folder], capsys)[::2], r"is a directory")

    # mmpretrain's MAE-ViT keeps a class token and `layers.N` blocks.
    vit = {
        "backbone.cls_token": torch.zeros(1, 1, 768),
        "backbone.pos_embed": torch.zeros(1, 197, 768),
        "backbone.patch_embed.projection.weight": torch.zeros(768, 3, 16, 16),
        "backbone.layers.0.attn.qkv.weight": torch.zeros(2304, 768),
        "neck.decoder_embed.weight": torch.zeros(512, 768),
    }
    path = tmp_path / "mae_vit.pth"
    torch.save({"meta": {}, "state_dict": vit}, path)
    assert_refused(*run_main(["--checkpoint", path, "--output_dir", folder], capsys)[::2], r"not a HiViT.*MAE-ViT")

    torch.save({"meta": {"epoch": 1}, "state_dict": {}}, path)
    assert_refused(*run_main(["--checkpoint", path, "--output_dir", folder], capsys)[::2], r"holds no tensors")
    assert not folder.exists()


def test_wrong_shapes(tmp_path, capsys, small_state_dict):
    folder = tmp_path / "out"
    path = tmp_path / "mae.pth"
    torch.save(small_state_dict, path)
    # Imposing another arch on these weights.
    status, _, err = run_main(["--checkpoint", path, "--output_dir", folder, "--arch", "tiny"], capsys)
    assert_refused(status, err, r"wrong shape", folder)
    # A position table for another image size than the one imposed.
    status, _, err = run_main(["--checkpoint", path, "--output_dir", folder, "--image_size", "96"], capsys)
    assert_refused(status, err, r"wrong shape.*position_embeddings", folder)
    # A tensor cut short.
    damaged = dict(small_state_dict)
    damaged["backbone.blocks.7.mlp.fc1.weight"] = damaged["backbone.blocks.7.mlp.fc1.weight"][:100]
    torch.save(damaged, path)
    status, _, err = run_main(["--checkpoint", path, "--output_dir", folder], capsys)
    assert_refused(
        status,
        err,
        r"1 weights have the wrong shape.*encoder\.layers\.1\.mlp\.fc1\.weight \(100, 128\) \(model: \(512, 128\)\)",
        folder,
    )
    # A tensor missing.
    del damaged["backbone.blocks.7.mlp.fc1.weight"]
    torch.save(damaged, path)
    status, _, err = run_main(["--checkpoint", path, "--output_dir", folder], capsys)
    assert_refused(status, err, r"lacks", folder)


def test_bad_weights_and_options(tmp_path, capsys, small_state_dict):
    """Each mistake is one `error:` line: weights the model has no place for, NaN weights, nonsensical options
    (usage errors, exit status 2) and config overrides that are not positive integers."""
    folder = tmp_path / "out"
    path = tmp_path / "mae.pth"
    # An attention weight in a stem block (stem blocks are MLP-only).
    torch.save({**small_state_dict, "backbone.blocks.0.attn.qkv.weight": torch.zeros(96, 32)}, path)
    status, _, err = run_main(["--checkpoint", path, "--output_dir", folder], capsys)
    assert_refused(
        status,
        err,
        r"1 weights that the inferred model has no place for: hivit\.stem\.0\.blocks\.0\.attention",
        folder,
    )

    diverged = dict(small_state_dict)
    for key in ("backbone.blocks.7.mlp.fc1.weight", "neck.decoder_pred.bias"):
        diverged[key] = diverged[key].clone()
        diverged[key].view(-1)[3] = float("nan") if key.endswith("weight") else float("inf")
    torch.save(diverged, path)
    status, _, err = run_main(["--checkpoint", path, "--output_dir", folder], capsys)
    assert_refused(
        status,
        err,
        r"NaN or infinite values in 2 tensors: hivit\.encoder\.layers\.1\.mlp\.fc1\.weight, decoder\.decoder_pred",
        folder,
    )

    torch.save(small_state_dict, path)
    for option, value, pattern in [
        ("--num_attention_heads", "0", r"--num_attention_heads: must be a positive int, not '0'"),
        ("--decoder_num_attention_heads", "-2", r"must be a positive int"),
        ("--image_size", "abc", r"--image_size: must be a positive int, not 'abc'"),
        ("--layer_norm_eps", "0", r"--layer_norm_eps: must be a positive float"),
        ("--max_shard_size", "abc", r"--max_shard_size: must be a size such as 500MB or 5GB, not 'abc'"),
    ]:
        status = convert_checkpoint.main(["--checkpoint", str(path), "--output_dir", str(folder), option, value])
        assert status == 2  # a usage error
        assert_refused(status, capsys.readouterr().err, pattern, folder)

    # The Python API: overrides are checked before a config is built from them.
    for value in (0, "128", 12.0):
        with pytest.raises(
            CheckpointError, match=rf"hidden_size must be a positive int, not {re.escape(repr(value))}"
        ):
            cli.convert(path, folder, ConversionOptions(overrides={"hidden_size": value}))
    assert not folder.exists()


class _RunsCode:
    """Unpickling this with a plain unpickler would create the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_never_runs(tmp_path, small_state_dict):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"meta": {"hook": _RunsCode(marker)}, "state_dict": small_state_dict}, path)
    result = subprocess.run(
        [sys.executable, str(ROOT / "convert_checkpoint.py"), "--checkpoint", str(path), "--output_dir", "out"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert not marker.exists()
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert_refused(result.returncode, result.stderr, r"evil\.pth.*pickles `(posix|os)\.system`.*not unpickled")
    assert not (tmp_path / "out").exists()


class _GetattrGadget:
    """Attribute lookups are how pickle exploits reach code from allowed objects; only mmengine stand-ins get one."""

    def __reduce__(self):
        return (getattr, ("any object", "upper"))


def test_getattr_only_on_stand_ins(tmp_path, capsys):
    path = tmp_path / "gadget.pth"
    torch.save({"meta": {"x": _GetattrGadget()}, "state_dict": {"w": torch.zeros(1)}}, path)
    status, _, err = run_main(["--checkpoint", path, "--output_dir", tmp_path / "out"], capsys)
    assert_refused(status, err, r"gadget\.pth.*not unpickled.*getattr\(str, 'upper'\) is not allowed")


# ---------------------------------------------------------------------------------------------------------------
# mmpretrain's tiny arch: parity, the image processor, remote code and the model card snippet


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """mmpretrain's MAE-HiViT-tiny and its conversion with --verify-against-mmpretrain."""
    tmp_path = tmp_path_factory.mktemp("tiny")
    mm_model = build_mmpretrain_mae("tiny", 224, seed=3)
    path = tmp_path / "mae_hivit-tiny.pth"
    torch.save({"meta": {"epoch": 400}, "state_dict": mm_model.state_dict()}, path)
    args = ["--checkpoint", path, "--output_dir", tmp_path / "hivit-mae-tiny", "--verify-against-mmpretrain"]
    assert convert_checkpoint.main([str(arg) for arg in args]) == 0
    return mm_model, tmp_path / "hivit-mae-tiny", path


def test_tiny_parity_and_folder_contents(tiny):
    mm_model, folder, path = tiny
    assert max_diff_vs_mmpretrain(folder, mm_model, image_size=224) < 1e-4
    # Unmasked features: see test_model_card_snippet_runs_with_remote_code.

    files = {file.name for file in folder.iterdir()}
    assert {"model.safetensors", "config.json", "configuration_hivit_mae.py", "modeling_hivit_mae.py"} <= files
    assert {"preprocessor_config.json", "README.md"} <= files
    assert (folder / "modeling_hivit_mae.py").read_text() == (ROOT / "modeling_hivit_mae.py").read_text()
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_hivit_mae.HiViTMAEConfig",
        "AutoModel": "modeling_hivit_mae.HiViTMAEModel",
        "AutoBackbone": "modeling_hivit_mae.HiViTMAEBackbone",
        "AutoModelForPreTraining": "modeling_hivit_mae.HiViTMAEForPreTraining",
    }

    from huggingface_hub import ModelCard

    card = ModelCard.load(folder / "README.md")
    assert card.data.license == "apache-2.0"
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "image-feature-extraction"
    assert "hivit" in card.data.tags
    assert card.data.datasets is None  # a published checkpoint without its config: data set unknown
    assert "HiViT: A Simpler and More Efficient Design of Hierarchical Vision Transformer" in card.text
    assert "Converted from an [mmpretrain](https://github.com/open-mmlab/mmpretrain) checkpoint." in card.text
    assert path.name in card.text and sha256sum(path) in card.text
    figures = re.findall(
        r"\| (masked encoder features|decoder pixel predictions|loss|unmasked encoder features) "
        r"\| ([0-9.e+-]+) \|",
        card.text,
    )
    assert len(figures) == 4 and all(float(value) < 1e-4 for _, value in figures)


def test_image_processor_matches_mmpretrain_pipeline(tiny):
    """`AutoImageProcessor` of the folder vs mmpretrain's HiViT test pipeline (ResizeEdge 256 bicubic + CenterCrop
    224, pillow backend) and its data preprocessor's mean / std."""
    from mmcv.transforms import CenterCrop
    from mmpretrain.datasets.transforms import ResizeEdge
    from PIL import Image
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(tiny[1])
    rgb = np.random.RandomState(0).randint(0, 256, (300, 451, 3), dtype=np.uint8)
    results = ResizeEdge(scale=256, edge="short", backend="pillow", interpolation="bicubic")(dict(img=rgb))
    results = CenterCrop(crop_size=224)(results)
    mean, std = np.array([123.675, 116.28, 103.53]), np.array([58.395, 57.12, 57.375])
    expected = torch.from_numpy(((results["img"] - mean) / std).transpose(2, 0, 1)).float()[None]
    for image in (Image.fromarray(rgb), Image.fromarray(rgb).convert("RGBA")):
        pixel_values = processor(images=image, return_tensors="pt")["pixel_values"]
        assert pixel_values.shape == (1, 3, 224, 224)
        # Both resize with PIL's bicubic; rounding may differ by one grey level.
        assert (pixel_values - expected).abs().max() < 1.5 / 57.12
        assert (pixel_values - expected).abs().mean() < 0.01


def test_model_card_snippet_runs_with_remote_code(tiny, tmp_path):
    """The card's snippet, run as written in a fresh process that cannot import this repo: `AutoModel` with
    `trust_remote_code` loads the copied code, and its features equal mmpretrain's for the same pixels."""
    mm_model, folder, _ = tiny
    code = re.search(r"```python\n(.*?)```", (folder / "README.md").read_text(), re.S).group(1)
    # This project may be installed (CI installs it): make its modules unimportable so only the folder's code runs.
    blocker = "import sys\nsys.modules['modeling_hivit_mae'] = sys.modules['configuration_hivit_mae'] = None\n"
    code = (
        blocker
        + code
        + (
            "\nassert type(model).__module__.startswith('transformers_modules'), type(model).__module__\n"
            "torch.save({'pixel_values': inputs['pixel_values'], 'features': features}, 'result.pt')\n"
        )
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=clean_env(tmp_path), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "torch.Size([1, 196, 384])" in result.stdout
    saved = torch.load(tmp_path / "result.pt")
    with torch.no_grad():
        expected = mm_model.backbone(saved["pixel_values"], mask=None)[-1].flatten(2).transpose(1, 2)
    assert (saved["features"] - expected).abs().max() < 1e-4


# ---------------------------------------------------------------------------------------------------------------
# Classifiers fine-tuned with mmpretrain

# mmpretrain's HiViT classifier only runs when the main stage has more blocks than the stem (its `out_indices` counts
# stem blocks too), hence 7 main blocks here.
CLASSIFIER = dict(embed_dims=64, depths=[1, 1, 7], num_heads=2)
CLASSES = ["cat", "dog", "bird", "fish", "frog"]


@pytest.fixture(scope="module")
def small_classifier():
    return build_mmpretrain_classifier(CLASSIFIER, 64, num_classes=len(CLASSES), seed=5)


def save_classifier(path, mm_model, classes=None, **extra):
    """An mmengine-style checkpoint; mmengine's runner stores the data set's class names in `meta.dataset_meta`."""
    meta = dict(epoch=100)
    if classes is not None:
        meta["dataset_meta"] = dict(classes=tuple(classes))
    torch.save(dict(meta=meta, state_dict=dict(mm_model.state_dict(), **extra)), path)


def test_classifier_checkpoint(tmp_path, capsys, small_classifier):
    """A fine-tuned mmpretrain `ImageClassifier` becomes an `AutoModelForImageClassification` folder with the class
    names of its training data set; the folder's logits equal mmpretrain's, and its card's snippet, run as written
    with remote code, names the class mmpretrain predicts for the same pixels."""
    path, folder = tmp_path / "epoch_100.pth", tmp_path / "out"
    save_classifier(path, small_classifier, CLASSES)
    args = ["--checkpoint", path, "--output_dir", folder, "--verify-against-mmpretrain"]
    status, out, err = run_main(args, capsys)
    assert status == 0, err
    assert "image classifier, 5 classes" in out and "max abs diff vs mmpretrain" in out
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["HiViTMAEForImageClassification"]
    assert config["id2label"] == {str(index): name for index, name in enumerate(CLASSES)}
    assert config["auto_map"]["AutoModelForImageClassification"] == (
        "modeling_hivit_mae.HiViTMAEForImageClassification"
    )

    model = HiViTMAEForImageClassification.from_pretrained(folder).eval()
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert (model(images).logits - small_classifier(images, mode="tensor")).abs().max() < 1e-4
    # The Hub's image-classification pipeline (what its widget runs) gives mmpretrain's prediction.
    from PIL import Image
    from transformers import pipeline

    rgb = np.random.RandomState(7).randint(0, 256, (70, 90, 3), dtype=np.uint8)
    classify = pipeline("image-classification", model=str(folder), trust_remote_code=True)
    top = classify(Image.fromarray(rgb), top_k=1)[0]
    with torch.no_grad():
        pixel_values = classify.image_processor(images=Image.fromarray(rgb), return_tensors="pt")["pixel_values"]
        probs = small_classifier(pixel_values, mode="tensor").softmax(-1)[0]
    assert top["label"] == CLASSES[probs.argmax()] and abs(top["score"] - probs.max().item()) < 1e-5

    # The encoder alone loads from the same folder, quietly leaving the head out.
    encoder, info = HiViTMAEModel.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        expected = small_classifier.backbone(images)[-1].flatten(2).transpose(1, 2)
        assert (encoder.eval()(images).last_hidden_state - expected).abs().max() < 1e-4

    from huggingface_hub import ModelCard

    card = ModelCard.load(folder / "README.md")
    assert card.data.pipeline_tag == "image-classification"
    assert re.search(r"\| classification logits \| [0-9.e+-]+ \|", card.text)
    code = re.search(r"```python\n(.*?)```", card.text, re.S).group(1)
    code = (
        "import sys\nsys.modules['modeling_hivit_mae'] = sys.modules['configuration_hivit_mae'] = None\n"
        + code
        + "torch.save(inputs['pixel_values'], 'pixel_values.pt')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=clean_env(tmp_path), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with torch.no_grad():
        expected = small_classifier(torch.load(tmp_path / "pixel_values.pt"), mode="tensor").argmax(-1).item()
    assert result.stdout.strip().splitlines()[-1] == CLASSES[expected]


def test_classifier_labels_and_refusals(tmp_path, capsys, small_classifier, small_state_dict):
    path, folder = tmp_path / "classifier.pth", tmp_path / "out"
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(name.upper() for name in CLASSES) + "\n")
    # Without class names in the checkpoint: transformers' generic names, or the --labels file.
    save_classifier(path, small_classifier)
    status, _, err = run_main(["--checkpoint", path, "--output_dir", folder], capsys)
    assert status == 0, err
    assert json.loads((folder / "config.json").read_text())["id2label"]["4"] == "LABEL_4"
    args = ["--checkpoint", path, "--output_dir", folder, "--overwrite", "--labels", labels]
    status, _, err = run_main(args, capsys)
    assert status == 0, err
    assert json.loads((folder / "config.json").read_text())["id2label"]["4"] == "FROG"

    folder = tmp_path / "refused"
    labels.write_text("one\ntwo\n")
    status, _, err = run_main(["--checkpoint", path, "--output_dir", folder, "--labels", labels], capsys)
    assert_refused(status, err, r"--labels .* names 2 classes but the classification head has 5", folder)
    save_classifier(path, small_classifier, CLASSES[:3])
    status, _, err = run_main(["--checkpoint", path, "--output_dir", folder], capsys)
    assert_refused(status, err, r"dataset_meta.classes names 3 classes but the classification head has 5", folder)
    status, _, err = run_main(["--checkpoint", path, "--output_dir", folder, "--labels", tmp_path / "nope"], capsys)
    assert_refused(status, err, r"--labels .*nope: cannot be read", folder)
    labels.write_text("cat\ndog\ncat\nfish\nfrog\n")  # label2id would lose a class
    status, _, err = run_main(["--checkpoint", path, "--output_dir", folder, "--labels", labels], capsys)
    assert_refused(status, err, r"the class names cat stand for more than one class", folder)

    # A head that does not fit the encoder, a head beside an MAE decoder, labels for a model without a head.
    wrong_head = {"head.fc.weight": torch.zeros(5, 32), "head.fc.bias": torch.zeros(5)}
    save_classifier(path, small_classifier, **wrong_head)
    status, _, err = run_main(["--checkpoint", path, "--output_dir", folder], capsys)
    assert_refused(status, err, r"head\.fc takes 32 features but the encoder gives 64", folder)
    torch.save(dict(small_state_dict, **{"head.fc.weight": torch.zeros(5, 128), "head.fc.bias": torch.zeros(5)}), path)
    status, _, err = run_main(["--checkpoint", path, "--output_dir", folder], capsys)
    assert_refused(status, err, r"both an MAE decoder .* and a classification head", folder)
    torch.save(small_state_dict, path)
    status, _, err = run_main(["--checkpoint", path, "--output_dir", folder, "--labels", labels], capsys)
    assert_refused(status, err, r"--labels names classes, but the checkpoint has no classification head", folder)


def test_output_folder_never_costs_the_user_a_file(tmp_path, capsys, small_state_dict, monkeypatch):
    """Issue #11 items 1, 2 and 12: the converter refuses output folders that would delete the user's files, keeps a
    symlinked output folder a symlink, and cleans up what a killed conversion left behind (and nothing else)."""
    source = tmp_path / "out" / "in"
    source.mkdir(parents=True)
    path = source / "model.pth"
    torch.save(small_state_dict, path)
    (source / "notes.txt").write_text("the user's")
    monkeypatch.chdir(source)
    for output_dir, pattern in [
        ("", r"--output_dir is empty"),  # an unset shell variable
        (".", r"is the current directory"),
        (tmp_path / "out", r"is a parent of the current directory"),
        (source, r"is the current directory"),
    ]:
        status, _, err = run_main(["--checkpoint", path, "--output_dir", output_dir, "--overwrite"], capsys)
        assert status == 2 and re.fullmatch(rf"error: .*{pattern}.*\n", err), err
    monkeypatch.chdir(tmp_path)
    status, _, err = run_main(["--checkpoint", path, "--output_dir", source, "--overwrite"], capsys)
    assert status == 2 and re.fullmatch(r"error: --output_dir .* contains an input .*model\.pth.*\n", err), err
    status, _, err = run_main(["--checkpoint", path, "--output_dir", tmp_path / "out", "--overwrite"], capsys)
    assert status == 2 and "contains an input" in err, err
    assert sorted(entry.name for entry in source.iterdir()) == ["model.pth", "notes.txt"]

    # A symlinked output folder stays a link; the folder it points to receives the model. A dangling one is refused.
    target, link = tmp_path / "target", tmp_path / "link"
    target.mkdir()
    link.symlink_to(target)
    # A staging folder of a conversion killed earlier (our name pattern and marker, a process that is gone) is removed;
    # a look-alike without our marker is the user's and stays.
    dead = tmp_path / f".target.hivit-mae-staging-{socket.gethostname()}-999999999-x"
    dead.mkdir()
    (dead / ".hivit-mae-staging").touch()
    lookalike = tmp_path / f".target.hivit-mae-staging-{socket.gethostname()}-999999999-y"
    lookalike.mkdir()
    status, _, err = run_main(["--checkpoint", path, "--output_dir", link], capsys)
    assert status == 0, err
    assert link.is_symlink() and (target / "config.json").is_file()
    assert not dead.exists() and lookalike.exists()
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    status, _, err = run_main(["--checkpoint", path, "--output_dir", dangling], capsys)
    assert status == 1 and re.fullmatch(r"error: --output_dir .*dangling is a symlink to .*nowhere.*\n", err), err
    assert dangling.is_symlink() and not (tmp_path / "nowhere").exists()


# ---------------------------------------------------------------------------------------------------------------
# Publishing and the command line


def test_push_to_hub(tmp_path, capsys, small_state_dict, monkeypatch):
    from huggingface_hub import HfApi

    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        folder = Path(kwargs["folder_path"])
        calls.append(("upload_folder", sorted(file.name for file in folder.iterdir()), kwargs))
        return "https://huggingface.co/me/hivit-mae-small/commit/0"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    path = tmp_path / "mae.pth"
    torch.save(small_state_dict, path)
    args = ["--checkpoint", path, "--output_dir", tmp_path / "out", "--push_to_hub", "me/hivit-mae-small"]
    status, out, err = run_main(args + ["--private", "--commit-message", "Add weights"], capsys)
    assert status == 0, err
    assert "[5/5] uploading" in out
    (name, repo_id, kwargs), (name2, files, upload) = calls
    assert (name, repo_id, kwargs["private"], name2) == ("create_repo", "me/hivit-mae-small", True, "upload_folder")
    assert files == sorted(
        [
            "README.md",
            "config.json",
            "configuration_hivit_mae.py",
            "model.safetensors",
            "modeling_hivit_mae.py",
            "preprocessor_config.json",
        ]
    )
    assert upload["repo_id"] == "me/hivit-mae-small" and upload["commit_message"] == "Add weights"
    assert Path(upload["folder_path"]) == tmp_path / "out"
    assert 'model_id = "me/hivit-mae-small"' in (tmp_path / "out" / "README.md").read_text()


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    options = [
        "--checkpoint", "--output_dir", "--overwrite", "--arch", "--num_attention_heads",
        "--decoder_num_attention_heads", "--layer_norm_eps", "--image_size", "--norm_pix_loss", "--dtype",
        "--allow-unused", "--verify-against-mmpretrain", "--max_shard_size", "--dataset", "--labels", "--push_to_hub",
        "--private", "--commit-message",
    ]  # fmt: skip
    for option in options:
        assert option in text
    assert "examples:" in text and "python convert_checkpoint.py --checkpoint" in text
