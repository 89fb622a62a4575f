"""The single-process training loop, with early stopping on the valid split."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from llm_features.metrics import mean_per_user_auc, roc_auc
from ranker.config import TrainConfig
from ranker.features import EncodedRows, FeatureEncoder
from ranker.model import RankingModel, RankingTrain
from ranker.train.evaluation import predict

log = logging.getLogger("ranker.train")  # the package's logger: what callers filter on


def _param_groups(model: RankingModel) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    sparse = list(model.embedding_bag_collection.parameters())
    ids = {id(p) for p in sparse}
    return sparse, [p for p in model.parameters() if id(p) not in ids and p.requires_grad]


def train_local(
    cfg: TrainConfig, encoder: FeatureEncoder, rows: EncodedRows, valid_rows: EncodedRows | None = None,
    history: list[dict[str, Any]] | None = None, tower_state: dict[str, torch.Tensor] | None = None,
) -> tuple[RankingModel, list[float], int]:
    """Up to ``cfg.epochs`` passes; with ``valid_rows``, early stopping on the valid AUC.

    After each epoch the valid AUC is appended to ``history``; training stops when it has not
    improved for ``cfg.patience`` epochs, and the weights of the best epoch are returned.
    """
    model = RankingModel(encoder)
    if model.tower_score is not None:
        model.tower_score.load_tower(tower_state)
    step = RankingTrain(model)
    sparse, dense = _param_groups(model)
    # Adagrad for the tables (the unsharded stand-in for the fused row-wise Adagrad), Adam elsewhere.
    optimizers = [torch.optim.Adagrad(sparse, lr=cfg.sparse_lr), torch.optim.Adam(dense, lr=cfg.lr)]
    losses: list[float] = []
    samples = 0
    step.train()
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.epochs * len(rows), unit="row", unit_scale=True, desc="ranker train",
               disable=not cfg.progress)
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    for epoch in range(cfg.epochs):
        for batch in rows.batches(cfg.batch_size, shuffle=True, seed=cfg.seed * 1000 + epoch,
                                  oov_dropout=cfg.oov_dropout, missing_dropout=cfg.missing_dropout):
            bar.update(len(batch.labels))
            loss, _ = step(batch)
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            for opt in optimizers:
                opt.step()
            losses.append(float(loss.detach()))
            samples += len(batch.labels)
        log.info("ranker train: epoch %d/%d, loss %.4f", epoch + 1, cfg.epochs, float(np.mean(losses[-100:])))
        if valid_rows is None:
            continue
        probs = predict(model, valid_rows)
        step.train()
        auc = roc_auc(valid_rows.labels, probs)
        pu = mean_per_user_auc(valid_rows.users, valid_rows.labels, probs)
        if history is not None:
            history.append({"epoch": epoch + 1, "valid_auc": auc, "valid_per_user_auc": pu,
                            "train_loss": float(np.mean(losses[-100:]))})
        log.info("ranker train: epoch %d valid AUC %.4f, per-user AUC %.4f", epoch + 1, auc, pu)
        if best is None or auc > best[0]:
            best = (auc, epoch, {k: v.detach().clone() for k, v in model.state_dict().items()})
        elif epoch - best[1] >= cfg.patience:
            break
    bar.close()
    if best is not None:
        model.load_state_dict(best[2])
    model.eval()
    return model, losses, samples


