import os

import pytest
import torch

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def tiny_config(**overrides):
    """A small hybrid config for CPU tests: 3 layers (H3, attention, H3), fp32-friendly sizes."""
    from h3pretrain.config import ModelConfig

    base = dict(vocab_size=97, d_model=32, n_layer=3, attn_layer_idx=[1], attn_num_heads=4,
                embed_dropout=0.0, attn_dropout=0.0)
    base.update(overrides)
    return ModelConfig(**base)
