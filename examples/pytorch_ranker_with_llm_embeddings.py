"""Your own PyTorch ranker on llmfeat's Feast features: id embeddings plus the LLM user and item vectors.

A plain ``torch.nn`` model of the kind a team already has: learned embeddings for ``user_id`` and
``item_id``, and an MLP over them and their product. The LLM features come in as two more inputs,
``user_embeddings:user_embedding`` and ``item_embeddings:item_embedding``, each projected to the id
embeddings' width. Nothing llmfeat-specific is needed: Feast hands over the vectors.

The flow, with plain Feast calls:

1. ``get_historical_features`` for labelled train, valid and test interactions. Feast joins each
   row's user embedding as of the row's time (a row stamped T only saw interactions before T) and
   the item embedding.
2. one function turns a feature frame into tensors (id indices, L2-normalised vectors, a
   presence flag per vector). Train twice with the same code and seed: ids only, and ids plus the
   LLM vectors. Each run keeps the epoch with the best valid AUC. Print the test AUC of each and
   the paired difference with a bootstrap interval over test rows. That is all it measures: these
   rows, this data, this model.
3. ``get_online_features`` for one user and N candidate items, the same function, scores.

Ids not seen in training map to one "unknown" row. During training, 10% of the ids are replaced
by it at random, so that row is trained and stands for users or items the model has not seen.
With a global time split, most test users of MovieLens are in that case, and the LLM user vector
is then the only per-user signal.

Missing vectors become zeros with the flag 0: ``user_embedding`` exists after ``llmfeat finetune``
and ``llmfeat embed-users``, and a user with no history before a row has none.

Prerequisite: an applied and materialised repository, e.g. after ``make demo``, or::

    llmfeat ingest --source ml-100k && llmfeat encode && llmfeat finetune && llmfeat embed-users
    llmfeat feast apply && llmfeat feast materialize

Run (``pip install -e '.[examples]'`` installs scikit-learn for the AUC)::

    python examples/pytorch_ranker_with_llm_embeddings.py --repo feast_repo --data-dir feast_repo/data
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch import nn

FEATURES = ["user_embeddings:user_embedding", "item_embeddings:item_embedding"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", type=Path, default=Path("feast_repo"), help="the Feast repository directory")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="llmfeat data dir (default: $LLMFEAT_DATA_DIR, else <repo>/data)")
    p.add_argument("--fs-yaml", default=None,
                   help="another feature_store yaml of the repo, e.g. production/feature_store.postgres.yaml")
    p.add_argument("--limit", type=int, default=20000, help="training interactions to pull (train split)")
    p.add_argument("--eval-limit", type=int, default=10000, help="valid and test interactions to pull (each)")
    p.add_argument("--epochs", type=int, default=20, help="at most this many epochs per model")
    p.add_argument("--patience", type=int, default=3,
                   help="stop after this many epochs without a better valid AUC")
    p.add_argument("--width", type=int, default=16,
                   help="width of the id embeddings and the vector projections")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--candidates", type=int, default=50, help="candidate items scored online")
    p.add_argument("--user-id", type=int, default=None,
                   help="user to serve (default: the first user of the test split)")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for the AUC interval")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Labelled interactions -> Feast feature frames


def labelled_interactions(data_dir: Path, split: str, limit: int, seed: int) -> pd.DataFrame:
    """At most ``limit`` rows of one split: user_id, item_id, event_timestamp (UTC), label."""
    table = pq.read_table(
        data_dir / "canonical" / "interactions.parquet",
        columns=["user_id", "item_id", "event_timestamp", "label", "split"],
    )
    df = table.filter(pc.equal(table["split"], split)).drop_columns(["split"]).to_pandas()
    if len(df) > limit:
        df = df.sample(n=limit, random_state=seed)
    return df.sort_values("event_timestamp").reset_index(drop=True)


def historical(store, entity_df: pd.DataFrame) -> pd.DataFrame:
    with warnings.catch_warnings():  # ibis calls a deprecated duckdb method; harmless
        warnings.simplefilter("ignore", DeprecationWarning)
        out = store.get_historical_features(entity_df=entity_df, features=FEATURES).to_df()
    if len(out) != len(entity_df):
        raise RuntimeError(f"get_historical_features returned {len(out)} rows for {len(entity_df)}")
    # The entity columns (label too) come back with each row, in an order the offline store chooses
    # (it can differ between runs); sort so that training sees the same rows in the same order.
    keys = [c for c in ("event_timestamp", "user_id", "item_id", "label") if c in out]
    return out.sort_values(keys, kind="stable").reset_index(drop=True)


# ---------------------------------------------------------------------------------------------
# Feature frame -> tensors (the same code for training and serving)


class IdIndex:
    """id -> row of an embedding table; 0 is the row for ids not seen in training."""

    def __init__(self, ids):
        self.ids = np.unique(np.asarray(ids, np.int64))

    def __len__(self) -> int:
        return len(self.ids) + 1

    def __call__(self, ids) -> torch.Tensor:
        ids = np.asarray(ids, np.int64)
        pos = np.searchsorted(self.ids, ids)
        known = (pos < len(self.ids)) & (self.ids[np.minimum(pos, len(self.ids) - 1)] == ids)
        return torch.from_numpy(np.where(known, pos + 1, 0))


def vectors(column: pd.Series, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A column of embeddings (lists or arrays; None/NaN where missing) -> L2-normalised ``[N, dim]``
    (zeros where missing) and a ``[N, 1]`` presence flag."""
    out = np.zeros((len(column), dim), np.float32)
    has = np.zeros((len(column), 1), np.float32)
    for row, v in enumerate(column):
        if isinstance(v, (list, tuple, np.ndarray)) and len(v) == dim:
            v = np.asarray(v, np.float32)
            out[row], has[row] = v / max(float(np.linalg.norm(v)), 1e-12), 1.0
    return torch.from_numpy(out), torch.from_numpy(has)


