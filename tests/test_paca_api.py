"""PaCA's PEFT-style API: PacaModel, adapter folders in the authors' format, targets as PEFT
takes them, modules_to_save, disable/merge/unload, safe loads, tied weights, stacking, wrapped
models, HF Trainer checkpoints."""

from __future__ import annotations

import copy
import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from paca import (
    LLAMA_TARGETS,
    PacaConfig,
    PacaLinear,
    PacaModel,
    get_paca_model,
    inject_paca,
    paca_layers,
    unload,
)
from paca.io import CONFIG_NAME, WEIGHTS_NAME, config_from_json
from paca_testing import (  # noqa: F401  (partial_connection: the autouse fixture)
    ALPHA,
    N_TARGETS,
    R,
    assert_columns_synced,
    assert_same_state,
    batch,
    cfg,
    logits_of,
    loss_of,
    partial_connection,
    plain_with_columns,
    sgd_steps,
    trainable,
)

# The fields of the authors' PacaConfig (their PEFT 0.11 fork, tuners/paca/config.py, with
# PeftConfig's): their loader calls PacaConfig(**fields), so a file must hold exactly these.
AUTHORS_FIELDS = {
    "auto_mapping", "base_model_name_or_path", "revision", "peft_type", "task_type",
    "inference_mode", "r", "target_modules", "paca_alpha", "fan_in_fan_out", "bias",
    "modules_to_save", "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern",
    "megatron_config", "megatron_core", "layer_replication", "gradient_accumulation_steps",
}


def trained(make_llama, **config):
    """A PacaModel trained for 3 SGD steps, and its untouched base model."""
    base = make_llama()
    model = get_paca_model(copy.deepcopy(base), cfg(**config))
    sgd_steps(model, 3, lr=0.2)
    return model, base


# ---------------------------------------------------------------- PacaModel


def test_get_paca_model_returns_a_forwarding_paca_model(make_llama):
    base = make_llama()
    model = get_paca_model(copy.deepcopy(base), cfg())
    assert isinstance(model, PacaModel)
    assert model.config is model.get_base_model().config  # attributes forward to the model
    probe = batch(9)
    assert torch.equal(logits_of(model, probe), logits_of(base, probe))
    # The wrapped model keeps the base model's module paths.
    inner = dict(model.get_base_model().named_modules())
    assert set(dict(base.named_modules())) <= set(inner)
    assert isinstance(inner["model.layers.0.self_attn.q_proj"], PacaLinear)
    assert set(paca_layers(model)) == set(paca_layers(model.get_base_model()))


def test_inject_paca_works_in_place_and_keeps_module_paths(make_llama):
    base = make_llama()
    model = inject_paca(base, cfg())
    assert model is base and type(model).__name__ == "LlamaForCausalLM"
    assert isinstance(model.get_submodule("model.layers.1.mlp.down_proj"), PacaLinear)
    assert len(paca_layers(model)) == N_TARGETS


def test_trainable_parameter_counts(make_llama, capsys):
    model = get_paca_model(make_llama(), cfg())
    trainable_n, total = model.get_nb_trainable_parameters()
    expected = sum(l.out_features * R for l in paca_layers(model).values())
    assert trainable_n == expected
    assert total == sum(p.numel() for p in model.parameters())
    model.print_trainable_parameters()
    line = capsys.readouterr().out.strip()
    assert line == (f"trainable params: {expected:,d} || all params: {total:,d} || "
                    f"trainable%: {100 * expected / total:.4f}")


def test_state_dict_after_each_step_holds_that_steps_columns(make_llama):
    """The stale-save bug: a state dict (and so a checkpoint) written right after an optimizer
    step must hold that step's columns, with fused AdamW (HF Trainer's default) too."""
    model = get_paca_model(make_llama(), cfg())
    opt = torch.optim.AdamW(trainable(model), lr=1e-2, fused=True)
    for step in range(2):
        loss_of(model, batch(step)).backward()
        opt.step()
        opt.zero_grad()
        full = model.get_base_model().state_dict()
        for name, layer in paca_layers(model).items():
            want = (layer.paca_weight.detach() * layer.scaling)
            assert torch.equal(full[f"{name}.weight"][:, layer.indices], want), (step, name)


