"""Shared helpers of the PaCA library tests (tests/test_paca*.py).

Every model is a tiny Llama with random weights (conftest.make_llama); nothing is downloaded.
Import `partial_connection` into a test module to run each of its tests under both autograd
functions of PacaLinear.
"""

from __future__ import annotations

import copy
from itertools import chain

import pytest
import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks
from torch.utils._python_dispatch import TorchDispatchMode

import paca.compiled
import paca.layer
from paca import LLAMA_TARGETS, PacaConfig
from paca.model import paca_layers

# r=4, alpha=12: scaling 3, not a power of two, so a missing or doubled scaling shows up.
R, ALPHA = 4, 12.0
SCALING = ALPHA / R
N_LAYERS = 2
N_TARGETS = N_LAYERS * len(LLAMA_TARGETS)


@pytest.fixture(autouse=True, params=["compiled", "python"])
def partial_connection(request, monkeypatch):
    """Every test of a module that imports this runs twice: with the compiled
    PartialConnection (what CPU training runs) and with the Python PartialConnectionFn (the
    reference; what GPU, meta and machines without a C++ compiler run)."""
    if request.param == "python":
        monkeypatch.setattr(paca.layer, "partial_connection_op", lambda: None)
    else:
        report = paca.compiled.ensure_built()
        assert report.available, f"the compiled PartialConnection did not build here: {report}"
    return request.param


def cfg(**kw) -> PacaConfig:
    return PacaConfig(**{"r": R, "alpha": ALPHA, **kw})


def batch(seed: int, b: int = 2, length: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + seed)
    return torch.randint(0, 256, (b, length), generator=g)


def loss_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def logits_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits from a forward with autograd on (the training path of PacaLinear)."""
    return model(input_ids=ids).logits.detach()


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def plain_with_columns(base: nn.Module, paca_model: nn.Module) -> nn.Module:
    """A copy of the untouched base model whose targeted weights hold scaling * paca_weight in
    the trained columns, built independently of PacaLinear's own column writes."""
    plain = copy.deepcopy(base)
    modules = dict(plain.named_modules())
    with torch.no_grad():
        for name, layer in paca_layers(paca_model).items():
            weight = modules[name].weight
            weight[:, layer.indices] = (layer.paca_weight * layer.scaling).to(weight.dtype)
    return plain


def assert_columns_synced(model: nn.Module) -> None:
    for name, layer in paca_layers(model).items():
        expected = (layer.paca_weight.detach() * layer.scaling).to(layer.weight.dtype)
        assert torch.equal(layer.weight.detach()[:, layer.indices], expected), name


def assert_same_state(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def sgd_steps(model: nn.Module, n: int, lr: float = 0.05, first_seed: int = 0):
    opt = torch.optim.SGD(trainable(model), lr=lr)
    for step in range(n):
        opt.zero_grad()
        loss_of(model, batch(first_seed + step)).backward()
        opt.step()
    return opt


class OpRecorder(TorchDispatchMode):
    """Records every aten op (forward and backward, CPU autograd runs on this thread)."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, tuple | None]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else None
        self.ops.append((func.overloadpacket.__name__, shape))
        return out

    def count(self, name: str) -> int:
        return sum(1 for op, _ in self.ops if op == name)

    def shapes(self, name: str) -> list:
        return [shape for op, shape in self.ops if op == name]


def index_copies(fn) -> tuple[int, list]:
    """(number, shapes) of the index_copy_ ops (PaCA's column writes) that fn() runs."""
    with OpRecorder() as rec:
        fn()
    return rec.count("index_copy_"), rec.shapes("index_copy_")


def saved_for_backward(modules: list[nn.Module], fn):
    """Run fn() under saved_tensors_hooks; return (fn's result, {storage ptr: (nbytes, tensor)})
    for the saved tensors that are not parameters or buffers of `modules`, deduplicated by
    storage."""
    exclude = {
        t.untyped_storage().data_ptr()
        for m in modules
        for t in chain(m.parameters(), m.buffers())
    }
    saved: dict[int, tuple[int, torch.Tensor]] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in exclude:
            saved[storage.data_ptr()] = (storage.nbytes(), t)  # keeps t alive: no pointer reuse
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved
