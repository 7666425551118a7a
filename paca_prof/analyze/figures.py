"""Plotly figures built from the analyses' DataFrames; the HTML report and the dashboard both
use these, so a figure is defined once. Each title says where its numbers come from."""

from __future__ import annotations

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go

from paca_prof.analyze import analyses, capacity
from paca_prof.units import GIB, MIB

METHOD_COLORS = {"frozen": "#9e9e9e", "full": "#6d4c41", "lora": "#1f77b4", "dora": "#9467bd",
                 "paca": "#d62728", "qlora": "#17becf", "qpaca": "#ff7f0e"}
CATEGORY_COLORS = {"weights": "#90a4ae", "trainable": "#4db6ac", "gradients": "#ffb74d",
                   "optimizer": "#a1887f", "activations": "#e57373", "logits_loss": "#ba68c8",
                   "rest": "#cfd8dc"}


def _layout(fig: go.Figure, title: str) -> go.Figure:
    fig.update_layout(title=title, template="plotly_white", legend_title_text="",
                      margin=dict(l=60, r=20, t=60, b=50))
    return fig


def overview_bars(summary: pd.DataFrame, source: str) -> go.Figure:
    """Step time split into forward / backward / optimizer per method; for a trace without
    times (a capacity plan, a simulation without projection) the peak memory per method."""
    long = summary.melt(id_vars="method", value_vars=["forward_ms", "backward_ms", "optimizer_ms"],
                        var_name="phase", value_name="ms").dropna()
    if long.empty:
        peaks = summary.assign(GiB=summary["peak_bytes"].astype(float) / GIB).dropna(
            subset=["GiB"])
        fig = px.bar(peaks, x="method", y="GiB", color="method",
                     color_discrete_map=METHOD_COLORS, hover_data={"GiB": ":.2f"})
        return _layout(fig, "Peak memory per method (no times in this trace)")
    long["phase"] = long["phase"].str.removesuffix("_ms")
    fig = px.bar(long, x="method", y="ms", color="phase", barmode="stack",
                 hover_data={"ms": ":.1f"})
    return _layout(fig, f"Step time by phase ({source})")


def peak_breakdown_bars(breakdown: pd.DataFrame, source: str,
                        capacity_bytes: float | None = None) -> go.Figure:
    """Memory alive at each method's peak, stacked by category (GiB)."""
    frame = breakdown.assign(GiB=breakdown["bytes"] / GIB)
    fig = px.bar(frame, x="method", y="GiB", color="category", barmode="stack",
                 color_discrete_map=CATEGORY_COLORS, hover_data={"GiB": ":.3f"})
    if capacity_bytes:
        fig.add_hline(y=capacity_bytes / GIB, line_dash="dash", annotation_text="GPU memory")
    return _layout(fig, f"Memory at the peak by category ({source})")


def memory_timeline_area(timeline: pd.DataFrame, method: str, source: str,
                         time_label: str) -> go.Figure:
    """Bytes alive over one step, stacked by category."""
    categories = [c for c in CATEGORY_COLORS if c in timeline]
    long = timeline.melt(id_vars="t", value_vars=categories, var_name="category",
                         value_name="bytes")
    long["GiB"] = long["bytes"] / GIB
    fig = px.area(long, x="t", y="GiB", color="category", color_discrete_map=CATEGORY_COLORS,
                  line_shape="hv")
    fig.update_xaxes(title=time_label)
    return _layout(fig, f"Memory over one step, {method} ({source})")


