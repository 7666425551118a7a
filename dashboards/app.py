"""The Dash app over a folder of trace folders: layout and callbacks only.

Every number and figure comes from the analyzer (paca_prof.analyze: TraceAnalysis, its
analyses, capacity, display and the plotly builders in figures); this module picks runs,
methods and layers, and places what the analyzer returns. It never runs an engine or the
simulator.

Safety: it binds 127.0.0.1 unless told otherwise and refuses debug mode (the Werkzeug
debugger runs code sent to it) on any other address; it serves its assets and plotly.js
itself (no CDN, works offline) and reads only inside the traces folder: run names arriving
from the browser pass dashboards.runs.run_path, and traces are read by paca_prof.trace.load.
Every request is data from outside: each input is checked (type, size, one of the choices)
and a bad one shows as an alert in its view, never a failed request; every value from a
trace is placed as text (`_text`), never as a component or markup.

    paca-prof dash traces/            # or: python -m dashboards.app traces/
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import reprlib
import threading
from pathlib import Path
from urllib.parse import parse_qs

import dash
import pandas as pd
import yaml
from dash import Input, Output, State, ctx, dcc, html
from dash.exceptions import PreventUpdate
from werkzeug.exceptions import HTTPException

from paca_prof import validate
from paca_prof.analyze import display, figures
from paca_prof.budget import DEFAULT_HEADROOM, make_budget
from paca_prof.units import GIB
from dashboards import runs

log = logging.getLogger(__name__)

BASELINE = "lora"
GRAPH_CONFIG = {"displaylogo": False, "responsive": True}
REQUEST_LIMIT = 4 * 2**20  # bytes of one request body; the browser sends a few KiB
TEXT_LIMIT = 2000  # characters of one trace value shown inline
DETAILS_LIMIT = 20_000  # characters of the run details
RUNS_PAGE = 25  # rows of the Runs table at a time: Dash draws many components slowly
SOURCES = ("measured", "simulated", "projected")
HIDDEN = {"display": "none"}


# --- Text: every value from a trace or a request is shown through these -----------------------

def _text(value, limit: int = TEXT_LIMIT) -> str:
    """A value as plain text for the page: str() of it (so a mapping shaped like a Dash
    component is shown as text, never rendered), lone surrogates replaced (JSON cannot carry
    them), cut to `limit` characters."""
    text = value if isinstance(value, str) else str(value)
    text = text.encode("utf-8", "replace").decode("utf-8")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _show(value) -> str:
    """A short repr of a value from a request, for messages."""
    return _text(reprlib.repr(value), 80)


# --- Inputs from the browser: checked before use (paca_prof.validate's rules) ----------------

def _name(value, what: str, limit: int = 1000) -> str:
    """A non-empty string of at most `limit` characters without NUL."""
    if value == "":
        raise ValueError(f"{what} must not be empty")
    return validate.text(value, what, limit)


def _choice(value, choices, what: str) -> str:
    """`value` if it is one of `choices`; ValueError otherwise."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"unknown {what} {_show(value)}")
    return value


def _method_list(value) -> list[str]:
    """The picked methods: a list of names; PreventUpdate while none is picked."""
    if value is None or value == []:
        raise PreventUpdate
    if not isinstance(value, list) or len(value) > 64:
        raise ValueError(f"methods must be a list of method names, got {_show(value)}")
    return [_name(m, "a method", 200) for m in value]


def _free_memory(value) -> int | None:
    """Bytes of the free-memory box (GiB), or None when it is empty."""
    if value is None or value == "":
        return None
    try:
        gib = validate.number(value, "free memory (GiB)", above=0, maximum=2**30)
    except OverflowError:  # an integer too large for a float
        raise ValueError(f"free memory (GiB) must be at most {2**30:g}") from None
    return int(gib * GIB)


def _headroom(value) -> str:
    """The headroom box's text ("0" when empty); budget.parse_headroom reads it."""
    if value is None or value == "":
        return "0"
    return validate.text(value, "headroom (a size such as 1GiB+5%)", 200)


# --- Small view helpers (formatting and placement only) --------------------------------------

def _graph(id_: str, height: int = 420) -> dcc.Graph:
    return dcc.Graph(id=id_, config=GRAPH_CONFIG, style={"height": f"{height}px"})


def _section(id_: str, title: str, children: list) -> html.Section:
    return html.Section(id=id_, className="view", children=[
        html.H2(title), *children, html.Div(id=f"{id_}-msg", className="view-msg")])


def _control(label: str, control, **props) -> html.Label:
    """One labelled control."""
    return html.Label(className="control", children=[html.Span(label), control], **props)


def _controls(*items) -> html.Div:
    """A row of labelled controls: _controls(("Layer", dropdown), ...); an item that is not a
    (label, control) pair is a _control placed as it is."""
    return html.Div(className="controls", children=[
        _control(*item) if isinstance(item, tuple) else item for item in items])


