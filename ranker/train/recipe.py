"""``ranker train``: entity rows -> point-in-time features -> encoder -> training -> checkpoint and
``metrics.json``, in one process or under ``torchrun``."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist

from llm_features.atomic import json_default, write_json
from llm_features.config import validate_config
from llm_features.distributed import process_group
from llm_features.threads import configure_threads
from ranker.config import ModelConfig, TrainConfig
from ranker.features import EncodedRows, FeatureEncoder, MissingFeatures, RawRows, feature_columns
from ranker.model import RankingModel
from ranker.train.checkpoint import resolve_tower, save_checkpoint
from ranker.train.distributed import train_distributed, unshard_to_checkpoint
from ranker.train.evaluation import METRICS_FILE, binary_metrics, evaluate_rows, predict
from ranker.train.loop import train_local
from ranker.train.sources import (ENTITY_COLUMNS, FeatureSource, existing_workspace, fetch_rows, in_fetch_order,
                                  load_entities, workspace_source)

log = logging.getLogger("ranker.train")  # the package's logger: what callers filter on


def train(
    cfg: TrainConfig,
    entities: pd.DataFrame | None = None,
    source: FeatureSource | None = None,
) -> dict[str, Any]:
    """Train a ranker and write its checkpoint and ``metrics.json`` to ``cfg.out``.

    Args:
        cfg: the training configuration.
        entities: labelled entity rows with a ``split`` column (default: the workspace's
            ``canonical/interactions.parquet``).
        source: where features come from (default: Feast ``get_historical_features`` with the
            feature service ``ranker_llm`` / ``ranker_id_only``).

    Returns:
        The metrics written to ``metrics.json`` (on every rank; only rank 0 writes files).
    """
    validate_config(cfg)
    with process_group():  # gloo: the ranker trains on CPU
        return _train(cfg, entities, source)


def _train(cfg: TrainConfig, entities: pd.DataFrame | None, source: FeatureSource | None) -> dict[str, Any]:
    """:func:`train` inside its process group; the steps keep their order (and with it the use of the RNGs)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    configure_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model_cfg = cfg.model
    started = time.perf_counter()

    ws = existing_workspace(cfg.repo, cfg.data_dir) if entities is None or source is None else None
    # every input is checked before the (long) point-in-time join
    tower = None
    if model_cfg.llm_features and model_cfg.llm_mode == "score":
        tower = resolve_tower(cfg.tower, ws)
    train_entities = _split_entities(entities, ws, "train", cfg.max_train_rows)
    if source is None:
        source = workspace_source(cfg.repo, ws, model_cfg.feature_service, feature_columns(model_cfg))
    shard = train_entities.iloc[rank::world]  # each rank joins only its own rows
    t0 = time.perf_counter()
    raw = fetch_rows(shard, source, model_cfg, cfg.chunk_rows)
    fetch_seconds = time.perf_counter() - t0

    encoder = _fit_encoder(raw, model_cfg, world)
    tower_state = None
    if tower is not None:
        encoder.tower, encoder.tower_hidden, tower_state = tower
    if rank == 0:
        desc = encoder.describe()
        log.info("ranker features: sparse %s; dense %s", ", ".join(desc["sparse"]), ", ".join(desc["dense"]))
    train_missing = MissingFeatures()
    rows = encoder.index(raw, train_missing)
    del raw
    train_missing.warn(f"ranker train (rank {rank})")
    valid = _ValidSplit(_split_entities(entities, ws, "valid") if cfg.validate else None)
    if world == 1:
        valid.encode_for_early_stopping(source, encoder, cfg.chunk_rows)

    t0 = time.perf_counter()
    history: list[dict[str, Any]] = []
    if world > 1:
        model, losses, samples = train_distributed(cfg, encoder, rows, rank, world, tower_state)
    else:
        model, losses, samples = train_local(cfg, encoder, rows, valid.rows, history, tower_state)
    run = _Run(world, len(train_entities), fetch_seconds, time.perf_counter() - t0, losses, samples, history)
    metrics = _train_metrics(cfg, encoder, run, train_missing)
    if rank == 0:
        model = _save_run_checkpoint(cfg, ws, world, model, encoder)
        if (valid_metrics := valid.metrics(model, encoder, source, cfg.chunk_rows)) is not None:
            metrics["valid"] = valid_metrics
        metrics["total_seconds"] = round(time.perf_counter() - started, 3)
        write_json(cfg.out / METRICS_FILE, metrics)
        log.info("ranker train: %s", json.dumps({k: v for k, v in metrics.items() if k != "train_missing"}))
    if world > 1:
        dist.barrier()
    return metrics


