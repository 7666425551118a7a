"""What counts as one op: an aten op with a kernel of its own, as a TorchDispatchMode sees it.

DESIGN.md's definition, in one place for measured runs (the profiler's op events) and simulated
runs (the dispatch mode): not a view, not a composite that only calls other ops, not an
allocation without a kernel; only the outermost such op of a call counts.
"""

from __future__ import annotations

import torch

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
    if name in _NO_KERNEL_OPS or "::" not in name or name.startswith("profiler::"):
        return False  # profiler:: ops are record_function's bookkeeping (optimizer.step's)
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
