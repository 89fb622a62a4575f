"""llm_features.events: fresh user embeddings pushed when a user acts (issue 18, item 4).

One tiny workspace (a random 4-layer BERT split at 2, a real `llmfeat encode` and `embed-users`, Feast
apply + materialize) serves every test; each test pushes events for its own users. The reference for
a pushed row is always an actual `embed-users` run over the same history (the base interactions plus
the events, written as ingest writes them).
"""

from __future__ import annotations

import json
import os
import shutil
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from llm_features.backbone import Backbone, BackboneConfig
from llm_features.config import RuntimeArgs
from llm_features.embed_users import EmbedUsersConfig, embed_users, read_user_embeddings
from llm_features.encode import EncodeConfig, encode
from llm_features.errors import UserError
from llm_features.events import EventError, EventProcessor, parse_payload, read_events_file
from llm_features.ids import stable_id
from llm_features.parquet_io import embedding_matrix, list_parts, utc_us, write_table_atomic
from llm_features.recent import build_recent_behaviors, write_recent_behaviors
from llm_features.store import apply_definitions, materialize_all, online_features, open_store
from llm_features.workspace import Workspace
from tests.test_embed_users import DAY, T0, TEXTS, make_checkpoint, make_rows
from tests.store_data import copy_repo

RECENT_N = 4
US = 1_000_000


@pytest.fixture(scope="module")
def bert(tiny_bert_dir):
    return Backbone.load(BackboneConfig(model=tiny_bert_dir, split_layer=2))


def write_canonical(root: Path, rows, extra_items: dict[int, str] | None = None) -> None:
    """interactions.parquet as ingest writes it (sorted by time, user, item; behavior_id = stable_id(text)),
    plus users.parquet and items.parquet with MovieLens' attributes."""
    texts = dict(enumerate(TEXTS)) | (extra_items or {})
    rows = sorted(rows, key=lambda r: (r[2], r[0], r[1]))
    user, item, ts, rating = (np.array(c) for c in zip(*rows))
    ws = Workspace.at(root)
    write_table_atomic(pa.table({
        "user_id": pa.array(user, pa.int64()), "item_id": pa.array(item, pa.int64()),
        "event_timestamp": utc_us(pa.array(ts * US, pa.timestamp("us"))),
        "behavior_id": pa.array([stable_id(texts[i]) for i in item], pa.int64()),
        "behavior_text": pa.array([texts[i] for i in item]),
        "label": pa.array((rating > 3).astype(np.int8)), "rating": pa.array(rating, pa.float32()),
        "split": pa.array(["train"] * len(user)),
    }), ws.interactions)
    ids = sorted(texts)
    write_table_atomic(pa.table({
        "item_id": pa.array(ids, pa.int64()), "item_text": [texts[i] for i in ids],
        "title": [texts[i] for i in ids], "item_genres": pa.array([[f"g{i % 3}"] for i in ids]),
        "event_timestamp": utc_us(pa.array([T0 * US] * len(ids), pa.timestamp("us"))),
    }), ws.items)
    users = sorted(set(user.tolist()))
    write_table_atomic(pa.table({
        "user_id": pa.array(users, pa.int64()), "gender": ["MF"[u % 2] for u in users],
        "age": pa.array([18 + u for u in users], pa.int64()), "occupation": pa.array(users, pa.int64()),
        "zip": [f"{u:05d}" for u in users],
        "event_timestamp": utc_us(pa.array([T0 * US] * len(users), pa.timestamp("us"))),
    }), ws.users)


def embed(ckpt: Path, ws: Path, cadence: str = "event", overwrite: bool = False) -> None:
    embed_users(EmbedUsersConfig(checkpoint=ckpt, data_dir=ws, cadence=cadence, every=1,
                                 runtime=RuntimeArgs(device="cpu", num_threads=1), overwrite=overwrite))


def run_encode(ws: Path, bert) -> None:
    encode(EncodeConfig(data_dir=ws, progress=False, runtime=RuntimeArgs(num_threads=1)), backbone=bert)


