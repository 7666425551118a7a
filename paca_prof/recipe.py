"""The recipe: everything about a training step that is not the method (DESIGN.md's words).

One definition, read by `run`, `plan`, run.yaml and the dashboard: which linears are adapted,
the attention kernel, gradient checkpointing, the loss, the optimizer. Torch-free; the engines
turn it into a step (engines/step.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

# Attention kernels: what a measured run asks transformers for, and what a simulation runs.
MEASURED_ATTENTION = ("sdpa", "eager")  # sdpa: torch picks the kernel
SIMULATED_ATTENTION = ("flash", "efficient", "eager")  # the fused CUDA kernels, or eager
ATTENTION_ALIASES = {"math": "eager"}  # SDPA's name for the eager computation
OPTIMIZERS = ("adamw",)
LOSSES = ("hf",)
DEFAULT_LR = 1e-4


@dataclass(frozen=True)
class Recipe:
    """How a step is trained, beside the method.

    targets: leaf names of the adapted linears (PEFT's convention), for every adapter method.
    attention: a kernel (ATTENTION_ALIASES resolved) or None for the device's default
        (resolve_attention).
    grad_ckpt: gradient checkpointing (transformers', non-reentrant).
    loss: "hf", transformers' causal-LM loss on the logits.
    optimizer: "adamw", torch.optim.AdamW at `lr`, zero_grad(set_to_none) after each step;
        foreach as torch defaults it on the device (the for-loop on a CPU; simulation stands
        for a GPU, where foreach is the default).
    """

    targets: tuple[str, ...] = field(default_factory=lambda: default_targets())
    attention: str | None = None
    grad_ckpt: bool = False
    loss: str = "hf"
    optimizer: str = "adamw"
    lr: float = DEFAULT_LR

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        if self.attention is not None:
            object.__setattr__(self, "attention",
                               ATTENTION_ALIASES.get(self.attention, self.attention))
        if not self.targets:
            raise ValueError("no target modules given")
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; choose from {', '.join(LOSSES)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose from "
                             f"{', '.join(OPTIMIZERS)}")

    def describe(self, device: str) -> dict:
        """run.yaml's `recipe`: every field, with the optimizer in words for `device`."""
        described = asdict(self)
        described["targets"] = list(self.targets)
        foreach = "off (torch's CPU default)" if device == "cpu" else "on"
        described["optimizer_detail"] = (f"torch.optim.AdamW, lr {self.lr:g}, "
                                         f"zero_grad(set_to_none); foreach {foreach}")
        described["loss_detail"] = "transformers ForCausalLM loss on the logits, labels = inputs"
        return described


def default_targets() -> tuple[str, ...]:
    """The seven projections of a Llama decoder layer (q, k, v, o, gate, up, down): PaCA's
    default, and what the paper adapts."""
    from paca.config import LLAMA_TARGETS

    return tuple(LLAMA_TARGETS)


def resolve_attention(attention: str | None, device: str, half_precision: bool,
                      required: tuple[str, str] | None = None) -> str:
    """The attention kernel a run uses: the one asked for, or the device's default: sdpa when
    measured; in simulation what SDPA picks on a recent NVIDIA GPU for causal training, flash
    for bf16/fp16 and memory-efficient for fp32. An architecture that needs one kernel
    (`required`: (kernel, why), presets.ATTENTION_REQUIREMENTS) gets it by default and refuses
    another. ValueError for one the device or the architecture cannot run."""
    attention = ATTENTION_ALIASES.get(attention, attention)
    if required is not None:
        kernel, why = required
        if attention not in (None, kernel):
            raise ValueError(f"--attention {attention}: this architecture needs {kernel} "
                             f"attention ({why})")
        attention = kernel
    if device == "meta":
        attention = attention or ("flash" if half_precision else "efficient")
        allowed = SIMULATED_ATTENTION
    else:
        attention = attention or "sdpa"
        allowed = MEASURED_ATTENTION + (("flash", "efficient") if device.startswith("cuda")
                                        else ())
    if attention not in allowed:
        where = "on the CPU" if device == "cpu" else f"on {device}"
        raise ValueError(f"--attention {attention} does not run {where}; choose from "
                         f"{', '.join(allowed)}")
    return attention
