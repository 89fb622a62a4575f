"""Binary click-through metrics: the one home of AUC and LogLoss for fine-tuning, the ranker and the benchmarks.

Every function takes ``[N]`` arrays and returns a float, NaN where the metric is undefined (no rows,
or only one class for an AUC). The AUCs take any score that orders rows like the click probability
(logits or probabilities alike); each log loss says in its name which of the two it takes.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U, tied scores count one half); NaN with one class only."""
    labels = np.asarray(labels).astype(bool)
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = pd.Series(np.asarray(scores, dtype=np.float64)).rank(method="average").to_numpy()
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def log_loss_from_probs(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of click probabilities ``probs`` (clipped to ``[eps, 1 - eps]``)."""
    if len(labels) == 0:
        return float("nan")
    p = np.clip(np.asarray(probs, dtype=np.float64), eps, 1 - eps)
    y = np.asarray(labels, dtype=np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def log_loss_from_logits(labels: np.ndarray, logits: np.ndarray) -> float:
    """Mean binary cross-entropy of ``logits`` (exact for any logit: no probability is formed or clipped)."""
    if len(labels) == 0:
        return float("nan")
    x = torch.as_tensor(np.asarray(logits, dtype=np.float64))
    y = torch.as_tensor(np.asarray(labels, dtype=np.float64))
    return float(F.binary_cross_entropy_with_logits(x, y))


def mean_per_user_auc(users: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> float:
    """Mean over users of each user's own AUC (users with both labels only); NaN when there is none.

    It measures how well the ranking orders one user's candidates, which a score that only
    separates users (a per-user offset) does not change.
    """
    values = per_user_aucs(users, labels, scores)[1]
    return float(np.mean(values)) if len(values) else float("nan")


def per_user_aucs(users: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(user ids, AUCs)``, sorted by user id, of every user with both a positive and a negative row."""
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
