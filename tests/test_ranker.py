"""The TorchRec ranker: batches, both model twins, training on a planted signal, serving defaults."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from ranker.config import EvaluateConfig, ModelConfig, TrainConfig
from ranker.features import FeatureEncoder, MissingFeatures, Vocabulary, extract
from ranker.model import RankingModel, RankingTrain
from ranker.serve import Ranker
from tests.synthetic_rows import SYNTHETIC_ATTRIBUTES, SyntheticFeatureSource, synthetic_rows
from ranker.train import METRICS_FILE, evaluate, load_checkpoint, predict, train

DIM = 8


@pytest.fixture(scope="module")
def rows() -> pd.DataFrame:
    return synthetic_rows(n_users=200, n_items=100, n_rows=4000, dim=DIM, signal=6.0, seed=0)


def _fit(rows: pd.DataFrame, llm: bool) -> FeatureEncoder:
    cfg = ModelConfig(llm_features=llm, llm_mode="interaction")
    return FeatureEncoder.fit(extract(rows[rows.split == "train"], cfg, attributes=SYNTHETIC_ATTRIBUTES), cfg)


@pytest.fixture(scope="module")
def checkpoints(rows: pd.DataFrame, tmp_path_factory) -> dict[bool, Path]:
    torch.set_num_threads(1)
    out = {}
    for llm in (True, False):
        cfg = TrainConfig(model=ModelConfig(llm_features=llm, llm_mode="interaction"),
                          out=tmp_path_factory.mktemp(f"ranker_{llm}"), epochs=4, batch_size=128, lr=3e-3,
                          seed=0)
        train(cfg, entities=rows, source=SyntheticFeatureSource(rows))
        out[llm] = cfg.out
    return out


# ------------------------------------------------------------------------------------------------
# Model shapes


@pytest.mark.parametrize("llm", [True, False])
def test_forward_backward_shapes(rows: pd.DataFrame, llm: bool) -> None:
    encoder = _fit(rows, llm)
    model = RankingModel(encoder)
    batch = encoder.encode(rows.iloc[:16]).batch(np.arange(16))
    assert batch.dense_features.shape == (16, encoder.dense_dim)
    assert batch.sparse_features.keys() == encoder.sparse_names
    loss, (_, logits, labels) = RankingTrain(model)(batch)
    assert logits.shape == (16,) and labels.shape == (16,)
    loss.backward()
    assert model.embedding_bag_collection.embedding_bags["t_user_id"].weight.grad is not None
    assert "recent_item_ids" in encoder.sparse_names  # both twins: +LLM is id-only plus LLM features
    if llm:
        assert encoder.dense_dim == 3 + 2 * (DIM + 1)
        assert model.llm_inputs[0].missing.grad is not None  # the first rows have no user embedding
    else:
        assert encoder.dense_dim == 3 and encoder.llm_dims == {}


@pytest.mark.parametrize("interaction", ["dcn", "dot"])
@pytest.mark.parametrize("mode", ["interaction", "dense"])
def test_llm_modes_route_the_vectors(rows: pd.DataFrame, mode: str, interaction: str) -> None:
    cfg = ModelConfig(llm_mode=mode, interaction=interaction, llm_dropout=0.1)
    encoder = FeatureEncoder.fit(extract(rows[rows.split == "train"], cfg, attributes=SYNTHETIC_ATTRIBUTES), cfg)
    model = RankingModel(encoder)
    batch = encoder.encode(rows.iloc[:32]).batch(np.arange(32))
    loss, _ = RankingTrain(model)(batch)
    loss.backward()
    n_sparse = len(encoder.sparse_names)
    if mode == "interaction":  # two projected LLM vectors join the F id embeddings in the interaction
        assert model.dlrm.inter_arch.F == n_sparse + 2
        assert model.dlrm.dense_arch.model._mlp[0]._linear.in_features == 3 + 2  # numeric + 2 missing flags
        assert all(p.weight.grad is not None and p.weight.grad.abs().sum() > 0 for p in model.llm_proj)
    else:
        assert model.dlrm.inter_arch.F == n_sparse and len(model.llm_proj) == 0
        assert model.dlrm.dense_arch.model._mlp[0]._linear.in_features == encoder.dense_dim
    # the LLM vectors reach the logits: changing one row's item vector changes that row only
    model.eval()
    dense = batch.dense_features.clone()
    start, end = model._slots[1]
    dense[0, start:end - 1] += torch.randn(end - 1 - start)  # (a constant shift would vanish in LayerNorm)
    with torch.no_grad():
        before = model(batch.dense_features, batch.sparse_features)
        after = model(dense, batch.sparse_features)
    assert not torch.isclose(before[0], after[0]) and torch.equal(before[1:], after[1:])


def test_checkpoint_config_without_llm_mode_reads_as_dense() -> None:
    assert ModelConfig.from_dict({"llm_features": True}).llm_mode == "dense"
    assert ModelConfig().llm_mode == "score"
    with pytest.raises(ValueError, match="llm_mode"):
        ModelConfig(llm_mode="concat")
    with pytest.raises(ValueError, match="needs both"):
        ModelConfig(llm_inputs=("item_embedding",))
    # a checkpoint of the old default (recent-item bag in the id-only twin only) reads as it was trained
    assert ModelConfig.from_dict({"llm_features": True, "recent_items_bag": None}).recent_items_bag is False
    assert ModelConfig.from_dict({"llm_features": False, "recent_items_bag": None}).recent_items_bag is True


def test_saved_train_config_is_nested_and_both_forms_read_back(checkpoints: dict[bool, Path]) -> None:
    """ranker.json's train_config nests the network (``{"model": {...}, ...}``) since TrainConfig holds a
    ModelConfig; ModelConfig.from_dict reads that form, the flat one written before, and the encoder's."""
    payload = json.loads((checkpoints[False] / "ranker.json").read_text())
    saved, encoder = payload["train_config"], payload["encoder"]["model"]
    assert saved["model"]["llm_features"] is False and "llm_features" not in saved and saved["epochs"] == 4
    want = ModelConfig(llm_features=False, llm_mode="interaction")
    old_flat = {**{k: v for k, v in saved.items() if k != "model"}, **saved["model"]}
    assert ModelConfig.from_dict(saved) == ModelConfig.from_dict(old_flat) == ModelConfig.from_dict(encoder) == want


