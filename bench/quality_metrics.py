"""Simple baselines, test-row slices and paired/seed statistics for ``bench/bench_quality.py``.

Issue 14 (quality benchmark) asks whether the LLM features help a ranker beyond what cheap
baselines already get, where they help (cold users and items), and whether a difference is larger
than its noise. Interaction frames have columns ``user_id, item_id, event_timestamp, label, split``.

- Baselines fit on train rows and return float64 scores aligned with the rows they score (higher =
  more likely positive): :func:`item_positive_rate`, :func:`user_item_positive_rate`,
  :func:`recent_positive_rate`, :func:`matrix_factorization`, all four via :func:`simple_baselines`.
- :func:`slice_masks` splits test rows by how much train history their user and item have.
- :func:`paired_bootstrap` puts a 95% interval on a metric difference by resampling users (rows of
  one user are correlated, so resampling rows would make the interval too narrow).
- :func:`seed_summary` combines the results of several training seeds with a t-interval.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd
import torch

from llm_features.metrics import mean_per_user_auc, per_user_aucs, roc_auc

_EPS = 1e-6
# two-sided 95% quantiles of Student's t for df 1..30 (used when scipy is missing)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def _global_rate(train: pd.DataFrame) -> float:
    """Train positive rate, the prior of every smoothed rate (0.5 without train rows)."""
    return float(train["label"].astype(np.float64).mean()) if len(train) else 0.5


def _smoothed(train: pd.DataFrame, key: str, keys: pd.Series, prior: float, g: float) -> np.ndarray:
    """Rate (pos + prior*g) / (n + prior) of each ``keys`` value in ``train``; g when never seen."""
    stats = train.groupby(key)["label"].agg(["sum", "size"])
    rate = (stats["sum"].astype(np.float64) + prior * g) / (stats["size"] + prior)
    return keys.map(rate).fillna(g).to_numpy(dtype=np.float64)


def _logit(p: np.ndarray | float) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


def item_positive_rate(train: pd.DataFrame, rows: pd.DataFrame, prior: float = 20) -> np.ndarray:
    """Smoothed train positive rate of each row's item: the "popular items win" baseline."""
    return _smoothed(train, "item_id", rows["item_id"], prior, _global_rate(train))


def user_item_positive_rate(train: pd.DataFrame, rows: pd.DataFrame, prior: float = 20) -> np.ndarray:
    """Additive log-odds model logit(user rate) + logit(item rate) - logit(global rate).

    It adds the user's own propensity to the item baseline, which pooled AUC rewards a lot.
    """
    g = _global_rate(train)
    u = _smoothed(train, "user_id", rows["user_id"], prior, g)
    i = _smoothed(train, "item_id", rows["item_id"], prior, g)
    return _logit(u) + _logit(i) - _logit(g)


def _ns(stamps: pd.Series) -> np.ndarray:
    """UTC nanoseconds as int64, whatever the unit or time zone of the column."""
    return pd.DatetimeIndex(pd.to_datetime(stamps, utc=True)).as_unit("ns").asi8


def recent_positive_rate(history: pd.DataFrame, rows: pd.DataFrame, n: int = 30,
                         prior: float = 5) -> np.ndarray:
    """Smoothed positive rate of the user's last ``n`` interactions strictly before each row.

    ``history`` holds the rows of ALL splits: at serving time the label of an earlier interaction is
    known, whatever split it fell in. Interactions at the same timestamp are not "before". The
    prior is the global train rate (the rate of ``history``'s train rows), which is also the score
    of a user without earlier interactions. Among history rows with equal timestamps at the edge of
    the window, those earlier in ``history`` count as older.
    """
    train = history[history["split"] == "train"] if "split" in history else history
    g = _global_rate(train)
    users = pd.Index(pd.unique(np.concatenate([history["user_id"].to_numpy(), rows["user_id"].to_numpy()])))
    h_ts, r_ts = _ns(history["event_timestamp"]), _ns(rows["event_timestamp"])
    stamps, ts_rank = np.unique(np.concatenate([h_ts, r_ts]), return_inverse=True)
    width = np.int64(len(stamps) + 1)  # (user, time) pairs as one sortable int64 key
    h_key = users.get_indexer(history["user_id"]).astype(np.int64) * width + ts_rank[: len(h_ts)]
    r_user = users.get_indexer(rows["user_id"]).astype(np.int64)
    r_key = r_user * width + ts_rank[len(h_ts):]
    order = np.argsort(h_key, kind="stable")
    h_key = h_key[order]
    cum = np.concatenate([[0.0], np.cumsum(history["label"].to_numpy(dtype=np.float64)[order])])
    end = np.searchsorted(h_key, r_key, side="left")  # first history row not strictly before
    first = np.searchsorted(h_key, r_user * width, side="left")  # the user's first history row
    start = np.maximum(first, end - n)
    return (cum[end] - cum[start] + prior * g) / ((end - start) + prior)


