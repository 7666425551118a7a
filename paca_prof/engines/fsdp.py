"""FSDP2 for measured runs: the process group, fully_shard per decoder layer and at the root,
and the gathering of every rank's results to rank 0.

A measured run with --fsdp runs under torchrun: every rank prepares the same model, shards it
(shard), steps it on its own batch and measures itself as a single-process run does; rank 0
gathers every rank's tables (gather_results, torch.distributed.gather_object) and writes the
one trace folder, a `rank` column in every table.

On gloo every collective runs to the end before it returns, and waits until gloo's worker
thread has dropped its references to the buffers (MainThreadFrees): otherwise that thread can
free a buffer FSDP2 already let go of, the profiler (which follows the main thread) misses the
free, and the measured peak holds the buffer longer than the run did, by chance.

Limits: gloo on the CPU, nccl on CUDA (one GPU per rank: LOCAL_RANK); the 4-bit bases of qlora
and qpaca (bitsandbytes) are not sharded by fully_shard and are refused. On gloo the
all-gathers do not overlap compute (no CPU time is projected from these runs).
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp._fully_shard._fsdp_collectives import (DefaultAllGather,
                                                                   DefaultReduceScatter)

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
    groups = decoder_layers(model) + [model]
    for group in groups:
        fully_shard(group, mesh=mesh, reshard_after_forward=reshard)
    if not device.startswith("cuda"):
        for group in groups:
            group.set_custom_all_gather(MainThreadAllGather())
            group.set_custom_reduce_scatter(MainThreadReduceScatter())
    return model


# gloo's worker drops its references microseconds after it finishes; the bound is for a
# machine so loaded that the thread waits long to be scheduled (the wait ends at the release)
RELEASE_WAIT_S = 10.0


def _references(tensors) -> list[tuple[int, int]]:
    """Each tensor's (tensor, storage) reference counts: a collective's work holds the
    tensors, and the views of them it made, until its worker thread lets go."""
    return [(t._use_count(), torch._C._storage_Use_Count(t.untyped_storage()._cdata))
            for t in tensors]


def _collective_then_release(run, *tensors) -> None:
    """Run the collective `run()` to the end, then wait (at most RELEASE_WAIT_S) until no
    reference is left beyond those held before it: every free of these buffers is then the
    main thread's. After the deadline the measurement falls back on memory.with_missed_frees."""
    before = _references(tensors)
    work = run()
    if work is not None:
        work.wait()
    del work
    deadline = time.monotonic() + RELEASE_WAIT_S
    while any(now > then for now, then in zip(_references(tensors), before)):
        if time.monotonic() > deadline:
            return
        time.sleep(0)


class MainThreadAllGather(DefaultAllGather):
    """FSDP2's all-gather, run to the end and released by gloo's worker before it returns
    (so an asynchronous one, backward's prefetch, runs synchronously)."""

    def __call__(self, output_tensor, input_tensor, group, async_op=False):
        _collective_then_release(
            lambda: super(MainThreadAllGather, self).__call__(output_tensor, input_tensor,
                                                              group, async_op),
            output_tensor, input_tensor)
        return None


class MainThreadReduceScatter(DefaultReduceScatter):
    """FSDP2's reduce-scatter, run to the end and released by gloo's worker before it
    returns."""

    def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
        _collective_then_release(
            lambda: super(MainThreadReduceScatter, self).__call__(output_tensor, input_tensor,
                                                                  group, op, async_op),
            output_tensor, input_tensor)
        return None


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
