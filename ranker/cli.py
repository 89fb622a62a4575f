"""``llmfeat ranker train|evaluate|score``: a thin shell over :mod:`ranker.train` and :mod:`ranker.serve`.

Each command writes a ``metrics.json``. Distributed training runs the same command under
torchrun::

    torchrun --nproc_per_node=2 -m ranker.cli train --out runs/ranker_llm
"""

from __future__ import annotations

import logging
import os
import time

import click

from llm_features.config import dataclass_options
from llm_features.errors import UserError
from ranker.config import EvaluateConfig, ScoreConfig, TrainConfig


@click.group(name="ranker")
def command() -> None:
    """TorchRec ranker over the Feast features (ranker_llm, or the id-only twin ranker_id_only)."""


@command.command("train")
@dataclass_options(TrainConfig)
def train_command(cfg: TrainConfig) -> None:
    """Train on the train split (Feast point-in-time rows); write a checkpoint and metrics.json."""
    from ranker.train import train

    metrics = train(cfg)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    feats = metrics.get("features", {})
    click.echo(f"features ({metrics['feature_service']}): sparse {', '.join(feats.get('sparse', []))}; "
               f"dense {', '.join(feats.get('dense', []))}")
    if "valid" in metrics:
        v = metrics["valid"]
        click.echo(f"valid AUC {v['auc']:.4f}  LogLoss {v['logloss']:.4f}  ({v['rows']} rows)")
    click.echo(f"checkpoint: {cfg.out}  ({metrics['samples_per_second']} samples/s)")


@command.command("evaluate")
@dataclass_options(EvaluateConfig)
def evaluate_command(cfg: EvaluateConfig) -> None:
    """AUC and LogLoss of a checkpoint on a split; writes metrics.json."""
    from ranker.train import evaluate

    m = evaluate(cfg)
    click.echo(f"{cfg.split} AUC {m['auc']:.4f}  LogLoss {m['logloss']:.4f}  ({m['rows']} rows)")


@command.command("score")
@dataclass_options(ScoreConfig)
def score_command(cfg: ScoreConfig) -> None:
    """Rank candidate items for one user from the online store; prints the ranked list."""
    from ranker.serve import Ranker
    from llm_features.atomic import write_json
    from ranker.train import METRICS_FILE

    items = cfg.item_ids()
    if not items:
        raise click.UsageError("give candidate items with --items 1,2,3 (or repeat --items)")
    if len(set(items)) != len(items):
        dup = sorted({i for i in items if items.count(i) > 1})
        raise UserError(f"item id(s) {', '.join(map(str, dup))} given more than once", option="--items",
                        fix="Give each candidate once.")
    # one request: read the candidates' item inputs only, not the whole vocabulary's
    ranker = Ranker.load(cfg.checkpoint, repo=cfg.repo, data_dir=cfg.data_dir, prefetch_items=False)
    ranker.prepare()  # registry lookups and store checks happen once, outside the timed request
    t0 = time.perf_counter()
    ranked = ranker.rank(cfg.user_id, items, cfg.top_k)
    latency_ms = (time.perf_counter() - t0) * 1000
    click.echo(f"user {cfg.user_id}: {len(items)} candidates ranked in {latency_ms:.1f} ms")
    if ranker.user_known is False:
        click.echo(f"note: user {cfg.user_id} has no features in the online store: a cold start, scored with "
                   "the defaults (unknown id, learned missing vectors)")
    for pos, (item, prob) in enumerate(ranked, 1):
        click.echo(f"{pos:4d}  item {item:<10d} {prob:.4f}")
    out = cfg.out or (cfg.checkpoint / "score")
    write_json(out / METRICS_FILE, {
        "user_id": cfg.user_id, "candidates": len(items), "latency_ms": round(latency_ms, 3),
        "ranked": [{"item_id": i, "probability": p} for i, p in ranked], "missing": ranker.missing.as_dict(),
    })


if __name__ == "__main__":  # torchrun -m ranker.cli train ...
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    command()