def test_early_stopping_keeps_the_best_valid_epoch(rows: pd.DataFrame, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    cfg = TrainConfig(model=ModelConfig(llm_features=False), out=tmp_path / "es", epochs=6, patience=1,
                      batch_size=128, lr=3e-2, sparse_lr=0.5, seed=0, progress=False)
    m = train(cfg, entities=rows, source=SyntheticFeatureSource(rows))
    aucs = [h["valid_auc"] for h in m["history"]]
    best = int(np.argmax(aucs))
    assert m["best_epoch"] == best + 1 and m["epochs_run"] == len(aucs)
    assert len(aucs) == 6 or aucs[-1] <= aucs[best]  # stopped only after an epoch without improvement
    assert m["valid"]["auc"] == pytest.approx(aucs[best])  # the saved weights are the best epoch's
    assert all(np.isfinite(h["valid_per_user_auc"]) for h in m["history"])
    assert load_file(str(cfg.out / "model.safetensors"))


def test_dot_interaction_builds(rows: pd.DataFrame) -> None:
    cfg = ModelConfig(interaction="dot", llm_mode="interaction")
    encoder = FeatureEncoder.fit(extract(rows.iloc[:200], cfg, attributes=SYNTHETIC_ATTRIBUTES), cfg)
    batch = encoder.encode(rows.iloc[:4]).batch(np.arange(4))
    assert RankingModel(encoder)(batch.dense_features, batch.sparse_features).shape == (4,)


# ------------------------------------------------------------------------------------------------
# Batch building and the missing-feature policy


def test_vocabulary_reserves_oov_row() -> None:
    ids = Vocabulary("int", [30, 10, 20])
    assert ids.lookup(np.array([10, 20, 30, 99, np.iinfo(np.int64).min])).tolist() == [1, 2, 3, 0, 0]
    cats = Vocabulary("str", ["M", "F"])
    assert cats.lookup(np.array(["F", "M", "X", None], dtype=object)).tolist() == [1, 2, 0, 0]
    assert Vocabulary.from_dict(json.loads(json.dumps(ids.to_dict()))).lookup(np.array([30])).tolist() == [3]


def test_batch_marks_missing_features(rows: pd.DataFrame) -> None:
    encoder = _fit(rows, llm=True)
    good = rows[rows.user_embedding.notna() & rows.item_embedding.notna()].iloc[0]
    frame = pd.DataFrame([good, good]).reset_index(drop=True)
    # Row 1: a new user (no embedding, no profile, no history) and an item unseen in training.
    for col, value in [("user_id", 999_999), ("item_id", 888_888), ("user_embedding", None),
                       ("item_embedding", None), ("gender", None), ("zip", None),
                       ("recent_item_ids", None), ("recent_labels", None)]:
        frame.at[1, col] = value
    frame.at[1, "item_genres"] = np.array([], dtype=object)
    stats = MissingFeatures()
    encoded = encoder.encode(frame, stats)
    d = DIM
    user_flag, item_flag = 3 + d, 3 + d + 1 + d
    dense = encoded.dense
    assert dense[0, user_flag] == 0 and dense[0, item_flag] == 0
    assert dense[1, user_flag] == 1 and dense[1, item_flag] == 1
    assert not dense[1, 3 : 3 + d].any() and not dense[1, item_flag - d : item_flag].any()
    assert dense[1, 2] == 0  # has_history
    kjt = encoded.batch(np.arange(2)).sparse_features.to_dict()
    for name in ("user_id", "item_id", "gender", "zip_prefix", "item_genres"):
        assert kjt[name].to_dense()[1].tolist() == [0], name
        assert kjt[name].to_dense()[0].tolist() != [0], name
    assert stats.as_dict() == {
        "rows": 2, "missing_user_embedding": 1, "missing_item_embedding": 1, "unknown_user_id": 1,
        "unknown_item_id": 1, "unknown_gender": 1, "unknown_zip_prefix": 1, "unknown_item_genres": 1,
        "unknown_recent_item_ids": 1,  # the recent-item bag is in both twins now
    }


def test_missing_embedding_uses_learned_vector_not_zeros(rows: pd.DataFrame) -> None:
    encoder = _fit(rows, llm=True)
    model = RankingModel(encoder)
    slot = model.llm_inputs[0]
    x = torch.cat([torch.zeros(1, DIM), torch.ones(1, 1)], dim=1)
    out = slot(x)
    assert torch.equal(out[0, :DIM], slot.missing.detach()) and out[0, DIM] == 1


def test_training_dropouts_only_touch_ids_and_flags(rows: pd.DataFrame) -> None:
    encoder = _fit(rows, llm=True)
    encoded = encoder.encode(rows.iloc[:500])
    b = encoded.batch(np.arange(500), np.random.default_rng(0), oov_dropout=0.5, missing_dropout=0.5)
    kjt = b.sparse_features.to_dict()
    assert (kjt["user_id"].values() == 0).float().mean() > 0.3
    assert torch.equal(kjt["gender"].values(), encoded.batch(np.arange(500)).sparse_features["gender"].values())
    assert b.dense_features[:, 3 + DIM].mean() > 0.4


def test_encoder_roundtrip(rows: pd.DataFrame) -> None:
    encoder = _fit(rows, llm=True)
    again = FeatureEncoder.from_dict(json.loads(json.dumps(encoder.to_dict())))
    a, b = encoder.encode(rows.iloc[:50]), again.encode(rows.iloc[:50])
    assert np.array_equal(a.dense, b.dense)
    assert all(np.array_equal(a.sparse[k][1], b.sparse[k][1]) for k in a.sparse_names)


def test_llm_twin_refuses_rows_without_embeddings(rows: pd.DataFrame) -> None:
    cfg = ModelConfig(llm_features=True)
    with pytest.raises(ValueError, match="no-llm-features"):
        FeatureEncoder.fit(extract(rows.drop(columns=["user_embedding"]).iloc[:100], cfg,
                                   attributes=SYNTHETIC_ATTRIBUTES), cfg)


# ------------------------------------------------------------------------------------------------
# Training, checkpoints, evaluation


def test_training_learns_planted_signal(rows: pd.DataFrame, checkpoints: dict[bool, Path]) -> None:
    metrics = json.loads((checkpoints[True] / METRICS_FILE).read_text())
    assert metrics["feature_service"] == "ranker_llm"
    assert metrics["train_missing"]["missing_user_embedding"] > 0
    held_out = rows.assign(split=np.where(rows.split == "train", "train", "test"))
    src = SyntheticFeatureSource(rows)
    llm = evaluate(EvaluateConfig(checkpoint=checkpoints[True]), entities=held_out, source=src)
    ids = evaluate(EvaluateConfig(checkpoint=checkpoints[False]), entities=held_out, source=src)
    assert llm["rows"] == 800 and np.isfinite(llm["logloss"])
    assert llm["auc"] > 0.6, llm
    assert llm["auc"] > ids["auc"]  # the planted signal is only visible through the embeddings
    assert (checkpoints[True] / "eval-test" / METRICS_FILE).exists()


def test_training_is_reproducible_whatever_order_the_join_returns(rows: pd.DataFrame, tmp_path: Path) -> None:
    """Feast's point-in-time join returns rows in no fixed order; the same seed must still give the same model."""
    from safetensors.torch import load_file

    base = SyntheticFeatureSource(rows)
    calls = iter(range(100))

    def shuffled(entity_df: pd.DataFrame) -> pd.DataFrame:
        frame = base(entity_df)
        return frame.sample(frac=1.0, random_state=next(calls)).reset_index(drop=True)

    weights = []
    for run in range(2):
        cfg = TrainConfig(model=ModelConfig(llm_mode="interaction"), out=tmp_path / f"run{run}", epochs=1,
                          batch_size=256, seed=3, validate=False, progress=False)
        train(cfg, entities=rows[rows.split == "train"].iloc[:1500], source=shuffled)
        weights.append(load_file(str(cfg.out / "model.safetensors")))
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key


def test_checkpoint_roundtrip(rows: pd.DataFrame, checkpoints: dict[bool, Path]) -> None:
    model, encoder, payload = load_checkpoint(checkpoints[True])
    assert payload["feature_service"] == "ranker_llm"
    again, _, _ = load_checkpoint(checkpoints[True])
    encoded = encoder.encode(rows.iloc[-64:])
    assert np.allclose(predict(model, encoded), predict(again, encoded))


# ------------------------------------------------------------------------------------------------
# Serving


USER_VIEWS = {"user_profile": ["gender", "age", "occupation", "zip"],
              "user_recent_behaviors": ["recent_item_ids", "recent_labels"], "user_embeddings": ["user_embedding"]}
ITEM_VIEWS = {"item_profile": ["item_genres"], "item_embeddings": ["item_embedding"]}


class FakeOnlineStore:
    """The slice of ``feast.FeatureStore`` the ranker uses, over the latest synthetic rows."""

    def __init__(self, rows: pd.DataFrame) -> None:
        self.users = rows.groupby("user_id").last()
        self.items = rows.groupby("item_id").last()
        self.calls: list[int] = []

    def get_feature_service(self, name: str) -> SimpleNamespace:
        views = {**USER_VIEWS, **ITEM_VIEWS} if name == "ranker_llm" else {
            k: v for k, v in {**USER_VIEWS, **ITEM_VIEWS}.items() if "embeddings" not in k}
        return SimpleNamespace(feature_view_projections=[
            SimpleNamespace(name=v, features=[SimpleNamespace(name=f) for f in fs]) for v, fs in views.items()])

    def get_feature_view(self, name: str) -> SimpleNamespace:
        return SimpleNamespace(join_keys=["user_id"] if name in USER_VIEWS else ["item_id"])

    def get_online_features(self, features: list[str], entity_rows: list[dict[str, int]]) -> SimpleNamespace:
        key = next(iter(entity_rows[0]))
        table = self.users if key == "user_id" else self.items
        self.calls.append(len(entity_rows))
        out: dict[str, list] = {key: [r[key] for r in entity_rows]}
        for ref in features:
            name = ref.split(":")[1]
            out[name] = [table.at[r[key], name] if r[key] in table.index else None for r in entity_rows]
            out[name] = [v.tolist() if isinstance(v, np.ndarray) else v for v in out[name]]  # online: lists
        return SimpleNamespace(to_dict=lambda: out)


@pytest.mark.parametrize("llm", [True, False])
def test_serving_unknown_user_and_item(
    rows: pd.DataFrame, checkpoints: dict[bool, Path], llm: bool, caplog: pytest.LogCaptureFixture
) -> None:
    store = FakeOnlineStore(rows)
    ranker = Ranker.load(checkpoints[llm], store=store)
    known_user, known_items = int(rows.user_id.iloc[-1]), [int(i) for i in rows.item_id.unique()[:5]]
    probs = ranker.score(known_user, known_items)
    assert probs.shape == (5,) and np.isfinite(probs).all()
    assert store.calls == [1, 5]  # one user read, one batched item read
    with caplog.at_level(logging.WARNING, logger="ranker.features"):
        ranked = ranker.rank(123_456, known_items[:2] + [777_777], top_k=2)
    assert len(ranked) == 2 and all(0 < p < 1 for _, p in ranked)
    counts = ranker.missing.as_dict()
    assert counts["unknown_user_id"] == 3 and counts["unknown_item_id"] == 1
    if llm:
        assert counts["missing_user_embedding"] >= 3 and counts["missing_item_embedding"] >= 1
    assert any("unknown_user_id" in r.getMessage() for r in caplog.records)


def test_serving_matches_offline_scores(rows: pd.DataFrame, checkpoints: dict[bool, Path]) -> None:
    ranker = Ranker.load(checkpoints[True], store=FakeOnlineStore(rows))
    frame = pd.DataFrame(ranker.online_frame(int(rows.user_id.iloc[-1]), [1, 2, 3]))
    assert np.allclose(ranker.score_frame(frame), ranker.score(int(rows.user_id.iloc[-1]), [1, 2, 3]))


# ------------------------------------------------------------------------------------------------
# Distributed: 2 CPU processes, gloo, DMP + TrainPipelineSparseDist


@pytest.mark.slow
@pytest.mark.distributed
def test_two_rank_training_loads_unsharded(rows: pd.DataFrame, tmp_path: Path) -> None:
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    cfg = TrainConfig(model=ModelConfig(llm_mode="interaction"), out=tmp_path / "ckpt", epochs=1,
                      batch_size=64, lr=3e-3, threads=1, sharding="table_wise")
    launch = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=2, run_id="ranker_test", rdzv_backend="c10d",
        rdzv_endpoint=str(tmp_path / "rdzv"), rdzv_configs={"store_type": "file"}, start_method="spawn",
        monitor_interval=1, max_restarts=0,
    )
    results = elastic_launch(launch, entrypoint=train)(cfg, rows, SyntheticFeatureSource(rows))
    assert results[0]["world_size"] == 2 and results[0]["valid"]["rows"] == 400
    assert not (cfg.out / ".sharded").exists()
    ranker = Ranker.load(cfg.out, store=FakeOnlineStore(rows))  # no process group needed
    assert np.isfinite(ranker.score(1, [1, 2, 3])).all()


