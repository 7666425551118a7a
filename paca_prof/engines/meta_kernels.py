"""Meta kernels' results remembered by their inputs' metadata, so that a simulation runs each
distinct op once per process.

On the meta device most aten ops run torch's Python meta kernels (torch/_meta_registrations.py
registers torch._refs for them over the C++ ones): about 300 us for an element-wise op and
10-15 ms for a foreach op over a model's parameters, where the op's bookkeeping in the dispatch
mode is a few us. A meta kernel reads nothing but its inputs' metadata (shape, strides, dtype,
device) and its other arguments, so the same inputs give the same output: a decoder layer's ops
repeat in the next layer, a planner's probes repeat the optimizer's, a deeper model repeats a
shallower one's. FakeTensorMode's dispatch cache does the same for fake tensors.

What is remembered, and what is not:
- an op that returns fresh tensors: their shapes, strides and dtypes, rebuilt with
  empty_strided (each a new storage, as the kernel would make). Kept only where the kernel's
  output is what empty_strided gives (storage offset 0, the same storage size).
- an op that writes into its arguments (add_, the optimizer's _foreach_*_ ops): that its
  checks passed; it returns the arguments its schema says it returns. Nothing changes on meta
  (autograd's version counter is bumped above the dispatch mode, whatever the kernel does).
- never: views and ops that return an alias (they must share the input's storage), ops that
  change an argument's metadata (the inplace_view ops: resize_, set_, unsqueeze_, ...; and
  _resize_output_, which is not tagged so), out= overloads, ops
  whose output shape depends on values, and calls with an argument it cannot key (a Generator,
  a tensor subclass). Those run their kernel every time.
"""

from __future__ import annotations

import torch

from paca_prof.ledger import storage_key

_MAX_ENTRIES = 20_000  # ~40 MB (an entry ~2 KB, a step at a new shape ~100); full: starts over

_NEVER_TAGS = {torch.Tag.inplace_view, torch.Tag.dynamic_output_shape,
               torch.Tag.data_dependent_output}
_KEYED_VALUES = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.layout,
                 torch.memory_format)


class _Unkeyable(Exception):
    """An argument whose value the cache cannot key by."""


_plans: dict = {}  # op -> how its returns come back (_plan), or None: never cached
_entries: dict = {}  # (op, arguments' key) -> the output's description (_describe)


def call(func, args: tuple, kwargs: dict):
    """func(*args, **kwargs) on meta tensors, from the cache where the same op ran on inputs
    of the same metadata before. Limits: the result is equal in metadata, not identical in
    object (each call gets new tensors); only meta outputs are remembered."""
    plan = _plans.get(func, _plans)
    if plan is _plans:
        plan = _plans[func] = _plan(func)
    if plan is None:
        return func(*args, **kwargs)
    try:
        key = (func, _key(args), _key(kwargs))
    except _Unkeyable:
        return func(*args, **kwargs)
    entry = _entries.get(key)
    if entry is not None:
        return _rebuild(entry, plan, args, kwargs)
    out = func(*args, **kwargs)
    entry = _describe(out, plan, _storages((args, kwargs), set()))
    if entry is not None:
        if len(_entries) >= _MAX_ENTRIES:
            _entries.clear()
        _entries[key] = entry
    return out


def clear() -> None:
    """Forget every remembered result (tests; a process never needs to)."""
    _entries.clear()


def _plan(func) -> tuple | None:
    """For each return of `func`'s schema, None (a fresh value) or the position of the argument
    it returns (an in-place op's `self`), as ("arg", index) or ("kwarg", name); None if `func`
    is never cached."""
    if not isinstance(func, torch._ops.OpOverload) or func.is_view \
            or _NEVER_TAGS.intersection(func.tags) or func._overloadname.startswith("out") \
            or "resize" in func._schema.name:  # _resize_output_ resizes, untagged
        return None
    schema = func._schema
    if any(a.is_out for a in schema.arguments):
        return None
    written = {}
    for index, argument in enumerate(schema.arguments):
        if argument.alias_info is not None and argument.alias_info.is_write:
            where = ("kwarg", argument.name) if argument.kwarg_only else ("arg", index)
            for alias_set in argument.alias_info.before_set:
                written[alias_set] = where
    plan = []
    for returned in schema.returns:
        info = returned.alias_info
        if info is None:
            plan.append(None)
        elif info.is_write and len(info.before_set) == 1 and next(iter(info.before_set)) \
                in written:
            plan.append(written[next(iter(info.before_set))])
        else:
            return None  # a view or an alias: it must share its input's storage
    return tuple(plan)


