"""llm_features/metrics.py: known values from scikit-learn and brute force, and the undefined cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import log_loss as sk_log_loss
from sklearn.metrics import roc_auc_score

from llm_features.metrics import (
    log_loss_from_logits,
    log_loss_from_probs,
    mean_per_user_auc,
    per_user_aucs,
    roc_auc,
)


def _scored(seed: int, n: int = 300, users: int = 12):
    """Users, labels and scores rounded to one decimal, so that many scores tie."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    return rng.integers(0, users, n), y, np.round(rng.normal(size=n) + y, 1)


def _pairs_auc(y: np.ndarray, s: np.ndarray) -> float:
    """P(score of a positive > score of a negative) + half P(equal), over every pair."""
    pos, neg = s[y == 1], s[y == 0]
    return float((pos[:, None] > neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean())


def test_roc_auc_is_sklearns_with_ties():
    _, y, s = _scored(0)
    assert roc_auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert roc_auc(y, s) == pytest.approx(_pairs_auc(y, s), abs=1e-12)
    assert roc_auc(y, -s) == pytest.approx(1 - roc_auc(y, s), abs=1e-12)
    assert roc_auc([0, 1, 0, 1], [0.1, 0.9, 0.2, 0.8]) == 1.0
    assert roc_auc([0, 1], [0.5, 0.5]) == 0.5


def test_roc_auc_is_nan_without_both_classes():
    assert math.isnan(roc_auc(np.ones(3), np.arange(3)))
    assert math.isnan(roc_auc(np.zeros(3), np.arange(3)))
    assert math.isnan(roc_auc(np.array([]), np.array([])))


def test_log_losses_are_sklearns():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 500)
    logits = rng.normal(scale=3, size=500)
    probs = 1 / (1 + np.exp(-logits))
    want = sk_log_loss(y, probs, labels=[0, 1])
    assert log_loss_from_logits(y, logits) == pytest.approx(want, rel=1e-9)
    assert log_loss_from_probs(y, probs) == pytest.approx(want, rel=1e-6)  # probabilities clipped at 1e-7


def test_log_loss_from_logits_is_exact_where_probabilities_saturate():
    """A logit of 50 is p = 1 in float64: only the logit form still charges the wrong label its loss."""
    assert log_loss_from_logits([0, 1], [50.0, -50.0]) == pytest.approx(50.0, rel=1e-12)
    assert log_loss_from_probs([0, 1], [1.0, 0.0]) == pytest.approx(-math.log(1e-7), rel=1e-9)  # eps-clipped
    assert log_loss_from_logits([1], [0.0]) == pytest.approx(math.log(2))


def test_log_losses_of_no_rows_are_nan():
    assert math.isnan(log_loss_from_logits(np.array([]), np.array([])))
    assert math.isnan(log_loss_from_probs(np.array([]), np.array([])))


def test_per_user_aucs_are_each_users_own_auc():
    users, y, s = _scored(2)
    users[:3], y[:3] = 99, 1  # a user with positives only: left out
    ids, aucs = per_user_aucs(users, y, s)
    want = {u: roc_auc(y[users == u], s[users == u]) for u in np.unique(users)}
    want = {u: a for u, a in want.items() if not math.isnan(a)}
    assert ids.tolist() == sorted(want) and 99 not in ids
    np.testing.assert_allclose(aucs, [want[u] for u in ids], atol=1e-12)
    assert mean_per_user_auc(users, y, s) == pytest.approx(np.mean(list(want.values())), abs=1e-12)


def test_mean_per_user_auc_ignores_a_per_user_offset():
    """A score that only separates users changes the pooled AUC, never a user's own ranking."""
    users, y, s = _scored(3)
    shifted = s + 10 * users
    assert mean_per_user_auc(users, y, shifted) == pytest.approx(mean_per_user_auc(users, y, s), abs=1e-12)
    assert roc_auc(y, shifted) != pytest.approx(roc_auc(y, s), abs=1e-3)


def test_mean_per_user_auc_without_a_user_of_both_classes_is_nan():
    assert math.isnan(mean_per_user_auc([1, 1, 2], [1, 1, 0], [0.1, 0.2, 0.3]))
    ids, aucs = per_user_aucs(np.array([], int), np.array([], int), np.array([]))
    assert len(ids) == 0 and len(aucs) == 0
    assert math.isnan(mean_per_user_auc(np.array([], int), np.array([], int), np.array([])))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.booleans(), st.integers(-3, 3)), min_size=1, max_size=40))
def test_aucs_equal_pair_counting(rows):
    """Any rows (few users, few distinct scores: ties everywhere): pooled and per-user AUCs count pairs."""
    users, y, s = (np.array(c) for c in zip(*rows))
    y, s = y.astype(int), s.astype(np.float64)
    pooled = _pairs_auc(y, s) if 0 < y.sum() < len(y) else math.nan
    assert roc_auc(y, s) == pytest.approx(pooled, abs=1e-12, nan_ok=True)
    own = {u: _pairs_auc(y[users == u], s[users == u]) for u in np.unique(users)
           if 0 < y[users == u].sum() < (users == u).sum()}
    ids, aucs = per_user_aucs(users, y, s)
    assert dict(zip(ids.tolist(), aucs.tolist())) == pytest.approx(own, abs=1e-12)
