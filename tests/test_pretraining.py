"""Tests of `run_pretraining.py` and `visualize_reconstruction.py` on tiny generated images (CPU, a few minutes)."""

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
from conftest import ResumeProbe
from PIL import Image
from transformers import TrainerCallback

import run_pretraining
import visualize_reconstruction
from configuration_hivit_mae import HiViTMAEConfig
from hivit_mae_tools import reconstruction
from hivit_mae_tools.config_overrides import parse_config_overrides
from hivit_mae_tools.images import load_image
from hivit_mae_tools.preprocessing import IMAGENET_MEAN, IMAGENET_STD
from hivit_mae_tools.training import parse_training_args
from modeling_hivit_mae import HiViTMAEForPreTraining

ROOT = Path(__file__).resolve().parents[1]

TINY_CONFIG = dict(
    image_size=32,
    depths=[1, 1, 2],
    hidden_size=64,
    num_attention_heads=2,
    decoder_hidden_size=32,
    decoder_num_hidden_layers=1,
    decoder_num_attention_heads=2,
)
TINY = json.dumps(TINY_CONFIG)  # as `--config_overrides` takes it


def make_images(folder: Path, count: int, size=(40, 36)) -> Path:
    """Smooth random colour gradients plus a few shapes: learnable, different from each other."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        x = np.linspace(0, 1, size[0])[None, :, None] * rng.random(3)
        y = np.linspace(0, 1, size[1])[:, None, None] * rng.random(3)
        array = (x + y) / 2
        top, left = rng.integers(0, size[1] // 2), rng.integers(0, size[0] // 2)
        array[top : top + 8, left : left + 8] = rng.random(3)
        Image.fromarray((array * 255).astype("uint8")).save(folder / f"{index:03d}.png")
    return folder


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("images") / "train", 16)


def base_args(train_dir, output_dir, *extra):
    return [
        "--train_dir",
        str(train_dir),
        "--arch",
        "tiny",
        "--config_overrides",
        TINY,
        "--output_dir",
        str(output_dir),
        "--per_device_train_batch_size",
        "4",
        "--logging_steps",
        "1",
        "--save_strategy",
        "no",
        "--dataloader_num_workers",
        "0",
        "--use_cpu",
        "True",
        *extra,
    ]


def logged_losses(output_dir: Path) -> dict[int, float]:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return {entry["step"]: entry["loss"] for entry in state["log_history"] if "loss" in entry}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_script(args, nproc=None, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable]
    if nproc:
        command += ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(free_port())]
    command += [str(ROOT / "run_pretraining.py"), *args]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


# -------------------------------------------------------------------------------------------- weight decay
def test_weight_decay_grouping_follows_mmpretrain(tmp_path):
    model = HiViTMAEForPreTraining(HiViTMAEConfig.from_arch("tiny", **TINY_CONFIG))
    decay = set(run_pretraining.decay_parameter_names(model))
    names = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    no_decay = names - decay

    assert "decoder.mask_token" in no_decay
    assert all(not name.endswith(".bias") for name in decay)
    norms = [n for n, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(f"{n}.weight" in no_decay for n in norms)
    # Frozen sin-cos tables are not trained at all.
    assert "hivit.position_embeddings" not in names and "decoder.decoder_pos_embed" not in names
    # Every weight matrix (and the patch projection) decays.
    matrices = {n for n, p in model.named_parameters() if p.ndim >= 2 and "mask_token" not in n and p.requires_grad}
    assert matrices and matrices <= decay
    assert "hivit.patch_embeddings.projection.weight" in decay

    groups = run_pretraining.get_parameter_groups(model, 0.05)
    assert [group["weight_decay"] for group in groups] == [0.05, 0.0]
    assert sum(len(group["params"]) for group in groups) == len(names)
    assert len(groups[0]["params"]) == len(decay)

    # The Trainer builds its AdamW from the same grouping.
    trainer = run_pretraining.MAETrainer(
        model=model,
        args=run_pretraining.TrainingArguments(
            output_dir=str(tmp_path), weight_decay=0.05, adam_beta2=0.95, use_cpu=True, report_to="none"
        ),
    )
    optimizer = trainer.create_optimizer()
    by_decay = {group["weight_decay"]: len(group["params"]) for group in optimizer.param_groups}
    assert by_decay == {0.05: len(decay), 0.0: len(no_decay)}
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.95)


def test_weight_decay_against_mmengine():
    """mmengine's optimizer constructor with mmpretrain's MAE-HiViT `paramwise_cfg` decays the same tensors as we do,
    except the decoder's LayerNorm weights: its `norm` key matches by name, and the decoder names its norms `ln1` /
    `ln2`. We exempt every LayerNorm, as the config means to (see the README)."""
    from mmengine.optim import DefaultOptimWrapperConstructor
    from reference import build_mmpretrain_mae

    from hivit_mae_tools.conversion.mmpretrain import convert_state_dict, infer_config

    reference = build_mmpretrain_mae("tiny", perturb=False)
    no_decay_keys = ("norm", "bias", "pos_embed", "mask_token")
    constructor = DefaultOptimWrapperConstructor(
        dict(type="OptimWrapper", optimizer=dict(type="AdamW", lr=1e-3, weight_decay=0.05)),
        dict(custom_keys={key: dict(decay_mult=0.0) for key in no_decay_keys}),
    )
    parameters = {id(parameter): name for name, parameter in reference.named_parameters()}
    groups = constructor(reference).optimizer.param_groups
    decayed = {parameters[id(p)] for group in groups if group["weight_decay"] > 0 for p in group["params"]}
    config = infer_config(reference.state_dict())
    theirs = {key for name in decayed for key in convert_state_dict({name: torch.zeros(1)}, config)[0]}

    ours = set(run_pretraining.decay_parameter_names(HiViTMAEForPreTraining(config)))
    decoder_norms = {
        key
        for key in theirs - ours
        if re.fullmatch(r"decoder\.(decoder_layers\.\d+\.norm[12]|decoder_norm)\.weight", key)
    }
    assert ours == theirs - decoder_norms
    assert len(decoder_norms) == 2 * config.decoder_num_hidden_layers + 1


def test_config_overrides_parsing():
    parsed = parse_config_overrides("image_size=64,depths=[1,1,2],hidden_act=gelu,norm_pix_loss=False")
    assert parsed == {"image_size": 64, "depths": [1, 1, 2], "hidden_act": "gelu", "norm_pix_loss": False}
    assert parse_config_overrides('{"mask_ratio": 0.5}') == {"mask_ratio": 0.5}
    with pytest.raises(ValueError, match="no field"):
        run_pretraining.build_model(run_pretraining.ModelArguments(arch="tiny", config_overrides="not_a_field=1"))


# --------------------------------------------------------------------------------------------- training run
def test_few_step_run_learns_and_saves_a_loadable_model(image_dir, tmp_path):
    output_dir = tmp_path / "run"
    args = base_args(
        image_dir,
        output_dir,
        "--max_steps",
        "16",
        "--base_learning_rate",
        "0.128",  # 2e-3 at batch 4
        "--augment",
        "False",
        "--masking_seed",
        "0",
        "--warmup_ratio" if run_pretraining.RECIPE_ARGS.count("--warmup_ratio") else "--warmup_steps",
        "0.1",
    )
    run_script(args)
    losses = logged_losses(output_dir)
    assert sorted(losses) == list(range(1, 17))
    values = [losses[step] for step in sorted(losses)]
    assert all(np.isfinite(values))
    # Same images and masks every epoch (4 steps): compare the first epoch with the last.
    assert np.mean(values[-4:]) < 0.9 * np.mean(values[:4]), values

    summary = json.loads((output_dir / "pretraining_summary.json").read_text())
    assert summary["learning_rate"] == pytest.approx(2e-3)
    card = (output_dir / "README.md").read_text()
    assert "run_pretraining.py" in card and f"{summary['last_loss']:.4f}" in card
    for name in ("reconstruction.png", "reconstruction_step0.png", "reconstruction_before_after.png"):
        with Image.open(output_dir / name) as figure:
            figure.verify()
    assert summary["figure_loss_after"] < summary["figure_loss_before"]

    # The folder carries the modelling code and the image processor: loadable with remote code, in a fresh
    # interpreter, and the processor gives model-sized inputs normalised as in training.
    code = (
        "import sys, torch; from PIL import Image;"
        "from transformers import AutoImageProcessor, AutoModelForPreTraining;"
        f"m = AutoModelForPreTraining.from_pretrained({str(output_dir)!r}, trust_remote_code=True);"
        f"p = AutoImageProcessor.from_pretrained({str(output_dir)!r});"
        "x = p(images=Image.new('RGB', (50, 40), (255, 0, 128)), return_tensors='pt')['pixel_values'];"
        "print(type(m).__name__, m.config.image_size, float(m(x).loss) >= 0, tuple(x.shape));"
        "torch.save(x, 'pixel_values.pt')"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120, check=True
    )
    assert loaded.stdout.split() == ["HiViTMAEForPreTraining", "32", "True", "(1,", "3,", "32,", "32)"]
    # A uniform image normalises as mmpretrain's data preprocessor does: (value - mean) / std on the 0-255 scale.
    mean, std = torch.tensor([123.675, 116.28, 103.53]), torch.tensor([58.395, 57.12, 57.375])
    expected = (torch.tensor([255.0, 0.0, 128.0]) - mean) / std
    pixel_values = torch.load(tmp_path / "pixel_values.pt")
    torch.testing.assert_close(pixel_values[0, :, 16, 16], expected, atol=1e-5, rtol=0)
    assert (output_dir / "preprocessor_config.json").is_file()


class CrashAfterSave(TrainerCallback):
    """Simulates a run killed right after the checkpoint of `step` was written."""

    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt(f"simulated crash after step {self.step}")


def test_resume_after_interruption_continues_exactly(image_dir, tmp_path):
    def args(output_dir, *extra):
        # Random masks from the global RNG (restored on resume); deterministic crops, see docs/pretraining.md.
        return base_args(
            image_dir,
            output_dir,
            "--max_steps",
            "8",
            "--save_strategy",
            "steps",
            "--save_steps",
            "4",
            "--learning_rate",
            "2e-3",
            "--augment",
            "False",
            "--reconstruction_figure",
            "False",
            *extra,
        )

    full = run_pretraining.main(args(tmp_path / "full"))
    with pytest.raises(KeyboardInterrupt):
        run_pretraining.main(args(tmp_path / "crashed"), callbacks=[CrashAfterSave(4)])
    assert (tmp_path / "crashed" / "checkpoint-4").is_dir()
    assert not (tmp_path / "crashed" / "checkpoint-8").exists()
    probe = ResumeProbe()
    resumed = run_pretraining.main(args(tmp_path / "crashed", "--resume_from_checkpoint", "latest"), [probe])

    # The resumed process ran steps 5-8 only, from checkpoint-4's weights and optimizer moments.
    assert probe.steps == [5, 6, 7, 8]
    probe.assert_started_from(tmp_path / "crashed" / "checkpoint-4")
    assert resumed["global_step"] == full["global_step"] == 8
    full_losses, resumed_losses = dict(full["losses"]), dict(resumed["losses"])
    # The resumed history holds steps 1-4 from the checkpoint and 5-8 from the new run: nothing lost or repeated.
    assert sorted(resumed_losses) == list(range(1, 9))
    for step in range(1, 9):
        assert resumed_losses[step] == pytest.approx(full_losses[step], rel=1e-5, abs=1e-6), step
    # Weights after 8 steps match: optimizer moments, scheduler position and RNG (masks) were restored.
    full_model = HiViTMAEForPreTraining.from_pretrained(tmp_path / "full")
    resumed_model = HiViTMAEForPreTraining.from_pretrained(tmp_path / "crashed")
    for (name, a), (_, b) in zip(full_model.state_dict().items(), resumed_model.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


def test_two_processes_match_one_process(image_dir, tmp_path):
    def args(output_dir, per_device):
        return base_args(
            image_dir,
            output_dir,
            "--per_device_train_batch_size",
            str(per_device),
            "--max_steps",
            "3",
            "--base_learning_rate",
            "0.064",  # 1e-3 at a total batch of 4, however it is split
            "--augment",
            "False",
            "--masking_seed",
            "7",
            "--reconstruction_figure",
            "False",
        )

    run_script(args(tmp_path / "one", 4))
    result = run_script(args(tmp_path / "two", 2), nproc=2)

    one, two = logged_losses(tmp_path / "one"), logged_losses(tmp_path / "two")
    assert sorted(two) == [1, 2, 3]
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-4), (one, two)
    # One process writes: one summary, one log line per step, the same learning rate from the same total batch.
    output = result.stdout + result.stderr
    assert output.count("Done in") == 1
    assert output.count("'loss'") == 3
    summaries = [json.loads((tmp_path / d / "pretraining_summary.json").read_text()) for d in ("one", "two")]
    assert summaries[0]["total_batch"] == summaries[1]["total_batch"] == 4
    assert summaries[0]["learning_rate"] == pytest.approx(summaries[1]["learning_rate"]) == pytest.approx(1e-3)
    assert "2 process(es)" in (tmp_path / "two" / "README.md").read_text()


# ---------------------------------------------------------------------------------------------- visualisation
def test_visualize_reconstruction_writes_png(tmp_path):
    torch.manual_seed(0)
    model = HiViTMAEForPreTraining(HiViTMAEConfig.from_arch("tiny", **TINY_CONFIG))
    model.save_pretrained(tmp_path / "model")
    images = make_images(tmp_path / "images", 2, size=(50, 40))
    output = tmp_path / "recon.png"
    visualize_reconstruction.main(
        ["--model", str(tmp_path / "model"), "--image", *map(str, sorted(images.iterdir())), "--output", str(output)]
    )
    with Image.open(output) as figure:
        figure.verify()
    with Image.open(output) as figure:
        assert figure.format == "PNG"
        # 4 panels of 32 px upscaled x5 side by side, 2 rows.
        assert figure.width > 4 * 32 * 5 and figure.height > 2 * 32 * 5

    # Same seed, same masks and figure; the un-normalised reconstruction is exact on visible patches.
    pixel_values = reconstruction.preprocess([Image.open(p) for p in sorted(images.iterdir())], 32)
    first, loss = reconstruction.reconstruct(model, pixel_values, seed=3)
    second, _ = reconstruction.reconstruct(model, pixel_values, seed=3)
    for name in first:
        torch.testing.assert_close(first[name], second[name])
    assert np.isfinite(loss)
    pasted_on_visible = first["reconstruction + visible"] - first["original"]
    masked = (first["masked input"] != first["original"]).any(dim=1, keepdim=True)
    assert masked.float().mean() > 0.5
    assert pasted_on_visible.masked_fill(masked, 0).abs().max() == 0

    with pytest.raises(ValueError, match="cannot read image"):
        load_image(tmp_path / "model" / "config.json")


# ------------------------------------------------------------------------------------------------ bad inputs
def test_empty_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="holds no image files"):
        run_pretraining.main(base_args(tmp_path / "empty", tmp_path / "out", "--max_steps", "1"))
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        run_pretraining.main(base_args(tmp_path / "missing", tmp_path / "out", "--max_steps", "1"))


def test_unreadable_image_is_named_in_the_error(tmp_path):
    folder = make_images(tmp_path / "train", 3)
    (folder / "broken.jpg").write_bytes(b"this is not a JPEG")
    with pytest.raises(ValueError, match=r"1 unreadable image file.*broken\.jpg: not an image file"):
        run_pretraining.main(
            base_args(folder, tmp_path / "out", "--max_steps", "2", "--reconstruction_figure", "False")
        )


def test_missing_image_column_is_a_clear_error(tmp_path):
    folder = make_images(tmp_path / "data" / "train", 2)
    args = base_args(folder, tmp_path / "out", "--max_steps", "1", "--image_column_name", "pixels")
    with pytest.raises(ValueError, match=r"'pixels' is not a column of the dataset; columns: \['image'\]"):
        run_pretraining.main(args)
    # The same through --dataset_name (a local dataset folder, no network).
    args = [a for a in args if a not in ("--train_dir", str(folder))]
    with pytest.raises(ValueError, match="'pixels' is not a column"):
        run_pretraining.main(["--dataset_name", str(tmp_path / "data"), *args])


def test_speed_flags_bf16_gradient_checkpointing_workers(image_dir, tmp_path):
    summary = run_pretraining.main(
        base_args(
            image_dir,
            tmp_path / "out",
            "--max_steps",
            "2",
            "--bf16",
            "True",
            "--gradient_checkpointing",
            "True",
            "--dataloader_num_workers",
            "2",
            "--reconstruction_figure",
            "False",
        )
    )
    assert summary["global_step"] == 2
    assert all(np.isfinite(loss) for _, loss in summary["losses"])
    # Step times, end to end: the first one includes starting the workers; not compiled, so no compile time.
    assert 0 < summary["median_step_seconds"] < summary["train_seconds"]
    assert summary["first_step_seconds"] < summary["train_seconds"]
    assert "compile_seconds" not in summary


# ------------------------------------------------------------------------------------------------ input pipeline
def test_dataloader_hands_over_full_uint8_batches_normalised_on_the_device(tmp_path):
    """The DataLoader `run_pretraining.py` trains from gives uint8 crops, drops the last partial batch, and the
    Trainer normalises on the device exactly as torchvision's ToTensor + Normalize."""
    from torchvision import transforms

    folder = make_images(tmp_path / "train", 10)
    types = (run_pretraining.ModelArguments, run_pretraining.DataTrainingArguments, run_pretraining.TrainingArguments)
    model_args, data_args, training_args = parse_training_args(
        types, run_pretraining.RECIPE_ARGS + base_args(folder, tmp_path / "out")
    )
    model = HiViTMAEForPreTraining(HiViTMAEConfig.from_arch("tiny", **TINY_CONFIG))
    raw, column, _ = run_pretraining.load_train_dataset(data_args, model_args)
    dataset = run_pretraining.prepare_train_dataset(raw, column, model.config, data_args, training_args.seed)
    trainer = run_pretraining.build_trainer(model, training_args, dataset)
    batches = list(trainer.get_train_dataloader())
    assert [tuple(batch["pixel_values"].shape) for batch in batches] == [(4, 3, 32, 32)] * 2  # 10 images: 4 + 4
    pixel_values = batches[0]["pixel_values"]
    assert pixel_values.dtype == torch.uint8

    noise = torch.rand(4, model.config.num_patches, generator=torch.Generator().manual_seed(0))
    loss = trainer.compute_loss(model, {"pixel_values": pixel_values, "noise": noise})
    normalized = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)(pixel_values.float() / 255)
    assert loss.item() == pytest.approx(model(normalized, noise=noise).loss.item(), rel=1e-6)


