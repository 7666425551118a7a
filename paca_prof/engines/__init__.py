"""Engines turn a RunSpec into a trace folder: measure (a real cpu or cuda device), simulate
(the meta device: exact bytes and ops) and project (simulated ops timed on a named GPU by a cost
model). All write the same format.

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
from paca_prof.engines.attention import SIMULATED as SIMULATED_ATTENTION
from paca_prof.engines.common import RunSpec, validate_against_model
from paca_prof.gpus import GpuSpec
from paca_prof.results import MethodResult, failed

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


def run(spec: RunSpec, out: Path, command: str, progress: Progress = lambda m, s: None,
        gpu: GpuSpec | None = None) -> Path:
    """Run every method of `spec` and write the trace folder `out`; returns its path.

    On cpu or cuda the methods are measured. On the meta device they are simulated and, with
    `gpu`, their times projected onto it (a method whose simulated peak exceeds the GPU's memory
    gets status oom, with its numbers kept). A measured method that runs out of memory gets
    status oom, one that fails otherwise status error (with the message); the others still run.
    Nothing is written to `out` until all are done.
    """
    from paca_prof.engines.measure import measure_method
    from paca_prof.engines.simulate import simulate_method

    validate_against_model(spec)
    check_out(out)
    if spec.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here")
    if spec.device == "cpu" and spec.attention in SIMULATED_ATTENTION:
        raise ValueError(f"--attention {spec.attention} runs on CUDA or in simulation "
                         f"(--device meta), not on the CPU; use sdpa or math")
    simulated = spec.device == "meta"
    if spec.device == "cpu" and "paca" in spec.methods:
        from paca.compiled import ensure_built

        ensure_built()  # a first build (about 30 s, once per machine) never lands in a timing
    workdir = Path(tempfile.mkdtemp(prefix="paca-prof-"))
    results: list[MethodResult] = []
    try:
        for method in spec.methods:
            progress(method, "simulating" if simulated else "measuring")
            try:
                if simulated:
                    results.append(simulate_method(spec, method, gpu))
                else:
                    results.append(measure_method(spec, method, workdir))
            except Exception as error:  # recorded in the trace and reported, never dropped
                status = "oom" if is_out_of_memory(error) else "error"
                if status == "error":
                    traceback.print_exc(file=sys.stderr)
                results.append(failed(method, status, error))
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
        return trace.write(out, run_metadata(spec, command, gpu if simulated else None),
                           tables, chrome)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run_metadata(spec: RunSpec, command: str, gpu: GpuSpec | None = None) -> dict:
    """run.yaml's content for a spec (see DESIGN.md's trace folder). `sources` says where the
    times and the bytes come from: measured, or simulated bytes with projected (or no) times."""
    import peft
    import transformers

    from paca_prof import __version__

    if spec.device != "meta":
        sources = {"time": "measured", "bytes": "measured"}
        timing = (f"median of {spec.steps} steps after {spec.warmup} warm-up steps; "
                  + ("CUDA events" if spec.device.startswith("cuda") else "host perf_counter"))
    else:
        sources = {"time": "projected" if gpu else None, "bytes": "simulated"}
        timing = (f"projected for {gpu.name} by the roofline + launch + dispatch cost model "
                  "(paca_prof/engines/project.py)" if gpu else "none (simulated bytes only)")
    return {
        "source": sources["time"] or "simulated",
        "sources": sources,
        "command": command,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {"name": spec.model_name, "config": spec.config.to_diff_dict()
                  if hasattr(spec.config, "to_diff_dict") else spec.config.to_dict()},
        "seq": spec.seq,
        "batch": spec.batch,
        "dtype": spec.dtype,
        "seed": spec.seed,
        "device": device_info(spec.device, gpu),
        "gpu": asdict(gpu) if gpu else None,
        "methods": {m: method_registry.describe(m, spec.settings) for m in spec.methods},
        "assumptions": {
            "attention": spec.attention,
            "grad_checkpointing": spec.grad_ckpt,
            "optimizer": "torch.optim.AdamW, lr 1e-4, zero_grad(set_to_none); foreach "
                         + ("off (torch's CPU default)" if spec.device == "cpu" else "on"),
            "loss": "transformers ForCausalLM loss on the logits, labels = inputs",
            "timing": timing,
            "memory": "simulated: exact tensor bytes, no allocator rounding, no CUDA context"
                      if spec.device == "meta" else "allocator events of the profiled step",
            "ops": "CUDA: device kernels; CPU: outermost aten ops with a kernel (not views)",
            **({"paca_autograd_function": paca_autograd_function(spec.device)}
               if {"paca", "qpaca"} & set(spec.methods) else {}),
        },
        "settings": asdict(spec.settings),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "peft": peft.__version__,
                     "paca_prof": __version__},
    }


def paca_autograd_function(device: str) -> str:
    """Which of PacaLinear's autograd functions the run used (see paca/layer.py, forward)."""
    from paca.compiled import partial_connection_op

    if device == "cpu" and partial_connection_op() is not None:
        return "compiled (paca/csrc), the CPU default"
    return "python (torch.autograd.Function)"


def device_info(device: str, gpu: GpuSpec | None = None) -> dict:
    if device == "meta":
        name = f"{gpu.name} (projected)" if gpu else "meta device (simulated)"
        return {"type": "meta", "name": name, "memory_bytes": gpu.memory_bytes if gpu else None}
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        return {"type": "cuda", "name": props.name, "memory_bytes": props.total_memory}
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"type": device, "name": platform.processor() or platform.machine(),
            "memory_bytes": memory, "threads": torch.get_num_threads()}
