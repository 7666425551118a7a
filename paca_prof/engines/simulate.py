"""Simulate a training step of one method on the meta device: exact bytes, every op, no time.

The model is built on the meta device (shapes only) and prepared exactly as a measured run
prepares it. One step runs first without instruments so that the optimizer creates its state;
the next runs in a Capture session under OpRecorder, a TorchDispatchMode that sees every aten op
with its module, phase and step, shapes, dtype, FLOPs (flops.py) and bytes moved, and tracks
storage lifetimes by weak reference, so that the memory timeline, its peak and the peak's
breakdown come out as on a real device's allocator, without its block rounding and without
kernels' internal workspaces. The step's allocations are then replayed through the model of
PyTorch's caching allocator (reserved.py) for its reserved memory and rounded peak.

Limits: no time (see engines/project.py); kernels' internal scratch buffers (CPU-only ones,
cuBLAS workspaces) are invisible to a dispatch mode.
"""

from __future__ import annotations

import bisect
import json
import weakref
from dataclasses import dataclass, field, replace

import pandas as pd
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from paca_prof import methods
from paca_prof.capture import Capture
from paca_prof.engines import project
from paca_prof.engines.layers import container_paths, layer_table, module_kinds
from paca_prof.engines.step import prepare
from paca_prof.flops import op_flops
from paca_prof.gpus import GpuSpec
from paca_prof.ledger import SavedTensorLedger, storage_key
from paca_prof.memory import (MemoryEvent, memory_timeline, paged_bytes, static_bytes,
                              static_storages)
from paca_prof.reserved import ReservedMemory, allocator_config, replay_step
from paca_prof.modules import ancestors, is_logits_owner
from paca_prof.ops import counts_as_op
from paca_prof.results import MethodResult, summary_row
from paca_prof.spec import RunSpec


@dataclass
class OpRecorder(TorchDispatchMode):
    """Records each op (ops.counts_as_op) and each storage allocation and free, with the
    Capture session's module, phase and step.

    Ops are numbered in issue order; memory events carry the op index as their time.
    Storages that exist before the mode starts (weights, optimizer state) are not tracked.
    """

    capture: Capture
    method: methods.registry.Method
    wrappers: set[str]
    r: int
    ops: list[dict] = field(default_factory=list)
    events: list[MemoryEvent] = field(default_factory=list)
    _live: dict[int, weakref.ref] = field(default_factory=dict)
    tick: int = 0  # ops dispatched so far: the time of memory events

    def __post_init__(self):
        super().__init__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _LOCAL_SCALAR and args[0].is_meta:
            return meta_scalar(args[0])
        out = func(*args, **kwargs)
        name = func._schema.name
        phase = self.capture.phase
        module = self.capture.current
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        inputs = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        input_storages = {storage_key(t) for t in inputs}
        for tensor in outputs:  # an output sharing an input's storage is a view or in place
            if storage_key(tensor) not in input_storages:
                self._track(tensor, phase, module)
        if counts_as_op(name) and phase != "idle":
            self.ops.append({
                "method": self.method.name, "module": module, "phase": phase, "name": name,
                "shapes": json.dumps([list(t.shape) for t in inputs]),
                "dtype": str(inputs[0].dtype).removeprefix("torch.") if inputs else "",
                "flops": op_flops(func, args, kwargs, out),
                "bytes": float(sum(_nbytes(t) for t in inputs + outputs)
                               + _written_in_place(name, args, out)),
                "adapter_branch": self.method.is_branch_op(
                    module, name, phase, self.wrappers, [list(t.shape) for t in inputs], self.r),
                "device": "meta", "seq_no": len(self.ops), "step": self.capture.step_index,
            })
        self.tick += 1
        return out

    def _track(self, tensor: torch.Tensor, phase: str, module: str) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self._live:
            return
        nbytes = storage.nbytes()
        self._live[key] = weakref.ref(storage, lambda _, key=key, n=nbytes: self._free(key, n))
        self.events.append(MemoryEvent(
            t=float(self.tick), key=key, nbytes=nbytes, phase=_phase_or_none(phase),
            logits_scope=is_logits_owner(module)))

    def _free(self, key: int, nbytes: int) -> None:
        if self._live.pop(key, None) is not None:
            self.events.append(MemoryEvent(t=float(self.tick), key=key, nbytes=-nbytes,
                                           phase=_phase_or_none(self.capture.phase)))


_LOCAL_SCALAR = torch.ops.aten._local_scalar_dense.default


def meta_scalar(tensor: torch.Tensor):
    """What .item() gives for a meta tensor in simulation, which has no value: 1 (True for a
    test). Code that reads a value to decide a step size (Adafactor's relative step) or to
    check its input (transformers' mask helpers) goes on; no memory depends on it."""
    if tensor.dtype == torch.bool:
        return True
    return 1.0 if tensor.is_floating_point() else 1


