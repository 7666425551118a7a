"""What a measured run records: activation bytes, op sequences, latencies, memory, failures.

All tests but the OOM ones read the one shared measured run (conftest.measured_trace).
Timing checks compare modules within that run only; none compares with a wall-clock number.
"""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from paca_prof import trace

METHODS = ["frozen", "lora", "dora", "paca", "full"]
ELEMENT_SIZE = {"fp32": 4, "fp16": 2, "bf16": 2}


def _rows(t: trace.Trace, method: str, phase: str | None = None) -> pd.DataFrame:
    layers = t.layers[t.layers["method"] == method]
    return layers if phase is None else layers[layers["phase"] == phase]


def _under(modules: pd.Series, path: str) -> pd.Series:
    """Rows whose module is `path` or one of its submodules."""
    return (modules == path) | modules.str.startswith(path + ".")


def _target_paths(t: trace.Trace, method: str) -> list[str]:
    """The adapted linears' paths (the module tree is the same for every method)."""
    targets = t.run["recipe"]["resolved_targets"]["names"]
    n_layers = t.run["model"]["config"]["num_hidden_layers"]
    attention = {"q_proj", "k_proj", "v_proj", "o_proj"}
    return [f"model.layers.{i}.{'self_attn' if name in attention else 'mlp'}.{name}"
            for i in range(n_layers) for name in targets]


def _latency(t: trace.Trace, method: str, module: str, phase: str) -> float:
    rows = _rows(t, method, phase)
    rows = rows[rows["module"] == module]
    assert len(rows) <= 1, (method, module, phase)
    return float(rows["latency_ms"].iloc[0]) if len(rows) else float("nan")


# --- 2, 3: activation bytes ---------------------------------------------------------------------

def test_paca_linear_saves_only_the_partial_input(measured_trace):
    t = measured_trace
    rank = t.run["methods"]["paca"]["r"]
    expected = t.run["batch"] * t.run["seq"] * rank * ELEMENT_SIZE[t.run["dtype"]]
    assert expected == 2 * 128 * 8 * 4
    forward = _rows(t, "paca", "forward").set_index("module")
    paths = _target_paths(t, "paca")
    assert len(paths) == 14
    for path in paths:
        row = forward.loc[path]
        assert row["kind"] == "linear", path
        assert row["activation_bytes"] == expected, path
        # nothing else under the PacaLinear saves anything
        below = forward[_under(forward.index.to_series(), path)]
        assert below["activation_bytes"].sum() == expected, path


def test_lora_linears_hold_more_activation_bytes_than_paca(measured_trace):
    """LoRA's lora_A keeps its whole input for backward, PaCA only B*L*r of it.

    Activation bytes are de-duplicated by storage and owned by the first module that saves
    them (DESIGN.md), so when linears share one input (q/k/v, gate/up) LoRA charges that input
    to the first of them (q_proj, gate_proj) and k/v/up_proj own only lora_B's input
    (B*L*r, as much as PaCA's partial input). Likewise o_proj's input is the attention output
    that the attention already saved. Per linear LoRA >= PaCA, per shared input LoRA > PaCA,
    and the first consumer holds at least the full input."""
    t = measured_trace
    config = t.run["model"]["config"]
    tokens = t.run["batch"] * t.run["seq"] * ELEMENT_SIZE[t.run["dtype"]]
    width = {"q_proj": config["hidden_size"], "gate_proj": config["hidden_size"],
             "down_proj": config["intermediate_size"]}
    groups = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in",
              "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "down"}
    lora = _rows(t, "lora", "forward")
    paca = _rows(t, "paca", "forward")
    group_sums: dict[tuple[str, str], list[int]] = {}
    totals = [0, 0]
    for path in _target_paths(t, "lora"):
        lora_bytes = int(lora.loc[_under(lora["module"], path), "activation_bytes"].sum())
        paca_bytes = int(paca.loc[_under(paca["module"], path), "activation_bytes"].sum())
        assert lora_bytes >= paca_bytes > 0, (path, lora_bytes, paca_bytes)
        layer, name = path.rsplit(".", 2)[0], path.rsplit(".", 1)[1]
        if name in width:  # the first linear to see its input
            assert lora_bytes >= tokens * width[name] > paca_bytes, (path, lora_bytes)
        if name in groups:
            sums = group_sums.setdefault((layer, groups[name]), [0, 0])
            sums[0] += lora_bytes
            sums[1] += paca_bytes
        totals[0] += lora_bytes
        totals[1] += paca_bytes
    for key, (lora_sum, paca_sum) in group_sums.items():
        assert lora_sum > paca_sum, (key, lora_sum, paca_sum)
    assert totals[0] > 2 * totals[1]


