"""Train and evaluate the ranker on Feast point-in-time rows.

The entity rows are the labelled interactions of a split (``canonical/interactions.parquet``:
``user_id, item_id, event_timestamp, label``); their features come only from
``store.get_historical_features(entity_df, features=<feature service>)`` (DuckDB offline store).

One process trains the unsharded model with a plain loop. Under ``torchrun`` (``WORLD_SIZE`` >
1) the same function shards the tables with ``DistributedModelParallel`` (gloo on CPU,
table-wise / column-wise / data-parallel), fuses a row-wise Adagrad into the backward pass and
runs ``TrainPipelineSparseDist``; every rank reads its own share of the entity rows. Either way
the checkpoint is one unsharded ``model.safetensors`` next to ``ranker.json`` (configuration and
vocabularies), so serving loads it without a process group::

    llmfeat ranker train --out runs/ranker_llm
    torchrun --nproc_per_node=2 -m ranker.cli train --out runs/ranker_llm
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist

from llm_features.atomic import atomic_path, json_default, write_json
from llm_features.config import validate_config
from llm_features.errors import UserError
from llm_features.metrics import log_loss_from_probs, mean_per_user_auc, roc_auc
from llm_features.workspace import MissingInputError
from llm_features.threads import configure_threads
from ranker.config import EvaluateConfig, ModelConfig, TrainConfig
from llm_features.attributes import Attribute, attributes_of_fields
from ranker.features import (
    LABEL,
    EncodedRows,
    FeatureEncoder,
    MissingFeatures,
    RawRows,
    extract,
    feature_columns,
    infer_frame_attributes,
)
from ranker.model import RankingModel, RankingTrain

log = logging.getLogger(__name__)

ENTITY_COLUMNS = ["user_id", "item_id", "event_timestamp", LABEL]
CHECKPOINT_FORMAT = "llmfeat-ranker/1"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "ranker.json"
METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.parquet"

FeatureSource = Callable[[pd.DataFrame], pd.DataFrame]
"""Entity rows in, the same rows with their point-in-time features out (any order)."""


# ------------------------------------------------------------------------------------------------
# Data: entity rows and Feast point-in-time features


def workspace_for(repo: Path, data_dir: Path | None):
    from llm_features.workspace import Workspace, resolve_data_dir

    return Workspace.at(resolve_data_dir(repo, data_dir))


def load_entities(interactions: Path, split: str, max_rows: int | None = None, last: bool = False) -> pd.DataFrame:
    """The labelled interactions of ``split`` as a Feast entity DataFrame."""
    if not interactions.exists():
        raise MissingInputError("not found", file=interactions, option="--data-dir",
                                fix="Run `llmfeat ingest` first, or pass the data dir it wrote.")
    df = pd.read_parquet(interactions, columns=ENTITY_COLUMNS + ["split"], filters=[("split", "==", split)])
    if df.empty:
        raise UserError(f"has no rows with split == {split!r}", file=interactions, column="split",
                        fix="Re-run `llmfeat ingest` with a split that gives every split rows.")
    if max_rows is not None and len(df) > max_rows:
        df = df.iloc[-max_rows:] if last else df.iloc[:max_rows]
    return df[ENTITY_COLUMNS].reset_index(drop=True)


def feast_source(store, service_name: str, columns: set[str] | None = None) -> FeatureSource:
    """``get_historical_features`` over the named feature service as a :data:`FeatureSource`
    (through :func:`llm_features.asof.historical_features`: the same frame, a bounded join).

    With ``columns``, only the service's features of those names (and its attributes) are joined:
    the same rows and values, without paying for columns the model never reads (e.g.
    ``recent_behavior_ids``). The source's ``attributes`` are the user and item attributes of the
    service (:func:`service_attributes`), from which the ranker builds its features.
    """
    from llm_features.store import feature_service

    service = feature_service(store, service_name)
    attributes = service_attributes(store, service)
    features: Any = service
    if columns is not None:
        wanted = set(columns) | {a.name for a in attributes}
        features = [f"{p.name_to_use()}:{f.name}" for p in service.feature_view_projections
                    for f in p.features if f.name in wanted]

    from llm_features.asof import historical_features

    stamp_indexes: dict = {}  # built on the first chunk, reused by the others

    def fetch(entity_df: pd.DataFrame) -> pd.DataFrame:
        # Feast's point-in-time join, with the per-user time series joined at their as-of stamps
        # (llm_features.asof): the same rows, without pairing each row with all earlier snapshots
        frame = historical_features(store, entity_df, features, stamp_indexes)
        return _entity_timestamps_as_given(frame, entity_df)

    fetch.attributes = attributes  # type: ignore[attr-defined]
    return fetch


def service_attributes(store, service) -> list[Attribute]:
    """The user and item attributes of a feature service: its fields tagged with an attribute kind
    (``feast_repo`` tags the profile views' fields with what ingest recorded), in service order."""
    from ranker.features import legacy_attributes

    out: list[Attribute] = []
    for proj in service.feature_view_projections:
        keys = set(store.get_feature_view(proj.name).join_keys)
        entity = "user" if keys == {"user_id"} else "item" if keys == {"item_id"} else ""
        found = attributes_of_fields(proj.features, entity)
        if not found and proj.name in ("user_profile", "item_profile") and proj.features:
            # a registry applied by definitions that did not tag the attributes yet: their fixed set
            names = [f.name for f in proj.features]
            found = [a for a in legacy_attributes([*names, "zip_prefix"]) if a.name in names]
            log.warning("ranker: %s has no attribute tags (applied by an older llmfeat): reading %s as before; "
                        "run `llmfeat feast apply` to register the attributes ingest recorded",
                        proj.name, ", ".join(a.name for a in found) or "nothing")
        out += found
    return out


def _entity_timestamps_as_given(frame: pd.DataFrame, entity_df: pd.DataFrame) -> pd.DataFrame:
    """The entity timestamps of a feature frame in the entity frame's dtype, whatever the offline store.

    DuckDB returns them as given (UTC-aware); Spark returns them tz-naive in the session time zone
    (UTC: ``llm_features.offline_sources.spark_session_defaults``) and in ns, so the same entity row
    would not look up the same in :class:`PrefetchedSource`.
    """
    col = "event_timestamp"
    if col not in frame or col not in entity_df:
        return frame
    want = entity_df[col].dtype
    ts = frame[col]
    if isinstance(want, pd.DatetimeTZDtype) and ts.dtype != want:
        if pd.api.types.is_datetime64_dtype(ts):  # tz-naive: Spark's session time zone, UTC
            ts = ts.dt.tz_localize("UTC")
        frame[col] = ts.astype(want)
    return frame


class PrefetchedSource:
    """A :data:`FeatureSource` that joins once and then answers from memory (benchmarks, sweeps).

    ``PrefetchedSource(feast_source(...), entities)`` calls the wrapped source on ``entities``
    (in chunks of ``chunk_rows``) once; later calls look their rows up by
    ``(user_id, item_id, event_timestamp)``, so several seeds or configurations train on the very
    rows ``get_historical_features`` returned without joining again.
    """

    KEYS = ["user_id", "item_id", "event_timestamp"]

    def __init__(self, source: FeatureSource, entities: pd.DataFrame, chunk_rows: int = 100_000) -> None:
        parts = [source(entities.iloc[s : s + chunk_rows][ENTITY_COLUMNS])
                 for s in range(0, len(entities), chunk_rows)]
        frame = pd.concat(parts, ignore_index=True).drop(columns=[LABEL], errors="ignore")
        self.attributes = getattr(source, "attributes", None)
        if frame.duplicated(self.KEYS).any():
            raise ValueError("PrefetchedSource needs unique (user_id, item_id, event_timestamp) entity rows")
        self.frame = frame.set_index(self.KEYS)

    def __call__(self, entity_df: pd.DataFrame) -> pd.DataFrame:
        keys = pd.MultiIndex.from_frame(entity_df[self.KEYS])
        missing = ~keys.isin(self.frame.index)
        if missing.any():
            raise KeyError(f"{int(missing.sum())} entity rows were not prefetched, e.g. {keys[missing][0]}")
        out = self.frame.loc[keys].reset_index()
        if LABEL in entity_df:
            out[LABEL] = entity_df[LABEL].to_numpy()
        return out


def fetch_rows(entities: pd.DataFrame, source: FeatureSource, cfg: ModelConfig, chunk_rows: int,
               attributes: list[Attribute] | None = None) -> RawRows:
    """Point-in-time features of ``entities`` in chunks, each reduced to :class:`RawRows` at once.

    ``attributes``: the user and item attributes to read; default: the source's own (``source.attributes``,
    e.g. a Feast service's tagged fields), else inferred from the first chunk's columns.
    """
    if attributes is None:
        attributes = getattr(source, "attributes", None)
    parts = []
    for start in range(0, len(entities), chunk_rows):
        chunk = entities.iloc[start : start + chunk_rows]
        frame = source(chunk)
        if len(frame) != len(chunk):
            raise RuntimeError(
                f"the feature source returned {len(frame)} rows for {len(chunk)} entity rows; a point-in-time "
                "join must keep every row (use the duckdb offline store)"
            )
        # a point-in-time join returns its rows in no fixed order: sort them, so that the seeded
        # shuffle (and with it the whole training run) is reproducible
        order = [c for c in PrefetchedSource.KEYS + [LABEL] if c in frame.columns]
        frame = frame.sort_values(order, kind="stable", ignore_index=True)
        if attributes is None:
            attributes = infer_frame_attributes(frame, cfg)
        parts.append(extract(frame, cfg, attributes=attributes))
        del frame
    return RawRows.concat(parts)


# ------------------------------------------------------------------------------------------------
# Prediction and metrics


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


# ------------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(out: Path, model: RankingModel, encoder: FeatureEncoder, extra: dict[str, Any]) -> None:
    """``model.safetensors`` (unsharded state dict) and ``ranker.json`` (config, vocabularies)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(out / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp))
    payload = {"format": CHECKPOINT_FORMAT, "feature_service": encoder.model.feature_service,
               "encoder": encoder.to_dict(), **extra}
    write_json(out / CONFIG_FILE, payload)


def load_checkpoint(path: Path) -> tuple[RankingModel, FeatureEncoder, dict[str, Any]]:
    """The unsharded model (eval mode), its encoder, and the ``ranker.json`` payload."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / CONFIG_FILE).exists() or not (path / WEIGHTS_FILE).exists():
        missing = CONFIG_FILE if not (path / CONFIG_FILE).exists() else WEIGHTS_FILE
        raise MissingInputError(
            f"is not a ranker checkpoint (no {missing})", file=path, option="--checkpoint",
            fix="Pass the --out directory of `llmfeat ranker train` (or run it first).",
        )
    try:
        payload = json.loads((path / CONFIG_FILE).read_text())
    except ValueError as e:
        raise UserError(f"is not valid JSON ({e})", file=path / CONFIG_FILE, option="--checkpoint",
                        fix="Re-run `llmfeat ranker train` to rewrite the checkpoint.") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else None
        raise UserError(f"format {found!r}, expected {CHECKPOINT_FORMAT!r}", file=path / CONFIG_FILE,
                        option="--checkpoint", fix="Pass a checkpoint written by `llmfeat ranker train`.")
    encoder = FeatureEncoder.from_dict(payload["encoder"])
    model = RankingModel(encoder)
    model.load_state_dict(load_file(str(path / WEIGHTS_FILE)))
    model.eval()
    return model, encoder, payload


# ------------------------------------------------------------------------------------------------
# Training


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
    world = int(os.environ.get("WORLD_SIZE", "1"))
    owns_group = world > 1 and not dist.is_initialized()
    if owns_group:
        dist.init_process_group("gloo")
    try:
        return _train(cfg, entities, source)
    finally:
        if owns_group:
            dist.destroy_process_group()


def _train(cfg: TrainConfig, entities: pd.DataFrame | None, source: FeatureSource | None) -> dict[str, Any]:
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    configure_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model_cfg = cfg.model_config()
    started = time.perf_counter()

    ws = None
    if entities is None or source is None:
        ws = workspace_for(cfg.repo, cfg.data_dir)
        if not ws.root.is_dir():
            raise MissingInputError("the data dir does not exist", file=ws.root, option="--data-dir",
                                    fix="Pass the data dir that `llmfeat ingest` wrote (or run it first).")
    # every input is checked before the (long) point-in-time join
    tower = None
    if model_cfg.llm_features and model_cfg.llm_mode == "score":
        tower = resolve_tower(cfg.tower, ws)

    def split_entities(split: str, max_rows: int | None = None) -> pd.DataFrame:
        if entities is not None:
            df = entities[entities["split"] == split][ENTITY_COLUMNS].reset_index(drop=True)
            return df.iloc[-max_rows:] if max_rows is not None and len(df) > max_rows else df
        return load_entities(ws.interactions, split, max_rows, last=True)

    train_entities = split_entities("train", cfg.max_train_rows)
    if source is None:
        from llm_features.store import open_store

        store = open_store(cfg.repo, ws.root, must_exist=True)
        source = feast_source(store, model_cfg.feature_service, feature_columns(model_cfg))
    shard = train_entities.iloc[rank::world]  # each rank joins only its own rows
    t0 = time.perf_counter()
    raw = fetch_rows(shard, source, model_cfg, cfg.chunk_rows)
    fetch_seconds = time.perf_counter() - t0

    observed = FeatureEncoder.observe(raw)
    if world > 1:  # every rank must index with the same vocabularies
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, observed)
        encoder = FeatureEncoder.fit(gathered, model_cfg)
    else:
        encoder = FeatureEncoder.fit([observed], model_cfg)
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

    valid_entities = split_entities("valid") if cfg.validate else None
    valid_rows = None
    if world == 1 and valid_entities is not None and len(valid_entities):
        # early stopping needs the valid rows during training; joined once, scored after every epoch.
        # fetch_rows sorts each chunk by these keys: sorted entities keep row i = entity i (for users)
        valid_entities = valid_entities.sort_values(PrefetchedSource.KEYS + [LABEL], kind="stable",
                                                    ignore_index=True)
        valid_rows = encoder.index(fetch_rows(valid_entities, source, model_cfg, cfg.chunk_rows,
                                              encoder.attributes))
        valid_rows.users = valid_entities["user_id"].to_numpy()

    t0 = time.perf_counter()
    history: list[dict[str, Any]] = []
    if world > 1:
        model, losses, samples = _train_distributed(cfg, encoder, rows, rank, world, tower_state)
    else:
        model, losses, samples = _train_local(cfg, encoder, rows, valid_rows, history, tower_state)
    train_seconds = time.perf_counter() - t0

    metrics: dict[str, Any] = {
        "feature_service": model_cfg.feature_service,
        "llm_features": model_cfg.llm_features,
        "world_size": world,
        "train_rows": int(len(train_entities)),
        "epochs": cfg.epochs,
        "epochs_run": len(history) if history else cfg.epochs,
        "best_epoch": max(history, key=lambda h: h["valid_auc"])["epoch"] if history else cfg.epochs,
        "history": history,
        "train_seconds": round(train_seconds, 3),
        "fetch_seconds": round(fetch_seconds, 3),
        "samples_per_second": round(samples / train_seconds, 1) if train_seconds > 0 else None,
        "final_train_loss": float(np.mean(losses[-50:])) if losses else None,
        # mean loss per 50 steps: the training curve the demo plots
        "loss_curve": [round(float(np.mean(losses[i:i + 50])), 5) for i in range(0, len(losses), 50)],
        "train_missing": train_missing.as_dict(),
        "features": encoder.describe(),
    }
    if rank == 0:
        fingerprint = None
        if ws is not None and model_cfg.llm_features:
            fp = ws.read_fingerprint()
            fingerprint = fp.digest if fp is not None else None
        extra = {"fingerprint": fingerprint, "train_config": _config_json(cfg)}
        if world == 1:
            save_checkpoint(cfg.out, model, encoder, extra)
        else:
            model = _unshard_to_checkpoint(cfg.out, encoder, extra)
        if valid_rows is not None:
            metrics["valid"] = binary_metrics(valid_rows.labels, predict(model, valid_rows))
        elif valid_entities is not None and len(valid_entities):
            metrics["valid"] = evaluate_rows(model, encoder, valid_entities, source, cfg.chunk_rows)
        metrics["total_seconds"] = round(time.perf_counter() - started, 3)
        write_json(cfg.out / METRICS_FILE, metrics)
        log.info("ranker train: %s", json.dumps({k: v for k, v in metrics.items() if k != "train_missing"}))
    if world > 1:
        dist.barrier()
    return metrics


