"""The encode stage: distinct texts once, incremental, resumable, fingerprinted."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import llm_features.encode as encode_mod
from llm_features.backbone import Backbone
from llm_features.config import config_from_options
from llm_features.encode import EncodeConfig, encode
from llm_features.fingerprint import FINGERPRINT_METADATA_KEY, FingerprintMismatchError, ModelFingerprint
from llm_features.ids import stable_id
from llm_features.parquet_io import embedding_matrix, file_metadata, list_parts, read_parts
from llm_features.workspace import Workspace

T0 = datetime(2000, 5, 1, tzinfo=timezone.utc)
ITEMS = {
    1: "Toy Story (1995) | Animation, Children's, Comedy",
    2: "Heat (1995) | Action, Crime, Thriller",
    3: "Sabrina (1995) | Comedy, Romance",
    4: "GoldenEye (1995) | Action, Adventure, Thriller",
    5: "Casino (1995) | Drama, Thriller",
    6: "Casino  (1995) | Drama,  Thriller",  # same text as 5 once normalised
    7: "Never Watched (1999) | Documentary",  # an item nobody interacted with
}
# (user, item, minutes after T0)
EVENTS = [(1, 1, 0), (1, 2, 1), (2, 1, 2), (2, 3, 3), (3, 1, 4), (3, 2, 5), (1, 4, 6), (2, 5, 7), (3, 6, 8),
          (1, 3, 9), (2, 2, 10), (3, 4, 11)]


def write_canonical(root: Path, events=EVENTS, items=ITEMS) -> Workspace:
    """Small canonical tables with the SPEC columns (what `llmfeat ingest` writes)."""
    ws = Workspace.at(root)
    ws.canonical.mkdir(parents=True, exist_ok=True)
    texts = [items[i] for _, i, _ in events]
    ts = [T0 + timedelta(minutes=m) for *_, m in events]
    pq.write_table(pa.table({
        "user_id": pa.array([u for u, *_ in events], pa.int64()),
        "item_id": pa.array([i for _, i, _ in events], pa.int64()),
        "event_timestamp": pa.array(ts, pa.timestamp("us", tz="UTC")),
        "behavior_id": pa.array([stable_id(t) for t in texts], pa.int64()),
        "behavior_text": pa.array(texts, pa.string()),
        "label": pa.array([1] * len(events), pa.int8()),
        "rating": pa.array([4.0] * len(events), pa.float32()),
        "split": pa.array(["train"] * len(events), pa.string()),
    }), ws.interactions)
    first = {}
    for (_, i, _), t in zip(events, ts):
        first.setdefault(i, t)
    pq.write_table(pa.table({
        "item_id": pa.array(list(items), pa.int64()),
        "item_text": pa.array(list(items.values()), pa.string()),
        "event_timestamp": pa.array([first.get(i, T0) for i in items], pa.timestamp("us", tz="UTC")),
    }), ws.items)
    return ws


def cfg_for(model: Path, root: Path, **kw) -> EncodeConfig:
    """Options by name, the backbone's among them (``split_layer=1``)."""
    return config_from_options(EncodeConfig, model=model, data_dir=root, progress=False, batch_size=4, **kw)


def table_of(directory: Path, key: str, vec: str) -> dict[int, np.ndarray]:
    t = read_parts(directory)
    ids = t[key].to_pylist()
    assert len(ids) == len(set(ids)), f"duplicate {key} in {directory}"
    return dict(zip(ids, embedding_matrix(t[vec])))


def test_encode_writes_each_distinct_text_once(tiny_bert_dir, tmp_path):
    ws = write_canonical(tmp_path)
    cfg = cfg_for(tiny_bert_dir, tmp_path)
    stats = encode(cfg)

    behavior_texts = {stable_id(ITEMS[i]): ITEMS[i] for _, i, _ in EVENTS}
    assert stats.occurrences == len(EVENTS)
    assert stats.distinct_behaviors == len(behavior_texts) == 5
    assert stats.dedup_ratio == pytest.approx(len(EVENTS) / 5)
    assert stats.distinct_items == 7 and stats.shared_item_texts == 5
    assert stats.distinct_texts == stats.texts_encoded == 6  # 5 behaviour texts + the never-watched item
    assert stats.already_encoded == 0 and 0 < stats.padding_efficiency <= 1

    bb = Backbone.load(cfg.backbone)
    behaviors = table_of(ws.atomic_behavior_embeddings, "behavior_id", "behavior_embedding")
    assert set(behaviors) == set(behavior_texts)
    keys = sorted(behavior_texts)
    want = bb.encode_texts([behavior_texts[k] for k in keys]).numpy()
    np.testing.assert_allclose(np.stack([behaviors[k] for k in keys]), want, atol=1e-5)

    items = table_of(ws.item_embeddings, "item_id", "item_embedding")
    assert set(items) == set(ITEMS)
    np.testing.assert_array_equal(items[5], items[6])
    np.testing.assert_array_equal(items[1], behaviors[stable_id(ITEMS[1])])
    np.testing.assert_allclose(items[7], bb.encode_texts([ITEMS[7]])[0].numpy(), atol=1e-5)

    # timestamps: first time seen; the never-watched item keeps its items.parquet timestamp
    bt = read_parts(ws.atomic_behavior_embeddings)
    first = dict(zip(bt["behavior_id"].to_pylist(), bt["event_timestamp"].to_pylist()))
    assert first[stable_id(ITEMS[2])] == T0 + timedelta(minutes=1)
    assert first[stable_id(ITEMS[5])] == T0 + timedelta(minutes=7)
    assert bt.schema.field("event_timestamp").type == pa.timestamp("us", tz="UTC")
    assert bt.schema.field("behavior_embedding").type == pa.list_(pa.float32())
    it = read_parts(ws.item_embeddings)
    its = dict(zip(it["item_id"].to_pylist(), it["event_timestamp"].to_pylist()))
    assert its[6] == T0 + timedelta(minutes=8) and its[7] == T0

    # fingerprint everywhere
    for part in list_parts(ws.atomic_behavior_embeddings) + list_parts(ws.item_embeddings):
        assert ModelFingerprint.from_json(file_metadata(part)[FINGERPRINT_METADATA_KEY]) == bb.fingerprint
    assert ws.read_fingerprint() == bb.fingerprint
    report = json.loads((tmp_path / "encode_report.json").read_text())
    assert report["dedup_ratio"] == pytest.approx(stats.dedup_ratio)
    assert report["fingerprint"] == bb.fingerprint.digest


