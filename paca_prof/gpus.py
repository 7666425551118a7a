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
    interconnect: pcie         # nvlink | pcie | infiniband | none
    interconnect_gbps: 32      # per GPU and direction, GB/s
    matmul_efficiency: 0.70    # fractions of the peaks that kernels reach
    attention_efficiency: 0.50
    bandwidth_efficiency: 0.80
    source: "where these numbers come from"
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

from paca_prof import validate
from paca_prof.units import GIB, MIB

INTERCONNECTS = ("nvlink", "pcie", "infiniband", "none")
# Typical CUDA context of eager PyTorch with cuBLAS loaded (CUDA 12, lazy module loading):
# what nvidia-smi shows beyond max_memory_reserved. An estimate until measured on the card.
DEFAULT_CUDA_CONTEXT_BYTES = 512 * MIB
_OVERHEAD_SOURCE = ("launch/dispatch/efficiencies: uncalibrated estimates (typical eager "
                    "PyTorch, ~4 us gap, ~12 us/op)")


@dataclass(frozen=True)
class GpuSpec:
    """One device for projection and planning (see the module docstring for every field).

    Limits: one number per peak and per efficiency; a kernel's real throughput depends on its
    shape, which `paca-prof calibrate` folds into the efficiencies it fits."""

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
    source: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

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
            "bandwidth_efficiency": (0, 1, False),
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
        if "source" in values:
            checked["source"] = validate.text(values["source"], f"{what}: source")
        return cls(**checked)


GPUS: dict[str, GpuSpec] = {g.name: g for g in [
    GpuSpec("a100-40gb", 40960 * MIB, 312.0, 312.0, 19.5, 1555.0,
            interconnect="nvlink", interconnect_gbps=300.0,
            source="NVIDIA A100 datasheet (SXM); " + _OVERHEAD_SOURCE),
    GpuSpec("a100-80gb", 81920 * MIB, 312.0, 312.0, 19.5, 2039.0,
            interconnect="nvlink", interconnect_gbps=300.0,
            source="NVIDIA A100 datasheet (SXM); " + _OVERHEAD_SOURCE),
    GpuSpec("h100-80gb", 81559 * MIB, 989.0, 989.0, 67.0, 3350.0,
            interconnect="nvlink", interconnect_gbps=450.0,
            source="NVIDIA H100 datasheet (SXM); " + _OVERHEAD_SOURCE),
    GpuSpec("h200", 143771 * MIB, 989.0, 989.0, 67.0, 4800.0,
            interconnect="nvlink", interconnect_gbps=450.0,
            source="NVIDIA H200 datasheet (SXM); " + _OVERHEAD_SOURCE),
    GpuSpec("l4", 23034 * MIB, 121.0, 121.0, 30.3, 300.0, interconnect_gbps=32.0,
            source="NVIDIA L4 datasheet; " + _OVERHEAD_SOURCE),
    GpuSpec("rtx-4090", 24564 * MIB, 165.2, 165.2, 82.6, 1008.0, interconnect_gbps=32.0,
            source="NVIDIA Ada whitepaper (RTX 4090, fp32 accumulate); " + _OVERHEAD_SOURCE),
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
