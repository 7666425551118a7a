"""Instruments for one training step: module scopes, saved-tensor accounting, and module kinds.

ModuleScopes is the one place that knows which module and phase is running. It hooks every
module's forward (pre/post) and, through gradient hooks on its outputs and inputs, its backward
(first output gradient in, all input gradients out), the way
torch.distributed._tools.ModTracker does, but names modules by their full path and forms no
reference cycles. Consumers subscribe with `on_enter` / `on_exit`.

SavedTensorLedger uses torch.autograd.graph.saved_tensors_hooks to charge every tensor saved for
backward to the innermost module running, once per storage, parameters and buffers excluded.
Both work on real devices and on the meta device.
"""

from __future__ import annotations

import gc
import weakref
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks

from paca_prof.trace import MEMORY_CATEGORIES

ROOT = "[root]"  # path of the model itself (named_modules calls it "")
LOSS = "[loss]"  # the loss, computed outside the model
OPTIMIZER = "[optimizer]"  # the optimizer step

ScopeCallback = Callable[[str, str], None]  # (module path, phase)


class ModuleScopes:
    """Calls subscribers when a module's forward or backward starts and ends.

    Limits: a module whose inputs need no gradient (the first layer under an adapter method)
    ends its backward when its trainable parameters have their gradients; one with neither
    (a frozen base layer there) has no backward scope. Backward scopes of modules on parallel
    branches may overlap rather than nest.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.paths = {module: (name or ROOT) for name, module in model.named_modules()}
        self.stack: list[str] = []  # open scopes, innermost last
        self.phase = "idle"
        self._enter: list[ScopeCallback] = []
        self._exit: list[ScopeCallback] = []
        self._handles = []
        self._param_hooks = set()
        self._call_inputs: list[set[int]] = []  # ids of grad inputs of the calls in progress
        self._phase_end: list[Callable[[str], None]] = []

    def on_enter(self, callback: ScopeCallback) -> None:
        self._enter.append(callback)

    def on_exit(self, callback: ScopeCallback) -> None:
        self._exit.append(callback)

    @property
    def current(self) -> str:
        return self.stack[-1] if self.stack else ROOT

    def __enter__(self) -> ModuleScopes:
        # Without cyclic garbage collection during the step, every tensor dies by reference
        # count, at the same moment in every run, as it does in a plain training step (the
        # hooks below form no reference cycles). A collection in the middle of a step would
        # also run weak-reference callbacks on storages at arbitrary points.
        self._gc_was_enabled = gc.isenabled()
        gc.disable()
        for module, path in self.paths.items():
            # with_kwargs: transformers passes tensors by keyword (self_attn(hidden_states=...))
            self._handles.append(
                module.register_forward_pre_hook(self._make_pre(path), with_kwargs=True))
            self._handles.append(module.register_forward_hook(
                self._make_post(path), with_kwargs=True, always_call=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._gc_was_enabled:
            gc.enable()

    def enter(self, path: str, phase: str) -> None:
        """A scope starts: it becomes the innermost (also used for the loss and optimizer)."""
        self.stack.append(path)
        for callback in self._enter:
            callback(path, phase)

    def exit(self, path: str, phase: str) -> None:
        for callback in self._exit:
            callback(path, phase)
        for i in range(len(self.stack) - 1, -1, -1):  # backward scopes may end out of order
            if self.stack[i] == path:
                del self.stack[i]
                break

    def _make_pre(self, path: str):
        def pre_hook(module, args, kwargs):
            phase = "backward" if self.phase == "backward" else "forward"  # recompute in bwd
            self.enter(path, phase)
            if phase == "forward" and torch.is_grad_enabled():
                # The module's backward is over when all its input grads are computed or, if
                # no input needs one, when all its trainable parameters have their grads.
                inputs = _grad_tensors((args, kwargs))
                self._call_inputs.append({id(t) for t in inputs})
                if inputs:
                    when_all_grads(inputs, lambda: self.exit(path, "backward"))
                else:
                    params = [p for p in module.parameters() if p.requires_grad]
                    if params:
                        self._watch_parameters(path, params)

        return pre_hook

    def _watch_parameters(self, path: str, params: list[torch.Tensor]) -> None:
        # Hooks on parameters outlive the graph, so each removes itself once it fired, and
        # end_phase() removes those that never fire (parameters that got no gradient).
        handles = []

        def done():
            self.exit(path, "backward")
            for handle in handles:
                handle.remove()
                self._param_hooks.discard(handle)

        handles.extend(when_all_grads(params, done))
        self._param_hooks.update(handles)

    def on_phase_end(self, callback: Callable[[str], None]) -> None:
        self._phase_end.append(callback)

    def end_phase(self, phase: str) -> None:
        """Called when a step phase ends: forgets backward scopes that will not close, and
        tells the subscribers."""
        if phase == "backward":
            for handle in self._param_hooks:
                handle.remove()
            self._param_hooks.clear()
            self.stack.clear()
        for callback in self._phase_end:
            callback(phase)

    def _make_post(self, path: str):
        def post_hook(module, args, kwargs, output):
            phase = "backward" if self.phase == "backward" else "forward"
            self.exit(path, phase)
            if phase == "forward" and torch.is_grad_enabled():
                # An output that is one of the inputs (nn.Identity, LoRA's dropout at p=0) has
                # its grad computed by someone else: it must not open this module's backward.
                inputs = self._call_inputs.pop() if self._call_inputs else set()
                outputs = [t for t in _grad_tensors(output) if id(t) not in inputs]
                if outputs:  # first output grad arrived: the module's backward starts
                    when_any_grad(outputs, lambda: self.enter(path, "backward"))

        return post_hook


def when_all_grads(tensors: list[torch.Tensor], fn: Callable[[], None]) -> list:
    """Call fn once the gradients of all `tensors` have been computed; returns the handles.

    Unlike register_multi_grad_hook(mode="all"), whose hooks hold the tensors' grad_fn nodes
    and so form reference cycles that keep a graph and its saved tensors alive until the
    garbage collector runs, these hooks hold only a counter. Limit: a tensor whose gradient is
    never computed keeps fn from being called.
    """
    remaining = [len(tensors)]

    def count(grad):
        remaining[0] -= 1
        if remaining[0] == 0:
            fn()

    return [t.register_hook(count) for t in tensors]


def when_any_grad(tensors: list[torch.Tensor], fn: Callable[[], None]) -> None:
    """Call fn once, when the first gradient of any of `tensors` has been computed (a light
    register_multi_grad_hook(mode="any") for tensors of one graph)."""
    fired = [False]

    def first(grad):
        if not fired[0]:
            fired[0] = True
            fn()

    for tensor in tensors:
        tensor.register_hook(first)


def _grad_tensors(value) -> list[torch.Tensor]:
    """The tensors that require grad in a module's inputs or outputs (tensors, tuples, lists,
    dicts and transformers' ModelOutput, which is a dict). A plain walk: torch's pytree is
    several times slower, and this runs twice per module call."""
    found: list[torch.Tensor] = []
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            if item.requires_grad:
                found.append(item)
        elif isinstance(item, tuple | list):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
    return found


def storage_key(tensor: torch.Tensor) -> int:
    """Identity of a tensor's storage that works on every device, meta included."""
    return tensor.untyped_storage()._cdata