def _key(value):
    """A hashable key of an argument: meta tensors by their metadata, values by type and
    value; _Unkeyable for anything else (a tensor with values, a subclass, a Generator)."""
    if isinstance(value, torch.Tensor):
        if (type(value) is not torch.Tensor and type(value) is not torch.nn.Parameter) \
                or not value.is_meta or value.layout is not torch.strided:
            raise _Unkeyable  # an op on a real tensor must run: it may write values
        return (value.shape, value.stride(), value.dtype)
    if isinstance(value, list | tuple):
        return tuple(_key(item) for item in value)
    if isinstance(value, dict):
        return tuple((name, _key(item)) for name, item in value.items())
    if isinstance(value, _KEYED_VALUES):
        return (type(value), value)
    raise _Unkeyable


def _storages(value, found: set) -> set:
    """`found` with the storage keys of the tensors in `value` (lists and dicts walked)."""
    if isinstance(value, torch.Tensor):
        found.add(storage_key(value))
    elif isinstance(value, list | tuple):
        for item in value:
            _storages(item, found)
    elif isinstance(value, dict):
        for item in value.values():
            _storages(item, found)
    return found


def _describe(out, plan: tuple, inputs: set):
    """The output as the cache keeps it, or None where it cannot be rebuilt (`inputs`: the
    input storages, which a fresh output must not share)."""
    if len(plan) == 1:
        outs, single = (out,), True
    elif isinstance(out, tuple) and len(out) == len(plan):
        outs, single = out, False
    elif not plan and out is None:
        return ((), True, None)
    else:
        return None
    described = []
    for value, where in zip(outs, plan):
        if where is not None:
            described.append(None)  # the argument it returns, taken at each call
            continue
        fresh = _fresh(value, inputs)
        if fresh is _NOT_FRESH:
            return None
        described.append(fresh)
    return (tuple(described), single, type(out) if not single else None)


_NOT_FRESH = object()


def _fresh(value, inputs: set):
    """A fresh return's description: a tensor's (shape, stride, dtype), a list of them, or an
    immutable value as it is; _NOT_FRESH where empty_strided would not remake it."""
    if isinstance(value, torch.Tensor):
        if not value.is_meta or type(value) is not torch.Tensor or value.requires_grad \
                or value.storage_offset() != 0 or storage_key(value) in inputs:
            return _NOT_FRESH
        shape, stride = tuple(value.shape), value.stride()
        remade = torch.empty_strided(shape, stride, dtype=value.dtype, device="meta")
        if remade.untyped_storage().nbytes() != value.untyped_storage().nbytes():
            return _NOT_FRESH
        return ("tensor", shape, stride, value.dtype)
    if isinstance(value, list):
        items = [_fresh(item, inputs) for item in value]
        if any(item is _NOT_FRESH or item[0] != "tensor" for item in items) \
                or len({id(t.untyped_storage()) for t in value}) != len(value):
            return _NOT_FRESH
        return ("list", items)
    if isinstance(value, int | float | bool | type(None)):
        return ("value", value)
    return _NOT_FRESH


def _rebuild(entry, plan: tuple, args: tuple, kwargs: dict):
    described, single, out_type = entry
    if not plan:
        return None
    outs = []
    for description, where in zip(described, plan):
        if where is not None:
            kind, position = where
            outs.append(args[position] if kind == "arg" else kwargs[position])
        else:
            outs.append(_remake(description))
    if single:
        return outs[0]
    return out_type(outs) if out_type is not tuple else tuple(outs)


def _remake(description):
    kind = description[0]
    if kind == "tensor":
        _, shape, stride, dtype = description
        return torch.empty_strided(shape, stride, dtype=dtype, device="meta")
    if kind == "list":
        return [_remake(item) for item in description[1]]
    return description[1]
