"""Simulation on the meta device and projection onto a GPU (issue: full-size models anywhere)."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest

from paca_prof import trace
from paca_prof.engines.common import RunSpec
from paca_prof.engines.measure import measure_method
from paca_prof.engines.simulate import simulate_method
from paca_prof.methods import DEFAULT_METHODS
from paca_prof.gpus import gpu_spec

TINY = dict(model="tiny", seq=64, batch=2, dtype="fp32", steps=1, warmup=1, attention="eager")


def forward_activation(result) -> pd.Series:
    layers = result.layers
    rows = layers[layers["phase"] == "forward"]
    return rows.set_index("module")["activation_bytes"].astype("int64")


@pytest.fixture(scope="module")
def measured_and_simulated():
    """Each default method measured on the CPU and simulated on meta, same spec (math attention)."""
    spec = RunSpec(device="cpu", **TINY)
    pairs = {}
    for method in DEFAULT_METHODS:
        measured = measure_method(spec, method, Path(tempfile.mkdtemp()))
        pairs[method] = (measured, simulate_method(spec, method))
    return pairs


@pytest.mark.parametrize("method", DEFAULT_METHODS)
def test_simulated_activation_bytes_equal_measured_per_module(measured_and_simulated, method):
    measured, simulated = measured_and_simulated[method]
    real, sim = forward_activation(measured), forward_activation(simulated)
    assert real.sum() > 0
    index = real.index.union(sim.index)  # a module with no row saved nothing
    pd.testing.assert_series_equal(real.reindex(index, fill_value=0),
                                   sim.reindex(index, fill_value=0),
                                   check_names=False)
    assert measured.summary["activation_bytes"] == simulated.summary["activation_bytes"]


@pytest.mark.parametrize("method", DEFAULT_METHODS)
def test_simulated_peak_within_two_percent_of_measured_cpu_peak(measured_and_simulated, method):
    measured, simulated = measured_and_simulated[method]
    error = simulated.summary["peak_bytes"] / measured.summary["peak_bytes"] - 1
    assert abs(error) < 0.02, f"{method}: simulated peak off by {error:+.2%}"
    # the breakdown adds up to the peak
    parts = sum(v for k, v in simulated.summary.items() if k.startswith("peak_") and
                k.endswith("_bytes") and k != "peak_bytes")
    assert parts == simulated.summary["peak_bytes"]


def test_simulated_paca_linear_saves_exactly_the_partial_input():
    spec = RunSpec(device="meta", **{**TINY, "dtype": "bf16", "attention": "flash"})
    result = simulate_method(spec, "paca")
    layers = result.layers
    linears = layers[(layers["phase"] == "forward") & layers["module"].str.match(
        r".*\.(q|k|v|o|gate|up|down)_proj$")]
    assert len(linears) == 7 * spec.config.num_hidden_layers
    expected = spec.batch * spec.seq * spec.settings.rank * 2  # bf16
    assert set(linears["activation_bytes"]) == {expected}


def test_flash_attention_saves_linear_memory_and_math_saves_scores():
    base = {**TINY, "dtype": "bf16", "seq": 256}
    flash = simulate_method(RunSpec(device="meta", **{**base, "attention": "flash"}), "frozen")
    math = simulate_method(RunSpec(device="meta", **{**base, "attention": "eager"}), "frozen")
    config = RunSpec(device="meta", **base).config
    heads, seq, batch = config.num_attention_heads, base["seq"], base["batch"]
    scores = batch * heads * seq * seq * 2
    flash_attn = forward_activation(flash)["model.layers.0.self_attn"]
    math_attn = forward_activation(math)["model.layers.0.self_attn"]
    # eager keeps at least the softmax probabilities (B x H x L x L); flash never does
    assert math_attn - flash_attn >= scores
    assert flash_attn < scores
    ops = set(flash.ops["name"])
    assert "aten::_scaled_dot_product_flash_attention" in ops
    assert "aten::_scaled_dot_product_flash_attention_backward" in ops
    assert flash.summary["peak_logits_loss_bytes"] > 0


def test_gradient_checkpointing_saves_less():
    spec = dict(device="meta", **{**TINY, "dtype": "bf16", "attention": "flash"})
    plain = simulate_method(RunSpec(**spec), "lora")
    ckpt = simulate_method(RunSpec(grad_ckpt=True, **spec), "lora")
    assert ckpt.summary["activation_bytes"] < plain.summary["activation_bytes"] / 2
    # the recompute runs the forward ops again inside backward
    assert ckpt.summary["n_kernels"] > plain.summary["n_kernels"]


def test_projection_labels_times_and_marks_oom():
    gpu = gpu_spec("l4")  # 22.5 GiB: full fine-tuning of a 1B-scale model cannot fit
    spec = RunSpec(model="tiny", seq=64, batch=1, dtype="bf16", device="meta", attention="flash")
    result = simulate_method(spec, "paca", gpu)
    assert result.summary["status"] == "ok"
    assert result.summary["step_ms"] > 0
    assert result.summary["step_ms"] == pytest.approx(
        result.summary["forward_ms"] + result.summary["backward_ms"]
        + result.summary["optimizer_ms"])
    ops = result.ops
    assert ops["start_us"].is_monotonic_increasing and (ops["dur_us"] > 0).all()
    big = RunSpec(model="llama3-8b", seq=512, batch=1, dtype="bf16", device="meta",
                  attention="flash")
    assert simulate_method(big, "full", gpu).summary["status"] == "oom"


def test_quantized_methods_store_four_bit_weights_and_dequantize():
    spec = RunSpec(model="tiny", seq=64, batch=1, dtype="bf16", device="meta", attention="flash")
    plain = simulate_method(spec, "lora")
    quantized = simulate_method(spec, "qlora")
    qpaca = simulate_method(spec, "qpaca")
    # the seven projections shrink from 2 bytes to ~0.5 bytes per weight
    assert quantized.summary["peak_weights_bytes"] < 0.6 * plain.summary["peak_weights_bytes"]
    for result in (quantized, qpaca):
        names = result.ops["name"]
        layers = spec.config.num_hidden_layers
        # one dequantize per projection in forward and one in backward (layer 0's first
        # projections get no input gradient, so their backward needs no weight)
        assert (names == "paca_prof::dequantize_nf4").sum() >= 7 * layers + 7
    assert qpaca.summary["activation_bytes"] < quantized.summary["activation_bytes"]


def test_quantized_methods_refuse_measured_runs(tmp_path):
    spec = RunSpec(model="tiny", seq=16, batch=1, dtype="fp32", device="cpu", methods=("qlora",))
    from paca_prof import engines

    path = engines.run(spec, tmp_path / "t", "test")
    summary = trace.load(path).summary
    assert summary.loc[0, "status"] == "error"
    assert "simulated only" in summary.loc[0, "error"]


def test_llama3_8b_seq4096_cli_simulates_every_default_method(tmp_path):
    """The README's main job: no GPU, full 32 layers, all default methods, exact bytes."""
    out = tmp_path / "llama3-8b"
    completed = subprocess.run(
        [sys.executable, "-m", "paca_prof.cli", "run", "--model", "llama3-8b", "--seq", "4096",
         "--out", str(out), "--json"], capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-2000:]
    report = json.loads(completed.stdout)
    assert set(report["methods"]) == set(DEFAULT_METHODS)
    loaded = trace.load(out)
    assert loaded.run["source"] == "projected"
    assert loaded.run["sources"] == {"time": "projected", "bytes": "simulated"}
    assert loaded.run["assumptions"]["attention"] == "flash"
    paca, lora = report["methods"]["paca"], report["methods"]["lora"]
    # In every decoder layer past the first (whose input needs no gradient under an adapter
    # method), PaCA saves exactly the frozen floor plus B*L*r bf16 values per projection.
    layers = loaded.layers
    forward = layers[layers["phase"] == "forward"]
    for index in (1, 17, 31):
        in_layer = forward[forward["module"].str.startswith(f"model.layers.{index}.")]
        per_method = in_layer.groupby("method")["activation_bytes"].sum()
        assert per_method["paca"] - per_method["frozen"] == 7 * 4096 * 8 * 2
        assert per_method["lora"] > per_method["paca"]
    # LoRA keeps an fp32 copy of each adapted input (PEFT's autocast_adapter_dtype)
    assert lora["activation_bytes"] > 1.5 * paca["activation_bytes"]
    assert paca["step_ms"] < lora["step_ms"] and paca["n_kernels"] < lora["n_kernels"]
    assert (layers["module"] == "model.layers.31.mlp.down_proj").any()
