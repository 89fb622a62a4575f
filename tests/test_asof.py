"""``llm_features.asof.historical_features`` gives the frame Feast's own point-in-time join gives."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pandas as pd
import pyarrow as pa
from tests.store_data import DIM, T1, copy_repo, write_synthetic_workspace

from llm_features import parquet_io
from llm_features.asof import historical_features
from llm_features.fingerprint import FINGERPRINT_METADATA_KEY
from llm_features.store import apply_definitions, materialize_all, open_store
from llm_features.workspace import Workspace


def _many_snapshots(data, syn, rng) -> None:
    """Dozens of snapshots per user, some less than a second apart, some at the same second."""
    ws = Workspace.at(data)
    meta = {FINGERPRINT_METADATA_KEY: syn.fingerprint.to_json()}
    users, stamps = [], []
    for u in (1, 2, 3, 4):
        t = T1 + timedelta(days=10)
        for _ in range(int(rng.integers(20, 40))):
            t += timedelta(microseconds=int(rng.choice([1, 300_000, 999_999, 5_000_000, 86_400_000_000])))
            users.append(u)
            stamps.append(t)
    vecs = rng.standard_normal((len(users), DIM)).astype(np.float32)
    parquet_io.write_part(ws.user_embeddings, pa.table({
        "user_id": pa.array(users, pa.int64()), "user_embedding": parquet_io.embedding_array(vecs),
        "event_timestamp": parquet_io.utc_us(stamps)}), metadata=meta)
    parquet_io.write_part(ws.user_recent_behaviors, pa.table({
        "user_id": pa.array(users, pa.int64()),
        "recent_behavior_ids": pa.array([[int(x)] * (i % 4) for i, x in enumerate(rng.integers(0, 9, len(users)))],
                                        pa.list_(pa.int64())),
        "recent_item_ids": pa.array([[i] for i in range(len(users))], pa.list_(pa.int64())),
        "recent_labels": pa.array([[i % 2] for i in range(len(users))], pa.list_(pa.int8())),
        "event_timestamp": parquet_io.utc_us(stamps)}))
    return stamps


def test_asof_fetch_equals_feasts_point_in_time_join(tmp_path):
    rng = np.random.default_rng(0)
    repo = copy_repo(tmp_path / "feast_repo")
    data = tmp_path / "data"
    syn = write_synthetic_workspace(data)
    stamps = _many_snapshots(data, syn, rng)
    store = open_store(repo, data)
    apply_definitions(store)
    assert {"user_embeddings__asof", "user_recent_behaviors__asof"} <= {fv.name for fv in store.list_feature_views()}
    # entity rows: exactly at stamps, a microsecond either side, before everything, long after, unknown users
    times = []
    for s in rng.choice(len(stamps), 60):
        times += [stamps[s], stamps[s] - timedelta(microseconds=1), stamps[s] + timedelta(microseconds=1)]
    times += [T1 - timedelta(days=1), T1, T1 + timedelta(days=5000)]
    entity = pd.DataFrame({
        "user_id": rng.choice([1, 2, 3, 4, 9], len(times)),
        "item_id": rng.integers(1, 25, len(times)),
        "event_timestamp": pd.to_datetime(times, utc=True),
        "label": rng.integers(0, 2, len(times)),
    })
    service = store.get_feature_service("ranker_llm")
    want = store.get_historical_features(entity_df=entity.assign(row=np.arange(len(entity))),
                                         features=service).to_df().sort_values("row").reset_index(drop=True)
    got = historical_features(store, entity.assign(row=np.arange(len(entity))), service)
    assert len(got) == len(entity) and list(got["row"]) == list(range(len(entity)))
    assert sorted(got.columns) == sorted(want.columns)
    n_checked = 0
    for col in want.columns:
        for a, b in zip(want[col], got[col]):
            if isinstance(a, (list, np.ndarray)) or isinstance(b, (list, np.ndarray)):
                assert a is not None and b is not None, col
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=col)
                n_checked += 1
            else:
                assert (pd.isna(a) and pd.isna(b)) or a == b, (col, a, b)
    assert n_checked > 200  # the vectors and lists were really compared
    # the twins are offline only: materialize leaves them alone, online reads are unchanged
    report = materialize_all(store)
    assert "user_embeddings__asof" not in report.entities
