"""Reserved memory of a step (paca_prof/reserved.py): the order in which a run allocates (model,
first step with the optimizer state made at its first update, steady step), on sequences whose
outcome is derived by hand from the allocator's rules (tests/test_allocator.py pins those), and
the measured CPU step replayed the same way as the simulated one."""

from __future__ import annotations


import pytest

from paca_prof.allocator import AllocatorConfig
from paca_prof.memory import MemoryEvent
from paca_prof.reserved import allocator_config, replay_run, replay_step

KiB, MiB = 2**10, 2**20
WEIGHT = (1, 1 * KiB, "weights")  # one small weight: a 2 MiB small-pool segment


def event(t, key, nbytes, phase):
    return MemoryEvent(t=t, key=key, nbytes=nbytes, phase=phase)


def test_a_step_reuses_what_the_step_before_left_cached():
    # the 5 MiB activation takes a 20 MiB large segment (requests under 10 MiB); freed, the
    # second pass is served from it: 2 MiB + 20 MiB, whatever the number of steps
    step = [event(0, 10, 5 * MiB, "forward"), event(1, 10, -5 * MiB, "backward")]
    result = replay_step([WEIGHT], step)
    assert result.reserved_bytes == 2 * MiB + 20 * MiB
    assert result.allocated_bytes == 1 * KiB + 5 * MiB
    assert not result.oom and result.oom_request_bytes is None


def test_optimizer_state_is_made_at_the_first_update_where_the_step_left_a_cached_block():
    # A 12 MiB activation gets a 12 MiB segment (>= 10 MiB: rounded to 2 MiB); freed in backward,
    # its block is cached. AdamW makes its 4 MiB state at the first optimizer event: it splits
    # that block (4 + 8 MiB free), so the second step's activation needs a new 12 MiB segment:
    # 2 + 24 MiB. Were the state made before the step, it would take a 20 MiB segment (requests
    # under 10 MiB) whose 16 MiB rest then holds the activation: 2 + 20 MiB.
    state = (2, 4 * MiB, "optimizer")
    step = [event(0, 10, 12 * MiB, "forward"), event(1, 10, -12 * MiB, "backward"),
            event(2, 11, 1 * KiB, "optimizer"), event(3, 11, -1 * KiB, "optimizer")]
    result = replay_step([WEIGHT, state], step)
    assert result.reserved_bytes == 2 * MiB + 24 * MiB
    assert result.allocated_bytes == 1 * KiB + 4 * MiB + 12 * MiB
    as_if_made_first = [WEIGHT, (2, 4 * MiB, "weights")]
    assert replay_step(as_if_made_first, step).reserved_bytes == 2 * MiB + 20 * MiB


def test_without_an_optimizer_phase_the_state_comes_after_the_step():
    state = (2, 4 * MiB, "optimizer")
    step = [event(0, 10, 12 * MiB, "forward"), event(1, 10, -12 * MiB, "backward")]
    assert replay_step([WEIGHT, state], step).reserved_bytes == 2 * MiB + 24 * MiB


def test_frees_of_storages_made_before_the_step_are_served_and_unknown_ones_skipped():
    # the step frees the weight (a storage it did not make: replaced parameters, say) and a key
    # nobody made (a tensor from before the model, as a measured profile can show): the first
    # is freed in the model's space, the second left out
    step = [event(0, 1, -1 * KiB, "optimizer"), event(1, 999, -4 * KiB, "forward"),
            event(2, 10, 1 * KiB, "forward"), event(3, 10, -1 * KiB, "backward")]
    result = replay_step([WEIGHT], step)
    assert result.reserved_bytes == 2 * MiB
    assert result.allocated_bytes == 1 * KiB


def test_what_the_step_leaves_allocated_is_freed_before_the_next():
    # the loss the loop keeps (allocated, never freed in the step): the second pass would
    # otherwise hold two
    step = [event(0, 10, 12 * MiB, "forward")]
    result = replay_step([WEIGHT], step)
    assert result.allocated_bytes == 1 * KiB + 12 * MiB
    assert result.reserved_bytes == 2 * MiB + 12 * MiB


def test_a_kept_output_is_freed_where_the_next_forward_ends():
    # A 12 MiB activation (freed in backward) and a 12 MiB output the loop keeps: the first
    # step takes two 12 MiB segments. Kept into the next step, the first output is still there
    # when the second is made: a third segment, 2 + 36 MiB; it is freed before the second
    # step's backward, so a third step needs no fourth. Freed at the step's end instead (what
    # a loop that drops its output leaves: nothing), the next step fits in two: 2 + 24 MiB.
    step = [event(0, 10, 12 * MiB, "forward"), event(1, 11, 12 * MiB, "forward"),
            event(2, 10, -12 * MiB, "backward")]
    kept = replay_step([WEIGHT], step, outputs_kept=True)
    assert kept.allocated_bytes == 1 * KiB + 36 * MiB
    assert kept.reserved_bytes == 2 * MiB + 36 * MiB
    assert replay_run([WEIGHT], [step] * 3, outputs_kept=True) == kept
    dropped = replay_step([WEIGHT], step)
    assert dropped.allocated_bytes == 1 * KiB + 24 * MiB
    assert dropped.reserved_bytes == 2 * MiB + 24 * MiB


