"""The dashboard as a hostile client sees it: callbacks driven over /_dash-update-component
exactly as the browser sends them, no browser. Crafted run names, wrong types for every input,
huge strings, NaN and infinite numbers, unknown methods, layers and GPUs, malformed requests:
each gets HTTP 200 with an alert in the view's message area, or a clean no-update (204),
never a server error or a traceback, and the server keeps serving. Also: the listing of a
folder with hostile and broken runs beside good ones, the listing of 200 runs (timed and
printed, never asserted), traces of other module trees, a trace crafted with markup and
component-shaped values in every string it holds, and serve()'s refusal of debug mode off
loopback.

The traces are copies of the shipped samples (traces/sample-*), edited by hand where a case
needs it, so this file needs no engine run and takes a few seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import requests
import yaml

from dashboards import runs
from dashboards.app import RUNS_PAGE
from paca_prof import trace as trace_io
from paca_prof.analyze import TraceAnalysis
from paca_prof.distributed import Distributed

from test_dashboard import Served

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "traces"
TINY = SAMPLES / "sample-tiny-cpu"
PLAN = SAMPLES / "sample-plan-llama3-8b-a100-80gb"
TIMEOUT = 60
HOSTILE = "<img src=x onerror=alert(1)>'\""  # a run folder's name
SCRIPT = "<script>window.__pwned=1;alert(1)</script>"
IFRAME = {"type": "Iframe", "namespace": "dash_html_components",
          "props": {"srcDoc": "<script>parent.__pwned=1;alert(1)</script>", "id": "pwned"}}
BAD_METHOD = "<script>alert(\"paca\")</script>'q"  # paca, renamed in the hostile trace
BAD_MODULE = "<img src=x onerror=alert(2)>"  # up_proj, renamed in the hostile trace
CUSTOM_GPU = {"name": "my-card-48g", "memory_bytes": 48 * 2**30, "bf16_tflops": 200.0,
              "fp16_tflops": 200.0, "fp32_tflops": 50.0, "hbm_gbps": 1500.0,
              "source": "a test card"}


# --- Traces, copied from the samples and edited --------------------------------------------

def copy_trace(source: Path, target: Path) -> Path:
    """A copy of a sample trace without its (large) Chrome traces."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("trace-*.json"))
    return target


class _NoAliases(yaml.SafeDumper):
    def ignore_aliases(self, data):  # a value used twice is written twice (load refuses aliases)
        return True


def edit_run(path: Path, change) -> None:
    run_yaml = path / "run.yaml"
    run = yaml.safe_load(run_yaml.read_text())
    change(run)
    run_yaml.write_text(yaml.dump(run, Dumper=_NoAliases, sort_keys=False))


def edit_table(path: Path, name: str, change) -> None:
    file = path / f"{name}.parquet"
    change(pd.read_parquet(file)).to_parquet(file, index=False)


def rename(frame: pd.DataFrame, column: str, old: str, new: str) -> pd.DataFrame:
    frame[column] = frame[column].astype(str).str.replace(old, new, regex=False)
    return frame


def make_hostile(target: Path) -> Path:
    """The tiny sample with markup and component-shaped values in every string it holds:
    run.yaml's text fields and nested mappings, a method name, a module name, op names and a
    method's error."""
    copy_trace(TINY, target)

    def run_yaml(run):
        run.update(command=SCRIPT, created=SCRIPT, dtype="<b>fp32</b>")
        run["model"]["name"] = "<iframe srcdoc='<script>alert(1)</script>'>"
        run["device"]["name"] = "<img src=x onerror=alert(3)>"
        run["assumptions"] = {"timing": IFRAME, "memory": SCRIPT}
        run["recipe"] = {**run.get("recipe", {}), "targets": [IFRAME], "loss": SCRIPT}
        run["settings"] = {"note": IFRAME}
        run["methods"] = {(BAD_METHOD if m == "paca" else m): {**v, "note": IFRAME}
                          for m, v in run["methods"].items()}
        run["gpu"] = {**CUSTOM_GPU, "name": "<img src=x onerror=alert(4)>"}

    edit_run(target, run_yaml)
    for table in ("summary", "layers", "ops", "memory"):
        edit_table(target, table, lambda f: rename(f, "method", "paca", BAD_METHOD))
    for table in ("layers", "ops"):
        edit_table(target, table, lambda f: rename(f, "module", "up_proj", BAD_MODULE))
    edit_table(target, "ops", lambda f: rename(f, "name", "aten::mm", SCRIPT))

    def failed(summary):
        summary.loc[summary["method"] == "full", ["status", "error"]] = ["error", SCRIPT]
        return summary

    edit_table(target, "summary", failed)
    return target


def make_gpt2_tree(target: Path) -> Path:
    """The tiny sample with GPT-2's module names (transformer.h.N) and block class: no module
    of kind decoder_layer; the layers are the items of the module list transformer.h."""
    copy_trace(TINY, target)
    for table in ("layers", "ops"):
        edit_table(target, table, lambda f: rename(f, "module", "model.layers", "transformer.h"))

    def kinds(layers):
        layers["kind"] = layers["kind"].astype(str).replace("decoder_layer", "other")
        return layers

    edit_table(target, "layers", kinds)
    return target


RANK_1_BYTES, RANK_1_TIME = 2, 1.5  # rank 1 of make_two_ranks against rank 0


def make_two_ranks(target: Path, source: Path = TINY) -> Path:
    """The tiny sample as a distributed (FSDP2, 2 gloo ranks) trace written through
    paca_prof.trace's writer: rank 0's rows are the sample's, rank 1's the same with every
    byte count RANK_1_BYTES times and every ms or us RANK_1_TIME times larger, so that each
    view's numbers tell the ranks apart."""
    loaded = trace_io.load(source)
    tables = {}
    for name in ("summary", "layers", "ops", "memory", "steps"):
        frame = getattr(loaded, name)
        if frame is None:
            continue
        other = frame.copy()
        other["rank"] = 1
        for column in other.columns:
            if column == "bytes" or column.endswith("_bytes"):
                other[column] = other[column] * RANK_1_BYTES
            elif column.endswith(("_ms", "_us")):
                other[column] = other[column] * RANK_1_TIME
        tables[name] = pd.concat([frame, other], ignore_index=True)
    run = {k: v for k, v in loaded.run.items() if k != "schema_version"}
    run["distributed"] = Distributed(world_size=2, fsdp=True, backend="gloo").describe()
    return trace_io.write(target, run, tables)