def _mib(frame: pd.DataFrame) -> pd.DataFrame:
    """Byte columns in MiB (renamed so), for a table."""
    frame = frame.copy()
    for column in [c for c in frame.columns if c.endswith("_bytes")]:
        frame[column.removesuffix("bytes") + "MiB"] = (frame.pop(column).astype(float)
                                                       / 2**20).round(3)
    return frame


def _table(frame: pd.DataFrame, id_: str | None = None) -> html.Div:
    """An HTML table of a (small) analyzer DataFrame as display shows it (bytes in MiB)."""
    headers, rows = display.table_text(frame)
    head = html.Thead(html.Tr([html.Th(_text(h)) for h in headers]))
    body = html.Tbody([html.Tr([html.Td(_text(c)) for c in row]) for row in rows])
    props = {"id": id_} if id_ else {}
    return html.Div(className="table-wrap",
                    children=html.Table(className="table", children=[head, body], **props))


def _badge(source, prefix: str = "") -> html.Span:
    text = _text(source or "none", 40)
    kind = text if text in (*SOURCES, "unreadable", "none") else "none"
    return html.Span(f"{prefix}{text}", className=f"badge badge-{kind}")


def _alert(message: str) -> html.Div:
    return html.Div(_text(message), className="view-error", role="alert")


def _options(values, labels=None) -> list[dict]:
    labels = values if labels is None else labels
    return [{"label": _text(label, 300), "value": value} for value, label in zip(values, labels)]


def _empty(message: str = ""):
    return lambda: figures.empty_figure(message)


def _sources(analysis, with_rank: bool = True) -> tuple[str, str]:
    """Where the run's times and bytes come from, each with the rank shown (`with_rank`)
    when the trace holds several ("measured, rank 1"): every view's titles and notes say
    both; the run's header, the same for every rank, says only the sources."""
    sources = analysis.sources
    time_source = sources.get("time") or "no times"
    bytes_source = sources.get("bytes") or analysis.source
    if with_rank and len(analysis.ranks) > 1:
        time_source, bytes_source = (f"{time_source}, rank {analysis.rank}",
                                     f"{bytes_source}, rank {analysis.rank}")
    return time_source, bytes_source


def _at(analysis) -> str:
    """" at rank N" for an analysis of a distributed trace, "" otherwise (for notes)."""
    return f" at rank {analysis.rank}" if len(analysis.ranks) > 1 else ""


def _beside(other, rank: int):
    """The second run of a comparison at `rank` (the first run's, already checked) when it
    holds that rank, else at its own first rank (a single-process trace, a simulated rank)."""
    return other.for_rank(rank) if rank in other.ranks else other


def _rank_peaks(analysis, methods: list[str], table_id: str):
    """Every rank's peak and its breakdown, for a distributed trace (None otherwise)."""
    if len(analysis.ranks) == 1:
        return None
    _, bytes_source = _sources(analysis, with_rank=False)
    return html.Div([
        html.Div(_text(f"per-rank memory ({bytes_source}, MiB); the views show rank "
                       f"{analysis.rank}"), className="label"),
        _table(_mib(analysis.rank_peaks(methods)), table_id)])


def _rows(table: pd.DataFrame, methods: list[str]) -> pd.DataFrame:
    return table[table["method"].isin(methods)]


def _methods(analysis, methods) -> list[str]:
    """The picked methods (checked against the trace) in the trace's order."""
    picked = set(analysis.check_methods(_method_list(methods)))
    return [m for m in analysis.trace.methods if m in picked]


def _spread(analysis, methods: list[str], time_source: str):
    """The spread of the step times (measured runs: p25/p75, the ratio's 95% interval) and
    the throughput, with a flag on each ratio whose interval contains 1 and the spread
    warnings (TraceAnalysis.timing_spread). None without times."""
    if analysis.sources.get("time") is None:
        return None
    table = analysis.timing_spread(BASELINE, methods)
    flags = [html.Div(_text(f"{row.method}: its step-time ratio to {BASELINE} is not resolved:"
                            f" the 95% interval [{row.step_ratio_lo:.2f}, "
                            f"{row.step_ratio_hi:.2f}] contains 1"),
                      className="spread-flag", role="status")
             for row in table.itertuples() if row.contains_1]
    warnings = [html.Div(_text(f"{row.method}: {row.spread_warning}"), className="note")
                for row in table.itertuples() if row.spread_warning and not row.contains_1]
    shown = table.assign(ratio_interval_contains_1=table["contains_1"].map(
        {True: "YES: not resolved", False: ""})).drop(columns=["contains_1", "spread_warning"])
    return html.Div(id="spread-block", children=[
        html.P(className="subhead", children=_text(
            f"Step-time spread and throughput ({time_source}; ratios to {BASELINE} with 95% "
            "bootstrap intervals over rounds)")),
        _table(shown, "spread-table"), *flags, *warnings])


