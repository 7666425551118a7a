"""The output a training loop keeps into its next step (recipe.keep_outputs); torch-free.

A loop written `outputs = model(**batch); loss = outputs.loss; loss.backward(); ...` holds the
model's output (the logits, and the KV cache transformers builds in training while use_cache
is on) after backward and the optimizer step, and frees it only when the next step's forward
and loss have run and `outputs` is rebound. A recorded step shows half of that: its own
output is allocated and never freed. The steady state, which every later step of a run is,
also starts with the previous step's output alive and frees it where its first forward ends.

steady_state adds that to one recorded step (for its memory timeline: what the step starts
with, and the frees); reserved.replay_run does the same from step to step when it replays a
run. The previous step's output is taken to be this step's (the same shapes every step).
"""

from __future__ import annotations

from paca_prof.memory import MemoryEvent

KEPT = "kept"  # the previous step's storages, keyed (KEPT, key) apart from the step's own


def leftovers(events: list[MemoryEvent]) -> dict[int, int]:
    """{key: index of its allocation} for what the step allocates and never frees."""
    made: dict[int, int] = {}
    for index, event in enumerate(events):
        if event.nbytes > 0:
            made[event.key] = index
        else:
            made.pop(event.key, None)
    return made


def first_forward_end(events: list[MemoryEvent]) -> int:
    """The index of the first event after the step's first forward (len(events) if the step
    never leaves it): where a loop that keeps its output frees the previous one."""
    in_forward = False
    for index, event in enumerate(events):
        if event.phase == "forward":
            in_forward = True
        elif in_forward:
            return index
    return len(events)


def steady_state(events: list[MemoryEvent], categories: list[str], static: dict[str, int],
                 saved_events: dict[int, str] | None = None):
    """A recorded step as a later step of the run is: alive at its start, what it leaves
    allocated (by category: `categories[i]` is event i's, as a first memory_timeline of the
    step gives it); freed where its first forward ends. Returns (events, static, start_keys,
    saved_events) for memory.memory_timeline, the saved events' indexes moved past the frees
    inserted before them."""
    kept = leftovers(events)
    static = dict(static)
    start_keys: dict = {}
    frees = []
    at = first_forward_end(events)
    t, phase = (events[at - 1].t, events[at - 1].phase) if at else (0.0, None)
    for key, index in kept.items():
        category = categories[index]
        static[category] = static.get(category, 0) + events[index].nbytes
        start_keys[(KEPT, key)] = category
        frees.append(MemoryEvent(t, (KEPT, key), -events[index].nbytes, phase))
    moved = None if saved_events is None else {
        (index + len(frees) if index >= at else index): owner
        for index, owner in saved_events.items()}
    return events[:at] + frees + events[at:], static, start_keys, moved