@pytest.fixture(scope="module")
def base(tmp_path_factory, bert, tiny_bert_dir):
    """A data dir after ingest, encode and embed-users (no Feast yet), and its checkpoint."""
    root = tmp_path_factory.mktemp("events")
    rows = make_rows(users=6)
    ws = root / "ws"
    write_canonical(ws, rows)
    run_encode(ws, bert)
    write_recent_behaviors(Workspace.at(ws), n=RECENT_N)
    ckpt = make_checkpoint(root / "ckpt", bert, tiny_bert_dir)
    embed(ckpt, ws)
    return {"ws": ws, "rows": rows, "ckpt": ckpt, "bert": bert}


@pytest.fixture(scope="module")
def served(base, tmp_path_factory):
    """A copy of the base data dir applied and materialised, with an event processor over it."""
    root = tmp_path_factory.mktemp("served")
    ws = Path(shutil.copytree(base["ws"], root / "ws"))
    repo = copy_repo(root / "feast_repo")
    store = open_store(repo, ws)
    apply_definitions(store)
    materialize_all(store)
    proc = EventProcessor(data_dir=ws, checkpoint=base["ckpt"], repo=repo, num_threads=1)
    return {"ws": ws, "repo": repo, "proc": proc, "store": proc.store}


def last_time(rows, user: int) -> int:
    return max(t for u, _, t, _ in rows if u == user)


def event(user: int, item: int, t: int, rating: float, **kw) -> dict:
    return {"user_id": user, "item_id": item, "timestamp": pd.Timestamp(t, unit="s", tz="UTC").isoformat(),
            "label": int(rating > 3), "rating": rating, **kw}


def iso(us: int) -> str:
    return pd.Timestamp(us, unit="us", tz="UTC").isoformat().replace("+00:00", "Z")


def batch_reference(base, tmp: Path, events: list[dict], extra_items: dict[int, str] | None = None,
                    ckpt: Path | None = None):
    """`embed-users` (and ingest's recent table) over the base interactions plus ``events``."""
    ws = Path(shutil.copytree(base["ws"], tmp))
    new = [(e["user_id"], e["item_id"], int(pd.Timestamp(e["timestamp"]).timestamp()), e["rating"])
           for e in events]
    write_canonical(ws, list(base["rows"]) + new, extra_items)
    if extra_items:  # embed-users needs every behaviour encoded: the new item's text too
        run_encode(ws, base["bert"])
    if ckpt is None:
        embed(base["ckpt"], ws)
    else:
        embed(ckpt, ws, "last", overwrite=True)
    inter = pq.read_table(Workspace.at(ws).interactions)
    return read_user_embeddings(ws), build_recent_behaviors(inter, n=RECENT_N).to_pandas()


def row_at(df: pd.DataFrame, user: int, stamp_us: int, column: str):
    ts = df["event_timestamp"].astype("datetime64[us, UTC]").astype("int64")
    hit = df[(df["user_id"] == user) & (ts == stamp_us)]
    assert len(hit) == 1, (user, stamp_us, len(hit))
    return hit.iloc[0][column]


def user_vector(df: pd.DataFrame, user: int, stamp_us: int) -> np.ndarray:
    return np.asarray(row_at(df, user, stamp_us, "user_embedding"), np.float32)


def pushed_rows(ws: Path, view: str) -> pd.DataFrame:
    parts = [p for p in list_parts(getattr(Workspace.at(ws), view)) if p.name.startswith("part-push-")]
    return pa.concat_tables([pq.read_table(p) for p in parts]).to_pandas()


# --------------------------------------------------------------------------------------- the floor
def test_pushed_embedding_equals_embed_users_and_is_online_at_once(base, served, tmp_path):
    proc, ws = served["proc"], served["ws"]
    t = last_time(base["rows"], 2)
    events = [event(2, 3, t + 100, 5.0), event(2, 5, t + 200, 2.0), event(2, 1, t + 200, 4.0)]  # and a tie
    out = proc.handle_events({"events": events})
    stamp = (t + 200) * US + US
    assert out["users_updated"] == [2] and out["items_encoded"] == [] and out["events"] == 3
    assert out["event_timestamps"] == {"2": iso(stamp)}
    json.dumps(out)  # JSON-able as it is

    want_users, want_recent = batch_reference(base, tmp_path / "batch", events)
    want = user_vector(want_users, 2, stamp)
    # offline: the row embed-users writes for the same history, at the same stamp
    np.testing.assert_allclose(user_vector(read_user_embeddings(ws), 2, stamp), want, atol=1e-5, rtol=1e-5)
    assert not np.allclose(want, user_vector(read_user_embeddings(ws), 2, (t + 1) * US), atol=1e-3)
    # online, right after the call
    feats = online_features(served["store"], 2, [0, 1])
    np.testing.assert_allclose(feats.values["user_embedding"][0], want, atol=1e-5, rtol=1e-5)
    # the recent list ingest writes for the same history, offline and online
    for column in ("recent_item_ids", "recent_behavior_ids", "recent_labels"):
        expect = list(row_at(want_recent, 2, stamp, column))
        assert list(row_at(pushed_rows(ws, "user_recent_behaviors"), 2, stamp, column)) == expect, column
        if column != "recent_behavior_ids":  # not in the ranker's feature service
            assert list(feats.values[column][0]) == expect, column


