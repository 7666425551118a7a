"""FLOPs of an op: one definition for measured and simulated runs, torch's own formulas.

torch.utils.flop_counter's registry counts matmuls, convolutions and attention kernels from
input shapes. A simulation passes the op's real arguments (meta tensors); a measured run passes
the input shapes the profiler recorded, which the same formulas read (they see only shapes).
Ops the registry lacks are added here with torch's own counting: the CPU flash-attention
kernel SDPA runs on a CPU, grouped matmuls (mixture-of-experts layers), and bitsandbytes'
4-bit matmul (QLoRA's base layers; by name, so that bitsandbytes need not be imported).

Limits: element-wise ops, norms and the loss count 0 (as in torch's FlopCounterMode); causal
attention is counted as full attention (as torch does); an op the profiler recorded without
shapes counts 0.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.flop_counter import (
    flop_registry,
    register_flop_formula,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)

aten = torch.ops.aten


def _register_missing() -> None:
    cpu_flash = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_flash is not None and cpu_flash not in flop_registry:
        @register_flop_formula(cpu_flash)
        def _cpu_flash(query, key, value, *args, out_shape=None, **kwargs) -> int:
            return sdpa_flop_count(query, key, value)

    cpu_flash_bw = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if cpu_flash_bw is not None and cpu_flash_bw not in flop_registry:
        @register_flop_formula(cpu_flash_bw)
        def _cpu_flash_backward(grad_out, query, key, value, *args, out_shape=None,
                                **kwargs) -> int:
            return sdpa_backward_flop_count(grad_out, query, key, value)

    grouped = getattr(aten, "_grouped_mm", None)
    if grouped is not None and grouped not in flop_registry:
        @register_flop_formula(grouped)
        def _grouped_mm(mat_a, mat_b, *args, out_shape=None, **kwargs) -> int:
            # (tokens x K) @ (experts x K x N) with offsets: each token row meets one expert;
            # (experts x M x K) @ (experts x K x N): a batch of matmuls
            if len(mat_a) == 2 and len(mat_b) == 3:
                return 2 * mat_a[0] * mat_a[1] * mat_b[2]
            if len(mat_a) == 3 and len(mat_b) == 3:
                return 2 * mat_a[0] * mat_a[1] * mat_a[2] * mat_b[2]
            if len(mat_a) == 3 and len(mat_b) == 2:
                return 2 * mat_a[0] * mat_a[1] * mat_a[2] * mat_b[1]
            return 2 * mat_a[0] * mat_a[1] * mat_b[1]  # 2-D by 2-D with offsets along K


_register_missing()


def _shape(value):
    return value.shape if isinstance(value, torch.Tensor) else value


def _gemm_4bit(a, b, *args, **kwargs) -> int:
    # A (... x K) times the packed N x K weight B: two 4-bit values a byte, so N*K = 2*numel(B)
    # (B's own shape is what both a simulation and the profiler see).
    a, b = _shape(a), _shape(b)
    rows = 1
    for d in a[:-1]:
        rows *= d
    packed = 1
    for d in b:
        packed *= d
    return 2 * rows * 2 * packed


NAMED_FORMULAS = {"bitsandbytes::gemm_4bit": _gemm_4bit}


def _formula(packet):
    if packet is None:
        return None
    return flop_registry.get(packet) or NAMED_FORMULAS.get(packet._qualified_op_name)


def op_flops(func, args=(), kwargs=None, out=None) -> float:
    """FLOPs of one call of an op (an OpOverload), from its arguments or their shapes."""
    formula = _formula(func._overloadpacket)
    if formula is None:
        return 0.0
    try:
        return float(formula(*args, **(kwargs or {}), out_val=out))
    except (TypeError, ValueError, RuntimeError, AssertionError, IndexError):
        return 0.0


@functools.cache
def _packet(name: str):
    """The op packet for a profiler name such as "aten::addmm", or None."""
    namespace, _, op = name.partition("::")
    try:
        return getattr(getattr(torch.ops, namespace), op)
    except (AttributeError, RuntimeError):
        return None


def profiled_op_flops(name: str, input_shapes: list[list[int]]) -> float:
    """FLOPs of an op the profiler recorded by name, from its "Input Dims" (one list per
    input; scalars and absent inputs as empty lists)."""
    formula = NAMED_FORMULAS.get(name) or _formula(_packet(name))
    if formula is None:
        return 0.0
    shapes = [torch.Size(s) if isinstance(s, list) and all(isinstance(d, int) for d in s)
              else s for s in input_shapes]
    # The profiler lists every input, scalars (beta, alpha, dropout_p) as empty dims; a formula
    # takes its tensor arguments positionally and may refuse the extra ones: drop trailing
    # non-tensor inputs until it accepts.
    while True:
        try:
            return float(formula(*shapes))
        except TypeError:
            if not shapes or len(shapes[-1]) != 0:
                return 0.0
            shapes = shapes[:-1]
        except (ValueError, RuntimeError, AssertionError, IndexError):
            return 0.0
