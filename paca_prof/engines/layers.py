"""The layers table of one method's run: one row per (module, phase) with its kind, latency,
activation bytes, op count and FLOPs (trace.LAYER_COLUMNS)."""

from __future__ import annotations

from collections import defaultdict

import pandas as pd
from torch import nn

from paca_prof.modules import ancestor_keys, ancestors, module_depth, module_kind
from paca_prof.trace import PHASES


def container_paths(paths: dict[nn.Module, str]) -> set[str]:
    """Paths of the scopes that are containers (nn.ModuleList, nn.ModuleDict): never called."""
    return {path for module, path in paths.items()
            if isinstance(module, nn.ModuleList | nn.ModuleDict)}


def module_kinds(paths: dict[nn.Module, str]) -> dict[str, str]:
    """Kind of every scope of a Capture session (its `paths`: module -> path), the optimizer's
    included."""
    from paca_prof.modules import OPTIMIZER

    kinds = {path: module_kind(type(module).__name__, path, isinstance(module, nn.Linear),
                               isinstance(module, nn.ModuleList | nn.ModuleDict))
             for module, path in paths.items()}
    kinds[OPTIMIZER] = "optimizer"
    return kinds


def layer_table(method: str, kinds: dict[str, str], latencies: dict, ops: pd.DataFrame,
                activation: dict[str, int], containers: set[str] = frozenset()) -> pd.DataFrame:
    """One row per (module, phase): latency (measured median or projected; NaN if neither),
    activation bytes (forward rows; the innermost module owns them), and op count and FLOPs
    including submodules.

    A container (`containers`: paths of modules that are never called themselves, an
    nn.ModuleDict such as PEFT's q_proj.lora_A, an nn.ModuleList such as model.layers) gets the summed latency of its shallowest timed
    descendants, so a drill-down into q_proj shows base_layer, lora_A, lora_B and lora_dropout
    side by side in every view."""
    counts: dict[tuple[str, str], int] = defaultdict(int)
    flops: dict[tuple[str, str], float] = defaultdict(float)
    for keys, op_flops in zip(ancestor_keys(_column(ops, "module"), _column(ops, "phase")),
                              _column(ops, "flops")):
        for key in keys:
            counts[key] += 1
            flops[key] += op_flops
    latencies = {**_container_latencies(set(containers), latencies), **latencies}
    rows = []
    for path, kind in kinds.items():
        for phase in PHASES:
            key = (path, phase)
            if key not in latencies and key not in counts and not (
                    phase == "forward" and path in activation):
                continue
            rows.append({
                "method": method, "module": path, "phase": phase, "kind": kind,
                "depth": module_depth(path), "latency_ms": latencies.get(key, float("nan")),
                "activation_bytes": activation.get(path, 0) if phase == "forward" else pd.NA,
                "n_kernels": counts.get(key, 0), "flops": flops.get(key, 0.0),
            })
    return pd.DataFrame(rows)


def _column(ops: pd.DataFrame, name: str) -> list:
    """A column of `ops` as a list (empty where there is none): iterating a list is much
    faster than iterating a Series, an arrow-backed one above all."""
    column = ops.get(name)
    return [] if column is None else column.tolist()


def _container_latencies(containers: set[str], latencies: dict) -> dict:
    """Latency of each never-called container per phase: the sum over its shallowest timed
    descendants (those with no timed module between them and the container)."""
    timed = set(latencies)
    filled: dict[tuple[str, str], float] = defaultdict(float)
    for (path, phase), ms in latencies.items():
        for ancestor in reversed(ancestors(path)[:-1]):
            if (ancestor, phase) in timed:
                break
            if ancestor in containers:
                filled[(ancestor, phase)] += ms
    return dict(filled)
