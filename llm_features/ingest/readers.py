"""Low-level readers: strict decoding, delimited files with source line numbers, typed columns.

Every parsed frame carries ``_line`` (the 1-based line, or row for parquet, in its source file) so
an error can point at it.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from llm_features.ingest.errors import IngestError

US_PER_S = 1_000_000
_UNIT_US = {"s": 1_000_000, "ms": 1_000, "us": 1, "ns": 0.001}


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


def to_int64(
    src: SourceFile,
    frame: pd.DataFrame,
    col: str,
    label: str | None = None,
    fix: str = "Ids must be integers; fix the value, or pass --hash-ids to map string ids to int64.",
) -> np.ndarray:
    """A column as int64; an empty or non-integer value is an error naming its line."""
    s = frame[col]
    lines = frame["_line"].to_numpy()
    if pd.api.types.is_integer_dtype(s.dtype) and not s.isna().any():
        return s.to_numpy(dtype=np.int64)
    if s.dtype == object:
        s = s.astype(str).str.strip() if s.map(type).ne(str).any() else s.str.strip()
    num = pd.to_numeric(s, errors="coerce")
    arr = num.to_numpy(dtype=np.float64, na_value=np.nan)
    bad = np.isnan(arr) | (arr != np.round(arr))
    if bad.any():
        raise _first_bad(src, lines, bad, frame[col], label or col, "not an integer", fix)
    if pd.api.types.is_integer_dtype(num.dtype):
        return num.to_numpy(dtype=np.int64)
    return arr.astype(np.int64)


def to_float(
    src: SourceFile, frame: pd.DataFrame, col: str, label: str | None = None, allow_empty: bool = True
) -> np.ndarray:
    """A numeric column as float64 (NaN where empty, if allowed); other text is an error."""
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


def to_timestamp_us(
    src: SourceFile, frame: pd.DataFrame, col: str, unit: str = "auto", label: str | None = None
) -> np.ndarray:
    """Event times as int64 microseconds since the epoch (UTC).

    ``unit``: ``s``/``ms``/``us``/``ns`` for epoch numbers, ``iso`` for ISO 8601 strings (naive
    means UTC), ``auto``: numbers are epoch seconds, anything else must be ISO 8601.
    """
    s = frame[col]
    name = label or col
    lines = frame["_line"].to_numpy()
    fix = (
        "Timestamps must be epoch seconds (or --timestamp-unit ms/us/ns) or ISO 8601 such as "
        "2000-12-31T22:00:00Z; fix the value or pass --timestamp-unit."
    )
    if isinstance(s.dtype, pd.DatetimeTZDtype) or pd.api.types.is_datetime64_dtype(s.dtype):
        dt = pd.to_datetime(s, utc=True)
        bad = dt.isna().to_numpy()
        if bad.any():
            raise _first_bad(src, lines, bad, s, name, "empty timestamp", fix)
        return dt.dt.as_unit("us").astype("int64").to_numpy()
    if unit != "iso":
        if pd.api.types.is_numeric_dtype(s.dtype) and not pd.api.types.is_bool_dtype(s.dtype):
            num = s.astype("float64")
        else:
            st = s.astype("string").str.strip()
            num = pd.to_numeric(st, errors="coerce")
        if unit != "auto" or num.notna().all():
            mult = _UNIT_US["s" if unit == "auto" else unit]
            bad = num.isna().to_numpy()
            if bad.any():
                raise _first_bad(src, lines, bad, s, name, "cannot parse timestamp", fix)
            if pd.api.types.is_integer_dtype(num.dtype) and mult >= 1:
                return num.to_numpy(dtype=np.int64) * int(mult)
            return np.round(num.to_numpy(dtype=np.float64) * mult).astype(np.int64)
    st = s.astype("string").str.strip()
    dt = pd.to_datetime(st, utc=True, format="ISO8601", errors="coerce")
    bad = dt.isna().to_numpy()
    if bad.any():
        raise _first_bad(src, lines, bad, s, name, "cannot parse timestamp", fix)
    return dt.dt.as_unit("us").astype("int64").to_numpy()


def read_table_file(src: SourceFile, encoding: str, delimiter: str | None = None) -> pd.DataFrame:
    """A generic CSV/TSV (header row) or parquet file as a frame of raw columns plus ``_line``.

    CSV values stay strings; ``_line`` is the line in the file (the header is line 1). Parquet
    keeps its types; ``_line`` is the 1-based row.
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
    import io

    text = read_text(path, encoding)
    sep = delimiter or ("\t" if path.suffix.lower() in (".tsv", ".tab") else ",")
    try:
        frame = pd.read_csv(
            io.StringIO(text), sep=sep, dtype=str, keep_default_na=False, skip_blank_lines=False, engine="c"
        )
    except pd.errors.ParserError as e:
        raise src.error(
            f"cannot parse as delimited text with separator {sep!r} ({e})",
            fix="Fix the line, or pass --delimiter.",
        ) from None
    except pd.errors.EmptyDataError:
        raise src.error("the file is empty", fix="Give a file with a header row and data.") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    frame["_line"] = np.arange(2, len(frame) + 2, dtype=np.int64)
    data_cols = [c for c in frame.columns if c != "_line"]
    blank = (frame[data_cols] == "").all(axis=1).to_numpy() if data_cols else np.zeros(len(frame), bool)
    frame.attrs["blank_lines"] = int(blank.sum())
    return frame[~blank].reset_index(drop=True)


@dataclass
class Loaded:
    """What an adapter hands to the common pipeline (columns named canonically).

    interactions: user_id, item_id, ts_us (int64 µs UTC), rating (float64, NaN = unknown),
    optionally label (int8) and behavior_text; always _src (index into ``sources``) and _line.
    items: item_id, item_text, optionally title and genres (list of str); _src, _line.
    users: user_id and optional attributes (gender, age, occupation, zip).
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
