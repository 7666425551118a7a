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

from paca_prof import kept_outputs, methods
from paca_prof.capture import Capture
from paca_prof.engines import comm, fsdp_sim, meta_kernels, project
from paca_prof.engines import replicate as replication
from paca_prof.engines.layers import container_paths, layer_table, module_kinds
from paca_prof.engines.step import prepare
from paca_prof.flops import op_flops
from paca_prof.gpus import GpuSpec
from paca_prof.ledger import SavedTensorLedger, storage_key
from paca_prof.memory import (
    MEMORY_CATEGORIES,
    MemoryEvent,
    memory_timeline,
    paged_storages,
    static_storages,
)
from paca_prof.modules import ancestors, is_logits_owner
from paca_prof.ops import counts_as_op
from paca_prof.reserved import ReservedMemory, allocator_config, replay_step
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
    # with a list here, every dispatch, allocation and free is journalled, in order, for depth
    # replication (engines/replicate.py)
    journal: list | None = None
    _live: dict[int, weakref.ref] = field(default_factory=dict)
    tick: int = 0  # ops dispatched so far: the time of memory events

    def __post_init__(self):
        super().__init__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _LOCAL_SCALAR and args[0].is_meta:
            return meta_scalar(args[0])  # no op, no tick: what a device would not dispatch
        out = meta_grouped_mm(func, args, kwargs)
        if out is None:
            out = meta_kernels.call(func, args, kwargs)
        name = func._schema.name
        phase = self.capture.phase
        module = self.capture.current
        outputs = tensors_in(out, [])
        inputs = tensors_in(kwargs, tensors_in(args, []))
        input_keys = [storage_key(t) for t in inputs]
        output_keys = [storage_key(t) for t in outputs]
        input_storages = set(input_keys)
        # an output sharing an input's storage is a view or in place
        made = [(t, key) for t, key in zip(outputs, output_keys) if key not in input_storages]
        counted = counts_as_op(name) and phase != "idle"
        nbytes = (tuple(_nbytes(t) for t in inputs), tuple(_nbytes(t) for t in outputs))
        if self.journal is not None:
            self.journal.append(_dispatch_entry(module, len(self.ops) if counted else -1,
                                                input_keys, made, output_keys, nbytes, out,
                                                args, kwargs))
        for tensor, key in made:
            self._track(tensor, key, phase, module)
        if counted:
            shapes = [list(t.shape) for t in inputs]
            flops = op_flops(func, args, kwargs, out)
            self.ops.append({
                "method": self.method.name, "module": module, "phase": phase, "name": name,
                "shapes": json.dumps(shapes),
                "dtype": str(inputs[0].dtype).removeprefix("torch.") if inputs else "",
                "flops": flops,
                "bytes": float(sum(nbytes[0]) + sum(nbytes[1])
                               + _written_in_place(name, args, out)),
                "adapter_branch": self.method.is_branch_op(
                    module, name, phase, self.wrappers, shapes, self.r),
                "device": "meta", "seq_no": len(self.ops), "step": self.capture.step_index,
                # a GEMM takes transposed operands as they are (BLAS's transpose flags)
                "mixed_layout": not flops and mixed_layout(outputs + inputs),
            })
        self.tick += 1
        return out

    def _track(self, tensor: torch.Tensor, key: int, phase: str, module: str) -> None:
        """Follow a storage the op made (`key`: its storage_key) until it is freed."""
        if key in self._live:
            return
        storage = tensor.untyped_storage()
        nbytes = storage.nbytes()
        self._live[key] = weakref.ref(storage, lambda _, key=key, n=nbytes: self._free(key, n))
        if self.journal is not None:
            self.journal.append(("a", len(self.events), module))
        self.events.append(MemoryEvent(
            t=float(self.tick), key=key, nbytes=nbytes, phase=_phase_or_none(phase),
            logits_scope=is_logits_owner(module)))

    def _free(self, key: int, nbytes: int) -> None:
        if self._live.pop(key, None) is not None:
            if self.journal is not None:
                self.journal.append(("f", len(self.events), self.capture.current))
            self.events.append(MemoryEvent(t=float(self.tick), key=key, nbytes=-nbytes,
                                           phase=_phase_or_none(self.capture.phase)))


