"""A self-contained HTML report of one trace: the analyses' tables and figures, plotly.js
embedded once, so it opens offline."""

from __future__ import annotations

import html
from pathlib import Path

import pandas as pd

from paca_prof.analyze import TraceAnalysis, display, figures


def _table(frame: pd.DataFrame, title: str, methods: list[str], id_: str) -> str:
    """A titled HTML table: rows in the trace's method order, cells as display shows them
    (MiB for bytes, whole numbers for counts), every header and cell escaped."""
    headers, rows = display.table_text(display.in_method_order(frame, methods))
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                   for row in rows)
    return (f"<h2>{html.escape(title)}</h2><table class='table' id='{id_}'><thead><tr>{head}"
            f"</tr></thead><tbody>{body}</tbody></table>")


def write_html(analysis: TraceAnalysis, path: str | Path, methods: list[str] | None = None) -> Path:
    """Write the report to `path`; returns it. Raises ValueError for a method not in the trace.

    Every table lists methods in the trace's order (whatever the order of `methods`); the op
    timeline shows the first layer, one phase per figure, timed from the layer's first op."""
    chosen = set(analysis.check_methods(methods))
    methods = [m for m in analysis.trace.methods if m in chosen]
    run = analysis.trace.run
    time_source = analysis.sources.get("time") or "no times"
    bytes_source = analysis.sources.get("bytes") or analysis.source
    summary = analysis.trace.summary
    parts = [
        f"<h1>paca-prof: {html.escape(analysis.title)}</h1>",
        f"<p>times: {html.escape(str(time_source))}; bytes: {html.escape(str(bytes_source))}; "
        f"command: <code>{html.escape(str(run.get('command', '')))}</code></p>",
        _table(analysis.summary(methods=methods), "Overview (ratios to lora)", methods,
               "overview"),
        _table(analysis.timing_spread(methods=methods),
               f"Step-time spread and throughput ({time_source}; ratio to lora with its 95% "
               "bootstrap interval; contains_1: the run cannot tell the method from lora)",
               methods, "timing-spread"),
        _table(analysis.headline(), "PaCA against LoRA, beside the paper's figures", methods,
               "headline"),
        _table(analysis.adapter_overhead(methods), "Sequential adapter overhead", methods,
               "adapter-overhead"),
        _table(analysis.activation_totals(methods),
               "Activation memory (MiB): frozen floor and what each method adds", methods,
               "activation-totals"),
        _table(analysis.peak_breakdown_table(methods), "Memory at the peak by category (MiB)",
               methods, "peak-breakdown"),
    ]
    figs = [
        figures.overview_bars(summary[summary["method"].isin(methods)], time_source),
        figures.peak_breakdown_bars(analysis.peak_breakdown(methods), bytes_source),
        figures.activation_by_layer(analysis.activation_by_layer(methods), bytes_source),
        figures.layer_latency_bars(analysis.latency_bars(methods), time_source),
    ]
    layers = analysis.decoder_layers()
    if layers and analysis.trace.ops["start_us"].notna().any():
        for method in methods:
            for phase in ("forward", "backward"):
                ops = analysis.layer_ops(method, layers[0], phase)
                if len(ops):
                    figs.append(figures.kernel_timeline(ops, method, layers[0],
                                                        f"{phase}, {time_source}"))
    for method in methods[:1]:
        figs.append(figures.memory_timeline_area(analysis.memory_timeline(method, 2000), method,
                                                 bytes_source, analysis.memory_time_label()))
    for i, fig in enumerate(figs):
        parts.append(fig.to_html(full_html=False, include_plotlyjs=(i == 0)))
    style = ("<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
             "td,th{padding:2px 8px;text-align:right}th{border-bottom:1px solid #999}"
             "td:first-child,th:first-child{text-align:left}</style>")
    document = f"<!doctype html><html><head><meta charset='utf-8'>{style}</head><body>" \
               + "\n".join(parts) + "</body></html>"
    return _write_atomically(Path(path), document)


def check_report_path(path: str | Path, force: bool = False) -> Path:
    """ValueError (one line) for a report path that would overwrite a trace's own files (inside
    a trace folder: one holding run.yaml) or an existing file without `force`."""
    path = Path(path)
    parent = path.resolve().parent
    if (parent / "run.yaml").exists() or path.name == "run.yaml":
        raise ValueError(f"{path} is inside a trace folder ({parent}); write the report "
                         "elsewhere")
    if path.is_dir():
        raise ValueError(f"{path} is a folder; give a file name such as report.html")
    if path.exists() and not force:
        raise ValueError(f"{path} exists; pass --force to overwrite it")
    return path


def _write_atomically(path: Path, text: str) -> Path:
    """Write to a temporary file beside `path`, then rename it: a reader never sees half a
    report, and a failed write leaves the old file as it was."""
    import os
    import tempfile

    fd, staging = tempfile.mkstemp(prefix=".paca-prof-report-", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise
    return path
