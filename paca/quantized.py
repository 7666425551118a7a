"""QPaCA: PaCA over bitsandbytes 4-bit base layers (nn.Linear4bit), as the authors implement it.

The base weight stays 4-bit (NF4, blocksize 64, double quantisation, as QLoRA quantises it:
quantize_linear below) and is never written. The r trained columns stay in high precision, in
paca_weight (out x r, the dtype the weight was quantised from). Forward and backward each
dequantize the full weight, overwrite its columns with scaling * paca_weight, then multiply,
so no forward can run on stale columns and nothing needs a write after an optimizer step.
Forward saves x[..., indices] only (besides references to the packed weight and paca_weight).

Runs wherever bitsandbytes runs: its 0.50 release dequantizes on the CPU with torch 2.13 (and
on CUDA). The meta-device simulation of 4-bit weights is paca_prof/quant.py's, not this.

Limits: merge() re-quantizes the merged weight, which is lossy (as in PEFT and the authors'
code); unmerge() returns the untouched base layer. Compute runs in the input's dtype.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from paca.layer import PacaLayer, check_layer_state

BLOCKSIZE = 64


def _bnb():
    try:
        import bitsandbytes
        import bitsandbytes.functional
    except ImportError as error:
        raise ValueError(f"QPaCA needs bitsandbytes (pip install bitsandbytes): {error}") from None
    return bitsandbytes


def quantize_linear(linear: nn.Linear) -> nn.Module:
    """A bitsandbytes Linear4bit holding `linear`'s weight as NF4 (blocksize 64, double
    quantisation: QLoRA's settings), on the linear's device; the bias is shared."""
    bnb = _bnb()
    weight = linear.weight
    quantized = bnb.nn.Linear4bit(
        linear.in_features, linear.out_features, bias=linear.bias is not None,
        compute_dtype=weight.dtype, compress_statistics=True, quant_type="nf4",
        device="meta",
    )
    if weight.is_meta:  # shapes only (simulation): bitsandbytes' fake kernels quantize them
        _keep_qmap_off_meta(bnb)
        packed, state = bnb.functional.quantize_4bit(
            weight.detach(), blocksize=BLOCKSIZE, compress_statistics=True, quant_type="nf4")
        quantized.weight = bnb.nn.Params4bit(
            packed, requires_grad=False, quant_state=state, blocksize=BLOCKSIZE,
            compress_statistics=True, quant_type="nf4", module=quantized, bnb_quantized=True)
        quantized.bias = linear.bias
        return quantized
    quantized.weight = bnb.nn.Params4bit(
        weight.detach().to("cpu").clone(), requires_grad=False, blocksize=BLOCKSIZE,
        compress_statistics=True, quant_type="nf4", module=quantized,
    )
    quantized.bias = linear.bias
    return quantized.to(weight.device)  # .to() quantizes


def _keep_qmap_off_meta(bnb) -> None:
    """bitsandbytes caches its double-quantization code (functional.name2qmap["dynamic"]) on the
    device of the first call; were that the meta device, every later real quantization in the
    process would fail ("Cannot copy out of meta tensor"). Make it on the CPU first."""
    qmaps = bnb.functional.name2qmap
    if "dynamic" not in qmaps:
        with torch.device("cpu"):  # also under a meta default device
            qmaps["dynamic"] = bnb.functional.create_dynamic_map()


def dequantize(layer: nn.Module) -> torch.Tensor:
    """The full weight of a Linear4bit, dequantized (out x in, its original dtype)."""
    weight = layer.weight
    return _bnb().functional.dequantize_4bit(weight.data, weight.quant_state)


class _QPacaFn(torch.autograd.Function):
    """y = x @ W'.T + b, W' = dequantized W with W'[:, indices] = scaling * paca_weight."""

    @staticmethod
    def forward(ctx, x, paca_weight, packed, quant_state, bias, indices, scaling):
        partial_x = x.index_select(-1, indices)
        weight = _with_columns(packed, quant_state, paca_weight, indices, scaling, x.dtype)
        y = F.linear(x, weight, bias.to(x.dtype) if bias is not None else None)
        if partial_x.dtype != y.dtype:
            partial_x = partial_x.to(y.dtype)
        ctx.save_for_backward(partial_x, paca_weight, packed, indices)
        ctx.quant_state, ctx.scaling = quant_state, scaling
        return y

    @staticmethod
    def backward(ctx, grad_y):
        partial_x, paca_weight, packed, indices = ctx.saved_tensors
        grad_x = grad_p = None
        if ctx.needs_input_grad[0]:
            weight = _with_columns(packed, ctx.quant_state, paca_weight, indices, ctx.scaling,
                                   grad_y.dtype)
            grad_x = grad_y.matmul(weight)
        if ctx.needs_input_grad[1]:
            grad_p = torch.addmm(
                partial_x.new_empty(()),
                partial_x.reshape(-1, partial_x.shape[-1]).t(),
                grad_y.reshape(-1, grad_y.shape[-1]),
                beta=0,
                alpha=ctx.scaling,
            ).t().to(paca_weight.dtype)
        return grad_x, grad_p, None, None, None, None, None


