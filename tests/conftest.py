"""Shared fixtures: a tiny randomly initialised Llama (no hub access needed)."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import pytest
import torch

# `pytest` (not only `python -m pytest`) should import the repo's packages without an install.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def checkout_env(**extra: str) -> dict[str, str]:
    """The environment for a subprocess that must run THIS checkout's code: the repository
    first on PYTHONPATH, ahead of any editable install of another checkout (whose finder or
    path entry comes after PYTHONPATH), and one OpenMP thread."""
    import os

    path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **extra}


def measure_in_temp(spec, method: str):
    """measure_method(spec, method) in a work folder of its own under the temp dir, removed
    when it returns (the result's tables are in memory)."""
    from paca_prof.engines.measure import measure_method

    with tempfile.TemporaryDirectory(prefix="paca-prof-test-") as workdir:
        return measure_method(spec, method, Path(workdir))


def run_spec(**kwargs):
    """A RunSpec from flat keywords: the Recipe's fields (attention, loss, ...) go to its
    recipe."""
    from dataclasses import fields

    from paca_prof.recipe import Recipe
    from paca_prof.spec import RunSpec

    recipe = {f.name: kwargs.pop(f.name) for f in fields(Recipe) if f.name in kwargs}
    return RunSpec(recipe=Recipe(**recipe), **kwargs)


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
    """Factory: make_llama(seed=0, dtype=torch.float32, device="cpu", **config_overrides)
    -> LlamaForCausalLM in train mode.

    The same seed gives bit-identical weights, so two calls give two independent copies of one
    base model. device="meta" builds it under torch.device("meta") (shapes only).
    """
    from transformers import LlamaForCausalLM

    def make(seed: int = 0, dtype: torch.dtype = torch.float32, device="cpu", **overrides):
        torch.manual_seed(seed)
        with torch.device(device):
            model = LlamaForCausalLM(tiny_llama_config(**overrides)).to(dtype)
        model.train()
        return model

    return make


# --- One measured run of the tiny preset, shared by the whole session -----------------------

# Settings of the shared run; tests derive expected sizes from these (and from run.yaml).
MEASURED_RUN = dict(model="tiny", seq=128, batch=2, dtype="fp32", steps=10, warmup=2)


@pytest.fixture(scope="session")
def measured_trace_path(tmp_path_factory):
    """Path of a trace folder written by ONE measured CPU run of every method
    (frozen, lora, dora, paca, full) on the tiny preset (see MEASURED_RUN).

    Runs on one thread: the CPU may be shared with other processes, and one thread keeps the
    run fast and its timings comparable within the run. Tests must treat the folder as
    read-only (copy it before changing anything).
    """
    from paca_prof import engines

    out = tmp_path_factory.mktemp("measured") / "tiny-run"
    spec = run_spec(**MEASURED_RUN)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        engines.run(spec, out, "pytest measured_trace fixture")
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="session")
def measured_trace(measured_trace_path):
    """The shared measured run, loaded (paca_prof.trace.Trace). Do not modify its tables."""
    from paca_prof import trace

    return trace.load(measured_trace_path)
