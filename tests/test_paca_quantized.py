"""QPaCA (paca/quantized.py) over bitsandbytes NF4 Linear4bit, on the CPU: it equals masked
full fine-tuning of the dequantized weight, saves x[..., idx] only, and never writes the 4-bit
base."""

from __future__ import annotations


import bitsandbytes as bnb
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from paca import PacaModel, get_paca_model, inject_paca, paca_layers
from paca.quantized import QPacaLinear, dequantize, quantize_linear, quantize_targets
from paca_testing import batch, cfg, logits_of, loss_of, saved_for_backward, trainable


def linear4bit(d_in=128, d_out=64, bias=True, dtype=torch.float32):
    torch.manual_seed(0)
    return quantize_linear(nn.Linear(d_in, d_out, bias=bias).to(dtype))


def test_quantize_linear_is_qloras_nf4():
    layer = linear4bit()
    assert isinstance(layer, bnb.nn.Linear4bit)
    state = layer.weight.quant_state
    assert state.quant_type == "nf4" and state.blocksize == 64 and state.nested
    assert layer.weight.dtype == torch.uint8 and layer.weight.numel() == 128 * 64 // 2


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_qpaca_equals_masked_finetuning_of_the_dequantized_weight(bias):
    base = linear4bit(bias=bias)
    packed_before = base.weight.data.clone()
    idx = torch.tensor([3, 17, 64, 100, 127])
    layer = QPacaLinear(base, 5, 10.0, idx)  # scaling 2
    deq = dequantize(base)
    x = torch.randn(2, 6, 128, requires_grad=True)
    y, saved = saved_for_backward([layer], lambda: layer(x))
    # At initialisation: the 4-bit base model's output (P = W_deq[:, idx] / scaling).
    torch.testing.assert_close(y, F.linear(x, deq, layer.bias), rtol=1e-6, atol=1e-6)
    assert sum(n for n, _ in saved.values()) == 2 * 6 * 5 * 4  # x[..., idx] only
    # Reference: the dequantized weight with the columns as P holds them, all trainable.
    reference = nn.Linear(128, 64, bias=bias)
    with torch.no_grad():
        reference.weight.copy_(deq)
        reference.weight[:, idx] = layer.paca_weight * layer.scaling
        if bias:
            reference.bias.copy_(layer.bias)
    x_ref = x.detach().clone().requires_grad_()
    gy = torch.randn(2, 6, 64)
    y.backward(gy)
    reference(x_ref).backward(gy)
    torch.testing.assert_close(layer.paca_weight.grad, 2.0 * reference.weight.grad[:, idx],
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["paca_weight"]
    # Train: a few SGD steps move P as masked fine-tuning moves the reference's columns.
    opt = torch.optim.SGD([layer.paca_weight], lr=0.1)
    ref_cols = nn.Parameter(reference.weight.detach()[:, idx].clone())
    ref_opt = torch.optim.SGD([ref_cols], lr=0.1 * 2.0**2)  # P = W_cols / s: lr * s^2 on W
    for step in range(3):
        xs = torch.randn(4, 128)
        opt.zero_grad()
        layer(xs).pow(2).sum().backward()
        opt.step()
        reference.zero_grad()
        reference(xs).pow(2).sum().backward()
        ref_cols.grad = reference.weight.grad[:, idx].clone()
        ref_opt.step()
        with torch.no_grad():
            reference.weight[:, idx] = ref_cols
        torch.testing.assert_close(layer.paca_weight * 2.0, ref_cols, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(layer(xs), reference(xs), rtol=1e-5, atol=1e-5)
    assert torch.equal(base.weight.data, packed_before)  # the 4-bit weight is never written


def test_qpaca_in_bf16():
    layer = QPacaLinear(linear4bit(dtype=torch.bfloat16), 4, 8.0, torch.arange(4))
    assert layer.paca_weight.dtype == torch.bfloat16
    x = torch.randn(3, 128, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    y.sum().backward()
    assert layer.paca_weight.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad).all()


def test_qpaca_model_trains_saves_loads_and_unloads(make_llama, tmp_path):
    def quantized_llama():
        model = make_llama()
        targets = [n for n, m in model.named_modules() if n.endswith(("q_proj", "v_proj"))]
        quantize_targets(model, targets)
        return model

    base = quantized_llama()
    packed = {n: m.weight.data.clone() for n, m in base.named_modules()
              if isinstance(m, bnb.nn.Linear4bit)}
    model = get_paca_model(base, cfg(target_modules=["q_proj", "v_proj"]))
    layers = paca_layers(model)
    assert len(layers) == 4 and all(isinstance(l, QPacaLinear) for l in layers.values())
    opt = torch.optim.AdamW(trainable(model), lr=1e-2)
    for step in range(2):
        loss_of(model, batch(step)).backward()
        opt.step()
        opt.zero_grad()
    probe = batch(9)
    want = logits_of(model, probe)
    model.save_pretrained(tmp_path)
    fresh = PacaModel.from_pretrained(quantized_llama(), tmp_path)
    assert torch.equal(logits_of(fresh, probe), want)
    with model.disable_adapter():
        with torch.no_grad():
            disabled = model(input_ids=probe).logits
    restored = model.unload()
    for name, module in restored.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            assert torch.equal(module.weight.data, packed[name]), name  # bit for bit
    with torch.no_grad():
        assert torch.equal(restored(input_ids=probe).logits, disabled)


def test_merging_qpaca_requantizes_with_a_warning():
    base = linear4bit()
    layer = QPacaLinear(base, 4, 8.0, torch.arange(4))
    with torch.no_grad():
        layer.paca_weight.add_(0.01)
        expected = dequantize(base)
        expected[:, :4] = layer.paca_weight * layer.scaling  # the weight QPaCA computes with
    with pytest.warns(UserWarning, match="re-quantizes"):
        merged = layer.merge()
    assert isinstance(merged, bnb.nn.Linear4bit) and merged.bias is base.bias
    reference = nn.Linear(128, 64, bias=False)
    with torch.no_grad():
        reference.weight.copy_(expected)
    # Exactly NF4 of that weight: lossy (the columns lose their high precision), as in PEFT.
    assert torch.equal(dequantize(merged), dequantize(quantize_linear(reference)))
    assert not torch.equal(dequantize(merged), expected)


def test_qpaca_needs_a_quantized_linear4bit():
    with pytest.raises(TypeError, match="Linear4bit"):
        QPacaLinear(nn.Linear(8, 8), 2, 4.0, torch.arange(2))
    model = nn.Sequential(nn.Linear(16, 16))
    with pytest.raises(ValueError, match="not an nn.Linear"):
        quantize_targets(model, [""])  # the Sequential itself
    quantize_targets(model, ["0"])
    inject_paca(model, cfg(target_modules=["0"]))
    assert isinstance(model[0], QPacaLinear)


def test_a_simulated_quantization_first_leaves_real_ones_working():
    """bitsandbytes caches its double-quantization code on the device of its first call: a
    meta (simulated) quantization first must not break every later real one."""
    import subprocess
    import sys

    script = (
        "import torch, torch.nn as nn\n"
        "from paca.quantized import quantize_linear\n"
        "with torch.device('meta'):\n"
        "    simulated = quantize_linear(nn.Linear(128, 64))\n"
        "real = quantize_linear(nn.Linear(128, 64))\n"
        "assert simulated.weight.is_meta and real.weight.device.type == 'cpu'\n"
        "assert real.weight.bnb_quantized\n")
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                               timeout=300)
    assert completed.returncode == 0, completed.stderr[-1500:]
