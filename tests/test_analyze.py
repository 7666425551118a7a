"""The analyzer: TraceAnalysis over measured and simulated traces, figures, the analyze command."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import yaml

from paca_prof import engines, trace
from paca_prof.analyze import TraceAnalysis, analyses, figures
from paca_prof.analyze.report import write_html
from paca_prof.cli import main
from conftest import run_spec as RunSpec
from paca_prof.gpus import gpu_spec

SIM = dict(model="tiny", seq=64, batch=2, dtype="bf16", device="meta", attention="flash")


@pytest.fixture(scope="module")
def simulated_path(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim") / "tiny-sim"
    return engines.run(RunSpec(**SIM), out, "pytest", gpu=gpu_spec("a100-80gb"))


@pytest.fixture(scope="module")
def measured(measured_trace_path):
    return TraceAnalysis(measured_trace_path)


@pytest.fixture(scope="module")
def simulated(simulated_path):
    return TraceAnalysis(simulated_path)


def test_adapter_overhead_counts_branch_ops_per_method(measured, simulated):
    for analysis in (measured, simulated):
        table = analysis.adapter_overhead().set_index("method")
        assert table.loc["frozen", "adapter_ops"] == 0 and table.loc["full", "adapter_ops"] == 0
        assert table.loc["lora", "adapter_ops"] > table.loc["paca", "adapter_ops"] > 0
        assert table.loc["dora", "adapter_ops"] > table.loc["lora", "adapter_ops"]
        # A share of the step is structurally within (0, 1); which method's share is larger
        # is compared on the projection only: on a measured run it is a ratio of wall-clock
        # times, which a loaded machine moves (bench/ measures such figures with intervals).
        assert 0 < table.loc["paca", "adapter_share"] < 1
        assert 0 < table.loc["lora", "adapter_share"] < 1
        if analysis is simulated:
            assert table.loc["paca", "adapter_share"] < table.loc["lora", "adapter_share"]
        assert table.loc["paca", "step_vs_paca"] == pytest.approx(1.0)
        assert table.loc["frozen", "step_vs_frozen"] == pytest.approx(1.0)
    by_layer = simulated.adapter_overhead_by_layer(["lora", "paca"])
    layers = simulated.trace.run["model"]["config"]["num_hidden_layers"]
    assert set(by_layer["layer"]) == {f"model.layers.{i}" for i in range(layers)}


def test_activation_savings_split_into_floor_and_added(measured):
    savings = measured.activation_savings()
    run = measured.trace.run
    per_linear = run["batch"] * run["seq"] * run["settings"]["r"] * 4  # fp32
    paca = savings[(savings["method"] == "paca") & savings["module"].str.endswith("q_proj")]
    layers = run["model"]["config"]["num_hidden_layers"]
    assert len(paca) == layers and (paca["added_bytes"] == per_linear).all()
    assert (paca["floor_bytes"] == 0).all()  # a frozen linear saves nothing
    lora = savings[(savings["method"] == "lora") & savings["module"].str.endswith("q_proj")]
    assert (lora["added_bytes"] > paca["added_bytes"].to_numpy()).all()
    totals = measured.activation_totals().set_index("method")
    summary = measured.trace.summary.set_index("method")
    for method in totals.index:
        assert totals.loc[method, "bytes"] == summary.loc[method, "activation_bytes"]
    assert totals.loc["lora", "paca_saves_bytes"] > 0 and totals.loc["full", "paca_saves_bytes"] > 0


def test_peak_breakdown_and_timeline_agree_with_the_peak(measured, simulated):
    for analysis in (measured, simulated):
        breakdown = analysis.peak_breakdown()
        summary = analysis.trace.summary.set_index("method")
        for method, group in breakdown.groupby("method"):
            assert group["bytes"].sum() == summary.loc[method, "peak_bytes"]
            timeline = analysis.memory_timeline(method)
            assert timeline["total"].max() == summary.loc[method, "peak_bytes"]


def test_layer_latency_top_k_is_sorted_and_excludes_containers(measured):
    top = measured.layer_latency(phase="forward", top_k=3)
    assert (top.groupby("method").size() <= 3).all()
    for _, group in top.groupby("method"):
        assert group["latency_ms"].is_monotonic_decreasing
    assert not top["kind"].isin(["model", "container"]).any()


def test_diff_matches_by_module_phase_and_op(simulated, tmp_path):
    other_path = engines.run(RunSpec(**{**SIM, "seq": 128}), tmp_path / "longer", "pytest",
                             gpu=gpu_spec("a100-80gb"))
    other = TraceAnalysis(other_path)
    ops = simulated.diff(other, level="ops")
    assert (ops["match"] == "both").all()  # same model: same op sequence, longer tensors
    mm = ops[(ops["name"] == "aten::mm") & (ops["method"] == "paca")]
    assert (mm["shapes_a"] != mm["shapes_b"]).any()
    layers = simulated.diff(other)
    act = layers[(layers["phase"] == "forward") & (layers["activation_bytes_a"] > 0)]
    assert (act["activation_bytes_ratio"] > 1.9).all()  # twice the tokens, ~twice the bytes
    itself = simulated.diff(simulated, level="ops")
    assert (itself["delta_us"] == 0).all()


def test_headline_in_the_papers_terms(simulated):
    head = simulated.headline().set_index("metric")
    summary = simulated.trace.summary.set_index("method")
    expected = summary.loc["paca", "step_ms"] / summary.loc["lora", "step_ms"] - 1
    assert head.loc["training_time", "paca_vs_lora"] == pytest.approx(expected)
    assert head.loc["throughput", "paca_vs_lora"] == pytest.approx(
        summary.loc["lora", "step_ms"] / summary.loc["paca", "step_ms"] - 1)
    assert head.loc["training_time", "paper"] == -0.22
    assert pd.isna(head.loc["max_seq", "paca_vs_lora"])  # no capacity plan in this trace


def test_projection_error_needs_measured_and_projected(measured, simulated):
    with pytest.raises(ValueError, match="measured trace with a projected"):
        simulated.projection_error(measured)
    with pytest.raises(ValueError, match="differ"):
        measured.projection_error(simulated)
    same = analyses.projection_error(measured.trace.summary, measured.trace.summary)
    assert (same["error"].dropna() == 0).all()


def test_adapter_overhead_on_a_hand_made_ops_table():
    """Busy and idle time of adapter-branch ops, worked out by hand: a base op 0-10 us, an
    adapter op 12-15 (2 us idle before it), a base op 15-20, an adapter op 25-27 (5 us idle)."""
    ops = trace.conform(pd.DataFrame({
        "method": ["lora"] * 4 + ["frozen"],
        "module": ["model.layers.0.mlp.up_proj", "model.layers.0.mlp.up_proj.lora_A.default",
                   "model.layers.1.mlp", "model.layers.1.mlp.up_proj.lora_B.default",
                   "model.layers.0.mlp"],
        "phase": ["forward"] * 5, "name": ["aten::mm"] * 5,
        "start_us": [0.0, 12.0, 15.0, 25.0, 0.0], "dur_us": [10.0, 3.0, 5.0, 2.0, 20.0],
        "adapter_branch": [False, True, False, True, False], "seq_no": [0, 1, 2, 3, 0],
    }), "ops")
    summary = pd.DataFrame({"method": ["lora", "frozen"], "step_ms": [0.027, 0.020]})
    table = analyses.adapter_overhead(summary, ops, ["lora", "frozen"]).set_index("method")
    assert table.loc["lora", "adapter_ops"] == 2 and table.loc["frozen", "adapter_ops"] == 0
    assert table.loc["lora", "adapter_busy_ms"] == pytest.approx(0.005)
    assert table.loc["lora", "adapter_idle_ms"] == pytest.approx(0.007)
    assert table.loc["lora", "adapter_share"] == pytest.approx(12 / 27)
    assert table.loc["lora", "step_vs_frozen"] == pytest.approx(27 / 20)
    by_layer = analyses.adapter_overhead_by_layer(ops, ["lora"]).set_index("layer")
    assert by_layer.loc["model.layers.0", "adapter_busy_ms"] == pytest.approx(0.003)
    assert by_layer.loc["model.layers.0", "adapter_idle_ms"] == pytest.approx(0.002)
    assert by_layer.loc["model.layers.1", "adapter_busy_ms"] == pytest.approx(0.002)
    assert by_layer.loc["model.layers.1", "adapter_idle_ms"] == pytest.approx(0.005)


def _bars(fig, name: str):
    return {x: y for trace_ in fig.data if trace_.name == name
            for x, y in zip(trace_.x, trace_.y)}


def test_figures_draw_the_analyses_numbers(measured, simulated):
    """Every figure shows the values of the analysis it is built from, not just something."""
    for analysis in (measured, simulated):
        source = analysis.sources["time"]
        summary = analysis.trace.summary.set_index("method")
        overview = figures.overview_bars(analysis.trace.summary, source)
        for phase in ("forward", "backward", "optimizer"):
            drawn = _bars(overview, phase)
            assert set(drawn) == set(summary.index)
            for method, ms in drawn.items():
                assert ms == pytest.approx(summary.loc[method, f"{phase}_ms"]), (phase, method)
        breakdown = analysis.peak_breakdown()
        peak = figures.peak_breakdown_bars(breakdown, "x", 80 * 2**30)
        for category, group in breakdown.groupby("category"):
            drawn = _bars(peak, category)
            for method, gib in drawn.items():
                expected = group.set_index("method").loc[method, "bytes"] / 2**30
                assert gib == pytest.approx(expected), (category, method)
        timeline = analysis.memory_timeline("paca")
        area = figures.memory_timeline_area(timeline, "paca", "x", "t")
        drawn = {t.name: list(t.y) for t in area.data}
        assert drawn["activations"] == pytest.approx(list(timeline["activations"] / 2**30))
        ops = analysis.trace.ops
        layer_ops = ops[(ops["method"] == "lora") & ops["module"].str.startswith(
            "model.layers.1.")]
        kernels = figures.kernel_timeline(ops, "lora", "model.layers.1", source)
        branch = [t for t in kernels.data if t.name == "adapter branch"][0]
        assert len(branch.x) == int(layer_ops["adapter_branch"].sum()) > 0
        assert sum(len(t.x) for t in kernels.data) == len(layer_ops)
    savings = measured.activation_savings()
    per_layer = figures.activation_by_layer(measured.activation_by_layer(), "x")
    added = [t for t in per_layer.data if t.name == "paca adds"][0]
    paca = savings[(savings["method"] == "paca") & savings["module"].str.startswith(
        "model.layers.")]
    assert sum(added.y) * 2**20 == pytest.approx(paca["added_bytes"].sum())
    latency = figures.layer_latency_bars(measured.trace.layers, "measured")
    layers = measured.trace.layers
    rows = layers[(layers["kind"] == "decoder_layer") & layers["phase"].isin(
        ["forward", "backward"]) & (layers["method"] == "lora")]
    drawn = [y for t in latency.data if t.name == "lora" for y in t.y]  # one trace per phase
    assert sorted(drawn) == pytest.approx(sorted(rows["latency_ms"]))


def test_html_report_is_self_contained(simulated, tmp_path):
    path = write_html(simulated, tmp_path / "report.html")
    text = path.read_text()
    assert text.count("<script src=") == 0  # plotly.js embedded, nothing fetched
    assert "plotly" in text.lower() and "Sequential adapter overhead" in text


def test_analyze_command_json_and_html(simulated_path, measured_trace_path, tmp_path, capsys):
    html = tmp_path / "r.html"
    assert main(["analyze", str(simulated_path), "--vs", str(measured_trace_path), "--json",
                 "--html", str(html)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"summary", "adapter_overhead", "activation_totals", "peak_breakdown",
            "top_layers", "headline", "diff"} <= set(report)
    assert report["sources"] == {"time": "projected", "bytes": "simulated",
                                 "reserved": "simulated"}
    assert html.exists()
    assert main(["analyze", str(simulated_path), "--methods", "lora,paca"]) == 0
    out = capsys.readouterr().out
    overhead = out.split("sequential adapter overhead")[1].split("\n\n")[0]
    rows = [line.split()[0] for line in overhead.strip().splitlines()[2:]]
    assert rows == ["lora", "paca"]


def _broken_copies(source, tmp_path):
    truncated = tmp_path / "truncated"
    shutil.copytree(source, truncated)
    data = (truncated / "layers.parquet").read_bytes()
    (truncated / "layers.parquet").write_bytes(data[: len(data) // 2])
    future = tmp_path / "future"
    shutil.copytree(source, future)
    run = yaml.safe_load((future / "run.yaml").read_text())
    (future / "run.yaml").write_text(yaml.safe_dump({**run, "schema_version": 2}))
    return {"missing": tmp_path / "nope", "truncated": truncated, "future": future}


def test_analyze_bad_input_is_one_line_and_status_2(simulated_path, tmp_path, capsys):
    for name, path in _broken_copies(simulated_path, tmp_path).items():
        assert main(["analyze", str(path)]) == 2, name
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("paca-prof: error:"), (name, err)
        with pytest.raises(trace.TraceError):
            trace.load(path)
    assert main(["analyze", str(simulated_path), "--methods", "qlora"]) == 2
    assert "not in trace" in capsys.readouterr().err


def test_analyze_shows_the_spread_and_flags_intervals_containing_1(measured_trace_path,
                                                                    capsys):
    assert main(["analyze", str(measured_trace_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = {row["method"]: row for row in report["timing_spread"]}
    assert list(rows) == ["frozen", "lora", "dora", "paca", "full"]
    for method, row in rows.items():
        assert row["step_ms_p25"] <= row["step_ms"] <= row["step_ms_p75"]
        inside = row["step_ratio_lo"] <= 1 <= row["step_ratio_hi"]
        assert row["contains_1"] == (inside and method != "lora"), method
        assert row["tokens_per_s"] > 0
    assert main(["analyze", str(measured_trace_path)]) == 0
    printed = capsys.readouterr().out
    assert "spread (measured)" in printed
    for method, row in rows.items():
        assert (f"WARNING: {method}:" in printed) == bool(row["spread_warning"]), method


def test_capacity_batches_come_from_the_front_object():
    """The dashboard's batch picker reads the sweep's batches through TraceAnalysis."""
    from conftest import ROOT

    plan = TraceAnalysis(ROOT / "traces" / "sample-plan-llama3-8b-a100-80gb")
    held = sorted(int(b) for b in plan.trace.capacity["batch"].unique())
    assert plan.capacity_batches() == held and held
    assert plan.capacity_curve()[1] in held
    assert TraceAnalysis(ROOT / "traces" / "sample-llama3-8b-seq4096-a100-80gb"
                         ).capacity_batches() == []
