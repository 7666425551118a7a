"""Benchmark: does the cost model, calibrated on this CPU, project what this CPU measures?

For each config: calibrates the CPU (paca_prof/calibrate.py), measures a run on the CPU
(engines.run, interleaved rounds), calibrates again, and projects the same config from a
simulated run on the meta device onto the first calibration with its host costs (per op, per
forward op, per module entered, per foreach tensor), peaks, bandwidth and rate curves
averaged with the second's. Bracketing the measurement so: the host costs of this shared
machine drift by tens of percent within a minute, and a calibration taken only before would
see one end of that. Prints the drift, and:
  - per method: measured and projected step time and the projection's error (target: within
    20%);
  - the paca/lora step ratio, measured (with its 95% interval) and projected (target: within
    0.05 of the measured);
  - per decoder layer, forward and backward: the projection's median and largest absolute
    error over the layers and methods (target: within 25%).
Configs: tiny (the preset: 2 layers, hidden 128; 2 x 128 tokens) and mid (4 layers, hidden 512,
intermediate 1376, vocabulary 4096; 1 x 256 tokens), fp32, one torch thread (the calibration's
and the runs'). Every time printed says measured or projected.

    python bench/bench_calibrate.py                  # calibrate, tiny and mid (~4-8 min)
    python bench/bench_calibrate.py --configs tiny   # tiny only
    python bench/bench_calibrate.py --spec cpu.yaml  # a spec calibrated before (no bracketing)
    python bench/bench_calibrate.py --quick          # quick calibration, 5 rounds

Verdicts by bench/verdicts.py, from the far ends of intervals: a step's |error| from the 95%
interval of the measured median (its timed steps as repeats, at least MIN_REPEATS), the
paca/lora difference from the measured ratio's 95% bootstrap interval. No verdict under
--quick. The per-layer errors have no interval (one value per layer and method): they are
compared with their target and printed as within / outside, not judged. Exit status by
verdicts.exit_status (1 on a FAIL, 3 when something is INCONCLUSIVE); 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import warnings
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
warnings.filterwarnings("ignore", category=FutureWarning)

import torch  # noqa: E402

import verdicts  # noqa: E402  (bench/verdicts.py: this script's folder is on sys.path)

from paca_prof import engines, trace  # noqa: E402
from paca_prof.calibrate import calibrate  # noqa: E402
from paca_prof.gpus import GpuSpec, load_spec, write_spec  # noqa: E402
from paca_prof.spec import RunSpec  # noqa: E402

METHODS = ("frozen", "lora", "dora", "paca", "full")
CONFIGS = {
    "tiny": dict(model="tiny", seq=128, batch=2),
    "mid": dict(model=dict(model_type="llama", vocab_size=4096, hidden_size=512,
                           intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                           num_key_value_heads=4, max_position_embeddings=4096),
                seq=256, batch=1),
}
STEP_TARGET, RATIO_TARGET, LAYER_TARGET = 0.20, 0.05, 0.25
HOST_COSTS = ("launch_us", "forward_op_us", "module_call_us", "foreach_tensor_us")
RATES = ("fp32_tflops", "bf16_tflops", "fp16_tflops", "hbm_gbps")
CURVES = ("matmul_curve", "bandwidth_curve", "mixed_layout_bandwidth_curve")


def _measure(name: str, steps: int, workdir: Path) -> trace.Trace:
    measured = engines.run(
        RunSpec(**CONFIGS[name], dtype="fp32", device="cpu", methods=METHODS, steps=steps,
                warmup=2), workdir / f"{name}-measured", "bench_calibrate")
    return trace.load(measured)


def _project(name: str, spec_yaml: Path, workdir: Path) -> trace.Trace:
    projected = engines.run(
        RunSpec(**CONFIGS[name], dtype="fp32", device="meta", methods=METHODS),
        workdir / f"{name}-projected", "bench_calibrate", gpu=load_spec(spec_yaml))
    return trace.load(projected)


def _bracketed(before: GpuSpec, after: GpuSpec) -> GpuSpec:
    """`before` with its host costs (per op, per forward op, per module entered, per foreach
    tensor), peaks, bandwidth and curves averaged with `after`'s: the calibrations taken just
    before and just after the measured run, so that a machine whose speed drifts meanwhile
    (shared, or throttled) is seen at both ends of the measurement, not at one. A curve is
    averaged point by point where both calibrations timed the same sizes."""
    mean = {name: round((getattr(before, name) + getattr(after, name)) / 2, 6)
            for name in HOST_COSTS + RATES}
    for name in CURVES:
        first, second = getattr(before, name), getattr(after, name)
        if [x for x, _ in first] == [x for x, _ in second]:
            mean[name] = tuple((x, round((y + z) / 2, 6))
                               for (x, y), (_, z) in zip(first, second))
    return replace(before, **mean)


def _describe(spec: GpuSpec) -> str:
    return (f"per-op {spec.launch_us:.1f} us (+{spec.forward_op_us:.1f} forward), per module "
            f"entered {spec.module_call_us:.1f} us, foreach {spec.foreach_tensor_us:.1f} "
            f"us/tensor")


def _layer_errors(measured: trace.Trace, projected: trace.Trace) -> dict[str, list[float]]:
    errors: dict[str, list[float]] = {"forward": [], "backward": []}
    keys = ["method", "module", "phase"]
    layers = measured.layers.merge(projected.layers, on=keys, suffixes=("_m", "_p"))
    decoder = layers["module"].str.fullmatch(r"model\.layers\.\d+")
    for _, row in layers[decoder].iterrows():
        if row["phase"] in errors and row["latency_ms_m"] > 0:
            errors[row["phase"]].append(row["latency_ms_p"] / row["latency_ms_m"] - 1)
    return errors


def _abs_interval(low: float, high: float) -> verdicts.Interval:
    """The interval of |x| for x in [low, high]."""
    if low <= 0 <= high:
        return verdicts.Interval(0.0, max(-low, high))
    return verdicts.Interval(min(abs(low), abs(high)), max(abs(low), abs(high)))


def report(name: str, measured: trace.Trace, projected: trace.Trace,
           quick: bool) -> dict[str, verdicts.Judgement]:
    m = measured.summary.set_index("method")
    p = projected.summary.set_index("method")
    judged: dict[str, verdicts.Judgement] = {}
    print(f"\nconfig {name}: {trace.title(measured.run)}; projected onto "
          f"{projected.run['gpu']['name']}")
    print(f"  {'method':<8} {'measured ms [p25-p75]':>26} {'projected ms':>13} {'error':>8} "
          f"{'95% interval':>18}  (target |error| within {STEP_TARGET:.0%})")
    steps = measured.steps
    for method in METHODS:
        real, model = m.loc[method, "step_ms"], p.loc[method, "step_ms"]
        error = model / real - 1
        times = steps.loc[steps["method"] == method, "step_ms"].tolist()
        median = verdicts.median_interval(times)
        interval = None if median is None else _abs_interval(model / median.high - 1,
                                                             model / median.low - 1)
        judged[f"{name} {method} step"] = verdicts.judge(
            interval, STEP_TARGET, n=len(times), minimum=verdicts.MIN_REPEATS, quick=quick,
            unit="timed steps")
        spread = f"{real:.1f} [{m.loc[method, 'step_ms_p25']:.1f}-{m.loc[method, 'step_ms_p75']:.1f}]"
        shown = "-" if median is None else (f"[{model / median.high - 1:+.1%}, "
                                            f"{model / median.low - 1:+.1%}]")
        print(f"  {method:<8} {spread:>26} {model:>13.1f} {error:>+8.1%} {shown:>18}  "
              f"{judged[f'{name} {method} step']}")
    real = m.loc["paca", "step_ms"] / m.loc["lora", "step_ms"]
    model = p.loc["paca", "step_ms"] / p.loc["lora", "step_ms"]
    low, high = m.loc["paca", "step_ratio_lo"], m.loc["paca", "step_ratio_hi"]
    ratio_rounds = int(m.loc["paca", "steps_timed"])
    judged[f"{name} paca/lora"] = verdicts.judge(
        _abs_interval(model - high, model - low), RATIO_TARGET, n=ratio_rounds,
        minimum=verdicts.MIN_REPEATS, quick=quick, unit="timed steps")
    print(f"  paca/lora: measured {real:.3f} (95% interval [{low:.3f}, {high:.3f}]), projected "
          f"{model:.3f}, difference {model - real:+.3f} [{model - high:+.3f}, {model - low:+.3f}]"
          f" (target within {RATIO_TARGET})  {judged[f'{name} paca/lora']}")
    for phase, errors in _layer_errors(measured, projected).items():
        if not errors:
            continue
        worst = max(errors, key=abs)
        median = statistics.median(abs(e) for e in errors)
        print(f"  decoder layers, {phase}: projected vs measured, median |error| {median:.1%}, "
              f"largest {worst:+.1%} over {len(errors)} (layer, method): "
              f"{'within' if median <= LAYER_TARGET else 'outside'} {LAYER_TARGET:.0%} "
              f"(compared, not judged: no interval)")
    warned = {k: v for k, v in measured.run.get("timing", {}).get("warnings", {}).items()}
    if warned:
        print(f"  measured spread warnings: {warned}")
    return judged


def _calibrated(quick: bool, when: str) -> GpuSpec:
    result = calibrate("cpu", quick=quick)
    s = result.spec
    print(f"calibrated {when} the measured run, in {result.seconds:.0f} s (measured): fp32 peak "
          f"{s.fp32_tflops * 1e3:.1f} GFLOP/s x efficiency {s.matmul_efficiency:.2f}, "
          f"{s.hbm_gbps:.1f} GB/s, {_describe(s)}, attention efficiency "
          f"{s.attention_efficiency:.2f}")
    return s


def _ratio(new: float, old: float) -> str:
    return f"{new / old - 1:+.0%}" if old else "-"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=None, help="a spec calibrated before")
    parser.add_argument("--configs", default="tiny,mid")
    parser.add_argument("--steps", type=int, default=10, help="measured rounds (default 10)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    if not names or any(n not in CONFIGS for n in names) or args.steps < 1:
        parser.error(f"--configs from {', '.join(CONFIGS)}; --steps >= 1")
    torch.set_num_threads(1)
    load = os.getloadavg()[0]
    print(f"bench_calibrate: {os.cpu_count()} CPUs, 1 torch thread, load average {load:.2f} "
          "at start (a loaded machine moves every measured number)")
    with tempfile.TemporaryDirectory(prefix="paca-prof-bench-calibrate-") as tmp:
        workdir = Path(tmp)
        fixed = load_spec(args.spec) if args.spec is not None else None
        judged: dict[str, verdicts.Judgement] = {}
        for name in names:
            before = fixed or _calibrated(args.quick, "before")
            measured = _measure(name, 5 if args.quick else args.steps, workdir)
            spec = before
            if fixed is None:
                after = _calibrated(args.quick, "after")
                spec = _bracketed(before, after)
                print(f"host costs drifted by {_ratio(after.launch_us, before.launch_us)} "
                      f"per op, {_ratio(after.forward_op_us, before.forward_op_us)} per "
                      f"forward op, the fp32 GEMM peak by "
                      f"{_ratio(after.fp32_tflops, before.fp32_tflops)} and the DRAM "
                      f"bandwidth by {_ratio(after.hbm_gbps, before.hbm_gbps)} during the "
                      f"measurement; projected with their mean: {_describe(spec)}")
            spec_yaml = write_spec(spec, workdir / f"{name}-cpu.yaml")
            judged.update(report(name, measured, _project(name, spec_yaml, workdir),
                                 args.quick))
    print(verdicts.legend(verdicts.MIN_REPEATS, "timed steps"))
    print(verdicts.summary(judged))
    return verdicts.exit_status(judged.values())


if __name__ == "__main__":
    sys.exit(main())