def test_summary_activation_bytes_is_sum_of_layers(measured_trace):
    t = measured_trace
    summary = t.summary.set_index("method")
    for method in METHODS:
        forward = _rows(t, method, "forward")
        assert forward["activation_bytes"].sum() == summary.loc[method, "activation_bytes"]
        assert _rows(t, method, "backward")["activation_bytes"].isna().all()
    assert summary.loc["paca", "activation_bytes"] < summary.loc["lora", "activation_bytes"]
    assert summary.loc["paca", "activation_bytes"] < summary.loc["dora", "activation_bytes"]


# --- 4: latencies -------------------------------------------------------------------------------

# No test here asserts a share or a ratio of measured times: on a shared machine those move
# with the load. The share of the step that the decoder layers carry is a benchmark
# (bench/bench_attribution.py). These tests check properties that hold on any load: scopes nest
# on one clock, and every op lies inside the scope it is attributed to.

@pytest.fixture(scope="module")
def one_step_trace(tmp_path_factory):
    """One measured step per method (steps=1: each latency is one interval, not a median)."""
    from conftest import run_spec

    from paca_prof import engines

    spec = run_spec(model="tiny", seq=32, batch=2, dtype="fp32", device="cpu", steps=1,
                   warmup=1, methods=tuple(METHODS))
    return trace.load(engines.run(spec, tmp_path_factory.mktemp("one-step") / "run", "pytest"))


def _timed_children(timed: set[str], parent: str) -> list[str]:
    """The timed modules whose nearest timed ancestor is `parent` (through untimed containers
    such as model.layers, a ModuleList that is never called)."""
    def nearest_timed_ancestor(path: str) -> str:
        parts = path.split(".")
        for end in range(len(parts) - 1, 0, -1):
            if ".".join(parts[:end]) in timed:
                return ".".join(parts[:end])
        return "[root]"

    return [m for m in timed if not m.startswith("[") and nearest_timed_ancestor(m) == parent]


@pytest.mark.parametrize("method", METHODS)
def test_forward_scopes_nest_on_one_clock(one_step_trace, method):
    """In one step, a module's forward interval holds its children's, which run one after
    another: its latency is at least their sum. The model and the loss run one after the other
    inside the forward phase."""
    t = one_step_trace
    forward = _rows(t, method, "forward").dropna(subset=["latency_ms"])
    latency = dict(zip(forward["module"], forward["latency_ms"]))
    checked = 0
    for parent, parent_ms in latency.items():
        children = {c: latency[c] for c in _timed_children(set(latency), parent)}
        if not children:
            continue
        if any(".lora_magnitude_vector" in c for c in children):
            # PEFT's DoRA calls lora_A and lora_B from inside its magnitude module, a sibling:
            # those intervals nest in it, so only each one, not their sum, is bounded.
            assert parent_ms >= max(children.values()), (method, parent)
        else:
            assert parent_ms >= sum(children.values()), (method, parent, parent_ms, children)
        checked += 1
    n_layers = t.run["model"]["config"]["num_hidden_layers"]
    assert checked >= 3 * n_layers + 2, checked  # root, model, each layer, attention and MLP
    summary = t.summary.set_index("method").loc[method]
    assert latency["[root]"] + latency["[loss]"] <= summary["forward_ms"]


@pytest.mark.parametrize("method", METHODS)
def test_decoder_layer_backward_scopes_follow_one_another(one_step_trace, method):
    """Backward runs the layers last to first; each layer's scope ends before the previous one's
    starts, so their backward latencies add up to at most the backward phase."""
    t = one_step_trace
    backward = _rows(t, method, "backward")
    layers = backward[backward["kind"] == "decoder_layer"]
    n_layers = t.run["model"]["config"]["num_hidden_layers"]
    assert len(layers) == n_layers and (layers["latency_ms"] > 0).all()
    assert layers["latency_ms"].sum() <= t.summary.set_index("method").loc[method, "backward_ms"]


