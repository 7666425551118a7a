"""Measure real training steps of one method on a real device (cpu or cuda).

Two passes over one prepared model, each a Capture session around plain training steps, so that
no instrument's overhead reaches another's result:
  1. timing:   warm-up steps, then `steps` timed steps; module and phase latencies from a
               synchronous clock (CPU) or CUDA events (GPU); the medians are reported.
  2. profiler: one step under torch.profiler with ranges named by module path and phase, the
               saved-tensor ledger and memory events: the op (or kernel) sequence, activation
               bytes per module, and the categorised memory timeline with its peak.
The profiler pass's op durations carry the profiler's own overhead; they are never used as
latencies.
"""

from __future__ import annotations

import bisect
import json
import os
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile

from paca_prof import methods
from paca_prof.capture import Capture
from paca_prof.engines.layers import container_paths, layer_table, module_kinds
from paca_prof.engines.step import Prepared, make_batch, prepare
from paca_prof.flops import profiled_op_flops
from paca_prof.ledger import SavedTensorLedger
from paca_prof.memory import (MemoryEvent, local, memory_timeline, static_bytes,
                              static_storages, with_missed_frees)
from paca_prof.reserved import allocator_config, replay_step
from paca_prof.modules import ROOT, is_logits_owner, module_depth
from paca_prof.ops import counts_as_op
from paca_prof.results import MethodResult, summary_row
from paca_prof.spec import RunSpec
from paca_prof.trace import PHASES, normalize_dtype

# Kineto writes "USDT ... profiler_start/stop" lines to stderr at every profiled step; they say
# nothing a user can act on. Read when the profiler first starts; a user's own setting wins.
os.environ.setdefault("KINETO_LOG_LEVEL", "99")


def measure_method(spec: RunSpec, method: str, workdir: Path) -> MethodResult:
    """Run `method` for real on spec.device and return its tables.

    Raises torch.OutOfMemoryError (or RuntimeError from the CPU allocator) when it does not fit;
    the caller records that as status oom.
    """
    run = prepare(spec, method, spec.device)
    ids = make_batch(spec, spec.device)
    latencies, phase_ms = timing_pass(run, ids, spec.warmup, spec.steps)
    chrome_path = workdir / f"trace-{method}.json"
    profiled = _profiler_pass(run, ids, spec.device, chrome_path,
                              step_index=spec.warmup + spec.steps)
    paths = run.capture().paths
    layers = layer_table(method, module_kinds(paths), latencies, profiled["ops"],
                         profiled["ledger"].by_module, container_paths(paths))
    summary = summary_row(
        method, times_ms=phase_ms, peak_breakdown=profiled["peak_breakdown"],
        n_kernels=len(profiled["ops"]), activation_bytes=profiled["ledger"].total_bytes,
        trainable_params=run.trainable_params, **profiled["device_peaks"], **run.stale_counts())
    del run
    return MethodResult(summary, layers, profiled["ops"], profiled["memory"], chrome_path)


# --- 1. timing ---------------------------------------------------------------------------------

