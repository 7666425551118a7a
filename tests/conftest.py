"""Shared fixtures: a tiny randomly initialised Llama (no hub access needed)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

# `pytest` (not only `python -m pytest`) should import the repo's packages without an install.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    settings = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    settings.update(overrides)
    return LlamaConfig(**settings)


@pytest.fixture
def make_llama():
    """Factory: make_llama(seed=0, dtype=torch.float32, **config_overrides) -> LlamaForCausalLM.

    The same seed gives bit-identical weights, so two calls give two independent copies of one
    base model.
    """
    from transformers import LlamaForCausalLM

    def make(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(tiny_llama_config(**overrides)).to(dtype)
        model.train()
        return model

    return make