def make_flat(target: Path) -> Path:
    """The tiny sample whose layers table holds no layers at all: the whole model only."""
    copy_trace(TINY, target)
    edit_table(target, "layers", lambda f: f[f["module"].isin(["[root]", "[loss]",
                                                                "[optimizer]"])])
    return target


@pytest.fixture(scope="module")
def traces(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dash-http")
    copy_trace(TINY, root / "tiny")
    copy_trace(TINY, root / "tiny-b")
    copy_trace(PLAN, root / "plan")
    copy_trace(PLAN, root / "plan-custom")
    edit_run(root / "plan-custom", lambda run: run.update(gpu=CUSTOM_GPU))
    make_hostile(root / HOSTILE)
    make_gpt2_tree(root / "gpt2-tree")
    make_flat(root / "flat")
    make_two_ranks(root / "two-ranks")
    copy_trace(TINY, root / "tiny-simulated")  # stands for the simulation of the same run
    edit_run(root / "tiny-simulated", lambda run: run.update(
        source="simulated", sources={"time": None, "bytes": "simulated"}))
    copy_trace(TINY, root / "broken-parquet")
    ops = root / "broken-parquet" / "ops.parquet"
    ops.write_bytes(ops.read_bytes()[: ops.stat().st_size // 2])
    copy_trace(TINY, root / "unnamed-method")
    edit_table(root / "unnamed-method", "summary", unnamed_method)
    return root


def unnamed_method(summary: pd.DataFrame) -> pd.DataFrame:
    summary["method"] = summary["method"].astype(object)
    summary.loc[0, "method"] = None
    return summary


@pytest.fixture(scope="module")
def served(traces):
    app = Served(traces)
    yield app
    app.close()


# --- Driving callbacks as the browser does --------------------------------------------------

# callback -> (outputs, inputs, state); the last output is the view's message area.
CALLBACKS = {
    "list_runs": (["run.options", "run.value", "compare-run.options", "compare-run.value",
                   "run-alert.children"],
                  ["url.search", "refresh.n_clicks"], ["run.value", "compare-run.value"]),
    "runs_table": (["runs-table.children", "runs-page.options", "runs-page.value",
                    "runs-count.children", "runs-msg.children"],
                   ["tabs.value", "run.options", "runs-filter.value", "runs-page.value"], []),
    "pick_run": (["methods.options", "methods.value", "timeline-layer.options",
                  "timeline-layer.value", "timeline-method.options", "timeline-method.value",
                  "memory-method.options", "memory-method.value", "gpu.options", "gpu.value",
                  "capacity-batch.options", "capacity-batch.value", "rank.options",
                  "rank.value", "rank-control.style", "run-info.children"],
                 ["run.value"], ["gpu.value", "rank.value"]),
    "overview": (["overview-table.children", "overview-errors.children", "overview-bars.figure",
                  "overview-ratios.figure", "overview-spread.children", "overview-msg.children"],
                 ["tabs.value", "run.value", "methods.value", "rank.value"], []),
    "drill": (["drill.options", "drill.value"],
              ["tabs.value", "run.value", "latency-bars.clickData", "drill-up.n_clicks",
               "drill.value", "drill.search_value"], []),
    "latency": (["latency-bars.figure", "latency-msg.children"],
                ["tabs.value", "run.value", "methods.value", "drill.value", "rank.value"], []),
    "timeline": (["timeline-graph.figure", "timeline-overhead.children", "timeline-msg.children"],
                 ["tabs.value", "run.value", "timeline-layer.value", "timeline-method.value",
                  "timeline-phase.value", "rank.value"], []),
    "activations": (["activation-bars.figure", "activation-table.children",
                     "activations-msg.children"],
                    ["tabs.value", "run.value", "methods.value", "rank.value"], []),
    "memory": (["memory-timeline.figure", "peak-bars.figure", "memory-ranks.children",
                "memory-msg.children"],
               ["tabs.value", "run.value", "methods.value", "memory-method.value", "rank.value"],
               []),
    "capacity": (["capacity-graph.figure", "capacity-table.children", "capacity-budget.children",
                  "capacity-msg.children"],
                 ["tabs.value", "run.value", "methods.value", "gpu.value", "free-gib.value",
                  "headroom.value", "capacity-batch.value", "rank.value"], []),
    "compare": (["compare-table.children", "compare-a.figure", "compare-b.figure",
                 "compare-msg.children"],
                ["tabs.value", "run.value", "compare-run.value", "methods.value", "rank.value"],
                []),
    "compare_bytes": (["compare-method.options", "compare-method.value", "compare-peak.figure",
                       "compare-activations.figure", "compare-bytes.children"],
                      ["tabs.value", "run.value", "compare-run.value", "compare-method.value",
                       "rank.value"], []),
}
TABS = {"overview": "overview", "drill": "latency", "latency": "latency", "timeline": "timeline",
        "activations": "activations", "memory": "memory", "capacity": "capacity",
        "compare": "compare", "compare_bytes": "compare", "runs_table": "runs"}
GOOD = {"run.value": "tiny", "methods.value": ["lora", "paca"], "drill.value": None,
        "timeline-layer.value": "model.layers.0", "timeline-method.value": "lora",
        "timeline-phase.value": "forward", "memory-method.value": "lora",
        "gpu.value": "a100-80gb", "free-gib.value": None, "headroom.value": "1GiB+5%",
        "capacity-batch.value": None, "compare-run.value": "tiny-b", "url.search": "",
        "refresh.n_clicks": 0, "latency-bars.clickData": None, "drill-up.n_clicks": 0,
        "drill.search_value": None, "compare-run.options": None, "run.options": [],
        "runs-filter.value": None, "runs-page.value": 1, "rank.value": 0,
        "compare-method.value": None}
INF, NAN = "__inf__", "__nan__"  # sent as the JSON tokens 1e400 and NaN


def _spec(key: str) -> dict:
    component, prop = key.split(".")
    return {"id": component, "property": prop}


def request_body(callback: str, changed: str | None = None, **values) -> dict:
    """The body the browser posts for `callback`, with the good inputs unless `values` (keys
    as "component.property", dots written as "__") says otherwise."""
    outputs, inputs, state = CALLBACKS[callback]
    given = {k.replace("__", "."): v for k, v in values.items()}
    good = {**GOOD, "tabs.value": TABS.get(callback)}
    if callback == "capacity":
        good["run.value"] = "plan"
    merged = {**good, **given}
    return {
        "output": "..%s.." % "...".join(outputs),
        "outputs": [_spec(o) for o in outputs],
        "inputs": [{**_spec(i), "value": merged.get(i)} for i in inputs],
        "state": [{**_spec(s), "value": merged.get(s)} for s in state],
        "changedPropIds": [changed or (next(iter(given)) if given else inputs[0])],
    }


def post(served, body, raw: str | None = None) -> requests.Response:
    data = raw if raw is not None else json.dumps(body).replace(f'"{INF}"', "1e400").replace(
        f'"{NAN}"', "NaN")
    return requests.post(f"{served.url}/_dash-update-component", data=data,
                         headers={"Content-Type": "application/json"}, timeout=TIMEOUT)


def message_area(reply: requests.Response, callback: str):
    """The children of the callback's message area in a 200 reply."""
    outputs = CALLBACKS[callback][0]
    component, _ = outputs[-1].split(".")
    return reply.json()["response"].get(component, {}).get("children")


def alert_text(children) -> str | None:
    """The text of the alert among `children` (a component or a list of them), or None."""
    items = children if isinstance(children, list) else [children]
    for item in items:
        if isinstance(item, dict) and item.get("props", {}).get("className") == "view-error":
            assert isinstance(item["props"]["children"], str)
            return item["props"]["children"]
    return None


def assert_clean(reply: requests.Response):
    assert reply.status_code in (200, 204), (reply.status_code, reply.text[:300])
    for marker in ("Traceback", 'File "', "Internal Server Error"):
        assert marker not in reply.text, reply.text[:500]


# (case id, callback, inputs, expectation): "alert:TEXT" = HTTP 200 with an alert holding
# TEXT in the message area; "noupdate" = HTTP 204; "quiet" = HTTP 200 and no alert;
# "alert-or-noupdate": either of the first two.
CASES = [
    ("run-dotdot", "overview", {"run__value": "../../etc"}, "alert:rejected run name"),
    ("run-absolute", "overview", {"run__value": "/etc"}, "alert:rejected run name"),
    ("run-list", "overview", {"run__value": ["tiny"]}, "alert:rejected run name"),
    ("run-dict", "overview", {"run__value": {"a": 1}}, "alert:rejected run name"),
    ("run-number", "overview", {"run__value": 12}, "alert:rejected run name"),
    ("run-huge", "overview", {"run__value": "x" * 100_000}, "alert:not a folder name"),
    ("run-nul", "overview", {"run__value": "tiny\x00"}, "alert:not a folder name"),
    ("run-unknown", "overview", {"run__value": "no-such-run"}, "alert:no run"),
    ("run-broken", "overview", {"run__value": "broken-parquet"}, "alert:unreadable ops.parquet"),
    ("run-inf", "overview", {"run__value": INF}, "alert:rejected run name"),
    ("run-passwd", "overview", {"run__value": "../../../../../../etc/passwd"},
     "alert:not a folder name"),
    ("run-up-through-a-run", "overview", {"run__value": "tiny/../../.."},
     "alert:not a folder name"),
    ("run-percent-encoded", "overview", {"run__value": "%2e%2e"}, "alert:no run"),
    ("run-backslashes", "overview", {"run__value": "..\\..\\etc"}, "alert:not a folder name"),
    ("methods-string", "overview", {"methods__value": "lora"}, "alert:must be a list"),
    ("methods-numbers", "overview", {"methods__value": [1, 2]}, "alert:must be a string"),
    ("methods-component", "overview", {"methods__value": [IFRAME]}, "alert:must be a string"),
    ("methods-unknown", "overview", {"methods__value": ["nope"]}, "alert:not in trace"),
    ("methods-nested", "overview", {"methods__value": [["lora"]]}, "alert:must be a string"),
    ("methods-many", "overview", {"methods__value": ["lora"] * 1000}, "alert:must be a list"),
    ("methods-dict", "overview", {"methods__value": {"lora": True}}, "alert:must be a list"),
    ("methods-nan", "overview", {"methods__value": [NAN]}, "alert:must be a string"),
    ("methods-none-picked", "overview", {"methods__value": []}, "noupdate"),
    ("tab-number", "overview", {"tabs__value": 5}, "noupdate"),
    ("methods-huge-name", "activations", {"methods__value": ["lora", "x" * 5000]},
     "alert:must be a string"),
    ("activations-unknown-method", "activations", {"methods__value": ["qlora"]},
     "alert:not in trace"),
    ("drill-unknown-module", "latency", {"drill__value": "no.such.module"}, "alert:no module"),
    ("drill-dict", "latency", {"drill__value": {"x": 1}}, "alert:must be a string"),
    ("drill-list", "latency", {"drill__value": ["model.layers.0"]}, "alert:must be a string"),
    ("layer-unknown", "timeline", {"timeline-layer__value": "model.layers.999"},
     "alert:unknown layer"),
    ("layer-list", "timeline", {"timeline-layer__value": ["model.layers.0"]},
     "alert:unknown layer"),
    ("layer-huge", "timeline", {"timeline-layer__value": "model.layers." + "9" * 100_000},
     "alert:unknown layer"),
    ("timeline-method-unknown", "timeline", {"timeline-method__value": "nope"},
     "alert:unknown method"),
    ("timeline-method-inf", "timeline", {"timeline-method__value": INF}, "alert:unknown method"),
    ("phase-unknown", "timeline", {"timeline-phase__value": "sideways"}, "alert:unknown phase"),
    ("phase-dict", "timeline", {"timeline-phase__value": {"$ne": 1}}, "alert:unknown phase"),
    ("memory-method-component", "memory", {"memory-method__value": IFRAME},
     "alert:unknown method"),
    ("memory-method-unknown", "memory", {"memory-method__value": "nope"}, "alert:unknown method"),
    ("headroom-huge-exponent", "capacity", {"headroom__value": "1e99999999"},
     "alert:cannot read headroom"),
    ("headroom-1e400", "capacity", {"headroom__value": "1e400GiB"}, "alert:cannot read headroom"),
    ("headroom-list", "capacity", {"headroom__value": ["1GiB"]}, "alert:must be a string"),
    ("headroom-huge-string", "capacity", {"headroom__value": "9" * 100_000},
     "alert:must be a string of at most 200"),
    ("headroom-percent", "capacity", {"headroom__value": "200%"}, "alert:percentage"),
    ("headroom-negative", "capacity", {"headroom__value": "-1GiB"}, "alert:cannot read headroom"),
    ("headroom-everything", "capacity", {"headroom__value": "100GiB"}, "alert:leaves nothing"),
    ("free-1e400", "capacity", {"free-gib__value": INF}, "alert:must be finite, got inf"),
    ("free-nan", "capacity", {"free-gib__value": NAN}, "alert:must be finite, got nan"),
    ("free-negative", "capacity", {"free-gib__value": -5}, "alert:must be above 0"),
    ("free-zero", "capacity", {"free-gib__value": 0}, "alert:must be above 0"),
    ("free-huge-integer", "capacity", {"free-gib__value": 10**400}, "alert:at most"),
    ("free-string", "capacity", {"free-gib__value": "40"}, "alert:free memory (GiB) must be a number"),
    ("free-list", "capacity", {"free-gib__value": [40]}, "alert:free memory (GiB) must be a number"),
    ("free-bool", "capacity", {"free-gib__value": True}, "alert:free memory (GiB) must be a number"),
    ("free-1e300", "capacity", {"free-gib__value": 1e300}, "alert:must be at most"),
    ("free-1e99999999-text", "capacity", {"free-gib__value": "1e99999999"},
     "alert:must be a number"),
    ("gpu-spec-path", "capacity", {"gpu__value": "/etc/passwd.yaml"}, "alert:unknown GPU"),
    ("gpu-unknown", "capacity", {"gpu__value": "no-such-gpu"}, "alert:unknown GPU"),
    ("gpu-list", "capacity", {"gpu__value": ["a100-80gb"]}, "alert:unknown GPU"),
    ("batch-string", "capacity", {"capacity-batch__value": "abc"},
     "alert:no capacity points at batch"),
    ("batch-inf", "capacity", {"capacity-batch__value": INF}, "alert:no capacity points"),
    ("batch-negative", "capacity", {"capacity-batch__value": -1}, "alert:no capacity points"),
    ("batch-bool", "capacity", {"capacity-batch__value": True}, "alert:no capacity points"),
    ("capacity-unknown-method", "capacity", {"methods__value": ["qpaca"]}, "alert:not in trace"),
    ("compare-dotdot", "compare", {"compare-run__value": "../x"}, "alert:rejected run name"),
    ("compare-list", "compare", {"compare-run__value": ["tiny"]}, "alert:rejected run name"),
    ("compare-broken", "compare", {"compare-run__value": "broken-parquet"},
     "alert:unreadable ops.parquet"),
    ("click-points-string", "drill", {"latency-bars__clickData": {"points": "x"}}, "noupdate"),
    ("click-customdata-dict", "drill",
     {"latency-bars__clickData": {"points": [{"customdata": {"a": 1}}]}}, "noupdate"),
    ("click-string", "drill", {"latency-bars__clickData": "str"}, "noupdate"),
    ("click-unknown-module", "drill",
     {"latency-bars__clickData": {"points": [{"customdata": ["no.such"]}]}}, "noupdate"),
    ("drill-search-huge", "drill", {"drill__search_value": "x" * 100_000}, "quiet"),
    ("drill-bad-run", "drill", {"run__value": ["tiny"]}, "noupdate"),
    ("pick-run-component", "pick_run", {"run__value": IFRAME}, "alert:rejected run name"),
    ("pick-run-broken", "pick_run", {"run__value": "broken-parquet"},
     "alert:unreadable ops.parquet"),
    ("pick-run-unnamed-method", "pick_run", {"run__value": "unnamed-method"},
     "alert:without a method"),
    ("search-list", "list_runs", {"url__search": ["?run=tiny"]}, "quiet"),
    ("search-dotdot", "list_runs", {"url__search": "?run=../../etc"}, "alert:rejected run name"),
    ("search-long-name", "list_runs", {"url__search": "?run=" + "a" * 3000},
     "alert:not a folder name"),
    ("state-component", "list_runs", {"run__value": IFRAME}, "quiet"),
    ("runs-filter-list", "runs_table", {"runs-filter__value": ["tiny"]}, "alert:must be a string"),
    ("runs-filter-huge", "runs_table", {"runs-filter__value": "x" * 100_000},
     "alert:must be a string"),
    ("runs-page-huge", "runs_table", {"runs-page__value": 10**30}, "quiet"),
    ("runs-page-string", "runs_table", {"runs-page__value": "2"}, "quiet"),
    ("rank-none", "overview", {"rank__value": None}, "quiet"),  # before pick_run: rank 0
    ("rank-string", "overview", {"rank__value": "1"}, "alert:a rank is a whole number"),
    ("rank-markup", "overview", {"rank__value": SCRIPT}, "alert:a rank is a whole number"),
    ("rank-component", "memory", {"rank__value": IFRAME}, "alert:a rank is a whole number"),
    ("rank-bool", "memory", {"rank__value": True}, "alert:a rank is a whole number, not True"),
    ("rank-float", "timeline", {"rank__value": 1.0}, "alert:a rank is a whole number"),
    ("rank-nan", "latency", {"rank__value": NAN}, "alert:a rank is a whole number"),
    ("rank-inf", "activations", {"rank__value": INF}, "alert:a rank is a whole number"),
    ("rank-list", "capacity", {"rank__value": [1]}, "alert:a rank is a whole number"),
    ("rank-unknown", "activations", {"rank__value": 1}, "alert:rank 1 is not in this trace"),
    ("rank-negative", "compare", {"rank__value": -1}, "alert:rank -1 is not in this trace"),
    ("rank-huge", "overview", {"rank__value": 10**400}, "alert:is not in this trace (ranks 0)"),
    ("rank-beyond-world", "memory", {"run__value": "two-ranks", "rank__value": 2},
     "alert:rank 2 is not in this trace (ranks 0, 1)"),
    ("rank-bytes-string", "compare_bytes", {"rank__value": "0"},
     "alert:a rank is a whole number"),
    ("pick-run-rank-state-component", "pick_run", {"rank__value": IFRAME}, "quiet"),
]


@pytest.mark.parametrize("callback,values,expect", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_hostile_input_gets_an_alert_or_no_update(served, callback, values, expect):
    reply = post(served, request_body(callback, **values))
    assert_clean(reply)
    if expect == "noupdate":
        assert reply.status_code == 204, reply.text[:300]
        return
    assert reply.status_code == 200, reply.text[:300]
    alert = alert_text(message_area(reply, callback))
    if expect == "quiet":
        assert alert is None, alert
    else:
        fragment = expect.removeprefix("alert:")
        assert alert is not None and fragment in alert, (alert, fragment)
        assert str(served.root) not in alert  # no server paths in what the page shows


def _malformed():
    good = request_body("overview")
    missing = {**good, "inputs": good["inputs"][:2]}
    extra = {**good, "inputs": good["inputs"] + [{"id": "x", "property": "y", "value": 1}]}
    return [
        ("missing-input", missing, None, (200, 204)),
        ("extra-input", extra, None, (200, 204)),
        ("inputs-not-a-list", {**good, "inputs": {"a": 1}}, None, (204,)),
        ("body-a-list", [good], None, (204,)),
        ("unknown-output", {**good, "output": "nope.children"}, None, (204,)),
        ("no-output", {k: v for k, v in good.items() if k != "output"}, None, (204,)),
        ("no-state", {k: v for k, v in request_body("list_runs").items() if k != "state"}, None,
         (200, 204)),
        ("not-json", None, "{this is not json", (400,)),
        ("deeply-nested", None, "[" * 100_000 + "]" * 100_000, (204, 400)),
        ("too-large", None, json.dumps({"inputs": ["x" * (5 * 2**20)]}), (413,)),
    ]


@pytest.mark.parametrize("body,raw,statuses", [c[1:] for c in _malformed()],
                         ids=[c[0] for c in _malformed()])
def test_malformed_requests_never_fail_the_server(served, body, raw, statuses):
    reply = post(served, body, raw)
    assert reply.status_code in statuses, (reply.status_code, reply.text[:300])
    for marker in ("Traceback", 'File "'):
        assert marker not in reply.text
    if reply.status_code == 200:
        alert = alert_text(message_area(reply, "overview"))
        assert alert is not None and "malformed request" in alert


def test_the_server_keeps_serving_after_the_hostile_requests(served):
    """Runs after the cases above (file order): every view still answers a good request."""
    for callback in ("overview", "latency", "timeline", "activations", "memory", "capacity",
                     "compare"):
        reply = post(served, request_body(callback))
        assert reply.status_code == 200, (callback, reply.text[:300])
        assert alert_text(message_area(reply, callback)) is None, callback
        figure = next(v for k, v in reply.json()["response"].items()
                      if "figure" in v and k.endswith(("bars", "graph", "timeline", "-a")))
        assert figure["figure"]["data"], callback


# --- Values from a trace are text, never components ------------------------------------------

TEXT_COMPONENTS = {"Div", "Span", "Table", "Thead", "Tbody", "Tr", "Th", "Td", "P", "Code",
                   "Pre", "Details", "Summary"}


def components(value):
    """Every Dash component (a mapping with type, namespace and props) inside a reply."""
    if isinstance(value, dict):
        if {"type", "namespace", "props"} <= set(value):
            yield value
        for item in value.values():
            yield from components(item)
    elif isinstance(value, list):
        for item in value:
            yield from components(item)


def strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)


def test_a_crafted_trace_is_shown_as_plain_text(served):
    listing = post(served, request_body("list_runs", url__search=f"?run={HOSTILE}"))
    assert listing.status_code == 200
    assert listing.json()["response"]["run"]["value"] == HOSTILE
    replies = {"list_runs": listing.json()["response"]}
    for callback in CALLBACKS:
        if callback in ("list_runs", "capacity"):
            continue
        values = {"run__value": HOSTILE, "methods__value": ["lora", BAD_METHOD, "full"],
                  "timeline-method__value": BAD_METHOD}
        if callback == "compare":
            values["compare-run__value"] = "tiny"
        reply = post(served, request_body(callback, **values))
        assert reply.status_code == 200, (callback, reply.text[:300])
        replies[callback] = reply.json()["response"]
        assert alert_text(message_area(reply, callback)) is None, callback
    reply = post(served, request_body("runs_table", **{"runs-filter__value": "onerror"}))
    replies["runs_table"] = reply.json()["response"]
    assert HOSTILE in list(strings(replies["runs_table"]["runs-table"]))
    for callback, response in replies.items():
        for component in components(response):
            assert component["type"] in TEXT_COMPONENTS, (callback, component["type"])
            assert component["namespace"] == "dash_html_components", callback
            assert not {"srcDoc", "dangerously_allow_html", "src", "href"} & set(
                component["props"]), callback
    info = json.dumps(replies["pick_run"]["run-info"])
    shown = list(strings(replies["pick_run"]["run-info"]))
    assert SCRIPT in shown  # the command, as one plain string
    assert any("'props': {'srcDoc'" in s or '"srcDoc"' in s or "srcDoc:" in s for s in shown)
    assert "Iframe" in info  # the component-shaped mapping, shown as YAML text
    options = replies["pick_run"]["methods"]["options"]
    assert {"label": BAD_METHOD, "value": BAD_METHOD} in options
    assert any(o["label"].startswith("<img src=x onerror=alert(4)>") for o in
               replies["pick_run"]["gpu"]["options"])
    assert SCRIPT in json.dumps(replies["overview"]["overview-errors"])  # full's error
    table = json.dumps(replies["overview"]["overview-table"])
    assert json.dumps(BAD_METHOD)[1:-1] in table
    timeline = replies["timeline"]["timeline-graph"]["figure"]
    assert any(SCRIPT in str(t.get("customdata")) for t in timeline["data"])


# --- Other module trees --------------------------------------------------------------------

def test_a_gpt2_module_tree_has_layers_in_every_view(served):
    analysis = runs.analysis(served.root, "gpt2-tree")
    assert analysis.decoder_layers() == ["transformer.h.0", "transformer.h.1"]
    picked = post(served, request_body("pick_run", run__value="gpt2-tree")).json()["response"]
    assert picked["timeline-layer"]["value"] == "transformer.h.0"
    for callback, values in (("latency", {}), ("activations", {}),
                             ("timeline", {"timeline-layer__value": "transformer.h.1"})):
        reply = post(served, request_body(callback, run__value="gpt2-tree", **values))
        assert reply.status_code == 200 and alert_text(message_area(reply, callback)) is None
        figure = next(v["figure"] for v in reply.json()["response"].values() if "figure" in v)
        assert figure["data"], callback
    latency = post(served, request_body("latency", run__value="gpt2-tree")).json()["response"]
    xs = {x for t in latency["latency-bars"]["figure"]["data"] for x in t["x"]}
    assert xs == {"0", "1"}
    drilled = post(served, request_body("latency", run__value="gpt2-tree",
                                        drill__value="transformer.h.0")).json()["response"]
    xs = {x for t in drilled["latency-bars"]["figure"]["data"] for x in t["x"]}
    assert {"self_attn", "mlp"} <= xs
    overhead = analysis.adapter_overhead_by_layer(["lora"])
    assert set(overhead["layer"]) == {"transformer.h.0", "transformer.h.1"}


def test_a_trace_without_layers_says_so(served):
    picked = post(served, request_body("pick_run", run__value="flat")).json()["response"]
    assert picked["timeline-layer"]["options"] == [] and picked["timeline-layer"]["value"] is None
    reply = post(served, request_body("timeline", run__value="flat", timeline_layer=None,
                                      **{"timeline-layer__value": None}))
    assert reply.status_code == 200
    title = json.dumps(reply.json()["response"]["timeline-graph"]["figure"]["layout"])
    assert "no layers found" in title
    reply = post(served, request_body("latency", run__value="flat"))
    assert "no layers found" in json.dumps(reply.json()["response"]["latency-bars"])
    for callback in ("overview", "activations", "memory"):
        reply = post(served, request_body(callback, run__value="flat"))
        assert reply.status_code == 200 and alert_text(message_area(reply, callback)) is None


# --- A distributed trace: the rank picker ----------------------------------------------------

def table_cells(response, table_id: str) -> list[dict[str, str]]:
    """An analyzer table in a reply (dashboards.app._table) as {header: cell text} rows."""
    table = next(c for c in components(response) if c["props"].get("id") == table_id)
    head, body = table["props"]["children"]

    def texts(row):
        return [cell["props"]["children"] for cell in row["props"]["children"]]

    headers = texts(head["props"]["children"])
    return [dict(zip(headers, texts(row))) for row in body["props"]["children"]]


def as_number(cell: str) -> float:
    return float("nan") if cell in ("–", "") else float(cell.replace(",", ""))


def test_the_rank_picker_shows_only_for_several_ranks_and_keeps_a_held_rank(served):
    picked = post(served, request_body("pick_run", run__value="two-ranks")).json()["response"]
    assert picked["rank"]["options"] == [{"label": "0", "value": 0}, {"label": "1", "value": 1}]
    assert picked["rank"]["value"] == 0 and picked["rank-control"]["style"] == {}
    header = list(strings(picked["run-info"]))
    assert any("FSDP2 over 2 ranks" in text for text in header)
    assert "times: measured" in header and "bytes: measured" in header  # the same for all
    kept = post(served, request_body("pick_run", run__value="two-ranks", rank__value=1))
    assert kept.json()["response"]["rank"]["value"] == 1
    single = post(served, request_body("pick_run", run__value="tiny", rank__value=1))
    single = single.json()["response"]
    assert single["rank"]["value"] == 0 and single["rank"]["options"] == [
        {"label": "0", "value": 0}]
    assert single["rank-control"]["style"] == {"display": "none"}


def test_choosing_rank_1_shows_rank_1s_numbers_in_every_view(served):
    """Rank 1 of make_two_ranks holds twice rank 0's bytes and 1.5 times its times: the
    overview, memory, latency, timeline, activations and compare views show rank 1's."""
    path = served.root / "two-ranks"
    ranks = {rank: TraceAnalysis(path, rank=rank) for rank in (0, 1)}
    methods = ["lora", "paca"]

    def view(callback, rank, **values):
        reply = post(served, request_body(callback, run__value="two-ranks", rank__value=rank,
                                          methods__value=methods, **values))
        assert reply.status_code == 200, reply.text[:300]
        assert alert_text(message_area(reply, callback)) is None, callback
        return reply.json()["response"]

    for rank, analysis in ranks.items():
        shown = {r["method"]: r for r in table_cells(view("overview", rank), "summary-table")}
        expected = analysis.summary(methods=methods).set_index("method")
        for method in methods:
            for column in ("peak_mib", "activation_mib", "step_ms"):
                assert as_number(shown[method][column]) == pytest.approx(
                    float(expected.loc[method, column]), abs=1e-3), (rank, method, column)
    peak = {rank: analysis.summary(methods=["lora"])["peak_mib"].iloc[0]
            for rank, analysis in ranks.items()}
    assert peak[1] == pytest.approx(RANK_1_BYTES * peak[0])  # the ranks told apart

    overview = view("overview", 1)
    every_rank = table_cells(overview, "rank-table")  # every rank's peak, whichever is shown
    assert [(r["method"], r["rank"]) for r in every_rank] == [
        ("lora", "0"), ("lora", "1"), ("paca", "0"), ("paca", "1")]
    assert "the views show rank 1" in json.dumps(overview["overview-errors"])
    assert "rank 1" in overview["overview-bars"]["figure"]["layout"]["title"]["text"]

    memory = view("memory", 1)
    assert [r["rank"] for r in table_cells(memory, "memory-rank-table")] == ["0", "1"] * 2
    for graph in ("memory-timeline", "peak-bars"):
        assert "rank 1" in memory[graph]["figure"]["layout"]["title"]["text"], graph
    # the figures are the analyzer's rank-1 figures (dashboards/app.py computes nothing)
    from paca_prof.analyze import figures

    one = ranks[1]
    want = figures.peak_breakdown_bars(one.peak_breakdown(methods), "measured, rank 1")
    got = memory["peak-bars"]["figure"]
    assert json.loads(want.to_json())["data"] == got["data"]
    zero = view("memory", 0)["peak-bars"]["figure"]
    assert zero["data"] != got["data"]
    timeline = one.memory_timeline("lora", max_points=2000)
    want = figures.memory_timeline_area(timeline, "lora", "measured, rank 1",
                                        one.memory_time_label())
    assert json.loads(want.to_json())["data"] == memory["memory-timeline"]["figure"]["data"]

    for callback in ("latency", "timeline", "activations"):
        graph = CALLBACKS[callback][0][0].split(".")[0]  # the view's first output: its figure
        titles = {rank: view(callback, rank)[graph]["figure"]["layout"]["title"]["text"]
                  for rank in (0, 1)}
        assert "rank 0" in titles[0] and "rank 1" in titles[1], (callback, titles)
    bars = {rank: view("latency", rank)["latency-bars"]["figure"]["data"] for rank in (0, 1)}
    assert bars[0] != bars[1]

    compare = view("compare", 1, **{"compare-run__value": "tiny"})  # b holds rank 0 only
    note = json.dumps(compare["compare-table"])
    assert "a = two-ranks at rank 1, b = tiny:" in note
    assert "rank 1" in compare["compare-a"]["figure"]["layout"]["title"]["text"]


def test_the_simulated_rank_is_compared_with_the_picked_measured_rank(served):
    """Compare runs, measured bytes (a rank of the 2-rank trace) against simulated ones (a
    single-rank trace, as a simulated FSDP2 run is rank 0's): the measured side is the
    picked rank's, the simulated side its only rank."""
    for rank in (0, 1):
        reply = post(served, request_body("compare_bytes", run__value="two-ranks",
                                          rank__value=rank,
                                          **{"compare-run__value": "tiny-simulated"}))
        assert reply.status_code == 200 and alert_text(message_area(reply, "compare_bytes")) \
            is None
        response = reply.json()["response"]
        assert f"measured: two-ranks at rank {rank}, simulated: tiny-simulated;" in json.dumps(
            response["compare-bytes"])
        totals = {(r["method"], r["quantity"]): r
                  for r in table_cells(response, "compare-totals")}
        measured = TraceAnalysis(served.root / "two-ranks", rank=rank).trace.summary
        simulated = TraceAnalysis(served.root / "tiny-simulated").trace.summary
        for method in ("lora", "paca"):
            peak = totals[(method, "peak_bytes")]
            want = measured.set_index("method").loc[method, "peak_bytes"]
            assert as_number(peak["measured"]) == pytest.approx(float(want), rel=1e-3)
            assert as_number(peak["simulated"]) == pytest.approx(float(
                simulated.set_index("method").loc[method, "peak_bytes"]), rel=1e-3)


# --- The Capacity tab opens on the run's GPU -------------------------------------------------

@pytest.mark.parametrize("run,gpu,memory", [("plan", "a100-80gb", 80 * 2**30),
                                            ("plan-custom", "my-card-48g", 48 * 2**30)])
def test_capacity_opens_on_the_plans_gpu(served, run, gpu, memory):
    picked = post(served, request_body("pick_run", run__value=run, gpu__value="a100-40gb"))
    picked = picked.json()["response"]
    assert picked["gpu"]["value"] == gpu
    assert gpu in [o["value"] for o in picked["gpu"]["options"]]
    reply = post(served, request_body("capacity", run__value=run, gpu__value=gpu))
    budget = reply.json()["response"]["capacity-budget"]["children"]
    assert budget.startswith(f"{gpu}: {memory / 2**30:.2f} GiB")


# --- The listing ------------------------------------------------------------------------------

@pytest.fixture
def mixed_folder(tmp_path) -> Path:
    """Good runs beside every kind of unreadable or hostile folder."""
    root = tmp_path / "traces"
    outside = tmp_path / "outside"
    outside.mkdir()
    copy_trace(TINY, root / "a-good")
    copy_trace(TINY, root / "z-good")
    copy_trace(TINY, outside / "elsewhere")
    (root / "link-out").symlink_to(outside / "elsewhere", target_is_directory=True)
    copy_trace(TINY, root / "yaml-links-out")
    shutil.copy(root / "yaml-links-out" / "run.yaml", outside / "run.yaml")
    (root / "yaml-links-out" / "run.yaml").unlink()
    (root / "yaml-links-out" / "run.yaml").symlink_to(outside / "run.yaml")
    copy_trace(TINY, root / "table-links-out")
    shutil.copy(root / "table-links-out" / "ops.parquet", outside / "ops.parquet")
    (root / "table-links-out" / "ops.parquet").unlink()
    (root / "table-links-out" / "ops.parquet").symlink_to(outside / "ops.parquet")
    copy_trace(TINY, root / "dev-zero")
    (root / "dev-zero" / "run.yaml").unlink()
    (root / "dev-zero" / "run.yaml").symlink_to("/dev/zero")
    copy_trace(TINY, root / "fifo")
    (root / "fifo" / "run.yaml").unlink()
    os.mkfifo(root / "fifo" / "run.yaml")
    copy_trace(TINY, root / "fifo-table")
    (root / "fifo-table" / "memory.parquet").unlink()
    os.mkfifo(root / "fifo-table" / "memory.parquet")
    copy_trace(TINY, root / "integer-methods")
    edit_run(root / "integer-methods", lambda run: run.update(methods={1: {}, 2: {}}))
    copy_trace(TINY, root / "truncated")
    ops = root / "truncated" / "layers.parquet"
    ops.write_bytes(ops.read_bytes()[:100])
    (root / "foreign").mkdir()
    (root / "foreign" / "notes.txt").write_text("not a trace")
    copy_trace(TINY, root / "component-command")
    edit_run(root / "component-command", lambda run: run.update(command=IFRAME))
    copy_trace(TINY, root / "unnamed-method")
    edit_table(root / "unnamed-method", "summary", unnamed_method)
    copy_trace(TINY, root / "many-files")
    for i in range(300):
        (root / "many-files" / f"f{i}").write_text("")
    copy_trace(TINY, root / ".paca-prof-staging-abc123")
    copy_trace(TINY, root / ".hidden-run")
    os.mkfifo(root / "a-fifo-in-the-traces-folder")
    return root


UNREADABLE = {  # folder -> what its one-line reason says
    "link-out": "outside the traces folder",
    "yaml-links-out": "link that leaves",
    "table-links-out": "link that leaves",
    "dev-zero": "link that leaves",
    "fifo": "not a regular file",
    "fifo-table": "not a regular file",
    "integer-methods": "methods must map method names",
    "truncated": "unreadable layers.parquet",
    "foreign": "run.yaml",
    "component-command": "command is a dict",
    "many-files": "not a trace folder",
    "unnamed-method": "without a method",
}


def test_one_bad_folder_never_breaks_the_listing(mixed_folder):
    done: list = []
    worker = threading.Thread(target=lambda: done.append(runs.list_runs(mixed_folder)),
                              daemon=True)
    worker.start()
    worker.join(TIMEOUT)  # a FIFO that were opened would block here for ever
    assert done, "the listing hung"
    listed = {r.name: r for r in done[0]}
    assert set(listed) == {"a-good", "z-good", *UNREADABLE}  # hidden folders never listed
    assert listed["a-good"].ok and listed["z-good"].ok
    assert listed["a-good"].methods == ["frozen", "lora", "dora", "paca", "full"]
    for name, reason in UNREADABLE.items():
        error = listed[name].error
        assert error and reason in error and "\n" not in error, (name, error)
        assert str(mixed_folder) not in error, (name, error)


def test_the_listing_is_cached_by_signature_and_sees_rewrites(mixed_folder):
    first = runs.describe(mixed_folder, "a-good")
    assert runs.describe(mixed_folder, "a-good") is first  # cached
    edit_run(mixed_folder / "a-good", lambda run: run["model"].update(name="renamed"))
    again = runs.describe(mixed_folder, "a-good")
    assert again is not first and again.model == "renamed"
    (mixed_folder / "a-good" / "summary.parquet").write_bytes(b"PAR1broken")
    assert "summary.parquet" in runs.describe(mixed_folder, "a-good").error


def test_the_listing_over_http_shows_reasons(mixed_folder):
    app = Served(mixed_folder)
    try:
        reply = post(app, request_body("list_runs"))
        assert_clean(reply)
        response = reply.json()["response"]
        assert response["run"]["value"] == "a-good"
        disabled = {o["value"] for o in response["run"]["options"] if o["disabled"]}
        assert disabled == set(UNREADABLE)
        reply = post(app, request_body("runs_table"))
        assert_clean(reply)
        table = json.dumps(reply.json()["response"]["runs-table"])
        for reason in UNREADABLE.values():
            assert reason in table
        assert "hidden-run" not in table and "staging" not in table
    finally:
        app.close()


def test_listing_200_runs(tmp_path, capsys):
    """200 runs listed over HTTP: the first listing reads each folder's run.yaml, summary and
    parquet footers; later ones only their signatures. Times printed, never asserted."""
    root = tmp_path / "traces"
    copy_trace(TINY, root / "run-000")
    for i in range(1, 200):
        shutil.copytree(root / "run-000", root / f"run-{i:03d}")
    app = Served(root)  # preload describes them in the background; the timing waits for it
    try:
        start = time.perf_counter()
        reply = post(app, request_body("list_runs"))
        first = time.perf_counter() - start
        assert reply.status_code == 200
        options = reply.json()["response"]["run"]["options"]
        assert len(options) == 200 and not any(o["disabled"] for o in options)
        warm = []
        for _ in range(7):
            start = time.perf_counter()
            assert post(app, request_body("list_runs")).status_code == 200
            warm.append(time.perf_counter() - start)
        size = RUNS_PAGE
        last = -(-200 // size)
        page = post(app, request_body("runs_table", **{"runs-page__value": last})).json()
        page = page["response"]
        assert page["runs-page"]["options"] == list(range(1, last + 1))
        assert page["runs-page"]["value"] == last
        first_row = (last - 1) * size
        assert page["runs-count"]["children"] == f"200 runs; rows {first_row + 1}-200 shown"
        names = [s for s in strings(page["runs-table"]) if s.startswith("run-")]
        assert names == [f"run-{i:03d}" for i in range(first_row, 200)]
        filtered = post(app, request_body("runs_table", **{"runs-filter__value": "RUN-19",
                                                           "runs-page__value": 3})).json()
        filtered = filtered["response"]
        assert filtered["runs-page"]["value"] == 1  # past the last page of the matches
        assert filtered["runs-count"]["children"] == "10 runs"  # run-190 to run-199
    finally:
        app.close()
    with capsys.disabled():
        print(f"\n[dashboard] listing 200 runs over HTTP: first {first:.2f} s, then median "
              f"{statistics.median(warm):.3f} s (min {min(warm):.3f}, max {max(warm):.3f}, "
              f"n={len(warm)}; load average {os.getloadavg()[0]:.2f})")


def test_the_listing_never_loads_whole_traces(mixed_folder, monkeypatch):
    loaded = []
    monkeypatch.setattr(TraceAnalysis, "__init__", lambda self, source: loaded.append(source))
    runs.list_runs(mixed_folder)
    assert loaded == []


# --- Serving ----------------------------------------------------------------------------------

@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "example.org"])
def test_serve_refuses_debug_off_loopback(traces, host):
    from dashboards.app import serve

    with pytest.raises(ValueError, match="loopback"):
        serve(traces, host=host, debug=True)


def test_serve_allows_debug_on_loopback_only(traces, monkeypatch):
    import dash

    from dashboards.app import is_loopback, serve

    ran = []
    monkeypatch.setattr(dash.Dash, "run", lambda self, **kw: ran.append(kw))
    monkeypatch.setattr("dashboards.app._check_address", lambda host, port: None)  # 8050 may be taken
    serve(traces, host="127.0.0.1", debug=True)
    serve(traces, host="0.0.0.0", debug=False)
    assert ran == [{"host": "127.0.0.1", "port": 8050, "debug": True},
                   {"host": "0.0.0.0", "port": 8050, "debug": False}]
    assert is_loopback("::1") and is_loopback("localhost") and is_loopback("127.0.0.2")
    assert not is_loopback("0.0.0.0") and not is_loopback("localhost.example.org")


def test_serve_refuses_an_address_it_cannot_listen_on_before_dash_starts(traces, monkeypatch):
    import socket

    import dash

    from dashboards.app import serve

    monkeypatch.setattr(dash.Dash, "run", lambda self, **kw: pytest.fail("Dash started"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ValueError, match=f"cannot serve on 127.0.0.1:{port}: .*in use"):
            serve(traces, host="127.0.0.1", port=port)


# --- The spread of measured step times ----------------------------------------------------

def _with_steps(path: Path, paca_factor: list[float]) -> None:
    """Give a copied trace a steps table: lora at 10 ms each round, paca at lora's time times
    paca_factor[round]; the summary's spread columns left out (the analyzer recomputes them)."""
    rows = []
    for round_, factor in enumerate(paca_factor):
        for method, ms in (("lora", 10.0), ("paca", 10.0 * factor)):
            rows.append({"method": method, "round": round_, "step": round_, "step_ms": ms,
                         "forward_ms": ms / 2, "backward_ms": ms / 2, "optimizer_ms": 0.0})
    pd.DataFrame(rows).to_parquet(path / "steps.parquet", index=False)


def test_the_overview_flags_a_ratio_whose_interval_contains_1(tmp_path):
    from dashboards.app import _spread

    unresolved = copy_trace(TINY, tmp_path / "unresolved")
    _with_steps(unresolved, [0.8, 1.2, 0.9, 1.1, 1.0, 0.85, 1.15, 1.0])
    block = str(_spread(TraceAnalysis(unresolved), ["lora", "paca"], "measured"))
    assert "spread-table" in block and "spread-flag" in block
    assert "paca: its step-time ratio to lora is not resolved" in block
    assert "lora: its step-time ratio" not in block
    clear = copy_trace(TINY, tmp_path / "clear")
    _with_steps(clear, [0.8, 0.81, 0.79, 0.8, 0.8, 0.82, 0.8, 0.8])
    block = str(_spread(TraceAnalysis(clear), ["lora", "paca"], "measured"))
    assert "spread-table" in block and "spread-flag" not in block
    # a trace without a steps table (the samples, written before it) shows step_ms only
    table = TraceAnalysis(TINY).timing_spread(methods=["lora", "paca"])
    assert table["step_ms"].notna().all() and not table["contains_1"].any()