def resolve_tower(tower: Path | None, ws) -> tuple[dict[str, Any], int, dict[str, torch.Tensor]]:
    """The finetune checkpoint whose head scores pairs: (identity, head width, its tensors).

    Default: the checkpoint recorded in the workspace's ``user_embeddings/`` parts. A given
    ``tower`` must be that same checkpoint (same weights and options) when the parts exist: a head
    scoring another model's user embeddings would be a silent mismatch.
    """
    from safetensors.torch import load_file

    from llm_features.embed_users import CHECKPOINT_METADATA_KEY, checkpoint_identity
    from llm_features.finetune.checkpoint import WEIGHTS, read_checkpoint_config
    from llm_features.parquet_io import file_metadata, list_parts

    exported = None
    if ws is not None:
        for part in list_parts(ws.user_embeddings):
            raw = file_metadata(part).get(CHECKPOINT_METADATA_KEY)
            if raw is not None:
                exported = json.loads(raw)
                break
    if tower is None:
        if exported is None:
            where = ws.user_embeddings if ws is not None else None
            raise UserError(
                "llm_mode=score needs the fine-tuned tower, and no user embeddings record one"
                + (f" ({where} has no parts)" if where is not None else ""), option="--tower",
                fix="Pass --tower <llmfeat finetune --out dir>, or run `llmfeat embed-users` first "
                    "(or train the id-only twin: --no-llm-features).")
        tower = Path(exported["path"])
    tower = Path(tower)
    if not (tower / WEIGHTS).exists():
        raise MissingInputError(f"no {WEIGHTS}", file=tower, option="--tower",
                                fix="Pass the directory `llmfeat finetune --out` wrote.")
    identity = checkpoint_identity(tower)
    if exported is not None and exported.get("id") != identity["id"]:
        raise UserError(
            f"{ws.user_embeddings} holds user embeddings of checkpoint {exported.get('id')} "
            f"({exported.get('path')}), but this is checkpoint {identity['id']}", file=tower, option="--tower",
            fix="Run `llmfeat embed-users --overwrite` with this checkpoint, or pass the one that exported them."
        )
    ft_cfg, _, _ = read_checkpoint_config(tower)
    return identity, int(ft_cfg.head_hidden), load_file(str(tower / WEIGHTS))


