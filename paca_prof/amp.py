"""Mixed precision (recipe amp): fp32 parameters, compute in the run's dtype under autocast.

On a real device this is torch.autocast itself. On the meta device torch's autocast does
nothing (it keys on CPU and CUDA tensors), so the simulation emulates it with a
TorchFunctionMode that applies autocast's rules at the same level autocast does, above
autograd, so that the casts are recorded in the graph and the tensors autograd saves are the
cast ones, as on a GPU:
  - the ops autocast runs in lower precision (the matrix multiplies, attention, convolutions)
    get their floating-point fp32 inputs cast to the autocast dtype;
  - a cast of a leaf tensor that requires grad (a trainable weight) is cached until the
    autocast region ends, as autocast's cast cache does; other casts are made per use;
  - the ops autocast runs in fp32 (softmax, log-softmax, the losses, the norms) get their
    half-precision inputs cast to fp32.
Limits: the op lists are those of CUDA autocast that a decoder-only transformer calls; an op
outside them runs as the tensors' dtypes say (as autocast's own "promote" rule mostly does).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

_LOWER = {
    F.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm,
    torch.Tensor.mm, torch.bmm, torch.Tensor.bmm, torch.addmm, torch.baddbmm, torch.addbmm,
    F.scaled_dot_product_attention, F.conv1d, F.conv2d, F.conv3d, torch.einsum,
}
_FP32 = {
    F.softmax, torch.softmax, torch.Tensor.softmax, F.log_softmax, torch.log_softmax,
    torch.Tensor.log_softmax, F.cross_entropy, F.nll_loss, F.layer_norm, F.group_norm,
    F.mse_loss, F.binary_cross_entropy_with_logits,
}
_HALF = (torch.float16, torch.bfloat16)


class AutocastEmulation(TorchFunctionMode):
    """torch.autocast's rules for tensors that autocast does not see (the meta device)."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype
        self._cache: dict[int, torch.Tensor] = {}

    def __exit__(self, *exc):
        self._cache.clear()
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _LOWER:
            args, kwargs = self._map((args, kwargs), self._to_lower)
        elif func in _FP32:
            args, kwargs = self._map((args, kwargs), _to_fp32)
        return func(*args, **kwargs)

    def _to_lower(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.dtype != torch.float32:
            return tensor
        if tensor.is_leaf and tensor.requires_grad:  # autocast caches these casts
            cached = self._cache.get(id(tensor))
            if cached is None:
                cached = self._cache[id(tensor)] = tensor.to(self.dtype)
            return cached
        return tensor.to(self.dtype)

    @staticmethod
    def _map(value, cast):
        if isinstance(value, torch.Tensor):
            return cast(value) if value.is_floating_point() else value
        if isinstance(value, tuple | list):
            return type(value)(AutocastEmulation._map(v, cast) for v in value)
        if isinstance(value, dict):
            return {k: AutocastEmulation._map(v, cast) for k, v in value.items()}
        return value


def _to_fp32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.float() if tensor.dtype in _HALF else tensor


def autocast(device: str, dtype: torch.dtype | None):
    """The context a step's forward and loss run in: torch.autocast on cpu and cuda, the
    emulation on meta, nothing without a dtype (amp off)."""
    if dtype is None:
        return contextlib.nullcontext()
    if device == "meta":
        return AutocastEmulation(dtype)
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)
