"""Helpers of the profile() tests: a tiny model built as `paca-prof run` builds it, the
engine's spec of the same configuration, padded batches, and a plain training loop."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import tiny_llama_config

SEQ, BATCH = 16, 2
R, ALPHA, TARGETS = 4, 8.0, ("q_proj", "v_proj")


def config():
    return tiny_llama_config()


def base_model(seed: int = 0):
    """The tiny Llama with random weights, as the engines build it (fp32, sdpa, train mode)."""
    from paca_prof import presets

    torch.manual_seed(seed)
    model = presets.build_model(config(), torch.float32, "cpu", "sdpa")
    model.train()
    return model


def prepared(method: str, seed: int = 0, dropout: float = 0.0):
    """`method` put on base_model() the way a user does it: PEFT's get_peft_model, PaCA's
    inject_paca, or nothing (full)."""
    model = base_model(seed)
    if method in ("lora", "dora"):
        from peft import LoraConfig, get_peft_model

        return get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=dropout,
                                                target_modules=list(TARGETS),
                                                use_dora=method == "dora"))
    if method == "paca":
        from paca import PacaConfig, inject_paca

        return inject_paca(model, PacaConfig(r=R, alpha=ALPHA, target_modules=list(TARGETS)))
    assert method == "full"
    return model


def engine_spec(method: str, **recipe):
    """The RunSpec of `paca-prof run` for the same configuration as prepared(method)."""
    from paca_prof.methods import MethodSettings
    from paca_prof.recipe import Recipe
    from paca_prof.spec import RunSpec

    return RunSpec(model=config(), seq=SEQ, batch=BATCH, dtype="fp32", device="cpu",
                   methods=(method,), settings=MethodSettings(r=R, alpha=ALPHA),
                   recipe=Recipe(targets=TARGETS, **recipe), steps=2, warmup=1)


def batches(n: int, padded: bool = False, seed: int = 0) -> list[dict]:
    """n batches of random tokens (labels = the tokens); `padded`: the second row of each ends
    in i % 4 + 1 padding positions (attention_mask 0, labels -100)."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(0, config().vocab_size, (BATCH, SEQ), generator=generator)
        batch = {"input_ids": ids, "labels": ids.clone()}
        if padded:
            mask = torch.ones_like(ids)
            mask[1, SEQ - (i % 4 + 1):] = 0
            batch["attention_mask"] = mask
            batch["labels"][mask == 0] = -100
        out.append(batch)
    return out


def train(model, optimizer, data: list[dict], prof=None) -> None:
    """A plain training loop; prof.step() after each optimizer step when profiled. The loss
    stays alive through the optimizer step, as the engines' step keeps it (Prepared.step
    returns it), so that the two peaks hold the same tensors."""
    for batch in data:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        del loss
        if prof is not None:
            prof.step()


def adamw(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)


def forward_activation_bytes(layers) -> dict[str, int]:
    rows = layers[layers["phase"] == "forward"]
    return {m: int(b) for m, b in zip(rows["module"], rows["activation_bytes"])}


def no_staging_left(out: Path) -> bool:
    from paca_prof.trace import STAGING_PREFIX

    return not any(p.name.startswith(STAGING_PREFIX) for p in out.parent.iterdir())
