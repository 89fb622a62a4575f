"""A synthetic data dir and a copy of feast_repo/ for the Feast store tests (shared by several test files).

:func:`write_synthetic_workspace` writes canonical users/items and embedding and recent-behaviour part
files in the formats the stages write, with a synthetic model fingerprint; :func:`copy_repo` copies the
repository without its data dir, so the real ``feast_repo/data`` is never touched.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa

from llm_features import parquet_io
from llm_features.fingerprint import FINGERPRINT_METADATA_KEY, ModelFingerprint
from llm_features.workspace import Workspace

REPO = Path(__file__).resolve().parents[1] / "feast_repo"
DIM = 8
T1 = datetime(2000, 5, 1, 12, 0, tzinfo=timezone.utc)
T2 = datetime(2000, 6, 1, 12, 0, tzinfo=timezone.utc)


def make_fingerprint(name: str = "synthetic-model", dim: int = DIM) -> ModelFingerprint:
    return ModelFingerprint(name, name.encode().hex().ljust(64, "0")[:64], 3, "mean", 64, "float32", dim)


def copy_repo(dest: Path) -> Path:
    return Path(shutil.copytree(REPO, dest, ignore=shutil.ignore_patterns("data", "__pycache__")))


@dataclass
class Synthetic:
    fingerprint: ModelFingerprint
    items: dict[int, np.ndarray]  # latest vector per item
    behaviors: dict[int, np.ndarray]
    users_v1: dict[int, np.ndarray]  # stamped T1
    users_v2: dict[int, np.ndarray]  # stamped T2 (user 1 only)


def embedding_table(key: str, column: str, ids, vectors: np.ndarray, ts) -> pa.Table:
    return pa.table(
        {
            key: pa.array(ids, pa.int64()),
            column: parquet_io.embedding_array(vectors),
            "event_timestamp": parquet_io.utc_us(list(ts)),
        }
    )


def write_synthetic_workspace(data_dir: Path, seed: int = 0, dim: int = DIM) -> Synthetic:
    """Canonical users/items plus embedding and recent-behaviour part files in the SPEC formats."""
    rng = np.random.default_rng(seed)
    ws = Workspace.at(data_dir)
    fp = make_fingerprint(dim=dim)
    ws.claim_fingerprint(fp)
    meta = {FINGERPRINT_METADATA_KEY: fp.to_json()}

    item_ids = np.arange(1, 21)
    item_vecs = rng.standard_normal((len(item_ids), dim)).astype(np.float32)
    item_ts = [T1 + timedelta(days=int(i)) for i in item_ids]
    # two encode runs: two parts in the same directory
    for part in (slice(0, 10), slice(10, None)):
        table = embedding_table("item_id", "item_embedding", item_ids[part], item_vecs[part], item_ts[part])
        parquet_io.write_part(ws.item_embeddings, table, metadata=meta)

    beh_ids = np.array([101, 202, 303], dtype=np.int64)
    beh_vecs = rng.standard_normal((3, dim)).astype(np.float32)
    table = embedding_table("behavior_id", "behavior_embedding", beh_ids, beh_vecs, [T1] * 3)
    parquet_io.write_part(ws.atomic_behavior_embeddings, table, metadata=meta)

    user_ids = np.array([1, 2, 3], dtype=np.int64)
    v1 = rng.standard_normal((3, dim)).astype(np.float32)
    v2 = rng.standard_normal((1, dim)).astype(np.float32)
    parquet_io.write_part(ws.user_embeddings, embedding_table("user_id", "user_embedding", user_ids, v1, [T1] * 3),
                          metadata=meta)
    parquet_io.write_part(ws.user_embeddings, embedding_table("user_id", "user_embedding", [1], v2, [T2]),
                          metadata=meta)

    parquet_io.write_part(
        ws.user_recent_behaviors,
        pa.table(
            {
                "user_id": pa.array([1, 2, 3, 1], pa.int64()),
                "recent_behavior_ids": pa.array([[101], [202, 303], [], [101, 202]], pa.list_(pa.int64())),
                "recent_item_ids": pa.array([[1], [2, 3], [], [1, 2]], pa.list_(pa.int64())),
                "recent_labels": pa.array([[1], [0, 1], [], [1, 0]], pa.list_(pa.int8())),
                "event_timestamp": parquet_io.utc_us([T1, T1, T1, T2]),
            }
        ),
    )
    parquet_io.write_table_atomic(
        pa.table(
            {
                "user_id": pa.array(user_ids, pa.int64()),
                "gender": ["M", "F", "M"],
                "age": pa.array([25, 35, 45], pa.int64()),
                "occupation": ["writer", "artist", None],
                "zip": ["10001", "94110", "60601"],
                "event_timestamp": parquet_io.utc_us([T1] * 3),
            }
        ),
        ws.users,
    )
    parquet_io.write_table_atomic(
        pa.table(
            {
                "item_id": pa.array(item_ids, pa.int64()),
                "item_text": [f"Movie {i} (2000) | Drama" for i in item_ids],
                "title": [f"Movie {i} (2000)" for i in item_ids],
                "genres": ["Drama"] * len(item_ids),
                "item_genres": pa.array([["Drama"]] * len(item_ids), pa.list_(pa.string())),
                "event_timestamp": parquet_io.utc_us(item_ts),
            }
        ),
        ws.items,
    )
    return Synthetic(
        fingerprint=fp,
        items=dict(zip(item_ids.tolist(), item_vecs)),
        behaviors=dict(zip(beh_ids.tolist(), beh_vecs)),
        users_v1=dict(zip(user_ids.tolist(), v1)),
        users_v2={1: v2[0]},
    )