def _run_details(run: dict) -> html.Details:
    """run.yaml's settings, recipe, methods and assumptions as YAML text."""
    keys = ("recipe", "methods", "settings", "assumptions", "plan", "gpu", "versions",
            "created", "seed")
    shown = {key: run[key] for key in keys if key in run}
    try:
        text = yaml.safe_dump(shown, sort_keys=False, width=100, allow_unicode=True)
    except yaml.YAMLError:
        text = str(shown)
    return html.Details(className="run-details", children=[
        html.Summary("Run details (run.yaml)"),
        html.Pre(_text(text, DETAILS_LIMIT), id="run-details-text")])


# --- Layout -----------------------------------------------------------------------------------

def _gpu_options(gpus: dict, spec=None) -> list[dict]:
    """The GPU picker's choices: the built-in table, with the trace's own GPU spec (run.yaml
    gpu) in place of a built-in of the same name, or added when it is a custom one."""
    options = [{"label": f"{name} ({g.memory_bytes / GIB:.1f} GiB)", "value": name}
               for name, g in gpus.items() if spec is None or name != spec.name]
    if spec is not None:
        options.insert(0, {"label": _text(f"{spec.name} ({spec.memory_bytes / GIB:.1f} GiB, "
                                          f"this run's GPU)", 200), "value": spec.name})
    return options


