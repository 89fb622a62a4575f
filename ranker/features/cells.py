"""Cells of a feature frame column to numpy: ids, categories, bags and LLM vectors, with what is missing.

A column is a pandas Series (historical features) or a list (online features); ``None`` for a column
the frame does not have. These readers know nothing of the model: :func:`ranker.features.extract`
combines them.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from ranker.features.spec import INT_MISSING


def _is_missing(v: Any) -> bool:
    if v is None or v is pd.NA:
        return True
    if isinstance(v, float):
        return math.isnan(v)
    return False


def _cells(col: Any, n: int) -> list[Any]:
    if col is None:
        return [None] * n
    return list(col.to_numpy(dtype=object) if isinstance(col, pd.Series) else col)


def _vectors(col: Any, n: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    cells = _cells(col, n)
    missing = np.array([_is_missing(v) or len(v) == 0 for v in cells], dtype=bool)
    present = [np.asarray(v, dtype=np.float32) for v, m in zip(cells, missing) if not m]
    if not present:
        return np.zeros((n, 0), np.float32), missing
    widths = {len(v) for v in present}
    if len(widths) != 1:
        raise ValueError(f"{name}: rows have different widths {sorted(widths)}; embeddings of two models mixed?")
    out = np.zeros((n, widths.pop()), np.float32)
    out[~missing] = np.stack(present)
    bad = ~np.isfinite(out).all(axis=1)
    if bad.any():  # a non-finite vector is as good as none
        out[bad] = 0.0
        missing |= bad
    return out, missing


def _ints(col: Any, n: int) -> np.ndarray:
    if col is None:
        return np.full(n, INT_MISSING, np.int64)
    if n == 1 and not isinstance(col, pd.Series):  # one served user: an int or None, without pandas
        v = col[0]
        if v is None:
            return np.full(1, INT_MISSING, np.int64)
        if isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) and -2**63 <= v < 2**63:
            return np.array([v], np.int64)
    s = pd.to_numeric(pd.Series(np.asarray(col, dtype=object) if not isinstance(col, pd.Series) else col),
                      errors="coerce")
    out = np.full(n, INT_MISSING, np.int64)
    ok = s.notna().to_numpy()
    out[ok] = s[ok].to_numpy().astype(np.int64)
    return out


def _category_str(v: Any, prefix: int | None) -> str | None:
    if _is_missing(v):
        return None
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        v = int(v)
    s = str(v).strip()
    if prefix is not None:
        s = s[:prefix]
    return s or None


def _categories(col: Any, prefix: int | None) -> np.ndarray:
    if not isinstance(col, pd.Series) and len(col) == 1:  # one served user: what factorize would give
        out = np.empty(1, dtype=object)
        out[0] = _category_str(col[0], prefix)
        return out
    series = col if isinstance(col, pd.Series) else pd.Series(np.asarray(col, dtype=object))
    codes, uniques = pd.factorize(series)
    table = np.array([_category_str(u, prefix) for u in uniques] + [None], dtype=object)
    return table[codes]  # code -1 (missing) picks the trailing None


def _int_bags(col: Any, n: int, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Bags of int ids, the last ``max_len`` of each; an absent or empty bag becomes [INT_MISSING]."""
    empty = np.array([INT_MISSING], np.int64)
    arrays = []
    for v in _cells(col, n):
        if _is_missing(v) or len(v) == 0:
            arrays.append(empty)
        else:
            arrays.append(np.asarray(v, dtype=np.int64)[-max_len:])
    lengths = np.fromiter((len(a) for a in arrays), np.int64, count=n)
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets, (np.concatenate(arrays) if arrays else np.zeros(0, np.int64))


def _str_bags(col: Any, n: int) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.zeros(n, np.int64)
    values: list[str | None] = []
    for i, v in enumerate(_cells(col, n)):
        items = [] if _is_missing(v) else [str(x) for x in v if not _is_missing(x) and str(x)]
        if not items:
            items = [None]
        values.extend(items)
        lengths[i] = len(items)
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets, np.array(values, dtype=object)


def _positive_rate(col: Any, n: int, max_len: int) -> np.ndarray:
    out = np.zeros(n, np.float32)
    for i, v in enumerate(_cells(col, n)):
        if not _is_missing(v) and len(v):
            out[i] = float(np.mean(np.asarray(v, dtype=np.float32)[-max_len:]))
    return out


def _pad_width(m: np.ndarray, width: int) -> np.ndarray:
    if m.shape[1] == width:
        return m
    out = np.zeros((m.shape[0], width), np.float32)
    out[:, : m.shape[1]] = m
    return out

