"""llm_features.store: open from any CWD, apply, materialise, online/historical reads, fingerprints.

Every test works on a copy of feast_repo/ and a synthetic data dir under tmp_path, so the real
feast_repo/data is never touched.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from click.testing import CliRunner

from llm_features import parquet_io
from llm_features.fingerprint import FINGERPRINT_METADATA_KEY, FingerprintMismatchError
from llm_features.store import (
    apply_definitions,
    check_fingerprints,
    materialize_all,
    online_features,
    open_store,
)
from llm_features.workspace import Workspace
from tests.store_data import DIM, T1, T2, copy_repo, embedding_table, make_fingerprint, write_synthetic_workspace


@pytest.fixture(scope="module")
def materialized(tmp_path_factory):
    """(store, synthetic data, repo copy, data dir): applied and fully materialised once."""
    root = tmp_path_factory.mktemp("store")
    repo = copy_repo(root / "feast_repo")
    data = root / "data"
    syn = write_synthetic_workspace(data)
    store = open_store(repo, data)
    apply_definitions(store)
    report = materialize_all(store)
    return store, syn, repo, data, report


def test_open_store_from_any_cwd_makes_paths_absolute(tmp_path, monkeypatch):
    repo = copy_repo(tmp_path / "feast_repo")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("LLMFEAT_DATA_DIR", str(tmp_path / "env_data"))
    store = open_store(repo)
    assert store.config.registry.path == str(tmp_path / "env_data" / "registry.db")
    assert store.config.online_store.path == str(tmp_path / "env_data" / "online_store.db")
    # an explicit data_dir wins over the environment
    store = open_store(repo, tmp_path / "explicit")
    assert store.config.online_store.path == str(tmp_path / "explicit" / "online_store.db")
    # without either: <repo>/data, like the feast CLI run inside the repo
    monkeypatch.delenv("LLMFEAT_DATA_DIR")
    store = open_store(repo)
    assert store.config.registry.path == str(repo / "data" / "registry.db")
    assert not list(elsewhere.iterdir()), "nothing may be created relative to the CWD"


def test_materialize_then_online_features_return_written_vectors(materialized):
    store, syn, _, _, report = materialized
    assert report.entities["item_embeddings"] == 20
    assert report.entities["user_embeddings"] == 3
    assert report.source_rows["user_embeddings"] == 4
    item_ids = [3, 17, 12]
    feats = online_features(store, 1, item_ids)
    np.testing.assert_array_equal(feats.values["item_embedding"], np.stack([syn.items[i] for i in item_ids]))
    # the online store holds the latest version of each user
    np.testing.assert_array_equal(feats.values["user_embedding"], np.stack([syn.users_v2[1]] * 3))
    assert feats.values["item_embedding"].dtype == np.float32
    assert all(m.all() for m in feats.present.values())
    assert feats.values["recent_behavior_ids"][0].tolist() == [101, 202]
    assert feats.values["recent_labels"][0].tolist() == [1, 0]
    assert feats.values["title"].tolist() == [f"Movie {i} (2000)" for i in item_ids]
    assert feats.values["item_genres"][0].tolist() == ["Drama"]
    assert feats.values["age"].tolist() == [25] * 3

    behaviors = store.get_online_features(
        features=["atomic_behavior_embeddings:behavior_embedding"], entity_rows=[{"behavior_id": 202}]
    ).to_dict()
    got = np.asarray(behaviors["behavior_embedding"][0], np.float32)
    np.testing.assert_array_equal(got, syn.behaviors[202])


def test_online_features_missing_handling(materialized):
    store, syn, _, _, _ = materialized
    feats = online_features(store, 2, [5, 999])
    assert feats.present["item_embedding"].tolist() == [True, False]
    np.testing.assert_array_equal(feats.values["item_embedding"][1], np.zeros(DIM, np.float32))
    assert feats.values["title"][1] == ""
    assert feats.missing()["item_embedding"].tolist() == [999]
    assert feats.present["user_embedding"].all()

    nan = online_features(store, 999, [5], missing="nan")
    assert np.isnan(nan.values["user_embedding"]).all() and not nan.present["user_embedding"].any()
    assert nan.values["recent_behavior_ids"][0].size == 0
    with pytest.raises(KeyError, match="999"):
        online_features(store, 2, [999], missing="raise")

    id_only = online_features(store, 1, [5], service="ranker_id_only")
    assert "item_embedding" not in id_only.values and "recent_item_ids" in id_only.values


def test_historical_features_are_point_in_time_correct(materialized):
    """Two versions of user 1 (T1, T2). A row stamped T summarises only what happened strictly
    before T, so a training row at time t may use every version with timestamp <= t, never a later one."""
    store, syn, _, _, _ = materialized
    us = timedelta(microseconds=1)
    entity_df = pd.DataFrame(
        {
            "row": range(7),
            "user_id": [1, 1, 1, 1, 1, 1, 2],
            "event_timestamp": pd.to_datetime(
                [T1 - us, T1, T1 + timedelta(days=3), T2 - us, T2, T2 + timedelta(days=400), T2], utc=True
            ),
        }
    )
    job = store.get_historical_features(entity_df=entity_df, features=["user_embeddings:user_embedding"])
    out = job.to_df()
    assert len(out) == len(entity_df), "no entity row may be dropped"
    out = out.sort_values("row").reset_index(drop=True)
    emb = out["user_embedding"]
    assert emb[0] is None or (np.isscalar(emb[0]) and pd.isna(emb[0])), "before the first version: no value"
    v1, v2 = syn.users_v1[1], syn.users_v2[1]
    for i, expected in [(1, v1), (2, v1), (3, v1), (4, v2), (5, v2)]:
        np.testing.assert_array_equal(np.asarray(emb[i], np.float32), expected, err_msg=f"row {i}")
    np.testing.assert_array_equal(np.asarray(emb[6], np.float32), syn.users_v1[2])


def _apply_fresh(tmp_path: Path, with_data: bool = True):
    repo = copy_repo(tmp_path / "feast_repo")
    data = tmp_path / "data"
    syn = write_synthetic_workspace(data) if with_data else None
    store = open_store(repo, data)
    apply_definitions(store)
    return store, Workspace.at(data), syn


def test_fingerprint_mismatch_in_part_file_raises(tmp_path):
    store, ws, syn = _apply_fresh(tmp_path)
    assert check_fingerprints(store, ws).digest == syn.fingerprint.digest
    other = make_fingerprint("another-model")
    part = parquet_io.write_part(
        ws.item_embeddings,
        embedding_table("item_id", "item_embedding", [1], np.ones((1, DIM), np.float32), [T2]),
        metadata={FINGERPRINT_METADATA_KEY: other.to_json()},
    )
    with pytest.raises(FingerprintMismatchError) as err:
        materialize_all(store)
    msg = str(err.value)
    assert "item_embeddings" in msg and part.name in msg
    assert other.digest in msg and syn.fingerprint.digest in msg
    # nothing was materialised
    assert not online_features(store, 1, [1]).present["item_embedding"].any()


def test_part_without_fingerprint_and_stale_tags_raise(tmp_path):
    store, ws, syn = _apply_fresh(tmp_path, with_data=False)
    # the views were applied before any model existed: tags say "none"
    assert store.get_feature_view("item_embeddings").tags["llmfeat_fingerprint"] == "none"
    check_fingerprints(store, ws)  # empty sources are fine
    syn = write_synthetic_workspace(ws.root)
    with pytest.raises(FingerprintMismatchError, match="re-tag"):
        check_fingerprints(store, ws)
    apply_definitions(store)
    assert check_fingerprints(store, ws).digest == syn.fingerprint.digest
    part = parquet_io.write_part(
        ws.user_embeddings, embedding_table("user_id", "user_embedding", [9], np.ones((1, DIM), np.float32), [T2])
    )
    with pytest.raises(FingerprintMismatchError, match=part.name):
        check_fingerprints(store, ws)


def test_empty_sources_apply_and_materialize(tmp_path):
    store, ws, _ = _apply_fresh(tmp_path, with_data=False)
    views = {fv.name: fv for fv in store.list_feature_views()}
    assert views["item_embeddings"].features[0].vector_length == 384  # no manifest yet
    report = materialize_all(store)
    assert report.total_entities == 0
    # DuckDB cannot read an empty directory: a schema-only file that the stages' readers never see
    assert sorted(p.name for p in ws.user_embeddings.iterdir()) == ["empty-schema.parquet"]
    assert parquet_io.list_parts(ws.user_embeddings) == []
    # the finetune stage fills user_embeddings later: the placeholder goes away with its first
    # part (parquet_io.write_part), no re-apply needed
    fp = make_fingerprint(dim=384)
    ws.claim_fingerprint(fp)
    apply_definitions(store)  # re-tag with the new manifest
    vec = np.arange(384, dtype=np.float32)[None]
    parquet_io.write_part(ws.user_embeddings, embedding_table("user_id", "user_embedding", [7], vec, [T1]),
                          metadata={FINGERPRINT_METADATA_KEY: fp.to_json()})
    assert not (ws.user_embeddings / "empty-schema.parquet").exists()
    report = materialize_all(store)
    assert report.entities["user_embeddings"] == 1
    got = online_features(store, 7, [1]).values["user_embedding"]
    np.testing.assert_array_equal(got[0], vec[0])


def test_llmfeat_feast_cli(materialized, tmp_path):
    from llm_features.cli.feast import command

    _, syn, repo, data, _ = materialized
    runner = CliRunner()
    args = ["--repo", str(repo), "--data-dir", str(data)]
    res = runner.invoke(command, ["materialize", *args], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "item_embeddings" in res.output
    res = runner.invoke(command, ["lookup", *args, "--user-id", "1", "--item-ids", "3", "--item-ids", "999"],
                        catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "item_embedding" in res.output and "present 1/2" in res.output


def test_time_windows_cover_the_range_in_bounded_windows():
    from llm_features.store import time_windows

    start, end = T1 - timedelta(seconds=1), T2 + timedelta(days=1)
    stamps = [T1 + timedelta(hours=int(h)) for h in np.random.default_rng(0).integers(0, 700, 1000)]
    ts = pa.chunked_array([parquet_io.utc_us(stamps)])
    assert time_windows(ts, start, end, chunk_rows=1000) == [(start, end)]
    windows = time_windows(ts, start, end, chunk_rows=100)
    assert windows[0][0] == start and windows[-1][1] == end
    assert all(a[1] == b[0] for a, b in zip(windows, windows[1:])), "contiguous"
    assert all(lo < hi for lo, hi in windows)
    assert 9 <= len(windows) <= 10
    # bounds are inclusive: a window holds about chunk_rows (plus rows that share the cut's timestamp)
    for lo, hi in windows:
        assert sum(lo <= t <= hi for t in stamps) <= 100 + max(stamps.count(lo), 1) + stamps.count(hi)


def test_materialize_in_time_windows_keeps_each_users_latest_row(tmp_path):
    """A source over chunk_rows is materialised window by window; the online store ends with the same
    latest row per entity as one window gives, also for users whose last row is in an early window."""
    repo = copy_repo(tmp_path / "feast_repo")
    data = tmp_path / "data"
    syn = write_synthetic_workspace(data)
    rng = np.random.default_rng(1)
    latest: dict[int, np.ndarray] = {1: syn.users_v2[1], 2: syn.users_v1[2], 3: syn.users_v1[3]}
    rows = []
    for user in range(10, 40):  # user u's last row is at day u: early and late users
        for day in sorted(rng.choice(np.arange(1, user + 1), size=min(user, 4), replace=False)):
            rows.append((user, T1 + timedelta(days=int(day)), rng.standard_normal(DIM).astype(np.float32)))
        latest[user] = rows[-1][2]
    rng.shuffle(rows)  # several parts, not in time order
    ws = Workspace.at(data)
    meta = {FINGERPRINT_METADATA_KEY: syn.fingerprint.to_json()}
    for part in np.array_split(np.arange(len(rows)), 3):
        sel = [rows[i] for i in part]
        table = embedding_table("user_id", "user_embedding", [r[0] for r in sel], np.stack([r[2] for r in sel]),
                           [r[1] for r in sel])
        parquet_io.write_part(ws.user_embeddings, table, metadata=meta)
    store = open_store(repo, data)
    apply_definitions(store)
    report = materialize_all(store, chunk_rows=15)
    assert report.windows["user_embeddings"] >= 5
    assert report.windows["item_embeddings"] == 2  # 20 rows
    assert report.windows["user_profile"] == 1
    users = sorted(latest)
    got = store.get_online_features(features=["user_embeddings:user_embedding"],
                                    entity_rows=[{"user_id": u} for u in users]).to_dict()["user_embedding"]
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.stack([latest[u] for u in users]))
    items = store.get_online_features(features=["item_embeddings:item_embedding"],
                                      entity_rows=[{"item_id": i} for i in range(1, 21)]).to_dict()
    np.testing.assert_array_equal(np.asarray(items["item_embedding"], np.float32),
                                  np.stack([syn.items[i] for i in range(1, 21)]))
