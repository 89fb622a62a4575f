"""The canonical tables: the loaded rows checked, labelled and deduplicated, then sorted in time, split,
and written out as the interactions, items and users arrow tables."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from llm_features import attributes as attributes_mod
from llm_features.attributes import Attribute
from llm_features.ids import stable_id
from llm_features.ingest.config import IngestConfig
from llm_features.ingest.errors import IngestError
from llm_features.ingest.labels import apply_label, check_both_labels
from llm_features.ingest.readers import Loaded
from llm_features.ingest.split import SPLIT_CODES, SPLITS, SplitBoundaries, assign_split, parse_ratios
from llm_features.ingest.validation import check_unique, drop_exact_duplicates, unknown_items
from llm_features.parquet_io import utc_us

INTERACTIONS_SCHEMA = pa.schema(
    [
        ("user_id", pa.int64()),
        ("item_id", pa.int64()),
        ("event_timestamp", pa.timestamp("us", tz="UTC")),
        ("behavior_id", pa.int64()),
        ("behavior_text", pa.string()),
        ("label", pa.int8()),
        ("rating", pa.float32()),
        ("split", pa.string()),
    ]
)


@dataclass
class Canonical:
    """The three canonical tables as arrow tables, plus the split and counts."""

    interactions: pa.Table
    items: pa.Table
    users: pa.Table
    split: SplitBoundaries
    split_counts: dict[str, int]
    counts: dict[str, int]
    label_source: str


@dataclass
class _CheckedRows:
    """The interactions that pass the checks, labelled, and what the checks dropped."""

    inter: pd.DataFrame
    items: pd.DataFrame
    rows_read: int
    unknown_item_rows_dropped: int
    exact_duplicates_dropped: int
    label_source: str


def build_canonical(
    loaded: Loaded, cfg: IngestConfig, split: SplitBoundaries | None, split_path: Path | None = None
) -> Canonical:
    """Validate, label, dedupe, sort and split; ``split=None`` computes fresh boundaries."""
    rows = _checked_rows(loaded, cfg)
    inter = rows.inter
    order = np.lexsort((inter["item_id"].to_numpy(), inter["user_id"].to_numpy(), inter["ts_us"].to_numpy()))
    inter = inter.iloc[order].reset_index(drop=True)
    ts = inter["ts_us"].to_numpy(dtype=np.int64)
    codes, uniq = pd.factorize(inter["behavior_text"], sort=False)
    behavior_id = np.array([stable_id(t) for t in uniq], dtype=np.int64)[codes]
    split, split_codes = assign_split(ts, parse_ratios(cfg.split_ratios), split, split_path)
    split_counts = {name: int((split_codes == code).sum()) for name, code in SPLIT_CODES.items()}
    interactions = _interactions_table(inter, ts, behavior_id, codes, uniq, split_codes)

    t0 = int(ts.min())
    attrs = loaded.attributes or {"user": [], "item": []}
    first_item = inter.groupby("item_id", sort=False)["ts_us"].min()
    items_table = _items_table(rows.items, first_item, t0, attrs["item"])
    first_user = inter.groupby("user_id", sort=True)["ts_us"].min()
    users_table, without_profile = _users_table(loaded, first_user, t0, attrs["user"])

    counts = {
        "rows_read": rows.rows_read,
        "blank_lines_skipped": int(sum((loaded.blank_lines or {}).values())),
        "unknown_item_rows_dropped": rows.unknown_item_rows_dropped,
        "exact_duplicates_dropped": rows.exact_duplicates_dropped,
        "interactions": interactions.num_rows,
        "items": items_table.num_rows,
        "items_without_interactions": int(len(rows.items) - len(first_item)),
        "users": users_table.num_rows,
        "users_with_interactions": int(len(first_user)),
        "users_without_profile": without_profile,
        "distinct_behaviors": int(len(uniq)),
        "positives": int(inter["label"].sum()),
    }
    return Canonical(interactions, items_table, users_table, split, split_counts, counts, rows.label_source)


def _checked_rows(loaded: Loaded, cfg: IngestConfig) -> _CheckedRows:
    """Non-empty tables, unique items and users, known items, a behaviour text and a label on every
    row, both labels present, exact duplicates dropped."""
    inter = loaded.interactions
    items = loaded.items
    if len(inter) == 0:
        raise IngestError(
            "no interactions", file=loaded.sources[0].path, fix="Give a non-empty interaction log."
        )
    if items is None:
        raise IngestError("no item table", fix="Pass --items FILE or --item-text-column.")
    check_unique(loaded.items_src, items, "item_id", "item")
    if loaded.users is not None:
        check_unique(loaded.users_src, loaded.users, "user_id", "user")
    rows_read = len(inter)
    inter, n_unknown = unknown_items(loaded, inter, items, cfg.drop_unknown_items)
    if len(inter) == 0:
        raise IngestError(
            "every interaction refers to an unknown item", fix="Check --items and the item ids."
        )
    if "behavior_text" not in inter.columns:
        text_of = pd.Series(items["item_text"].to_numpy(), index=items["item_id"].to_numpy())
        inter["behavior_text"] = text_of.reindex(inter["item_id"].to_numpy()).to_numpy()
    label_source = apply_label(loaded, inter, cfg)
    check_both_labels(inter, label_source, cfg)
    inter, n_dups = drop_exact_duplicates(loaded, inter)
    return _CheckedRows(inter, items, rows_read, n_unknown, n_dups, label_source)


def _interactions_table(
    inter: pd.DataFrame,
    ts: np.ndarray,
    behavior_id: np.ndarray,
    codes: np.ndarray,
    uniq: pd.Index,
    split_codes: np.ndarray,
) -> pa.Table:
    """The interactions table (:data:`INTERACTIONS_SCHEMA`) of the time-sorted rows."""
    rating = inter["rating"].to_numpy(dtype=np.float32)
    return pa.Table.from_arrays(
        [
            pa.array(inter["user_id"].to_numpy(np.int64)),
            pa.array(inter["item_id"].to_numpy(np.int64)),
            utc_us(pa.array(ts)),
            pa.array(behavior_id),
            pa.DictionaryArray.from_arrays(
                pa.array(codes.astype(np.int32)), pa.array(uniq.to_numpy(dtype=object), pa.string())
            ).cast(pa.string()),
            pa.array(inter["label"].to_numpy(np.int8)),
            pa.array(rating, mask=np.isnan(rating)),
            pa.DictionaryArray.from_arrays(
                pa.array(split_codes.astype(np.int32)), pa.array(list(SPLITS))
            ).cast(pa.string()),
        ],
        schema=INTERACTIONS_SCHEMA,
    )


def _items_table(items: pd.DataFrame, first_item: pd.Series, t0: int, attrs: list[Attribute]) -> pa.Table:
    """The items table, by item id; an item's event time is its first interaction (else ``t0``)."""
    items = items.sort_values("item_id").reset_index(drop=True)
    item_ts = first_item.reindex(items["item_id"].to_numpy()).fillna(t0).to_numpy(dtype=np.int64)
    item_cols: dict[str, pa.Array] = {
        "item_id": pa.array(items["item_id"].to_numpy(np.int64)),
        "item_text": pa.array(items["item_text"].astype(str).tolist(), pa.string()),
    }
    if "title" in items.columns:
        item_cols["title"] = pa.array(items["title"].astype("string").tolist(), pa.string())
    if any(a.name == "item_genres" for a in attrs):  # also joined, as ingest always wrote it
        item_cols["genres"] = pa.array(["|".join(g) for g in items["item_genres"]], pa.string())
    for a in attrs:
        item_cols[a.name] = _attribute_array(items[a.name], a)
    if "release_date" in items.columns:
        item_cols["release_date"] = pa.array(items["release_date"].astype("string").tolist(), pa.string())
    item_cols["event_timestamp"] = utc_us(pa.array(item_ts))
    return pa.table(item_cols).replace_schema_metadata(attributes_mod.metadata(attrs))


