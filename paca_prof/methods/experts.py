"""What each method does with a mixture-of-experts model's experts, checked and said in words.

transformers 5.24 stores the experts of qwen3_moe and mixtral (and their kin) as one 3-D
nn.Parameter per projection: experts.gate_up_proj (experts x 2*intermediate x hidden) and
experts.down_proj (experts x hidden x intermediate), multiplied by grouped matmuls; the router
(mlp.gate) is a module holding a 2-D weight parameter, not an nn.Linear. So PEFT's
all-linear, and any target name, reaches the attention projections only: neither the experts
nor the router are adapted, and the quantized methods' bitsandbytes quantization (nn.Linear
only) leaves both in the model's dtype, where PEFT's prepare_model_for_kbit_training then casts
them to fp32 with every other non-4-bit parameter.

The recipe's `experts` says what the adapter methods do with them ("frozen" or "adapt",
recipe.py); this module refuses what cannot run (before anything is built at full size) and
writes run.yaml's record (recipe.resolved_targets.experts).
"""

from __future__ import annotations

from torch import nn

from paca_prof.recipe import Recipe

# Each method's treatment of the experts, by recipe.experts.
_FROZEN = "frozen"
_TRAINED = "trained: full fine-tuning trains every parameter"
_LORA = ("LoRA through PEFT's target_parameters (lora.ParamWrapper): per 3-D parameter A "
         "(in x r*experts) and B (r*experts x out), W + scaling*B_e A_e folded per forward "
         "(one copy of the parameter, kept for backward); no dropout")
_PACA = ("PaCA on r input columns of every expert (paca/experts.py; the same column "
         "positions for every expert of one parameter), only x[:, columns] saved")
_NOT_LINEAR = ("frozen: not nn.Linear (3-D parameters), so all-linear and target names do not "
               "reach them; --experts adapt to adapt them")
_NF4_NOTE = "; bitsandbytes quantizes nn.Linear only: the experts stay unquantized ({dtype})"
_KBIT_DTYPE = "fp32: PEFT's kbit prep casts every parameter that is not 4-bit"
_DORA = "frozen: PEFT 0.21 has no DoRA for target_parameters (ParamWrapper refuses use_dora)"
_AUTHORS = "frozen: the authors' scheme has no layer for 3-D expert parameters"


def expert_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The model's 3-D expert parameters by path (paca.experts.find_expert_parameters)."""
    from paca.experts import find_expert_parameters

    return find_expert_parameters(model)


def adapts_experts(method: str, recipe: Recipe) -> bool:
    """Whether `method` trains adapters on the experts under `recipe`."""
    return recipe.experts == "adapt" and method in ("lora", "qlora", "paca", "qpaca")


def check(model: nn.Module, names, r: int, dropout: float, recipe: Recipe) -> None:
    """ValueError (one line) for --experts adapt on a model without 3-D expert parameters, for
    LoRA dropout with experts adapted (PEFT's ParamWrapper refuses it), and for a PaCA r above
    an expert parameter's in dimension or not a multiple of 8 (the grouped matmul kernels'
    16-byte alignment of the gathered columns, in bf16)."""
    if recipe.experts != "adapt":
        return
    found = expert_parameters(model)
    if not found:
        raise ValueError(f"--experts adapt: {type(model).__name__} has no experts stored as "
                         "3-D parameters")
    adapting = [n for n in names if adapts_experts(n, recipe)]
    if dropout and any(n in ("lora", "qlora") for n in adapting):
        raise ValueError(f"--experts adapt with --dropout {dropout:g}: PEFT's LoRA on expert "
                         "parameters (target_parameters) takes no dropout; give --dropout 0")
    if any(n in ("paca", "qpaca") for n in adapting):
        if r % 8:
            raise ValueError(f"--r (--rank) {r} with --experts adapt: PaCA's expert columns go "
                             "through grouped matmuls, whose kernels need rows of a multiple "
                             "of 16 bytes (bf16): give a multiple of 8")
        for path, param in found.items():
            if r > param.shape[-1]:
                raise ValueError(f"--r (--rank) {r} does not fit the experts' {path} (in "
                                 f"dimension {param.shape[-1]}) for PaCA")


def describe(model: nn.Module, names, recipe: Recipe) -> dict | None:
    """run.yaml's record of the experts: the 3-D parameters (suffix, shape) and, per method,
    what they get; None for a model without them."""
    found = expert_parameters(model)
    if not found:
        return None
    shapes = {}
    for path, param in found.items():
        shapes.setdefault(".".join(path.split(".")[-2:]), list(param.shape))
    return {"parameters": shapes, "count": len(found), "setting": recipe.experts,
            "router": "frozen: a 2-D parameter of the gate module, not nn.Linear (as PEFT's "
                      "all-linear leaves it); full fine-tuning trains it",
            "by_method": {name: words(name, recipe) for name in names}}


def words(method: str, recipe: Recipe) -> str:
    """What `method` does with the experts under `recipe`, in words."""
    if method == "full":
        return _TRAINED
    if method == "frozen":
        return _FROZEN
    nf4 = (_NF4_NOTE.format(dtype=_KBIT_DTYPE if recipe.kbit_prep else "the model's dtype")
           if method in ("qlora", "qpaca") else "")
    if recipe.experts != "adapt":
        return _NOT_LINEAR + nf4
    if method == "dora":
        return _DORA
    if method == "paca-authors":
        return _AUTHORS
    return (_LORA if method in ("lora", "qlora") else _PACA) + nf4


def allow_meta_lora_factors() -> None:
    """Let PEFT's LoRA on expert parameters run on the meta device (simulation).

    Its _LoraFactorsProxy folds W + scaling * lhs @ rhs into one baddbmm inside
    torch.autocast(device_type=W.device.type, enabled=False), and torch.autocast takes no meta
    device (it raises). On meta the same baddbmm runs without the context, and outside the
    simulation's autocast emulation (amp.py, a TorchFunctionMode), which the context would have
    turned off on a GPU; on any other device PEFT's own forward runs unchanged. Installed once,
    on the class (the proxy is made anew on every forward)."""
    from peft.tuners.lora import layer

    proxy = getattr(layer, "_LoraFactorsProxy", None)
    if proxy is None or getattr(proxy.forward, "_paca_prof_meta", False):
        return
    original = proxy.forward

    def forward(self, W):
        if W.device.type == "meta":
            import torch

            with torch._C.DisableTorchFunction():  # as autocast(enabled=False) on a GPU
                return torch.baddbmm(W, self.lhs, self.rhs, alpha=self.scaling)
        return original(self, W)

    forward._paca_prof_meta = True
    proxy.forward = forward
