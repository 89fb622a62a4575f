"""The id-only baselines of the finetune benchmark, fitted on exactly the targets a finetune run uses, and
the paired bootstrap of an AUC difference over test users."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def load_targets(data_dir: Path, limit_users: int | None, max_targets: int | None, seed: int) -> dict:
    """The users, items and labels of the train / valid / test targets a finetune run with these options uses."""
    from llm_features.finetune import FinetuneConfig
    from llm_features.finetune.data import load_finetune_data
    from llm_features.finetune.train import split_targets

    cfg = FinetuneConfig(data_dir=data_dir, limit_users=limit_users, max_targets=max_targets, seed=seed)
    data = load_finetune_data(data_dir, None, need_behavior_vectors=False, limit_users=limit_users, seed=seed)
    h = data.hist
    user = np.repeat(np.arange(len(h.user_ids)), np.diff(h.offsets))
    out = {"user": user, "item": h.item_row, "label": h.label.astype(np.float64),
           "num_users": len(h.user_ids), "num_items": int(h.item_row.max()) + 1}
    for split in ("train", "valid", "test"):
        out[split] = np.flatnonzero(split_targets(cfg, data, split))
    return out


def _auc(labels: np.ndarray, scores: np.ndarray) -> float:
    from llm_features.metrics import roc_auc

    return roc_auc(labels, scores)


def rate_baseline(t: dict) -> dict:
    """logit(user positive rate) + logit(item positive rate), both shrunk towards the global rate.

    The shrinkage strength (pseudo-count) is chosen on the valid targets.
    """
    y, tr = t["label"], t["train"]
    g = y[tr].mean()
    logit = lambda p: np.log(p / (1 - p))  # noqa: E731

    def rates(key: np.ndarray, size: int, alpha: float) -> np.ndarray:
        pos = np.bincount(key[tr], weights=y[tr], minlength=size)
        cnt = np.bincount(key[tr], minlength=size)
        return (pos + alpha * g) / (cnt + alpha)

    def score(rows: np.ndarray, alpha: float) -> np.ndarray:
        u, i = rates(t["user"], t["num_users"], alpha), rates(t["item"], t["num_items"], alpha)
        return logit(u[t["user"][rows]]) + logit(i[t["item"][rows]])

    alphas = [1.0, 3.0, 10.0, 30.0, 100.0]
    valid = [_auc(y[t["valid"]], score(t["valid"], a)) for a in alphas]
    best = alphas[int(np.nanargmax(valid))]
    return {"name": "user + item positive rate", "test_auc": _auc(y[t["test"]], score(t["test"], best)),
            "valid_auc": max(valid), "chosen": {"pseudo_count": best}}


def mf_baseline(t: dict, dim: int = 32, epochs: int = 30, seed: int = 0) -> dict:
    """Logistic matrix factorisation ``b + b_u + b_i + <p_u, q_i>`` (BCE, Adam), the epoch chosen on valid."""
    import torch

    torch.manual_seed(seed)
    y = torch.as_tensor(t["label"], dtype=torch.float32)
    user, item = torch.as_tensor(t["user"]), torch.as_tensor(t["item"])
    best = {"valid_auc": -1.0}
    for wd in (1e-4, 1e-3):
        emb_u = torch.nn.Embedding(t["num_users"], dim + 1)
        emb_i = torch.nn.Embedding(t["num_items"], dim + 1)
        for e in (emb_u, emb_i):
            torch.nn.init.normal_(e.weight, std=0.01)
        bias = torch.nn.Parameter(torch.zeros(()))
        params = [emb_u.weight, emb_i.weight, bias]
        opt = torch.optim.Adam(params, lr=0.01)

        def logits(rows: np.ndarray) -> torch.Tensor:
            r = torch.as_tensor(rows)
            pu, qi = emb_u(user[r]), emb_i(item[r])
            return bias + pu[:, 0] + qi[:, 0] + (pu[:, 1:] * qi[:, 1:]).sum(-1)

        gen = np.random.default_rng(seed)
        for epoch in range(epochs):
            order = gen.permutation(t["train"])
            for start in range(0, len(order), 1024):
                rows = order[start:start + 1024]
                r = torch.as_tensor(rows)
                loss = torch.nn.functional.binary_cross_entropy_with_logits(logits(rows), y[r])
                # L2 on the rows used, scaled like weight decay
                loss = loss + wd * (emb_u(user[r]).pow(2).sum(-1) + emb_i(item[r]).pow(2).sum(-1)).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            with torch.no_grad():
                v = _auc(t["label"][t["valid"]], logits(t["valid"]).numpy())
                if v > best["valid_auc"]:
                    test = _auc(t["label"][t["test"]], logits(t["test"]).numpy())
                    best = {"valid_auc": v, "test_auc": test, "chosen": {"epoch": epoch + 1, "l2": wd, "dim": dim}}
    return {"name": f"logistic MF (dim {dim})", **best}


def bootstrap_gap(a_out: str, b_out: str, users: np.ndarray, reps: int = 1000, seed: int = 0) -> dict | None:
    """AUC(a) - AUC(b) on the same test targets, with a 95% interval from resampling test users."""
    try:
        a = np.load(Path(a_out) / "test_predictions.npz")
        b = np.load(Path(b_out) / "test_predictions.npz")
    except OSError:
        return None
    order_a, order_b = np.argsort(a["row"]), np.argsort(b["row"])
    if not np.array_equal(a["row"][order_a], b["row"][order_b]):
        return None
    rows, label = a["row"][order_a], a["label"][order_a]
    sa, sb = a["logit"][order_a], b["logit"][order_b]
    u = users[rows]
    uniq, inv = np.unique(u, return_inverse=True)
    members = [np.flatnonzero(inv == i) for i in range(len(uniq))]
    rng = np.random.default_rng(seed)
    gaps = []
    for _ in range(reps):
        pick = np.concatenate([members[i] for i in rng.integers(0, len(uniq), len(uniq))])
        gaps.append(_auc(label[pick], sa[pick]) - _auc(label[pick], sb[pick]))
    gaps = np.asarray(gaps)
    gaps = gaps[np.isfinite(gaps)]
    return {"gap": _auc(label, sa) - _auc(label, sb), "ci95": [float(np.quantile(gaps, 0.025)),
            float(np.quantile(gaps, 0.975))], "test_users": int(len(uniq)), "test_targets": int(len(rows))}


