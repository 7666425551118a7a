"""Benchmark: how much the timing pass's instruments slow a training step, on the CPU.

Two cases per method (frozen, lora, dora, paca, full), each one training step on the same
prepared llama-shaped model (random weights):

    plain         the prepared method's training step (paca_prof.engines.step.Prepared.step)
    instrumented  paca_prof.engines.measure.timing_pass with one step and no warm-up: the
                  Capture session's hooks registered, the step with its scopes, phase timers
                  and clock stamps, the per-module totals, the hooks removed

Both cases are timed the same way, from outside, with time.perf_counter around the whole call,
so whatever the instrumentation costs to enter and leave the step is counted. All of them are
timed in ONE interleaved run: each round visits every (method, case) once, in a freshly
shuffled order, and times `reps` calls one by one. The garbage collector is frozen after setup
and disabled inside timed calls.

Per method: ratio = median instrumented / median plain wall time, with a 95% bootstrap interval
over whole rounds (bench/verdicts.py: a round's cases stay paired), and as robustness checks the
median of the per-round ratios and the ratio of CPU-time medians. Target: ratio <= 1.05 (the
instrumentation may slow a step by at most 5%). Verdict by bench/verdicts.py: PASS when the
whole interval is within the target, FAIL when all of it is beyond, INCONCLUSIVE otherwise; no
verdict under --quick or with fewer than 9 rounds; a method not in --methods is not checked.

Run from the repository root:

    python bench/bench_overhead.py                 # 20 rounds x 2 calls per case (~5 min)
    python bench/bench_overhead.py --quick         # 3 rounds x 1 call: a smoke run (no verdict)
    python bench/bench_overhead.py --rounds 40 --hidden 512 --layers 4 --seq 256
    python bench/bench_overhead.py --methods lora,paca

Exit status: 1 when a method FAILED, 3 when none failed and one was INCONCLUSIVE, 0 otherwise
(also when nothing was judged: the last line says so); 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import statistics
import sys
import time
import warnings
from collections.abc import Callable

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
warnings.filterwarnings("ignore", category=FutureWarning)

import torch  # noqa: E402
import verdicts  # noqa: E402  (bench/verdicts.py: this script's folder is on sys.path)

METHODS = ("frozen", "lora", "dora", "paca", "full")
CASES = ("plain", "instrumented")
TARGET = 1.05
WARMUP = 3  # untimed calls of each case per method before the rounds (1 under --quick)


def prepare_cases(args, method: str) -> dict[str, Callable[[], object]]:
    """Build `method`'s model once and return its two cases, each one training step on it.

    The only place this script reaches into paca_prof's internals: re-point it here when they
    move. The instrumented case is the timing pass of engines/measure.py with one step.
    """
    from paca_prof.engines.measure import timing_pass
    from paca_prof.engines.step import make_batch, prepare
    from paca_prof.spec import RunSpec

    spec = RunSpec(model="tiny", seq=args.seq, batch=args.batch, dtype="fp32", device="cpu",
                   methods=(method,), steps=1, warmup=0)
    spec.config.hidden_size = args.hidden
    spec.config.intermediate_size = int(args.hidden * 2.75)
    spec.config.num_hidden_layers = args.layers
    spec.config.num_attention_heads = args.hidden // 64
    spec.config.num_key_value_heads = max(1, args.hidden // 128)
    spec.config.max_position_embeddings = max(spec.config.max_position_embeddings, args.seq)
    run = prepare(spec, method, "cpu")
    ids = make_batch(spec, "cpu")

    def instrumented():
        outcome = timing_pass({method: run}, ids, warmup=0, steps=1)[method]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    return {"plain": lambda: run.step(ids), "instrumented": instrumented}


def measure(args, methods: list[str], warmup: int) -> tuple[list[dict], dict]:
    """The interleaved run. Returns the rounds, each {(method, case): [wall s per call]}, and
    every call's CPU time per (method, case)."""
    cases = {}
    for method in methods:
        for case, call in prepare_cases(args, method).items():
            cases[(method, case)] = call
    for call in cases.values():
        for _ in range(warmup):
            call()
    gc.collect()
    gc.freeze()  # the models are long-lived: keep them out of the collector's way

    rng = random.Random(args.seed)
    order = list(cases)
    rounds: list[dict] = []
    cpu: dict = {key: [] for key in cases}
    for _ in range(args.rounds):
        rng.shuffle(order)
        this_round = {}
        for key in order:
            call = cases[key]
            gc.collect()
            gc.disable()
            times = []
            try:
                for _ in range(args.reps):
                    c0 = time.process_time()
                    start = time.perf_counter()
                    call()
                    times.append(time.perf_counter() - start)
                    cpu[key].append(time.process_time() - c0)
            finally:
                gc.enable()
            this_round[key] = times
        rounds.append(this_round)
    gc.unfreeze()
    return rounds, cpu


