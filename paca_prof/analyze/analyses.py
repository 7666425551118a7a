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
    """"model.layers.3" for any module inside the fourth decoder layer, by the common naming
    *.layers.N alone; None outside them. Used where no layers table says which modules are the
    layers (layer_of with a list of layers handles any module tree)."""
    match = LAYER_PATTERN.match(path) if isinstance(path, str) else None
    return match.group(1) if match else None


def _natural_key(path: str) -> tuple:
    """Sort key that orders "h.2" before "h.10": digit runs compare as numbers."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part)
                 for part in re.split(r"(\d+)", path) if part)


def layer_of(modules: pd.Series, layers: list[str] | None = None) -> pd.Series:
    """The layer (one of `layers`, see decoder_layers) that holds each module path: the longest
    of them that is the path itself or one of its ancestors; None outside every layer. Without
    `layers`, by the *.layers.N naming (decoder_layer)."""
    values = modules.astype(object)
    if layers is None:
        return pd.Series([decoder_layer(path) for path in values], index=modules.index,
                         dtype=object)
    known = set(layers)

    def find(path):
        if not isinstance(path, str):
            return None
        parts = path.split(".")
        for end in range(len(parts), 0, -1):
            prefix = ".".join(parts[:end])
            if prefix in known:
                return prefix
        return None

    found = {path: find(path) for path in values.dropna().unique()}
    return pd.Series([found.get(path) if isinstance(path, str) else None for path in values],
                     index=modules.index, dtype=object)


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


def adapter_overhead_by_layer(ops: pd.DataFrame, methods: list[str],
                              layers: list[str] | None = None) -> pd.DataFrame:
    """Per method and layer (`layers`, see layer_of): adapter-branch ops, busy and idle ms (see
    with_gaps)."""
    timed = with_gaps(ops[ops["method"].isin(methods)])
    timed = timed.assign(layer=layer_of(timed["module"], layers)).dropna(subset=["layer"])
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
    """Totals of activation_savings per method, with paca's savings against each method.
    Without a frozen run the floor and the added bytes stay NaN (not a sum of nothing, 0)."""
    totals = savings.groupby("method", sort=False)[["bytes", "floor_bytes", "added_bytes"]].sum(
        min_count=1)
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


def activation_by_layer(savings: pd.DataFrame, layers: list[str] | None = None) -> pd.DataFrame:
    """activation_savings summed per layer (`layers`, see layer_of): layer, layer_no (its
    position in `layers`, or N of *.layers.N without them), method, floor_bytes, added_bytes,
    in layer order then the methods' order."""
    columns = ["layer", "layer_no", "method", "floor_bytes", "added_bytes"]
    rows = savings.assign(layer=layer_of(savings["module"], layers)).dropna(subset=["layer"])
    if rows.empty:
        return pd.DataFrame(columns=columns)
    per = rows.groupby(["layer", "method"], sort=False)[["floor_bytes", "added_bytes"]].sum()
    per = per.reset_index()
    if layers is None:
        position = {p: int(p.rsplit(".", 1)[-1]) for p in per["layer"].unique()}
    else:
        position = {p: i for i, p in enumerate(layers)}
    per["layer_no"] = per["layer"].map(position).astype(int)
    order = {m: i for i, m in enumerate(dict.fromkeys(savings["method"]))}
    per = per.sort_values(["layer_no", "method"], key=lambda c: c.map(order) if c.name ==
                          "method" else c, kind="stable")
    return per[columns].reset_index(drop=True)


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
    """The model's layers (its repeated blocks) in a layers table, in order: the modules of
    kind decoder_layer ("model.layers.0", ...); for a model whose blocks are of another class
    (GPT-2's transformer.h.N), the items of its outermost module lists (kind container). Any
    module tree works; a table with neither gives []. Ordered by name, numbers as numbers."""
    modules = layers["module"].dropna().astype(str)
    paths = set(modules[layers.loc[modules.index, "kind"] == "decoder_layer"])
    if not paths:
        containers = set(modules[layers.loc[modules.index, "kind"] == "container"])
        items = {m for m in set(modules) if "." in m and m.rsplit(".", 1)[0] in containers}
        paths = {m for m in items if not any(m.startswith(other + ".") for other in items)}
    return sorted(paths, key=_natural_key)


def drill_targets(layers: pd.DataFrame, layer_list: list[str] | None = None) -> list[str]:
    """Modules inside layers that have timed children (layers, attention, MLP, adapted
    linears with their adapter parts), in layer order then module order: the parents one can
    drill into with figures.layer_latency_bars(parent=...)."""
    layer_list = decoder_layers(layers) if layer_list is None else layer_list
    timed = layers[layers["latency_ms"].notna()]
    modules = pd.Series(timed["module"].dropna().astype(str).unique(), dtype=object)
    owner = layer_of(modules, layer_list)
    inside = set(modules[owner.notna()])
    parents = {m.rsplit(".", 1)[0] for m in inside if "." in m} & inside
    owners = dict(zip(modules, owner))
    order = {path: i for i, path in enumerate(layer_list)}
    return sorted(parents, key=lambda p: (order.get(owners.get(p), len(order)),
                                          p != owners.get(p), _natural_key(p)))


