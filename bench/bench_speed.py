"""Benchmark: the speed of `paca-prof run` and `paca-prof plan` on full-size models, imports
included (issue 10, item 5; issue 15, item 4).

Cases, each the real command in a fresh process:
  run   `paca-prof run --model llama3-8b --seq 4096` (frozen, lora, dora, paca, full simulated
        on the meta device, times projected for the default GPU): target 10 s wall;
  plan  `paca-prof plan --model llama3-8b --gpu a100-80gb --methods frozen,lora,paca,full`:
        target 15 s wall; how many answers were confirmed at full depth is printed beside it
        (the plan's JSON), since --confirm auto skips confirmations its time budget cannot fit;
  fsdp-plan  `paca-prof plan --model llama3.1-70b --gpu h100-80gb --fsdp --world-size 8
        --methods lora,paca,qlora,qpaca,full`: target 30 s wall (not run by default).
Each command runs as `python -m paca_prof` (what the paca-prof console script runs); the
methods are simulated side by side, one per core (PACA_PROF_JOBS=1 in the environment runs
them one at a time, for a comparison).
Every case is repeated `--repeats` times, the cases taking turns. Per process: its wall time
(time.perf_counter from start to exit) and its CPU time (user + system, from the rusage that
os.wait4 returns for that child). Wall time on a shared machine depends on the load, which is
printed at the start and the end; CPU time much less so, and is reported (not judged) beside
it. The verdict on wall time comes from the distribution-free 95% interval of the median
(bench/verdicts.py; with 6 to 8 repeats, their range): PASS when all of it is within the
target, FAIL when all of it is beyond, INCONCLUSIVE otherwise; no verdict under --quick or with
fewer than 6 repeats.

Run from the repository root:

    python bench/bench_speed.py                 # 6 repeats of both cases
    python bench/bench_speed.py --repeats 3     # medians and spread, no verdict
    python bench/bench_speed.py --quick         # each case once: a smoke run (no verdict)
    python bench/bench_speed.py --cases run     # one case
    python bench/bench_speed.py --cases fsdp-plan --repeats 3

Exit status: 1 when a target FAILED (or a command failed), 3 when none failed and one was
INCONCLUSIVE, 0 otherwise (also when nothing was judged: the last line says so); 2 for bad
arguments. Linux (os.wait4).
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
from dataclasses import dataclass
from pathlib import Path

import verdicts  # bench/verdicts.py: this script's folder is on sys.path

REPO = Path(__file__).resolve().parents[1]  # the child imports this checkout's paca_prof


@dataclass(frozen=True)
class Case:
    name: str
    argv: tuple[str, ...]
    target_s: float


CASES = {
    "run": Case("run", ("run", "--model", "llama3-8b", "--seq", "4096", "--json"), 10.0),
    "plan": Case("plan", ("plan", "--model", "llama3-8b", "--gpu", "a100-80gb", "--methods",
                          "frozen,lora,paca,full", "--json"), 15.0),
    # issue 15, item 4: llama3.1-70b over 8 ranks, five methods
    "fsdp-plan": Case("fsdp-plan", ("plan", "--model", "llama3.1-70b", "--gpu", "h100-80gb",
                                    "--fsdp", "--world-size", "8", "--methods",
                                    "lora,paca,qlora,qpaca,full", "--json"), 30.0),
}


@dataclass
class Sample:
    wall_s: float
    cpu_s: float
    note: str


def run_case(case: Case) -> Sample:
    """One fresh process of the case's command. RuntimeError (with the last line of its
    stderr) when it fails."""
    with tempfile.TemporaryDirectory(prefix="paca-prof-bench-") as tmp:
        command = [sys.executable, "-m", "paca_prof", *case.argv]
        if case.name == "run":
            command += ["--out", str(Path(tmp) / "trace")]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        with open(Path(tmp) / "stdout", "wb") as out, open(Path(tmp) / "stderr", "wb") as err:
            start = time.perf_counter()
            child = subprocess.Popen(command, stdout=out, stderr=err, cwd=REPO, env=env)
            _, status, usage = os.wait4(child.pid, 0)
            wall = time.perf_counter() - start
            child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode != 0:
            lines = (Path(tmp) / "stderr").read_text(errors="replace").strip().splitlines()
            raise RuntimeError(f"{' '.join(case.argv)} exited {child.returncode}: "
                               f"{lines[-1] if lines else '(no stderr)'}")
        note = ""
        if case.argv[0] == "plan":
            plan = json.loads((Path(tmp) / "stdout").read_text())
            confirmed = sum(m["confirmed_full_depth"] for m in plan["methods"].values())
            note = f"{confirmed}/{len(plan['methods'])} answers confirmed at full depth"
    return Sample(wall, usage.ru_utime + usage.ru_stime, note)


def describe(values: list[float], interval: verdicts.Interval | None) -> str:
    spread = (f"{min(values):.1f} / {statistics.median(values):.1f} / {max(values):.1f}")
    return f"{spread}  95% {interval.format('.1f') if interval else '(none)'}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="each case once: a smoke run")
    parser.add_argument("--repeats", type=int, default=None,
                        help=f"processes per case (default {verdicts.MIN_REPEATS}; 1 --quick)")
    parser.add_argument("--cases", default="run,plan",
                        help="comma-separated, of run, plan and fsdp-plan")
    args = parser.parse_args(argv)
    repeats = args.repeats if args.repeats is not None else (
        1 if args.quick else verdicts.MIN_REPEATS)
    if repeats < 1:
        parser.error(f"--repeats must be at least 1, got {repeats}")
    names = [n.strip() for n in args.cases.split(",") if n.strip()]
    if not names or set(names) - set(CASES):
        parser.error(f"--cases: choose from {', '.join(CASES)}")
    cases = [CASES[n] for n in names]
    print(f"bench_speed: {repeats} process(es) per case, {os.cpu_count()} CPUs, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; load average at "
          f"start {os.getloadavg()[0]:.2f}")
    samples: dict[str, list[Sample]] = {case.name: [] for case in cases}
    for repeat in range(repeats):
        for case in cases:
            try:
                sample = run_case(case)
            except RuntimeError as error:
                print(f"error: {error}")
                return verdicts.EXIT_FAIL
            samples[case.name].append(sample)
            print(f"  {repeat + 1}/{repeats} {case.name}: measured {sample.wall_s:.1f} s wall, "
                  f"{sample.cpu_s:.1f} s CPU{'; ' + sample.note if sample.note else ''}",
                  flush=True)
    print(f"load average at end {os.getloadavg()[0]:.2f}")
    print()
    print("measured per process (imports included): min / median / max, and the 95% interval "
          "of the median")
    judgements = {}
    for case in cases:
        walls = [s.wall_s for s in samples[case.name]]
        cpus = [s.cpu_s for s in samples[case.name]]
        interval = verdicts.median_interval(walls)
        name = f"{case.name} wall <= {case.target_s:g} s"
        judgements[name] = verdicts.judge(interval, case.target_s, n=len(walls),
                                          unit="repeats", minimum=verdicts.MIN_REPEATS,
                                          quick=args.quick)
        print(f"paca-prof {' '.join(case.argv)}")
        print(f"  wall s   {describe(walls, interval)}   target <= {case.target_s:g} s: "
              f"{judgements[name]}")
        print(f"  CPU s    {describe(cpus, verdicts.median_interval(cpus))}   (reported, not "
              "judged)")
    print(verdicts.legend(verdicts.MIN_REPEATS, "repeats"))
    print(verdicts.summary(judgements))
    return verdicts.exit_status(judgements.values())


if __name__ == "__main__":
    sys.exit(main())
