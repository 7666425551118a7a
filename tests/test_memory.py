"""The frees a measured step's profiler cannot see, put back where the run made them
(memory.with_collective_frees, memory.with_missed_frees)."""

from __future__ import annotations

from paca_prof.memory import MemoryEvent, memory_timeline, with_collective_frees, with_missed_frees


def _events(*rows):
    return [MemoryEvent(t, key, nbytes, "backward") for t, key, nbytes in rows]


def _peak(events) -> int:
    return memory_timeline(events, {}, {}, [], None, {}).peak_bytes


def test_a_copy_made_inside_a_collective_and_never_seen_freed_is_freed_at_its_end():
    # 100 made inside the collective (1..3) and never freed; 50 made after it.
    events = _events((0, 1, 10), (2, 2, 100), (5, 3, 50))
    fixed = with_collective_frees(events, [(1, 3)])
    assert [(e.t, e.key, e.nbytes) for e in fixed] == [
        (0, 1, 10), (2, 2, 100), (3, 2, -100), (5, 3, 50)]
    assert _peak(events) == 160 and _peak(fixed) == 110


def test_a_copy_allocated_again_before_any_free_is_freed_at_its_collectives_end():
    events = _events((2, 2, 100), (4, 9, 30), (6, 2, 100), (7, 2, -100))
    fixed = with_collective_frees(events, [(1, 3)])
    assert [(e.t, e.nbytes) for e in fixed if e.key == 2] == [(2, 100), (3, -100), (6, 100),
                                                               (7, -100)]
    assert _peak(fixed) == 130


def test_what_the_calling_thread_frees_and_what_lies_outside_collectives_are_left_alone():
    events = _events((2, 2, 100), (2.5, 2, -100), (5, 3, 50))
    assert with_collective_frees(events, [(1, 3)]) == events
    assert with_collective_frees(events, []) == events


def test_events_at_the_collectives_end_keep_their_order_and_the_free_follows_them():
    events = _events((2, 2, 100), (3, 4, 7), (3, 4, -7))
    fixed = with_collective_frees(events, [(1, 3)])
    assert [(e.key, e.nbytes) for e in fixed] == [(2, 100), (4, 7), (4, -7), (2, -100)]


def test_an_address_allocated_again_was_freed_at_the_latest_then():
    events = _events((0, 1, 10), (4, 1, 20), (6, 1, -20))
    fixed = with_missed_frees(events)
    assert [(e.t, e.nbytes) for e in fixed] == [(0, 10), (4, -10), (4, 20), (6, -20)]
    assert _peak(fixed) == 20