def _dispatch_entry(module, op, input_keys, made, output_keys, nbytes, out, args,
                    kwargs) -> tuple:
    """A journal entry of one dispatch: ("d", scope, op index or -1, input storage keys, keys of
    the storages it made (in output order, each once), the keys of each list argument, (bytes
    of each input, of each output), whether the output is a list, each output's storage key)
    (see replicate.py). `made` holds (tensor, storage key) of the outputs it made."""
    made_keys = tuple(dict.fromkeys(key for _, key in made))
    lists = tuple(tuple(storage_key(t) for t in a) for a in (*args, *kwargs.values())
                  if isinstance(a, list | tuple) and a and isinstance(a[0], torch.Tensor))
    return ("d", module, op, tuple(input_keys), made_keys, lists, nbytes,
            isinstance(out, list | tuple), tuple(output_keys))


def tensors_in(value, found: list) -> list:
    """`found` with the tensors in `value` appended, in the order torch's pytree flattens them
    (tree_flatten): lists, tuples (named ones and torch.return_types included) and dicts (in
    their order) walked, anything else a leaf. Aten ops' arguments and outputs hold tensors in
    nothing else; this is the dispatch mode's faster tree_flatten for them."""
    if isinstance(value, torch.Tensor):
        found.append(value)
    elif isinstance(value, list | tuple):
        for item in value:
            if isinstance(item, torch.Tensor):
                found.append(item)
            elif isinstance(item, list | tuple | dict):
                tensors_in(item, found)
    elif isinstance(value, dict):
        for item in value.values():
            tensors_in(item, found)
    return found


def mixed_layout(tensors: list[torch.Tensor]) -> bool:
    """Whether the tensors of an op that have the first one's shape (its output's, outputs
    first) disagree on their innermost dimension (the one of the smallest stride), so that
    the op walks one of them across its strides: DoRA's weight plus its low-rank product read
    transposed, or a 2-D transpose made contiguous. Permutations that keep the innermost
    dimension ([b, s, h, d] read as [b, h, s, d], as attention's heads are) move whole rows and
    are not mixed. Broadcast tensors (a zero stride) and dimensions of size 1 are left out."""
    if all(t.is_contiguous() for t in tensors):
        return False
    shape = tensors[0].shape
    innermost = {_innermost(t) for t in tensors
                 if t.shape == shape and t.numel() > 1 and 0 not in t.stride()}
    return len(innermost) > 1


