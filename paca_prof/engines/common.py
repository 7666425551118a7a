"""What every engine shares: the run specification, building a prepared model, and the
training step itself (forward, loss, backward, AdamW step), with its phases announced to the
instruments."""

from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass, field

import pandas as pd

import torch
from torch import nn

from paca_prof import methods as method_registry
from paca_prof import presets
from paca_prof.engines.attention import implementation_name
from paca_prof.instrument import (
    LOSS,
    OPTIMIZER,
    ROOT,
    ModuleScopes,
    module_depth,
    module_kind,
    when_all_grads,
)


@dataclass
class RunSpec:
    """Everything that defines a run; recorded in run.yaml."""

    model: str
    seq: int
    batch: int = 1
    dtype: str = "bf16"
    device: str = "cpu"
    methods: tuple[str, ...] = method_registry.DEFAULT_METHODS
    settings: method_registry.MethodSettings = field(default_factory=method_registry.MethodSettings)
    steps: int = 5
    warmup: int = 2
    attention: str = "sdpa"
    grad_ckpt: bool = False
    seed: int = 0

    def __post_init__(self):
        if self.seq <= 0:
            raise ValueError(f"--seq must be positive, got {self.seq}")
        if self.batch <= 0:
            raise ValueError(f"--batch must be positive, got {self.batch}")
        if self.steps <= 0:
            raise ValueError(f"--steps must be positive, got {self.steps}")
        if self.warmup < 0:
            raise ValueError(f"--warmup must be 0 or more, got {self.warmup}")
        if self.dtype not in presets.DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose from {', '.join(presets.DTYPES)}")
        for method in self.methods:
            method_registry.check_method(method)
        self.model_name, self.config = presets.load_config(self.model)

    @property
    def torch_dtype(self) -> torch.dtype:
        return presets.DTYPES[self.dtype]


def build_prepared(spec: RunSpec, method: str, device: str) -> tuple[nn.Module, torch.optim.Optimizer | None]:
    """A freshly built model prepared for `method`, and its AdamW (None for frozen)."""
    torch.manual_seed(spec.seed)
    model = presets.build_model(spec.config, spec.torch_dtype, device,
                                implementation_name(spec.attention))
    model = method_registry.prepare(model, method, spec.settings)
    if spec.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    trainable = method_registry.trainable_parameters(model)
    # foreach is torch's default on CUDA, the for-loop on the CPU; a simulation models the
    # device the spec names (meta stands for a CUDA GPU), and runs faster with foreach.
    foreach = None if spec.device == "cpu" else True
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, foreach=foreach) if trainable else None
    return model, optimizer


def make_batch(spec: RunSpec, device: str) -> torch.Tensor:
    """Random token ids (batch x seq), which serve as labels too."""
    generator = torch.Generator().manual_seed(spec.seed)
    ids = torch.randint(0, spec.config.vocab_size, (spec.batch, spec.seq), generator=generator)
    return ids.to(device)


def validate_against_model(spec: RunSpec) -> None:
    """Raise ValueError for settings the model cannot take (rank too large, unknown targets),
    before any engine builds a full-size model. Builds the model on the meta device only."""
    from paca.model import find_targets

    model = presets.build_model(spec.config, spec.torch_dtype, "meta",
                                implementation_name(spec.attention))

    for name, linear in find_targets(model, spec.settings.targets).items():
        if spec.settings.rank > min(linear.in_features, linear.out_features):
            raise ValueError(
                f"--rank {spec.settings.rank} is larger than {name} "
                f"({linear.out_features} x {linear.in_features})"
            )


class Phase:
    """Announce a step phase to the scopes, and to any extra context (timer, profiler range)."""

    def __init__(self, scopes: ModuleScopes | None, name: str, *contexts):
        self.scopes, self.name, self.contexts = scopes, name, contexts
        self._stack = contextlib.ExitStack()

    def __enter__(self):
        if self.scopes is not None:
            self.scopes.phase = self.name
        for context in self.contexts:
            self._stack.enter_context(context)
        return self

    def __exit__(self, *exc):
        self._stack.close()
        if self.scopes is not None:
            self.scopes.end_phase(self.name)
            self.scopes.phase = "idle"


def training_step(model: nn.Module, optimizer, ids: torch.Tensor, scopes: ModuleScopes | None,
                  phase_context=lambda name: contextlib.nullcontext()) -> torch.Tensor:
    """One step: forward with the loss, backward, AdamW step and zero_grad(set_to_none).

    The loss is computed outside the model (as transformers does when given labels) so it has
    its own scope. `phase_context(name)` gives a context entered around each phase.
    """
    with Phase(scopes, "forward", phase_context("forward")):
        logits = model(input_ids=ids).logits
        if scopes is not None:
            scopes.enter(LOSS, "forward")
        loss = model.loss_function(logits=logits, labels=ids, vocab_size=model.config.vocab_size)
        if scopes is not None:
            scopes.exit(LOSS, "forward")
            if loss.requires_grad:  # the loss's backward: from its own grad to the logits'
                loss.register_hook(lambda grad: scopes.enter(LOSS, "backward"))
                when_all_grads([logits], lambda: scopes.exit(LOSS, "backward"))
    del logits
    with Phase(scopes, "backward", phase_context("backward")):
        loss.backward()
    with Phase(scopes, "optimizer", phase_context("optimizer")):
        if scopes is not None:
            scopes.enter(OPTIMIZER, "optimizer")
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if scopes is not None:
            scopes.exit(OPTIMIZER, "optimizer")
    return loss.detach()


def module_kinds(model: nn.Module) -> dict[str, str]:
    """Kind of every module path of the model, plus the loss and optimizer scopes."""
    kinds = {path: module_kind(module, path) for module, path in ModuleScopes(model).paths.items()}
    kinds[LOSS], kinds[OPTIMIZER] = "loss", "optimizer"
    return kinds


def layer_table(method: str, kinds: dict[str, str], latencies: dict, ops: pd.DataFrame,
                activation: dict[str, int]) -> pd.DataFrame:
    """One row per (module, phase): latency (measured median or projected; NaN if neither),
    activation bytes (forward rows; the innermost module owns them), and op count and FLOPs
    including submodules."""
    counts: dict[tuple[str, str], int] = defaultdict(int)
    flops: dict[tuple[str, str], float] = defaultdict(float)
    for module, phase, op_flops in zip(ops.get("module", []), ops.get("phase", []),
                                       ops.get("flops", [])):
        for ancestor in ancestors(module):
            counts[(ancestor, phase)] += 1
            flops[(ancestor, phase)] += op_flops
    rows = []
    for path, kind in kinds.items():
        for phase in ("forward", "backward", "optimizer"):
            key = (path, phase)
            if key not in latencies and key not in counts and not (
                    phase == "forward" and path in activation):
                continue
            rows.append({
                "method": method, "module": path, "phase": phase, "kind": kind,
                "depth": module_depth(path), "latency_ms": latencies.get(key, float("nan")),
                "activation_bytes": activation.get(path, 0) if phase == "forward" else pd.NA,
                "n_kernels": counts.get(key, 0), "flops": flops.get(key, 0.0),
            })
    return pd.DataFrame(rows)


def ancestors(path: str) -> list[str]:
    """The module itself and every module that contains it, the root included."""
    if path.startswith("["):
        return [path]
    parts = path.split(".")
    return [ROOT] + [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
