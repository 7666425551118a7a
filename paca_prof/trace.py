"""The trace folder: the only contract between the engines and the analyzer (schema_version 1).

    traces/<run-id>/
      run.yaml            what ran, where, with which settings and assumptions
      summary.parquet     one row per method
      layers.parquet      one row per (method, module, phase)
      ops.parquet         one row per op (CPU, simulation) or kernel (CUDA)
      memory.parquet      memory timeline per method and category
      capacity.parquet    optional: peak bytes by category over probed sequence lengths (plan)
      batches.parquet     optional: the batches a profiled loop's model saw (profile())
      steps.parquet       optional: every timed step of a measured run (method, round, phases)
      trace-<method>.json Chrome trace events (opens in Perfetto), measured runs only

Writes are atomic: everything goes to a hidden staging folder beside the target, which is
renamed into place only when complete, so an interrupted run leaves no half-written trace and
never touches an existing one; one writer holds an output name at a time (Reservation). Reads
treat a folder as data from outside: regular files inside it only, size caps, schema checks
(load). This module imports no torch: the analyzer reads traces with it.
"""

from __future__ import annotations

import hashlib
import json
import numbers
import os
import reprlib
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd
import yaml

from paca_prof import validate
from paca_prof.memory import MEMORY_CATEGORIES

SCHEMA_VERSION = 1
SOURCES = ("measured", "simulated", "projected")
STATUSES = ("ok", "oom", "error")
PHASES = ("forward", "backward", "optimizer")

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
    # paged_bytes: paged optimizer states (bitsandbytes' paged optimizers), in CUDA unified
    # memory outside the allocator: not in peak_bytes nor reserved_bytes.
    "peak_bytes": "Int64", "allocator_peak_bytes": "Int64", "reserved_bytes": "Int64",
    "paged_bytes": "Int64",
    "trainable_params": "Int64",
    # Methods whose columns can be stale (paca-authors): of the steps_run steps of a measured
    # run (warm-up, timed and profiled), those in which a layer ran on stale columns.
    "stale_steps": "Int64", "steps_run": "Int64",
    # The peak's breakdown: bytes of each memory category alive at the peak.
    **{column: "Int64" for column in PEAK_COLUMNS},
    # Plan traces only: the longest sequence (or largest batch) that fits the budget.
    "max_seq": "Int64", "max_batch": "Int64",
    # profile() traces only: the median time of a whole loop iteration, prof.step() to
    # prof.step() (data loading and the loop's own code included; step_ms is its phases').
    "loop_ms": "float64",
    # Measured runs: the spread of the timed steps (steps.parquet; paca_prof/spread.py):
    # step_ms is their median, with its 25th/75th percentiles; warmup_steps the untimed steps
    # before them (until the step time settled); step_ratio = step_ms / lora's, with the 95%
    # bootstrap interval over whole rounds; spread_warning says why a ratio cannot be trusted
    # ("" when it can). NA in traces written before these columns existed, and in projections.
    "step_ms_p25": "float64", "step_ms_p75": "float64", "steps_timed": "Int64",
    "warmup_steps": "Int64", "step_ratio": "float64", "step_ratio_lo": "float64",
    "step_ratio_hi": "float64", "spread_warning": "string",
    # Throughput (paca_prof/throughput.py), from step_ms: measured or projected as it is.
    # step_tflop: counted FLOPs of one step / 1e12; mfu: achieved_tflops over the device's
    # peak for the compute dtype (NA where no peak is known, such as a CPU without a spec).
    "tokens_per_s": "float64", "step_tflop": "float64", "achieved_tflops": "float64",
    "mfu": "float64",
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
    # simulated ops: an element-wise op whose operands disagree in layout (engines/simulate.py
    # mixed_layout); NA where not known (measured ops: the profiler records no strides)
    "mixed_layout": "boolean",
}
# Long format: each row gives one category's bytes alive from time t (us from the step's start)
# on; the other categories keep their last value. t = 0 rows hold the state at the start.
MEMORY_COLUMNS = {
    "method": "string", "t": "float64", "allocated_bytes": "Int64", "category": "string",
    # the phase of the event, and whether lm_head or the loss made the allocation
    "phase": "string", "logits_scope": "bool",
    # the event's signed bytes (> 0 allocates, < 0 frees); a start row's is its whole value
    "delta_bytes": "Int64",
}
# A capacity sweep (written by `paca-prof plan --out`): bytes alive at the peak, by category,
# per method and (seq, batch) probed, and the point's reserved memory (the same on each of its
# rows; NA in sweeps written before reserved memory was modelled). Optional: only plan traces
# have it.
CAPACITY_COLUMNS = {
    "method": "string", "seq": "Int64", "batch": "Int64", "category": "string",
    "bytes": "Int64", "reserved_bytes": "Int64",
}
CAPACITY_REQUIRED = ("method", "seq", "batch", "category", "bytes")
# The batches a profiled loop's model was called with in the active steps (written by
# paca_prof.profile()), one row per training forward: the step, the micro-batch within it, the
# pass (timed or profiled), the shape, padding tokens (padding_from says how they were found:
# attention_mask == 0, else labels == -100; NA when neither was given) and sequences
# (position_ids == 0: more than batch means packed sequences; NA without position_ids).
BATCH_COLUMNS = {
    "step": "Int64", "micro_batch": "Int64", "pass": "string", "batch": "Int64",
    "seq": "Int64", "tokens": "Int64", "padding_tokens": "Int64", "padding_fraction": "float64",
    "padding_from": "string", "sequences": "Int64",
}
# Every timed step of a measured run (engines/measure.py): a round runs one step of each method
# in a shuffled order; `step` counts a method's timed steps from 0. Phase times in ms; step_ms
# is their sum. Optional: traces written before it, and simulated ones, have none.
STEP_COLUMNS = {
    "method": "string", "round": "Int64", "step": "Int64", "step_ms": "float64",
    "forward_ms": "float64", "backward_ms": "float64", "optimizer_ms": "float64",
}

