"""Naming the method of a user's model: what paca_prof.profile() calls a run it did not set up.

    lora, dora     PEFT's LoRA, from the model's peft_config (dora: use_dora)
    <peft_type>    PEFT's other tuners, their peft_type lower-cased (ia3, loha, lokr, adalora, ...)
    paca           this project's PacaLinear layers; paca-authors: the authors' scheme's layers
    full           every parameter trainable
    frozen         none trainable
    custom         anything else, with the trainable modules' paths listed

Each name comes with the registry record that flags its adapter branch in the op table (its
wrapper types: methods/registry.py); PEFT's other tuners get one whose wrappers are PEFT's
tuner layers, and custom one with no adapter branch. Limits: one active adapter is described
(the first, when several are active); QLoRA over bitsandbytes bases is named lora.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from paca_prof.methods.peft_config import describe as describe_peft_config
from paca_prof.methods.peft_config import plain
from paca_prof.methods.registry import REGISTRY, Method

PACA_METHODS = ("paca-authors", "paca", "qpaca")  # the authors' layer is no PacaLinear


@dataclass(frozen=True)
class Detected:
    """A model's method: its name in the trace, the record that flags its adapter branch,
    what run.yaml says of it, the r of its branch rule (paca-authors), and its targets."""

    name: str
    record: Method
    description: dict = field(default_factory=dict)
    r: int = 0
    targets: list[str] | str | None = None


def detect(model: nn.Module) -> Detected:
    """The method of `model` (a transformers model, a PEFT or PaCA wrapper of one), by the
    rules of the module docstring. Never fails: a model it cannot name is custom."""
    from peft import PeftModel

    base = model.get_base_model() if isinstance(model, PeftModel) else model
    peft = _peft_config(model, base)
    if peft is not None:
        return _from_peft(*peft)
    for name in PACA_METHODS:
        record = REGISTRY[name]
        if record.wrapper_paths(base):
            return _from_paca(base, record)
    trainable = [n for n, p in base.named_parameters() if p.requires_grad]
    total = sum(1 for _ in base.parameters())
    if not trainable:
        return Detected("frozen", REGISTRY["frozen"],
                        {"method": "frozen", "detected_from": "no parameter is trainable"})
    if len(trainable) == total:
        return Detected("full", REGISTRY["full"],
                        {"method": "full", "detected_from": "every parameter is trainable"})
    modules = sorted({n.rpartition(".")[0] or "[root]" for n in trainable})
    return Detected("custom", Method("custom", _not_preparable), {
        "method": "custom", "detected_from": "some parameters are trainable, by no known method",
        "trainable_modules": modules, "trainable_parameters": len(trainable)})


def _peft_config(model: nn.Module, base: nn.Module):
    """(active adapter name, its PeftConfig, all active names) from PEFT's peft_config, or
    None. The active adapters are the PeftModel's or, on the base model, its tuner layers'."""
    configs = getattr(model, "peft_config", None) or getattr(base, "peft_config", None)
    if not isinstance(configs, dict) or not configs:
        return None
    active = getattr(model, "active_adapters", None)
    if not isinstance(active, list | tuple):
        active = next((list(m.active_adapters) for m in base.modules()
                       if _is_tuner_layer(m)), None) or list(configs)
    active = [name for name in active if name in configs] or list(configs)
    return active[0], configs[active[0]], active


def _from_peft(adapter: str, config, active: list[str]) -> Detected:
    import peft

    peft_type = str(getattr(config.peft_type, "value", config.peft_type))
    fields = plain(config.to_dict())
    source = f"the model's peft_config[{adapter!r}] (PEFT {peft.__version__})"
    extra = {"detected_from": source, "implementation": f"peft {peft.__version__}"}
    if len(active) > 1:
        extra["active_adapters"] = list(active)
    if peft_type == "LORA":
        name = "dora" if getattr(config, "use_dora", False) else "lora"
        described = {"method": name, **describe_peft_config(fields), **extra}
        return Detected(name, REGISTRY[name], described, int(config.r),
                        fields.get("target_modules"))
    name = peft_type.lower()
    record = Method(name, _not_preparable, _tuner_layer_types)
    described = {"method": name, "peft_type": peft_type, "peft_config": fields, **extra}
    return Detected(name, record, described, 0, fields.get("target_modules"))


def _from_paca(model: nn.Module, record: Method) -> Detected:
    config = getattr(model, "paca_config", None)
    values = plain(config.to_dict()) if config is not None else {}
    described = {"method": record.name, "detected_from": "the model's PaCA layers",
                 **{k: values[k] for k in ("r", "alpha", "seed", "target_modules")
                    if k in values}}
    if record.implementation is not None:
        described["implementation"] = record.implementation()
    if values:
        described["paca_config"] = values
    layers = [m for m in model.modules() if isinstance(m, record.wrapper_types())]
    r = values.get("r") or getattr(layers[0], "r", 0)  # the authors' layers keep no config
    described.setdefault("r", r)
    return Detected(record.name, record, described, int(r), values.get("target_modules"))


def _tuner_layer_types() -> tuple[type, ...]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return (BaseTunerLayer,)


def _is_tuner_layer(module: nn.Module) -> bool:
    return isinstance(module, _tuner_layer_types())


def _not_preparable(model, settings, recipe):
    raise ValueError("a detected method describes a model; it prepares none")
