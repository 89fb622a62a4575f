"""Generic adapter: CSV/TSV/parquet logs with a column mapping (``--map canonical=source``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from llm_features.attributes import RESERVED, Attribute
from llm_features.ids import normalize_text, stable_id
from llm_features.ingest.attributes import (
    AttributeSpec,
    check_names,
    infer_kind,
    parse_specs,
    parse_values,
    sanitize,
)
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
    user_attributes: tuple[str, ...] | list[str] = (),
    item_attributes: tuple[str, ...] | list[str] = (),
    infer_attributes: bool = True,
) -> Loaded:
    """Read interaction logs (and optional item / user tables) named by a column mapping.

    User and item attributes: the declared ones (``user_attributes`` / ``item_attributes``, see
    :mod:`llm_features.ingest.attributes`), the canonical ``--map`` names (gender, age, occupation,
    zip; genres), and, when ``infer_attributes`` and nothing is declared for that table, every other
    column of the ``users`` / ``items`` table whose kind can be inferred."""
    mapping = dict(mapping or {})
    specs = {"user": parse_specs(user_attributes, "user"), "item": parse_specs(item_attributes, "item")}
    declared = {sp.name for ss in specs.values() for sp in ss}
    attrs: dict[str, list[Attribute]] = {"user": [], "item": []}
    skipped: dict[str, list[dict[str, str]]] = {"user": [], "item": []}
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
    log_kinds: dict[tuple[str, str], str] = {}
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
        for entity, table in (("user", users), ("item", items)):
            if table is None:  # no table: the declared attributes come from the log
                for spec in specs[entity]:
                    kind, values = _declared_values(src, raw, spec, entity, "--interactions",
                                                    log_kinds.get((entity, spec.name)))
                    log_kinds[(entity, spec.name)] = kind  # the first file's kind holds for the others
                    part[f"__{entity}__{spec.name}"] = values.to_numpy(dtype=object)
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
        used = {cols.col("item_id"), *tcols, *(c for c in (tc, gcol) if c)}
        _table_attributes(isrc, raw, items_df, "item", specs["item"], attrs, skipped, used, mapping,
                          infer_attributes and not specs["item"], declared)
    else:
        isrc = sources[0]
        keep = ["item_id", "item_text", "_line", "_src"] + [
            c for c in ("title", "genres") if c in inter.columns
        ]
        last = inter.sort_values(["ts_us", "_src", "_line"]).drop_duplicates("item_id", keep="last")
        items_df = last[keep].reset_index(drop=True)
        _log_attributes(inter, sources, items_df, "item", specs["item"], log_kinds, attrs)
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
        used = {cols.col("user_id")}
        for a in USER_ATTRS:
            acol = cols.find(a, required=False)
            if acol is None or a in {sp.name for sp in specs["user"]}:
                continue
            used.add(acol)
            attrs["user"].append(Attribute(a, "categorical", "user", prefix=2 if a == "zip" else None, source=acol,
                                           origin="declared" if a in mapping else "canonical name"))
            if a == "age":
                v = to_float(usrc, raw, acol)
                users_df[a] = pd.array(np.where(np.isnan(v), 0, v).astype(np.int64), dtype="Int64")
                users_df.loc[np.isnan(v), a] = pd.NA
            else:
                s = raw[acol].astype("string").str.strip()
                users_df[a] = s.mask(s == "")
        _table_attributes(usrc, raw, users_df, "user", specs["user"], attrs, skipped, used, mapping,
                          infer_attributes and not specs["user"], declared)
    elif specs["user"]:
        usrc = sources[0]
        first = inter.sort_values(["user_id", "_src", "_line"], kind="stable").drop_duplicates("user_id")
        users_df = pd.DataFrame({"user_id": first["user_id"].to_numpy(), "_line": first["_line"].to_numpy()})
        _log_attributes(inter, sources, users_df, "user", specs["user"], log_kinds, attrs)
    inter = inter.drop(columns=[c for c in inter.columns if c.startswith(("__user__", "__item__"))])
    if items_df is not None and "genres" in items_df.columns:  # the canonical genres: a multi attribute
        items_df["item_genres"] = items_df.pop("genres")
        gsrc = mapping.get("genres", "genres")
        attrs["item"].insert(0, Attribute("item_genres", "multi", "item", sep="|", source=gsrc,
                                          origin="declared" if "genres" in mapping else "canonical name"))
    check_names(attrs, specs)
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
        attributes=attrs,
        skipped_columns=skipped,
    )


def _declared_values(
    src: SourceFile, raw: pd.DataFrame, spec: AttributeSpec, entity: str, where: str, kind: str | None = None
) -> tuple[str, pd.Series]:
    """A declared attribute's kind and values; a missing column is an error naming the file."""
    if spec.column not in raw.columns:
        cols = ", ".join(c for c in raw.columns if c != "_line")
        whence = (f"the --{entity}s table" if where != "--interactions"
                  else f"the interaction log when there is no --{entity}s table")
        raise src.error(
            f"no column '{spec.column}' (given by --{entity}-attribute {spec.spec}); the columns are: {cols}",
            column=spec.column,
            fix=f"Name a column of this file ({entity} attributes are read from {whence}).",
        )
    kind = kind or spec.kind or infer_kind(raw[spec.column])[0] or "categorical"
    return kind, parse_values(src, raw, spec.column, kind, spec.sep)