def _config_json(cfg: Any) -> dict[str, Any]:
    return json.loads(json.dumps(asdict(cfg), default=json_default))


def _param_groups(model: RankingModel) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    sparse = list(model.embedding_bag_collection.parameters())
    ids = {id(p) for p in sparse}
    return sparse, [p for p in model.parameters() if id(p) not in ids and p.requires_grad]


def _train_local(
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


def _sharding_constraints(cfg: TrainConfig, encoder: FeatureEncoder) -> dict[str, Any] | None:
    if cfg.sharding == "auto":
        return None
    from torchrec.distributed.planner.types import ParameterConstraints

    return {t.name: ParameterConstraints(sharding_types=[cfg.sharding]) for t in encoder.tables()}


def _train_distributed(
    cfg: TrainConfig, encoder: FeatureEncoder, rows: EncodedRows, rank: int, world: int,
    tower_state: dict[str, torch.Tensor] | None = None,
) -> tuple[Any, list[float], int]:
    from torch.distributed.optim import _apply_optimizer_in_backward
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
    from torchrec.distributed.sharding_plan import get_default_sharders
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
    from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
    from torchrec.optim.optimizers import in_backward_optimizer_filter
    from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

    device = torch.device("cpu")
    model = RankingModel(encoder, device=device, sparse_device=torch.device("meta"))
    if model.tower_score is not None:
        model.tower_score.load_tower(tower_state)
    step = RankingTrain(model)
    _apply_optimizer_in_backward(
        RowWiseAdagrad, model.embedding_bag_collection.parameters(), {"lr": cfg.sparse_lr}
    )
    planner = EmbeddingShardingPlanner(
        topology=Topology(local_world_size=world, world_size=world, compute_device="cpu"),
        batch_size=cfg.batch_size,
        constraints=_sharding_constraints(cfg, encoder),
    )
    sharders = get_default_sharders()
    plan = planner.collective_plan(step, sharders, dist.GroupMember.WORLD)
    if rank == 0:
        log.info("ranker train: sharding plan\n%s", plan)
    dmp = DistributedModelParallel(module=step, device=device, plan=plan, sharders=sharders)
    dense_opt = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(dmp.named_parameters())), lambda ps: torch.optim.Adam(ps, lr=cfg.lr)
    )
    optimizer = CombinedOptimizer([dmp.fused_optimizer, dense_opt])
    pipeline = TrainPipelineSparseDist(dmp, optimizer, device, execute_all_batches=True)

    # Every rank must run the same number of steps: collectives run in each one.
    n = torch.tensor([len(rows) // cfg.batch_size])
    dist.all_reduce(n, op=dist.ReduceOp.MIN)
    n_batches = int(n.item())
    if n_batches == 0:
        raise ValueError(f"fewer than batch_size={cfg.batch_size} train rows per rank; lower --batch-size")
    batches: Iterator[Any] = itertools.chain.from_iterable(
        rows.batches(cfg.batch_size, shuffle=True, seed=(cfg.seed * 1000 + epoch) * world + rank,
                     oov_dropout=cfg.oov_dropout, missing_dropout=cfg.missing_dropout, num_batches=n_batches)
        for epoch in range(cfg.epochs)
    )
    losses: list[float] = []
    dmp.train()
    while True:
        try:
            loss, _, _ = pipeline.progress(batches)
        except StopIteration:
            break
        losses.append(float(loss.detach()))
    samples = n_batches * cfg.epochs * cfg.batch_size * world

    # Sharded save (every rank), then rank 0 rebuilds the plain state dict from it.
    import torch.distributed.checkpoint as dcp

    sharded_dir = cfg.out / ".sharded"
    if rank == 0 and sharded_dir.exists():
        shutil.rmtree(sharded_dir)
    dist.barrier()
    dcp.save(dmp.state_dict(), checkpoint_id=str(sharded_dir))
    dist.barrier()
    return None, losses, samples


def _unshard_to_checkpoint(out: Path, encoder: FeatureEncoder, extra: dict[str, Any]) -> RankingModel:
    """Rank 0: load the sharded DCP checkpoint into an unsharded model and save it plainly."""
    import torch.distributed.checkpoint as dcp

    step = RankingTrain(RankingModel(encoder))
    state = step.state_dict()
    dcp.load(state, checkpoint_id=str(out / ".sharded"), no_dist=True)
    step.load_state_dict(state)
    save_checkpoint(out, step.model, encoder, extra)
    shutil.rmtree(out / ".sharded", ignore_errors=True)
    step.model.eval()
    return step.model


# ------------------------------------------------------------------------------------------------
# Evaluation


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
    # fetch_rows sorts each chunk by these keys: sorting the entities first keeps row i = entity i
    entities = entities.sort_values(PrefetchedSource.KEYS + [LABEL], kind="stable", ignore_index=True)
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
        ws = workspace_for(cfg.repo, cfg.data_dir)
        if not ws.root.is_dir():
            raise MissingInputError("the data dir does not exist", file=ws.root, option="--data-dir",
                                    fix="Pass the data dir that `llmfeat ingest` wrote (or run it first).")
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
        from llm_features.store import open_store

        store = open_store(cfg.repo, ws.root, must_exist=True)
        source = feast_source(store, payload["feature_service"], set(encoder.source_columns))
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
