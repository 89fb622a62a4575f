"""A gradient-boosted tree ranker (LightGBM) with compact LLM features from a Feast on-demand view.

Instead of hundreds of raw embedding columns, this example gives the tree model a few numbers
derived from llmfeat's embeddings: the cosine between the user's and the item's embedding, and the
first principal components of each. A Feast **on-demand feature view** (ODFV) computes
them from ``user_embeddings:user_embedding`` and ``item_embeddings:item_embedding`` whenever they
are read. Training (``get_historical_features``, point in time) and serving
(``get_online_features``) therefore run the same code on the same inputs, with no training/serving
skew to maintain by hand. The script checks this on the served candidates (the two paths agree
when the online store is materialised up to date).

The flow, with plain Feast calls:

1. ``get_historical_features`` for a sample of training interactions, embeddings only. Fit the
   principal axes (numpy SVD) of the user and the item embeddings. No labels are used, and only
   train-split rows.
2. Define the ODFV with those axes baked into its function and register it with
   ``store.apply([odfv])``, the Python equivalent of adding it to a repo and running ``feast apply``.
3. ``get_historical_features`` for the train, valid and test interactions, reading the usual
   features (profile, item genres, the user's recent labels) and the ODFV's. Train two LightGBM
   models, one without and one with the LLM features, early-stopped on valid. Print each one's
   test AUC and the paired difference with a bootstrap interval over test rows. That is all the
   comparison measures: these rows, this data, these two feature sets.
4. ``get_online_features`` for one user and N candidate items: the same frame -> the same
   columns -> scores. The same rows are also read offline "as of now", and the ODFV values are
   compared.

Why the ODFV is defined here and not in ``feast_repo/feature_definitions.py``: its function
carries a projection fitted on this workspace's embeddings. It belongs to this model and is
versioned with it, while the shipped repo definitions are data-independent. The script registers
it next to the repo's views in the same registry, tagged with the embedding model's fingerprint.
``feast apply`` / ``llmfeat feast apply`` of the repo mirrors the repo and removes objects it does
not define, so it removes this view. The script re-registers it on every run, and a serving
process should register the view it was trained with at deployment. To keep such a view
permanently, put its definition, with the fitted axes written into it, in a module of your
feature repo.

Feast 0.67 rebuilds an ODFV's function from its source text when it reads the registry (with only
``np`` and ``pd`` in scope), so a closure or a module-level constant does not survive the round
trip: the fitted means and axes are written into the function's source (``UDF_TEMPLATE``).

``user_embedding`` exists after ``llmfeat finetune`` and ``llmfeat embed-users``. Rows without one
get NaN LLM features, which LightGBM handles as missing; the script prints how many rows that is.

Prerequisite: an applied and materialised repository, e.g. after ``make demo``, or::

    llmfeat ingest --source ml-100k && llmfeat encode && llmfeat finetune && llmfeat embed-users
    llmfeat feast apply && llmfeat feast materialize

Run (``pip install -e '.[examples]'`` installs LightGBM and scikit-learn)::

    python examples/lightgbm_ranker_with_llm_features.py --repo feast_repo --data-dir feast_repo/data
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.parquet as pq

EMBEDDINGS = ["user_embeddings:user_embedding", "item_embeddings:item_embedding"]
# used when the dataset has them (user_profile is typed per dataset)
PROFILE_CANDIDATES = ["age", "gender", "occupation"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", type=Path, default=Path("feast_repo"), help="the Feast repository directory")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="llmfeat data dir (default: $LLMFEAT_DATA_DIR, else <repo>/data)")
    p.add_argument("--fs-yaml", default=None,
                   help="another feature_store yaml of the repo, e.g. production/feature_store.postgres.yaml")
    p.add_argument("--limit", type=int, default=20000, help="training interactions to pull (train split)")
    p.add_argument("--eval-limit", type=int, default=10000, help="valid and test interactions to pull (each)")
    p.add_argument("--pca-rows", type=int, default=5000,
                   help="training rows the principal axes are fitted on")
    p.add_argument("--components", type=int, default=4, help="principal components of each embedding")
    p.add_argument("--view-name", default="user_item_llm", help="name of the on-demand feature view")
    p.add_argument("--candidates", type=int, default=50, help="candidate items scored online")
    p.add_argument("--user-id", type=int, default=None,
                   help="user to serve (default: the first user of the test split)")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for the AUC interval")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Labelled interactions: the entity dataframes


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


def historical(store, entity_df: pd.DataFrame, features: list[str]) -> pd.DataFrame:
    with warnings.catch_warnings():  # ibis calls a deprecated duckdb method; harmless
        warnings.simplefilter("ignore", DeprecationWarning)
        out = store.get_historical_features(entity_df=entity_df, features=features).to_df()
    if len(out) != len(entity_df):
        raise RuntimeError(f"get_historical_features returned {len(out)} rows for {len(entity_df)}")
    # The entity columns (label too) come back with each row, in an order the offline store chooses
    # (it can differ between runs); sort so that training sees the same rows in the same order.
    keys = [c for c in ("event_timestamp", "user_id", "item_id", "label") if c in out]
    return out.sort_values(keys, kind="stable").reset_index(drop=True)


def stack(column: pd.Series, dim: int) -> np.ndarray:
    """A column of vectors (lists or arrays; None/NaN where missing) -> ``[N, dim]`` float64, NaN rows
    where missing."""
    out = np.full((len(column), dim), np.nan)
    for row, v in enumerate(column):
        if isinstance(v, (list, tuple, np.ndarray)) and len(v) == dim:
            out[row] = np.asarray(v, np.float64)
    return out


# ---------------------------------------------------------------------------------------------
# 1. Principal axes of the embeddings (unsupervised, train rows only)


def principal_axes(vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, float]:
    """(mean [dim], axes [k, dim], explained variance fraction) of the distinct rows of ``vectors``."""
    x = np.unique(vectors[~np.isnan(vectors).any(axis=1)], axis=0)
    if len(x) < 2:
        raise SystemExit("error: fewer than 2 distinct embeddings among the training rows; "
                         "run `llmfeat embed-users` (user embeddings) and `llmfeat feast materialize`")
    mean = x.mean(axis=0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    k = min(k, vt.shape[0])
    return mean, vt[:k], float((s[:k] ** 2).sum() / max((s**2).sum(), 1e-30))


# ---------------------------------------------------------------------------------------------
# 2. The on-demand feature view


def llm_feature_names(k: int) -> list[str]:
    return ["user_item_cosine"] + [f"user_pc_{j}" for j in range(k)] + [f"item_pc_{j}" for j in range(k)]


# The ODFV's function, as Feast stores it. Feast 0.67 rebuilds an ODFV's function from its SOURCE
# TEXT when it reads the registry (feast/transformation/udf_rehydrate.py: exec with only np and pd
# in scope; the dill bytes are a fallback), so a closure or a module-level constant does not
# survive the round trip. The fitted means and axes are therefore written into the source.
UDF_TEMPLATE = '''
def {name}(inputs):
    import numpy as np
    import pandas as pd

    user_mean = np.array({user_mean})
    user_axes = np.array({user_axes})
    item_mean = np.array({item_mean})
    item_axes = np.array({item_axes})

    def matrix(column, dim):
        # Missing embeddings arrive as None (online) or NaN (offline); a vector of another
        # width (e.g. Feast's type-inference probe at apply) is treated as missing too.
        out = np.full((len(column), dim), np.nan)
        for row, v in enumerate(column):
            if isinstance(v, (list, tuple, np.ndarray)) and len(v) == dim:
                out[row] = np.asarray(v, np.float64)
        return out

    u = matrix(inputs["user_embedding"], user_mean.shape[0])
    i = matrix(inputs["item_embedding"], item_mean.shape[0])
    with np.errstate(invalid="ignore", divide="ignore"):
        cosine = (u * i).sum(axis=1) / (np.linalg.norm(u, axis=1) * np.linalg.norm(i, axis=1))
    columns = {{"user_item_cosine": cosine}}
    user_pcs, item_pcs = (u - user_mean) @ user_axes.T, (i - item_mean) @ item_axes.T
    for j in range(user_axes.shape[0]):
        columns["user_pc_%d" % j] = user_pcs[:, j]
    for j in range(item_axes.shape[0]):
        columns["item_pc_%d" % j] = item_pcs[:, j]
    return pd.DataFrame(columns, index=inputs.index)
'''


def _literal(a) -> str:
    """A 1-d or 2-d array as a Python list literal of float32 values (the embeddings' precision), each
    written with the fewest digits that read back as the same float32."""
    a = np.asarray(a, np.float32)
    if a.ndim == 1:
        return "[" + ", ".join(str(x) for x in a) + "]"
    return "[" + ", ".join(_literal(row) for row in a) + "]"


def make_llm_view(store, name: str, user_axes, item_axes, tags: dict[str, str]):
    """An ODFV over the two embedding views: cosine(user, item) and k principal components of each."""
    from feast import Field
    from feast.on_demand_feature_view import OnDemandFeatureView
    from feast.types import Float64

    (user_mean, user_comp), (item_mean, item_comp) = user_axes, item_axes
    source = UDF_TEMPLATE.format(
        name=name, user_mean=_literal(user_mean), user_axes=_literal(user_comp),
        item_mean=_literal(item_mean), item_axes=_literal(item_comp),
    ).lstrip()
    namespace: dict = {"__name__": "__main__"}
    exec(source, namespace)  # the same function object Feast will rebuild from `source`
    return OnDemandFeatureView(
        name=name,
        sources=[store.get_feature_view("user_embeddings"), store.get_feature_view("item_embeddings")],
        schema=[Field(name=n, dtype=Float64) for n in llm_feature_names(user_comp.shape[0])],
        udf=namespace[name],
        udf_string=source,
        mode="pandas",
        description="cosine(user_embedding, item_embedding) and principal components of each, "
        "computed at read time (examples/lightgbm_ranker_with_llm_features.py)",
        tags=tags,
    )


# ---------------------------------------------------------------------------------------------
# 3. Feature frame -> LightGBM columns (the same code for training and serving)


class Columns:
    """Turns a Feast feature frame (historical or online) into the model's columns.

    Vocabularies (item ids, occupations, genres) come from the training frame and are reused at
    serving; an id or value not seen in training is missing (NaN) for the model.
    """

    def __init__(self, train: pd.DataFrame, llm_names: list[str]):
        self.llm_names = llm_names
        self.item_ids = sorted(int(i) for i in train["item_id"].unique())
        self.occupations = (
            sorted(train["occupation"].dropna().astype(str).unique()) if "occupation" in train else None
        )
        genres = set()
        if "item_genres" in train:
            for g in train["item_genres"]:
                if isinstance(g, (list, tuple, np.ndarray)):
                    genres.update(str(x) for x in g)
        self.genres = sorted(genres)

    def __call__(self, frame: pd.DataFrame, with_llm: bool) -> pd.DataFrame:
        out = {"item_id": pd.Categorical(frame["item_id"].astype(int), categories=self.item_ids)}
        if "age" in frame:
            out["age"] = pd.to_numeric(frame["age"], errors="coerce").astype(float).to_numpy()
        if "gender" in frame:
            g = frame["gender"].astype("string").str.upper()
            out["gender_f"] = np.where(g.isna(), np.nan, (g == "F").astype(float))
        if self.occupations is not None:
            occ = frame["occupation"].astype("string").astype(object).where(frame["occupation"].notna())
            out["occupation"] = pd.Categorical(occ, categories=self.occupations)
        genre_lists = frame["item_genres"] if "item_genres" in frame else [None] * len(frame)
        sets = [set(map(str, g)) if isinstance(g, (list, tuple, np.ndarray)) else set() for g in genre_lists]
        for genre in self.genres:
            out[f"genre={genre}"] = np.array([genre in s for s in sets], float)
        labels = [np.asarray(v, float) if isinstance(v, (list, tuple, np.ndarray)) else np.zeros(0)
                  for v in frame["recent_labels"]]
        out["recent_count"] = np.array([len(v) for v in labels], float)
        out["recent_positive_rate"] = np.array([v.mean() if len(v) else np.nan for v in labels])
        if with_llm:
            for name in self.llm_names:
                out[name] = pd.to_numeric(frame[name], errors="coerce").astype(float).to_numpy()
        return pd.DataFrame(out, index=frame.index)


def train_lightgbm(x_train, y_train, x_valid, y_valid, seed: int):
    import lightgbm as lgb

    model = lgb.LGBMClassifier(
        n_estimators=1000, learning_rate=0.05, num_leaves=15, min_child_samples=20,
        subsample=0.8, subsample_freq=1, colsample_bytree=0.8, random_state=seed,
        deterministic=True, force_row_wise=True, verbose=-1,
    )
    model.fit(x_train, y_train, eval_X=(x_valid,), eval_y=(y_valid,), eval_metric="auc",
              callbacks=[lgb.early_stopping(50, verbose=False)])
    return model


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
    views = {fv.name: fv for fv in store.list_feature_views()}
    if "item_embeddings" not in views:
        print(f"error: {args.repo} is not applied; run `llmfeat feast apply && llmfeat feast materialize`",
              file=sys.stderr)
        return 2
    dim = views["item_embeddings"].features[0].vector_length
    profile = [f"user_profile:{f.name}" for f in views["user_profile"].features
               if f.name in PROFILE_CANDIDATES]
    genres = [f"item_profile:{f.name}" for f in views["item_profile"].features if f.name == "item_genres"]
    base_features = profile + genres + ["user_recent_behaviors:recent_labels"]

    # -- 1. principal axes from the training rows' embeddings
    t0 = time.perf_counter()
    train_df = labelled_interactions(data_dir, "train", args.limit, args.seed)
    valid_df = labelled_interactions(data_dir, "valid", args.eval_limit, args.seed)
    test_df = labelled_interactions(data_dir, "test", args.eval_limit, args.seed)
    pca_df = train_df.sample(n=min(args.pca_rows, len(train_df)), random_state=args.seed)
    emb = historical(store, pca_df, EMBEDDINGS)
    user_axes = principal_axes(stack(emb["user_embedding"], dim), args.components)
    item_axes = principal_axes(stack(emb["item_embedding"], dim), args.components)
    k = user_axes[1].shape[0]
    print(f"[pca] {k} principal components of the user and the item embeddings (dim={dim}) from "
          f"{len(emb)} training rows: explained variance user={user_axes[2]:.2f} item={item_axes[2]:.2f}")

    # -- 2. the on-demand feature view, registered next to the repo's views
    tags = {"fitted_by": "examples/lightgbm_ranker_with_llm_features.py",
            "llmfeat_fingerprint": views["item_embeddings"].tags.get("llmfeat_fingerprint", "none"),
            "components": str(k)}
    odfv = make_llm_view(store, args.view_name, user_axes[:2], item_axes[:2], tags)
    with warnings.catch_warnings():  # "On demand feature view is an experimental feature": we know
        warnings.simplefilter("ignore", RuntimeWarning)
        store.apply([odfv])
    # read the registry again: a fetch answered from a registry cache taken before the apply would not
    # know the new view (a request for an unknown view's features can come back without them)
    store.refresh_registry()
    llm_names = llm_feature_names(k)
    llm_features = [f"{args.view_name}:{n}" for n in llm_names]
    print(f"[feast] applied on-demand feature view {args.view_name}: {', '.join(llm_names)}")

    # -- 3. training data point in time, the ODFV computed by Feast
    features = base_features + llm_features
    train = historical(store, train_df, features)
    valid = historical(store, valid_df, features)
    test = historical(store, test_df, features)
    absent = [n for n in llm_names if n not in train.columns]
    if absent:
        raise RuntimeError(f"get_historical_features returned no {', '.join(absent)}: is {args.view_name} registered?")
    missing = int(train["user_item_cosine"].isna().sum())
    print(f"[historical] train rows={len(train)} valid rows={len(valid)} test rows={len(test)} "
          f"({time.perf_counter() - t0:.1f}s); train rows without a user or item embedding: {missing}")
    y_train, y_valid, y_test = (f["label"].to_numpy() for f in (train, valid, test))
    if len(np.unique(y_train)) < 2 or len(np.unique(y_valid)) < 2 or len(np.unique(y_test)) < 2:
        print("error: a split has a single label; raise --limit / --eval-limit", file=sys.stderr)
        return 2

    columns = Columns(train, llm_names)
    results = {}
    for with_llm in (False, True):
        model = train_lightgbm(columns(train, with_llm), y_train, columns(valid, with_llm), y_valid,
                               args.seed)
        p_test = model.predict_proba(columns(test, with_llm))[:, 1]
        results[with_llm] = (model, p_test, roc_auc_score(y_test, p_test))
        label = "with LLM features   " if with_llm else "without LLM features"
        print(f"[train] LightGBM {label}: columns={model.n_features_in_} trees={model.best_iteration_ or 0} "
              f"test AUC={results[with_llm][2]:.4f}")
    lo, hi = paired_bootstrap(y_test, results[False][1], results[True][1], args.bootstrap, args.seed)
    print(f"[result] test AUC with minus without LLM features: {results[True][2] - results[False][2]:+.4f} "
          f"[95% bootstrap over {len(y_test)} test rows: {lo:+.4f}, {hi:+.4f}]")
    model = results[True][0]
    gain = pd.Series(model.booster_.feature_importance("gain"), index=model.booster_.feature_name())
    top = gain.sort_values(ascending=False).head(5)
    print("[train] largest split gain: " + ", ".join(f"{n} {v / gain.sum():.0%}" for n, v in top.items()))

    # -- 4. serving: online features for one user and candidate items, the same columns, scored
    test_all = labelled_interactions(data_dir, "test", 10**9, args.seed)
    user_id = args.user_id if args.user_id is not None else int(test_all["user_id"].iloc[0])
    items = pq.read_table(data_dir / "canonical" / "items.parquet", columns=["item_id"])["item_id"].to_numpy()
    rng = np.random.default_rng(args.seed)
    seen = pd.unique(test_all.loc[test_all["user_id"] == user_id, "item_id"])[: args.candidates]
    pool = np.setdiff1d(items, seen)
    others = rng.choice(pool, size=min(max(args.candidates - len(seen), 0), len(pool)), replace=False)
    candidates = np.concatenate([seen, others]).astype(np.int64)
    t0 = time.perf_counter()
    online = store.get_online_features(
        features=features, entity_rows=[{"user_id": user_id, "item_id": int(i)} for i in candidates]
    ).to_df()
    scores = model.predict_proba(columns(online, True))[:, 1]
    ms = (time.perf_counter() - t0) * 1000
    print(f"[online] user={user_id} candidates={len(candidates)} ({ms:.0f} ms, on-demand features included)")

    # the same rows offline, as of now: the ODFV must give the same numbers on both paths
    now = pd.Timestamp(datetime.now(timezone.utc))
    asof = pd.DataFrame({"user_id": user_id, "item_id": candidates, "event_timestamp": now})
    offline = historical(store, asof, llm_features).set_index("item_id").loc[candidates]
    a, b = online[llm_names].to_numpy(float), offline[llm_names].to_numpy(float)
    same_nan = bool((np.isnan(a) == np.isnan(b)).all())
    diff = float(np.nanmax(np.abs(a - b))) if (~np.isnan(a)).any() else 0.0
    print(f"[skew] {args.view_name} online vs get_historical_features as of now: "
          f"max |difference|={diff:.2e}, missing in the same places: {same_nan}")
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
