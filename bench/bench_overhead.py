"""Benchmark: how much the timing pass's instruments slow a training step.

Times the same step with and without the module hooks and clocks of the timing pass
(engines/measure.py), interleaved in one run, and prints the ratio per method. Target: at most
1.05 (the timing instrumentation may slow a step by at most 5%). Not a test.

    python bench/bench_overhead.py [--rounds 20] [--hidden 512] [--layers 4] [--seq 256]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from paca_prof.engines.common import RunSpec, build_prepared, make_batch, training_step
from paca_prof.engines.measure import _timing_pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    args = parser.parse_args()
    spec = RunSpec(model="tiny", seq=args.seq, batch=2, dtype="fp32", device="cpu",
                   steps=1, warmup=0)
    spec.config.hidden_size = args.hidden
    spec.config.intermediate_size = int(args.hidden * 2.75)
    spec.config.num_hidden_layers = args.layers
    spec.config.num_attention_heads = args.hidden // 64
    spec.config.num_key_value_heads = args.hidden // 128
    print(f"llama-shaped, hidden {args.hidden}, {args.layers} layers, 2 x {args.seq} tokens, "
          f"fp32, CPU, {torch.get_num_threads()} threads, median of {args.rounds} rounds")
    print(f"{'method':<8} {'plain ms':>10} {'timed ms':>10} {'ratio':>7}")
    for method in ("frozen", "lora", "paca"):
        model, optimizer = build_prepared(spec, method, "cpu")
        ids = make_batch(spec, "cpu")
        for _ in range(3):
            training_step(model, optimizer, ids, None)
        plain, timed = [], []
        for _ in range(args.rounds):
            start = time.perf_counter()
            training_step(model, optimizer, ids, None)
            plain.append(time.perf_counter() - start)
            _, phase_ms = _timing_pass(spec, model, optimizer, ids)
            timed.append(phase_ms["step"] / 1e3)
        p, t = statistics.median(plain) * 1e3, statistics.median(timed) * 1e3
        print(f"{method:<8} {p:>10.2f} {t:>10.2f} {t / p:>7.3f}")


if __name__ == "__main__":
    main()
