"""The Dash dashboard, driven headless in a real browser (Debian's chromium and chromedriver
through plain selenium; no browser download, no network), plus its path check and the
capacity helpers it calls.

Sample traces are written once per session by the project's own commands: a tiny measured CPU
run, a llama3-8b simulated run (projected times), a copy of the latter with a capacity sweep
(capacity.parquet), a llama3.1-70b simulated run (80 layers, five methods: every view's render
time is printed) and broken folders beside them; the shipped plan sample stands for a plan
trace. The app is served from a thread on a free port of 127.0.0.1. Screenshots go to
artifacts/screenshots/. tests/test_dashboard_http.py drives the same callbacks over HTTP with
hostile input, without a browser.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import checkout_env

from dashboards import runs
from paca_prof.analyze import TraceAnalysis, analyses, capacity
from paca_prof.budget import make_budget
from paca_prof import trace as trace_io
from paca_prof.trace import TraceError

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOTS = ROOT / "artifacts" / "screenshots"
CHROMIUM = Path(os.environ.get("PACA_PROF_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("PACA_PROF_CHROMEDRIVER", "/usr/bin/chromedriver"))
WAIT_S = 60  # generous: CI machines are slow and shared; no test asserts wall-clock time
POLL_S = 0.02  # how often a wait looks: fine enough for the printed render times
LLAMA = "llama3-8b-capacity"  # the simulated llama3-8b run with a capacity sweep
LLAMA_70B = "llama3.1-70b"
PLAN_SAMPLE = ROOT / "traces" / "sample-plan-llama3-8b-a100-80gb"
METHODS = ["frozen", "lora", "dora", "paca", "full"]
GIB = 2**30
CUSTOM_GPU = {"name": "my-card-48g", "memory_bytes": 48 * GIB, "bf16_tflops": 200.0,
              "fp16_tflops": 200.0, "fp32_tflops": 50.0, "hbm_gbps": 1500.0,
              "source": "a test card"}


# --- Sample traces ---------------------------------------------------------------------------

def _paca_prof(*args: str) -> subprocess.Popen:
    env = checkout_env(PYTHONWARNINGS="ignore")
    return subprocess.Popen([sys.executable, "-m", "paca_prof.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def write_capacity_sweep(trace_path: Path, seqs=(512, 1024, 2048, 4096, 8192, 16384, 32768)):
    """A stand-in for the planner's sweep: the trace's peak breakdown with activations and
    logits growing linearly in the sequence length (the rest fixed), at the trace's batch."""
    analysis = TraceAnalysis(trace_path)
    seq, batch = analysis.trace.run["seq"], analysis.trace.run["batch"]
    rows = [dict(method=r.method, seq=s, batch=batch, category=r.category,
                 bytes=int(r.bytes) * s // seq if r.category in ("activations", "logits_loss")
                 else int(r.bytes))
            for s in seqs for r in analysis.peak_breakdown().itertuples()]
    pd.DataFrame(rows).to_parquet(trace_path / capacity.CAPACITY_FILE, index=False)


