"""Measure real training steps of the methods on a real device (cpu or cuda).

Two passes, each a Capture session around plain training steps, so that no instrument's
overhead reaches another's result:
  1. timing:   every method is prepared at once and the methods are timed in interleaved
               rounds, as bench/bench_step.py times them: a round runs one step of each method,
               in a freshly shuffled order, so that a burst of load on a shared machine falls
               on all of them alike. Before the rounds, warm-up steps (interleaved too) run
               until each method's step time settles: at least `warmup`, then until the last
               SETTLE_WINDOW step times lie within SETTLE_TOLERANCE of their median, at most
               MAX_SETTLE_STEPS more. Module and phase latencies come from a synchronous clock
               (CPU) or CUDA events (GPU); every timed step is kept (the steps table), and the
               summary reports medians with their spread (paca_prof/spread.py). A time budget
               bounds this pass: no round starts once it is spent (one round always runs), and
               warm-up stops extending at a third of it.
  2. profiler: each method again, alone (the timing models are released first, so that CUDA's
               memory counters see one model): a fresh model, one untimed step so that the
               optimizer has its state, then one step under torch.profiler with ranges named by
               module path and phase, the saved-tensor ledger and memory events: the op (or
               kernel) sequence, activation bytes per module, and the categorised memory
               timeline with its peak.
The profiler pass's op durations carry the profiler's own overhead; they are never used as
latencies.

Limits: the timing pass holds every method's model at once. A method that runs out of memory
there is timed alone after the others (its rounds then share no load with theirs, which the
run.yaml timing record says); one that runs out of memory alone too is status oom.
"""

from __future__ import annotations

import bisect
import gc
import json
import os
import random
import statistics
import time
import weakref
from collections import defaultdict
from dataclasses import dataclass, field
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
from paca_prof.memory import (MemoryEvent, local, memory_timeline, merged_by_time,
                              static_bytes, static_storages, with_collective_frees,
                              with_missed_frees)
from paca_prof.reserved import allocator_config, replay_step
from paca_prof.modules import ROOT, is_logits_owner, module_depth
from paca_prof.ops import counts_as_op
from paca_prof.results import MethodResult, summary_row
from paca_prof.spec import RunSpec
from paca_prof.trace import PHASES, normalize_dtype

# Kineto writes "USDT ... profiler_start/stop" lines to stderr at every profiled step; they say
# nothing a user can act on. Read when the profiler first starts; a user's own setting wins.
os.environ.setdefault("KINETO_LOG_LEVEL", "99")

SETTLE_WINDOW = 3  # warm-up step times looked at together
SETTLE_TOLERANCE = 0.10  # (max - min) / median of the window at most this: settled
MAX_SETTLE_STEPS = 8  # warm-up steps beyond --warmup, at most, waiting for it to settle
WARMUP_BUDGET_SHARE = 1 / 3  # of the time budget, after which warm-up stops extending


def measure_method(spec: RunSpec, method: str, workdir: Path,
                   timing: Timing | None = None) -> MethodResult:
    """`method`'s tables from its timing (by default, `method` timed alone: time_methods) and
    a profiler pass on a fresh model.

    Raises torch.OutOfMemoryError (or RuntimeError from the CPU allocator) when it does not fit;
    the caller records that as status oom.
    """
    if timing is None:
        outcome = time_methods(spec, [method])[method]
        if isinstance(outcome, BaseException):
            raise outcome
        timing = outcome
    run = prepare(spec, method, spec.device)
    ids = make_batch(spec, spec.device)
    if run.optimizer is not None or spec.recipe.keep_outputs:
        # the optimizer's state exists from the first step on, as in training, and a loop
        # that keeps its output starts every later step with the one before
        run.step(ids)
    chrome_path = workdir / f"trace-{method}.json"
    profiled = _profiler_pass(run, ids, spec.device, chrome_path, step_index=run.steps_run)
    paths = run.capture().paths
    layers = layer_table(method, module_kinds(paths), timing.latencies(), profiled["ops"],
                         profiled["ledger"].by_module, container_paths(paths))
    stale = _add_counts(timing.stale, run.stale_counts())
    summary = summary_row(
        method, times_ms=timing.phase_ms(), peak_breakdown=profiled["peak_breakdown"],
        n_kernels=len(profiled["ops"]), activation_bytes=profiled["ledger"].total_bytes,
        trainable_params=run.trainable_params, warmup_steps=timing.warmup_steps,
        steps_timed=len(timing.per_step), **profiled["device_peaks"], **stale)
    del run
    return MethodResult(summary, layers, profiled["ops"], profiled["memory"], chrome_path)


