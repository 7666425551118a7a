"""How views show an analysis table as text: byte columns in MiB with the unit in the header,
whole-number columns (counts, parameters) without decimals, other numbers with three, missing
values as a dash, every cell a plain string. The dashboard and the HTML report both use it, so
one table reads the same in both; neither ever places a value from a trace as markup."""

from __future__ import annotations

import math
import numbers

import numpy as np
import pandas as pd

from paca_prof.units import MIB

MISSING = "–"
# Columns that hold measured or derived quantities: never shown as whole numbers, even when
# their values happen to be whole.
_FRACTIONAL = ("_ms", "ms_", "mib", "gib", "ratio", "_vs_", "share", "error", "_us", "paper")


def is_bytes(column: str) -> bool:
    """A column of bytes (shown in MiB)."""
    return "bytes" in column and "ratio" not in column


def header(column: str) -> str:
    """The column's name as shown: byte columns say MiB ("floor_bytes" -> "floor_MiB")."""
    return column.replace("bytes", "MiB") if is_bytes(column) else column


def _missing(value) -> bool:
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    return isinstance(value, float) and math.isnan(value)


def whole_columns(frame: pd.DataFrame) -> set[str]:
    """Columns shown as whole numbers: integer columns, and float columns of counts (every
    value whole, the name not a time, size in MiB/GiB, ratio or share)."""
    whole = set()
    for column in frame.columns:
        values = frame[column]
        name = str(column).lower()
        if pd.api.types.is_bool_dtype(values) or is_bytes(name):
            continue
        if pd.api.types.is_integer_dtype(values):
            whole.add(column)
        elif pd.api.types.is_float_dtype(values) and not any(k in name for k in _FRACTIONAL):
            finite = values.dropna().astype(float)
            finite = finite[finite.map(math.isfinite)]
            if len(finite) and (finite == finite.round()).all():
                whole.add(column)
    return whole


def cell(value, column: str, whole: bool = False) -> str:
    """One value as text: bytes in MiB (two decimals), whole numbers with thousands
    separators, other numbers with three decimals, booleans as yes/no, anything else str()."""
    if _missing(value):
        return MISSING
    if isinstance(value, bool | np.bool_):
        return "yes" if value else "no"
    if isinstance(value, numbers.Number) and not isinstance(value, numbers.Integral):
        value = float(value)
        if not math.isfinite(value):
            return str(value)
    if is_bytes(column) and isinstance(value, numbers.Real):
        return f"{float(value) / MIB:,.2f}"
    if isinstance(value, numbers.Integral):
        return f"{int(value):,}"
    if isinstance(value, float):
        return f"{value:,.0f}" if whole else f"{value:,.3f}"
    return str(value)


def table_text(frame: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """A table as (headers, rows), every entry a plain string (see cell and header)."""
    whole = whole_columns(frame)
    columns = list(frame.columns)
    values = frame.astype(object).where(frame.notna(), None)
    rows = [[cell(v, str(c), c in whole) for c, v in zip(columns, row)]
            for row in values.itertuples(index=False)]
    return [header(str(c)) for c in columns], rows


def in_method_order(frame: pd.DataFrame, methods: list[str]) -> pd.DataFrame:
    """The rows of a table with a method column in the order of `methods` (the trace's),
    keeping the table's order within a method; methods not in the list come last."""
    if "method" not in frame or frame.empty:
        return frame
    rank = {m: i for i, m in enumerate(methods)}
    order = frame["method"].map(lambda m: rank.get(m, len(rank)))
    return frame.iloc[order.argsort(kind="stable")]
