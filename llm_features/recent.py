"""``user_recent_behaviors``: each user's last n interactions strictly before each stamp.

Cadence ``event`` (default): one row per (user, distinct interaction timestamp T) holding the last
n interactions with ts < T, plus one final row per user at (last interaction + 1 s) holding the
latest n, so the online store serves the current history. Cadence ``day``: one row per (user,
UTC day with activity) stamped at the day start, holding interactions before that day, plus a
final row at the start of the day after the last active day (:mod:`llm_features.schedule`). Lists are
oldest first.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow as pa

from llm_features.parquet_io import list_parts, utc_us, write_part_streamed
from llm_features.schedule import SnapshotSchedule, is_part_of, opens_snapshot, part_name
from llm_features.workspace import Workspace

Cadence = Literal["event", "day"]
PART_PREFIX = "recent"
METADATA_KEY = "llmfeat.recent"
_MAX_LIST_VALUES = 2**31 - 1
BLOCK_ROWS = 1_000_000
"""Interactions per block of users when the table is built block by block (bounded memory)."""
SCHEMA = pa.schema([
    ("user_id", pa.int64()),
    ("recent_behavior_ids", pa.list_(pa.int64())),
    ("recent_item_ids", pa.list_(pa.int64())),
    ("recent_labels", pa.list_(pa.int8())),
    ("event_timestamp", pa.timestamp("us", tz="UTC")),
])


def _columns(interactions: pd.DataFrame | pa.Table) -> dict[str, np.ndarray]:
    if isinstance(interactions, pa.Table):
        names = ["user_id", "item_id", "event_timestamp", "behavior_id", "label"]
        t = interactions.select(names)
        ts = t.column("event_timestamp")
        if pa.types.is_timestamp(ts.type):
            ts = utc_us(ts).cast(pa.int64())
        out = {n: t.column(n).to_numpy() for n in names if n != "event_timestamp"}
        out["ts"] = np.asarray(ts.to_numpy(), dtype=np.int64)
        return out
    ts = interactions["event_timestamp"]
    if pd.api.types.is_datetime64_any_dtype(ts.dtype):
        ts_us = pd.to_datetime(ts, utc=True).dt.as_unit("us").astype("int64").to_numpy()
    else:
        ts_us = ts.to_numpy(dtype=np.int64)
    return {
        "user_id": interactions["user_id"].to_numpy(np.int64),
        "item_id": interactions["item_id"].to_numpy(np.int64),
        "behavior_id": interactions["behavior_id"].to_numpy(np.int64),
        "label": interactions["label"].to_numpy(),
        "ts": ts_us,
    }


def _list_array(values: np.ndarray, offsets: np.ndarray, typ: pa.DataType) -> pa.ChunkedArray:
    """A ``list<typ>`` column from flat values and int64 offsets, chunked to keep int32 offsets."""
    n = len(offsets) - 1
    bounds = [0]
    while bounds[-1] < n:
        s = bounds[-1]
        e = int(np.searchsorted(offsets, offsets[s] + _MAX_LIST_VALUES, side="right")) - 1
        bounds.append(max(min(e, n), s + 1))
    if n == 0:
        bounds.append(0)
    chunks = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        off = pa.array((offsets[s : e + 1] - offsets[s]).astype(np.int32), pa.int32())
        chunks.append(pa.ListArray.from_arrays(off, pa.array(values[offsets[s] : offsets[e]], type=typ)))
    return pa.chunked_array(chunks, type=pa.list_(typ))


def build_recent_behaviors(
    interactions: pd.DataFrame | pa.Table, n: int = 30, cadence: Cadence = "event"
) -> pa.Table:
    """The ``user_recent_behaviors`` table (vectorised; no per-user Python loop).

    ``interactions`` needs user_id, item_id, event_timestamp (timestamp or int64 µs), behavior_id,
    label. Output columns: user_id, recent_behavior_ids list<int64>, recent_item_ids list<int64>,
    recent_labels list<int8>, event_timestamp timestamp[us, UTC]; sorted by (user_id, event_timestamp).
    """
    return pa.concat_tables(iter_recent_behaviors(interactions, n, cadence)).combine_chunks()


def iter_recent_behaviors(
    interactions: pd.DataFrame | pa.Table, n: int = 30, cadence: Cadence = "event", block_rows: int = BLOCK_ROWS
):
    """:func:`build_recent_behaviors` as consecutive tables over blocks of whole users of about
    ``block_rows`` interactions each, in (user_id, event_timestamp) order: memory stays bounded by
    one block (the lists of a block hold up to ``n`` values per row, so the whole table at once
    needs about ``3 n`` times the log's size)."""
    if n < 1:
        raise ValueError(f"recent n must be >= 1, got {n}")
    if cadence not in ("event", "day"):
        raise ValueError(f"cadence must be 'event' or 'day', got {cadence!r}")
    c = _columns(interactions)
    order = np.lexsort((c["item_id"], c["ts"], c["user_id"]))
    u = c["user_id"][order]
    m = len(u)
    if m == 0:
        yield _build_block({k: v[order] for k, v in c.items()}, n, cadence)
        return
    user_first = np.flatnonzero(np.r_[True, u[1:] != u[:-1]])
    start = 0
    while start < m:  # cut at the first user boundary at or after start + block_rows
        i = int(np.searchsorted(user_first, start + block_rows, side="left"))
        end = int(user_first[i]) if i < len(user_first) else m
        yield _build_block({k: v[order[start:end]] for k, v in c.items()}, n, cadence)
        start = end


def _build_block(c: dict[str, np.ndarray], n: int, cadence: Cadence) -> pa.Table:
    """The rows of the users in ``c`` (whole users, sorted by user, ts, item)."""
    u, ts = c["user_id"], c["ts"]
    schedule = SnapshotSchedule(cadence)
    key = schedule.stamps(ts)
    m = len(u)
    new_user = np.ones(m, dtype=bool)
    new_user[1:] = u[1:] != u[:-1]
    user_first = np.flatnonzero(new_user)
    user_start = user_first[np.cumsum(new_user) - 1]  # per row: index of its user's first row
    g = np.flatnonzero(opens_snapshot(u, key))
    user_end = np.append(user_first[1:], m)  # exclusive
    # event rows: history = rows of the same user before the group's first row
    ends = np.concatenate([g, user_end])
    firsts = np.concatenate([user_start[g], user_first])
    users = np.concatenate([u[g], u[user_first]])
    stamps = np.concatenate([key[g], schedule.final_stamps(ts[user_end - 1])]) if m else np.zeros(0, np.int64)
    starts = np.maximum(firsts, ends - n)
    out_order = np.lexsort((stamps, users))
    ends, starts, users, stamps = ends[out_order], starts[out_order], users[out_order], stamps[out_order]
    lengths = (ends - starts).astype(np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    src = np.arange(offsets[-1], dtype=np.int64) + np.repeat(starts - offsets[:-1], lengths)
    return pa.table(
        {
            "user_id": pa.array(users, pa.int64()),
            "recent_behavior_ids": _list_array(c["behavior_id"][src].astype(np.int64), offsets, pa.int64()),
            "recent_item_ids": _list_array(c["item_id"][src].astype(np.int64), offsets, pa.int64()),
            "recent_labels": _list_array(np.asarray(c["label"])[src].astype(np.int8), offsets, pa.int8()),
            "event_timestamp": utc_us(pa.array(stamps, pa.int64())),
        },
        schema=SCHEMA,
    )


def interactions_digest(interactions: pd.DataFrame | pa.Table) -> str:
    """A content hash of the columns the recent table depends on."""
    c = _columns(interactions)
    h = hashlib.sha256()
    for name in ("user_id", "item_id", "ts", "behavior_id", "label"):
        h.update(np.ascontiguousarray(np.asarray(c[name]).astype(np.int64)).tobytes())
    return h.hexdigest()[:16]


def write_recent_behaviors(
    workspace: Workspace,
    interactions: pd.DataFrame | pa.Table | None = None,
    *,
    n: int = 30,
    cadence: Cadence = "event",
    block_rows: int = BLOCK_ROWS,
) -> list[Path]:
    """Build and write ``user_recent_behaviors/`` as one deterministic part file, block by block of
    users (:func:`iter_recent_behaviors`), so memory stays bounded as the log grows.

    The part name holds cadence, n and a digest of the interactions, so a rerun on the same data
    writes nothing. Parts from earlier ingests (other data or settings) are removed after the new
    part is in place, so rows never duplicate. Reads ``canonical/interactions.parquet`` when
    ``interactions`` is None.
    """
    if interactions is None:
        import pyarrow.parquet as pq

        interactions = pq.read_table(
            workspace.interactions, columns=["user_id", "item_id", "event_timestamp", "behavior_id", "label"]
        )
    digest = interactions_digest(interactions)
    name = part_name(PART_PREFIX, cadence, f"n{n}", digest)
    dest = workspace.user_recent_behaviors
    target = dest / f"part-{name}.parquet"
    if not target.exists():
        blocks = iter_recent_behaviors(interactions, n=n, cadence=cadence, block_rows=block_rows)
        meta = {METADATA_KEY: json.dumps({"n": n, "cadence": cadence, "interactions_digest": digest})}
        write_part_streamed(dest, blocks, SCHEMA, metadata=meta, name=name)
    for old in list_parts(dest):
        if old != target and is_part_of(old, PART_PREFIX):
            old.unlink()
    return [target]