def _scope_windows(chrome_trace: dict) -> tuple[float, dict[str, list[tuple[float, float]]]]:
    """The step's start (the first phase range) and every module range of a Chrome trace."""
    events = [e for e in chrome_trace["traceEvents"]
              if e.get("ph") == "X" and e.get("cat") == "user_annotation"]
    start = min(e["ts"] for e in events if e["name"].startswith("phase:"))
    windows: dict[str, list[tuple[float, float]]] = {}
    for e in events:
        windows.setdefault(e["name"], []).append((e["ts"] - start, e["ts"] - start + e["dur"]))
    return start, windows


@pytest.mark.parametrize("method", METHODS)
def test_every_op_lies_inside_the_scope_it_is_attributed_to(measured_trace, method):
    """The op table's module of each op is a range of the profiled step that encloses the op
    (checked against the Chrome trace the same step wrote), for the decoder layers' ops."""
    import json

    t = measured_trace
    _, windows = _scope_windows(json.loads(t.chrome_traces[method].read_text()))
    ops = t.ops[(t.ops["method"] == method) & t.ops["module"].str.startswith("model.layers.")]
    assert len(ops) > 100
    for module, start, dur in zip(ops["module"], ops["start_us"], ops["dur_us"]):
        spans = windows[module]
        assert any(s <= start and start + dur <= e + 1e-3 for s, e in spans), (module, start)
        layer = ".".join(module.split(".")[:3])
        assert any(s <= start and start + dur <= e + 1e-3 for s, e in windows[layer]), module


@pytest.mark.parametrize("method", METHODS)
def test_every_decoder_layer_and_the_loss_have_backward_latency(measured_trace, method):
    """Every decoder layer does backward work under every method (an adapter method's first
    layer computes its adapters' gradients even though its input needs none), and so does the
    loss (the cross-entropy backward over batch x seq x vocab)."""
    t = measured_trace
    n_layers = t.run["model"]["config"]["num_hidden_layers"]
    for module in [f"model.layers.{i}" for i in range(n_layers)] + ["lm_head", "[loss]"]:
        for phase in ("forward", "backward"):
            value = _latency(t, method, module, phase)
            assert value > 0 and math.isfinite(value), (method, module, phase, value)


