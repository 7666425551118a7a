"""The traces folder as the dashboard sees it: a listing of run folders, a path check for run
names that arrive from the browser, and two caches.

Everything the dashboard reads goes through `run_path`, which accepts only the name of a
folder directly inside the traces folder (after resolving links), so a crafted name such as
"../../etc" or "/etc" never reaches the file system; views then read the folder through
paca_prof.trace.load, which treats it as data from outside.

The listing describes a folder without loading its tables: run.yaml and the one-row-per-method
summary are read and checked by trace.py's own rules, and the other tables' files are checked
(regular files inside the folder, within the size caps, a readable parquet footer) without
being read. Both caches are keyed by a folder's signature (the names, types, sizes and
modification times of its entries, never following links), so a rewritten or new trace is
read again; descriptions are small and kept for up to DESCRIBED_LIMIT folders, loaded traces
(large) for the last few.
"""

from __future__ import annotations

import os
import reprlib
import stat
import threading
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path


from paca_prof import trace as trace_io
from paca_prof.analyze import TraceAnalysis

DESCRIBED_LIMIT = 4096  # folders whose description is kept: far above a traces folder's size
LOADED_LIMIT = 8  # whole traces kept loaded (a 70B simulation's tables are ~30 MiB in pandas)
ENTRIES_LIMIT = 256  # a trace folder holds about a dozen files
SUMMARY_ROWS_LIMIT = 4096  # one row per method


class RunPathError(ValueError):
    """A run name that is not a trace folder directly inside the traces folder."""


def run_path(traces_dir: str | Path, name: object) -> Path:
    """The folder of run `name` inside `traces_dir`, resolved.

    Raises RunPathError for anything but the plain name of an existing folder directly inside
    the traces folder: non-strings, empty or very long names, ".", "..", names with a path
    separator or NUL, absolute paths, and links that resolve outside the folder.
    """
    shown = reprlib.repr(name)
    if not isinstance(name, str) or not name or name in (".", ".."):
        raise RunPathError(f"rejected run name {shown}")
    if len(name) > 255 or "/" in name or "\\" in name or "\x00" in name or os.path.isabs(name):
        raise RunPathError(f"rejected run name {shown}: not a folder name")
    root = Path(traces_dir).resolve()
    path = (root / name).resolve()
    if path.parent != root:
        raise RunPathError(f"rejected run name {name!r}: outside the traces folder")
    if not path.is_dir():
        raise RunPathError(f"no run {name!r} in the traces folder")
    return path


def signature(path: Path) -> tuple:
    """What identifies one state of a trace folder: its entries' names, types, sizes and
    modification times, links not followed. TraceError for a folder of more than
    ENTRIES_LIMIT entries (not a trace folder; never scanned further)."""
    entries = []
    with os.scandir(path) as scan:
        for entry in scan:
            if len(entries) == ENTRIES_LIMIT:
                raise trace_io.TraceError(f"more than {ENTRIES_LIMIT} files: not a trace folder")
            info = entry.stat(follow_symlinks=False)
            entries.append((entry.name, stat.S_IFMT(info.st_mode), info.st_size,
                            info.st_mtime_ns))
    return tuple(sorted(entries))


# --- Loaded traces (the views) ------------------------------------------------------------------

# One lock per folder, so concurrent callbacks wait for one load instead of repeating it.
_locks: dict[str, threading.Lock] = defaultdict(threading.Lock)


@lru_cache(maxsize=LOADED_LIMIT)
def _analysis(path: str, signature: tuple) -> TraceAnalysis:
    return TraceAnalysis(path)


def analysis(traces_dir: str | Path, name: object) -> TraceAnalysis:
    """The TraceAnalysis of run `name` (cached). Raises RunPathError or trace.TraceError."""
    path = run_path(traces_dir, name)
    with _locks[str(path)]:
        return _analysis(str(path), signature(path))


# --- The listing --------------------------------------------------------------------------------

@dataclass
class RunInfo:
    """One folder of the traces folder: what ran, or why it cannot be read."""

    name: str
    error: str | None = None
    model: str = ""
    seq: int | None = None
    batch: int | None = None
    device: str = ""
    source: str = ""
    sources: dict = field(default_factory=dict)
    methods: list[str] = field(default_factory=list)
    created: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def label(self) -> str:
        if not self.ok:
            return f"{self.name} (unreadable)"
        return (f"{self.name}: {self.model}, seq {self.seq} x batch {self.batch}, "
                f"{self.device} [{self.source}]")


