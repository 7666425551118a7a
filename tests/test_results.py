"""The one builder of summary rows (paca_prof/results.py): peak_bytes is the breakdown's sum, and
device counters never change it."""

from __future__ import annotations

import pandas as pd
import pytest

from paca_prof import trace
from paca_prof.engines import measure
from paca_prof.results import failed, summary_row

BREAKDOWN = {"weights": 1000, "trainable": 10, "gradients": 10, "optimizer": 20,
             "activations": 500, "logits_loss": 300, "rest": 7}


def test_peak_is_the_sum_of_the_breakdown_and_columns_are_derived_from_categories():
    row = summary_row("lora", times_ms={"forward": 1.0, "step": 3.0}, peak_breakdown=BREAKDOWN,
                      n_kernels=5)
    assert row["peak_bytes"] == sum(BREAKDOWN.values()) == 1847
    assert {trace.peak_column(c) for c in trace.MEMORY_CATEGORIES} <= set(row)
    assert row["forward_ms"] == 1.0 and row["step_ms"] == 3.0 and row["n_kernels"] == 5
    assert set(row) <= set(trace.SUMMARY_COLUMNS)


def test_a_cuda_run_keeps_torchs_counters_beside_the_tensor_peak(monkeypatch):
    """On CUDA, torch.cuda.max_memory_allocated counts rounded blocks and kernel workspaces,
    so it exceeds the tensor bytes. It goes to its own column; the breakdown still adds up to
    the peak (a CPU-only CI cannot run the CUDA path, so its counters are faked here)."""
    monkeypatch.setattr(measure.torch.cuda, "max_memory_allocated", lambda: 4096)
    monkeypatch.setattr(measure.torch.cuda, "max_memory_reserved", lambda: 2**21)
    device_peaks = measure.cuda_memory_peaks()
    assert device_peaks == {"allocator_peak_bytes": 4096, "reserved_bytes": 2**21}
    row = summary_row("lora", peak_breakdown=BREAKDOWN, **device_peaks)
    assert row["peak_bytes"] == 1847 < row["allocator_peak_bytes"] < row["reserved_bytes"]
    assert sum(row[trace.peak_column(c)] for c in trace.MEMORY_CATEGORIES) == row["peak_bytes"]
    loaded = trace.conform(pd.DataFrame([row]), "summary")
    assert loaded.loc[0, "allocator_peak_bytes"] == 4096


def test_bad_rows_are_refused():
    with pytest.raises(ValueError, match="status"):
        summary_row("lora", "fine")
    with pytest.raises(ValueError, match="peak_bytes"):
        summary_row("lora", peak_bytes=5)
    with pytest.raises(ValueError, match="categories"):
        summary_row("lora", peak_breakdown={"cache": 1})


def test_a_failed_method_has_its_status_and_a_one_line_error():
    result = failed("dora", "oom", RuntimeError("CUDA out of memory.\nTried to allocate 2 GiB"))
    assert result.summary == {"method": "dora", "status": "oom",
                              "error": "RuntimeError: CUDA out of memory."}
    assert result.layers.empty and result.ops.empty and result.memory.empty
