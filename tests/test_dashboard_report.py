"""The HTML report (paca_prof.analyze.report) read back as a reader sees it: its tables' cells
(values, units, whole numbers, the trace's method order) and its figures' data (one layer, one
phase per op timeline, timed from the layer's first op), checked against the analyses; and a
crafted trace whose markup never reaches the page unescaped.

Uses the shipped sample traces (traces/sample-*): no engine run.
"""

from __future__ import annotations

import base64
import html
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from paca_prof.analyze import TraceAnalysis, display
from paca_prof.analyze.report import write_html

ROOT = Path(__file__).resolve().parents[1]
PROJECTED = ROOT / "traces" / "sample-llama3-8b-seq4096-a100-80gb"
MEASURED = ROOT / "traces" / "sample-tiny-cpu"
MIB = 2**20
SCRAMBLED = ["paca", "full", "lora", "frozen", "dora"]


class _Tables(HTMLParser):
    """The tables of a page, by id: {id: [row, ...]} with the header row first."""

    def __init__(self):
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self._table = self._row = self._cell = None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self._table = self.tables.setdefault(dict(attrs).get("id", ""), [])
        elif tag == "tr" and self._table is not None:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self._table.append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def tables(text: str) -> dict[str, pd.DataFrame]:
    parser = _Tables()
    parser.feed(text)
    return {name: pd.DataFrame(rows[1:], columns=rows[0]) for name, rows in parser.tables.items()}


def _array(value):
    """Plotly's JSON arrays: plain lists, or typed arrays {"dtype", "bdata"[, "shape"]}."""
    if isinstance(value, dict) and "bdata" in value:
        array = np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"])
        if "shape" in value:
            array = array.reshape([int(n) for n in str(value["shape"]).split(",")])
        return array
    return np.asarray(value if value is not None else [])


def figures_in(text: str) -> list[dict]:
    """Every plotly figure of a page: {"title", "data"} with its traces' arrays decoded."""
    decoder = json.JSONDecoder()
    found = []
    for match in re.finditer(r"Plotly\.newPlot\(\s*\"[^\"]+\",\s*", text):
        data, end = decoder.raw_decode(text, match.end())
        layout, _ = decoder.raw_decode(text, text.index("{", end))
        title = layout.get("title", {})
        found.append({"title": title.get("text", "") if isinstance(title, dict) else title,
                      "data": data})
    return found


@pytest.fixture(scope="module")
def projected():
    return TraceAnalysis(PROJECTED)


