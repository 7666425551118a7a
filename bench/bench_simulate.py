"""Benchmark: how long `paca-prof run` takes to simulate full-size models on this CPU, and how
much memory it needs.

Each run is the real command in a fresh process (imports included); every case is repeated
`--repeats` times, each repeat its own process, the cases taking turns. Per process: its wall
time (time.perf_counter from start to exit) and its own peak resident memory, from the rusage
that os.wait4 returns for that child (ru_maxrss: the child's peak, or that of a process it
waited for, if larger; never another case's).

Targets: 30 s and 2 GiB for llama3-8b at seq 4096 with every default method. llama3.1-70b at
seq 8192 (lora, paca, qlora, qpaca) is reported, not judged. A wall time is one measurement of
one process, so the verdict comes from the spread of the repeats: the distribution-free 95%
interval of the median (bench/verdicts.py; with 6 to 8 repeats that is their range, from the
fastest to the slowest). PASS when the whole interval is within the target, FAIL when all of it
is beyond, INCONCLUSIVE otherwise; no verdict under --quick or with fewer than 6 repeats (below
6 no 95% interval of a median exists). The same rule judges the peak memory, which barely
varies.

Run from the repository root:

    python bench/bench_simulate.py               # 6 repeats of both cases (~11 min quiet)
    python bench/bench_simulate.py --repeats 9   # a tighter interval than the range
    python bench/bench_simulate.py --quick       # llama3-8b once: a smoke run (no verdict)

Exit status: 1 when a target FAILED (or a run failed), 3 when none failed and one was
INCONCLUSIVE, 0 otherwise (also when nothing was judged: the last line says so); 2 for bad
arguments. Linux (os.wait4; ru_maxrss in KiB).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import verdicts  # bench/verdicts.py: this script's folder is on sys.path

REPO = Path(__file__).resolve().parents[1]  # the child imports this checkout's paca_prof
TARGET_S = 30.0
TARGET_RSS_GIB = 2.0


@dataclass(frozen=True)
class Case:
    model: str
    seq: int
    methods: str | None  # None: the command's default methods
    judged: bool


CASES = [
    Case("llama3-8b", 4096, None, judged=True),
    Case("llama3.1-70b", 8192, "lora,paca,qlora,qpaca", judged=False),
]


def run_case(case: Case) -> tuple[float, float]:
    """One fresh process of `paca-prof run` for the case: (wall s, its peak RSS in GiB).

    Raises RuntimeError, with the last line of its stderr, when the command fails."""
    with tempfile.TemporaryDirectory(prefix="paca-prof-bench-") as tmp:
        command = [sys.executable, "-m", "paca_prof.cli", "run", "--model", case.model,
                   "--seq", str(case.seq), "--out", str(Path(tmp) / "trace"), "--json"]
        if case.methods:
            command += ["--methods", case.methods]
        with open(Path(tmp) / "stdout", "wb") as out, open(Path(tmp) / "stderr", "wb") as err:
            start = time.perf_counter()
            child = subprocess.Popen(command, stdout=out, stderr=err, cwd=REPO)
            # wait4 reaps this child and returns its own rusage (getrusage(RUSAGE_CHILDREN)
            # would give the largest peak of every child so far).
            _, status, usage = os.wait4(child.pid, 0)
            wall = time.perf_counter() - start
            child.returncode = os.waitstatus_to_exitcode(status)  # reaped: tell Popen
        if child.returncode != 0:
            lines = (Path(tmp) / "stderr").read_text(errors="replace").strip().splitlines()
            raise RuntimeError(f"{' '.join(command[2:])} exited {child.returncode}: "
                               f"{lines[-1] if lines else '(no stderr)'}")
    return wall, usage.ru_maxrss / 2**20  # KiB -> GiB


def describe(values: list[float], interval: verdicts.Interval | None, spec: str) -> str:
    spread = f"{min(values):{spec}} / {statistics.median(values):{spec}} / {max(values):{spec}}"
    return f"{spread}  95% {interval.format(spec) if interval else '(none)'}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="llama3-8b once: a smoke run")
    parser.add_argument("--repeats", type=int, default=None,
                        help=f"processes per case (default {verdicts.MIN_REPEATS}; 1 --quick)")
    args = parser.parse_args(argv)
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else verdicts.MIN_REPEATS)
    if repeats < 1:
        parser.error(f"--repeats must be at least 1, got {repeats}")
    cases = CASES[:1] if args.quick else CASES
    print(f"bench_simulate: {repeats} process(es) per case, {os.cpu_count()} CPUs, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; load average at "
          f"start {os.getloadavg()[0]:.2f}")

    walls: dict[Case, list[float]] = {case: [] for case in cases}
    rss: dict[Case, list[float]] = {case: [] for case in cases}
    for repeat in range(repeats):
        for case in cases:
            try:
                wall, peak = run_case(case)
            except RuntimeError as error:
                print(f"error: {error}")
                return verdicts.EXIT_FAIL
            walls[case].append(wall)
            rss[case].append(peak)
            print(f"  {repeat + 1}/{repeats} {case.model} seq {case.seq}: {wall:.1f} s, "
                  f"{peak:.2f} GiB", flush=True)
    print(f"load average at end {os.getloadavg()[0]:.2f}")
    print()
    print("measured per process: min / median / max, and the 95% interval of the median")
    judgements = {}
    for case in cases:
        label = f"{case.model} seq {case.seq} ({case.methods or 'default methods'})"
        wall_iv = verdicts.median_interval(walls[case])
        rss_iv = verdicts.median_interval(rss[case])
        print(f"{label}")
        for what, values, interval, limit, unit in (
            ("wall", walls[case], wall_iv, TARGET_S, "s"),
            ("peak RSS", rss[case], rss_iv, TARGET_RSS_GIB, "GiB"),
        ):
            line = f"  {what:<9} {unit:<4} {describe(values, interval, '.2f')}"
            if case.judged:
                name = f"{case.model} {what} <= {limit:g} {unit}"
                judgements[name] = verdicts.judge(interval, limit, n=len(values), unit="repeats",
                                                  minimum=verdicts.MIN_REPEATS, quick=args.quick)
                line += f"   target <= {limit:g} {unit}: {judgements[name]}"
            else:
                line += "   (reported, not judged)"
            print(line)
    print(verdicts.legend(verdicts.MIN_REPEATS, "repeats"))
    print(verdicts.summary(judgements))
    return verdicts.exit_status(judgements.values())


if __name__ == "__main__":
    sys.exit(main())
