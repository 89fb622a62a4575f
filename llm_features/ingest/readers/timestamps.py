"""Event times: the accepted range (``--min-timestamp``, ``--allow-future``) and timestamp columns
(epoch numbers in a unit, or ISO 8601) to int64 microseconds."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd

from llm_features.ingest.errors import IngestError
from llm_features.ingest.readers.source import SourceFile, first_bad, shorten

US_PER_S = 1_000_000
_UNIT_US = {"s": 1_000_000, "ms": 1_000, "us": 1, "ns": 0.001}
_UNIT_NAMES = {"s": "seconds", "ms": "milliseconds", "us": "microseconds", "ns": "nanoseconds"}
# --timestamp-unit auto reads an epoch number's unit off its magnitude: below 1e11 it is seconds
# (1e11 s is the year 5138), below 1e14 milliseconds, below 1e17 microseconds, else nanoseconds.
# Any plausible time (1990 to 2262) is far from these cut-offs in every unit.
_AUTO_UNITS = ("s", "ms", "us", "ns")
_AUTO_CUTS = np.array([1e11, 1e14, 1e17])

# the times a timestamp[us] column read back through pandas (nanoseconds) can hold
LATEST_US = (2**63 - 1) // 1000
EARLIEST_US = -LATEST_US
DEFAULT_MIN_TIMESTAMP = "1990-01-01"
FUTURE_SLACK_US = 86_400 * US_PER_S  # clock skew, naive local times read as UTC


def us_to_iso(us: float) -> str:
    """An ISO 8601 UTC time, or a description when ``us`` is outside what can be stored."""
    if not np.isfinite(us):
        return "not a finite number"
    if us > LATEST_US:
        return "after 2262-04-11, the latest time that can be stored"
    if us < EARLIEST_US:
        return "before 1677-09-22, the earliest time that can be stored"
    return pd.Timestamp(int(us), unit="us", tz="UTC").isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class TimeBounds:
    """The plausible event times: not before ``min_us`` (``--min-timestamp``, default 1990-01-01) and
    not after ``max_us`` (now + 1 day, unless ``--allow-future``; never after 2262-04-11)."""

    min_us: int
    max_us: int
    allow_future: bool = False

    @classmethod
    def make(
        cls, min_timestamp: str = DEFAULT_MIN_TIMESTAMP, allow_future: bool = False, now_us: int | None = None
    ) -> "TimeBounds":
        text = str(min_timestamp).strip()
        try:
            ts = pd.Timestamp(text)
            if pd.isna(ts) or not re.match(r"^[+-]?\d{4}-\d{2}", text):
                raise ValueError(text)
            ts = ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")
        except (ValueError, TypeError, OverflowError):
            raise IngestError(
                f"{min_timestamp!r} is not an ISO 8601 date or time",
                option="--min-timestamp",
                fix="For example --min-timestamp 1990-01-01 or 2015-06-01T00:00:00Z (naive = UTC).",
            ) from None
        now_us = int(time.time() * US_PER_S) if now_us is None else now_us
        max_us = LATEST_US if allow_future else now_us + FUTURE_SLACK_US
        min_us = int(ts.value // 1000)
        if min_us >= max_us:
            raise IngestError(
                f"{min_timestamp!r} is not before the latest accepted time ({us_to_iso(max_us)})",
                option="--min-timestamp",
                fix="Give an earlier --min-timestamp.",
            )
        return cls(max(min_us, EARLIEST_US), max_us, allow_future)

    @property
    def min_iso(self) -> str:
        return us_to_iso(self.min_us)


_TS_FIX = (
    "Timestamps must be epoch numbers (unit from --timestamp-unit, auto by magnitude) or ISO 8601 such "
    "as 2000-12-31T22:00:00Z; fix the value or pass --timestamp-unit."
)


def check_time_range(
    src: SourceFile,
    lines: np.ndarray,
    us: np.ndarray,
    values: pd.Series,
    column: str,
    bounds: TimeBounds,
    unit: str | None = None,
    unit_option: bool = True,
) -> None:
    """Refuse times outside ``bounds`` (and non-finite ones), naming the first such row of the file.
    ``unit_option``: whether the format has a --timestamp-unit to suggest (MovieLens has not)."""
    us = np.asarray(us, dtype=np.float64)
    early = us < bounds.min_us
    late = us > bounds.max_us
    bad = early | late | ~np.isfinite(us)
    if not bad.any():
        return
    idx = np.flatnonzero(bad)
    i = int(idx[0])
    more = f" ({len(idx)} rows out of range in all)" if len(idx) > 1 else ""
    read_as = f", read as epoch {_UNIT_NAMES[unit]}" if unit else ""
    value = f"timestamp {shorten(values.iloc[i])!r} ({us_to_iso(us[i])}{read_as})"
    or_unit = " or --timestamp-unit" if unit_option else ""
    if early[i]:
        problem = f"{value} is before {bounds.min_iso}{more}"
        fix = (f"Zero, negative and such early times are not plausible event times: fix the value{or_unit}, "
               "or pass --min-timestamp to accept earlier times.")
    elif bounds.allow_future or us[i] > LATEST_US or not np.isfinite(us[i]):
        problem = f"{value} is after {us_to_iso(min(bounds.max_us, LATEST_US))}{more}"
        fix = f"Fix the value{or_unit}."
    else:
        problem = f"{value} is in the future (after {us_to_iso(bounds.max_us)}, now + 1 day){more}"
        fix = (f"Future rows would become the online values: fix the value{or_unit}, or "
               "pass --allow-future to keep them.")
    raise src.error(problem, line=int(lines[i]), column=column, fix=fix)


def epoch_to_us(
    src: SourceFile,
    frame: pd.DataFrame,
    values: np.ndarray,
    column: str,
    unit: str,
    bounds: TimeBounds,
    unit_option: bool = True,
) -> np.ndarray:
    """Epoch numbers (int64 or float64, no missing values) of ``unit`` to int64 µs, range-checked first."""
    mult = _UNIT_US[unit]
    f = values.astype(np.float64) * mult
    lines = frame["_line"].to_numpy()
    check_time_range(src, lines, f, frame[column], column, bounds, unit, unit_option)
    if values.dtype.kind in "iu":
        v = values.astype(np.int64)
        return v * int(mult) if mult >= 1 else (v + 500) // 1000
    return np.round(f).astype(np.int64)


def detect_epoch_unit(src: SourceFile, frame: pd.DataFrame, values: np.ndarray, column: str) -> str:
    """The unit of epoch numbers from their magnitude; a column mixing units is an error naming the
    first row whose unit differs from the column's (most common) one."""
    if len(values) == 0:
        return "s"
    k = np.searchsorted(_AUTO_CUTS, np.abs(values.astype(np.float64)), side="right")
    counts = np.bincount(k, minlength=len(_AUTO_UNITS))
    if (counts > 0).sum() == 1:
        return _AUTO_UNITS[int(k[0])]
    top = counts.max()
    dom = int(k[0]) if counts[k[0]] == top else int(np.argmax(counts))
    i = int(np.flatnonzero(k != dom)[0])
    n_off = int((k != dom).sum())
    raise src.error(
        f"mixed timestamp units: {shorten(frame[column].iloc[i])!r} looks like epoch "
        f"{_UNIT_NAMES[_AUTO_UNITS[int(k[i])]]} but {int(counts[dom])} of {len(k)} values look like epoch "
        f"{_UNIT_NAMES[_AUTO_UNITS[dom]]} ({n_off} {'row differs' if n_off == 1 else 'rows differ'})",
        line=int(frame["_line"].iloc[i]),
        column=column,
        fix="Convert the column to one unit, or pass --timestamp-unit s|ms|us|ns to read every value "
        "in one unit.",
    )


