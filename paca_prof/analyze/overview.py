"""The per-method overview: the summary table with ratios to a baseline method, and the
spread of measured step times (the intervals those ratios carry)."""

from __future__ import annotations

import pandas as pd

from paca_prof.units import MIB

OVERVIEW_COLUMNS = {
    "step_ms": "step_ms", "forward_ms": "forward_ms", "backward_ms": "backward_ms",
    "n_kernels": "ops_per_step", "activation_bytes": "activation_mib", "peak_bytes": "peak_mib",
    "reserved_bytes": "reserved_mib", "trainable_params": "trainable_params",
}


def summary(table: pd.DataFrame, baseline: str, methods: list[str]) -> pd.DataFrame:
    """One row per method (in `methods` order) with the overview columns and their ratios to
    `baseline`. A method that ran out of memory keeps its numbers (simulated ones are kept);
    one that failed has none (NaN)."""
    rows = table.set_index("method").loc[methods]
    out = pd.DataFrame(index=rows.index)
    out["status"] = rows["status"]
    for column, name in OVERVIEW_COLUMNS.items():
        values = rows[column].astype("float64")
        if column.endswith("_bytes"):
            values = values / MIB
        out[name] = values
    base = out.loc[baseline] if baseline in out.index else None
    for name in OVERVIEW_COLUMNS.values():
        ratio = out[name] / base[name] if base is not None and base[name] else float("nan")
        out[f"{name}_vs_{baseline}"] = ratio
    return out.reset_index()


SPREAD_COLUMNS = ["method", "step_ms", "step_ms_p25", "step_ms_p75", "steps_timed",
                  "step_ratio", "step_ratio_lo", "step_ratio_hi", "contains_1",
                  "tokens_per_s", "achieved_tflops", "mfu", "spread_warning"]


def timing_spread(table: pd.DataFrame, steps: pd.DataFrame | None, methods: list[str],
                  baseline: str = "lora") -> pd.DataFrame:
    """Per method (in `methods` order): the median step time with its p25/p75, the steps
    timed, the ratio to `baseline` with its 95% interval, whether that interval contains 1
    (the run cannot tell the method from the baseline), throughput, and the spread warning.

    From the summary's spread columns where the trace has them; else recomputed from its steps
    table (paca_prof/spread.py); else (older traces, projections) only step_ms and throughput,
    the spread columns NaN and no warning."""
    from paca_prof import spread

    rows = table.set_index("method").loc[methods]
    out = pd.DataFrame(index=rows.index)
    has_spread = "step_ms_p25" in rows and rows["step_ms_p25"].notna().any()
    if not has_spread and steps is not None and not steps.empty:
        stats = spread.step_stats(steps, baseline).set_index("method")
        rows = rows.drop(columns=[c for c in stats.columns if c in rows and c != "step_ms"])
        rows = rows.join(stats.drop(columns=["step_ms"]), how="left")
    for column in SPREAD_COLUMNS[1:]:
        if column == "contains_1":
            continue
        if column in rows:
            out[column] = rows[column]
        else:
            out[column] = pd.NA if column == "spread_warning" else float("nan")
    out["steps_timed"] = pd.to_numeric(out["steps_timed"], errors="coerce").astype("Int64")
    for column in SPREAD_COLUMNS[1:]:
        if column not in ("contains_1", "spread_warning", "steps_timed"):
            out[column] = pd.to_numeric(out[column], errors="coerce").astype("float64")
    out["contains_1"] = [spread.interval_contains_one(lo, hi) and method != baseline
                         for method, lo, hi in zip(out.index, out["step_ratio_lo"],
                                                   out["step_ratio_hi"])]
    out["spread_warning"] = out["spread_warning"].astype("string").fillna("")
    return out.reset_index()[SPREAD_COLUMNS]