def _innermost(tensor: torch.Tensor) -> int:
    """The dimension of size > 1 with the smallest stride (the last of them on a tie)."""
    stride = tensor.stride()
    return min((d for d, size in enumerate(tensor.shape) if size > 1),
               key=lambda d: (stride[d], -d))


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
        return meta_kernels.call(func, args, kwargs) if out is None else out


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

    A model of more than replicate.SHALLOW_DEPTH identical decoder layers is simulated at that
    depth and its step replicated to the full depth, exactly (engines/replicate.py); where
    replication is refused (`full_depth_reason` says why), the whole depth is simulated.
    `replicate=False` simulates the whole depth always. Under FSDP2 (spec.distributed.fsdp),
    rank `rank`'s memory is simulated, always at full depth: its step is rewritten with the
    sharded layout (engines/fsdp_sim.py).
    """

    def __init__(self, spec: RunSpec, method: str, replicate: bool = True, rank: int = 0):
        self.spec, self.method, self.rank = spec, methods.get(method), rank
        self.n_layers = spec.config.num_hidden_layers
        if spec.distributed.fsdp:
            replicate = False  # FSDP2's groups and schedule are the whole model's
        self.full_depth_reason = (replication.refusal(spec.config) if replicate
                                  else "replication off")
        self.prefix = None
        if self.full_depth_reason is None:
            self._prepare(replication.at_depth(spec, replication.SHALLOW_DEPTH))
            try:
                self.prefix = replication.layer_prefix(self.run.model.named_modules(),
                                                       replication.SHALLOW_DEPTH)
            except replication.NotReplicable as error:
                self._full_depth(str(error))
        else:
            self._prepare(spec)

    @property
    def depth(self) -> int:
        """The depth this simulator steps a model at (the full depth, or SHALLOW_DEPTH)."""
        return self.n_layers if self.full_depth_reason else replication.SHALLOW_DEPTH

    def _prepare(self, spec: RunSpec) -> None:
        self.run = prepare(spec, self.method.name, "meta")
        optimizer = self.run.optimizer
        if optimizer is not None:  # let the optimizer create its state, as after any first step
            for param in methods.registry.trainable_parameters(self.run.model):
                param.grad = torch.empty_like(param)
            with MetaScalars():
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        self.wrappers = self.method.wrapper_paths(self.run.model)
        if spec.distributed.fsdp:  # FSDP2's groups, and what a trainable parameter's shard is
            from paca_prof.engines.fsdp import decoder_layers

            self.groups = fsdp_sim.groups_of(self.run.model)
            names = {id(m): n for n, m in self.run.model.named_modules()}
            self.layer_modules = [(names[id(m)], m) for m in decoder_layers(self.run.model)]
            self.trainable_shard_sizes = {}
            for p in methods.registry.trainable_parameters(self.run.model):
                full, _, held = fsdp_sim._shape_bytes(p, spec.distributed.world_size, self.rank)
                self.trainable_shard_sizes.setdefault(full, held)

    def _full_depth(self, reason: str) -> None:
        self.full_depth_reason = reason
        self._prepare(self.spec)

    def step(self, seq: int, batch: int, gpu: GpuSpec | None = None,
             budget=None, tables: bool = True) -> MethodResult:
        """Simulate one training step on a batch x seq input. With `gpu`, times are projected
        onto it (engines/project.py); without, every time column is NaN. A peak above
        `budget` (a budget.Budget) gives status oom. The result's `memory_events` are the
        step's events (at full depth, with fresh storage keys where replicated). With
        `tables` False (the planner's steps, which read only the memory) the layers and ops
        tables are left empty, and so are the times: no `gpu` then (ValueError)."""
        if not tables and gpu is not None:
            raise ValueError("a step without its tables has no times to project onto a gpu")
        if self.spec.distributed.fsdp:
            recording, sharding = self._record(seq, batch, journal=False, fsdp=True)
            return self._result(recording, gpu, budget, sharding, tables)
        recording = self.record(seq, batch)
        return self._result(recording, gpu, budget, tables=tables)

    def record(self, seq: int, batch: int) -> replication.Recording:
        """The step's Recording at the model's full depth (replicated where it can be)."""
        rng = torch.get_rng_state()  # a method that draws (PaCA's columns) draws alike again
        while True:
            recording, _ = self._record(seq, batch, journal=not self.full_depth_reason)
            if self.full_depth_reason:
                return recording
            try:
                return replication.replicate(recording, self.prefix, self.n_layers)
            except replication.NotReplicable as error:
                self._full_depth(str(error))
                torch.set_rng_state(rng)

    def _record(self, seq: int, batch: int, journal: bool,
                fsdp: bool = False) -> tuple[replication.Recording, dict | None]:
        """The step as recorded, and with `fsdp` what FSDP2's rewrite needs (its schedule, the
        gradients by group, the forwards)."""
        run = self.run
        # A recording is one step as the first of a run makes it: a previous probe's output
        # (recipe.keep_outputs) goes before it; what a later step carries is added from the
        # recording itself (kept_outputs.py).
        run.kept_output = None
        ids = torch.zeros((batch, seq), dtype=torch.long, device="meta")
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
            recorder = OpRecorder(capture, self.method, self.wrappers, self.spec.settings.r,
                                  journal=[] if journal else None)
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
        names = {id(p): name for name, p in run.model.named_parameters()}
        sharding = (dict(schedule=schedule, grad_keys=grad_keys, forwards=forwards)
                    if fsdp else None)
        return replication.Recording(
            ops=recorder.ops, events=recorder.events,
            saved_events=_saved_events(recorder.events, forwards), gradients=gradients,
            by_module=ledger.by_module, kinds=module_kinds(paths),
            containers=container_paths(paths),
            static=static_storages(run.model, run.optimizer, owners=True),
            trainable=[(name, p.numel()) for name, p in run.model.named_parameters()
                       if p.requires_grad],
            paged=paged_storages(run.optimizer, names), journal=recorder.journal or []), sharding

    def _result(self, rec: replication.Recording, gpu: GpuSpec | None, budget,
                sharding: dict | None = None, tables: bool = True) -> MethodResult:
        events, gradients, saved_events = rec.events, rec.gradients, rec.saved_events
        static_list = [s[:3] for s in rec.static]
        static = {c: 0 for c in MEMORY_CATEGORIES}
        for _, nbytes, category in static_list:
            static[category] += nbytes
        distributed = self.spec.distributed
        if sharding is not None:  # rank `rank`'s step under FSDP2
            static, static_list = fsdp_sim.sharded_static(
                self.run.model, self.run.optimizer, distributed, self.rank)
            events, gradients = fsdp_sim.rewrite(
                events, gradients, sharding["schedule"], self.groups, sharding["grad_keys"],
                distributed, self.rank, distributed.backend, self.trainable_shard_sizes)
            saved_events = _saved_events(events, sharding["forwards"])
        timeline = memory_timeline(events, static, {}, gradients, saved_events=saved_events)
        if self.spec.recipe.keep_outputs:  # a later step: the previous output alive at first
            steady, static, start_keys, saved = kept_outputs.steady_state(
                events, timeline.columns["category"][len(MEMORY_CATEGORIES):], static,
                saved_events)
            timeline = memory_timeline(steady, static, {}, gradients, start_keys, saved)
        ops = pd.DataFrame(rec.ops) if tables else pd.DataFrame()
        latencies, times, all_ops = {}, {}, ops
        if gpu is not None:
            ops = all_ops = project.project_ops(ops, gpu)
            if sharding is not None:  # the collectives on their stream, the kernels waiting
                all_ops = comm.project_with_comm(
                    ops, gpu, distributed,
                    fsdp_sim.message_bytes(self.groups, distributed.world_size))
                ops = all_ops[all_ops["device"] != comm.COMM_DEVICE]
            latencies = project.module_latencies_ms(ops, ancestors)
            times = project.phase_times_ms(all_ops)
        layers = layer_table(self.method.name, rec.kinds, latencies, ops, rec.by_module,
                             rec.containers) if tables else pd.DataFrame()
        reserved = self._reserved(static_list, events, budget)  # carries the output itself
        paged = sum(nbytes for _, nbytes in rec.paged)
        summary = summary_row(
            self.method.name, "oom" if reserved.oom else "ok", times_ms=times,
            peak_breakdown=timeline.breakdown, n_kernels=len(rec.ops),
            activation_bytes=sum(rec.by_module.values()),
            trainable_params=sum(n for _, n in rec.trainable),
            allocator_peak_bytes=reserved.allocated_bytes,
            reserved_bytes=reserved.reserved_bytes,
            **({"paged_bytes": paged} if paged else {}))
        memory = pd.DataFrame(timeline.columns).assign(method=self.method.name)
        return MethodResult(summary, layers, all_ops, memory, memory_events=events,
                            start_bytes=static, segment_cuts=self._segment_cuts(sharding))

    def _segment_cuts(self, sharding: dict | None) -> dict[str, float]:
        """Under FSDP2, the ticks at which the second layer's forward and the first layer's
        backward begin (MethodResult.segment_cuts); none without FSDP2 or two layers."""
        if sharding is None or len(self.layer_modules) < 2:
            return {}
        schedule = sharding["schedule"]
        first, second = self.layer_modules[0][0], self.layer_modules[1][0]
        return {"forward": float(schedule.forward_enter[second][0]),
                "backward": float(schedule.backward_enter[first][0])}

    def _reserved(self, static: list, events: list[MemoryEvent], budget) -> ReservedMemory:
        """The step replayed through the caching-allocator model (reserved.py); out of memory
        when it cannot be served within `budget`, then what it would reserve without one."""
        allocator, kept = self.spec.recipe.allocator, self.spec.recipe.keep_outputs
        if budget is not None:
            bounded = replay_step(static, events, allocator_config(allocator,
                                                                   budget.budget_bytes), kept)
            if not bounded.oom:
                return bounded
        unbounded = replay_step(static, events, allocator_config(allocator), kept)
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
