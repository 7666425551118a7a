"""Distributed: how a step is spread over ranks (world size, FSDP2, resharding, interconnect).

One definition, read by `run` (measured under torchrun, or simulated per rank), `plan` and
run.yaml. Torch-free: the engines turn it into a process group and `fully_shard` calls
(engines/fsdp.py), and the simulation into per-rank memory events (engines/fsdp_sim.py).

Words: a **rank** is one process of a distributed run (PEFT's word for the adapter's size is r).
Every rank runs the same step on its own batch of spec.batch sequences (the per-rank batch), as
data parallel training does; FSDP2 shards every parameter (frozen bases too), its gradient and
its optimizer state over the ranks on dim 0, and gathers a layer's parameters for its forward
and backward.

Limits: FSDP2 only (one `fully_shard` per decoder layer and one at the root; no DDP, no hybrid
sharding, no CPU offload, no tensor parallelism); every rank has the same shapes.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from paca_prof import validate

MAX_WORLD_SIZE = 65536
BACKENDS = ("nccl", "gloo")
# Bandwidth per GPU, bytes/s, one direction, as a ring collective sees it (bus bandwidth):
# NVLink 4 (H100 SXM: 450 GB/s per direction), PCIe 5 x16 (64 GB/s), InfiniBand NDR (400 Gb/s
# per GPU = 50 GB/s); latency per collective, seconds (NCCL's measured small-message floor).
INTERCONNECTS = {
    "nvlink": {"bus_bytes_per_s": 450e9, "latency_s": 10e-6,
               "what": "NVLink 4 within one node (450 GB/s per direction per GPU)"},
    "pcie": {"bus_bytes_per_s": 64e9, "latency_s": 15e-6,
             "what": "PCIe 5 x16 (64 GB/s per direction per GPU)"},
    "ib": {"bus_bytes_per_s": 50e9, "latency_s": 20e-6,
           "what": "InfiniBand NDR, one 400 Gb/s port per GPU (50 GB/s)"},
}


@dataclass(frozen=True)
class Distributed:
    """How the step is spread over ranks.

    world_size: ranks (1: one process). Measured: torchrun's WORLD_SIZE; simulated and
        planned: --world-size.
    fsdp: FSDP2 `fully_shard` of every decoder layer and of the root module.
    reshard_after_forward: free each layer's gathered parameters after its forward and gather
        them again for backward (FSDP2's default); False keeps them from forward to backward.
        The root keeps its parameters gathered either way (FSDP2 sets its root so).
    interconnect: the link whose bandwidth projects communication times (INTERCONNECTS), or
        None for the GPU's own (gpus.GpuSpec.interconnect).
    backend: the collectives' library: nccl (CUDA: no scratch buffers, the next layer's
        all-gather issued during the current one) or gloo (the CPU: one scratch buffer of the
        message's size per collective, no forward prefetch). Measured runs use gloo on the
        CPU and nccl on CUDA; simulated runs model nccl unless told (--backend gloo, to
        compare with a measured CPU run).
    """

    world_size: int = 1
    fsdp: bool = False
    reshard_after_forward: bool = True
    interconnect: str | None = None
    backend: str = "nccl"

    def __post_init__(self):
        validate.number(self.world_size, "--world-size", minimum=1, maximum=MAX_WORLD_SIZE,
                        integer=True)
        if self.world_size > 1 and not self.fsdp:
            raise ValueError("--world-size above 1 shards the model with FSDP2: give --fsdp too")
        if not self.reshard_after_forward and not self.fsdp:
            raise ValueError("--no-reshard-after-forward is an FSDP2 setting: give --fsdp too")
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {str(self.backend)[:40]!r}; choose from "
                             f"{', '.join(BACKENDS)}")
        if self.interconnect is not None and self.interconnect not in INTERCONNECTS:
            raise ValueError(f"unknown interconnect {str(self.interconnect)[:40]!r}; choose "
                             f"from {', '.join(INTERCONNECTS)}")

    def describe(self) -> dict:
        """run.yaml's `distributed`."""
        described = asdict(self)
        described["detail"] = (
            f"FSDP2 fully_shard per decoder layer and at the root over {self.world_size} "
            f"rank(s), reshard after forward {'on' if self.reshard_after_forward else 'off'}; "
            "parameters, gradients and optimizer states sharded on dim 0 (frozen bases too); "
            "each rank's batch is the run's batch" if self.fsdp else "one process")
        return described


def launched() -> dict | None:
    """torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) as ints, or None when this
    process was not started by a distributed launcher. ValueError for values that are not
    whole numbers in range."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return None
    values = {}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        text = os.environ.get(name, "0")
        try:
            values[name.lower()] = int(text)
        except ValueError:
            raise ValueError(f"{name}={text[:40]!r} in the environment is not a whole number") \
                from None
    if not 1 <= values["world_size"] <= MAX_WORLD_SIZE or not \
            0 <= values["rank"] < values["world_size"]:
        raise ValueError(f"RANK={values['rank']} WORLD_SIZE={values['world_size']} in the "
                         "environment are out of range")
    return values


def for_run(device: str, fsdp: bool, world_size: int | None, reshard_after_forward: bool,
            interconnect: str | None = None, backend: str | None = None) -> Distributed:
    """The Distributed of a `run` from its flags and the launch, checked:

    - a measured run (cpu, cuda) with --fsdp needs a distributed launch (torchrun), and a
      --world-size, if given, must be torchrun's;
    - a measured run launched by torchrun with more than one rank needs --fsdp;
    - a simulated run (meta) takes --world-size (default 1), never a launch.
    ValueError (one line) otherwise."""
    launch = launched()
    if world_size is not None:
        validate.number(world_size, "--world-size", minimum=1, maximum=MAX_WORLD_SIZE,
                        integer=True)
    if device == "meta":
        if launch is not None and launch["world_size"] > 1:
            raise ValueError("a simulated run (--device meta) is one process: run it without "
                             "torchrun, with --world-size N")
        return Distributed(world_size or 1, fsdp, reshard_after_forward, interconnect,
                           backend or "nccl")
    if backend is not None:
        raise ValueError("--backend is for simulated runs: a measured run uses gloo on the "
                         "CPU and nccl on CUDA")
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if launch is None:
        if fsdp:
            raise ValueError("--fsdp on a measured run needs a distributed launch: torchrun "
                             "--nproc-per-node N -m paca_prof run ... (or --device meta to "
                             "simulate N ranks with --world-size N)")
        if world_size not in (None, 1):
            raise ValueError(f"--world-size {world_size} on a measured run needs torchrun "
                             f"--nproc-per-node {world_size} and --fsdp")
        return Distributed(1, False, reshard_after_forward, interconnect, backend)
    if world_size is not None and world_size != launch["world_size"]:
        raise ValueError(f"--world-size {world_size} does not match torchrun's WORLD_SIZE "
                         f"{launch['world_size']}")
    if not fsdp and launch["world_size"] > 1:
        raise ValueError(f"launched on {launch['world_size']} ranks: give --fsdp (the only "
                         "distributed mode)")
    return Distributed(launch["world_size"], fsdp, reshard_after_forward, interconnect, backend)


def shard_rows(rows: int, world_size: int, rank: int) -> tuple[int, int]:
    """FSDP2's dim-0 shard of a parameter with `rows` rows on `rank`: (rows it holds, rows its
    padded storage holds). Shards are torch.chunk's (ceil(rows / world_size) each, the last
    ones shorter or empty); every rank's storage is padded to ceil(rows / world_size) rows."""
    padded = -(-rows // world_size)
    held = max(0, min(padded, rows - rank * padded))
    return held, padded
