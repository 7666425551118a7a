"""The optimizer of a training step, as the recipe names it (recipe.OPTIMIZERS), built from the
libraries people train with: torch.optim (AdamW, SGD, Adafactor) and bitsandbytes (AdamW8bit,
PagedAdamW8bit), on a real device and on the meta device alike (bitsandbytes registers fake
kernels for its updates; its 8-bit states are allocated there as on a GPU).

Paged states. PagedAdamW8bit keeps the state of a tensor of at least 1e5 values in CUDA unified
memory (cudaMallocManaged), outside PyTorch's caching allocator: resident on the GPU while it
fits, paged to host memory under pressure. It is counted where it lives: not in the step's
peak (the allocator's memory) but as paged_bytes beside it. On the meta device bitsandbytes
cannot allocate unified memory, so the simulation allocates those states as meta tensors marked
`is_paged` (bitsandbytes' own mark), with bitsandbytes' threshold; on a CPU bitsandbytes falls
back to plain states itself.
"""

from __future__ import annotations

import functools

import torch

PAGED_MIN_NUMEL = 1e5  # bitsandbytes' Optimizer8bit.get_state_buffer


def make_optimizer(name: str, params: list, lr: float, device: str):
    """The optimizer `name` over `params` (None when nothing trains). foreach follows torch's
    default of the device a run stands for: the for-loop on a CPU, foreach on a GPU (the meta
    device stands for one)."""
    if not params:
        return None
    foreach = None if device == "cpu" else True
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, foreach=foreach)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, foreach=foreach)
    if name == "adafactor":
        return torch.optim.Adafactor(params, lr=lr, foreach=foreach)
    if name in ("adamw-8bit", "paged-adamw-8bit"):
        import bitsandbytes as bnb

        if name == "adamw-8bit":
            return bnb.optim.AdamW8bit(params, lr=lr)
        cls = _meta_paged_class() if device == "meta" else bnb.optim.PagedAdamW8bit
        return cls(params, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}")


@functools.cache
def _meta_paged_class():
    """PagedAdamW8bit for the meta device: bitsandbytes' optimizer, its paged state buffers
    made as meta tensors marked is_paged (see the module docstring)."""
    import bitsandbytes as bnb

    class MetaPagedAdamW8bit(bnb.optim.PagedAdamW8bit):
        def get_state_buffer(self, p, dtype=torch.float32):
            buffer = torch.zeros_like(p, dtype=dtype, device=p.device)
            if self.is_paged and p.numel() >= PAGED_MIN_NUMEL:
                buffer.is_paged = True
            return buffer

        def prefetch_state(self, p):
            pass  # moving pages to the GPU ahead of the update: no memory to simulate

    return MetaPagedAdamW8bit
