"""What one method's run contributes to a trace folder, and the one builder of its summary row.

Every engine (measure, simulate, the planner, profile()) returns a MethodResult; engines.run
and the writers concatenate them. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from paca_prof.trace import MEMORY_CATEGORIES, STATUSES, peak_column


@dataclass
class MethodResult:
    """One method's summary row and its rows of the other tables (empty when it failed).

    A simulated step also keeps what its memory table was made from, for the planner and the
    allocator model (not written to the trace): `memory_events` (memory.MemoryEvent, in order),
    `start_bytes` (bytes per category alive when the step started) and, under FSDP2,
    `segment_cuts` (the times at which the second decoder layer's forward and the first one's
    backward begin: plan.segment_peaks)."""

    summary: dict
    layers: pd.DataFrame = field(default_factory=pd.DataFrame)
    ops: pd.DataFrame = field(default_factory=pd.DataFrame)
    memory: pd.DataFrame = field(default_factory=pd.DataFrame)
    chrome_trace: Path | None = None
    memory_events: list = field(default_factory=list)
    start_bytes: dict = field(default_factory=dict)
    segment_cuts: dict = field(default_factory=dict)

    @property
    def method(self) -> str:
        return self.summary["method"]


def summary_row(method: str, status: str = "ok", *, error: str | None = None,
                times_ms: dict[str, float] | None = None,
                peak_breakdown: dict[str, int] | None = None, **columns) -> dict:
    """A summary row (trace.SUMMARY_COLUMNS). `times_ms` maps phases (forward, backward,
    optimizer, step) to milliseconds. `peak_breakdown` maps memory categories to their bytes at
    the peak; peak_bytes is defined as their sum, and nothing else sets it. Device counters that
    are not tensor bytes (allocator_peak_bytes, reserved_bytes) go in `columns` and never
    change peak_bytes, so the breakdown always adds up to the peak."""
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
    if "peak_bytes" in columns:
        raise ValueError("peak_bytes is the sum of peak_breakdown; give the breakdown")
    row = {"method": method, "status": status}
    if error is not None:
        row["error"] = error.splitlines()[0][:500] if error else error
    for phase, ms in (times_ms or {}).items():
        row[f"{phase}_ms"] = ms
    if peak_breakdown is not None:
        unknown = set(peak_breakdown) - set(MEMORY_CATEGORIES)
        if unknown:
            raise ValueError(f"unknown memory categories {sorted(unknown)}")
        row["peak_bytes"] = sum(int(peak_breakdown.get(c, 0)) for c in MEMORY_CATEGORIES)
        row.update({peak_column(c): int(peak_breakdown.get(c, 0)) for c in MEMORY_CATEGORIES})
    row.update(columns)
    return row


def failed(method: str, status: str, error: BaseException) -> MethodResult:
    """The result of a method that ran out of memory (status oom) or failed (status error)."""
    message = f"{type(error).__name__}: {error}"
    return MethodResult(summary_row(method, status, error=message))
