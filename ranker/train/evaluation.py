"""Prediction and metrics: click probabilities of encoded rows, AUC / LogLoss, and ``ranker evaluate``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from llm_features.atomic import atomic_path, write_json
from llm_features.config import validate_config
from llm_features.metrics import log_loss_from_probs, mean_per_user_auc, roc_auc
from llm_features.threads import configure_threads
from ranker.config import EvaluateConfig
from ranker.features import LABEL, EncodedRows, FeatureEncoder, MissingFeatures
from ranker.model import RankingModel
from ranker.train.checkpoint import load_checkpoint
from ranker.train.sources import (ENTITY_COLUMNS, FeatureSource, PrefetchedSource, existing_workspace, fetch_rows,
                                  in_fetch_order, load_entities, workspace_source)

METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.parquet"


@torch.no_grad()
def predict(model: RankingModel, rows: EncodedRows, batch_size: int = 4096) -> np.ndarray:
    """Click probabilities ``[N]`` for every row, in row order."""
    model.eval()
    out = [torch.sigmoid(model(b.dense_features, b.sparse_features)).numpy() for b in rows.batches(batch_size)]
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def binary_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    return {
        "auc": roc_auc(labels, probs),
        "logloss": log_loss_from_probs(labels, probs),
        "rows": int(len(labels)),
        "positive_rate": float(np.mean(labels)) if len(labels) else float("nan"),
    }


def evaluate_rows(
    model: RankingModel,
    encoder: FeatureEncoder,
    entities: pd.DataFrame,
    source: FeatureSource,
    chunk_rows: int = 200_000,
    batch_size: int = 4096,
    predictions: Path | None = None,
) -> dict[str, Any]:
    """AUC / LogLoss of ``model`` on labelled entity rows, with the missing-feature counts.

    With ``predictions`` (a path), also writes every row's keys, label and logit there as parquet
    (``user_id, item_id, event_timestamp, label, logit``), so that slices and paired comparisons
    of two checkpoints need no second run.
    """
    entities = in_fetch_order(entities)
    missing = MissingFeatures()
    rows = encoder.index(fetch_rows(entities, source, encoder.model, chunk_rows, encoder.attributes), missing)
    missing.warn("ranker evaluate")
    probs = predict(model, rows, batch_size)
    metrics: dict[str, Any] = binary_metrics(rows.labels, probs)
    metrics["per_user_auc"] = mean_per_user_auc(entities["user_id"].to_numpy(), rows.labels, probs)
    metrics["missing"] = missing.as_dict()
    if predictions is not None:
        frame = entities[PrefetchedSource.KEYS + [LABEL]].copy()
        p = np.clip(probs.astype(np.float64), 1e-7, 1 - 1e-7)
        frame["logit"] = np.log(p) - np.log1p(-p)
        with atomic_path(predictions) as tmp:
            frame.to_parquet(tmp, index=False)
    return metrics


def evaluate(cfg: EvaluateConfig, entities: pd.DataFrame | None = None,
             source: FeatureSource | None = None) -> dict[str, Any]:
    """Evaluate a checkpoint on ``cfg.split`` and write ``metrics.json`` (``cfg.out``)."""
    validate_config(cfg)
    t0 = time.perf_counter()
    configure_threads(cfg.threads)
    model, encoder, payload = load_checkpoint(cfg.checkpoint)
    if entities is None or source is None:
        ws = existing_workspace(cfg.repo, cfg.data_dir)
        fp = ws.read_fingerprint() if payload.get("fingerprint") else None
        if fp is not None:
            fp.require_same(payload["fingerprint"], lambda trained, here: (
                f"{cfg.checkpoint} was trained on embeddings of model {trained}, but {ws.manifest} records {here}; "
                "retrain the ranker on this workspace."))
    if entities is None:
        entities = load_entities(ws.interactions, cfg.split, cfg.max_rows)
    else:
        entities = entities[entities["split"] == cfg.split][ENTITY_COLUMNS].reset_index(drop=True)
    if source is None:
        source = workspace_source(cfg.repo, ws, payload["feature_service"], set(encoder.source_columns))
    out = cfg.out or (cfg.checkpoint / f"eval-{cfg.split}")
    metrics = {
        "split": cfg.split,
        "checkpoint": str(cfg.checkpoint),
        "feature_service": payload["feature_service"],
        **evaluate_rows(model, encoder, entities, source, cfg.chunk_rows, cfg.batch_size,
                        predictions=out / PREDICTIONS_FILE),
    }
    metrics["predictions"] = str(out / PREDICTIONS_FILE)
    metrics["seconds"] = round(time.perf_counter() - t0, 3)
    write_json(out / METRICS_FILE, metrics)
    return metrics
