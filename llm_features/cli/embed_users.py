"""``llmfeat embed-users``: aggregated user embeddings of a fine-tuned checkpoint -> ``user_embeddings/``."""

from __future__ import annotations

import os

import click

from llm_features.config import dataclass_options
from llm_features.workspace import Workspace
from llm_features.embed_users import EmbedUsersConfig


@click.command("embed-users")
@dataclass_options(EmbedUsersConfig)
def command(cfg: EmbedUsersConfig) -> None:
    """Run the fine-tuned deep layers over each user's last n behaviours; write user_embeddings/ parts.

    A row stamped T uses only interactions strictly before T (point-in-time correct for Feast's
    get_historical_features). Incremental: only snapshots not yet exported are computed, and a
    killed run resumes from its last finished part. Rows of another checkpoint are refused
    (--overwrite replaces them).

    Example: llmfeat embed-users --cadence event --every 2   (reads <data_dir>/runs/finetune)
    """
    from llm_features.embed_users import embed_users

    # bad input is a UserError (a click exception): one line, exit code 1
    with Workspace.at(cfg.data_dir).lock("llmfeat embed-users"):  # one writer per data dir
        report = embed_users(cfg)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, the totals once
        click.echo(report.summary())
