"""Tests of the PaCA library's layer (paca/): PaCA equals masked full fine-tuning, saves only the
partial input, adds one gather and one small GEMM, keeps the weight current; and of
paca_prof.methods.prepare. The API, files, compile, the authors' scheme and QPaCA are tested in
the other tests/test_paca_*.py files.

Every model is a tiny Llama with random weights (see conftest.make_llama); nothing is downloaded.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from paca import (
    PacaConfig,
    PacaLinear,
    get_paca_model,
    load_paca,
    merge_and_unload,
    paca_layers,
    save_paca,
    unload,
)
from paca.model import find_targets
from paca_testing import (  # noqa: F401  (partial_connection: the autouse fixture)
    ALPHA,
    N_TARGETS,
    R,
    SCALING,
    OpRecorder,
    assert_columns_synced,
    batch,
    cfg,
    index_copies,
    logits_of,
    loss_of,
    partial_connection,
    plain_with_columns,
    saved_for_backward,
    sgd_steps,
    trainable,
)


# ---------------------------------------------------------------- 1. gradients


def test_grad_equals_scaled_full_finetuning_grad(make_llama):
    base = make_llama()
    full = copy.deepcopy(base).requires_grad_(True)
    model = get_paca_model(base, cfg())
    layers = paca_layers(model)
    assert len(layers) == N_TARGETS
    assert {p for p in model.parameters() if p.requires_grad} == {
        l.paca_weight for l in layers.values()
    }

    ids = batch(0)
    loss_p = loss_of(model, ids)
    loss_f = loss_of(full, ids)
    assert torch.equal(loss_p.detach(), loss_f.detach())
    loss_p.backward()
    loss_f.backward()

    full_modules = dict(full.named_modules())
    for name, layer in layers.items():
        assert layer.scaling == SCALING
        grad_w = full_modules[name].weight.grad
        assert grad_w.abs().max() > 0, name  # the comparison is not vacuous
        expected = SCALING * grad_w[:, layer.indices]
        torch.testing.assert_close(layer.paca_weight.grad, expected, rtol=1e-5, atol=1e-8)
    # Frozen parameters get no gradient at all.
    for name, p in model.named_parameters():
        if not name.endswith("paca_weight"):
            assert p.grad is None, name


def test_autocast_bf16_grad_matches_full_finetuning(make_llama):
    """Mixed precision (fp32 weights, bf16 autocast) must run, and give the same gradient as
    full fine-tuning under the same autocast, up to bf16 rounding."""
    base = make_llama()
    full = copy.deepcopy(base).requires_grad_(True)
    model = get_paca_model(base, cfg())
    ids = batch(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_p = loss_of(model, ids)
        loss_f = loss_of(full, ids)
    torch.testing.assert_close(loss_p, loss_f, rtol=0, atol=0)
    loss_p.backward()
    loss_f.backward()
    full_modules = dict(full.named_modules())
    for name, layer in paca_layers(model).items():
        grad = layer.paca_weight.grad
        assert grad is not None and grad.dtype == torch.float32, name
        assert torch.isfinite(grad).all()
        expected = SCALING * full_modules[name].weight.grad[:, layer.indices]
        rel = (grad - expected).norm() / expected.norm()
        assert rel < 2e-2, (name, rel.item())


# ---------------------------------------------------------------- 2. identity at init


def test_output_unchanged_at_init(make_llama):
    base = make_llama()
    model = get_paca_model(make_llama(), cfg())
    for ids in (batch(0), batch(1, b=3, length=5)):
        assert torch.equal(logits_of(model, ids), logits_of(base, ids))
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)
    # The base weights are untouched by the wrap and by the forwards.
    base_sd = base.state_dict()
    for name, layer in paca_layers(model).items():
        assert torch.equal(layer.weight, base_sd[f"{name}.weight"]), name
        torch.testing.assert_close(
            layer.paca_weight * layer.scaling, layer.weight[:, layer.indices], rtol=1e-6, atol=0
        )


# ---------------------------------------------------------------- 3. optimizer steps

# PaCA optimizer on P = W_cols / s (grad_P = s * g, g = dL/dW_cols), and the optimizer on W_cols
# that gives the same trajectory:
#   SGD(lr, momentum):  P -= lr * s * g  =>  W_cols -= lr * s^2 * g     (momentum is linear)
#   AdamW(lr, eps, wd): m_P = s m, v_P = s^2 v, P *= 1 - lr wd, P -= lr m/(sqrt(v) + eps/s)
#                       =>  W_cols: AdamW(lr * s, eps / s, wd / s)
OPTIMIZERS = {
    "sgd_momentum": (
        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
        lambda ps: torch.optim.SGD(ps, lr=0.05 * SCALING**2, momentum=0.9),
    ),
    "adamw": (
        lambda ps: torch.optim.AdamW(ps, lr=1e-3, eps=1e-8, weight_decay=0.1, foreach=False),
        lambda ps: torch.optim.AdamW(
            ps, lr=1e-3 * SCALING, eps=1e-8 / SCALING, weight_decay=0.1 / SCALING, foreach=False
        ),
    ),
    "adamw_foreach": (
        lambda ps: torch.optim.AdamW(ps, lr=1e-3, eps=1e-8, weight_decay=0.1, foreach=True),
        lambda ps: torch.optim.AdamW(
            ps, lr=1e-3 * SCALING, eps=1e-8 / SCALING, weight_decay=0.1 / SCALING, foreach=False
        ),
    ),
    # Fused optimizers write the parameters without bumping their version counter
    # (HF Trainer's default optimizer is adamw_torch_fused).
    "adamw_fused": (
        lambda ps: torch.optim.AdamW(ps, lr=1e-3, eps=1e-8, weight_decay=0.1, fused=True),
        lambda ps: torch.optim.AdamW(
            ps, lr=1e-3 * SCALING, eps=1e-8 / SCALING, weight_decay=0.1 / SCALING, foreach=False
        ),
    ),
    "sgd_fused": (
        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, fused=True),
        lambda ps: torch.optim.SGD(ps, lr=0.05 * SCALING**2, momentum=0.9),
    ),
}


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_steps_match_masked_full_finetuning(make_llama, opt_name):
    make_paca_opt, make_ref_opt = OPTIMIZERS[opt_name]
    base = make_llama()
    ref = copy.deepcopy(base)
    model = get_paca_model(copy.deepcopy(base), cfg())
    layers = paca_layers(model)

    # Reference: the full model, in which only W[:, idx] of each targeted linear is trained, via
    # a parameter holding those columns that is written back into W after every step.
    ref.requires_grad_(False)
    ref_modules = dict(ref.named_modules())
    ref_cols = {}
    for name, layer in layers.items():
        weight = ref_modules[name].weight
        weight.requires_grad_(True)
        ref_cols[name] = nn.Parameter(weight.detach()[:, layer.indices].clone())
    ref_opt = make_ref_opt(list(ref_cols.values()))
    opt = make_paca_opt(trainable(model))

    probe = batch(99)
    initial = logits_of(base, probe)
    for step in range(3):
        ids = batch(step)
        opt.zero_grad()
        loss_of(model, ids).backward()
        opt.step()

        ref.zero_grad(set_to_none=True)
        loss_of(ref, ids).backward()
        for name, layer in layers.items():
            ref_cols[name].grad = ref_modules[name].weight.grad[:, layer.indices].clone()
        ref_opt.step()
        with torch.no_grad():
            for name, layer in layers.items():
                ref_modules[name].weight[:, layer.indices] = ref_cols[name]

        got = logits_of(model, probe)
        want = logits_of(ref, probe)
        assert_columns_synced(model)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=f"step {step}")
        for name, layer in layers.items():
            torch.testing.assert_close(
                layer.weight[:, layer.indices], ref_cols[name].detach(), rtol=1e-5, atol=1e-6
            )
    # Training did move the output, so the comparison above is not vacuous.
    assert (got - initial).abs().max() > 1e-2
    # Only the selected columns ever changed.
    base_sd = base.state_dict()
    for name, layer in layers.items():
        keep = torch.ones(layer.in_features, dtype=torch.bool)
        keep[layer.indices] = False
        assert torch.equal(layer.weight[:, keep], base_sd[f"{name}.weight"][:, keep]), name
        assert not torch.equal(layer.weight[:, ~keep], base_sd[f"{name}.weight"][:, ~keep])


# ---------------------------------------------------------------- 4. saved activations, dtypes


def test_saved_bytes_single_layer_3d_input_never_saves_full_input():
    torch.manual_seed(0)
    b, length, d_in, d_out, r = 3, 5, 48, 20, 6
    layer = PacaLinear(nn.Linear(d_in, d_out), r, 12.0, torch.arange(0, 2 * r, 2))
    x = torch.randn(b, length, d_in, requires_grad=True)
    y, saved = saved_for_backward([layer], lambda: layer(x))
    assert sum(n for n, _ in saved.values()) == b * length * r * x.element_size()
    assert x.untyped_storage().data_ptr() not in saved
    for _, t in saved.values():
        assert t.numel() < x.numel()
        assert t.shape == (b, length, r)
        assert torch.equal(t, x.detach()[..., layer.indices])
    y.sum().backward()
    assert layer.paca_weight.grad.shape == (d_out, r)


def test_saved_bytes_whole_model_is_frozen_plus_partial_inputs(make_llama):
    """Per PaCA linear, training saves exactly B*L*r elements more than a frozen model whose
    activations require grad (the floor every method adds to)."""
    b, length = 2, 8
    frozen = make_llama()
    frozen.requires_grad_(False)
    frozen.enable_input_require_grads()
    model = get_paca_model(make_llama(), cfg())
    model.enable_input_require_grads()
    ids = batch(0, b=b, length=length)
    out_f, saved_f = saved_for_backward([frozen], lambda: loss_of(frozen, ids))
    out_p, saved_p = saved_for_backward([model], lambda: loss_of(model, ids))
    bytes_f = sum(n for n, _ in saved_f.values())
    bytes_p = sum(n for n, _ in saved_p.values())
    assert bytes_p - bytes_f == N_TARGETS * b * length * R * 4
    out_p.backward()
    out_f.backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("batch_shape", [(7,), (2, 3)], ids=["2d", "3d"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_paca_linear_dtypes_shapes_bias(dtype, batch_shape, bias):
    torch.manual_seed(0)
    d_in, d_out, r, alpha = 32, 24, 5, 10.0  # scaling 2
    base = nn.Linear(d_in, d_out, bias=bias).to(dtype)
    w0 = base.weight.detach().clone()
    b0 = base.bias.detach().clone() if bias else None
    idx = torch.tensor([0, 3, 8, 17, 31])
    layer = PacaLinear(base, r, alpha, idx)
    assert layer.paca_weight.dtype == dtype and layer.paca_weight.shape == (d_out, r)
    x = torch.randn(*batch_shape, d_in, dtype=dtype, requires_grad=True)

    y, saved = saved_for_backward([layer], lambda: layer(x))
    assert y.shape == (*batch_shape, d_out) and y.dtype == dtype
    assert torch.equal(y.detach(), F.linear(x.detach(), w0, b0))
    assert sum(n for n, _ in saved.values()) == math.prod(batch_shape) * r * x.element_size()
    assert x.untyped_storage().data_ptr() not in saved

    gy = torch.randn_like(y)
    y.backward(gy)
    grad_p, grad_x = layer.paca_weight.grad, x.grad
    assert grad_p.shape == (d_out, r) and grad_p.dtype == dtype
    assert grad_x.shape == x.shape and grad_x.dtype == dtype
    assert torch.isfinite(grad_p).all() and torch.isfinite(grad_x).all()
    assert layer.weight.grad is None and (layer.bias is None or layer.bias.grad is None)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["paca_weight"]

    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    gy32 = gy.float().reshape(-1, d_out)
    x32 = x.detach().float().reshape(-1, d_in)
    want_p = layer.scaling * (gy32.t() @ x32)[:, idx]
    want_x = (gy32 @ w0.float()).reshape(x.shape)
    torch.testing.assert_close(grad_p.float(), want_p, rtol=tol, atol=tol)
    torch.testing.assert_close(grad_x.float(), want_x, rtol=tol, atol=tol)


def test_input_without_grad_still_trains_columns():
    torch.manual_seed(0)
    layer = PacaLinear(nn.Linear(16, 8), 3, 6.0, torch.tensor([1, 2, 9]))
    x = torch.randn(4, 16)
    y = layer(x)
    assert y.requires_grad
    y.sum().backward()
    want = layer.scaling * (torch.ones(4, 8).t() @ x)[:, layer.indices]
    torch.testing.assert_close(layer.paca_weight.grad, want)


# ---------------------------------------------------------------- 5. no stale columns


def test_next_forward_after_step_uses_new_columns_with_grad_accumulation(make_llama):
    base = make_llama()
    model = get_paca_model(copy.deepcopy(base), cfg())
    layers = paca_layers(model)
    opt = torch.optim.AdamW(trainable(model), lr=1e-2)

    # Accumulated gradient == sum of the micro-batch gradients.
    singles = []
    for seed in (0, 1):
        probe = copy.deepcopy(model)
        loss_of(probe, batch(seed)).backward()
        singles.append({n: l.paca_weight.grad for n, l in paca_layers(probe).items()})

    for micro in range(2):
        n_copies, _ = index_copies(lambda: loss_of(model, batch(micro)).backward())
        assert n_copies == 0  # nothing changed yet: no column write
    for name, layer in layers.items():
        torch.testing.assert_close(
            layer.paca_weight.grad, singles[0][name] + singles[1][name], rtol=1e-5, atol=1e-8
        )
    # The step writes each layer's columns once, at once: the weight is current before any
    # forward (so state_dict() and checkpoints are too).
    n_copies, shapes = index_copies(opt.step)
    assert n_copies == len(layers)
    assert sorted(shapes) == sorted(tuple(l.weight.shape) for l in layers.values())
    assert_columns_synced(model)
    opt.zero_grad()

    probe = batch(7)
    n_copies, _ = index_copies(lambda: logits_of(model, probe))
    assert n_copies == 0
    expected = plain_with_columns(base, model)
    assert torch.equal(logits_of(model, probe), logits_of(expected, probe))
    assert not torch.equal(logits_of(model, probe), logits_of(base, probe))


def test_single_layer_forward_after_step_is_plain_linear_with_new_columns():
    torch.manual_seed(0)
    layer = PacaLinear(nn.Linear(16, 8), 4, 8.0, torch.tensor([0, 5, 6, 15]))
    w0 = layer.weight.detach().clone()
    opt = torch.optim.SGD([layer.paca_weight], lr=0.5)
    x = torch.randn(3, 16)
    for _ in range(3):
        opt.zero_grad()
        layer(x).pow(2).sum().backward()
        opt.step()
        w = w0.clone()
        w[:, layer.indices] = layer.paca_weight.detach() * layer.scaling
        y = layer(x)
        assert torch.equal(layer.weight.detach(), w)
        assert torch.equal(y.detach(), F.linear(x, w, layer.bias))


def test_no_column_write_without_change_and_one_per_layer_after_step(make_llama):
    model = get_paca_model(make_llama(), cfg())
    n_layers = len(paca_layers(model))
    opt = torch.optim.SGD(trainable(model), lr=0.1)

    def two_forwards():
        for seed in (0, 1):
            loss_of(model, batch(seed)).backward()

    assert index_copies(two_forwards)[0] == 0
    opt.zero_grad()  # zeroing gradients does not touch the columns
    assert index_copies(two_forwards)[0] == 0
    assert index_copies(opt.step)[0] == n_layers
    assert index_copies(lambda: loss_of(model, batch(2)).backward())[0] == 0
    assert index_copies(lambda: loss_of(model, batch(3)).backward())[0] == 0
    with torch.no_grad():
        assert index_copies(lambda: model(input_ids=batch(4)))[0] == 0


def test_in_place_write_without_optimizer_reaches_the_weight(make_llama):
    """The documented fallback: an in-place write of paca_weight outside any optimizer step
    (it bumps the version counter) reaches W by the next forward or state_dict()."""
    base = make_llama()
    model = get_paca_model(copy.deepcopy(base), cfg())
    layers = paca_layers(model)
    with torch.no_grad():
        for layer in layers.values():
            layer.paca_weight.mul_(1.5)
    full = model.get_base_model().state_dict()
    for name, layer in layers.items():
        want = (layer.paca_weight.detach() * layer.scaling)
        assert torch.equal(full[f"{name}.weight"][:, layer.indices], want), name
    with torch.no_grad():
        for layer in layers.values():
            layer.paca_weight.mul_(0.5)
    probe = batch(9)
    assert index_copies(lambda: logits_of(model, probe))[0] == len(layers)
    assert torch.equal(logits_of(model, probe), logits_of(plain_with_columns(base, model), probe))


def test_train_eval_switches_see_new_columns(make_llama):
    base = make_llama()
    model = get_paca_model(copy.deepcopy(base), cfg())
    probe = batch(9)
    for step in range(2):
        model.train()
        sgd_steps(model, 1, lr=0.2, first_seed=step)
        # First forward after the step is an eval forward without autograd.
        model.eval()
        with torch.no_grad():
            n, _ = index_copies(lambda: model(input_ids=probe))
            eval_logits = model(input_ids=probe).logits
        assert n == 0  # written by the step already
        assert_columns_synced(model)
        expected = plain_with_columns(base, model).eval()
        with torch.no_grad():
            assert torch.equal(eval_logits, expected(input_ids=probe).logits)
        model.train()
        n, _ = index_copies(lambda: logits_of(model, probe))
        assert n == 0
        assert torch.equal(logits_of(model, probe), logits_of(expected.train(), probe))


def _enable_checkpointing(model, kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        assert model.is_gradient_checkpointing


@pytest.mark.parametrize(
    "kwargs", [None, {"use_reentrant": True}, {"use_reentrant": False}], ids=str
)
def test_gradient_checkpointing_same_grads_and_fresh_columns(make_llama, kwargs):
    reentrant = bool(kwargs and kwargs["use_reentrant"])  # HF's default is non-reentrant
    base = make_llama()
    plain = get_paca_model(copy.deepcopy(base), cfg())
    ckpt = get_paca_model(copy.deepcopy(base), cfg())
    _enable_checkpointing(ckpt, kwargs)
    n_layers = len(paca_layers(ckpt))
    opt_plain = torch.optim.AdamW(trainable(plain), lr=1e-2)
    opt_ckpt = torch.optim.AdamW(trainable(ckpt), lr=1e-2)
    for step in range(3):
        ids = batch(step)
        with OpRecorder() as rec:
            loss_ckpt = loss_of(ckpt, ids)
            assert loss_ckpt.requires_grad
            loss_ckpt.backward()
        # The decoder layers were recomputed in backward: one gather per PaCA linear in the
        # recompute, and one in the first forward unless it ran without autograd (reentrant).
        assert rec.count("index_select") == (1 if reentrant else 2) * n_layers
        # The columns were written by the previous step; the forward and recompute never write.
        assert rec.count("index_copy_") == 0
        # ... and that forward used the new columns (at step 0: the base model's).
        expected = base
        if step > 0:
            assert_columns_synced(ckpt)
            expected = plain_with_columns(base, ckpt)
        assert torch.equal(loss_ckpt.detach(), loss_of(expected, ids).detach())

        loss_of(plain, ids).backward()
        plain_layers = paca_layers(plain)
        for name, layer in paca_layers(ckpt).items():
            assert layer.paca_weight.grad is not None, name
            torch.testing.assert_close(
                layer.paca_weight.grad, plain_layers[name].paca_weight.grad, rtol=1e-5, atol=1e-8
            )
        opt_plain.step()
        assert index_copies(opt_ckpt.step)[0] == n_layers
        opt_plain.zero_grad()
        opt_ckpt.zero_grad()
    probe = batch(9)
    got = logits_of(ckpt, probe)
    assert torch.equal(got, logits_of(plain_with_columns(base, ckpt), probe))
    torch.testing.assert_close(got, logits_of(plain, probe), rtol=1e-4, atol=1e-5)


def test_gradient_checkpointing_without_input_grad_hook(make_llama):
    """HF's gradient_checkpointing_enable installs enable_input_require_grads for input_ids
    models. Without that hook, non-reentrant checkpointing still trains PaCA; the reentrant
    variant cannot (PyTorch: no checkpointed input requires grad -> no graph)."""
    base = make_llama()
    plain = get_paca_model(copy.deepcopy(base), cfg())
    loss_of(plain, batch(0)).backward()

    model = get_paca_model(copy.deepcopy(base), cfg())
    _enable_checkpointing(model, {"use_reentrant": False})
    model.disable_input_require_grads()
    assert not model.model.embed_tokens(batch(0)).requires_grad
    loss = loss_of(model, batch(0))
    assert loss.requires_grad
    loss.backward()
    plain_layers = paca_layers(plain)
    for name, layer in paca_layers(model).items():
        torch.testing.assert_close(
            layer.paca_weight.grad, plain_layers[name].paca_weight.grad, rtol=1e-5, atol=1e-8
        )


# ---------------------------------------------------------------- 6. op count

# Ops that launch no kernel: views, metadata, and allocation without initialisation.
FREE_OPS = {
    "view", "_unsafe_view", "reshape", "t", "transpose", "expand", "detach", "alias",
    "as_strided", "unsqueeze", "squeeze", "permute", "new_empty", "empty", "_reshape_alias",
}
GATHERS = {"index_select", "gather", "index", "take"}
GEMMS = {"mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "addmv", "mv", "dot"}


@pytest.mark.parametrize("batch_shape", [(6,), (2, 3)], ids=["2d", "3d"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_op_count_vs_frozen_linear(batch_shape, bias):
    """Per training step, PaCA adds to a frozen linear (input requiring grad) at most one
    gather in forward and one out x r GEMM in backward, and nothing else that computes."""
    torch.manual_seed(0)
    d_in, d_out, r = 32, 16, 4
    frozen = nn.Linear(d_in, d_out, bias=bias).requires_grad_(False)
    layer = PacaLinear(copy.deepcopy(frozen), r, 8.0, torch.tensor([1, 5, 7, 30]))

    def step(module):
        x = torch.randn(*batch_shape, d_in, requires_grad=True)
        gy = torch.randn(*batch_shape, d_out)
        with OpRecorder() as fwd:
            y = module(x)
        with OpRecorder() as bwd:
            y.backward(gy)
        assert x.grad is not None
        return fwd, bwd

    def compute_ops(rec):
        return Counter(op for op, _ in rec.ops if op not in FREE_OPS)

    def total(counter, kinds):
        return sum(n for op, n in counter.items() if op in kinds)

    def others(counter):
        return Counter({op: n for op, n in counter.items() if op not in GATHERS | GEMMS})

    (fwd_f, bwd_f), (fwd_p, bwd_p) = step(frozen), step(layer)
    assert layer.paca_weight.grad is not None
    ff, bf, fp, bp = map(compute_ops, (fwd_f, bwd_f, fwd_p, bwd_p))
    # Forward: the same GEMMs, at most one extra gather (of r columns).
    assert total(fp, GEMMS) == total(ff, GEMMS)
    assert total(fp, GATHERS) - total(ff, GATHERS) <= 1
    assert fwd_p.shapes("index_select") == [(*batch_shape, r)]
    # Backward: no gather, at most one extra GEMM, and it is the out x r one.
    assert total(bp, GATHERS) == total(bf, GATHERS) == 0
    assert total(bp, GEMMS) - total(bf, GEMMS) <= 1
    small = [s for op, s in bwd_p.ops if op in GEMMS and s in ((d_out, r), (r, d_out))]
    assert len(small) == 1  # the out x r GEMM (computed transposed: r x out, then a view)
    # Nothing else that computes.
    assert others(fp) == others(ff), (others(fp), others(ff))
    assert others(bp) == others(bf), (others(bp), others(bf))


def test_model_step_has_one_gather_and_one_small_gemm_per_layer(make_llama):
    model = get_paca_model(make_llama(), cfg())
    layers = paca_layers(model)
    with OpRecorder() as rec:
        loss_of(model, batch(0)).backward()
    assert rec.count("index_select") == len(layers)
    small_shapes = {(l.out_features, R) for l in layers.values()}
    small_shapes |= {(R, l.out_features) for l in layers.values()}  # computed transposed
    assert sum(1 for op, s in rec.ops if op == "addmm" and s in small_shapes) == len(layers)
    assert rec.count("index_copy_") == 0


# ---------------------------------------------------------------- 7. merge, unload, save/load


@pytest.mark.parametrize("forward_before_merge", [True, False])
def test_merge_and_unload_after_training(make_llama, forward_before_merge):
    base = make_llama()
    model = get_paca_model(copy.deepcopy(base), cfg())
    sgd_steps(model, 3, lr=0.2)
    probe = batch(9)
    expected = logits_of(plain_with_columns(base, model), probe)
    if forward_before_merge:
        assert torch.equal(logits_of(model, probe), expected)
    names = list(paca_layers(model))
    merged = merge_and_unload(model)
    assert merged is model.get_base_model()
    assert not paca_layers(merged)
    modules = dict(merged.named_modules())
    for name in names:
        assert type(modules[name]) is nn.Linear, name
    assert set(merged.state_dict()) == set(base.state_dict())
    assert not any(p.requires_grad for p in merged.parameters())
    assert torch.equal(logits_of(merged, probe), expected)
    assert not torch.equal(expected, logits_of(base, probe))


@pytest.mark.parametrize("forward_before_unload", [True, False])
def test_unload_restores_base_bit_for_bit(make_llama, forward_before_unload):
    base = make_llama()
    model = get_paca_model(copy.deepcopy(base), cfg())
    sgd_steps(model, 3, lr=0.2)
    probe = batch(9)
    if forward_before_unload:
        assert not torch.equal(logits_of(model, probe), logits_of(base, probe))
    names = list(paca_layers(model))
    restored = unload(model)
    assert not paca_layers(restored)
    modules = dict(restored.named_modules())
    for name in names:
        assert type(modules[name]) is nn.Linear, name
    sd, base_sd = restored.state_dict(), base.state_dict()
    assert set(sd) == set(base_sd)
    for key in base_sd:
        assert torch.equal(sd[key], base_sd[key]), key
    assert torch.equal(logits_of(restored, probe), logits_of(base, probe))


def test_save_load_round_trip(make_llama, tmp_path):
    config = cfg(seed=3)
    model = get_paca_model(make_llama(), config)
    sgd_steps(model, 3, lr=0.2)
    probe = batch(9)
    want = logits_of(model, probe)
    path = tmp_path / "paca.safetensors"
    with pytest.deprecated_call():
        save_paca(model, path)
    with pytest.deprecated_call():
        fresh = load_paca(make_llama(), path)
    assert fresh.paca_config == config
    layers, fresh_layers = paca_layers(model), paca_layers(fresh)
    assert set(layers) == set(fresh_layers)
    for name, layer in layers.items():
        assert torch.equal(fresh_layers[name].indices, layer.indices), name
        assert torch.equal(fresh_layers[name].paca_weight, layer.paca_weight), name
        assert fresh_layers[name].paca_weight.requires_grad
    assert torch.equal(logits_of(fresh, probe), want)
    # The loaded model unloads to the base model.
    assert torch.equal(logits_of(unload(fresh), probe), logits_of(make_llama(), probe))


def test_save_load_keeps_given_indices(make_llama, tmp_path):
    """Indices that are not the seed's draw survive the round trip."""
    model = make_llama()
    targets = find_targets(model, ["q_proj", "down_proj"])
    custom = {
        name: torch.arange(lin.in_features - R, lin.in_features) for name, lin in targets.items()
    }
    model = get_paca_model(model, cfg(target_modules=["q_proj", "down_proj"]), indices=custom)
    sgd_steps(model, 1, lr=0.2)
    path = tmp_path / "paca.safetensors"
    with pytest.deprecated_call():
        save_paca(model, path)
    with pytest.deprecated_call():
        fresh = load_paca(make_llama(), path)
    for name, layer in paca_layers(fresh).items():
        assert torch.equal(layer.indices, custom[name]), name
    probe = batch(9)
    assert torch.equal(logits_of(fresh, probe), logits_of(model, probe))


