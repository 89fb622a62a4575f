"""Low-level readers: strict decoding, delimited files with source line numbers, typed columns.

Every parsed frame carries ``_line`` (the 1-based line, or row for parquet, in its source file) so
an error can point at it.
"""

from __future__ import annotations

import codecs
import csv
import io
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from llm_features.ingest.errors import IngestError

US_PER_S = 1_000_000
_UNIT_US = {"s": 1_000_000, "ms": 1_000, "us": 1, "ns": 0.001}
_UNIT_NAMES = {"s": "seconds", "ms": "milliseconds", "us": "microseconds", "ns": "nanoseconds"}
# --timestamp-unit auto reads an epoch number's unit off its magnitude: below 1e11 it is seconds
# (1e11 s is the year 5138), below 1e14 milliseconds, below 1e17 microseconds, else nanoseconds.
# Any plausible time (1990 to 2262) is far from these cut-offs in every unit.
_AUTO_UNITS = ("s", "ms", "us", "ns")
_AUTO_CUTS = np.array([1e11, 1e14, 1e17])

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_EXACT_FLOAT = 2**53  # beyond this a float id is not exact
# the times a timestamp[us] column read back through pandas (nanoseconds) can hold
LATEST_US = (2**63 - 1) // 1000
EARLIEST_US = -LATEST_US
DEFAULT_MIN_TIMESTAMP = "1990-01-01"
FUTURE_SLACK_US = 86_400 * US_PER_S  # clock skew, naive local times read as UTC


@dataclass
class SourceFile:
    """One input file: where it is and how its rows are counted."""

    path: Path
    row_word: str = "line"  # "line" for text files, "row" for parquet

    def error(
        self, problem: str, *, line: int | None = None, column: str | None = None, fix: str | None = None
    ) -> IngestError:
        return IngestError(problem, file=self.path, line=line, column=column, fix=fix, row_word=self.row_word)


def require_file(path: Path, what: str, fix: str) -> Path:
    if not path.is_file():
        raise IngestError(
            f"{what} not found" + (" (it is a directory)" if path.is_dir() else ""), file=path, fix=fix
        )
    return path


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


def _canonical_encoding(encoding: str) -> str:
    try:
        return codecs.lookup(encoding).name
    except LookupError:
        raise IngestError(
            f"unknown encoding '{encoding}'",
            fix="Pass a Python codec name to --encoding, e.g. utf-8, latin-1 or utf-16.",
        ) from None


