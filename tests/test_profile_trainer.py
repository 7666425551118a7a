"""ProfilerCallback under HF Trainer: gradient accumulation, gradient checkpointing, mixed
precision, TRL's SFTTrainer; the same activation bytes as `paca-prof run`; training unchanged."""

from __future__ import annotations

import warnings

import pytest
import torch
from profile_testing import (BATCH, batches, engine_spec, forward_activation_bytes,
                             no_staging_left, prepared)

from paca_prof import trace
from paca_prof.analyze import TraceAnalysis
from paca_prof.integrations.transformers import ProfilerCallback
from paca_prof.modules import LOSS

warnings.filterwarnings("ignore", category=FutureWarning)


def rows(n: int, padded: bool) -> list[dict]:
    """n training examples (one sequence each) for Trainer's default collator."""
    examples = []
    for batch in batches((n + BATCH - 1) // BATCH, padded=padded):
        for i in range(BATCH):
            examples.append({k: v[i] for k, v in batch.items()})
    return examples[:n]


def trainer(model, tmp_path, callbacks, *, steps=4, accumulation=1, checkpointing=False,
            bf16=False, padded=False):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=accumulation, max_steps=steps, learning_rate=1e-3,
        activation_checkpointing=checkpointing, bf16=bf16, use_cpu=True, report_to=[],
        save_strategy="no", logging_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0)
    return Trainer(model=model, args=args, train_dataset=rows(steps * accumulation * BATCH,
                                                              padded),
                   callbacks=callbacks)


@pytest.fixture(scope="module")
def accumulated(tmp_path_factory):
    """Trainer with gradient accumulation 2 and gradient checkpointing over padded batches."""
    tmp = tmp_path_factory.mktemp("trainer")
    callback = ProfilerCallback(tmp / "trace", warmup=1, active=3)
    trainer(prepared("lora"), tmp, [callback], steps=5, accumulation=2, checkpointing=True,
            padded=True).train()
    return trace.load(callback.path)


def test_accumulation_and_checkpointing_are_seen(accumulated):
    run = accumulated.run
    assert list(accumulated.summary["method"]) == ["lora"]
    assert run["recipe"]["grad_accum"] == 2 and run["recipe"]["grad_ckpt"] is True
    assert run["recipe"]["optimizer"] == "adamw"  # accelerate's wrapper looked through
    assert run["recipe"]["loss"] == "hf" and run["profile"]["micro_batches"] == 2
    assert run["command"].startswith("transformers.Trainer with ProfilerCallback")
    table = accumulated.batches
    assert list(table["step"]) == [1, 1, 2, 2, 3, 3]
    assert list(table["micro_batch"]) == [0, 1] * 3
    assert table["padding_tokens"].sum() > 0 and run["batches"]["padding_from"] == \
        "attention_mask == 0"
    row = accumulated.summary.iloc[0]
    assert row["optimizer_ms"] > 0 and row["backward_ms"] > 0
    ops = accumulated.ops
    up = ops[ops["module"] == "model.layers.0.mlp.up_proj"]
    # per micro-batch, one mm in forward; in backward its input gradient's and, checkpointed,
    # the forward's again
    assert (up["phase"] == "forward").sum() == 2 and (up["phase"] == "backward").sum() == 4
    assert ops["adapter_branch"].any()


def test_analyze_reads_a_trainer_trace(accumulated):
    analysis = TraceAnalysis(accumulated.path)
    assert analysis.summary()["status"].iloc[0] == "ok"
    assert analysis.batch_shapes()["micro_batches"].sum() == 6
    assert not analysis.layer_latency(phase="backward").empty


@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_bytes_equal_those_of_paca_prof_run(tmp_path, checkpointing):
    """Every module of the model saves what `paca-prof run` saves. The loss differs by one
    fp32 scalar: Trainer's model call passes num_items_in_batch, and transformers' loss then
    sums and divides by it (a saved scalar) instead of taking the mean."""
    from paca_prof import engines

    engines.run(engine_spec("lora", grad_ckpt=checkpointing), tmp_path / "run", "pytest")
    callback = ProfilerCallback(tmp_path / "trace", warmup=1, active=2)
    trainer(prepared("lora"), tmp_path, [callback], steps=3, accumulation=2,
            checkpointing=checkpointing).train()
    ran = forward_activation_bytes(trace.load(tmp_path / "run").layers)
    profiled = forward_activation_bytes(trace.load(tmp_path / "trace").layers)
    assert profiled.keys() == ran.keys()
    assert {m: b for m, b in profiled.items() if m != LOSS} == \
           {m: b for m, b in ran.items() if m != LOSS}
    assert profiled[LOSS] - ran[LOSS] == 4


