"""The one registry of fine-tuning methods: how each prepares a model, and which modules are its
adapter branch.

frozen  nothing trainable; the input embeddings' output requires grad so that gradients still
        flow through every layer: the activation floor that every other method adds to.
full    every parameter trainable.
lora    PEFT's LoRA (the implementation people train with), PEFT defaults unless set.
dora    PEFT's DoRA (LoRA with use_dora=True).
paca    this project's PaCA (paca/).
qlora   PEFT's LoRA over 4-bit NF4 base weights of the targets (simulated only, paca_prof.quant).
qpaca   QPaCA as the authors implement it over NF4 base weights (simulated only).

All adapter methods share one meaning of rank and targets: rank r per targeted nn.Linear, and
targets are leaf module names (PEFT's convention).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from paca import LLAMA_TARGETS, PacaConfig, inject_paca

METHODS = ("frozen", "full", "lora", "dora", "paca", "qlora", "qpaca")
QUANTIZED_METHODS = ("qlora", "qpaca")
DEFAULT_METHODS = ("frozen", "lora", "dora", "paca", "full")
ADAPTER_DTYPES = ("fp32", "model")

# Module-path components that belong to an adapter branch, per method. PaCA's branch (the gather
# and the grad GEMM) runs inside PacaLinear itself and is told apart by op, not by module.
ADAPTER_MODULE_PARTS = {
    "lora": ("lora_A", "lora_B", "lora_dropout"),
    "qlora": ("lora_A", "lora_B", "lora_dropout"),
    "dora": ("lora_A", "lora_B", "lora_dropout", "lora_magnitude_vector"),
}


@dataclass
class MethodSettings:
    """Settings shared by the adapter methods, with PEFT's meaning.

    rank: r of LoRA/DoRA, and the number of trained columns of PaCA.
    alpha: scaling = alpha / rank for all three. (PEFT's own default lora_alpha is 8; 16 = 2r
        is this tool's default, as in the paper's Gaudi2 setup.)
    dropout: LoRA/DoRA dropout (PEFT default 0.0); PaCA has none.
    adapter_dtype: "fp32" keeps LoRA/DoRA weights in fp32 on a bf16/fp16 model, which is
        PEFT's default (get_peft_model(autocast_adapter_dtype=True)); "model" keeps them in the
        model's dtype. PaCA's columns always have the weight's dtype.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(LLAMA_TARGETS))
    adapter_dtype: str = "fp32"
    seed: int = 0

    def __post_init__(self):
        if self.rank <= 0:
            raise ValueError(f"rank must be positive, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.adapter_dtype not in ADAPTER_DTYPES:
            raise ValueError(f"adapter_dtype must be one of {ADAPTER_DTYPES}, got {self.adapter_dtype!r}")


def check_method(name: str) -> str:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return name


def prepare(model: nn.Module, method: str, settings: MethodSettings) -> nn.Module:
    """Prepare a transformers model for `method`, in place, and return the model to train.

    The returned module keeps the module paths of the original model (PEFT's wrapper is
    unwrapped), so traces of different methods match module by module.
    Raises ValueError for an unknown method, targets that match nothing, or a rank that is
    larger than a targeted layer's input.
    """
    check_method(method)
    if method == "full":
        for param in model.parameters():
            param.requires_grad_(True)
        return model
    if method == "frozen":
        for param in model.parameters():
            param.requires_grad_(False)
        model.enable_input_require_grads()
        return model
    if method == "paca":
        config = PacaConfig(r=settings.rank, alpha=settings.alpha, target_modules=settings.targets,
                            seed=settings.seed)
        return inject_paca(model, config)  # in place: the model's own module paths
    if method in QUANTIZED_METHODS:
        return _prepare_quantized(model, method, settings)
    return _prepare_peft(model, method, settings)


def _prepare_quantized(model: nn.Module, method: str, settings: MethodSettings) -> nn.Module:
    from paca.model import find_targets, select_indices
    from paca_prof.quant import QPacaLinear, quantize_targets

    if next(model.parameters()).device.type != "meta":
        raise ValueError(f"{method} is simulated only (--device meta); measured 4-bit runs "
                         "need bitsandbytes on CUDA, which this version does not drive")
    targets = find_targets(model, settings.targets)
    for name, linear in targets.items():
        if settings.rank > linear.in_features:
            raise ValueError(f"rank {settings.rank} exceeds in_features of {name}")
    quantized = quantize_targets(model, targets)
    if method == "qlora":
        return _prepare_peft(model, "lora", settings)
    for param in model.parameters():
        param.requires_grad_(False)
    generator = torch.Generator().manual_seed(settings.seed)
    for path, layer in quantized.items():
        indices = select_indices(layer.in_features, settings.rank, generator)
        parent_path, _, leaf = path.rpartition(".")
        setattr(model.get_submodule(parent_path), leaf,
                QPacaLinear(layer, settings.rank, settings.alpha, indices))
    return model


def _prepare_peft(model: nn.Module, method: str, settings: MethodSettings) -> nn.Module:
    from paca.model import find_targets
    from peft import LoraConfig, get_peft_model

    # Same checks and messages as PaCA, before PEFT's own (less specific) ones.
    for name, linear in find_targets(model, settings.targets).items():
        if settings.rank > min(linear.in_features, linear.out_features):
            raise ValueError(f"rank {settings.rank} exceeds the size of {name} "
                             f"({linear.out_features} x {linear.in_features})")
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.targets),
        use_dora=(method == "dora"),
        bias="none",
    )
    peft_model = get_peft_model(
        model, config, autocast_adapter_dtype=(settings.adapter_dtype == "fp32")
    )
    # PEFT skips its adapter cast on the meta device; apply the dtype it would have chosen.
    model_dtype = next(p.dtype for n, p in model.named_parameters() if "lora_" not in n)
    adapter_dtype = torch.float32 if settings.adapter_dtype == "fp32" else model_dtype
    for name, param in peft_model.named_parameters():
        if "lora_" in name and param.dtype != adapter_dtype:
            param.data = param.data.to(adapter_dtype)
    return peft_model.get_base_model()


