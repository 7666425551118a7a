"""The caching-allocator model (paca_prof/allocator.py) on sequences whose outcome is derived by
hand from PyTorch's rules (the derivation is in the comments), on sequences PyTorch's own
material records, and on random sequences for its invariants."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from paca_prof.allocator import (
    EMPTY_CACHE,
    AllocatorConfig,
    CachingAllocator,
    OutOfMemoryError,
    replay,
    round_size,
    segment_size,
)

KiB, MiB, GiB = 2**10, 2**20, 2**30
EXPANDABLE = AllocatorConfig(expandable_segments=True)


def alloc(key, nbytes):
    return (key, nbytes)


def free(key, nbytes):
    return (key, -nbytes)


def layout(model: CachingAllocator) -> list[list[tuple[int, str]]]:
    """Each segment's blocks as (MiB, 'A' allocated | 'F' free), like the devlog's layout()."""
    return [[(b["size"] / MiB, "A" if b["state"] == "active_allocated" else "F")
             for b in s["blocks"]] for s in model.snapshot()]


# --- rounding -------------------------------------------------------------------------------

@pytest.mark.parametrize("nbytes, block", [
    (1, 512),            # below kMinBlockSize: 512
    (511, 512),
    (512, 512),          # a multiple of 512 stays
    (513, 1024),         # else up to the next multiple of 512
    (1000, 1024),
    (4 * 1000 * 3, 12288),  # 12000 -> 24 x 512
    (MiB + 1, MiB + 512),
])
def test_round_size(nbytes, block):
    assert round_size(nbytes) == block


def test_allocated_counts_rounded_block_sizes_not_requests():
    # 1 byte and 1000 bytes take blocks of 512 and 1024 bytes out of one 2 MiB small segment.
    result = replay([alloc("a", 1), alloc("b", 1000)])
    assert result.allocated == [512, 512 + 1024]
    assert result.reserved == [2 * MiB, 2 * MiB]


def test_one_mib_is_small_and_one_byte_more_is_large():
    # 1 MiB (kSmallSize) is still small: a 2 MiB segment. 1 MiB + 1 rounds to 1 MiB + 512,
    # is large, below 10 MiB: a 20 MiB segment, split (remainder > 1 MiB).
    assert replay([alloc("a", MiB)]).reserved == [2 * MiB]
    result = replay([alloc("a", MiB + 1)])
    assert result.allocated == [MiB + 512] and result.reserved == [20 * MiB]


def test_roundup_power2_divisions():
    # PyTorch test_cuda.py test_allocator_settings (seen in its MLU port, the same test): 21M
    # floats (84 MiB) take 84 MiB; with roundup_power2_divisions:4 the steps between 64 and
    # 128 MiB are 64, 80, 96, 112, so 84 MiB takes 96 MiB.
    nbytes = 4 * 21 * MiB
    assert replay([alloc("x", nbytes)]).allocated == [84 * MiB]
    rounded = replay([alloc("y", nbytes)], AllocatorConfig(roundup_power2_divisions=4))
    assert rounded.allocated == [96 * MiB]
    # Sizes up to 512 x divisions keep the plain rounding; a power of two stays as it is.
    assert round_size(2000, 4) == 2048 and round_size(3000, 4) == 3072
    assert round_size(64 * MiB, 4) == 64 * MiB


# --- the small pool ---------------------------------------------------------------------------

def test_small_tensor_in_a_2mib_segment_and_reuse_of_its_freed_block():
    # a: 1 KiB from a new 2 MiB segment, split: [a 1K | free 2M-1K].
    # b: 1 KiB, best fit is the remainder: [a | b | free 2M-2K].
    # free a: its neighbour b is allocated, no merge: [free 1K | b | free 2M-2K].
    # c: 1 KiB, best fit is a's old 1 KiB block (smaller than the remainder), taken whole.
    # d 1 MiB and e 1M-2K (both small) then fill the remainder 2M-2K exactly, so no second
    # segment; had c split the remainder, e would not fit in the 1M-3K left and need one.
    model = CachingAllocator()
    for key in "ab":
        model.malloc(key, KiB)
    model.free("a")
    model.malloc("c", KiB)
    model.malloc("d", MiB)
    model.malloc("e", MiB - 2 * KiB)
    assert model.reserved == 2 * MiB and model.allocated == 2 * MiB
    assert layout(model) == [[(1 / 1024, "A"), (1 / 1024, "A"), (1, "A"), (1 - 2 / 1024, "A")]]
    model.verify()


# --- the large pool ---------------------------------------------------------------------------

def test_5mib_takes_a_20mib_segment_and_the_next_ones_split_from_it():
    # 5 MiB is between 1 and 10 MiB: a 20 MiB segment, split (15 MiB left > 1 MiB).
    # Three more 5 MiB requests split the remainder (the last one takes the last 5 MiB whole);
    # the fifth needs a second segment.
    result = replay([alloc(i, 5 * MiB) for i in range(5)])
    assert [r // MiB for r in result.reserved] == [20, 20, 20, 20, 40]
    assert [a // MiB for a in result.allocated] == [5, 10, 15, 20, 25]


def test_12mib_is_rounded_to_a_2mib_multiple_and_an_unsplit_rest_is_allocated():
    # 12 MiB (>= 10 MiB) gets exactly a 12 MiB segment.
    assert replay([alloc("a", 12 * MiB)]).reserved == [12 * MiB]
    # 11 MiB + 1 byte rounds to 11 MiB + 512 and gets a 12 MiB segment; the rest (< 1 MiB)
    # is not split off, so the whole 12 MiB block counts as allocated.
    result = replay([alloc("a", 11 * MiB + 1)])
    assert result.reserved == [12 * MiB] and result.allocated == [12 * MiB]
    assert segment_size(10 * MiB - 512) == 20 * MiB and segment_size(10 * MiB) == 10 * MiB


def test_best_fit_chooses_the_smaller_free_block():
    # a 30 MiB and b 40 MiB get their own segments (70 MiB); both freed.
    # c 25 MiB: best fit is the 30 MiB block (split, 5 MiB left), not the 40 MiB one,
    # so d 35 MiB still finds the 40 MiB block: reserved stays 70 MiB.
    events = [alloc("a", 30 * MiB), alloc("b", 40 * MiB), free("a", 30 * MiB),
              free("b", 40 * MiB), alloc("c", 25 * MiB), alloc("d", 35 * MiB)]
    result = replay(events)
    assert result.reserved[-1] == 70 * MiB
    assert result.allocated[-1] == 25 * MiB + 35 * MiB  # both split (5 MiB rests > 1 MiB)


def test_free_merges_with_free_neighbours():
    # One 20 MiB segment: [a 5 | b 5 | c 5 | free 5].
    # free a, free c: [free 5 | b | free 10] (c merged with the tail).
    # e 12 MiB: no free block holds it: a new 12 MiB segment (32 MiB reserved).
    # free b: merges with both sides: one free 20 MiB block.
    # f 18 MiB fits in it (split, 2 MiB left): still 32 MiB.
    model = CachingAllocator()
    for key in "abc":
        model.malloc(key, 5 * MiB)
    model.free("a")
    model.free("c")
    assert layout(model) == [[(5, "F"), (5, "A"), (10, "F")]]
    model.malloc("e", 12 * MiB)
    assert model.reserved == 32 * MiB
    model.free("b")
    assert layout(model)[0] == [(20, "F")]
    model.malloc("f", 18 * MiB)
    assert model.reserved == 32 * MiB
    assert layout(model)[0] == [(18, "A"), (2, "F")]
    model.verify()


def test_devlog_fragmentation_small_then_large():
    # "When does fragmentation occur in the CUDA caching allocator?" (pytorch/devlogs,
    # content/eager/2026-06-01-cuda-caching-allocator.md, expandable_segments:False):
    # 8 x 16 MiB -> eight 16 MiB segments, 128 MiB; freeing keeps them; 4 x 32 MiB cannot use
    # any 16 MiB block and adds four segments: 256 MiB.
    events = [alloc(i, 16 * MiB) for i in range(8)]
    events += [free(i, 16 * MiB) for i in range(8)]
    events += [alloc(10 + i, 32 * MiB) for i in range(4)]
    result = replay(events)
    assert result.reserved[7] == result.reserved[15] == 128 * MiB
    assert result.reserved[-1] == 256 * MiB
    assert result.peak_segments == 12


def test_devlog_large_then_small_reuses_the_segments():
    # Same post, good order: 4 x 32 MiB (128 MiB), free, 8 x 16 MiB split each 32 MiB block in
    # two: still 128 MiB, every segment [16 A | 16 A].
    model = CachingAllocator()
    for i in range(4):
        model.malloc(i, 32 * MiB)
    for i in range(4):
        model.free(i)
    for i in range(8):
        model.malloc(10 + i, 16 * MiB)
    assert model.reserved == 128 * MiB
    assert layout(model) == [[(16, "A"), (16, "A")]] * 4


# --- out of memory ------------------------------------------------------------------------------

def test_cached_segments_are_released_before_oom_and_the_oom_is_reported():
    # capacity 100 MiB.
    # 0 s (1 KiB): a 2 MiB small segment. 1 free s: cached.
    # 2 a 40 MiB, 3 b 40 MiB: 82 MiB reserved. 4 free a: cached.
    # 5 c 50 MiB: no free block holds it; 82 + 50 > 100, so the allocator releases the
    #   cached segments of both pools (a's 40 MiB and the 2 MiB small one): 40 MiB, then
    #   cudaMallocs 50 MiB: 90 MiB.
    # 6 d 20 MiB: 90 + 20 > 100 and nothing is cached: out of memory at event 6.
    events = [alloc("s", KiB), free("s", KiB), alloc("a", 40 * MiB), alloc("b", 40 * MiB),
              free("a", 40 * MiB), alloc("c", 50 * MiB), alloc("d", 20 * MiB),
              free("b", 40 * MiB)]
    result = replay(events, AllocatorConfig(capacity_bytes=100 * MiB))
    assert [r // MiB for r in result.reserved] == [2, 2, 42, 82, 82, 90, 90]
    assert result.oom_at == 6 and result.oom_bytes == 20 * MiB
    assert len(result.allocated) == 7  # the replay stops at the failed request
    assert result.alloc_retries == 2 and result.device_frees == 2


def test_empty_cache_gives_back_only_fully_free_segments():
    # a 12 MiB (its own 12 MiB segment) and b 5 MiB (a 20 MiB segment, 15 MiB of it free):
    # 32 MiB. a freed, empty_cache: a's segment goes back, b's stays whole (its free 15 MiB
    # with it): 20 MiB. b freed, empty_cache: 0. The peak stays; no alloc retry is counted.
    events = [alloc("a", 12 * MiB), alloc("b", 5 * MiB), free("a", 12 * MiB), (EMPTY_CACHE, 0),
              free("b", 5 * MiB), (EMPTY_CACHE, 0)]
    result = replay(events)
    assert [r // MiB for r in result.reserved] == [12, 32, 32, 20, 20, 0]
    assert result.peak_reserved == 32 * MiB
    assert result.alloc_retries == 0 and result.device_frees == 2


def test_empty_cache_unmaps_free_pages_of_expandable_segments():
    # two 16 MiB blocks map two 20 MiB pages; both freed, empty_cache unmaps both pages
    model = CachingAllocator(EXPANDABLE)
    model.malloc("a", 16 * MiB)
    model.malloc("b", 16 * MiB)
    assert model.reserved == 40 * MiB
    model.free("a")
    model.empty_cache()
    assert model.reserved == 40 * MiB  # a's 16 MiB holds no whole page: nothing to unmap
    model.free("b")
    model.empty_cache()
    assert model.reserved == 0 and model.peak_reserved == 40 * MiB
    assert model.alloc_retries == 0
    model.verify()


def test_out_of_memory_retry_as_in_pytorch_test_cuda():
    # PyTorch test/test_cuda.py test_out_of_memory_retry: a takes half the device; b (the same
    # size) is out of memory; after del a, b is served (from a's cached block, no new segment).
    # Here the device leaves 80 GiB less a CUDA context of 500 MiB to PyTorch.
    half = 40 * GiB
    model = CachingAllocator(AllocatorConfig(capacity_bytes=80 * GiB - 500 * MiB))
    model.malloc("a", half)
    with pytest.raises(OutOfMemoryError) as oom:
        model.malloc("b", half)
    assert oom.value.alloc_size == half
    model.free("a")
    model.malloc("b", half)
    assert model.reserved == half and model.allocated == half
    model.verify()


def test_a_request_above_the_capacity_is_oom_at_once():
    result = replay([alloc("a", 3 * GiB)], AllocatorConfig(capacity_bytes=2 * GiB))
    assert result.oom_at == 0 and result.reserved == [0] and result.allocated == [0]


# --- max_split_size ------------------------------------------------------------------------------

def test_max_split_size_oversize_blocks():
    # max_split_size 32 MiB. a 40 MiB (oversize, its own 40 MiB segment), freed.
    # b 24 MiB: the cached 40 MiB block is oversize, not split for a smaller request: a new
    #   24 MiB segment (64 MiB). Without max_split_size b would split it (40 MiB).
    # c 36 MiB (>= 32): the 40 MiB block is within 20 MiB of it: taken whole, unsplit.
    config = AllocatorConfig(max_split_size_bytes=32 * MiB)
    events = [alloc("a", 40 * MiB), free("a", 40 * MiB), alloc("b", 24 * MiB),
              alloc("c", 36 * MiB)]
    result = replay(events, config)
    assert [r // MiB for r in result.reserved] == [40, 40, 64, 64]
    assert result.allocated[-1] == 24 * MiB + 40 * MiB
    assert replay(events[:3]).reserved[-1] == 40 * MiB
    # An oversize 60 MiB block is refused to a 36 MiB request (60 >= 36 + 20): new segment.
    events = [alloc("a", 60 * MiB), free("a", 60 * MiB), alloc("c", 36 * MiB)]
    assert replay(events, config).reserved[-1] == 96 * MiB
    # max_non_split_rounding raised to 30 MiB lets it through.
    wider = AllocatorConfig(max_split_size_bytes=32 * MiB,
                            max_non_split_rounding_bytes=30 * MiB)
    assert replay(events, wider).reserved[-1] == 60 * MiB


def test_max_split_size_releases_one_oversize_block_first():
    # capacity 100 MiB, max_split_size 32 MiB. s: a cached 2 MiB small segment. a 60 MiB
    # (oversize), b 30 MiB: 92 MiB; free a. c 36 MiB: the 60 MiB block is too large to give
    # whole (>= 36 + 20); 92 + 36 > 100; release_available_cached_blocks frees the smallest
    # cached oversize block holding 36 MiB, a's 60 MiB: 32 MiB; the retry succeeds: 68 MiB.
    # The small segment survives (release_cached_blocks, which would free it, is not needed).
    config = AllocatorConfig(max_split_size_bytes=32 * MiB, capacity_bytes=100 * MiB)
    events = [alloc("s", KiB), free("s", KiB), alloc("a", 60 * MiB), alloc("b", 30 * MiB),
              free("a", 60 * MiB), alloc("c", 36 * MiB)]
    result = replay(events, config)
    assert result.reserved[-1] == 68 * MiB and result.oom_at is None
    assert result.alloc_retries == 0 and result.device_frees == 1


# --- expandable segments -------------------------------------------------------------------------

def test_devlog_expandable_segments_grow_by_20mib_pages():
    # Same post, expandable_segments:True: 8 x 16 MiB in one segment mapping 20 MiB pages:
    # 20, 40, 60, 80, 80 (the 16 MiB left after four fits the fifth), 100, 120, 140 MiB.
    # Freed, everything merges into one block from which 4 x 32 MiB fit without new pages.
    model = CachingAllocator(EXPANDABLE)
    reserved = []
    for i in range(8):
        model.malloc(i, 16 * MiB)
        reserved.append(model.reserved // MiB)
    assert reserved == [20, 40, 60, 80, 80, 100, 120, 140]
    assert layout(model) == [[(16, "A")] * 8 + [(12, "F")]]
    for i in range(8):
        model.free(i)
    assert layout(model) == [[(140, "F")]]
    for i in range(4):
        model.malloc(10 + i, 32 * MiB)
    assert model.reserved == 140 * MiB and model.segments == 1
    model.verify()


def test_devlog_expandable_segments_still_fragment_around_live_blocks():
    # Same post: 4 x 16 MiB map 80 MiB: [A A A A | free 16]. Free #0 and #2: the largest free
    # block is 16 MiB, so 32 MiB grows the segment: the free 16 MiB at the end plus one more
    # 20 MiB page (100 MiB), split [32 A | 4 F]. Freed all: one 100 MiB block; 32 MiB fits.
    model = CachingAllocator(EXPANDABLE)
    for i in range(4):
        model.malloc(i, 16 * MiB)
    assert model.reserved == 80 * MiB
    model.free(0)
    model.free(2)
    model.malloc("big", 32 * MiB)
    assert model.reserved == 100 * MiB
    assert layout(model) == [[(16, "F"), (16, "A"), (16, "F"), (16, "A"), (32, "A"), (4, "F")]]
    for key in ("big", 1, 3):
        model.free(key)
    assert layout(model) == [[(100, "F")]]
    model.malloc("big", 32 * MiB)
    assert model.reserved == 100 * MiB
    model.verify()


@pytest.mark.parametrize("config", [AllocatorConfig(), EXPANDABLE])
def test_devlog_one_mib_loophole(config):
    # Same post: 2 MiB (large pool) then, freed, 0.5 MiB (small pool, cannot use the large
    # segment): 20 + 2 = 22 MiB; 2 MiB then 2 MiB reuses it: 20 MiB.
    assert replay([alloc("a", 2 * MiB), free("a", 2 * MiB), alloc("b", MiB // 2)],
                  config).reserved[-1] == 22 * MiB
    assert replay([alloc("a", 2 * MiB), free("a", 2 * MiB), alloc("b", 2 * MiB)],
                  config).reserved[-1] == 20 * MiB


def test_expandable_small_pool_uses_2mib_pages_and_splits_any_rest():
    # Two 700 KiB requests (small pool): the first maps one 2 MiB page, the second fits in
    # the rest; a 1.5 MiB large-pool request takes a 20 MiB page of its own segment.
    result = replay([alloc("a", 700 * KiB), alloc("b", 700 * KiB), alloc("c", 3 * MiB // 2)],
                    EXPANDABLE)
    assert [r // MiB for r in result.reserved] == [2, 2, 22]
    assert result.allocated[-1] == 1400 * KiB + 3 * MiB // 2


def test_expandable_segments_unmap_free_pages_before_oom():
    # capacity 80 MiB, 20 MiB pages. a, b, c 16 MiB: [a | b | c | free 12], 60 MiB mapped.
    # free a, b: [free 32 | c | free 12]. d 40 MiB: no free block holds it; growing the end
    # (12 MiB free + 28 MiB more = two pages, 40 MiB) would pass 80 MiB, so the cache is
    # released: the free 32 MiB at [0, 32) holds one whole page, [0, 20), which is unmapped
    # (40 MiB); the free end [48, 60) holds no whole page. The retry maps two pages at the end:
    # 80 MiB, d at [48, 88).
    model = CachingAllocator(AllocatorConfig(expandable_segments=True, capacity_bytes=80 * MiB))
    for key in "abc":
        model.malloc(key, 16 * MiB)
    model.free("a")
    model.free("b")
    model.malloc("d", 40 * MiB)
    assert model.reserved == 80 * MiB and model.alloc_retries == 1
    # torch's snapshot shows the mapped runs: [20, 32) free, then c, d and the free rest.
    assert layout(model) == [[(12, "F"), (16, "A"), (40, "A"), (12, "F")]]
    model.verify()
    # Freed, d's pages merge back; a 60 MiB request then fits in the mapped 20..100 MiB run
    # with no more pages (12 + 16 + 40 + 12 = 80 MiB free from 20 MiB up, once c goes too).
    model.free("c")
    model.free("d")
    model.malloc("e", 60 * MiB)
    assert model.reserved == 80 * MiB
    model.verify()


# --- input validation ------------------------------------------------------------------------------

@pytest.mark.parametrize("events, message", [
    ([("a", 10), ("a", 10)], "allocated twice"),
    ([("a", -10)], "not allocated"),
    ([("a", 10), ("a", -11)], "allocated with 10"),
    ([("a", 1.5)], "integer"),
    ([("a", True)], "integer"),
    ([("a",)], "pair"),
    ([7], "pair"),
    ([([1], 10)], "hashable"),
])
def test_bad_events_are_one_line_value_errors(events, message):
    with pytest.raises(ValueError, match=message) as error:
        replay(events)
    assert "\n" not in str(error.value) and "event " in str(error.value)


def test_zero_bytes_take_no_block():
    result = replay([("a", 0), ("b", 10), ("a", 0)])
    assert result.allocated == [0, 512, 512] and result.reserved == [0, 2 * MiB, 2 * MiB]


@pytest.mark.parametrize("settings_, message", [
    ({"max_split_size_bytes": 10 * MiB}, "at least 20.00 MiB"),
    ({"capacity_bytes": -1}, "at least 0"),
    ({"roundup_power2_divisions": 3}, "power of 2"),
    ({"expandable_segments": "yes"}, "True or False"),
    ({"max_non_split_rounding_bytes": 1.0}, "integer"),
])
def test_bad_config_is_a_value_error(settings_, message):
    with pytest.raises(ValueError, match=message):
        AllocatorConfig(**settings_)


# --- invariants on random sequences -------------------------------------------------------------

SIZES = st.one_of(
    st.integers(1, 4 * KiB),               # tiny
    st.integers(4 * KiB, MiB + 4 * KiB),    # around the small / large boundary
    st.integers(MiB, 12 * MiB),             # 20 MiB-segment territory and just past it
    st.integers(12 * MiB, 80 * MiB),        # large and oversize
)


@st.composite
def programs(draw):
    """A random program: allocations and frees interleaved, then every live block freed."""
    steps = draw(st.lists(st.tuples(st.booleans(), SIZES, st.integers(0, 10**6)),
                          min_size=1, max_size=60))
    live, events, key = [], [], 0
    for do_free, nbytes, pick in steps:
        if do_free and live:
            k, n = live.pop(pick % len(live))
            events.append((k, -n))
        else:
            events.append((key, nbytes))
            live.append((key, nbytes))
            key += 1
    for k, n in reversed(live):
        events.append((k, -n))
    return events


CONFIGS = st.builds(
    AllocatorConfig,
    expandable_segments=st.booleans(),
    max_split_size_bytes=st.one_of(st.none(), st.integers(20, 64).map(lambda m: m * MiB)),
    capacity_bytes=st.one_of(st.none(), st.integers(30, 400).map(lambda m: m * MiB)),
    roundup_power2_divisions=st.sampled_from([0, 0, 4]),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(programs(), CONFIGS)
def test_invariants_hold_on_random_programs(events, config):
    model = CachingAllocator(config)
    requested, allocated, reserved = 0, [], []
    for key, nbytes in events:
        try:
            if nbytes > 0:
                model.malloc(key, nbytes)
                requested += nbytes
            else:
                model.free(key, -nbytes)
                requested += nbytes
        except OutOfMemoryError:
            break
        model.verify()
        # reserved >= allocated >= the bytes asked for, none negative
        assert model.reserved >= model.allocated >= requested >= 0
        if config.capacity_bytes is not None:
            assert model.reserved <= config.capacity_bytes
        allocated.append(model.allocated)
        reserved.append(model.reserved)
    else:
        # every block freed: nothing allocated; without a capacity nothing is ever released
        assert model.allocated == 0
        if config.capacity_bytes is None:
            assert reserved == sorted(reserved)
    if config.capacity_bytes is None or not config.expandable_segments:
        # peaks are the timelines' maxima (only a failed partial mapping can peak in between)
        assert model.peak_allocated == max(allocated, default=0)
        assert model.peak_reserved == max(reserved, default=0)
    assert model.peak_reserved >= max(reserved, default=0)


@settings(max_examples=60, deadline=None)
@given(programs(), CONFIGS)
def test_replay_matches_the_model_step_by_step(events, config):
    result = replay(events, config)
    model = CachingAllocator(config)
    for index, (key, nbytes) in enumerate(events):
        try:
            model.malloc(key, nbytes) if nbytes > 0 else model.free(key, -nbytes)
        except OutOfMemoryError:
            assert result.oom_at == index
            break
        assert (result.allocated[index], result.reserved[index]) == (model.allocated,
                                                                   model.reserved)
    else:
        assert result.oom_at is None and len(result.reserved) == len(events)
    assert result.peak_reserved == model.peak_reserved
    assert result.reserved[result.peak_reserved_at] == max(result.reserved)


@pytest.mark.parametrize("config", [
    AllocatorConfig(capacity_bytes=200 * MiB),
    AllocatorConfig(expandable_segments=True, capacity_bytes=150 * MiB),
    AllocatorConfig(max_split_size_bytes=24 * MiB, capacity_bytes=250 * MiB),
])
def test_long_programs_near_capacity_keep_the_invariants(config):
    # Longer than the Hypothesis programs, and held near the capacity, so that the cache is
    # released often (for expandable segments: pages unmapped from the middle of free blocks).
    import random

    rng = random.Random(1234)
    released = ooms = 0
    for trial in range(15):
        model, live = CachingAllocator(config), []
        for step in range(150):
            if live and rng.random() < 0.45:
                model.free(live.pop(rng.randrange(len(live))))
            else:
                try:
                    model.malloc((trial, step), rng.randint(1, 40 * MiB))
                    live.append((trial, step))
                except OutOfMemoryError:
                    ooms += 1  # the model stays usable, as PyTorch does after an OOM
            model.verify()
            assert model.reserved <= config.capacity_bytes
        released += model.device_frees
    assert released > 0 and ooms > 0  # the release paths did run
