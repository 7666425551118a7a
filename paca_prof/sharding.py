"""What FSDP2 holds of a model: its sharded parameters, and the gathered (unsharded) ones that
a group registers on its modules between its all-gather and its reshard.

The instruments read these: the bytes alive before a step are the sharded parameters' (the
root group's are already gathered when the first forward hook sees the step), and a gathered
parameter saved for backward is a parameter, not an activation (ledger.py). Empty for a model
FSDP2 does not manage. Reads FSDP2's private state (torch.distributed.fsdp._fully_shard:
FSDPParamGroup.fsdp_params, FSDPParam.sharded_param and _unsharded_param), as torch 2.6-2.13
name it.
"""

from __future__ import annotations

from torch import nn


def _fsdp_params(model: nn.Module) -> list:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without distributed
        return []
    found = []
    for module in model.modules():
        if isinstance(module, FSDPModule):
            group = module._get_fsdp_state()._fsdp_param_group
            if group is not None:
                found.extend(group.fsdp_params)
    return found


def sharded_parameters(model: nn.Module) -> list | None:
    """The sharded parameters (DTensors) of every FSDP2 group in `model`, whatever is
    registered on the modules now, or None for a model FSDP2 does not manage."""
    return [param.sharded_param for param in _fsdp_params(model)] or None


def gathered_parameters(model: nn.Module) -> list:
    """The unsharded parameters FSDP2 has made for `model`'s groups so far (one per parameter,
    reused by every all-gather; freed storage between them)."""
    return [param._unsharded_param for param in _fsdp_params(model)
            if hasattr(param, "_unsharded_param")]
