"""examples/: the scripts run as a user would run them, on small applied and materialised workspaces.

The scikit-learn example reads a tiny synthetic workspace with random labels (it checks the
plumbing). The LightGBM and PyTorch examples read a planted one: real `llmfeat ingest` of a
synthetic log whose labels depend on the cosine between a user's and an item's embedding (plus
per-user and per-item biases), and those embeddings written as llmfeat's part files. So the tests
can check that the LLM features reach the models through Feast (the models with them must beat
the same models without them), and that Feast's on-demand view computes the planted cosine.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llm_features import parquet_io
from llm_features.ingest.core import IngestConfig, ingest
from llm_features.store import apply_definitions, materialize_all, open_store
from llm_features.workspace import Workspace
from llm_features.fingerprint import FINGERPRINT_METADATA_KEY
from tests.store_data import T1, copy_repo, make_fingerprint, write_synthetic_workspace

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "feast_features_in_existing_pipeline.py"
LIGHTGBM = ROOT / "examples" / "lightgbm_ranker_with_llm_features.py"
TORCH = ROOT / "examples" / "pytorch_ranker_with_llm_embeddings.py"


def _write_interactions(data_dir: Path, n: int = 120, seed: int = 1) -> None:
    """canonical/interactions.parquet in the SPEC schema over the synthetic users (1-3) and items (1-20),
    split by time 80/10/10."""
    rng = np.random.default_rng(seed)
    ts = sorted(T1 + timedelta(hours=int(h)) for h in rng.choice(24 * 90, size=n, replace=False))
    split = ["train"] * int(n * 0.8) + ["valid"] * int(n * 0.1)
    split += ["test"] * (n - len(split))
    item_ids = rng.integers(1, 21, size=n)
    table = pa.table(
        {
            "user_id": pa.array(rng.integers(1, 4, size=n), pa.int64()),
            "item_id": pa.array(item_ids, pa.int64()),
            "event_timestamp": parquet_io.utc_us(ts),
            "behavior_id": pa.array(rng.choice([101, 202, 303], size=n), pa.int64()),
            "behavior_text": [f"Movie {i} (2000) | Drama" for i in item_ids],
            "label": pa.array(np.arange(n) % 2, pa.int8()),
            "rating": pa.array(rng.integers(1, 6, size=n).astype(np.float32), pa.float32()),
            "split": split,
        }
    )
    parquet_io.write_table_atomic(table, Workspace.at(data_dir).interactions)


def test_feast_features_in_existing_pipeline_runs_end_to_end(tmp_path):
    repo = copy_repo(tmp_path / "feast_repo")
    data = tmp_path / "data"
    write_synthetic_workspace(data)
    _write_interactions(data)
    store = open_store(repo, data)
    apply_definitions(store)
    materialize_all(store)

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("LLMFEAT_DATA_DIR", None)
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE), "--repo", str(repo), "--data-dir", str(data),
         "--limit", "60", "--candidates", "8"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "[historical] train rows=60 valid rows=12" in out, out
    # age + gender, then the user vector, item embedding and their product (3 x DIM=8)
    assert "features=26" in out, out
    assert "[train] logistic regression" in out and "valid AUC=" in out, out
    assert "[online] user=" in out and "candidates=8 matrix=(8, 26)" in out, out
    assert "[serve] top-5 (item_id, score):" in out, out
    assert out.rstrip().endswith("OK"), out
    assert not list(tmp_path.glob("*.db")), "nothing may be written to the CWD"


# ---------------------------------------------------------------------------------------------
# The planted workspace of the LightGBM and PyTorch examples


@dataclass
class Planted:
    repo: Path
    data: Path
    users: dict[int, np.ndarray]  # user_id -> the user_embedding written
    items: dict[int, np.ndarray]
    no_embedding_user: int  # a user with interactions but no user_embedding row


def build_planted_workspace(root: Path, n_users: int = 80, n_items: int = 80, per_user: int = 40,
                            dim: int = 8, seed: int = 0) -> Planted:
    """Ingest a synthetic log with `llmfeat ingest`, write planted embeddings, apply, materialise."""
    rng = np.random.default_rng(seed)
    taste = rng.standard_normal((n_users, dim))
    item_vecs = rng.standard_normal((n_items, dim))
    user_bias, item_bias = rng.normal(0, 0.7, n_users), rng.normal(0, 0.7, n_items)
    cos = (taste @ item_vecs.T) / np.outer(np.linalg.norm(taste, axis=1), np.linalg.norm(item_vecs, axis=1))
    rows = []
    start = datetime(2001, 1, 1, tzinfo=timezone.utc)
    for u in range(n_users):
        for i in rng.choice(n_items, size=per_user, replace=False):
            p = 1 / (1 + np.exp(-(4.0 * cos[u, i] + user_bias[u] + item_bias[i])))
            when = start + timedelta(minutes=int(rng.integers(0, 60 * 24 * 90)))
            rows.append((u + 1, i + 1, when.isoformat(), int(rng.random() < p)))
    src = root / "src"
    src.mkdir(parents=True)
    log = pd.DataFrame(rows, columns=["uid", "sku", "ts", "clicked"])
    log.to_csv(src / "log.csv", index=False)
    genres = ["Drama", "Comedy", "Action", "Horror"]
    pd.DataFrame({"sku": np.arange(1, n_items + 1), "title": [f"Item {i}" for i in range(1, n_items + 1)],
                  "cat": [genres[i % 4] + ("|" + genres[(i + 1) % 4] if i % 3 == 0 else "")
                          for i in range(n_items)]}).to_csv(src / "items.csv", index=False)
    pd.DataFrame({"uid": np.arange(1, n_users + 1), "sex": rng.choice(["M", "F"], n_users),
                  "age": rng.integers(18, 70, n_users),
                  "job": rng.choice(["writer", "artist", "engineer"], n_users)}).to_csv(
        src / "users.csv", index=False)

    data = root / "data"
    ingest(IngestConfig(
        format="generic", interactions=(src / "log.csv",), items=src / "items.csv", users=src / "users.csv",
        map=("user_id=uid", "item_id=sku", "event_timestamp=ts", "genres=cat", "gender=sex",
             "occupation=job"),
        item_text_column="title", label_column="clicked", recent_cadence="event", data_dir=data,
    ))
    ws = Workspace.at(data)
    fp = make_fingerprint(dim=dim)
    ws.claim_fingerprint(fp)
    meta = {FINGERPRINT_METADATA_KEY: fp.to_json()}
    before = parquet_io.utc_us([start - timedelta(days=1)])[0]
    user_vecs = (taste + 0.3 * rng.standard_normal(taste.shape)).astype(np.float32)
    no_embedding_user = n_users  # the last user has no user_embedding row (as before embed-users)
    with_emb = np.arange(1, n_users)
    for key, column, ids, vecs, directory in (
        ("item_id", "item_embedding", np.arange(1, n_items + 1), item_vecs.astype(np.float32),
         ws.item_embeddings),
        ("user_id", "user_embedding", with_emb, user_vecs[with_emb - 1], ws.user_embeddings),
    ):
        parquet_io.write_part(directory, pa.table({
            key: pa.array(ids, pa.int64()),
            column: parquet_io.embedding_array(vecs),
            "event_timestamp": pa.array([before.as_py()] * len(ids), before.type),
        }), metadata=meta)

    repo = copy_repo(root / "feast_repo")
    store = open_store(repo, data)
    apply_definitions(store)
    materialize_all(store)
    return Planted(repo, data, {int(u): user_vecs[u - 1] for u in with_emb},
                   {i + 1: item_vecs[i].astype(np.float32) for i in range(n_items)}, no_embedding_user)


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Planted:
    return build_planted_workspace(tmp_path_factory.mktemp("planted"))


def _run_example(script: Path, planted: Planted, cwd: Path, *extra: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("LLMFEAT_DATA_DIR", None)
    proc = subprocess.run(
        [sys.executable, str(script), "--repo", str(planted.repo), "--data-dir", str(planted.data),
         "--candidates", "10", "--bootstrap", "100", *extra],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.rstrip().endswith("OK"), proc.stdout
    assert not list(cwd.iterdir()), "nothing may be written to the CWD"
    return proc.stdout


def _auc_lines(out: str, name: str) -> tuple[float, float, float]:
    """(test AUC without, with, bootstrap lower bound of the difference) from an example's output."""
    auc = r"\s*:.*test AUC=([\d.]+)"
    without = float(re.search(rf"\[train\] {name} (?:without LLM features|ids only){auc}", out)[1])
    with_ = float(re.search(rf"\[train\] {name} (?:with LLM features|ids \+ LLM vectors){auc}", out)[1])
    m = re.search(r"\[result\] test AUC with minus without LLM \w+: ([+-][\d.]+) \[95% bootstrap over (\d+) "
                  r"test rows: ([+-][\d.]+), ([+-][\d.]+)\]", out)
    assert m, out
    assert float(m[1]) == pytest.approx(with_ - without, abs=2e-4)
    return without, with_, float(m[3])


