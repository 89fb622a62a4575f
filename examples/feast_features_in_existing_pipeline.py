"""Use llmfeat's Feast features in a ranking pipeline you already have, without llmfeat's ranker.

The flow, with plain Feast calls only:

1. training data: ``get_historical_features`` with an entity dataframe of labelled interactions
   (user_id, item_id, event_timestamp, label) from ``canonical/interactions.parquet``. Feast joins,
   point in time, the latest feature row at or before each interaction: the user's recent
   behaviours (stamped T, they summarise only what happened strictly before T), profile
   attributes, the item's embedding. No future information leaks into a training row.
2. numpy matrices: one row per interaction, ``[user features | item embedding | user x item]``,
   ready for scikit-learn, LightGBM, XGBoost or a PyTorch model. Here: a logistic regression.
3. serving: ``get_online_features`` for one user and N candidate items from the online store,
   turned into the SAME matrix by the same function, scored by the trained model.

The user vector is the mean of the atomic-behaviour embeddings of the user's recent behaviours
(BAHE's offline table, looked up by behavior_id); if the finetune stage has filled
``user_embeddings``, that vector is used instead.

Prerequisite: the repository is applied and materialised, e.g. by ``make demo`` or::

    llmfeat ingest --source ml-100k && llmfeat encode
    llmfeat feast apply && llmfeat feast materialize

Run (``pip install -e '.[examples]'`` installs scikit-learn)::

    python examples/feast_features_in_existing_pipeline.py --repo feast_repo --data-dir feast_repo/data \\
        --limit 5000

Plain Feast works too: ``feast.FeatureStore(repo_path="feast_repo")`` from inside ``feast_repo/``;
``llm_features.store.open_store`` only makes the repo's relative paths work from any directory.
"""

from __future__ import annotations

import argparse
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

