"""The memory PyTorch's allocator may reserve for a training step on a device: the device's
memory less its CUDA context and a stated headroom.

    budget = memory - CUDA context (the GPU table's cuda_context_bytes) - headroom

A step fits when its reserved memory (reserved.py: its allocations replayed through the model
of PyTorch's caching allocator) is within the budget. The headroom is only what stays
unmodelled: DEFAULT_HEADROOM says what. Torch-free: the planner, `paca-prof run`'s ok/oom
verdict and the dashboard's Capacity tab share this one budget. Any sum of byte sizes and
percentages of the device memory is a headroom ("2GiB", "10%", "512MiB+1%", "0"); every answer
states it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from paca_prof.units import format_bytes, parse_bytes

DEFAULT_HEADROOM = "512MiB+1%"
HEADROOM_MEANING = ("what is not modelled: 512 MiB for the driver's share (torch sees 0.2-0.6 "
                    "GiB less than nvidia-smi) and cuBLAS/cuDNN workspaces, 1% for what the "
                    "allocator model leaves out (other streams, first-step-only allocations)")
_MAX_TERMS = 16


def parse_headroom(text: str | int, memory_bytes: int) -> int:
    """Bytes kept back from `memory_bytes`: a sum of sizes (units.parse_bytes) and percentages
    of the device memory, e.g. "1GiB+5%" (the default), "2GiB", "10%", "0". ValueError (one
    line) if a term does not parse, a percentage is not in [0, 100), or nothing would be left."""
    terms = str(text).split("+")
    if len(terms) > _MAX_TERMS:
        raise ValueError(f"cannot read headroom: more than {_MAX_TERMS} terms")
    total = 0
    for term in terms:
        term = term.strip()
        if term.endswith("%"):
            try:
                percent = float(term[:-1]) if len(term) <= 32 else math.nan
            except ValueError:
                percent = math.nan
            if not math.isfinite(percent):
                raise ValueError(f"cannot read headroom {str(text)[:64]!r}: {term[:32]!r} is "
                                 "not a percentage")
            if not 0 <= percent < 100:
                raise ValueError(f"headroom percentage must be in [0, 100), got {term!r}")
            total += int(memory_bytes * percent / 100)
        else:
            try:
                total += parse_bytes(term)
            except ValueError as error:
                raise ValueError(f"cannot read headroom {str(text)[:64]!r}: {error}") from None
    if total >= memory_bytes:
        raise ValueError(f"headroom {str(text)[:64]} ({format_bytes(total)}) leaves nothing of "
                         f"{format_bytes(memory_bytes)}")
    return total


@dataclass(frozen=True)
class Budget:
    """What PyTorch's allocator may reserve: device memory minus the CUDA context and the
    headroom. A plain memory amount (no GPU) has no context unless given."""

    memory_bytes: int
    headroom_bytes: int
    headroom: str  # as given, e.g. "512MiB+1%"
    gpu: str | None  # the GPU's name, or None for a plain --memory amount
    device: object = None  # the GPU's gpus.GpuSpec, or None
    context_bytes: int = 0  # the CUDA context, outside the allocator

    @property
    def budget_bytes(self) -> int:
        return self.memory_bytes - self.context_bytes - self.headroom_bytes

    def describe(self, meaning: bool = True) -> str:
        """The budget as a sum, e.g. 'a100-80gb: 80.00 GiB - CUDA context 512.00 MiB - headroom
        1.30 GiB (512MiB+1%: ...) = budget 78.20 GiB for reserved memory'; without `meaning`,
        the default headroom is not explained."""
        source = self.gpu or "given memory"
        meaning = (f": {HEADROOM_MEANING}" if meaning and self.headroom == DEFAULT_HEADROOM
                   else "")
        context = (f" - CUDA context {format_bytes(self.context_bytes)}" if self.context_bytes
                   else "")
        return (f"{source}: {format_bytes(self.memory_bytes)}{context} - headroom "
                f"{format_bytes(self.headroom_bytes)} ({self.headroom}{meaning}) = budget "
                f"{format_bytes(self.budget_bytes)} for reserved memory")


def make_budget(gpu=None, memory: str | int | None = None,
                headroom: str | int = DEFAULT_HEADROOM) -> Budget:
    """The budget for a GPU (a gpus.GpuSpec, or a name or spec file for gpus.gpu_spec: its
    memory less its CUDA context) or a plain memory size (no context), less `headroom`
    (parse_headroom). Exactly one of gpu and memory. ValueError (one line) otherwise, for an
    unknown GPU, for a size that does not parse, or when nothing would be left."""
    from paca_prof.gpus import gpu_spec

    if (gpu is None) == (memory is None):
        raise ValueError("give exactly one of a GPU and a memory size")
    spec, context = None, 0
    if gpu is not None:
        spec = gpu if hasattr(gpu, "memory_bytes") else gpu_spec(gpu)
        memory_bytes, name, context = spec.memory_bytes, spec.name, spec.cuda_context_bytes
    else:
        memory_bytes, name = parse_bytes(memory), None
        if memory_bytes <= 0:
            raise ValueError(f"memory size must be positive, got {memory!r}")
    headroom_bytes = parse_headroom(headroom, memory_bytes)
    if context + headroom_bytes >= memory_bytes:
        raise ValueError(f"the CUDA context ({format_bytes(context)}) and headroom "
                         f"{str(headroom)[:64]} leave nothing of {format_bytes(memory_bytes)}")
    return Budget(memory_bytes, headroom_bytes, str(headroom), name, spec, context)
