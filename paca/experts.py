"""PaCA on mixture-of-experts layers whose experts are stored as one 3-D parameter per projection.

transformers (5.x) stores the experts of Qwen3-MoE, Mixtral and their kin as one nn.Parameter
per projection, `experts.gate_up_proj` (experts x 2*intermediate x hidden) and
`experts.down_proj` (experts x hidden x intermediate), each expert's matrix laid out as an
nn.Linear weight (out x in), and multiplies them with one grouped matmul over the tokens sorted
by expert (aten::_grouped_mm, transformers' default "grouped_mm" experts implementation). No
nn.Linear exists per expert, so PacaLinear cannot wrap one.

PaCA here trains r input columns of every expert's matrix: a trainable `paca_<name>`
(experts x out x r) per 3-D parameter, W[e][:, indices] = scaling * paca[e] after every
optimizer step (paca/hooks.py), as PacaLinear keeps its columns. The grouped matmul of that
parameter runs through ExpertColumnsFn: forward is the same grouped matmul on the full W, and
saves only the r gathered input columns (tokens x r), not the input; backward computes the
input gradient as a frozen expert does and the columns' gradient with one more grouped matmul.
The experts module keeps its class and module path (its class becomes a subclass that also is
PacaExperts), so traces match the frozen model's module by module.

Limits: the same r column positions for every expert of one parameter (one draw per 3-D
parameter; the experts' own weights differ); only transformers' grouped_mm experts
implementation is intercepted (an eager per-expert loop trains nothing and says so by raising);
no merge, unmerge, save or load of the expert columns (this layer serves the profiler); the
grouped matmul's kernels need 16-byte aligned strides (r * element size a multiple of 16 on
the CPU and in CUDA's bf16 fast path).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from paca import hooks

_GROUPED = (torch._grouped_mm, *([F.grouped_mm] if hasattr(F, "grouped_mm") else []))


def find_expert_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every 3-D floating-point parameter held directly by a module (the experts' stacked
    projections), by path (model.layers.0.mlp.experts.gate_up_proj), in module order."""
    found = {}
    for path, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if param.dim() == 3 and param.is_floating_point():
                found[f"{path}.{name}".lstrip(".")] = param
    return found


def expert_suffixes(model: nn.Module) -> list[str]:
    """The expert parameters as PEFT's target_parameters name them: the module's leaf name and
    the parameter's (experts.gate_up_proj, experts.down_proj), sorted."""
    return sorted({".".join(path.split(".")[-2:]) for path in find_expert_parameters(model)})


class ExpertColumnsFn(torch.autograd.Function):
    """y = grouped_mm(x, W^T, offs), with the gradient routed to P = W[:, :, indices] / scaling.

    x: (tokens x in), sorted by expert; weight_t: W.transpose(-2, -1) (experts x in x out), as
    transformers passes it; offs: the cumulative token counts per expert. Saves x[:, indices]
    (tokens x r) only; paca_weight is an input so that autograd sends its gradient there."""

    @staticmethod
    def forward(ctx, x, paca_weight, weight_t, indices, offs, scaling):
        partial_x = x.index_select(-1, indices)
        y = torch._grouped_mm(x, weight_t, offs=offs)
        ctx.save_for_backward(partial_x, weight_t, offs)
        ctx.scaling = scaling
        return y

    @staticmethod
    def backward(ctx, grad_y):
        partial_x, weight_t, offs = ctx.saved_tensors
        needs_grad_x, needs_grad_p = ctx.needs_input_grad[:2]
        grad_x = grad_p = None
        if needs_grad_x:  # as a frozen expert: (tokens x out) @ W (experts x out x in)
            grad_x = torch._grouped_mm(grad_y, weight_t.transpose(-2, -1), offs=offs)
        if needs_grad_p:
            # per expert x_idx^T @ grad_y over its rows: (experts x r x out), i.e. the columns'
            # gradient in paca_weight's own layout (experts x out x r, r-major in memory)
            grad_p = torch._grouped_mm(partial_x.t(), grad_y, offs=offs).transpose(-2, -1)
            if ctx.scaling != 1.0:
                grad_p = grad_p * ctx.scaling
        return grad_x, grad_p, None, None, None, None


