"""PacaLinear: a linear layer whose r selected input columns are trainable.

Forward is one GEMM with the full weight W, which holds the trained columns. Backward computes
the input gradient as a frozen linear does, plus one small GEMM for the trained columns, from
the partial activation x[..., indices] (B*L*r values) that forward saved. The full input is
never saved. On a CPU the same autograd function runs compiled (paca/compiled.py).

The columns are written into W right after each optimizer step (paca/hooks.py), when a state
dict is loaded, and on unmerge/enable, never inside a forward that torch.compile traces.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from paca import hooks
from paca.compiled import partial_connection_op


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (FSDP2's sharded parameters), or the tensor itself."""
    return getattr(tensor, "_local_tensor", tensor)


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


class PacaLayer(nn.Module):
    """What every PaCA layer is (PacaLinear; QPacaLinear over 4-bit weights, paca/quantized.py):
    r trained input columns `indices`, held in `paca_weight` (out x r) with `scaling`, and
    sync_columns(), set_enabled(), merge() and unmerge(). paca_layers() finds them by this type.
    """

    def _same_indices(self, indices: torch.Tensor) -> bool:
        if indices.is_meta or self.indices.is_meta:  # no values to compare: shapes only
            return True
        return torch.equal(indices.to(device=self.indices.device, dtype=torch.long), self.indices)


