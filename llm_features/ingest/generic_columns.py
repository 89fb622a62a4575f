"""The columns of a generic file: the ``--map`` mapping, finding a canonical column (with messages that
say how to map it), ids (integers, or hashed with ``--hash-ids``), text and genres."""

from __future__ import annotations

import numpy as np
import pandas as pd

from llm_features.ids import normalize_text, stable_id
from llm_features.ingest.errors import IngestError
from llm_features.ingest.readers import SourceFile, to_int64

CANONICAL_COLUMNS = (
    "user_id",
    "item_id",
    "event_timestamp",
    "rating",
    "label",
    "behavior_text",
    "item_text",
    "title",
    "genres",
    "gender",
    "age",
    "occupation",
    "zip",
)
_ALIASES = {"event_timestamp": ("event_timestamp", "timestamp", "ts")}


def parse_mapping(pairs: tuple[str, ...] | list[str]) -> dict[str, str]:
    """``("user_id=uid", ...)`` to ``{"user_id": "uid"}``; unknown canonical names are an error."""
    out: dict[str, str] = {}
    for pair in pairs:
        canon, sep, col = pair.partition("=")
        canon, col = canon.strip(), col.strip()
        if not sep or not canon or not col:
            raise IngestError(
                f"--map {pair!r} is not CANONICAL=SOURCE_COLUMN",
                fix="For example --map user_id=uid --map event_timestamp=ts.",
            )
        if canon not in CANONICAL_COLUMNS:
            raise IngestError(
                f"--map {pair!r}: '{canon}' is not a canonical column",
                fix=f"Use one of: {', '.join(CANONICAL_COLUMNS)}.",
            )
        out[canon] = col
    return out


class Columns:
    """Finds the source column for a canonical name in one file, with messages that say how to map it."""

    def __init__(self, src: SourceFile, frame: pd.DataFrame, mapping: dict[str, str]) -> None:
        self.src, self.frame, self.mapping = src, frame, mapping
        self.columns = [c for c in frame.columns if c != "_line"]

    def find(self, canon: str, required: bool = True, explicit: str | None = None) -> str | None:
        """The column of ``canon``: ``explicit``, else the mapped one, else its default name(s). A
        missing one is an error, but for an optional (not ``required``) one that nothing named: None."""
        if explicit is not None:
            candidates: tuple[str, ...] = (explicit,)
        elif canon in self.mapping:
            candidates = (self.mapping[canon],)
        else:
            candidates = _ALIASES.get(canon, (canon,))
        for c in candidates:
            if c in self.frame.columns:
                return c
        if not required:
            if explicit is not None or canon in self.mapping:
                raise self._missing(canon, candidates[0], explicit)
            return None
        raise self._missing(canon, candidates[0], explicit)

    def col(self, canon: str, explicit: str | None = None) -> str:
        """Like :meth:`find` but the column must exist."""
        found = self.find(canon, required=True, explicit=explicit)
        assert found is not None
        return found

    def _missing(self, canon: str, col: str, explicit: str | None) -> IngestError:
        how = (
            f"given by --{explicit_flag(canon)}"
            if explicit is not None
            else f"from --map {canon}={col}"
            if canon in self.mapping
            else f"the default name for {canon}"
        )
        return self.src.error(
            f"no column '{col}' ({how}); the columns are: {', '.join(self.columns) or '(none)'}",
            column=col,
            fix=f"Name the right column with --map {canon}=COLUMN.",
        )


def explicit_flag(canon: str) -> str:
    """The option that names the column of ``canon`` explicitly (``map`` where none does)."""
    return {
        "item_text": "item-text-column",
        "behavior_text": "behavior-text-column",
        "label": "label-column",
    }.get(canon, "map")


class IdHasher:
    """``--hash-ids``: each id's text to a stable 63-bit id, ``stable_id(f"{kind}:{text}")`` (blake2b
    of the NFKC-normalised, white-space-collapsed text, top bit cleared). Two different id texts
    that get the same id (a hash collision, or texts the normalisation makes equal) are an error
    naming both, across all the files of one ingest."""

    def __init__(self) -> None:
        self.seen: dict[str, dict[int, tuple[str, SourceFile, int]]] = {"user": {}, "item": {}}

    def __call__(self, src: SourceFile, frame: pd.DataFrame, col: str, kind: str) -> np.ndarray:
        values = frame[col].astype("string").str.strip()
        empty = (values.isna() | (values == "")).to_numpy()
        if empty.any():
            i = int(np.flatnonzero(empty)[0])
            line = int(frame["_line"].iloc[i])
            raise src.error(f"empty {kind} id", line=line, column=col, fix="Fill it in.")
        codes, uniques = pd.factorize(values)
        _, first_row = np.unique(codes, return_index=True)
        lines = frame["_line"].to_numpy()
        seen = self.seen[kind]
        table = np.empty(len(uniques), dtype=np.int64)
        for k, text in enumerate(uniques):
            h = stable_id(f"{kind}:{text}")
            table[k] = h
            prev = seen.get(h)
            line = int(lines[first_row[k]])
            if prev is None:
                seen[h] = (str(text), src, line)
            elif prev[0] != text:
                p_text, p_src, p_line = prev
                where = f"{p_src.row_word} {p_line}"
                if p_src.path != src.path:
                    where = f"{p_src.path}, {where}"
                raise src.error(
                    f"--hash-ids: {kind} ids {p_text!r} ({where}) and {str(text)!r} get the same "
                    f"hashed id {h}",
                    line=line,
                    column=col,
                    fix="Ids are hashed after NFKC normalisation and white-space collapsing: make the ids "
                    "distinct, or give integer ids without --hash-ids.",
                )
        return table[codes]


def id_column(
    src: SourceFile, frame: pd.DataFrame, col: str, kind: str, hasher: IdHasher | None
) -> np.ndarray:
    """A user or item id column as int64: integers as they are, or hashed (``--hash-ids``)."""
    if hasher is None:
        return to_int64(src, frame, col)
    return hasher(src, frame, col, kind)


def text_column(src: SourceFile, frame: pd.DataFrame, cols: list[str], what: str) -> pd.Series:
    """The normalised text of ``cols`` joined with `` | ``; an empty one is an error naming its line."""
    parts = [frame[c].astype("string").fillna("").map(normalize_text) for c in cols]
    text = parts[0]
    for p in parts[1:]:
        text = text.str.cat(p, sep=" | ").str.strip(" |")
    empty = (text == "").to_numpy()
    if empty.any():
        i = int(np.flatnonzero(empty)[0])
        raise src.error(
            f"empty {what} ({int(empty.sum())} rows in all)",
            line=int(frame["_line"].iloc[i]),
            column="+".join(cols),
            fix=f"Fill in the {what}, or remove those rows.",
        )
    return text.astype(object)


def split_cols(spec: str) -> list[str]:
    """``"title, genre"`` to ``["title", "genre"]``."""
    return [c.strip() for c in spec.split(",") if c.strip()]


def genre_lists(s: pd.Series) -> list[list[str]]:
    """``"Comedy|Drama"`` to ``["Comedy", "Drama"]`` (an empty list where missing)."""
    return [
        [g.strip() for g in str(v).split("|") if g.strip()] if v is not None and not pd.isna(v) else []
        for v in s
    ]