def matrix_factorization(train: pd.DataFrame, rows: pd.DataFrame, dim: int = 32, epochs: int = 8,
                         lr: float = 0.01, weight_decay: float = 1e-5, batch_size: int = 4096,
                         seed: int = 0) -> np.ndarray:
    """Logistic MF (dot product + user/item/global bias, BCE, Adam): the classic collaborative baseline.

    Index 0 is the unknown user/item: a zero vector and a zero bias (``padding_idx`` keeps them zero),
    so a cold row scores the global bias plus the known side's bias. Returns logits.
    """
    gen = torch.Generator().manual_seed(seed)  # every draw comes from it: the global RNG is left alone
    u_vocab = pd.Index(pd.unique(train["user_id"]))
    i_vocab = pd.Index(pd.unique(train["item_id"]))

    def ids(vocab: pd.Index, values: pd.Series) -> torch.Tensor:
        return torch.from_numpy(vocab.get_indexer(values).astype(np.int64) + 1)  # -1 (unknown) -> 0

    emb_u = torch.nn.Embedding(len(u_vocab) + 1, dim, padding_idx=0)
    emb_i = torch.nn.Embedding(len(i_vocab) + 1, dim, padding_idx=0)
    bias_u = torch.nn.Embedding(len(u_vocab) + 1, 1, padding_idx=0)
    bias_i = torch.nn.Embedding(len(i_vocab) + 1, 1, padding_idx=0)
    with torch.no_grad():
        for emb in (emb_u, emb_i):
            emb.weight.normal_(0.0, 0.01, generator=gen)
            emb.weight[0].zero_()
        bias_u.weight.zero_()
        bias_i.weight.zero_()
    bias = torch.nn.Parameter(torch.tensor(float(_logit(_global_rate(train)))))
    params = [*emb_u.parameters(), *emb_i.parameters(), *bias_u.parameters(), *bias_i.parameters(), bias]

    def forward(u: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        return (emb_u(u) * emb_i(i)).sum(-1) + bias_u(u)[:, 0] + bias_i(i)[:, 0] + bias

    tu, ti = ids(u_vocab, train["user_id"]), ids(i_vocab, train["item_id"])
    ty = torch.from_numpy(train["label"].to_numpy(dtype=np.float32))
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    for _ in range(epochs):
        perm = torch.randperm(len(ty), generator=gen)
        for b in perm.split(batch_size):
            opt.zero_grad()
            torch.nn.functional.binary_cross_entropy_with_logits(forward(tu[b], ti[b]), ty[b]).backward()
            opt.step()
    with torch.no_grad():
        out = forward(ids(u_vocab, rows["user_id"]), ids(i_vocab, rows["item_id"]))
    return out.numpy().astype(np.float64)


def simple_baselines(frame: pd.DataFrame, split: str = "test", mf_epochs: int = 8,
                     seed: int = 0) -> dict[str, np.ndarray]:
    """Scores of all four baselines for the ``split`` rows of ``frame`` (all splits), in frame order."""
    train = frame[frame["split"] == "train"]
    rows = frame[frame["split"] == split]
    return {
        "item_positive_rate": item_positive_rate(train, rows),
        "user_item_positive_rate": user_item_positive_rate(train, rows),
        "recent_positive_rate_30": recent_positive_rate(frame, rows, n=30),
        "matrix_factorization": matrix_factorization(train, rows, epochs=mf_epochs, seed=seed),
    }


def slice_masks(train: pd.DataFrame, rows: pd.DataFrame, few: int = 20) -> dict[str, np.ndarray]:
    """Boolean masks over ``rows`` by train history, where LLM features are expected to help most.

    "unseen_users" (no train row) and "few_train_users" (1..few-1 train rows) are disjoint;
    "few_train_items" (item with < few train rows, 0 included) may overlap both; "rest" is the rows
    in none of the three.
    """
    u = rows["user_id"].map(train["user_id"].value_counts()).fillna(0).to_numpy()
    i = rows["item_id"].map(train["item_id"].value_counts()).fillna(0).to_numpy()
    masks = {"unseen_users": u == 0, "few_train_users": (u >= 1) & (u < few), "few_train_items": i < few}
    masks["rest"] = ~(masks["unseen_users"] | masks["few_train_users"] | masks["few_train_items"])
    return masks


def _user_counts(n_users: int, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """Per replicate, each user's multiplicity: replicate r draws ``rng.integers(0, n_users, n_users)``."""
    rng = np.random.default_rng(seed)
    for _ in range(n_boot):
        yield np.bincount(rng.integers(0, n_users, n_users), minlength=n_users).astype(np.float64)


def _dense_rank(scores: np.ndarray) -> tuple[np.ndarray, int]:
    """(dense rank of each score, number of distinct scores): equal scores share a rank (ties)."""
    values, inv = np.unique(np.asarray(scores, dtype=np.float64), return_inverse=True)
    return inv.ravel(), len(values)


def _weighted_auc(g_pos: np.ndarray, g_neg: np.ndarray, w_pos: np.ndarray, w_neg: np.ndarray,
                  n_groups: int) -> float:
    """ROC AUC (ties averaged) where each row counts its weight times.

    ``g_pos``/``g_neg`` are the dense score ranks of the positive/negative rows, ``w_pos``/``w_neg``
    their weights: one pass of bincount + cumsum instead of re-sorting the resampled rows.
    """
    wp = np.bincount(g_pos, w_pos, minlength=n_groups)
    wn = np.bincount(g_neg, w_neg, minlength=n_groups)
    tot_p, tot_n = wp.sum(), wn.sum()
    if tot_p == 0 or tot_n == 0:
        return float("nan")
    below = np.cumsum(wn) - wn  # negative weight strictly below each score
    return float((wp * (below + 0.5 * wn)).sum() / (tot_p * tot_n))


def _bootstrap_diffs(users: np.ndarray, labels: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray,
                     n_boot: int, seed: int, metric: str) -> np.ndarray:
    """metric(b) - metric(a) on each of ``n_boot`` user resamples (users ordered by sorted id)."""
    uniq, uidx = np.unique(np.asarray(users), return_inverse=True)
    draws = _user_counts(len(uniq), n_boot, seed)
    if metric == "per_user_auc":  # per-user AUCs once, then their multiplicity-weighted mean
        ids_a, auc_a = per_user_aucs(users, labels, scores_a)
        ids_b, auc_b = per_user_aucs(users, labels, scores_b)
        assert np.array_equal(ids_a, ids_b)  # the users with both classes depend on labels only
        cols, diff = np.searchsorted(uniq, ids_a), auc_b - auc_a
        weights = (w[cols] for w in draws)
        out = [float(w @ diff / w.sum()) if w.sum() else math.nan for w in weights]
        return np.asarray(out, dtype=np.float64)
    # pooled AUC: score ranks once, then per replicate a weighted AUC with the rows' user multiplicities
    pos = np.asarray(labels).astype(bool)
    (ga, na), (gb, nb) = _dense_rank(scores_a), _dense_rank(scores_b)
    ga_p, ga_n, gb_p, gb_n, u_p, u_n = ga[pos], ga[~pos], gb[pos], gb[~pos], uidx[pos], uidx[~pos]
    out = [_weighted_auc(gb_p, gb_n, w[u_p], w[u_n], nb) - _weighted_auc(ga_p, ga_n, w[u_p], w[u_n], na)
           for w in draws]
    return np.asarray(out, dtype=np.float64)


def paired_bootstrap(users: np.ndarray, labels: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray,
                     n_boot: int = 1000, seed: int = 0, metric: str = "auc",
                     return_samples: bool = False) -> dict[str, Any]:
    """``{"mean": metric(b) - metric(a), "ci95": [low, high]}``, a percentile bootstrap over users.

    Each replicate draws users with replacement and takes all their rows (twice for a user drawn
    twice), so correlation within a user widens the interval as it should. "auc" is pooled ROC AUC
    (computed as an AUC weighted by user multiplicity), "per_user_auc" the multiplicity-weighted
    mean of per-user AUCs (single-class users excluded). Replicates with an undefined metric are
    dropped. With ``return_samples``, ``"samples"`` holds every replicate's difference (NaN where
    undefined): the same ``seed`` and ``users`` draw the same users, so differences of several
    training seeds can be averaged replicate by replicate.
    """
    if metric == "auc":
        mean = roc_auc(labels, scores_b) - roc_auc(labels, scores_a)
    elif metric == "per_user_auc":
        mean = mean_per_user_auc(users, labels, scores_b) - mean_per_user_auc(users, labels, scores_a)
    else:
        raise ValueError(f"unknown metric {metric!r}: expected 'auc' or 'per_user_auc'")
    samples = _bootstrap_diffs(users, labels, scores_a, scores_b, n_boot, seed, metric)
    diffs = samples[np.isfinite(samples)]
    low, high = (np.percentile(diffs, [2.5, 97.5]) if len(diffs) else (math.nan, math.nan))
    out = {"mean": float(mean), "ci95": [float(low), float(high)]}
    if return_samples:
        out["samples"] = samples
    return out


def _t975(df: int) -> float:
    try:
        from scipy.stats import t
    except ImportError:
        return _T975[df - 1] if df <= len(_T975) else 1.96
    return float(t.ppf(0.975, df))


def seed_summary(values: list[float]) -> dict[str, Any]:
    """Mean and 95% t-interval over training seeds: the seed-to-seed noise a difference must beat."""
    if not values:
        raise ValueError("seed_summary needs at least one value")
    x = np.asarray(values, dtype=np.float64)
    mean = float(x.mean())
    half = _t975(len(x) - 1) * float(x.std(ddof=1)) / math.sqrt(len(x)) if len(x) > 1 else 0.0
    return {"mean": mean, "ci95": [mean - half, mean + half], "seeds": [float(v) for v in values]}
