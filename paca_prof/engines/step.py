"""A prepared method and its training step: what every engine runs, with no instrument in it.

The step is plain training code, as the recipe says: per micro-batch (grad_accum of them) the
forward and the loss (under autocast with amp) and backward, then gradient clipping, the
optimizer step and zero_grad(set_to_none). With recipe.keep_outputs the model's output is held
until the next forward's loss, as `outputs = model(**batch)` loops hold it; otherwise it goes
before backward, as in HF Trainer. The engines wrap it in a Capture session, which sees
its phases and scopes by itself. Clipping runs in an optimizer step pre-hook, so that it falls
in the optimizer phase that Capture sees (as it is part of the update).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from paca_prof import amp, losses, optimizers
from paca_prof.capture import Capture
from paca_prof.engines.attention import implementation_name
from paca_prof.methods import registry
from paca_prof.modules import LOSS
from paca_prof.recipe import Recipe
from paca_prof.spec import RunSpec


@dataclass
class Prepared:
    """One method's model, optimizer (None for frozen) and loss, ready to step."""

    method: str
    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    loss: nn.Module
    recipe: Recipe = field(default_factory=Recipe)
    autocast_dtype: torch.dtype | None = None
    r: int = 0
    steps_run: int = 0
    stale_steps: int = 0
    kept_output: object = None  # the last forward's output, with recipe.keep_outputs

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """One training step on `ids` (labels = inputs): recipe.grad_accum micro-batches of
        `ids`, then the update. Returns the loss of the step (summed over micro-batches),
        detached. For a method whose columns can be stale (the authors' scheme), a step in which
        any layer's forward ran on stale columns counts in `stale_steps`."""
        counter = registry.REGISTRY[self.method].stale_counter
        before = counter(self.model) if counter else 0
        total = None
        for _ in range(self.recipe.grad_accum):
            with amp.autocast(ids.device.type, self.autocast_dtype):
                if self.recipe.keep_outputs:
                    loss = self._loss_keeping_output(ids)
                elif self.loss.takes == "logits":
                    loss = self.loss(self.model(input_ids=ids).logits, ids)
                else:
                    decoder = getattr(self.model, self.model.base_model_prefix)
                    loss = self.loss(decoder(input_ids=ids).last_hidden_state, ids)
            if self.recipe.grad_accum > 1:
                loss = loss / self.recipe.grad_accum
            loss.backward()
            total = loss.detach() if total is None else total + loss.detach()
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.steps_run += 1
        if counter and counter(self.model) > before:
            self.stale_steps += 1
        return total

    def _loss_keeping_output(self, ids: torch.Tensor) -> torch.Tensor:
        """The loss, the forward's output kept in `kept_output`: the previous one is freed
        only now, after this forward and its loss, as `outputs = model(**batch)` frees it."""
        if self.loss.takes == "logits":
            output = self.model(input_ids=ids)
            loss = self.loss(output.logits, ids)
        else:
            output = getattr(self.model, self.model.base_model_prefix)(input_ids=ids)
            loss = self.loss(output.last_hidden_state, ids)
        self.kept_output = output
        return loss

    def kept_tensors(self) -> list[tuple[torch.Tensor, str]]:
        """The tensors of `kept_output` with their memory category: its tensors (the logits,
        or the hidden state a loss takes) logits_loss, its KV cache's activations. Empty
        without one."""
        if self.kept_output is None:
            return []
        kept = []
        for value in self.kept_output.to_tuple():  # tensors, and a cache's layers
            if isinstance(value, torch.Tensor):
                kept.append((value, "logits_loss"))
            for layer in getattr(value, "layers", ()):
                kept.extend((t, "activations") for t in (getattr(layer, "keys", None),
                                                          getattr(layer, "values", None))
                            if isinstance(t, torch.Tensor))
        return kept

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
    """A freshly built model (random weights, seeded) prepared for `method`, with its loss and
    optimizer as the recipe says. With amp, the parameters are fp32 and the step's forward runs
    under autocast in spec.dtype."""
    from paca_prof import presets

    recipe = spec.recipe
    torch.manual_seed(spec.seed)
    dtype = torch.float32 if recipe.amp else spec.torch_dtype
    model = presets.build_model(spec.config, dtype, device,
                                implementation_name(recipe.attention))
    model = registry.prepare(model, method, spec.settings, recipe, spec.peft_config)
    if recipe.grad_ckpt:
        enable_checkpointing(model)
    if spec.distributed.fsdp and device != "meta":
        from paca_prof.engines.fsdp import shard

        model = shard(model, spec.distributed, device)
    elif spec.distributed.fsdp:  # simulated: unsharded, in the layout fully_shard needs
        from paca.distributed import prepare_fully_shard

        prepare_fully_shard(model)
    model.train()
    trainable = registry.trainable_parameters(model)
    optimizer = optimizers.make_optimizer(recipe.optimizer, trainable, recipe.lr, spec.device)
    if optimizer is not None and recipe.max_grad_norm is not None:
        optimizer.register_step_pre_hook(_clip(trainable, recipe.max_grad_norm))
    return Prepared(method, model, optimizer,
                    losses.make_loss(recipe.loss, model, recipe.loss_chunks), recipe,
                    spec.torch_dtype if recipe.amp else None, spec.settings.r)


def _clip(params: list, max_norm: float):
    def clip(optimizer, args, kwargs):
        torch.nn.utils.clip_grad_norm_(params, max_norm)

    return clip


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
    """Random token ids (batch x seq), which serve as labels too; each rank of a distributed
    run its own (seeded by seed + rank)."""
    from paca_prof.engines.fsdp import rank

    generator = torch.Generator().manual_seed(spec.seed + rank())
    ids = torch.randint(0, spec.config.vocab_size, (spec.batch, spec.seq), generator=generator)
    return ids.to(device)


def validate_against_model(spec: RunSpec) -> dict:
    """ValueError for settings the model cannot take (targets that match no linear, an r that a
    method's rule refuses), before any engine builds a full-size model. Builds on meta only.
    Returns the targets as resolved for the architecture (registry.describe_targets)."""
    from paca_prof import presets

    model = presets.build_model(spec.config, spec.torch_dtype, "meta",
                                implementation_name(spec.recipe.attention))
    return registry.check_settings(model, spec.methods, spec.settings, spec.recipe,
                                   spec.device, spec.peft_config)