# Every table has a `rank`: the process rank of a distributed run (FSDP2 under torchrun, or a
# simulated rank) whose row it is; 0 in single-process runs and in traces written before ranks
# (filled when loaded). A distributed trace holds every rank's rows: the summary one row per
# (method, rank), so its peaks are per rank.
RANK_COLUMN = {"rank": "Int64"}
for _columns in (SUMMARY_COLUMNS, LAYER_COLUMNS, OP_COLUMNS, MEMORY_COLUMNS, CAPACITY_COLUMNS,
                 BATCH_COLUMNS, STEP_COLUMNS):
    _columns.update(RANK_COLUMN)
TABLES = {
    "summary": SUMMARY_COLUMNS,
    "layers": LAYER_COLUMNS,
    "ops": OP_COLUMNS,
    "memory": MEMORY_COLUMNS,
}
OPTIONAL_TABLES = {"capacity": CAPACITY_COLUMNS, "batches": BATCH_COLUMNS,
                   "steps": STEP_COLUMNS}
ALL_TABLES = {**TABLES, **OPTIONAL_TABLES}


# ops.dtype holds torch's names ("bfloat16", "float32", "int64"); the profiler records C++
# names ("c10::BFloat16", "float", "long int"), normalised when written.
_PROFILER_DTYPES = {
    "float": "float32", "double": "float64", "c10::Half": "float16",
    "c10::BFloat16": "bfloat16", "long int": "int64", "int": "int32", "short int": "int16",
    "signed char": "int8", "unsigned char": "uint8", "bool": "bool",
    "c10::complex<float>": "complex64", "c10::complex<double>": "complex128",
    "c10::Float8_e4m3fn": "float8_e4m3fn", "c10::Float8_e5m2": "float8_e5m2",
}


