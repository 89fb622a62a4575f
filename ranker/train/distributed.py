"""Sharded training under ``torchrun`` (``WORLD_SIZE`` > 1): the tables sharded with
``DistributedModelParallel`` (gloo on CPU, table-wise / column-wise / data-parallel), a row-wise
Adagrad fused into the backward pass, ``TrainPipelineSparseDist``; then rank 0 turns the sharded
checkpoint into the plain one."""

from __future__ import annotations

import itertools
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ranker.config import TrainConfig
from ranker.features import EncodedRows, FeatureEncoder
from ranker.model import RankingModel, RankingTrain
from ranker.train.checkpoint import save_checkpoint

log = logging.getLogger("ranker.train")  # the package's logger: what callers filter on


def _sharding_constraints(cfg: TrainConfig, encoder: FeatureEncoder) -> dict[str, Any] | None:
    if cfg.sharding == "auto":
        return None
    from torchrec.distributed.planner.types import ParameterConstraints

    return {t.name: ParameterConstraints(sharding_types=[cfg.sharding]) for t in encoder.tables()}


def train_distributed(
    cfg: TrainConfig, encoder: FeatureEncoder, rows: EncodedRows, rank: int, world: int,
    tower_state: dict[str, torch.Tensor] | None = None,
) -> tuple[Any, list[float], int]:
    """This rank's part of a sharded run: ``(None, losses, samples)``; the weights go to a sharded
    checkpoint in ``cfg.out / ".sharded"`` (see :func:`unshard_to_checkpoint`)."""
    dmp, pipeline = _sharded_pipeline(cfg, encoder, rank, world, tower_state)
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
    _save_sharded(dmp, cfg.out / ".sharded", rank)
    return None, losses, samples


def _sharded_pipeline(cfg: TrainConfig, encoder: FeatureEncoder, rank: int, world: int,
                      tower_state: dict[str, torch.Tensor] | None) -> tuple[Any, Any]:
    """The model sharded by the planner's collective plan (tables on the meta device until then),
    row-wise Adagrad fused into the backward pass, Adam for the dense parameters: ``(dmp, pipeline)``."""
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
    return dmp, TrainPipelineSparseDist(dmp, optimizer, device, execute_all_batches=True)


def _save_sharded(dmp: Any, sharded_dir: Path, rank: int) -> None:
    """Sharded save (every rank), from which rank 0 then rebuilds the plain state dict."""
    import torch.distributed.checkpoint as dcp

    if rank == 0 and sharded_dir.exists():
        shutil.rmtree(sharded_dir)
    dist.barrier()
    dcp.save(dmp.state_dict(), checkpoint_id=str(sharded_dir))
    dist.barrier()


def unshard_to_checkpoint(out: Path, encoder: FeatureEncoder, extra: dict[str, Any]) -> RankingModel:
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


