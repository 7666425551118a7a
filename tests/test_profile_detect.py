"""Naming the method of a user's model (paca_prof/methods/detect.py)."""

from __future__ import annotations

import warnings

import pytest
from profile_testing import ALPHA, R, TARGETS, base_model, prepared

from paca_prof.methods.detect import detect
from paca_prof.methods.registry import REGISTRY

warnings.filterwarnings("ignore", category=FutureWarning)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_peft_lora_and_dora_from_the_config(method):
    model = prepared(method, dropout=0.05)
    for given in (model, model.get_base_model()):  # the wrapper, or the model inside it
        found = detect(given)
        assert found.name == method and found.record is REGISTRY[method]
        described = found.description
        assert (described["r"], described["alpha"], described["dropout"]) == (R, ALPHA, 0.05)
        assert sorted(described["target_modules"]) == sorted(TARGETS)
        assert described["use_dora"] is (method == "dora")
        assert "peft_config['default']" in described["detected_from"]
        assert found.record.wrapper_paths(model.get_base_model()) == {
            f"model.layers.{i}.self_attn.{t}" for i in range(2) for t in TARGETS}


def test_other_peft_tuners_by_their_peft_type():
    from peft import IA3Config, get_peft_model

    model = get_peft_model(base_model(), IA3Config(target_modules=["k_proj", "down_proj"],
                                                   feedforward_modules=["down_proj"]))
    found = detect(model)
    assert found.name == "ia3" and found.description["peft_type"] == "IA3"
    wrappers = found.record.wrapper_paths(model.get_base_model())
    assert wrappers == {f"model.layers.{i}.{p}" for i in range(2)
                        for p in ("self_attn.k_proj", "mlp.down_proj")}
    # ops run in a tuner layer itself (IA3's scaling) are its branch; its base layer's are not
    assert found.record.is_branch_op("model.layers.0.self_attn.k_proj", "aten::mul", "forward",
                                     wrappers)
    assert not found.record.is_branch_op("model.layers.0.self_attn.k_proj.base_layer",
                                         "aten::mm", "forward", wrappers)


def test_paca_and_the_authors_scheme():
    from paca import PacaConfig, PacaModel, inject_authors_paca

    model = prepared("paca")
    found = detect(model)
    assert found.name == "paca" and found.r == R and found.description["alpha"] == ALPHA
    assert detect(PacaModel(model)).name == "paca"
    authors = inject_authors_paca(base_model(), PacaConfig(r=R, target_modules=list(TARGETS)))
    found = detect(authors)
    assert found.name == "paca-authors" and found.r == R


def test_full_frozen_and_custom():
    model = base_model()
    assert detect(model).name == "full"
    for param in model.parameters():
        param.requires_grad_(False)
    assert detect(model).name == "frozen"
    model.lm_head.weight.requires_grad_(True)
    found = detect(model)
    assert found.name == "custom"
    assert found.description["trainable_modules"] == ["lm_head"]
    assert found.record.wrapper_paths(model) == set()
