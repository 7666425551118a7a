"""bench/verdicts.py: the intervals, verdict rule and exit statuses the benchmarks share.

Synthetic numbers only: these tests check the logic of a verdict, never a measured time.
"""

from __future__ import annotations

import math
import random
import statistics
import sys
from pathlib import Path

import pytest

# The bench scripts import it as a top-level module (they run as `python bench/X.py`).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import verdicts as v  # noqa: E402


def median_ratio(rounds):
    """Statistic of rounds of {"a": [...], "b": [...]}: median(b) / median(a)."""
    a = statistics.median(x for r in rounds for x in r["a"])
    b = statistics.median(x for r in rounds for x in r["b"])
    return {"b/a": b / a}


def loaded_rounds(n, ratio, seed=0):
    """Rounds whose load varies a lot from round to round (x1 to x3) and hits both cases of a
    round alike, with b exactly `ratio` times a within each round."""
    rng = random.Random(seed)
    rounds = []
    for _ in range(n):
        load = rng.uniform(1.0, 3.0)
        a = [load * rng.uniform(0.99, 1.01) for _ in range(3)]
        rounds.append({"a": a, "b": [ratio * x for x in a]})
    return rounds


# --- intervals ------------------------------------------------------------------------------


def test_quantile_interpolates_between_order_statistics():
    assert v.quantile([3.0, 1.0, 2.0, 4.0], 0.0) == 1.0
    assert v.quantile([3.0, 1.0, 2.0, 4.0], 1.0) == 4.0
    assert v.quantile([1.0, 2.0, 3.0, 4.0], 0.5) == pytest.approx(2.5)
    assert v.quantile([0.0, 10.0], 0.25) == pytest.approx(2.5)
    with pytest.raises(ValueError):
        v.quantile([], 0.5)
    with pytest.raises(ValueError):
        v.quantile([1.0], 1.5)


def test_percentile_interval_is_the_central_95_percent():
    values = [float(i) for i in range(1001)]  # 0 .. 1000
    interval = v.percentile_interval(values)
    assert interval.low == pytest.approx(25.0)
    assert interval.high == pytest.approx(975.0)
    nan = v.percentile_interval([1.0, math.nan, 2.0])
    assert math.isnan(nan.low) and math.isnan(nan.high)


def test_bootstrap_resamples_whole_rounds_so_paired_cases_cancel_the_load():
    rounds = loaded_rounds(30, 1.1)
    paired = v.bootstrap_intervals(rounds, median_ratio, resamples=500)["b/a"]
    # Every resample draws whole rounds, so median(b) = 1.1 * median(a) in each one.
    assert paired.low == pytest.approx(1.1, rel=1e-12)
    assert paired.high == pytest.approx(1.1, rel=1e-12)

    # The same cases with the pairing broken (b's load taken from another round): wide.
    shuffled = [r["b"] for r in rounds]
    random.Random(1).shuffle(shuffled)
    unpaired = [{"a": r["a"], "b": b} for r, b in zip(rounds, shuffled)]
    loose = v.bootstrap_intervals(unpaired, median_ratio, resamples=500)["b/a"]
    assert loose.high - loose.low > 0.1


def test_bootstrap_passes_whole_rounds_to_the_statistic():
    rounds = loaded_rounds(10, 1.0)
    seen = []

    def record(sample):
        seen.append(sample)
        return {"n": float(len(sample))}

    intervals = v.bootstrap_intervals(rounds, record, resamples=50)
    assert intervals["n"] == v.Interval(10.0, 10.0)
    assert len(seen) == 50
    ids = {id(r) for r in rounds}
    assert all(id(r) in ids for sample in seen for r in sample)  # the round objects themselves
    assert len({tuple(map(id, sample)) for sample in seen}) > 1  # drawn with replacement


def test_bootstrap_interval_contains_the_statistic_and_narrows_with_rounds():
    rng = random.Random(3)

    def noisy(n):
        return [{"a": [rng.gauss(10, 1)], "b": [rng.gauss(12, 1)]} for _ in range(n)]

    few, many = noisy(12), noisy(400)
    few_iv = v.bootstrap_intervals(few, median_ratio, resamples=400)["b/a"]
    many_iv = v.bootstrap_intervals(many, median_ratio, resamples=400)["b/a"]
    for rounds, iv in ((few, few_iv), (many, many_iv)):
        assert iv.low <= median_ratio(rounds)["b/a"] <= iv.high
    assert many_iv.high - many_iv.low < few_iv.high - few_iv.low
    assert many_iv.low < 1.2 < many_iv.high  # the true ratio, 12/10


