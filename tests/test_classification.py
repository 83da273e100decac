"""Fine-tuning with `run_classification.py`: a short run with each recipe that learns and saves a loadable classifier,
the recipe picked for each kind of starting folder, the original recipe's layer-wise learning rates and weight decay
against its rule written out by hand and its small step-0 logits, mmpretrain's weight decay and loss against
mmpretrain's own, and clear errors for bad data."""

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
from hivit_mae_tools import finetune_recipes
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


@pytest.fixture(scope="module")
def mmpretrain_classifier(data):
    """An mmpretrain HiViT `ImageClassifier` for the same two classes, converted by `convert_checkpoint.py`
    (mmpretrain's classifier only runs with more main blocks than stem blocks, hence 3)."""
    from reference import build_mmpretrain_classifier

    import convert_checkpoint

    reference = build_mmpretrain_classifier(dict(embed_dims=64, depths=[1, 1, 3], num_heads=4), 64, num_classes=2)
    meta = dict(dataset_meta=dict(classes=("blue", "red")))
    torch.save(dict(meta=meta, state_dict=reference.state_dict()), data / "mmpretrain_classifier.pth")
    folder = data / "mmpretrain_classifier"
    status = convert_checkpoint.main(
        ["--checkpoint", str(data / "mmpretrain_classifier.pth"), "--output_dir", str(folder)]
    )
    assert status == 0
    return folder


def with_start(args: list, folder) -> list:
    args[args.index("--model_name_or_path") + 1] = str(folder)
    return args


@pytest.mark.parametrize("recipe", ["original", "mmpretrain"])
def test_fine_tuning_learns_and_saves_a_classifier(data, mmpretrain_classifier, tmp_path, recipe):
    """Each recipe, picked by its starting folder (an MAE pre-training folder: the original repository's; a converted
    mmpretrain classifier: mmpretrain's), with Mixup / CutMix and label smoothing (RandAugment off, for a short run):
    the two classes become separable; the folder loads with `AutoModelForImageClassification` and remote code, with
    the class names and the image processor, is built as the recipe builds its classifier, and its card names the
    recipe."""
    output_dir = tmp_path / "run"
    start = data / "pretrained" if recipe == "original" else mmpretrain_classifier
    peak = 2e-3 if recipe == "original" else 1e-3
    args = run_args(data, output_dir, "--num_train_epochs", "10", "--augment", "False", "--logging_steps", "1")
    metrics = run_classification.main(with_start(args, start) + ["--learning_rate", str(peak)])
    assert metrics["eval_accuracy"] == 1.0
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses
    # Warm-up, then cosine decay towards the floor: the original's absolute 1e-6, mmpretrain's 1 % of the peak. The
    # logged rate is the head's, the peak.
    rates = [entry["learning_rate"] for entry in history if "learning_rate" in entry]
    assert max(rates) == pytest.approx(peak, rel=0.1) and rates[0] < 0.5 * max(rates)
    if recipe == "original":
        assert 1e-6 < rates[-1] < 0.01 * peak
    else:
        assert 0.01 * peak < rates[-1] < 0.03 * peak
    # Evaluated once per epoch, as the recipe's eval_strategy says.
    assert len([entry for entry in history if "eval_accuracy" in entry]) >= 10

    config = json.loads((output_dir / "config.json").read_text())
    assert config["architectures"] == ["HiViTMAEForImageClassification"]
    assert config["id2label"] == {"0": "blue", "1": "red"}
    assert config["use_relative_position_bias"] and not config["use_hifeat"]
    if recipe == "original":
        assert config["use_fc_norm"] and not config["legacy_position_encoding"]
        assert config["layer_norm_eps"] == 1e-6 and config["drop_path_rate"] == 0.2  # eps as pre-trained
    else:
        assert not config["use_fc_norm"] and config["layer_norm_eps"] == 1e-5
        assert config["drop_path_rate"] == 0.1  # a custom size; mmpretrain's four sizes get their own rates
    card = (output_dir / "README.md").read_text()
    assert "## Fine-tuning recipe" in card and f"`{recipe}`" in card
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


