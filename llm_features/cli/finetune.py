"""``llmfeat finetune``: train the deep layers + CTR head with DTI or sliding-window packing."""

from __future__ import annotations

import click

from llm_features.config import dataclass_options
from llm_features.finetune.config import FinetuneConfig


@click.command("finetune")
@dataclass_options(FinetuneConfig)
def command(cfg: FinetuneConfig) -> None:
    """Fine-tune the deep layers and a CTR head on the train split; report valid/test AUC and LogLoss.

    Behaviour level (default) runs the deep layers over the cached atomic behaviour embeddings
    (run `llmfeat encode` first, with the same model options); token level runs every layer over
    the behaviour texts. Writes model.safetensors, config.json and metrics.json to --out, and the
    last complete checkpoint (weights, options, trainer state) to --out/resume/ for --resume.

    Example: llmfeat finetune --packing dti --targets-per-sequence 16 --context-size 30 --epochs 1
    """
    from llm_features.finetune.train import finetune

    m = finetune(cfg)
    click.echo(
        f"valid AUC {m['valid']['auc']:.4f} LogLoss {m['valid']['logloss']:.4f} | "
        f"test AUC {m['test']['auc']:.4f} LogLoss {m['test']['logloss']:.4f} | "
        f"{m['train_targets']} targets in {m['train_seconds']:.1f}s ({m['targets_per_s']:.0f}/s), "
        f"peak RSS {m['peak_rss_mb']:.0f} MiB -> {cfg.out}"
    )
