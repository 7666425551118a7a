"""Model presets (transformers configs, random weights, never downloaded) and the GPU table.

The architecture numbers are the published config.json values of each model.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

_LLAMA3 = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
               rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=128001)
_LLAMA31_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                     original_max_position_embeddings=8192)

MODEL_PRESETS: dict[str, dict] = {
    "tiny": dict(model_type="llama", vocab_size=1024, hidden_size=128, intermediate_size=352,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 max_position_embeddings=4096),
    "llama2-7b": dict(model_type="llama", vocab_size=32000, hidden_size=4096,
                      intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5),
    "llama2-13b": dict(model_type="llama", vocab_size=32000, hidden_size=5120,
                       intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                       num_key_value_heads=40, max_position_embeddings=4096, rms_norm_eps=1e-5),
    "llama3-8b": dict(model_type="llama", max_position_embeddings=8192, **_LLAMA3),
    "llama3.1-8b": dict(model_type="llama", max_position_embeddings=131072,
                        rope_scaling=_LLAMA31_ROPE, **_LLAMA3),
    "llama3.1-70b": dict(model_type="llama", max_position_embeddings=131072,
                         rope_scaling=_LLAMA31_ROPE,
                         **{**_LLAMA3, "hidden_size": 8192, "intermediate_size": 28672,
                            "num_hidden_layers": 80, "num_attention_heads": 64}),
    "mistral-7b": dict(model_type="mistral", vocab_size=32000, hidden_size=4096,
                       intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, max_position_embeddings=32768, rope_theta=10000.0,
                       sliding_window=4096, rms_norm_eps=1e-5),
    "qwen2.5-7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584,
                       intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, max_position_embeddings=32768,
                       rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False),
}

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_config(model: str) -> tuple[str, PretrainedConfig]:
    """(display name, transformers config) for a preset name, a config.json or a model folder.

    Reads local files only. Raises ValueError listing the presets for an unknown name.
    """
    if model in MODEL_PRESETS:
        values = dict(MODEL_PRESETS[model])
        return model, AutoConfig.for_model(values.pop("model_type"), **values)
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        try:
            values = json.loads(path.read_text())
            model_type = values.pop("model_type")
            return path.parent.name or path.stem, AutoConfig.for_model(model_type, **values)
        except (ValueError, KeyError) as error:
            raise ValueError(f"{path} is not a transformers config.json: {error}") from None
    raise ValueError(
        f"unknown model {model!r}: not a preset ({', '.join(MODEL_PRESETS)}) "
        f"nor a local config.json or model folder"
    )


def build_model(config: PretrainedConfig, dtype: torch.dtype, device: str | torch.device,
                attention: str = "sdpa") -> torch.nn.Module:
    """A causal LM from `config` with random weights, on `device` (meta allowed), in `dtype`."""
    config._attn_implementation = attention
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attention)
    return model


@dataclass(frozen=True)
class GpuSpec:
    """One GPU for projection and planning.

    memory_bytes: what torch.cuda reports as total memory (nvidia-smi's MiB), not the marketing GB.
    bf16_tflops: dense (no sparsity) tensor-core peak, bf16 in, fp32 accumulate.
    fp32_tflops: plain fp32 peak (PyTorch runs fp32 matmuls without TF32 by default).
    launch_us: device-side cost of one kernel launch (gap between back-to-back small kernels).
    dispatch_us: host time PyTorch eager spends to issue one op (Python + dispatcher + launch).
    launch_us and dispatch_us are estimates until calibrated on the device (source says which).
    """

    name: str
    memory_bytes: int
    bf16_tflops: float
    fp32_tflops: float
    hbm_gbps: float
    launch_us: float
    dispatch_us: float
    source: str


_MIB = 2**20
_OVERHEAD_SOURCE = "launch/dispatch: uncalibrated estimate (typical eager PyTorch, ~4 us gap, ~12 us/op)"
GPUS: dict[str, GpuSpec] = {g.name: g for g in [
    GpuSpec("a100-40gb", 40960 * _MIB, 312.0, 19.5, 1555.0, 4.0, 12.0,
            "NVIDIA A100 datasheet (SXM); " + _OVERHEAD_SOURCE),
    GpuSpec("a100-80gb", 81920 * _MIB, 312.0, 19.5, 2039.0, 4.0, 12.0,
            "NVIDIA A100 datasheet (SXM); " + _OVERHEAD_SOURCE),
    GpuSpec("h100-80gb", 81559 * _MIB, 989.0, 67.0, 3350.0, 4.0, 12.0,
            "NVIDIA H100 datasheet (SXM); " + _OVERHEAD_SOURCE),
    GpuSpec("h200", 143771 * _MIB, 989.0, 67.0, 4800.0, 4.0, 12.0,
            "NVIDIA H200 datasheet (SXM); " + _OVERHEAD_SOURCE),
    GpuSpec("l4", 23034 * _MIB, 121.0, 30.3, 300.0, 4.0, 12.0,
            "NVIDIA L4 datasheet; " + _OVERHEAD_SOURCE),
    GpuSpec("rtx-4090", 24564 * _MIB, 165.2, 82.6, 1008.0, 4.0, 12.0,
            "NVIDIA Ada whitepaper (RTX 4090, fp32 accumulate); " + _OVERHEAD_SOURCE),
]}


def gpu_spec(name: str) -> GpuSpec:
    """The GpuSpec for a name; ValueError listing the known GPUs otherwise."""
    if name not in GPUS:
        raise ValueError(f"unknown GPU {name!r}; choose from {', '.join(GPUS)}")
    return GPUS[name]


def gpu_as_dict(name: str) -> dict:
    return asdict(gpu_spec(name))
