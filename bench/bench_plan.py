"""Benchmark: the capacity planner's speed and accuracy (prints numbers; a benchmark, not a test).

1. speed      `paca-prof plan --model llama3-8b --gpu a100-80gb --confirm auto|always` as a
              fresh process (imports included), --repeats times: wall seconds against the 30 s
              target, and the answers. Judged only when every answer of every repeat was
              confirmed at full depth ("confirmed_full_depth" in the plan's JSON): --confirm
              auto skips confirmations near its time budget, so its speed alone shows nothing
              about a confirmed plan. Otherwise "no verdict: answers not all confirmed"; rerun
              with --confirm always to judge it. Verdict from the 95% interval of the median of
              the repeats (bench/verdicts.py: with 6 to 8 repeats, their range): PASS when all
              of it is under 30 s, FAIL when all of it is over, INCONCLUSIVE otherwise; no
              verdict under --quick or with fewer than 6 repeats.
2. depth      the planner's extrapolated peak (2- and 3-layer models) against a full-depth
              simulation at the same size: bytes of difference, per method.
3. peak       on the tiny preset in fp32 with eager attention (what the CPU runs), the
              planner's predicted peak against the peak measured on the CPU by
              engines.measure.measure_method, at several sequence lengths: bytes of difference.
4. max seq    under a small budget (--memory 40MiB --headroom 0), the planner's longest
              sequence against a search by real CPU runs (doubling, then bisection on the same
              grid, a length fitting when its measured peak is within the budget): relative
              error.

2.-4. compare exact byte counts (simulated against measured), not samples: they are PASS or
FAIL for the sizes they ran, in every mode; --quick runs fewer lengths in 3. and skips 4.
("not checked").

Run from the repository root:

    python bench/bench_plan.py              # all four (several minutes: 4. runs real steps)
    python bench/bench_plan.py --quick      # one plan (no speed verdict), 2-3 with fewer lengths
    python bench/bench_plan.py --confirm always   # judge the speed of a fully confirmed plan
    python bench/bench_plan.py --methods lora,paca,dora

Exit status: 1 when a target FAILED (speed over 30 s; depth not exact; a peak more than 256 B
off; a longest sequence more than 2% off) or a plan command failed, 3 when none failed and the
speed was INCONCLUSIVE, 0 otherwise (also when something was not judged: the last line says
so); 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
warnings.filterwarnings("ignore", category=FutureWarning)

import verdicts  # noqa: E402  (bench/verdicts.py: this script's folder is on sys.path)

from paca_prof import plan as planner  # noqa: E402
from paca_prof.budget import make_budget  # noqa: E402

REPO = Path(__file__).resolve().parents[1]  # the plan command imports this checkout's paca_prof
TINY = dict(dtype="fp32", attention="eager")
SPEED_TARGET_S = 30.0
BYTE_TOLERANCE = 256  # simulated bytes are exact; the CPU allocator adds a few scalars
ERROR_TARGET = 0.02  # the planner's longest sequence against a search by real CPU runs


def plan_once(confirm: str) -> tuple[float, dict]:
    """One fresh `paca-prof plan` process: its wall seconds and its --json plan.

    Raises RuntimeError, with the last line of its stderr, when the command fails."""
    command = [sys.executable, "-m", "paca_prof.cli", "plan", "--model", "llama3-8b",
               "--gpu", "a100-80gb", "--confirm", confirm, "--json"]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        raise RuntimeError(f"paca-prof {' '.join(command[3:])} exited {done.returncode}: "
                           f"{lines[-1] if lines else '(no stderr)'}")
    return wall, json.loads(done.stdout)


def bench_speed(repeats: int, confirm: str, quick: bool) -> verdicts.Judgement:
    print(f"1. speed: paca-prof plan --model llama3-8b --gpu a100-80gb --confirm {confirm}, "
          f"{repeats} fresh process(es)")
    walls, unconfirmed = [], set()
    for repeat in range(repeats):
        wall, plan = plan_once(confirm)
        walls.append(wall)
        missing = [m for m, entry in plan["methods"].items() if not entry["confirmed_full_depth"]]
        unconfirmed.update(missing)
        print(f"   {repeat + 1}/{repeats}: {wall:.1f} s wall (plan itself {plan['elapsed_s']:.1f} s)"
              f"; not confirmed at full depth: {', '.join(missing) or 'none'}", flush=True)
    print(f"   answers of the last plan (budget {plan['budget_bytes'] / 2**30:.2f} GiB):")
    for method, entry in plan["methods"].items():
        print(f"   {method:<6} max_seq {entry['max_seq']:>6}  peak "
              f"{entry['peak_bytes'] / 2**30:6.2f} GiB  {entry['confirmation']}")
    interval = verdicts.median_interval(walls)
    if unconfirmed:
        judgement = verdicts.Judgement(
            verdicts.NO_VERDICT,
            f"answers not all confirmed at full depth ({', '.join(sorted(unconfirmed))}); "
            "rerun with --confirm always to judge the speed")
    else:
        judgement = verdicts.judge(interval, SPEED_TARGET_S, n=len(walls), unit="repeats",
                                   minimum=verdicts.MIN_REPEATS, quick=quick)
    print(f"   wall s min / median / max {min(walls):.1f} / {statistics.median(walls):.1f} / "
          f"{max(walls):.1f}, 95% interval of the median "
          f"{interval.format('.1f') if interval else '(none)'}; "
          f"target <= {SPEED_TARGET_S:.0f} s: {judgement}")
    return judgement


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


def measured_peak(spec, method: str) -> int:
    """The peak bytes of one real CPU step (engines.measure), its trace files in a temporary
    folder removed afterwards."""
    from paca_prof.engines.measure import measure_method

    with tempfile.TemporaryDirectory(prefix="paca-prof-bench-") as tmp:
        return measure_method(spec, method, Path(tmp)).summary["peak_bytes"]


def bench_peak(methods: list[str], seqs: list[int]) -> bool:
    from paca_prof.engines.common import RunSpec

    print("3. peak: tiny, fp32, eager attention: planner's simulated peak vs measured on the CPU")
    ok = True
    for method in methods:
        spec = planner.make_spec("tiny", (method,), **TINY)
        model = planner._MethodModel(spec, method, 2, (2,))
        for seq in seqs:
            predicted = model.probe(seq, 1).peak_bytes
            run = RunSpec(model="tiny", seq=seq, device="cpu", steps=1, warmup=0, **TINY)
            measured = measured_peak(run, method)
            ok &= abs(predicted - measured) <= BYTE_TOLERANCE
            print(f"   {method:<6} seq {seq:>5}: predicted {predicted:>12,} B  measured "
                  f"{measured:>12,} B  difference {predicted - measured:+,} B "
                  f"(target within {BYTE_TOLERANCE} B)")
    return ok


def bench_max_seq(methods: list[str], granularity: int) -> bool:
    from paca_prof.engines.common import RunSpec

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
            peak = measured_peak(spec, method)
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
    parser.add_argument("--quick", action="store_true",
                        help="one plan (no speed verdict), fewer lengths, no measured search (4.)")
    parser.add_argument("--repeats", type=int, default=None,
                        help=f"plan processes for 1. (default {verdicts.MIN_REPEATS}; 1 --quick)")
    parser.add_argument("--confirm", choices=["auto", "always"], default="auto",
                        help="the plan's --confirm in 1. (always: every answer confirmed, so its "
                             "speed can be judged)")
    parser.add_argument("--methods", default="lora,paca",
                        help="methods for 2.-4. (default lora,paca)")
    parser.add_argument("--depth-model", default="llama3-8b", help="model for 2.")
    parser.add_argument("--granularity", type=int, default=16, help="grid of 4. (tokens)")
    args = parser.parse_args()
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else verdicts.MIN_REPEATS)
    if repeats < 1:
        parser.error(f"--repeats must be at least 1, got {repeats}")
    if args.granularity < 1:
        parser.error(f"--granularity must be at least 1, got {args.granularity}")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        parser.error("--methods names no method")
    print(f"bench_plan: {os.cpu_count()} CPUs; load average at start {os.getloadavg()[0]:.2f}")

    def exact(ok: bool) -> verdicts.Judgement:
        return verdicts.Judgement(verdicts.PASS if ok else verdicts.FAIL)

    try:
        results = {"speed": bench_speed(repeats, args.confirm, args.quick)}
    except RuntimeError as error:
        print(f"error: {error}")
        return verdicts.EXIT_FAIL
    results["depth"] = exact(bench_depth(methods, args.depth_model, 1024))
    results["peak"] = exact(bench_peak(methods, [128, 512] if args.quick else [128, 256, 512, 1024]))
    if args.quick:
        results["max seq"] = verdicts.not_checked("--quick skips the measured search")
    else:
        results["max seq"] = exact(bench_max_seq(methods, args.granularity))
    print(f"load average at end {os.getloadavg()[0]:.2f}")
    print(verdicts.summary(results))
    return verdicts.exit_status(results.values())


if __name__ == "__main__":
    sys.exit(main())