def test_mixed_precision_is_recorded(tmp_path):
    callback = ProfilerCallback(tmp_path / "trace", warmup=1, active=2)
    trainer(prepared("lora"), tmp_path, [callback], steps=3, bf16=True).train()
    loaded = trace.load(callback.path)
    assert loaded.run["recipe"]["amp"] == "bf16" and loaded.run["dtype"] == "fp32"
    matmuls = loaded.ops[loaded.ops["name"].isin(["aten::mm", "aten::addmm"])
                         & (loaded.ops["phase"] == "forward")]
    assert "bfloat16" in set(matmuls["dtype"])


def test_training_is_bit_identical_with_and_without_the_callback(tmp_path):
    def trained(callbacks):
        model = prepared("lora", dropout=0.1)
        trainer(model, tmp_path, callbacks, steps=4, accumulation=2, padded=True).train()
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    plain = trained([])
    profiled = trained([ProfilerCallback(tmp_path / "trace", warmup=1, active=2)])
    assert [n for n in plain if not torch.equal(plain[n], profiled[n])] == []


def test_sft_trainer(tmp_path):
    pytest.importorskip("trl", reason="TRL is not installed (it is no dependency of paca-prof)")
    from datasets import Dataset
    from peft import LoraConfig
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from trl import SFTConfig, SFTTrainer

    from profile_testing import base_model

    vocab = {f"w{i}": i for i in range(250)} | {"<pad>": 250, "<eos>": 251, "<unk>": 252}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>",
                                        eos_token="<eos>", unk_token="<unk>")
    generator = torch.Generator().manual_seed(0)
    texts = [" ".join(f"w{int(i)}" for i in torch.randint(0, 250, (int(n),),
                                                         generator=generator))
             for n in torch.randint(6, 14, (16,), generator=generator)]
    callback = ProfilerCallback(tmp_path / "trace", warmup=1, active=2)
    config = SFTConfig(output_dir=str(tmp_path / "sft"), per_device_train_batch_size=2,
                       max_steps=3, max_length=16, use_cpu=True, report_to=[],
                       save_strategy="no", logging_strategy="no", disable_tqdm=True)
    SFTTrainer(model=base_model(), args=config, train_dataset=Dataset.from_dict({"text": texts}),
               processing_class=tokenizer, callbacks=[callback],
               peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
               ).train()
    loaded = trace.load(callback.path)
    assert list(loaded.summary["method"]) == ["lora"]
    assert loaded.run["batches"]["padding_from"] == "attention_mask == 0"
    assert loaded.batches["padding_tokens"].sum() > 0  # texts of 6 to 13 words, padded


def test_a_train_too_short_writes_nothing(tmp_path):
    callback = ProfilerCallback(tmp_path / "trace", warmup=1, active=3)
    with pytest.raises(RuntimeError, match="took 2 step.*nothing was written"):
        trainer(prepared("lora"), tmp_path, [callback], steps=2).train()
    assert not (tmp_path / "trace").exists() and no_staging_left(tmp_path / "trace")


def test_one_train_call_per_callback(tmp_path):
    callback = ProfilerCallback(tmp_path / "trace", warmup=0, active=2)
    model = prepared("lora")
    trainer(model, tmp_path, [callback], steps=2).train()
    with pytest.raises(RuntimeError, match="one train"):
        trainer(model, tmp_path, [callback], steps=2).train()


def test_callback_arguments_are_checked_at_once(tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(ValueError, match="already exists"):
        ProfilerCallback(tmp_path / "taken")
    with pytest.raises(ValueError, match="active must be at least 2"):
        ProfilerCallback(tmp_path / "t", active=1)
    assert not (tmp_path / "t").exists()
