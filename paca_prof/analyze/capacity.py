"""Capacity curves stored beside a trace: peak memory against sequence length per method.

A capacity sweep (the planner's curve: `paca-prof plan --out`) is stored in a trace folder as
the optional table capacity.parquet (trace.CAPACITY_COLUMNS: method, seq, batch, category,
bytes, reserved_bytes): the bytes of each memory category alive at the peak of one simulated
step at that sequence length and batch, and the reserved memory the allocator model gives it. trace.load reads it into Trace.capacity; these functions answer "how
long a sequence fits in this much memory" from it without simulating anything. Pandas only; no
torch here. The budget itself (device memory less headroom) is the planner's (budget.make_budget).
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from paca_prof import trace as trace_io
from paca_prof.trace import TraceError

CAPACITY_FILE = "capacity.parquet"


def load_capacity(trace_path: str | Path) -> pd.DataFrame | None:
    """The capacity sweep stored in a trace folder (typed as trace.CAPACITY_COLUMNS), or None
    if the folder holds none, without loading the rest of the trace.

    Raises TraceError (one line) for an unreadable file or one that lacks a schema column.
    """
    path = Path(trace_path) / CAPACITY_FILE
    if not path.is_file():
        return None
    try:
        table = pd.read_parquet(path)
    except Exception as error:  # pyarrow raises several types for a truncated file
        raise TraceError(f"{path}: unreadable ({type(error).__name__})") from None
    missing = [c for c in trace_io.CAPACITY_REQUIRED if c not in table]
    if missing:
        raise TraceError(f"{path}: missing column(s) {', '.join(missing)}")
    try:
        return trace_io.conform(table, "capacity")
    except (TypeError, ValueError) as error:
        raise TraceError(f"{path}: bad values ({type(error).__name__})") from None


def batches(capacity: pd.DataFrame) -> list[int]:
    """The batch sizes a sweep holds, smallest first."""
    return sorted(int(b) for b in capacity["batch"].unique())


def select_batch(capacity: pd.DataFrame, batch: int | None = None,
                 preferred: int | None = None) -> tuple[pd.DataFrame, int]:
    """The part of a sweep at one batch size and that batch. Default: `preferred` (the run's
    batch) if the sweep holds it, else the smallest it holds. ValueError if the sweep holds no
    point at `batch`."""
    held = batches(capacity)
    if not held:
        raise ValueError("the capacity sweep is empty")
    if batch is None:
        batch = preferred if preferred in held else held[0]
    chosen = int(batch)
    if chosen not in held:
        raise ValueError(f"no capacity points at batch {chosen} (have {held})")
    return capacity[capacity["batch"] == chosen], chosen


def holds_reserved(curve: pd.DataFrame) -> bool:
    """Whether every point of the sweep has its reserved memory."""
    return "reserved_bytes" in curve and bool(curve["reserved_bytes"].notna().all())


def point_totals(curve: pd.DataFrame) -> pd.DataFrame:
    """One row per (method, seq): the memory that must fit, `bytes`: the point's reserved
    memory where the sweep holds it (the planner's criterion), else its peak, the sum of its
    categories (sweeps written before reserved memory was modelled)."""
    grouped = curve.groupby(["method", "seq"], sort=False)
    peaks = grouped["bytes"].sum()
    if holds_reserved(curve):
        peaks = grouped["reserved_bytes"].first().astype("int64")
    return peaks.reset_index(name="bytes")


def max_seq_from_curve(curve: pd.DataFrame, budget_bytes: float) -> dict[str, int]:
    """The longest sequence per method whose memory (point_totals: reserved, else the peak)
    fits in `budget_bytes`.

    `curve` holds one batch size (see select_batch). The answer interpolates linearly between the simulated points on
    either side of the budget (the planner's curve also holds points it fitted between its
    probes; the peak grows smoothly between points, but quadratically with eager attention,
    so a coarse curve slightly overestimates there) and is rounded down. It never
    extrapolates: a method whose longest point fits gets that point's length (a lower bound),
    and one whose shortest point does not fit gets 0.
    """
    totals = point_totals(curve)
    result = {}
    for method, group in totals.groupby("method", sort=False):
        group = group.sort_values("seq")
        seqs, peaks = group["seq"].to_numpy(float), group["bytes"].to_numpy(float)
        over = [i for i, peak in enumerate(peaks) if peak > budget_bytes]
        if not over:
            result[method] = int(seqs[-1])
        elif over[0] == 0:
            result[method] = 0
        else:
            i = over[0]
            s0, s1, p0, p1 = seqs[i - 1], seqs[i], peaks[i - 1], peaks[i]
            result[method] = int(math.floor(s0 + (budget_bytes - p0) * (s1 - s0) / (p1 - p0)))
    return result


def max_seq_table(curve: pd.DataFrame, budget_bytes: float,
                  baseline: str = "lora") -> pd.DataFrame:
    """max_seq_from_curve as a table: method, max_seq, `lower_bound` (True where even the
    longest simulated point fits, so the method may fit longer sequences), and max_seq as a
    ratio to `baseline` (NaN if the baseline is absent or fits nothing)."""
    best = max_seq_from_curve(curve, budget_bytes)
    longest = curve.groupby("method", sort=False)["seq"].max()
    table = pd.DataFrame({"method": list(best), "max_seq": list(best.values())})
    table["lower_bound"] = [best[m] >= longest[m] for m in best]
    base = best.get(baseline)
    table[f"max_seq_vs_{baseline}"] = table["max_seq"] / base if base else float("nan")
    return table