def overheads(rounds: list[dict]) -> dict[str, float]:
    """Per method: median instrumented / median plain wall time over the given rounds (the
    bootstrap's statistic: whole rounds, so each round's cases stay paired)."""
    methods = dict.fromkeys(method for method, _ in rounds[0])
    out = {}
    for method in methods:
        med = {case: statistics.median(t for r in rounds for t in r[(method, case)]) for case in CASES}
        out[method] = med["instrumented"] / med["plain"]
    return out


def report(args, methods: list[str], rounds: list[dict], cpu: dict) -> dict[str, verdicts.Judgement]:
    ratios = overheads(rounds)
    intervals = verdicts.bootstrap_intervals(rounds, overheads, seed=args.seed)
    per_round = [overheads([r]) for r in rounds]
    print()
    print(f"{'method':<8} {'plain ms':>9} {'instr ms':>9} {'ratio':>7} {'95% interval':>16} "
          f"{'per-round':>9} {'cpu':>6}   target <= {TARGET:g}")
    judgements = {}
    for method in METHODS:
        if method not in methods:
            judgements[method] = verdicts.not_checked("not in --methods")
            print(f"{method:<8} {'':>9} {'':>9} {'':>7} {'':>16} {'':>9} {'':>6}   "
                  f"{judgements[method]}")
            continue
        wall = {case: [t for r in rounds for t in r[(method, case)]] for case in CASES}
        med = {case: 1e3 * statistics.median(wall[case]) for case in CASES}
        cpu_med = {case: statistics.median(cpu[(method, case)]) for case in CASES}
        judgement = verdicts.judge(intervals[method], TARGET, n=len(rounds),
                                   minimum=verdicts.MIN_ROUNDS, quick=args.quick)
        judgements[method] = judgement
        print(f"{method:<8} {med['plain']:>9.2f} {med['instrumented']:>9.2f} "
              f"{ratios[method]:>7.3f} {intervals[method].format('6.3f'):>16} "
              f"{statistics.median(p[method] for p in per_round):>9.3f} "
              f"{cpu_med['instrumented'] / cpu_med['plain']:>6.3f}   {judgement}")
    print("(measured: wall medians per call; ratio: instrumented / plain; 95% interval: bootstrap"
          " over whole rounds; per-round: median of the within-round ratios; cpu: ratio of the"
          " CPU-time medians)")
    print(verdicts.legend(verdicts.MIN_ROUNDS))
    return judgements


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds x 1 call: a smoke run")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 20; 3 --quick)")
    parser.add_argument("--reps", type=int, default=None,
                        help="timed calls per case per round (default 2; 1 --quick)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--hidden", type=int, default=512, help="hidden size (multiple of 128)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads (default 1: steadier on a shared machine)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the round orders and bootstrap")
    args = parser.parse_args(argv)
    args.rounds = args.rounds if args.rounds is not None else (3 if args.quick else 20)
    args.reps = args.reps if args.reps is not None else (1 if args.quick else 2)
    methods = list(dict.fromkeys(m.strip() for m in args.methods.split(",") if m.strip()))
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        parser.error(f"--methods: choose from {','.join(METHODS)}, got {args.methods!r}")
    for name in ("rounds", "reps", "layers", "seq", "batch", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.hidden < 128 or args.hidden % 128:
        parser.error(f"--hidden must be a positive multiple of 128, got {args.hidden}")

    warmup = 1 if args.quick else WARMUP
    torch.set_num_threads(args.threads)
    print(f"bench_overhead: llama-shaped, hidden {args.hidden}, {args.layers} layers, "
          f"{args.batch} x {args.seq} tokens, fp32, CPU, {torch.get_num_threads()} torch "
          f"thread(s); {args.rounds} rounds x {args.reps} call(s) per case, {warmup} warm-up; "
          f"load average at start {os.getloadavg()[0]:.2f}")
    started = time.perf_counter()
    rounds, cpu = measure(args, methods, warmup)
    print(f"timed in {time.perf_counter() - started:.0f} s; load average at end "
          f"{os.getloadavg()[0]:.2f}")
    judgements = report(args, methods, rounds, cpu)
    print(verdicts.summary(judgements))
    return verdicts.exit_status(judgements.values())


if __name__ == "__main__":
    sys.exit(main())
