"""The loss of a training step, as the recipe names it (recipe.LOSSES): how the logits are made
and turned into the causal-LM loss, which decides what the head and the loss keep in memory.

  hf            transformers' ForCausalLM loss on the model's full logits: the logits (model
                dtype), their fp32 upcast and the fp32 log-probabilities, at once.
  chunked       torchtune's CEWithChunkedOutputLoss: the head applied to each of N chunks of
                tokens, each chunk's logits upcast to fp32 on their own, the losses summed.
  fused-linear  fused linear cross-entropy as Liger computes it: per chunk of tokens, the
                logits, the loss and the gradients of the hidden states (and of the head's
                weight if it trains) in forward, kept for backward; the full logits never exist.

Each loss is an nn.Module, so the loss has its own scope ([loss]) in every trace. `takes` says
what it is given beside the labels (the inputs: the loss shifts them, as transformers does):
"logits", the model's own output (hf: the model runs its head and soft-cap as transformers
does), or "hidden", the decoder's last hidden states (the loss calls the head itself). The chunked and fused losses are implemented
here in torch: torchtune's needs torchtune's dependencies, Liger's needs Triton (GPU only), and
the simulation needs losses that run on the meta device; they compute the same values.

Limits: logit soft-capping (Gemma 2) is applied as transformers does it; a model whose head is
not `lm_head` on the decoder's last hidden state (multimodal heads) is not supported.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


def shifted_labels(labels: torch.Tensor) -> torch.Tensor:
    """The next-token targets of causal LM training (transformers' ForCausalLMLoss): labels
    shifted left by one, the last position ignored."""
    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]


class _Loss(nn.Module):
    """Losses given the hidden states: the model's head and soft-cap, kept out of this module's
    submodules so that the head keeps its own path (lm_head) in the trace."""

    takes = "hidden"

    def __init__(self, model: nn.Module):
        super().__init__()
        self.__dict__["_head"] = model.get_output_embeddings()
        self.vocab_size = model.config.vocab_size
        self.softcap = getattr(model.config, "final_logit_softcapping", None)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self._head(hidden)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


class HfLoss(nn.Module):
    """transformers' causal-LM loss on the model's full logits (its ForCausalLMLoss):
    logits.float(), then cross-entropy with mean reduction over the targets not ignored."""

    takes = "logits"

    def __init__(self, model: nn.Module):
        super().__init__()
        self.__dict__["_loss_function"] = model.loss_function
        self.vocab_size = model.config.vocab_size

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self._loss_function(logits=logits, labels=labels, vocab_size=self.vocab_size)


class ChunkedLoss(_Loss):
    """torchtune's chunked cross-entropy: the head and the fp32 upcast per chunk of tokens
    (torch.chunk along the sequence), cross-entropy summed over chunks, divided by the targets
    counted."""

    def __init__(self, model: nn.Module, chunks: int):
        super().__init__(model)
        self.chunks = chunks

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        targets = shifted_labels(labels)
        total = hidden.new_zeros((), dtype=torch.float32)
        for hidden_chunk, target_chunk in zip(hidden.chunk(self.chunks, dim=1),
                                              targets.chunk(self.chunks, dim=1)):
            logits = self.logits(hidden_chunk).float()
            total = total + F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                            target_chunk.reshape(-1),
                                            ignore_index=IGNORE_INDEX, reduction="sum")
        return total / (targets != IGNORE_INDEX).sum().clamp(min=1)


class FusedLinearLoss(_Loss):
    """Fused linear cross-entropy (Liger's algorithm, in torch): see _FusedLinearCrossEntropy."""

    def __init__(self, model: nn.Module, chunks: int):
        super().__init__(model)
        self.chunks = chunks
        if self.softcap:
            raise ValueError("--loss fused-linear does not apply final logit soft-capping; "
                             "use hf or chunked for this architecture")
        if getattr(self._head, "bias", None) is not None:
            raise ValueError("--loss fused-linear supports an output head without bias")

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        targets = shifted_labels(labels).reshape(-1)
        flat = hidden.reshape(-1, hidden.shape[-1])
        return _FusedLinearCrossEntropy.apply(flat, self._head.weight, targets, self.chunks)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Liger's fused linear cross-entropy: for each chunk of tokens, logits = x @ W.T in the
    inputs' dtype, log-softmax and loss in fp32, and at once the gradient of the loss with
    respect to the chunk's x (and W, accumulated in fp32 when W trains); backward only scales
    the gradients kept by the incoming gradient."""

    @staticmethod
    def forward(ctx, x, weight, targets, chunks):
        valid = (targets != IGNORE_INDEX).sum().clamp(min=1)
        grad_x = torch.empty_like(x)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) \
            if weight.requires_grad else None
        loss = x.new_zeros((), dtype=torch.float32)
        for rows in torch.arange(x.shape[0], device="cpu").chunk(chunks):
            start, stop = int(rows[0]), int(rows[-1]) + 1
            x_chunk, t_chunk = x[start:stop], targets[start:stop]
            logits = (x_chunk @ weight.t()).float()
            log_probs = torch.log_softmax(logits, dim=-1)
            keep = t_chunk != IGNORE_INDEX
            picked = log_probs.gather(1, t_chunk.clamp(min=0).unsqueeze(1)).squeeze(1)
            loss = loss - (picked * keep).sum()
            # d loss / d logits = (softmax - one_hot) / valid, rows of ignored targets zero
            grad_logits = log_probs.exp_()
            grad_logits.scatter_add_(1, t_chunk.clamp(min=0).unsqueeze(1),
                                     -keep.to(grad_logits.dtype).unsqueeze(1))
            grad_logits.mul_((keep.to(grad_logits.dtype) / valid).unsqueeze(1))
            grad_logits = grad_logits.to(x.dtype)
            grad_x[start:stop] = grad_logits @ weight
            if grad_weight is not None:
                grad_weight.add_((grad_logits.t() @ x_chunk).float())
        ctx.save_for_backward(grad_x, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss / valid

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_weight = ctx.saved_tensors
        grad_x = grad_x * grad_loss.to(grad_x.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_loss).to(ctx.weight_dtype)
        return grad_x, grad_weight, None, None


def make_loss(name: str, model: nn.Module, chunks: int) -> nn.Module:
    """The loss module of recipe loss `name` for `model`."""
    if name == "hf":
        return HfLoss(model)
    if name == "chunked":
        return ChunkedLoss(model, chunks)
    if name == "fused-linear":
        return FusedLinearLoss(model, chunks)
    raise ValueError(f"unknown loss {name!r}")
