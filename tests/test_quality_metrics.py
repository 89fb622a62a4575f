"""bench/quality_metrics.py: baselines, slices and bootstrap statistics against brute-force versions."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from llm_features.metrics import mean_per_user_auc, roc_auc

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load():
    path = BENCH / "quality_metrics.py"
    spec = importlib.util.spec_from_file_location("bench_quality_metrics_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


qm = _load()
T0 = pd.Timestamp("2024-01-01", tz="UTC")


def _frame(rows: list[tuple[int, int, int, int, str]]) -> pd.DataFrame:
    """(user, item, minute, label, split) tuples to an interaction frame."""
    f = pd.DataFrame(rows, columns=["user_id", "item_id", "minute", "label", "split"])
    f["event_timestamp"] = T0 + pd.to_timedelta(f.pop("minute"), unit="min")
    return f


def _random_frame(seed: int, n: int = 300, users: int = 12, items: int = 15) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    f = pd.DataFrame({"user_id": rng.integers(0, users, n), "item_id": rng.integers(0, items, n),
                      "minute": rng.integers(0, 40, n),  # many equal timestamps
                      "label": rng.integers(0, 2, n),
                      "split": rng.choice(["train", "valid", "test"], n, p=[0.6, 0.2, 0.2])})
    f["event_timestamp"] = T0 + pd.to_timedelta(f.pop("minute"), unit="min")
    return f


def _smooth(sub: pd.DataFrame, prior: float, g: float) -> float:
    return (sub["label"].sum() + prior * g) / (len(sub) + prior)


def test_item_and_user_item_rates_match_brute_force() -> None:
    f = _random_frame(0)
    train, rows = f[f.split == "train"], f[f.split != "train"].copy()
    rows.loc[rows.index[:3], "item_id"] = 99  # unseen items
    rows.loc[rows.index[2:5], "user_id"] = 77  # unseen users (row 2: both unseen)
    g = train["label"].mean()
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    item = qm.item_positive_rate(train, rows, prior=20)
    both = qm.user_item_positive_rate(train, rows, prior=20)
    assert item.dtype == np.float64 and both.dtype == np.float64 and len(item) == len(rows)
    for k, (_, r) in enumerate(rows.iterrows()):
        pi = _smooth(train[train.item_id == r.item_id], 20, g)
        pu = _smooth(train[train.user_id == r.user_id], 20, g)
        assert item[k] == pytest.approx(pi)
        assert both[k] == pytest.approx(logit(pu) + logit(pi) - logit(g))
    assert item[0] == pytest.approx(g) and both[2] == pytest.approx(logit(g))


@pytest.mark.parametrize("n", [1, 3, 30])
def test_recent_positive_rate_matches_brute_force(n: int) -> None:
    f = _random_frame(1)
    rows = f[f.split != "train"].copy()
    rows.loc[rows.index[:2], "user_id"] = 55  # no history at all
    g = f.loc[f.split == "train", "label"].mean()
    got = qm.recent_positive_rate(f, rows, n=n, prior=5)
    for k, (_, r) in enumerate(rows.iterrows()):
        before = f[(f.user_id == r.user_id) & (f.event_timestamp < r.event_timestamp)]
        last = before.sort_values("event_timestamp", kind="stable").tail(n)
        assert got[k] == pytest.approx(_smooth(last, 5, g)), k
    assert got[0] == pytest.approx(g)


def test_recent_positive_rate_hand_made() -> None:
    f = _frame([(1, 0, 0, 1, "train"), (1, 0, 1, 0, "train"), (1, 0, 2, 1, "valid"),
                (1, 0, 2, 1, "test"), (1, 0, 3, 0, "test"), (2, 0, 0, 0, "train")])
    g = 1 / 3  # train rate; the valid/test labels count as history but not for the prior
    rows = f[f.split == "test"]
    got = qm.recent_positive_rate(f, rows, n=2, prior=1)
    # minute 2: last two before it are minutes 0 and 1 (the valid row at minute 2 is not before)
    assert got[0] == pytest.approx((1 + g) / 3)
    # minute 3: the two latest before it are at minute 2 (labels 1, 1)
    assert got[1] == pytest.approx((2 + g) / 3)


def test_matrix_factorization_learns_blocks_and_handles_unknowns() -> None:
    users, items = np.meshgrid(np.arange(30), np.arange(30), indexing="ij")
    train = pd.DataFrame({"user_id": users.ravel() + 1, "item_id": items.ravel() + 1})
    train["label"] = ((train.user_id % 2) == (train.item_id % 2)).astype(int)  # two taste groups
    kw = dict(dim=8, epochs=15, lr=0.05, batch_size=128, seed=3)
    score = qm.matrix_factorization(train, train, **kw)
    assert score.dtype == np.float64 and roc_auc(train.label, score) > 0.95
    np.testing.assert_array_equal(score, qm.matrix_factorization(train, train, **kw))  # seeded
    cold = pd.DataFrame({"user_id": [-1, -2, -1, -2, 1], "item_id": [-5, -6, 1, 1, -5]})
    s = qm.matrix_factorization(train, cold, **kw)
    assert s[0] == s[1] and s[2] == s[3]  # zero vector: an unknown user scores like any other
    assert s[0] != s[2] != s[4]  # the known side's bias still counts
    # untrained: random vectors and zero biases, so exactly the global logit (0: half the labels are
    # positive) only where the unknown side's vector is zero
    pairs = pd.DataFrame({"user_id": [-1, 1, 1], "item_id": [1, -5, 1]})
    s0 = qm.matrix_factorization(train, pairs, **{**kw, "epochs": 0})
    assert s0[0] == 0.0 and s0[1] == 0.0 and s0[2] != 0.0


def test_simple_baselines_aligned_with_split_rows() -> None:
    f = _random_frame(2)
    out = qm.simple_baselines(f, split="valid", mf_epochs=1)
    rows = f[f.split == "valid"]
    assert set(out) == {"item_positive_rate", "user_item_positive_rate", "recent_positive_rate_30",
                        "matrix_factorization"}
    assert all(v.shape == (len(rows),) and v.dtype == np.float64 for v in out.values())
    np.testing.assert_allclose(out["item_positive_rate"], qm.item_positive_rate(f[f.split == "train"], rows))
    np.testing.assert_allclose(out["recent_positive_rate_30"], qm.recent_positive_rate(f, rows, n=30))


def test_slice_masks_brute_force() -> None:
    f = _random_frame(3, n=400, users=30, items=40)
    train, rows = f[f.split == "train"], f[f.split == "test"].copy()
    rows.loc[rows.index[:2], "user_id"] = 999
    masks = qm.slice_masks(train, rows, few=8)
    for k, (_, r) in enumerate(rows.iterrows()):
        nu, ni = (train.user_id == r.user_id).sum(), (train.item_id == r.item_id).sum()
        assert masks["unseen_users"][k] == (nu == 0)
        assert masks["few_train_users"][k] == (1 <= nu < 8)
        assert masks["few_train_items"][k] == (ni < 8)
        assert masks["rest"][k] == (nu >= 8 and ni >= 8)
    assert not (masks["unseen_users"] & masks["few_train_users"]).any()
    assert all(m.any() for m in masks.values())  # the data exercises every slice


def test_weighted_auc_equals_auc_of_repeated_rows() -> None:
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 60).astype(bool)
    s = rng.integers(0, 8, 60).astype(float)  # ties
    w = rng.integers(0, 4, 60).astype(float)
    g, n = qm._dense_rank(s)
    want = roc_auc(np.repeat(y, w.astype(int)), np.repeat(s, w.astype(int)))
    assert qm._weighted_auc(g[y], g[~y], w[y], w[~y], n) == pytest.approx(want)
    assert math.isnan(qm._weighted_auc(g[y], g[~y], w[y], 0 * w[~y], n))  # no negative left


def _tiny_scored(seed: int, n: int = 80, users: int = 9):
    rng = np.random.default_rng(seed)
    u = rng.integers(100, 100 + users, n)
    y = rng.integers(0, 2, n)
    return u, y, rng.normal(size=n) + y * 0.3, np.round(rng.normal(size=n) + y, 1)  # b has ties


@pytest.mark.parametrize("metric", ["auc", "per_user_auc"])
def test_bootstrap_replicates_match_explicit_resampling(metric: str) -> None:
    u, y, a, b = _tiny_scored(5)
    got = qm._bootstrap_diffs(u, y, a, b, n_boot=6, seed=7, metric=metric)
    uniq = np.unique(u)
    rng = np.random.default_rng(7)
    for r in range(6):
        draw = uniq[rng.integers(0, len(uniq), len(uniq))]
        idx = np.concatenate([np.flatnonzero(u == d) for d in draw])
        copy = np.repeat(np.arange(len(draw)), [(u == d).sum() for d in draw])  # a user drawn twice: 2 users
        if metric == "auc":
            want = roc_auc(y[idx], b[idx]) - roc_auc(y[idx], a[idx])
        else:
            want = mean_per_user_auc(copy, y[idx], b[idx]) - mean_per_user_auc(copy, y[idx], a[idx])
        assert got[r] == pytest.approx(want), r


def test_paired_bootstrap_summary() -> None:
    u, y, a, b = _tiny_scored(6, n=400, users=40)
    for metric, fn in (("auc", lambda s: roc_auc(y, s)), ("per_user_auc", lambda s: mean_per_user_auc(u, y, s))):
        out = qm.paired_bootstrap(u, y, a, b, n_boot=200, metric=metric)
        assert out["mean"] == pytest.approx(fn(b) - fn(a))
        assert out["ci95"][0] < out["mean"] < out["ci95"][1]
        assert out["ci95"][0] > 0  # b separates the labels much better than a
        same = qm.paired_bootstrap(u, y, a, a, n_boot=50, metric=metric)
        assert same == {"mean": 0.0, "ci95": [0.0, 0.0]}
    with pytest.raises(ValueError):
        qm.paired_bootstrap(u, y, a, b, metric="logloss")


def test_seed_summary(monkeypatch: pytest.MonkeyPatch) -> None:
    assert qm.seed_summary([0.7]) == {"mean": 0.7, "ci95": [0.7, 0.7], "seeds": [0.7]}
    half = 4.303 / math.sqrt(3)  # t(0.975, df=2) * std([1, 2, 3]) / sqrt(3)
    out = qm.seed_summary([1.0, 2.0, 3.0])
    assert out["mean"] == 2.0 and out["seeds"] == [1.0, 2.0, 3.0]
    assert out["ci95"] == pytest.approx([2 - half, 2 + half], abs=1e-3)
    if importlib.util.find_spec("scipy") is not None:
        from scipy.stats import t
        np.testing.assert_allclose(qm._T975, [t.ppf(0.975, d) for d in range(1, 31)], atol=6e-4)
    monkeypatch.setitem(sys.modules, "scipy.stats", None)  # the fallback table
    assert qm.seed_summary([1.0, 2.0, 3.0])["ci95"] == pytest.approx([2 - half, 2 + half], abs=1e-9)
    assert qm._t975(40) == 1.96
    with pytest.raises(ValueError):
        qm.seed_summary([])


def test_fresh_label_feature_scores_below_chance_per_user_with_independent_labels():
    """bench/diag_per_user_freshness.py: with no dynamics, a feature over the user's own recent labels
    orders that user's window below chance, and the same feature frozen at the window start at chance."""
    spec = importlib.util.spec_from_file_location("diag_per_user_freshness", BENCH / "diag_per_user_freshness.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = module.simulate(users=400, history=40, test_rows=12, window=10, seed=0)
    assert out["fresh_per_user_auc"] < 0.45
    assert out["frozen_at_window_start_per_user_auc"] == pytest.approx(0.5)
    assert out["true_rate_per_user_auc"] == pytest.approx(0.5)
    assert out["fresh_pooled_auc"] > 0.6  # it still separates users
