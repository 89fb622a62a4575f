"""Binary CTR metrics: ROC AUC (ties averaged) and LogLoss, in plain numpy."""

from __future__ import annotations

import numpy as np
import pandas as pd


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U); NaN when only one class is present."""
    labels = np.asarray(labels).astype(bool)
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = pd.Series(np.asarray(scores, dtype=np.float64)).rank(method="average").to_numpy()
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def log_loss(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of probabilities ``probs`` against 0/1 ``labels``."""
    p = np.clip(np.asarray(probs, dtype=np.float64), eps, 1 - eps)
    y = np.asarray(labels, dtype=np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def per_user_auc(users: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> float:
    """Mean over users of each user's own AUC (users with both labels only); NaN when there is none.

    It measures how well the ranking orders one user's candidates, which a score that only
    separates users (a per-user offset) does not change.
    """
    values = per_user_aucs(users, labels, scores)[1]
    return float(np.mean(values)) if len(values) else float("nan")


def per_user_aucs(users: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(user ids, AUCs)`` of every user with both a positive and a negative row."""
    frame = pd.DataFrame({"u": np.asarray(users), "y": np.asarray(labels).astype(bool),
                          "s": np.asarray(scores, dtype=np.float64)})
    # ranks within each user (ties averaged): the Mann-Whitney U of every user at once
    frame["r"] = frame.groupby("u")["s"].rank(method="average")
    g = frame.groupby("u")
    pos = g["y"].sum()
    n = g["y"].size()
    neg = n - pos
    rank_pos = frame[frame["y"]].groupby("u")["r"].sum().reindex(pos.index, fill_value=0.0)
    ok = (pos > 0) & (neg > 0)
    auc = (rank_pos[ok] - pos[ok] * (pos[ok] + 1) / 2) / (pos[ok] * neg[ok])
    return auc.index.to_numpy(), auc.to_numpy(dtype=np.float64)
