"""Typed columns of a raw frame: integer ids, numbers and 0/1 labels, each error naming its row."""

from __future__ import annotations

import numpy as np
import pandas as pd

from llm_features.ingest.readers.source import SourceFile, first_bad

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_EXACT_FLOAT = 2**53  # beyond this a float id is not exact


_ID_FIX = "Ids must be integers; fix the value, or pass --hash-ids to map string ids to int64."
_ID_RANGE_FIX = (
    "Pass --hash-ids to map each id's text to a stable 63-bit id (ids beyond int64 are never wrapped)."
)


def to_int64(
    src: SourceFile,
    frame: pd.DataFrame,
    col: str,
    label: str | None = None,
    fix: str = _ID_FIX,
    range_fix: str | None = None,
) -> np.ndarray:
    """A column as int64; an empty or non-integer value, or one outside int64, is an error naming its line.

    Integers are parsed exactly (never through a float), so a value beyond int64 is refused rather
    than wrapped; ``12.0`` is accepted, a float beyond 2**53 is not (it cannot be exact).
    """
    s = frame[col]
    name = label or col
    lines = frame["_line"].to_numpy()
    range_fix = range_fix or (fix if fix != _ID_FIX else _ID_RANGE_FIX)
    if pd.api.types.is_integer_dtype(s.dtype) and not s.isna().any():
        if s.dtype in (np.uint64, pd.UInt64Dtype()):
            big = (s.to_numpy(dtype=np.uint64) > np.uint64(INT64_MAX))
            if big.any():
                raise first_bad(src, lines, big, s, name, "outside the int64 range", range_fix)
        return s.to_numpy(dtype=np.int64)
    if pd.api.types.is_numeric_dtype(s.dtype) and not pd.api.types.is_bool_dtype(s.dtype):
        arr = s.to_numpy(dtype=np.float64, na_value=np.nan)
        bad = ~np.isfinite(arr) | (arr != np.round(arr))
        if bad.any():
            raise first_bad(src, lines, bad, s, name, "not an integer", fix)
        big = np.abs(arr) > _EXACT_FLOAT
        if big.any():
            raise first_bad(
                src, lines, big, s, name, "a floating-point id beyond 2**53 is not exact", range_fix
            )
        return arr.astype(np.int64)
    st = s.astype("string").str.strip()
    num = pd.to_numeric(st, errors="coerce")
    if num.dtype in (np.int64, pd.Int64Dtype()) and not num.isna().any():
        return num.to_numpy(dtype=np.int64)  # every value an integer within int64
    out, out_of_range, not_int = _exact_integers(st)
    bad = not_int | out_of_range
    if bad.any():
        i = int(np.flatnonzero(bad)[0])  # the first bad row of the file, whichever kind
        if out_of_range[i]:
            raise first_bad(
                src, lines, out_of_range, s, name, f"outside the int64 range ({INT64_MIN} to {INT64_MAX})",
                range_fix,
            )
        raise first_bad(src, lines, not_int, s, name, "not an integer", fix)
    return out


def _exact_integers(st: pd.Series) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The slow path of :func:`to_int64`: exact integers (any length) and integral decimals such as
    12.0, as ``(values, out_of_range, not_int)`` (0 where a mask holds)."""
    int_text = st.str.fullmatch(r"[+-]?\d+").fillna(False).to_numpy(dtype=bool)
    out = np.zeros(len(st), dtype=np.int64)
    out_of_range = np.zeros(len(st), dtype=bool)
    not_int = np.zeros(len(st), dtype=bool)
    idx = np.flatnonzero(int_text)
    if len(idx):
        texts = st.to_numpy(dtype=object)[idx]
        values = [int(t) for t in texts]
        ok = np.array([INT64_MIN <= v <= INT64_MAX for v in values], dtype=bool)
        out_of_range[idx[~ok]] = True
        out[idx[ok]] = np.array([v for v, k in zip(values, ok) if k], dtype=np.int64)
    rest = np.flatnonzero(~int_text)
    if len(rest):
        f = pd.to_numeric(st.iloc[rest], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        integral = np.isfinite(f) & (f == np.round(f))
        exact = integral & (np.abs(f) <= _EXACT_FLOAT)
        not_int[rest[~integral]] = True
        out_of_range[rest[integral & ~exact]] = True
        out[rest[exact]] = f[exact].astype(np.int64)
    return out, out_of_range, not_int


def to_float(
    src: SourceFile, frame: pd.DataFrame, col: str, label: str | None = None, allow_empty: bool = True
) -> np.ndarray:
    """A numeric column as float64 (NaN where empty, if allowed); other text, nan and inf are errors."""
    s = frame[col]
    lines = frame["_line"].to_numpy()
    if pd.api.types.is_numeric_dtype(s.dtype) and not pd.api.types.is_bool_dtype(s.dtype):
        arr = s.to_numpy(dtype=np.float64, na_value=np.nan)
        empty = np.isnan(arr)
    else:
        st = s.astype("string").str.strip()
        empty = (st.isna() | (st == "")).to_numpy()
        arr = pd.to_numeric(st.mask(pd.Series(empty, index=st.index)), errors="coerce").to_numpy(
            dtype=np.float64, na_value=np.nan
        )
        bad = np.isnan(arr) & ~empty
        if bad.any():
            raise first_bad(src, lines, bad, s, label or col, "not a number", "Fix the value.")
    infinite = np.isinf(arr)
    if infinite.any():
        raise first_bad(
            src, lines, infinite, s, label or col, "not a finite number",
            "Give a finite number, or leave it empty.",
        )
    if not allow_empty and empty.any():
        raise first_bad(src, lines, empty, s, label or col, "empty value", "Fill it in.")
    return arr


def to_label(src: SourceFile, frame: pd.DataFrame, col: str, label: str | None = None) -> np.ndarray:
    """A 0/1 label column (also true/false/yes/no) as int8."""
    s = frame[col]
    lines = frame["_line"].to_numpy()
    if pd.api.types.is_bool_dtype(s.dtype) and not s.isna().any():
        return s.to_numpy(dtype=np.int8)
    st = s.astype("string").str.strip().str.lower()
    mapping = {"1": 1, "0": 0, "1.0": 1, "0.0": 0, "true": 1, "false": 0, "yes": 1, "no": 0}
    out = st.map(mapping)
    bad = out.isna().to_numpy()
    if bad.any():
        raise first_bad(
            src,
            lines,
            bad,
            s,
            label or col,
            "label must be 0 or 1 (or true/false)",
            "Fix the value, or use --label-rule instead of --label-column.",
        )
    return out.to_numpy(dtype=np.int8)