# What the ranker of this example reads; the names are the feature views of feast_repo/.
ITEM_FEATURES = ["item_embeddings:item_embedding"]
USER_FEATURES = [
    "user_recent_behaviors:recent_behavior_ids",
    "user_embeddings:user_embedding",
]
PROFILE_CANDIDATES = ["age", "gender"]  # used when the dataset has them (user_profile is typed per dataset)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", type=Path, default=Path("feast_repo"), help="the Feast repository directory")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="llmfeat data dir (default: $LLMFEAT_DATA_DIR, else <repo>/data)")
    p.add_argument("--fs-yaml", default=None,
                   help="another feature_store yaml of the repo, e.g. production/feature_store.postgres.yaml")
    p.add_argument("--limit", type=int, default=5000, help="training interactions to pull (train split)")
    p.add_argument("--candidates", type=int, default=50, help="candidate items scored online")
    p.add_argument("--user-id", type=int, default=None,
                   help="user to serve (default: the first user of the test split)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# 1. Training rows: labelled interactions as the entity dataframe


def labelled_interactions(data_dir: Path, split: str, limit: int, seed: int) -> pd.DataFrame:
    """``limit`` rows of one split: user_id, item_id, event_timestamp (UTC), label."""
    table = pq.read_table(
        data_dir / "canonical" / "interactions.parquet",
        columns=["user_id", "item_id", "event_timestamp", "label", "split"],
    )
    table = table.filter(pc.equal(table["split"], split)).drop_columns(["split"])
    df = table.to_pandas()
    if len(df) > limit:
        df = df.sample(n=limit, random_state=seed)
    return df.sort_values("event_timestamp").reset_index(drop=True)


def profile_features(store) -> list[str]:
    """``user_profile`` fields this example can use (numeric ones, and gender as 0/1)."""
    view = store.get_feature_view("user_profile")
    names = {f.name for f in view.features}
    return [f"user_profile:{n}" for n in PROFILE_CANDIDATES if n in names]


# ---------------------------------------------------------------------------------------------
# 2. Feature frame -> numpy matrix (the same code for training and serving)


class BehaviorEmbeddings:
    """behavior_id -> embedding, looked up in the online store once per id.

    Atomic-behaviour embeddings depend only on the behaviour's text, never on time, so an online
    lookup is point-in-time safe for training rows too.
    """

    def __init__(self, store, dim: int):
        self.store, self.dim, self.cache = store, dim, {}

    def mean(self, id_lists) -> np.ndarray:
        wanted = sorted({int(b) for ids in id_lists if ids is not None for b in ids} - self.cache.keys())
        for start in range(0, len(wanted), 1000):
            chunk = wanted[start:start + 1000]
            got = self.store.get_online_features(
                features=["atomic_behavior_embeddings:behavior_embedding"],
                entity_rows=[{"behavior_id": b} for b in chunk],
            ).to_dict()["behavior_embedding"]
            for b, v in zip(chunk, got):
                self.cache[b] = np.asarray(v, np.float32) if v is not None else None
        out = np.zeros((len(id_lists), self.dim), np.float32)
        for row, ids in enumerate(id_lists):
            found = (self.cache.get(int(b)) for b in (ids if ids is not None else []))
            vecs = [v for v in found if v is not None]
            if vecs:
                out[row] = np.mean(vecs, axis=0)
        return out


def stack(column: pd.Series, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """A column of lists/arrays (None where missing) -> ``[N, dim]`` float32 and a presence mask."""
    present = np.array([v is not None and not (np.isscalar(v) and pd.isna(v)) and len(v) > 0 for v in column])
    mat = np.zeros((len(column), dim), np.float32)
    if present.any():
        mat[present] = np.stack([np.asarray(v, np.float32) for v, p in zip(column, present) if p])
    return mat, present


def feature_matrix(frame: pd.DataFrame, behaviors: BehaviorEmbeddings, dim: int) -> np.ndarray:
    """``[N, P + 3*dim]``: profile scalars, user vector, item embedding, their elementwise product."""
    item, _ = stack(frame["item_embedding"], dim)
    user, has_user = stack(frame["user_embedding"], dim)
    if not has_user.all():  # before finetune: the mean of the recent behaviours' embeddings
        fallback = behaviors.mean(list(frame["recent_behavior_ids"]))
        user[~has_user] = fallback[~has_user]
    scalars = []
    if "age" in frame:
        scalars.append(pd.to_numeric(frame["age"], errors="coerce").fillna(0).to_numpy(np.float32) / 100.0)
    if "gender" in frame:
        scalars.append((frame["gender"].astype(str).str.upper() == "F").to_numpy(np.float32))
    profile = np.stack(scalars, axis=1) if scalars else np.zeros((len(frame), 0), np.float32)
    return np.concatenate([profile, user, item, user * item], axis=1)


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from llm_features.store import open_store
    from llm_features.workspace import resolve_data_dir

    store = open_store(args.repo, args.data_dir, fs_yaml_file=args.fs_yaml)
    data_dir = resolve_data_dir(args.repo, args.data_dir)
    if "item_embeddings" not in {fv.name for fv in store.list_feature_views()}:
        print(f"error: {args.repo} is not applied; run `llmfeat feast apply && llmfeat feast materialize`",
              file=sys.stderr)
        return 2
    dim = store.get_feature_view("item_embeddings").features[0].vector_length
    features = ITEM_FEATURES + USER_FEATURES + profile_features(store)
    behaviors = BehaviorEmbeddings(store, dim)

    # -- training: point-in-time joined features for labelled interactions
    t0 = time.perf_counter()
    train_df = labelled_interactions(data_dir, "train", args.limit, args.seed)
    valid_df = labelled_interactions(data_dir, "valid", max(args.limit // 4, 1), args.seed)
    with warnings.catch_warnings():  # ibis calls a deprecated duckdb method; harmless
        warnings.simplefilter("ignore", DeprecationWarning)
        train = store.get_historical_features(entity_df=train_df, features=features).to_df()
        valid = store.get_historical_features(entity_df=valid_df, features=features).to_df()
    assert len(train) == len(train_df) and len(valid) == len(valid_df), "an entity row was dropped"
    x_train, y_train = feature_matrix(train, behaviors, dim), train["label"].to_numpy()
    x_valid, y_valid = feature_matrix(valid, behaviors, dim), valid["label"].to_numpy()
    print(f"[historical] train rows={len(train)} valid rows={len(valid)} features={x_train.shape[1]} "
          f"({len(features)} feast features, {time.perf_counter() - t0:.1f}s)")

    if len(np.unique(y_train)) < 2:
        print("error: the training rows have a single label; raise --limit", file=sys.stderr)
        return 2
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, C=0.1))
    model.fit(x_train, y_train)
    auc = float("nan")
    if len(np.unique(y_valid)) == 2:
        auc = roc_auc_score(y_valid, model.predict_proba(x_valid)[:, 1])
    print(f"[train] logistic regression on [user features | item embedding | user x item]: "
          f"valid AUC={auc:.3f}")

    # -- serving: online features for one user and candidate items, the same matrix, scored
    test = labelled_interactions(data_dir, "test", 10**9, args.seed)
    user_id = args.user_id
    if user_id is None:
        user_id = int((test if len(test) else train_df)["user_id"].iloc[0])
    items = pq.read_table(data_dir / "canonical" / "items.parquet", columns=["item_id"])["item_id"].to_numpy()
    rng = np.random.default_rng(args.seed)
    seen = pd.unique(test.loc[test["user_id"] == user_id, "item_id"])  # the items the user went on to rate
    pool = np.setdiff1d(items, seen)
    n_random = max(args.candidates - len(seen[: args.candidates]), 0)
    others = rng.choice(pool, size=min(n_random, len(pool)), replace=False)
    candidates = np.concatenate([seen[: args.candidates], others]).astype(np.int64)
    t0 = time.perf_counter()
    rows = [{"user_id": user_id, "item_id": int(i)} for i in candidates]
    online = store.get_online_features(features=features, entity_rows=rows).to_df()
    x_online = feature_matrix(online, behaviors, dim)
    scores = model.predict_proba(x_online)[:, 1]
    ms = (time.perf_counter() - t0) * 1000
    print(f"[online] user={user_id} candidates={len(candidates)} matrix={x_online.shape} ({ms:.0f} ms)")
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