@pytest.mark.parametrize("method", ["frozen", "full"])
def test_attention_backward_latency_is_measured(measured_trace, method):
    """Under frozen and full every layer's input needs a gradient, so each attention module
    (called with keyword arguments by transformers) has a backward scope that ends."""
    t = measured_trace
    n_layers = t.run["model"]["config"]["num_hidden_layers"]
    for i in range(n_layers):
        for module in (f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"):
            value = _latency(t, method, module, "backward")
            assert value > 0 and math.isfinite(value), (method, module, value)


def test_step_times_are_medians_of_the_steps_table(measured_trace):
    """A format check: each timed step's step_ms is the sum of its phases; the summary's
    step_ms is the median of the method's timed steps, the phase columns the medians of
    theirs, with p25 <= median <= p75. The real checks of the timing pass are the nesting
    tests above."""
    from conftest import MEASURED_RUN

    s = measured_trace.summary.set_index("method")
    steps = measured_trace.steps
    assert (s["status"] == "ok").all()
    assert list(steps.columns) == list(trace.STEP_COLUMNS)  # rank last, 0 in one process
    assert (steps["rank"] == 0).all()
    phases = steps[["forward_ms", "backward_ms", "optimizer_ms"]].sum(axis=1)
    assert (steps["step_ms"] - phases).abs().max() < 1e-9
    for method, rows in steps.groupby("method"):
        row = s.loc[method]
        assert row["forward_ms"] > 0 and row["backward_ms"] > 0
        assert row["steps_timed"] == len(rows) == MEASURED_RUN["steps"]
        assert row["step_ms"] == pytest.approx(rows["step_ms"].median())
        assert row["forward_ms"] == pytest.approx(rows["forward_ms"].median())
        assert row["step_ms_p25"] <= row["step_ms"] <= row["step_ms_p75"]
        assert row["step_ms_p25"] == pytest.approx(rows["step_ms"].quantile(0.25))
        assert row["warmup_steps"] >= MEASURED_RUN["warmup"]


def test_methods_are_timed_in_interleaved_rounds(measured_trace):
    """Every round holds one step of every method (the load falls on all alike), and the
    order within rounds is shuffled: not the same in every round."""
    steps = measured_trace.steps
    per_round = steps.groupby("round")["method"].apply(list)
    assert len(per_round) == steps.groupby("method").size().iloc[0]
    for methods in per_round:
        assert sorted(methods) == sorted(METHODS)
    for method, rows in steps.groupby("method"):
        assert list(rows["step"]) == list(range(len(rows)))
        assert list(rows["round"]) == list(range(len(rows)))


def test_ratio_intervals_hold_the_ratio_and_warnings_are_recorded(measured_trace):
    """The ratio to lora is step_ms over lora's, inside its bootstrap interval; lora's is 1
    exactly; every warning in the summary is in run.yaml's timing record, and the record
    says how the steps were timed."""
    s = measured_trace.summary.set_index("method")
    for method, row in s.iterrows():
        assert row["step_ratio"] == pytest.approx(row["step_ms"] / s.loc["lora", "step_ms"])
        assert row["step_ratio_lo"] <= row["step_ratio"] <= row["step_ratio_hi"]
    assert s.loc["lora", ["step_ratio", "step_ratio_lo", "step_ratio_hi"]].tolist() == [1, 1, 1]
    timing = measured_trace.run["timing"]
    assert timing["threads"] == 1 and timing["rounds"] == len(set(measured_trace.steps["round"]))
    recorded = {m: w for m, w in s["spread_warning"].items() if w}
    assert timing["warnings"] == recorded


def test_throughput_columns(measured_trace):
    """tokens_per_s from the tokens of a step and its median time; achieved TFLOP/s from the
    profiled step's counted FLOPs; no MFU on a CPU without a device spec."""
    t = measured_trace
    tokens = t.run["batch"] * t.run["seq"]
    flops = t.ops.groupby("method")["flops"].sum()
    for _, row in t.summary.iterrows():
        assert row["tokens_per_s"] == pytest.approx(tokens / (row["step_ms"] / 1e3))
        assert row["achieved_tflops"] == pytest.approx(
            flops[row["method"]] / (row["step_ms"] / 1e3) / 1e12)
        assert pd.isna(row["mfu"])


# --- 5: op sequences ----------------------------------------------------------------------------

def test_lora_adds_more_ops_per_linear_than_paca(measured_trace):
    """LoRA runs its branch as separate ops (lora_A, lora_B, scaling, add; in backward their
    GEMMs), PaCA adds one gather in forward and one small GEMM in backward."""
    t = measured_trace
    counts, forward = {}, {}
    for method in ("lora", "paca", "frozen"):
        rows = _rows(t, method)
        rows = rows[rows["phase"].isin(["forward", "backward"])]
        counts[method] = rows.groupby("module")["n_kernels"].sum()
        forward[method] = _rows(t, method, "forward").set_index("module")["n_kernels"]
    for path in _target_paths(t, "lora"):
        assert counts["lora"][path] > counts["paca"][path], path
        # Not at layer 0, whose input gradient frozen computes and adapter methods do not
        # (DESIGN.md); PaCA's column write runs in the optimizer step, outside the layer.
        if not path.startswith("model.layers.0."):
            assert counts["paca"][path] >= counts["frozen"][path], (
                path, counts["lora"][path], counts["paca"][path], counts["frozen"][path])
        # forward scopes nest exactly: at least the gather more than the frozen GEMM
        assert forward["lora"][path] > forward["paca"][path] > forward["frozen"][path], path


def test_summary_op_counts(measured_trace):
    t = measured_trace
    s = t.summary.set_index("method")["n_kernels"]
    for method in METHODS:
        assert s[method] == (t.ops["method"] == method).sum(), method
    assert s["lora"] > s["paca"] > s["frozen"]
    assert s["dora"] > s["lora"]


def test_ops_adapter_branch_rows(measured_trace):
    t = measured_trace
    ops = t.ops
    branch = ops[ops["adapter_branch"]]
    for method in ("frozen", "full"):
        assert not (branch["method"] == method).any(), method

    lora = branch[branch["method"] == "lora"]
    lora_forward_mm = lora[(lora["phase"] == "forward") & (lora["name"] == "aten::mm")]
    for path in _target_paths(t, "lora"):
        for adapter in ("lora_A", "lora_B"):
            mms = lora_forward_mm[_under(lora_forward_mm["module"], f"{path}.{adapter}")]
            assert len(mms) == 1, (path, adapter, len(mms))
    assert (lora["phase"] == "backward").any()

    paca = branch[branch["method"] == "paca"]
    paths = _target_paths(t, "paca")
    gathers = paca[(paca["phase"] == "forward") & (paca["name"] == "aten::index_select")]
    assert sorted(gathers["module"]) == sorted(paths)
    grad_gemms = paca[(paca["phase"] == "backward") & (paca["name"] == "aten::addmm")]
    assert sorted(grad_gemms["module"]) == sorted(paths)  # one grad GEMM per PacaLinear
    assert set(paca["module"]) <= set(paths)


def test_adapter_branch_holds_no_ops_of_the_base_model(measured_trace):
    """The adapter branch is what the method adds (DESIGN.md; lora: dropout, A, B, scaling,
    add; paca: gather, column write, grad GEMM): never the attention, the rotary embedding or
    the norms, which every method runs."""
    ops = measured_trace.ops
    branch = ops[ops["adapter_branch"] & ops["method"].isin(["lora", "paca"])]
    assert len(branch) > 0
    base_ops = branch["name"].str.contains("scaled_dot_product|slice_backward|neg|pow|rsqrt|silu")
    assert not base_ops.any(), branch.loc[base_ops, ["method", "module", "phase", "name"]]


def test_identity_modules_run_no_ops(measured_trace):
    """LoRA's dropout with p = 0 is nn.Identity: it launches nothing, forward or backward."""
    t = measured_trace
    assert t.run["methods"]["lora"]["dropout"] == 0.0
    rows = _rows(t, "lora")
    dropout = rows[rows["module"].str.contains(r"\.lora_dropout")]
    assert len(dropout) > 0
    assert (dropout["n_kernels"] == 0).all(), dropout[dropout["n_kernels"] > 0][
        ["module", "phase", "n_kernels"]]


@pytest.mark.parametrize("method", METHODS)
def test_backward_ops_are_attributed_to_their_module(measured_trace, method):
    """Backward ops land in the module that ran them: the attention backward in self_attn, the
    loss backward in [loss], and every linear (and lm_head) with an input that needs a gradient
    runs at least its input-gradient GEMM in its own backward scope."""
    t = measured_trace
    ops = t.ops[(t.ops["method"] == method) & (t.ops["phase"] == "backward")]
    attention = ops[ops["name"].str.contains("scaled_dot_product")]
    n_layers = t.run["model"]["config"]["num_hidden_layers"]
    assert sorted(attention["module"]) == [f"model.layers.{i}.self_attn" for i in range(n_layers)]
    loss = ops[ops["name"].isin(["aten::nll_loss_backward", "aten::_log_softmax_backward_data"])]
    assert len(loss) >= 2 and (loss["module"] == "[loss]").all(), loss[["module", "name"]]
    backward = _rows(t, method, "backward").set_index("module")["n_kernels"]
    # layer 1's linears all have inputs that need a gradient under every method
    linears = [p for p in _target_paths(t, "lora") if p.startswith(f"model.layers.{n_layers - 1}.")]
    for path in linears + ["lm_head"]:
        assert backward.get(path, 0) >= 1, (method, path)


# --- 6: memory ----------------------------------------------------------------------------------

PEAK_PARTS = [f"peak_{c}_bytes" for c in trace.MEMORY_CATEGORIES]


@pytest.mark.parametrize("method", METHODS)
def test_peak_breakdown_adds_up(measured_trace, method):
    """A format check (the breakdown is by definition the categories alive at the peak); the
    categories' real values are checked below and against simulation in test_simulate.py."""
    row = measured_trace.summary.set_index("method").loc[method]
    parts = {c: int(row[c]) for c in PEAK_PARTS}
    assert all(v >= 0 for v in parts.values()), parts
    assert sum(parts.values()) == row["peak_bytes"]
    assert parts["peak_weights_bytes"] > 0
    assert parts["peak_activations_bytes"] > 0


def _trainable_tensors(method: str) -> int:
    """How many trainable tensors `method` has on the shared run's model (built again)."""
    from conftest import MEASURED_RUN

    from conftest import run_spec

    from paca_prof.engines.step import prepare

    model = prepare(run_spec(device="cpu", **MEASURED_RUN), method, "meta").model
    return sum(1 for p in model.parameters() if p.requires_grad)


def test_memory_categories_per_method(measured_trace):
    t = measured_trace
    s = t.summary.set_index("method")
    assert s.loc["frozen", "peak_optimizer_bytes"] == 0
    assert s.loc["frozen", "peak_trainable_bytes"] == 0
    assert s.loc["frozen", "trainable_params"] == 0
    element = ELEMENT_SIZE[t.run["dtype"]]
    weights = s.loc["frozen", "peak_weights_bytes"]  # every parameter and buffer, frozen
    for method in ("lora", "dora", "paca", "full"):
        trainable_bytes = s.loc[method, "trainable_params"] * element  # fp32 adapters here
        assert s.loc[method, "peak_trainable_bytes"] == trainable_bytes, method
        # AdamW keeps exp_avg and exp_avg_sq per parameter (the parameter's size each) and a
        # 0-dim fp32 `step` tensor per parameter tensor (torch.optim's CPU default)
        expected = 2 * trainable_bytes + 4 * _trainable_tensors(method)
        assert s.loc[method, "peak_optimizer_bytes"] == expected, method
    # the frozen base is what is left: lora and dora add trainable tensors beside it; paca
    # also keeps, per adapted linear, its r column indices (int64) and the original columns
    # (out x r, to unmerge exactly); full trains all of it
    for method in ("lora", "dora"):
        assert s.loc[method, "peak_weights_bytes"] == weights, method
    config, rank = t.run["model"]["config"], t.run["methods"]["paca"]["r"]
    kv = config["num_key_value_heads"] * config["hidden_size"] // config["num_attention_heads"]
    outs = {"q_proj": config["hidden_size"], "k_proj": kv, "v_proj": kv,
            "o_proj": config["hidden_size"], "gate_proj": config["intermediate_size"],
            "up_proj": config["intermediate_size"], "down_proj": config["hidden_size"]}
    paca_buffers = config["num_hidden_layers"] * sum(
        out * rank * element + rank * 8 for out in outs.values())
    assert s.loc["paca", "peak_weights_bytes"] == weights + paca_buffers
    assert s.loc["full", "peak_weights_bytes"] + s.loc["full", "peak_trainable_bytes"] == weights
    assert s.loc["paca", "trainable_params"] < s.loc["lora", "trainable_params"]


def test_memory_timeline(measured_trace):
    t = measured_trace
    memory = t.memory
    assert set(memory["category"]) <= set(trace.MEMORY_CATEGORIES)
    s = t.summary.set_index("method")
    element = ELEMENT_SIZE[t.run["dtype"]]
    for method in METHODS:
        rows = memory[memory["method"] == method]
        start = rows[rows["t"] == 0].groupby("category")["allocated_bytes"].first()
        assert set(start.index) == set(trace.MEMORY_CATEGORIES), method
        assert (rows["allocated_bytes"] >= 0).all(), method
        # the gradients of all trainable parameters are alive together at the step's end
        grads = rows.loc[rows["category"] == "gradients", "allocated_bytes"].max()
        assert grads == s.loc[method, "trainable_params"] * element, method
        # a step in steady state (optimizer state made by the warm-up) returns memory to where
        # it started: every temporary, activation and gradient is freed by its end
        end = rows.groupby("category")["allocated_bytes"].last()
        assert end.sum() == start.sum(), (method, dict(end - start))


# --- 9: a method that runs out of memory --------------------------------------------------------

def _small_spec(methods):
    from conftest import run_spec

    return run_spec(model="tiny", seq=16, batch=1, dtype="fp32", steps=1, warmup=0,
                   methods=tuple(methods))


@pytest.mark.parametrize("error, status", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB"), "oom"),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate "
                  "memory: you tried to allocate 999999999999 bytes"), "oom"),
    (ValueError("something else broke"), "error"),
])
def test_failing_method_is_recorded_and_run_goes_on(tmp_path, monkeypatch, error, status):
    from paca_prof import engines
    from paca_prof.engines import measure

    real = measure.measure_method
    calls = []

    def measure_method(spec, method, workdir, timing=None):
        calls.append(method)
        if method == "lora":
            raise error
        return real(spec, method, workdir, timing=timing)

    monkeypatch.setattr(measure, "measure_method", measure_method)
    out = engines.run(_small_spec(["lora", "paca"]), tmp_path / "run", "pytest")
    assert calls == ["lora", "paca"]  # the run went on after the failure
    t = trace.load(out)
    s = t.summary.set_index("method")
    assert list(s.index) == ["lora", "paca"]
    assert s.loc["lora", "status"] == status
    assert str(error).splitlines()[0][:40] in s.loc["lora", "error"]
    assert pd.isna(s.loc["lora", "step_ms"]) and pd.isna(s.loc["lora", "peak_bytes"])
    assert s.loc["paca", "status"] == "ok" and s.loc["paca", "step_ms"] > 0
    assert set(t.layers["method"]) == {"paca"} and set(t.ops["method"]) == {"paca"}
    assert set(t.chrome_traces) == {"paca"}
    assert list(t.run["methods"]) == ["lora", "paca"]


