"""Synthetic feature rows shaped like Feast's ``get_historical_features`` output.

For the tests (a ranker without a feature store): labels carry a planted
signal (``sigmoid(signal * cos(u, v) + item_bias)`` over hidden user and item vectors) and the "LLM"
embeddings are noisy views of those vectors, so a model that reads them beats one that does not.
"""

from __future__ import annotations

from collections import defaultdict, deque

import numpy as np
import pandas as pd

from llm_features.attributes import LEGACY

ENTITY_COLUMNS = ["user_id", "item_id", "event_timestamp", "label", "split"]
# The attributes of the synthetic rows, declared as MovieLens declares them (zip: first 2 characters).
SYNTHETIC_ATTRIBUTES = [*LEGACY["user"], *LEGACY["item"]]
_GENRES = ["Action", "Comedy", "Drama", "Horror", "Romance", "Sci-Fi"]


def synthetic_rows(
    n_users: int = 200,
    n_items: int = 100,
    n_rows: int = 4000,
    dim: int = 8,
    seed: int = 0,
    missing_user_embedding: float = 0.1,
    missing_item_embedding: float = 0.05,
    history: int = 10,
    signal: float = 3.0,
) -> pd.DataFrame:
    """``n_rows`` labelled interactions in time order, with every feature of ``ranker_llm``.

    Splits are 80/10/10 by time. User embeddings are missing for a share of rows (and always
    on a user's first interaction), item embeddings for a share of items.
    """
    rng = np.random.default_rng(seed)
    u = rng.normal(size=(n_users, dim))
    v = rng.normal(size=(n_items, dim))
    item_bias = rng.normal(scale=0.5, size=n_items)
    u_emb = (u + 0.3 * rng.normal(size=u.shape)).astype(np.float32)
    v_emb = (v + 0.3 * rng.normal(size=v.shape)).astype(np.float32)
    item_has_emb = rng.random(n_items) >= missing_item_embedding

    users = rng.integers(0, n_users, n_rows)
    items = rng.integers(0, n_items, n_rows)
    cos = (u[users] * v[items]).sum(1) / (np.linalg.norm(u[users], axis=1) * np.linalg.norm(v[items], axis=1))
    prob = 1 / (1 + np.exp(-(signal * cos + item_bias[items])))
    labels = (rng.random(n_rows) < prob).astype(np.int8)

    genders = rng.choice(["M", "F"], n_users)
    ages = rng.choice([18, 25, 35, 45], n_users)
    occupations = rng.integers(0, 20, n_users)
    zips = np.array([f"{z:05d}" for z in rng.integers(0, 99999, n_users)])
    genres = [np.array(sorted(set(rng.choice(_GENRES, rng.integers(1, 3)))), dtype=object) for _ in range(n_items)]

    past: dict[int, deque] = defaultdict(lambda: deque(maxlen=history))
    recent_items, recent_labels, user_vecs = [], [], []
    for uid, iid, y in zip(users, items, labels):
        h = past[uid]
        recent_items.append(np.array([i for i, _ in h], np.int64))
        recent_labels.append(np.array([lab for _, lab in h], np.int32))
        first = len(h) == 0
        user_vecs.append(None if first or rng.random() < missing_user_embedding else u_emb[uid])
        h.append((int(iid) + 1, int(y)))

    ts = pd.Timestamp("2000-01-01", tz="UTC") + pd.to_timedelta(np.arange(n_rows), unit="s")
    split = np.where(np.arange(n_rows) < 0.8 * n_rows, "train",
                     np.where(np.arange(n_rows) < 0.9 * n_rows, "valid", "test"))
    return pd.DataFrame({
        "user_id": users.astype(np.int64) + 1,
        "item_id": items.astype(np.int64) + 1,
        "event_timestamp": ts,
        "label": labels,
        "split": split,
        "gender": genders[users],
        "age": ages[users].astype(np.int64),
        "occupation": occupations[users].astype(np.int64),
        "zip": zips[users],
        "item_genres": [genres[i] for i in items],
        "recent_item_ids": recent_items,
        "recent_labels": recent_labels,
        "user_embedding": user_vecs,
        "item_embedding": [v_emb[i] if item_has_emb[i] else None for i in items],
        "true_probability": prob,  # the planted click probability (for oracle metrics; not a feature)
    })


class SyntheticFeatureSource:
    """Stands in for ``get_historical_features``: entity rows in, their feature rows out."""

    def __init__(self, rows: pd.DataFrame, attributes=None) -> None:
        self.features = rows.drop(columns=["label", "split", "true_probability"], errors="ignore")
        self.attributes = list(SYNTHETIC_ATTRIBUTES if attributes is None else attributes)

    def __call__(self, entity_df: pd.DataFrame) -> pd.DataFrame:
        return entity_df.merge(self.features, on=["user_id", "item_id", "event_timestamp"], how="left")
