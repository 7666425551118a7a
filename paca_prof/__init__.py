"""paca-prof: where a fine-tuning step's time and memory go, PaCA against LoRA, DoRA and full
fine-tuning. See DESIGN.md for the one-way flow: presets/methods -> engines -> trace -> analyze.

Two functions for a user's own setup, imported on first use (`import paca_prof` loads no
torch): profile(model, optimizer, out=...), a context manager over any training loop
(paca_prof/profiling.py), and simulate(model_config, peft_config, seq=..., batch=...), that
setup simulated on the meta device (paca_prof/simulation.py)."""

import logging as _logging

__version__ = "0.1.0"

# bitsandbytes' CPU backend tries, at import, to fetch an optional kernel from the Hugging Face
# Hub and warns when it cannot. paca-prof never fetches anything; the warning is noise.
_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: "kernels-community" not in str(record.msg))

# name -> the module that defines it (PEP 562); the modules are not named like the functions,
# so importing a module never hides its function.
_LAZY = {"profile": "paca_prof.profiling", "simulate": "paca_prof.simulation"}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'paca_prof' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *_LAZY])
