"""Mixture-of-experts models (issue 10 item 3): tiny Qwen3-MoE and Mixtral configs (random
weights) under every method, simulated on meta = measured on the CPU, with the experts frozen
and adapted; what each method does with the experts; PaCA's expert columns against autograd.

transformers 5.24 stores each expert projection as one 3-D parameter and runs the experts with
grouped matmuls (its default grouped_mm implementation, on the CPU and on meta alike): every
token's top-k rows go through one aten::_grouped_mm over all experts, so no tensor's size
depends on the routing, and the simulation needs no routing (meta tensors have no values to
route by). The tolerance is the dense models' (tests/test_recipes.py): the CPU allocator's few
scalars that no dispatch mode sees."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest
import torch

from conftest import measure_in_temp, run_spec as RunSpec

from paca_prof import trace
from paca_prof.methods import MethodSettings
from paca_prof.engines.simulate import simulate_method

QWEN3_MOE = dict(model_type="qwen3_moe", vocab_size=256, hidden_size=64, intermediate_size=128,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                 decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True,
                 max_position_embeddings=128)
MIXTRAL = dict(model_type="mixtral", vocab_size=256, hidden_size=64, intermediate_size=96,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=128)
FAMILIES = {"qwen3_moe": (QWEN3_MOE, "fp32"), "mixtral": (MIXTRAL, "bf16")}
SHAPE = dict(seq=16, batch=2, steps=1, warmup=1, attention="eager")
BYTE_COLUMNS = ["peak_bytes", *(f"peak_{c}_bytes" for c in trace.MEMORY_CATEGORIES)]
BYTE_TOLERANCE = 256  # as tests/test_recipes.py: CPU allocator scalars no dispatch mode sees
METHODS = ("frozen", "lora", "dora", "paca", "full", "qlora", "qpaca")


def _spec(family: str, method: str, device: str = "cpu", **recipe):
    config, dtype = FAMILIES[family]
    if method in ("qlora", "qpaca"):
        dtype = "bf16"  # as tests/test_recipes.py runs bitsandbytes' CPU 4-bit layers
    return RunSpec(model=dict(config), device=device, dtype=dtype, methods=(method,),
                   **SHAPE, **recipe)


def _pair(family: str, method: str, **recipe):
    spec = _spec(family, method, **recipe)
    return measure_in_temp(spec, method).summary, simulate_method(spec, method).summary


def _assert_equal_bytes(measured: dict, simulated: dict) -> None:
    for column in BYTE_COLUMNS:
        real, sim = int(measured[column]), int(simulated[column])
        assert abs(sim - real) <= BYTE_TOLERANCE, (column, real, sim, sim - real)
    assert measured["trainable_params"] == simulated["trainable_params"]


STATIC_COLUMNS = ["peak_weights_bytes", "peak_trainable_bytes", "peak_optimizer_bytes"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_method_simulated_equals_measured_with_experts_adapted(family, method):
    """fp32 (qwen3_moe): every byte column equal. bf16 (mixtral): the CPU's _grouped_mm
    backward in bf16 holds temporaries of its own that no dispatch mode sees (observed: 49-67
    KB blocks of odd sizes beside each expert GEMM's gradient; none in fp32), where CUDA's
    grouped GEMM kernel holds none, and the simulation stands for the CUDA kernel. Its peak can
    then fall inside the experts' backward, so there the static bytes and the bytes saved for
    backward are compared exactly, and the peak is bounded: at most one expert stack in fp32
    above the simulated one."""
    measured, simulated = _pair(family, method, experts="adapt")
    assert measured["status"] == simulated["status"] == "ok"
    config, dtype = FAMILIES[family]
    if dtype == "fp32" and method not in ("qlora", "qpaca"):
        _assert_equal_bytes(measured, simulated)
        return
    for column in STATIC_COLUMNS:
        assert abs(int(measured[column]) - int(simulated[column])) <= BYTE_TOLERANCE, column
    assert measured["activation_bytes"] == simulated["activation_bytes"]
    experts = config.get("num_experts") or config["num_local_experts"]
    width = config.get("moe_intermediate_size") or config["intermediate_size"]
    largest_stack_fp32 = 4 * experts * 2 * width * config["hidden_size"]  # gate_up_proj
    excess = int(measured["peak_bytes"]) - int(simulated["peak_bytes"])
    assert -BYTE_TOLERANCE <= excess <= largest_stack_fp32, excess


@pytest.mark.parametrize("method", ["lora", "paca", "qlora"])
def test_frozen_experts_simulated_equal_measured(method):
    measured, simulated = _pair("qwen3_moe", method)
    _assert_equal_bytes(measured, simulated)


def _expert_params(config: dict) -> int:
    experts = config.get("num_experts") or config["num_local_experts"]
    width = config.get("moe_intermediate_size") or config["intermediate_size"]
    return config["num_hidden_layers"] * experts * 3 * width * config["hidden_size"]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_what_each_method_trains_in_the_experts(family):
    """Trainable parameters (simulated): adapting the experts adds, per 3-D parameter
    (experts x out x in), LoRA's r*experts*(in + out) and PaCA's experts*out*r; DoRA gets
    nothing there; full trains every expert weight."""
    config, _ = FAMILIES[family]
    experts = config.get("num_experts") or config["num_local_experts"]
    width = config.get("moe_intermediate_size") or config["intermediate_size"]
    hidden, layers, r = config["hidden_size"], config["num_hidden_layers"], 8
    shapes = [(2 * width, hidden), (hidden, width)]  # (out, in) of gate_up_proj, down_proj
    lora = layers * sum(r * experts * (o + i) for o, i in shapes)
    paca = layers * sum(experts * o * r for o, _ in shapes)

    def trainable(method, experts_setting):
        spec = _spec(family, method, device="meta", experts=experts_setting)
        return simulate_method(spec, method).summary["trainable_params"]

    assert trainable("lora", "adapt") - trainable("lora", "frozen") == lora
    assert trainable("paca", "adapt") - trainable("paca", "frozen") == paca
    assert trainable("dora", "adapt") == trainable("dora", "frozen")
    full = trainable("full", "frozen")
    assert full >= _expert_params(config) and full == trainable("full", "adapt")


def test_bytes_do_not_depend_on_the_routing():
    """Other weights (another seed) route the tokens to other experts: with transformers'
    grouped matmuls every tensor keeps its size, so the measured bytes are the same."""
    first, second = (measure_in_temp(RunSpec(model=dict(QWEN3_MOE), device="cpu", dtype="fp32",
                                             methods=("paca",), seed=seed, experts="adapt",
                                             **SHAPE), "paca").summary
                     for seed in (0, 1))
    for column in BYTE_COLUMNS:
        assert abs(int(first[column]) - int(second[column])) <= BYTE_TOLERANCE, column


def test_lora_on_experts_keeps_a_folded_copy_of_each_expert_stack_for_backward():
    """PEFT's ParamWrapper folds W + scaling*BA into a new tensor per forward, which the
    grouped matmul saves; since that tensor needs a gradient, the matmul's input (the tokens'
    top-k rows) is saved too, where a frozen expert saves neither."""
    frozen, adapted = (simulate_method(_spec("qwen3_moe", "lora", device="meta", experts=e),
                                       "lora").summary for e in ("frozen", "adapt"))
    stacks = _expert_params(QWEN3_MOE) * 4  # fp32
    rows = SHAPE["batch"] * SHAPE["seq"] * QWEN3_MOE["num_experts_per_tok"]
    inputs = QWEN3_MOE["num_hidden_layers"] * rows * (
        QWEN3_MOE["hidden_size"] + QWEN3_MOE["moe_intermediate_size"]) * 4
    assert adapted["activation_bytes"] - frozen["activation_bytes"] == stacks + inputs


def test_paca_on_experts_saves_only_the_gathered_columns():
    frozen, adapted = (simulate_method(_spec("qwen3_moe", "paca", device="meta", experts=e),
                                       "paca").summary for e in ("frozen", "adapt"))
    # per 3-D parameter: tokens * top_k rows of r values (fp32), in both MoE layers
    rows = SHAPE["batch"] * SHAPE["seq"] * QWEN3_MOE["num_experts_per_tok"]
    columns = QWEN3_MOE["num_hidden_layers"] * 2 * rows * 8 * 4
    assert adapted["activation_bytes"] - frozen["activation_bytes"] == columns


def test_run_yaml_records_what_the_experts_get():
    from paca_prof.engines.step import validate_against_model

    spec = RunSpec(model=dict(QWEN3_MOE), device="meta", methods=METHODS, experts="adapt",
                   **SHAPE)
    targets = validate_against_model(spec)
    assert targets["names"] == ["k_proj", "o_proj", "q_proj", "v_proj"]  # all-linear: no router
    experts = targets["experts"]
    assert experts["parameters"] == {"experts.gate_up_proj": [4, 64, 64],
                                     "experts.down_proj": [4, 64, 32]}
    assert experts["count"] == 4
    words = experts["by_method"]
    assert words["lora"].startswith("LoRA through PEFT's target_parameters")
    assert words["paca"].startswith("PaCA on r input columns")
    assert words["dora"].startswith("frozen: PEFT")
    assert "unquantized (fp32" in words["qlora"] and words["full"].startswith("trained")
    default = validate_against_model(RunSpec(model=dict(QWEN3_MOE), device="meta",
                                             methods=("lora",), **SHAPE))
    assert default["experts"]["by_method"]["lora"].startswith("frozen: not nn.Linear")


def test_paca_expert_columns_get_the_gradient_of_their_weight_columns():
    from transformers import AutoConfig, AutoModelForCausalLM

    from paca.experts import inject_paca_experts

    values = dict(QWEN3_MOE)
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    reference = copy.deepcopy(model)
    inject_paca_experts(model, 8, 16.0, seed=0)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    loss = model(input_ids=ids, labels=ids).loss
    expected = reference(input_ids=ids, labels=ids).loss
    assert torch.equal(loss, expected)  # the columns start as the weight's own
    loss.backward()
    expected.backward()
    for layer in range(2):
        ours = model.model.layers[layer].mlp.experts
        theirs = reference.model.layers[layer].mlp.experts
        for name in ours.paca_names:
            indices = getattr(ours, "paca_indices_" + name)
            want = getattr(theirs, name).grad.index_select(2, indices) * ours.paca_scaling
            torch.testing.assert_close(getattr(ours, "paca_" + name).grad, want)
            assert getattr(ours, name).grad is None
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    experts = model.model.layers[0].mlp.experts
    before = experts.gate_up_proj.detach().clone()
    optimizer.step()
    indices = experts.paca_indices_gate_up_proj
    torch.testing.assert_close(experts.gate_up_proj.index_select(2, indices),
                               experts.paca_gate_up_proj * experts.paca_scaling)
    others = torch.tensor([i for i in range(64) if i not in set(indices.tolist())])
    assert torch.equal(experts.gate_up_proj.index_select(2, others), before.index_select(2, others))
    assert not torch.equal(experts.gate_up_proj, before)


def test_the_branch_ops_of_paca_experts_are_its_gather_and_grad_gemm():
    result = simulate_method(_spec("qwen3_moe", "paca", device="meta", experts="adapt"), "paca")
    ops = result.ops
    experts = ops[ops["module"].str.endswith("mlp.experts")]
    branch = experts[experts["adapter_branch"]]
    counts = branch.groupby(["phase", "name"]).size().to_dict()
    # two 3-D parameters in each of two layers: one gather in forward, one grad GEMM in
    # backward, and nothing else (the routing's sorts, casts and products are the model's)
    assert counts == {("forward", "aten::index_select"): 4, ("backward", "aten::_grouped_mm"): 4}
    grouped = experts[experts["name"] == "aten::_grouped_mm"]
    assert len(grouped) == 4 + 4 + 4  # forward, input gradient, columns' gradient


def test_bad_expert_settings_are_one_line_and_exit_2(tmp_path, capsys):
    import json

    from paca_prof.cli import main

    config = tmp_path / "config.json"
    config.write_text(json.dumps(QWEN3_MOE))
    base = ["run", "--model", str(config), "--seq", "16", "--device", "meta",
            "--out", str(tmp_path / "out")]
    cases = {
        "--dropout 0.1": base + ["--methods", "lora", "--experts", "adapt", "--dropout", "0.1"],
        "--r (--rank) 64": base + ["--methods", "paca", "--experts", "adapt", "--r", "64"],
        "multiple of 8": base + ["--methods", "paca", "--experts", "adapt", "--r", "4"],
        "no experts stored": ["run", "--model", "tiny", "--seq", "16", "--device", "meta",
                              "--methods", "lora", "--experts", "adapt",
                              "--out", str(tmp_path / "out")],
    }
    for needle, args in cases.items():
        rc = main(args)
        captured = capsys.readouterr()
        lines = [line for line in captured.err.splitlines() if line.strip()]
        assert rc == 2 and len(lines) == 1, (needle, captured.err[-2000:])
        assert needle in lines[0] and "Traceback" not in captured.err, lines
    assert not (tmp_path / "out").exists()


def test_grouped_matmul_of_any_dtype_runs_on_meta():
    from paca_prof.engines.simulate import MetaScalars

    a = torch.empty(12, 8, device="meta")
    w = torch.empty(3, 8, 16, device="meta")
    offs = torch.empty(3, dtype=torch.int32, device="meta")
    with pytest.raises(RuntimeError, match="BF16"):  # torch's meta kernel: the CUDA fast path's
        torch._grouped_mm(a, w, offs=offs)
    with MetaScalars():
        out = torch._grouped_mm(a, w, offs=offs)
        grad_w = torch._grouped_mm(a.t(), torch.empty(12, 16, device="meta"), offs=offs)
    assert out.shape == (12, 16) and out.dtype == torch.float32
    assert grad_w.shape == (3, 8, 16) and grad_w.dtype == torch.float32


@pytest.mark.parametrize("name", ["qwen3-30b-a3b", "mixtral-8x7b"])
def test_moe_presets_simulate_with_their_experts_adapted(name):
    """Two-layer copies of the presets, bf16 on meta: the grouped matmul path (transformers'
    default experts implementation; its eager per-expert loop reads the routing with
    torch.nonzero, which meta tensors cannot answer) with the published expert shapes."""
    from paca_prof import presets

    values = dict(presets.MODEL_PRESETS[name], num_hidden_layers=2)
    experts = values.get("num_experts") or values["num_local_experts"]
    width = values.get("moe_intermediate_size") or values["intermediate_size"]
    hidden, r = values["hidden_size"], 8
    spec = dict(model=values, device="meta", dtype="bf16", seq=128, batch=1, steps=1, warmup=0)
    adapted = simulate_method(RunSpec(methods=("paca",), experts="adapt", **spec), "paca")
    frozen = simulate_method(RunSpec(methods=("paca",), **spec), "paca")
    assert adapted.summary["status"] == frozen.summary["status"] == "ok"
    assert (adapted.summary["trainable_params"] - frozen.summary["trainable_params"]
            == 2 * experts * (2 * width + hidden) * r)
    grouped = adapted.ops[adapted.ops["name"] == "aten::_grouped_mm"]
    assert len(grouped) == 2 * 2 * 3  # two layers, two 3-D parameters: fwd, grad x, grad P


@pytest.mark.parametrize("method", ["lora", "paca"])
def test_amp_with_experts_adapted_simulated_equals_measured(method):
    """fp32 parameters, bf16 autocast (Mixtral's family runs bf16 here): PEFT folds the experts'
    LoRA outside autocast, and the grouped matmuls are not autocast ops (transformers casts
    their input to the weight's dtype), on the CPU and in the simulation alike."""
    measured, simulated = _pair("mixtral", method, experts="adapt", amp=True)
    _assert_equal_bytes(measured, simulated)


@pytest.mark.parametrize("method", ["lora", "paca"])
def test_checkpointing_with_experts_adapted_keeps_every_category_but_the_rest(method):
    """Under checkpointing the measured CPU run holds a few KB more in `rest` at its peak than
    the simulation, as dense models do too (tiny Llama: 5 to 10 KB, CPU-side temporaries of
    the recompute that no dispatch mode sees); every other category and the saved bytes are
    exact."""
    measured, simulated = _pair("qwen3_moe", method, experts="adapt", grad_ckpt=True)
    for column in ("peak_weights_bytes", "peak_trainable_bytes", "peak_gradients_bytes",
                   "peak_optimizer_bytes", "peak_activations_bytes", "peak_logits_loss_bytes",
                   "activation_bytes"):
        assert int(measured[column]) == int(simulated[column]), column
    assert 0 <= measured["peak_bytes"] - simulated["peak_bytes"] <= 32 * 1024


@pytest.mark.parametrize("refused", [dict(use_dora=True), dict(lora_dropout=0.1)])
def test_peft_refuses_dora_and_dropout_on_expert_parameters(refused):
    """Why dora keeps the experts frozen and lora with experts takes no dropout: PEFT's
    ParamWrapper (the layer of target_parameters) refuses both."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    values = dict(QWEN3_MOE)
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    lora = LoraConfig(r=8, target_modules=["q_proj"],
                      target_parameters=["experts.gate_up_proj", "experts.down_proj"], **refused)
    with pytest.raises(ValueError, match="does not work with"):
        get_peft_model(model, lora)


def test_a_users_peft_config_with_target_parameters_simulated_equals_measured():
    """--peft-config with PEFT's target_parameters (LoRA on the 3-D expert parameters, as
    save_pretrained writes it): simulated on meta = measured on the CPU, and it trains what
    --experts adapt trains for lora."""
    from paca_prof.methods.peft_config import check

    config = check({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
                    "target_modules": ["q_proj", "v_proj"],
                    "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]})
    spec = _spec("qwen3_moe", "lora", targets=("q_proj", "v_proj"), peft_config=config)
    measured = measure_in_temp(spec, "lora").summary
    simulated = simulate_method(replace(spec, device="meta"), "lora").summary
    _assert_equal_bytes(measured, simulated)
    ours = simulate_method(replace(_spec("qwen3_moe", "lora", device="meta",
                                         targets=("q_proj", "v_proj"), experts="adapt"),
                                   settings=MethodSettings(r=8, alpha=16)), "lora").summary
    assert simulated["trainable_params"] == ours["trainable_params"]


def test_target_parameters_that_match_nothing_are_one_line_and_exit_2(tmp_path, capsys):
    """PEFT only warns when target_parameters match no parameter (and trains less than the
    config says); the command refuses it."""
    from paca_prof.cli import main

    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 8, "target_modules": ["q_proj"],
         "target_parameters": ["mlp.experts.gate_up_proj"]}))
    assert main(["run", "--model", "tiny", "--seq", "16", "--device", "meta",
                 "--peft-config", str(folder), "--out", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no parameter was matched" in err[0], err
    assert not (tmp_path / "t").exists()
