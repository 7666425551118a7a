"""The per-method overview: the summary table with ratios to a baseline method."""

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