# ------------------------------------------------------------------------------------------------
# llm_mode=score: the fine-tuned tower's frozen head scores each (user, item) pair

TOWER_DIM = 32  # the tiny BERT's width: user and item vectors as the tower would export them


@pytest.fixture(scope="module")
def tower(tiny_bert_dir: Path, tmp_path_factory) -> Path:
    """A real ``llmfeat finetune`` checkpoint directory (untrained tiny BERT tower)."""
    from llm_features.backbone import Backbone, BackboneConfig
    from llm_features.finetune import FinetuneConfig
    from llm_features.finetune.checkpoint import build_model, save_checkpoint

    out = tmp_path_factory.mktemp("tower")
    cfg = FinetuneConfig(backbone=BackboneConfig(model=tiny_bert_dir, split_layer=2), head_hidden=16, out=out)
    torch.manual_seed(0)
    save_checkpoint(out, build_model(cfg, Backbone.load(cfg.backbone), TOWER_DIM), cfg, item_dim=TOWER_DIM)
    return out


@pytest.fixture(scope="module")
def rows32() -> pd.DataFrame:
    return synthetic_rows(n_users=100, n_items=60, n_rows=2000, dim=TOWER_DIM, signal=6.0, seed=1)


@pytest.fixture(scope="module")
def score_checkpoint(rows32: pd.DataFrame, tower: Path, tmp_path_factory) -> Path:
    cfg = TrainConfig(out=tmp_path_factory.mktemp("score"), tower=tower, epochs=2, batch_size=128, seed=0,
                      progress=False)
    train(cfg, entities=rows32, source=SyntheticFeatureSource(rows32))
    return cfg.out