def test_state_dict_of_a_paca_model_is_the_adapter(make_llama):
    model, _ = trained(make_llama)
    state = model.state_dict()
    assert len(state) == 2 * N_TARGETS
    assert all(re.search(r"\.(paca_weight|indices)$", k) for k in state)
    fresh = get_paca_model(make_llama(), cfg(seed=7))  # other columns: re-derived on load
    result = fresh.load_state_dict(state)  # strict: the adapter's keys are all there
    assert not result.missing_keys and not result.unexpected_keys
    probe = batch(9)
    assert torch.equal(logits_of(fresh, probe), logits_of(model, probe))
    with pytest.raises(RuntimeError, match="missing keys"):
        fresh.load_state_dict({k: v for k, v in state.items() if "layers.0." not in k})


# ---------------------------------------------------------------- adapter folders


def test_save_pretrained_writes_the_authors_format(make_llama, tmp_path):
    model, _ = trained(make_llama)
    model.save_pretrained(tmp_path / "adapter", task_type="CAUSAL_LM")
    fields = json.loads((tmp_path / "adapter" / CONFIG_NAME).read_text())
    assert set(fields) == AUTHORS_FIELDS
    assert fields["peft_type"] == "PACA" and fields["r"] == R and fields["paca_alpha"] == ALPHA
    assert fields["target_modules"] == list(LLAMA_TARGETS) and fields["task_type"] == "CAUSAL_LM"
    tensors = load_file(tmp_path / "adapter" / WEIGHTS_NAME)
    assert len(tensors) == 2 * N_TARGETS
    for name, layer in paca_layers(model).items():
        paca_w = tensors[f"base_model.model.{name}.paca_w"]
        idx = tensors[f"base_model.model.{name}.paca_indices"]
        assert torch.equal(paca_w, layer.paca_weight.detach()) and idx.dtype == torch.int64
        assert torch.equal(idx, layer.indices)
    assert not list((tmp_path / "adapter").glob("paca-prof-*"))  # no temporary file left


@pytest.mark.parametrize("is_trainable", [False, True])
def test_from_pretrained_round_trip(make_llama, tmp_path, is_trainable):
    model, base = trained(make_llama, seed=3)
    model.save_pretrained(tmp_path)
    fresh = PacaModel.from_pretrained(make_llama(), tmp_path, is_trainable=is_trainable)
    probe = batch(9)
    assert torch.equal(logits_of(fresh, probe), logits_of(model, probe))
    layers = paca_layers(fresh)
    for name, layer in paca_layers(model).items():
        assert torch.equal(layers[name].indices, layer.indices), name
        assert layers[name].paca_weight.requires_grad == is_trainable
    assert sum(p.requires_grad for p in fresh.parameters()) == (N_TARGETS if is_trainable else 0)
    restored = fresh.unload()
    assert_same_state(restored.state_dict(), base.state_dict())


def authors_adapter(base: nn.Module, r: int, alpha: float, seed: int, directory, shift: float):
    """An adapter folder as the authors' code writes one, built from their description: columns
    randperm(in)[:r] (unsorted), paca_w = W[:, idx] / scaling, here moved by `shift` as if
    trained. Returns the plain model their code would then compute with (W[:, idx] = scaling *
    paca_w)."""
    scaling = alpha / r
    generator = torch.Generator().manual_seed(seed)
    reference = copy.deepcopy(base)
    tensors = {}
    with torch.no_grad():
        for name, module in reference.named_modules():
            if name.rsplit(".", 1)[-1] in ("q_proj", "v_proj") and isinstance(module, nn.Linear):
                idx = torch.randperm(module.in_features, generator=generator)[:r]
                paca_w = module.weight[:, idx] / scaling + shift
                module.weight[:, idx] = scaling * paca_w
                tensors[f"base_model.model.{name}.paca_w"] = paca_w.contiguous()
                tensors[f"base_model.model.{name}.paca_indices"] = idx
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, WEIGHTS_NAME))
    fields = {  # their PeftConfig.save_pretrained: asdict, sets as lists, sorted keys
        "alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": "some/llama",
        "bias": "none", "fan_in_fan_out": False, "gradient_accumulation_steps": 4,
        "inference_mode": True, "layer_replication": None, "layers_pattern": None,
        "layers_to_transform": None, "megatron_config": None, "megatron_core": "megatron.core",
        "modules_to_save": None, "paca_alpha": alpha, "peft_type": "PACA", "r": r,
        "rank_pattern": {}, "revision": None, "target_modules": ["v_proj", "q_proj"],
        "task_type": "CAUSAL_LM",
    }
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(fields, f, indent=2, sort_keys=True)
    return reference


