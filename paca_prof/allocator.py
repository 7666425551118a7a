"""A model of PyTorch's CUDA caching allocator: from the storages a step allocates and frees, in
program order, to what torch.cuda.memory_allocated() and torch.cuda.memory_reserved() report.

Torch-free. It re-implements the rules of c10's caching allocator, as read in its public source
of 2025-26 (c10/cuda/CUDACachingAllocator.cpp, the generic c10/core/CachingDeviceAllocator.h and
c10/core/AllocatorConfig.{h,cpp}), as exactly as that source allows:

- Sizes: a request is rounded up to a multiple of 512 bytes (512 at least), or with
  roundup_power2_divisions to the next of that many steps between two powers of two.
- Pools: rounded requests up to 1 MiB go to the small pool, larger ones to the large pool; the
  two never share memory. A new segment (one cudaMalloc) is 2 MiB for the small pool, 20 MiB for
  a large request under 10 MiB, and the request rounded up to 2 MiB otherwise.
- Best fit: the smallest cached free block of the pool that holds the request, ties to the lower
  address. The block is split when the rest is at least 512 bytes (small pool) or more than
  1 MiB (large pool); with max_split_size, blocks at or above it are never split, are refused to
  requests below it, and serve a request at or above it only if no more than
  max_non_split_rounding (20 MiB) larger.
- Free: a freed block merges with free neighbours of its own segment; memory is never returned
  to the device while it lasts.
- Out of memory: when a new segment would exceed `capacity_bytes`, the allocator first frees
  cached oversize blocks (release_available_cached_blocks, only with max_split_size), then every
  fully free segment of both pools (release_cached_blocks, an "alloc retry"), and retries each
  time; if that fails the request is out of memory.
- Expandable segments (expandable_segments:True): one segment per pool reserves address space
  for 9/8 of the device and maps physical pages (2 MiB small pool, 20 MiB large pool) at its end
  as it grows; any free rest of at least 512 bytes is split off; best fit counts a free block
  that ends at unmapped space as the size it could grow to, so other blocks are preferred to the
  growing end; on out of memory, free whole pages are unmapped before the retry.

Allocated bytes are the sum of allocated block sizes (rounded, and whole unsplit blocks), as
torch.cuda.memory_allocated counts them; reserved bytes are the memory held from the device
(cudaMalloc'd segments and mapped pages), as torch.cuda.memory_reserved; peaks are torch's
max_memory_* (raised at every increase).

Limits: one device and one stream (a training step runs on the default stream), so no
record_stream, event waits, CUDA graphs or private memory pools; empty_cache only where a
caller asks for it (CachingAllocator.empty_cache, replay's EMPTY_CACHE event); no
garbage_collection_threshold or per-process memory fraction (`capacity_bytes` stands for the
memory the device leaves to PyTorch), no large_segment_size_mb, roundup_power2_divisions with a
single value for all sizes (not the per-interval list). The CUDA context and anything allocated
outside PyTorch's allocator are not here. Device addresses are synthetic: each new segment takes
the next address up, so equal-size free blocks go to the oldest segment first, where a real
driver may place segments otherwise; cudaMalloc fails exactly when the reservation would pass
`capacity_bytes`, where a real device can fail earlier from fragmentation of physical memory.
"""

from __future__ import annotations

import operator
from bisect import bisect_left, insort
from collections.abc import Hashable, Iterable
from dataclasses import dataclass

from paca_prof.units import MIB, format_bytes

