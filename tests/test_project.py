"""The cost model behind every projected millisecond (paca_prof/engines/project.py), on a made-up
device and a handful of ops whose times are worked out by hand in the comments. Any change to a
formula, a peak, an efficiency, the launch or the dispatch cost fails one of these."""

from __future__ import annotations

from dataclasses import replace

import pandas as pd
import pytest

from paca_prof.engines import project
from paca_prof.modules import ancestors
from paca_prof.gpus import GpuSpec

# A round device: 100 TFLOP/s bf16, 50 fp16, 10 fp32, 1000 GB/s; matmul efficiency 0.5,
# attention 0.25, bandwidth 0.8; launch 2 us, dispatch 5 us.
DEVICE = GpuSpec("made-up", 2**34, bf16_tflops=100.0, fp16_tflops=50.0, fp32_tflops=10.0,
                 hbm_gbps=1000.0, launch_us=2.0, dispatch_us=5.0, matmul_efficiency=0.5,
                 attention_efficiency=0.25, bandwidth_efficiency=0.8, source="test")

Q = "model.layers.0.self_attn.q_proj"
ATTN = "model.layers.0.self_attn"


def _ops(rows) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=["module", "phase", "name", "dtype", "flops", "bytes"])
    return frame.assign(method="lora", seq_no=range(len(frame)))


OPS = _ops([
    # 2 GFLOP bf16 matmul: 2e9 / (100e12 * 0.5) = 40 us of compute, 1 MB / (1000e9 * 0.8)
    # = 1.25 us of memory: compute-bound, 40 + 2 (launch) = 42 us
    (Q, "forward", "aten::mm", "bfloat16", 2e9, 1e6),
    # an element-wise add moving 8 MB: 8e6 / 800e9 = 10 us, + 2 = 12 us
    (ATTN, "forward", "aten::add", "bfloat16", 0.0, 8e6),
    # flash attention backward, 10 GFLOP at the attention efficiency:
    # 1e10 / (100e12 * 0.25) = 400 us, + 2 = 402 us
    (ATTN, "backward", "aten::_scaled_dot_product_flash_attention_backward", "bfloat16", 1e10,
     1e6),
    # 0.1 GFLOP fp32 matmul: 1e8 / (10e12 * 0.5) = 20 us, + 2 = 22 us
    (Q, "backward", "aten::mm", "float32", 1e8, 1e5),
    # an fp16 matmul uses the fp16 peak: 1e9 / (50e12 * 0.5) = 40 us, + 2 = 42 us
    (Q, "backward", "aten::mm", "float16", 1e9, 1e5),
    # an optimizer op with nothing to compute or move still costs its launch: 2 us
    ("[optimizer]", "optimizer", "aten::_foreach_add_", "float32", 0.0, 0.0),
])
KERNEL_US = [42.0, 12.0, 402.0, 22.0, 42.0, 2.0]
# The host issues op i at (i + 1) * 5 us; a kernel starts when issued and the device is free:
#   op0 issued 5, starts 5, ends 47; op1 issued 10, starts 47, ends 59;
#   op2 issued 15, starts 59, ends 461; op3 issued 20, starts 461, ends 483;
#   op4 issued 25, starts 483, ends 525; op5 issued 30, starts 525, ends 527.
STARTS = [5.0, 47.0, 59.0, 461.0, 483.0, 525.0]


def test_kernel_times_are_roofline_plus_launch():
    assert project.kernel_times_us(OPS, DEVICE).tolist() == pytest.approx(KERNEL_US)


def test_schedule_waits_for_the_host_and_for_the_device():
    starts, ends = project.schedule(pd.Series(KERNEL_US).to_numpy(), DEVICE.dispatch_us)
    assert starts.tolist() == pytest.approx(STARTS)
    assert ends.tolist() == pytest.approx([47.0, 59.0, 461.0, 483.0, 525.0, 527.0])


def test_small_kernels_are_bound_by_the_host_and_leave_the_device_idle():
    # four 2 us kernels issued 5 us apart: each starts when issued; 3 us idle between them
    starts, ends = project.schedule(pd.Series([2.0] * 4).to_numpy(), 5.0)
    assert starts.tolist() == [5.0, 10.0, 15.0, 20.0]
    assert ends.tolist() == [7.0, 12.0, 17.0, 22.0]