class _Clock:
    """Host clock on the CPU; CUDA events on the GPU (read after one synchronize per step)."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

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


def timing_pass(run: Prepared, ids: torch.Tensor, warmup: int, steps: int):
    """Median latency per (module, phase) and per phase over `steps` timed steps after `warmup`
    untimed ones. Returns ({(path, phase): ms}, {phase: ms, "step": ms})."""
    clock = _Clock(ids.device.type == "cuda")
    open_scopes: dict[tuple[str, str], list] = defaultdict(list)
    intervals: list[tuple[str, str, object, object]] = []
    per_step: list[dict] = []

    def enter(path, phase):
        open_scopes[(path, phase)].append(clock.stamp())

    def leave(path, phase):
        starts = open_scopes.get((path, phase))
        if starts:
            intervals.append((path, phase, starts.pop(), clock.stamp()))

    def step_done(index):
        clock.sync()
        if index >= warmup:
            totals: dict[tuple[str, str], float] = defaultdict(float)
            for path, phase, start, end in intervals:
                totals[(path, phase)] += clock.ms(start, end)
            per_step.append(totals)
        intervals.clear()
        open_scopes.clear()

    with run.capture() as capture:
        capture.on_scope(enter, leave)
        capture.on_phase(start=lambda phase: enter(f"phase:{phase}", phase),
                         end=lambda phase: leave(f"phase:{phase}", phase))
        capture.on_step(step_done)
        for _ in range(warmup + steps):
            run.step(ids)
    keys = set().union(*per_step)
    medians = {key: statistics.median(s[key] for s in per_step if key in s) for key in keys}
    phase_ms = {p: medians.get((f"phase:{p}", p), 0.0) for p in PHASES}
    phase_ms["step"] = sum(phase_ms.values())
    latencies = {k: v for k, v in medians.items() if not k[0].startswith("phase:")}
    return latencies, phase_ms


# --- 2. profiler -------------------------------------------------------------------------------

def _profiler_pass(run: Prepared, ids: torch.Tensor, device: str, chrome_path: Path,
                   step_index: int) -> dict:
    """One profiled step: ops, activation bytes, and the categorised memory timeline."""
    with ProfiledStep(run.capture(), run.optimizer, device.startswith("cuda"),
                      run.recipe.allocator) as profiled:
        run.step(ids)
    method = methods.get(run.method)
    return profiled.result(run.method, method, method.wrapper_paths(run.model), step_index,
                           run.r, chrome_path)


class ProfiledStep:
    """The profiler pass's instruments over one step (or any span of steps) of a Capture
    session: torch.profiler with ranges named by module path and phase, the saved-tensor
    ledger, and the bytes alive when the step's first phase starts (weights, trainable
    parameters, optimizer state, and gradients a loop keeps from the step before).

        with ProfiledStep(capture, optimizer, cuda) as profiled:
            ...                                          # the training step, as it is
        tables = profiled.result(method, record, wrappers, step_index, r, chrome_path)

    Shared by the engines' profiler pass and paca_prof.profile() over a user's own loop. A
    phase may have several ranges (one per micro-batch under gradient accumulation); the
    ledger's owners are kept at the end of each forward, so every micro-batch's saved tensors
    are activations in the memory timeline. The activation bytes per module are the last
    forward's (ledger.py).
    """

    def __init__(self, capture: Capture, optimizer, cuda: bool, allocator: str = "caching"):
        self.capture, self.optimizer, self.cuda = capture, optimizer, cuda
        self.allocator = allocator  # the allocator model's mode, for reserved memory off CUDA
        self.ledger = SavedTensorLedger(capture)
        self.static: dict[str, int] | None = None
        self.start_keys: dict[int, str] = {}
        self.gradients: list[tuple[int, str]] = []  # (address, marker) at each backward's end
        self.forward_owners: list[dict[int, str]] = []  # the ledger's, at each forward's end
        self._ranges: dict[tuple[str, str], list] = defaultdict(list)
        capture.on_phase(start=self._phase_start, end=self._phase_end)
        capture.on_scope(self._enter, self._leave)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        self.profiler = profile(activities=activities, record_shapes=True, profile_memory=True)

    def __enter__(self) -> ProfiledStep:
        self.capture.__enter__()
        self.ledger.__enter__()
        self.profiler.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        try:
            if exc[0] is None and self.capture.phase != "idle":
                self.capture.mark_step()  # an explicit step's last phase ends here
            if self.cuda:
                torch.cuda.synchronize()
            self.profiler.__exit__(*exc)
        finally:
            self.module_paths = self.capture.scope_names
            self.ledger.__exit__(*exc)
            self.capture.__exit__(*exc)

    def _enter(self, name, phase):
        scope = record_function(name)
        scope.__enter__()
        self._ranges[(name, phase)].append(scope)

    def _leave(self, name, phase):
        if self._ranges.get((name, phase)):
            self._ranges[(name, phase)].pop().__exit__(None, None, None)

    def _phase_start(self, phase):
        if self.static is None:  # the step's first phase: what is alive before it
            self._snapshot()
        if phase == "optimizer":  # FSDP2 reduce-scatters its last groups after backward ends
            self._gradient_snapshot()
        self._enter(f"phase:{phase}", phase)

    def _phase_end(self, phase):
        self._leave(f"phase:{phase}", phase)
        if phase == "forward":  # the ledger, subscribed first, has just taken its account
            self.forward_owners.append(dict(self.ledger.ptr_owner))
        if phase == "backward":  # the pass is over: every gradient is there
            self._gradient_snapshot()

    def _gradient_snapshot(self) -> None:
        marker = f"[gradients {len(self.gradients)}]"  # its time, on the profiler's clock
        with record_function(marker):
            self.gradients.extend((local(p.grad).untyped_storage().data_ptr(), marker)
                                  for p in self.capture.model.parameters()
                                  if p.grad is not None)

    def _snapshot(self) -> None:
        from paca_prof.sharding import sharded_parameters

        model = self.capture.model
        # Under FSDP2 the root's parameters are already gathered here (its pre-forward hook
        # runs first): the sharded ones are what lives before the step.
        params = sharded_parameters(model)
        self.static = static_bytes(model, self.optimizer, params)
        self.static_storages = static_storages(model, self.optimizer, by_address=True,
                                               parameters=params)
        for param in model.parameters():
            if param.grad is not None:  # kept from the step before (zero_grad to zeros)
                storage = local(param.grad).untyped_storage()
                self.static["gradients"] += storage.nbytes()
                self.start_keys[storage.data_ptr()] = "gradients"
                self.static_storages.append((storage.data_ptr(), storage.nbytes(), "gradients"))
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.static["rest"] = torch.cuda.memory_allocated() - sum(self.static.values())

    def result(self, method_name: str, method, wrappers: set[str], step_index: int, r: int,
               chrome_path: Path) -> dict:
        """The step's ops, ledger, peak breakdown, memory table and device peaks; writes the
        Chrome trace to `chrome_path`. `method`: the registry record that flags the adapter
        branch; `wrappers`: its wrapper modules' paths in this model."""
        self.profiler.export_chrome_trace(str(chrome_path))
        events = json.loads(chrome_path.read_text())["traceEvents"]
        ops = _op_table(events, method_name, method, self.module_paths, wrappers, self.cuda,
                        step_index, r)
        timeline, memory_events = _memory_timeline(events, self.static, self.forward_owners,
                                                   self.gradients, self.cuda, self.start_keys)
        if self.cuda:
            device_peaks = cuda_memory_peaks()
        else:  # no CUDA allocator here: its model, over the allocations this step made
            replayed = replay_step(self.static_storages, memory_events,
                                   allocator_config(self.allocator))
            device_peaks = {"allocator_peak_bytes": replayed.allocated_bytes,
                            "reserved_bytes": replayed.reserved_bytes}
        return {"ops": ops, "ledger": self.ledger, "peak_breakdown": timeline.breakdown,
                "memory": pd.DataFrame(timeline.rows).assign(method=method_name),
                "device_peaks": device_peaks}


