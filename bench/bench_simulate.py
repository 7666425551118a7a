"""Benchmark: how long `paca-prof run` takes to simulate full-size models on this CPU.

Runs the real command in a subprocess (imports included) and reports its wall time and peak
resident memory as fractions of the targets: 30 s and 2 GiB for llama3-8b at seq 4096 with
every default method. Also runs llama3.1-70b at seq 8192. Not a test: the numbers depend on
the machine and its load; put them in closing notes.

    python bench/bench_simulate.py [--quick]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_S = 30.0
TARGET_RSS_GIB = 2.0
CASES = [("llama3-8b", 4096, None), ("llama3.1-70b", 8192, "lora,paca,qlora,qpaca")]


def run_case(model: str, seq: int, methods: str | None) -> tuple[float, float]:
    out = Path(tempfile.mkdtemp()) / "trace"
    command = [sys.executable, "-m", "paca_prof.cli", "run", "--model", model, "--seq", str(seq),
               "--out", str(out), "--json"]
    if methods:
        command += ["--methods", methods]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    wall = time.perf_counter() - start
    rss_gib = max(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, before) / 2**20
    return wall, rss_gib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="llama3-8b only")
    args = parser.parse_args()
    print(f"{'model':<14} {'seq':>6} {'wall s':>8} {'of 30 s':>8} {'max RSS GiB':>12} {'of 2 GiB':>9}")
    for model, seq, methods in CASES[:1] if args.quick else CASES:
        wall, rss = run_case(model, seq, methods)
        print(f"{model:<14} {seq:>6} {wall:>8.1f} {wall / TARGET_S:>8.2f} {rss:>12.2f} "
              f"{rss / TARGET_RSS_GIB:>9.2f}")


if __name__ == "__main__":
    main()