def drill_options(targets: list[str], layer_list: list[str], current: str | None) -> list[str]:
    """What the drill-down picker offers at `current` (None: all layers): the layers at the
    top; inside a layer, the way back up (its drillable ancestors) and the drillable modules
    directly below it, so the list stays short for a model of any depth."""
    if current is None or current not in targets:
        return [t for t in targets if t in set(layer_list)] or targets[:200]
    known = set(targets)
    above = [a for a in _ancestors(current) if a in known]
    below = [t for t in targets if t.startswith(current + ".")
             and _nearest_target(t, known) == current]
    return above + [current] + below


def _ancestors(path: str) -> list[str]:
    parts = path.split(".")
    return [".".join(parts[:end]) for end in range(1, len(parts))]


def _nearest_target(path: str, targets: set[str]) -> str | None:
    for ancestor in reversed(_ancestors(path)):
        if ancestor in targets:
            return ancestor
    return None


def drill_up(module: str | None, layer_list: list[str] | None = None) -> str | None:
    """The parent to show after `module` when going one level up: None (all layers) from a
    layer, else the module's parent."""
    if not module or not isinstance(module, str):
        return None
    owner = layer_of(pd.Series([module], dtype=object), layer_list).iloc[0]
    if not isinstance(owner, str) or owner == module or "." not in module:
        return None
    return module.rsplit(".", 1)[0]


def latency_bars(layers: pd.DataFrame, parent: str | None = None,
                 layer_list: list[str] | None = None, max_bars: int = 96) -> pd.DataFrame:
    """The rows the latency view draws: forward and backward latency of each layer (parent
    None) or of each direct child of `parent`, with a short `label` (the layer's last name
    part, or the path below `parent`), in model order. Over `max_bars` layers, consecutive
    layers are grouped into about `max_bars` bars, each their mean (label "i-j", `layers` the
    number averaged), so a very deep model stays readable."""
    layer_list = decoder_layers(layers) if layer_list is None else layer_list
    timed = layers[layers["phase"].isin(["forward", "backward"]) & layers["latency_ms"].notna()]
    if parent is None:
        order = {p: i for i, p in enumerate(layer_list)}
        rows = timed[timed["module"].isin(order)].copy()
        rows["position"] = rows["module"].map(order)
        rows["label"] = rows["module"].map(lambda p: p.rsplit(".", 1)[-1])
    else:
        depth = parent.count(".") + 1
        modules = timed["module"].astype(str)
        rows = timed[modules.str.startswith(parent + ".") & (modules.str.count(r"\.") == depth)]
        rows = rows.copy()
        first = {m: i for i, m in enumerate(dict.fromkeys(rows["module"]))}
        rows["position"] = rows["module"].map(first)
        rows["label"] = rows["module"].str.slice(len(parent) + 1)
    rows["layers"] = 1
    columns = ["method", "module", "label", "phase", "latency_ms", "n_kernels", "layers"]
    if parent is None and len(layer_list) > max_bars:
        size = -(-len(layer_list) // max_bars)
        rows["group"] = rows["position"] // size
        grouped = rows.groupby(["group", "method", "phase"], sort=False).agg(
            module=("module", "first"), last=("module", "last"),
            latency_ms=("latency_ms", "mean"), n_kernels=("n_kernels", "mean"),
            layers=("layers", "sum"), first_pos=("position", "min"),
            last_pos=("position", "max")).reset_index()
        grouped["label"] = [f"{a}-{b}" for a, b in zip(grouped["first_pos"],
                                                         grouped["last_pos"])]
        grouped["module"] = grouped["module"] + " .. " + grouped["last"]
        rows = grouped.rename(columns={"first_pos": "position"})
    rows = rows.sort_values("position", kind="stable")
    return rows[columns].reset_index(drop=True)


def layer_ops(ops: pd.DataFrame, method: str, layer: str, phase: str | None = None,
              max_ops: int = 3000) -> pd.DataFrame:
    """The ops of one layer's modules and method (in one phase, or all; ops attributed to the
    layer itself, such as its residual adds, are not drawn), in time order, with `t_us`:
    microseconds from the first of them, so the axis spans the layer, not the step; `row`:
    the module path below the layer. Over `max_ops` ops, neighbouring ops of one module row
    and kind (base or adapter branch) are merged into one bar per time slot (`count` ops,
    their summed dur_us, name "N ops"), so the view draws at most about max_ops bars."""
    rows = ops[(ops["method"] == method) & ops["module"].astype(str).str.startswith(layer + ".")]
    if phase:
        rows = rows[rows["phase"] == phase]
    rows = rows.dropna(subset=["start_us", "dur_us"]).sort_values(["start_us", "seq_no"])
    rows = rows.assign(t_us=rows["start_us"] - (rows["start_us"].min() if len(rows) else 0),
                       row=rows["module"].astype(str).str.slice(len(layer) + 1), count=1)
    if len(rows) > max_ops:
        span = float((rows["t_us"] + rows["dur_us"]).max()) or 1.0
        slots = max(1, max_ops // max(1, rows.groupby(["row", "adapter_branch"]).ngroups))
        rows = rows.assign(slot=(rows["t_us"] / span * slots).astype(int).clip(upper=slots - 1))
        merged = rows.groupby(["row", "adapter_branch", "slot"], sort=False).agg(
            module=("module", "first"), phase=("phase", "first"), t_us=("t_us", "min"),
            dur_us=("dur_us", "sum"), count=("count", "sum"),
            start_us=("start_us", "min")).reset_index()
        merged["name"] = merged["count"].map(lambda n: f"{n} ops")
        rows = merged.drop(columns="slot").sort_values("t_us")
    return rows.reset_index(drop=True)


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