@pytest.fixture(scope="session")
def traces_dir(tmp_path_factory) -> Path:
    """A traces folder: tiny-cpu (measured), tiny-meta (its simulation), llama3-8b (simulated, projected times),
    llama3-8b-capacity (the same with a capacity sweep), llama3.1-70b (simulated), the shipped
    plan sample (plan-a100-80gb) and a copy of it planned for a custom GPU spec, and four
    unreadable folders."""
    root = tmp_path_factory.mktemp("dash-traces")
    jobs = {
        "tiny-cpu": _paca_prof("run", "--model", "tiny", "--seq", "64", "--batch", "2",
                               "--device", "cpu", "--steps", "2", "--warmup", "1",
                               "--out", str(root / "tiny-cpu")),
        "tiny-meta": _paca_prof("run", "--model", "tiny", "--seq", "64", "--batch", "2",
                                "--device", "meta", "--dtype", "fp32",
                                "--out", str(root / "tiny-meta")),
        "llama3-8b": _paca_prof("run", "--model", "llama3-8b", "--seq", "4096",
                                "--out", str(root / "llama3-8b")),
        LLAMA_70B: _paca_prof("run", "--model", "llama3.1-70b", "--seq", "4096",
                              "--out", str(root / LLAMA_70B)),
    }
    for name, job in jobs.items():
        output, _ = job.communicate(timeout=900)
        assert job.returncode == 0, f"paca-prof run for {name} failed:\n{output[-3000:]}"
    shutil.copytree(root / "llama3-8b", root / LLAMA)
    write_capacity_sweep(root / LLAMA)

    (root / "broken-yaml").mkdir()
    (root / "broken-yaml" / "run.yaml").write_text("schema_version: [1\nsource: {")
    shutil.copytree(root / "tiny-cpu", root / "broken-parquet")
    ops = root / "broken-parquet" / "ops.parquet"
    ops.write_bytes(ops.read_bytes()[: ops.stat().st_size // 2])
    shutil.copytree(root / "tiny-cpu", root / "broken-schema")
    run_yaml = root / "broken-schema" / "run.yaml"
    run_yaml.write_text(run_yaml.read_text().replace("schema_version: 1", "schema_version: 2"))
    (root / "foreign").mkdir()
    (root / "foreign" / "notes.txt").write_text("not a trace")
    (root / ".llama3-8b.x.partial").mkdir()  # a run being written: hidden, never listed
    shutil.copytree(PLAN_SAMPLE, root / "plan-a100-80gb")
    shutil.copytree(PLAN_SAMPLE, root / "plan-custom-gpu")
    run_yaml = root / "plan-custom-gpu" / "run.yaml"
    run = yaml.safe_load(run_yaml.read_text())
    run["gpu"] = CUSTOM_GPU
    run_yaml.write_text(yaml.safe_dump(run, sort_keys=False))
    return root


# --- Serving and the browser -----------------------------------------------------------------

def _quiet_handler():
    from werkzeug.serving import WSGIRequestHandler

    class QuietHandler(WSGIRequestHandler):
        def log_request(self, *args, **kwargs):  # no access log in the test output
            pass

    return QuietHandler


class Served:
    """The dashboard over `traces_dir`, served by werkzeug from a daemon thread."""

    def __init__(self, traces_dir: Path):
        from werkzeug.serving import make_server

        from dashboards.app import create_app

        self.root = traces_dir
        self.app = create_app(traces_dir)
        self.server = make_server("127.0.0.1", 0, self.app.server, threaded=True,
                                  request_handler=_quiet_handler())
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.thread.join(10)


@pytest.fixture(scope="module")
def served(traces_dir):
    app = Served(traces_dir)
    yield app
    app.close()


@pytest.fixture(scope="module")
def driver():
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip(f"needs {CHROMIUM} and {CHROMEDRIVER} "
                    "(apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1440,1000", "--disable-extensions",
                 "--disable-background-networking", "--no-first-run"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: selenium's driver manager (which downloads) is never used.
    browser = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    browser.set_page_load_timeout(WAIT_S)
    yield browser
    browser.quit()


def wait(driver, condition, message: str, timeout: float = WAIT_S):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=POLL_S).until(
        lambda d: condition(d) or None, message)


GRAPH_JS = """
const gd = document.querySelector('#' + arguments[0] + ' .js-plotly-plot');
if (!gd || !gd.data || !gd._fullLayout) return null;
const points = (gd.calcdata || []).reduce((n, c) => n + c.length, 0);
const title = gd.layout.title ? (gd.layout.title.text || gd.layout.title) : '';
const xs = gd.data.flatMap(t => (t.x && typeof t.x[0] === 'string') ? Array.from(t.x) : []);
const names = gd.data.map(t => t.name);
return {traces: gd.data.length, points: points, title: String(title), xs: xs, names: names};
"""


def graph(driver, graph_id: str) -> dict | None:
    """What a rendered dcc.Graph shows: traces, points, title, categorical x values."""
    return driver.execute_script(GRAPH_JS, graph_id)


def wait_graph(driver, graph_id: str, predicate=lambda g: True) -> dict:
    """Wait until a graph is drawn with data (and `predicate` holds); returns graph()."""
    def ready(d):
        state = graph(d, graph_id)
        return state if state and state["traces"] and state["points"] and predicate(state) \
            else None
    return wait(driver, ready, f"graph #{graph_id} never rendered with data")


def text(driver, element_id: str) -> str:
    return driver.execute_script(
        "const e = document.getElementById(arguments[0]); return e ? e.textContent : '';",
        element_id)


def open_tab(driver, label: str):
    from selenium.webdriver.common.by import By

    tab = driver.find_element(By.XPATH, f"//div[@id='tabs']/div[span[text()='{label}']]")
    click(driver, tab)
    wait(driver, lambda d: "tab--selected" in tab.get_attribute("class"), f"tab {label}")


def pick(driver, dropdown_id: str, value: str):
    """Choose `value` in a dcc.Dropdown (Dash 4: a button opening a listbox popover)."""
    from selenium.webdriver.common.by import By

    click(driver, driver.find_element(By.ID, dropdown_id))
    search = wait(driver, lambda d: next(iter(d.find_elements(
        By.CSS_SELECTOR, ".dash-dropdown-content input.dash-dropdown-search")), None),
        f"#{dropdown_id} never opened")
    search.send_keys(value)
    find = """return Array.from(document.querySelectorAll(
        '.dash-dropdown-content label.dash-dropdown-option')).find(
        o => o.querySelector('input') && o.querySelector('input').value === arguments[0]);"""
    option = wait(driver, lambda d: d.execute_script(find, value),
                  f"option {value} of #{dropdown_id}")
    click(driver, option)


def click(driver, element):
    """Click an element after scrolling it to the middle of the window (clear of the sticky
    header)."""
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", element)
    element.click()


def toggle_method(driver, method: str):
    from selenium.webdriver.common.by import By

    click(driver, driver.find_element(By.CSS_SELECTOR,
                                      f"#methods label:has(input[value='{method}'])"))


def severe_console_entries(driver) -> list[dict]:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def load_page(driver, url: str):
    driver.get(url)
    wait(driver, lambda d: text(d, "run-info"), "the run header never filled in")


def screenshot(driver, name: str, height: int | None = None):
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    if height:
        driver.set_window_size(1440, height)
        time.sleep(0.5)
    driver.save_screenshot(str(SCREENSHOTS / f"{name}.png"))
    if height:
        driver.set_window_size(1440, 1000)


def view_errors(driver) -> list[str]:
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('.view-error')).map(e => e.textContent)")


def table_rows(driver, table_id: str) -> list[dict[str, str]]:
    """A rendered analyzer table as a list of {column header: cell text}."""
    return driver.execute_script("""
        const table = document.getElementById(arguments[0]);
        if (!table) return [];
        const heads = Array.from(table.querySelectorAll('thead th')).map(h => h.textContent);
        return Array.from(table.querySelectorAll('tbody tr')).map(r => Object.fromEntries(
            Array.from(r.cells).map((c, i) => [heads[i], c.textContent])));""", table_id)


def as_number(cell: str) -> float:
    return float("nan") if cell in ("–", "") else float(cell.replace(",", ""))


def max_seq(driver) -> dict[str, int]:
    """The capacity view's table: method -> max_seq."""
    rows = driver.execute_script("""
        return Array.from(document.querySelectorAll('#capacity-max-seq tbody tr'))
            .map(r => Array.from(r.cells).map(c => c.textContent));""")
    return {row[0]: int(row[1].replace(",", "")) for row in rows}


# --- Unit tests: the path check and the capacity helpers -------------------------------------

@pytest.mark.parametrize("name", ["../../etc", "..", ".", "", "/etc", "/", "tiny-cpu/..",
                                  "tiny-cpu/../../x", "a/b", "..\\..\\etc", "tiny\x00",
                                  None, 3, ["tiny-cpu"], "no-such-run"])
def test_run_path_rejects_anything_but_a_run_folder(tmp_path, name):
    (tmp_path / "tiny-cpu").mkdir()
    with pytest.raises(runs.RunPathError):
        runs.run_path(tmp_path, name)


def test_run_path_accepts_a_run_and_rejects_links_out(tmp_path):
    traces, outside = tmp_path / "traces", tmp_path / "outside"
    (traces / "run-a").mkdir(parents=True)
    outside.mkdir()
    (traces / "escape").symlink_to(outside, target_is_directory=True)
    assert runs.run_path(traces, "run-a") == (traces / "run-a").resolve()
    with pytest.raises(runs.RunPathError, match="outside"):
        runs.run_path(traces, "escape")
    listed = {r.name: r for r in runs.list_runs(traces)}
    assert not listed["escape"].ok and "outside" in listed["escape"].error


def test_max_seq_interpolates_between_points_and_never_extrapolates():
    curve = pd.DataFrame({
        "method": ["lora"] * 6 + ["paca"] * 6,
        "seq": [1024, 1024, 2048, 2048, 4096, 4096] * 2,
        "batch": 1,
        "category": ["weights", "activations"] * 6,
        "bytes": [10, 2, 10, 4, 10, 8, 10, 1, 10, 2, 10, 3],
    }).astype({"bytes": float})
    best = capacity.max_seq_from_curve(curve, 13.0)  # lora: 12 @1024, 14 @2048
    assert best == {"lora": 1536, "paca": 4096}
    assert capacity.max_seq_from_curve(curve, 11.0) == {"lora": 0, "paca": 1024}
    table = capacity.max_seq_table(curve, 13.0).set_index("method")
    assert table.loc["paca", "lower_bound"] and not table.loc["lora", "lower_bound"]
    assert table.loc["paca", "max_seq_vs_lora"] == pytest.approx(4096 / 1536)


def test_load_capacity(tmp_path):
    assert capacity.load_capacity(tmp_path) is None
    frame = pd.DataFrame({"method": ["lora"], "seq": [1024], "batch": [1],
                          "category": ["weights"], "bytes": [1]})
    frame.to_parquet(tmp_path / "capacity.parquet")
    assert capacity.load_capacity(tmp_path).equals(trace_io.conform(frame, "capacity"))
    data = (tmp_path / "capacity.parquet").read_bytes()
    (tmp_path / "capacity.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(TraceError, match="unreadable"):
        capacity.load_capacity(tmp_path)
    frame.drop(columns="batch").to_parquet(tmp_path / "capacity.parquet")
    with pytest.raises(TraceError, match="batch"):
        capacity.load_capacity(tmp_path)


def test_downsample_timeline_keeps_the_peak():
    timeline = pd.DataFrame({"t": range(10_000), "weights": 5.0})
    timeline["activations"] = [float((i * 7919) % 1000) for i in range(10_000)]
    timeline.loc[4321, "activations"] = 5000.0
    timeline["total"] = timeline["weights"] + timeline["activations"]
    small = analyses.downsample_timeline(timeline, max_points=500)
    assert len(small) <= 500 and small["total"].max() == timeline["total"].max()
    assert small.index[0] == 0 and small.index[-1] == 9_999
    short = timeline.head(100)
    assert analyses.downsample_timeline(short, 500).equals(short)  # returned as is


def _layers_table(paths_and_kinds, methods=("lora",)) -> pd.DataFrame:
    """A layers table of the given (module, kind) rows, forward and backward, the i-th row
    taking 1 + i ms."""
    rows = [dict(method=m, module=path, phase=phase, kind=kind, depth=path.count(".") + 1,
                 latency_ms=1.0 + i, n_kernels=1)
            for m in methods for i, (path, kind) in enumerate(paths_and_kinds)
            for phase in ("forward", "backward")]
    return trace_io.conform(pd.DataFrame(rows), "layers")


def _tree(prefix: str, n: int, block_kind: str, container: str = "container"):
    rows = [("[root]", "model"), (prefix, container)]
    for i in range(n):
        rows += [(f"{prefix}.{i}", block_kind), (f"{prefix}.{i}.attn", "attention"),
                 (f"{prefix}.{i}.attn.q", "linear"), (f"{prefix}.{i}.attn.q.lora_A", "adapter"),
                 (f"{prefix}.{i}.mlp", "mlp"), (f"{prefix}.{i}.mlp.up", "linear")]
    return rows


@pytest.mark.parametrize("rows,expected", [
    (_tree("model.layers", 12, "decoder_layer"), [f"model.layers.{i}" for i in range(12)]),
    (_tree("transformer.h", 3, "other"), ["transformer.h.0", "transformer.h.1",
                                          "transformer.h.2"]),
    (_tree("blocks", 2, "other") + [("blocks.0.experts", "container"),
                                    ("blocks.0.experts.0", "mlp")], ["blocks.0", "blocks.1"]),
    ([("[root]", "model"), ("encoder.first", "decoder_layer"), ("encoder.first.ff", "mlp"),
      ("encoder.second", "decoder_layer"), ("encoder.second.ff", "mlp")],
     ["encoder.first", "encoder.second"]),
    ([("[root]", "model"), ("[loss]", "loss"), ("lm_head", "head")], []),
], ids=["llama", "gpt2", "nested-lists", "named-blocks", "no-layers"])
def test_layers_of_any_module_tree(rows, expected):
    layers = _layers_table(rows)
    assert analyses.decoder_layers(layers) == expected  # model.layers.10 after .9
    targets = analyses.drill_targets(layers, expected)
    assert set(expected) <= set(targets)
    owners = analyses.layer_of(pd.Series([p for p, _ in rows]), expected)
    for (path, _), owner in zip(rows, owners):
        inside = [layer for layer in expected if path == layer or path.startswith(layer + ".")]
        assert owner == (inside[0] if inside else None), path
    bars = analyses.latency_bars(layers, None, expected)
    assert list(dict.fromkeys(bars["module"])) == expected
    first = expected[0] if expected else None
    if first and f"{first}.attn" in targets:
        options = analyses.drill_options(targets, expected, f"{first}.attn")
        assert options[: 2] == [first, f"{first}.attn"] and f"{first}.attn.q" in options
        assert analyses.drill_up(f"{first}.attn", expected) == first
        assert analyses.drill_up(first, expected) is None


def test_latency_bars_group_a_very_deep_model():
    layers = _layers_table(_tree("model.layers", 200, "decoder_layer"), methods=("lora", "paca"))
    names = analyses.decoder_layers(layers)
    bars = analyses.latency_bars(layers, None, names, max_bars=96)
    per = bars[(bars["method"] == "lora") & (bars["phase"] == "forward")]
    assert len(per) <= 96 and per["layers"].sum() == 200
    assert per["label"].iloc[0] == "0-2" and per["label"].iloc[-1].endswith("-199")
    rows = layers[(layers["kind"] == "decoder_layer") & (layers["method"] == "lora")
                  & (layers["phase"] == "forward")]
    assert per["latency_ms"].iloc[0] == pytest.approx(rows["latency_ms"].iloc[:3].mean())
    assert (per["latency_ms"] * per["layers"]).sum() == pytest.approx(rows["latency_ms"].sum())
    assert len(analyses.latency_bars(layers, None, names[:80])) == 80 * 2 * 2  # not grouped


def test_layer_ops_time_one_layer_from_its_first_op_and_merge_very_many():
    n = 9000
    ops = trace_io.conform(pd.DataFrame({
        "method": "lora", "module": [f"model.layers.3.{'mlp' if i % 3 else 'attn'}"
                                     for i in range(n)],
        "phase": "forward", "name": "aten::mm", "seq_no": range(n),
        "start_us": [1000.0 + 2 * i for i in range(n)], "dur_us": 1.5,
        "adapter_branch": [i % 5 == 0 for i in range(n)]}), "ops")
    few = analyses.layer_ops(ops.head(300), "lora", "model.layers.3", "forward")
    assert len(few) == 300 and few["t_us"].iloc[0] == 0.0 and few["count"].eq(1).all()
    assert set(few["row"]) == {"mlp", "attn"}
    merged = analyses.layer_ops(ops, "lora", "model.layers.3", "forward", max_ops=1000)
    assert len(merged) <= 1000 and merged["count"].sum() == n
    for (row, branch), group in merged.groupby(["row", "adapter_branch"]):
        mine = ops[(ops["module"] == f"model.layers.3.{row}") & (ops["adapter_branch"] == branch)]
        assert group["dur_us"].sum() == pytest.approx(mine["dur_us"].sum())
        assert group["count"].sum() == len(mine)
    assert analyses.layer_ops(ops, "lora", "model.layers.3", "backward").empty


def test_listing_and_navigation_helpers(traces_dir):
    listed = {r.name: r for r in runs.list_runs(traces_dir)}
    assert ".llama3-8b.x.partial" not in listed
    assert listed["tiny-cpu"].ok and listed["tiny-cpu"].source == "measured"
    assert listed[LLAMA].sources == {"time": "projected", "bytes": "simulated",
                                      "reserved": "simulated"}
    assert "run.yaml" in listed["broken-yaml"].error
    assert "ops.parquet" in listed["broken-parquet"].error
    assert "schema_version 2" in listed["broken-schema"].error
    assert not listed["foreign"].ok
    layers = runs.analysis(traces_dir, "tiny-cpu").trace.layers
    assert analyses.decoder_layers(layers) == ["model.layers.0", "model.layers.1"]
    targets = analyses.drill_targets(layers)
    assert {"model.layers.0", "model.layers.0.self_attn",
            "model.layers.0.self_attn.q_proj"} <= set(targets)
    assert analyses.drill_up("model.layers.0.self_attn.q_proj") == "model.layers.0.self_attn"
    assert analyses.drill_up("model.layers.0") is None


def test_serve_defaults_are_safe(traces_dir):
    import inspect

    from dashboards.app import create_app, serve

    defaults = inspect.signature(serve).parameters
    assert defaults["host"].default == "127.0.0.1" and defaults["debug"].default is False
    app = create_app(traces_dir, preload=False)
    assert app.config.serve_locally and not app.config.external_stylesheets
    assert not app.config.external_scripts
    with pytest.raises(ValueError):
        create_app(traces_dir / "no-such-folder")


# --- In the browser --------------------------------------------------------------------------

def test_first_render_of_llama3_8b_with_five_methods(traces_dir, tmp_path, driver, capsys):
    """A fresh app over a trace nothing has loaded yet: time from navigation until the
    overview's graphs are drawn with data for all five methods (printed, not asserted)."""
    fresh = tmp_path / "traces"
    shutil.copytree(traces_dir / LLAMA, fresh / "llama3-8b")
    app = Served(fresh)
    try:
        start = time.perf_counter()
        driver.get(app.url)
        bars = wait_graph(driver, "overview-bars", lambda g: set(g["xs"]) == set(METHODS))
        wait_graph(driver, "overview-ratios")
        elapsed = time.perf_counter() - start
        assert "projected" in bars["title"]
        assert severe_console_entries(driver) == []
        screenshot(driver, "first-render-llama3-8b")
        start = time.perf_counter()
        driver.refresh()
        wait_graph(driver, "overview-bars", lambda g: set(g["xs"]) == set(METHODS))
        wait_graph(driver, "overview-ratios")
        warm = time.perf_counter() - start
    finally:
        app.close()
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    (SCREENSHOTS.parent / "first_render.json").write_text(json.dumps(
        {"first_render_s": round(elapsed, 3), "reload_s": round(warm, 3)}))
    with capsys.disabled():
        print(f"\n[dashboard] first render of llama3-8b (5 methods): {elapsed:.2f} s "
              f"(reload with the trace cached: {warm:.2f} s)")


def test_every_view_renders_with_data(served, driver):
    load_page(driver, f"{served.url}/?run={LLAMA}")
    info = text(driver, "run-info")
    assert "projected" in info and "simulated" in info and "llama3-8b" in info
    wait_graph(driver, "overview-bars", lambda g: set(g["xs"]) == set(METHODS))
    wait_graph(driver, "overview-ratios")
    # the overview table shows the analyzer's numbers for the trace (3 decimals on screen)
    shown = {row["method"]: row for row in table_rows(driver, "summary-table")}
    expected = runs.analysis(served.root, LLAMA).summary(baseline="lora").set_index("method")
    assert set(shown) == set(METHODS)
    for method in METHODS:
        for column in ("step_ms", "forward_ms", "ops_per_step", "peak_mib", "step_ms_vs_lora"):
            assert as_number(shown[method][column]) == pytest.approx(
                float(expected.loc[method, column]), abs=1e-3), (method, column)
    screenshot(driver, "overview", 1300)

    open_tab(driver, "Layer latency")
    bars = wait_graph(driver, "latency-bars", lambda g: "Latency per layer" in g["title"])
    assert bars["traces"] >= len(METHODS)
    screenshot(driver, "latency")

    open_tab(driver, "Kernel timeline")
    timeline = wait_graph(driver, "timeline-graph", lambda g: "model.layers.0" in g["title"])
    assert {"base model", "adapter branch"} <= set(timeline["names"])
    assert "adapter-branch ops" in text(driver, "timeline-overhead")
    screenshot(driver, "kernel-timeline")

    open_tab(driver, "Activations")
    activations = wait_graph(driver, "activation-bars")
    assert "frozen floor" in activations["names"]
    totals = {row["method"]: row for row in table_rows(driver, "activation-totals")}
    expected = runs.analysis(served.root, LLAMA).activation_totals().set_index("method")
    for method in METHODS:  # shown in MiB
        assert as_number(totals[method]["MiB"]) == pytest.approx(
            expected.loc[method, "bytes"] / 2**20, abs=0.01), method
    screenshot(driver, "activations")

    open_tab(driver, "Memory")
    wait_graph(driver, "memory-timeline", lambda g: "lora" in g["title"])
    peak = wait_graph(driver, "peak-bars")
    assert {"weights", "activations"} <= set(peak["names"])
    screenshot(driver, "memory")

    open_tab(driver, "Capacity")
    wait_graph(driver, "capacity-graph", lambda g: "Peak memory vs sequence" in g["title"])
    wait(driver, lambda d: max_seq(d), "capacity table")
    sweep = runs.analysis(served.root, LLAMA).trace.capacity
    budget = make_budget(gpu="a100-80gb")  # the run's GPU, with the default headroom
    curve, _ = capacity.select_batch(sweep)
    expected = capacity.max_seq_table(curve, budget.budget_bytes).set_index("method")
    assert max_seq(driver) == {m: int(expected.loc[m, "max_seq"]) for m in METHODS}
    screenshot(driver, "capacity")

    open_tab(driver, "Compare runs")
    wait_graph(driver, "compare-a")
    wait_graph(driver, "compare-b")
    assert "latency_ms_delta" in text(driver, "compare-changes")
    screenshot(driver, "compare")

    assert view_errors(driver) == []
    assert severe_console_entries(driver) == []
    resources = driver.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)")
    assert resources and all(r.startswith(served.url + "/") for r in resources), \
        "the page fetched something from another host"


def test_drill_down_by_click_and_dropdown(served, driver):
    from selenium.webdriver.common.by import By

    load_page(driver, f"{served.url}/?run=tiny-cpu")
    open_tab(driver, "Layer latency")
    wait_graph(driver, "latency-bars", lambda g: "Latency per layer" in g["title"])
    from selenium.webdriver.common.action_chains import ActionChains

    from selenium.common.exceptions import TimeoutException

    for attempt in range(5):  # plotly needs the hover before the click: retry on a busy CI
        bar = driver.find_element(By.CSS_SELECTOR, "#latency-bars g.point path")
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", bar)
        # plotly listens on its drag layer above the bars: click there, at the bar's position
        ActionChains(driver).move_to_element(bar).pause(0.5).click().perform()
        try:
            layer = wait(driver, lambda d: graph(d, "latency-bars") if "model.layers." in (
                graph(d, "latency-bars") or {}).get("title", "") else None, "drill", 10)
            break
        except TimeoutException:
            if attempt == 4:
                raise
    assert {"self_attn", "mlp"} <= set(layer["xs"])
    pick(driver, "drill", "model.layers.1.self_attn.q_proj")
    parts = wait_graph(driver, "latency-bars", lambda g: "q_proj" in g["title"])
    assert {"base_layer", "lora_A", "lora_B", "lora_dropout"} <= set(parts["xs"])  # adapter
    click(driver, driver.find_element(By.ID, "drill-up"))
    wait_graph(driver, "latency-bars", lambda g: g["title"].startswith(
        "Latency per module in model.layers.1.self_attn "))
    screenshot(driver, "latency-drill-down")
    assert severe_console_entries(driver) == []


def test_compare_measured_with_simulated_bytes(served, driver):
    """Compare runs, a measured and a simulated trace (in either order): the analyzer's totals
    table, the peak by category and the activations by module of the chosen method."""
    load_page(driver, f"{served.url}/?run=tiny-meta")  # the simulated one first: swapped
    open_tab(driver, "Compare runs")
    pick(driver, "compare-run", "tiny-cpu")
    peak = wait_graph(driver, "compare-peak", lambda g: "measured vs simulated" in g["title"])
    assert peak["names"] == ["measured", "simulated"]
    measured = runs.analysis(served.root, "tiny-cpu")
    simulated = runs.analysis(served.root, "tiny-meta")
    methods = measured.compared_methods(simulated)
    assert peak["title"].endswith(methods[0])
    totals = table_rows(driver, "compare-totals")
    assert {row["method"] for row in totals} == set(methods)
    pick(driver, "compare-method", "paca")
    wait_graph(driver, "compare-peak", lambda g: g["title"].endswith("paca"))
    wait_graph(driver, "compare-activations", lambda g: g["title"].endswith("paca"))
    screenshot(driver, "compare-measured-simulated")
    pick(driver, "compare-run", LLAMA)  # two simulated runs: said, not an error
    wait(driver, lambda d: "one run with measured bytes" in text(d, "compare-bytes"),
         "the pairing note")
    assert view_errors(driver) == [] and severe_console_entries(driver) == []


def test_changing_methods_layer_and_gpu_updates_views(served, driver):
    load_page(driver, f"{served.url}/?run={LLAMA}")
    wait_graph(driver, "overview-bars", lambda g: "dora" in g["xs"])
    toggle_method(driver, "dora")
    bars = wait_graph(driver, "overview-bars", lambda g: "dora" not in g["xs"])
    assert set(bars["xs"]) == set(METHODS) - {"dora"}
    assert "dora" not in text(driver, "summary-table")

    open_tab(driver, "Kernel timeline")
    wait_graph(driver, "timeline-graph", lambda g: "model.layers.0, lora" in g["title"])
    pick(driver, "timeline-layer", "model.layers.5")
    pick(driver, "timeline-method", "paca")
    wait_graph(driver, "timeline-graph", lambda g: "model.layers.5, paca" in g["title"])

    open_tab(driver, "Capacity")
    wait(driver, lambda d: max_seq(d) and "a100-80gb" in text(d, "capacity-budget"), "capacity")
    on_a100 = max_seq(driver)
    assert "dora" not in on_a100 and on_a100["paca"] > on_a100["lora"]
    pick(driver, "gpu", "h200")
    wait(driver, lambda d: "h200" in text(d, "capacity-budget"), "GPU change")
    on_h200 = wait(driver, lambda d: max_seq(d) if max_seq(d) != on_a100 else None, "h200")
    assert all(on_h200[m] >= on_a100[m] for m in on_a100) and on_h200 != on_a100
    from selenium.webdriver.common.by import By

    free = driver.find_element(By.ID, "free-gib")
    free.clear()
    free.send_keys("40")
    given = make_budget(memory="40GiB")  # the default headroom, no CUDA context
    expected_budget = f"budget {given.budget_bytes / 2**30:.2f} GiB"
    wait(driver, lambda d: "given memory: 40.00 GiB" in text(d, "capacity-budget")
         and expected_budget in text(d, "capacity-budget"), "free memory")
    on_40 = wait(driver, lambda d: max_seq(d) if max_seq(d) != on_h200 else None, "free")
    assert all(on_40[m] <= on_h200[m] for m in on_40)
    screenshot(driver, "capacity-h200-40gib")
    toggle_method(driver, "dora")  # leave the page as found
    assert view_errors(driver) == []
    assert severe_console_entries(driver) == []


def test_broken_traces_are_listed_with_their_errors(served, driver):
    load_page(driver, served.url)
    open_tab(driver, "Runs")
    wait(driver, lambda d: "broken-schema" in text(d, "runs-list"), "runs table")
    listing = text(driver, "runs-list")
    assert "unreadable run.yaml" in listing
    assert "unreadable ops.parquet" in listing
    assert "schema_version 2 is not supported" in listing
    assert "foreign" in listing and ".partial" not in listing
    assert "measured" in listing and "projected" in listing
    screenshot(driver, "runs")
    assert severe_console_entries(driver) == []


def test_a_new_trace_shows_up_on_refresh(served, traces_dir, driver):
    from selenium.webdriver.common.by import By

    load_page(driver, served.url)
    open_tab(driver, "Runs")
    wait(driver, lambda d: "tiny-cpu" in text(d, "runs-list"), "runs table")
    assert "tiny-late" not in text(driver, "runs-list")
    shutil.copytree(traces_dir / "tiny-cpu", traces_dir / "tiny-late")
    try:
        click(driver, driver.find_element(By.ID, "refresh"))
        wait(driver, lambda d: "tiny-late" in text(d, "runs-list"), "new run after refresh")
        load_page(driver, f"{served.url}/?run=tiny-late")  # and on a fresh page load
        wait(driver, lambda d: "tiny-late" in text(d, "run"), "new run picked by URL")
    finally:
        shutil.rmtree(traces_dir / "tiny-late")
    assert severe_console_entries(driver) == []


@pytest.mark.parametrize("name", ["../../etc", "/etc", "..", "broken-schema"])
def test_crafted_run_in_the_url_is_rejected(served, driver, name):
    from urllib.parse import quote

    load_page(driver, f"{served.url}/?run={quote(name, safe='')}")
    wait(driver, lambda d: text(d, "run-alert"), "no rejection shown")
    assert "rejected" in text(driver, "run-alert") or "not a readable trace" in \
        text(driver, "run-alert")
    wait_graph(driver, "overview-bars")  # the page falls back to a readable run
    assert severe_console_entries(driver) == []


def _sample_traces() -> list[str]:
    folder = ROOT / "traces"
    return sorted(p.name for p in folder.glob("sample-*") if p.is_dir()) if folder.is_dir() \
        else []


@pytest.mark.skipif(not _sample_traces(), reason="no sample-* traces under traces/ yet")
def test_shipped_sample_traces_render(driver):
    app = Served(ROOT / "traces")
    try:
        for name in _sample_traces():
            load_page(driver, f"{app.url}/?run={name}")
            wait_graph(driver, "overview-bars")
            assert text(driver, "run-alert") == "", name
            assert view_errors(driver) == [], name
        screenshot(driver, "samples")
        assert severe_console_entries(driver) == []
    finally:
        app.close()


# --- Scale, hostile traces and the plan's GPU, in the browser ---------------------------------

VIEWS_70B = [  # tab label, what shows it drawn
    ("Layer latency", ["latency-bars"]),
    ("Kernel timeline", ["timeline-graph"]),
    ("Activations", ["activation-bars"]),
    ("Memory", ["memory-timeline", "peak-bars"]),
    ("Capacity", ["capacity-graph"]),
    ("Compare runs", ["compare-a", "compare-b"]),
    ("Runs", None),
]


def test_every_view_of_a_70b_trace_renders(traces_dir, tmp_path, driver, capsys):
    """llama3.1-70b (80 layers, five methods) in a fresh app: the time from opening each tab
    until its figures are drawn with data (the overview: from navigation, the trace's first
    load included). Printed, never asserted; every view must draw, without errors."""
    fresh = tmp_path / "traces"
    shutil.copytree(traces_dir / LLAMA_70B, fresh / LLAMA_70B)
    write_capacity_sweep(fresh / LLAMA_70B)
    shutil.copytree(fresh / LLAMA_70B, fresh / f"{LLAMA_70B}-b")
    layers = TraceAnalysis(fresh / LLAMA_70B).decoder_layers()
    assert len(layers) == 80
    app = Served(fresh)
    times = {}
    try:
        start = time.perf_counter()
        driver.get(f"{app.url}/?run={LLAMA_70B}")
        wait_graph(driver, "overview-bars", lambda g: set(g["xs"]) == set(METHODS))
        wait_graph(driver, "overview-ratios")
        times["Overview"] = time.perf_counter() - start
        for label, graphs in VIEWS_70B:
            start = time.perf_counter()
            open_tab(driver, label)
            if graphs is None:
                wait(driver, lambda d: f"{LLAMA_70B}-b" in text(d, "runs-list"), "runs table")
            for graph_id in graphs or []:
                wait_graph(driver, graph_id)
            times[label] = time.perf_counter() - start
        bars = graph(driver, "latency-bars")
        assert bars is None or bars["points"]  # drawn above; hidden tabs keep their figure
        assert view_errors(driver) == []
        assert severe_console_entries(driver) == []
        screenshot(driver, "llama3.1-70b-runs")
    finally:
        app.close()
    (SCREENSHOTS.parent).mkdir(parents=True, exist_ok=True)
    (SCREENSHOTS.parent / "render_70b.json").write_text(json.dumps(
        {k: round(v, 3) for k, v in times.items()}))
    with capsys.disabled():
        print(f"\n[dashboard] llama3.1-70b (80 layers, 5 methods), seconds until drawn "
              f"(load average {os.getloadavg()[0]:.2f}): "
              + ", ".join(f"{k} {v:.2f}" for k, v in times.items()))


def test_the_70b_timeline_and_latency_draw_what_the_analyzer_gives(traces_dir):
    """The views draw one layer, one phase (compact), and every layer's bars."""
    from paca_prof.analyze import figures

    analysis = TraceAnalysis(traces_dir / LLAMA_70B)
    ops = analysis.layer_ops("dora", "model.layers.79", "backward")
    fig = figures.kernel_timeline(ops, "dora", "model.layers.79", "backward")
    drawn = sum(len(t.x) for t in fig.data)
    everything = analysis.trace.ops
    expected = everything[(everything["method"] == "dora") & (everything["phase"] == "backward")
                          & everything["module"].str.startswith("model.layers.79.")]
    assert drawn == len(expected) > 0
    assert min(min(t.base) for t in fig.data if len(t.base)) == 0.0
    bars = analysis.latency_bars(METHODS)
    assert len(bars) == 80 * len(METHODS) * 2 and bars["layers"].eq(1).all()
    assert list(dict.fromkeys(bars["label"])) == [str(i) for i in range(80)]


def test_a_crafted_trace_runs_no_script_in_the_page(tmp_path, driver):
    """Markup and component-shaped values in every string of a trace (see
    test_dashboard_http.make_hostile) are shown as text in every view: no iframe, no element
    with an event handler from the trace, no script of its own, no dialog."""
    from urllib.parse import quote

    from selenium.common.exceptions import NoAlertPresentException

    from test_dashboard_http import BAD_METHOD, HOSTILE, SCRIPT, TINY, copy_trace, make_hostile

    root = tmp_path / "traces"
    make_hostile(root / HOSTILE)
    copy_trace(TINY, root / "tiny")
    app = Served(root)
    try:
        load_page(driver, f"{app.url}/?run={quote(HOSTILE, safe='')}")
        wait_graph(driver, "overview-bars")
        assert SCRIPT in text(driver, "run-info")  # shown, as text
        assert BAD_METHOD in text(driver, "methods")
        for label, graphs in VIEWS_70B[:4] + [("Compare runs", ["compare-a", "compare-b"])]:
            open_tab(driver, label)
            for graph_id in graphs:
                wait_graph(driver, graph_id)
        open_tab(driver, "Capacity")
        wait(driver, lambda d: "no capacity sweep" in text(d, "capacity-budget"), "capacity")
        open_tab(driver, "Kernel timeline")
        pick(driver, "timeline-method", BAD_METHOD)
        wait_graph(driver, "timeline-graph", lambda g: BAD_METHOD in g["title"])
        open_tab(driver, "Runs")
        wait(driver, lambda d: HOSTILE in text(d, "runs-list"), "runs table")
        found = driver.execute_script("""
            const bad = [];
            document.querySelectorAll('iframe, object, embed, img').forEach(
                e => bad.push(e.outerHTML.slice(0, 120)));
            document.querySelectorAll('*').forEach(e => {
                for (const a of e.attributes) {
                    if (a.name.startsWith('on') || a.name === 'srcdoc') bad.push(a.name);
                }
            });
            Array.from(document.scripts).forEach(s => {
                if (s.text.includes('__pwned') || s.text.includes('alert(')) bad.push('script');
            });
            return {bad: bad, pwned: window.__pwned === undefined ? null : window.__pwned};""")
        assert found == {"bad": [], "pwned": None}
        with pytest.raises(NoAlertPresentException):
            driver.switch_to.alert.text
        assert severe_console_entries(driver) == []
        screenshot(driver, "hostile-trace")
    finally:
        app.close()


def test_the_rank_picker_switches_the_views_in_the_browser(tmp_path, driver):
    """A 2-rank trace (test_dashboard_http.make_two_ranks: rank 1 holds twice rank 0's
    bytes): the picker shows, rank 1 puts its peak in the overview and its name in the memory
    view's titles; a single-rank run hides the picker."""
    from test_dashboard_http import TINY, copy_trace, make_two_ranks

    root = tmp_path / "traces"
    make_two_ranks(root / "two-ranks")
    copy_trace(TINY, root / "tiny")
    app = Served(root)
    try:
        load_page(driver, f"{app.url}/?run=two-ranks")
        peaks = {rank: float(TraceAnalysis(root / "two-ranks", rank=rank).summary(
            methods=["lora"])["peak_mib"].iloc[0]) for rank in (0, 1)}

        def lora_peak(d):
            rows = {r["method"]: r for r in table_rows(d, "summary-table")}
            return as_number(rows["lora"]["peak_mib"]) if "lora" in rows else None

        wait(driver, lambda d: lora_peak(d) == pytest.approx(peaks[0], abs=1e-3), "rank 0")
        assert driver.find_element("id", "rank-control").is_displayed()
        pick(driver, "rank", "1")
        wait(driver, lambda d: lora_peak(d) == pytest.approx(peaks[1], abs=1e-3),
             "rank 1's peak in the overview")
        assert "the views show rank 1" in text(driver, "overview-errors")
        open_tab(driver, "Memory")
        wait_graph(driver, "memory-timeline", lambda g: "rank 1" in g["title"])
        wait_graph(driver, "peak-bars", lambda g: "rank 1" in g["title"])
        screenshot(driver, "rank-picker")
        load_page(driver, f"{app.url}/?run=tiny")
        wait(driver, lambda d: not d.find_element("id", "rank-control").is_displayed(),
             "the picker hidden for one rank")
        assert view_errors(driver) == [] and severe_console_entries(driver) == []
    finally:
        app.close()


@pytest.mark.parametrize("run,gpu,memory_gib", [("plan-a100-80gb", "a100-80gb", 80),
                                                ("plan-custom-gpu", "my-card-48g", 48)])
def test_capacity_opens_on_the_plans_gpu(served, driver, run, gpu, memory_gib):
    load_page(driver, f"{served.url}/?run={run}")
    open_tab(driver, "Capacity")
    wait(driver, lambda d: max_seq(d), "capacity table")
    budget = text(driver, "capacity-budget")
    assert budget.startswith(f"{gpu}: {memory_gib:.2f} GiB"), budget
    assert gpu in text(driver, "gpu")
    analysis = runs.analysis(served.root, run)
    curve, _ = capacity.select_batch(analysis.trace.capacity,
                                     preferred=analysis.trace.run.get("batch"))
    expected = capacity.max_seq_table(curve, make_budget(gpu=analysis.gpu()).budget_bytes)
    assert max_seq(driver) == dict(zip(expected["method"], expected["max_seq"].astype(int)))
    assert view_errors(driver) == []
    screenshot(driver, f"capacity-{run}")


def test_a_folder_of_200_runs_in_the_browser(tmp_path, driver, capsys):
    """200 runs: the page's first load (each folder described once), reloads (the listing
    from its cache), until the run header is filled in and the Runs tab shows its first page
    of 200, and the Refresh button's re-listing in the loaded page. Printed, never asserted."""
    from selenium.webdriver.common.by import By

    from dashboards.app import RUNS_PAGE
    from test_dashboard_http import TINY, copy_trace

    root = tmp_path / "traces"
    copy_trace(TINY, root / "run-000")
    for i in range(1, 200):
        shutil.copytree(root / "run-000", root / f"run-{i:03d}")
    app = Served(root)
    times = []
    try:
        for attempt in range(4):
            start = time.perf_counter()
            load_page(driver, app.url)
            open_tab(driver, "Runs")
            wait(driver, lambda d: d.execute_script(
                "return document.querySelectorAll('#runs-list tbody tr').length") == RUNS_PAGE
                and text(d, "runs-count") == f"200 runs; rows 1-{RUNS_PAGE} shown",
                "200 runs listed")
            times.append(time.perf_counter() - start)
        assert "run-000" in text(driver, "run")
        relisted = []
        for attempt in range(3):  # Refresh: the folder listed again in the loaded page
            driver.execute_script(
                "document.querySelector('#runs-list tbody tr').setAttribute('data-old', '')")
            start = time.perf_counter()
            click(driver, driver.find_element(By.ID, "refresh"))
            wait(driver, lambda d: d.execute_script(
                "const rows = document.querySelectorAll('#runs-list tbody tr');"
                "return rows.length === arguments[0] && !rows[0].hasAttribute('data-old')",
                RUNS_PAGE), "200 runs listed again")
            relisted.append(time.perf_counter() - start)
        assert text(driver, "runs-count") == f"200 runs; rows 1-{RUNS_PAGE} shown"
        assert severe_console_entries(driver) == []
    finally:
        app.close()
    with capsys.disabled():
        print(f"\n[dashboard] 200 runs in the browser, page load until listed: first "
              f"{times[0]:.2f} s, reloads {', '.join(f'{t:.2f}' for t in times[1:])} s; "
              f"Refresh until listed again {', '.join(f'{t:.2f}' for t in relisted)} s "
              f"(load average {os.getloadavg()[0]:.2f})")
