"""Evaluating a fine-tuned model over blocks: its logit for every target, and AUC / LogLoss.

Example::

    metrics = evaluate(model, packer, split_blocks(cfg, data, "test", cfg.eval_k), 1024, device)
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from llm_features.distributed import gather_arrays
from llm_features.finetune.checkpoint import write_predictions
from llm_features.finetune.model import FinetuneModel
from llm_features.finetune.packing import Blocks, batch_indices
from llm_features.metrics import log_loss_from_logits, roc_auc


@torch.no_grad()
def predict(
    model: FinetuneModel, packer, blocks: Blocks, targets_per_batch: int, device: torch.device
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(target rows, labels, logits) of every target in ``blocks``, in block order."""
    was_training = model.training
    model.eval()
    rows, labels, logits = [], [], []
    for idx in batch_indices(blocks.num_targets, targets_per_batch):
        batch = packer(blocks.take(idx)).to(device)
        logits.append(model(batch).float().cpu().numpy())
        rows.append(batch.target_rows.cpu().numpy())
        labels.append(batch.labels.cpu().numpy())
    model.train(was_training)
    if not rows:
        return np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.float32)
    return np.concatenate(rows), np.concatenate(labels), np.concatenate(logits)


def evaluate(
    model: FinetuneModel, packer, blocks: Blocks, targets_per_batch: int, device: torch.device,
    rank: int = 0, world: int = 1, predictions: Path | None = None,
) -> dict:
    """AUC / LogLoss over the targets of ``blocks`` (each rank predicts a share, all ranks get the metrics).

    With ``predictions``, rank 0 also writes the history rows, labels and logits of every target there
    (``.npz``), so that two runs on the same data can be compared target by target.
    """
    t0 = time.perf_counter()
    local = blocks.take(np.arange(rank, len(blocks), world)) if world > 1 else blocks
    rows, labels, logits = predict(model, packer, local, targets_per_batch, device)
    rows, labels, logits = gather_arrays([rows, labels, logits], world)
    seconds = time.perf_counter() - t0
    if predictions is not None and rank == 0:
        write_predictions(predictions, rows, labels, logits)
    return {
        "auc": roc_auc(labels, logits),
        "logloss": log_loss_from_logits(labels, logits),
        "targets": int(len(labels)),
        "positive_rate": float(labels.mean()) if len(labels) else float("nan"),
        "seconds": seconds,
        "targets_per_s": len(labels) / seconds if seconds > 0 else float("nan"),
    }


__all__ = ["evaluate", "predict"]
