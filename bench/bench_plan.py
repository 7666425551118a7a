"""Benchmark: the capacity planner's speed and accuracy (prints numbers; a benchmark, not a test).

1. speed      `paca-prof plan --model llama3-8b --gpu a100-80gb` as a fresh process (imports
              included): wall seconds against the 30 s target, and the answers.
2. depth      the planner's extrapolated peak (2- and 3-layer models) against a full-depth
              simulation at the same size: bytes of difference, per method.
3. peak       on the tiny preset in fp32 with eager attention (what the CPU runs), the
              planner's predicted peak against the peak measured on the CPU by
              engines.measure.measure_method, at several sequence lengths: relative error.
4. max seq    under a small budget (--memory 40MiB --headroom 0), the planner's longest
              sequence against a search by real CPU runs (doubling, then bisection on the same
              grid, a length fitting when its measured peak is within the budget): relative
              error.

Run from the repository root:

    python bench/bench_plan.py              # all four (several minutes: 4. runs real steps)
    python bench/bench_plan.py --quick      # 1-3 only, fewer lengths
    python bench/bench_plan.py --methods lora,paca,dora

Exit status 1 when a target fails (speed over 30 s; depth not exact; an error over 2%).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
warnings.filterwarnings("ignore", category=FutureWarning)

from paca_prof import plan as planner  # noqa: E402
from paca_prof.budget import make_budget  # noqa: E402

TINY = dict(dtype="fp32", attention="eager")
SPEED_TARGET_S = 30.0
ERROR_TARGET = 0.02


def bench_speed() -> bool:
    script = shutil.which("paca-prof")
    command = ([script] if script else [sys.executable, "-m", "paca_prof.cli"]) + [
        "plan", "--model", "llama3-8b", "--gpu", "a100-80gb", "--json"]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - started
    plan = json.loads(done.stdout)
    print(f"1. speed: paca-prof plan --model llama3-8b --gpu a100-80gb: {wall:.1f} s wall "
          f"(target < {SPEED_TARGET_S:.0f} s; plan itself {plan['elapsed_s']:.1f} s; "
          f"budget {plan['budget_bytes'] / 2**30:.2f} GiB)")
    for method, entry in plan["methods"].items():
        print(f"   {method:<6} max_seq {entry['max_seq']:>6}  peak "
              f"{entry['peak_bytes'] / 2**30:6.2f} GiB  {entry['confirmation']}")
    return wall < SPEED_TARGET_S


def bench_depth(methods: list[str], model: str, seq: int) -> bool:
    print(f"2. depth: {model} at seq {seq}, extrapolated from 2 and 3 layers vs full depth")
    exact = True
    for method in methods:
        spec = planner.make_spec(model, (method,))
        mm = planner._MethodModel(spec, method, spec.config.num_hidden_layers, planner.DEPTHS)
        started = time.perf_counter()
        extrapolated = mm.probe(seq, 1)
        middle = time.perf_counter()
        full = mm.probe_full(seq, 1)
        ended = time.perf_counter()
        worst = max(abs(extrapolated.breakdown[c] - full.breakdown[c]) for c in full.breakdown)
        exact &= worst == 0
        print(f"   {method:<6} full {full.peak_bytes:>14,} B  extrapolated "
              f"{extrapolated.peak_bytes:>14,} B  largest category difference {worst} B  "
              f"({middle - started:.1f} s vs {ended - middle:.1f} s)")
    return exact


def bench_peak(methods: list[str], seqs: list[int]) -> bool:
    from paca_prof.engines.common import RunSpec
    from paca_prof.engines.measure import measure_method

    print("3. peak: tiny, fp32, eager attention: planner's simulated peak vs measured on the CPU")
    ok = True
    for method in methods:
        spec = planner.make_spec("tiny", (method,), **TINY)
        model = planner._MethodModel(spec, method, 2, (2,))
        for seq in seqs:
            predicted = model.probe(seq, 1).peak_bytes
            run = RunSpec(model="tiny", seq=seq, device="cpu", steps=1, warmup=0, **TINY)
            measured = measure_method(run, method, Path(tempfile.mkdtemp())).summary["peak_bytes"]
            error = (predicted - measured) / measured
            ok &= abs(error) <= ERROR_TARGET
            print(f"   {method:<6} seq {seq:>5}: predicted {predicted:>12,} B  measured "
                  f"{measured:>12,} B  error {100 * error:+.4f}%")
    return ok


def bench_max_seq(methods: list[str], granularity: int) -> bool:
    from paca_prof.engines.common import RunSpec
    from paca_prof.engines.measure import measure_method

    budget = make_budget(memory="40MiB", headroom="0")
    print(f"4. max seq: tiny, fp32, eager, budget {budget.budget_bytes:,} B (40 MiB, no "
          f"headroom), grid {granularity} tokens: planner vs a search by real CPU runs")
    result = planner.plan("tiny", budget, tuple(methods), granularity=granularity, **TINY)
    ok = True
    for method in methods:
        runs = 0

        def fits(seq: int) -> bool:
            nonlocal runs
            runs += 1
            spec = RunSpec(model="tiny", seq=seq, device="cpu", steps=1, warmup=0, **TINY)
            peak = measure_method(spec, method, Path(tempfile.mkdtemp())).summary["peak_bytes"]
            return peak <= budget.budget_bytes

        started = time.perf_counter()
        lo, hi = 0, granularity
        while fits(hi):  # doubling: the short runs are cheap
            lo, hi = hi, 2 * hi
        while hi - lo > granularity:
            mid = (lo + hi) // 2 // granularity * granularity
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        planned = result.methods[method].max_size
        error = (planned - lo) / lo if lo else float("inf")
        ok &= abs(error) <= ERROR_TARGET
        print(f"   {method:<6} planner {planned:>5}  measured search {lo:>5} "
              f"({runs} CPU runs, {time.perf_counter() - started:.0f} s)  error "
              f"{100 * error:+.2f}%")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip the measured search (4.)")
    parser.add_argument("--methods", default="lora,paca",
                        help="methods for 2.-4. (default lora,paca)")
    parser.add_argument("--depth-model", default="llama3-8b", help="model for 2.")
    parser.add_argument("--granularity", type=int, default=16, help="grid of 4. (tokens)")
    args = parser.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    results = {"speed": bench_speed(),
               "depth": bench_depth(methods, args.depth_model, 1024),
               "peak": bench_peak(methods, [128, 512] if args.quick else [128, 256, 512, 1024])}
    if not args.quick:
        results["max seq"] = bench_max_seq(methods, args.granularity)
    failed = [name for name, ok in results.items() if not ok]
    print("targets: " + ("all met" if not failed else "FAILED: " + ", ".join(failed)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
