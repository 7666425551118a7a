"""The method registry (paca_prof/methods): each record prepares its model, checks r by its own
rule, names its adapter branch and describes itself."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from torch import nn

from paca.model import find_targets
from paca_prof import methods
from paca_prof.methods import METHODS, QUANTIZED, MethodSettings, check_methods
from paca_prof.methods.registry import REGISTRY, prepare, trainable_parameters
from paca_prof.recipe import Recipe, default_targets

R, ALPHA = 4, 12.0
RECIPE = Recipe()


def test_every_method_has_one_record():
    assert set(REGISTRY) == set(METHODS)
    assert {name for name, m in REGISTRY.items() if m.quantization} == set(QUANTIZED)
    for name in METHODS:
        assert methods.get(name).name == name


def test_prepare_every_method_trains_what_it_should(make_llama):
    settings = MethodSettings(r=R, alpha=ALPHA)
    targets = find_targets(make_llama(), list(default_targets()))
    n_all = sum(p.numel() for p in make_llama().parameters())
    lora = sum((t.in_features + t.out_features) * R for t in targets.values())
    expected = {
        "frozen": 0, "full": n_all,
        "paca": sum(t.out_features * R for t in targets.values()),
        "lora": lora, "dora": lora + sum(t.out_features for t in targets.values()),
        "paca-authors": sum(t.out_features * R for t in targets.values()),
    }
    for name, count in expected.items():
        model = prepare(make_llama(), name, settings, RECIPE)
        params = trainable_parameters(model)
        assert sum(p.numel() for p in params) == count, name
        ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params), name
        # the module paths stay the base model's (PEFT's wrapper is unwrapped)
        assert "model.layers.0.self_attn.q_proj" in dict(model.named_modules()), name


def test_each_method_checks_r_by_its_own_rule(make_llama):
    # PaCA trains r of a linear's input columns: r above in_features (64 here) is refused;
    # PEFT's LoRA accepts any positive r (its rank is not bounded by the layer's size)
    with pytest.raises(ValueError, match=r"--r \(--rank\) 65 does not fit .*q_proj.*paca"):
        prepare(make_llama(), "paca", MethodSettings(r=65), RECIPE)
    model = prepare(make_llama(), "lora", MethodSettings(r=65), RECIPE)
    assert model.model.layers[0].self_attn.q_proj.lora_A["default"].out_features == 65


def test_quantized_methods_store_bases_in_bitsandbytes_4bit_and_train(make_llama):
    import bitsandbytes as bnb

    for name, scope, prep in (("qlora", "all-linear", True), ("qpaca", "targets", False)):
        recipe = Recipe(targets=("q_proj", "v_proj"), quantize=scope, kbit_prep=prep)
        model = prepare(make_llama().to(torch.bfloat16), name, MethodSettings(r=R), recipe)
        # PEFT keeps the base as <target>.base_layer: name it by its target
        leaves = {path.replace(".base_layer", "").rsplit(".", 1)[-1]: type(m)
                  for path, m in model.named_modules()
                  if isinstance(m, (nn.Linear, bnb.nn.Linear4bit))
                  and not any(part in path for part in ("lora_A", "lora_B"))}
        four_bit = {leaf for leaf, kind in leaves.items() if issubclass(kind, bnb.nn.Linear4bit)}
        # all-linear: every linear but the head; targets: only the adapted ones
        assert four_bit == ({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                             "down_proj"} if scope == "all-linear" else {"q_proj", "v_proj"}), name
        assert not issubclass(leaves["lm_head"], bnb.nn.Linear4bit)
        # PEFT's kbit prep casts what is not 4-bit to fp32; without it it stays bf16
        assert model.lm_head.weight.dtype == (torch.float32 if prep else torch.bfloat16), name
        params = trainable_parameters(model)
        ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
        model(input_ids=ids, labels=ids).loss.backward()
        assert params and all(p.grad is not None and torch.isfinite(p.grad).all()
                              for p in params), name


def test_method_names_are_checked_once_each():
    assert check_methods(["lora", "paca"]) == ("lora", "paca")
    with pytest.raises(ValueError, match="unknown method 'qdora'"):
        check_methods(["qdora"])
    with pytest.raises(ValueError, match="named twice: lora"):
        check_methods(["lora", "paca", "lora"])
    with pytest.raises(ValueError, match="no method"):
        check_methods([])


@pytest.mark.parametrize("values, message", [
    (dict(r=0), "r"), (dict(r=2.5), "whole"), (dict(alpha=float("nan")), "finite"),
    (dict(alpha=float("inf")), "finite"), (dict(alpha=0), "above 0"),
    (dict(dropout=1.0), "dropout"), (dict(dropout=float("nan")), "finite"),
    (dict(seed=2**64), "seed"), (dict(adapter_dtype="fp8"), "adapter_dtype"),
])
def test_settings_refuse_bad_values_in_one_line(values, message):
    with pytest.raises(ValueError, match=message) as error:
        MethodSettings(**values)
    assert "\n" not in str(error.value)


def test_adapter_branch_rules():
    lora, paca, full = methods.get("lora"), methods.get("paca"), methods.get("full")
    q = "model.layers.0.self_attn.q_proj"
    wrappers = {q}
    # LoRA: everything in its own modules, and what runs in the wrapper itself (cast, add)
    assert lora.is_branch_op(f"{q}.lora_A.default", "aten::mm", "forward", wrappers)
    assert lora.is_branch_op(q, "aten::add", "forward", wrappers)
    assert not lora.is_branch_op(f"{q}.base_layer", "aten::mm", "forward", wrappers)
    # PaCA: its gather and grad GEMM in PacaLinear, not the frozen GEMM
    assert paca.is_branch_op(q, "aten::index_select", "forward", wrappers)
    assert paca.is_branch_op(q, "aten::addmm", "backward", wrappers)
    assert not paca.is_branch_op(q, "aten::mm", "backward", wrappers)
    assert not paca.is_branch_op("model.layers.0.mlp", "aten::index_select", "forward",
                                 wrappers)
    assert not full.is_branch_op(q, "aten::mm", "forward", set())


def test_describe_names_the_settings_that_matter():
    settings = MethodSettings(r=16, alpha=32.0, dropout=0.1)
    assert methods.get("frozen").describe(settings) == {"method": "frozen"}
    lora = methods.get("lora").describe(settings)
    assert lora["r"] == 16 and lora["dropout"] == 0.1 and lora["autocast_adapter_dtype"]
    assert lora["implementation"].startswith("peft ")
    paca = methods.get("paca").describe(settings)
    assert paca["r"] == 16 and "dropout" not in paca and paca["adapter_dtype"] == "model"
    assert "nf4" in methods.get("qlora").describe(settings)["base_weights"]


def test_the_authors_scheme_is_a_method_that_reports_its_stale_steps(tmp_path, capsys):
    """paca-authors copies the columns into W on odd-numbered forwards only: every 2nd step of
    a model runs on columns one step old. A measured run steps two models: the timing pass's
    (its warm-up, which runs until the step time settles, and the timed steps) and the
    profiler pass's fresh one (one untimed step, one profiled). Its
    branch is P * scaling, the gather and the copy in forward, the grad GEMM (an mm with r
    columns) and the scaling's backward in backward."""
    from conftest import run_spec

    from paca_prof import engines, trace

    spec = run_spec(model="tiny", seq=16, dtype="fp32", device="cpu", steps=3, warmup=1,
                    methods=("paca", "paca-authors"))
    loaded = trace.load(engines.run(spec, tmp_path / "run", "pytest"))
    summary = loaded.summary.set_index("method")
    timing_steps = int(summary.loc["paca-authors", "warmup_steps"]
                       + summary.loc["paca-authors", "steps_timed"])
    assert summary.loc["paca-authors", "steps_timed"] == 3
    assert summary.loc["paca-authors", "steps_run"] == timing_steps + 2
    assert summary.loc["paca-authors", "stale_steps"] == timing_steps // 2 + 1
    assert pd.isna(summary.loc["paca", "stale_steps"])  # PaCA's columns are never stale
    from paca_prof import cli
    from paca_prof.analyze import TraceAnalysis

    cli._print_summary(TraceAnalysis(loaded.path))  # what `paca-prof run` prints
    lines = [line for line in capsys.readouterr().out.splitlines() if "stale" in line]
    assert lines == [(f"paca-authors: {timing_steps // 2 + 1} of {timing_steps + 2} steps run "
                      "(warm-up, timed and profiled; measured) ran on stale columns (W[:, idx] "
                      "one optimizer step old)")]
    assert loaded.run["methods"]["paca-authors"]["implementation"].startswith("the PaCA authors")
    ops = loaded.ops[loaded.ops["method"] == "paca-authors"]
    branch = ops[ops["adapter_branch"]]
    n_linears = 7 * spec.config.num_hidden_layers
    grad_gemms = branch[(branch["phase"] == "backward") & (branch["name"] == "aten::mm")]
    assert len(grad_gemms) == n_linears
    assert all(json.loads(s)[1][-1] == spec.settings.r for s in grad_gemms["shapes"])
    gathers = branch[(branch["phase"] == "forward") & (branch["name"] == "aten::index")]
    assert len(gathers) == n_linears
