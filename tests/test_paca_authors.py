"""The authors' scheme (paca/authors.py): what it computes, what it saves, and its stale forwards,
counted exactly."""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from paca import LLAMA_TARGETS, PacaConfig, inject_paca, paca_layers
from paca.authors import AuthorsPacaLinear, authors_layers, inject_authors_paca, stale_forwards
from paca_testing import (
    ALPHA,
    N_TARGETS,
    R,
    SCALING,
    batch,
    cfg,
    logits_of,
    loss_of,
    saved_for_backward,
    trainable,
)

ROOT = Path(__file__).resolve().parents[1]


def test_authors_layer_saves_the_slice_and_starts_as_the_base(make_llama):
    torch.manual_seed(0)
    base = nn.Linear(48, 20)
    layer = AuthorsPacaLinear(copy.deepcopy(base), 6, 12.0, torch.Generator().manual_seed(0))
    x = torch.randn(3, 5, 48, requires_grad=True)
    y, saved = saved_for_backward([layer], lambda: layer(x))
    # x[..., idx] only, plus autograd's own scalar for `P * scaling` (none: a Python float).
    assert sum(n for n, _ in saved.values()) == 3 * 5 * 6 * 4
    assert torch.equal(y, base(x))
    idx = layer.paca_indices
    assert not torch.equal(idx, idx.sort().values) or len(idx) == 1  # unsorted, as theirs
    torch.testing.assert_close(layer.paca_w * layer.scaling, base.weight[:, idx])


def test_authors_gradient_equals_paca_gradient(make_llama):
    base = make_llama()
    ours = inject_paca(copy.deepcopy(base), cfg())
    theirs = inject_authors_paca(copy.deepcopy(base), cfg())
    ids = batch(0)
    loss_of(ours, ids).backward()
    loss_of(theirs, ids).backward()
    ours_layers = paca_layers(ours)
    for name, layer in authors_layers(theirs).items():
        order = layer.paca_indices.argsort()
        assert torch.equal(layer.paca_indices[order], ours_layers[name].indices), name
        torch.testing.assert_close(layer.paca_w.grad[:, order], ours_layers[name].paca_weight.grad,
                                   rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("fused", [False, True], ids=["adamw", "adamw_fused"])
def test_stale_forwards_are_counted_exactly(make_llama, fused):
    """Without checkpointing and with accumulation 1, every second training step runs on
    columns one step old; an eval forward shifts the parity. The counter agrees, forward by
    forward, with a direct check of W[:, idx] against scaling * P."""
    model = inject_authors_paca(make_llama(), cfg())
    layers = list(authors_layers(model).values())
    truth = {"stale": 0}

    def check(layer, inputs, output):  # after the GEMM: W is what the GEMM used
        current = (layer.paca_w.detach() * layer.scaling).to(layer.weight.dtype)
        truth["stale"] += not torch.equal(layer.weight.detach()[:, layer.paca_indices], current)

    for layer in layers:
        layer.register_forward_hook(check)
    opt = torch.optim.AdamW(trainable(model), lr=1e-2, fused=fused)
    for step in range(4):
        loss_of(model, batch(step)).backward()
        opt.step()
        opt.zero_grad()
    assert stale_forwards(model) == truth["stale"] == 2 * N_TARGETS  # steps 2 and 4 (of 1..4)
    model.eval()
    with torch.no_grad():
        model(input_ids=batch(9))  # an eval forward: counted, stale, and it shifts the parity
    model.train()
    assert stale_forwards(model) == truth["stale"] == 3 * N_TARGETS
    for step in range(2):
        loss_of(model, batch(step)).backward()
        opt.step()
        opt.zero_grad()
    # Forwards 6 and 7: 6 is even (stale), 7 is odd (copies first, fresh).
    assert stale_forwards(model) == truth["stale"] == 4 * N_TARGETS
    assert all(layer.forwards == 7 for layer in layers)


def test_bench_step_profiles_the_one_authors_module(make_llama, monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_step", ROOT / "bench" / "bench_step.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_step", bench)  # dataclasses look their module up
    monkeypatch.syspath_prepend(str(ROOT / "bench"))  # as when run: its folder on sys.path
    spec.loader.exec_module(bench)
    from paca_prof.methods import MethodSettings
    from paca_prof.recipe import Recipe

    settings = MethodSettings(r=R, alpha=ALPHA)
    model = bench.prepare_method(make_llama(), "authors", settings,
                                 Recipe(targets=tuple(LLAMA_TARGETS)))
    layers = authors_layers(model)
    assert len(layers) == N_TARGETS
    assert all(type(layer) is AuthorsPacaLinear and layer.scaling == SCALING
               for layer in layers.values())
    assert not hasattr(bench, "AuthorsPacaLinear")  # one home: paca/authors.py


def test_inject_authors_paca_refuses_what_it_does_not_do(make_llama):
    with pytest.raises(ValueError, match="modules_to_save"):
        inject_authors_paca(make_llama(tie_word_embeddings=False),
                            PacaConfig(r=R, modules_to_save=["lm_head"]))
    probe = batch(9)
    base = make_llama()
    model = inject_authors_paca(copy.deepcopy(base), cfg())
    # Their first training forward writes scaling * (W / scaling) into W: equal up to rounding
    # (an ulp here and there with scaling 3), not bit for bit as PacaLinear is.
    torch.testing.assert_close(logits_of(model, probe), logits_of(base, probe),
                               rtol=1e-5, atol=1e-6)
