"""The PaCA authors' own scheme (their PEFT fork's `paca` tuner), re-implemented for comparison.

It differs from PacaLinear in how the trained columns reach the weight:
- a separate trainable P (out x r), initialised to W[:, idx] / scaling, idx = randperm(in)[:r]
  from the given generator (unsorted, as theirs);
- every forward computes `P * scaling` (one extra kernel and an autograd node) and passes it
  to their autograd function, which saves only x[..., idx] (and W);
- W[:, idx] = scaling * P is copied in place on the odd-numbered training forwards of the layer
  (a counter per layer, `iterations`; with gradient_accumulation_steps g, when iterations is
  not a multiple of 2g), so without gradient checkpointing every second step runs on columns
  one optimizer step old, and eval forwards (which count too) shift the parity.

Stale forwards are counted: a forward whose GEMM ran while P had changed since the last copy
(an optimizer step, or an in-place write) is stale. Each layer exposes `stale_forwards` and
`forwards`; stale_forwards(model) sums them, so a profiled run can report how many of the
scheme's forwards (and so steps) ran on stale columns.

Use: inject_authors_paca(model, config) in place of inject_paca, for profiling and benchmarks
(the profiler's method "paca-authors", bench/bench_step.py's "authors"). It is not a training
library: there is no save, merge or unload.
"""

from __future__ import annotations

import torch
from torch import nn

from paca import hooks
from paca.config import PacaConfig
from paca.targets import select_targets


class AuthorsPacaFn(torch.autograd.Function):
    """The authors' `pacalinear`: y = x @ W.T (+ b), saves only x[..., idx] (and W).

    Gradients: grad_x = grad_y @ W; grad_P_scaled = grad_y^T @ x_idx (2-D reshapes). The
    scaling reaches P through the autograd `P * scaling` node the layer builds every forward.
    """

    @staticmethod
    def forward(ctx, x, weight, paca_w, bias, indices):
        out = x.matmul(weight.t())
        if bias is not None:
            out += bias
        partial_x = x[:, :, indices] if x.dim() == 3 else x[..., indices]
        ctx.save_for_backward(partial_x, weight)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        partial_x, weight = ctx.saved_tensors
        grad_x = grad_paca_w = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out.matmul(weight)
        if ctx.needs_input_grad[2]:
            grad_paca_w = grad_out.reshape(-1, grad_out.shape[-1]).t().matmul(
                partial_x.reshape(-1, partial_x.shape[-1])
            )
        return grad_x, None, grad_paca_w, None, None


class AuthorsPacaLinear(nn.Module):
    """The authors' PaCA linear, without the PEFT plumbing (see the module docstring).

    Attributes: weight, bias (shared with the wrapped linear, frozen), paca_w (trainable P),
    paca_indices, scaling, iterations (forwards so far), forwards and stale_forwards (how many
    forwards ran, and how many of them on stale columns).
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, generator: torch.Generator,
                 gradient_accumulation_steps: int = 1):
        super().__init__()
        if not 0 < r <= base.in_features:
            raise ValueError(f"PaCA rank r={r} must be in 1..in_features={base.in_features}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.r = r
        self.scaling = alpha / r
        self.gradient_accumulation_steps = gradient_accumulation_steps
        idx = torch.randperm(self.in_features, generator=generator)[:r]
        self.register_buffer("paca_indices", idx.to(self.weight.device))
        self.paca_w = nn.Parameter(self.weight.detach()[:, idx].clone() / self.scaling)
        self.iterations = 0
        self.forwards = 0
        self.stale_forwards = 0
        self._stale = False  # P changed since the last copy into W
        self._copied_version = self.paca_w._version
        hooks.subscribe(self)

    def __setstate__(self, state):  # copy.deepcopy and unpickling bypass __init__
        super().__setstate__(state)
        hooks.subscribe(self)

    def _after_optimizer_step(self, stepped: set[int]) -> None:
        if id(self.paca_w) in stepped:
            self.__dict__["_stale"] = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Their bookkeeping: a per-layer counter, and the copy on odd training forwards.
        self.iterations += 1
        # Ours, through __dict__ so that it adds no Module.__setattr__ cost to their scheme.
        counts = self.__dict__
        if self.training and self.iterations % (2 * self.gradient_accumulation_steps):
            with torch.no_grad():
                self.weight[:, self.paca_indices] = self.scaling * self.paca_w.to(self.weight.dtype)
            counts["_stale"] = False
            counts["_copied_version"] = self.paca_w._version
        # Counted, not prevented: a step (the hook) or an in-place write since the last copy.
        counts["forwards"] += 1
        if counts["_stale"] or self.paca_w._version != counts["_copied_version"]:
            counts["stale_forwards"] += 1
        paca_w = self.paca_w * self.scaling
        return AuthorsPacaFn.apply(x, self.weight, paca_w, self.bias, self.paca_indices)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"scaling={self.scaling:g}, forwards={self.forwards}, "
                f"stale_forwards={self.stale_forwards}")


def inject_authors_paca(model: nn.Module, config: PacaConfig,
                        gradient_accumulation_steps: int = 1) -> nn.Module:
    """Replace config's targets with AuthorsPacaLinear, in place, and freeze the rest.

    The targets are PaCA's (paca.targets.select_targets, rank and alpha patterns included);
    the columns are drawn per layer in module order from one CPU generator seeded with
    config.seed, unsorted (so they are the same draws as PaCA's, in the draw's order).
    modules_to_save is not supported (ValueError). Returns the same model.
    """
    if config.modules_to_save:
        raise ValueError("the authors' scheme here supports no modules_to_save")
    targets = select_targets(model, config)
    for param in model.parameters():
        param.requires_grad_(False)
    generator = torch.Generator().manual_seed(config.seed)
    for target in targets:
        layer = AuthorsPacaLinear(target.linear, target.r, target.alpha, generator,
                                  gradient_accumulation_steps)
        parent_path, _, leaf = target.path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, leaf, layer)
    return model


def authors_layers(model: nn.Module) -> dict[str, AuthorsPacaLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, AuthorsPacaLinear)}


def stale_forwards(model: nn.Module) -> int:
    """Forwards of the model's AuthorsPacaLinear layers that ran on stale columns, summed over
    layers (a model forward with L such layers adds up to L)."""
    return sum(layer.stale_forwards for layer in authors_layers(model).values())
