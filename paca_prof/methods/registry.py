"""The registry: one record per method, with everything the profiler knows of it.

A record says how the method prepares a model, which module types wrap a target linear, which
ops are its adapter branch (DESIGN.md's definition), how it checks r against a linear, and how
it describes itself in run.yaml. Adding a method is adding one record here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from paca_prof.methods import ADAPTER_MODULE_PARTS, QUANTIZED, MethodSettings, is_adapter_path
from paca_prof.recipe import Recipe

Prepare = Callable[[nn.Module, MethodSettings, Recipe], nn.Module]


@dataclass(frozen=True)
class Method:
    """What the profiler knows of one fine-tuning method.

    prepare: turns a transformers model into this method's model, in place; the returned module
        keeps the base model's module paths (PEFT's wrapper is unwrapped), so traces of
        different methods match module by module.
    wrapper_types: the module types that wrap a target linear (PEFT's LoraLayer, PacaLinear).
    adapter_parts: module-path components of the adapter branch's own modules (LoRA's A, B
        and dropout, DoRA's magnitude): every op inside them is a branch op.
    branch_ops: ops, by phase, that are the adapter branch when they run directly in a wrapper
        (PaCA's gather and grad GEMM); None: every op run directly in a wrapper (outside its
        base layer: LoRA's input cast, scaling and add) is.
    r_rule: (in_features, out_features, r) -> why r does not fit, or None.
    settings: the MethodSettings fields that apply.
    quantization: "nf4" for a method over 4-bit bases (qlora, qpaca), stored by bitsandbytes.
    implementation, extra: what run.yaml says of it beside its settings.
    r_gemm: in backward, an aten::mm in a wrapper whose second input has r columns is the
        branch's grad GEMM (the authors' scheme computes it with the same op as grad_x).
    stale_counter: model -> forwards run on stale columns so far (the authors' scheme), so a
        run can say how many of its steps ran on stale columns.
    expert_gemm: in backward, an aten::_grouped_mm in an expert wrapper whose first input is
        r x tokens is the grad GEMM of PaCA's expert columns (paca/experts.py); with the gather
        (forward) the only branch ops there (WrapperPaths.experts).
    peft: a PEFT LoRA-family method (lora, dora): prepare also takes a user's LoraConfig
        (peft_config=, the checked fields of methods/peft_config.py), which then replaces the
        settings and the recipe's targets.
    """

    name: str
    prepare: Prepare
    wrapper_types: Callable[[], tuple[type, ...]] = lambda: ()
    adapter_parts: tuple[str, ...] = ()
    branch_ops: dict[str, frozenset[str]] | None = None
    r_rule: Callable[[int, int, int], str | None] | None = None
    settings: tuple[str, ...] = ()
    quantization: str | None = None
    implementation: Callable[[], str] | None = None
    extra: Callable[[MethodSettings], dict] = lambda settings: {}
    r_gemm: bool = False
    expert_gemm: bool = False
    stale_counter: Callable[[nn.Module], int] | None = None
    peft: bool = False

    def check_r(self, name: str, linear: nn.Linear, r: int) -> None:
        """ValueError naming the layer if r does not fit it by this method's rule."""
        why = self.r_rule(linear.in_features, linear.out_features, r) if self.r_rule else None
        if why:
            raise ValueError(f"--r (--rank) {r} does not fit {name} ({linear.out_features} x "
                             f"{linear.in_features}) for {self.name}: {why}")

    def describe(self, settings: MethodSettings, peft_config: dict | None = None) -> dict:
        """The settings that matter for this method, as run.yaml records them (a user's PEFT
        config's instead, for a PEFT method given one)."""
        described = {"method": self.name}
        values = settings.to_dict()
        if peft_config is not None and self.peft:
            from paca_prof.methods.peft_config import describe

            described.update({**describe(peft_config), "adapter_dtype": settings.adapter_dtype})
        else:
            described.update({k: values[k] for k in self.settings})
        if self.implementation is not None:
            described["implementation"] = self.implementation()
        described.update(self.extra(settings))
        return described

    def is_branch_op(self, module: str, op: str, phase: str, wrappers: set[str],
                     shapes: list | None = None, r: int | None = None) -> bool:
        """Whether an op run in `module` during `phase` belongs to this method's adapter branch
        (`wrappers`: the paths of this model's wrapper modules, wrapper_paths(); `shapes`: the
        op's input shapes and `r` the run's r, for a rule that needs them, r_gemm)."""
        if self.branch_ops is not None:
            if module not in wrappers:
                return False
            if (self.r_gemm and phase == "backward" and op == "aten::mm" and shapes
                    and len(shapes) > 1 and len(shapes[1]) == 2 and shapes[1][-1] == r):
                return True
            if module in getattr(wrappers, "experts", ()):  # PaCA on 3-D expert parameters
                return (op == "aten::index_select" and phase == "forward") or (
                    self.expert_gemm and phase == "backward" and op == "aten::_grouped_mm"
                    and bool(shapes) and len(shapes[0]) == 2 and shapes[0][0] == r)
            return op in self.branch_ops.get(phase, ())
        if module in wrappers:
            return True
        return bool(self.adapter_parts) and any(
            part in self.adapter_parts for part in module.split("."))

    def wrapper_paths(self, model: nn.Module) -> "WrapperPaths":
        kinds = self.wrapper_types()
        if not kinds:
            return WrapperPaths()
        paths = WrapperPaths(name for name, module in model.named_modules()
                             if isinstance(module, kinds))
        if paths:
            from paca.experts import PacaExperts

            paths.experts = frozenset(name for name, module in model.named_modules()
                                      if isinstance(module, PacaExperts))
        return paths


class WrapperPaths(set):
    """The paths of a model's wrapper modules; `experts`: those of them that are PaCA's expert
    layers (paca/experts.py), whose branch is only the gather (forward) and the columns' grad
    GEMM (backward): the routing's own ops run in the same module."""

    experts: frozenset = frozenset()


# --- How each method prepares a model ------------------------------------------------------------

def _prepare_full(model: nn.Module, settings: MethodSettings, recipe: Recipe) -> nn.Module:
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def _prepare_frozen(model: nn.Module, settings: MethodSettings, recipe: Recipe) -> nn.Module:
    for param in model.parameters():
        param.requires_grad_(False)
    model.enable_input_require_grads()
    return model


def _prepare_peft(use_dora: bool) -> Prepare:
    def prepare(model: nn.Module, settings: MethodSettings, recipe: Recipe,
                peft_config: dict | None = None) -> nn.Module:
        from peft import LoraConfig, get_peft_model

        from paca_prof.methods.experts import allow_meta_lora_factors

        if peft_config is not None:  # the user's own adapter, exactly
            from paca_prof.methods.peft_config import lora_config

            config = lora_config(peft_config)
            if config.target_parameters:
                allow_meta_lora_factors()
        else:
            expert_targets = None
            if recipe.experts == "adapt" and not use_dora:  # PEFT has no DoRA on parameters
                from paca.experts import expert_suffixes

                expert_targets = expert_suffixes(model) or None
                allow_meta_lora_factors()
            config = LoraConfig(r=settings.r, lora_alpha=settings.alpha,
                                lora_dropout=settings.dropout,
                                target_modules=list(resolve_targets(model, recipe.targets)),
                                target_parameters=expert_targets,
                                use_dora=use_dora, bias="none")
        peft_model = get_peft_model(model, config,
                                    autocast_adapter_dtype=settings.adapter_dtype == "fp32")
        # PEFT skips its adapter cast on the meta device; apply the dtype it would have chosen.
        model_dtype = next(p.dtype for n, p in model.named_parameters()
                           if not is_adapter_path(n) and p.is_floating_point())
        adapter_dtype = torch.float32 if settings.adapter_dtype == "fp32" else model_dtype
        for name, param in peft_model.named_parameters():
            if is_adapter_path(name) and param.dtype != adapter_dtype:
                param.data = param.data.to(adapter_dtype)
        return peft_model.get_base_model()

    return prepare


def _prepare_paca(model: nn.Module, settings: MethodSettings, recipe: Recipe) -> nn.Module:
    from paca import PacaConfig, inject_paca

    config = PacaConfig(r=settings.r, alpha=settings.alpha,
                        target_modules=list(resolve_targets(model, recipe.targets)),
                        seed=settings.seed)
    model = inject_paca(model, config)  # in place: the model's own module paths
    if recipe.experts == "adapt":  # the experts' 3-D parameters (paca/experts.py)
        from paca.experts import inject_paca_experts

        inject_paca_experts(model, settings.r, settings.alpha, settings.seed)
    return model


def _prepare_paca_authors(model: nn.Module, settings: MethodSettings,
                          recipe: Recipe) -> nn.Module:
    from paca import PacaConfig
    from paca.authors import inject_authors_paca

    config = PacaConfig(r=settings.r, alpha=settings.alpha,
                        target_modules=list(resolve_targets(model, recipe.targets)),
                        seed=settings.seed)
    return inject_authors_paca(model, config)


def _paca_r_rule(in_features: int, out_features: int, r: int) -> str | None:
    return f"PaCA trains r of the {in_features} input columns" if r > in_features else None


def _lora_layer_types() -> tuple[type, ...]:
    from peft.tuners.lora import LoraLayer

    return (LoraLayer,)


def _paca_layer_types() -> tuple[type, ...]:
    from paca import PacaLinear
    from paca.experts import PacaExperts

    return (PacaLinear, PacaExperts)


def _authors_layer_types() -> tuple[type, ...]:
    from paca.authors import AuthorsPacaLinear

    return (AuthorsPacaLinear,)


def _authors_stale_forwards(model: nn.Module) -> int:
    from paca.authors import stale_forwards

    return stale_forwards(model)


def _qpaca_layer_types() -> tuple[type, ...]:
    from paca.experts import PacaExperts
    from paca.quantized import QPacaLinear

    return (QPacaLinear, PacaExperts)


def _peft_version() -> str:
    import peft

    return f"peft {peft.__version__}"


# PaCA's own ops inside PacaLinear: the gather of x[..., indices] and, under autocast, its cast
# (forward), and the grad GEMM of the columns (backward, an addmm; the input-gradient GEMM of the
# frozen weight is an mm). The write of the trained columns into W (a mul and an index_copy_
# per layer) runs in the optimizer step's post hook: it is counted with the optimizer phase,
# as the optimizer's own update of P is, not as branch ops.
PACA_BRANCH_OPS = {
    "forward": frozenset({"aten::index_select", "aten::_to_copy", "aten::copy_"}),
    "backward": frozenset({"aten::addmm"}),
}
# The authors' scheme: P * scaling on every forward, the gather (aten::index), the copy of the
# columns into W on odd forwards (index_put_ and its mul), in forward; the backward of
# P * scaling and the grad GEMM (an mm with r columns: r_gemm) in backward.
AUTHORS_BRANCH_OPS = {
    "forward": frozenset({"aten::mul", "aten::index", "aten::index_put_", "aten::_to_copy"}),
    "backward": frozenset({"aten::mul", "aten::add_"}),
}
# QPaCA overwrites the columns of the dequantized weight in forward and again in backward.
QPACA_BRANCH_OPS = {
    "forward": frozenset({"aten::index_select", "aten::index_copy_", "aten::mul",
                          "aten::_to_copy", "aten::copy_"}),
    "backward": frozenset({"aten::addmm", "aten::index_copy_", "aten::mul", "aten::_to_copy"}),
}
_LORA_SETTINGS = ("r", "alpha", "dropout", "adapter_dtype")
_PACA_SETTINGS = ("r", "alpha", "seed")
_LORA_PARTS = ADAPTER_MODULE_PARTS[:3]  # lora_A, lora_B, lora_dropout
_DORA_PARTS = ADAPTER_MODULE_PARTS[:4]  # and DoRA's lora_magnitude_vector
_NF4 = ("bitsandbytes Linear4bit, nf4, blocksize 64, double quantisation (QLoRA's settings); "
        "the recipe's quantize and kbit_prep say which linears and how the rest is cast")


def _peft_extra(settings: MethodSettings) -> dict:
    return {"autocast_adapter_dtype": settings.adapter_dtype == "fp32"}


def _paca_extra(settings: MethodSettings) -> dict:
    return {"adapter_dtype": "model"}  # the columns have the weight's dtype


def _with_nf4(extra: Callable[[MethodSettings], dict]) -> Callable[[MethodSettings], dict]:
    return lambda settings: {**extra(settings), "base_weights": _NF4}


def _paca_implementation() -> str:
    return "paca (this project)"


def _authors_implementation() -> str:
    return ("the PaCA authors' scheme (paca/authors.py: separate P scaled every forward, "
            "columns copied on odd forwards)")


REGISTRY: dict[str, Method] = {m.name: m for m in [
    Method("frozen", _prepare_frozen),
    Method("full", _prepare_full),
    Method("lora", _prepare_peft(use_dora=False), _lora_layer_types, _LORA_PARTS,
           settings=_LORA_SETTINGS, implementation=_peft_version, extra=_peft_extra, peft=True),
    Method("dora", _prepare_peft(use_dora=True), _lora_layer_types, _DORA_PARTS,
           settings=_LORA_SETTINGS, implementation=_peft_version, extra=_peft_extra, peft=True),
    Method("paca", _prepare_paca, _paca_layer_types, branch_ops=PACA_BRANCH_OPS,
           r_rule=_paca_r_rule, settings=_PACA_SETTINGS, implementation=_paca_implementation,
           extra=_paca_extra, expert_gemm=True),
    Method("paca-authors", _prepare_paca_authors, _authors_layer_types,
           branch_ops=AUTHORS_BRANCH_OPS, r_rule=_paca_r_rule, settings=_PACA_SETTINGS,
           implementation=_authors_implementation, extra=_paca_extra, r_gemm=True,
           stale_counter=_authors_stale_forwards),
    Method("qlora", _prepare_peft(use_dora=False), _lora_layer_types, _LORA_PARTS,
           settings=_LORA_SETTINGS, quantization="nf4", implementation=_peft_version,
           extra=_with_nf4(_peft_extra)),
    Method("qpaca", _prepare_paca, _qpaca_layer_types, branch_ops=QPACA_BRANCH_OPS,
           r_rule=_paca_r_rule, settings=_PACA_SETTINGS, quantization="nf4",
           implementation=_paca_implementation, extra=_with_nf4(_paca_extra), expert_gemm=True),
]}
assert set(QUANTIZED) == {name for name, m in REGISTRY.items() if m.quantization}


# --- Preparing a model -------------------------------------------------------------------------

def resolve_targets(model: nn.Module, targets) -> dict[str, nn.Linear]:
    """The linears a recipe's `targets` name in `model`, by path: a list of leaf names (PEFT's
    suffix rule), "all-linear" (every nn.Linear but the output head, PEFT's meaning), or None,
    the default: the seven Llama projections where the model has them all, else all-linear
    (phi-3's fused projections, mixture-of-experts models). ValueError naming the linears the
    model has for a name that matches none. Quantized linears count as linears."""
    from paca.config import ALL_LINEAR
    from paca.targets import find_targets

    from paca_prof.recipe import default_targets

    if targets is None:
        names = default_targets()
        leaves = {path.rsplit(".", 1)[-1] for path, m in model.named_modules()
                  if isinstance(m, nn.Linear)}
        targets = list(names) if set(names) <= leaves else ALL_LINEAR
    return find_targets(model, targets if targets == ALL_LINEAR else list(targets))


def describe_targets(model: nn.Module, targets) -> dict:
    """run.yaml's record of the targets as resolved for the architecture: the leaf names, how
    many linears, and the rule that chose them."""
    found = resolve_targets(model, targets)
    rule = ("given" if targets not in (None, "all-linear") else
            "all-linear" if targets == "all-linear" else "default")
    leaves = sorted({path.rsplit(".", 1)[-1] for path in found})
    if rule == "default":
        from paca_prof.recipe import default_targets

        rule = ("default: the seven Llama projections" if set(default_targets()) <= set(leaves)
                else "default: all-linear (the model lacks the seven Llama projections)")
    return {"names": leaves, "linears": len(found), "rule": rule}


def import_libraries(names) -> None:
    """Import what preparing the methods `names` imports on first use (PEFT for PEFT's
    methods, bitsandbytes for the 4-bit ones, paca's layers), so that processes forked
    afterwards (parallel.py) start with it."""
    import paca.layer  # noqa: F401

    if any(REGISTRY[name].implementation is _peft_version for name in names):
        import peft.tuners.lora  # noqa: F401
    if any(REGISTRY[name].quantization for name in names):
        import paca.quantized  # noqa: F401 (bitsandbytes with it)


def prepare(model: nn.Module, name: str, settings: MethodSettings, recipe: Recipe,
            peft_config: dict | None = None) -> nn.Module:
    """Prepare a transformers model for method `name`, in place, and return the model to train.
    A quantized method's bases are first stored in 4 bits by bitsandbytes (recipe quantize:
    every linear but the head, or the targets), then cast and set up as PEFT's
    prepare_model_for_kbit_training does (recipe kbit_prep). ValueError for targets that match
    nothing or an r that does not fit a target (check_settings). A PEFT method given
    `peft_config` (a user's LoraConfig fields) trains exactly that adapter."""
    method = REGISTRY[name]
    if peft_config is not None and method.peft:
        return method.prepare(model, settings, recipe, peft_config=peft_config)
    targets = resolve_targets(model, recipe.targets)
    for path, linear in targets.items():
        method.check_r(path, linear, settings.r)
    if method.quantization == "nf4":
        _quantize(model, targets if recipe.quantize == "targets"
                  else resolve_targets(model, "all-linear"), recipe)
    return method.prepare(model, settings, recipe)


def _quantize(model: nn.Module, linears: dict[str, nn.Linear], recipe: Recipe) -> None:
    from paca.quantized import quantize_targets

    quantize_targets(model, list(linears))
    model.is_loaded_in_4bit = True  # as from_pretrained(load_in_4bit) marks it, for PEFT
    if recipe.kbit_prep:
        from peft import prepare_model_for_kbit_training

        # Checkpointing stays the recipe's one switch (grad_ckpt), non-reentrant as the engine
        # enables it; PEFT's prep would otherwise turn it on by default.
        prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=recipe.grad_ckpt,
            gradient_checkpointing_kwargs={"use_reentrant": False})


def check_settings(model: nn.Module, names, settings: MethodSettings, recipe: Recipe,
                   device: str = "meta", peft_config: dict | None = None) -> dict:
    """ValueError (one line) before anything is built at full size: targets that match no
    linear of `model` (naming the linears it has), an r that a method's rule refuses for a
    target, or a user's PEFT config (for the PEFT methods, which then ignore the recipe's
    targets) that PEFT cannot apply to `model`. `model` may be on meta; it is left as it was.
    Returns the recipe's targets as resolved (describe_targets)."""
    own_config = [n for n in names if peft_config is not None and REGISTRY[n].peft]
    names = [n for n in names if n not in own_config]
    if own_config:
        _check_peft_config(model, own_config[0], settings, recipe, peft_config)
    if not names:
        return {"names": [], "linears": 0,
                "rule": "--peft-config: its target_modules (see methods)"}
    targets = resolve_targets(model, recipe.targets)
    for name in names:
        method = REGISTRY[name]
        for path, linear in targets.items():
            method.check_r(path, linear, settings.r)
    from paca_prof.methods import experts

    experts.check(model, names, settings.r, settings.dropout, recipe)
    described = describe_targets(model, recipe.targets)
    expert_record = experts.describe(model, names, recipe)
    if expert_record is not None:
        described["experts"] = expert_record
    return described


def _check_peft_config(model: nn.Module, name: str, settings: MethodSettings, recipe: Recipe,
                       peft_config: dict) -> None:
    """ValueError (one line) if PEFT cannot apply the config to (a copy of) `model`: targets
    that match nothing, a pattern it refuses, and target_modules or target_parameters that
    match nothing while the other does (PEFT only warns then, and trains less than the
    config says)."""
    import copy
    import warnings

    from paca_prof.methods.peft_config import check_patterns_finish

    check_patterns_finish(peft_config, [path for path, _ in model.named_modules()])
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            REGISTRY[name].prepare(copy.deepcopy(model), settings, recipe,
                                   peft_config=peft_config)
    except Exception as error:  # PEFT raises ValueError, KeyError, TypeError, ...
        message = (str(error).splitlines() or [type(error).__name__])[0][:300]
        raise ValueError(f"--peft-config does not apply to this model: {message}") from None
    for warning in caught:
        message = str(warning.message)
        if "were set but no" in message and "was matched" in message:
            raise ValueError(f"--peft-config does not apply to this model: "
                             f"{message.splitlines()[0][:300]}")


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