def test_an_adapter_written_by_the_authors_code_loads(make_llama, tmp_path):
    base = make_llama()
    reference = authors_adapter(base, r=6, alpha=12.0, seed=5, directory=tmp_path, shift=0.05)
    model = PacaModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)
    probe = batch(9)
    torch.testing.assert_close(logits_of(model, probe), logits_of(reference, probe),
                               rtol=1e-5, atol=1e-6)
    their = load_file(tmp_path / WEIGHTS_NAME)
    for name, layer in paca_layers(model).items():
        assert torch.equal(layer.indices, their[f"base_model.model.{name}.paca_indices"].sort()[0])
        assert layer.r == 6 and layer.scaling == 2.0
    assert not torch.equal(logits_of(model, probe), logits_of(base, probe))
    assert_same_state(model.unload().state_dict(), base.state_dict())


def test_an_adapter_written_here_loads_as_the_authors_code_loads_it(make_llama, tmp_path):
    """Their loading, re-implemented from their code's description: config fields passed to
    their PacaConfig (no other key allowed), then W[:, paca_indices] = scaling * paca_w."""
    model, base = trained(make_llama, target_modules=["q_proj", "down_proj"],
                          exclude_modules=["model.layers.1.self_attn.q_proj"])
    model.save_pretrained(tmp_path)
    fields = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert set(fields) == AUTHORS_FIELDS
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    theirs = copy.deepcopy(base)
    scaling = fields["paca_alpha"] / fields["r"]
    with torch.no_grad():
        for name, module in theirs.named_modules():
            targeted = (re.fullmatch(fields["target_modules"], name)
                        if isinstance(fields["target_modules"], str)
                        else name.rsplit(".", 1)[-1] in fields["target_modules"])
            if not targeted:
                continue
            paca_w = tensors[f"base_model.model.{name}.paca_w"]
            module.weight[:, tensors[f"base_model.model.{name}.paca_indices"]] = scaling * paca_w
    assert "model.layers.1.self_attn.q_proj" not in paca_layers(model)
    assert len(tensors) == 2 * 3
    probe = batch(9)
    assert torch.equal(logits_of(theirs, probe), logits_of(model, probe))


def test_bad_adapter_configs_are_refused(make_llama, tmp_path):
    model, _ = trained(make_llama)
    model.save_pretrained(tmp_path)
    good = json.loads((tmp_path / CONFIG_NAME).read_text())
    for change, message in [
        ({"peft_type": "LORA"}, "not 'PACA'"),
        ({"bias": "all"}, "training biases"),
        ({"surprise": 1}, "unknown fields"),
        ({"r": 0}, "r must be a positive integer"),
        ({"target_modules": "("}, "not a regular expression"),
    ]:
        with pytest.raises(ValueError, match=message):
            config_from_json({**good, **change})
    (tmp_path / CONFIG_NAME).write_text("{not json")
    fresh = make_llama()
    with pytest.raises(ValueError, match="not readable JSON"):
        PacaModel.from_pretrained(fresh, tmp_path)
    os.remove(tmp_path / CONFIG_NAME)
    with pytest.raises(ValueError, match="adapter_config.json is missing"):
        PacaModel.from_pretrained(fresh, tmp_path)
    assert not paca_layers(fresh)


# ---------------------------------------------------------------- safe loads


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [
        p.requires_grad for p in model.parameters()]


def test_load_state_dict_from_a_model_with_other_indices_is_refused_unchanged(make_llama):
    """A full state dict trained on other columns: refused with a ValueError before anything
    changes, and unload() still restores the base bit for bit."""
    base = make_llama()
    source, _ = trained(make_llama, seed=1)
    model = get_paca_model(copy.deepcopy(base), cfg(seed=2))
    sgd_steps(model, 1, lr=0.2)
    before = {k: v.clone() for k, v in model.get_base_model().state_dict().items()}
    with pytest.raises(ValueError, match="trained on other columns"):
        model.get_base_model().load_state_dict(source.get_base_model().state_dict())
    assert_same_state(model.get_base_model().state_dict(), before)
    assert_same_state(unload(model).state_dict(), base.state_dict())


