"""The trace folder: the only contract between the engines and the analyzer (schema_version 1).

    traces/<run-id>/
      run.yaml            what ran, where, with which settings and assumptions
      summary.parquet     one row per method
      layers.parquet      one row per (method, module, phase)
      ops.parquet         one row per op (CPU, simulation) or kernel (CUDA)
      memory.parquet      memory timeline per method and category
      capacity.parquet    optional: peak bytes by category over probed sequence lengths (plan)
      trace-<method>.json Chrome trace events (opens in Perfetto), measured runs only

Writes are atomic: everything goes to a hidden temporary folder beside the target, which is
renamed into place only when complete, so an interrupted run leaves no half-written trace and
never touches an existing one. This module imports no torch: the analyzer reads traces with it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml

SCHEMA_VERSION = 1
SOURCES = ("measured", "simulated", "projected")
STATUSES = ("ok", "oom", "error")
PHASES = ("forward", "backward", "optimizer")

# Memory categories, in the order figures stack them.
MEMORY_CATEGORIES = ("weights", "trainable", "gradients", "optimizer", "activations",
                     "logits_loss", "rest")


def peak_column(category: str) -> str:
    """The summary column holding a memory category's bytes at the peak."""
    return f"peak_{category}_bytes"


PEAK_COLUMNS = tuple(peak_column(c) for c in MEMORY_CATEGORIES)

# Column -> pandas dtype. Columns may be added; none may change meaning without a version bump.
SUMMARY_COLUMNS = {
    "method": "string", "status": "string", "error": "string",
    "step_ms": "float64", "forward_ms": "float64", "backward_ms": "float64",
    "optimizer_ms": "float64", "n_kernels": "Int64", "activation_bytes": "Int64",
    # peak_bytes: live tensor bytes at the step's peak, the sum of the breakdown below.
    # allocator_peak_bytes: what torch.cuda.max_memory_allocated reports (blocks rounded up,
    # kernel workspaces included): measured on CUDA, or the allocator model's in simulation.
    # reserved_bytes: what the caching allocator holds from the device (max_memory_reserved).
    "peak_bytes": "Int64", "allocator_peak_bytes": "Int64", "reserved_bytes": "Int64",
    "trainable_params": "Int64",
    # The peak's breakdown: bytes of each memory category alive at the peak.
    **{column: "Int64" for column in PEAK_COLUMNS},
    # Plan traces only: the longest sequence (or largest batch) that fits the budget.
    "max_seq": "Int64", "max_batch": "Int64",
}
# latency_ms, n_kernels and flops include submodules; activation_bytes belong to the innermost
# module only (forward rows; NA on backward rows).
LAYER_COLUMNS = {
    "method": "string", "module": "string", "phase": "string", "kind": "string",
    "depth": "Int64", "latency_ms": "float64", "activation_bytes": "Int64",
    "n_kernels": "Int64", "flops": "float64",
}
OP_COLUMNS = {
    "method": "string", "step": "Int64", "seq_no": "Int64", "module": "string",
    "phase": "string", "name": "string", "shapes": "string", "dtype": "string",
    "start_us": "float64", "dur_us": "float64", "flops": "float64", "bytes": "float64",
    "adapter_branch": "bool", "device": "string",
}
# Long format: each row gives one category's bytes alive from time t (us from the step's start)
# on; the other categories keep their last value. t = 0 rows hold the state at the start.
MEMORY_COLUMNS = {
    "method": "string", "t": "float64", "allocated_bytes": "Int64", "category": "string",
    # the phase of the event, and whether lm_head or the loss made the allocation
    "phase": "string", "logits_scope": "bool",
}
# A capacity sweep (written by `paca-prof plan --out`): bytes alive at the peak, by category,
# per method and (seq, batch) probed. Optional: only plan traces have it.
CAPACITY_COLUMNS = {
    "method": "string", "seq": "Int64", "batch": "Int64", "category": "string",
    "bytes": "Int64",
}
TABLES = {
    "summary": SUMMARY_COLUMNS,
    "layers": LAYER_COLUMNS,
    "ops": OP_COLUMNS,
    "memory": MEMORY_COLUMNS,
}
OPTIONAL_TABLES = {"capacity": CAPACITY_COLUMNS}
ALL_TABLES = {**TABLES, **OPTIONAL_TABLES}


class TraceError(ValueError):
    """A trace folder that is missing, broken, or of another schema version."""


