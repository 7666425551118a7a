"""Fine-tuning methods: their names and settings (torch-free), and the registry of what each one
does (methods/registry.py, imported on first use).

frozen   nothing trainable; the input embeddings' output requires grad so that gradients still
         flow through every layer: the activation floor that every other method adds to.
full     every parameter trainable.
lora     PEFT's LoRA (the implementation people train with), PEFT defaults unless set.
dora     PEFT's DoRA (LoRA with use_dora=True).
paca     this project's PaCA (paca/).
paca-authors  the PaCA authors' own scheme (paca/authors.py), to profile beside paca: a separate
         P scaled on every forward, the columns copied into W on odd-numbered forwards only,
         so every second step runs on stale columns (counted: summary stale_steps).
qlora    lora over 4-bit NF4 base weights (simulated, methods/nf4.py).
qpaca    QPaCA as the authors implement it, over NF4 base weights (simulated).

Quantization is an axis of its own: qlora is lora with NF4 bases, qpaca is paca with NF4 bases;
the labels stay the traces' method names. All adapter methods share one meaning of r (PEFT's
word: LoRA's rank, PaCA's number of trained columns per linear) and of alpha (scaling =
alpha / r); each method checks r against a linear by its own rule (registry).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from paca_prof import validate

METHODS = ("frozen", "full", "lora", "dora", "paca", "paca-authors", "qlora", "qpaca")
DEFAULT_METHODS = ("frozen", "lora", "dora", "paca", "full")
QUANTIZED = {"qlora": "lora", "qpaca": "paca"}  # method -> the method over NF4 bases
ADAPTER_DTYPES = ("fp32", "model")
# Module-path components that belong to an adapter branch (PEFT's LoRA and DoRA modules). PaCA's
# branch runs inside PacaLinear itself and is told apart by op (registry), not by module.
ADAPTER_MODULE_PARTS = ("lora_A", "lora_B", "lora_dropout", "lora_magnitude_vector",
                        "lora_embedding_A", "lora_embedding_B")


@dataclass
class MethodSettings:
    """Settings shared by the adapter methods, with PEFT's meaning.

    r: LoRA/DoRA's rank, and the number of trained columns per linear of PaCA.
    alpha: scaling = alpha / r for all three. (PEFT's own default lora_alpha is 8; 16 = 2r
        is this tool's default, as in the paper's Gaudi2 setup.)
    dropout: LoRA/DoRA dropout (PEFT default 0.0); PaCA has none.
    adapter_dtype: "fp32" keeps LoRA/DoRA weights in fp32 on a bf16/fp16 model, which is
        PEFT's default (get_peft_model(autocast_adapter_dtype=True)); "model" keeps them in the
        model's dtype. PaCA's columns always have the weight's dtype.
    seed: seeds PaCA's column draw.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    adapter_dtype: str = "fp32"
    seed: int = 0

    def __post_init__(self):
        validate.number(self.r, "r (--r, --rank)", minimum=1, maximum=2**20, integer=True)
        validate.number(self.alpha, "alpha", above=0, maximum=1e6)
        validate.number(self.dropout, "dropout", minimum=0)
        if self.dropout >= 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        validate.number(self.seed, "seed", minimum=0, maximum=2**63 - 1, integer=True)
        if self.adapter_dtype not in ADAPTER_DTYPES:
            raise ValueError(f"adapter_dtype must be one of {ADAPTER_DTYPES}, got "
                             f"{self.adapter_dtype!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def check_method(name: str) -> str:
    """`name` if it is a method; ValueError listing the methods otherwise."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return name


def check_methods(names) -> tuple[str, ...]:
    """Known methods, each once: ValueError for an unknown or repeated one."""
    names = tuple(names)
    if not names:
        raise ValueError("no method named")
    for name in names:
        check_method(name)
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"method(s) named twice: {', '.join(repeated)}")
    return names


def is_adapter_path(path: str) -> bool:
    """Whether a module path lies inside an adapter branch (lora_A, lora_B, DoRA's magnitude,
    ...): the one test, used for module kinds and by the registry's branch rules."""
    return any(part in ADAPTER_MODULE_PARTS for part in path.split("."))


def get(name: str):
    """The registry's record of method `name` (imports torch, PEFT and paca on first use)."""
    from paca_prof.methods.registry import REGISTRY

    return REGISTRY[check_method(name)]
