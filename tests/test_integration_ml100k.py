"""ML-100K end to end: ingest, encode with the default MiniLM, feast apply, materialise, and read back
exactly the vectors the model computes directly."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from tests.datasets import ML100K, require_ml100k

REPO = Path(__file__).resolve().parents[1] / "feast_repo"

pytestmark = pytest.mark.integration


def test_ml100k_ingest_encode_feast_roundtrip(tmp_path):
    require_ml100k()
    from llm_features.backbone import Backbone, BackboneConfig
    from llm_features.encode import EncodeConfig, encode
    from llm_features.ingest.core import IngestConfig, ingest
    from llm_features.parquet_io import embedding_matrix, read_parts
    from llm_features.store import (
        apply_definitions,
        check_fingerprints,
        materialize_all,
        online_features,
        open_store,
    )
    from llm_features.workspace import Workspace

    data = tmp_path / "data"
    ws = Workspace.at(data)
    ingest(IngestConfig(source=ML100K, data_dir=data))
    encode(EncodeConfig(data_dir=data, progress=False))

    ignore = shutil.ignore_patterns("data", "__pycache__")
    repo = Path(shutil.copytree(REPO, tmp_path / "feast_repo", ignore=ignore))
    store = open_store(repo, data)
    apply_definitions(store)
    fp = check_fingerprints(store, ws)
    assert fp is not None
    assert store.get_feature_view("item_embeddings").tags["llmfeat_fingerprint"] == fp.digest
    report = materialize_all(store)
    assert report.entities["item_embeddings"] == 1682
    assert report.entities["user_recent_behaviors"] == 943

    rng = np.random.default_rng(0)
    items = pq.read_table(ws.items, columns=["item_id", "item_text"])
    pick = np.sort(rng.choice(items.num_rows, size=16, replace=False))
    item_ids = items["item_id"].take(pick).to_numpy()
    texts = items["item_text"].take(pick).to_pylist()

    feats = online_features(store, user_id=1, item_ids=item_ids)
    assert feats.present["item_embedding"].all() and feats.present["title"].all()
    assert not feats.present["user_embedding"].any()  # user_embeddings/ is filled by the finetune stage
    online = feats.values["item_embedding"]
    assert online.shape == (16, fp.hidden_size)

    # exactly what encode wrote into the part files ...
    parts = read_parts(ws.item_embeddings)
    order = {int(k): i for i, k in enumerate(parts["item_id"].to_pylist())}
    stored = embedding_matrix(parts["item_embedding"])[[order[int(i)] for i in item_ids]]
    np.testing.assert_array_equal(online, stored)
    # ... and what the model computes directly for those texts (float32; batching changes padding only)
    backbone = Backbone.load(BackboneConfig())
    assert backbone.fingerprint.digest == fp.digest
    direct = backbone.encode_texts(texts).float().numpy()
    np.testing.assert_allclose(online, direct, rtol=0, atol=1e-5)

    # behaviour embeddings by behavior_id, and the user's current recent-behaviour list
    inter = pq.read_table(ws.interactions, columns=["user_id", "behavior_id", "behavior_text"])
    mine = inter.filter(pc.equal(inter["user_id"], 1))
    bids = mine["behavior_id"].to_numpy()[:5]
    btexts = mine["behavior_text"].to_pylist()[:5]
    got = store.get_online_features(
        features=["atomic_behavior_embeddings:behavior_embedding"],
        entity_rows=[{"behavior_id": int(b)} for b in bids],
    ).to_dict()["behavior_embedding"]
    np.testing.assert_allclose(np.asarray(got, np.float32), backbone.encode_texts(btexts).float().numpy(),
                               rtol=0, atol=1e-5)
    recent = feats.values["recent_behavior_ids"][0]
    assert 0 < len(recent) <= 30 and set(recent.tolist()) <= set(mine["behavior_id"].to_pylist())
