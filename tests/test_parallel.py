"""Methods side by side (paca_prof.parallel): outcomes in order, errors with the traceback of
where they were raised, the serial fallback, and the same simulated trace either way; and
bitsandbytes kept out of a run that does not use it (paca_prof.unused_imports)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import checkout_env, run_spec
from paca_prof import engines, parallel, trace
from paca_prof.unused_imports import needs_bitsandbytes

METHODS = ("a", "b", "c", "d")


def _square_or_fail(method: str):
    if method == "c":
        raise ValueError(f"no {method} here")
    return {"method": method, "pid": os.getpid()}


class _Unpicklable(Exception):
    def __init__(self):
        super().__init__("cannot travel")
        self.lock = __import__("threading").Lock()


def _unpicklable(method: str):
    raise _Unpicklable()


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_outcomes_come_in_the_methods_order_with_the_errors_traceback(jobs, monkeypatch):
    monkeypatch.setenv(parallel.JOBS_VARIABLE, jobs)
    started = []
    outcomes = list(parallel.run_methods(_square_or_fail, METHODS, started=started.append))
    assert [o.method for o in outcomes] == list(METHODS)
    assert started == list(METHODS)
    assert [o.value["method"] for o in outcomes if o.error is None] == ["a", "b", "d"]
    failed = outcomes[2]
    assert isinstance(failed.error, ValueError) and str(failed.error) == "no c here"
    assert "_square_or_fail" in failed.traceback and "ValueError: no c here" in failed.traceback
    pids = {o.value["pid"] for o in outcomes if o.error is None}
    assert (pids == {os.getpid()}) == (jobs == "1")  # forked workers when two may run


def test_an_error_that_cannot_travel_back_comes_as_its_text(monkeypatch):
    monkeypatch.setenv(parallel.JOBS_VARIABLE, "2")
    outcomes = list(parallel.run_methods(_unpicklable, ("a", "b")))
    assert all(isinstance(o.error, RuntimeError) and str(o.error) == "cannot travel"
               for o in outcomes)
    assert all("_Unpicklable" in o.traceback for o in outcomes)


def test_warm_up_runs_before_the_fork_and_the_workers_inherit_it(monkeypatch):
    monkeypatch.setenv(parallel.JOBS_VARIABLE, "2")
    box = {}
    outcomes = list(parallel.run_methods(lambda m: box.get("warm"), ("a", "b"),
                                         warm_up=lambda: box.update(warm=os.getpid())))
    assert [o.value for o in outcomes] == [os.getpid(), os.getpid()]


@pytest.mark.parametrize("bad", ["0", "-1", "two", "1.5", "", "99999"])
def test_a_bad_jobs_variable_is_refused(bad, monkeypatch):
    monkeypatch.setenv(parallel.JOBS_VARIABLE, bad)
    with pytest.raises(ValueError, match=parallel.JOBS_VARIABLE):
        parallel.jobs_wanted()


def test_a_bad_jobs_variable_is_one_line_and_exit_2(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "paca_prof", "run", "--model", "tiny", "--seq", "16",
         "--methods", "frozen,lora", "--device", "meta", "--out", str(tmp_path / "t")],
        env=checkout_env(**{parallel.JOBS_VARIABLE: "many"}), capture_output=True,
        text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if "paca-prof: error" in line]
    assert lines == [f"paca-prof: error: {parallel.JOBS_VARIABLE} must be a whole number from "
                     "1 to 1024, got 'many'"], done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "t").exists()


def test_a_simulated_run_side_by_side_equals_one_after_another(tmp_path, monkeypatch):
    spec = run_spec(model="tiny", seq=64, batch=1, device="meta",
                    methods=("frozen", "lora", "dora", "paca", "full"))
    tables = {}
    for jobs in ("1", "2"):
        monkeypatch.setenv(parallel.JOBS_VARIABLE, jobs)
        tables[jobs] = trace.load(engines.run(spec, tmp_path / jobs, "test"))
    for name in ("summary", "layers", "memory"):
        one, two = getattr(tables["1"], name), getattr(tables["2"], name)
        assert one.equals(two), name


def test_bitsandbytes_is_needed_only_by_4_bit_methods_and_8_bit_optimizers():
    assert not needs_bitsandbytes(("frozen", "lora", "dora", "paca", "full"), "adamw")
    assert needs_bitsandbytes(("lora", "qlora"), "adamw")
    assert needs_bitsandbytes(("qpaca",), "sgd")
    assert needs_bitsandbytes(("lora",), "adamw-8bit")
    assert needs_bitsandbytes(("paca",), "paged-adamw-8bit")


@pytest.mark.parametrize("entry, methods, state", [
    ("command", "lora,paca", "blocked"), ("command", "lora,qlora", "imported"),
    ("main", "lora,paca", "imported")])  # main() in a process that goes on changes nothing
def test_the_command_imports_bitsandbytes_only_when_it_uses_it(entry, methods, state,
                                                               tmp_path):
    """The run's process, seen from inside: bitsandbytes' module after a simulated run."""
    probe = ("import sys; sys.argv = ['paca-prof', 'run', '--model', 'tiny', '--seq', "
             f"'16', '--methods', '{methods}', '--device', 'meta', '--out', "
             f"'{tmp_path / 'trace'}']\n"
             f"from paca_prof.cli import {entry}\n"
             f"assert {entry}() == 0\n"
             "module = sys.modules.get('bitsandbytes', 'absent')\n"
             "print('blocked' if module is None else 'absent' if module == 'absent' "
             "else 'imported')")
    done = subprocess.run([sys.executable, "-c", probe], env=checkout_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == state
    summary = trace.load(tmp_path / "trace").summary
    assert (summary["status"] == "ok").all(), summary[["method", "error"]]