def to_tensors(frame: pd.DataFrame, users: IdIndex, items: IdIndex, dim: int) -> dict[str, torch.Tensor]:
    user_vec, user_has = vectors(frame["user_embedding"], dim)
    item_vec, item_has = vectors(frame["item_embedding"], dim)
    return {"user": users(frame["user_id"]), "item": items(frame["item_id"]),
            "user_vec": user_vec, "user_has": user_has, "item_vec": item_vec, "item_has": item_has}


# ---------------------------------------------------------------------------------------------
# The model


class Ranker(nn.Module):
    """ids (and optionally the LLM vectors) -> a click logit."""

    def __init__(self, n_users: int, n_items: int, dim: int, width: int, use_llm: bool):
        super().__init__()
        self.use_llm = use_llm
        self.user = nn.Embedding(n_users, width)
        self.item = nn.Embedding(n_items, width)
        parts = 3
        if use_llm:  # the vector and its presence flag -> width
            self.user_proj = nn.Linear(dim + 1, width)
            self.item_proj = nn.Linear(dim + 1, width)
            parts += 3
        self.mlp = nn.Sequential(nn.Linear(parts * width, 64), nn.ReLU(), nn.Linear(64, 1))

    def forward(self, b: dict[str, torch.Tensor]) -> torch.Tensor:
        u, i = self.user(b["user"]), self.item(b["item"])
        parts = [u, i, u * i]
        if self.use_llm:
            pu = self.user_proj(torch.cat([b["user_vec"], b["user_has"]], dim=1))
            pi = self.item_proj(torch.cat([b["item_vec"], b["item_has"]], dim=1))
            parts += [pu, pi, pu * pi]
        return self.mlp(torch.cat(parts, dim=1)).squeeze(1)


def predict(model: Ranker, batch: dict[str, torch.Tensor]) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return torch.sigmoid(model(batch)).numpy()


def fit(model: Ranker, train, y_train, valid, y_valid, args) -> tuple[Ranker, int, float]:
    """Adam on BCE; keeps the state of the epoch with the best valid AUC. Returns (model, epoch, AUC)."""
    from sklearn.metrics import roc_auc_score

    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-6)
    loss_fn = nn.BCEWithLogitsLoss()
    y = torch.from_numpy(y_train.astype(np.float32))
    gen = torch.Generator().manual_seed(args.seed)
    best, best_epoch, best_state = -1.0, 0, None
    for epoch in range(1, args.epochs + 1):
        model.train()
        for idx in torch.randperm(len(y), generator=gen).split(args.batch_size):
            b = {k: v[idx] for k, v in train.items()}
            for key in ("user", "item"):  # id dropout: train the "unknown" row
                drop = torch.rand(len(idx), generator=gen) < 0.1
                b[key] = torch.where(drop, torch.zeros_like(b[key]), b[key])
            opt.zero_grad()
            loss_fn(model(b), y[idx]).backward()
            opt.step()
        auc = roc_auc_score(y_valid, predict(model, valid))
        if auc > best:
            best, best_epoch, best_state = auc, epoch, copy.deepcopy(model.state_dict())
        elif epoch - best_epoch >= args.patience:
            break
    model.load_state_dict(best_state)
    return model, best_epoch, best


