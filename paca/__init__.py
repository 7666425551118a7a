"""PaCA (Partial Connection Adaptation, Woo et al., ICLR 2025) as a small library.

Fine-tunes r randomly chosen input columns of each target linear's weight. Use it in any
training loop:

    from paca import PacaConfig, get_paca_model
    model = get_paca_model(model, PacaConfig(r=8, alpha=16))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
"""

from paca.config import LLAMA_TARGETS, PacaConfig
from paca.layer import PacaLinear, PartialConnectionFn
from paca.model import (
    get_paca_model,
    load_paca,
    merge_and_unload,
    paca_layers,
    save_paca,
    unload,
)

__all__ = [
    "LLAMA_TARGETS",
    "PacaConfig",
    "PacaLinear",
    "PartialConnectionFn",
    "get_paca_model",
    "load_paca",
    "merge_and_unload",
    "paca_layers",
    "save_paca",
    "unload",
]