def test_fused_optimizer_on_a_deep_copied_paca_model(make_llama):
    """A copy of a PaCA model (copy.deepcopy bypasses __init__) must also see fused steps."""
    base = make_llama()
    model = copy.deepcopy(get_paca_model(copy.deepcopy(base), cfg()))
    opt = torch.optim.AdamW(trainable(model), lr=1e-2, fused=True)
    loss_of(model, batch(0)).backward()
    opt.step()
    probe = batch(9)
    got = logits_of(model, probe)
    assert_columns_synced(model)
    assert torch.equal(got, logits_of(plain_with_columns(base, model), probe))


def test_load_state_dict_of_paca_weights_is_used_by_next_forward(make_llama):
    model = get_paca_model(make_llama(), cfg())
    sgd_steps(model, 2, lr=0.2)
    probe = batch(9)
    want = logits_of(model, probe)
    other = get_paca_model(make_llama(), cfg())
    only_paca = {k: v for k, v in model.state_dict().items() if k.endswith("paca_weight")}
    assert len(only_paca) == N_TARGETS
    result = other.load_state_dict(only_paca, strict=False)
    assert not result.unexpected_keys
    assert torch.equal(logits_of(other, probe), want)


def test_load_paca_onto_a_model_with_other_layers_raises(make_llama, tmp_path):
    model = get_paca_model(make_llama(), cfg())
    path = tmp_path / "paca.safetensors"
    with pytest.deprecated_call():
        save_paca(model, path)
    other = make_llama(num_hidden_layers=3)
    with pytest.raises(ValueError, match="holds layers"), pytest.deprecated_call():
        load_paca(other, path)
    assert not paca_layers(other)  # refused before any change
    with pytest.raises(ValueError, match="indices are given for layers"):
        only_one = {"model.layers.0.self_attn.q_proj": torch.arange(R)}
        get_paca_model(make_llama(), cfg(), indices=only_one)


