"""The Dash app over a folder of trace folders: layout and callbacks only.

Every number and figure comes from the analyzer (paca_prof.analyze: TraceAnalysis, its
analyses, capacity and the plotly builders in figures); this module picks runs, methods and
layers, and places what the analyzer returns. It never runs an engine or the simulator.

Safety: it binds 127.0.0.1 unless told otherwise, never runs in debug mode by default, serves
its assets and plotly.js itself (no CDN, works offline), and reads only inside the traces
folder: run names arriving from the browser pass dashboards.runs.run_path.

    paca-prof dash traces/            # or: python -m dashboards.app traces/
"""

from __future__ import annotations

import functools
import logging
import math
import threading
from pathlib import Path
from urllib.parse import parse_qs

import dash
import pandas as pd
from dash import Input, Output, State, ctx, dcc, html
from dash.exceptions import PreventUpdate

from paca_prof.analyze import capacity, figures
from paca_prof.budget import DEFAULT_HEADROOM, make_budget
from paca_prof.units import GIB, MIB
from dashboards import runs

log = logging.getLogger(__name__)

BASELINE = "lora"
GRAPH_CONFIG = {"displaylogo": False, "responsive": True}


# --- Small view helpers (formatting and placement only) --------------------------------------

def _graph(id_: str, height: int = 420) -> dcc.Graph:
    return dcc.Graph(id=id_, config=GRAPH_CONFIG, style={"height": f"{height}px"})


def _section(id_: str, title: str, children: list) -> html.Section:
    return html.Section(id=id_, className="view", children=[
        html.H2(title), *children, html.Div(id=f"{id_}-msg", className="view-msg")])


def _controls(*pairs) -> html.Div:
    """A row of labelled controls: _controls(("Layer", dropdown), ...)."""
    return html.Div(className="controls", children=[
        html.Label(className="control", children=[html.Span(label), control])
        for label, control in pairs])


def _is_bytes(column: str) -> bool:
    return "bytes" in column and "ratio" not in column


def _cell(value, column: str) -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if _is_bytes(column):
        return f"{float(value) / MIB:,.2f}"
    if isinstance(value, float):
        if value.is_integer() and "_vs_" not in column and "ratio" not in column:
            return f"{value:,.0f}"
        return f"{value:,.3f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _table(frame: pd.DataFrame, id_: str | None = None) -> html.Div:
    """An HTML table of a (small) analyzer DataFrame; byte columns are shown in MiB."""
    frame = frame.astype(object).where(frame.notna(), None)
    names = [c.replace("bytes", "MiB") if _is_bytes(c) else c for c in frame.columns]
    head = html.Thead(html.Tr([html.Th(name) for name in names]))
    body = html.Tbody([html.Tr([html.Td(_cell(v, c)) for c, v in zip(frame.columns, row)])
                       for row in frame.itertuples(index=False)])
    props = {"id": id_} if id_ else {}
    return html.Div(className="table-wrap",
                    children=html.Table(className="table", children=[head, body], **props))


def _badge(source: str | None, prefix: str = "") -> html.Span:
    text = source or "none"
    return html.Span(f"{prefix}{text}", className=f"badge badge-{text}")


def _alert(message: str) -> html.Div:
    return html.Div(message, className="view-error", role="alert")


def _guard(*defaults):
    """Wrap a view callback whose last output is its message area: a bad run name, a broken
    trace or an analysis error shows as a message with `defaults` in the other outputs,
    instead of a failed request."""
    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args):
            try:
                return fn(*args)
            except PreventUpdate:
                raise
            except Exception as error:  # shown to the user; logged with its traceback
                log.warning("%s: %s", fn.__name__, error, exc_info=not isinstance(
                    error, (runs.RunPathError, ValueError)))
                values = [d() if callable(d) else d for d in defaults]
                return (*values, _alert(str(error)))
        return inner
    return wrap