def test_streaming_trains_from_parquet_without_a_length(tmp_path):
    """--streaming on a local folder of parquet files (as a Hub dataset is stored), with no network: the dataset is an
    IterableDataset, --max_steps is required, and the run trains and draws its figure from the stream."""
    import datasets

    images = make_images(tmp_path / "images", 12)
    data = datasets.Dataset.from_dict(
        {"image": [str(path) for path in sorted(images.iterdir())]},
        features=datasets.Features({"image": datasets.Image()}),
    )
    (tmp_path / "hub" / "data").mkdir(parents=True)
    data.to_parquet(str(tmp_path / "hub" / "data" / "train-00000-of-00001.parquet"))
    args = [a for a in base_args("-", tmp_path / "out") if a not in ("--train_dir", "-")]
    args = ["--dataset_name", str(tmp_path / "hub"), "--streaming", "True", "--shuffle_buffer_size", "8", *args]

    with pytest.raises(ValueError, match="--streaming needs --max_steps"):
        run_pretraining.main(args)
    with pytest.raises(ValueError, match="--masking_seed"):
        run_pretraining.main([*args, "--max_steps", "1", "--masking_seed", "0"])
    summary = run_pretraining.main([*args, "--max_steps", "3"])
    assert summary["global_step"] == 3
    assert all(np.isfinite(loss) for _, loss in summary["losses"])
    assert summary["figure_loss_after"] > 0


