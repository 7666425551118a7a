"""Model presets against their published parameter counts, and the GPU table against what
datasheets guarantee. Models are built on the meta device only (no weights, no compute)."""

from __future__ import annotations

import pytest
import torch
import yaml
from transformers import AutoConfig

from paca_prof import presets
from paca_prof.gpus import GPUS, INTERCONNECTS, GpuSpec, load_spec, write_spec
from paca_prof.units import GIB, MIB

# Published total parameter counts (tied embeddings counted once) and where they are stated.
# "HF" figures are the parameter count the Hugging Face hub shows for the official
# repository's safetensors, rounded to three digits there.
PUBLISHED = {
    "llama2-7b": (6.74e9, "HF meta-llama/Llama-2-7b-hf: 6.74B params"),
    "llama2-13b": (13.0e9, "HF meta-llama/Llama-2-13b-hf: 13.0B params"),
    "llama3-8b": (8.03e9, "HF meta-llama/Meta-Llama-3-8B: 8.03B params"),
    "llama3.1-8b": (8.03e9, "HF meta-llama/Llama-3.1-8B: 8.03B params"),
    "llama3.1-70b": (70.6e9, "HF meta-llama/Llama-3.1-70B: 70.6B params"),
    "mistral-7b": (7.24e9, "HF mistralai/Mistral-7B-v0.1: 7.24B params (Mistral AI: '7.3B')"),
    "qwen2.5-7b": (7.61e9, "Qwen/Qwen2.5-7B model card: 7.61B, non-embedding 6.53B"),
    "llama3.2-1b": (1.23e9, "Meta, Llama 3.2 MODEL_CARD.md: 1B (1.23B)"),
    "llama3.2-3b": (3.21e9, "Meta, Llama 3.2 MODEL_CARD.md: 3B (3.21B)"),
    "llama3.3-70b": (70.6e9, "HF meta-llama/Llama-3.3-70B-Instruct: 70.6B params"),
    "qwen3-8b": (8.2e9, "Qwen/Qwen3-8B model card: 8.2B, non-embedding 6.95B"),
    "qwen3-32b": (32.8e9, "Qwen/Qwen3-32B model card: 32.8B, non-embedding 31.2B"),
    "qwen3-30b-a3b": (30.5e9, "Qwen/Qwen3-30B-A3B model card: 30.5B total (3.3B activated), "
                              "non-embedding 29.9B"),
    "mixtral-8x7b": (46.7e9, "Mistral AI, 'Mixtral of experts' (Dec 2023): 46.7B total, "
                             "12.9B used per token"),
    "gemma2-9b": (917_504_000 + 8_324_201_984,
                  "Gemma 2 technical report, parameter table: 9B has 917,504,000 embedding and "
                  "8,324,201,984 non-embedding parameters"),
    # The text model only: the report's 417M vision encoder is not in the preset.
    "gemma3-12b": (1_012e6 + 10_759e6,
                   "Gemma 3 technical report, Table 1: 12B has 1,012M embedding and 10,759M "
                   "non-embedding parameters (plus a 417M vision encoder, left out)"),
    "phi-4": (14.7e9, "HF microsoft/phi-4: 14.7B params (Phi-4 technical report: '14B')"),
    "mistral-nemo-12b": (12.2e9, "HF mistralai/Mistral-Nemo-Base-2407: 12.2B params "
                                 "(Mistral AI: '12B')"),
}
# Published counts without the input embedding and the (untied) output projection.
PUBLISHED_NON_EMBEDDING = {
    "qwen2.5-7b": 6.53e9, "qwen3-8b": 6.95e9, "qwen3-32b": 31.2e9, "qwen3-30b-a3b": 29.9e9,
    "gemma2-9b": 8_324_201_984, "gemma3-12b": 10_759e6,
}
TOLERANCE = 0.01