def _table_attributes(
    src: SourceFile,
    raw: pd.DataFrame,
    out: pd.DataFrame,
    entity: str,
    specs: list[AttributeSpec],
    attrs: dict[str, list[Attribute]],
    skipped: dict[str, list[dict[str, str]]],
    used: set[str],
    mapping: dict[str, str],
    infer: bool,
    declared_names: set[str],
) -> None:
    """Declared attributes of a --users / --items table, then (``infer``) every other column (under a
    name no declared or earlier attribute has)."""
    for spec in specs:
        kind, values = _declared_values(src, raw, spec, entity, f"--{entity}s")
        out[spec.name] = values.set_axis(out.index)
        attrs[entity].append(Attribute(spec.name, kind, entity, prefix=spec.prefix,
                                       sep=spec.sep if kind == "multi" else None, source=spec.column))
        used.add(spec.column)
    if not infer:
        return
    taken = {a.name for es in attrs.values() for a in es} | declared_names
    for col in raw.columns:
        if col == "_line" or col in used or col in mapping.values():
            continue
        kind, why = infer_kind(raw[col])
        name = sanitize(col)
        if kind is not None and (name in RESERVED or name in taken):
            kind, why = None, f"the name {name!r} is taken (declare it as NEW_NAME={col})"
        if kind is None:
            skipped[entity].append({"column": col, "why": why})
            continue
        out[name] = parse_values(src, raw, col, kind).set_axis(out.index)
        attrs[entity].append(Attribute(name, kind, entity, sep="|" if kind == "multi" else None, source=col,
                                       origin="inferred"))
        taken.add(name)


def _log_attributes(
    inter: pd.DataFrame,
    sources: list[SourceFile],
    out: pd.DataFrame,
    entity: str,
    specs: list[AttributeSpec],
    kinds: dict[tuple[str, str], str],
    attrs: dict[str, list[Attribute]],
) -> None:
    """Declared attributes read from the interaction log: one value per user (item); a value that
    changes between two rows of the same user (item) is an error naming both."""
    key = f"{entity}_id"
    for spec in specs:
        col = f"__{entity}__{spec.name}"
        kind = kinds[(entity, spec.name)]
        cells = inter[col]
        if kind == "multi":
            norm = cells.map(lambda v: tuple(v) if len(v) else None)
        else:
            norm = cells.map(lambda v: None if v is None or v is pd.NA or (isinstance(v, float) and np.isnan(v))
                             else v)
        frame = pd.DataFrame({"k": inter[key].to_numpy(), "v": norm.to_numpy(dtype=object),
                              "_src": inter["_src"].to_numpy(), "_line": inter["_line"].to_numpy()})
        frame = frame[frame["v"].notna()].sort_values(["k", "_src", "_line"], kind="stable")
        first = frame.drop_duplicates("k")
        firsts = first.set_index("k")["v"]
        differs = frame["v"].to_numpy() != firsts.reindex(frame["k"].to_numpy()).to_numpy()
        if differs.any():
            row = frame.iloc[int(np.flatnonzero(differs)[0])]
            ref = first[first["k"] == row["k"]].iloc[0]
            s1, s2 = sources[int(ref["_src"])], sources[int(row["_src"])]
            other = f"{s2.row_word} {int(row['_line'])}"
            if s1 is not s2:
                other = f"{s2.path}, {other}"
            raise s1.error(
                f"{entity} attribute '{spec.name}' changes for {entity} {row['k']}: {ref['v']!r} here, "
                f"{row['v']!r} at {other}",
                line=int(ref["_line"]),
                column=spec.column,
                fix=f"An attribute read from the log needs one value per {entity}: give a --{entity}s table, "
                "or fix the rows.",
            )
        values = [None if v is None or (isinstance(v, float) and np.isnan(v)) else v
                  for v in firsts.reindex(out[key].to_numpy())]
        if kind == "multi":
            out[spec.name] = [list(v) if v is not None else [] for v in values]
        elif kind == "numeric":
            out[spec.name] = np.array([np.nan if v is None else float(v) for v in values], np.float64)
        elif all(isinstance(v, (int, np.integer)) for v in values if v is not None):
            out[spec.name] = pd.array(values, dtype="Int64")
        else:
            out[spec.name] = pd.Series(values, dtype=object).to_numpy()
        attrs[entity].append(Attribute(spec.name, kind, entity, prefix=spec.prefix,
                                       sep=spec.sep if kind == "multi" else None, source=spec.column))


def _genres(s: pd.Series) -> list[list[str]]:
    return [
        [g.strip() for g in str(v).split("|") if g.strip()] if v is not None and not pd.isna(v) else []
        for v in s
    ]
