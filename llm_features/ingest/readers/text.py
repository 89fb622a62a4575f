"""Reading text and table files: strict decoding, delimited files with source line numbers, parquet.

Every parsed frame carries ``_line`` (the 1-based line, or row for parquet, in its source file) so
an error can point at it.
"""

from __future__ import annotations

import codecs
import csv
import io
import re
from pathlib import Path

import numpy as np
import pandas as pd

from llm_features.ingest.errors import IngestError
from llm_features.ingest.readers.source import SourceFile, shorten


def canonical_encoding(encoding: str) -> str:
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
    enc = canonical_encoding(encoding)
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
    counts = lines.str.count(re.escape(sep)).to_numpy()
    bad = np.flatnonzero(counts != nf - 1)
    if len(bad):
        i = bad[0]
        raise src.error(
            f"expected {nf} fields separated by '{sep}' ({sep.join(names)}) but found {counts[i] + 1}: "
            f"{shorten(lines.iloc[i])!r}" + (f" ({len(bad)} such lines)" if len(bad) > 1 else ""),
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


def fast_numeric(
    text: str, sep: str, names: list[str], float_columns: tuple[str, ...] = ()
) -> pd.DataFrame | None:
    """Fast path for clean all-numeric delimited text (pyarrow's CSV reader), or None.

    Returns None whenever the text is not plainly clean (blank lines, CRs, odd field counts, non-numbers),
    so the caller falls back to :func:`split_delimited`, whose errors name the line.
    """
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