def test_bootstrap_is_deterministic_for_a_seed():
    rng = random.Random(5)
    rounds = [{"a": [rng.gauss(10, 1)], "b": [rng.gauss(11, 1)]} for _ in range(20)]
    first = v.bootstrap_intervals(rounds, median_ratio, resamples=300, seed=7)
    again = v.bootstrap_intervals(rounds, median_ratio, resamples=300, seed=7)
    other = v.bootstrap_intervals(rounds, median_ratio, resamples=300, seed=8)
    assert first == again
    assert first != other


def test_bootstrap_rejects_empty_input():
    with pytest.raises(ValueError):
        v.bootstrap_intervals([], median_ratio)
    with pytest.raises(ValueError):
        v.bootstrap_intervals([{"a": [1.0], "b": [1.0]}], median_ratio, resamples=0)


def test_median_coverage_is_the_binomial_one():
    # [x(2), x(9)] of 10: misses when 0 or 1 of 10 fall below the median (or above).
    assert v.median_coverage(10, 2) == pytest.approx(1 - 2 * (1 + 10) / 2**10)
    assert v.median_coverage(5, 1) == pytest.approx(1 - 2 / 2**5)
    with pytest.raises(ValueError):
        v.median_coverage(5, 4)


def test_minimums_follow_from_the_order_statistic_interval():
    # MIN_REPEATS: the first n with any 95% interval of a median (the range).
    assert v.median_rank(v.MIN_REPEATS - 1) == 0
    assert v.median_rank(v.MIN_REPEATS) == 1
    # MIN_ROUNDS: the first n whose 95% interval leaves out the extreme value at each end.
    assert v.median_rank(v.MIN_ROUNDS - 1) == 1
    assert v.median_rank(v.MIN_ROUNDS) == 2


def test_median_interval():
    assert v.median_interval([5.0, 1.0, 3.0, 2.0, 4.0]) is None  # 5 repeats: none exists
    assert v.median_interval([6.0, 1.0, 3.0, 2.0, 4.0, 5.0]) == v.Interval(1.0, 6.0)
    nine = [float(i) for i in range(9, 0, -1)]
    assert v.median_interval(nine) == v.Interval(2.0, 8.0)


# --- the verdict rule -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "low, high, expected",
    [
        (0.80, 0.84, v.PASS),
        (0.80, 0.85, v.PASS),  # at most the limit: the end may touch it
        (0.84, 0.86, v.INCONCLUSIVE),  # the median may be under, the interval is not
        (0.85, 0.90, v.INCONCLUSIVE),
        (0.851, 0.90, v.FAIL),
        (math.nan, math.nan, v.INCONCLUSIVE),
    ],
)
def test_verdict_comes_from_the_far_end_of_the_interval(low, high, expected):
    assert v.verdict(v.Interval(low, high), 0.85) == expected


def test_judge_gives_no_verdict_for_quick_runs_and_few_rounds():
    beyond = v.Interval(2.0, 3.0)
    quick = v.judge(beyond, 1.0, n=100, minimum=v.MIN_ROUNDS, quick=True)
    assert quick.verdict == v.NO_VERDICT and "--quick" in quick.reason
    few = v.judge(beyond, 1.0, n=v.MIN_ROUNDS - 1, minimum=v.MIN_ROUNDS)
    assert few.verdict == v.NO_VERDICT and str(v.MIN_ROUNDS) in few.reason
    assert str(few).startswith("no verdict: ")
    assert v.judge(None, 1.0, n=10, minimum=6).verdict == v.NO_VERDICT
    assert v.judge(beyond, 1.0, n=v.MIN_ROUNDS, minimum=v.MIN_ROUNDS).verdict == v.FAIL
    assert v.judge(v.Interval(0.1, 0.2), 1.0, n=50, minimum=v.MIN_ROUNDS).verdict == v.PASS


def test_exit_status():
    passed, failed = v.Judgement(v.PASS), v.Judgement(v.FAIL)
    unsure, skipped = v.Judgement(v.INCONCLUSIVE), v.not_checked("needs authors")
    smoke = v.Judgement(v.NO_VERDICT, "--quick is a smoke run")
    assert v.exit_status([]) == v.EXIT_OK == 0
    assert v.exit_status([passed, skipped, smoke]) == 0
    assert v.exit_status([passed, unsure]) == v.EXIT_INCONCLUSIVE == 3
    assert v.exit_status([unsure, failed, passed]) == v.EXIT_FAIL == 1
    assert v.exit_status([skipped, failed]) == 1  # a subset run that fails still fails


def test_summary_names_every_target_that_did_not_pass():
    line = v.summary({
        "paca/lora": v.Judgement(v.PASS),
        "paca/authors": v.not_checked("needs authors"),
        "ratio": v.Judgement(v.FAIL),
    })
    assert "1 PASS" in line
    assert "FAIL: ratio" in line
    assert "not checked: paca/authors" in line
    assert v.summary({}) == "targets: none"