@pytest.fixture(scope="module")
def report(projected, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("report") / "report.html"
    return write_html(projected, path, methods=SCRAMBLED).read_text()


def number(cell: str) -> float:
    return float("nan") if cell == display.MISSING else float(cell.replace(",", ""))


def test_every_table_lists_methods_in_the_traces_order(projected, report):
    found = tables(report)
    assert {"overview", "headline", "adapter-overhead", "activation-totals",
            "peak-breakdown"} <= set(found)
    for name, table in found.items():
        if "method" in table:
            assert list(table["method"]) == projected.trace.methods, name
    assert projected.trace.methods != SCRAMBLED


def test_the_overview_prints_counts_as_whole_numbers(projected, report):
    table = tables(report)["overview"].set_index("method")
    expected = projected.summary().set_index("method")
    for method in projected.trace.methods:
        params = int(expected.loc[method, "trainable_params"])
        assert table.loc[method, "trainable_params"] == f"{params:,}"  # 20,971,520, not .000
        assert table.loc[method, "ops_per_step"] == f"{int(expected.loc[method, 'ops_per_step']):,}"
        assert table.loc[method, "step_ms"] == f"{expected.loc[method, 'step_ms']:,.3f}"
        assert number(table.loc[method, "peak_mib"]) == pytest.approx(
            expected.loc[method, "peak_mib"], abs=5e-4)
        assert table.loc[method, "step_ms_vs_lora"] == \
            f"{expected.loc[method, 'step_ms_vs_lora']:,.3f}"
    assert table.loc["lora", "trainable_params"] == "20,971,520"
    overhead = tables(report)["adapter-overhead"].set_index("method")
    counts = projected.adapter_overhead().set_index("method")
    for method in projected.trace.methods:
        assert overhead.loc[method, "adapter_ops"] == f"{int(counts.loc[method, 'adapter_ops']):,}"
        assert overhead.loc[method, "ops"] == f"{int(counts.loc[method, 'ops']):,}"


def test_activations_and_the_peak_are_in_mib_with_the_unit_in_the_header(projected, report):
    found = tables(report)
    activations = found["activation-totals"].set_index("method")
    assert list(found["activation-totals"].columns) == [
        "method", "MiB", "floor_MiB", "added_MiB", "paca_saves_MiB", "paca_saves_added_share"]
    totals = projected.activation_totals().set_index("method")
    for method in projected.trace.methods:
        for column, header in (("bytes", "MiB"), ("floor_bytes", "floor_MiB"),
                               ("added_bytes", "added_MiB")):
            assert activations.loc[method, header] == f"{totals.loc[method, column] / MIB:,.2f}"
    assert activations.loc["lora", "MiB"] == "38,915.03"
    peak = found["peak-breakdown"].set_index("method")
    wide = projected.peak_breakdown_table().set_index("method")
    for column in wide.columns:
        header = column.replace("bytes", "MiB")
        for method in projected.trace.methods:
            assert number(peak.loc[method, header]) == pytest.approx(
                wide.loc[method, column] / MIB, abs=0.005)


def test_the_op_timeline_shows_one_layer_one_phase_from_its_first_op(projected, report):
    drawn = {f["title"]: f for f in figures_in(report)}
    layer = projected.decoder_layers()[0]
    ops = projected.trace.ops
    for method in projected.trace.methods:
        for phase in ("forward", "backward"):
            title = f"Ops of {layer}, {method} ({phase}, projected)"
            assert title in drawn, title
            bars = drawn[title]["data"]
            base = np.concatenate([_array(t["base"]) for t in bars])
            width = np.concatenate([_array(t["x"]) for t in bars])
            mine = ops[(ops["method"] == method) & (ops["phase"] == phase)
                       & ops["module"].str.startswith(layer + ".")]
            assert len(base) == len(mine) > 0
            assert base.min() == 0.0
            span = (mine["start_us"] + mine["dur_us"]).max() - mine["start_us"].min()
            assert (base + width).max() == pytest.approx(span, rel=1e-9, abs=0.05)
            step_us = float(projected.trace.summary.set_index("method").loc[method, "step_ms"])
            assert span < step_us * 1e3 / 10  # one layer, not the whole step


def test_the_latency_figure_draws_each_layers_latency(projected, report):
    drawn = [f for f in figures_in(report) if f["title"].startswith("Latency per layer")]
    assert len(drawn) == 1
    layers = projected.trace.layers
    rows = layers[(layers["kind"] == "decoder_layer") & (layers["method"] == "lora")]
    bars = [t for t in drawn[0]["data"] if t["name"] == "lora"]
    assert len(bars) == 2  # forward and backward
    values = sorted(float(v) for t in bars for v in _array(t["y"]))
    assert values == pytest.approx(sorted(rows["latency_ms"].astype(float)))


def test_the_report_of_a_measured_run(tmp_path):
    analysis = TraceAnalysis(MEASURED)
    text = write_html(analysis, tmp_path / "report.html").read_text()
    titles = [f["title"] for f in figures_in(text)]
    assert "Ops of model.layers.0, lora (forward, measured)" in titles
    assert any(t.startswith("Memory over one step") for t in titles)
    overview = tables(text)["overview"].set_index("method")
    assert overview.loc["frozen", "trainable_params"] == "0"


def test_a_crafted_trace_is_escaped_everywhere_in_the_report(tmp_path):
    from test_dashboard_http import BAD_METHOD, SCRIPT, make_hostile

    trace = make_hostile(tmp_path / "hostile")
    text = write_html(TraceAnalysis(trace), tmp_path / "report.html").read_text()
    assert SCRIPT not in text and BAD_METHOD not in text  # never raw markup
    assert html.escape(SCRIPT) in text  # the command, shown as text
    outside_scripts = re.sub(r"<script.*?</script>", "", text, flags=re.S)
    for tag in ("<iframe", "<img", "<script", "<b>"):
        assert tag not in outside_scripts, tag
    overview = tables(text)["overview"]
    assert BAD_METHOD in list(overview["method"])  # the method's name, as text
