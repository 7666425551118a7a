"""Simulate a training step of one method on the meta device: exact bytes, every op, no time.

The model is built on the meta device (shapes only) and prepared exactly as a measured run
prepares it. One step runs first without instruments so that the optimizer creates its state;
the next runs in a Capture session under OpRecorder, a TorchDispatchMode that sees every aten op
with its module, phase and step, shapes, dtype, FLOPs (flops.py) and bytes moved, and tracks
storage lifetimes by weak reference, so that the memory timeline, its peak and the peak's
breakdown come out as on a real device's allocator, without its block rounding and without
kernels' internal workspaces. The step's allocations are then replayed through the model of
PyTorch's caching allocator (reserved.py) for its reserved memory and rounded peak.

Mixture-of-experts layers run as transformers runs them by default (its grouped_mm experts
implementation): one grouped matmul over every token's top-k rows, whose sizes do not depend on
the routing, so none is needed (meta tensors have no values to route by; meta_grouped_mm gives
the grouped matmul's output in any dtype). Its eager per-expert loop reads the routing
(torch.nonzero) and cannot run on meta.

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
from paca_prof.engines import comm, fsdp_sim, project
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
        out = meta_grouped_mm(func, args, kwargs)
        if out is None:
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
                "bytes": float(sum(_nbytes(t) for t in inputs + outputs)),
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


_GROUPED_MM = torch.ops.aten._grouped_mm.default


def meta_grouped_mm(func, args, kwargs):
    """The output of a grouped matmul (mixture-of-experts layers, transformers' grouped_mm
    experts) on meta tensors of another dtype than bf16, or None for any other op.

    torch's meta kernel of aten::_grouped_mm copies the CUDA fast path's checks and refuses
    all but bf16; on CUDA (torch >= 2.10) and on the CPU the op runs in fp32 and fp16 too
    (CUDA loops over the groups with mm_out, the CPU kernel likewise), into one output of the
    same shape. So the shape comes from the meta kernel on bf16 stand-ins and the output takes
    the inputs' dtype (or out_dtype): exact bytes; no value is read (the offsets have none)."""
    if func is not _GROUPED_MM:
        return None
    mat_a, mat_b = args[0], args[1]
    if not mat_a.is_meta or (mat_a.dtype == mat_b.dtype == torch.bfloat16):
        return None
    dtype = kwargs.get("out_dtype") or (args[4] if len(args) > 4 and args[4] is not None
                                       else mat_a.dtype)
    stand_ins = [a.to(torch.bfloat16) if isinstance(a, torch.Tensor) and a.is_floating_point()
                 else a for a in args]
    kwargs = {k: (v.to(torch.bfloat16) if isinstance(v, torch.Tensor) and v.is_floating_point()
                  else v) for k, v in kwargs.items() if k != "out_dtype"}
    return func(*stand_ins[:4], **kwargs).to(dtype)