def _split_entities(entities: pd.DataFrame | None, ws, split: str,
                    max_rows: int | None = None) -> pd.DataFrame:
    """The entity rows of ``split`` (the last ``max_rows``): of ``entities`` if given, else the workspace's."""
    if entities is not None:
        df = entities[entities["split"] == split][ENTITY_COLUMNS].reset_index(drop=True)
        return df.iloc[-max_rows:] if max_rows is not None and len(df) > max_rows else df
    return load_entities(ws.interactions, split, max_rows, last=True)


def _fit_encoder(raw: RawRows, model_cfg: ModelConfig, world: int) -> FeatureEncoder:
    """The encoder fitted on this rank's train rows, or on every rank's under ``torchrun``."""
    observed = FeatureEncoder.observe(raw)
    if world > 1:  # every rank must index with the same vocabularies
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, observed)
        return FeatureEncoder.fit(gathered, model_cfg)
    return FeatureEncoder.fit([observed], model_cfg)


@dataclass
class _ValidSplit:
    """The valid split's entity rows (None: ``--no-validate``) and, in one process, their encoded rows:
    early stopping needs them during training; joined once, scored after every epoch."""

    entities: pd.DataFrame | None
    rows: EncodedRows | None = None

    def encode_for_early_stopping(self, source: FeatureSource, encoder: FeatureEncoder,
                                  chunk_rows: int) -> None:
        if self.entities is None or not len(self.entities):
            return
        self.entities = in_fetch_order(self.entities)  # row i = entity i (for the per-user AUC)
        raw = fetch_rows(self.entities, source, encoder.model, chunk_rows, encoder.attributes)
        self.rows = encoder.index(raw)
        self.rows.users = self.entities["user_id"].to_numpy()

    def metrics(self, model: RankingModel, encoder: FeatureEncoder, source: FeatureSource,
                chunk_rows: int) -> dict[str, Any] | None:
        """The trained model's metrics on the split (None without valid rows)."""
        if self.rows is not None:
            return binary_metrics(self.rows.labels, predict(model, self.rows))
        if self.entities is not None and len(self.entities):
            return evaluate_rows(model, encoder, self.entities, source, chunk_rows)
        return None


@dataclass
class _Run:
    """What one training run measured, for ``metrics.json``."""

    world: int
    train_rows: int
    fetch_seconds: float
    train_seconds: float
    losses: list[float]
    samples: int
    history: list[dict[str, Any]]


def _train_metrics(cfg: TrainConfig, encoder: FeatureEncoder, run: _Run,
                   train_missing: MissingFeatures) -> dict[str, Any]:
    model_cfg, history, losses = encoder.model, run.history, run.losses
    return {
        "feature_service": model_cfg.feature_service,
        "llm_features": model_cfg.llm_features,
        "world_size": run.world,
        "train_rows": int(run.train_rows),
        "epochs": cfg.epochs,
        "epochs_run": len(history) if history else cfg.epochs,
        "best_epoch": max(history, key=lambda h: h["valid_auc"])["epoch"] if history else cfg.epochs,
        "history": history,
        "train_seconds": round(run.train_seconds, 3),
        "fetch_seconds": round(run.fetch_seconds, 3),
        "samples_per_second": round(run.samples / run.train_seconds, 1) if run.train_seconds > 0 else None,
        "final_train_loss": float(np.mean(losses[-50:])) if losses else None,
        # mean loss per 50 steps: the training curve the demo plots
        "loss_curve": [round(float(np.mean(losses[i:i + 50])), 5) for i in range(0, len(losses), 50)],
        "train_missing": train_missing.as_dict(),
        "features": encoder.describe(),
    }


def _save_run_checkpoint(cfg: TrainConfig, ws, world: int, model: RankingModel | None,
                     encoder: FeatureEncoder) -> RankingModel:
    """Rank 0: the checkpoint in ``cfg.out`` (under ``torchrun`` rebuilt from the sharded one); the
    unsharded model back, for the valid metrics."""
    fingerprint = None
    if ws is not None and encoder.model.llm_features:
        fp = ws.read_fingerprint()
        fingerprint = fp.digest if fp is not None else None
    extra = {"fingerprint": fingerprint, "train_config": _config_json(cfg)}
    if world == 1:
        save_checkpoint(cfg.out, model, encoder, extra)
        return model
    return unshard_to_checkpoint(cfg.out, encoder, extra)


def _config_json(cfg: Any) -> dict[str, Any]:
    return json.loads(json.dumps(asdict(cfg), default=json_default))
