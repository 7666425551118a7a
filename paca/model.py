"""Put PaCA into a model and take it out again: injection, merge, unload, save and load."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from paca.config import PacaConfig
from paca.layer import PacaLinear


def paca_layers(model: nn.Module) -> dict[str, PacaLinear]:
    """Every PacaLinear in the model, by module path."""
    return {name: m for name, m in model.named_modules() if isinstance(m, PacaLinear)}


def find_targets(model: nn.Module, target_modules: list[str]) -> dict[str, nn.Linear]:
    """The nn.Linear modules whose last path component is one of target_modules.

    Raises ValueError naming the targets that match nothing, and the linear names that exist.
    """
    found: dict[str, nn.Linear] = {}
    matched: set[str] = set()
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in target_modules and isinstance(module, nn.Linear):
            found[name] = module
            matched.add(leaf)
    missing = [t for t in target_modules if t not in matched]
    if missing:
        linear_names = sorted(
            {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        )
        raise ValueError(
            f"target modules {missing} match no nn.Linear in {type(model).__name__}; "
            f"its linears are named {linear_names}"
        )
    return found


def select_indices(in_features: int, r: int, generator: torch.Generator) -> torch.Tensor:
    """r distinct random input columns, sorted (sorted gathers read memory in order)."""
    return torch.randperm(in_features, generator=generator)[:r].sort().values


def get_paca_model(
    model: nn.Module, config: PacaConfig, indices: dict[str, torch.Tensor] | None = None
) -> nn.Module:
    """Replace the targeted nn.Linear modules with PacaLinear, in place, and freeze the rest.

    Columns are drawn per layer from one CPU generator seeded with config.seed, in module order,
    so the same model and seed give the same columns. `indices` (module path -> LongTensor)
    overrides the draw, as load_paca does. Works on any device, the meta device included.
    Returns the same model object, with `model.paca_config` set.
    """
    targets = find_targets(model, config.target_modules)
    if indices is not None and set(indices) != set(targets):
        raise ValueError(
            f"indices are given for layers {sorted(indices)}, the model's targets are "
            f"{sorted(targets)}"
        )
    for name, linear in targets.items():
        if config.r > linear.in_features:
            raise ValueError(
                f"PaCA rank r={config.r} exceeds in_features={linear.in_features} of {name}"
            )
    for param in model.parameters():
        param.requires_grad_(False)
    generator = torch.Generator().manual_seed(config.seed)
    for name, linear in targets.items():
        idx = select_indices(linear.in_features, config.r, generator)
        if indices is not None:
            idx = indices[name]
        _set_submodule(model, name, PacaLinear(linear, config.r, config.alpha, idx))
    model.paca_config = config
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold the trained columns into plain nn.Linear modules (in place); returns the model."""
    for name, layer in paca_layers(model).items():
        _set_submodule(model, name, layer.merge())
    return model


def unload(model: nn.Module) -> nn.Module:
    """Restore the base model exactly: original columns, plain nn.Linear modules (in place)."""
    for name, layer in paca_layers(model).items():
        _set_submodule(model, name, layer.unmerge())
    return model


def save_paca(model: nn.Module, path: str | Path) -> None:
    """Save the trained columns and their indices (safetensors), with the config as metadata."""
    tensors = {}
    for name, layer in paca_layers(model).items():
        tensors[f"{name}.paca_weight"] = layer.paca_weight.detach().contiguous().cpu()
        tensors[f"{name}.indices"] = layer.indices.cpu()
    if not tensors:
        raise ValueError("model has no PacaLinear layers to save")
    config = getattr(model, "paca_config", None)
    metadata = {"paca_config": json.dumps(config.to_dict() if config else {})}
    save_file(tensors, str(path), metadata=metadata)


def load_paca(model: nn.Module, path: str | Path) -> nn.Module:
    """Apply saved PaCA columns to a base model (in place): same columns, same trained values.

    The model must be the base model the columns were trained from; shapes are checked.
    """
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        config = PacaConfig(**json.loads(f.metadata()["paca_config"]))
    tensors = load_file(str(path))
    indices = {k[: -len(".indices")]: v for k, v in tensors.items() if k.endswith(".indices")}
    targets = find_targets(model, config.target_modules)
    if set(targets) != set(indices):  # checked before the model is changed
        raise ValueError(f"{path} holds layers {sorted(indices)}, the model has {sorted(targets)}")
    get_paca_model(model, config, indices=indices)
    layers = paca_layers(model)
    with torch.no_grad():
        for name, layer in layers.items():
            layer.paca_weight.copy_(tensors[f"{name}.paca_weight"])
            layer.mark_columns_changed()
            layer.sync_columns()
    return model


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, leaf, module)