def _on_tab(tab: str):
    """Compute a view only while its tab is shown: the wrapped callback's first input is the
    selected tab; on another tab nothing is computed (the view updates when it is opened)."""
    def wrap(fn):
        @functools.wraps(fn)
        def inner(selected, *args):
            if selected != tab:
                raise PreventUpdate
            return fn(*args)
        return inner
    return wrap


def _empty(message: str = ""):
    return lambda: figures.empty_figure(message)


def _methods(analysis, methods: list[str] | None) -> list[str]:
    """The picked methods in the trace's order; PreventUpdate while none is picked yet."""
    if not methods:
        raise PreventUpdate
    return [m for m in analysis.check_methods(None) if m in methods] or \
        analysis.check_methods(methods)


def _sources(analysis) -> tuple[str, str]:
    sources = analysis.sources
    return sources.get("time") or "no times", sources.get("bytes") or analysis.source


def _rows(table: pd.DataFrame, methods: list[str]) -> pd.DataFrame:
    return table[table["method"].isin(methods)]


# --- Layout -----------------------------------------------------------------------------------

def _views(gpus: dict) -> list[tuple[str, str, html.Section]]:
    """The tabs as (value, label, section). Only the selected tab is computed and drawn."""
    gpu_options = [{"label": f"{name} ({spec.memory_bytes / GIB:.1f} GiB)", "value": name}
                   for name, spec in gpus.items()]
    return [
        ("overview", "Overview", _section("overview", "Overview (ratios to lora)", [
            html.Div(id="overview-table"),
            html.Div(className="row", children=[_graph("overview-bars"),
                                                _graph("overview-ratios")])])),
        ("latency", "Layer latency", _section("latency", "Latency per layer", [
            _controls(("Drill into (or click a bar)", dcc.Dropdown(
                          id="drill", placeholder="all decoder layers", className="wide")),
                      ("", html.Button("Up one level", id="drill-up", n_clicks=0,
                                       className="button"))),
            _graph("latency-bars", 600)])),
        ("timeline", "Kernel timeline", _section("timeline", "Kernel timeline of one layer", [
            _controls(("Layer", dcc.Dropdown(id="timeline-layer", clearable=False,
                                             className="wide")),
                      ("Method", dcc.Dropdown(id="timeline-method", clearable=False)),
                      ("Phase", dcc.Dropdown(id="timeline-phase", clearable=False,
                                             value="forward",
                                             options=["forward", "backward"]))),
            html.Div(id="timeline-overhead", className="note"),
            _graph("timeline-graph", 720)])),
        ("activations", "Activations", _section("activations", "Activation bytes per layer", [
            _graph("activation-bars", 480), html.Div(id="activation-table")])),
        ("memory", "Memory", _section("memory", "Memory over the step and at the peak", [
            _controls(("Timeline of", dcc.Dropdown(id="memory-method", clearable=False))),
            html.Div(className="row", children=[_graph("memory-timeline", 460),
                                                _graph("peak-bars", 460)])])),
        ("capacity", "Capacity", _section("capacity", "Capacity planning", [
            _controls(
                ("GPU", dcc.Dropdown(id="gpu", options=gpu_options, clearable=False,
                                     value=next(iter(gpus), None), className="wide")),
                ("Free memory GiB (empty: the GPU's)", dcc.Input(
                    id="free-gib", type="number", min=0, step=0.5, debounce=False)),
                ("Headroom (e.g. 1GiB+5%, 2GiB, 0)", dcc.Input(
                    id="headroom", type="text", value=DEFAULT_HEADROOM, debounce=True)),
                ("Batch", dcc.Dropdown(id="capacity-batch", clearable=False))),
            html.Div(id="capacity-budget", className="note"),
            html.Div(className="row", children=[_graph("capacity-graph", 480),
                                                html.Div(id="capacity-table")])])),
        ("compare", "Compare runs", _section("compare", "Compare two runs", [
            _controls(("Second run", dcc.Dropdown(id="compare-run", className="run-picker"))),
            html.Div(id="compare-table"),
            html.Div(className="row", children=[_graph("compare-a"), _graph("compare-b")])])),
        ("runs", "Runs", _section("runs", "Runs in the traces folder", [
            html.Div(id="runs-table")])),
    ]


