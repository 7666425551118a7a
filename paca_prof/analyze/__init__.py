"""The analyzer: one front object over a loaded trace, delegating to small analyses that each
return a DataFrame (in the style of Holistic Trace Analysis). Pandas only; no torch here."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from paca_prof import trace as trace_io
from paca_prof.analyze import overview


class TraceAnalysis:
    """Analyses of one trace folder (measured, simulated or projected).

    Every method returns a new DataFrame; none changes the trace.
    """

    def __init__(self, source: str | Path | trace_io.Trace):
        self.trace = source if isinstance(source, trace_io.Trace) else trace_io.load(source)

    @property
    def source(self) -> str:
        return self.trace.source

    def check_methods(self, methods: list[str] | None) -> list[str]:
        """The methods to analyse; ValueError naming the trace's methods for an unknown one."""
        known = self.trace.methods
        if not methods:
            return known
        missing = [m for m in methods if m not in known]
        if missing:
            raise ValueError(f"method(s) {', '.join(missing)} not in trace {self.trace.path} "
                             f"(it has {', '.join(known)})")
        return list(methods)

    def summary(self, baseline: str = "lora", methods: list[str] | None = None) -> pd.DataFrame:
        """Per method: step, forward and backward ms, ops per step, activation and peak MiB,
        trainable parameters, and each as a ratio to `baseline` (NaN if it is not in the trace)."""
        return overview.summary(self.trace.summary, baseline, self.check_methods(methods))
