"""Module paths and kinds: how a trace names the parts of a model and groups them.

A path is the module's name in model.named_modules() ("model.layers.3.self_attn.q_proj"), or
one of three scopes that are not modules of the model: the model itself, the loss computed
outside it, and the optimizer step. Torch-free: the analyzer groups by these rules too.
"""

from __future__ import annotations

ROOT = "[root]"  # the model itself (named_modules calls it "")
LOSS = "[loss]"  # the loss, computed outside the model
OPTIMIZER = "[optimizer]"  # the optimizer step

KINDS = ("decoder_layer", "attention", "mlp", "experts", "router", "linear", "adapter",
         "embedding", "norm", "head", "rotary", "model", "container", "loss", "optimizer",
         "other")


def module_kind(type_name: str, path: str, is_linear: bool = False,
                is_container: bool = False) -> str:
    """A coarse kind for grouping (one of KINDS), from the module's class name and path.

    `is_linear`: the module is an nn.Linear (or a subclass); `is_container`: an nn.ModuleList or
    nn.ModuleDict. Adapter modules are those inside an adapter method's branch (methods.
    is_adapter_path); the head is the output projection named lm_head."""
    from paca_prof.methods import is_adapter_path

    if path in (LOSS, OPTIMIZER):
        return path.strip("[]")
    name = type_name.lower()
    leaf = path.rsplit(".", 1)[-1]
    if is_adapter_path(path) or "dora" in name:
        return "adapter"
    if path == ROOT or name.endswith("model") or name.endswith("forcausallm"):
        return "model"
    if is_container:
        return "container"
    if "decoderlayer" in name:
        return "decoder_layer"
    if "attention" in name:
        return "attention"
    if "experts" in name:
        return "experts"
    if "router" in name or (leaf == "gate" and not is_linear):
        return "router"
    if "mlp" in name or "moe" in name:
        return "mlp"
    if "embedding" in name and "rotary" not in name:
        return "embedding"
    if "rotary" in name:
        return "rotary"
    if "norm" in name:
        return "norm"
    if leaf == "lm_head":
        return "head"
    if is_linear or "linear" in name:
        return "linear"
    return "other"


def module_depth(path: str) -> int:
    """0 for the root, loss and optimizer; the number of path components otherwise."""
    return 0 if path.startswith("[") else len(path.split("."))


def ancestors(path: str) -> list[str]:
    """The module itself and every module that contains it, the root included (the loss and
    optimizer scopes are their own only ancestors)."""
    if path.startswith("["):
        return [path]
    found = [ROOT]
    dot = path.find(".")
    while dot != -1:  # each prefix that ends before a dot
        found.append(path[:dot])
        dot = path.find(".", dot + 1)
    found.append(path)
    return found


def ancestor_keys(paths: list[str], phases: list[str],
                  of=ancestors) -> list[list[tuple[str, str]]]:
    """For each op, given its module's path and its phase: (ancestor, phase) for every path of
    of(path) (by default ancestors(path)), in that order. Ops of one (path, phase) share one
    list, made once: a step's ops have a few hundred distinct ones."""
    chains: dict[str, list[str]] = {}
    cache: dict[tuple[str, str], list[tuple[str, str]]] = {}
    found = []
    for pair in zip(paths, phases):
        keys = cache.get(pair)
        if keys is None:
            path, phase = pair
            chain = chains.get(path)
            if chain is None:
                chain = chains[path] = of(path)
            keys = cache[pair] = [(ancestor, phase) for ancestor in chain]
        found.append(keys)
    return found


def is_logits_owner(path: str) -> bool:
    """Whether tensors made in this scope are the logits or the loss: the output head and the
    loss are what grows with the vocabulary (the logits_loss memory category)."""
    return path == LOSS or path == "lm_head" or path.endswith(".lm_head")
