"""Small stateless analyses over trace tables; each takes DataFrames and returns a DataFrame.

Times in ops.parquet are kernel times on CUDA, profiled op times on the CPU (they carry the
profiler's overhead, so only shares and ratios within one trace are meaningful there), and
cost-model times in projected traces. Nothing here imports torch.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from paca_prof.trace import peak_column

LAYER_PATTERN = re.compile(r"^(.*\.layers\.\d+)(\.|$)")

# The paper's headline figures for PaCA against LoRA (arXiv 2503.01905, abstract).
PAPER_HEADLINE = {"training_time": -0.22, "total_memory": -0.16, "max_seq": 0.23,
                  "throughput": 0.16}


def decoder_layer(path: str) -> str | None:
    """"model.layers.3" for any module inside the fourth decoder layer; None outside them."""
    match = LAYER_PATTERN.match(path)
    return match.group(1) if match else None


def with_gaps(ops: pd.DataFrame) -> pd.DataFrame:
    """Ops of each method in time order with `idle_us`: the time the device (or, on the CPU,
    the host) sat idle since the previous op ended. NaN where ops carry no times."""
    frames = []
    for _, group in ops.groupby("method", sort=False):
        group = group.sort_values(["start_us", "seq_no"]).copy()
        ends = (group["start_us"] + group["dur_us"]).cummax().shift(1)
        group["idle_us"] = (group["start_us"] - ends).clip(lower=0)
        group.loc[group.index[0], "idle_us"] = 0.0 if group["start_us"].notna().any() else np.nan
        frames.append(group)
    return pd.concat(frames) if frames else ops.assign(idle_us=[])


def adapter_overhead(summary: pd.DataFrame, ops: pd.DataFrame, methods: list[str]) -> pd.DataFrame:
    """Per method: ops and time in adapter-branch ops (busy, and idle just before them), their
    share of the step's op time, and the step time against frozen and against paca."""
    timed = with_gaps(ops[ops["method"].isin(methods)])
    step = summary.set_index("method")["step_ms"].astype(float)
    rows = []
    for method in methods:
        mine = timed[timed["method"] == method]
        branch = mine[mine["adapter_branch"]]
        span_ms = ((mine["start_us"] + mine["dur_us"]).max() - mine["start_us"].min()) / 1e3
        busy_ms = branch["dur_us"].sum(min_count=1) / 1e3
        idle_ms = branch["idle_us"].sum(min_count=1) / 1e3
        rows.append({
            "method": method, "ops": len(mine), "adapter_ops": len(branch),
            "adapter_busy_ms": busy_ms, "adapter_idle_ms": idle_ms,
            "adapter_share": (busy_ms + idle_ms) / span_ms if span_ms else np.nan,
            "step_ms": step.get(method, np.nan),
            "step_vs_frozen": step.get(method, np.nan) / step.get("frozen", np.nan),
            "step_vs_paca": step.get(method, np.nan) / step.get("paca", np.nan),
        })
    return pd.DataFrame(rows)


def adapter_overhead_by_layer(ops: pd.DataFrame, methods: list[str]) -> pd.DataFrame:
    """Per method and decoder layer: adapter-branch ops, busy and idle ms (see with_gaps)."""
    timed = with_gaps(ops[ops["method"].isin(methods)])
    timed = timed.assign(layer=timed["module"].map(decoder_layer)).dropna(subset=["layer"])
    branch = timed[timed["adapter_branch"]]
    grouped = branch.groupby(["method", "layer"], sort=False).agg(
        adapter_ops=("name", "size"), adapter_busy_ms=("dur_us", "sum"),
        adapter_idle_ms=("idle_us", "sum")).reset_index()
    grouped[["adapter_busy_ms", "adapter_idle_ms"]] /= 1e3
    return grouped


def base_module(path: str, base_paths: set[str]) -> str:
    """The longest prefix of `path` that is a module of the frozen model (so LoRA's
    q_proj.lora_A.default and PaCA's q_proj both map to q_proj)."""
    parts = path.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in base_paths:
            return prefix
    return path