def paired_bootstrap(y, a, b, n: int, seed: int) -> tuple[float, float]:
    """95% interval of AUC(b) - AUC(a) over test rows resampled with replacement."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(n):
        idx = rng.integers(0, len(y), len(y))
        if len(np.unique(y[idx])) == 2:
            diffs.append(roc_auc_score(y[idx], b[idx]) - roc_auc_score(y[idx], a[idx]))
    if not diffs:
        return float("nan"), float("nan")
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return float(lo), float(hi)


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from sklearn.metrics import roc_auc_score

    from llm_features.store import open_store
    from llm_features.workspace import resolve_data_dir

    store = open_store(args.repo, args.data_dir, fs_yaml_file=args.fs_yaml)
    data_dir = resolve_data_dir(args.repo, args.data_dir)
    if "item_embeddings" not in {fv.name for fv in store.list_feature_views()}:
        print(f"error: {args.repo} is not applied; run `llmfeat feast apply && llmfeat feast materialize`",
              file=sys.stderr)
        return 2
    dim = store.get_feature_view("item_embeddings").features[0].vector_length

    # -- 1. point-in-time training data
    t0 = time.perf_counter()
    train = historical(store, labelled_interactions(data_dir, "train", args.limit, args.seed))
    valid = historical(store, labelled_interactions(data_dir, "valid", args.eval_limit, args.seed))
    test = historical(store, labelled_interactions(data_dir, "test", args.eval_limit, args.seed))
    y_train, y_valid, y_test = (f["label"].to_numpy() for f in (train, valid, test))
    if any(len(np.unique(y)) < 2 for y in (y_train, y_valid, y_test)):
        print("error: a split has a single label; raise --limit / --eval-limit", file=sys.stderr)
        return 2
    users, items = IdIndex(train["user_id"]), IdIndex(train["item_id"])
    unseen = float(np.mean(users(test["user_id"]).numpy() == 0))
    no_user_vec = float(train["user_embedding"].map(lambda v: not isinstance(v, np.ndarray)).mean())
    print(f"[historical] train rows={len(train)} valid rows={len(valid)} test rows={len(test)} "
          f"({time.perf_counter() - t0:.1f}s); test rows of users unseen in training: {unseen:.0%}; "
          f"train rows without a user embedding: {no_user_vec:.0%}")

    # -- 2. the same model twice: ids only, ids + LLM vectors
    tensors = {name: to_tensors(f, users, items, dim) for name, f in
               (("train", train), ("valid", valid), ("test", test))}
    results = {}
    for use_llm in (False, True):
        torch.manual_seed(args.seed)
        model = Ranker(len(users), len(items), dim, args.width, use_llm)
        model, epoch, valid_auc = fit(model, tensors["train"], y_train, tensors["valid"], y_valid, args)
        p_test = predict(model, tensors["test"])
        results[use_llm] = (model, p_test, roc_auc_score(y_test, p_test))
        label = "ids + LLM vectors" if use_llm else "ids only         "
        print(f"[train] PyTorch {label}: best epoch={epoch} valid AUC={valid_auc:.4f} "
              f"test AUC={results[use_llm][2]:.4f}")
    lo, hi = paired_bootstrap(y_test, results[False][1], results[True][1], args.bootstrap, args.seed)
    print(f"[result] test AUC with minus without LLM vectors: {results[True][2] - results[False][2]:+.4f} "
          f"[95% bootstrap over {len(y_test)} test rows: {lo:+.4f}, {hi:+.4f}]")

    # -- 3. serving: online features for one user and candidate items, the same tensors, scored
    model = results[True][0]
    test_all = labelled_interactions(data_dir, "test", 10**9, args.seed)
    user_id = args.user_id if args.user_id is not None else int(test_all["user_id"].iloc[0])
    items_path = data_dir / "canonical" / "items.parquet"
    all_items = pq.read_table(items_path, columns=["item_id"])["item_id"].to_numpy()
    rng = np.random.default_rng(args.seed)
    seen = pd.unique(test_all.loc[test_all["user_id"] == user_id, "item_id"])[: args.candidates]
    pool = np.setdiff1d(all_items, seen)
    others = rng.choice(pool, size=min(max(args.candidates - len(seen), 0), len(pool)), replace=False)
    candidates = np.concatenate([seen, others]).astype(np.int64)
    t0 = time.perf_counter()
    online = store.get_online_features(
        features=FEATURES, entity_rows=[{"user_id": user_id, "item_id": int(i)} for i in candidates]
    ).to_df()
    scores = predict(model, to_tensors(online, users, items, dim))
    ms = (time.perf_counter() - t0) * 1000
    has_vec = isinstance(online["user_embedding"].iloc[0], (list, np.ndarray))
    print(f"[online] user={user_id} candidates={len(candidates)} user embedding online: {has_vec} "
          f"({ms:.0f} ms)")
    top = np.argsort(-scores)[:5]
    print("[serve] top-5 (item_id, score): "
          + ", ".join(f"({int(candidates[i])}, {scores[i]:.3f})" for i in top))
    print("OK")
    return 0


if __name__ == "__main__":
    code = main()
    # DuckDB 2.x (Feast's offline store) prints "nanobind: leaked ..." lines at interpreter shutdown;
    # they are harmless, so flush and exit without finalisation (as the llmfeat command does).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
