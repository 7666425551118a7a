"""Measured against simulated: where a measured run (paca-prof run --device cpu|cuda, or a
profiled loop) and the simulation of the same configuration disagree, in bytes.

Two traces are comparable when the first's bytes are measured and the second's simulated, and
they share the batch, the sequence length, the dtype and the model's sizes. Three analyses,
each a DataFrame with measured_bytes, simulated_bytes, diff_bytes (simulated - measured) and
ratio (simulated / measured):
  activations  per method and module: activation bytes (the innermost module's, forward);
  peak         per method and memory category at the peak, and the peak itself ("total");
  totals       per method: activation bytes, peak bytes, trainable parameters, ops per step.
Pandas only, no torch. A difference is a fact about the two runs, not an error of either: the
CPU's attention kernels save other tensors than the fused CUDA ones a simulation models, and a
measured peak includes what the allocator saw, a simulated one exact tensor bytes.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from paca_prof.memory import MEMORY_CATEGORIES
from paca_prof.trace import peak_column, sources

# Model sizes two comparable traces must share (where both record them).
SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
         "num_attention_heads", "num_key_value_heads", "head_dim")
TOTALS = {"activation_bytes": "activation_bytes", "peak_bytes": "peak_bytes",
          "trainable_params": "trainable_params", "n_kernels": "ops"}


def check_comparable(measured: dict, simulated: dict) -> None:
    """ValueError (one line) unless run.yaml `measured` has measured bytes, `simulated`
    simulated ones, and both have one batch, sequence length, dtype and model size."""
    if sources(measured).get("bytes") != "measured":
        raise ValueError("the first trace must have measured bytes (paca-prof run --device "
                         "cpu|cuda, or paca_prof.profile)")
    if sources(simulated).get("bytes") != "simulated":
        raise ValueError("the second trace must have simulated bytes (paca-prof run --device "
                         "meta, or paca_prof.simulate)")
    for key in ("batch", "seq", "dtype"):
        if measured.get(key) != simulated.get(key):
            raise ValueError(f"the traces differ in {key}: {measured.get(key)} measured, "
                             f"{simulated.get(key)} simulated; simulate the measured "
                             "configuration")
    mine = (measured.get("model") or {}).get("config") or {}
    theirs = (simulated.get("model") or {}).get("config") or {}
    for key in SIZES:
        if key in mine and key in theirs and mine[key] != theirs[key]:
            raise ValueError(f"the traces are of different models: {key} {mine[key]} measured, "
                             f"{theirs[key]} simulated")


def common_methods(measured: pd.DataFrame, simulated: pd.DataFrame,
                   methods: list[str] | None = None) -> list[str]:
    """The methods both summaries hold with status ok (in the measured order), or `methods`;
    ValueError when none is common or one asked for is missing from either."""
    def ok(summary):
        return list(summary.loc[summary["status"] == "ok", "method"])

    both = [m for m in ok(measured) if m in set(ok(simulated))]
    if methods:
        missing = [m for m in methods if m not in both]
        if missing:
            raise ValueError(f"method(s) {', '.join(missing)} not ok in both traces (both "
                             f"have {', '.join(both) or 'none'})")
        return list(methods)
    if not both:
        raise ValueError(f"the traces share no method that ran: {', '.join(ok(measured))} "
                         f"measured, {', '.join(ok(simulated))} simulated")
    return both


def activations(measured: pd.DataFrame, simulated: pd.DataFrame,
                methods: list[str]) -> pd.DataFrame:
    """Per (method, module): activation bytes measured and simulated, largest disagreement
    first; a module that saves nothing on either side is left out, one that exists on one
    side only has NaN on the other."""
    def forward(layers):
        rows = layers[(layers["phase"] == "forward") & layers["method"].isin(methods)]
        return rows[["method", "module", "kind", "activation_bytes"]]

    merged = forward(measured).merge(forward(simulated), on=["method", "module"], how="outer",
                                     suffixes=("_measured", "_simulated"))
    merged["kind"] = merged["kind_measured"].fillna(merged["kind_simulated"])
    table = pd.DataFrame({
        "method": merged["method"], "module": merged["module"], "kind": merged["kind"],
        "measured_bytes": merged["activation_bytes_measured"].astype(float),
        "simulated_bytes": merged["activation_bytes_simulated"].astype(float)})
    table = table[table[["measured_bytes", "simulated_bytes"]].fillna(0).sum(axis=1) > 0]
    return _ranked(_with_difference(table))


def peak(measured: pd.DataFrame, simulated: pd.DataFrame, methods: list[str]) -> pd.DataFrame:
    """Per (method, category): bytes alive at each run's peak, the categories in the order
    figures stack them, then "total" (the peak)."""
    rows = []
    mine, theirs = measured.set_index("method"), simulated.set_index("method")
    for method in methods:
        for category in (*MEMORY_CATEGORIES, "total"):
            column = "peak_bytes" if category == "total" else peak_column(category)
            rows.append({"method": method, "category": category,
                         "measured_bytes": _number(mine.loc[method, column]),
                         "simulated_bytes": _number(theirs.loc[method, column])})
    return _with_difference(pd.DataFrame(rows))


def totals(measured: pd.DataFrame, simulated: pd.DataFrame, methods: list[str]) -> pd.DataFrame:
    """Per (method, quantity): activation bytes, peak bytes, trainable parameters and ops per
    step (CPU ops, CUDA kernels or simulated ops: by their trace's meaning)."""
    rows = []
    mine, theirs = measured.set_index("method"), simulated.set_index("method")
    for method in methods:
        for column, quantity in TOTALS.items():
            rows.append({"method": method, "quantity": quantity,
                         "measured": _number(mine.loc[method, column]),
                         "simulated": _number(theirs.loc[method, column])})
    table = pd.DataFrame(rows)
    table["diff"] = table["simulated"] - table["measured"]
    table["ratio"] = table["simulated"] / table["measured"].where(table["measured"] != 0)
    return table


def _with_difference(table: pd.DataFrame) -> pd.DataFrame:
    table = table.copy()
    table["diff_bytes"] = table["simulated_bytes"] - table["measured_bytes"]
    table["ratio"] = table["simulated_bytes"] / table["measured_bytes"].where(
        table["measured_bytes"] != 0)
    return table.reset_index(drop=True)


def _ranked(table: pd.DataFrame) -> pd.DataFrame:
    """Largest absolute difference first; a module on one side only counts as its bytes."""
    size = table["diff_bytes"].abs().fillna(
        table[["measured_bytes", "simulated_bytes"]].max(axis=1))
    order = size.sort_values(ascending=False, kind="stable").index
    return table.loc[order].reset_index(drop=True)


def _number(value) -> float:
    return float(value) if value is not None and pd.notna(value) else np.nan
