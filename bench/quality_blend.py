"""Stacking diagnostics of issue 14: the id-only ranker's logit blended with the tower's scores.

The blend is a logistic regression fitted on the valid rows, which are out of sample for both the
id-only ranker (trained on train) and the tower (fitted on train targets), so it has no stacking
leakage; its few coefficients are then applied to the test rows. Two blends answer one question,
where the LLM's lift comes from:

* ``blend_valid``: the tower's user-level score ``H(u_t, v_mean)`` and the rest of its logit, from
  the user's state just before each row (fresh: it has seen the user's earlier feedback, including
  feedback given inside the same split window);
* ``blend_valid_window_start``: the same two scores from the state at the start of the row's split
  window, frozen through it (what a ranker would see if the embeddings were refreshed only when it
  is retrained), plus a flag for users with no history before the window.

A user-level score that is constant within a window cannot change a per-user AUC; one that moves
inside the window with the user's own labels can, and does (see the diagnosis table of
``bench_quality``: the user's recent positive rate and the tower's user-level score both rank a
user's own test rows below chance).
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import pandas as pd
import torch

KEYS = ["user_id", "item_id", "event_timestamp"]
BLENDS: dict[str, tuple[str, ...]] = {
    "blend_valid": ("tower_user_score", "tower_item_score"),
    "blend_valid_window_start": ("tower_user_score_window_start", "tower_item_score_window_start",
                                 "user_history_window_start"),
}


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-4) -> Callable[[np.ndarray], np.ndarray]:
    """L2-regularised logistic regression on standardised columns (L-BFGS); returns the logit function."""
    xt = torch.tensor(x, dtype=torch.float64)
    yt = torch.tensor(y, dtype=torch.float64)
    mu, sd = xt.mean(0), xt.std(0).clamp_min(1e-6)
    w = torch.zeros(x.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        out = ((xt - mu) / sd) @ w[:-1] + w[-1]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(out, yt) + l2 * (w[:-1] ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    coef = w.detach()
    return lambda z: (((torch.tensor(z, dtype=torch.float64) - mu) / sd) @ coef[:-1] + coef[-1]).numpy()


def _with_states(pred: pd.DataFrame, states: pd.DataFrame, cols: tuple[str, ...]) -> pd.DataFrame:
    pred = pred.copy()
    pred["event_timestamp"] = pd.to_datetime(pred["event_timestamp"], utc=True).astype("datetime64[us, UTC]")
    st = states[KEYS + list(cols)].copy()
    st["event_timestamp"] = st["event_timestamp"].astype("datetime64[us, UTC]")
    return pred.merge(st, on=KEYS, how="left", validate="1:1")


def blend_predictions(id_valid: pd.DataFrame, id_test: pd.DataFrame, states: pd.DataFrame,
                      cols: tuple[str, ...]) -> tuple[pd.DataFrame, float]:
    """Test predictions (keys, label, logit) of the blend fitted on ``id_valid``, and the fit's seconds.

    ``id_valid`` / ``id_test``: the id-only ranker's per-row predictions (``ranker evaluate``'s
    ``predictions.parquet``); ``states``: :func:`bench_quality.exact_states`' frame.
    """
    t0 = time.perf_counter()
    va, te = _with_states(id_valid, states, cols), _with_states(id_test, states, cols)
    if va[list(cols)].isna().any().any() or te[list(cols)].isna().any().any():
        raise RuntimeError(f"tower states are missing for some valid/test rows ({cols})")

    def design(f: pd.DataFrame) -> np.ndarray:
        return np.column_stack([f["logit"].to_numpy()] + [f[c].to_numpy() for c in cols]).astype(np.float64)

    predict = fit_logistic(design(va), va["label"].to_numpy())
    out = te[KEYS + ["label"]].copy()
    out["logit"] = predict(design(te))
    return out, time.perf_counter() - t0
