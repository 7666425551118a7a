"""Attention as the target device runs it, for simulated runs.

On the meta device SDPA cannot choose a backend the way a GPU would, so simulated runs call the
fused kernels' aten ops directly; their meta kernels and autograd formulas give the exact
outputs and saved tensors of the real kernels:
  flash      aten._scaled_dot_product_flash_attention (CUDA, bf16/fp16): saves q, k, v, the
             output and an fp32 logsumexp (B x H x L); O(L) memory, never an L x L matrix.
             Grouped-query k and v are passed unexpanded, as SDPA's enable_gqa does.
  efficient  aten._scaled_dot_product_efficient_attention (CUDA, any float dtype, fp32
             included): the same saved set; k and v are expanded to all heads first.
  eager      transformers' own eager attention: materialises the L x L scores and softmax.
Measured runs use `sdpa` (torch picks the kernel) or `eager`; which one a run uses is the
recipe's (recipe.resolve_attention).
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv

# Names without "flash" in them: transformers would look for a flash-attn package.
_REGISTERED = {"flash": "paca_prof_fused_causal", "efficient": "paca_prof_mem_efficient"}


def implementation_name(attention: str) -> str:
    """The transformers attn_implementation to build the model with."""
    if attention in _REGISTERED:
        _register()
        return _REGISTERED[attention]
    return attention


def _flash(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    out = torch.ops.aten._scaled_dot_product_flash_attention(
        query, key, value, dropout, True, False, scale=scaling)[0]
    return out.transpose(1, 2).contiguous(), None


def _efficient(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    out = torch.ops.aten._scaled_dot_product_efficient_attention(
        query, key, value, None, True, dropout, True, scale=scaling)[0]
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    # No mask function is registered, so transformers builds no mask for these (as for
    # flash_attention_2): causal masking happens inside the kernel.
    AttentionInterface.register(_REGISTERED["flash"], _flash)
    AttentionInterface.register(_REGISTERED["efficient"], _efficient)