# ------------------------------------------------------------------------------------------------ torch.compile
def test_compile_is_the_default_on_cuda_only(monkeypatch, tmp_path):
    def decide(user_args, cuda=True, **settings):
        training_args = run_pretraining.TrainingArguments(output_dir=str(tmp_path), **settings)
        with monkeypatch.context() as patch:
            patch.setattr(torch.cuda, "is_available", lambda: cuda)
            return run_pretraining.compile_by_default(training_args, user_args)

    assert decide([])
    assert not decide(["--torch_compile", "False"])  # the opt-out
    assert not decide(["--torch_compile=false"])
    assert not decide([], cuda=False)
    assert not decide(["--use_cpu", "True"], use_cpu=True)
    # A compile mode or backend turns compilation on by itself: nothing to add.
    assert not decide(["--torch_compile_mode", "max-autotune"], torch_compile_mode="max-autotune")


class StopAtTrainBegin(TrainerCallback):
    def on_train_begin(self, args, state, control, **kwargs):
        self.torch_compile = args.torch_compile
        raise KeyboardInterrupt("stop before the first step")


def test_compile_by_default_reaches_the_trainer(monkeypatch, image_dir, tmp_path):
    """When `compile_by_default` says so (CUDA, no opt-out), the Trainer runs with `torch_compile`; compiling itself
    takes minutes on this CPU, so the run stops before its first step."""
    monkeypatch.setattr(run_pretraining, "compile_by_default", lambda training_args, user_args: True)
    stop = StopAtTrainBegin()
    with pytest.raises(KeyboardInterrupt):
        run_pretraining.main(
            base_args(image_dir, tmp_path / "out", "--max_steps", "1", "--reconstruction_figure", "False"),
            callbacks=[stop],
        )
    assert stop.torch_compile is True
