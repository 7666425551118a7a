"""The one validation layer for what comes from outside: arguments, config and spec files, trace
folders and dashboard requests. Each rule lives here once; callers name what they check.

Every check raises ValueError with one line that names the value and the rule. Torch-free.
"""

from __future__ import annotations

import math
import os
import stat
from pathlib import Path

# Files this tool reads from outside (run.yaml, config.json, a GPU spec) are small; anything
# bigger is refused before it is read, so a link to /dev/zero or a huge file cannot exhaust memory.
SMALL_FILE_LIMIT = 4 * 2**20
MAX_TEXT = 4096


def number(value, what: str, *, minimum: float | None = None, maximum: float | None = None,
           above: float | None = None, integer: bool = False) -> float | int:
    """A finite number (an int where `integer`) within [minimum, maximum] and > `above`.

    Booleans and strings are refused: YAML and JSON give numbers as numbers."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{what} must be a number, got {_show(value)}")
    if integer and not (isinstance(value, int) or float(value).is_integer()):
        raise ValueError(f"{what} must be a whole number, got {_show(value)}")
    if isinstance(value, float) and not math.isfinite(value):  # an int is finite, if huge
        raise ValueError(f"{what} must be finite, got {_show(value)}")
    if integer:
        value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{what} must be at least {_limit(minimum)}, got {_show(value)}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{what} must be at most {_limit(maximum)}, got {_show(value)}")
    if above is not None and value <= above:
        raise ValueError(f"{what} must be above {_limit(above)}, got {_show(value)}")
    return value


def _limit(bound: float | int) -> str:
    """A limit as people write it: an int in full (2**63-1, not 9.22337e+18), a float short."""
    return str(bound) if isinstance(bound, int) else f"{bound:g}"


def text(value, what: str, max_len: int = MAX_TEXT) -> str:
    """A plain string of at most `max_len` characters, without NUL."""
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {_show(value)}")
    if len(value) > max_len or "\x00" in value:
        raise ValueError(f"{what} must be a string of at most {max_len} characters without NUL")
    return value


def mapping(value, what: str) -> dict:
    """A mapping with string keys."""
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ValueError(f"{what} must be a mapping with string keys, got {_show(value)}")
    return value


def read_small_file(path: str | Path, what: str, limit: int = SMALL_FILE_LIMIT,
                    inside: Path | None = None) -> bytes:
    """The bytes of a regular file of at most `limit` bytes.

    FIFOs, devices, sockets and folders are refused without opening them (a FIFO would block,
    /dev/zero never ends); with `inside`, so is a file whose resolved path leaves that folder
    (a link out of a trace folder). The size is checked again on the open file, so a file
    that grows between the checks is still cut off."""
    path = Path(path)
    try:
        resolved = path.resolve(strict=True)
    except (OSError, RuntimeError):
        raise ValueError(f"{what}: {path} does not exist") from None
    if inside is not None:
        root = Path(inside).resolve()
        if resolved != root and root not in resolved.parents:
            raise ValueError(f"{what}: {path} is a link that leaves {inside}")
    info = os.stat(resolved)
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"{what}: {path} is not a regular file")
    if info.st_size > limit:
        raise ValueError(f"{what}: {path} is larger than {limit // 2**20} MiB")
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(resolved, flags)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped for something else since stat()
            raise ValueError(f"{what}: {path} is not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise ValueError(f"{what}: {path} is larger than {limit // 2**20} MiB")
    return data


def _show(value) -> str:
    if isinstance(value, int) and value.bit_length() > 200:  # repr of a huge int is slow or refused
        return f"an integer of {value.bit_length()} bits"
    shown = repr(value)
    return shown if len(shown) <= 60 else shown[:57] + "..."
