"""paca_prof.profile() over a plain training loop: the trace it writes (the format of
`paca-prof run --device cpu`), the same activation bytes as `paca-prof run` for the same
configuration, training left bit-identical, the schedule, and one clear error per misuse."""

from __future__ import annotations

import re
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import checkout_env
from profile_testing import (ALPHA, BATCH, R, SEQ, adamw, base_model, batches, engine_spec,
                             forward_activation_bytes, no_staging_left, prepared, train)

import paca_prof
from paca_prof import trace
from paca_prof.analyze import TraceAnalysis
from paca_prof.memory import MEMORY_CATEGORIES
from paca_prof.modules import LOSS, OPTIMIZER, ROOT

warnings.filterwarnings("ignore", category=FutureWarning)


@pytest.fixture(scope="module")
def lora_trace(tmp_path_factory):
    """A LoRA loop over padded batches, profiled: warmup 1, active 3, two steps after."""
    out = tmp_path_factory.mktemp("profile") / "lora-loop"
    model = prepared("lora")
    optimizer = adamw(model)
    with paca_prof.profile(model, optimizer, out=out, warmup=1, active=3) as prof:
        train(model, optimizer, batches(6, padded=True), prof)
    assert prof.path == out
    return trace.load(out)


def test_the_trace_is_a_measured_run_of_the_detected_method(lora_trace):
    run, summary = lora_trace.run, lora_trace.summary
    assert run["source"] == "measured"
    assert run["sources"] == {"time": "measured", "bytes": "measured"}
    assert list(summary["method"]) == ["lora"] and summary["status"].iloc[0] == "ok"
    lora = run["methods"]["lora"]
    assert (lora["r"], lora["alpha"], sorted(lora["target_modules"])) == (R, ALPHA,
                                                                          ["q_proj", "v_proj"])
    assert run["profile"] == {"warmup": 1, "active": 3, "timed_steps": 2, "profiled_step": 3,
                              "micro_batches": 1}
    assert (run["seq"], run["batch"], run["dtype"]) == (SEQ, BATCH, "fp32")
    assert run["model"]["config"]["hidden_size"] == 64
    assert run["recipe"]["loss"] == "hf" and run["recipe"]["optimizer"] == "adamw"
    assert set(lora_trace.chrome_traces) == {"lora"}


def test_summary_times_and_bytes(lora_trace):
    row = lora_trace.summary.iloc[0]
    phases = row["forward_ms"] + row["backward_ms"] + row["optimizer_ms"]
    assert row["forward_ms"] > 0 and row["backward_ms"] > 0 and row["optimizer_ms"] > 0
    assert row["step_ms"] == pytest.approx(phases)
    assert row["loop_ms"] > 0  # the whole iteration, its own measurement
    peaks = [row[trace.peak_column(c)] for c in MEMORY_CATEGORIES]
    assert row["peak_bytes"] == sum(peaks)
    assert row["peak_activations_bytes"] > 0 and row["peak_logits_loss_bytes"] > 0
    # A (r x in) and B (out x r) of q_proj (64 -> 64) and v_proj (64 -> 32), in 2 layers
    assert row["trainable_params"] == 2 * R * ((64 + 64) + (64 + 32))
    assert row["n_kernels"] == len(lora_trace.ops)


def test_layers_are_named_by_the_base_models_paths_with_root_loss_and_optimizer(lora_trace):
    modules = set(lora_trace.layers["module"])
    assert {ROOT, LOSS, OPTIMIZER, "model.layers.0.self_attn.q_proj.lora_A.default"} <= modules
    assert not any(m.startswith("base_model") for m in modules)
    latency = lora_trace.layers.set_index(["module", "phase"])["latency_ms"]
    for key in [("model.layers.0", "forward"), ("model.layers.1", "backward"),
                (LOSS, "forward"), (OPTIMIZER, "optimizer")]:
        assert latency[key] > 0, key


def test_ops_flag_loras_branch(lora_trace):
    ops = lora_trace.ops
    branch = ops[ops["adapter_branch"]]
    assert len(branch) > 0 and set(ops["phase"]) == {"forward", "backward", "optimizer"}
    assert branch["module"].str.contains(r"\.(q|v)_proj").all()
    assert not ops.loc[ops["module"].str.endswith("base_layer"), "adapter_branch"].any()
    assert (ops["step"] == 3).all() and list(ops["seq_no"]) == list(range(len(ops)))