def test_projected_ops_phase_times_and_module_latencies():
    projected = project.project_ops(OPS, DEVICE)
    assert projected["start_us"].tolist() == pytest.approx(STARTS)
    assert projected["dur_us"].tolist() == pytest.approx(KERNEL_US)
    # forward ends with op1 at 59 us; backward with op4 at 525; the optimizer at 527
    assert project.phase_times_ms(projected) == pytest.approx(
        {"forward": 0.059, "backward": (525 - 59) / 1e3, "optimizer": 0.002, "step": 0.527})
    # A module's latency: its kernels' time plus the idle time just before each of them.
    #   op0 (q_proj fwd): 42 + 5 idle = 47; op1 (self_attn fwd): 12 + 0
    #   op2 (self_attn bwd): 402; op3 and op4 (q_proj bwd): 22 + 42; op5 (optimizer): 2
    latencies = project.module_latencies_ms(projected, ancestors)
    assert latencies[(Q, "forward")] == pytest.approx(0.047)
    assert latencies[(ATTN, "forward")] == pytest.approx(0.059)  # includes q_proj's 47
    assert latencies[("model.layers.0", "forward")] == pytest.approx(0.059)
    assert latencies[(Q, "backward")] == pytest.approx(0.064)
    assert latencies[(ATTN, "backward")] == pytest.approx(0.466)
    assert latencies[("[root]", "backward")] == pytest.approx(0.466)
    assert latencies[("[optimizer]", "optimizer")] == pytest.approx(0.002)


def test_ops_are_projected_in_issue_order_whatever_the_row_order():
    shuffled = OPS.sample(frac=1.0, random_state=3)
    projected = project.project_ops(shuffled, DEVICE)
    assert projected["seq_no"].tolist() == list(range(len(OPS)))
    assert projected["start_us"].tolist() == pytest.approx(STARTS)


# Module scopes the op stream enters at each op of OPS: op0 enters q_proj and its five
# ancestors ([root], model, model.layers, model.layers.0, self_attn); op1 stays inside them;
# op2 starts the backward phase inside self_attn (five); op3 enters q_proj; op4 stays there;
# op5 starts the optimizer phase in its own scope.
ENTRIES = [6, 0, 5, 1, 0, 1]


def test_scope_entries_count_the_modules_each_op_enters():
    assert project.scope_entries(OPS).tolist() == ENTRIES


def test_module_calls_delay_the_host_on_a_device_with_its_own_host():
    # module_call_us 1 on top of dispatch 5: op i is issued at the sum over ops <= i of
    # 5 + entries: 11, 16, 26, 32, 37, 43. op0 starts at 11 and ends at 53; from then on the
    # device is the bound: 53-65, 65-467, 467-489, 489-531, 531-533. Kernel times unchanged.
    projected = project.project_ops(OPS, replace(DEVICE, module_call_us=1.0))
    assert projected["start_us"].tolist() == pytest.approx([11.0, 53.0, 65.0, 467.0, 489.0,
                                                            531.0])
    assert projected["dur_us"].tolist() == pytest.approx(KERNEL_US)


def test_module_calls_are_paid_in_line_where_the_host_is_the_device():
    # dispatch 0 (a CPU spec): 3 us per entry join each op's own time:
    # 42 + 18, 12, 402 + 15, 22 + 3, 42, 2 + 3; one after another from 0.
    cpu_like = replace(DEVICE, dispatch_us=0.0, module_call_us=3.0)
    projected = project.project_ops(OPS, cpu_like)
    assert projected["dur_us"].tolist() == pytest.approx([60.0, 12.0, 417.0, 25.0, 42.0, 5.0])
    assert projected["start_us"].tolist() == pytest.approx([0.0, 60.0, 72.0, 489.0, 514.0,
                                                            556.0])


def test_forward_ops_pay_their_extra_host_cost_in_line_on_a_cpu_spec():
    # dispatch 0, forward_op_us 10: the two forward ops (op0, op1) cost 10 us more each, the
    # backward and optimizer ops nothing more: 52, 22, 402, 22, 42, 2, one after another.
    cpu_like = replace(DEVICE, dispatch_us=0.0, forward_op_us=10.0)
    projected = project.project_ops(OPS, cpu_like)
    assert projected["dur_us"].tolist() == pytest.approx([52.0, 22.0, 402.0, 22.0, 42.0, 2.0])
    assert projected["start_us"].tolist() == pytest.approx([0.0, 52.0, 74.0, 476.0, 498.0,
                                                            540.0])


