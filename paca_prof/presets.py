"""Model presets (transformers configs, random weights, never downloaded); GPUs are in gpus.py.

The architecture numbers are the published config.json values of each model.
"""

from __future__ import annotations

import json
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
