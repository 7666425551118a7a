"""PacaLinear: a linear layer whose r selected input columns are trainable.

Forward is one GEMM with the full weight W, which holds the trained columns. Backward computes
the input gradient as a frozen linear does, plus one small GEMM for the trained columns, from
the partial activation x[..., indices] (B*L*r values) that forward saved. The full input is
never saved. On a CPU the same autograd function runs compiled (paca/compiled.py).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from paca.compiled import partial_connection_op

# Every live PacaLinear, for the optimizer hook below.
_LIVE_LAYERS: "weakref.WeakSet[PacaLinear]" = weakref.WeakSet()


def _mark_stepped_layers(optimizer, args, kwargs) -> None:
    """Global optimizer step post hook: mark the layers whose paca_weight this optimizer holds.

    Fused optimizers (torch.optim.AdamW(fused=True), HF Trainer's default "adamw_torch_fused")
    update the parameters without bumping their version counter, so the version check alone
    would keep forwarding with the old columns.
    """
    if not _LIVE_LAYERS:
        return
    stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for layer in list(_LIVE_LAYERS):
        if id(layer.paca_weight) in stepped:
            layer.mark_columns_changed()


register_optimizer_step_post_hook(_mark_stepped_layers)


class PartialConnectionFn(torch.autograd.Function):
    """y = x @ W.T + b, with the gradient routed to P = W[:, indices] / scaling.

    paca_weight is an input only so that autograd sends its gradient there; the forward
    reads the columns from W, which PacaLinear keeps equal to scaling * paca_weight.
    """

    @staticmethod
    def forward(ctx, x, paca_weight, weight, bias, indices, scaling):
        # Gathered before the GEMM, while x is still in cache: the one extra forward kernel.
        partial_x = x.index_select(-1, indices)
        y = F.linear(x, weight, bias)
        if partial_x.dtype != y.dtype:
            # Autocast: F.linear (and so grad_y) runs in the autocast dtype while backward runs
            # outside autocast. Keep the r columns in that dtype, which is also what a frozen
            # linear saves under autocast (the cast input), here for r columns only.
            partial_x = partial_x.to(y.dtype)
        ctx.save_for_backward(partial_x, weight)
        ctx.scaling = scaling
        return y

    @staticmethod
    def backward(ctx, grad_y):
        partial_x, weight = ctx.saved_tensors
        needs_grad_x, needs_grad_p = ctx.needs_input_grad[:2]
        grad_x = grad_p = None
        if needs_grad_x:
            if weight.dtype != grad_y.dtype:
                # Autocast: cast here rather than save a cast copy of the weight in forward.
                weight = weight.to(grad_y.dtype)
            grad_x = grad_y.matmul(weight)
        if needs_grad_p:
            # One GEMM (K = B*L): beta=0 ignores the uninitialised input, and alpha=scaling
            # applies dL/dP = scaling * dL/dW[:, indices] without another kernel. Computed as
            # (x_idx^T @ grad_y)^T: the same values, in the orientation BLAS runs ~2x faster,
            # and already in paca_weight's column-major layout.
            grad_p = torch.addmm(
                partial_x.new_empty(()),
                partial_x.reshape(-1, partial_x.shape[-1]).t(),
                grad_y.reshape(-1, grad_y.shape[-1]),
                beta=0,
                alpha=ctx.scaling,
            ).t()
        return grad_x, grad_p, None, None, None, None


class PacaLinear(nn.Module):
    """Replaces an nn.Linear; trains the input columns `indices` of its weight.

    Attributes:
        weight: the full frozen weight (out x in), shared with the wrapped linear; forward uses it.
        bias: the frozen bias, or None.
        indices: LongTensor (r,) of the trained input features, sorted.
        paca_weight: trainable Parameter (out x r, column-major), initialised to
            W[:, indices] / scaling.
        scaling: alpha / r.

    Invariant: every forward uses W[:, indices] == scaling * paca_weight as of the latest change
    to paca_weight. The columns are written into W lazily, on the first forward after
    paca_weight's version counter moved (an optimizer step, a load), so gradient accumulation,
    gradient checkpointing's recompute and eval forwards never see stale columns and cost no copy.
    At initialisation W is left untouched, so the model's output is exactly the base model's.

    Steps of torch.optim optimizers, fused ones included (they do not bump the version
    counter), also mark the columns changed, through a global optimizer step post hook.

    Limits: paca_weight has the weight's dtype; code that replaces the Parameter's storage, or
    writes it without a version bump (through `.data`, or an optimizer that is not a
    torch.optim.Optimizer), must call `mark_columns_changed()`.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, indices: torch.Tensor):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"PacaLinear wraps nn.Linear, got {type(base).__name__}")
        if not 0 < r <= base.in_features:
            raise ValueError(f"PaCA rank r={r} must be in 1..in_features={base.in_features}")
        if indices.shape != (r,):
            raise ValueError(f"indices must have shape ({r},), got {tuple(indices.shape)}")
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.r = r
        self.scaling = alpha / r
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        indices = indices.to(device=self.weight.device, dtype=torch.long)
        self.register_buffer("indices", indices)
        original = self.weight.detach().index_select(1, indices)
        # Kept to unmerge exactly; out x r, the size of paca_weight itself.
        self.register_buffer("original_columns", original.clone(), persistent=False)
        # Stored column-major (the transpose of a contiguous r x out tensor): the grad GEMM
        # produces that layout, so accumulating the gradient needs no copy.
        self.paca_weight = nn.Parameter((original / self.scaling).t().contiguous().t())
        self._synced_version = self.paca_weight._version
        _LIVE_LAYERS.add(self)

    def __setstate__(self, state):  # copy.deepcopy and unpickling bypass __init__
        super().__setstate__(state)
        _LIVE_LAYERS.add(self)

    def mark_columns_changed(self) -> None:
        """Force the next forward to write scaling * paca_weight into W."""
        # Through __dict__: nn.Module.__setattr__ costs microseconds, and this runs per step.
        self.__dict__["_synced_version"] = -1

    def sync_columns(self) -> None:
        """Write scaling * paca_weight into W[:, indices] if paca_weight changed since last time."""
        paca_weight = self.paca_weight
        version = paca_weight._version
        if version == self._synced_version:
            return
        weight = self.weight
        # detach(), not torch.no_grad(): the same effect on this path for less Python per step.
        columns = paca_weight.detach()
        if self.scaling != 1.0:
            columns = columns * self.scaling
        if columns.dtype != weight.dtype:
            columns = columns.to(weight.dtype)
        weight.detach().index_copy_(1, self.indices, columns)
        self.__dict__["_synced_version"] = version

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        paca_weight = self.paca_weight  # one Module.__getattr__ lookup, not three
        if paca_weight._version != self._synced_version:  # cheap check before the call
            self.sync_columns()
        if paca_weight.requires_grad and torch.is_grad_enabled():
            args = (x, paca_weight, self.weight, self.bias, self.indices, self.scaling)
            # The compiled function on CPU only: there the Python autograd.Function's own cost is
            # a large share of PaCA's overhead. On a GPU it hides behind the queued kernels (and
            # the compiled one is unchecked there); on meta, simulation needs no C++ build.
            if x.device.type == "cpu" and (compiled := partial_connection_op()) is not None:
                return compiled(*args)
            return PartialConnectionFn.apply(*args)
        return F.linear(x, self.weight, self.bias)

    def merge(self) -> nn.Linear:
        """A plain nn.Linear holding the trained columns (shares the weight storage)."""
        self.sync_columns()
        return self._as_linear(self.weight)

    def unmerge(self) -> nn.Linear:
        """A plain nn.Linear with the original, pre-training weight restored bit for bit."""
        with torch.no_grad():
            self.weight.index_copy_(1, self.indices, self.original_columns)
        self.mark_columns_changed()
        return self._as_linear(self.weight)

    def _as_linear(self, weight: nn.Parameter) -> nn.Linear:
        linear = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, device="meta"
        )
        linear.weight = weight
        linear.bias = self.bias
        return linear

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"r={self.r}, scaling={self.scaling:g}, bias={self.bias is not None}"
        )
