"""The spread of measured step times: quantiles, bootstrap intervals of ratios, and the rule
that says when a ratio cannot be trusted. Torch-free: the engines write these numbers into the
summary, and the analyzer recomputes them from a trace's steps table alone.

A measured run times its methods in interleaved rounds (engines/measure.py): every round runs
one step of each method, in a shuffled order, so that a burst of load on a shared machine hits
every method alike. The statistics here follow from that design:

  - step_ms is the median over a method's timed steps, with its 25th and 75th percentiles;
  - the ratio of a method to the baseline (lora) is the ratio of their medians, and its 95%
    interval is a percentile bootstrap that resamples whole rounds (both methods' steps of a
    round together), which keeps what the load did to both;
  - a method is flagged (spread_warning) when its step times' IQR / median exceeds
    SPREAD_LIMIT, when its ratio's interval contains 1 (the run cannot tell it from lora), when
    that interval is wider than WIDTH_LIMIT of the ratio (it cannot resolve an effect of that
    size), or when there are fewer than MIN_ROUNDS rounds to resample.

Limits: percentile bootstrap intervals are approximate at a few rounds (the default 10 rounds
gives a usable but wide interval); rounds are taken as exchangeable, which a drifting load
breaks. The bootstrap is seeded, so a trace's numbers are reproducible from its steps table.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

BASELINE = "lora"
LEVEL = 0.95
RESAMPLES = 2000
SEED = 0
# IQR / median above this: step times too spread to trust (a quiet machine stays under 0.05;
# a loaded one with 2 shared cores reaches 0.2-0.4).
SPREAD_LIMIT = 0.25
# (hi - lo) / ratio above this: the interval cannot resolve the 10-20% effects (paca/lora is
# often 0.8-0.95) that a ratio here is read for.
WIDTH_LIMIT = 0.20
MIN_ROUNDS = 3  # fewer rounds than this: no interval worth the name

STAT_COLUMNS = ("step_ms", "step_ms_p25", "step_ms_p75", "steps_timed", "step_ratio",
                "step_ratio_lo", "step_ratio_hi", "spread_warning")


def quartiles(values) -> tuple[float, float, float]:
    """(p25, median, p75) of `values` (linear interpolation, numpy's default)."""
    p25, p50, p75 = np.percentile(np.asarray(values, dtype=float), [25, 50, 75])
    return float(p25), float(p50), float(p75)


def ratio_interval(a_by_round: dict[int, list[float]], b_by_round: dict[int, list[float]],
                   level: float = LEVEL, resamples: int = RESAMPLES,
                   seed: int = SEED) -> tuple[float, float, float]:
    """(ratio, lo, hi): median(a) / median(b) over the rounds both have, and its percentile
    bootstrap interval resampling whole rounds. NaN where they share no round; lo = hi =
    ratio with one shared round."""
    rounds = sorted(set(a_by_round) & set(b_by_round))
    if not rounds:
        return float("nan"), float("nan"), float("nan")
    a = [np.asarray(a_by_round[r], dtype=float) for r in rounds]
    b = [np.asarray(b_by_round[r], dtype=float) for r in rounds]
    ratio = float(np.median(np.concatenate(a)) / np.median(np.concatenate(b)))
    if len(rounds) == 1:
        return ratio, ratio, ratio
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(rounds), size=(resamples, len(rounds)))
    ratios = np.empty(resamples)
    for i, picks in enumerate(draws):
        ratios[i] = (np.median(np.concatenate([a[j] for j in picks]))
                     / np.median(np.concatenate([b[j] for j in picks])))
    tail = (1 - level) / 2
    lo, hi = np.quantile(ratios, [tail, 1 - tail])
    return ratio, float(lo), float(hi)


def relative_iqr(p25: float, median: float, p75: float) -> float:
    return (p75 - p25) / median if median > 0 else float("nan")


def step_stats(steps: pd.DataFrame, baseline: str = BASELINE) -> pd.DataFrame:
    """Per method of a steps table (method, round, step_ms): step_ms (median), step_ms_p25,
    step_ms_p75, steps_timed, and against `baseline` step_ratio with its interval
    (step_ratio_lo, step_ratio_hi) and spread_warning (text, "" when none). Methods keep their
    first-seen order; the ratio columns are NaN without a baseline."""
    rows = []
    if steps is None or steps.empty:
        return pd.DataFrame(columns=["method", *STAT_COLUMNS])
    by_method = {m: g for m, g in steps.groupby("method", sort=False)}
    rounds = {m: {int(r): list(map(float, s)) for r, s in g.groupby("round")["step_ms"]}
              for m, g in by_method.items()}
    for method, group in by_method.items():
        p25, median, p75 = quartiles(group["step_ms"])
        row = {"method": method, "step_ms": median, "step_ms_p25": p25, "step_ms_p75": p75,
               "steps_timed": int(len(group))}
        if baseline in by_method:
            ratio, lo, hi = ratio_interval(rounds[method], rounds[baseline])
        else:
            ratio = lo = hi = float("nan")
        row.update(step_ratio=ratio, step_ratio_lo=lo, step_ratio_hi=hi)
        row["spread_warning"] = warning(method, relative_iqr(p25, median, p75), ratio, lo, hi,
                                        len(rounds[method]), baseline)
        rows.append(row)
    return pd.DataFrame(rows)


def warning(method: str, iqr: float, ratio: float, lo: float, hi: float, n_rounds: int,
            baseline: str = BASELINE) -> str:
    """Why `method`'s step time or its ratio to the baseline cannot be trusted ("" when it
    can): the rule in the module docstring."""
    reasons = []
    if n_rounds < MIN_ROUNDS:
        reasons.append(f"only {n_rounds} round(s) timed (fewer than {MIN_ROUNDS}: no interval)")
    if iqr == iqr and iqr > SPREAD_LIMIT:
        reasons.append(f"IQR/median {iqr:.2f} > {SPREAD_LIMIT:.2f}")
    if method != baseline and n_rounds >= MIN_ROUNDS and lo == lo and hi == hi:
        if lo <= 1 <= hi:
            reasons.append(f"the {LEVEL:.0%} interval of the ratio to {baseline} "
                           f"[{lo:.2f}, {hi:.2f}] contains 1")
        elif ratio > 0 and (hi - lo) / ratio > WIDTH_LIMIT:
            reasons.append(f"the {LEVEL:.0%} interval of the ratio to {baseline} "
                           f"[{lo:.2f}, {hi:.2f}] is wider than {WIDTH_LIMIT:.0%} of it")
    return "; ".join(reasons)


def interval_contains_one(lo, hi) -> bool:
    """Whether a ratio's interval [lo, hi] contains 1 (False where either end is missing)."""
    try:
        lo, hi = float(lo), float(hi)
    except (TypeError, ValueError):
        return False
    return lo == lo and hi == hi and lo <= 1 <= hi
