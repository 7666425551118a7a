"""Instruments for one training step: module scopes, saved-tensor accounting, and module kinds.

ModuleScopes is the one place that knows which module and phase is running. It hooks every
module's forward (pre/post) and, through autograd multi-grad hooks, its backward (first output
gradient in, all input gradients out), the way torch.distributed._tools.ModTracker does, but
names modules by their full path. Consumers subscribe with `on_enter` / `on_exit`.

SavedTensorLedger uses torch.autograd.graph.saved_tensors_hooks to charge every tensor saved for
backward to the innermost module running, once per storage, parameters and buffers excluded.
Both work on real devices and on the meta device.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.autograd.graph import register_multi_grad_hook, saved_tensors_hooks
from torch.utils._pytree import tree_flatten

ROOT = "[root]"  # path of the model itself (named_modules calls it "")
LOSS = "[loss]"  # the loss, computed outside the model
OPTIMIZER = "[optimizer]"  # the optimizer step

ScopeCallback = Callable[[str, str], None]  # (module path, phase)


class ModuleScopes:
    """Calls subscribers when a module's forward or backward starts and ends.

    Limits: backward of a module whose inputs need no gradient (the embedding, the first
    layer under some methods) has no end event; its backward scope is never reported. Backward
    scopes of modules on parallel branches may overlap rather than nest.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.paths = {module: (name or ROOT) for name, module in model.named_modules()}
        self.stack: list[str] = []  # forward scopes, innermost last
        self.phase = "idle"
        self._enter: list[ScopeCallback] = []
        self._exit: list[ScopeCallback] = []
        self._handles = []

    def on_enter(self, callback: ScopeCallback) -> None:
        self._enter.append(callback)

    def on_exit(self, callback: ScopeCallback) -> None:
        self._exit.append(callback)

    @property
    def current(self) -> str:
        return self.stack[-1] if self.stack else ROOT

    def __enter__(self) -> ModuleScopes:
        for module, path in self.paths.items():
            self._handles.append(module.register_forward_pre_hook(self._make_pre(path)))
            self._handles.append(
                module.register_forward_hook(self._make_post(path), always_call=True)
            )
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def enter(self, path: str, phase: str) -> None:
        for callback in self._enter:
            callback(path, phase)

    def exit(self, path: str, phase: str) -> None:
        for callback in self._exit:
            callback(path, phase)

    def _make_pre(self, path: str):
        def pre_hook(module, args):
            phase = "backward" if self.phase == "backward" else "forward"  # recompute in bwd
            self.stack.append(path)
            self.enter(path, phase)
            if phase == "forward" and torch.is_grad_enabled():
                inputs = _grad_tensors(args)
                if inputs:  # all input grads computed: the module's backward is over
                    register_multi_grad_hook(inputs, lambda grads: self.exit(path, "backward"))

        return pre_hook

    def _make_post(self, path: str):
        def post_hook(module, args, output):
            phase = "backward" if self.phase == "backward" else "forward"
            self.exit(path, phase)
            if self.stack and self.stack[-1] == path:
                self.stack.pop()
            if phase == "forward" and torch.is_grad_enabled():
                outputs = _grad_tensors(output)
                if outputs:  # first output grad arrived: the module's backward starts
                    register_multi_grad_hook(
                        outputs, lambda grad: self.enter(path, "backward"), mode="any"
                    )

        return post_hook


def _grad_tensors(value) -> list[torch.Tensor]:
    leaves, _ = tree_flatten(value)
    return [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]


def storage_key(tensor: torch.Tensor) -> int:
    """Identity of a tensor's storage that works on every device, meta included."""
    return tensor.untyped_storage()._cdata


@dataclass
class SavedTensorLedger:
    """Bytes saved for backward, charged to the innermost module running when saved.

    Each storage is charged once (views and repeated saves of one tensor cost nothing more);
    parameters and buffers are excluded. `by_module` maps path -> bytes; `keys` maps storage
    keys, and `ptr_owner` data pointers, to the owning path, for memory categorisation.
    """

    scopes: ModuleScopes
    excluded: set[int] = field(default_factory=set)
    by_module: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    keys: dict[int, str] = field(default_factory=dict)
    ptr_owner: dict[int, str] = field(default_factory=dict)  # data_ptr -> path (not on meta)

    def __post_init__(self):
        model = self.scopes.model
        self.excluded |= {storage_key(t) for t in model.parameters()}
        self.excluded |= {storage_key(t) for t in model.buffers()}
        self._hooks = saved_tensors_hooks(self._pack, lambda tensor: tensor)

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
        key = storage_key(tensor)
        if key in self.excluded or key in self.keys:
            return tensor
        path = self.scopes.current
        self.keys[key] = path
        if tensor.device.type != "meta":
            self.ptr_owner[tensor.untyped_storage().data_ptr()] = path
        self.by_module[path] += tensor.untyped_storage().nbytes()
        return tensor


def module_kind(module: nn.Module, path: str) -> str:
    """A coarse kind for grouping: decoder_layer, attention, mlp, linear, adapter, embedding,
    norm, head, rotary, model, loss, optimizer, or other."""
    if path in (LOSS, OPTIMIZER):
        return path.strip("[]")
    leaf = path.rsplit(".", 1)[-1]
    name = type(module).__name__.lower()
    parts = path.split(".")
    if any(p.startswith("lora_") for p in parts) or "dora" in name:
        return "adapter"
    if path == ROOT or name.endswith("model") or name.endswith("forcausallm"):
        return "model"
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
