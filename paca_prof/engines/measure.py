"""Measure real training steps of one method on a real device (cpu or cuda).

Three passes over one prepared model, so that no instrument's overhead reaches another's result:
  1. timing:   warm-up steps, then `steps` timed steps; module and phase latencies from a
               synchronous clock (CPU) or CUDA events (GPU); the medians are reported.
  2. profiler: one step under torch.profiler with ranges named by module path and phase, the
               saved-tensor ledger and memory events: the op (or kernel) sequence, activation
               bytes per module, and the categorised memory timeline with its peak.
The profiler pass's op durations carry the profiler's own overhead; they are never used as
latencies.
"""

from __future__ import annotations

import json
import statistics
import time
from collections import defaultdict
from pathlib import Path

import pandas as pd
import torch
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile

from paca_prof import methods as method_registry
from paca_prof.results import MethodResult, summary_row
from paca_prof.engines.common import (
    RunSpec,
    build_prepared,
    layer_table,
    make_batch,
    module_kinds,
    training_step,
)
from paca_prof.instrument import (
    LOSS,
    OPTIMIZER,
    ROOT,
    MemoryEvent,
    ModuleScopes,
    SavedTensorLedger,
    counts_as_op,
    module_depth,
    matmul_flops,
    memory_timeline,
    static_bytes,
)


def measure_method(spec: RunSpec, method: str, workdir: Path) -> MethodResult:
    """Run `method` for real on spec.device and return its tables.

    Raises torch.OutOfMemoryError (or RuntimeError from the CPU allocator) when it does not fit;
    the caller records that as status oom.
    """
    device = spec.device
    model, optimizer = build_prepared(spec, method, device)
    ids = make_batch(spec, device)
    latencies, phase_ms = _timing_pass(spec, model, optimizer, ids)
    chrome_path = workdir / f"trace-{method}.json"
    profiled = _profiler_pass(model, optimizer, ids, method, device, chrome_path)

    kinds = module_kinds(model)
    layers = layer_table(method, kinds, latencies, profiled["ops"], profiled["ledger"].by_module)
    trainable = sum(p.numel() for p in method_registry.trainable_parameters(model))
    summary = summary_row(
        method, times_ms=phase_ms, peak_breakdown=profiled["peak_breakdown"],
        n_kernels=len(profiled["ops"]), activation_bytes=profiled["ledger"].total_bytes,
        trainable_params=trainable, **profiled["device_peaks"])
    del model, optimizer
    return MethodResult(summary, layers, profiled["ops"], profiled["memory"], chrome_path)


