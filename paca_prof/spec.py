"""RunSpec: what a run of the engines is: the model, the shape, the device, the methods with their
settings, the recipe, and how many steps. Recorded in run.yaml (metadata.py)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from paca_prof import validate
from paca_prof.distributed import Distributed
from paca_prof.methods import DEFAULT_METHODS, MethodSettings, check_methods
from paca_prof.recipe import Recipe, resolve_attention

DTYPE_NAMES = ("fp32", "bf16", "fp16")
DEVICES = ("cpu", "cuda", "meta")
MAX_TOKENS = 2**26  # batch x seq: a bound on what any device here could hold
MAX_THREADS = 4096


@dataclass
class RunSpec:
    """Everything that defines a run. The recipe's attention is resolved for the device and
    dtype here (recipe.resolve_attention), so `spec.recipe` says what really runs.

    `model`: a preset, a local config.json or model folder, or a transformers config (or a
    mapping of its values). `distributed`: ranks and FSDP2 (distributed.py); `batch` is each
    rank's. `peft_config`: a user's LoraConfig as checked fields
    (methods/peft_config.py), which the PEFT method it names (lora, or dora with use_dora)
    trains exactly, in place of `settings` and the recipe's targets.

    ValueError (one line) for a bad size, dtype, device or method, a model that is not a
    preset nor a valid causal-LM config (presets.load_config), or a PEFT config beside the
    other PEFT method or without its own."""

    model: str
    seq: int
    batch: int = 1
    dtype: str = "bf16"
    device: str = "cpu"
    methods: tuple[str, ...] = DEFAULT_METHODS
    settings: MethodSettings = field(default_factory=MethodSettings)
    recipe: Recipe = field(default_factory=Recipe)
    steps: int = 5
    warmup: int = 2
    seed: int = 0
    peft_config: dict | None = None
    distributed: Distributed = field(default_factory=Distributed)
    # Measured runs: torch threads for the run (None: torch's choice, recorded in run.yaml),
    # and a bound in seconds on the timing pass (warm-up and timed rounds; None: no bound).
    threads: int | None = None
    time_budget_s: float | None = None

    def __post_init__(self):
        from paca_prof import presets

        validate.number(self.seq, "--seq", minimum=1, maximum=MAX_TOKENS, integer=True)
        validate.number(self.batch, "--batch", minimum=1, maximum=MAX_TOKENS, integer=True)
        validate.number(self.batch * self.seq, "--batch x --seq", maximum=MAX_TOKENS)
        validate.number(self.steps, "--steps", minimum=1, maximum=10_000, integer=True)
        validate.number(self.warmup, "--warmup", minimum=0, maximum=10_000, integer=True)
        validate.number(self.seed, "--seed", minimum=0, maximum=2**63 - 1, integer=True)
        if self.threads is not None:
            validate.number(self.threads, "--threads", minimum=1, maximum=MAX_THREADS,
                            integer=True)
        if self.time_budget_s is not None:
            validate.number(self.time_budget_s, "--time-budget", above=0, maximum=7 * 86400)
        if self.dtype not in DTYPE_NAMES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose from {', '.join(DTYPE_NAMES)}")
        device_type = self.device.split(":")[0]
        if device_type not in DEVICES:
            raise ValueError(f"unknown device {self.device!r}; choose from {', '.join(DEVICES)}")
        self.methods = check_methods(self.methods)
        if isinstance(self.model, str):
            self.model_name, self.config = presets.load_config(self.model)
        else:
            self.model_name, self.config = presets.config_of(self.model)
        if self.peft_config is not None:
            _check_peft_methods(self.peft_config, self.methods)
        attention = resolve_attention(
            self.recipe.attention, device_type, self.dtype in ("bf16", "fp16"),
            required=presets.ATTENTION_REQUIREMENTS.get(self.config.model_type))
        self.recipe = replace(self.recipe, attention=attention)

    @property
    def torch_dtype(self):
        from paca_prof import presets

        return presets.torch_dtype(self.dtype)


def _check_peft_methods(peft_config: dict, methods: tuple[str, ...]) -> None:
    """A user's PEFT config trains its own method (lora, or dora with use_dora): ValueError if
    the methods lack it or name the other one, or qlora (not supported with a config)."""
    from paca_prof.methods.peft_config import PEFT_METHODS, method_of

    own = method_of(peft_config)
    other = next(m for m in PEFT_METHODS if m != own)
    if other in methods:
        raise ValueError(f"the PEFT config is a {own} config (use_dora "
                         f"{str(own == 'dora').lower()}): name {own}, not {other}")
    if "qlora" in methods:
        raise ValueError("qlora with a PEFT config is not supported yet; name lora")
    if own not in methods:
        raise ValueError(f"the PEFT config trains {own}: name it among the methods")
