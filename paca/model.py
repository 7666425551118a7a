"""Put PaCA into a model and take it out again: injection, PacaModel, disable, merge, unload.

Two ways in, as in PEFT:
- inject_paca(model, config): in place, the model keeps its class and its module paths
  (model.layers.0.self_attn.q_proj stays that path); what the profiler uses.
- get_paca_model(model, config): the same, wrapped in a PacaModel (PEFT's PeftModel), which
  forwards to the model and adds save_pretrained, disable_adapter, merge_and_unload, ...

Files (save_pretrained, from_pretrained, the authors' format) are paca/io.py's.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager

import torch
from torch import nn

from paca.config import PacaConfig
from paca.layer import PacaLayer, PacaLinear, check_indices, check_layer_state
from paca.targets import draw_indices, find_targets, matches, select_indices, select_targets

__all__ = [
    "PacaModel", "StateDictMismatch", "check_injectable", "check_names_and_shapes",
    "disable_adapter", "find_targets", "get_nb_trainable_parameters", "get_paca_model",
    "inject_paca", "merge_and_unload", "paca_layers", "print_trainable_parameters",
    "select_indices", "sync_columns", "unload", "unwrap",
]


def inject_paca(
    model: nn.Module, config: PacaConfig, indices: dict[str, torch.Tensor] | None = None
) -> nn.Module:
    """Replace the targeted nn.Linear modules with PaCA layers, in place, and freeze the rest
    (modules_to_save excepted). Returns the same model object, with `model.paca_config` set.

    Columns are drawn per layer from one CPU generator seeded with config.seed, in module order,
    so the same model and seed give the same columns. `indices` (module path -> LongTensor)
    overrides the draw, as loading a saved adapter does. Works on any device, the meta device
    included; bitsandbytes Linear4bit targets become QPacaLinear (paca/quantized.py).

    Raises ValueError, before changing anything, when targets match nothing, r exceeds a
    target's in_features, a target's weight is tied to another module's, the model already has
    PaCA layers or holds a PEFT adapter (PaCA would silently freeze it), or `indices` do not
    fit the targets.
    """
    if not isinstance(config, PacaConfig):
        raise ValueError(f"config must be a PacaConfig, got {type(config).__name__}")
    model = unwrap(model)
    check_injectable(model)
    targets = select_targets(model, config)
    if indices is None:
        indices = draw_indices(targets, config.seed)
    elif set(indices) != {t.path for t in targets}:
        raise ValueError(
            f"indices are given for layers {sorted(indices)}, the model's targets are "
            f"{sorted(t.path for t in targets)}"
        )
    for target in targets:
        check_indices(indices[target.path], target.r, target.linear.in_features, target.path)
    saved = _modules_to_save(model, config, {t.path for t in targets})

    layers = {t.path: _paca_layer(t.linear, t.r, t.alpha, indices[t.path]) for t in targets}
    for param in model.parameters():
        param.requires_grad_(False)
    for path, layer in layers.items():
        _set_submodule(model, path, layer)
    originals = {}
    for path, module in saved.items():
        originals[path] = {n: p.detach().clone() for n, p in module.named_parameters()}
        module.requires_grad_(True)
    model.paca_config = config
    # Plain attributes (not modules or buffers): what unload() and load checks need.
    model.__dict__["_paca_modules_to_save"] = originals
    model.__dict__["_paca_load_check"] = model.register_load_state_dict_pre_hook(
        _check_whole_state_dict
    )
    model.__dict__["_paca_layer_list"] = list(layers.values())
    model.__dict__["_paca_stack_guard"] = model.register_forward_pre_hook(
        _refuse_peft_over_paca
    )
    return model


def get_paca_model(
    model: nn.Module, config: PacaConfig, indices: dict[str, torch.Tensor] | None = None
) -> PacaModel:
    """inject_paca(model, config, indices), wrapped in a PacaModel (PEFT's get_peft_model)."""
    return PacaModel(inject_paca(model, config, indices))


class PacaModel(nn.Module):
    """A model with PaCA layers, as PEFT's PeftModel: forwards calls and attributes to the
    model, and adds the adapter's life cycle.

    state_dict() holds the adapter only (the trained columns, their indices, modules_to_save),
    under this wrapper's key names; load_state_dict() takes such a dict, or a full one. So a
    HF Trainer checkpoint of a PacaModel (Trainer saves model.state_dict() for modules that are
    not PreTrainedModel) holds the trained columns only, and Trainer's resume loads them back.
    The full state dict is get_base_model().state_dict().

    Limits: forward takes (*args, **kwargs), so HF Trainer, which reads the forward signature
    to drop unused columns of a datasets.Dataset, needs remove_unused_columns=False.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        if not paca_layers(model):
            raise ValueError("PacaModel wraps a model with PaCA layers (see inject_paca)")
        self.base_model = model

    @property
    def paca_config(self) -> PacaConfig:
        return self.base_model.paca_config

    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":  # not set yet (unpickling): no recursion
                raise
            return getattr(self.base_model, name)

    def get_base_model(self) -> nn.Module:
        """The model itself, with its PaCA layers."""
        return self.base_model

    # ---------------------------------------------------------------- state and files

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        full = super().state_dict(*args, destination=None, prefix=prefix, keep_vars=keep_vars)
        keys = self._adapter_keys(prefix)
        # Contiguous (paca_weight is column-major), as safetensors, which Trainer uses, needs;
        # a copy of out x r values per layer at most.
        adapter = {k: v if keep_vars else v.contiguous() for k, v in full.items() if k in keys}
        if destination is not None:
            destination.update(adapter)
            return destination
        return adapter

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Loads an adapter-only state dict (as state_dict() returns) or a full one. Missing
        keys are those of the adapter only; checks run before anything changes."""
        if strict:  # names first (the injected model's own hook checks shapes and columns)
            check_names_and_shapes(self, state_dict, "", True, required=self._adapter_keys(""),
                                   shapes=False)
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        adapter = self._adapter_keys("")
        missing = [k for k in result.missing_keys if k in adapter]
        unexpected = list(result.unexpected_keys)
        if strict and (missing or unexpected):
            raise RuntimeError(
                f"Error(s) in loading state_dict for PacaModel: missing keys {missing}, "
                f"unexpected keys {unexpected}"
            )
        return torch.nn.modules.module._IncompatibleKeys(missing, unexpected)

    def _adapter_keys(self, prefix: str) -> set[str]:
        keys = set()
        for path, layer in paca_layers(self.base_model).items():
            for name in ("paca_weight", "indices"):
                keys.add(f"{prefix}base_model.{path}.{name}")
        for path in getattr(self.base_model, "_paca_modules_to_save", {}):
            module = self.base_model.get_submodule(path)
            for name, _ in module.named_parameters():
                keys.add(f"{prefix}base_model.{path}.{name}")
        return keys

    def save_pretrained(self, save_directory, **kwargs) -> None:
        """Write adapter_config.json and adapter_model.safetensors (see paca.io)."""
        from paca.io import save_pretrained

        save_pretrained(self, save_directory, **kwargs)

    @classmethod
    def from_pretrained(cls, model: nn.Module, adapter_path, is_trainable: bool = False):
        """Apply a saved adapter (ours or the authors') to `model`, in place (see paca.io)."""
        from paca.io import load_adapter

        return cls(load_adapter(model, adapter_path, is_trainable=is_trainable))

    # ---------------------------------------------------------------- life cycle

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        return get_nb_trainable_parameters(self.base_model)

    def print_trainable_parameters(self) -> None:
        print_trainable_parameters(self.base_model)

    @contextmanager
    def disable_adapter(self):
        with disable_adapter(self.base_model):
            yield

    def merge_and_unload(self) -> nn.Module:
        return merge_and_unload(self.base_model)

    def unload(self) -> nn.Module:
        return unload(self.base_model)


# -------------------------------------------------------------------- functions on any model


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel / DataParallel (`module.`), torch.compile
    (`_orig_mod.`) and PacaModel (`base_model.`) wrappers, so that names are those of the
    plain model, which any copy of it can load. FSDP is not unwrapped (its parameters are
    sharded)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(model, PacaModel):
            model = model.base_model
        elif type(model).__name__ == "OptimizedModule" and hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def paca_layers(model: nn.Module) -> dict[str, PacaLayer]:
    """Every PaCA layer in the model, by module path in the unwrapped model (see unwrap)."""
    return {n: m for n, m in unwrap(model).named_modules() if isinstance(m, PacaLayer)}


def sync_columns(model: nn.Module) -> None:
    """Write every layer's trained columns into its weight: needed only after writing
    paca_weight outside a torch.optim step without bumping its version (see PacaLinear)."""
    for layer in paca_layers(model).values():
        layer.sync_columns()


def get_nb_trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable parameters, all parameters), as PEFT counts them: each parameter once, a
    4-bit weight as the number of values it packs."""
    trainable = total = 0
    for param in unwrap(model).parameters():
        count = param.numel()
        if type(param).__name__ == "Params4bit":  # two 4-bit values per stored byte
            count *= 2
        total += count
        if param.requires_grad:
            trainable += count
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> None:
    """Print PEFT's line: trainable params, all params, trainable share."""
    trainable, total = get_nb_trainable_parameters(model)
    share = 100 * trainable / total if total else 0.0
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {share:.4f}")