def test_is_out_of_memory():
    from paca_prof.engines import is_out_of_memory

    assert is_out_of_memory(torch.OutOfMemoryError("x"))
    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("out of memory"))


def test_run_where_every_method_runs_out_of_memory_still_writes_its_trace(tmp_path, monkeypatch):
    """The summary then has no timing or memory column from any method; the trace is still
    written, with status oom for each."""
    from paca_prof import engines
    from paca_prof.engines import measure

    def measure_method(spec, method, workdir, timing=None):
        raise torch.OutOfMemoryError(f"out of memory in {method}")

    monkeypatch.setattr(measure, "measure_method", measure_method)
    out = engines.run(_small_spec(["lora", "paca"]), tmp_path / "run", "pytest")
    t = trace.load(out)
    assert list(t.summary["method"]) == ["lora", "paca"]
    assert list(t.summary["status"]) == ["oom", "oom"]
    assert t.summary["step_ms"].isna().all() and t.summary["peak_bytes"].isna().all()
    assert t.layers.empty and t.ops.empty and t.memory.empty


@pytest.mark.parametrize("method", ["lora", "paca", "full"])
def test_optimizer_ops_belong_to_the_optimizer_scope(measured_trace, method):
    """Every op of the optimizer phase runs in the [optimizer] scope (torch.optim's step
    hooks open it), and the step index of the profiled step is recorded on every op."""
    t = measured_trace
    ops = t.ops[t.ops["method"] == method]
    optimizer = ops[ops["phase"] == "optimizer"]
    assert len(optimizer) > 0 and (optimizer["module"] == "[optimizer]").all()
    rows = _rows(t, method, "optimizer").set_index("module")
    assert rows.loc["[optimizer]", "n_kernels"] == len(optimizer)
    assert ops["step"].nunique() == 1
    # the profiler pass's fresh model runs one untimed step (so that the optimizer has its
    # state), then the profiled one
    assert ops["step"].iloc[0] == 1


