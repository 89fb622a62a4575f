"""What the encode stage reads: the distinct texts of the canonical tables, and what the embedding
parts of a model fingerprint already hold (:mod:`llm_features.encode` encodes the rest).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from llm_features.errors import UserError
from llm_features.fingerprint import FINGERPRINT_METADATA_KEY, ModelFingerprint
from llm_features.ids import stable_id
from llm_features.parquet_io import embedding_matrix, file_metadata, list_parts, utc_us
from llm_features.workspace import Workspace

log = logging.getLogger("llm_features.encode")  # the stage's messages keep their logger


@dataclass
class Texts:
    """The distinct texts of a workspace, keyed by ``stable_id`` of the normalised text."""

    occurrences: int
    behaviors: pa.Table  # behavior_id, behavior_text, event_timestamp (first seen)
    items: pa.Table  # item_id, item_text, text_key, event_timestamp


def read_texts(ws: Workspace) -> Texts:
    if not ws.interactions.exists():
        raise UserError("not found", file=ws.interactions, fix="Run `llmfeat ingest` for this data dir first.")
    inter = read_canonical(ws.interactions, ["behavior_id", "behavior_text", "item_id", "event_timestamp"])
    g = inter.group_by("behavior_id", use_threads=False).aggregate(
        [("behavior_text", "first"), ("event_timestamp", "min")]
    )
    behaviors = pa.table({
        "behavior_id": g["behavior_id"].cast(pa.int64()),
        "behavior_text": g["behavior_text_first"],
        "event_timestamp": g["event_timestamp_min"],
    })
    for bid, text in zip(behaviors["behavior_id"].to_pylist(), behaviors["behavior_text"].to_pylist()):
        if stable_id(text) != bid:
            raise UserError(
                f"behavior_id {bid} is not stable_id(behavior_text) for text {text!r} (expected "
                f"{stable_id(text)})", file=ws.interactions, column="behavior_id",
                fix="Re-run `llmfeat ingest`, which derives the id from the text.")

    first_seen = inter.group_by("item_id").aggregate([("event_timestamp", "min")])
    first_seen = dict(zip(first_seen["item_id"].to_pylist(), first_seen["event_timestamp_min"].to_pylist()))
    earliest = pc.min(inter["event_timestamp"]).as_py()
    if ws.items.exists():
        names = set(read_canonical(ws.items, None, schema_only=True).names)
        cols = ["item_id", "item_text"] + (["event_timestamp"] if "event_timestamp" in names else [])
        items = read_canonical(ws.items, cols)
    else:
        log.warning("%s not found: encoding behaviours only, no item embeddings", ws.items)
        items = pa.table({"item_id": pa.array([], pa.int64()), "item_text": pa.array([], pa.string())})
    ids = items["item_id"].to_pylist()
    has_ts = "event_timestamp" in items.column_names
    own_ts = items["event_timestamp"].to_pylist() if has_ts else [None] * len(ids)
    ts = [t if t is not None else first_seen.get(i, earliest) for i, t in zip(ids, own_ts)]
    texts = items["item_text"].to_pylist()
    items = pa.table({
        "item_id": pa.array(ids, pa.int64()),
        "item_text": pa.array(texts, pa.string()),
        "text_key": pa.array([stable_id(t) for t in texts], pa.int64()),
        "event_timestamp": utc_us(pa.array(ts, pa.timestamp("us", tz="UTC"))),
    })
    return Texts(occurrences=inter.num_rows, behaviors=behaviors, items=items)


def check_fingerprints(directory: Path, fp: ModelFingerprint) -> list[Path]:
    """``directory``'s parts; every part must carry ``fp`` (mixing models is an error)."""
    parts = list_parts(directory)
    for part in parts:
        raw = file_metadata(part).get(FINGERPRINT_METADATA_KEY)
        fp.require_same(ModelFingerprint.from_json(raw) if raw else None,
                        lambda found, this: f"{part} was written by model fingerprint {found}, this run is {this}; "
                        f"use a fresh --data-dir or delete {directory} to re-encode")
    return parts


def read_canonical(path: Path, columns: list[str] | None, schema_only: bool = False):
    """A canonical table, or a :class:`UserError` saying it is unreadable or lacks a column."""
    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowException) as e:
        raise UserError(f"not a readable parquet table ({str(e).splitlines()[0]})", file=path,
                        fix="Re-run `llmfeat ingest` to rewrite it.") from None
    if schema_only:
        return schema
    missing = [c for c in columns or () if c not in schema.names]
    if missing:
        raise UserError("missing (a table `llmfeat ingest` did not write?)", file=path, column=missing[0],
                        fix="Re-run `llmfeat ingest` to rewrite it.")
    return pq.read_table(path, columns=columns)


def existing_ids(directory: Path, id_column: str, fp: ModelFingerprint) -> set[int]:
    """Ids in ``directory``'s parts, all of fingerprint ``fp``."""
    done: set[int] = set()
    for part in check_fingerprints(directory, fp):
        done.update(pq.read_table(part, columns=[id_column])[id_column].to_pylist())
    return done


def find_stale_items(directory: Path, fp: ModelFingerprint,
                     items: pa.Table) -> tuple[set[int], dict[Path, set[int]]]:
    """Items whose stored vector was encoded from another text than their text now.

    Returns (the item ids with a current vector, {part: stale item ids in it}). Each item row carries
    the ``text_key`` of the text it was encoded from; a row without one (a part written before
    llmfeat recorded it) counts as stale, so the upgrade re-encodes the items once.
    """
    current = dict(zip(items["item_id"].to_pylist(), items["text_key"].to_pylist()))
    fresh: set[int] = set()
    stale: dict[Path, set[int]] = {}
    for part in check_fingerprints(directory, fp):
        names = pq.read_schema(part).names
        t = pq.read_table(part, columns=["item_id"] + (["text_key"] if "text_key" in names else []))
        ids = t["item_id"].to_pylist()
        keys = t["text_key"].to_pylist() if "text_key" in names else [None] * len(ids)
        bad = {i for i, k in zip(ids, keys) if i in current and k != current[i]}
        fresh.update(i for i, k in zip(ids, keys) if i not in current or k == current[i])
        if bad:
            stale[part] = bad
    return fresh - {i for ids in stale.values() for i in ids}, stale


def stored_vectors(directory: Path, wanted: set[int]) -> dict[int, np.ndarray]:
    """Behaviour vectors already in parts, for the ids in ``wanted``."""
    found: dict[int, np.ndarray] = {}
    if not wanted:
        return found
    value_set = pa.array(sorted(wanted), pa.int64())
    for part in list_parts(directory):
        t = pq.read_table(part, columns=["behavior_id", "behavior_embedding"])
        t = t.filter(pc.is_in(t["behavior_id"], value_set=value_set))
        for k, v in zip(t["behavior_id"].to_pylist(), embedding_matrix(t["behavior_embedding"])):
            found[k] = v
    return found


def without(table: pa.Table, column: str, ids: set[int]) -> pa.Table:
    return table.filter(pc.invert(pc.is_in(table[column], value_set=pa.array(sorted(ids), pa.int64()))))


__all__ = ["Texts", "check_fingerprints", "existing_ids", "find_stale_items", "read_canonical", "read_texts",
           "stored_vectors", "without"]
