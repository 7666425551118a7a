"""The recipe: everything about a training step that is not the method (DESIGN.md's words).

One definition, read by `run`, `plan`, run.yaml and the dashboard: which linears are adapted,
the attention kernel, gradient checkpointing, the loss, the optimizer, gradient accumulation
and clipping, mixed precision, and how the bases of the quantized methods are quantized.
Torch-free; the engines turn it into a step (engines/step.py, losses.py, optimizers.py,
amp.py, methods/registry.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from paca_prof import validate

ALL_LINEAR = "all-linear"  # every nn.Linear but the output head, as PEFT means it
# Attention kernels: what a measured run asks transformers for, and what a simulation runs.
MEASURED_ATTENTION = ("sdpa", "eager")  # sdpa: torch picks the kernel
SIMULATED_ATTENTION = ("flash", "efficient", "eager")  # the fused CUDA kernels, or eager
ATTENTION_ALIASES = {"math": "eager"}  # SDPA's name for the eager computation
LOSSES = ("hf", "chunked", "fused-linear")
OPTIMIZERS = ("adamw", "adamw-8bit", "paged-adamw-8bit", "sgd", "adafactor")
QUANTIZE_SCOPES = ("all-linear", "targets")
ALLOCATORS = ("caching", "expandable")  # reserved.py models both
EXPERTS = ("frozen", "adapt")  # what the adapter methods do with 3-D expert parameters
DEFAULT_LR = 1e-4
DEFAULT_LOSS_CHUNKS = 8  # torchtune's num_output_chunks


@dataclass(frozen=True)
class Recipe:
    """How a step is trained, beside the method.

    targets: leaf names of the adapted linears (PEFT's convention) for every adapter method,
        "all-linear", or None: the seven Llama projections where the model has them, else
        all-linear (methods.registry.resolve_targets; run.yaml records the resolution).
    attention: a kernel (ATTENTION_ALIASES resolved) or None for the device's default
        (resolve_attention).
    grad_ckpt: gradient checkpointing (transformers', non-reentrant).
    loss: "hf", transformers' causal-LM loss on the full logits (upcast to fp32 at once);
        "chunked", torchtune's chunked cross-entropy (the head applied per chunk of tokens, each
        chunk upcast to fp32 on its own, never the whole fp32 logits); "fused-linear", fused
        linear cross-entropy as Liger computes it (per chunk: logits, loss and gradients in
        forward; the full logits never exist; the input's gradient kept for backward).
    loss_chunks: the number of token chunks of "chunked" and "fused-linear".
    optimizer: torch.optim.AdamW ("adamw"), bitsandbytes' AdamW8bit and PagedAdamW8bit
        (block-wise 8-bit states), torch.optim.SGD (no momentum, no state), or
        torch.optim.Adafactor (factored second moments), at `lr`; zero_grad(set_to_none)
        after each step.
    grad_accum: micro-batches per optimizer step (each of the given batch; the loss divided).
    max_grad_norm: clip the gradients' total norm to it before the step (None: no clipping).
    amp: fp32 parameters with autocast compute in the run's dtype (HF Trainer with an fp32
        model and bf16=True); False: the parameters in the run's dtype.
    quantize: which linears the quantized methods (qlora, qpaca) store in 4 bits: "all-linear"
        (every linear but the head, as bitsandbytes' load_in_4bit does) or "targets".
    allocator: the CUDA caching allocator's mode whose reserved memory is modelled
        (reserved.ALLOCATORS): "caching" (PyTorch's default) or "expandable"
        (PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True).
    experts: what the adapter methods do with a mixture-of-experts model's experts, which
        transformers 5 stores as one 3-D parameter per projection (no nn.Linear, so no target
        name nor all-linear reaches them): "frozen" (PEFT's all-linear: attention only), or
        "adapt": lora and qlora through PEFT's target_parameters, paca and qpaca on r input
        columns of every expert (paca/experts.py); dora keeps them frozen (PEFT has no DoRA
        for target_parameters). methods/experts.py says what each method got; full trains
        them either way.
    keep_outputs: the loop holds the model's output (its logits, and the KV cache that
        transformers builds in training while use_cache is on) through backward and the
        optimizer step, until the next step's forward and loss have run, as `outputs =
        model(**batch); loss = outputs.loss` loops do (PEFT's MetaMathQA benchmark, accelerate's
        examples); False: it is dropped before backward, as HF Trainer and torchtune do.
    kbit_prep: PEFT's prepare_model_for_kbit_training for the quantized methods: every
        parameter that is not 4-bit (embeddings, norms, head) cast to fp32. Its gradient
        checkpointing, on by default in PEFT, is grad_ckpt here: QLoRA recipes pass both.
    """

    targets: tuple[str, ...] | str | None = None
    attention: str | None = None
    grad_ckpt: bool = False
    loss: str = "hf"
    loss_chunks: int = DEFAULT_LOSS_CHUNKS
    optimizer: str = "adamw"
    lr: float = DEFAULT_LR
    grad_accum: int = 1
    max_grad_norm: float | None = None
    amp: bool = False
    quantize: str = "all-linear"
    kbit_prep: bool = True
    allocator: str = "caching"
    experts: str = "frozen"
    keep_outputs: bool = False

    def __post_init__(self):
        if self.targets is not None and self.targets != ALL_LINEAR:
            names = tuple(self.targets) if not isinstance(self.targets, str) else (self.targets,)
            for name in names:
                validate.text(name, "target module name", 200)
            object.__setattr__(self, "targets", names)
            if not names:
                raise ValueError("no target modules given")
        if self.attention is not None:
            object.__setattr__(self, "attention",
                               ATTENTION_ALIASES.get(self.attention, self.attention))
        _choice(self.loss, LOSSES, "loss")
        _choice(self.optimizer, OPTIMIZERS, "optimizer")
        _choice(self.quantize, QUANTIZE_SCOPES, "quantize")
        _choice(self.allocator, ALLOCATORS, "allocator")
        _choice(self.experts, EXPERTS, "--experts")
        if not isinstance(self.keep_outputs, bool):
            raise ValueError(f"keep_outputs must be true or false, got {self.keep_outputs!r:.40}")
        validate.number(self.loss_chunks, "--loss-chunks", minimum=1, maximum=4096, integer=True)
        validate.number(self.grad_accum, "--grad-accum", minimum=1, maximum=1024, integer=True)
        validate.number(self.lr, "lr", above=0, maximum=1e3)
        if self.max_grad_norm is not None:
            validate.number(self.max_grad_norm, "--max-grad-norm", above=0, maximum=1e9)

    def describe(self, device: str) -> dict:
        """run.yaml's `recipe`: every field, with the optimizer and loss in words."""
        described = asdict(self)
        described["targets"] = (self.targets if self.targets in (None, ALL_LINEAR)
                                else list(self.targets))
        foreach = "off (torch's CPU default)" if device == "cpu" else "on"
        described["optimizer_detail"] = OPTIMIZER_WORDS[self.optimizer].format(
            lr=f"{self.lr:g}", foreach=foreach)
        described["loss_detail"] = LOSS_WORDS[self.loss].format(chunks=self.loss_chunks)
        return described


OPTIMIZER_WORDS = {
    "adamw": "torch.optim.AdamW, lr {lr}, zero_grad(set_to_none); foreach {foreach}",
    "adamw-8bit": "bitsandbytes AdamW8bit, lr {lr}: block-wise 8-bit states (blocks of 256, "
                  "fp32 absmax each; tensors under 4096 values keep fp32 states)",
    "paged-adamw-8bit": "bitsandbytes PagedAdamW8bit, lr {lr}: AdamW8bit's states in paged "
                        "(CUDA unified) memory, outside PyTorch's caching allocator",
    "sgd": "torch.optim.SGD, lr {lr}, no momentum (no state)",
    "adafactor": "torch.optim.Adafactor, lr {lr}: factored second moments (a row and a column "
                 "vector per matrix), no first moment",
}
LOSS_WORDS = {
    "hf": "transformers ForCausalLM loss on the full logits (upcast to fp32), labels = inputs",
    "chunked": "chunked cross-entropy as torchtune's CEWithChunkedOutputLoss: the head applied "
               "per chunk of tokens ({chunks} chunks), each chunk upcast to fp32 on its own "
               "(implemented here in torch)",
    "fused-linear": "fused linear cross-entropy as Liger's: {chunks} token chunks, logits, loss "
                    "and gradients per chunk in forward; the full logits never exist "
                    "(implemented here in torch)",
}


def _choice(value, choices, what: str) -> None:
    if value not in choices:
        raise ValueError(f"unknown {what} {str(value)[:40]!r}; choose from {', '.join(choices)}")


def default_targets() -> tuple[str, ...]:
    """The seven projections of a Llama decoder layer (q, k, v, o, gate, up, down): PaCA's
    default, and what the paper adapts. On an architecture without them, resolve_targets
    uses all-linear and says so."""
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
