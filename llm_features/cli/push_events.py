"""``llmfeat push-events``: apply new interactions to the stores now (fresh user embeddings)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import click

from llm_features.config import data_dir_field, dataclass_options


@dataclass
class PushEventsConfig:
    events: Optional[Path] = field(default=None, metadata={
        "help": "The events: a .jsonl file (one JSON object per line) or a .csv file with a header; "
                "fields user_id, item_id, timestamp (ISO-8601 or epoch seconds), label (0/1), and optionally "
                "rating, item_text (required for an item the data dir does not know), behavior_text."})
    data_dir: Optional[Path] = data_dir_field()
    checkpoint: Optional[Path] = field(default=None, metadata={
        "help": "The fine-tuned checkpoint embed-users exported with (default: <data_dir>/runs/finetune)."})
    repo: Path = field(default=Path("feast_repo"), metadata={
        "help": "The Feast feature repository (the directory with feature_store.yaml)."})
    device: Literal["cpu", "auto", "cuda"] = field(default="cpu", metadata={
        "help": "Where the model runs: cpu, cuda, or auto (cuda when available)."})
    num_threads: Optional[int] = field(default=None, metadata={
        "help": "CPU threads for torch (default: torch's).", "min": 1})
    trust_remote_code: bool = field(default=False, metadata={
        "help": "Allow Python code from the checkpoint's model directory (off: only built-in architectures). "
                "Taken from the command line only.", "cli_only": True})


@click.command("push-events")
@dataclass_options(PushEventsConfig)
def command(cfg: PushEventsConfig) -> None:
    """Push new interactions: the users' embeddings and recent lists, online and offline, right away.

    Runs the fine-tuned deep layers over each user's last n behaviours (what embed-users computes for
    the same history), encodes the text of an item never encoded before, and writes the new rows to
    the offline store (part files) and the online store (the views' Feast push sources). Every event
    is checked first; a bad one is refused (exit 1) and nothing is written.

    Example: llmfeat push-events --data-dir feast_repo/data --events new_events.jsonl
    """
    from llm_features.errors import UserError
    from llm_features.events import EventProcessor, read_events_file
    from llm_features.store import resolve_data_dir

    if cfg.events is None:
        raise UserError("is required", option="--events", fix="Pass a .jsonl or .csv file of events.")
    events = read_events_file(cfg.events)  # a bad file is refused before the model loads
    proc = EventProcessor(data_dir=resolve_data_dir(cfg.repo, cfg.data_dir), checkpoint=cfg.checkpoint,
                          repo=cfg.repo, device=cfg.device, num_threads=cfg.num_threads,
                          trust_remote_code=cfg.trust_remote_code)
    report = proc.process(events)
    click.echo(report.summary())
