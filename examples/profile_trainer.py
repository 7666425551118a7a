"""Profile your own training: fine-tune a tiny Llama with HF Trainer and PEFT LoRA for a few
steps on the CPU, profile it with paca-prof's ProfilerCallback, and open the trace with
`paca-prof analyze`.

    python examples/profile_trainer.py                  # the trace goes under the temp dir
    python examples/profile_trainer.py --out traces/my-run

The model has random weights, built from a config (nothing is downloaded); the data are random
token sequences of uneven length, padded by the collator, so the trace shows their padding.
Replace the model, the data and the arguments with your own: the callback is the only line
that profiling adds.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import warnings
from pathlib import Path

# bitsandbytes (which PEFT imports when it is installed) warns on CPUs with AVX512-BF16 that
# an optional kernel from the Hugging Face Hub is missing, then runs its own: not our concern.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

import torch  # noqa: E402  (after the line above, so that it holds when PEFT imports it)
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import (  # noqa: E402
    LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments)

from paca_prof.cli import main as paca_prof  # noqa: E402
from paca_prof.integrations.transformers import ProfilerCallback  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)
PAD = 0
WARMUP, ACTIVE = 1, 3  # the profiled steps: 1 warm-up, then 2 timed and 1 profiled
MAX_STEPS = 1000


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=176,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, pad_token_id=PAD)
    return LlamaForCausalLM(config)


def examples(n: int = 64) -> list[dict]:
    """Random sequences of 24 to 48 tokens (labels = the tokens; collate pads them)."""
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(24, 49, (n,), generator=generator)
    rows = []
    for length in lengths.tolist():
        ids = torch.randint(1, 512, (length,), generator=generator).tolist()
        rows.append({"input_ids": ids, "attention_mask": [1] * length, "labels": ids})
    return rows


def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
    """Pad to the longest sequence of the batch: pad tokens, attention_mask 0, labels -100
    (what a tokenizer's collator does)."""
    longest = max(len(row["input_ids"]) for row in rows)

    def padded(key, value):
        return torch.tensor([row[key] + [value] * (longest - len(row[key])) for row in rows])

    return {"input_ids": padded("input_ids", PAD), "attention_mask": padded("attention_mask", 0),
            "labels": padded("labels", -100)}


def _error(message: str) -> int:
    """Bad input: one line on stderr, exit status 2."""
    print(f"profile_trainer.py: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="the trace folder (default: a new folder under the temp dir)")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps (default 6)")
    parser.error = lambda message: sys.exit(_error(message))  # one line, no usage block
    args = parser.parse_args(argv)
    if not WARMUP + ACTIVE <= args.steps <= MAX_STEPS:
        return _error(f"--steps must be from {WARMUP + ACTIVE} (warm-up {WARMUP} and active "
                      f"{ACTIVE} steps) to {MAX_STEPS}, got {args.steps}")
    if args.out is not None and args.out.exists():
        return _error(f"--out {args.out} already exists; give a new folder")
    out = args.out or Path(tempfile.mkdtemp(prefix="paca-prof-example-")) / "trace"

    model = get_peft_model(tiny_llama(), LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.05,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    profiler = ProfilerCallback(out, warmup=WARMUP, active=ACTIVE)  # the line profiling adds
    with tempfile.TemporaryDirectory(prefix="paca-prof-example-trainer-") as trainer_dir:
        training = TrainingArguments(
            output_dir=trainer_dir, max_steps=args.steps, per_device_train_batch_size=4,
            gradient_accumulation_steps=2, activation_checkpointing=True, learning_rate=1e-3,
            use_cpu=True, report_to=[], save_strategy="no", logging_strategy="no",
            disable_tqdm=True)
        Trainer(model=model, args=training, train_dataset=examples(),
                data_collator=collate,
                callbacks=[profiler]).train()

    print(f"\ntrace: {profiler.path}\n")
    return paca_prof(["analyze", str(profiler.path)])


if __name__ == "__main__":
    sys.exit(main())