def _line_of(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def read_text(path: Path, encoding: str, *, explicit: bool = True) -> str:
    """Decode ``path`` strictly; refuse UTF-16/binary or invalid bytes with the byte offset and line.

    ``explicit=False`` means the encoding is the format's default (Latin-1 for MovieLens): a file
    that is really UTF-8 with non-ASCII text is then refused rather than turned into mojibake.
    """
    enc = _canonical_encoding(encoding)
    data = path.read_bytes()
    utf16 = enc.startswith(("utf-16", "utf-32"))
    if not utf16:
        if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
            raise IngestError(
                f"starts with a UTF-16 byte-order mark (byte offset 0, line 1) but is read as {enc}",
                file=path,
                fix="Pass --encoding utf-16, or convert the file to UTF-8.",
            )
        nul = data.find(b"\x00")
        if nul >= 0:
            raise IngestError(
                f"NUL byte at byte offset {nul} (line {_line_of(data, nul)}): this is not {enc} text "
                "(UTF-16 or a binary file?)",
                file=path,
                fix="Pass --encoding utf-16 if it is UTF-16 text, or convert it to UTF-8.",
            )
        if enc == "utf-8" and data.startswith(codecs.BOM_UTF8):
            data = data[len(codecs.BOM_UTF8) :]
    try:
        text = data.decode(enc)
    except UnicodeDecodeError as e:
        raise IngestError(
            f"byte 0x{data[e.start]:02x} at byte offset {e.start} (line {_line_of(data, e.start)}) "
            f"is not valid {enc}",
            file=path,
            fix="Pass the file's real encoding with --encoding (e.g. --encoding latin-1).",
        ) from None
    if not explicit and enc in ("latin-1", "iso8859-1") and not data.isascii():
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            pass
        else:
            first = next(i for i, b in enumerate(data) if b >= 0x80)
            raise IngestError(
                f"expected Latin-1 (the original MovieLens encoding) but the file is UTF-8 "
                f"(first non-ASCII byte at offset {first}, line {_line_of(data, first)})",
                file=path,
                fix="Pass --encoding utf-8.",
            )
    return text


def split_delimited(src: SourceFile, text: str, sep: str, names: list[str]) -> tuple[pd.DataFrame, int]:
    """Split ``text`` into ``len(names)`` string columns on ``sep`` (no quoting), plus ``_line``.

    Returns the frame and the number of blank lines skipped. A line with the wrong number of
    fields is an error naming it.
    """
    lines = pd.Series(text.split("\n"), dtype=object)
    if len(lines) and lines.iloc[-1] == "":
        lines = lines.iloc[:-1]  # the final newline
    lines = lines.str.rstrip("\r")
    lineno = np.arange(1, len(lines) + 1, dtype=np.int64)
    keep = (lines.str.strip() != "").to_numpy()
    blank = int((~keep).sum())
    lines, lineno = lines[keep], lineno[keep]
    nf = len(names)
    counts = lines.str.count(_regex_escape(sep)).to_numpy()
    bad = np.flatnonzero(counts != nf - 1)
    if len(bad):
        i = bad[0]
        raise src.error(
            f"expected {nf} fields separated by '{sep}' ({sep.join(names)}) but found {counts[i] + 1}: "
            f"{_short(lines.iloc[i])!r}" + (f" ({len(bad)} such lines)" if len(bad) > 1 else ""),
            line=int(lineno[i]),
            fix="Fix or remove the line, or check --format.",
        )
    if len(lines) == 0:
        frame = pd.DataFrame({n: pd.Series([], dtype=object) for n in names})
    else:
        frame = lines.str.split(sep, n=nf - 1, expand=True, regex=False)
        frame.columns = names
    frame = frame.reset_index(drop=True)
    frame["_line"] = lineno
    return frame, blank


def _regex_escape(sep: str) -> str:
    import re

    return re.escape(sep)


def _short(value: object, n: int = 80) -> str:
    s = str(value)
    return s if len(s) <= n else s[: n - 3] + "..."


def _first_bad(
    src: SourceFile,
    lines: np.ndarray,
    mask: np.ndarray,
    values: pd.Series,
    column: str,
    problem: str,
    fix: str,
) -> IngestError:
    idx = np.flatnonzero(mask)
    i = idx[0]
    more = f" ({len(idx)} rows in all)" if len(idx) > 1 else ""
    return src.error(
        f"{problem}: {_short(values.iloc[i])!r}{more}", line=int(lines[i]), column=column, fix=fix
    )


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
                raise _first_bad(src, lines, big, s, name, "outside the int64 range", range_fix)
        return s.to_numpy(dtype=np.int64)
    if pd.api.types.is_numeric_dtype(s.dtype) and not pd.api.types.is_bool_dtype(s.dtype):
        arr = s.to_numpy(dtype=np.float64, na_value=np.nan)
        bad = ~np.isfinite(arr) | (arr != np.round(arr))
        if bad.any():
            raise _first_bad(src, lines, bad, s, name, "not an integer", fix)
        big = np.abs(arr) > _EXACT_FLOAT
        if big.any():
            raise _first_bad(
                src, lines, big, s, name, "a floating-point id beyond 2**53 is not exact", range_fix
            )
        return arr.astype(np.int64)
    st = s.astype("string").str.strip()
    num = pd.to_numeric(st, errors="coerce")
    if num.dtype in (np.int64, pd.Int64Dtype()) and not num.isna().any():
        return num.to_numpy(dtype=np.int64)  # every value an integer within int64
    # slow path: exact integers (any length) and integral decimals such as 12.0
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
    bad = not_int | out_of_range
    if bad.any():
        i = int(np.flatnonzero(bad)[0])  # the first bad row of the file, whichever kind
        if out_of_range[i]:
            raise _first_bad(
                src, lines, out_of_range, s, name, f"outside the int64 range ({INT64_MIN} to {INT64_MAX})",
                range_fix,
            )
        raise _first_bad(src, lines, not_int, s, name, "not an integer", fix)
    return out


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
            raise _first_bad(src, lines, bad, s, label or col, "not a number", "Fix the value.")
    infinite = np.isinf(arr)
    if infinite.any():
        raise _first_bad(
            src, lines, infinite, s, label or col, "not a finite number",
            "Give a finite number, or leave it empty.",
        )
    if not allow_empty and empty.any():
        raise _first_bad(src, lines, empty, s, label or col, "empty value", "Fill it in.")
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
        raise _first_bad(
            src,
            lines,
            bad,
            s,
            label or col,
            "label must be 0 or 1 (or true/false)",
            "Fix the value, or use --label-rule instead of --label-column.",
        )
    return out.to_numpy(dtype=np.int8)


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
    value = f"timestamp {_short(values.iloc[i])!r} ({us_to_iso(us[i])}{read_as})"
    or_unit = " or --timestamp-unit" if unit_option else ""
    if early[i]:
        raise src.error(
            f"{value} is before {bounds.min_iso}{more}",
            line=int(lines[i]),
            column=column,
            fix=f"Zero, negative and such early times are not plausible event times: fix the value{or_unit}, "
            "or pass --min-timestamp to accept earlier times.",
        )
    if bounds.allow_future or us[i] > LATEST_US or not np.isfinite(us[i]):
        raise src.error(
            f"{value} is after {us_to_iso(min(bounds.max_us, LATEST_US))}{more}",
            line=int(lines[i]),
            column=column,
            fix=f"Fix the value{or_unit}.",
        )
    raise src.error(
        f"{value} is in the future (after {us_to_iso(bounds.max_us)}, now + 1 day){more}",
        line=int(lines[i]),
        column=column,
        fix=f"Future rows would become the online values: fix the value{or_unit}, or "
        "pass --allow-future to keep them.",
    )


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
        f"mixed timestamp units: {_short(frame[column].iloc[i])!r} looks like epoch "
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
        dt = pd.to_datetime(s, utc=True)
        bad = dt.isna().to_numpy()
        if bad.any():
            raise _first_bad(src, lines, bad, s, name, "empty timestamp", _TS_FIX)
        us = dt.dt.as_unit("us").astype("int64").to_numpy()
        check_time_range(src, lines, us, s, name, bounds)
        return us
    if pd.api.types.is_numeric_dtype(s.dtype) and not pd.api.types.is_bool_dtype(s.dtype):
        empty = s.isna().to_numpy()
        if empty.any():
            raise _first_bad(src, lines, empty, s, name, "empty timestamp", _TS_FIX)
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
            raise _first_bad(src, lines, nonfinite, s, name, "cannot parse timestamp", _TS_FIX)
        u = detect_epoch_unit(src, frame, values, col) if unit == "auto" else unit
        return epoch_to_us(src, frame, values, col, u, bounds)
    st = s.astype("string").str.strip()
    empty = (st.isna() | (st == "")).to_numpy()
    if empty.any():
        raise _first_bad(src, lines, empty, s, name, "empty timestamp", _TS_FIX)
    if unit != "iso":
        num = pd.to_numeric(st, errors="coerce")
        is_num = num.notna().to_numpy() & np.isfinite(num.to_numpy(dtype=np.float64, na_value=np.nan))
        numeric = is_num.all() or unit != "auto" or (is_num.any() and is_num.sum() >= (~is_num).sum())
        if numeric:
            if not is_num.all():
                what = (
                    f"cannot parse timestamp as a number (--timestamp-unit {unit})"
                    if unit != "auto"
                    else f"cannot parse timestamp ({int(is_num.sum())} of {len(is_num)} values are "
                    "epoch numbers)"
                )
                raise _first_bad(src, lines, ~is_num, s, name, what, _TS_FIX)
            if num.dtype in (np.int64, pd.Int64Dtype()):
                values = num.to_numpy(dtype=np.int64)
            else:
                values = num.to_numpy(dtype=np.float64, na_value=np.nan)
            u = detect_epoch_unit(src, frame, values, col) if unit == "auto" else unit
            return epoch_to_us(src, frame, values, col, u, bounds)
    dt = pd.to_datetime(st, utc=True, format="ISO8601", errors="coerce")
    bad = dt.isna().to_numpy()
    if bad.any():
        raise _first_bad(src, lines, bad, s, name, "cannot parse timestamp as ISO 8601", _TS_FIX)
    us = dt.dt.as_unit("us").astype("int64").to_numpy()
    check_time_range(src, lines, us, s, name, bounds)
    return us


def check_delimiter(delimiter: str | None) -> str | None:
    """``--delimiter``: one character (``\\t`` or ``tab`` for a tab); None keeps the default."""
    if delimiter is None:
        return None
    d = {"\\t": "\t", "tab": "\t"}.get(delimiter, delimiter)
    if len(d) != 1 or d in "\"\r\n":
        raise IngestError(
            f"{delimiter!r} is not a single delimiter character",
            option="--delimiter",
            fix="Pass one character, e.g. --delimiter ';' or --delimiter '\\t' for tabs.",
        )
    return d


def _record_lines(text: str, sep: str, n_rows: int) -> np.ndarray | None:
    """The file line each data row starts on, when quoted fields span lines (else None)."""
    if '"' not in text:
        return None
    starts, prev_end = [], 0
    reader = csv.reader(io.StringIO(text), delimiter=sep)
    try:
        for _ in reader:
            starts.append(prev_end + 1)
            prev_end = reader.line_num
    except csv.Error:
        return None
    if len(starts) != n_rows + 1 or starts[-1] == len(starts):
        return None  # header + rows, and no record spans lines: the plain numbering holds
    return np.array(starts[1:], dtype=np.int64)


def read_table_file(src: SourceFile, encoding: str, delimiter: str | None = None) -> pd.DataFrame:
    """A generic CSV/TSV (header row) or parquet file as a frame of raw columns plus ``_line``.

    CSV values stay strings; ``_line`` is the line in the file where the row starts (the header is
    line 1). Parquet keeps its types; ``_line`` is the 1-based row.
    """
    path = src.path
    if path.suffix.lower() in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        src.row_word = "row"
        try:
            frame = pq.read_table(path).to_pandas()
        except Exception as e:  # noqa: BLE001  (pyarrow raises several types)
            raise src.error(
                f"cannot read as parquet ({e})", fix="Check the file is a parquet file."
            ) from None
        frame["_line"] = np.arange(1, len(frame) + 1, dtype=np.int64)
        return frame
    text = read_text(path, encoding)
    sep = check_delimiter(delimiter) or ("\t" if path.suffix.lower() in (".tsv", ".tab") else ",")
    try:
        frame = pd.read_csv(
            io.StringIO(text), sep=sep, dtype=str, keep_default_na=False, skip_blank_lines=False, engine="c"
        )
    except pd.errors.ParserError as e:
        m = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(e))
        if m:
            raise src.error(
                f"expected {m.group(1)} fields separated by {sep!r} (as in the header) "
                f"but found {m.group(3)}",
                line=int(m.group(2)),
                fix="Fix the line (quote values that contain the separator), or pass --delimiter.",
            ) from None
        raise src.error(
            f"cannot parse as delimited text with separator {sep!r} ({str(e).strip()})",
            fix="Fix the line, or pass --delimiter.",
        ) from None
    except pd.errors.EmptyDataError:
        raise src.error("the file is empty", fix="Give a file with a header row and data.") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    lines = _record_lines(text, sep, len(frame))
    frame["_line"] = lines if lines is not None else np.arange(2, len(frame) + 2, dtype=np.int64)
    data_cols = [c for c in frame.columns if c != "_line"]
    blank = (frame[data_cols] == "").all(axis=1).to_numpy() if data_cols else np.zeros(len(frame), bool)
    frame.attrs["blank_lines"] = int(blank.sum())
    return frame[~blank].reset_index(drop=True)