def cuda_memory_peaks() -> dict[str, int]:
    """torch's own peak counters of the profiled step: allocated (blocks rounded up, kernel
    workspaces included) and reserved. They are kept beside the tensor-byte peak, never folded
    into it: the peak stays the sum of its categories (results.summary_row)."""
    return {"allocator_peak_bytes": torch.cuda.max_memory_allocated(),
            "reserved_bytes": torch.cuda.max_memory_reserved()}


@dataclass
class _Op:
    """One counted op of the profiled step (instrument's definition: ops.counts_as_op)."""

    name: str
    tid: object
    ts: float
    dur: float
    module: str
    phase: str
    shapes: list
    dtype: str

    @property
    def end(self) -> float:
        return self.ts + self.dur


class _Windows:
    """The phase ranges of the profiled step (a phase has one per micro-batch under gradient
    accumulation), and the start of the first."""

    def __init__(self, events):
        self.spans = sorted((e["ts"], e["ts"] + e["dur"], e["name"].removeprefix("phase:"))
                            for e in events if e.get("cat") == "user_annotation"
                            and e["name"].startswith("phase:"))
        self.start = self.spans[0][0]

    def phase_at(self, ts: float) -> str | None:
        for start, end, phase in self.spans:
            if start <= ts <= end:
                return phase
        return None


def _op_table(events, method_name, method, module_paths, wrappers, cuda, step_index,
              r) -> pd.DataFrame:
    """One row per op on the CPU, or per device kernel on CUDA (each kernel charged to the op
    that launched it; the op's FLOPs to its first kernel)."""
    windows = _Windows(events)
    ops = _counted_ops(events, windows, module_paths)
    rows = []
    if cuda:
        launches = {e["args"]["correlation"]: e for e in events if e.get("ph") == "X"
                    and e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {})}
        by_tid: dict[object, list[_Op]] = defaultdict(list)
        for op in ops:
            by_tid[op.tid].append(op)
        starts = {tid: [op.ts for op in tid_ops] for tid, tid_ops in by_tid.items()}
        charged: set[int] = set()
        kernels = [e for e in events if e.get("ph") == "X" and e.get("cat") in
                   ("kernel", "gpu_memcpy", "gpu_memset")]
        for kernel in sorted(kernels, key=lambda e: e["ts"]):
            launch = launches.get(kernel.get("args", {}).get("correlation"))
            op = None
            if launch is not None and launch["tid"] in by_tid:
                i = bisect.bisect_right(starts[launch["tid"]], launch["ts"]) - 1
                candidate = by_tid[launch["tid"]][i] if i >= 0 else None
                if candidate is not None and candidate.end >= launch["ts"]:
                    op = candidate
            first = op is not None and id(op) not in charged
            if op is not None:
                charged.add(id(op))
            rows.append(_op_row(method_name, method, kernel["name"], op,
                                kernel["ts"] - windows.start, kernel["dur"], wrappers, "cuda",
                                count_flops=first, r=r))
    else:
        for op in ops:
            rows.append(_op_row(method_name, method, op.name, op, op.ts - windows.start, op.dur,
                                wrappers, "cpu", count_flops=True, r=r))
    table = pd.DataFrame(rows)
    if not table.empty:
        table["seq_no"] = range(len(table))
        table["step"] = step_index
    return table