def _layout(gpus: dict) -> html.Div:
    return html.Div(className="page", children=[
        dcc.Location(id="url", refresh=False),
        html.Header(className="top", children=[
            html.Div(className="title", children=[
                html.H1("paca-prof"),
                html.Span("memory and latency of PaCA, LoRA, DoRA and full fine-tuning",
                          className="subtitle")]),
            _controls(
                ("Run", dcc.Dropdown(id="run", clearable=False, placeholder="pick a run",
                                     className="run-picker")),
                ("", html.Button("Refresh", id="refresh", n_clicks=0, className="button")),
            ),
            html.Div(id="run-info", className="run-info"),
            html.Div(className="controls", children=[
                html.Span("Methods", className="label"),
                dcc.Checklist(id="methods", inline=True, className="methods")]),
            html.Div(id="run-alert"),
        ]),
        dcc.Tabs(id="tabs", value="overview", className="tabs", children=[
            dcc.Tab(label=label, value=value, children=[section], className="tab-item",
                    selected_className="tab-item--selected")
            for value, label, section in _views(gpus)]),
    ])


# --- Callbacks --------------------------------------------------------------------------------

def _register(app: dash.Dash, root: Path, gpus: dict) -> None:

    def load(name):
        if name is None:
            raise PreventUpdate
        return runs.analysis(root, name)

    @app.callback(
        Output("run", "options"), Output("run", "value"),
        Output("compare-run", "options"), Output("compare-run", "value"),
        Output("runs-table", "children"), Output("run-alert", "children"),
        Input("url", "search"), Input("refresh", "n_clicks"),
        State("run", "value"), State("compare-run", "value"))
    def list_runs(search, _clicks, current, compare):
        """Re-list the folder on every page load and refresh; ?run=NAME picks a run."""
        alert = None
        try:
            listing = runs.list_runs(root)
        except OSError as error:
            return [], None, [], None, None, _alert(f"cannot list the traces folder: {error}")
        ok = [r.name for r in listing if r.ok]
        wanted = parse_qs((search or "").lstrip("?")).get("run", [None])[0]
        if wanted is not None and ctx.triggered_id != "refresh":
            try:
                runs.run_path(root, wanted)
                if wanted not in ok:
                    raise runs.RunPathError(f"run {wanted!r} is not a readable trace")
                current = wanted
            except runs.RunPathError as error:
                alert = _alert(str(error))
        if current not in ok:
            current = ok[0] if ok else None
        if compare not in ok:
            compare = next((name for name in ok if name != current), None)
        options = [{"label": r.label, "value": r.name, "disabled": not r.ok} for r in listing]
        compare_options = [o for o in options if not o["disabled"]]
        rows = [html.Tr(className="ok" if r.ok else "broken", children=[
            html.Td(r.name), html.Td(r.model), html.Td(r.seq), html.Td(r.batch),
            html.Td(r.device),
            html.Td(_badge(r.source) if r.ok else _badge("unreadable")),
            html.Td(", ".join(r.methods) if r.ok else html.Span(r.error, className="error"))])
            for r in listing]
        table = html.Table(id="runs-list", className="table", children=[
            html.Thead(html.Tr([html.Th(c) for c in ("run", "model", "seq", "batch", "device",
                                                      "source", "methods / error")])),
            html.Tbody(rows)])
        if not listing:
            table = html.P(f"No trace folders in {root}. Write one with `paca-prof run --out "
                           f"{root}/NAME`, then press Refresh.")
        return options, current, compare_options, compare, table, alert

    @app.callback(
        Output("methods", "options"), Output("methods", "value"), Output("run-info", "children"),
        Output("timeline-layer", "options"), Output("timeline-layer", "value"),
        Output("timeline-method", "options"), Output("timeline-method", "value"),
        Output("memory-method", "options"), Output("memory-method", "value"),
        Output("gpu", "value"), Output("capacity-batch", "options"),
        Output("capacity-batch", "value"),
        Input("run", "value"), State("gpu", "value"))
    def pick_run(name, gpu):
        """A new run: its methods, layers and defaults for the per-method views."""
        try:
            analysis = load(name)
        except (runs.RunPathError, ValueError) as error:
            info = _alert(str(error))
            return [], [], info, [], None, [], None, [], None, gpu, [], None
        run = analysis.trace.run
        methods = analysis.trace.methods
        preferred = BASELINE if BASELINE in methods else methods[0]
        time_source, bytes_source = _sources(analysis)
        info = [
            _badge(analysis.source),
            html.Span(analysis.title, className="what"),
            _badge(time_source, "times: "), _badge(bytes_source, "bytes: "),
            html.Code(run.get("command", ""), className="command"),
        ]
        layers = analysis.decoder_layers()
        run_gpu = (run.get("gpu") or {}).get("name")
        if run_gpu in gpus:
            gpu = run_gpu
        batch_options, batch = [], None
        found = analysis.capacity_curve()
        if found is not None:
            batch = found[1]
            batch_options = [{"label": str(b), "value": b}
                             for b in capacity.batches(analysis.trace.capacity)]
        method_options = [{"label": m, "value": m} for m in methods]
        return (method_options, methods, info,
                [{"label": layer, "value": layer} for layer in layers],
                layers[0] if layers else None, method_options, preferred, method_options,
                preferred, gpu, batch_options, batch)

    @app.callback(
        Output("overview-table", "children"), Output("overview-bars", "figure"),
        Output("overview-ratios", "figure"), Output("overview-msg", "children"),
        Input("tabs", "value"), Input("run", "value"), Input("methods", "value"))
    @_guard(None, _empty(), _empty())
    @_on_tab("overview")
    def overview(name, methods):
        analysis = load(name)
        methods = _methods(analysis, methods)
        time_source, _ = _sources(analysis)
        table = analysis.summary(baseline=BASELINE)
        table = table[table["method"].isin(methods)]
        return (_table(table, "summary-table"),
                figures.overview_bars(_rows(analysis.trace.summary, methods), time_source),
                figures.summary_ratio_bars(table, time_source, BASELINE), None)

    @app.callback(
        Output("drill", "options"), Output("drill", "value"),
        Input("tabs", "value"), Input("run", "value"), Input("latency-bars", "clickData"),
        Input("drill-up", "n_clicks"), State("drill", "value"))
    def drill(tab, name, click, _up, current):
        """Drill-down target of the latency view: a clicked bar's module, one level up, or
        (on a new run or on opening the tab) the current target if the run has it."""
        if tab != "latency":
            raise PreventUpdate
        try:
            analysis = load(name)
        except (runs.RunPathError, ValueError):
            return [], None
        targets = analysis.drill_targets()
        if ctx.triggered_id == "latency-bars" and click:
            module = (click["points"][0].get("customdata") or [None])[0]
            if module not in targets:
                raise PreventUpdate  # a leaf: nothing below it
            return dash.no_update, module
        if ctx.triggered_id == "drill-up":
            return dash.no_update, analysis.drill_up(current)
        options = [{"label": t, "value": t} for t in targets]
        return options, current if current in targets else None

    @app.callback(
        Output("latency-bars", "figure"), Output("latency-msg", "children"),
        Input("tabs", "value"), Input("run", "value"), Input("methods", "value"),
        Input("drill", "value"))
    @_guard(_empty())
    @_on_tab("latency")
    def latency(name, methods, parent):
        analysis = load(name)
        methods = _methods(analysis, methods)
        time_source, _ = _sources(analysis)
        layers = _rows(analysis.trace.layers, methods)
        if not layers["latency_ms"].notna().any():
            return figures.empty_figure(f"no times in this trace ({time_source})"), None
        return figures.layer_latency_bars(layers, time_source, parent=parent or None), None

    @app.callback(
        Output("timeline-graph", "figure"), Output("timeline-overhead", "children"),
        Output("timeline-msg", "children"),
        Input("tabs", "value"), Input("run", "value"), Input("timeline-layer", "value"),
        Input("timeline-method", "value"), Input("timeline-phase", "value"))
    @_guard(_empty(), None)
    @_on_tab("timeline")
    def timeline(name, layer, method, phase):
        analysis = load(name)
        if not layer or not method:
            raise PreventUpdate
        analysis.check_methods([method])
        time_source, _ = _sources(analysis)
        ops = analysis.trace.ops
        if not ops["start_us"].notna().any():
            return figures.empty_figure(f"no op times in this trace ({time_source})"), None, None
        overhead = analysis.adapter_overhead_by_layer([method])
        row = overhead[overhead["layer"] == layer]
        if row.empty:
            note = f"{method} runs no adapter-branch ops in {layer}."
        else:
            row = row.iloc[0]
            note = (f"{method} in {layer}: {int(row['adapter_ops'])} adapter-branch ops (red) over "
                    f"forward and backward, "
                    f"{row['adapter_busy_ms']:.3f} ms busy and {row['adapter_idle_ms']:.3f} ms "
                    f"idle just before them ({time_source}).")
        ops = ops[ops["phase"] == phase] if phase else ops  # one phase: a compact time axis
        return figures.kernel_timeline(ops, method, layer, f"{phase}, {time_source}"), note, None

    @app.callback(
        Output("activation-bars", "figure"), Output("activation-table", "children"),
        Output("activations-msg", "children"),
        Input("tabs", "value"), Input("run", "value"), Input("methods", "value"))
    @_guard(_empty(), None)
    @_on_tab("activations")
    def activations(name, methods):
        analysis = load(name)
        methods = _methods(analysis, methods)
        _, bytes_source = _sources(analysis)
        return (figures.activation_by_layer(analysis.activation_by_layer(methods), bytes_source),
                _table(analysis.activation_totals(methods), "activation-totals"), None)

    @app.callback(
        Output("memory-timeline", "figure"), Output("peak-bars", "figure"),
        Output("memory-msg", "children"),
        Input("tabs", "value"), Input("run", "value"), Input("methods", "value"),
        Input("memory-method", "value"))
    @_guard(_empty(), _empty())
    @_on_tab("memory")
    def memory(name, methods, method):
        analysis = load(name)
        methods = _methods(analysis, methods)
        if not method:
            raise PreventUpdate
        _, bytes_source = _sources(analysis)
        timeline = analysis.memory_timeline(method, max_points=2000)
        run = analysis.trace.run
        on_gpu = run.get("gpu") or run["device"].get("type") == "cuda"
        capacity_bytes = run["device"].get("memory_bytes") if on_gpu else None
        return (figures.memory_timeline_area(timeline, method, bytes_source,
                                             analysis.memory_time_label()),
                figures.peak_breakdown_bars(analysis.peak_breakdown(methods), bytes_source,
                                            capacity_bytes), None)

    @app.callback(
        Output("capacity-graph", "figure"), Output("capacity-table", "children"),
        Output("capacity-budget", "children"), Output("capacity-msg", "children"),
        Input("tabs", "value"), Input("run", "value"), Input("methods", "value"),
        Input("gpu", "value"),
        Input("free-gib", "value"), Input("headroom", "value"),
        Input("capacity-batch", "value"))
    @_guard(_empty(), None, None)
    @_on_tab("capacity")
    def capacity_plan(name, methods, gpu, free_gib, headroom, batch):
        analysis = load(name)
        methods = _methods(analysis, methods)
        if analysis.capacity_curve() is None:
            message = ("This run holds no capacity sweep (capacity.parquet, written by "
                       "`paca-prof plan --out`). The dashboard never simulates.")
            return figures.empty_figure("no capacity sweep in this run"), None, message, None
        if free_gib in (None, ""):
            budget = make_budget(gpu=gpu, headroom=headroom or "0")
        else:
            budget = make_budget(memory=int(float(free_gib) * GIB), headroom=headroom or "0")
        table, curve, batch = analysis.capacity_answers(budget.budget_bytes, batch, methods,
                                                        BASELINE)
        best = dict(zip(table["method"], table["max_seq"]))
        where = gpu if free_gib in (None, "") else f"{free_gib} GiB free"
        note = (f"{budget.describe()}. Batch {batch}; {where}. The longest sequence per "
                f"method (a star) interpolates linearly between the sweep's points; "
                f"lower_bound: even the longest point fits.")
        return (figures.memory_vs_seq(curve, budget.budget_bytes, best,
                                      f"simulated, batch {batch}"),
                _table(table, "capacity-max-seq"), note, None)

    @app.callback(
        Output("compare-table", "children"), Output("compare-a", "figure"),
        Output("compare-b", "figure"), Output("compare-msg", "children"),
        Input("tabs", "value"), Input("run", "value"), Input("compare-run", "value"),
        Input("methods", "value"))
    @_guard(None, _empty(), _empty())
    @_on_tab("compare")
    def compare(name, other_name, methods):
        analysis = load(name)
        methods = _methods(analysis, methods)
        if not other_name:
            return (html.P("Pick a second run to compare."), figures.empty_figure(),
                    figures.empty_figure(), None)
        other = load(other_name)
        changes = analysis.top_changes(other, methods, n=15)
        columns = ["method", "module", "phase", "latency_ms_a", "latency_ms_b",
                   "latency_ms_delta", "latency_ms_ratio", "n_kernels_a", "n_kernels_b",
                   "activation_bytes_a", "activation_bytes_b"]
        other_methods = [m for m in methods if m in other.trace.methods]
        return (html.Div([html.P(f"a = {name}, b = {other_name}: the 15 largest latency "
                                 f"changes (b - a), matched by method, module and phase."),
                          _table(changes[columns], "compare-changes")]),
                figures.overview_bars(_rows(analysis.trace.summary, methods),
                                      f"a: {name}, {_sources(analysis)[0]}"),
                figures.overview_bars(_rows(other.trace.summary, other_methods),
                                      f"b: {other_name}, {_sources(other)[0]}"), None)


