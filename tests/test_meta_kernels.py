"""The meta kernels' cache (engines/meta_kernels.py): each distinct op runs its kernel once, and a
simulated step is the same with it as without it."""

from __future__ import annotations

import collections
import math

import pandas as pd
import pytest
import torch
from conftest import run_spec as RunSpec

from paca_prof.engines import meta_kernels
from paca_prof.engines.simulate import Simulator
from paca_prof.methods import DEFAULT_METHODS

kernel_calls = collections.Counter()
_lib = torch.library.Library("paca_prof_test", "DEF")  # a namespace of the tests' own
_lib.define("scaled(Tensor x, float alpha) -> Tensor")
_lib.define("scale_(Tensor(a!) x, float alpha) -> Tensor(a!)")
_lib.define("halves(Tensor x) -> (Tensor, Tensor)")


def _scaled(x, alpha):
    kernel_calls["scaled"] += 1
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _scale_(x, alpha):
    kernel_calls["scale_"] += 1
    return x


def _halves(x):
    kernel_calls["halves"] += 1
    half = x.shape[-1] // 2
    return x.new_empty((*x.shape[:-1], half)), x.new_empty((*x.shape[:-1], half))


for _name, _kernel in (("scaled", _scaled), ("scale_", _scale_), ("halves", _halves)):
    _lib.impl(_name, _kernel, "Meta")
OPS = torch.ops.paca_prof_test


@pytest.fixture(autouse=True)
def fresh_cache():
    meta_kernels.clear()
    kernel_calls.clear()
    yield
    meta_kernels.clear()


def meta(*shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype, device="meta")


def test_an_op_runs_its_kernel_once_per_distinct_metadata_and_returns_new_tensors():
    x = meta(4, 8)
    first = meta_kernels.call(OPS.scaled.default, (x, 2.0), {})
    second = meta_kernels.call(OPS.scaled.default, (meta(4, 8), 2.0), {})
    assert kernel_calls["scaled"] == 1
    assert (second.shape, second.stride(), second.dtype) == (first.shape, first.stride(),
                                                             first.dtype)
    assert second.untyped_storage()._cdata != first.untyped_storage()._cdata  # a new storage
    # any difference in shape, strides, dtype or a scalar's type or value runs the kernel
    for args in ((meta(4, 9), 2.0), (meta(8, 4).t(), 2.0), (meta(4, 8, dtype=torch.bfloat16), 2.0),
                 (x, 3.0), (x, 2)):
        out = meta_kernels.call(OPS.scaled.default, args, {})
        assert out.shape == args[0].shape and out.dtype == args[0].dtype
    assert kernel_calls["scaled"] == 6


def test_an_in_place_op_returns_its_argument_without_running_its_kernel_again():
    x, y = meta(3, 5), meta(3, 5)
    assert meta_kernels.call(OPS.scale_.default, (x, 0.5), {}) is x
    assert meta_kernels.call(OPS.scale_.default, (y, 0.5), {}) is y
    assert kernel_calls["scale_"] == 1


def test_ops_with_several_returns_and_aten_ops_come_back_alike():
    a, b = meta_kernels.call(OPS.halves.default, (meta(2, 6),), {})
    c, d = meta_kernels.call(OPS.halves.default, (meta(2, 6),), {})
    assert kernel_calls["halves"] == 1 and c.shape == d.shape == a.shape == (2, 3)
    assert c.untyped_storage()._cdata != d.untyped_storage()._cdata
    layer_norm = torch.ops.aten.native_layer_norm.default
    args = (meta(2, 7, 16), [16], meta(16), meta(16), 1e-5)
    uncached = layer_norm(*args)
    for _ in range(2):
        out = meta_kernels.call(layer_norm, args, {})
        assert type(out) is type(uncached) and len(out) == len(uncached)
        assert [(t.shape, t.stride(), t.dtype) for t in out] == \
            [(t.shape, t.stride(), t.dtype) for t in uncached]
    foreach = torch.ops.aten._foreach_mul.Scalar
    tensors = [meta(3), meta(4, 2)]
    out = meta_kernels.call(foreach, (tensors, 2.0), {})
    again = meta_kernels.call(foreach, (tensors, 2.0), {})
    assert isinstance(again, list) and [t.shape for t in again] == [t.shape for t in out]
    assert meta_kernels.call(torch.ops.aten._foreach_mul_.Scalar, (tensors, 2.0), {}) is None


def test_views_share_their_inputs_storage_and_real_tensors_are_computed():
    x = meta(4, 6)
    for _ in range(2):
        view = meta_kernels.call(torch.ops.aten.view.default, (x, [6, 4]), {})
        assert view.untyped_storage()._cdata == x.untyped_storage()._cdata
    real = torch.ones(3)
    for _ in range(2):  # never skipped: an op on a tensor with values writes them
        meta_kernels.call(torch.ops.aten.add_.Tensor, (real, torch.ones(3)), {})
    assert real.tolist() == [3.0, 3.0, 3.0]


def test_ops_that_change_an_arguments_metadata_always_run():
    for _ in range(2):
        x = meta(2, 3)
        meta_kernels.call(torch.ops.aten._resize_output_.default, (x, [4, 5], x.device), {})
        assert x.shape == (4, 5)
        y = meta(6)
        meta_kernels.call(torch.ops.aten.unsqueeze_.default, (y, 0), {})
        assert y.shape == (1, 6)


def test_the_cache_is_bounded_and_starts_over_when_full(monkeypatch):
    monkeypatch.setattr(meta_kernels, "_MAX_ENTRIES", 3)
    for width in range(1, 8):
        meta_kernels.call(OPS.scaled.default, (meta(2, width), 1.0), {})
        assert 1 <= len(meta_kernels._entries) <= 3
    meta_kernels.call(OPS.scaled.default, (meta(2, 7), 1.0), {})  # the newest stays
    assert kernel_calls["scaled"] == 7


def _uncached(func, args, kwargs):
    return func(*args, **kwargs)


@pytest.mark.parametrize("method", DEFAULT_METHODS)
def test_a_simulated_step_is_the_same_with_the_cache_as_without(method, monkeypatch):
    spec = RunSpec(model="tiny", seq=48, batch=2, dtype="bf16", device="meta",
                   attention="flash", methods=(method,))
    cached = Simulator(spec, method).step(48, 2)
    again = Simulator(spec, method).step(48, 2)  # every op now from the cache
    monkeypatch.setattr(meta_kernels, "call", _uncached)
    computed = Simulator(spec, method).step(48, 2)
    for result in (cached, again):
        for table in ("layers", "ops", "memory"):
            pd.testing.assert_frame_equal(getattr(result, table), getattr(computed, table))
        for key, value in computed.summary.items():
            other = result.summary[key]
            assert other == value or (isinstance(value, float) and math.isnan(value)
                                      and math.isnan(other)), key