def _users_table(
    loaded: Loaded, first_user: pd.Series, t0: int, attrs: list[Attribute]
) -> tuple[pa.Table, int]:
    """The users table (every user of the profiles or the log, by id; event time: the first
    interaction, else ``t0``) and how many users of the log have no profile row."""
    if loaded.users is not None:
        users = loaded.users.drop(columns=["_line"]).set_index("user_id")
        all_ids = np.union1d(users.index.to_numpy(np.int64), first_user.index.to_numpy(np.int64))
        users = users.reindex(all_ids)
        without_profile = int(
            (~np.isin(first_user.index.to_numpy(), loaded.users["user_id"].to_numpy())).sum()
        )
    else:
        all_ids = first_user.index.to_numpy(np.int64)
        users = pd.DataFrame(index=all_ids)
        without_profile = len(all_ids)
    user_cols: dict[str, pa.Array] = {
        "user_id": pa.array(all_ids, pa.int64()),
        "event_timestamp": utc_us(pa.array(first_user.reindex(all_ids).fillna(t0).to_numpy(dtype=np.int64))),
    }
    for a in attrs:
        user_cols[a.name] = _attribute_array(users[a.name], a)
    return pa.table(user_cols).replace_schema_metadata(attributes_mod.metadata(attrs)), without_profile


def _attribute_array(col: pd.Series, a: Attribute) -> pa.Array:
    """An attribute column for the canonical table: list<string>, float64, int64 or string (null = missing)."""
    if a.kind == "multi":
        return pa.array([list(v) if isinstance(v, (list, tuple, np.ndarray)) else [] for v in col],
                        pa.list_(pa.string()))
    if a.kind == "numeric":
        return pa.array([None if pd.isna(v) else float(v) for v in col], pa.float64())
    if pd.api.types.is_numeric_dtype(col.dtype) and not pd.api.types.is_bool_dtype(col.dtype):
        return pa.array([None if pd.isna(v) else int(v) for v in col], pa.int64())
    return pa.array([None if v is None or v is pd.NA or (isinstance(v, float) and np.isnan(v)) else str(v)
                     for v in col], pa.string())

