"""Calibrate the cost model on a real device: microbenchmarks, fitted into a device spec.

`paca-prof calibrate --device cpu|cuda [--out SPEC.yaml]` times, on the device at hand:
  GEMM        square and model-shaped matmuls in fp32, bf16 and fp16 (a small llama's, a
              mid-size one's at 256 and 1024 tokens, a rank-16 adapter's; larger ones on
              CUDA): the best rate per dtype is the spec's peak (bf16_tflops, ...); the fp32
              rates over that peak by GEMM size are matmul_curve, and matmul_efficiency is
              the median of the model-shaped ones (for a spec read without its curve);
  bandwidth   element-wise adds from 64 KiB to 64 MiB a tensor (to 4 MiB under quick): the
              rate by bytes moved is bandwidth_curve, the largest size's rate hbm_gbps (with
              bandwidth_efficiency 1: these are what ops reach);
              both with their operands out of the caches (_Timer.cold_us), as a training step
              touches each weight and saved activation once per pass: timed on operands a
              core's L2 holds, the adds ran 5x faster than a step's ops, and the projection of
              a step was 15-40% low on this CPU; and both after the bare call's own cost is
              taken off each timing (a 1x1 matmul's, a one-element add's): the projection adds
              the per-op cost of training code on top (launch_us or dispatch_us);
  mixed layout  the same adds with the second operand read transposed (2-D, each shape both
              ways), cold: mixed_layout_bandwidth_curve, the rate of an element-wise op
              whose operands disagree in layout (DoRA's weight plus its low-rank product);
  per-op      the host cost of eager training code, per op and per module entered
              (module_call_us): small llama steps (all overhead, no compute to speak of) of
              frozen, lora and paca under the timing pass's instrument, fitted on their ops
              and module entries as the projection counts them (_overhead_fit);
  foreach     torch._foreach_add_ over many small tensors: the cost per tensor of a foreach
              op (foreach_tensor_us), which AdamW's and clipping's foreach ops pay per tensor;
  attention   scaled_dot_product_attention at a model-like shape (attention_efficiency);
  optimizer   an AdamW step (torch's default, foreach) over a model-like set of parameters:
              reported, and checked against what the fitted spec projects for it.
and writes a GpuSpec (gpus.py) that `paca-prof run --device meta --gpu SPEC.yaml` projects onto.

On the CPU the host runs every op itself, one after another: the spec then has dispatch_us 0
and the per-op cost in launch_us, so that the schedule (engines/project.py) adds it to every op
instead of overlapping it with the previous kernel as a GPU would (module_call_us and
forward_op_us likewise). On CUDA the fitted per-op host time is dispatch_us and launch_us 0
(the tiny op's host time, `tiny_op_us`, is kept beside it for comparison).

Limits: about 20-60 s on a small CPU; every number is measured on this machine under its
current load (run it on a quiet machine; the load average is recorded in `source`); rates
depend on size alone (a GEMM's FLOPs, an op's bytes), so shapes far from those timed here
project less well, and sizes beyond the ends read the end values; the peak
is the best rate measured, not the datasheet's, so an MFU against it reads "of what this
device's GEMMs reach". memory_bytes is the device's (CPU: physical memory).
"""

from __future__ import annotations

import itertools
import os
import statistics
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from torch.utils._python_dispatch import TorchDispatchMode

from paca_prof.engines.project import curve_at
from paca_prof.gpus import GpuSpec

DEVICES = ("cpu", "cuda")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Calibration:
    """What calibrate() measured, and the spec fitted from it."""

    spec: GpuSpec
    gemm: list[dict] = field(default_factory=list)  # one row per timed matmul
    bandwidth: list[dict] = field(default_factory=list)  # one row per timed add
    mixed_layout: list[dict] = field(default_factory=list)  # adds with a transposed operand
    dispatch_us: float = 0.0
    tiny_op_us: float = 0.0
    overhead: dict = field(default_factory=dict)
    foreach_tensor_us: float = 0.0
    attention: dict = field(default_factory=dict)
    optimizer: dict = field(default_factory=dict)
    bare_us: dict = field(default_factory=dict)  # a 1x1 matmul's and a one-element add's
    seconds: float = 0.0