def layer_latency_bars(layers: pd.DataFrame, source: str, parent: str | None = None) -> go.Figure:
    """Latency per layer (or per child of `parent`, for drill-down), forward and backward in
    two rows, one colour per method. `layers` is a layers table, or the rows of
    analyses.latency_bars (TraceAnalysis.latency_bars) when it has their `label` column."""
    rows = layers if "label" in layers else analyses.latency_bars(layers, parent)
    fig = go.Figure()
    fig.set_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                     subplot_titles=("forward", "backward"))
    order = list(dict.fromkeys(rows["label"]))
    for row, phase in enumerate(("forward", "backward"), start=1):
        part = rows[rows["phase"] == phase]
        for method, group in part.groupby("method", sort=False):
            fig.add_bar(x=group["label"], y=group["latency_ms"], name=method,
                        legendgroup=method, showlegend=row == 1,
                        marker_color=METHOD_COLORS.get(method),
                        customdata=group[["module", "n_kernels", "layers"]].astype(object),
                        hovertemplate="%{customdata[0]}<br>%{y:.3f} ms, %{customdata[1]} ops"
                                      "<extra></extra>", row=row, col=1)
    fig.update_xaxes(categoryorder="array", categoryarray=order, title="")
    fig.update_yaxes(title="ms")
    fig.update_layout(barmode="group")
    if parent:
        return _layout(fig, f"Latency per module in {parent} ({source})")
    grouped = bool(len(rows)) and rows["layers"].max() > 1
    return _layout(fig, f"Latency per layer{', consecutive layers averaged' if grouped else ''} "
                        f"({source})")


def activation_by_layer(per_layer: pd.DataFrame, source: str) -> go.Figure:
    """Activation bytes per decoder layer (TraceAnalysis.activation_by_layer), one bar per
    method: the frozen floor (grey) and what the method adds on top."""
    fig = go.Figure()
    first = per_layer["method"].iloc[0] if len(per_layer) else None
    for method, group in per_layer.groupby("method", sort=False):
        x = [group["layer_no"].astype(str).tolist(), [method] * len(group)]
        fig.add_bar(x=x, y=group["floor_bytes"] / MIB, name="frozen floor",
                    marker_color=METHOD_COLORS["frozen"], legendgroup="floor",
                    showlegend=method == first,
                    hovertemplate="floor %{y:.2f} MiB<extra></extra>")
        fig.add_bar(x=x, y=group["added_bytes"] / MIB, name=f"{method} adds",
                    marker_color=METHOD_COLORS.get(method), legendgroup=method,
                    hovertemplate=f"{method} adds %{{y:.2f}} MiB<extra></extra>")
    fig.update_layout(barmode="relative", yaxis_title="MiB", xaxis_title="decoder layer / method")
    return _layout(fig, f"Activation bytes per decoder layer ({source})")


def kernel_timeline(ops: pd.DataFrame, method: str, layer: str, source: str) -> go.Figure:
    """The ops (kernels on CUDA) of one layer and method on a time axis from the layer's first
    op, one row per module; adapter-branch ops highlighted, idle gaps visible as empty space.
    `ops` is an ops table, or the rows of analyses.layer_ops (TraceAnalysis.layer_ops: one
    phase, merged when there are very many) when it has their `t_us` column."""
    rows = ops if "t_us" in ops else analyses.layer_ops(ops, method, layer)
    fig = go.Figure()
    for branch, color, name in ((False, "#90a4ae", "base model"), (True, "#d62728",
                                                                    "adapter branch")):
        part = rows[rows["adapter_branch"] == branch]
        fig.add_bar(base=part["t_us"], x=part["dur_us"].clip(lower=0.05), y=part["row"],
                    orientation="h", name=name, marker_color=color,
                    customdata=part[["name", "phase", "dur_us"]].astype(object),
                    hovertemplate="%{customdata[0]} (%{customdata[1]})<br>%{customdata[2]:.1f} us"
                                  "<extra></extra>")
    fig.update_layout(barmode="overlay", xaxis_title="us from the layer's first op",
                      yaxis=dict(autorange="reversed", type="category"))
    return _layout(fig, f"Ops of {layer}, {method} ({source})")