def normalize_dtype(name: str) -> str:
    """torch's name of a dtype, from torch's ("torch.bfloat16", "bfloat16") or the profiler's
    ("c10::BFloat16") spelling; other names are kept as they are."""
    name = str(name).removeprefix("torch.")
    return _PROFILER_DTYPES.get(name, name)


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
    batches: pd.DataFrame | None = None
    steps: pd.DataFrame | None = None

    @property
    def source(self) -> str:
        return self.run["source"]

    @property
    def methods(self) -> list[str]:
        """The methods, in order (each once: a distributed trace has a row per rank)."""
        return list(dict.fromkeys(self.summary["method"]))

    @property
    def ranks(self) -> list[int]:
        """The ranks whose rows this trace holds ([0] for a single-process run)."""
        return sorted(int(r) for r in self.summary["rank"].dropna().unique()) or [0]

    def check_rank(self, rank) -> int:
        """`rank` as an int when it is one of this trace's ranks. ValueError (one short line)
        for a value that is no whole number (a bool, a float or a string included: a value
        from outside, such as the dashboard's rank picker, is checked here) or a rank the
        trace does not hold."""
        if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
            raise ValueError(f"a rank is a whole number, not {reprlib.repr(rank)}")
        if int(rank) not in self.ranks:
            raise ValueError(f"rank {reprlib.repr(int(rank))} is not in this trace (ranks "
                             f"{', '.join(map(str, self.ranks))})")
        return int(rank)

    def for_rank(self, rank: int) -> Trace:
        """This trace with only `rank`'s rows in every table (chrome traces are rank 0's).
        ValueError for a rank the trace does not hold (check_rank)."""
        rank = self.check_rank(rank)
        if self.ranks == [rank]:
            return self

        def only(frame):
            if frame is None:
                return None
            return frame[frame["rank"] == rank].reset_index(drop=True)

        return replace(self, summary=only(self.summary), layers=only(self.layers),
                       ops=only(self.ops), memory=only(self.memory),
                       chrome_traces=self.chrome_traces if rank == 0 else {},
                       capacity=only(self.capacity), batches=only(self.batches),
                       steps=only(self.steps))


def sources(run: dict) -> dict:
    """Where a trace's times and bytes come from: {"time": measured|projected|None, "bytes":
    measured|simulated}; traces written before `sources` existed have one `source` for both."""
    recorded = run.get("sources")
    if isinstance(recorded, dict):
        return recorded
    return {"time": run.get("source"), "bytes": run.get("source")}


def title(run: dict) -> str:
    """One line naming a run: model, shape, dtype, device."""
    model = (run.get("model") or {}).get("name", "?")
    device = (run.get("device") or {}).get("name", "?")
    distributed = run.get("distributed") if isinstance(run.get("distributed"), dict) else {}
    ranks = (f", FSDP2 over {distributed.get('world_size')} ranks (per rank)"
             if distributed.get("fsdp") else "")
    return (f"{model}, batch {run.get('batch')} x seq {run.get('seq')}, {run.get('dtype')}, "
            f"{device}{ranks}")


def empty_table(name: str) -> pd.DataFrame:
    return conform(pd.DataFrame(), name)


def conform(frame: pd.DataFrame, name: str) -> pd.DataFrame:
    """Give a table the schema's columns and dtypes (missing columns are filled with NA)."""
    columns = ALL_TABLES[name]
    frame = frame.copy()
    for column, dtype in columns.items():
        if column not in frame:
            missing = 0 if column == "rank" else {"bool": False,
                                                  "float64": float("nan")}.get(dtype, pd.NA)
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


# --- Writing -----------------------------------------------------------------------------------

STAGING_PREFIX = ".paca-prof-staging-"  # a trace being written; hidden, never listed or loaded
_LOCK_PREFIX = ".paca-prof-lock-"


def check_name(path: str | Path) -> None:
    """TraceError if a trace folder's name is longer than the file system allows: found before
    a run starts, not at the rename that ends it."""
    path = Path(path)
    limit = 255
    try:
        limit = os.pathconf(path.parent if path.parent.exists() else ".", "PC_NAME_MAX")
    except (OSError, ValueError):
        pass
    if len(path.name.encode()) > limit:
        raise TraceError(f"output name {path.name[:40]}... is {len(path.name.encode())} bytes; "
                         f"this file system allows {limit}")


