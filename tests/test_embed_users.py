"""llmfeat embed-users: strictly-before rows, trained = served, incremental, resumable, through Feast."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

import llm_features.embed_users as eu
from llm_features.backbone import Backbone, BackboneConfig
from llm_features.config import RuntimeArgs
from llm_features.embed_users import (
    CHECKPOINT_METADATA_KEY,
    CheckpointMismatchError,
    EmbedUsersConfig,
    LateInteractionsError,
    compute_user_states,
    embed_users,
    read_user_embeddings,
    with_final_queries,
    stale_user_embeddings,
)
from llm_features.fingerprint import FINGERPRINT_METADATA_KEY, ModelFingerprint
from llm_features.finetune import FinetuneConfig, load_finetuned
from llm_features.finetune.checkpoint import build_model, save_checkpoint
from llm_features.finetune.data import load_finetune_data
from llm_features.finetune.packing import BehaviorPacker, UserHistories, make_blocks
from llm_features.parquet_io import (
    embedding_array,
    file_metadata,
    list_parts,
    utc_us,
    write_part,
    write_table_atomic,
)
from llm_features.recent import build_recent_behaviors
from llm_features.workspace import Workspace

N_BEHAVIORS, DIM, N = 7, 32, 3
TEXTS = [f"movie {i} ({1990 + i}) | genre {'abc'[i % 3]}" for i in range(N_BEHAVIORS)]
T0 = 946_684_800  # 2000-01-01, seconds
DAY = 86_400


@pytest.fixture(scope="module")
def bert(tiny_bert_dir):
    return Backbone.load(BackboneConfig(model=tiny_bert_dir, split_layer=2))


def make_rows(seed: int = 0, users: int = 5) -> list[tuple[int, int, int, float]]:
    """(user, behaviour, ts seconds, rating): a few days per user, with same-second ties."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(1, users + 1):
        t = T0 + int(rng.integers(0, DAY))
        for _ in range(int(rng.integers(4, 11))):
            t += int(rng.choice([0, 0, 30, 3600, DAY // 2, DAY + 7]))
            rows.append((u, int(rng.integers(0, N_BEHAVIORS)), t, float(rng.integers(1, 6))))
    return rows


def write_interactions(root: Path, rows) -> None:
    rows = sorted(rows, key=lambda r: (r[2], r[0], r[1]))
    user, item, ts, rating = (np.array(c) for c in zip(*rows))
    write_table_atomic(pa.table({
        "user_id": pa.array(user, pa.int64()), "item_id": pa.array(item, pa.int64()),
        "event_timestamp": utc_us(pa.array(ts * 1_000_000, pa.timestamp("us"))),
        "behavior_id": pa.array(item + 1000, pa.int64()),
        "behavior_text": pa.array([TEXTS[i] for i in item]),
        "label": pa.array((rating > 3).astype(np.int8)), "rating": pa.array(rating, pa.float32()),
        "split": pa.array(["train"] * len(user)),
    }), Workspace.at(root).interactions)


def make_workspace(root: Path, bb: Backbone, rows) -> Path:
    ws = Workspace.at(root)
    write_interactions(root, rows)
    vecs = bb.encode_texts(TEXTS).numpy()
    meta = {FINGERPRINT_METADATA_KEY: bb.fingerprint.to_json()}
    first = pa.array(np.full(N_BEHAVIORS, T0 * 1_000_000), pa.timestamp("us", tz="UTC"))
    write_part(ws.atomic_behavior_embeddings, pa.table({
        "behavior_id": pa.array(np.arange(N_BEHAVIORS) + 1000, pa.int64()),
        "behavior_embedding": embedding_array(vecs), "event_timestamp": first}), metadata=meta)
    write_part(ws.item_embeddings, pa.table({
        "item_id": pa.array(np.arange(N_BEHAVIORS), pa.int64()),
        "item_embedding": embedding_array(vecs), "event_timestamp": first}), metadata=meta)
    ws.claim_fingerprint(bb.fingerprint)
    return root


def make_checkpoint(out: Path, bb: Backbone, tiny_bert_dir: Path, leakage: str = "windowed", seed: int = 0):
    cfg = FinetuneConfig(backbone=BackboneConfig(model=tiny_bert_dir, split_layer=2), context_size=N,
                         leakage=leakage, head_hidden=8, out=out)
    torch.manual_seed(seed)
    model = build_model(cfg, bb, DIM)
    with torch.no_grad():  # non-trivial new parts (the deep layers are the tiny model's own)
        model.distance_bias.table.normal_(0, 1.0)
        model.query.normal_(0, 1.0)
        model.feedback.weight.normal_(0, 1.0)
    save_checkpoint(out, model, cfg, item_dim=DIM)
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory, bert, tiny_bert_dir):
    root = tmp_path_factory.mktemp("embed")
    rows = make_rows()
    ckpt = make_checkpoint(root / "ckpt", bert, tiny_bert_dir)
    iso = make_checkpoint(root / "ckpt_iso", bert, tiny_bert_dir, leakage="isolated")
    ws = make_workspace(root / "ws", bert, rows)
    return {"root": root, "rows": rows, "ckpt": ckpt, "iso": iso, "ws": ws}


def fresh_ws(setup, dest: Path, rows=None) -> Path:
    shutil.copytree(setup["ws"], dest)
    if rows is not None:
        write_interactions(dest, rows)
    return dest


def cfg(setup, ws: Path, **kw) -> EmbedUsersConfig:
    kw.setdefault("every", 1)  # every event time: what these tests compare row by row (the default is 2)
    return EmbedUsersConfig(checkpoint=kw.pop("checkpoint", setup["ckpt"]), data_dir=ws,
                            runtime=RuntimeArgs(device="cpu", num_threads=1), **kw)


@torch.inference_mode()
def reference_u(model, data, user_id: int, stamp_us: int) -> np.ndarray | None:
    """u from the training code path over the user's interactions strictly before ``stamp_us`` (or None)."""
    h = data.hist
    u = int(np.searchsorted(h.user_ids, user_id))
    lo, hi = h.offsets[u], h.offsets[u + 1]
    rows = np.arange(lo, hi)[h.time[lo:hi] < stamp_us]
    if not len(rows):
        return None
    one = UserHistories.from_arrays(
        np.zeros(len(rows) + 1), np.append(h.time[rows], stamp_us), np.append(h.behavior_row[rows], 0),
        np.append(h.item_row[rows], 0), np.append(h.label[rows], 0), np.append(h.feedback[rows], 0),
    )
    targets = np.zeros(len(one), bool)
    targets[-1] = True
    blocks = make_blocks(one, targets, 1, model.context_size)
    batch = BehaviorPacker(one, data.behavior_table, data.item_table)(blocks)
    return model.user_states(batch)[0].numpy()


def as_dict(df: pd.DataFrame) -> dict[tuple[int, int], np.ndarray]:
    ts = df["event_timestamp"].astype("datetime64[us, UTC]").astype("int64").to_numpy()
    rows = zip(df["user_id"], ts, df["user_embedding"])
    return {(int(u), int(t)): np.asarray(v, np.float32) for u, t, v in rows}


# --------------------------------------------------------------------------- semantics
@pytest.mark.parametrize("cadence", ["event", "day", "last"])
def test_rows_hold_only_interactions_strictly_before_their_stamp(setup, tmp_path, cadence):
    ws = fresh_ws(setup, tmp_path / "ws")
    report = embed_users(cfg(setup, ws, cadence=cadence))
    got = as_dict(read_user_embeddings(ws))
    assert report.rows_written == len(got) > 0 and report.exact
    # the stamps mirror user_recent_behaviors (same cadence), minus snapshots with no history
    inter = pq.read_table(Workspace.at(ws).interactions)
    recent = build_recent_behaviors(inter, n=N, cadence="event" if cadence == "last" else cadence).to_pandas()
    recent = recent[recent["recent_behavior_ids"].map(len) > 0]
    if cadence == "last":
        recent = recent.groupby("user_id").tail(1)
    assert set(got) == set(as_dict(recent.assign(user_embedding=[np.zeros(1)] * len(recent))))
    model, _ = load_finetuned(setup["ckpt"])
    data = load_finetune_data(ws, model.backbone.fingerprint)
    for (user, stamp), vec in got.items():
        np.testing.assert_allclose(vec, reference_u(model, data, user, stamp), atol=1e-5, rtol=1e-5)
    meta = file_metadata(list_parts(Workspace.at(ws).user_embeddings)[0])
    digest = ModelFingerprint.from_json(meta[FINGERPRINT_METADATA_KEY]).digest
    assert digest == Workspace.at(ws).read_fingerprint().digest
    assert "weights_sha256" in meta[CHECKPOINT_METADATA_KEY]


def test_every_keeps_the_first_times_then_every_nth_and_the_same_states(setup, tmp_path):
    """--every 3: a subset of the event rows (first 3 interaction times, then every 3rd, + final), same vectors."""
    ws_all, ws_every = fresh_ws(setup, tmp_path / "all"), fresh_ws(setup, tmp_path / "every")
    embed_users(cfg(setup, ws_all))
    report = embed_users(cfg(setup, ws_every, every=3))
    every, full = as_dict(read_user_embeddings(ws_every)), as_dict(read_user_embeddings(ws_all))
    assert report.cadence == "event3" and report.rows_written == len(every)
    assert set(every) < set(full)
    for key, vec in every.items():
        np.testing.assert_allclose(vec, full[key], atol=1e-6)
    # per user: interaction time t (0 = first) is kept iff 1 <= t <= 3 or t % 3 == 0, plus the final row
    inter = pq.read_table(Workspace.at(ws_all).interactions).to_pandas()
    for user, times in inter.groupby("user_id")["event_timestamp"]:
        stamps = sorted(times.astype("datetime64[us, UTC]").astype("int64").unique())
        want = {s for t, s in enumerate(stamps) if 1 <= t <= 3 or (t > 0 and t % 3 == 0)}
        got = {t for (u, t) in every if u == user}
        assert got == want | {stamps[-1] + 1_000_000}, user
    with pytest.raises(ValueError, match="every"):
        embed_users(cfg(setup, ws_every, every=0))


def test_exported_u_is_the_training_path_state_of_each_target(setup, tmp_path):
    """Event row at T = the first interaction j at T: the query state u_j the k = 1 training path computes."""
    ws = fresh_ws(setup, tmp_path / "ws")
    embed_users(cfg(setup, ws))
    got = as_dict(read_user_embeddings(ws))
    model, _ = load_finetuned(setup["ckpt"])
    data = load_finetune_data(ws, model.backbone.fingerprint)
    h = data.hist
    targets = (h.time_start == np.arange(len(h))) & (np.arange(len(h)) != h.user_start)
    blocks = make_blocks(h, targets, 1, N)
    with torch.inference_mode():
        batch = BehaviorPacker(h, data.behavior_table, data.item_table)(blocks)
        u = model.user_states(batch).numpy()
    user = np.repeat(h.user_ids, np.diff(h.offsets))
    rows = batch.target_rows.numpy()
    assert len(rows) == len(got) - len(h.user_ids)  # + one final row per user
    for r, vec in zip(rows, u):
        np.testing.assert_allclose(got[(int(user[r]), int(h.time[r]))], vec, atol=1e-5, rtol=1e-5)


def test_isolated_dti_packing_gives_the_k1_states(setup):
    model, _ = load_finetuned(setup["iso"])
    data = load_finetune_data(setup["ws"], model.backbone.fingerprint)
    ext, final = with_final_queries(data.hist)
    packer = BehaviorPacker(ext, data.behavior_table, data.item_table)
    rows = np.flatnonzero(ext.time_start == np.arange(len(ext)))  # every distinct time + the final queries
    one, c1 = compute_user_states(model, packer, ext, rows, context_size=N, targets_per_sequence=1,
                                  batch_size=7)
    many, c5 = compute_user_states(model, packer, ext, rows, context_size=N, targets_per_sequence=5,
                                   batch_size=7)
    assert c1 == len(rows) and c5 >= len(rows)
    np.testing.assert_allclose(many, one, atol=1e-5, rtol=1e-5)


def test_isolated_export_packs_and_matches_k1(setup, tmp_path):
    a = fresh_ws(setup, tmp_path / "a")
    b = fresh_ws(setup, tmp_path / "b")
    ra = embed_users(cfg(setup, a, checkpoint=setup["iso"]))
    rb = embed_users(cfg(setup, b, checkpoint=setup["iso"], targets_per_sequence=1))
    assert ra.targets_per_sequence == eu.DEFAULT_EXACT_K and rb.targets_per_sequence == 1 and ra.exact
    ga, gb = as_dict(read_user_embeddings(a)), as_dict(read_user_embeddings(b))
    assert ga.keys() == gb.keys()
    for key in ga:
        np.testing.assert_allclose(ga[key], gb[key], atol=1e-5, rtol=1e-5)
    # both are the same serving identity: one may continue the other's directory
    assert file_metadata(list_parts(Workspace.at(a).user_embeddings)[0])[CHECKPOINT_METADATA_KEY] == \
        file_metadata(list_parts(Workspace.at(b).user_embeddings)[0])[CHECKPOINT_METADATA_KEY]


# ------------------------------------------------------------------- incremental, resumable, exclusive
def test_rerun_writes_nothing_and_new_interactions_append_only_affected_users(setup, tmp_path):
    ws = fresh_ws(setup, tmp_path / "ws")
    first = embed_users(cfg(setup, ws, users_per_part=2))
    parts = list_parts(Workspace.at(ws).user_embeddings)
    assert len(parts) == len(first.parts_written) == 3
    again = embed_users(cfg(setup, ws, users_per_part=2))
    assert again.rows_written == 0 and again.parts_written == []
    assert list_parts(Workspace.at(ws).user_embeddings) == parts
    # new, later interactions for users 2 and 4 (one of them a second after the old final row)
    rows = list(setup["rows"])
    last = {u: max(t for uu, _, t, _ in rows if uu == u) for u in (2, 4)}
    rows += [(2, 1, last[2] + 1, 5.0), (2, 3, last[2] + DAY, 2.0), (4, 0, last[4] + 5 * DAY, 4.0)]
    write_interactions(ws, rows)
    third = embed_users(cfg(setup, ws, users_per_part=2))
    assert len(third.parts_written) == 1 and "-u2-4-" in third.parts_written[0]
    new = pq.read_table(Workspace.at(ws).user_embeddings / f"part-{third.parts_written[0]}.parquet")
    assert set(new["user_id"].to_pylist()) == {2, 4}
    # user 2: T=last+1 s existed already as the old final row (same content); new T=last+1 day and final
    assert third.rows_written == 2 + 2
    got = read_user_embeddings(ws)
    assert not got.duplicated(["user_id", "event_timestamp"]).any()
    # every row (old and new) is what a fresh export of the new data gives
    fresh = fresh_ws(setup, tmp_path / "fresh", rows)
    embed_users(cfg(setup, fresh))
    want, have = as_dict(read_user_embeddings(fresh)), as_dict(got)
    assert set(want) <= set(have)
    for key, vec in have.items():
        if key in want:
            np.testing.assert_allclose(vec, want[key], atol=1e-5, rtol=1e-5)
        else:  # the old final rows: still the right history before their stamp
            assert key[1] == (last[key[0]] + 1) * 1_000_000 and key[0] == 4
    assert embed_users(cfg(setup, ws, users_per_part=2)).rows_written == 0
    # an interaction arriving late, before already exported rows: refused, --overwrite recomputes
    write_interactions(ws, rows + [(3, 2, T0 + 10, 4.0)])
    with pytest.raises(LateInteractionsError, match="user 3"):
        embed_users(cfg(setup, ws))
    embed_users(cfg(setup, ws, overwrite=True))
    assert not read_user_embeddings(ws).duplicated(["user_id", "event_timestamp"]).any()


def test_changed_behaviour_text_recomputes_the_users_who_had_it(setup, tmp_path):
    """Issue 16: same interactions, but one behaviour's text (hence id) changed for user 3's rows:
    its exported rows are stale; materialize's check names them and the next run recomputes them."""
    ws = fresh_ws(setup, tmp_path / "ws")
    embed_users(cfg(setup, ws, users_per_part=2))
    assert stale_user_embeddings(ws) == []
    rows = list(setup["rows"])
    first3 = min(i for i, r in enumerate(rows) if r[0] == 3)
    u, b, t, r = rows[first3]
    rows[first3] = (u, (b + 1) % N_BEHAVIORS, t, r)  # another text for that interaction
    write_interactions(ws, rows)
    assert stale_user_embeddings(ws) == [3]
    # materialize serves only current rows: it refuses, and leaves the data dir as it was
    from bad_input import run_bad
    from tests.store_data import copy_repo

    repo = copy_repo(tmp_path / "feast_repo")
    run_bad(["feast", "materialize", "--repo", repo, "--data-dir", ws],
            expect=r"user_embeddings: 1 users' embeddings were computed from interactions that have changed.*"
                   r"Run `llmfeat embed-users` first", unchanged=[ws / "user_embeddings", ws / "canonical"])
    rerun = embed_users(cfg(setup, ws, users_per_part=2))
    assert rerun.rows_written > 0 and stale_user_embeddings(ws) == []
    got = read_user_embeddings(ws)
    assert not got.duplicated(["user_id", "event_timestamp"]).any()
    fresh = fresh_ws(setup, tmp_path / "fresh", rows)
    embed_users(cfg(setup, fresh))
    want, have = as_dict(read_user_embeddings(fresh)), as_dict(got)
    assert set(want) == set(have)
    for key, vec in want.items():
        np.testing.assert_allclose(have[key], vec, atol=1e-5, rtol=1e-5)
    assert embed_users(cfg(setup, ws, users_per_part=2)).rows_written == 0


def test_killed_run_resumes_without_duplicates(setup, tmp_path, monkeypatch):
    ws = fresh_ws(setup, tmp_path / "ws")
    real = eu.write_part
    calls = {"n": 0}

    class Killed(Exception):
        pass

    def write_then_die(*a, **kw):
        if calls["n"] == 1:
            raise Killed
        calls["n"] += 1
        return real(*a, **kw)

    monkeypatch.setattr(eu, "write_part", write_then_die)
    with pytest.raises(Killed):
        embed_users(cfg(setup, ws, users_per_part=2))
    assert len(list_parts(Workspace.at(ws).user_embeddings)) == 1
    monkeypatch.setattr(eu, "write_part", real)
    resumed = embed_users(cfg(setup, ws, users_per_part=2))
    assert len(resumed.parts_written) == 2 and resumed.rows_existing > 0
    got = read_user_embeddings(ws)
    assert not got.duplicated(["user_id", "event_timestamp"]).any()
    clean = fresh_ws(setup, tmp_path / "clean")
    whole = embed_users(cfg(setup, clean, users_per_part=2))
    assert sorted(p.name for p in list_parts(Workspace.at(ws).user_embeddings)) == \
        sorted(f"part-{n}.parquet" for n in whole.parts_written)  # deterministic names
    assert len(got) == whole.rows_written


def test_rows_of_another_checkpoint_are_refused(setup, tmp_path, bert, tiny_bert_dir):
    ws = fresh_ws(setup, tmp_path / "ws")
    embed_users(cfg(setup, ws, cadence="last"))
    other = make_checkpoint(tmp_path / "other", bert, tiny_bert_dir, seed=1)
    with pytest.raises(CheckpointMismatchError, match="--overwrite"):
        embed_users(cfg(setup, ws, checkpoint=other, cadence="last"))
    with pytest.raises(CheckpointMismatchError):  # a different n is a different embedding too
        embed_users(cfg(setup, ws, context_size=N + 1, cadence="last"))
    for other_cadence in ({"cadence": "day"}, {"cadence": "event", "every": 2}):  # nor two cadences mixed
        with pytest.raises(CheckpointMismatchError, match="cadence"):
            embed_users(cfg(setup, ws, **other_cadence))
    r = embed_users(cfg(setup, ws, checkpoint=other, cadence="last", overwrite=True))
    ids = {file_metadata(p)[CHECKPOINT_METADATA_KEY] for p in list_parts(Workspace.at(ws).user_embeddings)}
    assert len(ids) == 1 and r.checkpoint_id in ids.pop()


def test_cli(setup, tmp_path):
    from llm_features.cli import main

    ws = fresh_ws(setup, tmp_path / "ws")
    args = ["embed-users", "--checkpoint", str(setup["ckpt"]), "--data-dir", str(ws), "--cadence", "last",
            "--device", "cpu", "--num-threads", "1"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "user_embeddings: 5 new rows" in res.output
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0 and "0 new rows" in res.output


# --------------------------------------------------------------------------- through Feast
def test_feast_historical_features_see_only_strictly_earlier_interactions(setup, tmp_path):
    from tests.store_data import copy_repo

    from llm_features.store import apply_definitions, open_store

    data = fresh_ws(setup, tmp_path / "data")
    repo = copy_repo(tmp_path / "feast_repo")
    store = open_store(repo, data)
    apply_definitions(store)  # before any user embedding: the placeholder keeps the source readable
    assert (Workspace.at(data).user_embeddings / eu.PLACEHOLDER_PART).exists()
    embed_users(cfg(setup, data))
    assert not (Workspace.at(data).user_embeddings / eu.PLACEHOLDER_PART).exists()

    inter = pq.read_table(Workspace.at(data).interactions).to_pandas()
    entity_df = inter[["user_id", "event_timestamp"]].drop_duplicates().reset_index(drop=True)
    entity_df["event_timestamp"] = pd.to_datetime(entity_df["event_timestamp"], utc=True)
    entity_df["row"] = np.arange(len(entity_df))
    out = store.get_historical_features(
        entity_df=entity_df, features=["user_embeddings:user_embedding"]).to_df().sort_values("row")
    model, _ = load_finetuned(setup["ckpt"])
    ft = load_finetune_data(data, model.backbone.fingerprint)
    missing = 0
    for user, ts, vec in zip(out["user_id"], out["event_timestamp"], out["user_embedding"]):
        t_us = (pd.Timestamp(ts) - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(microseconds=1)
        want = reference_u(model, ft, int(user), t_us)  # the training row at t: history strictly before t
        if want is None:
            missing += 1
            assert vec is None or (isinstance(vec, float) and np.isnan(vec)), (user, ts)
        else:
            np.testing.assert_allclose(np.asarray(vec, np.float32), want, atol=1e-5, rtol=1e-5)
    assert missing == len(ft.hist.user_ids)  # each user's first timestamp has no history
