"""Benchmark: how much of a measured step the module scopes account for, on the CPU.

The timing pass (paca_prof/engines/measure.py) times every module's forward and backward with
hooks. On a model whose decoder layers carry the step, as a real LLM's do, the decoder layers'
forward + backward latencies should add up to nearly all of the measured forward + backward
time: what they miss is the embedding, the final norm, the head, the loss and the model's own
code between layers. This was a test once; a share of wall-clock time moves with the load of
a shared machine, so it is measured here, with its spread, instead.

The model: llama-shaped, 6 layers, hidden 256, intermediate 688, vocabulary 256 (so that the
head and the loss are small next to the layers), 2 x 256 tokens, fp32, one thread. Each round
runs one timed step of every method (frozen, lora, dora, paca, full) in a shuffled order.

Per method: the decoder layers' share of forward + backward, as the median over rounds, with a
95% bootstrap interval over whole rounds (bench/verdicts.py). Target: the unattributed share
1 - share <= 0.10 (the layers carry at least 90%). Verdict by bench/verdicts.py: PASS when the
whole interval is within the target, FAIL when all of it is beyond, INCONCLUSIVE otherwise; no
verdict under --quick or with fewer than 9 rounds.

    python bench/bench_attribution.py            # 15 rounds (~2 min)
    python bench/bench_attribution.py --quick    # 3 rounds: a smoke run (no verdict)

Exit status: 1 when a method FAILED, 3 when none failed and one was INCONCLUSIVE, 0 otherwise;
2 for bad arguments.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import warnings
from collections.abc import Callable

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
warnings.filterwarnings("ignore", category=FutureWarning)

import torch  # noqa: E402
import verdicts  # noqa: E402  (bench/verdicts.py: this script's folder is on sys.path)

METHODS = ("frozen", "lora", "dora", "paca", "full")
TARGET = 0.10  # unattributed share of forward + backward
MODEL = dict(num_hidden_layers=6, hidden_size=256, intermediate_size=688, vocab_size=256,
             num_attention_heads=4, num_key_value_heads=2)


def prepare_step(method: str, seq: int, batch: int) -> Callable[[], float]:
    """Build `method`'s model once; return a function that runs one timed step and gives the
    decoder layers' share of its forward + backward time. The only place this script reaches
    into paca_prof's internals."""
    from paca_prof.engines.measure import timing_pass
    from paca_prof.engines.step import make_batch, prepare
    from paca_prof.spec import RunSpec

    spec = RunSpec(model="tiny", seq=seq, batch=batch, dtype="fp32", device="cpu",
                   methods=(method,), steps=1, warmup=0)
    spec.config.update(MODEL)
    run = prepare(spec, method, "cpu")
    ids = make_batch(spec, "cpu")
    layers = {f"model.layers.{i}" for i in range(MODEL["num_hidden_layers"])}

    def step() -> float:
        outcome = timing_pass({method: run}, ids, warmup=0, steps=1)[method]
        if isinstance(outcome, BaseException):
            raise outcome
        latencies, phase_ms = outcome.latencies(), outcome.phase_ms()
        inside = sum(ms for (path, phase), ms in latencies.items()
                     if path in layers and phase in ("forward", "backward"))
        return inside / (phase_ms["forward"] + phase_ms["backward"])

    return step


def unattributed(rounds: list[dict[str, float]]) -> dict[str, float]:
    """Per method: 1 - the median share over the given rounds (the bootstrap's statistic)."""
    return {m: 1.0 - statistics.median(r[m] for r in rounds) for m in rounds[0]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds: a smoke run")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 15)")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rounds_n = args.rounds if args.rounds is not None else (3 if args.quick else 15)
    if rounds_n < 1 or args.seq < 1 or args.batch < 1:
        parser.error("--rounds, --seq and --batch must be at least 1")
    torch.set_num_threads(1)
    print(f"bench_attribution: llama-shaped {MODEL}, {args.batch} x {args.seq} tokens, fp32, "
          f"1 thread; {rounds_n} rounds; load average at start {os.getloadavg()[0]:.2f}")
    steps = {m: prepare_step(m, args.seq, args.batch) for m in METHODS}
    for step in steps.values():  # warm up each once
        step()
    rng = random.Random(args.seed)
    order, rounds = list(METHODS), []
    for _ in range(rounds_n):
        rng.shuffle(order)
        rounds.append({m: steps[m]() for m in order})
    print(f"load average at end {os.getloadavg()[0]:.2f}")
    missing = unattributed(rounds)
    intervals = verdicts.bootstrap_intervals(rounds, unattributed, seed=args.seed)
    print(f"\n{'method':<8} {'layers share':>12} {'unattributed':>12} {'95% interval':>16}   "
          f"target <= {TARGET:g}")
    judgements = {}
    for method in METHODS:
        judgement = verdicts.judge(intervals[method], TARGET, n=len(rounds),
                                   minimum=verdicts.MIN_ROUNDS, quick=args.quick)
        judgements[method] = judgement
        print(f"{method:<8} {1 - missing[method]:>12.3f} {missing[method]:>12.3f} "
              f"{intervals[method].format('6.3f'):>16}   {judgement}")
    print("(measured: host clock of the timing pass; share = decoder layers' forward + backward "
          "latency / the forward + backward phases, median over rounds; 95% interval: "
          "bootstrap over whole rounds)")
    print(verdicts.summary(judgements))
    return verdicts.exit_status(judgements.values())


if __name__ == "__main__":
    sys.exit(main())