def activation_savings(layers: pd.DataFrame, methods: list[str]) -> pd.DataFrame:
    """Activation bytes per base module and method: what the frozen model saves anyway (the
    floor), what the method adds on top, and the method's total. Needs a frozen run in the
    trace; without one the floor is NaN."""
    forward = layers[(layers["phase"] == "forward") & layers["method"].isin(methods + ["frozen"])]
    base_paths = set(forward.loc[forward["method"] == "frozen", "module"]) or set(forward["module"])
    keyed = forward.assign(base=forward["module"].map(lambda p: base_module(p, base_paths)))
    per = keyed.groupby(["method", "base"])["activation_bytes"].sum().astype(float)
    table = per.unstack("method").fillna(0.0)
    floor = table["frozen"] if "frozen" in table else pd.Series(np.nan, index=table.index)
    rows = []
    for method in methods:
        if method not in table:
            continue
        rows.append(pd.DataFrame({
            "module": table.index, "method": method, "bytes": table[method].to_numpy(),
            "floor_bytes": floor.to_numpy(), "added_bytes": (table[method] - floor).to_numpy(),
        }))
    result = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(
        columns=["module", "method", "bytes", "floor_bytes", "added_bytes"])
    return result[result[["bytes", "floor_bytes"]].fillna(0).sum(axis=1) > 0]


def activation_totals(savings: pd.DataFrame) -> pd.DataFrame:
    """Totals of activation_savings per method, with paca's savings against each method."""
    totals = savings.groupby("method", sort=False)[["bytes", "floor_bytes", "added_bytes"]].sum()
    if "paca" in totals.index:
        totals["paca_saves_bytes"] = totals["bytes"] - totals.loc["paca", "bytes"]
        totals["paca_saves_added_share"] = 1 - totals.loc["paca", "added_bytes"] / totals[
            "added_bytes"].where(totals["added_bytes"] != 0)
    return totals.reset_index()


def peak_breakdown(summary: pd.DataFrame, categories: tuple[str, ...]) -> pd.DataFrame:
    """Long table (method, category, bytes) of the memory alive at each method's peak."""
    columns = {peak_column(c): c for c in categories}
    long = summary.melt(id_vars="method", value_vars=list(columns), var_name="category",
                        value_name="bytes")
    long["category"] = long["category"].map(columns)
    return long.dropna(subset=["bytes"])


def peak_breakdown_wide(breakdown: pd.DataFrame, categories: tuple[str, ...]) -> pd.DataFrame:
    """peak_breakdown as one row per method and a `<category>_bytes` column per category."""
    wide = breakdown.pivot(index="method", columns="category", values="bytes")
    wide = wide.reindex(columns=[c for c in categories if c in wide.columns])
    methods = list(dict.fromkeys(breakdown["method"]))
    wide = wide.reindex(methods).rename(columns=lambda c: f"{c}_bytes")
    return wide.reset_index().rename_axis(columns=None)


def activation_by_layer(savings: pd.DataFrame) -> pd.DataFrame:
    """activation_savings summed per decoder layer: layer, layer_no, method, floor_bytes,
    added_bytes, in layer order then the methods' order."""
    rows = savings.assign(layer=savings["module"].map(decoder_layer)).dropna(subset=["layer"])
    per = rows.groupby(["layer", "method"], sort=False)[["floor_bytes", "added_bytes"]].sum()
    per = per.reset_index()
    per["layer_no"] = per["layer"].str.rsplit(".", n=1).str[-1].astype(int)
    order = {m: i for i, m in enumerate(dict.fromkeys(savings["method"]))}
    per = per.sort_values(["layer_no", "method"], key=lambda c: c.map(order) if c.name ==
                          "method" else c, kind="stable")
    return per[["layer", "layer_no", "method", "floor_bytes", "added_bytes"]].reset_index(
        drop=True)


def memory_timeline(memory: pd.DataFrame, method: str, categories: tuple[str, ...]) -> pd.DataFrame:
    """Wide timeline of one method: t and one column per category (bytes alive), plus total."""
    mine = memory[memory["method"] == method]
    if mine.empty:
        return pd.DataFrame(columns=["t", *categories, "total"])
    mine = mine.reset_index(drop=True).assign(order=lambda f: range(len(f)))
    wide = mine.pivot_table(index=["t", "order"], columns="category",
                            values="allocated_bytes", aggfunc="last")
    wide = wide.reindex(columns=list(categories)).ffill().fillna(0).reset_index()
    wide = wide.drop(columns="order")
    wide["total"] = wide[list(categories)].sum(axis=1)
    return wide


