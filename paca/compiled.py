"""The compiled PartialConnection (paca/csrc/partial_connection.cpp), built on first use.

The C++ file computes exactly what paca.layer.PartialConnectionFn computes, without the Python
that a torch.autograd.Function runs on every forward and backward: tens of microseconds per call,
about a fifth of PaCA's step-time overhead over a frozen model on a CPU (bench/bench_step.py,
config A: 0.38 of LoRA's overhead with the Python function, 0.31 with this one).

torch.utils.cpp_extension.load builds it once per machine, Python and torch version (about 30 s on
two cores; it needs a C++ compiler and ninja) into torch's extension folder (TORCH_EXTENSIONS_DIR,
default ~/.cache/torch_extensions), and later processes load the built file in about a second.
Where it cannot be built, PacaLinear runs the Python function instead and one warning says why.
Set PACA_COMPILED=0 to never build or use it.
"""

from __future__ import annotations

import functools
import os
import re
import sys
import warnings

import torch

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "partial_connection.cpp")
NAME = "paca_partial_connection"


@functools.cache
def partial_connection_op():
    """The compiled `partial_connection(x, paca_weight, weight, bias, indices, scaling) -> y`, or
    None when PACA_COMPILED=0 or it cannot be built. Builds (or loads) it on the first call only.
    """
    if os.environ.get("PACA_COMPILED", "1") == "0":
        return None
    try:
        return build().partial_connection
    except Exception as error:  # any build failure: the Python function computes the same
        reason = (str(error).strip().splitlines() or [""])[0]
        warnings.warn(
            f"paca: the compiled PartialConnection could not be built ({type(error).__name__}: "
            f"{reason}); PacaLinear uses the Python autograd.Function, which is slower on a CPU",
            RuntimeWarning,
            stacklevel=2,
        )
        return None


def build():
    """Build (first time) or load the extension module; raises on any failure."""
    from torch.utils.cpp_extension import get_default_build_root, load

    versions = f"torch{torch.__version__}_py{sys.version_info[0]}{sys.version_info[1]}"
    tag = re.sub(r"[^A-Za-z0-9_.]", "_", versions)
    build_directory = os.path.join(get_default_build_root(), f"{NAME}_{tag}")
    os.makedirs(build_directory, exist_ok=True)
    built = [f for f in os.listdir(build_directory) if f.endswith((".so", ".pyd"))]
    if not built:
        print(
            f"paca: building the compiled PartialConnection (once per machine, about 30 s) in "
            f"{build_directory}",
            file=sys.stderr,
            flush=True,
        )
    # -O2: torch's JIT builds pass no optimisation level, and at -O0 the autograd templates cost
    # more than the Python function saves.
    return load(
        name=NAME,
        sources=[SOURCE],
        extra_cflags=["-O2"],
        build_directory=build_directory,
        verbose=False,
    )
