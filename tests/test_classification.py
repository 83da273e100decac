"""Fine-tuning with `run_classification.py`: a short run that learns and saves a loadable classifier, the recipe's
weight decay and loss against mmpretrain's own, and clear errors for bad data."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ResumeProbe
from PIL import Image

import run_classification
from configuration_hivit_mae import HiViTMAEConfig
from modeling_hivit_mae import HiViTMAEForImageClassification, HiViTMAEForPreTraining

SMALL = dict(hidden_size=64, depths=[1, 1, 2], num_attention_heads=4, image_size=64)


def write_class_folders(root, per_class=8, seed=0):
    """`root/blue/*.png` and `root/red/*.png`: noise with a strong blue or red cast, of varied sizes."""
    rng = np.random.RandomState(seed)
    for channel, name in ((2, "blue"), (0, "red")):
        (root / name).mkdir(parents=True)
        for index in range(per_class):
            rgb = rng.randint(0, 100, (60 + 4 * index, 70, 3))
            rgb[..., channel] += 155
            Image.fromarray(rgb.astype(np.uint8)).save(root / name / f"{index}.png")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("classification")
    HiViTMAEForPreTraining(HiViTMAEConfig(**SMALL)).save_pretrained(root / "pretrained")
    write_class_folders(root / "train", seed=0)
    write_class_folders(root / "val", per_class=4, seed=1)
    return root


def run_args(data, output_dir, *extra):
    return [
        "--model_name_or_path", str(data / "pretrained"),
        "--train_dir", str(data / "train"),
        "--validation_dir", str(data / "val"),
        "--output_dir", str(output_dir),
        "--per_device_train_batch_size", "8",
        "--use_cpu", "True",
        "--save_strategy", "no",
        "--seed", "0",
        *extra,
    ]  # fmt: skip


def test_fine_tuning_learns_and_saves_a_classifier(data, tmp_path):
    """With Mixup / CutMix and label smoothing (RandAugment off, for a short run), the two classes become separable;
    the folder loads with `AutoModelForImageClassification` and remote code, with the class names and the image
    processor, and is built as mmpretrain's HiViT classifiers are."""
    output_dir = tmp_path / "run"
    args = run_args(
        data,
        output_dir,
        "--num_train_epochs",
        "10",
        "--learning_rate",
        "2e-3",
        "--augment",
        "False",
        "--logging_steps",
        "1",
    )
    metrics = run_classification.main(args)
    assert metrics["eval_accuracy"] == 1.0
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses
    # Warm-up, then cosine decay towards 1 % of the peak learning rate.
    rates = [entry["learning_rate"] for entry in history if "learning_rate" in entry]
    assert max(rates) == pytest.approx(2e-3, rel=0.1) and rates[0] < 0.5 * max(rates)
    assert 0.01 * 2e-3 < rates[-1] < 0.03 * 2e-3
    # Evaluated once per epoch, as the recipe's eval_strategy says.
    assert len([entry for entry in history if "eval_accuracy" in entry]) >= 10

    config = json.loads((output_dir / "config.json").read_text())
    assert config["architectures"] == ["HiViTMAEForImageClassification"]
    assert config["id2label"] == {"0": "blue", "1": "red"}
    assert config["use_relative_position_bias"] and config["layer_norm_eps"] == 1e-5
    assert config["drop_path_rate"] == 0.1  # a custom size; mmpretrain's four sizes get their own rates
    code = (
        "import sys, torch; from PIL import Image;"
        "sys.modules['modeling_hivit_mae'] = sys.modules['configuration_hivit_mae'] = None;"
        "from transformers import AutoImageProcessor, AutoModelForImageClassification;"
        f"m = AutoModelForImageClassification.from_pretrained({str(output_dir)!r}, trust_remote_code=True).eval();"
        f"p = AutoImageProcessor.from_pretrained({str(output_dir)!r});"
        f"x = p(images=Image.open({str(data / 'val' / 'red' / '0.png')!r}), return_tensors='pt');"
        "print(m.config.id2label[m(**x).logits.argmax(-1).item()])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-1] == "red"


def test_full_recipe_runs(data, tmp_path):
    """Every augmentation of the recipe (RandAugment, RandomErasing, Mixup / CutMix) on, for two steps."""
    metrics = run_classification.main(run_args(data, tmp_path / "run", "--max_steps", "2"))
    assert np.isfinite(metrics["train_loss"]) and 0 <= metrics["eval_accuracy"] <= 1


def test_weight_decay_against_mmengine():
    """mmengine's optimizer constructor with mmpretrain's HiViT fine-tuning `paramwise_cfg`
    (`_base_/schedules/imagenet_bs1024_adamw_hivit.py`) decays exactly the tensors we decay."""
    from mmengine.optim import DefaultOptimWrapperConstructor
    from reference import build_mmpretrain_classifier

    from hivit_mae_tools.conversion.mmpretrain import convert_state_dict, infer_config

    reference = build_mmpretrain_classifier("tiny", num_classes=10, perturb=False)
    paramwise = dict(
        norm_decay_mult=0.0,
        bias_decay_mult=0.0,
        flat_decay_mult=0.0,
        custom_keys={".pos_embed": dict(decay_mult=0.0), ".relative_position_bias_table": dict(decay_mult=0.0)},
    )
    constructor = DefaultOptimWrapperConstructor(
        dict(type="OptimWrapper", optimizer=dict(type="AdamW", lr=1e-3, weight_decay=0.05)), paramwise
    )
    names = {id(parameter): name for name, parameter in reference.named_parameters()}
    groups = constructor(reference).optimizer.param_groups
    decayed = {names[id(p)] for group in groups if group["weight_decay"] > 0 for p in group["params"]}
    config = infer_config(reference.state_dict())
    theirs = {key for name in decayed for key in convert_state_dict({name: torch.zeros(1)}, config)[0]}

    model = HiViTMAEForImageClassification(config)
    assert set(run_classification.decay_parameter_names(model)) == theirs
    assert "hivit.position_embeddings" not in theirs and "classifier.weight" in theirs


def test_loss_matches_mmpretrain_label_smooth_loss():
    """Against mmpretrain's `LabelSmoothLoss(label_smooth_val=0.1, mode='original')`, for class indices and for the
    soft targets that Mixup / CutMix make."""
    from mmpretrain.models.losses import LabelSmoothLoss

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=generator)
    indices = torch.tensor([0, 4, 2, 2, 1, 3])
    mix = run_classification.batch_mix(5, mixup_alpha=0.8, cutmix_alpha=0.0)
    _, soft = mix(torch.zeros(6, 3, 8, 8), indices)
    assert not torch.equal(soft, torch.nn.functional.one_hot(indices, 5).float())  # really mixed
    reference = LabelSmoothLoss(label_smooth_val=0.1, mode="original", num_classes=5)
    for targets in (indices, soft):
        expected = reference(logits, targets)
        torch.testing.assert_close(run_classification.soft_target_cross_entropy(logits, targets, 0.1), expected)


