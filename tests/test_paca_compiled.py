"""PaCA's compiled autograd function (paca/compiled.py, paca/csrc/) and torch.compile.

- The compiled function is the Python one in C++: same outputs, gradients and saved bytes.
- Its build is keyed by content, not by path, and runs once under a file lock.
- A PaCA model compiles with fullgraph=True, and compiled training equals eager training.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import warnings

import pytest
import torch
from torch import nn

import paca.compiled
from paca import PacaLinear, get_paca_model, paca_layers
from paca.layer import PartialConnectionFn
from paca_testing import (  # noqa: F401  (partial_connection: the autouse fixture)
    batch,
    cfg,
    loss_of,
    partial_connection,
    saved_for_backward,
    trainable,
)

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- the function itself


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_compiled_and_python_functions_agree_bit_for_bit(dtype):
    """The compiled PartialConnection is the Python PartialConnectionFn in C++: same output, same
    gradients, same saved bytes, to the bit (both run the same aten ops in the same order), by
    both of its entry points (the Python module's function and the torch.ops operator)."""
    assert paca.compiled.ensure_built().available
    entries = (
        paca.compiled.partial_connection_op(),
        torch.ops.paca.partial_connection.default,
        PartialConnectionFn.apply,
    )
    torch.manual_seed(0)
    x0 = torch.randn(2, 5, 32, dtype=dtype)
    weight, bias = torch.randn(24, 32, dtype=dtype), torch.randn(24, dtype=dtype)
    indices = torch.tensor([1, 4, 9, 30])
    p0 = torch.randn(4, 24, dtype=dtype).t()  # column-major, as paca_weight is stored
    gy = torch.randn(2, 5, 24, dtype=dtype)
    results = []
    for fn in entries:
        x = x0.clone().requires_grad_()
        p = p0.clone().requires_grad_()
        y, saved = saved_for_backward([], lambda: fn(x, p, weight, bias, indices, 2.5))
        y.backward(gy)
        results.append((y.detach(), x.grad, p.grad, sorted(n for n, _ in saved.values())))
        assert p.grad.stride() == (1, 24)  # paca_weight's column-major layout
    for other in results[1:]:
        for a, b in zip(results[0][:3], other[:3]):
            assert torch.equal(a, b)
        assert results[0][3] == other[3]


def test_the_operator_is_transparent_to_profilers():
    """paca::partial_connection is CompositeImplicitAutograd: profilers and dispatch modes count
    the aten ops inside it (the gather, the GEMMs) as the outermost ops, never the operator."""
    from paca_prof.ops import counts_as_op

    assert paca.compiled.ensure_built().available
    assert torch._C._dispatch_has_kernel_for_dispatch_key(
        "paca::partial_connection", "CompositeImplicitAutograd")
    assert not counts_as_op("paca::partial_connection")
    assert counts_as_op("aten::index_select") and counts_as_op("aten::addmm")



def test_its_fake_kernel_is_the_aten_ops_meta_kernels_the_simulator_runs():
    """No fake kernel of its own: torch refuses register_fake for a CompositeImplicitAutograd
    operator, which decomposes on fake and meta tensors instead. So torch.compile's fake tensors
    and the simulator (PartialConnectionFn on the meta device) run the same aten ops' meta
    kernels, in the same order, forward and backward, with the same shapes (views aside)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    assert paca.compiled.ensure_built().available
    with pytest.raises(RuntimeError, match="CompositeImplicitAutograd kernel"):
        torch.library.register_fake("paca::partial_connection")(lambda *args: None)

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if not func.is_view:  # views make no kernel (and C++ orders them differently)
                shapes = [tuple(t.shape) for t in torch.utils._pytree.tree_leaves(out)
                          if isinstance(t, torch.Tensor)]
                self.seen.append((str(func), shapes))
            return out

    sequences = []
    for fn in (torch.ops.paca.partial_connection.default, PartialConnectionFn.apply):
        with torch.device("meta"):
            x = torch.randn(2, 5, 32, dtype=torch.bfloat16, requires_grad=True)
            p = torch.randn(4, 24, dtype=torch.bfloat16).t().requires_grad_()
            weight, bias = torch.randn(24, 32, dtype=torch.bfloat16), None
            indices = torch.tensor([1, 4, 9, 30])
        with Ops() as ops:
            y = fn(x, p, weight, bias, indices, 2.5)
            y.backward(torch.ones_like(y))
        assert y.is_meta and p.grad.shape == (24, 4)
        sequences.append(ops.seen)
    assert sequences[0] == sequences[1]
    assert any("index_select" in op for op, _ in sequences[0])


def test_build_failure_warns_once_and_falls_back(monkeypatch):
    def no_compiler(*args, **kwargs):
        raise OSError("no C++ compiler found\nsecond line")

    monkeypatch.setattr(paca.compiled, "build_or_load", no_compiler)
    monkeypatch.setattr(paca.compiled, "_REPORT", None)
    monkeypatch.setattr(paca.compiled, "_MODULE", None)
    expected = r"could not be built \(OSError: no C\+\+ compiler found\)"
    with pytest.warns(RuntimeWarning, match=expected):
        report = paca.compiled.ensure_built()
    assert report.action == "failed" and not report.available
    assert report.reason == "OSError: no C++ compiler found"
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        assert paca.compiled.ensure_built() is report  # decided once per process
        assert paca.compiled.partial_connection_op() is None
    assert again == []  # and said once: no second warning
    assert paca.compiled.partial_connection_op() is None


def test_paca_compiled_0_never_builds(monkeypatch):
    def must_not_build(*args, **kwargs):
        raise AssertionError("built although PACA_COMPILED=0")

    monkeypatch.setattr(paca.compiled, "build_or_load", must_not_build)
    monkeypatch.setattr(paca.compiled, "_REPORT", None)
    monkeypatch.setattr(paca.compiled, "_MODULE", None)
    monkeypatch.setenv("PACA_COMPILED", "0")
    assert paca.compiled.ensure_built().action == "disabled"
    assert paca.compiled.partial_connection_op() is None


# ---------------------------------------------------------------- where and how often it builds


def test_build_key_depends_on_content_not_on_path(tmp_path):
    text = Path(paca.compiled.SOURCE).read_text()
    key = paca.compiled.build_key(text, paca.compiled.FLAGS, paca.compiled.NAME)
    assert key == paca.compiled.build_key(text, paca.compiled.FLAGS, paca.compiled.NAME)
    assert key != paca.compiled.build_key(text + "\n// edited", paca.compiled.FLAGS,
                                          paca.compiled.NAME)
    assert key != paca.compiled.build_key(text, ("-O3",), paca.compiled.NAME)
    report = paca.compiled.ensure_built()
    assert report.available and report.folder.endswith(f"{paca.compiled.NAME}_{key}")


def test_a_checkout_at_another_path_loads_the_same_build(tmp_path):
    """The rebuild that issue 12 saw (30-40 s inside a measurement): a copy of the package at
    another path must load the existing build, not build again."""
    built = paca.compiled.ensure_built()
    assert built.available
    shutil.copytree(ROOT / "paca", tmp_path / "paca", ignore=shutil.ignore_patterns("__pycache__"))
    code = "import paca.compiled as c; r = c.ensure_built(); print(r.action, r.folder)"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    action, folder = result.stdout.split()
    assert action == "loaded" and folder == built.folder
    assert "building" not in result.stderr


TINY_SOURCE = """
#include <pybind11/pybind11.h>
int answer() { return 42; }
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("answer", &answer); }
"""


def test_two_processes_building_at_once_both_succeed_and_build_once(tmp_path):
    """build_or_load under a file lock: two processes started together both get the module,
    exactly one of them builds (and says so on stderr), the other waits and loads."""
    source = tmp_path / "tiny.cpp"
    source.write_text(TINY_SOURCE)
    root = tmp_path / "extensions"
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from paca.compiled import build_or_load
        module, action, folder = build_or_load({str(source)!r}, "paca_prof_lock_test", ("-O0",),
                                               root={str(root)!r})
        assert module.answer() == 42
        print(action)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err
    actions = sorted(out.strip() for out, _ in outputs)
    assert actions == ["built", "loaded"], outputs
    builder = next(err for out, err in outputs if out.strip() == "built")
    assert "building" in builder
    built = list(root.glob("paca_prof_lock_test_*/paca_prof_lock_test.so"))
    assert len(built) == 1


# ---------------------------------------------------------------- torch.compile


def _fresh_dynamo() -> dict:
    """Reset torch.compile's caches and counters; returns the live counters of graphs."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    return counters["stats"]