# ---------------------------------------------------------------- 8. index selection


def test_indices_reproducible_distinct_in_range(make_llama):
    a = paca_layers(get_paca_model(make_llama(), cfg(seed=5)))
    b = paca_layers(get_paca_model(make_llama(), cfg(seed=5)))
    c = paca_layers(get_paca_model(make_llama(), cfg(seed=6)))
    assert set(a) == set(b) == set(c)
    for name in a:
        assert torch.equal(a[name].indices, b[name].indices), name
    assert sum(not torch.equal(a[n].indices, c[n].indices) for n in a) >= len(a) - 1
    # Different layers get different draws.
    assert len({tuple(l.indices.tolist()) for l in a.values()}) > 1
    for name, layer in a.items():
        idx = layer.indices
        assert idx.dtype == torch.long and idx.shape == (R,)
        assert idx.unique().numel() == R, name
        assert torch.equal(idx, idx.sort().values)
        assert 0 <= idx.min() and idx.max() < layer.in_features, name


def test_r_equal_in_features_takes_every_column(make_llama):
    model = get_paca_model(make_llama(), cfg(r=64, target_modules=["q_proj"]))
    for layer in paca_layers(model).values():
        assert torch.equal(layer.indices, torch.arange(64))


# ---------------------------------------------------------------- 9. bad configs