def _add_counts(a: dict, b: dict) -> dict:
    return {k: a.get(k, 0) + b.get(k, 0) for k in {*a, *b}}


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


@dataclass
class Timing:
    """One method's timed steps: per step, {(path, phase): ms} for module scopes and
    ("phase:<p>", p) for phases; the round of each; the warm-up steps that ran before them."""

    method: str
    per_step: list[dict] = field(default_factory=list)
    rounds: list[int] = field(default_factory=list)
    warmup_steps: int = 0
    settled: bool = True  # False: warm-up ended (bounded) before the step time settled
    alone: bool = False  # True: timed alone, after the others (out of memory beside them)
    stale: dict = field(default_factory=dict)

    def step_ms(self, totals: dict) -> float:
        return sum(totals.get((f"phase:{p}", p), 0.0) for p in PHASES)

    def latencies(self) -> dict[tuple[str, str], float]:
        """Median ms per (module, phase) over the timed steps."""
        keys = set().union(*self.per_step) if self.per_step else set()
        return {k: statistics.median(s[k] for s in self.per_step if k in s)
                for k in keys if not k[0].startswith("phase:")}

    def phase_ms(self) -> dict[str, float]:
        """Median ms of each phase, and "step": the median of the steps' totals (not the sum
        of the phase medians)."""
        times = {p: statistics.median(s.get((f"phase:{p}", p), 0.0) for s in self.per_step)
                 for p in PHASES}
        times["step"] = statistics.median(self.step_ms(s) for s in self.per_step)
        return times

    def steps_table(self) -> pd.DataFrame:
        """The steps table's rows of this method (trace.STEP_COLUMNS)."""
        rows = []
        for index, (totals, round_) in enumerate(zip(self.per_step, self.rounds)):
            row = {"method": self.method, "round": round_, "step": index,
                   "step_ms": self.step_ms(totals)}
            row.update({f"{p}_ms": totals.get((f"phase:{p}", p), 0.0) for p in PHASES})
            rows.append(row)
        return pd.DataFrame(rows)


class _StepRecorder:
    """Times one step of a Capture session: per (module, phase) scope and per phase, summed
    over the step's intervals (a scope entered several times, as under gradient accumulation,
    adds up)."""

    def __init__(self, clock: _Clock):
        self.clock = clock
        self._open: dict[tuple[str, str], list] = defaultdict(list)
        self._intervals: list[tuple[str, str, object, object]] = []
        self.last: dict | None = None

    def attach(self, capture: Capture) -> None:
        capture.on_scope(self._enter, self._leave)
        capture.on_phase(start=lambda phase: self._enter(f"phase:{phase}", phase),
                         end=lambda phase: self._leave(f"phase:{phase}", phase))
        capture.on_step(self._done)

    def _enter(self, path, phase):
        self._open[(path, phase)].append(self.clock.stamp())

    def _leave(self, path, phase):
        starts = self._open.get((path, phase))
        if starts:
            self._intervals.append((path, phase, starts.pop(), self.clock.stamp()))

    def _done(self, index):
        self.clock.sync()
        totals: dict[tuple[str, str], float] = defaultdict(float)
        for path, phase, start, end in self._intervals:
            totals[(path, phase)] += self.clock.ms(start, end)
        self.last = dict(totals)
        self._intervals.clear()
        self._open.clear()


def timed_step(run: Prepared, ids: torch.Tensor, clock: _Clock) -> dict:
    """One training step of `run` in its own Capture session (cyclic GC off inside it, as
    Capture does); returns its {(path, phase): ms}."""
    recorder = _StepRecorder(clock)
    with run.capture() as capture:
        recorder.attach(capture)
        run.step(ids)
    return recorder.last or {}


def settled(times: list[float], window: int = SETTLE_WINDOW,
            tolerance: float = SETTLE_TOLERANCE) -> bool:
    """Whether the last `window` step times lie within `tolerance` of their median."""
    if len(times) < window:
        return False
    last = times[-window:]
    middle = statistics.median(last)
    return middle > 0 and (max(last) - min(last)) / middle <= tolerance