class _ColumnsSwap(TorchFunctionMode):
    """While an experts module runs: its grouped matmuls on a trained 3-D parameter go through
    ExpertColumnsFn (recognised by the transposed view of the parameter that transformers
    passes)."""

    def __init__(self, layer: "PacaExperts"):
        super().__init__()
        self.layer = layer
        self.hits = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _GROUPED and len(args) >= 2 and kwargs.get("offs") is not None:
            name = self.layer._paca_name_of(args[1])
            if name is not None and not kwargs.get("bias") and not kwargs.get("out_dtype"):
                self.hits += 1
                layer = self.layer
                return ExpertColumnsFn.apply(
                    args[0], getattr(layer, "paca_" + name), args[1],
                    getattr(layer, "paca_indices_" + name), kwargs["offs"], layer.paca_scaling)
        return func(*args, **kwargs)


class PacaExperts(nn.Module):
    """Mixed into an experts module's class (inject_paca_experts): r trained input columns of
    each of its 3-D parameters. Attributes per trained parameter NAME: paca_NAME (trainable,
    experts x out x r), paca_indices_NAME (r,); paca_r, paca_scaling, paca_names."""

    def _paca_name_of(self, tensor: torch.Tensor) -> str | None:
        base = tensor._base if tensor._base is not None else tensor
        for name in self.paca_names:
            if base is getattr(self, name):
                return name
        return None

    def forward(self, *args, **kwargs):
        if not torch.is_grad_enabled():
            return super().forward(*args, **kwargs)
        swap = _ColumnsSwap(self)
        with swap:
            out = super().forward(*args, **kwargs)
        if swap.hits != len(self.paca_names):
            raise RuntimeError(
                f"PaCA on experts: {swap.hits} of {len(self.paca_names)} grouped matmuls of "
                f"{type(self).__name__} were seen; only transformers' grouped_mm experts "
                "implementation is supported")
        return out

    def sync_columns(self) -> None:
        """W[:, :, indices] = scaling * paca for every trained parameter."""
        for name in self.paca_names:
            columns = getattr(self, "paca_" + name).detach()
            if self.paca_scaling != 1.0:
                columns = columns * self.paca_scaling
            weight = getattr(self, name)
            weight.detach().index_copy_(2, getattr(self, "paca_indices_" + name),
                                        columns.to(weight.dtype))

    def _after_optimizer_step(self, stepped: set[int]) -> None:
        if any(id(getattr(self, "paca_" + name)) in stepped for name in self.paca_names):
            self.sync_columns()


def inject_paca_experts(model: nn.Module, r: int, alpha: float, seed: int) -> dict[str, int]:
    """PaCA on every 3-D expert parameter of `model`, in place: r input columns of each expert
    (drawn once per parameter from a CPU generator seeded with `seed` + 1, in module order),
    the parameters themselves frozen. Returns {parameter path: its in dimension}. ValueError
    (nothing changed) when the model has no expert parameters or r exceeds one's in dimension."""
    found = find_expert_parameters(model)
    if not found:
        raise ValueError(f"{type(model).__name__} has no experts stored as 3-D parameters")
    for path, param in found.items():
        if r > param.shape[-1]:
            raise ValueError(f"PaCA rank r={r} exceeds the in dimension {param.shape[-1]} of "
                             f"the experts' {path}")
    generator = torch.Generator().manual_seed(seed + 1)
    modules = {}
    for path in found:
        module_path, name = path.rsplit(".", 1)
        modules.setdefault(module_path, []).append(name)
    for module_path, names in modules.items():
        module = model.get_submodule(module_path)
        cls = type(module)
        module.__class__ = type(f"Paca{cls.__name__}", (PacaExperts, cls), {})
        module.paca_names = tuple(names)
        module.paca_r, module.paca_scaling = r, alpha / r
        for name in names:
            weight = getattr(module, name)
            weight.requires_grad_(False)
            indices = torch.randperm(weight.shape[-1], generator=generator)[:r].sort().values
            indices = indices.to(weight.device)
            module.register_buffer("paca_indices_" + name, indices)
            columns = weight.detach().index_select(2, indices) / module.paca_scaling
            # (experts x out x r) over r-major storage: the layout of the grouped grad GEMM
            module.register_parameter("paca_" + name, nn.Parameter(
                columns.transpose(-2, -1).contiguous().transpose(-2, -1)))
        hooks.subscribe(module)
    return {path: param.shape[-1] for path, param in found.items()}
