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
_QWEN3 = dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
              num_attention_heads=32, num_key_value_heads=8, head_dim=128,
              max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
              attention_bias=False, use_sliding_window=False, sliding_window=None,
              tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151645)

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
    # meta-llama/Llama-3.2-{1B,3B}: small Llama 3 with tied embeddings and explicit head_dim.
    "llama3.2-1b": dict(model_type="llama", max_position_embeddings=131072,
                        rope_scaling={**_LLAMA31_ROPE, "factor": 32.0},
                        **{**_LLAMA3, "hidden_size": 2048, "intermediate_size": 8192,
                           "num_hidden_layers": 16, "head_dim": 64,
                           "tie_word_embeddings": True}),
    "llama3.2-3b": dict(model_type="llama", max_position_embeddings=131072,
                        rope_scaling={**_LLAMA31_ROPE, "factor": 32.0},
                        **{**_LLAMA3, "hidden_size": 3072, "intermediate_size": 8192,
                           "num_hidden_layers": 28, "num_attention_heads": 24, "head_dim": 128,
                           "tie_word_embeddings": True}),
    # meta-llama/Llama-3.3-70B-Instruct: the Llama 3.1 70B architecture.
    "llama3.3-70b": dict(model_type="llama", max_position_embeddings=131072,
                         rope_scaling=_LLAMA31_ROPE,
                         **{**_LLAMA3, "hidden_size": 8192, "intermediate_size": 28672,
                            "num_hidden_layers": 80, "num_attention_heads": 64,
                            "eos_token_id": [128001, 128008, 128009]}),
    # Qwen/Qwen3-8B, Qwen3-32B: q/k RMSNorm, head_dim 128 (not hidden/heads for 32B),
    # no sliding window (use_sliding_window false).
    "qwen3-8b": dict(model_type="qwen3", max_window_layers=36, **_QWEN3),
    "qwen3-32b": dict(model_type="qwen3", max_window_layers=64,
                      **{**_QWEN3, "hidden_size": 5120, "intermediate_size": 25600,
                         "num_hidden_layers": 64, "num_attention_heads": 64}),
    # Qwen/Qwen3-30B-A3B: 128 experts of width 768 in every layer, 8 routed per token;
    # intermediate_size is the dense MLP width, unused when every layer is sparse.
    "qwen3-30b-a3b": dict(model_type="qwen3_moe",
                          **{**_QWEN3, "hidden_size": 2048, "intermediate_size": 6144,
                             "num_hidden_layers": 48, "num_attention_heads": 32,
                             "num_key_value_heads": 4},
                          moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
                          decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True,
                          router_aux_loss_coef=0.001),
    # mistralai/Mixtral-8x7B-v0.1: 8 experts of the Mistral 7B MLP, 2 routed per token.
    "mixtral-8x7b": dict(model_type="mixtral", vocab_size=32000, hidden_size=4096,
                         intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, max_position_embeddings=32768,
                         rope_theta=1000000.0, sliding_window=None, rms_norm_eps=1e-5,
                         num_local_experts=8, num_experts_per_tok=2, router_aux_loss_coef=0.02,
                         tie_word_embeddings=False),
    # google/gemma-2-9b: alternating sliding (4096) and global layers, logit soft-capping
    # (see ATTENTION_REQUIREMENTS), query scale 1/sqrt(256), tied embeddings.
    "gemma2-9b": dict(model_type="gemma2", vocab_size=256000, hidden_size=3584,
                      intermediate_size=14336, num_hidden_layers=42, num_attention_heads=16,
                      num_key_value_heads=8, head_dim=256, query_pre_attn_scalar=256,
                      hidden_activation="gelu_pytorch_tanh", max_position_embeddings=8192,
                      rope_theta=10000.0, rms_norm_eps=1e-6, sliding_window=4096,
                      attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                      tie_word_embeddings=True),
    # google/gemma-3-12b-pt text_config only: the hub model is Gemma3ForConditionalGeneration;
    # its SigLIP vision tower and multimodal projector are left out (text-only fine-tuning).
    # Five sliding (1024) layers then one global, local rope 10k, global rope 1M scaled x8.
    "gemma3-12b": dict(model_type="gemma3_text", vocab_size=262208, hidden_size=3840,
                       intermediate_size=15360, num_hidden_layers=48, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=256, query_pre_attn_scalar=256,
                       hidden_activation="gelu_pytorch_tanh", max_position_embeddings=131072,
                       rope_theta=1000000.0, rope_local_base_freq=10000.0,
                       rope_scaling={"rope_type": "linear", "factor": 8.0},
                       rms_norm_eps=1e-6, sliding_window=1024,
                       layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 8,
                       attn_logit_softcapping=None, final_logit_softcapping=None,
                       tie_word_embeddings=True),
    # microsoft/phi-4: the Phi-3 architecture (fused qkv_proj and gate_up_proj), full rotary.
    "phi-4": dict(model_type="phi3", vocab_size=100352, hidden_size=5120,
                  intermediate_size=17920, num_hidden_layers=40, num_attention_heads=40,
                  num_key_value_heads=10, max_position_embeddings=16384,
                  original_max_position_embeddings=16384, rope_theta=250000.0,
                  rope_scaling=None, sliding_window=None, rms_norm_eps=1e-5,
                  bos_token_id=100257, eos_token_id=100257, pad_token_id=100257,
                  tie_word_embeddings=False),
    # mistralai/Mistral-Nemo-Base-2407: head_dim 128 although hidden/heads is 160.
    "mistral-nemo-12b": dict(model_type="mistral", vocab_size=131072, hidden_size=5120,
                             intermediate_size=14336, num_hidden_layers=40,
                             num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                             max_position_embeddings=1024000, rope_theta=1000000.0,
                             sliding_window=None, rms_norm_eps=1e-5,
                             tie_word_embeddings=False),
}

# Attention implementations an architecture needs, by model_type: (implementation, why).
# Simulated runs model fused attention with torch's SDPA kernels (engines/attention.py), which
# take no soft-capping; an architecture listed here is to be built with the implementation
# named, and the run should say so. Verified against transformers 5.24: Gemma2ForCausalLM
# declares _supports_sdpa = False and from_config(attn_implementation="sdpa") raises, while its
# eager attention applies the cap. Gemma 3 is not listed: its configs carry no attention
# soft-capping (attn_logit_softcapping None), and transformers runs it with SDPA.
ATTENTION_REQUIREMENTS: dict[str, tuple[str, str]] = {
    "gemma2": ("eager", "attention logit soft-capping (tanh on the scores): torch's fused "
                        "SDPA kernels (flash, memory-efficient) cannot apply it"),
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
