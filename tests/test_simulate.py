"""Simulation on the meta device and projection onto a GPU (issue: full-size models anywhere)."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest

from conftest import checkout_env
from conftest import measure_in_temp, run_spec as RunSpec

from paca_prof import trace
from paca_prof.engines.simulate import simulate_method
from paca_prof.methods import DEFAULT_METHODS
from paca_prof.budget import make_budget
from paca_prof.gpus import gpu_spec

TINY = dict(model="tiny", seq=64, batch=2, dtype="fp32", steps=1, warmup=1, attention="eager")


def forward_activation(result) -> pd.Series:
    layers = result.layers
    rows = layers[layers["phase"] == "forward"]
    return rows.set_index("module")["activation_bytes"].astype("int64")


# The simulated bytes are exact: measured CPU runs and simulations of the same step agree to
# within what the CPU allocator adds that no dispatch mode sees (observed: 16 to 128 bytes, all
# in "rest": a few scalars). 256 bytes is less than one row of any hidden state here.
BYTE_TOLERANCE = 256
BYTE_COLUMNS = ["peak_bytes", *(f"peak_{c}_bytes" for c in trace.MEMORY_CATEGORIES)]


@pytest.fixture(scope="module", params=["fp32", "bf16"])
def measured_and_simulated(request):
    """Each default method measured on the CPU and simulated on meta, same spec (eager
    attention), in fp32 and in bf16 (where PEFT's fp32 adapter cast changes LoRA's bytes)."""
    spec = RunSpec(device="cpu", **{**TINY, "dtype": request.param})
    pairs = {}
    for method in DEFAULT_METHODS:
        measured = measure_in_temp(spec, method)
        pairs[method] = (measured, simulate_method(spec, method))
    return request.param, pairs


@pytest.mark.parametrize("method", DEFAULT_METHODS)
def test_simulated_activation_bytes_equal_measured_per_module(measured_and_simulated, method):
    _, pairs = measured_and_simulated
    measured, simulated = pairs[method]
    real, sim = forward_activation(measured), forward_activation(simulated)
    assert real.sum() > 0
    index = real.index.union(sim.index)  # a module with no row saved nothing
    pd.testing.assert_series_equal(real.reindex(index, fill_value=0),
                                   sim.reindex(index, fill_value=0),
                                   check_names=False)
    assert measured.summary["activation_bytes"] == simulated.summary["activation_bytes"]


@pytest.mark.parametrize("method", DEFAULT_METHODS)
def test_simulated_peak_and_its_breakdown_equal_measured_to_256_bytes(measured_and_simulated,
                                                                      method):
    _, pairs = measured_and_simulated
    measured, simulated = pairs[method]
    for column in BYTE_COLUMNS:
        real, sim = int(measured.summary[column]), int(simulated.summary[column])
        assert abs(sim - real) <= BYTE_TOLERANCE, (method, column, real, sim, sim - real)
    # format check (true by construction: the breakdown is the categories' bytes at the peak)
    parts = sum(int(simulated.summary[f"peak_{c}_bytes"]) for c in trace.MEMORY_CATEGORIES)
    assert parts == simulated.summary["peak_bytes"]


def test_fp32_adapters_save_a_copy_of_every_adapted_input_on_a_bf16_model(
        measured_and_simulated):
    """PEFT's autocast_adapter_dtype keeps LoRA in fp32 on a bf16 model: each lora_A casts its
    input to fp32 and saves that copy, so q, k and v each save one (4 bytes per value). In fp32
    the three share the one input, saved once (by q_proj's lora_A). PaCA saves r columns in the
    model's dtype either way. Checked on measured bytes, where the cast really runs."""
    dtype, pairs = measured_and_simulated
    lora, paca = forward_activation(pairs["lora"][0]), forward_activation(pairs["paca"][0])
    spec = RunSpec(device="cpu", **{**TINY, "dtype": dtype})
    hidden, tokens, r = spec.config.hidden_size, spec.batch * spec.seq, spec.settings.r
    element = {"fp32": 4, "bf16": 2}[dtype]
    attention = "model.layers.1.self_attn"
    assert lora[f"{attention}.q_proj.lora_A.default"] == tokens * hidden * 4
    expected_k = tokens * hidden * 4 if dtype == "bf16" else 0
    assert lora.get(f"{attention}.k_proj.lora_A.default", 0) == expected_k
    assert lora.get(f"{attention}.v_proj.lora_A.default", 0) == expected_k
    assert lora[f"{attention}.q_proj.lora_B.default"] == tokens * r * 4
    assert paca[f"{attention}.q_proj"] == tokens * r * element


def _independent_saved_bytes(spec: RunSpec, method: str) -> int:
    """Bytes saved for backward by one forward and loss, counted without the ledger: a pack
    hook keeps a weak reference to every saved tensor; at the end of forward, each storage
    that is still referenced and is not a parameter or buffer counts once."""
    import weakref

    from torch.autograd.graph import saved_tensors_hooks

    from paca_prof.engines.step import make_batch, prepare

    model = prepare(spec, method, "cpu").model
    ids = make_batch(spec, "cpu")
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    refs: list[weakref.ref] = []

    def pack(tensor):
        refs.append(weakref.ref(tensor))
        return tensor

    with saved_tensors_hooks(pack, lambda tensor: tensor):
        logits = model(input_ids=ids).logits
        loss = model.loss_function(logits=logits, labels=ids, vocab_size=model.config.vocab_size)
        del logits
    storages = {}
    for ref in refs:
        tensor = ref()
        if tensor is not None and tensor.untyped_storage().data_ptr() not in own:
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    del loss
    return sum(storages.values())


@pytest.mark.parametrize("method", DEFAULT_METHODS)
def test_ledger_equals_an_independent_count_of_saved_bytes(measured_and_simulated, method):
    dtype, pairs = measured_and_simulated
    spec = RunSpec(device="cpu", **{**TINY, "dtype": dtype})
    assert pairs[method][0].summary["activation_bytes"] == _independent_saved_bytes(spec, method)



@pytest.mark.parametrize("method", DEFAULT_METHODS)
def test_measured_and_simulated_ops_mean_the_same_flops_and_dtypes(measured_and_simulated,
                                                                   method):
    """One definition of FLOPs (torch's formulas, from the profiler's input shapes when
    measured) and of dtype names (torch's spelling, normalised when written): the same step
    measured and simulated counts the same FLOPs per phase, and per module in forward,
    attention included, and names its tensors' dtypes alike."""
    dtype, pairs = measured_and_simulated
    measured, simulated = (result.ops for result in pairs[method])
    per_phase = [ops.groupby("phase")["flops"].sum() for ops in (measured, simulated)]
    pd.testing.assert_series_equal(*per_phase, check_names=False)
    forward = [ops[(ops["phase"] == "forward") & (ops["flops"] > 0)].groupby("module")[
        "flops"].sum() for ops in (measured, simulated)]
    assert len(forward[0]) > 0
    pd.testing.assert_series_equal(*forward, check_names=False)
    attention = measured[measured["module"].str.endswith("self_attn")
                         & measured["name"].isin(["aten::bmm", "aten::matmul"])]
    assert attention["flops"].sum() > 0  # eager attention's score and value GEMMs count
    tensor_dtypes = [set(ops["dtype"]) - {"", "ScalarList", "TensorList"}
                     for ops in (measured, simulated)]
    assert tensor_dtypes[0] == tensor_dtypes[1]
    assert {"fp32": "float32", "bf16": "bfloat16"}[dtype] in tensor_dtypes[0]


def test_backward_ops_are_attributed_to_the_same_module_measured_and_simulated(
        measured_and_simulated):
    """A module whose output is also its parent's (down_proj and the MLP, o_proj and
    self_attn, lm_head and the model) owns its backward ops in both engines."""
    _, pairs = measured_and_simulated
    measured, simulated = (result.ops for result in pairs["frozen"])
    backward = [ops[(ops["phase"] == "backward") & (ops["flops"] > 0)].groupby("module")[
        "flops"].sum() for ops in (measured, simulated)]
    pd.testing.assert_series_equal(*backward, check_names=False)


def test_mixed_layout_is_operands_that_disagree_on_their_innermost_dimension():
    import torch

    from paca_prof.engines.simulate import mixed_layout

    def meta(*shape):
        return torch.empty(shape, device="meta")

    # DoRA's weight plus its low-rank product read transposed, into a contiguous output
    assert mixed_layout([meta(512, 1376), meta(512, 1376), meta(1376, 512).t()])
    assert mixed_layout([meta(64, 8), meta(8, 64).t()])  # a 2-D transpose made contiguous
    heads = meta(1, 256, 8, 64).transpose(1, 2)  # attention's heads: rows move whole
    assert not mixed_layout([meta(1, 8, 256, 64), heads])
    assert not mixed_layout([torch.empty_like(heads), heads, meta(1, 1, 256, 64)])
    assert not mixed_layout([meta(3, 4), meta(3, 4), meta(4).expand(3, 4)])  # a broadcast


def test_only_doras_weight_plus_product_reads_an_operand_transposed():
    spec = RunSpec(device="meta", **{**TINY, "attention": "flash"})
    flagged = {}
    for method in DEFAULT_METHODS:
        ops = simulate_method(spec, method).ops
        flagged[method] = ops[ops["mixed_layout"].fillna(False)]
    assert all(flagged[m].empty for m in DEFAULT_METHODS if m != "dora")
    dora = flagged["dora"]
    # one add per adapted projection per forward (7 per layer), of the weight's shape
    assert set(dora["name"]) == {"aten::add"} and set(dora["phase"]) == {"forward"}
    assert len(dora) == 7 * spec.config.num_hidden_layers and (dora["flops"] == 0).all()


def test_simulated_paca_linear_saves_exactly_the_partial_input():
    spec = RunSpec(device="meta", **{**TINY, "dtype": "bf16", "attention": "flash"})
    result = simulate_method(spec, "paca")
    layers = result.layers
    linears = layers[(layers["phase"] == "forward") & layers["module"].str.match(
        r".*\.(q|k|v|o|gate|up|down)_proj$")]
    assert len(linears) == 7 * spec.config.num_hidden_layers
    expected = spec.batch * spec.seq * spec.settings.r * 2  # bf16
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
    budget = make_budget(gpu=gpu)  # the planner's budget: the GPU's memory less headroom
    result = simulate_method(big, "full", gpu, budget)
    assert result.summary["status"] == "oom"
    assert result.summary["peak_bytes"] > budget.budget_bytes  # its numbers are kept
    small = simulate_method(RunSpec(**{**TINY, "device": "meta"}), "full", gpu, budget)
    assert small.summary["status"] == "ok"


def test_out_of_memory_is_decided_by_reserved_memory_not_live_bytes():
    """A budget above the step's live peak but below what the allocator reserves is out of
    memory, as on a GPU (the allocator needs whole segments)."""
    spec = RunSpec(model="tiny", seq=64, batch=1, dtype="bf16", device="meta", attention="flash")
    free = simulate_method(spec, "paca").summary
    assert free["peak_bytes"] < free["reserved_bytes"]
    between = make_budget(memory=str((free["peak_bytes"] + free["reserved_bytes"]) // 2),
                          headroom="0")
    squeezed = simulate_method(spec, "paca", None, between).summary
    assert squeezed["status"] == "oom" and squeezed["peak_bytes"] == free["peak_bytes"]
    roomy = make_budget(memory=str(free["reserved_bytes"]), headroom="0")
    assert simulate_method(spec, "paca", None, roomy).summary["status"] == "ok"


def test_quantized_methods_store_four_bit_weights_and_dequantize():
    def run(method, **recipe):
        spec = RunSpec(model="tiny", seq=64, batch=1, dtype="bf16", device="meta",
                       attention="flash", **recipe)
        return simulate_method(spec, method)

    plain, bare = run("lora"), run("qlora", kbit_prep=False)
    quantized, qpaca = run("qlora"), run("qpaca")
    # every linear but the head shrinks from 2 bytes to ~0.5 bytes per weight
    assert bare.summary["peak_weights_bytes"] < 0.6 * plain.summary["peak_weights_bytes"]
    # PEFT's prepare_model_for_kbit_training casts the rest (embeddings, norms, head) to fp32:
    # 2 more bytes for each of their values
    config = RunSpec(model="tiny", seq=64).config
    layers, hidden = config.num_hidden_layers, config.hidden_size
    rest = 2 * config.vocab_size * hidden + (2 * layers + 1) * hidden
    assert (quantized.summary["peak_weights_bytes"] - bare.summary["peak_weights_bytes"]
            == 2 * rest)
    # bitsandbytes' fused 4-bit matmul in forward; qpaca dequantizes in forward instead (its
    # columns are written into the weight). In backward both dequantize for each input
    # gradient, which layer 0's q, k and v do not need (their input, the embedding's normed
    # output, needs no gradient under an adapter method); qpaca's column gradient needs only
    # the saved columns.
    expected = {"qlora": {("bitsandbytes::gemm_4bit", "forward"): 7 * layers,
                          ("bitsandbytes::dequantize_4bit", "backward"): 7 * layers - 3},
                "qpaca": {("bitsandbytes::dequantize_4bit", "forward"): 7 * layers,
                          ("bitsandbytes::dequantize_4bit", "backward"): 7 * layers - 3}}
    for name, result in (("qlora", quantized), ("qpaca", qpaca)):
        ops = result.ops[result.ops["name"].isin(["bitsandbytes::gemm_4bit",
                                                   "bitsandbytes::dequantize_4bit"])]
        assert ops.groupby(["name", "phase"]).size().to_dict() == expected[name], name
    # the fused matmul is counted as the matmul it is: 2 x tokens x in x out per projection
    gemm = quantized.ops[quantized.ops["name"] == "bitsandbytes::gemm_4bit"]
    per_layer = (hidden * (hidden + 2 * config.num_key_value_heads * hidden
                           // config.num_attention_heads + hidden)
                 + 3 * hidden * config.intermediate_size)
    assert gemm["flops"].sum() == 2 * 64 * per_layer * layers
    assert qpaca.summary["activation_bytes"] < quantized.summary["activation_bytes"]


def test_llama3_8b_seq4096_cli_simulates_every_default_method(tmp_path):
    """The README's main job: no GPU, full 32 layers, all default methods, exact bytes."""
    out = tmp_path / "llama3-8b"
    completed = subprocess.run(
        [sys.executable, "-m", "paca_prof.cli", "run", "--model", "llama3-8b", "--seq", "4096",
         "--out", str(out), "--json"], capture_output=True, text=True, timeout=600,
        cwd=tmp_path, env=checkout_env())
    assert completed.returncode == 0, completed.stderr[-2000:]
    report = json.loads(completed.stdout)
    assert set(report["methods"]) == set(DEFAULT_METHODS)
    loaded = trace.load(out)
    assert loaded.run["source"] == "projected"
    assert loaded.run["sources"] == {"time": "projected", "bytes": "simulated",
                                     "reserved": "simulated"}
    for row in report["methods"].values():  # the allocator holds at least what is live
        assert row["reserved_bytes"] >= row["allocator_peak_bytes"] >= row["peak_bytes"]
    assert loaded.run["recipe"]["attention"] == "flash"
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


def test_tensors_in_finds_the_tensors_tree_flatten_finds_in_its_order():
    from collections import namedtuple

    import torch
    from torch.utils._pytree import tree_flatten

    from paca_prof.engines.simulate import tensors_in

    t = [torch.empty(i, device="meta") for i in range(8)]
    pair = namedtuple("pair", "a b")
    cases = [t[0], (t[1], 2.0, None, torch.Size([3])), ([t[2], t[3]], {"b": t[4], "a": [t[5]]}),
             (pair(t[6], (t[7],)),), torch.max(torch.zeros(2, 3), 1), ((), [], {})]
    for value in cases:
        expected = [x for x in tree_flatten(value)[0] if isinstance(x, torch.Tensor)]
        found = tensors_in(value, [])
        assert len(found) == len(expected) and all(a is b for a, b in zip(found, expected))


def test_a_step_without_its_tables_has_the_same_memory_and_summary():
    from paca_prof.engines.simulate import Simulator

    spec = RunSpec(model="tiny", seq=64, batch=1, dtype="bf16", device="meta", attention="flash")
    simulator = Simulator(spec, "lora")
    full, lean = simulator.step(64, 1), simulator.step(64, 1, tables=False)
    assert lean.layers.empty and lean.ops.empty and not full.layers.empty
    assert lean.memory.equals(full.memory)
    assert pd.Series(lean.summary).equals(pd.Series(full.summary))  # NaN times alike
    with pytest.raises(ValueError, match="gpu"):
        simulator.step(64, 1, gpu_spec("l4"), tables=False)
