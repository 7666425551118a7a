"""Projected FSDP2 communication: each group's all-gather and reduce-scatter timed from its
message size and the interconnect, on a stream of its own, overlapped with compute as FSDP2's
prefetching overlaps it, in the same timeline as the projected kernels (engines/project.py).

The model, in full:
  - a collective over `world` ranks moving `nbytes` (the all-gather's output, the
    reduce-scatter's input) takes latency + (world - 1) / world * nbytes / bandwidth (a ring;
    bandwidth per GPU and direction: --interconnect's, else the GPU table's interconnect_gbps);
  - collectives run one at a time, in the order FSDP2 issues them: the root's and the first
    layer's all-gathers at the step's start; in forward, layer i+1's when layer i's forward
    starts (implicit prefetch); in backward, the last layer's at the root's pre-backward (the
    first backward kernel) and layer i-1's when layer i's backward starts (explicit prefetch;
    none when the parameters stay gathered, --no-reshard-after-forward); a layer's
    reduce-scatter when its last backward kernel ends, the root's at the end of backward;
  - a group's first kernel in a pass waits for its all-gather; the optimizer's first kernel
    waits for every reduce-scatter.
Limits: no contention between the collectives and the kernels for memory bandwidth; one
latency per collective (NCCL's protocol choice and message splitting not modelled); the
interconnect figures are datasheet peaks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from paca_prof.distributed import INTERCONNECTS, Distributed
from paca_prof.gpus import GpuSpec

DEFAULT_LATENCY_S = 10e-6
COMM_DEVICE = "interconnect"  # the ops table's device of a communication row
# A communication row's module: its group's path + ".[fsdp]" (a row of the group's kernel
# timeline), or "[fsdp]" for the root's.
COMM_MODULE = "[fsdp]"


@dataclass(frozen=True)
class Link:
    bus_bytes_per_s: float
    latency_s: float
    name: str


def link(gpu: GpuSpec, distributed: Distributed) -> Link:
    """The link collectives use: --interconnect's, else the GPU table's."""
    if distributed.interconnect is not None:
        spec = INTERCONNECTS[distributed.interconnect]
        return Link(spec["bus_bytes_per_s"], spec["latency_s"], distributed.interconnect)
    return Link(gpu.interconnect_gbps * 1e9, DEFAULT_LATENCY_S, gpu.interconnect)


def collective_us(nbytes: float, world: int, line: Link) -> float:
    """A ring all-gather or reduce-scatter of `nbytes` over `world` ranks, in microseconds."""
    if world <= 1 or nbytes <= 0:
        return 0.0
    return (line.latency_s + (world - 1) / world * nbytes / line.bus_bytes_per_s) * 1e6


def _within(module: str, path: str) -> bool:
    return module == path or module.startswith(path + ".")


def project_with_comm(ops: pd.DataFrame, gpu: GpuSpec, distributed: Distributed,
                      groups: list[tuple[str, int, int]]) -> pd.DataFrame:
    """`ops` (already projected: start_us, dur_us per kernel, in issue order) rescheduled with
    FSDP2's collectives, and one row per collective added (device COMM_DEVICE, phase of its
    issue). `groups`: (path, all-gather bytes, reduce-scatter bytes) per decoder layer in
    order, then the root's ("" path)."""
    from paca_prof.engines.project import kernel_times_us

    ops = ops.sort_values("seq_no").reset_index(drop=True)
    if ops.empty or distributed.world_size <= 1:
        return ops
    line = link(gpu, distributed)
    world = distributed.world_size
    layers, root = groups[:-1], groups[-1]
    modules = ops["module"].to_numpy()
    phases = ops["phase"].to_numpy()
    kernel_us = kernel_times_us(ops, gpu)
    n = len(ops)

    def owner(i: int) -> int | None:
        for index, (path, _, _) in enumerate(layers):
            if _within(modules[i], path):
                return index
        return None

    owners = [owner(i) for i in range(n)]
    first = {}  # (phase, layer) -> index of its first kernel
    last_backward = {}
    for i in range(n):
        key = (phases[i], owners[i])
        first.setdefault(key, i)
        if phases[i] == "backward" and owners[i] is not None:
            last_backward[owners[i]] = i
    backward_start = next((i for i in range(n) if phases[i] == "backward"), None)
    backward_end = max((i for i in range(n) if phases[i] == "backward"), default=None)
    optimizer_start = next((i for i in range(n) if phases[i] == "optimizer"), None)

    comm_free = 0.0
    rows = []
    gathered_until = {}  # layer -> its all-gather's end

    def collective(kind, nbytes, at_us, path, phase):
        nonlocal comm_free
        start = max(at_us, comm_free)
        dur = collective_us(nbytes, world, line)
        comm_free = start + dur
        rows.append({"module": f"{path}.{COMM_MODULE}" if path else COMM_MODULE,
                     "phase": phase, "name": f"nccl:{kind}",
                     "start_us": start, "dur_us": dur, "bytes": float(nbytes)})
        return start + dur

    # Issued at the step's start: the root's all-gather, then the first layer's.
    root_ready = collective("all_gather", root[1], 0.0, root[0], "forward")
    if layers:
        gathered_until[("forward", 0)] = collective("all_gather", layers[0][1], 0.0,
                                                    layers[0][0], "forward")
    starts = np.empty(n)
    durs = kernel_us
    device_free = 0.0
    pending_rs = []
    for i in range(n):
        issued = (i + 1) * gpu.dispatch_us
        not_before = max(issued, device_free)
        if i == 0:
            not_before = max(not_before, root_ready)
        layer = owners[i]
        phase = phases[i]
        if layer is not None and first.get((phase, layer)) == i:
            if phase == "forward":
                not_before = max(not_before, gathered_until.get(("forward", layer), 0.0))
                if layer + 1 < len(layers):  # implicit prefetch of the next layer
                    gathered_until[("forward", layer + 1)] = collective(
                        "all_gather", layers[layer + 1][1], not_before,
                        layers[layer + 1][0], "forward")
            elif phase == "backward" and distributed.reshard_after_forward:
                not_before = max(not_before, gathered_until.get(("backward", layer), 0.0))
                if layer > 0:  # explicit backward prefetch of the layer before
                    gathered_until[("backward", layer - 1)] = collective(
                        "all_gather", layers[layer - 1][1], not_before,
                        layers[layer - 1][0], "backward")
        if i == backward_start and layers and distributed.reshard_after_forward:
            last = len(layers) - 1  # the root's pre-backward prefetches the last layer
            gathered_until.setdefault(("backward", last), collective(
                "all_gather", layers[last][1], not_before, layers[last][0], "backward"))
        if i == optimizer_start and pending_rs:
            not_before = max(not_before, max(pending_rs))
        starts[i] = not_before
        device_free = not_before + durs[i]
        if (phase == "backward" and layer is not None and last_backward.get(layer) == i
                and layers[layer][2]):
            pending_rs.append(collective("reduce_scatter", layers[layer][2], device_free,
                                         layers[layer][0], "backward"))
        if i == backward_end and root[2]:
            pending_rs.append(collective("reduce_scatter", root[2], device_free, root[0],
                                         "backward"))
    ops = ops.copy()
    ops["start_us"], ops["dur_us"] = starts, durs
    if not rows:
        return ops
    comm = pd.DataFrame(rows).assign(
        method=ops["method"].iloc[0], shapes="[]", dtype="", flops=0.0, adapter_branch=False,
        device=COMM_DEVICE, step=ops["step"].iloc[0])
    comm["seq_no"] = range(n, n + len(comm))
    return pd.concat([ops, comm], ignore_index=True)
