"""Reserved memory of a training step: its allocations replayed, in the order a training run
makes them, through the model of PyTorch's CUDA caching allocator (allocator.py).

What torch.cuda.max_memory_reserved() reports after a few steps (what published measurements
mostly give, or nvidia-smi, which adds the CUDA context) depends on the order of everything the
process allocated, not only on the step's peak. A training run allocates:
  1. the model: weights, buffers and trainable parameters, in the model's parameter order;
  2. the first step, during which the optimizer makes its state at its first update (AdamW's
     moments, created just before the update);
  3. the next steps, each served from the blocks the step before left cached.
replay_step reproduces that order from one step's events (a simulated step's, or a measured
one's): the static storages less the optimizer state, the step with the optimizer state
allocated where its optimizer phase starts, then the step again. The second pass is the steady
state; the peak is over both, as max_memory_reserved is over a run.

Limits: the events of the first step are taken to be those of a later one (the same tensors in
the same order), so what only the first step does besides creating the optimizer state (lazy
cuBLAS workspaces, autotuning) is not here; what the step leaves allocated at its end (the
loss a loop keeps) is freed before the second pass, where a real loop frees it when the next
loss replaces it (a kept output, recipe.keep_outputs, is freed where the second pass's first
forward ends); one device, one stream (the allocator model's limits).
"""

from __future__ import annotations

from dataclasses import dataclass

from paca_prof.allocator import EMPTY_CACHE, AllocatorConfig, replay
from paca_prof.kept_outputs import first_forward_end
from paca_prof.memory import MemoryEvent
from paca_prof.recipe import ALLOCATORS  # PyTorch's default, and expandable_segments:True

ALLOCATOR_WORDS = {
    "caching": "PyTorch's CUDA caching allocator, default settings",
    "expandable": "PyTorch's CUDA caching allocator with expandable_segments:True",
}


@dataclass(frozen=True)
class ReservedMemory:
    """A replayed step: torch's max_memory_reserved and max_memory_allocated (block sizes), and
    whether a request failed under the capacity given (out of memory, after the allocator
    released its cache and retried, as PyTorch does)."""

    reserved_bytes: int
    allocated_bytes: int
    oom: bool
    oom_request_bytes: int | None = None


def allocator_config(allocator: str, capacity_bytes: int | None = None) -> AllocatorConfig:
    """The allocator model's settings for a recipe's `allocator` (ALLOCATORS), with the memory
    PyTorch may reserve (None: unlimited)."""
    if allocator not in ALLOCATORS:
        raise ValueError(f"unknown allocator {allocator!r}; choose from {', '.join(ALLOCATORS)}")
    return AllocatorConfig(expandable_segments=allocator == "expandable",
                           capacity_bytes=capacity_bytes)


def replay_step(static: list[tuple[int, int, str]], events: list[MemoryEvent],
                config: AllocatorConfig = AllocatorConfig(),
                outputs_kept: bool = False) -> ReservedMemory:
    """Replay a step as a run allocates it (see the module docstring). `static`: (key, bytes,
    category) of the storages alive when the step starts (memory.static_storages), in the
    order the model holds them; `events`: the step's allocations and frees, keys in the same
    space. A free of a storage that is not live (made before the storages listed) is left
    out. The same as replay_run over the step twice."""
    return replay_run(static, [events, events], config, outputs_kept=outputs_kept)


def replay_run(static: list[tuple[int, int, str]], steps: list[list[MemoryEvent]],
               config: AllocatorConfig = AllocatorConfig(),
               empty_cache_every: int | None = None,
               outputs_kept: bool = False) -> ReservedMemory:
    """Replay a run of steps, each with its own events (steps of other shapes: batches of
    varying length), in the order a run allocates them: the model's storages, then each step
    in turn, the optimizer state made at the first step's first optimizer event (after its
    last event, without one); what a step leaves allocated is freed when the next one starts,
    or, with `outputs_kept` (a loop that keeps the model's output: recipe.keep_outputs), where
    the next one's first forward ends (kept_outputs.first_forward_end).
    With `empty_cache_every` N, torch.cuda.empty_cache() runs after every Nth step, as a loop
    that calls it does (it gives back only fully free segments; max_memory_reserved keeps its
    peak). Every step's keys are in the space of `static`; a free of a storage not live is left
    out (see replay_step).

    Limits: the steps' events are taken as recorded one at a time (each step's own shape), so
    the order of lengths is the caller's: what a run's real sequence of batches leaves cached
    from step to step is only as right as the sequence given.
    """
    if empty_cache_every is not None and (isinstance(empty_cache_every, bool)
                                          or not isinstance(empty_cache_every, int)
                                          or empty_cache_every < 1):
        raise ValueError(f"empty_cache_every must be a whole number of steps of at least 1, "
                         f"got {empty_cache_every!r}")
    model_storages = [(("model", key), nbytes) for key, nbytes, category in static
                      if category != "optimizer"]
    optimizer_state = [(("model", key), nbytes) for key, nbytes, category in static
                       if category == "optimizer"]
    sequence = list(model_storages)
    live = {key for key, _ in model_storages}
    state_pending = True
    carried: list[tuple[tuple, int]] = []  # the step before's output, with outputs_kept
    for step, events in enumerate(steps, 1):
        made: dict[int, int] = {}
        release = first_forward_end(events) if carried else -1
        for index, e in enumerate(events):
            if index == release:
                sequence.extend(carried)
                carried = []
            if state_pending and e.phase == "optimizer":
                sequence.extend(optimizer_state)
                live.update(key for key, _ in optimizer_state)
                state_pending = False
            if e.nbytes > 0:
                sequence.append(((step, e.key), e.nbytes))
                made[e.key] = e.nbytes
            elif e.key in made:
                sequence.append(((step, e.key), e.nbytes))
                del made[e.key]
            elif ("model", e.key) in live:
                sequence.append((("model", e.key), e.nbytes))
                live.discard(("model", e.key))
        if state_pending:  # no optimizer phase (frozen): states, if any, come at the end
            sequence.extend(optimizer_state)
            live.update(key for key, _ in optimizer_state)
            state_pending = False
        sequence.extend(carried)  # a step that never left its forward
        carried = [((step, key), -nbytes) for key, nbytes in made.items()]
        if not outputs_kept:
            sequence.extend(carried)
            carried = []
        if empty_cache_every is not None and step % empty_cache_every == 0:
            sequence.append((EMPTY_CACHE, 0))
    result = replay(sequence, config)
    return ReservedMemory(result.peak_reserved, result.peak_allocated, result.oom_at is not None,
                          result.oom_bytes)
