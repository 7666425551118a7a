"""Simulate a training step of one method on the meta device: exact bytes, every op, no time.

The model is built on the meta device with random-free (shape-only) weights and prepared exactly
as a measured run prepares it. One step runs first without instruments so that AdamW creates
its state; the next runs under OpRecorder, a TorchDispatchMode that sees every aten op with its
module (ModuleScopes), phase, shapes, dtype, FLOPs (torch.utils.flop_counter) and bytes moved,
and tracks storage lifetimes by weak reference, so that the memory timeline, its peak and the
peak's breakdown come out as on a real device's allocator, without its block rounding and
without kernels' internal workspaces.

Limits: no time (see engines/project.py); CUDA caching-allocator fragmentation and reserved
memory are not modelled (the planner adds an explicit headroom instead); CPU-only kernels'
internal scratch buffers are invisible to a dispatch mode.
"""

from __future__ import annotations

import json
import weakref
from dataclasses import dataclass, field

import pandas as pd
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

from paca_prof import methods as method_registry
from paca_prof.engines import project
from paca_prof.engines.common import (
    RunSpec,
    ancestors,
    build_prepared,
    layer_table,
    module_kinds,
    training_step,
)
from paca_prof.instrument import (
    LOSS,
    MemoryEvent,
    ModuleScopes,
    SavedTensorLedger,
    counts_as_op,
    memory_timeline,
    static_bytes,
    storage_key,
)
from paca_prof.gpus import GpuSpec
from paca_prof.results import MethodResult, summary_row


@dataclass
class OpRecorder(TorchDispatchMode):
    """Records each op (instrument.counts_as_op) and each storage allocation and free.

    Ops are numbered in issue order; memory events carry the op index as their time.
    Storages that exist before the mode starts (weights, optimizer state) are not tracked.
    """

    scopes: ModuleScopes
    method: str
    wrappers: set[str]
    ops: list[dict] = field(default_factory=list)
    events: list[MemoryEvent] = field(default_factory=list)
    _live: dict[int, weakref.ref] = field(default_factory=dict)
    _tick: int = 0

    def __post_init__(self):
        super().__init__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func._schema.name
        phase = self.scopes.phase
        module = self.scopes.current
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        inputs = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        input_storages = {storage_key(t) for t in inputs}
        for tensor in outputs:  # an output sharing an input's storage is a view or in place
            if storage_key(tensor) not in input_storages:
                self._track(tensor, phase, module)
        if counts_as_op(name):
            self.ops.append({
                "method": self.method, "module": module, "phase": phase, "name": name,
                "shapes": json.dumps([list(t.shape) for t in inputs]),
                "dtype": str(inputs[0].dtype).removeprefix("torch.") if inputs else "",
                "flops": _flops(func, args, kwargs, out),
                "bytes": float(sum(_nbytes(t) for t in inputs + outputs)),
                "adapter_branch": method_registry.is_adapter_op(
                    self.method, module, name, phase, self.wrappers),
                "device": "meta", "seq_no": len(self.ops), "step": 0,
            })
        self._tick += 1
        return out

    def _track(self, tensor: torch.Tensor, phase: str, module: str) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self._live:
            return
        nbytes = storage.nbytes()
        self._live[key] = weakref.ref(storage, lambda _, key=key, n=nbytes: self._free(key, n))
        self.events.append(MemoryEvent(
            t=float(self._tick), key=key, nbytes=nbytes, phase=phase,
            logits_scope=module == LOSS or module.endswith("lm_head")))

    def _free(self, key: int, nbytes: int) -> None:
        if self._live.pop(key, None) is not None:
            self.events.append(MemoryEvent(t=float(self._tick), key=key, nbytes=-nbytes,
                                           phase=self.scopes.phase))


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _flops(func, args, kwargs, out) -> float:
    counter = flop_registry.get(func._overloadpacket)
    if counter is None:
        return 0.0
    try:
        return float(counter(*args, **kwargs, out_val=out))
    except (TypeError, ValueError, RuntimeError):
        return 0.0


class Simulator:
    """One method's model, built and prepared once on the meta device, stepped at any shape.

    Building and preparing (PEFT's injection above all) costs more than a simulated step, so
    callers that probe many shapes (the capacity planner) keep one Simulator per method.
    """

    def __init__(self, spec: RunSpec, method: str):
        self.spec, self.method = spec, method
        self.model, self.optimizer = build_prepared(spec, method, "meta")
        if self.optimizer is not None:  # let AdamW create its state, as after any first step
            for param in method_registry.trainable_parameters(self.model):
                param.grad = torch.empty_like(param)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.trainable = sum(p.numel() for p in method_registry.trainable_parameters(self.model))
        self.wrappers = method_registry.wrapper_paths(self.model, method)

    def step(self, seq: int, batch: int, gpu: GpuSpec | None = None) -> MethodResult:
        """Simulate one training step on a batch x seq input. With `gpu`, times are projected
        onto it (engines/project.py) and a peak above its memory gives status oom; without,
        every time column is NaN."""
        model, optimizer = self.model, self.optimizer
        ids = torch.zeros((batch, seq), dtype=torch.long, device="meta")
        static = static_bytes(model, optimizer)
        grad_keys: set[int] = set()

        class GradWatch:
            """At the optimizer phase, backward is over: note which storages are gradients."""

            def __init__(self, name):
                self.name = name

            def __enter__(self):
                if self.name == "optimizer":
                    grad_keys.update(storage_key(p.grad) for p in model.parameters()
                                     if p.grad is not None)

            def __exit__(self, *exc):
                pass

        with ModuleScopes(model) as scopes, SavedTensorLedger(scopes) as ledger:
            recorder = OpRecorder(scopes, self.method, self.wrappers)
            with recorder:
                training_step(model, optimizer, ids, scopes, GradWatch)
        rows, peak, breakdown = memory_timeline(recorder.events, static, ledger.keys, grad_keys)
        ops = pd.DataFrame(recorder.ops)
        latencies, times = {}, {}
        if gpu is not None:
            ops = project.project_ops(ops, gpu)
            latencies = project.module_latencies_ms(ops, ancestors)
            times = project.phase_times_ms(ops)
        layers = layer_table(self.method, module_kinds(model), latencies, ops, ledger.by_module)
        fits = gpu is None or peak <= gpu.memory_bytes
        summary = summary_row(
            self.method, "ok" if fits else "oom", times_ms=times, peak_breakdown=breakdown,
            n_kernels=len(ops), activation_bytes=ledger.total_bytes,
            trainable_params=self.trainable)
        return MethodResult(summary, layers, ops, pd.DataFrame(rows).assign(method=self.method))


def simulate_method(spec: RunSpec, method: str, gpu: GpuSpec | None = None) -> MethodResult:
    """Simulate one step of `method` at spec's batch and seq (see Simulator.step)."""
    return Simulator(spec, method).step(spec.seq, spec.batch, gpu)
