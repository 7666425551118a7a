"""The timing benchmarks run end to end on the code they measure: bench_overhead and
bench_attribution call engines.measure.timing_pass, whose signature moved once without them
(they raised TypeError on the first step). Here each runs its --quick smoke mode on a small
model, in process: it must finish, judge nothing (no verdict under --quick) and exit 0. No
time is asserted; the benchmarks' numbers are theirs to judge (bench/verdicts.py)."""

from __future__ import annotations

import importlib.util
import math
import sys

import pytest
import torch
from conftest import ROOT


def _bench(name: str, monkeypatch):
    """bench/<name>.py as a module, its folder on sys.path as when it is run."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_bench_overhead_quick_runs_every_method_and_judges_nothing(monkeypatch, capsys,
                                                                   one_thread):
    bench = _bench("bench_overhead", monkeypatch)
    status = bench.main(["--quick", "--hidden", "128", "--layers", "1", "--seq", "16",
                         "--batch", "1", "--rounds", "1"])
    printed = capsys.readouterr().out
    assert status == 0, printed
    last = printed.strip().splitlines()[-1]
    assert last == ("targets (5): no verdict: " + ", ".join(bench.METHODS)), last
    for method in bench.METHODS:
        row = [line for line in printed.splitlines() if line.startswith(f"{method} ")]
        assert len(row) == 1 and row[0].endswith("no verdict: --quick is a smoke run"), row


def test_bench_overhead_instrumented_case_is_one_timing_pass(monkeypatch, one_thread):
    from paca_prof.engines.measure import Timing

    bench = _bench("bench_overhead", monkeypatch)
    args = bench.argparse.Namespace(hidden=128, layers=1, seq=16, batch=1)
    cases = bench.prepare_cases(args, "lora")
    assert set(cases) == set(bench.CASES)
    timing = cases["instrumented"]()
    assert isinstance(timing, Timing) and len(timing.per_step) == 1
    assert timing.warmup_steps == 0  # the case is one step, no warm-up inside it


def test_bench_attribution_quick_gives_a_share_per_method_and_judges_nothing(
        monkeypatch, capsys, one_thread):
    bench = _bench("bench_attribution", monkeypatch)
    share = bench.prepare_step("paca", seq=8, batch=1)()
    # the decoder layers' scopes nest inside the forward and backward phases on one clock
    assert math.isfinite(share) and 0 < share <= 1, share
    status = bench.main(["--quick", "--seq", "8", "--batch", "1", "--rounds", "1"])
    printed = capsys.readouterr().out
    assert status == 0, printed
    assert printed.strip().splitlines()[-1] == (
        "targets (5): no verdict: " + ", ".join(bench.METHODS))