# PyTorch's constants (c10/core/AllocatorConfig.h).
MIN_BLOCK = 512                 # kMinBlockSize: blocks are multiples of 512 bytes
SMALL_REQUEST = 1 * MIB         # kSmallSize: the largest request of the small pool
SMALL_SEGMENT = 2 * MIB         # kSmallBuffer: small-pool segment, and its expandable page
MIN_LARGE_ALLOC = 10 * MIB      # kMinLargeAlloc: large requests below it get a LARGE_SEGMENT
LARGE_SEGMENT = 20 * MIB        # kLargeBuffer: that segment, and the large pool's expandable page
ROUND_LARGE = 2 * MIB           # kRoundLarge: larger requests get a segment of this multiple
MAX_REQUEST = 2**60             # allocate(): "Tried to allocate more than 1EB memory"
EMPTY_CACHE = "torch.cuda.empty_cache"  # replay(): the key of an event that empties the cache
_UNLIMITED = 2**64 - 1          # SIZE_MAX: max_split_size when not set
_UNLIMITED_DEVICE = 2**50       # device size behind expandable address space without a capacity

# A free block's sort key packs (size, address) into one int: one bisect orders by both.
_ADDR_BITS = 64
_ADDR_MASK = (1 << _ADDR_BITS) - 1


@dataclass(frozen=True)
class AllocatorConfig:
    """PYTORCH_CUDA_ALLOC_CONF settings the model follows, with PyTorch's defaults.

    capacity_bytes is the device memory PyTorch may reserve (the device's memory less the CUDA
    context and anything else outside the allocator); None means a segment never fails.
    """

    expandable_segments: bool = False
    max_split_size_bytes: int | None = None        # max_split_size_mb; None: unlimited
    capacity_bytes: int | None = None
    max_non_split_rounding_bytes: int = LARGE_SEGMENT  # max_non_split_rounding_mb
    roundup_power2_divisions: int = 0              # one value for every size; 0: off

    def __post_init__(self):
        if not isinstance(self.expandable_segments, bool):
            raise ValueError(f"expandable_segments must be True or False, "
                             f"got {self.expandable_segments!r}")
        if self.max_split_size_bytes is not None:
            _check_int("max_split_size_bytes", self.max_split_size_bytes, LARGE_SEGMENT)
        if self.capacity_bytes is not None:
            _check_int("capacity_bytes", self.capacity_bytes, 0)
        _check_int("max_non_split_rounding_bytes", self.max_non_split_rounding_bytes,
                   LARGE_SEGMENT)
        divisions = self.roundup_power2_divisions
        _check_int("roundup_power2_divisions", divisions, 0)
        if divisions & (divisions - 1):
            raise ValueError(f"roundup_power2_divisions must be 0 or a power of 2, got {divisions}")


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if not minimum <= value <= MAX_REQUEST:
        shown = format_bytes(minimum) if minimum >= MIB else str(minimum)
        raise ValueError(f"{name} must be at least {shown} (as PyTorch requires) and at most "
                         f"2**60, got {value}")


@dataclass
class AllocatorReplay:
    """What the allocator model reports for one replayed sequence of events.

    The timelines hold one entry per event replayed; a replay stops at the first event that
    runs out of memory (oom_at), whose entry is the state after the allocator emptied its cache
    and gave up.
    """

    allocated: list[int]      # torch's memory_allocated after each event (rounded block sizes)
    reserved: list[int]       # torch's memory_reserved after each event
    peak_allocated: int       # torch's max_memory_allocated
    peak_reserved: int        # torch's max_memory_reserved
    oom_at: int | None        # index of the first event that could not be served, else None
    oom_bytes: int | None = None        # the bytes that event asked for
    peak_reserved_at: int | None = None  # event at which reserved first reached its maximum
    largest_free_at_peak: int = 0       # largest cached free block then (fragmentation)
    peak_segments: int = 0              # most segments held at once (an expandable one counts 1)
    device_allocs: int = 0              # cudaMalloc and page-map calls
    device_frees: int = 0               # cudaFree and unmap calls (only when memory ran short)
    alloc_retries: int = 0              # times the whole cache was released to retry a request