def test_incremental_skips_encoded_texts(tiny_bert_dir, tmp_path):
    ws = write_canonical(tmp_path)
    cfg = cfg_for(tiny_bert_dir, tmp_path)
    encode(cfg)
    n_parts = len(list_parts(ws.atomic_behavior_embeddings)) + len(list_parts(ws.item_embeddings))

    again = encode(cfg)
    assert again.texts_encoded == 0 and again.parts_written == 0 and again.already_encoded == 6

    # new day: one new behaviour text (a new item) arrives
    items = {**ITEMS, 8: "Jumanji (1995) | Adventure, Children's, Fantasy"}
    write_canonical(tmp_path, EVENTS + [(1, 8, 60), (2, 8, 61)], items)
    more = encode(cfg)
    assert more.texts_encoded == 1 and more.behavior_rows_written == 1 and more.item_rows_written == 1
    assert len(list_parts(ws.atomic_behavior_embeddings)) + len(list_parts(ws.item_embeddings)) == n_parts + 2
    assert len(table_of(ws.atomic_behavior_embeddings, "behavior_id", "behavior_embedding")) == 6
    assert len(table_of(ws.item_embeddings, "item_id", "item_embedding")) == 8


def test_killed_run_resumes_without_duplicates(tiny_bert_dir, tmp_path):
    clean = tmp_path / "clean"
    write_canonical(clean)
    encode(cfg_for(tiny_bert_dir, clean, part_size=2))

    ws = write_canonical(tmp_path / "killed")
    cfg = cfg_for(tiny_bert_dir, ws.root, part_size=2)

    class Killed(Exception):
        pass

    def kill_after_first_chunk(path: Path) -> None:
        if len(list_parts(ws.atomic_behavior_embeddings)) >= 1 and "item" in path.name:
            raise Killed

    with pytest.raises(Killed):
        encode(cfg, on_part=kill_after_first_chunk)
    assert len(list_parts(ws.atomic_behavior_embeddings)) == 1
    assert not list((ws.root / ".atomic_behavior_embeddings.staging").glob("*.parquet"))

    resumed = encode(cfg)
    assert resumed.already_encoded == 2 and resumed.texts_encoded == 4
    for key, vec, d in [("behavior_id", "behavior_embedding", "atomic_behavior_embeddings"),
                        ("item_id", "item_embedding", "item_embeddings")]:
        got, want = table_of(ws.root / d, key, vec), table_of(clean / d, key, vec)
        assert got.keys() == want.keys()
        for k in want:
            np.testing.assert_allclose(got[k], want[k], atol=1e-5)
    # the first chunk is the same in both runs, so its part has the same deterministic name
    first = list_parts(ws.atomic_behavior_embeddings)
    clean_names = {p.name for p in list_parts(clean / "atomic_behavior_embeddings")}
    assert len(first) == 3 and {p.name for p in first} & clean_names


def test_killed_between_behavior_and_item_part_reuses_vectors(tiny_bert_dir, tmp_path, monkeypatch):
    ws = write_canonical(tmp_path)
    cfg = cfg_for(tiny_bert_dir, tmp_path)
    real_write_part = encode_mod.write_part

    def dies_on_items(directory, table, **kw):
        if Path(directory) == ws.item_embeddings:
            raise KeyboardInterrupt
        return real_write_part(directory, table, **kw)

    monkeypatch.setattr(encode_mod, "write_part", dies_on_items)
    with pytest.raises(KeyboardInterrupt):
        encode(cfg)
    monkeypatch.setattr(encode_mod, "write_part", real_write_part)
    assert not list_parts(ws.item_embeddings)

    resumed = encode(cfg)
    # only the never-watched item's text is new; the other items take their behaviour vectors
    assert resumed.texts_encoded == 1 and resumed.item_rows_written == 7
    items = table_of(ws.item_embeddings, "item_id", "item_embedding")
    behaviors = table_of(ws.atomic_behavior_embeddings, "behavior_id", "behavior_embedding")
    np.testing.assert_array_equal(items[3], behaviors[stable_id(ITEMS[3])])


