"""Memory categories, memory events and the categorised timeline they make; torch-free and
pandas-free.

Engines record a step's allocations and frees as MemoryEvents (the profiler's allocator events
when measured, storage lifetimes when simulated). memory_timeline replays them into running
totals per category (trace.MEMORY_CATEGORIES), finds the peak and its breakdown; the planner
cuts the same events into segments, and the allocator model replays them into reserved bytes.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from paca_prof.modules import is_logits_owner

# Memory categories, in the order figures stack them.
MEMORY_CATEGORIES = ("weights", "trainable", "gradients", "optimizer", "activations",
                     "logits_loss", "rest")


@dataclass(slots=True)  # a step makes tens of thousands: slots make them cheaper
class MemoryEvent:
    """One allocation (nbytes > 0) or free (nbytes < 0) of a storage identified by `key`
    (an address when measured, a storage key when simulated), at time t, in a phase.
    `logits_scope` is True for allocations made inside lm_head or the loss."""

    t: float
    key: int
    nbytes: int
    phase: str | None
    logits_scope: bool = False


@dataclass
class Timeline:
    """A replayed step: its table by column (trace.MEMORY_COLUMNS but the method; the first
    rows hold each category at the start), the peak of the total, and each category at the
    peak."""

    columns: dict[str, list]
    peak_bytes: int
    breakdown: dict[str, int]


def memory_timeline(events: list[MemoryEvent], static: dict[str, int],
                    saved_owner: dict[int, str], gradients: list[tuple[int, float]],
                    start_keys: dict[int, str] | None = None,
                    saved_events: dict[int, str] | None = None) -> Timeline:
    """Replay allocation events into running totals per memory category.

    `static` holds the bytes alive when the step starts, by category; `start_keys` the keys of
    those the step may free, with their category (gradients a loop keeps from the step
    before, freed by its zero_grad), so that their frees leave that category. An allocation is
    an activation if a saved tensor lives at its key (the last allocation there during
    forward: saved tensors stay alive until backward). A step with several forwards (gradient
    accumulation's micro-batches) may give `saved_events` instead of `saved_owner`: the index
    of each event that allocated a saved tensor, with its module. `gradients` lists (key, t):
    the storage at key held a parameter's gradient at time t (a snapshot at the end of each
    backward pass); the last allocation at that key up to t is a gradient, so a gradient made
    in an earlier micro-batch, or replaced by a later one, is found whatever reused its key
    since. Saved
    tensors of lm_head and the loss, and whatever those two allocate, are logits_loss.
    Everything else is rest (temporaries, optimizer scratch).
    """
    last_alloc: dict[tuple[int, str | None], int] = {}
    allocations: dict[int, list[tuple[float, int]]] = {}
    for i, e in enumerate(events):
        if e.nbytes > 0:
            last_alloc[(e.key, e.phase)] = i
            allocations.setdefault(e.key, []).append((e.t, i))
    if saved_events is None:
        saved_events = {last_alloc[(key, "forward")]: owner for key, owner in
                        saved_owner.items() if (key, "forward") in last_alloc}
    category_of = {index: "logits_loss" if is_logits_owner(owner) else "activations"
                   for index, owner in saved_events.items()}
    for key, t in gradients:
        made = allocations.get(key, [])
        before = bisect.bisect_right(made, (t, len(events))) - 1
        if before >= 0:
            category_of[made[before][1]] = "gradients"

    totals = {c: static.get(c, 0) for c in MEMORY_CATEGORIES}
    start = list(totals.values())
    categories, allocated = list(totals), list(start)
    live: dict[int, str] = dict(start_keys or {})
    peak, breakdown = sum(totals.values()), dict(totals)
    total = peak
    for i, e in enumerate(events):
        if e.nbytes > 0:
            category = category_of.get(i, "logits_loss" if e.logits_scope else "rest")
            live[e.key] = category
        else:
            category = live.pop(e.key, "rest")
        totals[category] += e.nbytes
        total += e.nbytes
        categories.append(category)
        allocated.append(totals[category])
        if total > peak:
            peak, breakdown = total, dict(totals)
    columns = {"t": [0.0] * len(start) + [e.t for e in events], "category": categories,
               "allocated_bytes": allocated,
               "phase": [None] * len(start) + [e.phase for e in events],
               "logits_scope": [False] * len(start) + [e.logits_scope for e in events],
               "delta_bytes": start + [e.nbytes for e in events]}
    return Timeline(columns, peak, breakdown)


def with_collective_frees(events: list[MemoryEvent],
                          collectives: list[tuple[float, float]]) -> list[MemoryEvent]:
    """The events with a free added at the end of the collective op (start, end) that made an
    allocation the profiler never sees freed (none at its key before it is allocated again or
    the step ends): gloo copies a reduce-scatter's input inside the op and its worker thread,
    which the profiler does not follow, frees the copy once the collective is done. The
    calling thread waits for that before it goes on, so the op's end stands for the free."""
    ends = sorted(collectives)
    starts = [start for start, _ in ends]
    unfreed: dict[int, tuple[int, float]] = {}  # key -> (event index, the collective's end)
    added = []
    for i, e in enumerate(events):
        if e.nbytes > 0:
            if e.key in unfreed:
                added.append(unfreed.pop(e.key))
            j = bisect.bisect_right(starts, e.t) - 1
            if j >= 0 and e.t <= ends[j][1]:
                unfreed[e.key] = (i, ends[j][1])
        else:
            unfreed.pop(e.key, None)
    added += unfreed.values()
    if not added:
        return events
    return merged_by_time(events, [MemoryEvent(end, events[i].key, -events[i].nbytes,
                                               events[i].phase) for i, end in added])


