"""FSDP2 for measured runs: the process group, fully_shard per decoder layer and at the root,
and the gathering of every rank's results to rank 0.

A measured run with --fsdp runs under torchrun: every rank prepares the same model, shards it
(shard), steps it on its own batch and measures itself as a single-process run does; rank 0
gathers every rank's tables (gather_results, torch.distributed.gather_object) and writes the
one trace folder, a `rank` column in every table.

Limits: gloo on the CPU, nccl on CUDA (one GPU per rank: LOCAL_RANK); the 4-bit bases of qlora
and qpaca (bitsandbytes) are not sharded by fully_shard and are refused.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from paca_prof.distributed import Distributed


def init(device: str) -> tuple[int, int]:
    """Join torchrun's process group (gloo on cpu, nccl on cuda, once); (rank, world size)."""
    if not dist.is_initialized():
        cuda = device.startswith("cuda")
        if cuda:
            import os

            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size()


def rank() -> int:
    """This process's rank (0 outside a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's decoder layers: the modules of the classes transformers names in
    _no_split_modules (LlamaDecoderLayer, ...), in order; PEFT's wrapper looked through."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"--fsdp: no decoder layers found in {type(base).__name__} "
                         "(_no_split_modules)")
    return layers


def shard(model: nn.Module, distributed: Distributed, device: str) -> nn.Module:
    """fully_shard every decoder layer, then the root, over a 1-D mesh of every rank, with the
    run's reshard_after_forward (FSDP2 keeps the root's gathered either way). PaCA layers are
    made shardable first (paca/distributed.py). Returns the model (its parameters DTensors)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from paca.distributed import prepare_fully_shard

    if any(type(p).__name__ == "Params4bit" for p in model.parameters()):
        raise ValueError("--fsdp: 4-bit bases (qlora, qpaca) are not sharded by fully_shard; "
                         "simulate them with --device meta")
    prepare_fully_shard(model)
    mesh = init_device_mesh(device.split(":")[0], (distributed.world_size,))
    # None: FSDP2's default (reshard every group but the root, which backward needs first).
    reshard = None if distributed.reshard_after_forward else False
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard)
    return model


def gather_results(result):
    """Every rank's `result` (any picklable object), in rank order, on rank 0; None on the
    others."""
    world = dist.get_world_size()
    gathered = [None] * world if dist.get_rank() == 0 else None
    dist.gather_object(result, gathered, dst=0)
    return gathered


def broadcast(value):
    """Rank 0's `value` on every rank (a picklable object)."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