def test_kept_steady_state_starts_with_the_output_and_frees_it_after_forward():
    from paca_prof.kept_outputs import KEPT, steady_state

    step = [event(0, 10, 4 * KiB, "forward"), event(1, 11, 8 * KiB, "forward"),
            event(2, 10, -4 * KiB, "backward")]
    events, static, start_keys, saved = steady_state(
        step, ["activations", "logits_loss", "activations"], {"weights": 1 * KiB}, {0: "m"})
    assert static == {"weights": 1 * KiB, "logits_loss": 8 * KiB}
    assert start_keys == {(KEPT, 11): "logits_loss"}
    assert [(e.key, e.nbytes, e.phase) for e in events] == [
        (10, 4 * KiB, "forward"), (11, 8 * KiB, "forward"), ((KEPT, 11), -8 * KiB, "forward"),
        (10, -4 * KiB, "backward")]
    assert saved == {0: "m"}


def activation_step(nbytes):
    return [event(0, 10, nbytes, "forward"), event(1, 10, -nbytes, "backward")]


def test_replay_step_is_a_run_of_the_same_step_twice():
    step = activation_step(12 * MiB) + [event(2, 11, 1 * KiB, "optimizer"),
                                        event(3, 11, -1 * KiB, "optimizer")]
    static = [WEIGHT, (2, 4 * MiB, "optimizer")]
    assert replay_run(static, [step, step]) == replay_step(static, step)


def test_a_longer_step_after_a_shorter_one_cannot_use_its_cached_block():
    # 12 MiB then 14 MiB: the 12 MiB segment stays cached and the 14 MiB request needs its own:
    # 2 + 12 + 14 MiB. The other way round the 12 MiB request splits the cached 14 MiB block
    # (a rest of 2 MiB, over 1 MiB): 2 + 14 MiB. With empty_cache after every step the 12 MiB
    # segment is given back first: the peak is 2 + 14 MiB.
    short, long = activation_step(12 * MiB), activation_step(14 * MiB)
    assert replay_run([WEIGHT], [short, long]).reserved_bytes == 2 * MiB + 12 * MiB + 14 * MiB
    assert replay_run([WEIGHT], [long, short]).reserved_bytes == 2 * MiB + 14 * MiB
    emptied = replay_run([WEIGHT], [short, long], empty_cache_every=1)
    assert emptied.reserved_bytes == 2 * MiB + 14 * MiB
    # every 2 steps: the cache is emptied after the second, too late for it
    assert replay_run([WEIGHT], [short, long], empty_cache_every=2).reserved_bytes == 28 * MiB


@pytest.mark.parametrize("every", [0, -1, 1.5, True, "10"])
def test_empty_cache_every_is_a_whole_number_of_steps(every):
    with pytest.raises(ValueError, match="empty_cache_every must be a whole number"):
        replay_run([WEIGHT], [activation_step(MiB)], empty_cache_every=every)


def test_capacity_makes_an_out_of_memory_with_the_request_that_failed():
    step = [event(0, 10, 12 * MiB, "forward"), event(1, 10, -12 * MiB, "backward")]
    config = allocator_config("caching", capacity_bytes=10 * MiB)
    result = replay_step([WEIGHT], step, config)
    assert result.oom and result.oom_request_bytes == 12 * MiB


def test_allocator_names():
    assert allocator_config("caching") == AllocatorConfig()
    assert allocator_config("expandable").expandable_segments is True
    with pytest.raises(ValueError, match="unknown allocator 'slab'"):
        allocator_config("slab")


# not full: its peak is AdamW's step, which the CPU runs as a for-loop and the simulation as the
# GPU's foreach kernels (optimizers.py), so the two steps differ by design there
@pytest.mark.parametrize("method", ["lora", "paca", "frozen"])
def test_measured_cpu_step_replays_to_the_simulated_reserved_bytes(method):
    """A steady CPU step's own allocations (the profiler's memory events, by address) replayed
    through the same model give what the simulated step's give: same tensors, same order. (The
    very first step makes the optimizer state and the gradients among its events: warm-up 1.)"""
    from conftest import measure_in_temp, run_spec as RunSpec
    from paca_prof.engines.simulate import simulate_method

    shape = dict(model="tiny", seq=64, batch=1, dtype="fp32", attention="eager")
    measured = measure_in_temp(RunSpec(**shape, device="cpu", steps=1, warmup=1), method)
    simulated = simulate_method(RunSpec(**shape, device="meta"), method)
    assert measured.summary["reserved_bytes"] == simulated.summary["reserved_bytes"] > 0
    assert simulated.summary["reserved_bytes"] >= simulated.summary["peak_bytes"]
