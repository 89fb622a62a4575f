"""``llmfeat encode``: every distinct behaviour and item text once through the frozen shallow layers."""

from __future__ import annotations

import os

import click

from llm_features.config import dataclass_options
from llm_features.workspace import Workspace
from llm_features.encode import EncodeConfig, encode


@click.command("encode")
@dataclass_options(EncodeConfig)
def command(cfg: EncodeConfig) -> None:
    """Encode the workspace's distinct behaviour and item texts into embedding part files.

    Incremental: texts already encoded by the same model fingerprint are skipped, and a killed run
    resumes from its last finished part. Writes encode_report.json (dedup ratio, throughput).
    """
    with Workspace.at(cfg.data_dir).lock("llmfeat encode"):  # one writer per data dir
        stats = encode(cfg)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, the totals once
        click.echo(stats.summary())
