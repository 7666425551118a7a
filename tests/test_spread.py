"""paca_prof/spread.py and throughput.py: the statistics of measured steps, on made-up steps
(no timing here): quartiles, bootstrap intervals over whole rounds, the warning rule."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from paca_prof import spread
from paca_prof.throughput import peak_tflops, throughput


def _steps(times: dict[str, list[float]]) -> pd.DataFrame:
    rows = []
    for method, values in times.items():
        for i, value in enumerate(values):
            rows.append({"method": method, "round": i, "step": i, "step_ms": value})
    return pd.DataFrame(rows)


def test_a_clear_ratio_has_a_tight_interval_and_no_warning():
    rng = np.random.default_rng(1)
    lora = list(100 + rng.normal(0, 1, 20))
    paca = list(80 + rng.normal(0, 1, 20))
    stats = spread.step_stats(_steps({"lora": lora, "paca": paca})).set_index("method")
    row = stats.loc["paca"]
    assert row["step_ratio"] == pytest.approx(np.median(paca) / np.median(lora))
    assert row["step_ratio_lo"] < row["step_ratio"] < row["step_ratio_hi"] < 1
    assert row["step_ratio_hi"] - row["step_ratio_lo"] < 0.05
    assert row["spread_warning"] == "" and stats.loc["lora", "spread_warning"] == ""
    assert row["steps_timed"] == 20
    assert row["step_ms_p25"] == pytest.approx(np.percentile(paca, 25))


def test_an_interval_that_contains_one_is_flagged():
    rng = np.random.default_rng(2)
    lora = list(100 + rng.normal(0, 8, 12))
    same = list(100 + rng.normal(0, 8, 12))
    stats = spread.step_stats(_steps({"lora": lora, "dora": same})).set_index("method")
    row = stats.loc["dora"]
    assert row["step_ratio_lo"] <= 1 <= row["step_ratio_hi"]
    assert "contains 1" in row["spread_warning"]
    assert spread.interval_contains_one(row["step_ratio_lo"], row["step_ratio_hi"])
    assert not spread.interval_contains_one(float("nan"), 2.0)


def test_a_wide_spread_and_few_rounds_are_flagged():
    wide = spread.step_stats(_steps({"lora": [50, 100, 150, 100, 60, 140]}))
    assert "IQR/median" in wide["spread_warning"].iloc[0]
    few = spread.step_stats(_steps({"lora": [100, 101], "paca": [80, 81]}))
    assert all("only 2 round(s)" in w for w in few["spread_warning"])


def test_the_bootstrap_resamples_whole_rounds():
    """A load burst that hits both methods in the same round cancels in the ratio: with
    rounds resampled whole, the interval stays tight although each method's own spread is
    wide (pairs broken apart would widen it)."""
    load = [1, 1, 3, 1, 1, 3, 1, 1, 3, 1, 1, 3]
    lora = {i: [100.0 * f] for i, f in enumerate(load)}
    paca = {i: [80.0 * f] for i, f in enumerate(load)}
    ratio, lo, hi = spread.ratio_interval(paca, lora)
    assert ratio == pytest.approx(0.8) and lo == pytest.approx(0.8) and hi == pytest.approx(0.8)
    assert spread.ratio_interval({}, lora)[0] != spread.ratio_interval({}, lora)[0]  # NaN


def test_no_baseline_no_ratio():
    stats = spread.step_stats(_steps({"paca": [1.0, 1.0, 1.0]}))
    assert math.isnan(stats["step_ratio"].iloc[0])
    assert spread.step_stats(pd.DataFrame()).empty


def test_throughput():
    from paca_prof.gpus import GPUS

    row = throughput(step_ms=500.0, tokens=1000, flops=2e12, peak=8.0)
    assert row == {"tokens_per_s": 2000.0, "step_tflop": 2.0, "achieved_tflops": 4.0,
                   "mfu": 0.5}
    assert math.isnan(throughput(float("nan"), 10, 1.0, 1.0)["tokens_per_s"])
    assert math.isnan(throughput(10.0, 10, 1e12, None)["mfu"])
    assert peak_tflops(GPUS["h100-80gb"], "bf16") == 989.0
    assert peak_tflops(GPUS["h100-80gb"], "fp32") == 67.0 and peak_tflops(None, "bf16") is None