def timing_pass(runs: dict[str, Prepared], ids: torch.Tensor, warmup: int, steps: int,
                time_budget_s: float | None = None, seed: int = 0,
                progress=lambda method, state: None) -> dict[str, Timing | BaseException]:
    """Warm up, then time `steps` interleaved rounds of every prepared method (the module
    docstring). A method whose step raises drops out with its exception as its outcome; the
    others go on. Returns {method: Timing or the exception}."""
    clock = _Clock(ids.device.type == "cuda")
    rng = random.Random(seed)
    outcomes: dict[str, Timing | BaseException] = {m: Timing(m) for m in runs}
    alive = dict(runs)
    started = time.perf_counter()

    def visit(method: str) -> dict | None:
        try:
            return timed_step(alive[method], ids, clock)
        except Exception as error:  # recorded as this method's outcome; the others go on
            outcomes[method] = error
            del alive[method]
            if ids.device.type == "cuda":
                torch.cuda.empty_cache()
            return None

    def shuffled(names) -> list[str]:
        names = list(names)
        rng.shuffle(names)
        return names

    gc.collect()
    warm_times: dict[str, list[float]] = {m: [] for m in runs}
    warming = set(alive) if warmup > 0 else set()
    while warming:
        for method in shuffled(sorted(warming)):
            progress(method, "warming up")
            totals = visit(method)
            if totals is None:
                warming.discard(method)
                continue
            timing = outcomes[method]
            timing.warmup_steps += 1
            warm_times[method].append(timing.step_ms(totals))
        over = (time_budget_s is not None
                and time.perf_counter() - started > WARMUP_BUDGET_SHARE * time_budget_s)
        for method in list(warming):
            timing = outcomes[method]
            if timing.warmup_steps < warmup:
                continue
            if settled(warm_times[method]):
                warming.discard(method)
            elif over or timing.warmup_steps >= warmup + MAX_SETTLE_STEPS:
                timing.settled = False
                warming.discard(method)
    for round_ in range(steps):
        if round_ > 0 and time_budget_s is not None \
                and time.perf_counter() - started > time_budget_s:
            break
        for method in shuffled(alive):
            progress(method, f"timing round {round_ + 1}/{steps}")
            totals = visit(method)
            if totals is not None:
                outcomes[method].per_step.append(totals)
                outcomes[method].rounds.append(round_)
    for method, run in alive.items():
        outcomes[method].stale = run.stale_counts()
    return outcomes


def time_methods(spec: RunSpec, names: list[str] | None = None,
                 progress=lambda method, state: None) -> dict[str, Timing | BaseException]:
    """Prepare every method of `names` (default spec.methods) on spec.device and time them
    together (timing_pass). A method that runs out of memory while the others are held is
    timed alone afterwards (Timing.alone; with a time budget of its own). Returns
    {method: Timing or the exception that stopped it}; every model is released on return."""
    from paca_prof.engines import is_out_of_memory

    names = list(names or spec.methods)
    ids = make_batch(spec, spec.device)
    runs: dict[str, Prepared] = {}
    outcomes: dict[str, Timing | BaseException] = {}
    alone: list[str] = []
    for method in names:
        progress(method, "preparing")
        try:
            runs[method] = prepare(spec, method, spec.device)
        except Exception as error:
            if is_out_of_memory(error) and len(names) > 1:
                alone.append(method)
            else:
                outcomes[method] = error
            if spec.device.startswith("cuda"):
                torch.cuda.empty_cache()
    outcomes.update(timing_pass(runs, ids, spec.warmup, spec.steps, spec.time_budget_s,
                                spec.seed, progress))
    for method, outcome in list(outcomes.items()):
        if (isinstance(outcome, BaseException) and is_out_of_memory(outcome)
                and len(runs) > 1 and method in runs):
            alone.append(method)  # out of memory beside the others: alone, below
    runs.clear()
    gc.collect()
    if spec.device.startswith("cuda"):
        torch.cuda.empty_cache()
    for method in alone:
        outcome = time_methods(spec, [method], progress)[method]
        if isinstance(outcome, Timing):
            outcome.alone = True
        outcomes[method] = outcome
    return {m: outcomes[m] for m in names}


# --- 2. profiler -------------------------------------------------------------------------------

def _profiler_pass(run: Prepared, ids: torch.Tensor, device: str, chrome_path: Path,
                   step_index: int) -> dict:
    """One profiled step: ops, activation bytes, and the categorised memory timeline."""
    with ProfiledStep(run.capture(), run.optimizer, device.startswith("cuda"),
                      run.recipe.allocator, kept=run.kept_tensors()) as profiled:
        run.step(ids)
    method = methods.get(run.method)
    return profiled.result(run.method, method, method.wrapper_paths(run.model), step_index,
                           run.r, chrome_path)