def test_adapter_with_other_indices_is_rederived_and_unload_stays_exact(make_llama):
    base = make_llama()
    source, _ = trained(make_llama, seed=1)
    model = get_paca_model(copy.deepcopy(base), cfg(seed=2))
    sgd_steps(model, 1, lr=0.2)
    adapter = {k.removeprefix("base_model."): v for k, v in source.state_dict().items()}
    model.get_base_model().load_state_dict(adapter, strict=False)
    assert_columns_synced(model)
    probe = batch(9)
    assert torch.equal(logits_of(model, probe), logits_of(source, probe))
    for name, layer in paca_layers(model).items():
        assert torch.equal(layer.indices, paca_layers(source)[name].indices)
    assert_same_state(unload(model).state_dict(), base.state_dict())


def test_load_state_dict_bad_shapes_name_the_layer_and_change_nothing(make_llama):
    model = get_paca_model(make_llama(), cfg())
    state = model.state_dict()
    before = _snapshot(model.get_base_model())
    last = "base_model.model.layers.1.mlp.down_proj"
    for bad, message in [
        ({f"{last}.paca_weight": torch.zeros(64, R + 1)}, r"down_proj: paca_weight has shape"),
        ({f"{last}.indices": torch.tensor([0, 1, 2, 500])}, r"down_proj: indices must lie in"),
        ({f"{last}.indices": torch.tensor([0, 1, 1, 2])}, r"down_proj: indices must be distinct"),
        ({f"{last}.indices": torch.zeros(R)}, r"down_proj: indices must be integers"),
    ]:
        with pytest.raises(ValueError, match=message):
            model.load_state_dict({**state, **bad})
        after = _snapshot(model.get_base_model())
        assert_same_state(after[0], before[0])
        assert after[1] == before[1]


def test_a_wrong_shape_outside_paca_layers_is_refused_before_any_change(make_llama):
    """torch copies every other tensor before it reports a wrong shape; the injected model's
    check refuses first, so the changed columns in the same dict never reach the model."""
    from paca.model import StateDictMismatch

    model = inject_paca(make_llama(), cfg())
    before = _snapshot(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["model.layers.0.self_attn.q_proj.paca_weight"] += 1.0
    state["model.norm.weight"] = torch.zeros(3)
    with pytest.raises(StateDictMismatch, match=r"model\.norm\.weight has shape \(3,\)"):
        model.load_state_dict(state)
    assert issubclass(StateDictMismatch, ValueError) and issubclass(StateDictMismatch,
                                                                    RuntimeError)
    after = _snapshot(model)
    assert_same_state(after[0], before[0])
    assert after[1] == before[1]


def test_paca_model_strict_load_with_wrong_names_is_refused_before_any_change(make_llama):
    from paca.model import StateDictMismatch

    model = get_paca_model(make_llama(), cfg())
    before = _snapshot(model.get_base_model())
    adapter = {k: v.clone() for k, v in model.state_dict().items()}
    first = next(k for k in adapter if k.endswith(".paca_weight"))
    adapter[first] += 1.0
    with pytest.raises(StateDictMismatch, match=r"unexpected keys \['junk'\]"):
        model.load_state_dict({**adapter, "junk": torch.zeros(1)})
    last = max(adapter)
    with pytest.raises(StateDictMismatch, match=re.escape(f"missing keys ['{last}']")):
        model.load_state_dict({k: v for k, v in adapter.items() if k != last})
    after = _snapshot(model.get_base_model())
    assert_same_state(after[0], before[0])
    assert after[1] == before[1]
    model.load_state_dict({**adapter, "junk": torch.zeros(1)}, strict=False)  # as torch: ignored
    assert torch.equal(model.state_dict()[first], adapter[first])


def test_adapter_of_another_model_shape_is_refused_before_any_change(make_llama, tmp_path):
    model, _ = trained(make_llama)
    model.save_pretrained(tmp_path)
    for other in (make_llama(hidden_size=32, intermediate_size=64),
                  make_llama(num_hidden_layers=3)):
        before = _snapshot(other)
        with pytest.raises(ValueError, match=r"layers\.0\.self_attn\.q_proj|holds layers"):
            PacaModel.from_pretrained(other, tmp_path)
        assert not paca_layers(other)
        after = _snapshot(other)
        assert_same_state(after[0], before[0])
        assert after[1] == before[1]


def test_loading_into_a_model_that_has_paca_already_is_refused(make_llama, tmp_path):
    model, _ = trained(make_llama)
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="already has PaCA layers"):
        PacaModel.from_pretrained(model, tmp_path)
    with pytest.raises(ValueError, match="already has PaCA layers"):
        inject_paca(model.get_base_model(), cfg())


