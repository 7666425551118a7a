"""From a user's setup to a simulation: `paca-prof run --peft-config`, paca_prof.simulate(),
and `paca-prof compare` (measured against simulated, per module and memory category)."""

from __future__ import annotations

import json
import os
import warnings

import pytest
from conftest import tiny_llama_config
from profile_testing import BATCH, SEQ, adamw, base_model, batches, prepared, train
from test_torch_free import run_without_torch

import paca_prof
from paca_prof import trace
from paca_prof.analyze import TraceAnalysis, figures
from paca_prof.cli import main
from paca_prof.memory import MEMORY_CATEGORIES

warnings.filterwarnings("ignore", category=FutureWarning)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    tiny_llama_config().save_pretrained(folder)
    return folder


def adapter(tmp_path, **fields):
    """An adapter_config.json as PEFT's save_pretrained writes it."""
    from peft import LoraConfig

    folder = tmp_path / f"adapter-{len(list(tmp_path.iterdir()))}"
    LoraConfig(**fields).save_pretrained(folder)
    return folder / "adapter_config.json"


def peft_trainable(**fields) -> int:
    """Trainable parameters PEFT itself gives the tiny model under this config."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(base_model(), LoraConfig(**fields))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def run_cli(argv, capsys):
    status = main(argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.mark.parametrize("fields", [
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    dict(r=2, lora_alpha=4, target_modules=r".*\.mlp\.(up|down)_proj"),  # a regex
    dict(r=4, target_modules="all-linear", rank_pattern={"o_proj": 8},
         alpha_pattern={"o_proj": 32}),
    dict(r=4, target_modules=["q_proj", "k_proj"], use_dora=True, lora_dropout=0.1),
], ids=["names", "regex", "all-linear-rank-pattern", "dora"])
def test_run_peft_config_simulates_exactly_that_adapter(tmp_path, capsys, model_dir, fields):
    path = adapter(tmp_path, **fields)
    out = tmp_path / "sim"
    status, _, err = run_cli(["run", "--model", str(model_dir), "--seq", "32", "--device",
                              "meta", "--peft-config", str(path), "--out", str(out)], capsys)
    assert status == 0, err
    loaded = trace.load(out)
    method = "dora" if fields.get("use_dora") else "lora"
    assert list(loaded.summary["method"]) == [method]
    assert loaded.summary["trainable_params"].iloc[0] == peft_trainable(**fields)
    described = loaded.run["methods"][method]
    assert described["r"] == fields["r"] and described["peft_config"]["inference_mode"] is False
    assert described["rank_pattern"] == fields.get("rank_pattern", {})
    if "rank_pattern" in fields:  # o_proj's rank 8 shows in its A's shape
        ops = loaded.ops
        a = ops[ops["module"] == "model.layers.0.self_attn.o_proj.lora_A.default"]
        assert any(json.loads(s)[1] == [8, 64] for s in a["shapes"])


def test_run_peft_config_measured_on_the_cpu(tmp_path, capsys, model_dir):
    fields = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    path = adapter(tmp_path, **fields)
    status, out, err = run_cli(["run", "--model", str(model_dir), "--seq", "16", "--device",
                                "cpu", "--steps", "1", "--warmup", "0", "--peft-config",
                                str(path), "--out", str(tmp_path / "m"), "--json"], capsys)
    assert status == 0, err
    assert json.loads(out)["methods"]["lora"]["trainable_params"] == peft_trainable(**fields)


def test_plan_peft_config_plans_exactly_that_adapter(tmp_path, capsys, model_dir):
    """`plan --peft-config`: the adapter the user trains (here q,v only at r 4), planned; its
    longest sequence is that of the same adapter given as flags."""
    path = adapter(tmp_path, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    common = ["plan", "--model", str(model_dir), "--memory", "64MiB", "--headroom", "0",
              "--granularity", "16", "--json"]
    status, out, err = run_cli([*common, "--peft-config", str(path)], capsys)
    assert status == 0, err
    planned = json.loads(out)
    assert list(planned["methods"]) == ["lora"]  # the config's own method
    status, out, err = run_cli([*common, "--methods", "lora", "--r", "4", "--alpha", "8",
                                "--targets", "q_proj,v_proj"], capsys)
    assert status == 0, err
    by_flags = json.loads(out)
    assert planned["methods"]["lora"]["max_seq"] == by_flags["methods"]["lora"]["max_seq"] > 0
    # with all seven projections adapted, no more fits: the config was not ignored
    status, out, err = run_cli([*common, "--methods", "lora", "--r", "4"], capsys)
    assert json.loads(out)["methods"]["lora"]["max_seq"] <= planned["methods"]["lora"]["max_seq"]


@pytest.mark.parametrize("content, message", [
    ("{not json", "not JSON"),
    ("[1, 2]", "a JSON list, not an object"),
    ('{"r": 4, "colour": "red"}', "unknown field\\(s\\) colour"),
    ('{"peft_type": "IA3"}', "peft_type 'IA3'; only LoRA"),
    ('{"r": 0}', "r must be at least 1"),
    ('{"r": "8"}', "r must be a number"),
    ('{"lora_dropout": 1.5}', "lora_dropout must be in"),
    ('{"target_modules": "(unclosed"}', "is not a regular expression"),
    ('{"target_modules": [1, 2]}', "target_modules entry must be a string"),
    ('{"rank_pattern": {"q_proj": -1}}', "must be at least 1"),
    ('{"megatron_config": {"a": 1}, "megatron_core": "os"}', "megatron_config is not supported"),
    ('{"target_modules": ["no_such_linear"]}', "does not apply to this model"),
    ('{"r": 4, "use_dora": "yes"}', "use_dora must be true or false"),
    # regexes that backtrack without end in Python's re (PEFT's matcher): refused in 5 s
    ('{"target_modules": "(.|.)*X"}', "target_modules regex .* did not finish matching"),
    ('{"target_modules": ".*q_proj", "rank_pattern": {"(.|.)*X": 4}}',
     "rank_pattern regex .* did not finish matching"),
    ('{"target_modules": ["q_proj", "v_proj"], "target_parameters": ["mlp.experts.w"]}',
     "no parameter was matched"),
])
def test_hostile_peft_configs_get_one_line(tmp_path, capsys, model_dir, content, message):
    path = tmp_path / "adapter_config.json"
    path.write_text(content)
    status, _, err = run_cli(["run", "--model", str(model_dir), "--seq", "8", "--device",
                              "meta", "--peft-config", str(path), "--out",
                              str(tmp_path / "x")], capsys)
    assert status == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert __import__("re").search(message, err), err
    assert not (tmp_path / "x").exists()


def test_peft_config_files_that_are_no_files(tmp_path, capsys, model_dir):
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    big = tmp_path / "big.json"
    big.write_text(" " * (2**20 + 10))
    empty_folder = tmp_path / "folder"
    empty_folder.mkdir()
    for path, message in ((fifo, "not a regular file"), (big, "larger than"),
                          (empty_folder, "does not exist"), (tmp_path / "nope", "does not exist")):
        status, _, err = run_cli(["run", "--model", str(model_dir), "--seq", "8", "--device",
                                  "meta", "--peft-config", str(path)], capsys)
        assert status == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_a_dora_config_is_not_lora(tmp_path, capsys, model_dir):
    path = adapter(tmp_path, r=4, target_modules=["q_proj"], use_dora=True)
    status, _, err = run_cli(["run", "--model", str(model_dir), "--seq", "8", "--device",
                              "meta", "--methods", "lora", "--peft-config", str(path)], capsys)
    assert status == 2 and "a dora config" in err
    status, _, err = run_cli(["run", "--model", str(model_dir), "--seq", "8", "--device",
                              "meta", "--methods", "dora,paca", "--peft-config", str(path),
                              "--out", str(tmp_path / "both")], capsys)
    assert status == 0, err  # the other methods keep --r and the recipe's targets
    assert trace.load(tmp_path / "both").methods == ["dora", "paca"]


# --- paca_prof.simulate() --------------------------------------------------------------------

def test_simulate_is_the_same_run_as_the_cli(tmp_path, capsys, model_dir):
    from peft import LoraConfig

    config = LoraConfig(r=4, lora_alpha=8, target_modules=r".*\.(q|v)_proj")
    path = adapter(tmp_path, r=4, lora_alpha=8, target_modules=r".*\.(q|v)_proj")
    status, _, err = run_cli(["run", "--model", str(model_dir), "--seq", "64", "--batch", "2",
                              "--device", "meta", "--grad-ckpt", "--peft-config", str(path),
                              "--out", str(tmp_path / "cli")], capsys)
    assert status == 0, err
    cli = trace.load(tmp_path / "cli").summary.iloc[0]
    for given in (config, config.to_dict(), path):  # a LoraConfig, its fields, its file
        analysis = paca_prof.simulate(tiny_llama_config(), given, seq=64, batch=2,
                                      grad_ckpt=True, out=tmp_path / f"api-{id(given)}")
        assert isinstance(analysis, TraceAnalysis)
        row = analysis.trace.summary.iloc[0]
        assert analysis.sources == {"time": "projected", "bytes": "simulated",
                                    "reserved": "simulated"}
        for column in ("peak_bytes", "activation_bytes", "reserved_bytes", "trainable_params",
                       "n_kernels"):
            assert row[column] == cli[column], column
        assert analysis.trace.run["recipe"]["grad_ckpt"] is True


def test_simulate_plans_a_bigger_setup(tmp_path):
    small = paca_prof.simulate(tiny_llama_config(), {"r": 4, "target_modules": ["q_proj"]},
                               seq=64, gpu=None, out=tmp_path / "small")
    big = paca_prof.simulate(tiny_llama_config(), {"r": 4, "target_modules": ["q_proj"]},
                             seq=256, batch=4, gpu="h100-80gb", out=tmp_path / "big")
    assert small.sources["time"] is None and small.trace.summary["step_ms"].isna().all()
    assert big.trace.run["gpu"]["name"] and big.trace.summary["step_ms"].iloc[0] > 0
    assert (big.trace.summary["activation_bytes"].iloc[0]
            > 4 * small.trace.summary["activation_bytes"].iloc[0])


def test_simulate_refuses_what_run_refuses(tmp_path):
    with pytest.raises(ValueError, match="unknown recipe field\\(s\\) colour"):
        paca_prof.simulate(tiny_llama_config(), seq=8, colour="red")
    with pytest.raises(ValueError, match="only LoRA"):
        from peft import IA3Config

        paca_prof.simulate(tiny_llama_config(), IA3Config(), seq=8)
    with pytest.raises(ValueError, match="--seq must be at least 1"):
        paca_prof.simulate(tiny_llama_config(), seq=0)
    with pytest.raises(ValueError, match="not a causal language model"):
        paca_prof.simulate({"model_type": "vit"}, seq=8)


# --- paca-prof compare -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def measured_and_simulated(tmp_path_factory):
    """A profiled LoRA loop, and the simulation of its setup from its own config objects."""
    tmp = tmp_path_factory.mktemp("compare")
    model = prepared("lora")
    optimizer = adamw(model)
    with paca_prof.profile(model, optimizer, out=tmp / "measured", warmup=1, active=2) as prof:
        train(model, optimizer, batches(3), prof)
    paca_prof.simulate(model.config, model.peft_config["default"], seq=SEQ, batch=BATCH,
                       dtype="fp32", gpu=None, out=tmp / "simulated")
    return tmp / "measured", tmp / "simulated"


def test_compare_analyses(measured_and_simulated):
    measured, simulated = (TraceAnalysis(p) for p in measured_and_simulated)
    totals = measured.compare_totals(simulated).set_index("quantity")
    assert totals.loc["trainable_params", "diff"] == 0
    peak = measured.compare_peak(simulated).set_index("category")
    assert list(peak.index) == [*MEMORY_CATEGORIES, "total"]
    for category in ("weights", "trainable", "optimizer"):  # what simulation knows exactly
        assert peak.loc[category, "diff_bytes"] == 0, category
    assert peak.loc["total", "measured_bytes"] == measured.trace.summary["peak_bytes"].iloc[0]
    modules = measured.compare_activations(simulated)
    assert modules["diff_bytes"].abs().is_monotonic_decreasing
    mlp = modules.set_index("module").loc["model.layers.0.mlp.act_fn"]
    assert mlp["diff_bytes"] == 0  # the same tensors saved on both sides
    measured_total = modules["measured_bytes"].sum()
    assert measured_total == measured.trace.summary["activation_bytes"].iloc[0]


def test_compare_cli(measured_and_simulated, capsys):
    status, out, err = run_cli(["compare", *map(str, measured_and_simulated)], capsys)
    assert status == 0, err
    assert "memory at the peak, by category" in out and "activation bytes per module, lora" in out
    assert "modules agree exactly" in out
    status, out, _ = run_cli(["compare", *map(str, measured_and_simulated), "--json"], capsys)
    payload = json.loads(out)
    assert set(payload) == {"measured", "simulated", "totals", "peak", "activations"}
    assert {r["category"] for r in payload["peak"]} == {*MEMORY_CATEGORIES, "total"}


def test_compare_refuses_what_is_not_comparable(measured_and_simulated, tmp_path, capsys):
    measured, simulated = map(str, measured_and_simulated)
    other = paca_prof.simulate(tiny_llama_config(), {"r": 4, "target_modules": ["q_proj"]},
                               seq=SEQ * 2, batch=BATCH, dtype="fp32", gpu=None,
                               out=tmp_path / "longer")
    for argv, message in (([measured, measured], "second trace must have simulated bytes"),
                          ([simulated, simulated], "first trace must have measured bytes"),
                          ([measured, str(other.trace.path)], "differ in seq"),
                          ([measured, simulated, "--methods", "paca"], "not ok in both"),
                          ([measured, str(tmp_path / "none")], "no such trace folder")):
        status, _, err = run_cli(["compare", *argv], capsys)
        assert status == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_compare_runs_without_torch(measured_and_simulated, tmp_path):
    measured, simulated = map(str, measured_and_simulated)
    done = run_without_torch(f"""
        import sys
        from paca_prof.cli import main
        from paca_prof.analyze import TraceAnalysis
        a, b = TraceAnalysis({measured!r}), TraceAnalysis({simulated!r})
        assert len(a.compare_peak(b)) == 8 and a.batch_shapes() is not None
        sys.exit(main(["compare", {measured!r}, {simulated!r}]))
    """, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "activation bytes per module" in done.stdout


def test_compare_figures(measured_and_simulated):
    measured, simulated = (TraceAnalysis(p) for p in measured_and_simulated)
    peak = figures.compare_peak_bars(measured.compare_peak(simulated), "lora")
    assert [bar.name for bar in peak.data] == ["measured", "simulated"]
    assert list(peak.data[0].x) == list(MEMORY_CATEGORIES)
    table = measured.compare_activations(simulated)
    bars = figures.compare_activation_bars(table, "lora", top=5)
    disagreeing = table[(table["method"] == "lora") & (table["diff_bytes"] != 0)]
    assert list(bars.data[0].y) == list(disagreeing["module"].head(5))


def test_the_dashboard_reads_a_profiled_trace(measured_and_simulated, tmp_path):
    """Every view of the dashboard over a profile() trace, and the compare view of it against
    its simulation, driven over HTTP as the browser drives them: no alert, the trace's own
    numbers shown."""
    import shutil

    from test_dashboard import Served
    from test_dashboard_http import (alert_text, assert_clean, message_area, post,
                                     request_body)

    root = tmp_path / "traces"
    for path, name in zip(measured_and_simulated, ("mine", "mine-simulated")):
        shutil.copytree(path, root / name)
    measured = TraceAnalysis(root / "mine")
    inputs = {"run__value": "mine", "compare-run__value": "mine-simulated",
              "methods__value": ["lora"], "timeline-layer__value": "model.layers.0",
              "timeline-method__value": "lora", "memory-method__value": "lora",
              "compare-method__value": "lora"}
    served = Served(root)
    try:
        replies = {}
        for callback in ("list_runs", "pick_run", "overview", "latency", "timeline",
                         "activations", "memory", "compare", "compare_bytes"):
            reply = post(served, request_body(callback, **inputs))
            assert_clean(reply)
            assert reply.status_code == 200, callback
            assert alert_text(message_area(reply, callback)) is None, callback
            replies[callback] = reply.text
    finally:
        served.close()
    assert '"mine"' in replies["list_runs"] and '"mine-simulated"' in replies["list_runs"]
    row = measured.trace.summary.iloc[0]
    totals = measured.compare_totals(TraceAnalysis(root / "mine-simulated")).set_index(
        "quantity")
    assert f'"{int(row["activation_bytes"]):,}"' in replies["compare_bytes"]
    assert f'"{int(totals.loc["activation_bytes", "simulated"]):,}"' in replies["compare_bytes"]
    assert "model.layers.0" in replies["timeline"] and "lora" in replies["overview"]
