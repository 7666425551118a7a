"""PaCA (Partial Connection Adaptation, Woo et al., ICLR 2025) as a small library.

Fine-tunes r randomly chosen input columns of each target linear's weight. Use it in any
training loop, as PEFT:

    from paca import PacaConfig, get_paca_model
    model = get_paca_model(model, PacaConfig(r=8, alpha=16))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    ...
    model.save_pretrained("adapter")        # adapter_config.json + adapter_model.safetensors

The modules, one concept each: config (PacaConfig; torch-free), targets (which linears),
layer (PacaLinear and its autograd function), compiled (its C++ build), hooks (the column write
after each optimizer step), model (injection, PacaModel, disable/merge/unload), io (adapter
files in the authors' format), authors (the authors' own scheme, for comparison), quantized
(QPaCA over bitsandbytes 4-bit). See paca/README.md.

Only the config is imported eagerly; everything else (and torch) on first use.
"""

from paca.config import ALL_LINEAR, LLAMA_TARGETS, PacaConfig

# name -> the module that defines it, imported on first access (PEP 562).
_LAZY = {
    "PacaLinear": "paca.layer",
    "PacaLayer": "paca.layer",
    "PartialConnectionFn": "paca.layer",
    "PacaModel": "paca.model",
    "disable_adapter": "paca.model",
    "get_nb_trainable_parameters": "paca.model",
    "get_paca_model": "paca.model",
    "inject_paca": "paca.model",
    "merge_and_unload": "paca.model",
    "paca_layers": "paca.model",
    "print_trainable_parameters": "paca.model",
    "sync_columns": "paca.model",
    "unload": "paca.model",
    "unwrap": "paca.model",
    "load_adapter": "paca.io",
    "load_paca": "paca.io",
    "save_paca": "paca.io",
    "save_pretrained": "paca.io",
    "AuthorsPacaLinear": "paca.authors",
    "inject_authors_paca": "paca.authors",
    "stale_forwards": "paca.authors",
    "QPacaLinear": "paca.quantized",
    "ensure_built": "paca.compiled",
}

__all__ = ["ALL_LINEAR", "LLAMA_TARGETS", "PacaConfig", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'paca' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)