def test_mixing_models_is_an_error(tiny_bert_dir, tmp_path):
    write_canonical(tmp_path)
    encode(cfg_for(tiny_bert_dir, tmp_path))
    with pytest.raises(FingerprintMismatchError):
        encode(cfg_for(tiny_bert_dir, tmp_path, split_layer=1))
    # parts of another model without a manifest are refused too
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(FingerprintMismatchError, match="part-"):
        encode(cfg_for(tiny_bert_dir, tmp_path, split_layer=1))


def test_decoder_last_pooling(tiny_qwen2_dir, tmp_path):
    ws = write_canonical(tmp_path)
    stats = encode(cfg_for(tiny_qwen2_dir, tmp_path, pooling="last"))
    assert stats.texts_encoded == 6
    assert ws.read_fingerprint().pooling == "last"
    vecs = table_of(ws.atomic_behavior_embeddings, "behavior_id", "behavior_embedding")
    assert all(np.isfinite(v).all() and v.shape == (32,) for v in vecs.values())


def test_bad_behavior_id_is_reported(tiny_bert_dir, tmp_path):
    ws = write_canonical(tmp_path)
    t = pq.read_table(ws.interactions)
    t = t.set_column(3, "behavior_id", pa.array([42] * t.num_rows, pa.int64()))
    pq.write_table(t, ws.interactions)
    with pytest.raises(ValueError, match="behavior_id 42"):
        encode(cfg_for(tiny_bert_dir, tmp_path))


def test_missing_canonical_tables(tiny_bert_dir, tmp_path):
    with pytest.raises(ValueError, match="llmfeat ingest"):  # a UserError
        encode(cfg_for(tiny_bert_dir, tmp_path))


def test_cli(tiny_bert_dir, tmp_path):
    from llm_features.cli import main

    write_canonical(tmp_path)
    res = CliRunner().invoke(main, ["encode", "--model", str(tiny_bert_dir), "--data-dir", str(tmp_path),
                                    "--no-progress", "--batch-size", "2", "--num-threads", "1"])
    assert res.exit_code == 0, res.output
    assert "dedup ratio 2.4x" in res.output
    assert len(read_parts(tmp_path / "item_embeddings")) == 7


def test_changed_item_text_is_reencoded_and_the_old_vector_dropped(tiny_bert_dir, tmp_path):
    """Issue 16: an item whose text changes keeps no vector of its old text."""
    write_canonical(tmp_path)
    cfg = cfg_for(tiny_bert_dir, tmp_path)
    encode(cfg)
    before = table_of(tmp_path / "item_embeddings", "item_id", "item_embedding")
    changed = {**ITEMS, 2: "Heat (1995) | Action, Crime, Thriller, Drama", 7: "A Documentary (1999) | Documentary"}
    write_canonical(tmp_path, items=changed)
    stats = encode(cfg)
    assert stats.stale_items == 2 and stats.item_rows_written == 2
    after = table_of(tmp_path / "item_embeddings", "item_id", "item_embedding")  # no duplicate item_id
    assert set(after) == set(ITEMS)
    bb = Backbone.load(cfg.backbone)
    fresh = bb.encode_texts([changed[2], changed[7]], batch_size=4).numpy()
    np.testing.assert_allclose(after[2], fresh[0], atol=1e-5)
    np.testing.assert_allclose(after[7], fresh[1], atol=1e-5)
    for i in (1, 3, 4, 5, 6):
        np.testing.assert_array_equal(after[i], before[i])
    keys = read_parts(tmp_path / "item_embeddings").to_pydict()
    assert dict(zip(keys["item_id"], keys["text_key"]))[2] == stable_id(changed[2])
    assert encode(cfg).item_rows_written == 0  # and then it is current


def test_killed_while_dropping_a_stale_row_converges(tiny_bert_dir, tmp_path, monkeypatch):
    write_canonical(tmp_path)
    cfg = cfg_for(tiny_bert_dir, tmp_path)
    encode(cfg)
    write_canonical(tmp_path, items={**ITEMS, 2: "Heat (1995) | Crime"})

    def killed(self):
        raise KeyboardInterrupt  # after the rewritten part is in place, before the old one goes
    monkeypatch.setattr(Path, "unlink", killed)
    with pytest.raises(KeyboardInterrupt):
        encode(cfg)
    monkeypatch.undo()
    encode(cfg)
    after = table_of(tmp_path / "item_embeddings", "item_id", "item_embedding")
    assert set(after) == set(ITEMS)
    assert encode(cfg).item_rows_written == 0
