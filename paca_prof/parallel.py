"""One job per method, side by side: forked worker processes, one per core.

A simulated run and a plan do the same work for each method, and the methods do not depend on
each other; on a 2-core machine two of them at a time halve the time after the imports. The
workers are forks of the calling process (multiprocessing's "fork" start method), so they
start with its imports (the caller's warm-up adds what the jobs would import on first use),
its model configs and the job itself; only the method's name goes to them and only its
result (pickled) comes back.

Each job's outcome (its value, or the exception it raised with the traceback formatted where it
was raised) comes back in the methods' order. The calling process prints nothing for a job;
it decides what to do with a failure as it would in one process.

Limits: where fork is unavailable (not Linux or macOS), inside a daemon process (a
multiprocessing worker cannot have children), for a single method or with PACA_PROF_JOBS=1,
the jobs run one after another in the calling process, with the same outcomes. A job's value
and error must pickle (an error that does not is replaced by a RuntimeError with its text).
Fork copies the calling process: only jobs that need no thread of it (the meta device's
simulations) belong here.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import pickle
import signal
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

JOBS_VARIABLE = "PACA_PROF_JOBS"


@dataclass
class Outcome:
    """What one method's job gave: its value, or the error it raised and that error's
    traceback (formatted in the process that raised it)."""

    method: str
    value: object = None
    error: BaseException | None = None
    traceback: str = ""


def jobs_wanted() -> int:
    """How many jobs may run at once: PACA_PROF_JOBS if set (a whole number from 1), else the
    cores this process may use. ValueError for a bad PACA_PROF_JOBS."""
    text = os.environ.get(JOBS_VARIABLE)
    if text is None:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
            else os.cpu_count() or 1
    if not text.strip().isdigit() or not 1 <= int(text) <= 1024:
        raise ValueError(f"{JOBS_VARIABLE} must be a whole number from 1 to 1024, got {text!r}")
    return int(text)


def run_methods(job: Callable[[str], object], methods: Sequence[str],
                started: Callable[[str], None] = lambda method: None,
                jobs: int | None = None,
                warm_up: Callable[[], None] = lambda: None) -> Iterator[Outcome]:
    """job(method) for each of `methods`, up to `jobs` (default jobs_wanted()) at a time in
    forked workers; yields each Outcome in the methods' order. `started(method)` is called as
    a method's job is handed out (in the calling process); `warm_up()` runs in the calling
    process before the workers are forked, to import what every job would otherwise import
    for itself. Stopping the iteration (or an interrupt) ends the workers."""
    jobs = min(jobs or jobs_wanted(), len(methods))
    if jobs <= 1 or not _can_fork():
        for method in methods:
            started(method)
            yield _outcome(job, method)
        return
    warm_up()  # what every job would import on first use, imported once, before the fork
    global _JOB
    _JOB = job  # the workers are forked from here and find it; nothing else needs to pickle
    # What the workers inherit stays out of their garbage collections, which would otherwise
    # touch, and so copy, every page of it (gc.freeze's documented use before fork). A caller
    # that had frozen objects of its own (the command's set-up, cli._setting_up) keeps them,
    # and what it made since, frozen: unfreezing would put them all back in its next full
    # collection.
    unfreeze = gc.get_freeze_count() == 0
    gc.freeze()
    try:
        with multiprocessing.get_context("fork").Pool(jobs, initializer=_quiet_worker) as pool:
            for method in methods[:jobs]:
                started(method)
            handed_out = jobs
            for outcome in pool.imap(_forked_outcome, methods):
                if handed_out < len(methods):  # a worker is free: it takes the next method
                    started(methods[handed_out])
                    handed_out += 1
                yield outcome
    finally:
        _JOB = None
        if unfreeze:
            gc.unfreeze()


_JOB: Callable[[str], object] | None = None


def _quiet_worker() -> None:
    """A worker leaves signals to the calling process, which ends the pool (terminate):
    Ctrl-C is ignored and SIGTERM/SIGHUP end it at once, with no traceback of its own."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


def _can_fork() -> bool:
    return ("fork" in multiprocessing.get_all_start_methods()
            and not multiprocessing.current_process().daemon)


def _forked_outcome(method: str) -> Outcome:
    outcome = _outcome(_JOB, method)
    try:
        pickle.dumps(outcome)
    except Exception:  # an error (or value) that cannot travel back: its text can
        outcome = Outcome(method, error=RuntimeError(str(outcome.error or outcome.value)),
                          traceback=outcome.traceback)
    return outcome


def _outcome(job: Callable[[str], object], method: str) -> Outcome:
    try:
        return Outcome(method, value=job(method))
    except Exception as error:
        return Outcome(method, error=error, traceback="".join(traceback.format_exception(error)))