def _views(gpus: dict) -> list[tuple[str, str, html.Section]]:
    """The tabs as (value, label, section). Only the selected tab is computed and drawn."""
    return [
        ("overview", "Overview", _section("overview", "Overview (ratios to lora)", [
            html.Div(id="overview-table"), html.Div(id="overview-errors", className="note"),
            html.Div(id="overview-spread"),
            html.Div(className="row", children=[_graph("overview-bars"),
                                                _graph("overview-ratios")])])),
        ("latency", "Layer latency", _section("latency", "Latency per layer", [
            _controls(("Drill into (or click a bar; type to search)", dcc.Dropdown(
                          id="drill", placeholder="all layers", className="wide")),
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
                                                _graph("peak-bars", 460)]),
            html.Div(id="memory-ranks")])),
        ("capacity", "Capacity", _section("capacity", "Capacity planning", [
            _controls(
                ("GPU", dcc.Dropdown(id="gpu", options=_gpu_options(gpus), clearable=False,
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
            html.Div(className="row", children=[_graph("compare-a"), _graph("compare-b")]),
            html.H3("Measured against simulated bytes"),
            _controls(("Method", dcc.Dropdown(id="compare-method", clearable=False))),
            html.Div(id="compare-bytes"),
            html.Div(className="row", children=[_graph("compare-peak"),
                                                _graph("compare-activations", 560)])])),
        ("runs", "Runs", _section("runs", "Runs in the traces folder", [
            _controls(("Filter (name, model, device or error)", dcc.Input(
                          id="runs-filter", type="text", debounce=True)),
                      ("Page", dcc.Dropdown(id="runs-page", value=1, clearable=False,
                                            options=[1]))),
            html.Div(id="runs-count", className="note"),
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
                # shown by pick_run for a trace of more than one rank; every view reads it
                _control("Rank (every view)", dcc.Dropdown(id="rank", clearable=False,
                                                           options=[], value=None),
                         id="rank-control", style=HIDDEN),
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

    def load(name, rank=None):
        """Run `name`'s analysis at `rank`, a value from the browser (None: the trace's first
        rank); a bad one raises ValueError (Trace.check_rank), shown as the view's alert."""
        if name is None:
            raise PreventUpdate
        analysis = runs.analysis(root, name)
        return analysis if rank is None else analysis.for_rank(rank)

    def message(error: Exception) -> str:
        """An error as one line for the page, without the server's paths."""
        text = str(error).replace(str(root) + "/", "").replace(str(root), "traces")
        return (text.splitlines() or [type(error).__name__])[0]

    def guard(*defaults, alert: bool = True):
        """Wrap a callback whose last output is its message area: a bad input, a broken
        trace or an analysis error shows as an alert there with `defaults` in the other
        outputs, instead of a failed request; a request with the wrong number of inputs is
        answered the same way. Without `alert` (a callback with no message area), an error
        is logged and answered with no update."""
        def wrap(fn):
            arity = getattr(fn, "arity", fn.__code__.co_argcount)

            @functools.wraps(fn)
            def inner(*args):
                try:
                    if len(args) != arity:
                        raise ValueError(f"malformed request: {len(args)} inputs, not {arity}")
                    return fn(*args)
                except PreventUpdate:
                    raise
                except Exception as error:  # shown to the user; logged with its traceback
                    known = (runs.RunPathError, ValueError, OSError)
                    log.warning("%s: %s", fn.__name__, message(error),
                                exc_info=not isinstance(error, known))
                    if not alert:
                        raise PreventUpdate from None
                    values = [d() if callable(d) else d for d in defaults]
                    return (*values, _alert(message(error)))
            return inner
        return wrap

    def on_tab(tab: str):
        """Compute a view only while its tab is shown: the wrapped callback's first input is
        the selected tab; on another tab nothing is computed (the view updates when opened)."""
        def wrap(fn):
            @functools.wraps(fn)
            def inner(selected, *args):
                if selected != tab:
                    raise PreventUpdate
                return fn(*args)
            inner.arity = fn.__code__.co_argcount + 1  # the tab, then the view's inputs
            return inner
        return wrap

    @app.callback(
        Output("run", "options"), Output("run", "value"),
        Output("compare-run", "options"), Output("compare-run", "value"),
        Output("run-alert", "children"),
        Input("url", "search"), Input("refresh", "n_clicks"),
        State("run", "value"), State("compare-run", "value"), prevent_initial_call=False)
    @guard(*[dash.no_update] * 4)
    def list_runs(search, _clicks, current, compare):
        """Re-list the folder on every page load and refresh; ?run=NAME picks a run."""
        alert = None
        try:
            listing = runs.list_runs(root)
        except OSError as error:
            return [], None, [], None, _alert(f"cannot list the traces folder: "
                                              f"{error.strerror}")
        ok = [r.name for r in listing if r.ok]
        query = search if isinstance(search, str) and len(search) <= 4096 else ""
        wanted = parse_qs(query.lstrip("?")).get("run", [None])[0]
        if wanted is not None and ctx.triggered_id != "refresh":
            try:
                runs.run_path(root, wanted)
                if wanted not in ok:
                    raise runs.RunPathError(f"run {wanted!r} is not a readable trace")
                current = wanted
            except runs.RunPathError as error:
                alert = _alert(message(error))
        if not isinstance(current, str) or current not in ok:
            current = ok[0] if ok else None
        if not isinstance(compare, str) or compare not in ok:
            compare = next((name for name in ok if name != current), None)
        options = [{"label": _text(r.label, 300), "value": r.name, "disabled": not r.ok}
                   for r in listing]
        compare_options = [o for o in options if not o["disabled"]]
        return options, current, compare_options, compare, alert

    @app.callback(
        Output("runs-table", "children"), Output("runs-page", "options"),
        Output("runs-page", "value"), Output("runs-count", "children"),
        Output("runs-msg", "children"),
        Input("tabs", "value"), Input("run", "options"), Input("runs-filter", "value"),
        Input("runs-page", "value"))
    @guard(None, dash.no_update, dash.no_update, None)
    @on_tab("runs")
    def runs_table(_options, typed, page):
        """One page of the Runs table (the listing is cached: a page costs a directory scan),
        the runs whose name, model, device or error hold the filter's text."""
        listing = runs.list_runs(root)
        if typed not in (None, ""):
            typed = _name(typed, "the filter", 200).lower()
            listing = [r for r in listing if any(typed in field.lower() for field in (
                r.name, r.model, r.device, r.error or ""))]
        pages = max(1, -(-len(listing) // RUNS_PAGE))
        if isinstance(page, bool) or not isinstance(page, int) or not 1 <= page <= pages:
            page = 1
        shown = listing[(page - 1) * RUNS_PAGE: page * RUNS_PAGE]
        rows = [html.Tr(className="ok" if r.ok else "broken", children=[
            html.Td(_text(r.name)), html.Td(_text(r.model)),
            html.Td(_text(r.seq if r.seq is not None else "")),
            html.Td(_text(r.batch if r.batch is not None else "")), html.Td(_text(r.device)),
            html.Td(_badge(r.source) if r.ok else _badge("unreadable")),
            html.Td(_text(", ".join(r.methods)) if r.ok else
                    html.Span(_text(r.error), className="error"))])
            for r in shown]
        table = html.Table(id="runs-list", className="table", children=[
            html.Thead(html.Tr([html.Th(c) for c in ("run", "model", "seq", "batch", "device",
                                                      "source", "methods / error")])),
            html.Tbody(rows)])
        count = (f"{len(listing)} runs" + (f"; rows {(page - 1) * RUNS_PAGE + 1}-"
                                           f"{(page - 1) * RUNS_PAGE + len(shown)} shown"
                                           if pages > 1 else ""))
        if not listing:
            table = html.P(f"No trace folders in {root.name}. Write one with `paca-prof run "
                           f"--out {root.name}/NAME`, then press Refresh." if typed in (None, "")
                           else "No run matches the filter.")
        return table, list(range(1, pages + 1)), page, count, None

    @app.callback(
        Output("methods", "options"), Output("methods", "value"),
        Output("timeline-layer", "options"), Output("timeline-layer", "value"),
        Output("timeline-method", "options"), Output("timeline-method", "value"),
        Output("memory-method", "options"), Output("memory-method", "value"),
        Output("gpu", "options"), Output("gpu", "value"), Output("capacity-batch", "options"),
        Output("capacity-batch", "value"), Output("rank", "options"), Output("rank", "value"),
        Output("rank-control", "style"), Output("run-info", "children"),
        Input("run", "value"), State("gpu", "value"), State("rank", "value"))
    @guard([], [], [], None, [], None, [], None, _gpu_options(gpus), dash.no_update, [], None,
           [], None, HIDDEN)
    def pick_run(name, gpu, rank):
        """A new run: its methods, layers, ranks and defaults for the per-method views. The
        rank picked for the last run is kept if this run holds it (else its first rank); the
        picker shows only for a trace of more than one rank."""
        analysis = load(name)
        ranks = analysis.ranks
        try:
            rank = analysis.all_ranks.check_rank(rank)
        except ValueError:  # none yet, another run's rank, or a value sent by hand
            rank = ranks[0]
        run = analysis.trace.run
        methods = analysis.trace.methods
        if not all(isinstance(m, str) for m in methods):
            raise ValueError("summary.parquet has a row without a method")
        preferred = BASELINE if BASELINE in methods else methods[0]
        time_source, bytes_source = _sources(analysis, with_rank=False)
        info = [
            _badge(analysis.source),
            html.Span(_text(analysis.title), className="what"),
            _badge(time_source, "times: "), _badge(bytes_source, "bytes: "),
            html.Code(_text(run.get("command", "")), className="command"),
        ]
        try:
            spec = analysis.gpu()
        except ValueError as error:
            spec = None
            info.append(_alert(message(error)))
        gpu_options = _gpu_options(gpus, spec)
        if spec is not None:
            gpu = spec.name
        elif gpu not in gpus:
            gpu = next(iter(gpus), None)
        info.append(_run_details(run))
        layers = analysis.decoder_layers()
        batch_options, batch = [], None
        found = analysis.capacity_curve()
        if found is not None:
            batch = found[1]
            batch_options = [{"label": str(b), "value": b}
                             for b in analysis.capacity_batches()]
        method_options = _options(methods)
        return (method_options, methods, _options(layers), layers[0] if layers else None,
                method_options, preferred, method_options, preferred, gpu_options, gpu,
                batch_options, batch, _options(ranks, [str(r) for r in ranks]), rank,
                HIDDEN if len(ranks) == 1 else {}, info)

    @app.callback(
        Output("overview-table", "children"), Output("overview-errors", "children"),
        Output("overview-bars", "figure"), Output("overview-ratios", "figure"),
        Output("overview-spread", "children"), Output("overview-msg", "children"),
        Input("tabs", "value"), Input("run", "value"), Input("methods", "value"),
        Input("rank", "value"))
    @guard(None, None, _empty(), _empty(), None)
    @on_tab("overview")
    def overview(name, methods, rank):
        analysis = load(name, rank)
        methods = _methods(analysis, methods)
        time_source, _ = _sources(analysis)
        table = analysis.summary(baseline=BASELINE, methods=methods)
        summary = _rows(analysis.trace.summary, methods)
        failed = summary[summary["status"] != "ok"]
        errors = [html.Div(_text(f"{row.method}: {row.status}" + (
            f": {row.error}" if isinstance(row.error, str) and row.error else "")))
            for row in failed.itertuples()]
        ranks = _rank_peaks(analysis, methods, "rank-table")  # a distributed trace
        if ranks is not None:
            errors.append(ranks)
        return (_table(table, "summary-table"), errors or None,
                figures.overview_bars(summary, time_source),
                figures.summary_ratio_bars(table, time_source, BASELINE),
                _spread(analysis, methods, time_source), None)

    @app.callback(
        Output("drill", "options"), Output("drill", "value"),
        Input("tabs", "value"), Input("run", "value"), Input("latency-bars", "clickData"),
        Input("drill-up", "n_clicks"), Input("drill", "value"), Input("drill", "search_value"))
    @guard(alert=False)
    def drill(tab, name, click, _up, current, search):
        """Drill-down target of the latency view: a clicked bar's module, one level up, a
        picked module, or (on a new run or on opening the tab) the current target if the run
        has it. The options stay short: the way up and the modules one level down, plus
        whatever matches the text typed in the picker."""
        if tab != "latency":
            raise PreventUpdate
        analysis = load(name)
        targets = analysis.drill_targets()
        current = current if isinstance(current, str) and current in targets else None
        value = dash.no_update
        if ctx.triggered_id == "latency-bars":
            points = click.get("points") if isinstance(click, dict) else None
            point = points[0] if isinstance(points, list) and points else None
            data = point.get("customdata") if isinstance(point, dict) else None
            module = data[0] if isinstance(data, list) and data else None
            if not isinstance(module, str) or module not in targets:
                raise PreventUpdate  # a leaf, or a group of layers: nothing below it
            current = value = module
        elif ctx.triggered_id == "drill-up":
            current = value = analysis.drill_up(current)
        elif ctx.triggered_id in ("tabs", "run"):
            value = current
        options = analysis.drill_options(current)
        if isinstance(search, str) and search:
            typed = search[:200]
            options += [t for t in targets if typed in t and t not in options][:50]
        return _options(options), value

    @app.callback(
        Output("latency-bars", "figure"), Output("latency-msg", "children"),
        Input("tabs", "value"), Input("run", "value"), Input("methods", "value"),
        Input("drill", "value"), Input("rank", "value"))
    @guard(_empty())
    @on_tab("latency")
    def latency(name, methods, parent, rank):
        analysis = load(name, rank)
        methods = _methods(analysis, methods)
        time_source, _ = _sources(analysis)
        if parent is not None:
            _name(parent, "a module")
        rows = analysis.latency_bars(methods, parent or None)
        if rows.empty:
            reason = ("no times in this trace" if not analysis.trace.layers["latency_ms"]
                      .notna().any() else "no layers found in this trace's modules")
            return figures.empty_figure(f"{reason} ({time_source})"), None
        return figures.layer_latency_bars(rows, time_source, parent=parent or None), None

    @app.callback(
        Output("timeline-graph", "figure"), Output("timeline-overhead", "children"),
        Output("timeline-msg", "children"),
        Input("tabs", "value"), Input("run", "value"), Input("timeline-layer", "value"),
        Input("timeline-method", "value"), Input("timeline-phase", "value"),
        Input("rank", "value"))
    @guard(_empty(), None)
    @on_tab("timeline")
    def timeline(name, layer, method, phase, rank):
        analysis = load(name, rank)
        if layer is None and not analysis.decoder_layers():
            return figures.empty_figure("no layers found in this trace's modules"), None, None
        if layer is None or method is None:
            raise PreventUpdate
        layer = _choice(layer, analysis.decoder_layers(), "layer")
        method = _choice(method, analysis.trace.methods, "method")
        phase = _choice(phase, ("forward", "backward"), "phase")
        time_source, _ = _sources(analysis)
        if not analysis.trace.ops["start_us"].notna().any():
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
        ops = analysis.layer_ops(method, layer, phase)
        if (ops["count"] > 1).any():
            note += f" Ops merged into {len(ops)} bars (very many in one layer)."
        return (figures.kernel_timeline(ops, method, layer, f"{phase}, {time_source}"),
                _text(note), None)

    @app.callback(
        Output("activation-bars", "figure"), Output("activation-table", "children"),
        Output("activations-msg", "children"),
        Input("tabs", "value"), Input("run", "value"), Input("methods", "value"),
        Input("rank", "value"))
    @guard(_empty(), None)
    @on_tab("activations")
    def activations(name, methods, rank):
        analysis = load(name, rank)
        methods = _methods(analysis, methods)
        _, bytes_source = _sources(analysis)
        return (figures.activation_by_layer(analysis.activation_by_layer(methods), bytes_source),
                _table(analysis.activation_totals(methods), "activation-totals"), None)

    @app.callback(
        Output("memory-timeline", "figure"), Output("peak-bars", "figure"),
        Output("memory-ranks", "children"), Output("memory-msg", "children"),
        Input("tabs", "value"), Input("run", "value"), Input("methods", "value"),
        Input("memory-method", "value"), Input("rank", "value"))
    @guard(_empty(), _empty(), None)
    @on_tab("memory")
    def memory(name, methods, method, rank):
        analysis = load(name, rank)
        methods = _methods(analysis, methods)
        if method is None:
            raise PreventUpdate
        method = _choice(method, analysis.trace.methods, "method")
        _, bytes_source = _sources(analysis)
        timeline = analysis.memory_timeline(method, max_points=2000)
        run = analysis.trace.run
        on_gpu = run.get("gpu") or run["device"].get("type") == "cuda"
        capacity_bytes = run["device"].get("memory_bytes") if on_gpu else None
        return (figures.memory_timeline_area(timeline, method, bytes_source,
                                             analysis.memory_time_label()),
                figures.peak_breakdown_bars(analysis.peak_breakdown(methods), bytes_source,
                                            capacity_bytes),
                _rank_peaks(analysis, methods, "memory-rank-table"), None)

    @app.callback(
        Output("capacity-graph", "figure"), Output("capacity-table", "children"),
        Output("capacity-budget", "children"), Output("capacity-msg", "children"),
        Input("tabs", "value"), Input("run", "value"), Input("methods", "value"),
        Input("gpu", "value"),
        Input("free-gib", "value"), Input("headroom", "value"),
        Input("capacity-batch", "value"), Input("rank", "value"))
    @guard(_empty(), None, None)
    @on_tab("capacity")
    def capacity_plan(name, methods, gpu, free_gib, headroom, batch, rank):
        analysis = load(name, rank)
        methods = _methods(analysis, methods)
        if analysis.capacity_curve() is None:
            message_ = ("This run holds no capacity sweep (capacity.parquet, written by "
                        "`paca-prof plan --out`). The dashboard never simulates.")
            return figures.empty_figure("no capacity sweep in this run"), None, message_, None
        held = analysis.capacity_batches()
        if batch is not None and (isinstance(batch, bool) or batch not in held):
            raise ValueError(f"no capacity points at batch {_show(batch)} (have {held})")
        memory, headroom = _free_memory(free_gib), _headroom(headroom)
        if memory is None:
            spec = analysis.gpu()
            device = spec if spec is not None and gpu == spec.name else gpus.get(
                _choice(gpu, gpus, "GPU"))
            budget = make_budget(gpu=device, headroom=headroom)
            where = gpu
        else:
            budget = make_budget(memory=memory, headroom=headroom)
            where = f"{free_gib:g} GiB free"
        table, curve, batch = analysis.capacity_answers(budget.budget_bytes, batch, methods,
                                                        BASELINE)
        best = dict(zip(table["method"], table["max_seq"]))
        note = (f"{budget.describe()}. Batch {batch}; {where}. The longest sequence per "
                f"method (a star) interpolates linearly between the sweep's points; "
                f"lower_bound: even the longest point fits.")
        return (figures.memory_vs_seq(curve, budget.budget_bytes, best,
                                      f"simulated, batch {batch}"),
                _table(table, "capacity-max-seq"), _text(note), None)

    @app.callback(
        Output("compare-table", "children"), Output("compare-a", "figure"),
        Output("compare-b", "figure"), Output("compare-msg", "children"),
        Input("tabs", "value"), Input("run", "value"), Input("compare-run", "value"),
        Input("methods", "value"), Input("rank", "value"))
    @guard(None, _empty(), _empty())
    @on_tab("compare")
    def compare(name, other_name, methods, rank):
        analysis = load(name, rank)
        methods = _methods(analysis, methods)
        if not other_name:
            return (html.P("Pick a second run to compare."), figures.empty_figure(),
                    figures.empty_figure(), None)
        other = _beside(load(other_name), analysis.rank)
        changes = analysis.top_changes(other, methods, n=15)
        columns = ["method", "module", "phase", "latency_ms_a", "latency_ms_b",
                   "latency_ms_delta", "latency_ms_ratio", "n_kernels_a", "n_kernels_b",
                   "activation_bytes_a", "activation_bytes_b"]
        other_methods = [m for m in methods if m in other.trace.methods]
        return (html.Div([html.P(_text(f"a = {name}{_at(analysis)}, b = {other_name}"
                                       f"{_at(other)}: the 15 largest latency changes (b - a), "
                                       f"matched by method, module and phase.")),
                          _table(changes[columns], "compare-changes")]),
                figures.overview_bars(_rows(analysis.trace.summary, methods),
                                      f"a: {name}, {_sources(analysis)[0]}"),
                figures.overview_bars(_rows(other.trace.summary, other_methods),
                                      f"b: {other_name}, {_sources(other)[0]}"), None)


    @app.callback(
        Output("compare-method", "options"), Output("compare-method", "value"),
        Output("compare-peak", "figure"), Output("compare-activations", "figure"),
        Output("compare-bytes", "children"),
        Input("tabs", "value"), Input("run", "value"), Input("compare-run", "value"),
        Input("compare-method", "value"), Input("rank", "value"))
    @guard([], None, _empty(), _empty())
    @on_tab("compare")
    def compare_bytes(name, other_name, method, rank):
        """The run with measured bytes against the one with simulated bytes (either order),
        as `paca-prof compare` does: totals, the peak by category, activations by module;
        each run at the picked rank when it holds it (a simulated FSDP2 trace is rank 0's,
        compared with any measured rank)."""
        if not other_name:
            return [], None, figures.empty_figure(), figures.empty_figure(), None
        first = load(name, rank)
        pair = [first, _beside(load(other_name), first.rank)]
        if pair[0].sources.get("bytes") == "simulated":
            pair.reverse()
        measured, simulated = pair
        if (measured.sources.get("bytes"), simulated.sources.get("bytes")) != (
                "measured", "simulated"):
            return ([], None, figures.empty_figure(), figures.empty_figure(),
                    html.P("Pick one run with measured bytes (paca-prof run --device cpu|cuda, "
                           "or paca_prof.profile) and one with simulated bytes (--device meta, "
                           "or paca_prof.simulate) of the same configuration."))
        methods = measured.compared_methods(simulated)
        method = method if method in methods else methods[0]  # a request's value, checked
        totals = measured.compare_totals(simulated, methods)
        note = html.P(_text(f"measured: {measured.trace.path.name}{_at(measured)}, simulated: "
                            f"{simulated.trace.path.name}{_at(simulated)}; simulated - "
                            f"measured per method."))
        return (_options(methods), method,
                figures.compare_peak_bars(measured.compare_peak(simulated, [method]), method),
                figures.compare_activation_bars(
                    measured.compare_activations(simulated, [method]), method, top=20),
                html.Div([note, _table(totals, "compare-totals")]))


def _guard_dispatch(app: dash.Dash) -> None:
    """The callback endpoint never fails: a request Dash itself cannot take apart (no outputs,
    an unknown output, a body that is not a mapping) is logged and answered with no update
    (HTTP 204, as for PreventUpdate) instead of a server error. Bodies over REQUEST_LIMIT are
    refused (413) before they are read."""
    app.server.config["MAX_CONTENT_LENGTH"] = REQUEST_LIMIT
    endpoint = app.config.routes_pathname_prefix + "_dash-update-component"
    view = app.server.view_functions[endpoint]

    @functools.wraps(view)
    def guarded(*args, **kwargs):
        try:
            return view(*args, **kwargs)
        except (PreventUpdate, HTTPException):
            raise
        except Exception as error:  # a malformed request; never a traceback in the reply
            log.warning("malformed callback request: %s: %s", type(error).__name__,
                        _text(error, 200))
            return "", 204

    app.server.view_functions[endpoint] = guarded


# --- Entry points -----------------------------------------------------------------------------

def create_app(traces_dir: str | Path, preload: bool = True) -> dash.Dash:
    """The dashboard over the trace folders in `traces_dir` (listed afresh on each page load).
    With `preload`, a background thread starts describing the folder's runs at once.
    Raises ValueError if `traces_dir` is not a folder."""
    root = Path(traces_dir).resolve()
    if not root.is_dir():
        raise ValueError(f"{traces_dir}: no such traces folder")
    from paca_prof.gpus import GPUS

    app = dash.Dash(__name__, title="paca-prof", update_title=None, serve_locally=True,
                    external_stylesheets=[], external_scripts=[],
                    assets_folder=str(Path(__file__).with_name("assets")),
                    # only the listing fires on page load; the rest follow the chain it starts
                    # (otherwise every view's callback ran twice per load: 20 requests)
                    prevent_initial_callbacks=True)
    app.layout = lambda: _layout(GPUS)  # a function: rebuilt on every page load
    _register(app, root, GPUS)
    _guard_dispatch(app)
    if preload:
        figures.empty_figure()  # loads plotly's template once, not in the first request
        threading.Thread(target=_preload, args=(root,), name="paca-prof-preload",
                         daemon=True).start()
    return app


def _preload(root: Path) -> None:
    """Describe the folder's runs and load the one the page opens on (the first readable)
    while the browser loads the page."""
    try:
        first = next((r.name for r in runs.list_runs(root) if r.ok), None)
        if first is not None:
            runs.analysis(root, first)
    except Exception as error:  # the page reports it when it asks
        log.info("preload: %s", _text(error, 200))


def is_loopback(host: str) -> bool:
    """Whether `host` is a loopback address (127.0.0.0/8, ::1) or "localhost"."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(traces_dir: str | Path, host: str = "127.0.0.1", port: int = 8050,
          debug: bool = False) -> None:
    """Serve the dashboard (blocks). Binds 127.0.0.1 by default; debug mode only if asked,
    and only on a loopback address: ValueError otherwise (the Werkzeug debugger runs any
    code sent to it)."""
    if debug and not is_loopback(str(host)):
        raise ValueError(f"debug mode serves the Werkzeug debugger, which runs code sent to "
                         f"it: only on a loopback address (127.0.0.1), not {host}")
    _check_address(str(host), port)
    app = create_app(traces_dir)
    app.run(host=host, port=port, debug=debug)


def _check_address(host: str, port: int) -> None:
    """ValueError (one line) when the server could not listen on host:port (a port in use,
    out of range, an address not on this machine), found before Dash announces the address:
    Werkzeug would print that the app runs, then exit with status 1."""
    import socket

    try:
        family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Werkzeug binds
            probe.bind(address)
    except (OSError, OverflowError) as error:
        reason = getattr(error, "strerror", None) or str(error)
        raise ValueError(f"cannot serve on {host}:{port}: {reason}") from None


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("traces", nargs="?", default="traces")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8050)
    args = parser.parse_args()
    serve(args.traces, host=args.host, port=args.port)