def memory_vs_seq(curve: pd.DataFrame, budget_bytes: float, max_seq: dict[str, int],
                  title_suffix: str = "simulated") -> go.Figure:
    """Memory against sequence length per method (capacity.point_totals: reserved where the
    curve holds it, else the peak), the budget line, and a marker at each method's longest
    sequence that fits."""
    reserved = capacity.holds_reserved(curve)
    totals = capacity.point_totals(curve)
    fig = go.Figure()
    for method, group in totals.groupby("method", sort=False):
        fig.add_scatter(x=group["seq"], y=group["bytes"] / GIB, mode="lines+markers",
                        name=method, line_color=METHOD_COLORS.get(method))
        best = max_seq.get(method)
        if best:
            at = group.iloc[(group["seq"] - best).abs().argsort()[:1]]
            fig.add_scatter(x=[best], y=at["bytes"] / GIB, mode="markers", showlegend=False,
                            marker=dict(symbol="star", size=14, color=METHOD_COLORS.get(method)),
                            hovertemplate=f"{method}: max seq {best}<extra></extra>")
    fig.add_hline(y=budget_bytes / GIB, line_dash="dash", annotation_text="budget")
    what = "Reserved memory" if reserved else "Peak memory"
    fig.update_layout(xaxis_title="sequence length (tokens)",
                      yaxis_title=f"{'reserved' if reserved else 'peak'} GiB")
    return _layout(fig, f"{what} vs sequence length ({title_suffix})")


def summary_ratio_bars(overview: pd.DataFrame, source: str, baseline: str = "lora") -> go.Figure:
    """The overview's ratios to `baseline` (TraceAnalysis.summary columns *_vs_<baseline>):
    step time, forward, backward, ops per step, activation and peak memory, grouped per
    metric with one bar per method and a line at 1."""
    metrics = ["step_ms", "forward_ms", "backward_ms", "ops_per_step", "activation_mib",
               "peak_mib"]
    columns = [f"{m}_vs_{baseline}" for m in metrics if f"{m}_vs_{baseline}" in overview]
    long = overview.melt(id_vars="method", value_vars=columns, var_name="metric",
                         value_name="ratio")
    long["metric"] = long["metric"].str.removesuffix(f"_vs_{baseline}")
    fig = px.bar(long, x="metric", y="ratio", color="method", barmode="group",
                 color_discrete_map=METHOD_COLORS, hover_data={"ratio": ":.3f"})
    fig.add_hline(y=1.0, line_dash="dot", line_color="#555")
    fig.update_layout(yaxis_title=f"ratio to {baseline}", xaxis_title="")
    return _layout(fig, f"Ratios to {baseline} ({source})")


def compare_peak_bars(peak: pd.DataFrame, method: str) -> go.Figure:
    """Measured against simulated bytes at the peak, per memory category, for one method
    (TraceAnalysis.compare_peak): two bars per category, the peak itself left out."""
    rows = peak[(peak["method"] == method) & (peak["category"] != "total")]
    fig = go.Figure()
    for side, color in (("measured", "#455a64"), ("simulated", "#90caf9")):
        fig.add_bar(x=rows["category"], y=rows[f"{side}_bytes"] / MIB, name=side,
                    marker_color=color, customdata=rows["diff_bytes"] / MIB,
                    hovertemplate=f"{side} %{{y:.2f}} MiB (simulated - measured "
                                  "%{customdata:+.2f} MiB)<extra></extra>")
    fig.update_layout(barmode="group", yaxis_title="MiB", xaxis_title="")
    return _layout(fig, f"Memory at the peak, measured vs simulated, {method}")


def compare_activation_bars(activations: pd.DataFrame, method: str, top: int = 20) -> go.Figure:
    """The modules whose activation bytes disagree most (TraceAnalysis.compare_activations),
    for one method: simulated - measured, in MiB, largest first."""
    rows = activations[(activations["method"] == method)
                       & (activations["diff_bytes"].fillna(1) != 0)].head(top)
    fig = go.Figure()
    fig.add_bar(x=rows["diff_bytes"] / MIB, y=rows["module"], orientation="h",
                marker_color=[METHOD_COLORS.get(method, "#1f77b4")] * len(rows),
                customdata=rows[["measured_bytes", "simulated_bytes"]] / MIB,
                hovertemplate="%{y}<br>measured %{customdata[0]:.3f} MiB, simulated "
                              "%{customdata[1]:.3f} MiB<extra></extra>")
    fig.update_layout(xaxis_title="simulated - measured (MiB)", yaxis=dict(autorange="reversed"))
    return _layout(fig, f"Activation bytes where measured and simulated disagree, {method}")


def empty_figure(message: str = "no data") -> go.Figure:
    """A blank figure carrying `message` in its middle, for views with nothing to show."""
    fig = go.Figure()
    fig.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper",
                       yref="paper", font=dict(size=14, color="#777"))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return _layout(fig, "")