def describe(method: str, settings: MethodSettings) -> dict:
    """The settings that matter for `method`, as recorded in a trace's run.yaml."""
    check_method(method)
    if method in ("frozen", "full"):
        return {"method": method}
    described = {"method": method, **asdict(settings)}
    if method in ("paca", "qpaca"):
        described.pop("dropout")
        described["adapter_dtype"] = "model"
        described["implementation"] = "paca (this project)"
    else:
        import peft

        described["implementation"] = f"peft {peft.__version__}"
        described["autocast_adapter_dtype"] = settings.adapter_dtype == "fp32"
    if method in QUANTIZED_METHODS:
        described["base_weights"] = ("nf4, bitsandbytes layout (blocksize 64, double "
                                     "quantisation), targets only; simulated")
    return described


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def is_adapter_module(method: str, module_path: str) -> bool:
    """Whether a module path lies inside `method`'s adapter branch (lora_A, lora_B, ...)."""
    parts = module_path.split(".")
    return any(part in parts for part in ADAPTER_MODULE_PARTS.get(method, ()))


def wrapper_paths(model: nn.Module, method: str) -> set[str]:
    """Paths of the modules that wrap a target linear for `method` (PEFT's LoRA layers, or
    PacaLinear): ops that run directly in them, outside the frozen base layer, are branch ops."""
    if method == "paca":
        from paca import PacaLinear

        kinds: tuple[type, ...] = (PacaLinear,)
    elif method == "qpaca":
        from paca_prof.quant import QPacaLinear

        kinds = (QPacaLinear,)
    elif method in ADAPTER_MODULE_PARTS:
        from peft.tuners.lora import LoraLayer

        kinds = (LoraLayer,)
    else:
        return set()
    return {name for name, module in model.named_modules() if isinstance(module, kinds)}


# PaCA's own ops inside PacaLinear: the gather of x[..., indices] (forward), the column write
# after an optimizer step (forward), and the grad GEMM of the columns (backward, an addmm; the
# input-gradient GEMM of the frozen weight is an mm).
_PACA_BRANCH_OPS = {
    "forward": {"aten::index_select", "aten::index_copy_", "aten::mul", "aten::_to_copy",
                "aten::copy_"},
    "backward": {"aten::addmm"},
}
# QPaCA also overwrites the columns of the dequantized weight in backward.
_QPACA_BRANCH_OPS = {
    "forward": _PACA_BRANCH_OPS["forward"],
    "backward": {"aten::addmm", "aten::index_copy_", "aten::mul", "aten::_to_copy"},
}


def is_adapter_op(method: str, module_path: str, op_name: str, phase: str,
                  wrappers: set[str]) -> bool:
    """Whether an op belongs to `method`'s adapter branch (see DESIGN.md's definition).

    LoRA/DoRA: everything inside lora_A/lora_B/lora_dropout/DoRA's magnitude, plus the ops that
    run in the wrapping layer itself (input cast, scaling, the add), not in its base_layer.
    PaCA: the gather, the column write and the grad GEMM inside PacaLinear.
    """
    if method in ADAPTER_MODULE_PARTS:
        return is_adapter_module(method, module_path) or module_path in wrappers
    if method == "paca" and module_path in wrappers:
        return op_name in _PACA_BRANCH_OPS.get(phase, ())
    if method == "qpaca" and module_path in wrappers:
        return op_name in _QPACA_BRANCH_OPS.get(phase, ())
    return False
