"""The compiled PartialConnection (paca/csrc/partial_connection.cpp): built once per machine.

The C++ file computes exactly what paca.function.PartialConnectionFn computes, without the Python
that a torch.autograd.Function runs on every forward and backward: tens of microseconds per call,
about a fifth of PaCA's step-time overhead over a frozen model on a CPU (bench/bench_step.py,
config A: 0.38 of LoRA's overhead with the Python function, 0.31 with this one). It also
registers the operator paca::partial_connection, which torch.compile traces (see the C++ file).

Where it is built: one folder per build key, under torch's extension folder
(TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions), named paca_partial_connection_<key>.
The key hashes the source text, the build flags, and the torch, Python and platform versions,
and never the checkout's path: another checkout of the same source loads the same build. A
build runs once per machine and key (about 30 s on two cores; it needs a C++ compiler and
ninja), under a file lock, so processes that start together build it once and the others wait
and load it. Later processes load the built file directly, without ninja, in well under a
second.

ensure_built() is the public entry: call it before any timed region (the profiler does); it
says on stderr when it builds. Where the build fails, PacaLinear runs the Python function and
one warning says why. Set PACA_COMPILED=0 to never build or use it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import sys
import time
import warnings
from dataclasses import dataclass

import torch

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "partial_connection.cpp")
NAME = "paca_partial_connection"
# -O2: torch's JIT builds pass no optimisation level, and at -O0 the autograd templates cost
# more than the Python function saves.
FLAGS = ("-O2",)
LIB_EXT = ".pyd" if sys.platform == "win32" else ".so"


@dataclass(frozen=True)
class BuildReport:
    """What ensure_built() did.

    action: "loaded" (a build of this key was there), "built" (this process built it),
        "disabled" (PACA_COMPILED=0) or "failed" (PacaLinear runs the Python function).
    folder: the build folder (None when disabled).
    seconds: time spent building or loading.
    reason: why it failed ("" otherwise).
    """

    action: str
    folder: str | None
    seconds: float
    reason: str = ""

    @property
    def available(self) -> bool:
        return self.action in ("loaded", "built")


_REPORT: BuildReport | None = None
_MODULE = None  # the loaded extension module


def ensure_built() -> BuildReport:
    """Build (first time on this machine) or load the compiled PartialConnection, once per
    process; later calls return the first call's report. Never raises: a failure is reported
    (and warned about once), and PaCA then runs its Python autograd function."""
    global _REPORT, _MODULE
    if _REPORT is not None:
        return _REPORT
    if os.environ.get("PACA_COMPILED", "1") == "0":
        _REPORT = BuildReport("disabled", None, 0.0)
        return _REPORT
    start = time.perf_counter()
    try:
        _MODULE, action, folder = build_or_load(SOURCE, NAME, FLAGS)
        _REPORT = BuildReport(action, folder, time.perf_counter() - start)
    except Exception as error:  # any build failure: the Python function computes the same
        reason = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"
        _REPORT = BuildReport("failed", None, time.perf_counter() - start, reason)
        warnings.warn(
            f"paca: the compiled PartialConnection could not be built ({reason}); PacaLinear "
            "uses the Python autograd.Function, which is slower on a CPU",
            RuntimeWarning,
            stacklevel=2,
        )
    return _REPORT


def partial_connection_op():
    """The compiled `partial_connection(x, paca_weight, weight, bias, indices, scaling) -> y`
    for eager calls, or None (PACA_COMPILED=0, or it cannot be built). Builds or loads it on the
    first call; inside a torch.compile trace it never builds (and answers None until an eager
    call or ensure_built() has loaded it)."""
    if _REPORT is None:
        if torch.compiler.is_compiling():
            return None
        ensure_built()
    return _MODULE.partial_connection if _MODULE is not None else None


def build_key(source_text: str, flags: tuple[str, ...], name: str) -> str:
    """The hash that names a build folder: what changes the built file, and not where the
    source lies."""
    parts = [
        name,
        source_text,
        " ".join(flags),
        torch.__version__,
        str(torch.version.git_version),
        platform.python_implementation(),
        platform.python_version(),
        sys.platform,
        platform.machine(),
        os.environ.get("CXX", "c++"),
    ]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def build_or_load(source: str, name: str, flags: tuple[str, ...], root: str | None = None):
    """Load the build of `source` for this machine, building it first if there is none.

    Returns (module, "loaded" or "built", folder). Concurrent callers (threads or processes)
    build once: the first takes a file lock beside the folder and builds; the others wait for
    the lock and load its result. Raises on any build or load failure.
    """
    from filelock import FileLock, Timeout
    from torch.utils.cpp_extension import get_default_build_root, load

    with open(source, encoding="utf-8") as f:
        key = build_key(f.read(), flags, name)
    folder = os.path.join(root or get_default_build_root(), f"{name}_{key}")
    library = os.path.join(folder, name + LIB_EXT)
    if os.path.exists(library):
        return _import(name, library), "loaded", folder
    os.makedirs(folder, exist_ok=True)
    lock = FileLock(folder + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"paca: waiting for another process that builds {name} in {folder}",
              file=sys.stderr, flush=True)
        lock.acquire()
    try:
        if os.path.exists(library):  # another process built it while this one waited
            return _import(name, library), "loaded", folder
        print(
            f"paca: building the compiled PartialConnection ({name}; once per machine, about "
            f"30 s) in {folder}",
            file=sys.stderr,
            flush=True,
        )
        module = load(
            name=name,
            sources=[source],
            extra_cflags=list(flags),
            build_directory=folder,
            verbose=False,
        )
    finally:
        lock.release()
    return module, "built", folder


def _import(name: str, library: str):
    """Import a built extension file directly (no ninja run, so no dependence on the path the
    source was built from)."""
    spec = importlib.util.spec_from_file_location(name, library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
