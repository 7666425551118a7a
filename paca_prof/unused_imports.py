"""bitsandbytes kept out of a process whose run does not use it.

PEFT imports bitsandbytes whenever it is installed (peft.helpers at import, LoRA's layer
dispatchers at injection), and bitsandbytes' import builds its torch.compile'd ops: about
1.5 s of a simulated run that should take under 10 s. A run whose methods and optimizer need
none of it marks bitsandbytes as absent (sys.modules[name] = None, Python's documented way to
block an import), so that PEFT and transformers take their paths for a machine without it.

Limits: process-wide and one-way, so only the paca-prof command's run and plan call it, in a
process of their own (cli.command), once the whole run is known and before PEFT is imported;
cli.main called in a process that goes on (a test, a notebook) and a library user's process
(paca_prof.profile) are never touched. Where bitsandbytes is already imported it stays.
"""

from __future__ import annotations

import sys

from paca_prof.methods import QUANTIZED

BITSANDBYTES_OPTIMIZERS = ("adamw-8bit", "paged-adamw-8bit")


def needs_bitsandbytes(methods, optimizer: str) -> bool:
    """Whether a run of `methods` with `optimizer` (recipe names) uses bitsandbytes: a method
    over 4-bit bases (qlora, qpaca) or an 8-bit optimizer."""
    return any(m in QUANTIZED for m in methods) or optimizer in BITSANDBYTES_OPTIMIZERS


def keep_out_bitsandbytes(methods, optimizer: str) -> None:
    """Block bitsandbytes' import for the rest of the process if the run does not need it."""
    if not needs_bitsandbytes(methods, optimizer) and "bitsandbytes" not in sys.modules:
        sys.modules["bitsandbytes"] = None