class ProfiledStep:
    """The profiler pass's instruments over one step (or any span of steps) of a Capture
    session: torch.profiler with ranges named by module path and phase, the saved-tensor
    ledger, and the bytes alive when the step's first phase starts (weights, trainable
    parameters, optimizer state, and gradients a loop keeps from the step before, and with
    `kept` the model's output it keeps: Prepared.kept_tensors).

        with ProfiledStep(capture, optimizer, cuda) as profiled:
            ...                                          # the training step, as it is
        tables = profiled.result(method, record, wrappers, step_index, r, chrome_path)

    Shared by the engines' profiler pass and paca_prof.profile() over a user's own loop. A
    phase may have several ranges (one per micro-batch under gradient accumulation); the
    ledger's owners are kept at the end of each forward, so every micro-batch's saved tensors
    are activations in the memory timeline. The activation bytes per module are the last
    forward's (ledger.py).
    """

    def __init__(self, capture: Capture, optimizer, cuda: bool, allocator: str = "caching",
                 kept: list[tuple[torch.Tensor, str]] = ()):
        self.capture, self.optimizer, self.cuda = capture, optimizer, cuda
        self.allocator = allocator  # the allocator model's mode, for reserved memory off CUDA
        # The output a loop keeps from the step before (Prepared.kept_tensors), by storage:
        # (address, bytes, category), no reference to it, so that its free is seen. The
        # profiler reports no free of a block allocated before it started, so each kept
        # storage marks its end on the profiler's clock, when the last tensor on it goes.
        by_address: dict[int, tuple[int, int, str]] = {}
        self._kept_tensors_left: dict[int, int] = defaultdict(int)
        for t, category in kept:
            storage = local(t).untyped_storage()
            address = storage.data_ptr()
            by_address.setdefault(address, (address, storage.nbytes(), category))
            self._kept_tensors_left[address] += 1
            weakref.finalize(t, self._kept_freed, address, storage.nbytes())
        self.kept = list(by_address.values())
        self.kept_frees: list[tuple[int, int, str]] = []  # (address, bytes, marker)
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

    def _kept_freed(self, address: int, nbytes: int) -> None:
        self._kept_tensors_left[address] -= 1
        if self._kept_tensors_left[address]:
            return
        marker = f"[kept output {len(self.kept_frees)}]"
        with record_function(marker):
            self.kept_frees.append((address, nbytes, marker))

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
        gradients = [(local(p.grad).untyped_storage().data_ptr(),
                      local(p.grad).untyped_storage().nbytes(), "gradients")
                     for p in model.parameters() if p.grad is not None]  # zero_grad to zeros
        for address, nbytes, category in gradients + self.kept:  # alive from the step before
            self.static[category] += nbytes
            self.start_keys[address] = category
            self.static_storages.append((address, nbytes, category))
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
                                                   self.gradients, self.cuda, self.start_keys,
                                                   self.kept_frees)
        if self.cuda:
            device_peaks = cuda_memory_peaks()
        else:  # no CUDA allocator here: its model, over the allocations this step made
            replayed = replay_step(self.static_storages, memory_events,
                                   allocator_config(self.allocator), bool(self.kept))
            device_peaks = {"allocator_peak_bytes": replayed.allocated_bytes,
                            "reserved_bytes": replayed.reserved_bytes}
        return {"ops": ops, "ledger": self.ledger, "peak_breakdown": timeline.breakdown,
                "memory": pd.DataFrame(timeline.columns).assign(method=method_name),
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


def _with_kept_frees(memory_events, events, kept_frees, windows):
    """The events with a free added at each kept storage's marker, unless the profiler saw it
    freed before anything was allocated at its address again."""
    markers = {e["name"]: e["ts"] for e in events if e.get("cat") == "user_annotation"
               and e["name"].startswith("[kept output ")}
    first_at: dict[int, MemoryEvent] = {}
    for e in memory_events:
        first_at.setdefault(e.key, e)
    frees = [MemoryEvent(markers[marker] - windows.start, address, -nbytes,
                         windows.phase_at(markers[marker]))
             for address, nbytes, marker in kept_frees
             if marker in markers
             and (address not in first_at or first_at[address].nbytes > 0)]
    return merged_by_time(memory_events, frees) if frees else memory_events


def _memory_timeline(events, static, forward_owners, gradients, cuda, start_keys=None,
                     kept_frees=()):
    """The profiler's allocation events of the step's device from its first phase on,
    categorised (memory.memory_timeline); keys are addresses. Events before the first phase
    (a loop fetching its next batch) are not the step's. `forward_owners` holds, per forward
    range in time order, the saved tensors' addresses and modules at its end: the last
    allocation at such an address within that forward is the saved tensor. `kept_frees`:
    (address, bytes, marker) of storages from before the step, freed at their marker, where
    the profiler shows no free of them. Returns the timeline and the events it was made
    from."""
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
    collectives = [(e["ts"] - windows.start, e["ts"] + e["dur"] - windows.start)
                   for e in events if e.get("ph") == "X" and e["name"].startswith("c10d::")]
    memory_events = with_missed_frees(with_collective_frees(memory_events, collectives))
    memory_events = _with_kept_frees(memory_events, events, kept_frees, windows)
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
