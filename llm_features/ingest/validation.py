"""The checks of the loaded rows before the canonical tables are built: unique item and user rows, known
items, exact duplicates dropped and conflicting ones refused."""

from __future__ import annotations

import numpy as np
import pandas as pd

from llm_features.ingest.errors import IngestError
from llm_features.ingest.readers import Loaded, SourceFile
from llm_features.ingest.split import iso_us


def check_unique(src: SourceFile | None, frame: pd.DataFrame, key: str, what: str) -> None:
    """One row per ``key`` in an item or user table; a repeated one is an error naming two of its rows."""
    dup = frame.duplicated(key, keep=False).to_numpy()
    if dup.any():
        sub = frame[dup]
        first = sub[key].iloc[0]
        lines = sub.loc[sub[key] == first, "_line"].tolist()[:2]
        word = src.row_word if src else "line"
        raise IngestError(
            f"{what} {first} is listed more than once ({word}s {lines[0]} and {lines[1]})",
            file=src.path if src else None,
            column=key,
            fix=f"Keep one row per {what}.",
        )


def drop_exact_duplicates(loaded: Loaded, inter: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Drop exact duplicate (user, item, timestamp) rows; refuse conflicting ones."""
    key = ["user_id", "item_id", "ts_us"]
    dup = inter.duplicated(key, keep=False).to_numpy()
    if not dup.any():
        return inter, 0
    sub = inter[dup].sort_values(key + ["_src", "_line"], kind="stable")
    values = [c for c in ("rating", "label", "behavior_text") if c in sub.columns]
    first = sub.groupby(key, sort=False)[values].transform("first")
    same = np.ones(len(sub), dtype=bool)
    for c in values:
        a, b = sub[c], first[c]
        same &= ((a == b) | (a.isna() & b.isna())).to_numpy()
    if not same.all():
        j = int(np.flatnonzero(~same)[0])
        row = sub.iloc[j]
        other = sub[
            (sub["user_id"] == row["user_id"])
            & (sub["item_id"] == row["item_id"])
            & (sub["ts_us"] == row["ts_us"])
        ].iloc[0]
        col = next(c for c in values if not (other[c] == row[c] or (pd.isna(other[c]) and pd.isna(row[c]))))
        s1, s2 = loaded.sources[int(other["_src"])], loaded.sources[int(row["_src"])]
        where2 = (
            f"{s2.row_word} {int(row['_line'])}"
            if s2 is s1
            else f"{s2.path}, {s2.row_word} {int(row['_line'])}"
        )
        raise IngestError(
            f"conflicting duplicates: {s1.row_word} {int(other['_line'])} and {where2} are both user "
            f"{int(row['user_id'])}, item {int(row['item_id'])} at {iso_us(int(row['ts_us']))} "
            f"but their {col} "
            f"differs ({other[col]!r} vs {row[col]!r})",
            file=s1.path,
            column=(loaded.column_names or {}).get(col, col),
            fix="Remove the wrong row (exact duplicates are dropped and counted; "
            "conflicting ones are not guessed).",
        )
    drop = inter.duplicated(key, keep="first").to_numpy()
    return inter[~drop].reset_index(drop=True), int(drop.sum())


def unknown_items(
    loaded: Loaded, inter: pd.DataFrame, items: pd.DataFrame, drop: bool
) -> tuple[pd.DataFrame, int]:
    """Interactions whose item is not in the item table: dropped and counted (``drop``), else an error."""
    unknown = ~inter["item_id"].isin(items["item_id"]).to_numpy()
    if not unknown.any():
        return inter, 0
    if drop:
        return inter[~unknown].reset_index(drop=True), int(unknown.sum())
    i = int(np.flatnonzero(unknown)[0])
    src, line = loaded.row(inter, i)
    n_items = len(np.unique(inter["item_id"].to_numpy()[unknown]))
    items_file = loaded.items_src.path if loaded.items_src else "the item table"
    raise src.error(
        f"item {int(inter['item_id'].iloc[i])} is not in {items_file} ({int(unknown.sum())} rows, "
        f"{n_items} unknown items in all)",
        line=line,
        column=(loaded.column_names or {}).get("item_id", "item_id"),
        fix="Add the items to the item table, or pass --drop-unknown-items to drop those rows "
        "(they are counted in ingest_report.json).",
    )

