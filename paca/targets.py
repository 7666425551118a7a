"""Which modules of a model PaCA adapts: PacaConfig's targeting fields matched against module
paths, with PEFT's rules (peft.tuners.tuners_utils.check_target_module_exists), and the
columns each target trains.

Every check here runs before a model is changed, so a bad config leaves the model as it was.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from paca.config import ALL_LINEAR, PacaConfig

# PEFT's COMMON_LAYERS_PATTERN: where decoder layer indices sit in module paths.
COMMON_LAYERS_PATTERN = ("layers", "h", "block", "blocks", "layer")


@dataclass
class Target:
    """One linear to adapt: its path, the module, and its rank and alpha after the patterns."""

    path: str
    linear: nn.Linear
    r: int
    alpha: float


def matches(path: str, names: list[str] | str) -> bool:
    """PEFT's rule: a regex string must match the whole path; a list entry must equal the path
    or be a suffix of it after a dot."""
    if isinstance(names, str):
        return re.fullmatch(names, path) is not None
    return any(path == name or path.endswith("." + name) for name in names)


def layer_index(path: str, patterns: list[str] | None) -> int | None:
    """The decoder layer index in a path such as model.layers.3.mlp.up_proj (3), or None."""
    for pattern in patterns or COMMON_LAYERS_PATTERN:
        found = re.match(rf"(?:^|.*\.){re.escape(pattern)}\.(\d+)\.", path)
        if found:
            return int(found.group(1))
    return None


def find_targets(model: nn.Module, target_modules: list[str] | str) -> dict[str, nn.Linear]:
    """The nn.Linear modules that `target_modules` names (PEFT's matching, see `matches`).

    Raises ValueError naming the list entries that match no nn.Linear (or a regex that matches
    none), and the linear names that exist.
    """
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    if target_modules == ALL_LINEAR:
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        return {n: m for n, m in linears.items() if m is not output}
    found = {n: m for n, m in linears.items() if matches(n, target_modules)}
    if isinstance(target_modules, str):
        missing = [] if found else [target_modules]
    else:
        missing = [t for t in target_modules if not any(matches(n, [t]) for n in linears)]
    if missing:
        leaf_names = sorted({n.rsplit(".", 1)[-1] for n in linears})
        raise ValueError(
            f"target modules {missing} match no nn.Linear in {type(model).__name__}; "
            f"its linears are named {leaf_names}"
        )
    return found


def select_targets(model: nn.Module, config: PacaConfig) -> list[Target]:
    """The targets of `config` in `model`, in module order, each with its r and alpha.

    Applies target_modules, then exclude_modules and layers_to_transform, then rank_pattern and
    alpha_pattern. Raises ValueError when nothing is left, when r exceeds a target's
    in_features, or when a target's weight is tied to another module's (see _check_untied).
    """
    found = find_targets(model, config.target_modules)
    targets = []
    for path, linear in found.items():
        if config.exclude_modules is not None and matches(path, config.exclude_modules):
            continue
        if config.layers_to_transform is not None:
            if layer_index(path, config.layers_pattern) not in config.layers_to_transform:
                continue
        r, alpha = config.rank_and_alpha(path)
        if r > linear.in_features:
            raise ValueError(
                f"PaCA rank r={r} exceeds in_features={linear.in_features} of {path}"
            )
        targets.append(Target(path, linear, r, alpha))
    if not targets:
        raise ValueError(
            f"no module is left to adapt: target_modules {config.target_modules!r} matched "
            f"{sorted(found)}, and exclude_modules / layers_to_transform removed them all"
        )
    _check_untied(model, targets)
    return targets


def select_indices(in_features: int, r: int, generator: torch.Generator) -> torch.Tensor:
    """r distinct random input columns, sorted (sorted gathers read memory in order)."""
    return torch.randperm(in_features, generator=generator)[:r].sort().values


def draw_indices(targets: list[Target], seed: int) -> dict[str, torch.Tensor]:
    """Columns for every target: one CPU generator seeded with `seed`, drawn in module order,
    so the same model and seed always give the same columns."""
    generator = torch.Generator().manual_seed(seed)
    return {t.path: select_indices(t.linear.in_features, t.r, generator) for t in targets}


def _check_untied(model: nn.Module, targets: list[Target]) -> None:
    """Refuse targets whose weight another module also uses (tied embeddings: lm_head and
    embed_tokens share one matrix). PaCA writes the trained columns into that matrix, so the
    embedding would change too, while the columns get only the target's share of the gradient:
    that is neither PaCA of the target nor masked fine-tuning of the tied matrix. PEFT warns
    and goes on; PaCA refuses."""
    owners: dict[int, list[str]] = {}
    for module_path, module in model.named_modules(remove_duplicate=False):
        for name, param in module.named_parameters(recurse=False, remove_duplicate=False):
            owners.setdefault(id(param), []).append(f"{module_path}.{name}".lstrip("."))
    for target in targets:
        names = sorted(set(owners.get(id(target.linear.weight), [])))
        others = [n for n in names if n != f"{target.path}.weight"]
        if others:
            raise ValueError(
                f"the weight of target {target.path} is tied to {others} (tied embeddings, "
                "e.g. tie_word_embeddings=True): PaCA would change the tied module's columns "
                f"too. Leave {target.path} out of target_modules (exclude_modules), or untie "
                "the weights first"
            )