class MetaScalars(TorchDispatchMode):
    """Only the .item() and grouped-matmul rules of OpRecorder, for steps run outside it (the
    optimizer's first step, which makes its state)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _LOCAL_SCALAR and args[0].is_meta:
            return meta_scalar(args[0])
        out = meta_grouped_mm(func, args, kwargs)
        return func(*args, **kwargs) if out is None else out


def _phase_or_none(phase: str) -> str | None:
    return None if phase == "idle" else phase


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class Simulator:
    """One method's model, built and prepared once on the meta device, stepped at any shape.

    Building and preparing (PEFT's injection above all) costs more than a simulated step, so
    callers that probe many shapes (the capacity planner) keep one Simulator per method.
    """

    def __init__(self, spec: RunSpec, method: str, rank: int = 0):
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
        self.rank = rank
        if spec.distributed.fsdp:  # FSDP2's groups, and what a trainable parameter's shard is
            self.groups = fsdp_sim.groups_of(self.run.model)
            names = {id(m): n for n, m in self.run.model.named_modules()}
            from paca_prof.engines.fsdp import decoder_layers

            self.layer_modules = [(names[id(m)], m) for m in decoder_layers(self.run.model)]
            world = spec.distributed.world_size
            self.trainable_shard_sizes = {}
            for p in methods.registry.trainable_parameters(self.run.model):
                full, _, held = fsdp_sim._shape_bytes(p, world, rank)
                self.trainable_shard_sizes.setdefault(full, held)

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

        fsdp = self.spec.distributed.fsdp
        schedule, grad_keys = fsdp_sim.Schedule(), {}
        phase_ticks: dict[str, int] = {}

        def schedule_phase_start(phase):
            phase_ticks[phase] = recorder.tick

        def schedule_phase_end(phase):
            schedule.phases.append((phase, phase_ticks.pop(phase, recorder.tick),
                                    recorder.tick))
            if phase == "backward":  # each unsharded gradient, by its FSDP2 group
                for index, group in enumerate(self.groups):
                    for p in group.params:
                        if p.grad is not None:
                            grad_keys[storage_key(p.grad)] = index

        with run.capture() as capture, SavedTensorLedger(capture) as ledger:
            capture.on_phase(start=phase_start, end=phase_end)
            recorder = OpRecorder(capture, self.method, self.wrappers, self.spec.settings.r)
            hooks = []
            if fsdp:
                capture.on_phase(start=schedule_phase_start, end=schedule_phase_end)
                capture.on_scope(
                    lambda path, phase: schedule.add(f"{phase}_enter", path, recorder.tick),
                    lambda path, phase: schedule.add(f"{phase}_exit", path, recorder.tick))
                hooks = [m.register_forward_pre_hook(_inputs_hook(schedule, path),
                                                     with_kwargs=True)
                         for path, m in self.layer_modules]
            try:
                with recorder:
                    run.step(ids)
            finally:
                for hook in hooks:
                    hook.remove()
            paths = capture.paths
        events, static_storage_list = recorder.events, None
        if fsdp:
            static, static_storage_list = fsdp_sim.sharded_static(
                run.model, run.optimizer, self.spec.distributed, self.rank)
            events, gradients = fsdp_sim.rewrite(
                events, gradients, schedule, self.groups, grad_keys, self.spec.distributed,
                self.rank, self.spec.distributed.backend, self.trainable_shard_sizes)
        timeline = memory_timeline(events, static, {}, gradients,
                                   saved_events=_saved_events(events, forwards))
        ops = pd.DataFrame(recorder.ops)
        latencies, times, all_ops = {}, {}, ops
        if gpu is not None:
            ops = project.project_ops(ops, gpu)
            all_ops = ops
            if fsdp:  # the collectives on their stream, the kernels that wait for them
                all_ops = comm.project_with_comm(
                    ops, gpu, self.spec.distributed,
                    fsdp_sim.message_bytes(self.groups, self.spec.distributed.world_size))
                ops = all_ops[all_ops["device"] != comm.COMM_DEVICE]
            latencies = project.module_latencies_ms(ops, ancestors)
            times = project.phase_times_ms(all_ops)
        layers = layer_table(self.method.name, module_kinds(paths), latencies, ops,
                             ledger.by_module, container_paths(paths))
        reserved = self._reserved(events, budget, static_storage_list)
        paged = paged_bytes(run.optimizer)
        summary = summary_row(
            self.method.name, "oom" if reserved.oom else "ok", times_ms=times,
            peak_breakdown=timeline.breakdown, n_kernels=len(ops),
            activation_bytes=ledger.total_bytes, trainable_params=self.trainable,
            allocator_peak_bytes=reserved.allocated_bytes,
            reserved_bytes=reserved.reserved_bytes,
            **({"paged_bytes": paged} if paged else {}))
        memory = pd.DataFrame(timeline.rows).assign(method=self.method.name)
        return MethodResult(summary, layers, all_ops, memory, memory_events=events,
                            start_bytes=static)


    def _reserved(self, events: list[MemoryEvent], budget, static=None) -> ReservedMemory:
        """The step replayed through the caching-allocator model (reserved.py); out of memory
        when it cannot be served within `budget`, then what it would reserve without one.
        `static`: the storages alive before the step (default: the model's and optimizer's)."""
        if static is None:
            static = static_storages(self.run.model, self.run.optimizer)
        allocator = self.spec.recipe.allocator
        if budget is not None:
            bounded = replay_step(static, events, allocator_config(allocator,
                                                                   budget.budget_bytes))
            if not bounded.oom:
                return bounded
        unbounded = replay_step(static, events, allocator_config(allocator))
        return replace(unbounded, oom=budget is not None)


def _inputs_hook(schedule, path: str):
    """A forward pre-hook recording whether a layer's inputs need a gradient (FSDP2's
    post-backward hook then fires at the layer's end of backward, else at the end of the
    backward pass)."""
    def hook(module, args, kwargs):
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        schedule.inputs_need_grad.setdefault(path, any(t.requires_grad for t in tensors))

    return hook


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
