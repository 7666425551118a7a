"""The traces folder as the dashboard sees it: a listing of run folders, a path check for run
names that arrive from the browser, and a cache of loaded traces.

Everything the dashboard reads goes through `run_path`, which accepts only the name of a
folder directly inside the traces folder (after resolving links), so a crafted name such as
"../../etc" or "/etc" never reaches the file system. Loaded traces are cached by path and by
the names, sizes and modification times of the folder's files, so a rewritten or new trace is
read again and nothing is cached forever.
"""

from __future__ import annotations

import os
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from paca_prof import trace as trace_io
from paca_prof.analyze import TraceAnalysis


class RunPathError(ValueError):
    """A run name that is not a trace folder directly inside the traces folder."""


def run_path(traces_dir: str | Path, name: object) -> Path:
    """The folder of run `name` inside `traces_dir`, resolved.

    Raises RunPathError for anything but the plain name of an existing folder directly inside
    the traces folder: empty names, ".", "..", names with a path separator or NUL, absolute
    paths, and links that resolve outside the folder.
    """
    if not isinstance(name, str) or not name or name in (".", ".."):
        raise RunPathError(f"rejected run name {name!r}")
    if "/" in name or "\\" in name or "\x00" in name or os.path.isabs(name):
        raise RunPathError(f"rejected run name {name!r}: not a folder name")
    root = Path(traces_dir).resolve()
    path = (root / name).resolve()
    if path.parent != root:
        raise RunPathError(f"rejected run name {name!r}: outside the traces folder")
    if not path.is_dir():
        raise RunPathError(f"no run {name!r} in the traces folder")
    return path


def _signature(path: Path) -> tuple:
    """What identifies one state of a trace folder: its files' names, sizes and mtimes."""
    entries = []
    with os.scandir(path) as scan:
        for entry in scan:
            if entry.is_file():
                stat = entry.stat()
                entries.append((entry.name, stat.st_size, stat.st_mtime_ns))
    return tuple(sorted(entries))


# One lock per folder, so concurrent callbacks wait for one load instead of repeating it.
_locks: dict[str, threading.Lock] = defaultdict(threading.Lock)


@lru_cache(maxsize=8)
def _analysis(path: str, signature: tuple) -> TraceAnalysis:
    return TraceAnalysis(path)


def analysis(traces_dir: str | Path, name: object) -> TraceAnalysis:
    """The TraceAnalysis of run `name` (cached). Raises RunPathError or trace.TraceError."""
    path = run_path(traces_dir, name)
    with _locks[str(path)]:
        return _analysis(str(path), _signature(path))


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


def describe(traces_dir: str | Path, name: str) -> RunInfo:
    """Load run `name` (cached) and describe it; a broken or foreign folder gives a RunInfo
    with its error instead of raising."""
    try:
        run = analysis(traces_dir, name).trace.run
        return RunInfo(
            name=name, model=str(run["model"]["name"]), seq=int(run["seq"]),
            batch=int(run["batch"]), device=str(run["device"]["name"]),
            source=str(run["source"]),
            sources=trace_io.sources(run),
            methods=list(run.get("methods") or {}), created=str(run.get("created", "")))
    except (RunPathError, trace_io.TraceError) as error:
        return RunInfo(name=name, error=str(error).replace(str(Path(traces_dir).resolve()), "")
                       .lstrip("/"))
    except Exception as error:  # a foreign folder: run.yaml of another shape
        return RunInfo(name=name, error=f"not a paca-prof trace ({type(error).__name__}: {error})")


def list_runs(traces_dir: str | Path) -> list[RunInfo]:
    """Every folder directly inside `traces_dir`, by name; hidden folders (a run being written
    is staged in one) are skipped. Read afresh on every call; loads are cached."""
    root = Path(traces_dir)
    with os.scandir(root) as scan:
        names = sorted(e.name for e in scan if e.is_dir() and not e.name.startswith("."))
    return [describe(root, name) for name in names]
