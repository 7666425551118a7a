"""A prepared method and its training step: what every engine runs, with no instrument in it.

The step is plain training code (forward, loss, backward, optimizer step, zero_grad); the
engines wrap it in a Capture session, which sees its phases and scopes by itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from paca_prof.capture import Capture
from paca_prof.engines.attention import implementation_name
from paca_prof.methods import registry
from paca_prof.modules import LOSS
from paca_prof.spec import RunSpec


class CausalLMLoss(nn.Module):
    """transformers' causal-LM loss on the logits (labels = the inputs, shifted inside), as a
    module so that the loss has its own scope ([loss]) in every trace."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self._loss_function = model.loss_function
        self.vocab_size = model.config.vocab_size

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self._loss_function(logits=logits, labels=labels, vocab_size=self.vocab_size)


@dataclass
class Prepared:
    """One method's model, optimizer (None for frozen) and loss, ready to step."""

    method: str
    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    loss: nn.Module
    r: int = 0
    steps_run: int = 0
    stale_steps: int = 0

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """One training step on `ids` (labels = inputs); returns the loss, detached. For a
        method whose columns can be stale (the authors' scheme), a step in which any layer's
        forward ran on stale columns counts in `stale_steps`."""
        counter = registry.REGISTRY[self.method].stale_counter
        before = counter(self.model) if counter else 0
        logits = self.model(input_ids=ids).logits
        loss = self.loss(logits, ids)
        del logits
        loss.backward()
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.steps_run += 1
        if counter and counter(self.model) > before:
            self.stale_steps += 1
        return loss.detach()

    def stale_counts(self) -> dict[str, int]:
        """The summary's stale_steps and steps_run, for a method that counts stale steps."""
        if registry.REGISTRY[self.method].stale_counter is None:
            return {}
        return {"stale_steps": self.stale_steps, "steps_run": self.steps_run}

    def capture(self) -> Capture:
        """A Capture session over this model, its optimizer and its loss."""
        return Capture(self.model, self.optimizer, modules={LOSS: self.loss})

    @property
    def trainable_params(self) -> int:
        return sum(p.numel() for p in registry.trainable_parameters(self.model))


def prepare(spec: RunSpec, method: str, device: str) -> Prepared:
    """A freshly built model (random weights, seeded) prepared for `method`, with its optimizer
    as the recipe says."""
    torch.manual_seed(spec.seed)
    from paca_prof import presets

    model = presets.build_model(spec.config, spec.torch_dtype, device,
                                implementation_name(spec.recipe.attention))
    model = registry.prepare(model, method, spec.settings, spec.recipe, spec.peft_config)
    if spec.recipe.grad_ckpt:
        enable_checkpointing(model)
    model.train()
    trainable = registry.trainable_parameters(model)
    # foreach is torch's default on CUDA, the for-loop on the CPU; a simulation models the
    # device a GPU run would use (meta stands for a CUDA GPU), and runs faster with foreach.
    foreach = None if spec.device == "cpu" else True
    optimizer = (torch.optim.AdamW(trainable, lr=spec.recipe.lr, foreach=foreach)
                 if trainable else None)
    return Prepared(method, model, optimizer, CausalLMLoss(model), spec.settings.r)


def enable_checkpointing(model: nn.Module) -> None:
    """transformers' gradient checkpointing of every decoder layer, non-reentrant (its
    activation_checkpointing_enable where it has one; gradient_checkpointing_enable, now
    deprecated, before)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def make_batch(spec: RunSpec, device: str) -> torch.Tensor:
    """Random token ids (batch x seq), which serve as labels too."""
    generator = torch.Generator().manual_seed(spec.seed)
    ids = torch.randint(0, spec.config.vocab_size, (spec.batch, spec.seq), generator=generator)
    return ids.to(device)


def validate_against_model(spec: RunSpec) -> None:
    """ValueError for settings the model cannot take (targets that match no linear, an r that a
    method's rule refuses), before any engine builds a full-size model. Builds on meta only."""
    from paca_prof import presets

    model = presets.build_model(spec.config, spec.torch_dtype, "meta",
                                implementation_name(spec.recipe.attention))
    registry.check_settings(model, spec.methods, spec.settings, spec.recipe, spec.device,
                            spec.peft_config)