def test_forward_ops_delay_the_host_on_a_device_with_its_own_host():
    # dispatch 5 plus 10 per forward op: issued at 15, 30, 35, 40, 45, 50. op0 15-57, op1
    # 57-69, then the device is the bound: 69-471, 471-493, 493-535, 535-537.
    projected = project.project_ops(OPS, replace(DEVICE, forward_op_us=10.0))
    assert projected["start_us"].tolist() == pytest.approx([15.0, 57.0, 69.0, 471.0, 493.0,
                                                            535.0])
    assert projected["dur_us"].tolist() == pytest.approx(KERNEL_US)


def test_a_curve_interpolates_in_log_size_and_holds_its_ends():
    # points at 10 and 1000: 100 is halfway in log size, so halfway in rate
    curve = ((10.0, 0.2), (1000.0, 0.6))
    rates = project.curve_at(curve, pd.Series([1.0, 10.0, 100.0, 1000.0, 1e6]).to_numpy(), 0.9)
    assert rates.tolist() == pytest.approx([0.2, 0.2, 0.4, 0.6, 0.6])
    assert project.curve_at((), pd.Series([1.0, 5.0]).to_numpy(), 0.9).tolist() == [0.9, 0.9]


def test_kernel_times_follow_the_spec_curves_by_size():
    # matmul efficiency 0.25 at 1e8 FLOPs and 1.0 at 1e10 (so 0.625 at 1e9); bandwidth 100 GB/s
    # at 1 MB, 400 at 100 MB (so 250 at 10 MB); attention keeps its own efficiency
    curved = replace(DEVICE, matmul_curve=((1e8, 0.25), (1e10, 1.0)),
                     bandwidth_curve=((1e6, 100.0), (1e8, 400.0)))
    ops = _ops([
        # 1e9 bf16 FLOPs at 0.625 of 100 TFLOP/s: 16 us; 1 MB at 100 GB/s: 10 us; + 2 = 18 us
        (Q, "forward", "aten::mm", "bfloat16", 1e9, 1e6),
        # 10 MB at 250 GB/s = 40 us, + 2 = 42 us (the flat spec: 10e6 / 800e9 = 12.5 us)
        (ATTN, "forward", "aten::add", "bfloat16", 0.0, 1e7),
        # attention: 1e10 / (100e12 * 0.25) = 400 us, its bytes 1 MB: 10 us; + 2 = 402 us
        (ATTN, "backward", "aten::_scaled_dot_product_flash_attention_backward", "bfloat16",
         1e10, 1e6),
        # 1e7 fp32 FLOPs, below the curve: efficiency 0.25, 1e7 / (10e12 * 0.25) = 4 us;
        # 1 kB below the curve: 100 GB/s, 0.01 us; + 2 = 6 us
        (Q, "backward", "aten::mm", "float32", 1e7, 1e3),
    ])
    assert project.kernel_times_us(ops, curved).tolist() == pytest.approx([18.0, 42.0, 402.0,
                                                                           6.0])


def test_an_op_whose_operands_disagree_in_layout_moves_its_bytes_at_the_mixed_rate():
    # bandwidth 400 GB/s at every size; mixed layout: 100 GB/s at 1 MB, 20 at 100 MB (so 60 at
    # 10 MB: halfway in log size, so halfway in rate)
    spec = replace(DEVICE, bandwidth_curve=((1e6, 400.0), (1e8, 400.0)),
                   mixed_layout_bandwidth_curve=((1e6, 100.0), (1e8, 20.0)))
    ops = _ops([(ATTN, "forward", "aten::add", "float32", 0.0, 1e6),
                (ATTN, "forward", "aten::add", "float32", 0.0, 1e6),
                (ATTN, "forward", "aten::add", "float32", 0.0, 1e7),
                (ATTN, "backward", "aten::add", "float32", 0.0, 1e7)])
    ops["mixed_layout"] = pd.array([False, True, True, pd.NA], dtype="boolean")
    # 1 MB at 400 GB/s: 2.5 us; at 100: 10 us; 10 MB at 60 GB/s: 166.7 us; NA: not mixed,
    # 25 us; + 2 us launch each
    assert project.kernel_times_us(ops, spec).tolist() == pytest.approx(
        [4.5, 12.0, 2 + 1e7 / 60e3, 27.0])
    # a spec without the curve, or ops without the column: the ordinary rate
    plain = replace(spec, mixed_layout_bandwidth_curve=())
    assert project.kernel_times_us(ops, plain).tolist() == pytest.approx([4.5, 4.5, 27.0, 27.0])
    assert project.kernel_times_us(ops.drop(columns="mixed_layout"), spec).tolist() == \
        pytest.approx([4.5, 4.5, 27.0, 27.0])