@dataclass
class _Saved:
    path: str
    nbytes: int
    ptr: int | None
    refs: list[weakref.ref]

    def alive(self) -> bool:
        return any(ref() is not None for ref in self.refs)


class SavedTensorLedger:
    """Bytes saved for backward, charged to the innermost module running when saved.

    Counts what is still saved when forward ends: each storage once (views and repeated saves
    of one tensor cost nothing more), parameters and buffers excluded, and tensors saved by a
    graph that was dropped during forward (a result that was discarded, as DoRA's weight-norm
    branch) excluded. The pack hook returns the tensor itself, so a weak reference to it lives
    exactly as long as the saved entry. Results (`by_module`: path -> bytes, `keys`: storage
    key -> path, `ptr_owner`: data pointer -> path) are fixed when the forward phase ends.
    """

    def __init__(self, scopes: ModuleScopes):
        self.scopes = scopes
        model = scopes.model
        self.excluded = {storage_key(t) for t in model.parameters()}
        self.excluded |= {storage_key(t) for t in model.buffers()}
        self.by_module: dict[str, int] = defaultdict(int)
        self.keys: dict[int, str] = {}
        self.ptr_owner: dict[int, str] = {}
        self._saved: dict[int, _Saved] = {}
        self._hooks = saved_tensors_hooks(self._pack, lambda tensor: tensor)
        scopes.on_phase_end(self._phase_end)

    def __enter__(self) -> SavedTensorLedger:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    @property
    def total_bytes(self) -> int:
        return sum(self.by_module.values())

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.scopes.phase != "forward":
            return tensor  # recompute under gradient checkpointing re-saves what forward dropped
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self.excluded:
            return tensor
        entry = self._saved.get(key)
        if entry is not None and entry.alive():
            entry.refs.append(weakref.ref(tensor))
            return tensor
        # a new storage, or a dead one's key reused by a new storage
        ptr = storage.data_ptr() if tensor.device.type != "meta" else None
        self._saved[key] = _Saved(self.scopes.current, storage.nbytes(), ptr, [weakref.ref(tensor)])
        return tensor

    def _phase_end(self, phase: str) -> None:
        if phase != "forward":
            return
        for key, entry in self._saved.items():
            if entry.alive():
                self.by_module[entry.path] += entry.nbytes
                self.keys[key] = entry.path
                if entry.ptr is not None:
                    self.ptr_owner[entry.ptr] = entry.path
        self._saved.clear()