def test_score_mode_feeds_the_frozen_tower_logit(rows32: pd.DataFrame, tower: Path, score_checkpoint: Path) -> None:
    from safetensors.torch import load_file

    from llm_features.finetune.model import CTRHead

    model, encoder, _ = load_checkpoint(score_checkpoint)
    assert encoder.tower["path"] == str(tower.resolve()) and encoder.tower_hidden == 16
    saved = load_file(str(tower / "model.safetensors"))
    for name, value in model.tower_score.head.state_dict().items():  # copied unchanged: frozen in training
        assert torch.equal(value, saved[f"head.{name}"]), name
    assert model.dlrm.dense_arch.model._mlp[0]._linear.in_features == 3 + 1 + 2  # numeric, score, 2 flags
    head = CTRHead(TOWER_DIM, TOWER_DIM, 16)
    head.load_state_dict({k[5:]: v for k, v in saved.items() if k.startswith("head.")})
    batch = encoder.encode(rows32.iloc[-8:]).batch(np.arange(8))
    dense = batch.dense_features
    (su, eu), (si, ei) = model._slots
    u, v = dense[:, su:eu - 1], dense[:, si:ei - 1]
    flags = [dense[:, eu - 1:eu], dense[:, ei - 1:ei]]
    with torch.no_grad():
        score = model.tower_score(u, v, *flags).squeeze(-1)
        expected = torch.where((flags[0] + flags[1]).squeeze(-1) > 0.5, 0.0, head(u, v))
        assert torch.allclose(score, expected, atol=1e-6)
        # the score reaches the logit: another user vector changes that row only
        changed = dense.clone()
        row = int(torch.nonzero((flags[0] + flags[1]).squeeze(-1) < 0.5)[0])
        changed[row, su:eu - 1] += torch.randn(eu - 1 - su)
        before, after = model(dense, batch.sparse_features), model(changed, batch.sparse_features)
    assert not torch.isclose(before[row], after[row])
    assert torch.equal(torch.cat([before[:row], before[row + 1:]]), torch.cat([after[:row], after[row + 1:]]))