class MetaScalars(TorchDispatchMode):
    """Only the .item() rule of OpRecorder, for steps run outside it (the optimizer's first
    step, which makes its state)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is _LOCAL_SCALAR and args[0].is_meta:
            return meta_scalar(args[0])
        return func(*args, **(kwargs or {}))


def _phase_or_none(phase: str) -> str | None:
    return None if phase == "idle" else phase


def _written_in_place(name: str, args, out) -> int:
    """Bytes an in-place foreach op writes back into its first list (it returns nothing, so
    its outputs do not count them): a read and a write of each tensor, as on the device."""
    if out is None and "_foreach_" in name and name.endswith("_") and args \
            and isinstance(args[0], list | tuple):
        return sum(_nbytes(t) for t in args[0] if isinstance(t, torch.Tensor))
    return 0


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class Simulator:
    """One method's model, built and prepared once on the meta device, stepped at any shape.

    Building and preparing (PEFT's injection above all) costs more than a simulated step, so
    callers that probe many shapes (the capacity planner) keep one Simulator per method.
    """

    def __init__(self, spec: RunSpec, method: str):
        self.spec, self.method = spec, methods.get(method)
        self.run = prepare(spec, method, "meta")
        optimizer = self.run.optimizer
        if optimizer is not None:  # let the optimizer create its state, as after any first step
            for param in methods.registry.trainable_parameters(self.run.model):
                param.grad = torch.empty_like(param)
            with MetaScalars():
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        self.trainable = self.run.trainable_params
        self.wrappers = self.method.wrapper_paths(self.run.model)

    def step(self, seq: int, batch: int, gpu: GpuSpec | None = None,
             budget=None) -> MethodResult:
        """Simulate one training step on a batch x seq input. With `gpu`, times are projected
        onto it (engines/project.py); without, every time column is NaN. A peak above
        `budget` (a budget.Budget) gives status oom. The result's `memory_events` are the
        step's events."""
        run = self.run
        ids = torch.zeros((batch, seq), dtype=torch.long, device="meta")
        static = static_bytes(run.model, run.optimizer)
        gradients: list[tuple[int, float]] = []
        forwards: list[tuple[int, int, dict[int, str]]] = []  # (start, end, saved keys) each
        forward_start = [0]

        def phase_start(phase):
            if phase == "forward":
                forward_start[0] = recorder.tick

        def phase_end(phase):
            if phase == "forward":  # the ledger, subscribed first, has just taken its account
                forwards.append((forward_start[0], recorder.tick, dict(ledger.keys)))
            if phase == "backward":  # the pass is over: every gradient is there
                gradients.extend((storage_key(p.grad), float(recorder.tick))
                                 for p in run.model.parameters() if p.grad is not None)

        with run.capture() as capture, SavedTensorLedger(capture) as ledger:
            capture.on_phase(start=phase_start, end=phase_end)
            recorder = OpRecorder(capture, self.method, self.wrappers, self.spec.settings.r)
            with recorder:
                run.step(ids)
            paths = capture.paths
        timeline = memory_timeline(recorder.events, static, {}, gradients,
                                   saved_events=_saved_events(recorder.events, forwards))
        ops = pd.DataFrame(recorder.ops)
        latencies, times = {}, {}
        if gpu is not None:
            ops = project.project_ops(ops, gpu)
            latencies = project.module_latencies_ms(ops, ancestors)
            times = project.phase_times_ms(ops)
        layers = layer_table(self.method.name, module_kinds(paths), latencies, ops,
                             ledger.by_module, container_paths(paths))
        reserved = self._reserved(recorder.events, budget)
        paged = paged_bytes(run.optimizer)
        summary = summary_row(
            self.method.name, "oom" if reserved.oom else "ok", times_ms=times,
            peak_breakdown=timeline.breakdown, n_kernels=len(ops),
            activation_bytes=ledger.total_bytes, trainable_params=self.trainable,
            allocator_peak_bytes=reserved.allocated_bytes,
            reserved_bytes=reserved.reserved_bytes,
            **({"paged_bytes": paged} if paged else {}))
        memory = pd.DataFrame(timeline.rows).assign(method=self.method.name)
        return MethodResult(summary, layers, ops, memory, memory_events=recorder.events,
                            start_bytes=static)


    def _reserved(self, events: list[MemoryEvent], budget) -> ReservedMemory:
        """The step replayed through the caching-allocator model (reserved.py); out of memory
        when it cannot be served within `budget`, then what it would reserve without one."""
        static = static_storages(self.run.model, self.run.optimizer)
        allocator = self.spec.recipe.allocator
        if budget is not None:
            bounded = replay_step(static, events, allocator_config(allocator,
                                                                   budget.budget_bytes))
            if not bounded.oom:
                return bounded
        unbounded = replay_step(static, events, allocator_config(allocator))
        return replace(unbounded, oom=budget is not None)


def _saved_events(events: list[MemoryEvent], forwards) -> dict[int, str]:
    """The index of each event that allocated a tensor still saved at the end of its forward
    (every micro-batch's, each within its own forward), with the saving module."""
    times = [e.t for e in events]  # in order
    saved: dict[int, str] = {}
    for start, end, keys in forwards:
        last: dict[int, int] = {}
        for i in range(bisect.bisect_left(times, start), bisect.bisect_right(times, end)):
            if events[i].nbytes > 0:
                last[events[i].key] = i
        saved.update({last[key]: owner for key, owner in keys.items() if key in last})
    return saved


def simulate_method(spec: RunSpec, method: str, gpu: GpuSpec | None = None,
                    budget=None) -> MethodResult:
    """Simulate one step of `method` at spec's batch and seq (see Simulator.step)."""
    return Simulator(spec, method).step(spec.seq, spec.batch, gpu, budget)