def module_kind(module: nn.Module, path: str) -> str:
    """A coarse kind for grouping: decoder_layer, attention, mlp, linear, adapter, embedding,
    norm, head, rotary, model, container, loss, optimizer, or other."""
    if path in (LOSS, OPTIMIZER):
        return path.strip("[]")
    leaf = path.rsplit(".", 1)[-1]
    name = type(module).__name__.lower()
    parts = path.split(".")
    if any(p.startswith("lora_") for p in parts) or "dora" in name:
        return "adapter"
    if path == ROOT or name.endswith("model") or name.endswith("forcausallm"):
        return "model"
    if isinstance(module, nn.ModuleList | nn.ModuleDict):
        return "container"
    if "decoderlayer" in name:
        return "decoder_layer"
    if "attention" in name:
        return "attention"
    if "mlp" in name:
        return "mlp"
    if "embedding" in name and "rotary" not in name:
        return "embedding"
    if "rotary" in name:
        return "rotary"
    if "norm" in name:
        return "norm"
    if leaf == "lm_head":
        return "head"
    if isinstance(module, nn.Linear) or "linear" in name:
        return "linear"
    return "other"


def module_depth(path: str) -> int:
    """0 for the root, loss and optimizer; the number of path components otherwise."""
    return 0 if path.startswith("[") else len(path.split("."))


# Ops that launch no kernel although their schema does not mark them as views.
_NO_KERNEL_OPS = {
    "aten::_unsafe_view", "aten::empty", "aten::empty_strided", "aten::empty_like",
    "aten::new_empty", "aten::new_empty_strided", "aten::resize_", "aten::lift_fresh",
    "aten::set_", "aten::resolve_conj", "aten::resolve_neg", "aten::result_type",
    "aten::_reshape_alias", "aten::is_nonzero", "aten::item", "aten::_local_scalar_dense",
    "aten::size", "aten::stride", "aten::detach_",
}
_OP_CACHE: dict[str, bool] = {}


def counts_as_op(name: str) -> bool:
    """Whether an aten op, by its profiler name (e.g. "aten::addmm"), counts as an op.

    An op is an aten op with a kernel of its own: not a view (an aliasing, non-writing return in
    its schema), not a composite that only calls other ops (CompositeImplicitAutograd, e.g.
    aten::linear, which calls aten::addmm), and not an allocation without a kernel. Only the
    outermost such op of a call counts, which is what a TorchDispatchMode sees, so measured and
    simulated runs count ops alike.
    """
    if name in _NO_KERNEL_OPS or "::" not in name:
        return False
    if name not in _OP_CACHE:
        _OP_CACHE[name] = _has_own_kernel(name)
    return _OP_CACHE[name]


def _has_own_kernel(name: str) -> bool:
    namespace, _, op = name.partition("::")
    try:
        packet = getattr(getattr(torch.ops, namespace), op)
    except (AttributeError, RuntimeError):
        return True  # an op torch does not know by name (a custom extension): count it
    overloads = packet.overloads()
    for overload in ["default", "Tensor", "int", "dtype", "self", "input", *overloads]:
        if overload not in overloads:
            continue
        qualified = name if overload == "default" else f"{name}.{overload}"
        try:
            schema = getattr(packet, overload)._schema
            composite = torch._C._dispatch_has_kernel_for_dispatch_key(
                qualified, "CompositeImplicitAutograd")
        except RuntimeError:
            continue
        is_view = any(r.alias_info is not None and not r.alias_info.is_write
                      for r in schema.returns)
        return not (is_view or composite)
    return True