# ---------------------------------------------------------------- targets, as PEFT takes them


@pytest.mark.parametrize("targets, expected", [
    (r".*\.(q|v)_proj", {"q_proj", "v_proj"}),
    ("all-linear", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
    (["self_attn.q_proj", "mlp.up_proj"], {"q_proj", "up_proj"}),
])
def test_target_forms(make_llama, targets, expected):
    model = inject_paca(make_llama(tie_word_embeddings=False), cfg(target_modules=targets))
    leaves = {name.rsplit(".", 1)[-1] for name in paca_layers(model)}
    assert leaves == expected
    assert "lm_head" not in paca_layers(model)


def test_exclude_layers_and_patterns(make_llama):
    config = cfg(
        target_modules=["q_proj", "down_proj"],
        exclude_modules=r".*layers\.0\.mlp\.down_proj",
        layers_to_transform=[0, 2],
        rank_pattern={"q_proj": 2, r"layers\.2\.mlp\.down_proj": 8},
        alpha_pattern={"down_proj": 4.0},
    )
    model = inject_paca(make_llama(num_hidden_layers=3), config)
    layers = paca_layers(model)
    assert set(layers) == {"model.layers.0.self_attn.q_proj", "model.layers.2.self_attn.q_proj",
                           "model.layers.2.mlp.down_proj"}
    assert [layers[n].r for n in sorted(layers)] == [2, 8, 2]
    assert layers["model.layers.2.mlp.down_proj"].scaling == 4.0 / 8
    assert layers["model.layers.0.self_attn.q_proj"].scaling == ALPHA / 2


def test_targets_that_select_nothing_raise_and_change_nothing(make_llama):
    model = make_llama()
    before = [p.requires_grad for p in model.parameters()]
    with pytest.raises(ValueError, match="no module is left"):
        inject_paca(model, cfg(target_modules=["q_proj"], layers_to_transform=[7]))
    with pytest.raises(ValueError, match=r"match no nn.Linear"):
        inject_paca(model, cfg(target_modules=r".*\.nothing"))
    with pytest.raises(ValueError, match="layers_to_transform works with a list"):
        PacaConfig(target_modules=".*q_proj", layers_to_transform=[0])
    assert not paca_layers(model) and [p.requires_grad for p in model.parameters()] == before


def test_config_module_imports_without_torch():
    import subprocess
    import sys

    code = ("import sys, builtins\n"
            "real = builtins.__import__\n"
            "def guard(name, *a, **k):\n"
            "    if name == 'torch' or name.startswith('torch.'):\n"
            "        raise ImportError('torch is blocked')\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = guard\n"
            "from paca.config import LLAMA_TARGETS, PacaConfig\n"
            "from paca import PacaConfig as P2, LLAMA_TARGETS as T2\n"
            "assert 'torch' not in sys.modules and P2(r=2).r == 2 and T2 == LLAMA_TARGETS\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------- modules_to_save, disable


def test_modules_to_save_train_save_and_restore(make_llama, tmp_path):
    base = make_llama(tie_word_embeddings=False)
    model = get_paca_model(copy.deepcopy(base), cfg(target_modules=["q_proj"],
                                                    modules_to_save=["lm_head"]))
    head = model.get_base_model().lm_head
    assert head.weight.requires_grad
    sgd_steps(model, 2, lr=0.2)
    assert not torch.equal(head.weight, base.lm_head.weight)
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    assert torch.equal(tensors["base_model.model.lm_head.weight"], head.weight.detach())
    fresh = PacaModel.from_pretrained(copy.deepcopy(base), tmp_path)
    probe = batch(9)
    assert torch.equal(logits_of(fresh, probe), logits_of(model, probe))
    with model.disable_adapter():
        assert torch.equal(logits_of(model, probe), logits_of(base, probe))
    assert torch.equal(logits_of(model, probe), logits_of(fresh, probe))
    assert_same_state(model.unload().state_dict(), base.state_dict())


def test_disable_adapter_gives_the_base_model_and_comes_back(make_llama):
    model, base = trained(make_llama)
    probe = batch(9)
    want = logits_of(model, probe)
    with model.disable_adapter():
        assert torch.equal(logits_of(model, probe), logits_of(base, probe))
        loss = loss_of(model, batch(0))
        assert not loss.requires_grad  # nothing trains while disabled
    assert torch.equal(logits_of(model, probe), want)
    with pytest.raises(KeyError), model.disable_adapter():
        raise KeyError("inside")
    assert torch.equal(logits_of(model, probe), want)


def test_merge_and_unload_of_a_paca_model(make_llama):
    model, base = trained(make_llama)
    probe = batch(9)
    want = logits_of(plain_with_columns(base, model), probe)
    merged = model.merge_and_unload()
    assert type(merged) is type(base) and not paca_layers(merged)
    assert set(merged.state_dict()) == set(base.state_dict())
    assert torch.equal(logits_of(merged, probe), want)
    assert not hasattr(merged, "paca_config")


# ---------------------------------------------------------------- refusals


def test_tied_target_weights_are_refused(make_llama):
    model = make_llama(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    before = [p.requires_grad for p in model.parameters()]
    with pytest.raises(ValueError, match=r"lm_head is tied to \['model.embed_tokens.weight'\]"):
        inject_paca(model, cfg(target_modules=["q_proj", "lm_head"]))
    assert not paca_layers(model) and [p.requires_grad for p in model.parameters()] == before


def test_stacking_on_a_peft_adapter_is_refused(make_llama):
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(make_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    before = [p.requires_grad for p in lora.parameters()]
    for model in (lora, lora.get_base_model()):
        with pytest.raises(ValueError, match="holds a PEFT adapter"):
            inject_paca(model, cfg(target_modules=["v_proj"]))
    assert [p.requires_grad for p in lora.parameters()] == before


@pytest.mark.parametrize("wrap", [get_paca_model, inject_paca])
def test_a_peft_adapter_over_paca_is_refused_at_its_first_training_forward(make_llama, wrap):
    """get_peft_model over a PaCA model keeps only its own adapter trainable: PaCA's columns
    would silently stop training. The first training forward refuses; no-grad forwards run."""
    from peft import LoraConfig, get_peft_model

    paca_model = wrap(make_llama(), cfg(target_modules=["q_proj", "v_proj"]))
    stacked = get_peft_model(paca_model, LoraConfig(r=2, target_modules=["k_proj"]))
    assert not any(layer.paca_weight.requires_grad for layer in paca_layers(paca_model).values())
    probe = batch(9)
    with torch.no_grad():
        stacked(input_ids=probe)  # evaluation trains nothing: allowed
    with pytest.raises(RuntimeError, match="PEFT adapter was stacked over this PaCA model"):
        stacked(input_ids=probe, labels=probe)


def test_columns_frozen_by_hand_without_peft_are_the_users_choice(make_llama):
    model = get_paca_model(make_llama(), cfg(target_modules=["q_proj", "v_proj"]))
    layer = next(iter(paca_layers(model).values()))
    layer.paca_weight.requires_grad_(False)
    probe = batch(9)
    model(input_ids=probe, labels=probe).loss.backward()
    assert layer.paca_weight.grad is None
    assert all(other.paca_weight.grad is not None
               for other in paca_layers(model).values() if other is not layer)


# ---------------------------------------------------------------- wrapped models


def test_compiled_wrapper_saves_and_loads_plain_names(make_llama, tmp_path):
    model, base = trained(make_llama)
    wrapped = torch.compile(model)  # OptimizedModule: names start with _orig_mod.
    assert any(n.startswith("_orig_mod.") for n, _ in wrapped.named_modules())
    from paca.io import save_pretrained

    save_pretrained(wrapped, tmp_path)
    keys = load_file(tmp_path / WEIGHTS_NAME)
    assert all(k.startswith("base_model.model.model.layers.") for k in keys)
    fresh = PacaModel.from_pretrained(torch.compile(make_llama()), tmp_path)
    probe = batch(9)
    assert torch.equal(logits_of(fresh, probe), logits_of(model, probe))


def test_ddp_wrapper_trains_saves_and_loads(make_llama, tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        base = make_llama()
        model = get_paca_model(copy.deepcopy(base), cfg())
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.AdamW(trainable(ddp), lr=1e-2)
        loss_of(ddp, batch(0)).backward()
        opt.step()
        assert_columns_synced(ddp)
        assert set(paca_layers(ddp)) == set(paca_layers(model))  # plain names, no "module."
        model.save_pretrained(tmp_path / "a")
        from paca.io import save_pretrained

        save_pretrained(ddp, tmp_path / "b")
        assert_same_state(load_file(tmp_path / "a" / WEIGHTS_NAME),
                          load_file(tmp_path / "b" / WEIGHTS_NAME))
        fresh = PacaModel.from_pretrained(copy.deepcopy(base), tmp_path / "b")
        probe = batch(9)
        assert torch.equal(logits_of(fresh, probe), logits_of(model, probe))
        # A Trainer-style checkpoint of the wrapper: adapter keys under module.
        state = ddp.state_dict()
        assert len(state) == 2 * N_TARGETS and all(k.startswith("module.") for k in state)
    finally:
        dist.destroy_process_group()


def test_legacy_file_saved_from_a_wrapped_model_loads(make_llama, tmp_path):
    from paca import load_paca, save_paca

    model, _ = trained(make_llama)
    path = tmp_path / "paca.safetensors"
    with pytest.deprecated_call():
        save_paca(model, path)
    tensors = load_file(path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    save_file({f"module._orig_mod.{k}": v for k, v in tensors.items()}, str(path), metadata)
    with pytest.deprecated_call():
        fresh = load_paca(make_llama(), path)
    probe = batch(9)
    assert torch.equal(logits_of(fresh, probe), logits_of(model, probe))


# ---------------------------------------------------------------- HF Trainer


def test_trainer_checkpoints_hold_the_trained_columns_and_resume(make_llama, tmp_path):
    """Trainer saves model.state_dict() for a PacaModel: the adapter only, with the columns of
    the step it was written at; resuming from it ends where the uninterrupted run ends."""
    from transformers import Trainer, TrainingArguments

    base = make_llama()
    data = [{"input_ids": batch(i, b=1)[0], "labels": batch(i, b=1)[0]} for i in range(8)]

    def run(out, max_steps, resume=None):
        model = get_paca_model(copy.deepcopy(base), cfg())
        args = TrainingArguments(
            output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=2,
            learning_rate=1e-2, save_steps=2, save_strategy="steps", report_to=[],
            logging_strategy="no", use_cpu=True, dataloader_num_workers=0, seed=0,
            remove_unused_columns=False, disable_tqdm=True,
        )
        trainer = Trainer(model=model, args=args, train_dataset=data)
        trainer.train(resume_from_checkpoint=resume)
        return model

    full = run(tmp_path / "full", 4)
    checkpoint = tmp_path / "full" / "checkpoint-4" / "model.safetensors"
    saved = load_file(checkpoint)
    assert len(saved) == 2 * N_TARGETS  # the trained columns and their indices only
    for name, layer in paca_layers(full).items():
        assert torch.equal(saved[f"base_model.{name}.paca_weight"], layer.paca_weight.detach())
    resumed = run(tmp_path / "full", 4, resume=str(tmp_path / "full" / "checkpoint-2"))
    probe = batch(9)
    torch.testing.assert_close(logits_of(resumed, probe), logits_of(full, probe),
                               rtol=1e-5, atol=1e-6)


def test_other_indices_without_their_columns_are_refused(make_llama):
    model = get_paca_model(make_llama(), cfg())
    state = model.state_dict()
    key = "base_model.model.layers.0.self_attn.q_proj.indices"
    with pytest.raises(ValueError, match="other indices but no paca_weight"):
        model.load_state_dict({key: (state[key] + 1) % 64}, strict=False)
    assert torch.equal(model.state_dict()[key], state[key])


def test_a_plain_base_state_dict_loaded_into_paca_becomes_the_new_base(make_llama):
    """A weight without paca_weight (a plain checkpoint of the base model): the columns restart
    from it, the output is that model's exactly, and unload() restores it bit for bit."""
    other = make_llama(seed=1)
    model = get_paca_model(make_llama(), cfg())
    sgd_steps(model, 1, lr=0.2)
    result = model.get_base_model().load_state_dict(other.state_dict(), strict=False)
    assert set(result.missing_keys) == {f"{n}.{k}" for n in paca_layers(model)
                                        for k in ("paca_weight", "indices")}
    probe = batch(9)
    assert torch.equal(logits_of(model, probe), logits_of(other, probe))
    assert_same_state(model.unload().state_dict(), other.state_dict())