class OutOfMemoryError(Exception):
    """A request the model could not serve, even after releasing its cache, as PyTorch's
    torch.OutOfMemoryError. `nbytes` is the request; `alloc_size` what PyTorch says it "tried
    to allocate" (the segment size it asked the device for)."""

    def __init__(self, nbytes: int, alloc_size: int, allocated: int, reserved: int,
                 capacity: int | None):
        self.nbytes, self.alloc_size = nbytes, alloc_size
        self.allocated, self.reserved, self.capacity = allocated, reserved, capacity
        limit = "unlimited" if capacity is None else format_bytes(capacity)
        super().__init__(
            f"out of memory: tried to allocate {format_bytes(alloc_size)} for a request of "
            f"{nbytes} bytes; capacity {limit}, {format_bytes(allocated)} allocated, "
            f"{format_bytes(reserved - allocated)} reserved but unallocated")


def round_size(nbytes: int, roundup_power2_divisions: int = 0) -> int:
    """The block size PyTorch gives a request of nbytes (round_size in PyTorch)."""
    if nbytes < MIN_BLOCK:
        return MIN_BLOCK
    divisions = roundup_power2_divisions
    if divisions > 1 and nbytes > MIN_BLOCK * divisions:
        if nbytes & (nbytes - 1) == 0:
            return nbytes
        floor = 1 << (nbytes.bit_length() - 1)
        step = floor >> (divisions.bit_length() - 1)
        if step == 0:
            return floor << 1
        rounded = nbytes & ~(step - 1)
        return nbytes if rounded == nbytes else rounded + step
    return -(-nbytes // MIN_BLOCK) * MIN_BLOCK


def segment_size(size: int) -> int:
    """The cudaMalloc PyTorch makes for a rounded request that no cached block can serve
    (get_allocation_size in PyTorch)."""
    if size <= SMALL_REQUEST:
        return SMALL_SEGMENT
    if size < MIN_LARGE_ALLOC:
        return LARGE_SEGMENT
    return -(-size // ROUND_LARGE) * ROUND_LARGE


class _Segment:
    """One cudaMalloc, or one expandable segment's whole reserved address range."""

    __slots__ = ("base", "size", "small", "expandable", "page")

    def __init__(self, base: int, size: int, small: bool, expandable: bool, page: int = 0):
        self.base, self.size, self.small = base, size, small
        self.expandable, self.page = expandable, page


class _Block:
    """A contiguous piece of a segment: allocated, free (cached) or, in an expandable segment,
    unmapped address space. prev/next link the pieces of one segment in address order."""

    __slots__ = ("addr", "size", "segment", "prev", "next", "allocated", "mapped", "requested")

    def __init__(self, addr: int, size: int, segment: _Segment, mapped: bool = True):
        self.addr, self.size, self.segment, self.mapped = addr, size, segment, mapped
        self.prev: _Block | None = None
        self.next: _Block | None = None
        self.allocated = False
        self.requested = 0

    def splice(self, before: _Block | None, after: _Block | None) -> None:
        """Insert this block between two neighbours (either may be None)."""
        if before is not None:
            before.next = self
        if after is not None:
            after.prev = self
        self.prev, self.next = before, after


class _Pool:
    """One pool's cached free blocks by (size, address), and its unmapped ranges by address."""

    __slots__ = ("small", "keys", "free", "unmapped_addrs", "unmapped")

    def __init__(self, small: bool):
        self.small = small
        self.keys: list[int] = []               # sorted (size << _ADDR_BITS) | address
        self.free: dict[int, _Block] = {}       # address -> free mapped block
        self.unmapped_addrs: list[int] = []     # sorted addresses of unmapped blocks
        self.unmapped: dict[int, _Block] = {}

    def add(self, block: _Block) -> None:
        insort(self.keys, (block.size << _ADDR_BITS) | block.addr)
        self.free[block.addr] = block

    def remove(self, block: _Block) -> None:
        keys = self.keys
        del keys[bisect_left(keys, (block.size << _ADDR_BITS) | block.addr)]
        del self.free[block.addr]

    def add_unmapped(self, block: _Block) -> None:
        insort(self.unmapped_addrs, block.addr)
        self.unmapped[block.addr] = block

    def remove_unmapped(self, block: _Block) -> None:
        del self.unmapped_addrs[bisect_left(self.unmapped_addrs, block.addr)]
        del self.unmapped[block.addr]

    def largest_free(self) -> int:
        return self.keys[-1] >> _ADDR_BITS if self.keys else 0


def _growable(block: _Block) -> int:
    """A free block's size plus the unmapped space right after it (expandable segments)."""
    after = block.next
    return block.size + (after.size if after is not None and not after.mapped else 0)


class CachingAllocator:
    """The allocator model, one request at a time: malloc(key, nbytes) and free(key).

    `allocated`, `reserved` and their peaks follow torch's statistics; see the module docstring
    for the rules and their limits. replay() drives one over a sequence of events.
    """

    def __init__(self, config: AllocatorConfig = AllocatorConfig()):
        self.config = config
        self.allocated = self.reserved = 0
        self.peak_allocated = self.peak_reserved = 0
        self.segments = self.peak_segments = 0
        self.device_allocs = self.device_frees = self.alloc_retries = 0
        self._small, self._large = _Pool(small=True), _Pool(small=False)
        self._live: dict[Hashable, _Block] = {}
        self._max_split = config.max_split_size_bytes or _UNLIMITED
        self._non_split_rounding = config.max_non_split_rounding_bytes
        self._capacity = config.capacity_bytes
        self._divisions = config.roundup_power2_divisions
        self._next_address = ROUND_LARGE  # synthetic device addresses; 0 stays null

    # --- the two requests -----------------------------------------------------------------

    def malloc(self, key: Hashable, nbytes: int) -> int:
        """Allocate a block of nbytes for `key` (not live yet); returns the block's size (0
        for a zero-byte request, which takes no block). Raises OutOfMemoryError when even an
        emptied cache cannot serve it (the model's state is then as PyTorch leaves it)."""
        if type(nbytes) is not int:
            nbytes = _integer(nbytes)
        if nbytes == 0:
            return 0
        if key in self._live:
            raise ValueError(f"storage {key!r:.60} is allocated twice without a free")
        if nbytes < 0:
            raise ValueError(f"cannot allocate a negative size ({nbytes} bytes)")
        if nbytes >= MAX_REQUEST:
            raise OutOfMemoryError(nbytes, nbytes, self.allocated, self.reserved, self._capacity)
        size = round_size(nbytes, self._divisions)
        pool = self._small if size <= SMALL_REQUEST else self._large
        block = (self._take_free_block(pool, size)
                 or self._new_block(pool, size)
                 or (self._release_oversize_blocks(pool, size) and self._new_block(pool, size))
                 or (self._release_cache() and self._new_block(pool, size)))
        if not block:
            raise OutOfMemoryError(nbytes, segment_size(size), self.allocated, self.reserved,
                                   self._capacity)
        if self._should_split(block, size):
            block = self._split(block, size, pool)
        block.allocated, block.requested = True, nbytes
        self._live[key] = block
        self.allocated += block.size
        if self.allocated > self.peak_allocated:
            self.peak_allocated = self.allocated
        return block.size

    def free(self, key: Hashable, nbytes: int | None = None) -> int:
        """Free the block of `key`; with nbytes, check it is the size that was requested.
        Returns the block's size. The block joins the cache, merged with free neighbours."""
        block = self._live.get(key)
        if block is None:
            raise ValueError(f"storage {key!r:.60} is freed but not allocated")
        if nbytes is not None and nbytes != block.requested:
            raise ValueError(f"storage {key!r:.60} is freed with {nbytes} bytes but was "
                             f"allocated with {block.requested}")
        del self._live[key]
        block.allocated = False
        self.allocated -= block.size
        pool = self._small if block.segment.small else self._large
        if block.prev is not None and not block.prev.allocated:
            self._merge(block, block.prev, pool)
        if block.next is not None and not block.next.allocated:
            self._merge(block, block.next, pool)
        pool.add(block)
        return block.size

    # --- finding a block --------------------------------------------------------------------

    def _take_free_block(self, pool: _Pool, size: int) -> _Block | None:
        """Best fit among cached free blocks, under the max_split rules (get_free_block)."""
        keys = pool.keys
        index = bisect_left(keys, size << _ADDR_BITS)
        if index == len(keys):
            return None
        free = pool.free
        block = free[keys[index] & _ADDR_MASK]
        if block.segment.expandable:
            # PyTorch weighs a block by what it could grow to: the growing end of a segment
            # loses to the next larger block that cannot grow as far.
            grows = _growable(block)
            while index + 1 < len(keys):
                after = free[keys[index + 1] & _ADDR_MASK]
                after_grows = _growable(after)
                if after_grows >= grows:
                    break
                index, block, grows = index + 1, after, after_grows
        if size < self._max_split <= block.size:
            return None  # an oversize block is not split for a smaller request
        if size >= self._max_split and block.size >= size + self._non_split_rounding:
            return None  # nor given whole to a request it exceeds by too much
        del keys[index]
        del free[block.addr]
        return block

    def _should_split(self, block: _Block, size: int) -> bool:
        remaining = block.size - size
        if block.segment.small or self.config.expandable_segments:
            return remaining >= MIN_BLOCK
        return size < self._max_split and remaining > SMALL_REQUEST

    def _split(self, block: _Block, size: int, pool: _Pool) -> _Block:
        """Cut `size` bytes off the front of a (taken) block; the rest goes to the cache."""
        front = _Block(block.addr, size, block.segment)
        front.splice(block.prev, block)
        block.addr += size
        block.size -= size
        pool.add(block)
        return front

    def _merge(self, block: _Block, other: _Block | None, pool: _Pool) -> None:
        """Absorb a free neighbour of the same kind (mapped or not) into `block`, which must be
        out of the pool's indexes (try_merge_blocks)."""
        if other is None or other.allocated or other.mapped != block.mapped:
            return
        if other.mapped:
            pool.remove(other)
        else:
            pool.remove_unmapped(other)
        if other is block.prev:
            block.addr = other.addr
            block.prev = other.prev
            if other.prev is not None:
                other.prev.next = block
        else:
            block.next = other.next
            if other.next is not None:
                other.next.prev = block
        block.size += other.size

    # --- asking the device --------------------------------------------------------------------

    def _new_block(self, pool: _Pool, size: int) -> _Block | None:
        """A new segment, or in expandable mode newly mapped pages (alloc_block); None when
        the device has no room."""
        if self.config.expandable_segments:
            return self._grow_expandable(pool, size)
        nbytes = segment_size(size)
        if self._capacity is not None and self.reserved + nbytes > self._capacity:
            return None
        segment = _Segment(self._take_address(nbytes), nbytes, pool.small, expandable=False)
        self._add_reserved(nbytes)
        self._count_segment(+1)
        self.device_allocs += 1
        return _Block(segment.base, nbytes, segment)

    def _grow_expandable(self, pool: _Pool, size: int) -> _Block | None:
        """Find the lowest address where free and unmapped space hold `size` and map what is
        missing (try_allocate_expandable_block); the block returned is out of the cache."""
        candidate = self._expandable_candidate(pool, size)
        if not candidate.mapped and not self._map(candidate, min(candidate.size, size), pool):
            return None
        while candidate.size < size:
            # free -> unmapped: mapping the unmapped block merges the free one into it
            after = candidate.next
            if not self._map(after, min(size - candidate.size, after.size), pool):
                return None
            candidate = after
        pool.remove(candidate)
        return candidate

    def _expandable_candidate(self, pool: _Pool, size: int) -> _Block:
        """find_expandable_block: the first unmapped range (with the free block before it)
        that has room, else a new expandable segment."""
        for address in pool.unmapped_addrs:
            start = pool.unmapped[address]
            if start.prev is not None and not start.prev.allocated:
                start = start.prev
            room, block = 0, start
            while room < size and block is not None and not block.allocated:
                room += block.size
                block = block.next
            if room >= size:
                return start
        page = SMALL_SEGMENT if pool.small else LARGE_SEGMENT
        device = self._capacity if self._capacity is not None else _UNLIMITED_DEVICE
        reserve = -(-(device + device // 8) // page) * page  # 9/8 of the device, in pages
        segment = _Segment(self._take_address(reserve), reserve, pool.small, True, page)
        self._count_segment(+1)
        block = _Block(segment.base, reserve, segment, mapped=False)
        pool.add_unmapped(block)
        return block

    def _map(self, block: _Block, size: int, pool: _Pool) -> bool:
        """Map whole pages over the first `size` bytes of an unmapped block (map_block)."""
        segment = block.segment
        page = segment.page
        nbytes = -(-size // page) * page
        if self._capacity is not None and self.reserved + nbytes > self._capacity:
            return False
        pool.remove_unmapped(block)
        block.mapped = True
        if nbytes < block.size:
            rest = _Block(block.addr + nbytes, block.size - nbytes, segment, mapped=False)
            rest.splice(block, block.next)
            pool.add_unmapped(rest)
            block.size = nbytes
        self._merge(block, block.prev, pool)
        self._merge(block, block.next, pool)
        pool.add(block)
        self._add_reserved(nbytes)
        self.device_allocs += 1
        return True

    # --- giving memory back when the device is full ---------------------------------------------

    def _release_oversize_blocks(self, pool: _Pool, size: int) -> bool:
        """release_available_cached_blocks: with max_split_size, free the smallest cached
        oversize segment that holds the request, else the largest ones until enough is freed."""
        if self._max_split == _UNLIMITED:
            return False
        target = max(size, self._max_split)
        keys, free = pool.keys, pool.free
        index = bisect_left(keys, target << _ADDR_BITS)
        if index < len(keys) and not free[keys[index] & _ADDR_MASK].segment.expandable:
            self._release_segment(free[keys[index] & _ADDR_MASK], pool)
            return True
        released = 0
        index -= 1
        while released < target and index >= 0:
            block = free[keys[index] & _ADDR_MASK]
            if block.size < self._max_split:
                break
            if not block.segment.expandable:
                released += block.size
                self._release_segment(block, pool)
            index -= 1
        return released >= target

    def empty_cache(self) -> None:
        """torch.cuda.empty_cache(): give back every fully free segment of both pools, and the
        free whole pages of expandable segments (release_cached_blocks). Blocks in use keep
        their segments, free parts of those included; peaks are not reset."""
        self._release_cached_blocks()

    def _release_cache(self) -> bool:
        """release_cached_blocks on out of memory; the retry that follows counts as one."""
        self.alloc_retries += 1
        self._release_cached_blocks()
        return True

    def _release_cached_blocks(self) -> None:
        for pool in (self._large, self._small):
            to_unmap = []
            for key in list(pool.keys):
                block = pool.free[key & _ADDR_MASK]
                if block.segment.expandable:
                    to_unmap.append(block)
                elif block.prev is None and block.next is None:
                    self._release_segment(block, pool)
            for block in to_unmap:
                self._unmap(block, pool)
                if not block.mapped and block.prev is None and block.next is None:
                    # nothing of the segment is mapped any more: release its address space
                    pool.remove_unmapped(block)
                    self._count_segment(-1)

    def _release_segment(self, block: _Block, pool: _Pool) -> None:
        """cudaFree a whole free segment (release_block)."""
        if block.prev is not None or block.next is not None:
            raise AssertionError("allocator model: releasing part of a segment")
        pool.remove(block)
        self.reserved -= block.size
        self._count_segment(-1)
        self.device_frees += 1

    def _unmap(self, block: _Block, pool: _Pool) -> None:
        """Unmap the whole pages inside a free expandable block (unmap_block); the partial
        pages at either end stay mapped as free blocks of their own."""
        segment = block.segment
        page, base = segment.page, segment.base
        start = base + -(-(block.addr - base) // page) * page
        end = base + (block.addr + block.size - base) // page * page
        if start >= end:
            return
        pool.remove(block)
        if start > block.addr:
            before = _Block(block.addr, start - block.addr, segment)
            before.splice(block.prev, block)
            pool.add(before)
        if block.addr + block.size > end:
            after = _Block(end, block.addr + block.size - end, segment)
            after.splice(block, block.next)
            pool.add(after)
        block.addr, block.size, block.mapped = start, end - start, False
        self._merge(block, block.prev, pool)
        self._merge(block, block.next, pool)
        pool.add_unmapped(block)
        self.reserved -= end - start
        self.device_frees += 1

    # --- bookkeeping ----------------------------------------------------------------------------

    def _take_address(self, nbytes: int) -> int:
        address = self._next_address
        self._next_address += -(-nbytes // ROUND_LARGE) * ROUND_LARGE
        return address

    def _add_reserved(self, nbytes: int) -> None:
        self.reserved += nbytes
        if self.reserved > self.peak_reserved:
            self.peak_reserved = self.reserved

    def _count_segment(self, change: int) -> None:
        self.segments += change
        self.peak_segments = max(self.peak_segments, self.segments)

    def largest_free_block(self) -> int:
        """Bytes of the largest cached free block (torch's cacheInfo, without the device's
        free memory)."""
        return max(self._small.largest_free(), self._large.largest_free())

    # --- looking inside ---------------------------------------------------------------------------

    def _all_blocks(self) -> list[_Block]:
        blocks = list(self._live.values())
        for pool in (self._small, self._large):
            blocks += pool.free.values()
            blocks += pool.unmapped.values()
        return blocks

    def snapshot(self) -> list[dict]:
        """Segments and their blocks in address order, as torch.cuda.memory_snapshot() shows
        them: each dict has address, total_size, is_large, is_expandable and blocks (size,
        state "active_allocated" or "inactive"); an expandable segment shows each mapped run."""
        heads = {id(b): b for b in self._all_blocks() if b.prev is None}.values()
        result = []
        for head in sorted(heads, key=lambda b: b.addr):
            run: list[_Block] = []
            block: _Block | None = head
            while block is not None:
                if block.mapped:
                    run.append(block)
                if run and (not block.mapped or block.next is None):
                    result.append(_segment_info(run))
                    run = []
                block = block.next
        return result

    def verify(self) -> None:
        """Check the model's invariants (for tests); raises AssertionError naming the first
        broken one. Linear in the number of blocks."""
        def check(condition: bool, what: str) -> None:
            if not condition:
                raise AssertionError(f"allocator model: {what}")

        blocks = self._all_blocks()
        check(len({id(b) for b in blocks}) == len(blocks), "a block is in two places")
        segments: dict[int, list[_Block]] = {}
        for block in blocks:
            segments.setdefault(id(block.segment), []).append(block)
        check(len(segments) == self.segments, "segment count")
        mapped_total = 0
        for members in segments.values():
            segment = members[0].segment
            heads = [b for b in members if b.prev is None]
            check(len(heads) == 1 and heads[0].addr == segment.base, "segment head")
            walked, block, end = [], heads[0], segment.base
            while block is not None:
                check(block.addr == end and block.size > 0, "blocks tile the segment")
                check(block.size % MIN_BLOCK == 0, "block size is a multiple of 512")
                after = block.next
                if after is not None:
                    check(after.prev is block, "prev/next links")
                    both_free = not block.allocated and not after.allocated
                    check(not (both_free and block.mapped == after.mapped),
                          "free neighbours are merged")
                if block.mapped:
                    mapped_total += block.size
                end += block.size
                walked.append(block)
                block = after
            check(end == segment.base + segment.size, "blocks cover the segment")
            check(len(walked) == len(members), "every block is indexed")
            check(not segment.expandable or any(b.mapped for b in walked) or len(walked) == 1,
                  "expandable segment")
        check(mapped_total == self.reserved, "reserved is the mapped memory")
        check(sum(b.size for b in self._live.values()) == self.allocated,
              "allocated is the live blocks' size")
        for block in self._live.values():
            check(block.allocated and block.mapped, "live blocks are allocated")
            check(block.size >= round_size(block.requested, self.config.roundup_power2_divisions),
                  "a block holds its request")
        for pool in (self._small, self._large):
            check(pool.keys == sorted(pool.keys), "free index is sorted")
            check(len(pool.keys) == len(pool.free), "free index size")
            for key in pool.keys:
                block = pool.free[key & _ADDR_MASK]
                check(key == (block.size << _ADDR_BITS) | block.addr, "free key")
                check(not block.allocated and block.mapped, "free blocks are free and mapped")
                check(block.segment.small == pool.small, "free block in its own pool")
            for address in pool.unmapped_addrs:
                check(not pool.unmapped[address].mapped, "unmapped index")


def _segment_info(run: list[_Block]) -> dict:
    segment = run[0].segment
    return {
        "address": run[0].addr,
        "total_size": sum(b.size for b in run),
        "is_large": not segment.small,
        "is_expandable": segment.expandable,
        "blocks": [{"size": b.size, "requested_size": b.requested,
                    "state": "active_allocated" if b.allocated else "inactive"} for b in run],
    }


def replay(events: Iterable[tuple[Hashable, int]],
           config: AllocatorConfig = AllocatorConfig()) -> AllocatorReplay:
    """Replay allocations and frees through the allocator model (see the module docstring).

    events: (key, nbytes) in program order; nbytes > 0 allocates a block of that many bytes for
    `key` (a storage id, unique among live blocks), nbytes < 0 frees the block of `key` (its
    size is the allocation's). A zero-byte allocation takes no block, as in PyTorch, so
    (key, 0) changes nothing, except (EMPTY_CACHE, 0): torch.cuda.empty_cache() there. Replay
    stops at the first request that runs out of memory (oom_at). Raises ValueError (one line,
    with the event's index) for a malformed event, a key allocated twice, or a free of a key
    that is not live or with another size.
    """
    model = CachingAllocator(config)
    malloc, free = model.malloc, model.free
    allocated: list[int] = []
    reserved: list[int] = []
    oom_at = oom_bytes = peak_at = None
    timeline_peak, largest_free_at_peak = -1, 0
    for index, event in enumerate(events):
        try:
            key, nbytes = event
            hash(key)
        except (TypeError, ValueError):
            raise ValueError(f"event {index}: expected a (key, nbytes) pair with a hashable "
                             f"key, got {event!r:.80}") from None
        try:
            if type(nbytes) is not int:
                nbytes = _integer(nbytes)
            if nbytes > 0:
                malloc(key, nbytes)
            elif nbytes < 0:
                free(key, -nbytes)
            elif key == EMPTY_CACHE:
                model.empty_cache()
        except OutOfMemoryError:
            oom_at, oom_bytes = index, nbytes
        except ValueError as error:
            raise ValueError(f"event {index}: {error}") from None
        allocated.append(model.allocated)
        reserved.append(model.reserved)
        if model.reserved > timeline_peak:
            timeline_peak, peak_at = model.reserved, index
            largest_free_at_peak = model.largest_free_block()
        if oom_at is not None:
            break
    return AllocatorReplay(
        allocated=allocated, reserved=reserved,
        peak_allocated=model.peak_allocated, peak_reserved=model.peak_reserved,
        oom_at=oom_at, oom_bytes=oom_bytes, peak_reserved_at=peak_at,
        largest_free_at_peak=largest_free_at_peak, peak_segments=model.peak_segments,
        device_allocs=model.device_allocs,
        device_frees=model.device_frees, alloc_retries=model.alloc_retries)


def _integer(value) -> int:
    if isinstance(value, bool):
        raise ValueError(f"nbytes must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"nbytes must be an integer, got {value!r:.40}") from None