def _build(name: str, attention: str | None = None, **overrides) -> torch.nn.Module:
    values = dict(presets.MODEL_PRESETS[name], **overrides)
    model_type = values.pop("model_type")
    config = AutoConfig.for_model(model_type, **values)
    if attention is None:
        attention = presets.ATTENTION_REQUIREMENTS.get(model_type, ("sdpa",))[0]
    return presets.build_model(config, torch.bfloat16, "meta", attention)


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied one once


def _embedding_count(model: torch.nn.Module) -> int:
    embedding, output = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    return embedding.numel() + (0 if output is embedding else output.numel())


def _depth_two(name: str) -> dict:
    """Overrides for a two-layer copy of a preset (the first two layer types, where listed)."""
    layer_types = presets.MODEL_PRESETS[name].get("layer_types")
    return {"num_hidden_layers": 2, **({"layer_types": layer_types[:2]} if layer_types else {})}


def test_every_preset_but_tiny_has_a_published_count():
    assert set(PUBLISHED) == set(presets.MODEL_PRESETS) - {"tiny"}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_count_matches_published(name):
    expected, source = PUBLISHED[name]
    counted = _count(_build(name))
    assert abs(counted - expected) <= TOLERANCE * expected, (name, counted, source)


@pytest.mark.parametrize("name", sorted(PUBLISHED_NON_EMBEDDING))
def test_non_embedding_count_matches_published(name):
    model = _build(name)
    counted = _count(model) - _embedding_count(model)
    expected = PUBLISHED_NON_EMBEDDING[name]
    assert abs(counted - expected) <= TOLERANCE * expected, (name, counted)


def test_tiny_count_follows_the_llama_formula():
    v = presets.MODEL_PRESETS["tiny"]
    hidden, layers, heads, kv = (v["hidden_size"], v["num_hidden_layers"],
                                 v["num_attention_heads"], v["num_key_value_heads"])
    kv_width = hidden // heads * kv
    per_layer = (2 * hidden * hidden + 2 * hidden * kv_width      # q, o; k, v
                 + 3 * hidden * v["intermediate_size"] + 2 * hidden)  # MLP; two norms
    expected = 2 * v["vocab_size"] * hidden + layers * per_layer + hidden  # untied; final norm
    assert _count(_build("tiny")) == expected


@pytest.mark.parametrize("name", sorted(presets.MODEL_PRESETS))
def test_tied_embeddings_as_published(name):
    model = _build(name, **_depth_two(name))
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == presets.MODEL_PRESETS[name].get("tie_word_embeddings", False), name


@pytest.mark.parametrize("name, experts_key", [("qwen3-30b-a3b", "num_experts"),
                                               ("mixtral-8x7b", "num_local_experts")])
def test_moe_presets_hold_every_expert(name, experts_key):
    v = presets.MODEL_PRESETS[name]
    width = v.get("moe_intermediate_size", v["intermediate_size"])
    model = _build(name, num_hidden_layers=2)
    in_experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert in_experts == 2 * v[experts_key] * 3 * v["hidden_size"] * width  # gate, up, down


def test_gemma3_preset_is_the_text_model_only():
    model = _build("gemma3-12b", **_depth_two("gemma3-12b"))
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert not any("vision" in name for name, _ in model.named_modules())


def test_phi4_uses_the_phi3_architecture():
    assert type(_build("phi-4", num_hidden_layers=2)).__name__ == "Phi3ForCausalLM"


@pytest.mark.parametrize("model_type", sorted(presets.ATTENTION_REQUIREMENTS))
def test_attention_requirement_still_holds(model_type):
    """Each entry is there because transformers refuses fused SDPA for that architecture."""
    name = next(n for n, v in presets.MODEL_PRESETS.items() if v["model_type"] == model_type)
    with pytest.raises(ValueError):
        _build(name, attention="sdpa", **_depth_two(name))
    required = presets.ATTENTION_REQUIREMENTS[model_type][0]
    assert _build(name, **_depth_two(name)).config._attn_implementation == required


