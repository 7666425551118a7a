"""Engines turn a RunSpec into a trace folder: measure (a real device) today; simulate (meta
device) and project (GPU cost model) write the same format.

run() is the one entry point: it runs each method in turn, records a method that runs out of
memory as status oom and goes on, and writes the trace folder atomically at the end.
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import torch

from paca_prof import methods as method_registry
from paca_prof import trace
from paca_prof.engines.common import RunSpec, validate_against_model

Progress = Callable[[str, str], None]  # (method, what is happening)


def default_out(spec: RunSpec, root: str | Path = "traces") -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(root) / f"{spec.model_name}-seq{spec.seq}-{spec.device}-{stamp}"


def check_out(out: Path) -> None:
    """Raise ValueError if `out` exists or its parent cannot be created or written."""
    if out.exists():
        raise ValueError(f"output folder {out} already exists")
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"cannot create output folder {parent}: {error.strerror}") from None
    if not os.access(parent, os.W_OK):
        raise ValueError(f"output folder {parent} is not writable")


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, torch.OutOfMemoryError | MemoryError):
        return True
    message = str(error)
    return isinstance(error, RuntimeError) and (
        "out of memory" in message or "can't allocate memory" in message
        or "DefaultCPUAllocator" in message)


def run(spec: RunSpec, out: Path, command: str, progress: Progress = lambda m, s: None) -> Path:
    """Measure every method of `spec` and write the trace folder `out`; returns its path.

    A method that runs out of memory gets status oom, one that fails otherwise status error
    (with the message); the others still run. Nothing is written to `out` until all are done.
    """
    from paca_prof.engines.measure import MethodResult, measure_method

    check_out(out)
    validate_against_model(spec)
    if spec.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here")
    workdir = Path(tempfile.mkdtemp(prefix="paca-prof-"))
    results: list[MethodResult] = []
    try:
        for method in spec.methods:
            progress(method, "measuring")
            try:
                results.append(measure_method(spec, method, workdir))
            except Exception as error:  # recorded in the trace and reported, never dropped
                status = "oom" if is_out_of_memory(error) else "error"
                if status == "error":
                    traceback.print_exc(file=sys.stderr)
                results.append(MethodResult(
                    summary={"method": method, "status": status,
                             "error": f"{type(error).__name__}: {error}".splitlines()[0][:500]},
                    layers=pd.DataFrame(), ops=pd.DataFrame(), memory=pd.DataFrame()))
                if spec.device.startswith("cuda"):
                    torch.cuda.empty_cache()
            progress(method, "done")
        tables = {
            "summary": pd.DataFrame([r.summary for r in results]),
            "layers": pd.concat([r.layers for r in results], ignore_index=True),
            "ops": pd.concat([r.ops for r in results], ignore_index=True),
            "memory": pd.concat([r.memory for r in results], ignore_index=True),
        }
        chrome = {r.summary["method"]: r.chrome_trace for r in results
                  if r.chrome_trace is not None and r.chrome_trace.exists()}
        return trace.write(out, run_metadata(spec, "measured", command), tables, chrome)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run_metadata(spec: RunSpec, source: str, command: str) -> dict:
    """run.yaml's content for a spec (see DESIGN.md's trace folder)."""
    import peft
    import transformers

    from paca_prof import __version__

    return {
        "source": source,
        "command": command,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {"name": spec.model_name, "config": spec.config.to_diff_dict()
                  if hasattr(spec.config, "to_diff_dict") else spec.config.to_dict()},
        "seq": spec.seq,
        "batch": spec.batch,
        "dtype": spec.dtype,
        "seed": spec.seed,
        "device": device_info(spec.device),
        "methods": {m: method_registry.describe(m, spec.settings) for m in spec.methods},
        "assumptions": {
            "attention": spec.attention,
            "grad_checkpointing": spec.grad_ckpt,
            "optimizer": "torch.optim.AdamW (default foreach), lr 1e-4, zero_grad(set_to_none)",
            "loss": "transformers ForCausalLM loss on the logits, labels = inputs",
            "timing": f"median of {spec.steps} steps after {spec.warmup} warm-up steps; "
                      + ("CUDA events" if spec.device.startswith("cuda") else "host perf_counter"),
            "ops": "CUDA: device kernels; CPU: outermost aten ops with a kernel (not views)",
        },
        "settings": asdict(spec.settings),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "peft": peft.__version__,
                     "paca_prof": __version__},
    }


def device_info(device: str) -> dict:
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        return {"type": "cuda", "name": props.name, "memory_bytes": props.total_memory}
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"type": device, "name": platform.processor() or platform.machine(),
            "memory_bytes": memory, "threads": torch.get_num_threads()}