@contextmanager
def disable_adapter(model: nn.Module):
    """Inside the block the model computes as its base model: every PaCA layer uses the
    original columns (and trains nothing), every module in modules_to_save its original
    parameters. The trained state comes back on exit, also after an exception."""
    model = unwrap(model)
    layers = list(paca_layers(model).values())
    trained = {}
    with torch.no_grad():
        for path, originals in model.__dict__.get("_paca_modules_to_save", {}).items():
            params = dict(model.get_submodule(path).named_parameters())
            trained[path] = {n: params[n].detach().clone() for n in originals}
            for name, value in originals.items():
                params[name].copy_(value)
    for layer in layers:
        layer.set_enabled(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.set_enabled(True)
        with torch.no_grad():
            for path, values in trained.items():
                params = dict(model.get_submodule(path).named_parameters())
                for name, value in values.items():
                    params[name].copy_(value)


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold the trained columns into plain modules (in place); returns the unwrapped model,
    which no longer has PaCA layers (modules_to_save keep their trained values)."""
    model = unwrap(model)
    for path, layer in paca_layers(model).items():
        _set_submodule(model, path, layer.merge())
    _forget(model)
    return model


def unload(model: nn.Module) -> nn.Module:
    """Restore the base model exactly (in place): original columns, the original modules,
    the original parameters of modules_to_save. Returns the unwrapped model."""
    model = unwrap(model)
    for path, layer in paca_layers(model).items():
        _set_submodule(model, path, layer.unmerge())
    with torch.no_grad():
        for path, originals in model.__dict__.get("_paca_modules_to_save", {}).items():
            params = dict(model.get_submodule(path).named_parameters())
            for name, value in originals.items():
                params[name].copy_(value)
    _forget(model)
    return model


# -------------------------------------------------------------------- helpers


def _paca_layer(linear: nn.Linear, r: int, alpha: float, indices: torch.Tensor) -> PacaLayer:
    if type(linear).__name__ == "Linear4bit":  # bitsandbytes; imported only when it is used
        from paca.quantized import QPacaLinear

        return QPacaLinear(linear, r, alpha, indices)
    return PacaLinear(linear, r, alpha, indices)


def check_injectable(model: nn.Module) -> None:
    """Raise ValueError if PaCA cannot go into `model`: it has PaCA layers already, or a PEFT
    adapter (which PaCA's freezing would silently freeze)."""
    if getattr(model, "paca_config", None) is not None or paca_layers(model):
        raise ValueError(
            f"{type(model).__name__} already has PaCA layers: unload() or merge_and_unload() "
            "it first (one PaCA adapter per model)"
        )
    if "peft" not in sys.modules:  # no PEFT object can exist unless peft was imported
        return
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    if isinstance(model, PeftModel) or any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        raise ValueError(
            "the model holds a PEFT adapter; PaCA freezes every parameter it does not train, so "
            "stacking would silently freeze that adapter. Merge it first "
            "(peft_model.merge_and_unload()) and apply PaCA to the result"
        )


def find_modules_to_save(model: nn.Module, config: PacaConfig) -> dict[str, nn.Module]:
    """The modules config.modules_to_save names (outermost matches only), by path; raises
    ValueError for a name that matches no module."""
    if not config.modules_to_save:
        return {}
    found = {n: m for n, m in model.named_modules() if n and matches(n, config.modules_to_save)}
    # The outermost matches only (a module and its own children are one module to save).
    found = {n: m for n, m in found.items()
             if not any(n.startswith(o + ".") for o in found if o != n)}
    missing = [t for t in config.modules_to_save if not any(matches(n, [t]) for n in found)]
    if missing:
        raise ValueError(f"modules_to_save {missing} match no module of {type(model).__name__}")
    return found


def _modules_to_save(model: nn.Module, config: PacaConfig, targets: set[str]) -> dict:
    found = find_modules_to_save(model, config)
    overlap = sorted(p for p in targets if any(p == n or p.startswith(n + ".") for n in found))
    if overlap:
        raise ValueError(f"modules {overlap} are both PaCA targets and modules_to_save")
    return found


class StateDictMismatch(ValueError, RuntimeError):
    """A state dict that a PaCA model refuses before loading any of it: a ValueError, as every
    refused PaCA load is, and a RuntimeError, as torch's own load_state_dict errors are."""


def _check_whole_state_dict(module, state_dict, prefix, local_metadata, strict, missing_keys,
                            unexpected_keys, error_msgs) -> None:
    """load_state_dict pre-hook on the injected model: it runs before any of its modules loads,
    so every PaCA layer's tensors, then every shape, are checked before anything changes
    (torch itself reports a wrong shape only after it has copied everything else). Names are
    not: torch passes strict=True to every module's hooks whatever the caller asked, so only
    PacaModel.load_state_dict, which knows, checks them first."""
    for path, layer in paca_layers(module).items():
        check_layer_state(layer, state_dict, f"{prefix}{path}.")
    check_names_and_shapes(module, state_dict, prefix, strict=False)


def check_names_and_shapes(model: nn.Module, state_dict, prefix: str, strict: bool,
                           required: set[str] | None = None, shapes: bool = True) -> None:
    """Raise StateDictMismatch, changing nothing, if loading `state_dict` into `model` (its keys
    under `prefix`) would fail in torch: a tensor whose shape differs from the model's, or,
    with strict, keys the model lacks or (among `required`, default all) keys it needs.
    shapes=False: names only.

    Names are left to torch when a module has load_state_dict post-hooks (they may forgive
    missing or unexpected keys)."""
    # nn.Module's, not an override's: PacaModel.state_dict() is the adapter only.
    expected = nn.Module.state_dict(model, prefix=prefix, keep_vars=True)
    where = type(model).__name__
    wrong = []
    for key, value in state_dict.items() if shapes else ():
        mine = expected.get(key)
        if not (isinstance(value, torch.Tensor) and isinstance(mine, torch.Tensor)):
            continue
        if nn.parameter.is_lazy(mine) or tuple(mine.shape) == tuple(value.shape):
            continue
        wrong.append(f"{key} has shape {tuple(value.shape)}, the model's is {tuple(mine.shape)}")
    if wrong:
        raise StateDictMismatch(f"state dict refused for {where} before any change: {wrong[0]}"
                                + (f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""))
    if not strict or any(m._load_state_dict_post_hooks for m in model.modules()):
        return
    unexpected = sorted(k for k in state_dict if k.startswith(prefix) and k not in expected)
    missing = sorted(k for k in (required if required is not None else expected)
                     if k not in state_dict)
    if unexpected or missing:
        raise StateDictMismatch(
            f"state dict refused for {where} before any change (strict): unexpected keys "
            f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}, missing keys "
            f"{missing[:5]}{' ...' if len(missing) > 5 else ''}")


def _refuse_peft_over_paca(model: nn.Module, args) -> None:
    """Forward pre-hook of a model PaCA went into: raise RuntimeError on a training forward
    when a PEFT adapter was stacked over it (get_peft_model over a PaCA model keeps only its
    own adapter trainable, so PaCA's columns would silently stop training).

    Cheap on every forward: a look at each PaCA layer's requires_grad; the model's modules are
    searched for a PEFT layer only when some enabled layer's columns are frozen, once per set of
    frozen layers. Frozen columns without a PEFT adapter (a user's choice) pass. Skipped while
    torch.compile traces (the wrap happens in eager code first, where it is caught)."""
    if torch.compiler.is_compiling() or not torch.is_grad_enabled() or "peft" not in sys.modules:
        return
    frozen = tuple(id(layer) for layer in model.__dict__["_paca_layer_list"]
                   if layer._enabled and not layer.paca_weight.requires_grad)
    if not frozen or model.__dict__.get("_paca_frozen_checked") == frozen:
        return
    from peft.tuners.tuners_utils import BaseTunerLayer

    if any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        raise RuntimeError(
            "a PEFT adapter was stacked over this PaCA model, and it froze PaCA's trained "
            f"columns ({len(frozen)} PaCA layers no longer train): stacking PEFT and PaCA is "
            "not supported. Merge PaCA first (paca_model.merge_and_unload()) and apply PEFT to "
            "the result, or train one of the two")
    model.__dict__["_paca_frozen_checked"] = frozen


def _forget(model: nn.Module) -> None:
    for name in ("_paca_load_check", "_paca_stack_guard"):
        handle = model.__dict__.pop(name, None)
        if handle is not None:
            handle.remove()
    model.__dict__.pop("_paca_layer_list", None)
    model.__dict__.pop("_paca_frozen_checked", None)
    model.__dict__.pop("_paca_modules_to_save", None)
    model.__dict__.pop("paca_config", None)


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, leaf, module)