def merged_by_time(events: list[MemoryEvent], added: list[MemoryEvent]) -> list[MemoryEvent]:
    """`events` with each of `added` after every event up to its time, both orders kept."""
    order = [(e.t, 0, i) for i, e in enumerate(events)] + [(e.t, 1, i)
                                                             for i, e in enumerate(added)]
    merged = events + added
    return [merged[k] for k in sorted(range(len(merged)), key=order.__getitem__)]


def with_missed_frees(events: list[MemoryEvent]) -> list[MemoryEvent]:
    """The events with a free added before each allocation at a key still live: a measured
    step's profiler misses frees made on threads it does not follow (gloo's workers free some of what a collective allocated), and an address
    allocated again was free by then. The free is put at the new allocation's time, the latest
    it can have been."""
    sizes: dict[int, int] = {}
    fixed = []
    for e in events:
        if e.nbytes > 0:
            if e.key in sizes:
                fixed.append(MemoryEvent(e.t, e.key, -sizes[e.key], e.phase))
            sizes[e.key] = e.nbytes
        else:
            sizes.pop(e.key, None)
        fixed.append(e)
    return fixed


def static_storages(model, optimizer, by_address: bool = False, owners: bool = False,
                    parameters=None) -> list[tuple]:
    """(key, bytes, category) of every storage alive before the step starts: frozen weights
    and buffers (with the quantization state of 4-bit weights: bitsandbytes keeps absmax, code
    and offset in the parameter's quant_state, outside the buffers), trainable parameters, and
    optimizer state (gradients are None after zero_grad(set_to_none=True)), each storage once
    (a DTensor's: its local shard's, with FSDP2's padding)
    (tied weights, views), in that order. The key is the storage's id (a simulation's event
    keys), or with `by_address` its data pointer (the profiler's allocation addresses). Paged
    optimizer states live outside the allocator and are left out (paged_bytes). With `owners`,
    each tuple ends with the path of the parameter or buffer the storage belongs to (an
    optimizer state's: its parameter's)."""
    seen: set[int] = set()
    found = []

    def add(tensor, category: str, owner: str) -> None:
        storage = local(tensor).untyped_storage()
        if storage._cdata not in seen:
            seen.add(storage._cdata)
            key = storage.data_ptr() if by_address else storage._cdata
            found.append((key, storage.nbytes(), category, owner) if owners else
                         (key, storage.nbytes(), category))

    names = {id(p): name for name, p in model.named_parameters()}
    for p in model.parameters() if parameters is None else parameters:
        name = names.get(id(p), "")
        add(p, "trainable" if p.requires_grad else "weights", name)
        for tensor in _quant_state_tensors(getattr(p, "quant_state", None)):
            add(tensor, "weights", name)
    for name, b in model.named_buffers():
        add(b, "weights", name)
    for param, value in _optimizer_tensors(optimizer):
        if not getattr(value, "is_paged", False):
            add(value, "optimizer", names.get(id(param), ""))
    return found


def local(tensor):
    """A DTensor's local shard (what an FSDP2 rank holds), or the tensor itself."""
    return getattr(tensor, "_local_tensor", tensor)


def static_bytes(model, optimizer, parameters=None) -> dict[str, int]:
    """Bytes per category alive before the step starts (static_storages, summed)."""
    static = {c: 0 for c in MEMORY_CATEGORIES}
    for _, nbytes, category in static_storages(model, optimizer, parameters=parameters):
        static[category] += nbytes
    return static


def paged_storages(optimizer, names: dict[int, str] | None = None) -> list[tuple[str, int]]:
    """(owner, bytes) of the optimizer's paged states (bitsandbytes' paged optimizers mark them
    is_paged: in CUDA unified memory, outside PyTorch's allocator), each storage once; the
    owner is the parameter's path in `names` (id(parameter) -> path), or ""."""
    seen, found = set(), []
    for param, value in _optimizer_tensors(optimizer):
        storage = local(value).untyped_storage()
        if getattr(value, "is_paged", False) and storage._cdata not in seen:
            seen.add(storage._cdata)
            found.append(((names or {}).get(id(param), ""), storage.nbytes()))
    return found


def paged_bytes(optimizer) -> int:
    """Bytes of the optimizer's paged states (paged_storages, summed)."""
    return sum(nbytes for _, nbytes in paged_storages(optimizer))


def _optimizer_tensors(optimizer):
    """(parameter, tensor) of every tensor in the optimizer's state, in its order."""
    if optimizer is None:
        return
    for param, state in optimizer.state.items():
        for value in state.values():
            if hasattr(value, "untyped_storage"):
                yield param, value


def _quant_state_tensors(state):
    """The tensors of a bitsandbytes QuantState (and its nested state), if any."""
    while state is not None:
        for name in ("absmax", "code", "offset"):
            tensor = getattr(state, name, None)
            if hasattr(tensor, "untyped_storage"):
                yield tensor
        state = getattr(state, "state2", None)