def test_paca_model_compiles_full_graph_and_trains_as_eager(make_llama, partial_connection):
    """fullgraph=True: one graph for the whole model, no graph break at any PacaLinear, and no
    recompilation across optimizer steps (the columns are written outside the traced forward).
    Compiled training (aot_eager: the traced joint graph, run without a code generator) gives
    the same losses and columns as eager training."""
    stats = _fresh_dynamo()
    base = make_llama(num_hidden_layers=1)
    eager = get_paca_model(copy.deepcopy(base), cfg())
    traced = get_paca_model(copy.deepcopy(base), cfg())
    compiled = torch.compile(traced, fullgraph=True, backend="aot_eager")
    opt_e = torch.optim.AdamW(trainable(eager), lr=1e-2)
    opt_c = torch.optim.AdamW(trainable(traced), lr=1e-2)
    for step in range(3):
        ids = batch(step)
        loss_e, loss_c = loss_of(eager, ids), loss_of(compiled, ids)
        assert torch.equal(loss_e.detach(), loss_c.detach()), step
        loss_e.backward()
        loss_c.backward()
        for opt in (opt_e, opt_c):
            opt.step()
            opt.zero_grad()
    assert stats["unique_graphs"] == 1
    layers_c = paca_layers(traced)
    for name, layer in paca_layers(eager).items():
        assert torch.equal(layer.paca_weight, layers_c[name].paca_weight), name
        assert torch.equal(layer.weight, layers_c[name].weight), name
    assert not torch.equal(layer.paca_weight * layer.scaling, layer.original_columns)


def test_inductor_compiled_paca_linear_matches_eager(partial_connection):
    """The default backend (inductor, generated C++) on a small PaCA MLP: same gradients as
    eager within float rounding, and the columns after two AdamW steps."""
    stats = _fresh_dynamo()

    def make():
        torch.manual_seed(0)
        layers = [nn.Linear(16, 32), nn.Linear(32, 8)]
        return nn.Sequential(
            PacaLinear(layers[0], 3, 6.0, torch.tensor([0, 5, 11])), nn.GELU(),
            PacaLinear(layers[1], 4, 8.0, torch.tensor([1, 2, 30, 31])))

    eager, traced = make(), make()
    compiled = torch.compile(traced, fullgraph=True)
    opt_e = torch.optim.AdamW(trainable(eager), lr=1e-2)
    opt_c = torch.optim.AdamW(trainable(traced), lr=1e-2)
    x = torch.randn(4, 6, 16)
    for _ in range(2):
        for model, opt in ((eager, opt_e), (compiled, opt_c)):
            model(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    for a, b in zip(eager, traced):
        if isinstance(a, PacaLinear):
            torch.testing.assert_close(a.paca_weight, b.paca_weight, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(a.weight, b.weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(eager(x), compiled(x), rtol=1e-5, atol=1e-6)
    assert stats["unique_graphs"] == 1