class Reservation:
    """An output trace folder reserved for one writer, from the start of a run to its end.

        with trace.Reservation(out) as reserved:
            ...                                   # files may be put in reserved.staging
            reserved.commit(run, tables)          # renamed into place, atomically

    Entering checks that `path` does not exist and that its name fits the file system, takes
    an exclusive lock on the name (a second writer to the same folder gets a TraceError at
    once, not at the end) and makes a hidden staging folder beside it. Leaving without a
    commit (an error, Ctrl-C, SIGTERM) removes the staging folder; an existing folder is never
    touched. Limits: a killed process (SIGKILL) leaves its hidden staging folder behind; it is
    never listed by the dashboard, and load() refuses it as an unfinished write.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.staging: Path | None = None
        self._lock_fd: int | None = None
        self._lock_path = self.path.parent / (
            _LOCK_PREFIX + hashlib.sha1(self.path.name.encode()).hexdigest()[:16])

    def __enter__(self) -> Reservation:
        check_name(self.path)
        if self.path.exists():
            raise TraceError(f"{self.path} already exists; choose another --out")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise TraceError(f"cannot create output folder {self.path.parent}: "
                             f"{error.strerror}") from None
        self._lock()
        try:
            self.staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.path.parent))
        except BaseException:
            self._unlock()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
        self._unlock()

    def commit(self, run: dict, tables: dict[str, pd.DataFrame]) -> Path:
        """Write run.yaml and the tables into the staging folder, then rename it to the path.
        `run` must hold at least `source`; schema_version is added."""
        if run.get("source") not in SOURCES:
            raise TraceError(f"run source must be one of {SOURCES}, got {run.get('source')!r}")
        plain = json.loads(json.dumps(run, default=str))  # str subclasses, tuples, paths
        with open(self.staging / "run.yaml", "w") as f:
            yaml.safe_dump({"schema_version": SCHEMA_VERSION, **plain}, f, sort_keys=False)
        for name in TABLES:
            table = conform(tables.get(name, pd.DataFrame()), name)
            table.to_parquet(self.staging / f"{name}.parquet", index=False)
        for name in OPTIONAL_TABLES:
            if tables.get(name) is not None:
                conform(tables[name], name).to_parquet(self.staging / f"{name}.parquet",
                                                       index=False)
        if self.path.exists():  # cannot happen while we hold the lock, unless made by hand
            raise TraceError(f"{self.path} appeared while this run was writing it")
        os.rename(self.staging, self.path)
        self.staging = None
        return self.path

    def _lock(self) -> None:
        import fcntl

        while True:
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise TraceError(f"another paca-prof is writing {self.path}; wait for it or "
                                 "choose another --out") from None
            # the file may have been unlinked by its last holder between open and flock
            try:
                if os.stat(self._lock_path).st_ino == os.fstat(fd).st_ino:
                    self._lock_fd = fd
                    return
            except FileNotFoundError:
                pass
            os.close(fd)

    def _unlock(self) -> None:
        if self._lock_fd is None:
            return
        try:
            os.unlink(self._lock_path)
        except OSError:
            pass
        os.close(self._lock_fd)
        self._lock_fd = None


def write(path: str | Path, run: dict, tables: dict[str, pd.DataFrame],
          chrome_traces: dict[str, Path] | None = None) -> Path:
    """Write a complete trace folder at `path` atomically (a Reservation from start to end);
    returns the path. `chrome_traces` maps a method to a Chrome-trace JSON file that is moved
    into the folder. Raises TraceError if `path` exists or another writer holds it."""
    with Reservation(path) as reserved:
        for method, source in (chrome_traces or {}).items():
            shutil.move(str(source), reserved.staging / f"trace-{method}.json")
        return reserved.commit(run, tables)


# --- Reading: a trace folder is data from outside, checked before it is used --------------------

RUN_FILE_LIMIT = 4 * 2**20
TABLE_FILE_LIMIT = 2**30
TABLE_ROWS_LIMIT = 50_000_000
TABLE_BYTES_LIMIT = 8 * 2**30  # uncompressed, as the parquet footer states it


class _AliasRefused(yaml.YAMLError):
    pass


class _NoAliasLoader(yaml.SafeLoader):
    """YAML without anchors and aliases: run.yaml never has them, and a crafted file could use
    them to make a tiny file expand without bound when its values are printed."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise _AliasRefused("aliases are not allowed in run.yaml")
        return super().compose_node(parent, index)


