"""Where rows come from: an input file, errors that name its rows, and what an adapter read."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from llm_features.ingest.errors import IngestError


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


def shorten(value: object, n: int = 80) -> str:
    """A value as a message shows it: at most ``n`` characters."""
    s = str(value)
    return s if len(s) <= n else s[: n - 3] + "..."


def first_bad(
    src: SourceFile,
    lines: np.ndarray,
    mask: np.ndarray,
    values: pd.Series,
    column: str,
    problem: str,
    fix: str,
) -> IngestError:
    """The error for the first row where ``mask`` holds, quoting its value and counting the others."""
    idx = np.flatnonzero(mask)
    i = idx[0]
    more = f" ({len(idx)} rows in all)" if len(idx) > 1 else ""
    return src.error(
        f"{problem}: {shorten(values.iloc[i])!r}{more}", line=int(lines[i]), column=column, fix=fix
    )


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

    def row(self, frame: pd.DataFrame, i: int) -> tuple[SourceFile, int]:
        """The file and line of row ``i`` of ``frame`` (a frame with ``_src`` and ``_line``)."""
        return self.sources[int(frame["_src"].iloc[i])], int(frame["_line"].iloc[i])
