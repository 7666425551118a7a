"""The GPU table and the device-spec format: what projection and planning know of a device.

Torch-free: the dashboard, the planner's budget and `--help` read it without importing torch.
A device spec is one GpuSpec. Built-in specs come from datasheets (each names its source);
`--gpu PATH.yaml` reads a custom one in the same format, as `paca-prof calibrate` writes it:

    name: my-card              # any name
    memory_bytes: 25769803776  # what torch.cuda reports as total memory
    bf16_tflops: 165.2         # dense tensor-core peaks (no sparsity)
    fp16_tflops: 165.2
    fp32_tflops: 82.6          # plain fp32 (PyTorch runs fp32 matmuls without TF32 by default)
    hbm_gbps: 1008             # device memory bandwidth, GB/s
    # optional, with the defaults below
    launch_us: 4.0             # device-side gap between back-to-back small kernels
    dispatch_us: 12.0          # host time eager PyTorch spends to issue one op
    cuda_context_bytes: 536870912   # held by the CUDA context, outside PyTorch's allocator
    interconnect: pcie         # nvlink | pcie | infinity-fabric | infiniband | none
    interconnect_gbps: 32      # per GPU and direction, GB/s
    matmul_efficiency: 0.70    # fractions of the peaks that kernels reach
    attention_efficiency: 0.50
    bandwidth_efficiency: 0.80
    foreach_tensor_us: 0.0     # a foreach op's extra cost per input tensor (CPU: a loop)
    module_call_us: 0.0        # host time per module scope entered (calibrate fits it)
    forward_op_us: 0.0         # more host time per forward op (calibrate fits it)
    matmul_curve: []           # [[GEMM FLOPs, efficiency], ...]: efficiency by size (calibrate)
    bandwidth_curve: []        # [[bytes an op moves, GB/s], ...]: bandwidth by size (calibrate)
    mixed_layout_bandwidth_curve: []  # the same, for ops whose operands disagree in layout
    source: "where these numbers come from"

A curve, when given, replaces its single number by size: the projection interpolates it in the
logarithm of the size and holds its end values beyond its ends (engines/project.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

from paca_prof import validate
from paca_prof.units import GIB, MIB

INTERCONNECTS = ("nvlink", "pcie", "infinity-fabric", "infiniband", "none")
# Typical CUDA context of eager PyTorch with cuBLAS loaded (CUDA 12, lazy module loading):
# what nvidia-smi shows beyond max_memory_reserved. An estimate until measured on the card.
DEFAULT_CUDA_CONTEXT_BYTES = 512 * MIB
_OVERHEAD_SOURCE = ("launch/dispatch/efficiencies: uncalibrated estimates (typical eager "
                    "PyTorch, ~4 us gap, ~12 us/op)")


@dataclass(frozen=True)
class GpuSpec:
    """One device for projection and planning (see the module docstring for every field).

    Limits: a GEMM's efficiency and an op's bandwidth depend on its size alone (the curves,
    which calibrate measures) or on nothing (the single numbers of the GPU table); a kernel's
    real throughput depends on its shape too, which calibrate folds into the points it fits."""

    name: str
    memory_bytes: int
    bf16_tflops: float
    fp16_tflops: float
    fp32_tflops: float
    hbm_gbps: float
    launch_us: float = 4.0
    dispatch_us: float = 12.0
    cuda_context_bytes: int = DEFAULT_CUDA_CONTEXT_BYTES
    interconnect: str = "pcie"
    interconnect_gbps: float = 32.0
    matmul_efficiency: float = 0.70
    attention_efficiency: float = 0.50
    bandwidth_efficiency: float = 0.80
    # A foreach op (AdamW's and clipping's _foreach_*) as one kernel costs its bytes; on a
    # CPU it loops over its tensors, each paying this much more (calibrate measures it; the
    # GPU table's 0: CUDA's multi-tensor kernels take dozens of tensors per launch).
    foreach_tensor_us: float = 0.0
    # Entering a module (nn.Module.__call__, hooks, an adapter layer's Python around its ops)
    # costs the host this much beyond the ops' own dispatch (engines/project.py counts the
    # entries). The GPU table's 0: its dispatch_us estimates fold it in; calibrate fits it.
    module_call_us: float = 0.0
    # A forward op costs the host this much more than a backward one: forward ops are issued
    # by the model's Python code, backward ops by autograd's C++ engine (on a CPU about 40 us
    # against 13). The GPU table's 0: dispatch_us is the forward issue cost there, and a
    # GPU's backward is rarely host-bound; calibrate fits it.
    forward_op_us: float = 0.0
    # Measured rates by size (calibrate, on operands out of the caches, as a step's are): a
    # small GEMM reaches less of the peak than a large one, and a small op pays more per
    # byte. Pairs (size, rate), sizes increasing; empty: matmul_efficiency and hbm_gbps x
    # bandwidth_efficiency at every size.
    # calibrate fits matmul_curve on fp32 GEMMs; the projection applies it to every dtype's
    # peak, as it does matmul_efficiency.
    matmul_curve: tuple[tuple[float, float], ...] = ()  # (GEMM FLOPs, efficiency)
    bandwidth_curve: tuple[tuple[float, float], ...] = ()  # (bytes an op moves, GB/s)
    # An element-wise op whose operands disagree on their innermost dimension (a weight plus a
    # product read transposed, as DoRA's) walks one of them across its strides: on a CPU core
    # 2-12x slower than its bytes at bandwidth_curve. Empty: bandwidth_curve's rate.
    mixed_layout_bandwidth_curve: tuple[tuple[float, float], ...] = ()  # (bytes, GB/s)
    source: str = ""

    def to_dict(self) -> dict:
        values = asdict(self)
        for name in CURVES:  # YAML and JSON have lists, not tuples
            values[name] = [list(point) for point in values[name]]
        return values

    @classmethod
    def from_dict(cls, values: dict, what: str = "GPU spec") -> GpuSpec:
        """A spec from a mapping (a YAML file's content), every field checked: ValueError with
        one line naming the field for a missing, unknown or out-of-range value."""
        validate.mapping(values, what)
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"{what}: unknown field(s) {', '.join(unknown)}; "
                             f"known: {', '.join(known)}")
        required = [n for n in ("name", "memory_bytes", "bf16_tflops", "fp16_tflops",
                                "fp32_tflops", "hbm_gbps") if n not in values]
        if required:
            raise ValueError(f"{what}: missing field(s) {', '.join(required)}")
        checked = {"name": validate.text(values["name"], f"{what}: name", 64)}
        bounds = {  # field: (above, maximum, integer)
            "memory_bytes": (0, 2**50, True), "cuda_context_bytes": (-1, 64 * GIB, True),
            "bf16_tflops": (0, 1e5, False), "fp16_tflops": (0, 1e5, False),
            "fp32_tflops": (0, 1e5, False), "hbm_gbps": (0, 1e6, False),
            "launch_us": (-1e-12, 1e4, False), "dispatch_us": (-1e-12, 1e4, False),
            "interconnect_gbps": (0, 1e5, False),
            "matmul_efficiency": (0, 1, False), "attention_efficiency": (0, 1, False),
            "bandwidth_efficiency": (0, 1, False), "foreach_tensor_us": (-1e-12, 1e4, False),
            "module_call_us": (-1e-12, 1e4, False), "forward_op_us": (-1e-12, 1e4, False),
        }
        for name, (above, maximum, integer) in bounds.items():
            if name in values:
                checked[name] = validate.number(values[name], f"{what}: {name}", above=above,
                                                maximum=maximum, integer=integer)
        if "interconnect" in values:
            if values["interconnect"] not in INTERCONNECTS:
                raise ValueError(f"{what}: interconnect must be one of "
                                 f"{', '.join(INTERCONNECTS)}, got {values['interconnect']!r}")
            checked["interconnect"] = values["interconnect"]
        for name, maximum in CURVES.items():
            if name in values:
                checked[name] = _curve(values[name], f"{what}: {name}", maximum)
        if "source" in values:
            checked["source"] = validate.text(values["source"], f"{what}: source")
        return cls(**checked)


CURVES = {"matmul_curve": 1.0, "bandwidth_curve": 1e6,  # field: its rate's maximum
          "mixed_layout_bandwidth_curve": 1e6}
MAX_CURVE_POINTS = 64


def _curve(value, what: str, maximum: float) -> tuple[tuple[float, float], ...]:
    """A rate curve: a list of at most MAX_CURVE_POINTS [size, rate] pairs, sizes positive
    and increasing, rates in (0, maximum]; ValueError in one line otherwise."""
    if not isinstance(value, (list, tuple)) or len(value) > MAX_CURVE_POINTS:
        raise ValueError(f"{what} must be a list of at most {MAX_CURVE_POINTS} [size, rate] "
                         "pairs")
    points = []
    for i, point in enumerate(value):
        if not isinstance(point, (list, tuple)) or len(point) != 2:
            raise ValueError(f"{what}[{i}] must be a [size, rate] pair")
        size = validate.number(point[0], f"{what}[{i}] size", above=0, maximum=1e18)
        rate = validate.number(point[1], f"{what}[{i}] rate", above=0, maximum=maximum)
        if points and size <= points[-1][0]:
            raise ValueError(f"{what}: sizes must increase ({size} after {points[-1][0]})")
        points.append((float(size), float(rate)))
    return tuple(points)


# memory_bytes: the total nvidia-smi (rocm-smi for the MI300X) shows for the card, in MiB as
# printed, times 2**20; each entry says where that figure was seen. GDDR6 cards with ECC on
# (data-center parts, the default there) show 1/16 less than their marketing size.
# torch.cuda.mem_get_info's total is a few hundred MiB lower than nvidia-smi's on recent
# NVIDIA cards (79.35 GiB on an A100 80GB, 79.15 GiB on an H100 SXM, 182633 MiB on a B200):
# the driver keeps that part.
# cuda_context_bytes: no per-card measurement was found except the B200's; the others keep
# the default, against published totals of 274-400 MiB for PyTorch's context with lazy
# loading (pytorch/pytorch PR #86509: 287,047,680 bytes; issues #107667, #109888: ~300 and
# ~400 MB), which exclude cuBLAS/cuDNN kernels loaded later.
_CONTEXT_DEFAULT = ("CUDA context: the 512 MiB default (no measurement on this card found; "
                    "PyTorch reports 274-400 MiB with lazy loading, pytorch#86509, #109888)")
# interconnect_gbps is per GPU and direction: half the bidirectional figures datasheets give.
_PCIE3, _PCIE4 = 16.0, 32.0  # x16 links, GB/s per direction

GPUS: dict[str, GpuSpec] = {g.name: g for g in [
    GpuSpec("a100-40gb", 40960 * MIB, 312.0, 312.0, 19.5, 1555.0,
            interconnect="nvlink", interconnect_gbps=300.0,
            source="NVIDIA A100 datasheet (SXM4; NVLink 3, 600 GB/s bidirectional); "
                   + _CONTEXT_DEFAULT + "; " + _OVERHEAD_SOURCE),
    GpuSpec("a100-80gb", 81920 * MIB, 312.0, 312.0, 19.5, 2039.0,
            interconnect="nvlink", interconnect_gbps=300.0,
            source="NVIDIA A100 datasheet (SXM4; NVLink 3, 600 GB/s bidirectional); "
                   + _CONTEXT_DEFAULT + "; " + _OVERHEAD_SOURCE),
    GpuSpec("h100-80gb", 81559 * MIB, 989.0, 989.0, 67.0, 3350.0,
            interconnect="nvlink", interconnect_gbps=450.0,
            source="NVIDIA H100 datasheet (SXM5; NVLink 4, 900 GB/s bidirectional); "
                   + _CONTEXT_DEFAULT + "; " + _OVERHEAD_SOURCE),
    # 143771 MiB: nvidia-smi on this project's H200 device machine (.library/device/KINDS.md).
    GpuSpec("h200", 143771 * MIB, 989.0, 989.0, 67.0, 4800.0,
            interconnect="nvlink", interconnect_gbps=450.0,
            source="NVIDIA H200 datasheet (SXM; NVLink 4, 900 GB/s bidirectional); "
                   + _CONTEXT_DEFAULT + "; " + _OVERHEAD_SOURCE),
    GpuSpec("l4", 23034 * MIB, 121.0, 121.0, 30.3, 300.0,
            interconnect="pcie", interconnect_gbps=_PCIE4,
            source="NVIDIA L4 datasheet (PCIe Gen4 x16); " + _CONTEXT_DEFAULT + "; "
                   + _OVERHEAD_SOURCE),
    GpuSpec("rtx-4090", 24564 * MIB, 165.2, 165.2, 82.6, 1008.0,
            interconnect="pcie", interconnect_gbps=_PCIE4,
            source="NVIDIA Ada whitepaper (RTX 4090, fp32 accumulate; PCIe Gen4 x16); "
                   + _CONTEXT_DEFAULT + "; " + _OVERHEAD_SOURCE),
    # 46068 MiB (48 GB GDDR6, ECC on): nvidia-smi on AWS and other L40S hosts.
    GpuSpec("l40s", 46068 * MIB, 362.05, 362.05, 91.6, 864.0,
            interconnect="pcie", interconnect_gbps=_PCIE4,
            source="NVIDIA L40S datasheet (dense tensor figures; PCIe Gen4 x16); "
                   + _CONTEXT_DEFAULT + "; " + _OVERHEAD_SOURCE),
    # 49140 MiB: nvidia-smi with ECC off, the workstation default (46068 MiB with ECC on).
    # The optional NVLink bridge (112.5 GB/s bidirectional) joins two cards; PCIe is modelled.
    GpuSpec("a6000", 49140 * MIB, 154.8, 154.8, 38.7, 768.0,
            interconnect="pcie", interconnect_gbps=_PCIE4,
            source="NVIDIA RTX A6000 datasheet and Ampere GA102 whitepaper (tensor with fp32 "
                   "accumulate, dense; PCIe Gen4 x16); " + _CONTEXT_DEFAULT + "; "
                   + _OVERHEAD_SOURCE),
    # 23028 MiB (24 GB GDDR6, ECC on): nvidia-smi on AWS g5 instances.
    GpuSpec("a10g", 23028 * MIB, 70.0, 70.0, 35.0, 600.0,
            interconnect="pcie", interconnect_gbps=_PCIE4,
            source="NVIDIA A10G datasheet for AWS (Feb 2022: fp32 35, bf16/fp16 tensor 70 dense; "
                   "not the A10's 125); PCIe Gen4 x16; " + _CONTEXT_DEFAULT + "; "
                   + _OVERHEAD_SOURCE),
    # 24576 MiB: nvidia-smi on an RTX 3090. Optional NVLink bridge not modelled.
    GpuSpec("rtx-3090", 24576 * MIB, 71.0, 71.0, 35.6, 936.0,
            interconnect="pcie", interconnect_gbps=_PCIE4,
            source="NVIDIA Ampere GA102 whitepaper (RTX 3090: tensor with fp32 accumulate 71 "
                   "dense, half the fp16-accumulate rate; PCIe Gen4 x16); " + _CONTEXT_DEFAULT
                   + "; " + _OVERHEAD_SOURCE),
    # 15360 MiB (16 GB GDDR6, ECC on): nvidia-smi on a T4 (Colab, AWS g4dn, GCP).
    # Turing has no bf16 tensor cores: bf16 matmuls run emulated on the fp32 units. No PyTorch
    # measurement on a T4 was found; bf16 = fp32 peak x 0.69, the bf16/fp32 ratio measured with
    # cuBLAS on a V100 (lablup/mlxcel#1654: 9.6 vs 14.0 TFLOP/s), an estimate.
    GpuSpec("t4", 15360 * MIB, 5.6, 65.0, 8.1, 320.0,
            interconnect="pcie", interconnect_gbps=_PCIE3,
            source="NVIDIA T4 datasheet (fp16 65 mixed precision, fp32 8.1; PCIe Gen3 x16); "
                   "bf16 estimated: no bf16 tensor cores, fp32 peak x 0.69 (ratio measured on a "
                   "V100, lablup/mlxcel#1654); " + _CONTEXT_DEFAULT + "; " + _OVERHEAD_SOURCE),
    # 32510 MiB: nvidia-smi on V100-SXM2-32GB (and PCIe 32 GB) cards.
    # Volta has no bf16: cuBLAS bf16 GEMMs measured 9.6 TFLOP/s where fp32 reached 14.0 on a
    # V100 (lablup/mlxcel#1654); bf16 = datasheet fp32 15.7 x 9.6 / 14.0.
    GpuSpec("v100-32gb", 32510 * MIB, 10.8, 125.0, 15.7, 900.0,
            interconnect="nvlink", interconnect_gbps=150.0,
            source="NVIDIA V100 datasheet (SXM2 32GB: tensor 125, fp32 15.7; NVLink 2, 300 GB/s "
                   "bidirectional); bf16 from a measured bf16/fp32 ratio (lablup/mlxcel#1654), "
                   "no bf16 hardware; " + _CONTEXT_DEFAULT + "; " + _OVERHEAD_SOURCE),
    # 95830 MiB (94 GB HBM3): nvidia-smi on H100 NVL cards. NVLink bridges join pairs.
    GpuSpec("h100-nvl", 95830 * MIB, 835.5, 835.5, 60.0, 3900.0,
            interconnect="nvlink", interconnect_gbps=300.0,
            source="NVIDIA H100 datasheet (H100 NVL: bf16/fp16 1671 with sparsity, 835.5 dense; "
                   "NVLink bridge 600 GB/s bidirectional, PCIe Gen5 x16); " + _CONTEXT_DEFAULT
                   + "; " + _OVERHEAD_SOURCE),
    # 183359 MiB: nvidia-smi on HGX B200 nodes (marketed 180 GB per GPU).
    GpuSpec("b200", 183359 * MIB, 2250.0, 2250.0, 75.0, 8000.0,
            cuda_context_bytes=612 * MIB, interconnect="nvlink", interconnect_gbps=900.0,
            source="NVIDIA HGX B200 datasheet (8 GPUs: bf16/fp16 36 PFLOPS with sparsity, fp32 "
                   "600 TFLOPS, 64 TB/s; per GPU dense 2250, 75, 8000; NVLink 5, 1.8 TB/s "
                   "bidirectional); CUDA context: 612 MiB measured on a B200 after "
                   "torch.cuda.mem_get_info (unslothai/unsloth PR #8669), before cuBLAS loads, "
                   "a floor; " + _OVERHEAD_SOURCE),
    # 196288 MiB = 205,822,885,888 bytes (192 GB HBM3): rocm-smi's VRAM total and
    # torch.cuda.mem_get_info on MI300X hosts (MI300X VF in clouds).
    # ROCm's caching allocator is PyTorch's; its HIP context is not measured here.
    GpuSpec("mi300x", 196288 * MIB, 1307.4, 1307.4, 163.4, 5300.0,
            interconnect="infinity-fabric", interconnect_gbps=448.0,
            source="AMD Instinct MI300X datasheet (bf16/fp16 1307.4 dense, fp32 163.4, 5.3 TB/s; "
                   "7 Infinity Fabric links, 128 GB/s bidirectional each, 448 GB/s per "
                   "direction); HIP context: the 512 MiB default, not measured (vLLM PR #43236 "
                   "finds ROCm's larger than CUDA's); " + _OVERHEAD_SOURCE),
]}


def gpu_spec(name: str) -> GpuSpec:
    """The spec of a built-in GPU by name, or of a YAML spec file when `name` ends in .yaml or
    .yml. ValueError (one line) listing the known GPUs for an unknown name, or naming the
    problem with a spec file (missing, not a regular file, too large, not YAML, bad fields)."""
    if str(name).endswith((".yaml", ".yml")):
        return load_spec(name)
    if name not in GPUS:
        raise ValueError(f"unknown GPU {name!r}; choose from {', '.join(GPUS)} "
                         "or give a spec file (PATH.yaml)")
    return GPUS[name]


def match_device(device_name: str) -> GpuSpec | None:
    """The built-in spec whose name a CUDA device name spells ("NVIDIA H200" -> h200, "NVIDIA
    A100-SXM4-80GB" -> a100-80gb), or None. Longest match first, so h100-nvl wins over h100."""
    words = device_name.lower().replace("nvidia", "").replace("geforce", "").replace(" ", "-")
    words = words.replace("_", "-")
    best = None
    for name, spec in GPUS.items():
        parts = name.split("-")
        if all(part in words for part in parts) and (best is None or len(name) > len(best.name)):
            best = spec
    return best


def load_spec(path: str | Path) -> GpuSpec:
    """Read a device spec file (the module docstring's format); ValueError in one line."""
    import yaml

    data = validate.read_small_file(path, "GPU spec", limit=64 * 2**10)
    try:
        values = yaml.safe_load(data.decode("utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ValueError(f"GPU spec {path}: not YAML ({type(error).__name__})") from None
    return GpuSpec.from_dict(values, f"GPU spec {path}")


def write_spec(spec: GpuSpec, path: str | Path) -> Path:
    """Write a spec in the format load_spec reads (as calibrate does)."""
    import yaml

    path = Path(path)
    path.write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False))
    return path
