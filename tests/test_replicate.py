"""Depth replication (engines/replicate.py): a deep model's step built from a 5-layer one's is
the full-depth simulation's, table by table, byte for byte."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from conftest import run_spec as RunSpec

from paca_prof.engines import replicate
from paca_prof.engines.simulate import Simulator
from paca_prof.gpus import gpu_spec
from paca_prof.methods import DEFAULT_METHODS

SEVEN = {"model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 96,
         "num_hidden_layers": 7, "num_attention_heads": 4, "num_key_value_heads": 2,
         "max_position_embeddings": 512}


def both(method: str, config=SEVEN, **recipe):
    """(full-depth result, replicated result, the replicating Simulator), projected onto an
    A100 so that the time columns are compared too."""
    spec = RunSpec(model=dict(config), seq=32, batch=1, dtype="bf16", device="meta",
                   methods=(method,), **recipe)
    gpu = gpu_spec("a100-80gb")
    full = Simulator(spec, method, replicate=False).step(32, 1, gpu)
    simulator = Simulator(spec, method)
    return full, simulator.step(32, 1, gpu), simulator


def assert_same(full, replicated):
    for name in ("layers", "ops", "memory"):
        pd.testing.assert_frame_equal(getattr(full, name).reset_index(drop=True),
                                      getattr(replicated, name).reset_index(drop=True))
    assert full.summary.keys() == replicated.summary.keys()
    for key, value in full.summary.items():
        other = replicated.summary[key]
        assert value == other or (isinstance(value, float) and math.isnan(value)
                                  and math.isnan(other)), key


@pytest.mark.parametrize("method", DEFAULT_METHODS)
def test_replicated_step_equals_the_full_depth_simulation(method):
    full, replicated, simulator = both(method)
    assert simulator.depth == replicate.SHALLOW_DEPTH and simulator.full_depth_reason is None
    assert_same(full, replicated)
    summary = replicated.summary
    assert summary["peak_bytes"] > 0 and summary["reserved_bytes"] >= summary["peak_bytes"]
    layers = replicated.layers["module"]
    assert layers.str.contains(r"layers\.6\.").any()  # the last of the seven layers is there
    assert not layers.str.contains(r"layers\.7\.").any()


@pytest.mark.parametrize("recipe", [{"grad_ckpt": True}, {"amp": True}, {"grad_accum": 2},
                                    {"keep_outputs": True}])
def test_replication_is_exact_under_checkpointing_amp_accumulation_and_kept_outputs(recipe):
    full, replicated, simulator = both("lora", **recipe)
    assert simulator.full_depth_reason is None
    assert_same(full, replicated)


def test_layers_of_several_types_are_simulated_at_full_depth():
    # qwen3 with a sliding window on its first layers only: layer_types mixes two kinds
    config = {**SEVEN, "model_type": "qwen3", "head_dim": 16, "use_sliding_window": True,
              "sliding_window": 16, "max_window_layers": 3}
    spec = RunSpec(model=config, seq=32, batch=1, dtype="bf16", device="meta",
                   methods=("lora",), attention="eager")
    assert replicate.refusal(spec.config) is not None
    simulator = Simulator(spec, "lora")
    assert simulator.depth == 7 and simulator.full_depth_reason
    result = simulator.step(32, 1)
    assert result.layers["module"].str.contains(r"layers\.6\.").any()


def test_gradient_clipping_falls_back_to_full_depth_and_stays_exact():
    full, replicated, simulator = both("lora", max_grad_norm=1.0)
    assert simulator.depth == 7 and "depends on depth" in simulator.full_depth_reason
    assert_same(full, replicated)


def test_a_shallow_model_is_not_replicated():
    spec = RunSpec(model="tiny", seq=16, device="meta", methods=("lora",))
    assert "simulated in full" in replicate.refusal(spec.config)
    assert Simulator(spec, "lora").depth == 2


def test_expand_runs_repeats_the_middle_layer_in_the_direction_around_it():
    plan = replicate._Plan(7)  # two extra copies of layer 2
    items = list("abcdefg")
    tags = [None, 1, 2, 3, 2, 1, None]
    directions = {2: True, 4: False}
    out = replicate.expand_runs(items, tags, plan, lambda start: directions[start])
    assert [(item, item_shift) for item, item_shift in out] == [
        ("a", 0), ("b", 0), ("c", 0), ("c", 1), ("c", 2), ("d", 2),
        ("e", 2), ("e", 1), ("e", 0), ("f", 0), ("g", 0)]
