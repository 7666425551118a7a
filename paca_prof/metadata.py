"""run.yaml's content (DESIGN.md's trace folder), from plain values: what ran, where, with which
settings and assumptions, and where each kind of number comes from.

Every engine (measured and simulated runs, the planner, profile() over a user's own loop)
builds its run.yaml here, so the keys mean the same in every trace.
"""

from __future__ import annotations

import os
import platform
from datetime import datetime, timezone
from pathlib import Path

OPS_MEANING = "CUDA: device kernels; CPU and simulation: outermost aten ops with a kernel"


def run_metadata(*, command: str, model_name: str, model_config: dict, seq: int | None,
                 batch: int | None, dtype: str, seed: int, device: dict, sources: dict,
                 methods: dict[str, dict], recipe: dict, assumptions: dict,
                 gpu: dict | None = None, **extra) -> dict:
    """The run.yaml mapping. `sources` is {"time": measured|projected|None, "bytes":
    measured|simulated}; `source` (one word, for old readers) is the time's, or the bytes'."""
    import peft
    import torch
    import transformers

    from paca_prof import __version__

    return {
        "source": sources.get("time") or sources["bytes"],
        "sources": sources,
        "command": command,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {"name": model_name, "config": model_config},
        "seq": seq,
        "batch": batch,
        "dtype": dtype,
        "seed": seed,
        "device": device,
        "gpu": gpu,
        "methods": methods,
        "recipe": recipe,
        "assumptions": {"ops": OPS_MEANING, **assumptions},
        **extra,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "peft": peft.__version__,
                     "paca_prof": __version__},
    }


def config_dict(config) -> dict:
    """A transformers config as run.yaml records it: the values that differ from the class's
    defaults, with model_type."""
    values = config.to_diff_dict() if hasattr(config, "to_diff_dict") else config.to_dict()
    values.setdefault("model_type", config.model_type)
    return values


def device_info(device: str, gpu=None) -> dict:
    """The device of a run: its type, a name a person recognises, and its memory."""
    import torch

    if device == "meta":
        name = f"{gpu.name} (projected)" if gpu else "meta device (simulated)"
        return {"type": "meta", "name": name, "memory_bytes": gpu.memory_bytes if gpu else None}
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        return {"type": "cuda", "name": props.name, "memory_bytes": props.total_memory}
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"type": device, "name": cpu_name(), "memory_bytes": memory,
            "threads": torch.get_num_threads()}


def cpu_name() -> str:
    """The CPU's model name ("AMD EPYC 7B13"), from /proc/cpuinfo where there is one."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