def _split_rows(data: Path, split: str) -> pd.DataFrame:
    df = pq.read_table(Workspace.at(data).interactions, columns=["user_id", "item_id", "split"]).to_pandas()
    return df[df["split"] == split]


def test_lightgbm_example_trains_on_odfv_features_and_serves_the_same(planted, tmp_path):
    out = _run_example(LIGHTGBM, planted, tmp_path)
    train = _split_rows(planted.data, "train")
    names = ["user_item_cosine"] + [f"user_pc_{j}" for j in range(4)] + [f"item_pc_{j}" for j in range(4)]
    assert f"[feast] applied on-demand feature view user_item_llm: {', '.join(names)}" in out, out
    # the cosine is missing exactly on the rows of the user without a user_embedding
    n_missing = int((train["user_id"] == planted.no_embedding_user).sum())
    assert n_missing > 0
    assert (f"[historical] train rows={len(train)} valid rows={len(_split_rows(planted.data, 'valid'))} "
            f"test rows={len(_split_rows(planted.data, 'test'))}") in out, out
    assert f"train rows without a user or item embedding: {n_missing}\n" in out, out
    # the labels were planted on the cosine: the model with the ODFV features must see it
    without, with_, lower = _auc_lines(out, "LightGBM")
    assert with_ > without + 0.05 and with_ > 0.65 and lower > 0, out
    assert "[skew] user_item_llm online vs get_historical_features as of now: max |difference|=0.00e+00, " \
           "missing in the same places: True" in out, out
    assert re.search(r"\[serve\] top-5 \(item_id, score\): (\(\d+, [\d.]+\)(, )?){5}\n", out), out

    # another process reads the registered view: Feast rebuilds its function from the registry
    store = open_store(planted.repo, planted.data)
    pairs = [(u, i) for u in (1, 2, planted.no_embedding_user) for i in (1, 5, 9)]
    got = store.get_online_features(
        features=[f"user_item_llm:{n}" for n in names],
        entity_rows=[{"user_id": u, "item_id": i} for u, i in pairs],
    ).to_dict()
    for row, (u, i) in enumerate(pairs):
        if u == planted.no_embedding_user:
            assert got["user_item_cosine"][row] is None or np.isnan(got["user_item_cosine"][row])
            continue
        uv, iv = planted.users[u].astype(np.float64), planted.items[i].astype(np.float64)
        expected = uv @ iv / (np.linalg.norm(uv) * np.linalg.norm(iv))
        assert got["user_item_cosine"][row] == pytest.approx(expected, abs=1e-6)
    # the item components: the principal axes of the distinct items of the training rows
    items = np.stack([planted.items[i] for i in sorted(train["item_id"].unique())]).astype(np.float64)
    _, _, vt = np.linalg.svd(items - items.mean(axis=0), full_matrices=False)
    for row, (_, i) in enumerate(pairs):
        expected = (planted.items[i] - items.mean(axis=0)) @ vt[:4].T
        got_pcs = [got[f"item_pc_{j}"][row] for j in range(4)]
        np.testing.assert_allclose(np.abs(got_pcs), np.abs(expected), atol=1e-5)  # axes are up to sign


def test_pytorch_example_trains_on_embeddings_and_ids(planted, tmp_path):
    out = _run_example(TORCH, planted, tmp_path, "--epochs", "12", "--batch-size", "64")
    train = _split_rows(planted.data, "train")
    assert f"[historical] train rows={len(train)} " in out, out
    without, with_, lower = _auc_lines(out, "PyTorch")
    assert with_ > without + 0.05 and lower > 0, out
    assert re.search(r"\[online\] user=\d+ candidates=10 user embedding online: True", out), out
    assert re.search(r"\[serve\] top-5 \(item_id, score\): (\(\d+, [\d.]+\)(, )?){5}\n", out), out
