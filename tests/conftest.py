import pytest
import torch

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