def to_timestamp_us(
    src: SourceFile,
    frame: pd.DataFrame,
    col: str,
    unit: str = "auto",
    label: str | None = None,
    bounds: TimeBounds | None = None,
) -> np.ndarray:
    """Event times as int64 microseconds since the epoch (UTC), each within ``bounds``.

    ``unit``: ``s``/``ms``/``us``/``ns`` for epoch numbers, ``iso`` for ISO 8601 strings (naive
    means UTC), ``auto``: epoch numbers in the unit their magnitude shows (one unit for the whole
    column), anything else must be ISO 8601. Every error names the offending row.
    """
    bounds = bounds or TimeBounds.make()
    s = frame[col]
    name = label or col
    lines = frame["_line"].to_numpy()
    if isinstance(s.dtype, pd.DatetimeTZDtype) or pd.api.types.is_datetime64_dtype(s.dtype):
        return _datetimes_us(src, lines, pd.to_datetime(s, utc=True), s, name, bounds, "empty timestamp")
    if pd.api.types.is_numeric_dtype(s.dtype) and not pd.api.types.is_bool_dtype(s.dtype):
        return _numbers_us(src, frame, col, name, unit, bounds)
    st = s.astype("string").str.strip()
    empty = (st.isna() | (st == "")).to_numpy()
    if empty.any():
        raise first_bad(src, lines, empty, s, name, "empty timestamp", _TS_FIX)
    if unit != "iso":
        values = _epoch_text(src, lines, st, s, name, unit)
        if values is not None:
            return _epochs_us(src, frame, values, col, unit, bounds)
    dt = pd.to_datetime(st, utc=True, format="ISO8601", errors="coerce")
    return _datetimes_us(src, lines, dt, s, name, bounds, "cannot parse timestamp as ISO 8601")


