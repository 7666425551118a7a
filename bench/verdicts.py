"""What a benchmark in bench/ may claim: intervals, the verdict rule and exit statuses.

Every target here is an upper limit on a measured quantity (a ratio, seconds, bytes). A
benchmark never judges a target from a point estimate (a median can sit under the limit while
the run shows nothing of the kind); it judges from the far ends of a 95% interval:

    PASS          the whole interval is within the target (high end <= limit)
    FAIL          the whole interval is beyond the target (low end > limit)
    INCONCLUSIVE  the interval straddles the limit: the run cannot tell; measure longer or on a
                  quieter machine

and it gives no verdict at all when the sample is too small for a 95% interval to mean
anything: a --quick smoke run, or fewer rounds (or repeats) than the minimums below. A target
whose inputs were not all measured (a --methods subset) is "not checked", never PASS.

Two intervals, for two kinds of sample:

- `bootstrap_intervals`, for interleaved rounds (bench_step, bench_overhead): each round measured
  every case once, in a shuffled order. The bootstrap resamples whole rounds, so the cases of one
  round stay paired and load that slows a whole round cancels in a ratio between its cases.
  Percentile interval, a fixed number of resamples, a seeded generator: the same numbers and
  seed give the same interval.
- `median_interval`, for independent repeats of one measurement (a fresh process each:
  bench_simulate, bench_plan): the distribution-free interval of the median between two order
  statistics, exact for any continuous distribution.

The minimums come from the same fact: among n independent observations, the number below the
true median is Binomial(n, 1/2), so [x(k), x(n+1-k)] (the k-th smallest to the k-th largest)
covers the median with probability 1 - 2 P(Binomial(n, 1/2) <= k - 1).

- MIN_REPEATS = 6: the smallest n for which any 95% interval of a median exists (the range,
  k = 1, covers it with 1 - 2/2**6 = 96.9%; with 5 repeats even the range covers only 93.8%).
- MIN_ROUNDS = 9: the smallest n whose exact 95% interval leaves out the single most extreme
  observation at each end (k = 2: 1 - 2 * 10/2**9 = 96.1%). The percentile bootstrap is
  narrower than the exact interval at small n (it undercovers), so it gets at least the number
  of rounds at which one disturbed round (another process's time slice) cannot by itself set
  the far end of the exact interval.

Exit statuses, the same for every script (argparse's 2 stays a usage error):

    0  no target FAILED and none was INCONCLUSIVE (including runs that judged nothing:
       smoke runs, report-only configs, targets not checked; the summary line says which)
    1  at least one target FAILED
    3  none FAILED, at least one INCONCLUSIVE
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

LEVEL = 0.95
MIN_ROUNDS = 9
MIN_REPEATS = 6
RESAMPLES = 2000

PASS = "PASS"
FAIL = "FAIL"
INCONCLUSIVE = "INCONCLUSIVE"
NO_VERDICT = "no verdict"
NOT_CHECKED = "not checked"

EXIT_OK = 0
EXIT_FAIL = 1
EXIT_INCONCLUSIVE = 3

Round = TypeVar("Round")


@dataclass(frozen=True)
class Interval:
    """A closed interval [low, high]; NaN ends mean the data could not bound it."""

    low: float
    high: float

    def format(self, spec: str = ".3f") -> str:
        return f"[{self.low:{spec}}, {self.high:{spec}}]"


@dataclass(frozen=True)
class Judgement:
    """A target's outcome: one of PASS, FAIL, INCONCLUSIVE, NO_VERDICT, NOT_CHECKED, and why
    (empty for PASS/FAIL/INCONCLUSIVE, whose reason is the interval printed beside them)."""

    verdict: str
    reason: str = ""

    def __str__(self) -> str:
        return f"{self.verdict}: {self.reason}" if self.reason else self.verdict


# --------------------------------------------------------------------------------------------
# Intervals.
# --------------------------------------------------------------------------------------------


def quantile(values: Iterable[float], q: float) -> float:
    """The q-quantile (0 <= q <= 1) of values, interpolated linearly between order statistics."""
    xs = sorted(values)
    if not xs:
        raise ValueError("quantile of no values")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile q must be within [0, 1], got {q}")
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def percentile_interval(values: Sequence[float], level: float = LEVEL) -> Interval:
    """The central `level` interval of values (e.g. bootstrap draws). NaN in, NaN ends out."""
    if any(math.isnan(v) for v in values):
        return Interval(math.nan, math.nan)
    tail = (1.0 - level) / 2.0
    return Interval(quantile(values, tail), quantile(values, 1.0 - tail))


def bootstrap_intervals(
    rounds: Sequence[Round],
    statistic: Callable[[Sequence[Round]], Mapping[str, float]],
    *,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    seed: int = 0,
) -> dict[str, Interval]:
    """Percentile bootstrap interval of every value `statistic` computes from a list of rounds.

    Each resample draws len(rounds) whole rounds with replacement and passes them to
    `statistic`, which returns named values (e.g. ratios of per-method medians). Because whole
    rounds are drawn, everything measured in one round stays together: that pairing is what
    interleaving buys. Deterministic for a given seed. Limits: a percentile interval, which
    undercovers for few rounds (hence MIN_ROUNDS); a statistic undefined on some resample
    (division by zero) must return NaN, which makes that interval NaN.
    """
    if not rounds:
        raise ValueError("bootstrap of no rounds")
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    rng = random.Random(seed)
    n = len(rounds)
    draws: dict[str, list[float]] = {}
    for _ in range(resamples):
        sample = [rounds[rng.randrange(n)] for _ in range(n)]
        for name, value in statistic(sample).items():
            draws.setdefault(name, []).append(value)
    return {name: percentile_interval(values, level) for name, values in draws.items()}


def median_coverage(n: int, k: int) -> float:
    """Probability that [x(k), x(n+1-k)] of n independent observations covers their median."""
    if not 1 <= k <= (n + 1) // 2:
        raise ValueError(f"order statistic k={k} out of range for n={n}")
    below = sum(math.comb(n, i) for i in range(k)) / 2**n  # P(Binomial(n, 1/2) <= k - 1)
    return 1.0 - 2.0 * below


def median_rank(n: int, level: float = LEVEL) -> int:
    """The largest k with median_coverage(n, k) >= level; 0 when even the range falls short."""
    best = 0
    for k in range(1, (n + 1) // 2 + 1):
        if median_coverage(n, k) < level:
            break
        best = k
    return best


def median_interval(values: Sequence[float], level: float = LEVEL) -> Interval | None:
    """Distribution-free `level` interval of the median of independent repeats, or None when
    there are too few of them for one to exist (fewer than MIN_REPEATS at 95%)."""
    k = median_rank(len(values), level)
    if k == 0:
        return None
    xs = sorted(values)
    return Interval(xs[k - 1], xs[len(xs) - k])


# --------------------------------------------------------------------------------------------
# Verdicts.
# --------------------------------------------------------------------------------------------


def verdict(interval: Interval, limit: float) -> str:
    """PASS when the whole interval is at most `limit`, FAIL when all of it is above, else
    INCONCLUSIVE (also for an interval with a NaN end)."""
    if interval.high <= limit:
        return PASS
    if interval.low > limit:
        return FAIL
    return INCONCLUSIVE


def judge(
    interval: Interval | None,
    limit: float,
    *,
    n: int,
    minimum: int,
    quick: bool = False,
    unit: str = "rounds",
) -> Judgement:
    """The verdict on target `value <= limit`, or no verdict when the sample cannot carry one:
    under --quick (a smoke run), with fewer than `minimum` rounds or repeats (`n` of them,
    `unit` names them in the reason), or without an interval."""
    if quick:
        return Judgement(NO_VERDICT, "--quick is a smoke run")
    if n < minimum:
        return Judgement(NO_VERDICT, f"{n} {unit}, fewer than the {minimum} a verdict needs")
    if interval is None:
        return Judgement(NO_VERDICT, "no interval")
    return Judgement(verdict(interval, limit))


def legend(minimum: int, unit: str = "rounds") -> str:
    """The line a benchmark prints under its verdicts: how they are reached."""
    return ("(verdict: PASS when the whole 95% interval is within the target, FAIL when all of"
            " it is beyond, INCONCLUSIVE otherwise; no verdict under --quick or with fewer than"
            f" {minimum} {unit}: see bench/verdicts.py)")


def not_checked(reason: str) -> Judgement:
    return Judgement(NOT_CHECKED, reason)


def exit_status(judgements: Iterable[Judgement]) -> int:
    """1 if any FAILED, else 3 if any was INCONCLUSIVE, else 0."""
    verdicts = {j.verdict for j in judgements}
    if FAIL in verdicts:
        return EXIT_FAIL
    if INCONCLUSIVE in verdicts:
        return EXIT_INCONCLUSIVE
    return EXIT_OK


def summary(judgements: Mapping[str, Judgement]) -> str:
    """One line: how many targets got each verdict, naming the ones that did not PASS."""
    if not judgements:
        return "targets: none"
    order = (FAIL, INCONCLUSIVE, NO_VERDICT, NOT_CHECKED, PASS)
    parts = []
    for kind in order:
        names = [name for name, j in judgements.items() if j.verdict == kind]
        if not names:
            continue
        parts.append(f"{len(names)} {kind}" if kind == PASS else f"{kind}: {', '.join(names)}")
    return f"targets ({len(judgements)}): " + "; ".join(parts)
