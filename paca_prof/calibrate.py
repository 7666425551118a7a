"""Calibrate the cost model on a real device: microbenchmarks, fitted into a device spec.

`paca-prof calibrate --device cpu|cuda [--out SPEC.yaml]` times, on the device at hand:
  GEMM        square and model-shaped matmuls in fp32, bf16 and fp16: the best rate per dtype
              is the spec's peak (bf16_tflops, ...); matmul_efficiency is the median of the
              model-shaped ones' rate over that peak, after the per-op cost is taken off;
  bandwidth   element-wise adds over several sizes, fitted as time = bytes / bandwidth + c
              (hbm_gbps, with bandwidth_efficiency 1: the fit is already what ops reach);
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
current load (run it on a quiet machine; the load average is recorded in `source`); one
efficiency per kind of kernel, so shapes far from those timed here project less well; the peak
is the best rate measured, not the datasheet's, so an MFU against it reads "of what this
device's GEMMs reach". memory_bytes is the device's (CPU: physical memory).
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field

import torch

from torch.utils._python_dispatch import TorchDispatchMode

from paca_prof.gpus import GpuSpec

DEVICES = ("cpu", "cuda")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Calibration:
    """What calibrate() measured, and the spec fitted from it."""

    spec: GpuSpec
    gemm: list[dict] = field(default_factory=list)  # one row per timed matmul
    bandwidth: list[dict] = field(default_factory=list)
    dispatch_us: float = 0.0
    tiny_op_us: float = 0.0
    overhead: dict = field(default_factory=dict)
    foreach_tensor_us: float = 0.0
    attention: dict = field(default_factory=dict)
    optimizer: dict = field(default_factory=dict)
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


def _gemm(timer: _Timer, device: str, dtypes: list[str], quick: bool) -> list[dict]:
    square = [256, 512] if quick else [256, 512, 1024]
    # model-shaped: (tokens, in, out) of a small llama's projections and of a mid-size one's
    shaped = [(256, 128, 128), (256, 128, 352), (256, 352, 128), (256, 128, 1024),
              (1024, 512, 512), (1024, 512, 1536)]
    rows = []
    for name in dtypes:
        dtype = DTYPES[name]
        shapes = [(n, n, n, "square") for n in square] + [(*s, "model") for s in shaped]
        if name != "fp32" and device == "cpu":  # CPU half precision is slow: small ones
            shapes = [s for s in shapes if s[0] * s[1] * s[2] <= 256 * 256 * 256]
        for m, k, n, kind in shapes:
            a = torch.randn(m, k, device=device, dtype=dtype)
            b = torch.randn(k, n, device=device, dtype=dtype)
            us = timer.median_us(lambda: torch.mm(a, b))
            flops = 2.0 * m * k * n
            rows.append({"dtype": name, "m": m, "k": k, "n": n, "kind": kind, "us": us,
                         "tflops": flops / us / 1e6})
    return rows


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


def _bandwidth(timer: _Timer, device: str, quick: bool) -> list[dict]:
    # float32 elements: the sizes of a small model's activations up to a mid-size one's
    sizes = [2**14, 2**16, 2**18, 2**20] + ([] if quick else [2**22])
    rows = []
    for numel in sizes:
        x = torch.ones(numel, device=device)
        y = torch.ones(numel, device=device)
        out = torch.empty(numel, device=device)
        us = timer.median_us(lambda: torch.add(x, y, out=out))
        rows.append({"bytes": 3 * 4 * numel, "us": us})
    return rows


def _fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """y = a x + b (a > 0, b >= 0) by least squares on relative error (weights 1 / y^2), so
    that small sizes, which model ops are, weigh as much as large ones."""
    w = [1.0 / (y * y) for y in ys]
    sw = sum(w)
    mx = sum(wi * x for wi, x in zip(w, xs)) / sw
    my = sum(wi * y for wi, y in zip(w, ys)) / sw
    var = sum(wi * (x - mx) ** 2 for wi, x in zip(w, xs))
    a = sum(wi * (x - mx) * (y - my) for wi, x, y in zip(w, xs, ys)) / var if var else 0.0
    a = max(a, 1e-12)
    return a, max(my - a * mx, 0.0)


def _optimizer(timer: _Timer, device: str, launch_us: float, gbps: float) -> dict:
    """AdamW as this device runs it by default (CPU: torch's for-loop; CUDA: foreach), timed
    over a LoRA-like and a full-like set of tensors, against the foreach step the simulation
    records (its ops counted here): foreach_tensor_us is the cost per foreach input tensor
    that makes the projection of that foreach step match the measured one (the per-op cost and
    the bytes taken off first). Clipping's foreach norm and scale pay the same."""
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
        nbytes = sum(b for _, _, b in counter.ops)
        rest = us - len(counter.ops) * launch_us - nbytes / (gbps * 1e3)
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
        bandwidth = _bandwidth(timer, device, quick)
    progress("per-op cost")
    tiny_op = _dispatch_us(timer, device)
    overhead = _overhead_fit(timer, device)
    dispatch = overhead["per_op_us"]
    per_byte, _ = _fit_line([r["bytes"] for r in bandwidth], [r["us"] for r in bandwidth])
    gbps = 1.0 / per_byte / 1e3  # bytes per us -> GB/s
    peaks = {d: max(r["tflops"] for r in gemm if r["dtype"] == d) for d in dtypes}
    peaks.setdefault("fp16", peaks["bf16"])
    model_rates = []
    for row in gemm:
        if row["kind"] == "model" and row["dtype"] == "fp32":
            compute_us = max(row["us"] - dispatch, 1e-3)
            model_rates.append(2.0 * row["m"] * row["k"] * row["n"] / compute_us / 1e6
                               / peaks["fp32"])
    efficiency = min(1.0, statistics.median(model_rates))
    with torch.no_grad():
        progress("attention")
        attention = _attention(timer, device, peaks["fp32"])
    progress("optimizer")
    optimizer = _optimizer(timer, device, dispatch, gbps)
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
        module_call_us=round(overhead["module_call_us"], 3),
        forward_op_us=round(overhead["forward_op_us"], 3),
        source=(f"paca-prof calibrate on {label}, {torch.get_num_threads()} torch thread(s), "
                f"load average {load:.2f} at start; peaks: best GEMM rate measured; "
                f"efficiencies fitted on model-shaped GEMMs and SDPA; "
                f"{'per-op cost in launch_us (the CPU runs ops one after another)' if not cuda else 'dispatch: per-op host time'}"
                f", more per forward op in forward_op_us and per module entered in "
                f"module_call_us, fitted on small steps of "
                f"{', '.join(OVERHEAD_METHODS)}"),
    )
    return Calibration(spec, gemm, bandwidth, dispatch, tiny_op, overhead, foreach, attention,
                       optimizer, time.perf_counter() - started)


def _cpu_label() -> str:
    from paca_prof.metadata import cpu_name

    return cpu_name()
