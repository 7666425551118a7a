"""Benchmark: how long the caching-allocator model (paca_prof/allocator.py) takes to replay one
simulated training step.

By default it records the storage allocations and frees of one simulated step on the meta
device (llama3-8b, seq 4096, lora: the weights, buffers and optimizer state first, then the
step's events in program order), then replays them through the model several times, with and
without expandable segments, interleaved, and prints the replay time (median, min, max) and
what the model reports. The target: well under 2 s per replay. `--synthetic N` replays a
torch-free synthetic stream of N events instead. Not a test: the times depend on the machine
and its load; run with OMP_NUM_THREADS=1 on a quiet machine and put the figures in notes.

    python bench/bench_allocator.py [--model llama3-8b] [--seq 4096] [--method lora]
    python bench/bench_allocator.py --synthetic 300000
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from paca_prof.allocator import AllocatorConfig, replay  # noqa: E402
from paca_prof.units import MIB, format_bytes  # noqa: E402

TARGET_S = 2.0


def recorded_events(model: str, seq: int, method: str) -> list[tuple[int, int]]:
    """(storage key, +bytes | -bytes) of one simulated step, static storages first."""
    from paca_prof.engines.simulate import Simulator
    from paca_prof.recipe import Recipe
    from paca_prof.spec import RunSpec

    # bf16 with flash attention, as `paca-prof run` simulates a GPU by default
    spec = RunSpec(model=model, seq=seq, device="meta", recipe=Recipe(attention="flash"),
                   methods=(method,))
    # the full-depth step (replicated from a shallow model: engines/replicate.py), whose static
    # storages and events share one key space
    recording = Simulator(spec, method).record(seq, 1)
    static = [(key, nbytes) for key, nbytes, _, _ in recording.static]
    return static + [(e.key, e.nbytes) for e in recording.events]


def synthetic_events(count: int, seed: int = 0) -> list[tuple[int, int]]:
    """A stream shaped like a step: a few long-lived large blocks, many short-lived
    activations of a handful of sizes, and small tensors; every block freed by the end."""
    rng = random.Random(seed)
    sizes = [512, 4096, 65536, 8 * MIB, 32 * MIB, 112 * MIB, 1000 * MIB]
    weights = [20, 20, 10, 10, 25, 10, 1]
    live: list[tuple[int, int]] = []
    events, key = [], 0
    while len(events) + len(live) < count:
        if live and rng.random() < 0.48:
            freed, nbytes = live.pop(rng.randrange(len(live)))
            events.append((freed, -nbytes))
        else:
            nbytes = rng.choices(sizes, weights)[0] + rng.randrange(0, 4096, 2)
            events.append((key, nbytes))
            live.append((key, nbytes))
            key += 1
    events += [(k, -n) for k, n in reversed(live)]
    return events


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama3-8b")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--method", default="lora")
    parser.add_argument("--synthetic", type=int, metavar="N", help="N synthetic events, no torch")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    start = time.perf_counter()
    if args.synthetic:
        events, source = synthetic_events(args.synthetic), "synthetic stream"
    else:
        events = recorded_events(args.model, args.seq, args.method)
        source = f"{args.model} seq {args.seq} {args.method}, one simulated step"
    print(f"{source}: {len(events):,} events (built in {time.perf_counter() - start:.1f} s)")

    configs = {"default": AllocatorConfig(),
               "expandable": AllocatorConfig(expandable_segments=True)}
    times: dict[str, list[float]] = {name: [] for name in configs}
    results = {}
    for _ in range(args.repeats):  # interleaved, so that load changes hit both alike
        for name, config in configs.items():
            start = time.perf_counter()
            results[name] = replay(events, config)
            times[name].append(time.perf_counter() - start)

    print(f"{'config':<11} {'median s':>9} {'min s':>7} {'max s':>7} {'of 2 s':>7} "
          f"{'events/s':>10} {'peak alloc':>12} {'peak reserved':>14} {'segments':>9}")
    for name, samples in times.items():
        result, median = results[name], statistics.median(samples)
        print(f"{name:<11} {median:>9.3f} {min(samples):>7.3f} {max(samples):>7.3f} "
              f"{median / TARGET_S:>7.2f} {len(events) / median:>10,.0f} "
              f"{format_bytes(result.peak_allocated):>12} {format_bytes(result.peak_reserved):>14} "
              f"{result.peak_segments:>9}")
    print("bytes simulated (allocator model), times measured on this CPU")


if __name__ == "__main__":
    main()