# --- Entry points -----------------------------------------------------------------------------

def create_app(traces_dir: str | Path, preload: bool = True) -> dash.Dash:
    """The dashboard over the trace folders in `traces_dir` (listed afresh on each page load).
    With `preload`, a background thread starts loading the traces into the cache at once.
    Raises ValueError if `traces_dir` is not a folder."""
    root = Path(traces_dir).resolve()
    if not root.is_dir():
        raise ValueError(f"{traces_dir}: no such traces folder")
    from paca_prof.gpus import GPUS

    app = dash.Dash(__name__, title="paca-prof", update_title=None, serve_locally=True,
                    external_stylesheets=[], external_scripts=[],
                    assets_folder=str(Path(__file__).with_name("assets")))
    app.layout = lambda: _layout(GPUS)  # a function: rebuilt on every page load
    _register(app, root, GPUS)
    if preload:
        figures.empty_figure()  # loads plotly's template once, not in the first request
        threading.Thread(target=_preload, args=(root,), name="paca-prof-preload",
                         daemon=True).start()
    return app


def _preload(root: Path) -> None:
    """Load the folder's traces into the cache while the browser loads the page."""
    try:
        runs.list_runs(root)
    except OSError:
        pass  # the page reports it


def serve(traces_dir: str | Path, host: str = "127.0.0.1", port: int = 8050,
          debug: bool = False) -> None:
    """Serve the dashboard (blocks). Binds 127.0.0.1 by default; debug mode only if asked."""
    app = create_app(traces_dir)
    app.run(host=host, port=port, debug=debug)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("traces", nargs="?", default="traces")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8050)
    args = parser.parse_args()
    serve(args.traces, host=args.host, port=args.port)