def _with_columns(packed, quant_state, paca_weight, indices, scaling, dtype) -> torch.Tensor:
    weight = _bnb().functional.dequantize_4bit(packed, quant_state).to(dtype)
    columns = (paca_weight.detach() * scaling).to(dtype)
    return weight.index_copy_(1, indices, columns)


class QPacaLinear(PacaLayer):
    """Replaces a bitsandbytes Linear4bit (kept, untouched, as `base_layer`); trains the input
    columns `indices` in high precision. See the module docstring."""

    def __init__(self, base: nn.Module, r: int, alpha: float, indices: torch.Tensor):
        super().__init__()
        bnb = _bnb()
        if not isinstance(base, bnb.nn.Linear4bit):
            raise TypeError(
                f"QPacaLinear wraps bitsandbytes' Linear4bit, got {type(base).__name__}")
        if getattr(base.weight, "quant_state", None) is None:
            raise ValueError("the Linear4bit is not quantized yet (move it to a device first)")
        if not 0 < r <= base.in_features:
            raise ValueError(f"PaCA rank r={r} must be in 1..in_features={base.in_features}")
        self.base_layer = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r = r
        self.alpha = alpha
        self.scaling = alpha / r
        base.requires_grad_(False)
        indices = indices.to(device=base.weight.device, dtype=torch.long)
        self.register_buffer("indices", indices)
        # As the authors initialise it: from the dequantized weight, so that at initialisation
        # the output is exactly the 4-bit base model's.
        columns = dequantize(base).index_select(1, indices)
        self.paca_weight = nn.Parameter((columns / self.scaling).t().contiguous().t())
        self._enabled = True

    @property
    def bias(self):
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        if not self._enabled:
            weight = dequantize(base).to(x.dtype)
            return F.linear(x, weight, None if base.bias is None else base.bias.to(x.dtype))
        if self.paca_weight.requires_grad and torch.is_grad_enabled():
            return _QPacaFn.apply(x, self.paca_weight, base.weight.data, base.weight.quant_state,
                                  base.bias, self.indices, self.scaling)
        weight = _with_columns(base.weight.data, base.weight.quant_state, self.paca_weight,
                               self.indices, self.scaling, x.dtype)
        return F.linear(x, weight, None if base.bias is None else base.bias.to(x.dtype))

    # Nothing is ever written into the 4-bit weight: these keep PacaLayer's interface.
    def sync_columns(self) -> None:
        pass

    def _after_optimizer_step(self, stepped: set[int]) -> None:
        pass

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        check_layer_state(self, state_dict, prefix)  # other indices: taken over (base untouched)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def set_enabled(self, enabled: bool) -> None:
        self._enabled = enabled

    def merge(self) -> nn.Module:
        """A Linear4bit re-quantized from the dequantized weight with the trained columns
        (lossy: the columns lose their high precision)."""
        warnings.warn("merging QPaCA re-quantizes the weight to 4 bits, which rounds the trained "
                      "columns", UserWarning, stacklevel=2)
        base = self.base_layer
        with torch.no_grad():
            weight = dequantize(base)
            weight[:, self.indices] = (self.paca_weight * self.scaling).to(weight.dtype)
        linear = nn.Linear(self.in_features, self.out_features, bias=False, device="meta")
        linear.weight = nn.Parameter(weight, requires_grad=False)
        merged = quantize_linear(linear)
        merged.bias = base.bias
        self._enabled = False
        return merged

    def unmerge(self) -> nn.Module:
        """The base Linear4bit, never written: the base model bit for bit."""
        self._enabled = False
        return self.base_layer

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"scaling={self.scaling:g}, nf4")


def quantize_targets(model: nn.Module, paths: list[str]) -> dict[str, nn.Module]:
    """Replace the nn.Linear modules at `paths` by NF4 Linear4bit (in place), as a QLoRA or
    QPaCA run quantizes its targets; returns the new modules by path."""
    replaced = {}
    for path in paths:
        linear = model.get_submodule(path)
        if type(linear) is not nn.Linear:
            raise ValueError(f"{path} is a {type(linear).__name__}, not an nn.Linear")
        parent_path, _, leaf = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        replaced[path] = quantize_linear(linear)
        setattr(parent, leaf, replaced[path])
    return replaced
