"""``llmfeat ingest``: MovieLens or generic interaction logs to the canonical parquet tables."""

from __future__ import annotations

import click

from llm_features.config import dataclass_options
from llm_features.workspace import Workspace
from llm_features.ingest import IngestConfig, format_summary, ingest


@click.command("ingest")
@dataclass_options(IngestConfig)
def command(cfg: IngestConfig) -> None:
    """Read interaction logs into canonical/{interactions,items,users}.parquet, split.json and
    user_recent_behaviors/.

    \b
    MovieLens:  llmfeat ingest --source ../shared/data/ml-1m
    Generic:    llmfeat ingest --format generic --interactions log.csv --items items.csv \\
                  --map user_id=uid --map item_id=sku --map event_timestamp=ts --map rating=stars \\
                  --item-text-column title
    """
    with Workspace.at(cfg.data_dir).lock("llmfeat ingest"):  # one writer per data dir
        click.echo(format_summary(ingest(cfg)))