@pytest.mark.parametrize("name", sorted(presets.MODEL_PRESETS))
def test_two_layer_copy_runs_forward_and_backward_on_meta(name):
    model = _build(name, **_depth_two(name))
    ids = torch.zeros(1, 16, dtype=torch.long, device="meta")
    logits = model(input_ids=ids).logits
    assert logits.shape == (1, 16, presets.MODEL_PRESETS[name]["vocab_size"])
    logits.sum().backward()
    assert model.get_input_embeddings().weight.grad is not None


# --- GPUs ------------------------------------------------------------------------------------

# The memory size each card is sold with, GB as vendors write it (binary for HBM and GDDR).
MARKETING_GB = {
    "a100-40gb": 40, "a100-80gb": 80, "h100-80gb": 80, "h200": 141, "l4": 24, "rtx-4090": 24,
    "l40s": 48, "a6000": 48, "a10g": 24, "rtx-3090": 24, "t4": 16, "v100-32gb": 32,
    "h100-nvl": 94, "b200": 180, "mi300x": 192,
}
# Volta and Turing have no bf16 tensor cores (nor Volta any bf16 unit): bf16 runs emulated.
NO_BF16_TENSOR_CORES = {"t4", "v100-32gb"}


def test_every_gpu_has_a_marketing_size():
    assert set(MARKETING_GB) == set(GPUS)


@pytest.mark.parametrize("name", sorted(GPUS))
def test_gpu_round_trips(name, tmp_path):
    spec = GPUS[name]
    assert spec.name == name
    assert GpuSpec.from_dict(spec.to_dict()) == spec
    assert load_spec(write_spec(spec, tmp_path / f"{name}.yaml")) == spec


def test_a_spec_with_rate_curves_round_trips(tmp_path):
    """Curves are tuples in a GpuSpec and lists in its YAML; both ways give the same spec."""
    from dataclasses import replace

    spec = replace(GPUS["l4"], matmul_curve=((1e6, 0.1), (1e9, 0.8)),
                   bandwidth_curve=((65536.0, 50.0), (6.7e7, 10.5)))
    assert GpuSpec.from_dict(spec.to_dict()) == spec
    assert load_spec(write_spec(spec, tmp_path / "curved.yaml")) == spec
    assert yaml.safe_load((tmp_path / "curved.yaml").read_text())["matmul_curve"] == [
        [1e6, 0.1], [1e9, 0.8]]


@pytest.mark.parametrize("name", sorted(GPUS))
def test_gpu_memory_is_near_its_marketing_size(name):
    """nvidia-smi's total is at most the marketing size, and at least 15/16 of it (what ECC
    on GDDR6 keeps), in whole MiB as it prints them."""
    spec, marketed = GPUS[name], MARKETING_GB[name] * GIB
    assert spec.memory_bytes % MIB == 0
    assert 15 / 16 * marketed - 64 * MIB <= spec.memory_bytes <= marketed, name


@pytest.mark.parametrize("name", sorted(GPUS))
def test_gpu_peaks_keep_datasheet_order(name):
    spec = GPUS[name]
    assert spec.fp16_tflops > spec.fp32_tflops  # tensor cores: every card here has them
    if name in NO_BF16_TENSOR_CORES:
        assert spec.bf16_tflops < spec.fp32_tflops
    else:
        assert spec.bf16_tflops == spec.fp16_tflops


@pytest.mark.parametrize("name", sorted(GPUS))
def test_gpu_interconnect_and_context_are_plausible(name):
    spec = GPUS[name]
    assert spec.interconnect in INTERCONNECTS
    if spec.interconnect == "pcie":
        assert spec.interconnect_gbps <= 64  # PCIe Gen5 x16, per direction
    else:
        assert spec.interconnect_gbps >= 100
    assert 128 * MIB <= spec.cuda_context_bytes <= 2 * GIB
    assert ("datasheet" in spec.source or "whitepaper" in spec.source) and "context" in spec.source
