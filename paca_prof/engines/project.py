"""Project a simulated op sequence onto a named GPU: time per kernel, per module, per step.

The cost model, in full:
  - every op is one kernel; its device time is its roofline bound plus the launch cost:
        max(flops / (peak * efficiency), bytes / (bandwidth * efficiency)) + launch_us
    with the bf16 or fp16 tensor-core peak for half-precision ops, the fp32 peak otherwise;
    a GEMM's efficiency and an op's bandwidth follow the spec's curves by size where it has
    them (GpuSpec.matmul_curve, .bandwidth_curve: calibrated ones), one number otherwise;
    an element-wise op whose operands disagree in layout (ops.mixed_layout: one read
    transposed) moves its bytes at .mixed_layout_bandwidth_curve's rate where the spec has it;
  - the host issues ops one after another, dispatch_us apart (Python, the dispatcher and the
    launch call); a kernel starts when both the host has issued it and the previous kernel has
    finished. So a run of small kernels, such as an adapter branch beside each big GEMM, is
    bound by the host, and the device idles between kernels: the sequential adapter overhead.
  - a foreach op (AdamW's and gradient clipping's _foreach_*) moves all its tensors' bytes (an
    in-place one reads and writes its first list: simulate.py counts both) and pays
    foreach_tensor_us per input tensor beside (a CPU loops over them; 0 for the GPU table);
  - every module scope the op stream enters (scope_entries: nn.Module's __call__, its hooks,
    an adapter layer's Python) costs the host module_call_us more before that op is issued,
    and every forward op forward_op_us more (the model's Python issues forward ops, autograd's
    C++ engine backward ones); on a device whose host issues nothing ahead (dispatch_us 0: a
    CPU, which runs its ops itself) both are paid in line, in the op's time, as launch_us is.
Limits: one kernel per op (fused ops launch several, attention backward launches a few); no
overlap of kernels; efficiencies (GpuSpec.*_efficiency) and the launch and dispatch
costs are uncalibrated estimates (GpuSpec.source says so) until a measured GPU trace calibrates
them.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from paca_prof.gpus import GpuSpec
from paca_prof.modules import ancestor_keys, ancestors

BF16_DTYPES = ("bfloat16", "bf16", "c10::BFloat16")
FP16_DTYPES = ("float16", "fp16", "c10::Half")


def kernel_times_us(ops: pd.DataFrame, gpu: GpuSpec) -> np.ndarray:
    """Device time of each op (one kernel each) on `gpu`, launch cost included."""
    dtype = ops["dtype"]
    attention = ops["name"].str.contains("attention", regex=False).to_numpy()
    peak_tflops = np.where(dtype.isin(BF16_DTYPES).to_numpy(), gpu.bf16_tflops,
                           np.where(dtype.isin(FP16_DTYPES).to_numpy(), gpu.fp16_tflops,
                                    gpu.fp32_tflops))
    flops = ops["flops"].to_numpy(dtype=float)
    nbytes = ops["bytes"].to_numpy(dtype=float)
    matmul = curve_at(gpu.matmul_curve, flops, gpu.matmul_efficiency)
    efficiency = np.where(attention, gpu.attention_efficiency, matmul)
    compute_us = flops / (peak_tflops * 1e6 * efficiency)
    bandwidth = curve_at(gpu.bandwidth_curve, nbytes, gpu.hbm_gbps * gpu.bandwidth_efficiency)
    if gpu.mixed_layout_bandwidth_curve and "mixed_layout" in ops:
        mixed = ops["mixed_layout"].fillna(False).to_numpy(dtype=bool)
        bandwidth = np.where(mixed, curve_at(gpu.mixed_layout_bandwidth_curve, nbytes, 1.0),
                             bandwidth)
    memory_us = nbytes / (bandwidth * 1e3)
    per_tensor = 0.0
    if gpu.foreach_tensor_us:
        foreach = ops["name"].str.contains("_foreach_", regex=False).to_numpy()
        tensors = np.array([len(json.loads(s)) if f else 0
                            for s, f in zip(ops["shapes"], foreach)], dtype=float)
        per_tensor = tensors * gpu.foreach_tensor_us
    return (np.maximum(np.nan_to_num(compute_us), np.nan_to_num(memory_us)) + gpu.launch_us
            + per_tensor)


def curve_at(curve, sizes: np.ndarray, flat: float) -> np.ndarray:
    """A rate curve's value at each size: linear in log(size) between its points, its end
    values beyond them; `flat` everywhere when the curve is empty. (NaN or non-positive sizes
    read the first point: the callers' roofline drops their NaN times.)"""
    if not curve:
        return np.full(len(sizes), float(flat))
    xs, ys = zip(*curve)
    logs = np.log(np.where(np.nan_to_num(sizes) > 0, np.nan_to_num(sizes), xs[0]))
    return np.interp(logs, np.log(xs), ys)


def scope_entries(ops: pd.DataFrame) -> np.ndarray:
    """How many module scopes the op stream enters at each op (in the given order): the op's
    module and those of its ancestors that the previous op of the same phase was not inside.
    The unit of GpuSpec.module_call_us. Limits: it sees modules through their ops, so a module
    that runs no op (nn.Identity as LoRA's dropout 0) counts nothing and a module called twice
    with no other module's op between counts once; calibrate fits module_call_us on this same
    count, so what it misses is folded into the fitted cost."""
    entries = np.zeros(len(ops))
    previous, previous_phase = set(), None
    for i, (module, phase) in enumerate(zip(ops["module"], ops["phase"])):
        inside = set(ancestors(module))
        entries[i] = len(inside - previous) if phase == previous_phase else len(inside)
        previous, previous_phase = inside, phase
    return entries


def host_extra_us(ops: pd.DataFrame, gpu: GpuSpec) -> np.ndarray | None:
    """The host's time before each op beyond dispatch_us: module_call_us per module scope
    entered, and forward_op_us more for a forward op (None when the spec has neither)."""
    if not gpu.module_call_us and not gpu.forward_op_us:
        return None
    extra = scope_entries(ops) * gpu.module_call_us
    if gpu.forward_op_us:
        extra = extra + (ops["phase"] == "forward").to_numpy() * gpu.forward_op_us
    return extra


def schedule(kernel_us: np.ndarray, dispatch_us: float,
             host_us: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Start and end of each kernel when the host issues one op every dispatch_us, plus
    host_us[i] (its module calls, host_extra_us) before op i."""
    starts = np.empty_like(kernel_us)
    ends = np.empty_like(kernel_us)
    device_free = issued = 0.0
    for i, duration in enumerate(kernel_us):
        issued += dispatch_us + (host_us[i] if host_us is not None else 0.0)
        starts[i] = max(issued, device_free)
        ends[i] = device_free = starts[i] + duration
    return starts, ends


def project_ops(ops: pd.DataFrame, gpu: GpuSpec) -> pd.DataFrame:
    """The ops of one method's step with projected start_us and dur_us (in issue order)."""
    ops = ops.sort_values("seq_no").copy()
    if ops.empty:
        return ops.assign(start_us=[], dur_us=[])
    durations = kernel_times_us(ops, gpu)
    calls_us = host_extra_us(ops, gpu)
    if calls_us is not None and gpu.dispatch_us == 0:  # the host is the device: in line
        durations, calls_us = durations + calls_us, None
    starts, _ = schedule(durations, gpu.dispatch_us, calls_us)
    ops["start_us"], ops["dur_us"] = starts, durations
    return ops


def phase_times_ms(ops: pd.DataFrame) -> dict[str, float]:
    """forward/backward/optimizer and step time in ms from projected ops: each phase lasts from
    the end of the previous one to its last kernel's end (host-bound gaps included)."""
    ends = ops["start_us"] + ops["dur_us"]
    times, previous_end = {}, 0.0
    for phase in ("forward", "backward", "optimizer"):
        in_phase = ops["phase"] == phase
        end = float(ends[in_phase].max()) if in_phase.any() else previous_end
        times[phase] = (end - previous_end) / 1e3
        previous_end = end
    times["step"] = previous_end / 1e3
    return times


def module_latencies_ms(ops: pd.DataFrame, ancestors) -> dict[tuple[str, str], float]:
    """Per (module, phase): busy time of its kernels and its submodules', plus the idle gaps
    that precede each of them (the time the device waited for the host to issue them)."""
    ends = (ops["start_us"] + ops["dur_us"]).to_numpy()
    previous_end = np.concatenate([[0.0], ends[:-1]])
    cost = ops["dur_us"].to_numpy() + np.maximum(ops["start_us"].to_numpy() - previous_end, 0.0)
    totals: dict[tuple[str, str], float] = {}
    for keys, us in zip(ancestor_keys(ops["module"].tolist(), ops["phase"].tolist(), ancestors),
                        cost.tolist()):
        ms = us / 1e3
        for key in keys:  # added op by op, in issue order: the same sums as ever
            totals[key] = totals.get(key, 0.0) + ms
    return totals