class _Timer:
    """Median time of a callable on the device (host clock on the CPU, CUDA events on GPU)."""

    def __init__(self, device: str, budget_s: float):
        self.cuda = device.startswith("cuda")
        self.deadline = time.perf_counter() + budget_s

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def median_us(self, fn, min_reps: int = 3, target_s: float = 0.05) -> float:
        """Median of repeated timings of fn(); repetitions sized to about target_s each
        batch, at least min_reps, fewer when the calibration's time budget runs short."""
        fn()
        self.sync()
        start = time.perf_counter()
        fn()
        self.sync()
        once = max(time.perf_counter() - start, 1e-7)
        inner = max(1, min(10_000, int(target_s / 5 / once)))
        samples = []
        for _ in range(min_reps if time.perf_counter() > self.deadline else 5):
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            self.sync()
            samples.append((time.perf_counter() - start) / inner * 1e6)
        return statistics.median(samples)

    def cold_us(self, make_operands, fn, min_reps: int = 3, target_s: float = 0.05) -> float:
        """Median time of fn(*operands) with its operands out of the caches, as in a training
        step, where each weight and each saved activation is touched once per pass. The calls
        take turns over distinct operand sets (make_operands() each) that fill at least
        COLD_POOL_BYTES, more than a last-level cache holds (triton's do_bench flushes 256 MB
        for the same reason), so a set comes back only after the others have evicted it. An
        output among the operands is written cold too; allocating it is the per-op cost's
        (fitted on whole steps), not the op's. Limits: memory for the pool (256 MiB, or two
        sets where one is larger)."""
        first = make_operands()
        set_bytes = sum(t.numel() * t.element_size() for t in first)
        count = max(2, min(COLD_MAX_SETS, -(-COLD_POOL_BYTES // max(set_bytes, 1))))
        pool = itertools.cycle([first] + [make_operands() for _ in range(count - 1)])
        return self.median_us(lambda: fn(*next(pool)), min_reps, target_s)


# Operands timed cold fill this much memory (see _Timer.cold_us), in sets of at most this many.
COLD_POOL_BYTES = 256 * 2**20
COLD_MAX_SETS = 4096

# (tokens, in, out) of model projections: a small llama's (hidden 128), a mid-size one's
# (hidden 512) at 256 and 1024 tokens, and a rank-16 adapter's two GEMMs beside it; CUDA adds
# an 8B-size layer's, whose GEMMs are the ones a GPU runs.
MODEL_GEMMS = [(256, 128, 128), (256, 128, 352), (256, 352, 128), (256, 128, 1024),
               (256, 512, 16), (256, 16, 512), (256, 512, 512), (256, 512, 1376),
               (256, 1376, 512), (1024, 512, 512), (1024, 512, 1536)]
CUDA_GEMMS = [(4096, 4096, 1024), (4096, 4096, 4096), (4096, 4096, 14336),
              (4096, 14336, 4096)]


def _gemm(timer: _Timer, device: str, dtypes: list[str], quick: bool) -> list[dict]:
    square = [256, 512] if quick else [256, 512, 1024]
    shaped = MODEL_GEMMS + (CUDA_GEMMS if device.startswith("cuda") else [])
    rows = []
    for name in dtypes:
        dtype = DTYPES[name]
        shapes = [(n, n, n, "square") for n in square] + [(*s, "model") for s in shaped]
        if name != "fp32" and device == "cpu":  # CPU half precision is slow: small ones
            shapes = [s for s in shapes if s[0] * s[1] * s[2] <= 256 * 256 * 256]
        for m, k, n, kind in shapes:
            us = timer.cold_us(lambda: (torch.ones(m, k, device=device, dtype=dtype),
                                        torch.ones(k, n, device=device, dtype=dtype),
                                        torch.empty(m, n, device=device, dtype=dtype)),
                               lambda a, b, out: torch.mm(a, b, out=out))
            rows.append({"dtype": name, "m": m, "k": k, "n": n, "kind": kind, "us": us,
                         "flops": 2.0 * m * k * n})
    return rows


def _bare_us(timer: _Timer, device: str) -> dict[str, float]:
    """What a GEMM and an element-wise op cost when they have (almost) nothing to compute or
    move: the bare call, taken off the microbenchmarks' timings before their rates are read."""
    one = torch.ones(1, 1, device=device)
    out = torch.empty(1, 1, device=device)
    return {"mm": timer.median_us(lambda: torch.mm(one, one, out=out)),
            "add": timer.median_us(lambda: torch.add(one, one, out=out))}


def rate_curve(points: list[tuple[float, float]]) -> tuple[tuple[float, float], ...]:
    """(size, rate) measurements as a GpuSpec curve: sorted by size, the rates of equal sizes
    merged by their median."""
    by_size: dict[float, list[float]] = {}
    for size, rate in points:
        by_size.setdefault(float(size), []).append(float(rate))
    return tuple((size, round(statistics.median(rates), 6))
                 for size, rates in sorted(by_size.items()))


def _gemm_fit(gemm: list[dict], bare_us: float, dtypes: list[str]) -> dict:
    """Each GEMM's rate with the bare call's cost taken off (TFLOP/s, in gemm's rows), the peak
    per dtype (the best rate), and the fp32 efficiency by size (matmul_curve) with its median
    over the model-shaped GEMMs (matmul_efficiency)."""
    for row in gemm:
        row["tflops"] = row["flops"] / max(row["us"] - bare_us, row["us"] / 10) / 1e6
    peaks = {d: max(r["tflops"] for r in gemm if r["dtype"] == d) for d in dtypes}
    peaks.setdefault("fp16", peaks["bf16"])
    fp32 = [r for r in gemm if r["dtype"] == "fp32"]
    curve = rate_curve([(r["flops"], r["tflops"] / peaks["fp32"]) for r in fp32])
    efficiency = statistics.median(r["tflops"] / peaks["fp32"] for r in fp32
                                   if r["kind"] == "model")
    return {"peaks": peaks, "curve": curve, "efficiency": efficiency}


class _CountOps(TorchDispatchMode):
    """Counts the ops (ops.counts_as_op, the cost model's unit) a callable runs, with their
    tensor inputs and bytes (inputs + outputs, in-place foreach writes counted as the
    simulation counts them)."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, int, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.utils._pytree import tree_flatten

        from paca_prof.engines.simulate import _written_in_place
        from paca_prof.ops import counts_as_op

        out = func(*args, **(kwargs or {}))
        name = func._schema.name
        if counts_as_op(name):
            inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
            nbytes = sum(t.numel() * t.element_size() for t in inputs + outputs)
            self.ops.append((name, len(inputs), nbytes + _written_in_place(name, args, out)))
        return out


def _dispatch_us(timer: _Timer, device: str) -> float:
    """The per-op cost of eager training code: a chain of tiny ops with autograd, forward and
    backward, timed and divided by the ops it runs (counted as the cost model counts them)."""
    x = torch.ones(8, device=device, requires_grad=True)

    def step():
        y = x
        for _ in range(32):
            y = torch.tanh(y * 1.0001 + 0.0001)
        y.sum().backward()

    with _CountOps() as counter:
        step()
    x.grad = None
    return timer.median_us(step, target_s=0.05) / max(len(counter.ops), 1)


# A small llama whose step is all per-op cost (its GEMMs are a few microseconds).
_OVERHEAD_MODEL = dict(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                       max_position_embeddings=256)


OVERHEAD_METHODS = ("frozen", "lora", "paca")  # few, many and some module entries per op
OVERHEAD_WARMUP = 2  # untimed rounds
OVERHEAD_ROUNDS = 15  # timed rounds of the three methods (5 when the time budget is spent)
OVERHEAD_ROUNDS_SHORT = 5
OVERHEAD_PHASES = ("forward", "backward")  # the optimizer's foreach cost is fitted on its own


def _overhead_fit(timer: _Timer, device: str) -> dict:
    """The host cost of eager training code, as three numbers: per op, more per forward op, and
    per module entered.

    Each of OVERHEAD_METHODS runs training steps of a small llama at 16 tokens (its compute is
    negligible), timed in a Capture session as engines/measure.py times it (module hooks
    included: the projection is checked against such measurements), the methods taking turns
    in OVERHEAD_ROUNDS rounds (a load that changes during the fit moves all three medians
    alike instead of one method's: the costs come from differences between methods and
    phases). Its ops and module entries are counted per phase on the simulated step, as the
    projection counts them (len(ops) and engines.project.scope_entries). Non-negative least
    squares over the (method, phase) medians:
        measured = per_op_us * ops + forward_op_us * forward ops + module_call_us * entries.
    Forward ops cost the host about three times what backward ones do (Python issues them;
    autograd's C++ engine issues backward's), and adapters enter about twice as many modules
    per op as a plain model: what tells the three apart. Limits: three methods, one size; an
    adapter's Python per module differs by library (PEFT's LoRA layer costs more than a
    PaCA one), which one module cost averages; the optimizer phase is left out (AdamW's
    foreach cost is fitted on its own)."""
    from paca_prof.engines.measure import _Clock, timed_step
    from paca_prof.engines.project import scope_entries
    from paca_prof.engines.simulate import simulate_method
    from paca_prof.engines.step import make_batch, prepare
    from paca_prof.spec import RunSpec

    clock = _Clock(device.startswith("cuda"))
    prepared, counts = {}, {}
    for method in OVERHEAD_METHODS:
        def spec_on(where: str) -> RunSpec:
            return RunSpec(model=dict(_OVERHEAD_MODEL), seq=16, batch=1, dtype="fp32",
                           device=where, methods=(method,))

        ops = simulate_method(spec_on("meta"), method).ops.sort_values("seq_no")
        counts[method] = {}
        for phase in OVERHEAD_PHASES:
            in_phase = ops[ops["phase"] == phase]
            counts[method][phase] = (len(in_phase), float(scope_entries(in_phase).sum()))
        prepared[method] = (prepare(spec_on(device), method, device),
                            make_batch(spec_on(device), device))
    times = {method: {phase: [] for phase in OVERHEAD_PHASES} for method in OVERHEAD_METHODS}
    rounds = OVERHEAD_ROUNDS_SHORT if time.perf_counter() > timer.deadline else OVERHEAD_ROUNDS
    for round_no in range(OVERHEAD_WARMUP + rounds):
        for method, (run, ids) in prepared.items():  # interleaved: a drift hits all three
            totals = timed_step(run, ids, clock)
            if round_no >= OVERHEAD_WARMUP:
                for phase in OVERHEAD_PHASES:
                    times[method][phase].append(sum(v for (path, _), v in totals.items()
                                                    if path == f"phase:{phase}"))
    rows = [{"method": method, "phase": phase, "ops": counts[method][phase][0],
             "forward_ops": counts[method][phase][0] if phase == "forward" else 0,
             "entries": counts[method][phase][1],
             "measured_us": statistics.median(times[method][phase]) * 1e3}
            for method in OVERHEAD_METHODS for phase in OVERHEAD_PHASES]
    costs = fit_nonnegative(rows, ("ops", "forward_ops", "entries"))
    return {"per_op_us": costs["ops"], "forward_op_us": costs["forward_ops"],
            "module_call_us": costs["entries"], "steps": rows}


def fit_nonnegative(rows: list[dict], columns: tuple[str, ...]) -> dict[str, float]:
    """measured_us = sum of cost[c] * row[c] over `columns`, every cost >= 0, by least squares
    on the relative error (each row weighs alike whatever its size). Every subset of the
    columns is fitted (the others held at 0) and the best fit whose costs are all >= 0 is kept:
    exact non-negative least squares for the two or three columns used here, and a handful of
    small solves. (scipy.optimize.nnls does the same for any size; scipy is no dependency.)"""
    import itertools

    import numpy as np

    design = np.array([[row[c] / row["measured_us"] for c in columns] for row in rows])
    target = np.ones(len(rows))
    best, best_residual = dict.fromkeys(columns, 0.0), float(len(rows))  # all 0: residual n
    for size in range(1, len(columns) + 1):
        for subset in itertools.combinations(range(len(columns)), size):
            solution, *_ = np.linalg.lstsq(design[:, subset], target, rcond=None)
            if (solution < 0).any():
                continue
            residual = float(((design[:, subset] @ solution - target) ** 2).sum())
            if residual < best_residual - 1e-12:
                best = dict.fromkeys(columns, 0.0)
                best.update({columns[i]: float(v) for i, v in zip(subset, solution)})
                best_residual = residual
    return best


# float32 elements a tensor: 64 KiB (a small model's activations) to 64 MiB (an 8B model's
# optimizer pass), as 1-row shapes
BANDWIDTH_SHAPES = [(1, 2**14), (1, 2**16), (1, 2**18), (1, 2**20), (1, 2**22), (1, 2**24)]
# (rows, columns) of 2-D adds whose second operand is read transposed, each shape both ways:
# a core walks the transposed one across its strides, the cost growing with its rows' length
MIXED_LAYOUT_SHAPES = [(128, 128), (256, 512), (512, 256), (512, 1376), (1376, 512),
                       (1024, 1024), (2048, 2048)]


def _adds(timer: _Timer, device: str, shapes, transposed: bool = False) -> list[dict]:
    """Cold float32 adds of each (rows, columns) shape into a contiguous output, the second
    operand read transposed with `transposed` (an op whose operands disagree in layout,
    simulate.mixed_layout): one row of bytes moved and time each."""
    rows = []
    for m, n in shapes:
        us = timer.cold_us(lambda: (torch.ones(m, n, device=device),
                                    torch.ones(n, m, device=device).t() if transposed
                                    else torch.ones(m, n, device=device),
                                    torch.empty(m, n, device=device)),
                           lambda x, y, out: torch.add(x, y, out=out))
        rows.append({"bytes": 3 * 4 * m * n, "us": us, "shape": [m, n]})
    return rows


def _bandwidth_fit(rows: list[dict], bare_us: float) -> tuple[tuple[float, float], ...]:
    """The rate by bytes moved (GB/s), from the sizes whose bytes, not the bare call, set
    their time (at least twice the bare cost); the smallest size's rate when none does."""
    points = [(r["bytes"], r["bytes"] / (r["us"] - bare_us) / 1e3) for r in rows
              if r["us"] >= 2 * bare_us]
    return rate_curve(points or [(rows[0]["bytes"], rows[0]["bytes"] / rows[0]["us"] / 1e3)])


def _optimizer(timer: _Timer, device: str, launch_us: float,
               bandwidth_curve: tuple[tuple[float, float], ...]) -> dict:
    """AdamW as this device runs it by default (CPU: torch's for-loop; CUDA: foreach), timed
    over a LoRA-like and a full-like set of tensors, against the foreach step the simulation
    records (its ops counted here): foreach_tensor_us is the cost per foreach input tensor
    that makes the projection of that foreach step match the measured one (the per-op cost and
    each op's bytes at the bandwidth curve's rate taken off first). Clipping's foreach norm
    and scale pay the same."""
    sets = {"lora-like": [(8, 128), (128, 8)] * 14,
            "full-like": [(128, 128)] * 8 + [(352, 128), (128, 352)] * 6 + [(1024, 128)] * 2}
    out, per_tensor = {}, []
    for name, shapes in sets.items():
        params = [torch.nn.Parameter(torch.randn(*s, device=device)) for s in shapes]
        for p in params:
            p.grad = torch.randn_like(p)
        default = torch.optim.AdamW(params, lr=1e-4, foreach=None if device == "cpu" else True)
        default.step()
        us = timer.median_us(default.step, target_s=0.05)
        foreach = torch.optim.AdamW(params, lr=1e-4, foreach=True)
        foreach.step()
        with _CountOps() as counter:
            foreach.step()
        inputs = sum(n for op, n, _ in counter.ops if "_foreach_" in op)
        op_bytes = np.array([b for _, _, b in counter.ops], dtype=float)
        nbytes = int(op_bytes.sum())
        memory_us = float((op_bytes / (curve_at(bandwidth_curve, op_bytes, 1.0) * 1e3)).sum())
        rest = us - len(counter.ops) * launch_us - memory_us
        per_tensor.append(max(rest, 0.0) / max(inputs, 1))
        out[name] = {"tensors": len(params), "params": sum(p.numel() for p in params),
                     "measured_us": us, "simulated_ops": len(counter.ops),
                     "foreach_inputs": inputs, "bytes": nbytes}
    out["foreach_tensor_us"] = statistics.median(per_tensor)
    return out


def _attention(timer: _Timer, device: str, peak_tflops: float) -> dict:
    b, h, s, d = 2, 4, 256, 32
    q, k, v = (torch.randn(b, h, s, d, device=device) for _ in range(3))
    fn = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    us = timer.median_us(fn)
    flops = 4.0 * b * h * s * s * d  # torch.utils.flop_counter's formula (no causal discount)
    return {"shape": [b, h, s, d], "us": us, "tflops": flops / us / 1e6,
            "efficiency": min(1.0, flops / us / 1e6 / peak_tflops)}




def _memory_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.get_device_properties(torch.device(device)).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def calibrate(device: str = "cpu", name: str | None = None, budget_s: float = 45.0,
              quick: bool = False, progress=lambda what: None) -> Calibration:
    """Microbenchmark `device` and fit a GpuSpec (module docstring). `budget_s` bounds the
    repetitions (each benchmark still runs a few); `quick` times fewer sizes and only fp32
    and bf16 (a smoke run, as tests use). ValueError for a device that is not here."""
    if device not in DEVICES:
        raise ValueError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here")
    started = time.perf_counter()
    timer = _Timer(device, budget_s)
    with torch.no_grad():
        progress("GEMM")
        dtypes = ["fp32", "bf16"] + ([] if quick or device == "cpu" else ["fp16"])
        gemm = _gemm(timer, device, dtypes, quick)
        progress("bandwidth")
        bandwidth = _adds(timer, device, BANDWIDTH_SHAPES[:4] if quick else BANDWIDTH_SHAPES)
        mixed_layout = _adds(timer, device,
                             MIXED_LAYOUT_SHAPES[:4] if quick else MIXED_LAYOUT_SHAPES,
                             transposed=True)
    progress("per-op cost")
    tiny_op = _dispatch_us(timer, device)
    overhead = _overhead_fit(timer, device)
    dispatch = overhead["per_op_us"]
    bare = _bare_us(timer, device)
    fit = _gemm_fit(gemm, bare["mm"], dtypes)
    peaks, efficiency = fit["peaks"], min(1.0, fit["efficiency"])
    bandwidth_curve = _bandwidth_fit(bandwidth, bare["add"])
    mixed_layout_curve = _bandwidth_fit(mixed_layout, bare["add"])
    gbps = bandwidth_curve[-1][1]  # the largest size's: what streams from device memory
    with torch.no_grad():
        progress("attention")
        attention = _attention(timer, device, peaks["fp32"])
    progress("optimizer")
    optimizer = _optimizer(timer, device, dispatch, bandwidth_curve)
    foreach = optimizer["foreach_tensor_us"]
    cuda = device.startswith("cuda")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    label = (torch.cuda.get_device_name() if cuda else _cpu_label())
    spec = GpuSpec(
        name=name or (f"calibrated-{device}"),
        memory_bytes=_memory_bytes(device),
        bf16_tflops=round(peaks["bf16"], 6), fp16_tflops=round(peaks["fp16"], 6),
        fp32_tflops=round(peaks["fp32"], 6), hbm_gbps=round(gbps, 3),
        launch_us=round(dispatch, 3) if not cuda else 0.0,
        dispatch_us=0.0 if not cuda else round(dispatch, 3),
        cuda_context_bytes=0 if not cuda else GpuSpec.__dataclass_fields__[
            "cuda_context_bytes"].default,
        interconnect="none" if not cuda else "pcie",
        matmul_efficiency=round(max(efficiency, 1e-3), 4),
        attention_efficiency=round(max(attention["efficiency"], 1e-3), 4),
        bandwidth_efficiency=1.0,
        foreach_tensor_us=round(foreach, 4),
        matmul_curve=fit["curve"], bandwidth_curve=bandwidth_curve,
        mixed_layout_bandwidth_curve=mixed_layout_curve,
        module_call_us=round(overhead["module_call_us"], 3),
        forward_op_us=round(overhead["forward_op_us"], 3),
        source=(f"paca-prof calibrate on {label}, {torch.get_num_threads()} torch thread(s), "
                f"load average {load:.2f} at start; peaks: best GEMM rate measured; "
                f"GEMM efficiency and bandwidth by size (the curves) from "
                f"microbenchmarks, the bare call's cost taken off; attention's from SDPA; "
                f"{'per-op cost in launch_us (the CPU runs ops one after another)' if not cuda else 'dispatch: per-op host time'}"
                f", more per forward op in forward_op_us and per module entered in "
                f"module_call_us, fitted on small steps of "
                f"{', '.join(OVERHEAD_METHODS)}"),
    )
    return Calibration(spec, gemm=gemm, bandwidth=bandwidth, mixed_layout=mixed_layout,
                       dispatch_us=dispatch, tiny_op_us=tiny_op, overhead=overhead,
                       foreach_tensor_us=foreach, attention=attention, optimizer=optimizer,
                       bare_us=bare, seconds=time.perf_counter() - started)


def _cpu_label() -> str:
    from paca_prof.metadata import cpu_name

    return cpu_name()
