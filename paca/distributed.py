"""PaCA under FSDP2 (torch.distributed.fsdp.fully_shard).

FSDP2 shards every parameter on dim 0 and refuses non-contiguous ones; PacaLinear keeps
paca_weight column-major (out x r with strides (1, out), the grad GEMM's layout). Call
prepare_fully_shard(model) before fully_shard: each PaCA layer's paca_weight becomes a
contiguous (row-major) parameter with the same values. Then every rank holds the same rows of
W and of paca_weight (both out x ..., sharded on dim 0), so after each optimizer step a rank
writes its own rows of the trained columns into its own shard of W (PacaLinear.sync_columns);
`indices` is a buffer, which FSDP2 keeps whole on every rank.

Limits: the gradient of a row-major paca_weight is copied once into its layout by autograd
(the grad GEMM writes the transpose); QPaCA's 4-bit bases (bitsandbytes Params4bit) are not
supported by fully_shard.
"""

from __future__ import annotations

from torch import nn


def prepare_fully_shard(model: nn.Module) -> nn.Module:
    """Make every PaCA layer's paca_weight contiguous, for fully_shard; returns the model.
    Values, requires_grad and the column invariant are kept."""
    from paca.layer import PacaLayer

    for module in model.modules():
        if isinstance(module, PacaLayer) and not module.paca_weight.is_contiguous():
            old = module.paca_weight
            module.paca_weight = nn.Parameter(old.detach().contiguous(),
                                              requires_grad=old.requires_grad)
            module.__dict__["_synced_version"] = module.paca_weight._version
            module.__dict__["_synced_param"] = id(module.paca_weight)
    return model