def layer_latency(layers: pd.DataFrame, methods: list[str], phase: str | None = None,
                  kind: str | None = None, top_k: int | None = None) -> pd.DataFrame:
    """Latency per module (ms, including submodules) and phase, slowest first. Whole-model
    and container rows ([root], model, model.layers) are left out unless asked for by kind."""
    table = layers[layers["method"].isin(methods) & layers["latency_ms"].notna()]
    if kind is None:
        table = table[~table["kind"].isin(["model", "container"])]
    if phase:
        table = table[table["phase"] == phase]
    if kind:
        table = table[table["kind"] == kind]
    table = table.sort_values("latency_ms", ascending=False)
    columns = ["method", "module", "phase", "kind", "latency_ms", "n_kernels", "activation_bytes"]
    table = table[columns]
    return table.groupby("method", sort=False).head(top_k) if top_k else table


def diff_ops(ops_a: pd.DataFrame, ops_b: pd.DataFrame) -> pd.DataFrame:
    """Ops of two traces matched by method, module path, phase, op name and occurrence (the
    n-th such op in that module and phase), not by name alone. Unmatched ops appear with NaN
    on the other side."""
    keys = ["method", "module", "phase", "name"]

    def numbered(ops):
        ops = ops.sort_values(["method", "seq_no"])
        return ops.assign(occurrence=ops.groupby(keys).cumcount())

    merged = numbered(ops_a)[keys + ["occurrence", "dur_us", "shapes"]].merge(
        numbered(ops_b)[keys + ["occurrence", "dur_us", "shapes"]],
        on=keys + ["occurrence"], how="outer", suffixes=("_a", "_b"), indicator=True)
    merged["delta_us"] = merged["dur_us_b"] - merged["dur_us_a"]
    merged["match"] = merged.pop("_merge").map(
        {"both": "both", "left_only": "only_a", "right_only": "only_b"}).astype(str)
    return merged


def diff_layers(layers_a: pd.DataFrame, layers_b: pd.DataFrame) -> pd.DataFrame:
    """Per (method, module, phase): latency, ops and activation bytes of two traces."""
    keys = ["method", "module", "phase"]
    values = ["latency_ms", "n_kernels", "activation_bytes"]
    merged = layers_a[keys + values].merge(layers_b[keys + values], on=keys, how="outer",
                                           suffixes=("_a", "_b"))
    for value in values:
        merged[f"{value}_ratio"] = (merged[f"{value}_b"].astype(float)
                                    / merged[f"{value}_a"].astype(float))
    return merged


def _number(value) -> float:
    """A float for any cell, NaN for a missing one (pd.NA has no float())."""
    return float(value) if value is not None and pd.notna(value) else np.nan


def headline(summary: pd.DataFrame, total_memory_column: str = "peak_bytes") -> pd.DataFrame:
    """PaCA against LoRA in the paper's terms, beside the paper's figures: training time,
    total memory, max sequence (if the trace holds a capacity plan: column max_seq) and
    throughput (tokens per second at the same batch and length)."""
    rows = summary.set_index("method")
    values = {name: np.nan for name in PAPER_HEADLINE}
    if {"paca", "lora"} <= set(rows.index):
        paca, lora = rows.loc["paca"], rows.loc["lora"]
        step_p, step_l = _number(paca.get("step_ms")), _number(lora.get("step_ms"))
        values["training_time"] = step_p / step_l - 1
        values["throughput"] = step_l / step_p - 1
        memory_p = _number(paca.get(total_memory_column))
        memory_l = _number(lora.get(total_memory_column))
        values["total_memory"] = memory_p / memory_l - 1
        if "max_seq" in rows:
            values["max_seq"] = _number(paca["max_seq"]) / _number(lora["max_seq"]) - 1
    return pd.DataFrame({"metric": list(values), "paca_vs_lora": list(values.values()),
                         "paper": [PAPER_HEADLINE[m] for m in values]})


def projection_error(measured: pd.DataFrame, projected: pd.DataFrame) -> pd.DataFrame:
    """Per method and phase: measured and projected ms and the projection's relative error,
    from the summaries of a measured trace and a projected trace of the same configuration."""
    columns = ["step_ms", "forward_ms", "backward_ms", "optimizer_ms"]
    merged = measured[["method", *columns]].merge(projected[["method", *columns]], on="method",
                                                  suffixes=("_measured", "_projected"))
    rows = []
    for _, row in merged.iterrows():
        for column in columns:
            real, model = row[f"{column}_measured"], row[f"{column}_projected"]
            rows.append({"method": row["method"], "phase": column.removesuffix("_ms"),
                         "measured_ms": real, "projected_ms": model,
                         "error": model / real - 1 if real else np.nan})
    return pd.DataFrame(rows)


