import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from configuration_hivit_mae import HiViTMAEConfig


def small_config(**overrides) -> HiViTMAEConfig:
    """A HiViT-MAE small enough for fast CPU tests but with every kind of block: two stem stages with merges, a
    main stage with attention, and a decoder."""
    settings = dict(
        hidden_size=64,
        depths=[1, 1, 2],
        num_attention_heads=4,
        image_size=64,
        decoder_hidden_size=32,
        decoder_num_hidden_layers=2,
        decoder_num_attention_heads=4,
    )
    settings.update(overrides)
    return HiViTMAEConfig(**settings)


@pytest.fixture
def make_config():
    return small_config


@pytest.fixture
def config():
    return small_config()


@pytest.fixture
def images():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


class ResumeProbe(TrainerCallback):
    """Records which steps a training process runs, and its weights and optimizer moments before its first step: a
    resumed process must run only the remaining steps and start from the checkpoint's state (a fresh run with the same
    seed would end at the same weights, so the final weights alone cannot tell)."""

    def __init__(self):
        self.steps = []
        self.weights = self.moments = None

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.weights is None:
            self.weights = {name: value.detach().clone() for name, value in model.state_dict().items()}
            self.moments = copy.deepcopy(optimizer.state_dict()["state"])

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)

    def assert_started_from(self, checkpoint: Path):
        saved = load_file(checkpoint / "model.safetensors")
        assert saved.keys() <= self.weights.keys()
        for name, value in saved.items():
            assert torch.equal(self.weights[name], value), f"{name} is not the checkpoint's"
        saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)["state"]
        assert saved and self.moments.keys() == saved.keys(), "the optimizer state is not the checkpoint's"
        for index, moments in saved.items():
            for name, value in moments.items():
                assert torch.equal(self.moments[index][name], value), f"optimizer {name} of parameter {index}"