class PacaLinear(PacaLayer):
    """Replaces an nn.Linear; trains the input columns `indices` of its weight.

    Attributes:
        weight: the full frozen weight (out x in), shared with the wrapped linear; forward uses it.
        bias: the frozen bias, or None.
        indices: LongTensor (r,) of the trained input features (sorted when PaCA draws them).
        paca_weight: trainable Parameter (out x r, column-major), initialised to
            W[:, indices] / scaling.
        scaling: alpha / r.

    Invariant: W[:, indices] == scaling * paca_weight after every torch.optim step that holds
    paca_weight (fused ones included), every load_state_dict, and every eager forward, so
    forwards, state_dict() and checkpoints always see the latest step. At initialisation W is left
    untouched, so the model's output is exactly the base model's. original_columns keeps the
    base columns, so unmerge() restores the base weight bit for bit.

    Writes of paca_weight outside an optimizer step: an in-place write (it bumps the version
    counter) is picked up by the next eager forward or state_dict(). A write that bumps no
    version (through `.data`), an optimizer that is not a torch.optim.Optimizer, or any write
    followed by a torch.compile'd forward (compiled forwards never write W) needs
    `sync_columns()` (or paca.sync_columns(model)) before the next forward.
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
        self.alpha = alpha
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
        self._synced_param = id(self.paca_weight)  # the parameter object that version is of
        self._enabled = True
        hooks.subscribe(self)

    def __setstate__(self, state):  # copy.deepcopy and unpickling bypass __init__
        super().__setstate__(state)
        if "paca_weight" in self._parameters:
            self.__dict__["_synced_param"] = id(self._parameters["paca_weight"])
        hooks.subscribe(self)

    # ------------------------------------------------------------------ the columns in W

    def sync_columns(self) -> None:
        """Write scaling * paca_weight into W[:, indices] (not while the adapter is disabled)."""
        paca_weight = self.paca_weight
        if self._enabled:
            # Sharded by FSDP2 (DTensors, both on dim 0: the same rows on every rank): each
            # rank writes its own rows (paca/distributed.py).
            weight = local_tensor(self.weight)
            # detach(), not torch.no_grad(): the same effect on this path for less Python.
            columns = local_tensor(paca_weight).detach()
            if self.scaling != 1.0:
                columns = columns * self.scaling
            if columns.dtype != weight.dtype:
                columns = columns.to(weight.dtype)
            weight.detach().index_copy_(1, self.indices, columns)
        # Through __dict__: nn.Module.__setattr__ costs microseconds, and this runs per step.
        self.__dict__["_synced_version"] = paca_weight._version
        self.__dict__["_synced_param"] = id(paca_weight)

    def mark_columns_changed(self) -> None:
        """Deprecated spelling of sync_columns() (the write used to wait for the next forward)."""
        self.sync_columns()

    def _after_optimizer_step(self, stepped: set[int]) -> None:
        if id(self.paca_weight) in stepped:
            self.sync_columns()

    def _sync_if_written(self) -> None:
        if self.paca_weight._version != self._synced_version:
            self.sync_columns()

    def _restore_base_columns(self) -> None:
        self.weight.detach().index_copy_(1, self.indices, self.original_columns)

    # ------------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        paca_weight = self.paca_weight  # one Module.__getattr__ lookup, not three
        # The fallback for in-place writes outside an optimizer step; never traced by compile.
        # Only for the parameter last synced: under FSDP2 the forward sees the gathered copy,
        # whose version every all-gather bumps; the sharded one is synced after each step.
        if not torch.compiler.is_compiling() and paca_weight._version != self._synced_version \
                and id(paca_weight) == self.__dict__.get("_synced_param", id(paca_weight)):
            self.sync_columns()
        if self._enabled and paca_weight.requires_grad and torch.is_grad_enabled():
            args = (x, paca_weight, self.weight, self.bias, self.indices, self.scaling)
            # The compiled function on CPU only: there the Python autograd.Function's own cost is
            # a large share of PaCA's overhead. On a GPU it hides behind the queued kernels (and
            # the compiled one is unchecked there); on meta, simulation needs no C++ build.
            if x.device.type == "cpu" and (compiled := partial_connection_op()) is not None:
                if torch.compiler.is_compiling():  # the same function, as a traceable operator
                    return torch.ops.paca.partial_connection.default(*args)
                return compiled(*args)
            return PartialConnectionFn.apply(*args)
        return F.linear(x, self.weight, self.bias)

    # ------------------------------------------------------------------ state dict

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self._sync_if_written()  # a write without an optimizer step still reaches the weight
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        """Checks every tensor of this layer first (ValueError, nothing changed), then loads.

        - paca_weight: the trained columns; written into W.
        - indices other than this layer's: taken over when no weight comes with them (an
          adapter): the base columns are restored, the new ones snapshotted, so unload() still
          restores the base. With a weight (a full state dict trained on other columns) they
          are refused, because that weight's base columns are unknown.
        - a weight without paca_weight: a new base weight; the columns restart from it.
        """
        check_layer_state(self, state_dict, prefix)
        new_indices = state_dict.get(prefix + "indices")
        has_weight = prefix + "weight" in state_dict
        has_columns = prefix + "paca_weight" in state_dict
        with torch.no_grad():
            if new_indices is not None and not self._same_indices(new_indices):
                self._restore_base_columns()
                new_indices = new_indices.to(device=self.indices.device, dtype=torch.long)
                self.indices.copy_(new_indices)
                self.original_columns.copy_(self.weight.index_select(1, self.indices))
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                          missing_keys, unexpected_keys, error_msgs)
            if has_weight and not has_columns:
                self.original_columns.copy_(self.weight.index_select(1, self.indices))
                self.paca_weight.copy_(self.original_columns / self.scaling)
        if has_columns:
            self.sync_columns()
        elif has_weight:  # as at initialisation: W keeps the base columns exactly
            self.__dict__["_synced_version"] = self.paca_weight._version

    # ------------------------------------------------------------------ enable, merge, unmerge

    def set_enabled(self, enabled: bool) -> None:
        """Disabled: the base weight (original columns) and no trainable path; enabled again:
        the trained columns."""
        if enabled == self._enabled:
            return
        if enabled:
            self._enabled = True
            self.sync_columns()
        else:
            self._enabled = False
            with torch.no_grad():
                self._restore_base_columns()

    def merge(self) -> nn.Linear:
        """A plain nn.Linear holding the trained columns (shares the weight storage). This
        layer then writes W no more (later optimizer steps do not reach the returned linear)."""
        self.set_enabled(True)
        self.sync_columns()
        self._enabled = False
        return self._as_linear(self.weight)

    def unmerge(self) -> nn.Linear:
        """A plain nn.Linear with the original, pre-training weight restored bit for bit."""
        with torch.no_grad():
            self._restore_base_columns()
        self._enabled = False  # nothing writes the columns into the returned weight again
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


def check_layer_state(layer: PacaLayer, state_dict: dict, prefix: str) -> None:
    """Raise ValueError if the state dict's tensors for `layer` (under `prefix`) cannot be
    loaded into it; changes nothing."""
    where = prefix.rstrip(".") or type(layer).__name__
    columns = state_dict.get(prefix + "paca_weight")
    if columns is not None and tuple(columns.shape) != (layer.out_features, layer.r):
        raise ValueError(
            f"{where}: paca_weight has shape {tuple(columns.shape)}, the layer trains "
            f"({layer.out_features}, {layer.r})"
        )
    weight = state_dict.get(prefix + "weight")
    if weight is not None and tuple(weight.shape) != (layer.out_features, layer.in_features):
        raise ValueError(
            f"{where}: weight has shape {tuple(weight.shape)}, the layer's is "
            f"({layer.out_features}, {layer.in_features})"
        )
    indices = state_dict.get(prefix + "indices")
    if indices is None:
        return
    check_indices(indices, layer.r, layer.in_features, where)
    if layer._same_indices(indices):
        return
    if columns is None:
        raise ValueError(f"{where}: the state dict gives other indices but no paca_weight for them")
    if weight is not None:
        raise ValueError(
            f"{where}: the state dict holds a weight trained on other columns (indices "
            "differ), whose base columns are unknown. Load it into a PaCA model made with the "
            "same indices (same seed), or load only its adapter (paca_weight and indices, "
            "e.g. PacaModel.from_pretrained)"
        )


def check_indices(indices: torch.Tensor, r: int, in_features: int, where: str) -> None:
    """Raise ValueError unless `indices` are r distinct integers in [0, in_features)."""
    if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
        raise ValueError(f"{where}: indices must be integers, got {indices.dtype}")
    if tuple(indices.shape) != (r,):
        raise ValueError(f"{where}: indices have shape {tuple(indices.shape)}, expected ({r},)")
    if indices.device.type == "meta":
        return
    values = indices.detach().cpu().long()
    if r and (values.min() < 0 or values.max() >= in_features):
        raise ValueError(
            f"{where}: indices must lie in [0, {in_features}), got {values.min().item()}.."
            f"{values.max().item()}"
        )
    if values.unique().numel() != r:
        raise ValueError(f"{where}: indices must be distinct")