class _Clock:
    """Host clock on the CPU; CUDA events on the GPU (read after one synchronize per step)."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def stamp(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter_ns()

    def ms(self, start, end) -> float:
        if self.cuda:
            return start.elapsed_time(end)
        return (end - start) / 1e6

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def _timing_pass(spec: RunSpec, model, optimizer, ids):
    """Median latency per (module, phase) and per phase over the measured steps."""
    clock = _Clock(spec.device)
    per_step: list[dict] = []
    open_scopes: dict[tuple[str, str], list] = defaultdict(list)
    intervals: list[tuple[str, str, object, object]] = []

    def enter(path, phase):
        open_scopes[(path, phase)].append(clock.stamp())

    def leave(path, phase):
        starts = open_scopes.get((path, phase))
        if starts:
            intervals.append((path, phase, starts.pop(), clock.stamp()))

    class PhaseTimer:
        def __init__(self, name):
            self.name = name

        def __enter__(self):
            enter(f"phase:{self.name}", self.name)

        def __exit__(self, *exc):
            leave(f"phase:{self.name}", self.name)

    with ModuleScopes(model) as scopes:
        scopes.on_enter(enter)
        scopes.on_exit(leave)
        for step in range(spec.warmup + spec.steps):
            intervals.clear()
            open_scopes.clear()
            training_step(model, optimizer, ids, scopes, PhaseTimer)
            clock.sync()
            if step < spec.warmup:
                continue
            totals: dict[tuple[str, str], float] = defaultdict(float)
            for path, phase, start, end in intervals:
                totals[(path, phase)] += clock.ms(start, end)
            per_step.append(totals)
    keys = set().union(*per_step)
    medians = {key: statistics.median(s[key] for s in per_step if key in s) for key in keys}
    phase_ms = {p: medians.get((f"phase:{p}", p), 0.0) for p in ("forward", "backward", "optimizer")}
    phase_ms["step"] = sum(phase_ms.values())
    latencies = {k: v for k, v in medians.items() if not k[0].startswith("phase:")}
    return latencies, phase_ms


def _profiler_pass(model, optimizer, ids, method, device, chrome_path: Path) -> dict:
    """One profiled step: ops, activation bytes, and the categorised memory timeline."""
    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    ranges: dict[tuple[str, str], list] = defaultdict(list)
    grad_ptrs: dict[int, int] = {}

    def enter(path, phase):
        scope = record_function(path)
        scope.__enter__()
        ranges[(path, phase)].append(scope)

    def leave(path, phase):
        if ranges.get((path, phase)):
            ranges[(path, phase)].pop().__exit__(None, None, None)

    class PhaseRange:
        def __init__(self, name):
            self.scope = record_function(f"phase:{name}")
            self.name = name

        def __enter__(self):
            if self.name == "optimizer":  # backward is over: the gradients are all there
                grad_ptrs.update({p.grad.data_ptr(): p.grad.untyped_storage().nbytes()
                                  for p in model.parameters() if p.grad is not None})
            self.scope.__enter__()

        def __exit__(self, *exc):
            self.scope.__exit__(*exc)

    static = static_bytes(model, optimizer)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        static["rest"] = torch.cuda.memory_allocated() - sum(static.values())
    with ModuleScopes(model) as scopes, SavedTensorLedger(scopes) as ledger:
        scopes.on_enter(enter)
        scopes.on_exit(leave)
        with profile(activities=activities, record_shapes=True, profile_memory=True) as prof:
            training_step(model, optimizer, ids, scopes, PhaseRange)
            if cuda:
                torch.cuda.synchronize()
    prof.export_chrome_trace(str(chrome_path))
    events = json.loads(chrome_path.read_text())["traceEvents"]
    module_paths = set(scopes.paths.values()) | {LOSS, OPTIMIZER}
    wrappers = method_registry.wrapper_paths(model, method)
    ops = _op_table(events, method, module_paths, wrappers, cuda)
    memory, _, breakdown = _memory_timeline(events, method, static, ledger, grad_ptrs, cuda)
    return {"ops": ops, "ledger": ledger, "memory": memory, "peak_breakdown": breakdown,
            "device_peaks": cuda_memory_peaks() if cuda else {}}


def cuda_memory_peaks() -> dict[str, int]:
    """torch's own peak counters of the profiled step: allocated (blocks rounded up, kernel
    workspaces included) and reserved. They are kept beside the tensor-byte peak, never folded
    into it: the peak stays the sum of its categories (results.summary_row)."""
    return {"allocator_peak_bytes": torch.cuda.max_memory_allocated(),
            "reserved_bytes": torch.cuda.max_memory_reserved()}


def _phase_windows(events) -> dict[str, tuple[float, float]]:
    return {e["name"].removeprefix("phase:"): (e["ts"], e["ts"] + e["dur"]) for e in events
            if e.get("cat") == "user_annotation" and e["name"].startswith("phase:")}


def _phase_at(windows: dict[str, tuple[float, float]], ts: float) -> str | None:
    for phase, (start, end) in windows.items():
        if start <= ts <= end:
            return phase
    return None


def _op_table(events, method, module_paths, wrappers, cuda) -> pd.DataFrame:
    """One row per op (see instrument.counts_as_op) on the CPU, or per device kernel on CUDA."""
    windows = _phase_windows(events)
    t0 = min(start for start, _ in windows.values())
    by_tid: dict[object, list] = defaultdict(list)
    modules_by_tid: dict[object, list] = defaultdict(list)
    runtime = {}
    for e in events:
        if e.get("ph") != "X":
            continue
        cat = e.get("cat")
        if cat == "cpu_op" and "::" in e["name"] and not e["name"].startswith(
                ("autograd::", "torch::autograd")):
            by_tid[e["tid"]].append(e)
        elif cat == "user_annotation" and e["name"] in module_paths:
            modules_by_tid[e["tid"]].append(e)
        elif cat == "cuda_runtime" and "correlation" in e.get("args", {}):
            runtime[e["args"]["correlation"]] = e

    leaves = []
    for tid, ops in by_tid.items():
        ops.sort(key=lambda e: (e["ts"], -e["dur"]))
        scopes = sorted(modules_by_tid.get(tid, []), key=lambda e: e["ts"])
        stack: list[dict] = []  # enclosing aten ops
        for op in ops:
            while stack and stack[-1]["ts"] + stack[-1]["dur"] <= op["ts"]:
                stack.pop()
            counted = counts_as_op(op["name"]) and not any(p["_counted"] for p in stack)
            op["_counted"] = counted
            stack.append(op)
            phase = _phase_at(windows, op["ts"])
            if not counted or phase is None:
                continue
            op["_module"] = _innermost(scopes, op["ts"], op["ts"] + op["dur"])
            op["_phase"] = phase
            leaves.append(op)

    rows = []
    if cuda:
        leaf_by_tid = defaultdict(list)
        for op in leaves:
            leaf_by_tid[op["tid"]].append(op)
        kernels = [e for e in events if e.get("ph") == "X" and e.get("cat") in
                   ("kernel", "gpu_memcpy", "gpu_memset")]
        for kernel in sorted(kernels, key=lambda e: e["ts"]):
            launch = runtime.get(kernel.get("args", {}).get("correlation"))
            op = None
            if launch is not None:
                candidates = [o for o in leaf_by_tid.get(launch["tid"], [])
                              if o["ts"] <= launch["ts"] <= o["ts"] + o["dur"]]
                op = candidates[-1] if candidates else None
            rows.append(_op_row(method, kernel["name"], op, kernel["ts"] - t0, kernel["dur"],
                                wrappers, "cuda"))
    else:
        for op in sorted(leaves, key=lambda e: e["ts"]):
            rows.append(_op_row(method, op["name"], op, op["ts"] - t0, op["dur"], wrappers, "cpu"))
    table = pd.DataFrame(rows)
    if not table.empty:
        table["seq_no"] = range(len(table))
        table["step"] = 0
    return table


def _innermost(scopes: list[dict], start: float, end: float) -> str:
    """The module whose range encloses [start, end] and is deepest in the module tree.

    Depth, not the latest start, decides: in backward an inner module that shares its output
    with its parent (lm_head and the model, down_proj and the MLP) starts first. The latest
    start only breaks ties between parallel branches of equal depth.
    """
    best, best_key = None, None
    for scope in scopes:
        if scope["ts"] > start:
            break
        if scope["ts"] + scope["dur"] >= end:
            key = (module_depth(scope["name"]), scope["ts"])
            if best_key is None or key > best_key:
                best, best_key = scope, key
    return best["name"] if best else ROOT


def _op_row(method, name, op, start_us, dur_us, wrappers, device) -> dict:
    args = op.get("args", {}) if op else {}
    shapes = args.get("Input Dims", [])
    module = op["_module"] if op else ROOT
    phase = op["_phase"] if op else None
    op_name = op["name"] if op else name
    dtypes = [t for t in args.get("Input type", []) if t and t != "Scalar"]
    return {
        "method": method, "module": module, "phase": phase, "name": name,
        "shapes": json.dumps(shapes), "dtype": dtypes[0] if dtypes else "",
        "start_us": start_us, "dur_us": dur_us,
        "flops": matmul_flops(op_name, shapes), "bytes": float("nan"),
        "adapter_branch": method_registry.is_adapter_op(method, module, op_name, phase or "",
                                                        wrappers),
        "device": device,
    }


def _memory_timeline(events, method, static, ledger, grad_ptrs, cuda):
    """The profiler's allocation events of the step's device, categorised (see
    instrument.memory_timeline); keys are addresses."""
    device_type = 1 if cuda else 0
    windows = _phase_windows(events)
    t0 = min(start for start, _ in windows.values())
    logits_windows = [(e["ts"], e["ts"] + e["dur"]) for e in events
                      if e.get("cat") == "user_annotation" and e.get("ph") == "X"
                      and (e["name"] == LOSS or e["name"].endswith("lm_head"))]
    memory_events = []
    for e in sorted((e for e in events if e.get("name") == "[memory]"
                     and e.get("args", {}).get("Device Type") == device_type),
                    key=lambda e: e["ts"]):
        nbytes = e["args"]["Bytes"]
        memory_events.append(MemoryEvent(
            t=e["ts"] - t0, key=e["args"]["Addr"], nbytes=nbytes,
            phase=_phase_at(windows, e["ts"]),
            logits_scope=nbytes > 0 and any(s <= e["ts"] <= f for s, f in logits_windows)))
    rows, peak, breakdown = memory_timeline(memory_events, static, ledger.ptr_owner,
                                            set(grad_ptrs))
    return pd.DataFrame(rows).assign(method=method), peak, breakdown