def test_hub_style_dataset_and_bad_data(data, tmp_path):
    """`--dataset_name` with a held-out validation fraction; and one error line for each kind of bad data."""
    import datasets

    def save_dataset(folder, labels, names):
        features = datasets.Features({"img": datasets.Image(), "fine_label": datasets.ClassLabel(names=names)})
        rng = np.random.RandomState(0)
        images = [Image.fromarray(rng.randint(0, 255, (40, 40, 3), dtype=np.uint8)) for _ in labels]
        folder.mkdir()
        datasets.Dataset.from_dict({"img": images, "fine_label": labels}, features=features).to_parquet(
            str(folder / "train.parquet")
        )
        return str(folder)

    def args_for(dataset, *extra, output_dir=tmp_path / "refused"):
        args = run_args(data, output_dir, "--max_steps", "1", *extra)
        start = args.index("--train_dir")
        del args[start : start + 4]  # --train_dir and --validation_dir
        return args + ["--dataset_name", dataset]

    three = save_dataset(tmp_path / "three", [0, 1, 2, 1] * 3, ["a", "b", "c"])
    metrics = run_classification.main(args_for(three, "--validation_fraction", "0.25", output_dir=tmp_path / "run"))
    assert 0 <= metrics["eval_accuracy"] <= 1
    assert json.loads((tmp_path / "run" / "config.json").read_text())["id2label"] == {"0": "a", "1": "b", "2": "c"}

    one = save_dataset(tmp_path / "one", [0] * 4, ["only"])
    with pytest.raises(ValueError, match="1 class; classification needs at least 2"):
        run_classification.main(args_for(one))
    with pytest.raises(ValueError, match="--label_column_name 'label' is not a column"):
        run_classification.main(args_for(three, "--label_column_name", "label"))
    with pytest.raises(ValueError, match="does not fit the fine-tuning config: other shapes for .*position"):
        run_classification.main(run_args(data, tmp_path / "refused", "--config_overrides", "image_size=96"))
    with pytest.raises(ValueError, match="--train_dir or --dataset_name"):
        run_classification.main(args_for(three)[:-2])


def test_resume_latest(data, tmp_path, monkeypatch):
    """`--resume_from_checkpoint latest` continues from the last checkpoint in the output folder: the resumed process
    runs only the remaining steps, from the checkpoint's weights and optimizer moments."""
    output_dir = tmp_path / "run"
    with pytest.raises(ValueError, match="no checkpoint in"):
        run_classification.main(run_args(data, output_dir, "--resume_from_checkpoint", "latest"))
    epoch = ["--augment", "False", "--logging_steps", "1", "--save_strategy", "epoch"]
    run_classification.main(run_args(data, output_dir, "--num_train_epochs", "1", *epoch))
    assert (output_dir / "checkpoint-2").is_dir()  # 16 images, batch 8

    probe = ResumeProbe()

    class ProbedTrainer(run_classification.ClassificationTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_callback(probe)

    monkeypatch.setattr(run_classification, "ClassificationTrainer", ProbedTrainer)
    run_classification.main(
        run_args(data, output_dir, "--num_train_epochs", "2", "--resume_from_checkpoint", "latest", *epoch)
    )
    assert probe.steps == [3, 4]
    probe.assert_started_from(output_dir / "checkpoint-2")
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    assert [entry["step"] for entry in history if "loss" in entry] == [1, 2, 3, 4]