# --- timing: interleaving, warm-up, budget, threads, memory fallback ----------------------------

def test_a_time_budget_bounds_the_rounds_and_one_round_always_runs(tmp_path):
    """A budget spent before the rounds (a tiny one) leaves exactly one round, and the
    summary warns that one round gives no interval."""
    from conftest import run_spec

    from paca_prof import engines

    spec = run_spec(model="tiny", seq=16, batch=1, dtype="fp32", steps=50, warmup=1,
                    methods=("lora", "paca"), time_budget_s=1e-6, threads=1)
    t = trace.load(engines.run(spec, tmp_path / "run", "pytest"))
    assert list(t.summary["steps_timed"]) == [1, 1]
    assert t.run["timing"]["rounds"] == 1 and t.run["timing"]["rounds_requested"] == 50
    assert t.run["timing"]["time_budget_s"] == 1e-6
    assert t.run["timing"]["threads"] == 1 and t.run["timing"]["threads_from"] == "--threads"
    for warning in t.summary["spread_warning"]:
        assert "only 1 round" in warning
    assert t.summary["warmup_steps"].tolist() == [1, 1]  # the budget stopped any extension


def test_threads_are_set_for_the_run_and_restored(tmp_path):
    from conftest import run_spec

    from paca_prof import engines

    before = torch.get_num_threads()
    seen = []
    spec = run_spec(model="tiny", seq=16, batch=1, dtype="fp32", steps=1, warmup=0,
                    methods=("lora",), threads=2 if before != 2 else 1)
    engines.run(spec, tmp_path / "run", "pytest",
                progress=lambda m, s: seen.append(torch.get_num_threads()))
    assert set(seen) == {spec.threads}
    assert torch.get_num_threads() == before