def _optional(kind):
    return (kind, type(None))


# run.yaml's keys: (the types a value may have, required)
RUN_KEYS = {
    "schema_version": (int, True), "source": (str, True), "sources": (dict, False),
    "command": (str, False), "created": (str, False), "model": (dict, True),
    "seq": (_optional(int), True), "batch": (_optional(int), True), "dtype": (str, False),
    "seed": (_optional(int), False), "device": (dict, True), "gpu": (_optional(dict), False),
    "methods": (dict, False), "recipe": (dict, False), "assumptions": (dict, False),
    "settings": (dict, False), "versions": (dict, False), "plan": (dict, False),
    "profile": (dict, False), "batches": (dict, False), "distributed": (dict, False),
    "timing": (dict, False),
}
_NESTED_STRINGS = {"model": ("name",), "device": ("type", "name")}


def validate_run(run, where: str = "run.yaml") -> dict:
    """Check run.yaml's keys and types (RUN_KEYS): TraceError naming the first bad one. Values
    the views show as text must be text, so that no value can become markup."""
    if not isinstance(run, dict):
        raise TraceError(f"{where} is not a mapping")
    version = run.get("schema_version")
    if version != SCHEMA_VERSION:
        raise TraceError(f"{where}: schema_version {version!r} is not supported (this tool "
                         f"reads {SCHEMA_VERSION})")
    for key, (kinds, required) in RUN_KEYS.items():
        if key not in run:
            if required:
                raise TraceError(f"{where}: no {key}")
            continue
        value = run[key]
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise TraceError(f"{where}: {key} is a {type(value).__name__}, not "
                             f"{' or '.join(k.__name__ for k in _as_tuple(kinds))}")
    if run["source"] not in SOURCES:
        raise TraceError(f"{where}: source {run['source'][:40]!r} is not one of {SOURCES}")
    for key, fields in _NESTED_STRINGS.items():
        for name in fields:
            if not isinstance(run[key].get(name), str):
                raise TraceError(f"{where}: {key}.{name} must be a string")
    memory = run["device"].get("memory_bytes")
    if memory is not None and (isinstance(memory, bool) or not isinstance(memory, int)):
        raise TraceError(f"{where}: device.memory_bytes must be an integer")
    recorded = run.get("sources", {})
    for name, value in recorded.items():
        if value is not None and value not in SOURCES:
            raise TraceError(f"{where}: sources.{name} {str(value)[:40]!r} is not one of "
                             f"{SOURCES}")
    for name, value in run.get("methods", {}).items():
        if not isinstance(name, str) or not isinstance(value, dict):
            raise TraceError(f"{where}: methods must map method names to their settings")
    for name, value in (run.get("gpu") or {}).items():
        if name == "name" and not isinstance(value, str):
            raise TraceError(f"{where}: gpu.name must be a string")
    return run


def _as_tuple(kinds) -> tuple:
    return kinds if isinstance(kinds, tuple) else (kinds,)


def _read_table(path: Path, name: str) -> pd.DataFrame:
    import io

    import pyarrow.parquet as pq

    file = path / f"{name}.parquet"
    try:
        data = validate.read_small_file(file, f"{name}.parquet", TABLE_FILE_LIMIT, inside=path)
    except ValueError as error:
        raise TraceError(f"{path}: {error}") from None
    try:
        parquet = pq.ParquetFile(io.BytesIO(data))
        meta = parquet.metadata
        expanded = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
        if meta.num_rows > TABLE_ROWS_LIMIT or expanded > TABLE_BYTES_LIMIT:
            raise TraceError(f"{path}: {name}.parquet is too large to load ({meta.num_rows:,} "
                             f"rows, {expanded / 2**30:.1f} GiB uncompressed)")
        frame = parquet.read().to_pandas()
    except TraceError:
        raise
    except Exception as error:  # pyarrow raises several types for a broken file
        raise TraceError(f"{path}: unreadable {name}.parquet ({type(error).__name__})") from None
    return frame