def _check_table_file(path: Path, name: str) -> int:
    """A table's file checked without reading its data: a regular file inside the folder,
    within trace.py's caps, with a readable parquet footer. Returns its row count."""
    import pyarrow.parquet as pq

    file = path / f"{name}.parquet"
    try:
        resolved = file.resolve(strict=True)
    except (OSError, RuntimeError):
        raise trace_io.TraceError(f"{name}.parquet: {file.name} does not exist") from None
    if resolved.parent != path.resolve():
        raise trace_io.TraceError(f"{name}.parquet is a link that leaves the folder")
    info = os.stat(resolved)
    if not stat.S_ISREG(info.st_mode):
        raise trace_io.TraceError(f"{name}.parquet is not a regular file")
    if info.st_size > trace_io.TABLE_FILE_LIMIT:
        raise trace_io.TraceError(f"{name}.parquet is larger than "
                                  f"{trace_io.TABLE_FILE_LIMIT // 2**20} MiB")
    try:
        meta = pq.read_metadata(resolved)
    except Exception as error:  # pyarrow raises several types for a broken file
        raise trace_io.TraceError(f"unreadable {name}.parquet ({type(error).__name__})") \
            from None
    expanded = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    if meta.num_rows > trace_io.TABLE_ROWS_LIMIT or expanded > trace_io.TABLE_BYTES_LIMIT:
        raise trace_io.TraceError(f"{name}.parquet is too large to load")
    return meta.num_rows


def _describe(path: Path, name: str) -> RunInfo:
    """Describe one run folder, or say in one line why it is not a readable trace."""
    run = trace_io.read_run(path, prefix="")
    for table in trace_io.TABLES:
        rows = _check_table_file(path, table)
        if table == "summary" and rows > SUMMARY_ROWS_LIMIT:
            raise trace_io.TraceError(f"summary.parquet has {rows:,} rows (one per method)")
    for table in trace_io.OPTIONAL_TABLES:
        if os.path.lexists(path / f"{table}.parquet"):
            _check_table_file(path, table)
    summary = trace_io.read_table(path, "summary")
    return RunInfo(
        name=name, model=run["model"]["name"], seq=run["seq"], batch=run["batch"],
        device=run["device"]["name"], source=run["source"], sources=trace_io.sources(run),
        methods=[str(m) for m in summary["method"]], created=str(run.get("created", "")))


def _reason(error: Exception, root: Path) -> str:
    """An error as one short line, without the traces folder's own path."""
    text = str(error).replace(str(root) + os.sep, "").replace(str(root), "")
    return (text.splitlines() or [type(error).__name__])[0][:300]


_described: OrderedDict[str, tuple[tuple, RunInfo]] = OrderedDict()
_described_lock = threading.Lock()


def describe(traces_dir: str | Path, name: str) -> RunInfo:
    """Describe run `name` (cached by the folder's signature); a broken, hostile or foreign
    folder gives a RunInfo with its one-line error instead of raising."""
    root = Path(traces_dir).resolve()
    shown = name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    if shown != name:
        return RunInfo(name=shown, error="the folder's name is not valid UTF-8")
    try:
        path = run_path(root, name)
        key, state = str(path), signature(path)
        with _described_lock:
            cached = _described.get(key)
            if cached and cached[0] == state:
                _described.move_to_end(key)
                return cached[1]
        try:
            info = _describe(path, name)
        except trace_io.TraceError as error:
            info = RunInfo(name=name, error=_reason(error, root))
        except Exception as error:  # a foreign folder: files of another shape
            info = RunInfo(name=name, error=f"not a paca-prof trace ({type(error).__name__}: "
                                            f"{_reason(error, root)})")
        with _described_lock:
            _described[key] = (state, info)
            _described.move_to_end(key)
            while len(_described) > DESCRIBED_LIMIT:
                _described.popitem(last=False)
        return info
    except (RunPathError, trace_io.TraceError, OSError) as error:
        return RunInfo(name=name, error=_reason(error, root))


_listing_lock = threading.Lock()  # one listing at a time: a second waits, then finds the cache


def list_runs(traces_dir: str | Path) -> list[RunInfo]:
    """Every folder directly inside `traces_dir` (links to folders included), by name; hidden
    folders (a run being written is staged in one) are never listed. Each is described
    afresh from its signature; one unreadable folder never hides the others."""
    root = Path(traces_dir)
    with _listing_lock:
        with os.scandir(root) as scan:
            names = []
            for entry in scan:
                try:
                    if not entry.name.startswith(".") and entry.is_dir():
                        names.append(entry.name)
                except OSError:
                    continue
        return [describe(root, name) for name in sorted(names)]
