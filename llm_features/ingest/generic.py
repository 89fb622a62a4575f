"""Generic adapter: CSV/TSV/parquet logs with a column mapping (``--map canonical=source``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from llm_features.ids import normalize_text, stable_id
from llm_features.ingest.errors import IngestError
from llm_features.ingest.readers import (
    Loaded,
    SourceFile,
    TimeBounds,
    read_table_file,
    require_file,
    to_float,
    to_int64,
    to_label,
    to_timestamp_us,
)

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
USER_ATTRS = ("gender", "age", "occupation", "zip")


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


class _Cols:
    """Finds the source column for a canonical name in one file, with messages that say how to map it."""

    def __init__(self, src: SourceFile, frame: pd.DataFrame, mapping: dict[str, str]) -> None:
        self.src, self.frame, self.mapping = src, frame, mapping
        self.columns = [c for c in frame.columns if c != "_line"]

    def find(self, canon: str, required: bool = True, explicit: str | None = None) -> str | None:
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


def _ids(
    src: SourceFile, frame: pd.DataFrame, col: str, kind: str, hasher: IdHasher | None
) -> np.ndarray:
    if hasher is None:
        return to_int64(src, frame, col)
    return hasher(src, frame, col, kind)


def _text(src: SourceFile, frame: pd.DataFrame, cols: list[str], what: str) -> pd.Series:
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


def _split_cols(spec: str) -> list[str]:
    return [c.strip() for c in spec.split(",") if c.strip()]


def load_generic(
    interactions: tuple[Path, ...],
    *,
    items: Path | None = None,
    users: Path | None = None,
    mapping: dict[str, str] | None = None,
    item_text_column: str | None = None,
    behavior_text_column: str | None = None,
    label_column: str | None = None,
    timestamp_unit: str = "auto",
    encoding: str | None = None,
    delimiter: str | None = None,
    hash_ids: bool = False,
    time_bounds: TimeBounds | None = None,
) -> Loaded:
    """Read interaction logs (and optional item / user tables) named by a column mapping."""
    mapping = dict(mapping or {})
    bounds = time_bounds or TimeBounds.make()
    hasher = IdHasher() if hash_ids else None
    enc = encoding or "utf-8"
    if not interactions:
        raise IngestError(
            "no interaction file given",
            fix="Pass --interactions FILE (CSV, TSV or parquet), or --source DIR of a MovieLens directory.",
        )
    if label_column is None and "label" in mapping:
        label_column = mapping["label"]
    text_cols = _split_cols(item_text_column) if item_text_column else None
    if not text_cols and "item_text" in mapping:
        text_cols = _split_cols(mapping["item_text"])

    frames, sources = [], []
    for k, path in enumerate(interactions):
        src = SourceFile(
            require_file(Path(path), "interaction file", "Check the path given to --interactions.")
        )
        sources.append(src)
        raw = read_table_file(src, enc, delimiter)
        cols = _Cols(src, raw, mapping)
        ucol, icol, tcol = cols.col("user_id"), cols.col("item_id"), cols.col("event_timestamp")
        part = pd.DataFrame(
            {
                "user_id": _ids(src, raw, ucol, "user", hasher),
                "item_id": _ids(src, raw, icol, "item", hasher),
                "ts_us": to_timestamp_us(src, raw, tcol, timestamp_unit, bounds=bounds),
            }
        )
        rcol = cols.find("rating", required=False)
        part["rating"] = to_float(src, raw, rcol) if rcol else np.nan
        if label_column is not None:
            part["label"] = to_label(src, raw, cols.col("label", explicit=label_column))
        bcol = cols.find("behavior_text", required=False, explicit=behavior_text_column)
        if bcol:
            part["behavior_text"] = _text(src, raw, [bcol], "behaviour text")
        if items is None:
            tcols = text_cols or [c for c in ("item_text", "title") if c in raw.columns][:1]
            if not tcols:
                raise src.error(
                    "no item text column and no --items file",
                    fix="Pass --item-text-column COLUMN (comma-separate several), or --items FILE.",
                )
            for c in tcols:
                cols.find("item_text", explicit=c)
            part["item_text"] = _text(src, raw, tcols, "item text")
            if "title" in mapping or "title" in raw.columns:
                part["title"] = raw[cols.col("title")].astype("string").str.strip().to_numpy()
            gcol = cols.find("genres", required=False)
            if gcol:
                part["genres"] = _genres(raw[gcol])
        part["_src"] = np.int32(k)
        part["_line"] = raw["_line"].to_numpy()
        part.attrs["blank_lines"] = raw.attrs.get("blank_lines", 0)
        frames.append(part)
    inter = pd.concat(frames, ignore_index=True)
    blank = {str(s.path): f.attrs.get("blank_lines", 0) for s, f in zip(sources, frames)}

    items_df: pd.DataFrame | None
    if items is not None:
        isrc = SourceFile(require_file(Path(items), "item file", "Check the path given to --items."))
        raw = read_table_file(isrc, enc, delimiter)
        blank[str(isrc.path)] = raw.attrs.get("blank_lines", 0)
        cols = _Cols(isrc, raw, mapping)
        tcols = text_cols or [c for c in ("item_text", "title") if c in raw.columns][:1]
        if not tcols:
            raise isrc.error(
                "no item text column",
                fix="Pass --item-text-column COLUMN (comma-separate several), "
                f"one of: {', '.join(cols.columns)}.",
            )
        for c in tcols:
            cols.find("item_text", explicit=c)
        items_df = pd.DataFrame(
            {
                "item_id": _ids(isrc, raw, cols.col("item_id"), "item", hasher),
                "item_text": _text(isrc, raw, tcols, "item text"),
                "_line": raw["_line"].to_numpy(),
            }
        )
        tc = cols.find("title", required=False)
        if tc:
            items_df["title"] = raw[tc].astype("string").str.strip().to_numpy()
        gcol = cols.find("genres", required=False)
        if gcol:
            items_df["genres"] = _genres(raw[gcol])
    else:
        isrc = sources[0]
        keep = ["item_id", "item_text", "_line", "_src"] + [
            c for c in ("title", "genres") if c in inter.columns
        ]
        last = inter.sort_values(["ts_us", "_src", "_line"]).drop_duplicates("item_id", keep="last")
        items_df = last[keep].reset_index(drop=True)
        if "behavior_text" not in inter.columns:
            inter["behavior_text"] = inter["item_text"]
        inter = inter.drop(columns=[c for c in ("item_text", "title", "genres") if c in inter.columns])

    users_df: pd.DataFrame | None = None
    usrc: SourceFile | None = None
    if users is not None:
        usrc = SourceFile(require_file(Path(users), "user file", "Check the path given to --users."))
        raw = read_table_file(usrc, enc, delimiter)
        blank[str(usrc.path)] = raw.attrs.get("blank_lines", 0)
        cols = _Cols(usrc, raw, mapping)
        users_df = pd.DataFrame(
            {
                "user_id": _ids(usrc, raw, cols.col("user_id"), "user", hasher),
                "_line": raw["_line"].to_numpy(),
            }
        )
        for a in USER_ATTRS:
            acol = cols.find(a, required=False)
            if acol is None:
                continue
            if a == "age":
                v = to_float(usrc, raw, acol)
                users_df[a] = pd.array(np.where(np.isnan(v), 0, v).astype(np.int64), dtype="Int64")
                users_df.loc[np.isnan(v), a] = pd.NA
            else:
                s = raw[acol].astype("string").str.strip()
                users_df[a] = s.mask(s == "")
    return Loaded(
        "generic",
        inter,
        sources,
        items=items_df,
        users=users_df,
        items_src=isrc,
        users_src=usrc,
        blank_lines=blank,
        column_names=mapping,
    )


def _genres(s: pd.Series) -> list[list[str]]:
    return [
        [g.strip() for g in str(v).split("|") if g.strip()] if v is not None and not pd.isna(v) else []
        for v in s
    ]