def matmul_flops(name: str, shapes: list[list[int]]) -> float:
    """FLOPs of the matrix-multiply ops from their input shapes (2*M*N*K); 0 for other ops.

    Limits: covers mm, addmm, bmm, baddbmm (the ops linear layers and attention lower to on
    CPU and CUDA); attention kernels and element-wise ops count 0 here."""
    try:
        if name in ("aten::mm",):
            (m, k), (_, n) = shapes[0], shapes[1]
            return 2.0 * m * n * k
        if name == "aten::addmm":
            (m, k), (_, n) = shapes[1], shapes[2]
            return 2.0 * m * n * k
        if name == "aten::bmm":
            (b, m, k), (_, _, n) = shapes[0], shapes[1]
            return 2.0 * b * m * n * k
        if name == "aten::baddbmm":
            (b, m, k), (_, _, n) = shapes[1], shapes[2]
            return 2.0 * b * m * n * k
    except (IndexError, TypeError, ValueError):
        return 0.0
    return 0.0


@dataclass
class MemoryEvent:
    """One allocation (nbytes > 0) or free (nbytes < 0) of a storage identified by `key`
    (an address when measured, a storage key when simulated), at time t, in a phase.
    `logits_scope` is True for allocations made inside lm_head or the loss."""

    t: float
    key: int
    nbytes: int
    phase: str | None
    logits_scope: bool = False


def memory_timeline(events: list[MemoryEvent], static: dict[str, int], saved_owner: dict[int, str],
                    grad_keys: set[int]) -> tuple[list[dict], int, dict[str, int]]:
    """Replay allocation events into running totals per memory category.

    `static` holds the bytes alive when the step starts, by category. An allocation is an
    activation if a saved tensor lives at its key (the last allocation there during forward:
    saved tensors stay alive until backward), a gradient likewise for the gradients alive
    after backward. Saved tensors of lm_head and the loss, and whatever those two allocate,
    are logits_loss. Everything else is rest (temporaries, optimizer scratch).
    Returns (rows of t, category, allocated_bytes, and the event's phase and logits_scope), the
    peak total, and the breakdown at it.
    """
    last_alloc: dict[tuple[int, str | None], int] = {}
    for i, e in enumerate(events):
        if e.nbytes > 0:
            last_alloc[(e.key, e.phase)] = i
    category_of: dict[int, str] = {}
    for key, owner in saved_owner.items():
        index = last_alloc.get((key, "forward"))
        if index is not None:
            category_of[index] = "logits_loss" if _is_logits_owner(owner) else "activations"
    for key in grad_keys:
        index = last_alloc.get((key, "backward"))
        if index is not None:
            category_of[index] = "gradients"

    totals = {c: static.get(c, 0) for c in MEMORY_CATEGORIES}
    rows = [{"t": 0.0, "category": c, "allocated_bytes": b, "phase": None,
             "logits_scope": False} for c, b in totals.items()]
    live: dict[int, str] = {}
    peak, breakdown = sum(totals.values()), dict(totals)
    for i, e in enumerate(events):
        if e.nbytes > 0:
            category = category_of.get(i, "logits_loss" if e.logits_scope else "rest")
            live[e.key] = category
        else:
            category = live.pop(e.key, "rest")
        totals[category] += e.nbytes
        rows.append({"t": e.t, "category": category, "allocated_bytes": totals[category],
                     "phase": e.phase, "logits_scope": e.logits_scope})
        total = sum(totals.values())
        if total > peak:
            peak, breakdown = total, dict(totals)
    return rows, peak, breakdown


def _is_logits_owner(path: str) -> bool:
    return path == LOSS or path.endswith("lm_head")


def static_bytes(model, optimizer) -> dict[str, int]:
    """Bytes alive before the step starts: frozen weights and buffers, trainable parameters,
    and optimizer state (gradients are None after zero_grad(set_to_none=True))."""
    seen: set[int] = set()

    def size(tensor) -> int:
        key = storage_key(tensor)
        if key in seen:
            return 0
        seen.add(key)
        return tensor.untyped_storage().nbytes()

    static = {c: 0 for c in MEMORY_CATEGORIES}
    for p in model.parameters():
        static["trainable" if p.requires_grad else "weights"] += size(p)
    for b in model.buffers():
        static["weights"] += size(b)
    if optimizer is not None:
        for state in optimizer.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    static["optimizer"] += size(value)
    return static
