"""Byte units: the one home of KiB/MiB/GiB, of reading a memory size and of printing one.

Torch-free and pandas-free: the command line, the planner and the dashboard all read sizes
through parse_bytes, so its rules (and its bound on time and size) live here once.
"""

from __future__ import annotations

import math
import re

KIB, MIB, GIB, TIB = 2**10, 2**20, 2**30, 2**40
# The largest size this tool reads: 1 EiB, far above any device, far below what a float holds
# exactly enough to matter. A larger number is a typo or an attack, not a memory size.
MAX_BYTES = 2**60

_UNITS = {"": 1, "b": 1,
          "k": KIB, "kib": KIB, "m": MIB, "mib": MIB, "g": GIB, "gib": GIB, "t": TIB, "tib": TIB,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
# At most 20 digits and a two-digit exponent: parsing is bounded in time whatever the input.
_SIZE = re.compile(r"^\s*(\d{1,20}(?:\.\d{0,20})?|\.\d{1,20})(?:e([+-]?\d{1,2}))?\s*([a-z]*)\s*$",
                   re.IGNORECASE)
_MAX_TEXT = 64


def parse_bytes(text: str | int) -> int:
    """Bytes in a memory size: "24GiB", "80GB", "1.5TiB", "512 MiB", "24g", "1e9" or an int.

    Binary units: KiB, MiB, GiB, TiB and the bare K, M, G, T (as torch and Docker read them);
    decimal units: KB, MB, GB, TB; B or no unit: bytes. Case-insensitive. Fractions are rounded
    down to whole bytes. Raises ValueError (one line) for anything else, a negative size, or a
    size above MAX_BYTES (1 EiB); reading takes bounded time for any input.
    """
    if isinstance(text, bool):
        raise ValueError(f"cannot read {text!r} as a memory size")
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"memory size must not be negative, got {text}")
        if text > MAX_BYTES:
            raise ValueError(f"memory size {text} is above the largest this tool reads (1 EiB)")
        return text
    shown = str(text)[:_MAX_TEXT] + ("..." if len(str(text)) > _MAX_TEXT else "")
    match = _SIZE.match(str(text)) if len(str(text)) <= _MAX_TEXT else None
    if not match or match.group(3).lower() not in _UNITS:
        raise ValueError(
            f"cannot read {shown!r} as a memory size: expected a number with an optional unit "
            "(KiB, MiB, GiB, TiB or K, M, G, T binary; KB, MB, GB, TB decimal; B), e.g. 24GiB")
    number, exponent, unit = match.groups()
    value = float(f"{number}e{exponent or 0}") * _UNITS[unit.lower()]
    if not math.isfinite(value) or value > MAX_BYTES:
        raise ValueError(f"memory size {shown!r} is above the largest this tool reads (1 EiB)")
    return int(math.floor(value))


def format_bytes(n: float) -> str:
    """Binary units, two decimals: '75.00 GiB', '40.00 MiB', '512 B'."""
    for unit, size in (("TiB", TIB), ("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"
