"""Benchmark: how much simulated reserved memory depends on the order of batch lengths (prints
numbers; a benchmark, not a test, with no target).

bench_published.py simulates every step at the longest batch (4 x 768) and replays that step
twice through the caching-allocator model. A real run's batches vary in length: PEFT's
MetaMathQA loop sorts each bucket of 20 batches long to short (utils.BucketIterator), and calls
torch.cuda.empty_cache() every 10 steps (run.py's ACCELERATOR_EMPTY_CACHE_SCHEDULE; after every
step before PEFT commit 90d3fc05d, 2025-11-13). Blocks that a step leaves cached serve later
steps only where they fit, so the reserved maximum of a run depends on the order of lengths.

This script simulates single steps of PEFT's Llama-3.2-3B recipe (bench_published's SHAPE) at a
few lengths, chains them in a few orders through reserved.replay_run, with empty_cache after
every step and every 10 steps, and prints the reserved maximum of each (simulated, GB = 10^9
bytes). The orders are illustrations, not the benchmark's data: the real sequence of lengths
(MetaMathQA's tokenized samples in bucket order) is not here. What it shows: full fine-tuning's
reserved maximum moves by GBs with the order (its 6.4 GB of gradients and AdamW's 6.4 GB of
foreach temporaries are carved from whatever earlier steps left cached), LoRA's much less.

Run from the repository root (about a minute and a half; no GPU needed):

    python bench/bench_length_order.py
"""

from __future__ import annotations

import sys

GB = 10**9
BATCH = 4
ORDERS = {
    "768 every step": [768, 768, 768],
    "768, 416, 768": [768, 416, 768],
    "a bucket long to short, then 768": [768, 704, 640, 576, 512, 448, 384, 320, 256, 768],
    "416, then that": [416, 768, 704, 640, 576, 512, 448, 384, 320, 256, 768],
}
EMPTY_CACHE_EVERY = (1, 10)
METHODS = ("lora", "full")


def spec_for(method: str):
    from paca_prof.methods import MethodSettings
    from paca_prof.recipe import Recipe
    from paca_prof.spec import RunSpec

    return RunSpec(model="llama3.2-3b", seq=768, batch=BATCH, dtype="bf16", device="meta",
                   methods=(method,), settings=MethodSettings(r=32, alpha=64, dropout=0.0),
                   recipe=Recipe(targets=("q_proj", "v_proj"), max_grad_norm=1.0))


def main() -> int:
    from paca_prof.engines.simulate import Simulator
    from paca_prof.reserved import replay_run

    lengths = sorted({n for order in ORDERS.values() for n in order})
    results = {}
    for method in METHODS:
        simulator = Simulator(spec_for(method), method)
        steps, static = {}, None
        for seq in lengths:
            recording = simulator.record(seq, BATCH)
            steps[seq] = recording.events
            static = static or [s[:3] for s in recording.static]
            print(f"  simulated {method} at {BATCH} x {seq}", file=sys.stderr, flush=True)
        for name, order in ORDERS.items():
            for every in EMPTY_CACHE_EVERY:
                run = replay_run(static, [steps[seq] for seq in order], empty_cache_every=every)
                results[method, name, every] = run.reserved_bytes / GB

    print(f"Llama-3.2-3B, batch {BATCH}, bf16, AdamW, clip 1.0, q_proj,v_proj adapters: reserved "
          "maximum of a run of steps in GB (10^9 B), simulated (this tool), by the order of "
          "lengths and how often the loop empties the cache")
    header = f"{'order of lengths':<34}" + "".join(
        f"{f'{m}, every {e}':>16}" for m in METHODS for e in EMPTY_CACHE_EVERY)
    print(header)
    for name in ORDERS:
        print(f"{name:<34}" + "".join(f"{results[m, name, e]:>16.2f}"
                                      for m in METHODS for e in EMPTY_CACHE_EVERY))
    print("(columns: method, empty_cache after every N steps; bench_published.py's figure is "
          "the 768 step replayed twice, no empty_cache: lora 22.22, full 37.18)")
    for method in METHODS:
        values = [v for (m, _, _), v in results.items() if m == method]
        print(f"{method}: {min(values):.2f} to {max(values):.2f} GB over these orders "
              f"({max(values) / min(values) - 1:+.1%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
