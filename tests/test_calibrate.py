"""paca-prof calibrate: the spec it fits loads as --gpu reads it, and a run projects onto it.
No test here compares a projected time with a measured one: a shared machine moves every
measured number (issue 17: no test asserts a ratio of timings). bench/bench_calibrate.py judges
that accuracy against its targets (20%, 0.05, 25%)."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from paca_prof import trace
from paca_prof.gpus import load_spec


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """A quick calibration of this CPU on one thread (the shared measured run's)."""
    from paca_prof.calibrate import calibrate
    from paca_prof.gpus import write_spec

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = calibrate("cpu", quick=True, budget_s=5)
    finally:
        torch.set_num_threads(threads)
    path = write_spec(result.spec, tmp_path_factory.mktemp("spec") / "cpu.yaml")
    return result, path


def test_the_spec_loads_and_its_numbers_are_measured(calibrated):
    result, path = calibrated
    spec = load_spec(path)
    assert spec == result.spec
    assert spec.fp32_tflops == pytest.approx(max(r["tflops"] for r in result.gemm
                                                 if r["dtype"] == "fp32"), rel=1e-4)
    assert 0 < spec.matmul_efficiency <= 1 and 0 < spec.attention_efficiency <= 1
    assert spec.hbm_gbps > 0 and spec.dispatch_us == 0
    assert spec.foreach_tensor_us >= 0 and spec.launch_us >= 0 and spec.forward_op_us >= 0
    assert spec.launch_us + spec.forward_op_us + spec.module_call_us > 0  # eager costs time
    assert spec.module_call_us == pytest.approx(result.overhead["module_call_us"], abs=1e-3)
    assert spec.forward_op_us == pytest.approx(result.overhead["forward_op_us"], abs=1e-3)
    assert [(r["method"], r["phase"]) for r in result.overhead["steps"]] == [
        (m, p) for m in ("frozen", "lora", "paca") for p in ("forward", "backward")]
    assert {r["dtype"] for r in result.gemm} == {"fp32", "bf16"}
    assert "calibrate" in spec.source and "1 torch thread" in spec.source


def test_the_spec_has_rate_curves_by_size(calibrated):
    """matmul_curve: one point per fp32 GEMM size timed, its efficiency over the fp32 peak
    (GEMMs of equal size merged by their median); bandwidth_curve: sizes among those timed,
    the largest one's rate is hbm_gbps; both after the bare calls' costs were taken off."""
    result, _ = calibrated
    spec = result.spec
    fp32_sizes = {r["flops"] for r in result.gemm if r["dtype"] == "fp32"}
    assert [size for size, _ in spec.matmul_curve] == sorted(fp32_sizes)
    assert all(0 < rate <= 1 for _, rate in spec.matmul_curve)
    for size, rate in spec.matmul_curve:  # the median of that size's GEMMs, over the peak
        rates = [r["tflops"] for r in result.gemm if r["dtype"] == "fp32" and r["flops"] == size]
        assert rate == pytest.approx(statistics.median(rates) / spec.fp32_tflops, rel=1e-3)
    assert 1 <= len(spec.bandwidth_curve) <= len(result.bandwidth)
    assert spec.hbm_gbps > 0
    assert spec.hbm_gbps == pytest.approx(spec.bandwidth_curve[-1][1], rel=1e-3)
    assert {r["bytes"] for r in result.bandwidth} >= {size for size, _ in spec.bandwidth_curve}
    assert result.bare_us["mm"] > 0 and result.bare_us["add"] > 0
    # adds with an operand read transposed: sizes among those timed, both orientations of a
    # shape merged into one point
    sizes = [size for size, _ in spec.mixed_layout_bandwidth_curve]
    assert set(sizes) <= {r["bytes"] for r in result.mixed_layout}
    assert len(result.mixed_layout) > len(sizes) >= 2
    assert all(rate > 0 for _, rate in spec.mixed_layout_bandwidth_curve)


def test_the_measured_run_projects_onto_the_calibrated_cpu(calibrated, measured_trace):
    """The shared measured run's spec (tiny, 2 x 128, fp32) projected onto the spec calibrated
    here: every measured method gets a projected step, and the projection's source and GPU are
    recorded. How close it comes to the measured times is bench_calibrate's to judge."""
    from conftest import MEASURED_RUN, run_spec

    from paca_prof import engines

    _, path = calibrated
    run = measured_trace.run
    spec = run_spec(model="tiny", seq=run["seq"], batch=run["batch"], dtype="fp32",
                    device="meta", methods=tuple(measured_trace.methods))
    out = engines.run(spec, path.parent / "projected", "pytest", gpu=load_spec(path))
    projected = trace.load(out)
    assert projected.run["sources"]["time"] == "projected"
    assert projected.run["gpu"]["name"] == "calibrated-cpu"
    steps = projected.summary.set_index("method")["step_ms"]
    assert list(steps.index) == list(measured_trace.methods)
    assert (steps > 0).all() and steps.map(math.isfinite).all(), steps
    assert MEASURED_RUN["dtype"] == "fp32"


def test_calibrate_writes_the_spec_and_run_projects_onto_it(capsys, tmp_path, calibrated):
    """The command: --out writes a spec that run --device meta --gpu reads."""
    from paca_prof.cli import main

    _, path = calibrated
    out = tmp_path / "run"
    assert main(["run", "--model", "tiny", "--device", "meta", "--seq", "32", "--methods",
                 "lora,paca", "--gpu", str(path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "throughput (projected): MFU against calibrated-cpu's peak" in printed
    assert (trace.load(out).summary["step_ms"] > 0).all()


def test_foreach_ops_pay_per_tensor_and_in_place_writes_count():
    """The cost model's foreach rule: a foreach op costs foreach_tensor_us per input tensor
    beside its bytes; simulation counts an in-place foreach op's writes."""
    import pandas as pd

    from paca_prof.engines.project import kernel_times_us
    from paca_prof.engines.simulate import _written_in_place
    from paca_prof.gpus import GPUS
    from dataclasses import replace

    ops = pd.DataFrame({"name": ["aten::_foreach_add_", "aten::add"],
                        "shapes": ["[[4], [4], [4], [4]]", "[[4], [4]]"],
                        "dtype": ["float32", "float32"], "flops": [0.0, 0.0],
                        "bytes": [64.0, 32.0]})
    base = replace(GPUS["h100-80gb"], launch_us=1.0)
    plain = kernel_times_us(ops, base)
    per_tensor = kernel_times_us(ops, replace(base, foreach_tensor_us=2.0))
    assert per_tensor[0] == pytest.approx(plain[0] + 4 * 2.0)
    assert per_tensor[1] == pytest.approx(plain[1])
    xs = [torch.ones(3), torch.ones(5)]
    assert _written_in_place("aten::_foreach_mul_", (xs, 2.0), None) == 32
    assert _written_in_place("aten::_foreach_mul", (xs, 2.0), xs) == 0


def test_the_overhead_fit_recovers_per_op_forward_and_per_module_costs():
    """Steps made from known costs (10 us per op, 40 more per forward op, 30 per module
    entered) give them back; where the data would make one cost negative, it is 0 and the
    others are fitted alone."""
    from paca_prof.calibrate import fit_nonnegative

    columns = ("ops", "forward_ops", "entries")
    counts = [(93, 35, "forward"), (131, 30, "backward"), (149, 105, "forward"),
              (191, 96, "backward"), (107, 35, "forward"), (127, 29, "backward")]
    rows = [{"ops": n, "forward_ops": n if phase == "forward" else 0, "entries": e,
             "measured_us": 10.0 * n + (40.0 * n if phase == "forward" else 0) + 30.0 * e}
            for n, e, phase in counts]
    assert fit_nonnegative(rows, columns) == pytest.approx(
        {"ops": 10.0, "forward_ops": 40.0, "entries": 30.0})
    # more entries made the steps faster: no per-module cost, only a per-op one
    rows = [{"ops": 100, "entries": 10, "measured_us": 1000.0},
            {"ops": 100, "entries": 50, "measured_us": 900.0}]
    costs = fit_nonnegative(rows, ("ops", "entries"))
    assert costs["entries"] == 0.0 and 9.0 < costs["ops"] < 10.0


@pytest.mark.parametrize("element_bytes, sets", [(256, 16), (2**20, 2), (1, 64)])
def test_cold_timing_takes_turns_over_operand_sets_that_fill_the_pool(monkeypatch,
                                                                       element_bytes, sets):
    """Each timed call gets the next of `sets` distinct operand sets (COLD_POOL_BYTES of them,
    at least two, at most COLD_MAX_SETS), so no set is reused before all the others were."""
    from paca_prof import calibrate

    monkeypatch.setattr(calibrate, "COLD_POOL_BYTES", 4096)
    monkeypatch.setattr(calibrate, "COLD_MAX_SETS", 64)
    made, used = [], []

    def make():
        made.append(torch.empty(element_bytes, dtype=torch.uint8))
        return (made[-1],)

    us = calibrate._Timer("cpu", budget_s=1).cold_us(make, lambda t: used.append(id(t)),
                                                       target_s=0.001)
    # at least the warm-up, the sizing call and three samples, however long each took
    assert us > 0 and len(made) == sets and len(used) >= 5
    order = {id(t): i for i, t in enumerate(made)}
    assert [order[u] for u in used] == [i % sets for i in range(len(used))]