def test_warm_up_runs_until_settled_and_is_bounded():
    from paca_prof.engines import measure

    assert measure.settled([10.0, 10.2, 9.9])
    assert not measure.settled([10.0, 20.0, 10.0])
    assert not measure.settled([10.0, 10.0])  # fewer than the window

    class Fake:
        """Stands for a prepared method; its steps are the script below."""

        def stale_counts(self):
            return {}

    # The timing pass with a step that never settles stops after warmup + MAX_SETTLE_STEPS.
    import itertools

    times = itertools.cycle([1.0, 3.0])
    calls = {"n": 0}

    def fake_step(run, ids, clock):
        calls["n"] += 1
        return {("phase:forward", "forward"): next(times)}

    real = measure.timed_step
    measure.timed_step = fake_step
    try:
        outcome = measure.timing_pass({"lora": Fake()}, torch.zeros(1, 1), warmup=2, steps=3)
    finally:
        measure.timed_step = real
    timing = outcome["lora"]
    assert timing.warmup_steps == 2 + measure.MAX_SETTLE_STEPS and not timing.settled
    assert len(timing.per_step) == 3 and calls["n"] == timing.warmup_steps + 3


def test_a_method_out_of_memory_beside_the_others_is_timed_alone(monkeypatch):
    """Preparing dora while lora and paca are held runs out of memory: dora is timed alone
    afterwards (Timing.alone), the others together."""
    from conftest import run_spec

    from paca_prof.engines import measure

    real = measure.prepare
    refused = []

    def prepare(spec, method, device):
        if method == "dora" and not refused:  # the first time: beside lora and paca
            refused.append(method)
            raise torch.OutOfMemoryError("out of memory beside the others")
        return real(spec, method, device)

    monkeypatch.setattr(measure, "prepare", prepare)
    spec = run_spec(model="tiny", seq=16, batch=1, dtype="fp32", steps=2, warmup=0,
                    methods=("lora", "paca", "dora"))
    outcomes = measure.time_methods(spec)
    assert list(outcomes) == ["lora", "paca", "dora"]
    assert all(isinstance(o, measure.Timing) for o in outcomes.values())
    assert outcomes["dora"].alone and not outcomes["lora"].alone
    assert len(outcomes["dora"].per_step) == 2


def test_the_compiled_paca_function_is_built_before_any_timed_step(tmp_path, monkeypatch):
    """engines.run builds (or loads) the compiled PartialConnection before the timing pass
    starts: a first build never lands inside a timed step."""
    import paca.compiled as compiled
    from conftest import run_spec

    from paca_prof import engines
    from paca_prof.engines import measure

    events = []
    real_build, real_step = compiled.ensure_built, measure.timed_step
    monkeypatch.setattr(compiled, "ensure_built",
                        lambda: events.append("build") or real_build())
    monkeypatch.setattr(measure, "timed_step",
                        lambda *args: events.append("step") or real_step(*args))
    spec = run_spec(model="tiny", seq=8, batch=1, dtype="fp32", steps=1, warmup=0,
                    methods=("lora", "paca"))
    engines.run(spec, tmp_path / "run", "pytest")
    assert events[0] == "build" and events.count("step") == 2