@dataclass
class Trace:
    """A loaded trace folder: run metadata plus one DataFrame per table."""

    path: Path
    run: dict
    summary: pd.DataFrame
    layers: pd.DataFrame
    ops: pd.DataFrame
    memory: pd.DataFrame
    chrome_traces: dict[str, Path] = field(default_factory=dict)
    capacity: pd.DataFrame | None = None

    @property
    def source(self) -> str:
        return self.run["source"]

    @property
    def methods(self) -> list[str]:
        return list(self.summary["method"])


def empty_table(name: str) -> pd.DataFrame:
    return conform(pd.DataFrame(), name)


def conform(frame: pd.DataFrame, name: str) -> pd.DataFrame:
    """Give a table the schema's columns and dtypes (missing columns are filled with NA)."""
    columns = ALL_TABLES[name]
    frame = frame.copy()
    for column, dtype in columns.items():
        if column not in frame:
            missing = {"bool": False, "float64": float("nan")}.get(dtype, pd.NA)
            frame[column] = pd.Series(missing, index=frame.index, dtype=dtype)
        elif dtype == "bool":
            frame[column] = frame[column].fillna(False).astype(bool)
        elif dtype in ("float64", "Int64"):  # None, NaN and pd.NA all become missing
            values = frame[column].astype(object).where(frame[column].notna(), None)
            frame[column] = pd.to_numeric(values).astype(dtype)
        else:
            frame[column] = frame[column].astype(dtype)
    extra = [c for c in frame.columns if c not in columns]
    return frame[list(columns) + extra].reset_index(drop=True)


def write(path: str | Path, run: dict, tables: dict[str, pd.DataFrame],
          chrome_traces: dict[str, Path] | None = None) -> Path:
    """Write a complete trace folder at `path` atomically; returns the path.

    `run` must hold at least `source`; schema_version is added. `chrome_traces` maps a method to
    a Chrome-trace JSON file that is moved into the folder. Raises TraceError if `path` exists.
    """
    path = Path(path)
    if path.exists():
        raise TraceError(f"{path} already exists; choose another --out")
    if run.get("source") not in SOURCES:
        raise TraceError(f"run source must be one of {SOURCES}, got {run.get('source')!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        plain = json.loads(json.dumps(run, default=str))  # str subclasses, tuples, paths
        with open(staging / "run.yaml", "w") as f:
            yaml.safe_dump({"schema_version": SCHEMA_VERSION, **plain}, f, sort_keys=False)
        for name in TABLES:
            table = conform(tables.get(name, pd.DataFrame()), name)
            table.to_parquet(staging / f"{name}.parquet", index=False)
        for name in OPTIONAL_TABLES:
            if tables.get(name) is not None:
                conform(tables[name], name).to_parquet(staging / f"{name}.parquet", index=False)
        for method, source in (chrome_traces or {}).items():
            shutil.move(str(source), staging / f"trace-{method}.json")
        os.rename(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


def load(path: str | Path) -> Trace:
    """Read a trace folder into typed tables.

    Raises TraceError (one line) for a missing folder, a missing or unreadable file, or a
    schema version other than SCHEMA_VERSION.
    """
    path = Path(path)
    if not path.is_dir():
        raise TraceError(f"{path}: no such trace folder")
    run_file = path / "run.yaml"
    try:
        run = yaml.safe_load(run_file.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise TraceError(f"{path}: unreadable run.yaml ({type(error).__name__})") from None
    if not isinstance(run, dict):
        raise TraceError(f"{path}: run.yaml is not a mapping")
    version = run.get("schema_version")
    if version != SCHEMA_VERSION:
        raise TraceError(
            f"{path}: schema_version {version!r} is not supported (this tool reads {SCHEMA_VERSION})"
        )
    if run.get("source") not in SOURCES:
        raise TraceError(f"{path}: run.yaml source {run.get('source')!r} is not one of {SOURCES}")
    tables = {}
    for name in ALL_TABLES:
        file = path / f"{name}.parquet"
        if name in OPTIONAL_TABLES and not file.exists():
            continue
        try:
            tables[name] = conform(pd.read_parquet(file), name)
        except Exception as error:  # pyarrow raises several types for a truncated file
            raise TraceError(f"{path}: unreadable {name}.parquet ({type(error).__name__})") from None
    chrome = {p.stem.removeprefix("trace-"): p for p in sorted(path.glob("trace-*.json"))}
    return Trace(path=path, run=run, chrome_traces=chrome, **tables)
