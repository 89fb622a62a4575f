"""Generic adapter: CSV/TSV/parquet logs with a column mapping (``--map canonical=source``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from llm_features.attributes import Attribute
from llm_features.ingest.attributes import (
    AttributeSpec,
    check_names,
    declared_values,
    log_attributes,
    parse_specs,
    table_attributes,
)
from llm_features.ingest.errors import IngestError
from llm_features.ingest.generic_columns import (
    CANONICAL_COLUMNS,
    Columns,
    IdHasher,
    explicit_flag,
    genre_lists,
    id_column,
    parse_mapping,
    split_cols,
    text_column,
)
from llm_features.ingest.readers import (
    Loaded,
    SourceFile,
    TimeBounds,
    read_table_file,
    require_file,
    to_float,
    to_label,
    to_timestamp_us,
)

__all__ = ["CANONICAL_COLUMNS", "USER_ATTRS", "IdHasher", "explicit_flag", "load_generic", "parse_mapping"]

USER_ATTRS = ("gender", "age", "occupation", "zip")


@dataclass
class _GenericRead:
    """One generic read: its options, resolved, and what the files read so far gathered."""

    mapping: dict[str, str]
    specs: dict[str, list[AttributeSpec]]  # the declared attributes, by entity
    declared: set[str]
    bounds: TimeBounds
    hasher: IdHasher | None
    encoding: str
    delimiter: str | None
    timestamp_unit: str
    label_column: str | None
    behavior_text_column: str | None
    text_cols: list[str] | None  # the item text column(s), where named
    items: Path | None
    users: Path | None
    infer: bool
    attrs: dict[str, list[Attribute]] = field(default_factory=lambda: {"user": [], "item": []})
    skipped: dict[str, list[dict[str, str]]] = field(default_factory=lambda: {"user": [], "item": []})
    log_kinds: dict[tuple[str, str], str] = field(default_factory=dict)  # attributes read from the log
    blank: dict[str, int] = field(default_factory=dict)  # blank lines skipped, by file

    def read(self, src: SourceFile) -> pd.DataFrame:
        return read_table_file(src, self.encoding, self.delimiter)


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
    bounds = time_bounds or TimeBounds.make()
    if not interactions:
        raise IngestError(
            "no interaction file given",
            fix="Pass --interactions FILE (CSV, TSV or parquet), or --source DIR of a MovieLens directory.",
        )
    if label_column is None and "label" in mapping:
        label_column = mapping["label"]
    text_cols = split_cols(item_text_column) if item_text_column else None
    if not text_cols and "item_text" in mapping:
        text_cols = split_cols(mapping["item_text"])
    run = _GenericRead(
        mapping, specs, declared, bounds, IdHasher() if hash_ids else None, encoding or "utf-8", delimiter,
        timestamp_unit, label_column, behavior_text_column, text_cols, items, users, infer_attributes,
    )

    sources, inter = _read_logs(run, interactions)
    isrc, items_df, inter = _item_rows(run, inter, sources)
    usrc, users_df = _user_rows(run, inter, sources)
    inter = inter.drop(columns=[c for c in inter.columns if c.startswith(("__user__", "__item__"))])
    _genres_attribute(run, items_df)
    check_names(run.attrs, specs)
    return Loaded(
        "generic",
        inter,
        sources,
        items=items_df,
        users=users_df,
        items_src=isrc,
        users_src=usrc,
        blank_lines=run.blank,
        column_names=mapping,
        attributes=run.attrs,
        skipped_columns=run.skipped,
    )


def _read_logs(run: _GenericRead, interactions: tuple[Path, ...]) -> tuple[list[SourceFile], pd.DataFrame]:
    """Every interaction file, in order, as one frame (``_src``: the file's index in the sources)."""
    frames, sources = [], []
    for k, path in enumerate(interactions):
        src = SourceFile(
            require_file(Path(path), "interaction file", "Check the path given to --interactions.")
        )
        sources.append(src)
        frames.append(_read_log(run, src, k))
    run.blank.update({str(s.path): f.attrs.get("blank_lines", 0) for s, f in zip(sources, frames)})
    return sources, pd.concat(frames, ignore_index=True)


def _read_log(run: _GenericRead, src: SourceFile, k: int) -> pd.DataFrame:
    """One interaction file: ids, time, rating and label, the behaviour text; without an item table
    the item columns; the declared attributes of an entity without a table (``__user__NAME`` ...)."""
    raw = run.read(src)
    cols = Columns(src, raw, run.mapping)
    ucol, icol, tcol = cols.col("user_id"), cols.col("item_id"), cols.col("event_timestamp")
    part = pd.DataFrame(
        {
            "user_id": id_column(src, raw, ucol, "user", run.hasher),
            "item_id": id_column(src, raw, icol, "item", run.hasher),
            "ts_us": to_timestamp_us(src, raw, tcol, run.timestamp_unit, bounds=run.bounds),
        }
    )
    rcol = cols.find("rating", required=False)
    part["rating"] = to_float(src, raw, rcol) if rcol else np.nan
    if run.label_column is not None:
        part["label"] = to_label(src, raw, cols.col("label", explicit=run.label_column))
    bcol = cols.find("behavior_text", required=False, explicit=run.behavior_text_column)
    if bcol:
        part["behavior_text"] = text_column(src, raw, [bcol], "behaviour text")
    if run.items is None:
        tcols = _item_text_columns(
            run, cols, "no item text column and no --items file",
            "Pass --item-text-column COLUMN (comma-separate several), or --items FILE.",
        )
        part["item_text"] = text_column(src, raw, tcols, "item text")
        _title_and_genres(cols, part)
    for entity, table in (("user", run.users), ("item", run.items)):
        if table is None:  # no table: the declared attributes come from the log
            for spec in run.specs[entity]:
                kind, values = declared_values(src, raw, spec, entity, "--interactions",
                                               run.log_kinds.get((entity, spec.name)))
                run.log_kinds[(entity, spec.name)] = kind  # the first file's kind holds for the others
                part[f"__{entity}__{spec.name}"] = values.to_numpy(dtype=object)
    part["_src"] = np.int32(k)
    part["_line"] = raw["_line"].to_numpy()
    part.attrs["blank_lines"] = raw.attrs.get("blank_lines", 0)
    return part


def _item_rows(
    run: _GenericRead, inter: pd.DataFrame, sources: list[SourceFile]
) -> tuple[SourceFile, pd.DataFrame, pd.DataFrame]:
    """The item rows and their file (``--items``, else the log), and the interactions."""
    if run.items is not None:
        isrc, items_df = _read_item_table(run, Path(run.items))
        return isrc, items_df, inter
    items_df, inter = _items_from_log(run, inter, sources)
    return sources[0], items_df, inter


def _user_rows(
    run: _GenericRead, inter: pd.DataFrame, sources: list[SourceFile]
) -> tuple[SourceFile | None, pd.DataFrame | None]:
    """The user rows and their file: ``--users``, else the log (where user attributes are declared)."""
    if run.users is not None:
        return _read_user_table(run, Path(run.users))
    if run.specs["user"]:
        return sources[0], _users_from_log(run, inter, sources)
    return None, None

def _genres_attribute(run: _GenericRead, items_df: pd.DataFrame) -> None:
    """The canonical genres column, where read, becomes the multi attribute ``item_genres`` (the first)."""
    if "genres" in items_df.columns:
        items_df["item_genres"] = items_df.pop("genres")
        origin = "declared" if "genres" in run.mapping else "canonical name"
        run.attrs["item"].insert(0, Attribute("item_genres", "multi", "item", sep="|",
                                              source=run.mapping.get("genres", "genres"), origin=origin))

def _item_text_columns(run: _GenericRead, cols: Columns, problem: str, fix: str) -> list[str]:
    """The item text column(s): the named ones, else ``item_text`` or ``title``; each must exist."""
    tcols = run.text_cols or [c for c in ("item_text", "title") if c in cols.frame.columns][:1]
    if not tcols:
        raise cols.src.error(problem, fix=fix)
    for c in tcols:
        cols.find("item_text", explicit=c)
    return tcols


def _title_and_genres(cols: Columns, out: pd.DataFrame) -> list[str]:
    """The optional title and genres columns into ``out`` (a mapped one must exist); returns those read."""
    raw = cols.frame
    tc = cols.find("title", required=False)
    if tc:
        out["title"] = raw[tc].astype("string").str.strip().to_numpy()
    gcol = cols.find("genres", required=False)
    if gcol:
        out["genres"] = genre_lists(raw[gcol])
    return [c for c in (tc, gcol) if c]


def _read_item_table(run: _GenericRead, path: Path) -> tuple[SourceFile, pd.DataFrame]:
    """``--items``: id, text, title and genres, and its attributes (declared, else inferred)."""
    isrc = SourceFile(require_file(path, "item file", "Check the path given to --items."))
    raw = run.read(isrc)
    run.blank[str(isrc.path)] = raw.attrs.get("blank_lines", 0)
    cols = Columns(isrc, raw, run.mapping)
    tcols = _item_text_columns(run, cols, "no item text column",
                               "Pass --item-text-column COLUMN (comma-separate several), "
                               f"one of: {', '.join(cols.columns)}.")
    items_df = pd.DataFrame(
        {
            "item_id": id_column(isrc, raw, cols.col("item_id"), "item", run.hasher),
            "item_text": text_column(isrc, raw, tcols, "item text"),
            "_line": raw["_line"].to_numpy(),
        }
    )
    used = {cols.col("item_id"), *tcols, *_title_and_genres(cols, items_df)}
    table_attributes(isrc, raw, items_df, "item", run.specs["item"], run.attrs, run.skipped, used,
                     run.mapping, run.infer and not run.specs["item"], run.declared)
    return isrc, items_df


def _items_from_log(
    run: _GenericRead, inter: pd.DataFrame, sources: list[SourceFile]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """No item table: each item's columns from its latest interaction; the interactions keep the item
    text as their behaviour text (unless they have their own)."""
    keep = ["item_id", "item_text", "_line", "_src"] + [
        c for c in ("title", "genres") if c in inter.columns
    ]
    last = inter.sort_values(["ts_us", "_src", "_line"]).drop_duplicates("item_id", keep="last")
    items_df = last[keep].reset_index(drop=True)
    log_attributes(inter, sources, items_df, "item", run.specs["item"], run.log_kinds, run.attrs)
    if "behavior_text" not in inter.columns:
        inter["behavior_text"] = inter["item_text"]
    inter = inter.drop(columns=[c for c in ("item_text", "title", "genres") if c in inter.columns])
    return items_df, inter


def _read_user_table(run: _GenericRead, path: Path) -> tuple[SourceFile, pd.DataFrame]:
    """``--users``: the id, the canonical attributes (gender, age, occupation, zip) not declared
    otherwise, and its other attributes (declared, else inferred)."""
    usrc = SourceFile(require_file(path, "user file", "Check the path given to --users."))
    raw = run.read(usrc)
    run.blank[str(usrc.path)] = raw.attrs.get("blank_lines", 0)
    cols = Columns(usrc, raw, run.mapping)
    users_df = pd.DataFrame(
        {
            "user_id": id_column(usrc, raw, cols.col("user_id"), "user", run.hasher),
            "_line": raw["_line"].to_numpy(),
        }
    )
    used = {cols.col("user_id")}
    for a in USER_ATTRS:
        acol = cols.find(a, required=False)
        if acol is None or a in {sp.name for sp in run.specs["user"]}:
            continue
        used.add(acol)
        run.attrs["user"].append(Attribute(a, "categorical", "user", prefix=2 if a == "zip" else None,
                                           source=acol,
                                           origin="declared" if a in run.mapping else "canonical name"))
        if a == "age":
            v = to_float(usrc, raw, acol)
            users_df[a] = pd.array(np.where(np.isnan(v), 0, v).astype(np.int64), dtype="Int64")
            users_df.loc[np.isnan(v), a] = pd.NA
        else:
            s = raw[acol].astype("string").str.strip()
            users_df[a] = s.mask(s == "")
    table_attributes(usrc, raw, users_df, "user", run.specs["user"], run.attrs, run.skipped, used,
                     run.mapping, run.infer and not run.specs["user"], run.declared)
    return usrc, users_df


def _users_from_log(run: _GenericRead, inter: pd.DataFrame, sources: list[SourceFile]) -> pd.DataFrame:
    """No user table but declared user attributes: each user's values from the log."""
    first = inter.sort_values(["user_id", "_src", "_line"], kind="stable").drop_duplicates("user_id")
    users_df = pd.DataFrame({"user_id": first["user_id"].to_numpy(), "_line": first["_line"].to_numpy()})
    log_attributes(inter, sources, users_df, "user", run.specs["user"], run.log_kinds, run.attrs)
    return users_df
