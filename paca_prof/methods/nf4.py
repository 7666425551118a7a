"""A simulation model of 4-bit NF4 base weights as bitsandbytes stores and uses them, for the
qlora and qpaca methods on the meta device. It holds no values and cannot run on a real device:
it reproduces the storage (bytes) and the kernels (dequantize before every matmul), which is
all a memory and kernel simulation needs.

bitsandbytes' Linear4bit (quant_type nf4, blocksize 64, double quantisation, as QLoRA uses it):
  weight    packed uint8, two 4-bit codes per byte: out*in/2 bytes
  absmax    one 8-bit quantised scale per 64-weight block: out*in/64 bytes
  nested    one fp32 scale per 256 absmax values (+ a 256-entry fp32 code table, ignored here)
  forward   W = dequantize(weight), y = x @ W.T; nothing but the quantised weight is kept for
            backward, which dequantizes again for grad_x = grad_y @ W.
QPaCA as the authors implement it (see shared/PAPER.md): the trained columns stay in high
precision; forward and backward both dequantize the full weight, overwrite the columns with
scaling * P, then multiply. Forward saves x[..., indices] only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256


@torch.library.custom_op("paca_prof::dequantize_nf4", mutates_args=())
def dequantize_nf4(weight: torch.Tensor, absmax: torch.Tensor, nested: torch.Tensor,
                   out_features: int, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """Stands for bitsandbytes' dequantize_4bit kernel; shape-only (meta device)."""
    raise NotImplementedError("paca_prof's NF4 model is for simulation on the meta device; "
                              "measured 4-bit runs need bitsandbytes on CUDA")


@dequantize_nf4.register_fake
def _(weight, absmax, nested, out_features, in_features, dtype):
    return weight.new_empty((out_features, in_features), dtype=dtype)


class _Nf4Matmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return F.linear(x, layer.dequantize(x.dtype), layer.bias)

    @staticmethod
    def backward(ctx, grad_y):
        return grad_y.matmul(ctx.layer.dequantize(grad_y.dtype)), None


class Nf4Linear(nn.Linear):
    """An nn.Linear whose weight is stored as bitsandbytes NF4 (see the module docstring).

    It subclasses nn.Linear so that PEFT wraps it as it wraps bitsandbytes' Linear4bit."""

    def __init__(self, base: nn.Linear):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        numel = base.in_features * base.out_features
        device = base.weight.device
        blocks = math.ceil(numel / BLOCKSIZE)
        self.weight = nn.Parameter(torch.empty(math.ceil(numel / 2), 1, dtype=torch.uint8,
                                               device=device), requires_grad=False)
        self.register_buffer("absmax", torch.empty(blocks, dtype=torch.uint8, device=device))
        self.register_buffer("nested_absmax", torch.empty(
            math.ceil(blocks / NESTED_BLOCKSIZE), dtype=torch.float32, device=device))
        self.bias = base.bias
        self.compute_dtype = base.weight.dtype

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_nf4(self.weight, self.absmax, self.nested_absmax,
                              self.out_features, self.in_features, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Nf4Matmul.apply(x, self)


class _QPacaFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, paca_weight, layer):
        ctx.layer = layer
        partial_x = x.index_select(-1, layer.indices)
        ctx.save_for_backward(partial_x)
        return F.linear(x, layer.weight_with_columns(x.dtype), layer.bias)

    @staticmethod
    def backward(ctx, grad_y):
        (partial_x,) = ctx.saved_tensors
        layer = ctx.layer
        grad_x = grad_y.matmul(layer.weight_with_columns(grad_y.dtype))
        grad_y_2d = grad_y.reshape(-1, grad_y.shape[-1])
        grad_p = torch.addmm(grad_y_2d.new_empty(()), grad_y_2d.t(),
                             partial_x.reshape(-1, partial_x.shape[-1]),
                             beta=0, alpha=layer.scaling)
        return grad_x, grad_p, None


class QPacaLinear(nn.Module):
    """QPaCA on an NF4 base weight: trains r input columns kept in the compute dtype."""

    def __init__(self, base: Nf4Linear, r: int, alpha: float, indices: torch.Tensor):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.bias = base.bias
        self.scaling = alpha / r
        self.register_buffer("indices", indices.to(base.weight.device))
        self.paca_weight = nn.Parameter(torch.empty(
            base.out_features, r, dtype=base.compute_dtype, device=base.weight.device))

    def weight_with_columns(self, dtype: torch.dtype) -> torch.Tensor:
        weight = self.base.dequantize(dtype)
        columns = (self.paca_weight * self.scaling).to(dtype)
        return weight.index_copy_(1, self.indices, columns)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return _QPacaFn.apply(x, self.paca_weight, self)
        return F.linear(x, self.weight_with_columns(x.dtype), self.bias)


def quantize_targets(model: nn.Module, targets: dict[str, nn.Linear]) -> dict[str, Nf4Linear]:
    """Replace the given linears by Nf4Linear (in place); returns the new modules by path."""
    replaced = {}
    for path, linear in targets.items():
        parent_path, _, leaf = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        replaced[path] = Nf4Linear(linear)
        setattr(parent, leaf, replaced[path])
    return replaced