def _check_table(frame: pd.DataFrame, name: str, path: Path) -> pd.DataFrame:
    """The schema's dtypes on a read table; TraceError for a value that cannot take them or,
    in the summary, no rows, no status column, or a method named twice."""
    if name == "summary":
        for column in ("method", "status"):
            if column not in frame:
                raise TraceError(f"{path}: summary.parquet has no {column} column")
        if frame.empty:
            raise TraceError(f"{path}: summary.parquet has no rows")
    try:
        frame = conform(frame, name)
    except (TypeError, ValueError) as error:
        reason = (str(error).splitlines() or [""])[0][:120]
        raise TraceError(f"{path}: {name}.parquet has values of the wrong type ({reason})") \
            from None
    if name == "summary":
        if frame["method"].isna().any():
            raise TraceError(f"{path}: summary.parquet has a row without a method")
        repeated = sorted(set(frame.loc[frame[["method", "rank"]].duplicated(),
                                        "method"].astype(str)))
        if repeated:
            raise TraceError(f"{path}: summary.parquet names method(s) twice: "
                             f"{', '.join(repeated)}")
        bad = sorted(set(frame["status"].astype(str)) - set(STATUSES))
        if bad:
            raise TraceError(f"{path}: summary.parquet has unknown status(es) {bad[:3]}")
    return frame


def read_run(path: str | Path, prefix: str | None = None) -> dict:
    """A trace folder's run.yaml, read as data from outside: a regular file inside the folder
    within RUN_FILE_LIMIT, YAML without aliases, checked against RUN_KEYS. TraceError (one
    line, starting with `prefix`, by default the folder's path) otherwise, a nesting too deep
    for the parser included."""
    path = Path(path)
    prefix = f"{path}: " if prefix is None else prefix
    try:
        data = validate.read_small_file(path / "run.yaml", "run.yaml", RUN_FILE_LIMIT,
                                        inside=path)
        run = yaml.load(data.decode("utf-8"), Loader=_NoAliasLoader)  # noqa: S506 (safe)
    except (ValueError, yaml.YAMLError, UnicodeDecodeError, RecursionError) as error:
        readable = isinstance(error, _AliasRefused) or (
            isinstance(error, ValueError) and not isinstance(error, UnicodeDecodeError))
        detail = str(error) if readable else type(error).__name__
        raise TraceError(f"{prefix}unreadable run.yaml ({detail})") from None
    return validate_run(run, f"{prefix}run.yaml")


def read_table(path: str | Path, name: str) -> pd.DataFrame:
    """One table of a trace folder, read within the caps and checked against its schema
    (_check_table): TraceError (one line) otherwise."""
    path = Path(path)
    return _check_table(_read_table(path, name), name, path)


def load(path: str | Path) -> Trace:
    """Read a trace folder into typed tables.

    A trace folder is data from outside. Only regular files inside the folder are read (a link
    that leaves it, a FIFO or a device is refused without being opened), each within a size
    cap; run.yaml is checked against RUN_KEYS and the tables against their schema. Raises
    TraceError (one line) for a missing folder, an unfinished write, a missing, unreadable,
    oversized or malformed file, or another schema version.
    """
    path = Path(path)
    if path.name.startswith(STAGING_PREFIX):
        raise TraceError(f"{path}: an unfinished write (its run was interrupted), not a trace")
    if not path.is_dir():
        raise TraceError(f"{path}: no such trace folder")
    run = read_run(path)
    tables = {}
    for name in ALL_TABLES:
        if name in OPTIONAL_TABLES and not os.path.lexists(path / f"{name}.parquet"):
            continue
        tables[name] = read_table(path, name)
    chrome = {}
    for file in sorted(path.glob("trace-*.json")):
        resolved = file.resolve()
        if resolved.parent == path.resolve() and resolved.is_file():
            chrome[file.stem.removeprefix("trace-")] = file
    return Trace(path=path, run=run, chrome_traces=chrome, **tables)