def test_point_in_time_read_sees_the_pushed_row_only_from_its_stamp(base, served):
    proc, store, ws = served["proc"], served["store"], served["ws"]
    t = last_time(base["rows"], 3)
    old = user_vector(read_user_embeddings(ws), 3, (t + 1) * US)
    proc.process([event(3, 6, t + DAY, 5.0)])
    stamp = pd.Timestamp((t + DAY + 1) * US, unit="us", tz="UTC")
    new = user_vector(read_user_embeddings(ws), 3, stamp.value // 1000)
    times = [stamp - timedelta(seconds=1), stamp - timedelta(microseconds=1), stamp,
             stamp + timedelta(hours=1)]
    entity = pd.DataFrame({"user_id": [3] * 4, "event_timestamp": times, "row": range(4)})
    features = ["user_embeddings:user_embedding", "user_recent_behaviors:recent_item_ids"]
    out = store.get_historical_features(entity_df=entity, features=features).to_df().sort_values("row")
    vecs = [np.asarray(v, np.float32) for v in out["user_embedding"]]
    for v in vecs[:2]:
        np.testing.assert_array_equal(v, old)  # before the stamp: the row that was there
    for v in vecs[2:]:
        np.testing.assert_array_equal(v, new)  # from the stamp on: the pushed row
    recent = [list(v) for v in out["recent_item_ids"]]
    assert recent[0] == recent[1] and recent[2] == recent[3] == (recent[1] + [6])[-RECENT_N:]
    # a later full materialisation keeps the pushed row online (it is the newest offline row)
    materialize_all(store)
    np.testing.assert_array_equal(online_features(store, 3, [0]).values["user_embedding"][0], new)
    # and embed-users runs on as before: the canonical table has no new interaction, nothing to do
    embed(base["ckpt"], ws)


def test_ranker_score_changes_after_an_event(base, served, tmp_path):
    from ranker.config import ModelConfig, TrainConfig
    from ranker.serve import Ranker
    from tests.synthetic_rows import SyntheticFeatureSource, synthetic_rows
    from ranker.train import train

    torch.manual_seed(0)
    rows = synthetic_rows(n_users=20, n_items=10, n_rows=400, dim=32, signal=6.0, seed=0)
    cfg = TrainConfig(model=ModelConfig(llm_features=True, llm_mode="interaction"), out=tmp_path / "ranker",
                      epochs=1, batch_size=64, lr=3e-3, seed=0, threads=1)
    train(cfg, entities=rows, source=SyntheticFeatureSource(rows))
    ranker = Ranker.load(cfg.out, store=served["store"])
    items = list(range(7))
    before = ranker.score(4, items)
    assert ranker.user_known
    served["proc"].process([event(4, 2, last_time(base["rows"], 4) + 60, 1.0)])
    after = ranker.score(4, items)
    assert before.shape == after.shape == (7,) and np.isfinite(after).all()
    assert np.abs(after - before).max() > 1e-6, (before, after)


def test_http_events_update_the_served_score(base, tmp_path, monkeypatch):
    """POST /events of `llmfeat serve` runs the EventProcessor: the user's next /score differs, a bad
    event is a 422 naming the field, and nothing needs a materialisation in between. (Its own copy
    of the data dir: the module's `served` copy is the other tests'.)"""
    from ranker.config import ModelConfig, ServeConfig, TrainConfig
    from ranker.serve import Ranker
    from ranker.service import TOKEN_ENV, create_app
    from tests.synthetic_rows import SyntheticFeatureSource, synthetic_rows
    from ranker.train import train
    from tests.serving_helpers import LiveServer

    torch.manual_seed(0)
    rows = synthetic_rows(n_users=20, n_items=10, n_rows=400, dim=32, signal=6.0, seed=0)
    tcfg = TrainConfig(model=ModelConfig(llm_features=True, llm_mode="interaction"), out=tmp_path / "ranker",
                       epochs=1, batch_size=64, lr=3e-3, seed=0, threads=1)
    train(tcfg, entities=rows, source=SyntheticFeatureSource(rows))
    ws = Path(shutil.copytree(base["ws"], tmp_path / "ws"))
    repo = copy_repo(tmp_path / "feast_repo")
    store = open_store(repo, ws)
    apply_definitions(store)
    materialize_all(store)
    monkeypatch.setenv(TOKEN_ENV, "s3cret")
    cfg = ServeConfig(ranker=tcfg.out, repo=repo, data_dir=ws, finetune=base["ckpt"], enable_events=True)
    ranker = Ranker.load(tcfg.out, repo=repo, data_dir=ws)
    auth = {"Authorization": "Bearer s3cret"}
    with LiveServer(create_app(cfg, ranker=ranker)) as live:
        request = {"user_id": 5, "item_ids": list(range(7))}
        status, _, before = live.call("POST", "/score", request)
        assert status == 200
        t = last_time(base["rows"], 5) + 120
        status, _, result = live.call("POST", "/events", {"events": [event(5, 3, t, 1.0)]}, auth)
        assert status == 200 and result["users_updated"] == [5], result
        status, _, after = live.call("POST", "/score", request)
        assert status == 200
        assert np.abs(np.subtract(after["scores"], before["scores"])).max() > 1e-6, (before, after)
        status, _, body = live.call("POST", "/events", {"events": [{"user_id": 5, "item_id": 3}]}, auth)
        assert status == 422 and "timestamp" in body["error"], body
        assert live.call("POST", "/events", {"events": []}, {"Authorization": "Bearer nope"})[0] == 401


def test_unseen_item_is_encoded_through_the_shallow_layers_like_llmfeat_encode(base, served, tmp_path):
    proc, ws, store = served["proc"], served["ws"], served["store"]
    text = "Brand New Movie (2001) | Drama"
    bid = stable_id(text)
    t = last_time(base["rows"], 5)
    events = [event(5, 100, t + 30, 5.0, item_text=text)]
    out = proc.handle_events({"events": events})
    assert out["items_encoded"] == [100] and out["behaviors_encoded"] == [bid] and out["users_updated"] == [5]
    # the reference: `llmfeat encode` over a data dir whose items (and a log row) hold the same text
    ref = Path(shutil.copytree(base["ws"], tmp_path / "ref"))
    write_canonical(ref, list(base["rows"]) + [(6, 100, t + 30, 5.0)], {100: text})
    run_encode(ref, base["bert"])

    def vector(root: Path, view: str, key: str, value: int) -> np.ndarray:
        parts = list_parts(getattr(Workspace.at(root), view))
        table = pa.concat_tables([pq.read_table(p) for p in parts], promote_options="default")
        table = table.filter(pc.equal(table[key], value))
        assert table.num_rows == 1, (view, value, table.num_rows)
        column = "behavior_embedding" if key == "behavior_id" else "item_embedding"
        return embedding_matrix(table[column])[0]

    want = vector(ref, "atomic_behavior_embeddings", "behavior_id", bid)
    np.testing.assert_allclose(vector(ws, "atomic_behavior_embeddings", "behavior_id", bid), want, atol=1e-6)
    np.testing.assert_allclose(vector(ws, "item_embeddings", "item_id", 100), want, atol=1e-6)
    np.testing.assert_allclose(online_features(store, 5, [100]).values["item_embedding"][0], want, atol=1e-6)
    online = store.get_online_features(features=["atomic_behavior_embeddings:behavior_embedding"],
                                       entity_rows=[{"behavior_id": bid}]).to_dict()
    np.testing.assert_allclose(np.asarray(online["behavior_embedding"][0], np.float32), want, atol=1e-6)
    # the user's new embedding read the new behaviour: embed-users over the same history agrees
    want_users, _ = batch_reference(base, tmp_path / "batch", events, {100: text})
    np.testing.assert_allclose(online_features(store, 5, [100]).values["user_embedding"][0],
                               user_vector(want_users, 5, (t + 31) * US), atol=1e-5)
    # now known: another user's event needs no text, and nothing is encoded again
    again = proc.process([event(6, 100, last_time(base["rows"], 6) + 30, 4.0)])
    assert again.items_encoded == [] and again.behaviors_encoded == []


def test_a_second_processor_continues_from_the_first(base, served, tmp_path):
    """The events log: a processor started later (or another worker) sees the events pushed before, and a
    running one picks up another's events before its next push."""
    first = served["proc"]
    t = last_time(base["rows"], 1)
    e1, e2, e3 = event(1, 4, t + 10, 5.0), event(1, 0, t + 20, 1.0), event(1, 2, t + 30, 3.0)
    first.process([e1])
    second = EventProcessor(data_dir=served["ws"], checkpoint=base["ckpt"], repo=served["repo"])
    second.process([e2])
    for watch in first._watch.values():  # coarse file times: directories written to can keep their mtime
        if watch.mtime is not None:
            os.utime(watch.directory, ns=(watch.mtime, watch.mtime))
    with pytest.raises(EventError, match="not after the user's latest interaction"):
        first.process([event(1, 6, t + 15, 5.0)])  # the first saw the second's event at t + 20
    first.process([e3])
    want, _ = batch_reference(base, tmp_path / "batch", [e1, e2, e3])
    np.testing.assert_allclose(online_features(served["store"], 1, [0]).values["user_embedding"][0],
                               user_vector(want, 1, (t + 31) * US), atol=1e-5)


def test_token_level_checkpoint_pushes_what_embed_users_exports(base, tmp_path, tiny_bert_dir):
    """Token granularity: the deep layers read the behaviour texts themselves (a new item's too)."""
    from llm_features.finetune import FinetuneConfig
    from llm_features.finetune.checkpoint import build_model, save_checkpoint

    cfg = FinetuneConfig(backbone=BackboneConfig(model=tiny_bert_dir, split_layer=2), context_size=3,
                         granularity="token", head_hidden=8, out=tmp_path / "token")
    torch.manual_seed(1)
    model = build_model(cfg, base["bert"], 32)
    with torch.no_grad():
        model.query.normal_(0, 1.0)
        model.distance_bias.table.normal_(0, 1.0)
    save_checkpoint(cfg.out, model, cfg, item_dim=32)
    ws = Path(shutil.copytree(base["ws"], tmp_path / "ws"))
    embed(cfg.out, ws, "last", overwrite=True)
    repo = copy_repo(tmp_path / "feast_repo")
    store = open_store(repo, ws)
    apply_definitions(store)
    proc = EventProcessor(data_dir=ws, checkpoint=cfg.out, repo=repo, store=store)
    assert proc.ft.granularity == "token"
    t, text = last_time(base["rows"], 2), "A Token Movie (2002) | Comedy"
    events = [event(2, 3, t + 100, 5.0), event(2, 100, t + 200, 2.0, item_text=text)]
    proc.process(events)
    want, _ = batch_reference(base, tmp_path / "batch", events, {100: text}, ckpt=cfg.out)
    stamp = (t + 201) * US
    np.testing.assert_allclose(user_vector(read_user_embeddings(ws), 2, stamp), user_vector(want, 2, stamp),
                               atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------- bad input
def _tree(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")
            if p.is_file() and p.name != ".llmfeat.lock"}


def _one(**kw) -> dict:
    return {"events": [{"user_id": 1, "item_id": 1, "timestamp": 978300000, "label": 1, **kw}]}


@pytest.mark.parametrize("payload, message", [
    ([1], r"request body must be a JSON object"),
    ({"evts": []}, r"unknown request field\(s\) 'evts'"),
    ({"events": {"user_id": 1}}, r"'events' must be a list"),
    ({"events": [7]}, r"^event 1: must be an object"),
    (_one(colour="red"), r"^event 1: unknown field\(s\) 'colour'. Use only user_id, item_id, timestamp"),
    (_one(label=None), r"^event 1, column 'label': missing"),
    (_one(user_id="1"), r"^event 1, column 'user_id': must be an integer, got str"),
    (_one(item_id=1.5), r"column 'item_id': must be an integer, got float"),
    (_one(label=2), r"'label': must be 0 or 1"),
    (_one(timestamp="yesterday"), r"'timestamp': not an ISO-8601 time or epoch seconds \('yesterday'\)"),
    (_one(timestamp=978300000000), r"\(milliseconds\?\)"),
    (_one(timestamp="2999-01-01T00:00:00Z"), r"in the future"),
    (_one(rating="high"), r"'rating': must be a finite number"),
])
def test_malformed_requests_are_refused_with_the_event_and_field(payload, message):
    with pytest.raises(EventError, match=message) as info:
        parse_payload(payload)
    assert isinstance(info.value, ValueError)


def test_events_that_cannot_apply_are_refused_and_nothing_is_written(base, served):
    proc, ws, store = served["proc"], served["ws"], served["store"]
    t = last_time(base["rows"], 6)
    online_before = online_features(store, 6, [0]).values["user_embedding"].copy()
    tree = _tree(ws)
    good = event(6, 1, t + 10_000, 5.0)
    cases = [
        ([good, event(6, 2, t - 10, 5.0)],
         r"^event 2, column 'timestamp': user 6's event at .* is not after the user's latest interaction"),
        ([good, event(6, 999, t + 20_000, 5.0)],
         r"^event 2, column 'item_id': item 999 is unknown .* has no item_text\. Give the item's text"),
        ([event(6, 3, t + 20_000, 5.0, item_text="Another title")],
         r"^event 1, column 'item_text': item 3 already has the text"),
        ([good, dict(good)], r"^event 2: repeats an earlier event of this request"),
        ([good, {**good, "label": 3}], r"^event 2, column 'label'"),
    ]
    for events, message in cases:
        with pytest.raises(EventError, match=message):
            proc.handle_events({"events": events})
    assert _tree(ws) == tree, "a refused request wrote something"
    np.testing.assert_array_equal(online_features(store, 6, [0]).values["user_embedding"], online_before)


def test_processor_refuses_a_data_dir_it_cannot_continue(base, tmp_path):
    ws = Path(shutil.copytree(base["ws"], tmp_path / "ws"))
    repo = copy_repo(tmp_path / "feast_repo")
    with pytest.raises(UserError, match="the data dir has no Feast registry"):  # never applied
        EventProcessor(data_dir=ws, checkpoint=base["ckpt"], repo=repo)
    for p in list_parts(Workspace.at(ws).user_embeddings):
        p.unlink()
    with pytest.raises(UserError, match=r"user_embeddings: has no user embeddings yet.*embed-users"):
        EventProcessor(data_dir=ws, checkpoint=base["ckpt"], repo=repo)


# --------------------------------------------------------------------------------------- the CLI
def test_cli_push_events(base, served, tmp_path):
    from llm_features.cli import main

    later = {u: last_time(base["rows"], u) + 10 * DAY for u in (2, 3)}  # after the other tests' events
    good = tmp_path / "events.jsonl"
    lines = [json.dumps(e) for e in (event(2, 0, later[2], 5.0), event(3, 1, later[3], 2.0))]
    good.write_text("\n".join(lines) + "\n")
    args = ["push-events", "--data-dir", str(served["ws"]), "--repo", str(served["repo"]),
            "--checkpoint", str(base["ckpt"]), "--num-threads", "1"]
    res = CliRunner().invoke(main, [*args, "--events", str(good)])
    assert res.exit_code == 0, res.output
    assert "2 events, 2 users updated" in res.output
    bad = tmp_path / "events.csv"
    bad.write_text("user_id,item_id,timestamp,label\n2,1,2001-06-01T00:00:00Z,1\n2,1,2001-06-02T00:00:00Z,yes\n")
    tree = _tree(served["ws"])
    res = CliRunner().invoke(main, [*args, "--events", str(bad)])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert f"{bad}, line 3, column 'label': not an integer ('yes')" in res.output
    assert _tree(served["ws"]) == tree
    events = read_events_file(good)
    assert [(e.user_id, e.item_id, e.label, e.index) for e in events] == [(2, 0, 1, 1), (3, 1, 0, 2)]
