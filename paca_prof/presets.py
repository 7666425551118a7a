"""Model presets (transformers configs, random weights, never downloaded); GPUs are in gpus.py.

The architecture numbers are the published config.json values of each model. The tables import
nothing heavy: transformers and torch load only when a config is read or a model built.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from paca_prof import validate

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

# Bounds of a config a user may give: far above any published model, far below what would
# exhaust this machine before the first line of output.
_CONFIG_BOUNDS = {"vocab_size": 2**22, "hidden_size": 2**17, "intermediate_size": 2**19,
                  "num_hidden_layers": 1024, "num_attention_heads": 1024,
                  "num_key_value_heads": 1024}


def torch_dtype(name: str):
    """The torch dtype of a dtype name (fp32, bf16, fp16)."""
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def load_config(model: str):
    """(display name, transformers config) for a preset name, a config.json or a model folder.

    Reads local files only, and only regular files of a few MiB. ValueError (one line) listing
    the presets for an unknown name, and for a file that is not JSON, not a mapping, not a
    causal-LM architecture transformers knows, or has sizes no model has (check_config).
    """
    if model in MODEL_PRESETS:
        values = copy.deepcopy(MODEL_PRESETS[model])
        return model, _config_from(values, f"preset {model}")
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():
        raise ValueError(f"unknown model {model!r}: not a preset ({', '.join(MODEL_PRESETS)}) "
                         f"nor a local config.json or model folder")
    data = validate.read_small_file(path, "model config")
    try:
        values = json.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not a transformers config.json: not JSON "
                         f"({type(error).__name__})") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path} is not a transformers config.json: a JSON "
                         f"{type(values).__name__}, not an object")
    return path.parent.name or path.stem, _config_from(values, str(path))


def config_of(model_config, where: str = "model_config"):
    """(display name, transformers config) for a transformers config object or a mapping of
    its values (model_type included), checked as load_config checks a file; the caller's
    object is not changed."""
    if hasattr(model_config, "to_dict") and hasattr(model_config, "model_type"):
        values = model_config.to_dict()
    else:
        values = copy.deepcopy(dict(validate.mapping(model_config, where)))
    name = values.get("_name_or_path") or values.get("model_type")
    config = _config_from(values, where)
    return (name if isinstance(name, str) and name else config.model_type)[:200], config


def _config_from(values: dict, where: str):
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = values.pop("model_type", None)
    if not isinstance(model_type, str):
        raise ValueError(f"{where} is not a transformers config.json: no model_type")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(f"{where}: model_type {model_type[:40]!r} is not a causal language "
                         "model that transformers can build")
    from transformers.utils import logging as hf_logging

    # transformers logs its own doubts about odd fields; check_config says what is wrong in
    # one line instead.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        config = AutoConfig.for_model(model_type, **values)
    except Exception as error:  # transformers raises many types for a bad field
        raise ValueError(f"{where} is not a valid {model_type} config: "
                         f"{_first_line(error)}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    check_config(config, where)
    return config


def _first_line(error: Exception) -> str:
    """The first informative line of a transformers error (its validators wrap the reason)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in lines[1:]:
        if not line.startswith(("Class validation error", "For further")):
            return line[:200]
    return (lines[0] if lines else type(error).__name__)[:200]


def check_config(config, where: str = "config") -> None:
    """ValueError (one line) for sizes no causal LM has: any size below 1 or above the bounds,
    heads that do not divide the hidden size (without a head_dim), kv heads that do not divide
    the heads."""
    for name, maximum in _CONFIG_BOUNDS.items():
        value = getattr(config, name, None)
        if value is not None:
            validate.number(value, f"{where}: {name}", minimum=1, maximum=maximum, integer=True)
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
        if getattr(config, name, None) is None:
            raise ValueError(f"{where}: no {name}")
    heads = config.num_attention_heads
    if getattr(config, "head_dim", None) is None and config.hidden_size % heads:
        raise ValueError(f"{where}: hidden_size {config.hidden_size} is not divisible by "
                         f"num_attention_heads {heads}")
    kv = getattr(config, "num_key_value_heads", None) or heads
    if heads % kv:
        raise ValueError(f"{where}: num_attention_heads {heads} is not a multiple of "
                         f"num_key_value_heads {kv}")


def build_model(config, dtype, device, attention: str = "sdpa"):
    """A causal LM from `config` with random weights, on `device` (meta allowed), in `dtype`."""
    import torch
    from transformers import AutoModelForCausalLM

    config._attn_implementation = attention
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attention)
    return model
