"""Throughput of a step: tokens per second, achieved TFLOP/s and MFU against a device's peak.
Torch-free; the same formulas for measured and projected rows (their step_ms says which).

    tokens_per_s     = batch * seq * grad_accum / step time
    achieved_tflops  = FLOPs of the step / step time / 1e12
    mfu              = achieved_tflops / the device's peak for the compute dtype

Limits: the FLOPs are those counted on the step's ops (flops.py: matmuls, convolutions and
attention; element-wise ops count 0), so recomputation under gradient checkpointing counts
(a hardware FLOPs utilisation rather than the 6 N D model FLOPs); a measured step's FLOPs come
from its profiled step. The peak is a datasheet's dense figure (GpuSpec) or, for a spec that
`paca-prof calibrate` wrote, the best GEMM rate measured on the device, so an MFU against it
reads "of what this device's GEMMs reach", not "of the silicon's peak".
"""

from __future__ import annotations

THROUGHPUT_COLUMNS = ("tokens_per_s", "step_tflop", "achieved_tflops", "mfu")


def peak_tflops(gpu, dtype: str) -> float | None:
    """The peak of `gpu` (a GpuSpec) for a compute dtype (bf16, fp16, fp32); None without."""
    if gpu is None:
        return None
    return {"bf16": gpu.bf16_tflops, "fp16": gpu.fp16_tflops}.get(dtype, gpu.fp32_tflops)


def throughput(step_ms: float, tokens: int, flops: float | None,
               peak: float | None) -> dict[str, float]:
    """The throughput columns of one summary row (NaN where a number is missing)."""
    nan = float("nan")
    if not step_ms == step_ms or step_ms <= 0:
        return {c: nan for c in THROUGHPUT_COLUMNS}
    seconds = step_ms / 1e3
    achieved = flops / seconds / 1e12 if flops else nan
    return {"tokens_per_s": tokens / seconds,
            "step_tflop": flops / 1e12 if flops else nan,
            "achieved_tflops": achieved,
            "mfu": achieved / peak if peak and achieved == achieved else nan}