def test_score_mode_serving_matches_offline(rows32: pd.DataFrame, score_checkpoint: Path) -> None:
    ranker = Ranker.load(score_checkpoint, store=FakeOnlineStore(rows32))
    user = int(rows32.user_id.iloc[-1])
    frame = pd.DataFrame(ranker.online_frame(user, [1, 2, 3]))
    assert np.allclose(ranker.score_frame(frame), ranker.score(user, [1, 2, 3]))


def test_score_mode_refuses_a_tower_that_did_not_export_the_user_embeddings(tower: Path, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from llm_features.embed_users import CHECKPOINT_METADATA_KEY
    from ranker.train import resolve_tower

    parts = tmp_path / "user_embeddings"
    parts.mkdir()
    table = pa.table({"user_id": [1]}).replace_schema_metadata(
        {CHECKPOINT_METADATA_KEY: json.dumps({"id": "0123456789abcdef", "path": "/elsewhere"})})
    pq.write_table(table, parts / "part-x.parquet")
    ws = SimpleNamespace(user_embeddings=parts)
    with pytest.raises(ValueError, match="embed-users --overwrite"):
        resolve_tower(tower, ws)
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        resolve_tower(tmp_path, ws)
    identity, hidden, state = resolve_tower(tower, SimpleNamespace(user_embeddings=tmp_path / "none"))
    assert hidden == 16 and "head.mlp.0.weight" in state and identity["path"] == str(tower.resolve())
    with pytest.raises(ValueError, match="--tower"):
        resolve_tower(None, None)