def _datetimes_us(
    src: SourceFile,
    lines: np.ndarray,
    dt: pd.Series,
    s: pd.Series,
    name: str,
    bounds: TimeBounds,
    problem: str,
) -> np.ndarray:
    """Parsed UTC times (NaT where ``problem``) as int64 µs, range-checked."""
    bad = dt.isna().to_numpy()
    if bad.any():
        raise first_bad(src, lines, bad, s, name, problem, _TS_FIX)
    us = dt.dt.as_unit("us").astype("int64").to_numpy()
    check_time_range(src, lines, us, s, name, bounds)
    return us


def _epochs_us(
    src: SourceFile, frame: pd.DataFrame, values: np.ndarray, col: str, unit: str, bounds: TimeBounds
) -> np.ndarray:
    """Epoch numbers in ``unit`` (``auto``: the unit their magnitude shows) as int64 µs."""
    u = detect_epoch_unit(src, frame, values, col) if unit == "auto" else unit
    return epoch_to_us(src, frame, values, col, u, bounds)


def _numbers_us(
    src: SourceFile, frame: pd.DataFrame, col: str, name: str, unit: str, bounds: TimeBounds
) -> np.ndarray:
    """A numeric column (parquet) of epoch numbers, none of them empty or non-finite, as int64 µs."""
    s = frame[col]
    lines = frame["_line"].to_numpy()
    empty = s.isna().to_numpy()
    if empty.any():
        raise first_bad(src, lines, empty, s, name, "empty timestamp", _TS_FIX)
    if unit == "iso":
        raise src.error(
            "--timestamp-unit iso but the column holds numbers",
            column=name,
            fix="Pass the epoch unit with --timestamp-unit s|ms|us|ns (or auto).",
        )
    values = s.to_numpy()
    if values.dtype.kind not in "iuf":
        values = values.astype(np.float64)
    nonfinite = ~np.isfinite(values.astype(np.float64))
    if nonfinite.any():
        raise first_bad(src, lines, nonfinite, s, name, "cannot parse timestamp", _TS_FIX)
    return _epochs_us(src, frame, values, col, unit, bounds)


def _epoch_text(
    src: SourceFile, lines: np.ndarray, st: pd.Series, s: pd.Series, name: str, unit: str
) -> np.ndarray | None:
    """Stripped text timestamps as epoch numbers (int64, else float64), or None where they are to be
    read as ISO 8601 (``auto`` and fewer numbers than not); a non-number among epoch numbers is an error."""
    num = pd.to_numeric(st, errors="coerce")
    is_num = num.notna().to_numpy() & np.isfinite(num.to_numpy(dtype=np.float64, na_value=np.nan))
    numeric = is_num.all() or unit != "auto" or (is_num.any() and is_num.sum() >= (~is_num).sum())
    if not numeric:
        return None
    if not is_num.all():
        what = (
            f"cannot parse timestamp as a number (--timestamp-unit {unit})"
            if unit != "auto"
            else f"cannot parse timestamp ({int(is_num.sum())} of {len(is_num)} values are "
            "epoch numbers)"
        )
        raise first_bad(src, lines, ~is_num, s, name, what, _TS_FIX)
    if num.dtype in (np.int64, pd.Int64Dtype()):
        return num.to_numpy(dtype=np.int64)
    return num.to_numpy(dtype=np.float64, na_value=np.nan)