def test_recipe_for_each_starting_folder(data, mmpretrain_classifier, tmp_path):
    """MAE-pre-trained folders (this project's pre-training and encoder folders, an original-repository MAE with hifeat
    and the aligned decoder) and classifiers with fc_norm get the original recipe; a converted mmpretrain classifier
    gets mmpretrain's; --recipe overrides either way, and the recipe's Trainer defaults yield to the command line."""
    from hivit_mae_tools.finetune_recipes import choose_recipe
    from modeling_hivit_mae import HiViTMAEModel

    folders = {"mae-mmpretrain": data / "pretrained", "classifier": mmpretrain_classifier}
    folders["encoder"] = tmp_path / "encoder"
    HiViTMAEModel(HiViTMAEConfig(**SMALL)).save_pretrained(folders["encoder"])
    folders["mae-original"] = tmp_path / "original_mae"
    original = dict(use_hifeat=True, decoder_first_token_as_cls=False, legacy_position_encoding=False)
    HiViTMAEForPreTraining(HiViTMAEConfig(**SMALL, **original)).save_pretrained(folders["mae-original"])
    folders["classifier-fc-norm"] = tmp_path / "fc_norm_classifier"
    HiViTMAEForImageClassification(HiViTMAEConfig(**SMALL, use_fc_norm=True)).save_pretrained(
        folders["classifier-fc-norm"]
    )
    expected = {
        "mae-mmpretrain": ("original", "mae-mmpretrain"),
        "encoder": ("original", "mae-mmpretrain"),
        "mae-original": ("original", "mae-original"),
        "classifier-fc-norm": ("original", "classifier-fc-norm"),
        "classifier": ("mmpretrain", "classifier"),
    }
    for kind, folder in folders.items():
        config = HiViTMAEConfig.from_pretrained(folder)
        recipe, start = choose_recipe(config)
        assert (recipe.name, start) == expected[kind], kind
        other = "mmpretrain" if recipe.name == "original" else "original"
        assert choose_recipe(config, other)[0].name == other

    def parsed(folder, *extra):
        return run_classification.parse_args(with_start(run_args(data, tmp_path / "run", *extra), folder))

    # main_finetune.py with get_started.md's command: 100 epochs, 5 of warm-up, min_lr 1e-6, no clipping.
    model_args, _, training_args, recipe, _ = parsed(data / "pretrained")
    assert recipe.name == "original" and training_args.num_train_epochs == 100
    assert training_args.lr_scheduler_kwargs == {"min_lr": 1e-6} and not training_args.max_grad_norm
    assert (model_args.layer_decay, model_args.drop_path_rate, model_args.head_init_std) == (0.85, 0.2, 2e-5)
    assert (model_args.base_learning_rate, recipe.learning_rate_per_images) == (5e-4, 256)
    # mmpretrain's configs/hivit: 300 epochs, clipping at 5, no layer decay.
    model_args, _, training_args, recipe, _ = parsed(mmpretrain_classifier)
    assert recipe.name == "mmpretrain" and training_args.num_train_epochs == 300 and training_args.max_grad_norm == 5
    assert model_args.layer_decay is None and recipe.learning_rate_per_images == 512
    # Every value yields to its flag.
    flags = ["--recipe", "original", "--num_train_epochs", "3", "--max_grad_norm", "1", "--layer_decay", "0.9"]
    model_args, _, training_args, recipe, _ = parsed(mmpretrain_classifier, *flags, "--drop_path_rate", "0.05")
    assert recipe.name == "original" and training_args.num_train_epochs == 3 and training_args.max_grad_norm == 1
    assert (model_args.layer_decay, model_args.drop_path_rate) == (0.9, 0.05)


def original_layer_ids(model) -> tuple[dict[str, tuple[str, int]], int]:
    """The original repository's name and `get_layer_id` (`util/lr_decay.py`) for each of our parameter names, and
    its `max_layer`, written out from its model: `HiViT.blocks` is one flat list holding each stem stage's
    `2 * depth` MLP blocks, then that stage's `PatchMerge`, then the main blocks; `main_block` lists every index that
    is not a merge."""
    depths = model.config.depths
    flat = []
    for stage, depth in enumerate(depths[:-1]):
        flat += [f"hivit.stem.{stage}.blocks.{block}." for block in range(2 * depth)] + [f"hivit.stem.{stage}.merge."]
    flat += [f"hivit.encoder.layers.{layer}." for layer in range(depths[-1])]
    main_block = [index for index, prefix in enumerate(flat) if not prefix.endswith("merge.")]
    max_layer = len(main_block) + 1

    def get_layer_id(name):  # the original's logic
        if name in ["cls_token", "pos_embed", "absolute_pos_embed"]:
            return 0
        elif name.startswith("patch_embed"):
            return 0
        elif name.startswith("blocks"):
            i = int(name.split(".")[1])
            while i >= 0:
                if i in main_block:
                    return main_block.index(i) + 1
                i = i - 1
            return 0
        return max_layer

    renames = {"hivit.patch_embeddings.": "patch_embed.", "hivit.position_embeddings": "absolute_pos_embed"}
    renames["classifier."] = "head."
    result = {}
    for name, _ in model.named_parameters():
        prefix = next((prefix for prefix in flat if name.startswith(prefix)), None)
        if prefix is not None:
            original = f"blocks.{flat.index(prefix)}.{name[len(prefix) :]}"
        else:
            ours = next((ours for ours in renames if name.startswith(ours)), "")
            original = renames.get(ours, "") + name[len(ours) :]
        result[name] = (original, get_layer_id(original))
    return result, max_layer