def test_batches_record_shapes_and_padding(lora_trace):
    table = lora_trace.batches
    assert list(table["step"]) == [1, 2, 3] and list(table["pass"]) == ["timed", "timed",
                                                                       "profiled"]
    assert (table["batch"] == BATCH).all() and (table["seq"] == SEQ).all()
    # batches() pads the second row of batch i with i % 4 + 1 positions
    assert list(table["padding_tokens"]) == [2, 3, 4]
    assert list(table["padding_fraction"]) == pytest.approx([n / (BATCH * SEQ)
                                                             for n in (2, 3, 4)])
    described = lora_trace.run["batches"]
    assert described["padding_from"] == "attention_mask == 0"
    assert described["padding_fraction"] == pytest.approx(9 / (3 * BATCH * SEQ))
    assert described["shapes"] == [{"batch": BATCH, "seq": SEQ, "micro_batches": 3}]
    assert described["packed"] is False


def test_analyze_reads_the_trace(lora_trace, tmp_path):
    analysis = TraceAnalysis(lora_trace.path)
    assert list(analysis.summary()["method"]) == ["lora"]
    assert analysis.adapter_overhead()["adapter_ops"].iloc[0] > 0
    assert set(analysis.peak_breakdown()["category"]) == set(MEMORY_CATEGORIES)
    assert len(analysis.layer_latency(top_k=3)) == 3
    assert analysis.memory_timeline("lora")["total"].max() == lora_trace.summary[
        "peak_bytes"].iloc[0]
    shapes = analysis.batch_shapes()
    assert list(shapes["micro_batches"]) == [3] and shapes["padding_tokens"].iloc[0] == 9
    totals = analysis.activation_totals().iloc[0]  # no frozen run: no floor, not a floor of 0
    assert totals["bytes"] == lora_trace.summary["activation_bytes"].iloc[0]
    assert totals["floor_bytes"] != totals["floor_bytes"]
    assert totals["added_bytes"] != totals["added_bytes"]
    done = subprocess.run([sys.executable, "-m", "paca_prof.cli", "analyze",
                           str(lora_trace.path)], capture_output=True, text=True,
                          env=checkout_env(), cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "batches the model saw" in done.stdout and "lora" in done.stdout
    # numbers a profile() trace lacks (tokens/s, the frozen floor) print as "-", never nan
    assert not re.search(r"\bnan\b", done.stdout, re.IGNORECASE), done.stdout
    floor = done.stdout.split("what each method adds\n")[1].splitlines()[1].split()
    assert floor[0] == "lora" and floor[2:] == ["-", "-"], floor


def test_gradient_accumulation_counts_micro_batches(tmp_path):
    model = prepared("lora")
    optimizer = adamw(model)
    data = batches(8, padded=True)
    with paca_prof.profile(model, optimizer, out=tmp_path / "t", warmup=1, active=2) as prof:
        for step in range(4):
            for batch in data[2 * step:2 * step + 2]:
                (model(**batch).loss / 2).backward()
            optimizer.step()
            optimizer.zero_grad()
            prof.step()
    loaded = trace.load(tmp_path / "t")
    assert loaded.run["recipe"]["grad_accum"] == 2
    assert list(loaded.batches["micro_batch"]) == [0, 1, 0, 1]
    assert list(loaded.batches["step"]) == [1, 1, 2, 2]
    ops = loaded.ops
    # each micro-batch's forward and backward are in the op table: twice the ops of one
    per_layer = ops[(ops["module"] == "model.layers.0.mlp.up_proj") & (ops["phase"] == "forward")]
    assert len(per_layer) == 2


def test_every_micro_batchs_saved_tensors_are_activations(tmp_path):
    """The first micro-batch is the longest, so the step's peak is in it: its saved tensors
    must be activations there, though the ledger's per-module bytes are the last's."""
    model = prepared("lora")
    optimizer = adamw(model)
    ids = torch.randint(0, 256, (BATCH, 64), generator=torch.Generator().manual_seed(0))
    with paca_prof.profile(model, optimizer, out=tmp_path / "t", warmup=1, active=2) as prof:
        for _ in range(3):
            for seq in (64, 8):
                loss = model(input_ids=ids[:, :seq], labels=ids[:, :seq]).loss
                loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            prof.step()
    row = trace.load(tmp_path / "t").summary.iloc[0]
    assert row["peak_activations_bytes"] > 4 * row["activation_bytes"]  # 64 vs 8 tokens
    assert row["peak_rest_bytes"] < 0.02 * row["peak_bytes"]


@pytest.mark.parametrize("method", ["lora", "dora", "paca", "full"])
def test_activation_bytes_equal_those_of_paca_prof_run(tmp_path, method):
    """The same model, shape, dtype and method settings: `paca-prof run --device cpu` and
    profile() over a user's loop save the same bytes in every module, loss included."""
    from paca_prof import engines

    engines.run(engine_spec(method), tmp_path / "run", "pytest")
    model = prepared(method)
    optimizer = adamw(model)
    with paca_prof.profile(model, optimizer, out=tmp_path / "profile", warmup=1,
                           active=2) as prof:
        train(model, optimizer, batches(3), prof)
    ran, profiled = trace.load(tmp_path / "run"), trace.load(tmp_path / "profile")
    assert profiled.summary["method"].iloc[0] == method
    assert forward_activation_bytes(profiled.layers) == forward_activation_bytes(ran.layers)
    for column in ("activation_bytes", "peak_bytes", "trainable_params", "n_kernels"):
        assert profiled.summary[column].iloc[0] == ran.summary[column].iloc[0], column


def _trained(optimizer_name: str, profiled: bool, tmp_path) -> dict[str, torch.Tensor]:
    model = prepared("lora", seed=1, dropout=0.1)  # dropout draws random numbers
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = (torch.optim.SGD(params, lr=0.1, momentum=0.9) if optimizer_name == "sgd"
                 else torch.optim.AdamW(params, lr=1e-2))
    torch.manual_seed(123)
    data = batches(6, padded=True, seed=5)
    if profiled:
        with paca_prof.profile(model, optimizer, out=tmp_path / optimizer_name, warmup=1,
                               active=3) as prof:
            train(model, optimizer, data, prof)
    else:
        train(model, optimizer, data)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("optimizer_name", ["sgd", "adamw"])
def test_training_is_bit_identical_with_and_without_the_profiler(tmp_path, optimizer_name):
    plain = _trained(optimizer_name, False, tmp_path)
    profiled = _trained(optimizer_name, True, tmp_path)
    assert plain.keys() == profiled.keys()
    changed = [n for n in plain if not torch.equal(plain[n], profiled[n])]
    assert changed == []
    base = prepared("lora", seed=1, dropout=0.1)  # and training did change the adapter
    assert not torch.equal(dict(base.named_parameters())[
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"],
        plain["base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"])


def _all_hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_nothing_runs_outside_the_active_steps_and_the_model_is_left_as_it_was(tmp_path):
    model = prepared("lora")
    optimizer = adamw(model)
    data = batches(6)
    hooks = _all_hooks(model)
    with paca_prof.profile(model, optimizer, out=tmp_path / "t", warmup=2, active=2) as prof:
        for i, batch in enumerate(data):
            active = 2 <= i < 4
            assert (_all_hooks(model) > hooks) == active, i
            assert ("_loss_function" in model.get_base_model().__dict__) == active, i
            train(model, optimizer, [batch], prof)
        assert prof.path is not None  # written when the profiled step ended
    assert _all_hooks(model) == hooks
    assert "_loss_function" not in model.get_base_model().__dict__


def test_a_loss_outside_the_model_is_the_roots(tmp_path):
    model = base_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loss_fn = torch.nn.CrossEntropyLoss()
    with paca_prof.profile(model, optimizer, out=tmp_path / "t", warmup=0, active=2) as prof:
        for batch in batches(2):
            logits = model(input_ids=batch["input_ids"]).logits
            loss_fn(logits.flatten(0, 1), batch["labels"].flatten()).backward()
            optimizer.step()
            optimizer.zero_grad()
            prof.step()
    loaded = trace.load(tmp_path / "t")
    assert loaded.summary["method"].iloc[0] == "full"
    assert loaded.run["recipe"]["loss"] == "the loop's own"
    assert loaded.run["batches"]["padding_from"].startswith("not found")
    assert LOSS not in set(loaded.layers["module"])


def test_custom_method_lists_its_trainable_modules(tmp_path):
    model = base_model()
    for name, param in model.named_parameters():
        param.requires_grad_("norm" in name)
    optimizer = adamw(model)
    with paca_prof.profile(model, optimizer, out=tmp_path / "t", warmup=0, active=2) as prof:
        train(model, optimizer, batches(2), prof)
    loaded = trace.load(tmp_path / "t")
    assert loaded.summary["method"].iloc[0] == "custom"
    described = loaded.run["methods"]["custom"]
    assert described["trainable_modules"] == [
        "model.layers.0.input_layernorm", "model.layers.0.post_attention_layernorm",
        "model.layers.1.input_layernorm", "model.layers.1.post_attention_layernorm",
        "model.norm"]
    assert not loaded.ops["adapter_branch"].any()


# --- misuse: one clear error each -----------------------------------------------------------

def test_step_outside_the_block(tmp_path):
    model = prepared("lora")
    prof = paca_prof.profile(model, adamw(model), out=tmp_path / "t")
    with pytest.raises(RuntimeError, match="outside its `with paca_prof.profile"):
        prof.step()
    with pytest.raises(RuntimeError, match="no step was taken"):
        with prof:
            pass
    with pytest.raises(RuntimeError, match="outside its `with paca_prof.profile"):
        prof.step()
    with pytest.raises(RuntimeError, match="runs once"):
        prof.__enter__()


def test_an_existing_out_is_refused_before_any_step(tmp_path):
    (tmp_path / "t").mkdir()
    model = prepared("lora")
    ran = []
    with pytest.raises(ValueError, match="already exists"):
        with paca_prof.profile(model, adamw(model), out=tmp_path / "t"):
            ran.append(True)
    assert ran == [] and list((tmp_path / "t").iterdir()) == []


def test_no_step_taken_writes_nothing(tmp_path):
    model = prepared("lora")
    with pytest.raises(RuntimeError, match=r"^profile\(\): no step was taken .*nothing was "
                                           r"written$"):
        with paca_prof.profile(model, adamw(model), out=tmp_path / "t"):
            model(**batches(1)[0])
    assert not (tmp_path / "t").exists() and no_staging_left(tmp_path / "t")


def test_too_few_steps_write_nothing(tmp_path):
    model = prepared("lora")
    optimizer = adamw(model)
    with pytest.raises(RuntimeError, match="took 2 step.*fewer than warmup 1 \\+ active 3"):
        with paca_prof.profile(model, optimizer, out=tmp_path / "t", warmup=1,
                               active=3) as prof:
            train(model, optimizer, batches(2), prof)
    assert not (tmp_path / "t").exists() and no_staging_left(tmp_path / "t")
    assert _all_hooks(model) == _all_hooks(prepared("lora"))


def test_an_error_in_the_loop_propagates_and_writes_nothing(tmp_path):
    model = prepared("lora")
    optimizer = adamw(model)
    with pytest.raises(ZeroDivisionError):
        with paca_prof.profile(model, optimizer, out=tmp_path / "t", warmup=1,
                               active=3) as prof:
            train(model, optimizer, batches(2), prof)  # in the timed steps now
            1 / 0
    assert not (tmp_path / "t").exists() and no_staging_left(tmp_path / "t")
    assert _all_hooks(model) == _all_hooks(prepared("lora"))


@pytest.mark.parametrize("kwargs, message", [
    (dict(warmup=-1), "warmup must be at least 0"),
    (dict(active=1), "active must be at least 2"),
    (dict(active=2.5), "active must be a whole number"),
    (dict(name=3), "name must be a string"),
    (dict(out=None), "out must be a folder path"),
])
def test_bad_arguments(tmp_path, kwargs, message):
    model = prepared("lora")
    arguments = {"out": tmp_path / "t", **kwargs}
    with pytest.raises(ValueError, match=message):
        paca_prof.profile(model, adamw(model), **arguments)


def test_a_model_and_an_optimizer_are_checked(tmp_path):
    with pytest.raises(ValueError, match="an nn.Module"):
        paca_prof.profile("model", out=tmp_path / "t")
    with pytest.raises(ValueError, match="torch.optim.Optimizer"):
        paca_prof.profile(prepared("lora"), object(), out=tmp_path / "t")


def test_import_stays_light():
    done = subprocess.run([sys.executable, "-c", "import sys, paca_prof; "
                           "assert 'torch' not in sys.modules; "
                           "print(sorted(n for n in dir(paca_prof) if not n.startswith('_')))"],
                          capture_output=True, text=True, env=checkout_env(), timeout=60)
    assert done.returncode == 0, done.stderr
    assert "'profile'" in done.stdout and "'simulate'" in done.stdout
