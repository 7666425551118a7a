"""Engines turn a RunSpec into a trace folder: measure (a real cpu or cuda device), simulate
(the meta device: exact bytes and ops) and project (simulated ops timed on a named GPU by a cost
model). All write the same format.

run() is the one entry point: it runs each method in turn, records a method that runs out of
memory as status oom and goes on, and writes the trace folder atomically at the end.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pandas as pd
import torch

from paca_prof import methods, trace
from paca_prof.engines.step import validate_against_model
from paca_prof.budget import Budget, make_budget
from paca_prof.reserved import ALLOCATOR_WORDS
from paca_prof.gpus import GpuSpec
from paca_prof.metadata import config_dict, device_info, run_metadata
from paca_prof.methods.registry import import_libraries
from paca_prof.parallel import run_methods
from paca_prof.results import MethodResult, failed
from paca_prof.spec import RunSpec

Progress = Callable[[str, str], None]  # (method, what is happening)


def default_out(spec: RunSpec, root: str | Path = "traces") -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(root) / f"{spec.model_name}-seq{spec.seq}-{spec.device}-{stamp}"


def check_out(out: Path) -> None:
    """Raise ValueError if `out` exists, its name is too long for the file system, or its
    parent cannot be created or written: the checks a run makes before any work."""
    trace.check_name(out)
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
        gpu: GpuSpec | None = None, budget: Budget | None = None,
        peak: GpuSpec | None = None) -> Path:
    """Run every method of `spec` and write the trace folder `out`; returns its path.

    On cpu or cuda the methods are measured. On the meta device they are simulated and, with
    `gpu`, their times projected onto it; a method whose simulated reserved memory does not fit
    `budget` (by default the GPU's: its memory less its CUDA context and
    budget.DEFAULT_HEADROOM, the planner's budget) gets status oom, with its numbers kept. A
    measured method that runs out of memory gets status oom, one that fails otherwise status
    error (with the message); the others still run. The output is reserved from the start
    (trace.Reservation) and written only when all are done.

    Measured methods are timed together in interleaved rounds (engines/measure.py), on
    spec.threads torch threads when given; the steps table keeps every timed step and the
    summary its spread (spread.py). Throughput columns come from every run; MFU needs a peak:
    `gpu` for a projection, `peak` (a device spec) for a measured run, or the GPU table's
    entry for the measured CUDA device's name.
    """
    from paca_prof.engines.measure import measure_method, time_methods
    from paca_prof.engines.simulate import simulate_method

    simulated = spec.device == "meta"
    if spec.distributed.fsdp and not simulated:
        return _run_distributed(spec, out, command, progress)
    targets = validate_against_model(spec)
    check_out(out)
    if spec.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here")
    if simulated and gpu is not None and budget is None:
        budget = make_budget(gpu=gpu)
    if spec.device == "cpu" and {"paca", "qpaca"} & set(spec.methods):
        from paca.compiled import ensure_built

        ensure_built()  # a first build (about 30 s, once per machine) never lands in a timing
    results: list[MethodResult] = []
    try:
        reservation = trace.Reservation(out)
        reserved = reservation.__enter__()
    except trace.TraceError as error:
        raise ValueError(str(error)) from None
    threads_before = torch.get_num_threads()
    if peak is None and spec.device.startswith("cuda"):
        from paca_prof.gpus import match_device

        peak = match_device(torch.cuda.get_device_name(torch.device(spec.device)))
    try:
        if spec.threads is not None:
            torch.set_num_threads(spec.threads)
        timings = {} if simulated else time_methods(spec, progress=progress)

        def measured(method: str) -> MethodResult:
            if isinstance(timings[method], BaseException):
                raise timings[method]
            return measure_method(spec, method, reserved.staging, timing=timings[method])

        # Simulations run side by side (parallel.py); measured methods one at a time, alone.
        outcomes = run_methods(
            (lambda method: simulate_method(spec, method, gpu, budget)) if simulated
            else measured, spec.methods, jobs=None if simulated else 1,
            started=lambda method: progress(method, "simulating" if simulated
                                            else "profiling"),
            warm_up=lambda: import_libraries(spec.methods))
        for outcome in outcomes:
            method = outcome.method
            if outcome.error is None:
                results.append(outcome.value)
            else:  # recorded in the trace and reported, never dropped
                status = "oom" if is_out_of_memory(outcome.error) else "error"
                if status == "error":
                    print(outcome.traceback, file=sys.stderr, end="")
                results.append(failed(method, status, outcome.error))
                (reserved.staging / f"trace-{method}.json").unlink(missing_ok=True)
                if spec.device.startswith("cuda"):
                    torch.cuda.empty_cache()
            progress(method, "done")
        ok = {r.method for r in results if r.summary.get("status") == "ok"}
        steps = pd.concat([t.steps_table() for m, t in timings.items() if m in ok
                           and not isinstance(t, BaseException)] or [pd.DataFrame()],
                          ignore_index=True)
        summary = pd.DataFrame([r.summary for r in results])
        summary = with_spread(summary, steps)
        summary = with_throughput(summary, pd.concat([r.ops for r in results],
                                                     ignore_index=True),
                                  spec, gpu if simulated else peak)
        tables = {
            "summary": summary,
            "layers": pd.concat([r.layers for r in results], ignore_index=True),
            "ops": pd.concat([r.ops for r in results], ignore_index=True),
            "memory": pd.concat([r.memory for r in results], ignore_index=True),
        }
        if not simulated:
            tables["steps"] = steps
        metadata = spec_metadata(spec, command, gpu if simulated else None, budget, targets)
        if not simulated:
            metadata["timing"] = timing_record(spec, timings, summary, peak)
        return reserved.commit(metadata, tables)
    finally:
        torch.set_num_threads(threads_before)
        reservation.__exit__(None, None, None)


def _run_distributed(spec: RunSpec, out: Path, command: str, progress: Progress) -> Path | None:
    """A measured run under torchrun with FSDP2 (engines/fsdp.py): every rank measures every
    method on its own batch; rank 0 gathers every rank's tables, adds their `rank`, and writes
    the one trace folder. Returns its path on rank 0, None on the others. A check that fails
    on rank 0 (the output folder) fails on every rank, so that none waits for the others."""
    import tempfile

    from paca_prof.engines import fsdp
    from paca_prof.engines.measure import measure_method

    if spec.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here")
    rank, world = fsdp.init(spec.device)
    if world != spec.distributed.world_size:
        raise ValueError(f"--world-size {spec.distributed.world_size} does not match the "
                         f"process group's {world}")
    targets = validate_against_model(spec)
    out = Path(fsdp.broadcast(str(out)))  # rank 0's name (a default one has a time in it)
    problem = None
    if rank == 0:
        try:
            check_out(out)
        except ValueError as error:
            problem = str(error)
    problem = fsdp.broadcast(problem)
    if problem:
        raise ValueError(problem)
    if spec.device == "cpu" and {"paca", "qpaca"} & set(spec.methods):
        from paca.compiled import ensure_built

        if rank == 0:  # one build; the other ranks load it
            ensure_built()
        torch.distributed.barrier()
        ensure_built()
    reservation = trace.Reservation(out) if rank == 0 else None
    reserved = reservation.__enter__() if reservation else None
    scratch = Path(tempfile.mkdtemp(prefix=f"paca-prof-rank{rank}-")) if rank else None
    try:
        results: list[MethodResult] = []
        for method in spec.methods:
            progress(method, "measuring")
            try:
                results.append(measure_method(spec, method,
                                              reserved.staging if reserved else scratch))
            except Exception as error:  # recorded, as in a single-process run
                status = "oom" if is_out_of_memory(error) else "error"
                if status == "error":
                    traceback.print_exc(file=sys.stderr)
                results.append(failed(method, status, error))
            progress(method, "done")
        for result in results:  # the chrome trace stays on its rank (rank 0's is written)
            result.chrome_trace = None
        gathered = fsdp.gather_results(results)
        if rank != 0:
            return None
        tables = ranked_tables(gathered)
        metadata = spec_metadata(spec, command, None, None, targets)
        return reserved.commit(metadata, tables)
    finally:
        if reservation:
            reservation.__exit__(None, None, None)
        if scratch is not None:
            import shutil

            shutil.rmtree(scratch, ignore_errors=True)


def ranked_tables(per_rank: list[list[MethodResult]]) -> dict[str, pd.DataFrame]:
    """The trace's tables from every rank's results (in rank order): each row with its
    `rank`, the summary one row per (method, rank)."""
    tables = {}
    for name in ("summary", "layers", "ops", "memory"):
        frames = []
        for rank, results in enumerate(per_rank):
            for r in results:
                frame = pd.DataFrame([r.summary]) if name == "summary" else getattr(r, name)
                frames.append(frame.assign(rank=rank))
        tables[name] = pd.concat(frames, ignore_index=True)
    return tables


def with_spread(summary: pd.DataFrame, steps: pd.DataFrame) -> pd.DataFrame:
    """The summary with the spread columns of its measured methods (spread.step_stats over the
    steps table); step_ms stays the median the engine computed (the same number)."""
    from paca_prof import spread

    if steps.empty or summary.empty:
        return summary
    stats = spread.step_stats(steps).drop(columns=["step_ms", "steps_timed"])
    return summary.merge(stats, on="method", how="left")


def with_throughput(summary: pd.DataFrame, ops: pd.DataFrame, spec: RunSpec,
                    peak_gpu: GpuSpec | None) -> pd.DataFrame:
    """The summary with tokens_per_s, step_tflop, achieved_tflops and mfu (throughput.py):
    FLOPs from each method's (profiled or simulated) ops, the peak from `peak_gpu`."""
    from paca_prof.throughput import peak_tflops, throughput

    if summary.empty or "step_ms" not in summary:
        return summary
    tokens = spec.batch * spec.seq * spec.recipe.grad_accum
    flops = ops.groupby("method")["flops"].sum() if not ops.empty else pd.Series(dtype=float)
    peak = peak_tflops(peak_gpu, spec.dtype)
    rows = [throughput(float(row["step_ms"]) if row["step_ms"] == row["step_ms"] else
                       float("nan"), tokens, float(flops.get(row["method"], 0.0)), peak)
            for _, row in summary.iterrows()]
    return pd.concat([summary.reset_index(drop=True), pd.DataFrame(rows)], axis=1)


def timing_record(spec: RunSpec, timings: dict, summary: pd.DataFrame,
                  peak: GpuSpec | None) -> dict:
    """run.yaml's `timing`: how the measured steps were timed, and the spread warnings."""
    from paca_prof import spread
    from paca_prof.engines import measure

    warnings = {}
    if "spread_warning" in summary:
        warnings = {str(m): str(w) for m, w in zip(summary["method"], summary["spread_warning"])
                    if isinstance(w, str) and w}
    timed = {m: t for m, t in timings.items() if not isinstance(t, BaseException)}
    return {
        "design": "interleaved rounds: one step of each method per round, in a shuffled order",
        "rounds": max((len(t.per_step) for t in timed.values()), default=0),
        "rounds_requested": spec.steps,
        "warmup": (f"at least {spec.warmup} steps, then until the last "
                   f"{measure.SETTLE_WINDOW} lie within {measure.SETTLE_TOLERANCE:.0%} of "
                   f"their median, at most {measure.MAX_SETTLE_STEPS} more"
                   if spec.warmup else "none"),
        "unsettled": sorted(m for m, t in timed.items() if not t.settled),
        "timed_alone": sorted(m for m, t in timed.items() if t.alone),
        "threads": torch.get_num_threads(),
        "threads_from": "--threads" if spec.threads is not None else "torch's default",
        "time_budget_s": spec.time_budget_s,
        "statistic": (f"median over timed steps with p25/p75; ratios to {spread.BASELINE}: "
                      f"ratio of medians, {spread.LEVEL:.0%} percentile bootstrap over whole "
                      f"rounds ({spread.RESAMPLES} resamples)"),
        "spread_rule": (f"warn when IQR/median > {spread.SPREAD_LIMIT:.2f}, when the ratio's "
                        f"interval contains 1 or is wider than {spread.WIDTH_LIMIT:.0%} of "
                        f"it, or with fewer than {spread.MIN_ROUNDS} rounds"),
        "warnings": warnings,
        "peak_for_mfu": peak.name if peak is not None else None,
    }


def spec_metadata(spec: RunSpec, command: str, gpu: GpuSpec | None = None,
                  budget: Budget | None = None, targets: dict | None = None) -> dict:
    """run.yaml's content for a run of the engines (metadata.run_metadata). `sources` says where
    the times and the bytes come from: measured, or simulated bytes with projected (or no)
    times."""
    cuda = spec.device.startswith("cuda")
    allocator = ALLOCATOR_WORDS[spec.recipe.allocator]
    if spec.device != "meta":
        sources = {"time": "measured", "bytes": "measured",
                   "reserved": "measured" if cuda else "simulated"}
        timing = (f"median of up to {spec.steps} interleaved rounds (one step of each method "
                  f"per round) after at least {spec.warmup} warm-up steps, until settled; "
                  + ("CUDA events" if cuda else "host perf_counter")
                  + "; spread and intervals in the summary, every step in steps.parquet")
        memory = "allocator events of the profiled step"
        reserved = ("torch.cuda.max_memory_reserved over the profiled step" if cuda else
                    f"simulated: the profiled step's allocations replayed through the model of "
                    f"{allocator} (paca_prof/reserved.py)")
    else:
        sources = {"time": "projected" if gpu else None, "bytes": "simulated",
                   "reserved": "simulated"}
        timing = (f"projected for {gpu.name} by the roofline + launch + dispatch cost model "
                  "(paca_prof/engines/project.py)" if gpu else "none (simulated bytes only)")
        memory = "simulated: exact tensor bytes alive (peak_bytes, as memory_allocated counts)"
        reserved = (f"simulated: the step's allocations replayed, model first, through the "
                    f"model of {allocator} (paca_prof/reserved.py); no CUDA context")
    assumptions = {"timing": timing, "memory": memory, "reserved": reserved}
    if spec.distributed.fsdp:
        assumptions["distributed"] = (
            "every rank's rows (the rank column), each rank measured as one process is"
            if spec.device != "meta" else
            "per-rank memory simulated: the step of one rank at its batch, with FSDP2's "
            "sharded parameters, gradients and optimizer states and its all-gather and "
            "reduce-scatter buffers (engines/fsdp_sim.py)")
    if budget is not None:
        assumptions["oom_limit"] = (f"reserved memory against the budget {budget.describe()}; "
                                    "the same budget as paca-prof plan")
    if {"paca", "qpaca"} & set(spec.methods):
        assumptions["paca_autograd_function"] = paca_autograd_function(spec.device)
    return run_metadata(
        command=command, model_name=spec.model_name, model_config=config_dict(spec.config),
        seq=spec.seq, batch=spec.batch, dtype=spec.dtype, seed=spec.seed,
        device=device_info(spec.device, gpu), gpu=gpu.to_dict() if gpu else None,
        sources=sources,
        methods={m: methods.get(m).describe(spec.settings, spec.peft_config)
                 for m in spec.methods},
        recipe={**spec.recipe.describe(spec.device),
                "resolved_targets": targets or validate_against_model(spec)},
        assumptions=assumptions,
        settings=spec.settings.to_dict(),
        **({"distributed": spec.distributed.describe()} if spec.distributed.fsdp else {}))


def paca_autograd_function(device: str) -> str:
    """Which of PacaLinear's autograd functions the run used (see paca/layer.py, forward)."""
    from paca.compiled import partial_connection_op

    if device == "cpu" and partial_connection_op() is not None:
        return "compiled (paca/csrc), the CPU default"
    return "python (torch.autograd.Function)"