@dataclass
class Loaded:
    """What an adapter hands to the common pipeline (columns named canonically).

    interactions: user_id, item_id, ts_us (int64 µs UTC), rating (float64, NaN = unknown),
    optionally label (int8) and behavior_text; always _src (index into ``sources``) and _line.
    items: item_id, item_text, optionally title; its attribute columns; _src, _line.
    users: user_id and its attribute columns (``attributes["user"]``).
    """

    format: str
    interactions: pd.DataFrame
    sources: list[SourceFile]
    items: pd.DataFrame | None = None
    users: pd.DataFrame | None = None
    items_src: SourceFile | None = None
    users_src: SourceFile | None = None
    blank_lines: dict[str, int] | None = None
    column_names: dict[str, str] | None = None  # canonical -> source column, for messages
    # {"user": [...], "item": [...]}: llm_features.attributes.Attribute, each a column of users/items
    attributes: dict[str, list] | None = None
    skipped_columns: dict[str, list[dict[str, str]]] | None = None  # inference: columns not kept, and why


def fast_numeric(
    text: str, sep: str, names: list[str], float_columns: tuple[str, ...] = ()
) -> pd.DataFrame | None:
    """Fast path for clean all-numeric delimited text (pyarrow's CSV reader), or None.

    Returns None whenever the text is not plainly clean (blank lines, CRs, odd field counts, non-numbers),
    so the caller falls back to :func:`split_delimited`, whose errors name the line.
    """
    import io

    import pyarrow as pa
    from pyarrow import csv

    delim = sep if len(sep) == 1 else "\x1f"
    if "\r" in text or "\n\n" in text or text.startswith("\n") or (delim != sep and delim in text):
        return None
    if delim != sep:
        text = text.replace(sep, delim)
    try:
        table = csv.read_csv(
            io.BytesIO(text.encode("utf-8")),
            read_options=csv.ReadOptions(column_names=names),
            parse_options=csv.ParseOptions(delimiter=delim, quote_char=False, double_quote=False),
            convert_options=csv.ConvertOptions(
                column_types={n: pa.float64() if n in float_columns else pa.int64() for n in names}
            ),
        )
    except (pa.ArrowInvalid, pa.ArrowTypeError, ValueError):
        return None
    frame = table.to_pandas()
    if frame.isna().any().any():
        return None
    frame["_line"] = np.arange(1, len(frame) + 1, dtype=np.int64)
    return frame