def _untouched(model, grads_before):
    assert not paca_layers(model)
    assert [p.requires_grad for p in model.parameters()] == grads_before


def test_unknown_target_raises_and_leaves_model_untouched(make_llama):
    model = make_llama()
    before = [p.requires_grad for p in model.parameters()]
    with pytest.raises(ValueError, match=r"no_such_proj.*match no nn.Linear.*q_proj"):
        get_paca_model(model, cfg(target_modules=["q_proj", "no_such_proj"]))
    _untouched(model, before)


@pytest.mark.parametrize("r", [0, -3])
def test_nonpositive_r_raises(r):
    with pytest.raises(ValueError, match="r must be a positive integer"):
        PacaConfig(r=r)


def test_r_larger_than_in_features_raises_and_leaves_model_untouched(make_llama):
    model = make_llama()
    before = [p.requires_grad for p in model.parameters()]
    # down_proj has 128 inputs, the others 64.
    with pytest.raises(ValueError, match=r"r=65 exceeds in_features=64"):
        get_paca_model(model, cfg(r=65))
    _untouched(model, before)
    with pytest.raises(ValueError, match=r"r=129"):
        PacaLinear(nn.Linear(128, 4), 129, 1.0, torch.arange(129))


@pytest.mark.parametrize("alpha", [0, -1.0, float("nan"), float("inf"), None])
def test_bad_alpha_raises(alpha):
    with pytest.raises(ValueError, match="alpha must be"):
        PacaConfig(alpha=alpha)


def test_empty_targets_raise():
    with pytest.raises(ValueError, match="target_modules is empty"):
        PacaConfig(target_modules=[])


# ---------------------------------------------------------------- meta device


def test_meta_device_forward_backward(make_llama):
    model = make_llama(device="meta")
    assert all(p.is_meta for p in model.parameters())
    model = get_paca_model(model, cfg())
    layers = paca_layers(model)
    assert len(layers) == N_TARGETS
    for layer in layers.values():
        assert layer.paca_weight.is_meta and layer.indices.is_meta
        assert layer.paca_weight.shape == (layer.out_features, R)
    ids = batch(0).to("meta")
    out = model(input_ids=ids, labels=ids)
    assert out.logits.is_meta and out.logits.shape == (2, 8, 256)
    out.loss.backward()
    for layer in layers.values():
        assert layer.paca_weight.grad is not None
        assert layer.paca_weight.grad.is_meta
        assert layer.paca_weight.grad.shape == (layer.out_features, R)