# --- Helpers for interactive views (the dashboard): navigation and size limits --------------

def decoder_layers(layers: pd.DataFrame) -> list[str]:
    """The decoder layer paths of a layers table ("model.layers.0", ...) in layer order."""
    paths = layers.loc[layers["kind"] == "decoder_layer", "module"].dropna().unique()
    return sorted(paths, key=lambda p: int(p.rsplit(".", 1)[-1]))


def drill_targets(layers: pd.DataFrame) -> list[str]:
    """Modules inside decoder layers that have timed children (decoder layers, attention, MLP,
    adapted linears with their adapter parts), in layer order then module order: the parents
    one can drill into with figures.layer_latency_bars(parent=...)."""
    timed = layers[layers["latency_ms"].notna()]
    modules = pd.Series(timed["module"].dropna().unique())
    inside = modules[modules.map(decoder_layer).notna()]
    parents = set(inside.str.rsplit(".", n=1).str[0]) & set(inside)
    order = {path: i for i, path in enumerate(decoder_layers(layers))}
    return sorted(parents, key=lambda p: (order.get(decoder_layer(p), len(order)),
                                          p != decoder_layer(p), p))


def drill_up(module: str | None) -> str | None:
    """The parent to show after `module` when going one level up: None (all decoder layers)
    from a decoder layer, else the module's parent."""
    if not module or decoder_layer(module) in (None, module):
        return None
    return module.rsplit(".", 1)[0]


def downsample_timeline(timeline: pd.DataFrame, max_points: int = 2000) -> pd.DataFrame:
    """A memory_timeline cut to at most about `max_points` rows for plotting: the time axis is
    split into equal buckets and each keeps its row with the largest total, so the peak, the
    first and the last row always survive. A timeline with fewer rows is returned as is."""
    if len(timeline) <= max_points or "total" not in timeline:
        return timeline
    t = timeline["t"].astype(float)
    span = float(t.max() - t.min()) or 1.0
    bucket = ((t - t.min()) / span * (max_points - 2)).astype(int)
    keep = timeline.groupby(bucket, sort=False)["total"].idxmax()
    keep = set(keep) | {timeline.index[0], timeline.index[-1]}
    return timeline.loc[sorted(keep)]


def top_changes(diff: pd.DataFrame, n: int = 20, value: str = "latency_ms") -> pd.DataFrame:
    """The `n` rows of a diff_layers table whose `value` changed most in absolute terms (b - a),
    with the change as `<value>_delta`; rows present on one side only come last."""
    delta = diff[f"{value}_b"].astype(float) - diff[f"{value}_a"].astype(float)
    ranked = diff.assign(**{f"{value}_delta": delta, "_size": delta.abs()})
    ranked = ranked.sort_values("_size", ascending=False, na_position="last")
    return ranked.drop(columns="_size").head(n).reset_index(drop=True)


def memory_time_label(sources: dict) -> str:
    """The unit of memory.parquet's t for a trace's `sources`: microseconds where bytes are
    measured, the allocation event index where they are simulated."""
    if sources.get("bytes") == "measured":
        return "us from the step's start"
    return "allocation event (simulated order)"


def batch_shapes(batches: pd.DataFrame) -> pd.DataFrame:
    """Per batch shape a profiled loop's model saw (the batches table): micro-batches, tokens,
    padding tokens and their share (NaN where no padding was found), and sequences per
    micro-batch (more than the batch: packed)."""
    grouped = batches.groupby(["batch", "seq"], sort=True)
    table = grouped.agg(micro_batches=("tokens", "size"), tokens=("tokens", "sum"),
                        padding_tokens=("padding_tokens", lambda c: c.sum(min_count=1)),
                        sequences=("sequences", lambda c: c.mean() if c.notna().any()
                                   else np.nan)).reset_index()
    table["padding_fraction"] = (table["padding_tokens"].astype(float)
                                 / table["tokens"].astype(float))
    return table