def test_layer_decay_groups_follow_the_original(tmp_path):
    """The optimizer the Trainer builds for the original recipe: each parameter's learning rate is
    `lr * 0.85 ** (num_layers + 1 - layer_id)` with the original's layer ids, and its weight decay follows the
    original's `param_groups_lrd` (none for 1-D parameters, `absolute_pos_embed` and relative position bias tables);
    every trainable parameter is in exactly one group, and group 0 (whose rate the Trainer logs) is the head's."""
    from transformers import TrainingArguments

    config = HiViTMAEConfig(**{**SMALL, "depths": [1, 2, 2]}, use_fc_norm=True, use_relative_position_bias=True)
    model = HiViTMAEForImageClassification(config)
    args = TrainingArguments(
        output_dir=str(tmp_path), learning_rate=1e-3, weight_decay=0.05, use_cpu=True, report_to="none"
    )
    trainer = run_classification.ClassificationTrainer(model=model, args=args, layer_decay=0.85)
    groups = trainer.create_optimizer().param_groups
    by_parameter = {}
    for group in groups:
        for parameter in group["params"]:
            assert id(parameter) not in by_parameter
            by_parameter[id(parameter)] = (group["lr"], group["weight_decay"])

    ids, max_layer = original_layer_ids(model)
    assert max_layer == 2 + 4 + 2 + 1  # 6 stem MLP blocks and 2 main blocks
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    assert len(by_parameter) == len(trainable)
    seen_ids = set()
    for name, parameter in trainable:
        original, layer_id = ids[name]
        seen_ids.add(layer_id)
        no_decay = parameter.ndim == 1 or original == "absolute_pos_embed"
        no_decay = no_decay or original.endswith(".relative_position_bias_table")
        lr, weight_decay = by_parameter[id(parameter)]
        assert lr == pytest.approx(1e-3 * 0.85 ** (max_layer - layer_id), rel=1e-12), (name, original)
        assert weight_decay == (0.0 if no_decay else 0.05), (name, original)
    assert seen_ids == set(range(max_layer + 1))
    assert groups[0]["lr"] == 1e-3 and any(p is model.classifier.weight for p in groups[0]["params"])


def test_original_recipe_small_logits_at_step_0(data, tmp_path):
    """With MAE features of large norm (as the demo model's: a fresh mmpretrain-style head gave logits from -52 to
    36), the original recipe's fresh classifier gives near-zero logits: its input is layer-normalised
    (||fc_norm(x)|| <= sqrt(D) for unit weight and zero bias) and its weights are normal(0, 2e-5), so each logit is
    normal with standard deviation at most 2e-5 * sqrt(D); we allow 6 of those. mmpretrain's head on the same
    features (no norm, weights truncated normal(0.02)) gives logits in the tens, the bug."""
    from hivit_mae_tools.finetune_recipes import choose_recipe

    pretrained = HiViTMAEForPreTraining(HiViTMAEConfig(**SMALL))
    with torch.no_grad():  # features of norm in the thousands, as trained MAE encoders give
        pretrained.hivit.encoder.layers[-1].mlp.fc2.weight.mul_(3000)
    pretrained.save_pretrained(tmp_path / "mae")
    assert choose_recipe(HiViTMAEConfig.from_pretrained(tmp_path / "mae"))[0].name == "original"
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    id2label = {index: f"class{index}" for index in range(10)}
    logits = {}
    for name in ("original", "mmpretrain"):
        args = with_start(run_args(data, tmp_path / "run", "--recipe", name), tmp_path / "mae")
        model_args, _, _, recipe, start = run_classification.parse_args(args)
        torch.manual_seed(0)
        model = run_classification.build_model(model_args, recipe, start, id2label).eval()
        with torch.no_grad():
            logits[name] = model(images).logits
    bound = 6 * 2e-5 * SMALL["hidden_size"] ** 0.5
    assert logits["original"].abs().max() < bound
    assert logits["mmpretrain"].abs().max() > 10


def test_mmpretrain_classifier_keeps_its_head(data, mmpretrain_classifier):
    """A converted mmpretrain classifier fine-tuned on its own classes starts as it is: every weight equal to the
    folder's, no fc_norm. Forced into the original recipe it gains fc_norm and a fresh head (its head was trained on
    un-normalised features), everything else still loaded."""
    from safetensors.torch import load_file

    stored = load_file(mmpretrain_classifier / "model.safetensors")
    id2label = {0: "blue", 1: "red"}
    models = {}
    for name in ("auto", "original"):
        args = with_start(run_args(data, data / "unused", "--recipe", name), mmpretrain_classifier)
        model_args, _, _, recipe, start = run_classification.parse_args(args)
        models[name] = run_classification.build_model(model_args, recipe, start, id2label)
    kept = models["auto"].state_dict()
    assert models["auto"].fc_norm is None and set(kept) == set(stored)
    for key, value in stored.items():
        assert torch.equal(kept[key], value), key
    assert models["auto"].config.drop_path_rate == 0.1  # the recipe's, for a size of one's own

    changed = models["original"]
    assert changed.fc_norm is not None
    assert changed.classifier.weight.std() < 1e-4 and not changed.classifier.bias.any()
    for key, value in stored.items():
        if not key.startswith("classifier."):
            assert torch.equal(changed.state_dict()[key], value), key


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
    assert set(finetune_recipes.decay_parameter_names(model)) == theirs
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