def _counted_ops(events, windows: _Windows, module_paths: set[str]) -> list[_Op]:
    """The outermost ops with a kernel of their own, in time order, each with its innermost
    module and its phase."""
    by_tid: dict[object, list] = defaultdict(list)
    scopes_by_tid: dict[object, list] = defaultdict(list)
    for e in events:
        if e.get("ph") != "X":
            continue
        cat = e.get("cat")
        if cat == "cpu_op" and "::" in e["name"] and not e["name"].startswith(
                ("autograd::", "torch::autograd")):
            by_tid[e["tid"]].append(e)
        elif cat == "user_annotation" and e["name"] in module_paths:
            scopes_by_tid[e["tid"]].append(e)
    counted: list[_Op] = []
    for tid, tid_ops in by_tid.items():
        tid_ops.sort(key=lambda e: (e["ts"], -e["dur"]))
        scopes = sorted(scopes_by_tid.get(tid, []), key=lambda e: e["ts"])
        stack: list[tuple[dict, bool]] = []  # enclosing ops, and whether each was counted
        for e in tid_ops:
            while stack and stack[-1][0]["ts"] + stack[-1][0]["dur"] <= e["ts"]:
                stack.pop()
            is_counted = counts_as_op(e["name"]) and not any(c for _, c in stack)
            stack.append((e, is_counted))
            phase = windows.phase_at(e["ts"])
            if not is_counted or phase is None:
                continue
            args = e.get("args", {})
            dtypes = [t for t in args.get("Input type", []) if t and t != "Scalar"]
            counted.append(_Op(e["name"], tid, e["ts"], e["dur"],
                               _innermost(scopes, e["ts"], e["ts"] + e["dur"]), phase,
                               args.get("Input Dims", []),
                               normalize_dtype(dtypes[0]) if dtypes else ""))
    counted.sort(key=lambda op: op.ts)
    return counted


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


def _op_row(method_name, method, name, op: _Op | None, start_us, dur_us, wrappers, device,
            count_flops: bool, r: int) -> dict:
    module = op.module if op else ROOT
    phase = op.phase if op else None
    op_name = op.name if op else name
    return {
        "method": method_name, "module": module, "phase": phase, "name": name,
        "shapes": json.dumps(op.shapes if op else []), "dtype": op.dtype if op else "",
        "start_us": start_us, "dur_us": dur_us,
        "flops": profiled_op_flops(op_name, op.shapes) if op and count_flops else 0.0,
        "bytes": float("nan"),
        "adapter_branch": method.is_branch_op(module, op_name, phase or "", wrappers,
                                              op.shapes if op else None, r),
        "device": device,
    }


def _memory_timeline(events, static, forward_owners, gradients, cuda, start_keys=None):
    """The profiler's allocation events of the step's device from its first phase on,
    categorised (memory.memory_timeline); keys are addresses. Events before the first phase
    (a loop fetching its next batch) are not the step's. `forward_owners` holds, per forward
    range in time order, the saved tensors' addresses and modules at its end: the last
    allocation at such an address within that forward is the saved tensor. Returns the
    timeline and the events it was made from."""
    device_type = 1 if cuda else 0
    windows = _Windows(events)
    logits_windows = [(e["ts"], e["ts"] + e["dur"]) for e in events
                      if e.get("cat") == "user_annotation" and e.get("ph") == "X"
                      and is_logits_owner(e["name"])]
    memory_events = []
    for e in sorted((e for e in events if e.get("name") == "[memory]"
                     and e.get("args", {}).get("Device Type") == device_type
                     and e["ts"] >= windows.start),
                    key=lambda e: e["ts"]):
        nbytes = e["args"]["Bytes"]
        memory_events.append(MemoryEvent(
            t=e["ts"] - windows.start, key=e["args"]["Addr"], nbytes=nbytes,
            phase=windows.phase_at(e["ts"]),
            logits_scope=nbytes > 0 and any(s <= e["ts"] <= f for s, f in logits_windows)))
    memory_events = with_missed_frees(memory_events)
    forwards = [(start, end) for start, end, phase in windows.spans if phase == "forward"]
    saved_events: dict[int, str] = {}
    for (start, end), owners in zip(forwards, forward_owners):
        last: dict[int, int] = {}
        for i, e in enumerate(memory_events):
            if e.nbytes > 0 and start <= e.t + windows.start <= end:
                last[e.key] = i
        saved_events.update({last[key]: owner for key, owner in owners.items() if key in last})
    markers = {e["name"]: e["ts"] - windows.start for e in events
               if e.get("cat") == "user_annotation" and e["name"].startswith("[gradients ")}
    gradient_times = [(ptr, markers[marker]) for ptr, marker in gradients if marker in markers]
    return (memory_timeline(memory_events, static, {}, gradient_times, start_keys, saved_events),
            memory_events)
