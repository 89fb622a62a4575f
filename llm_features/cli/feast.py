"""``llmfeat feast``: apply the feature repository, materialise it, look features up.

The same operations as the feast CLI run inside ``feast_repo/``, but from any directory and for any
data dir (``--data-dir`` / ``$LLMFEAT_DATA_DIR``), and ``materialize`` always checks the model
fingerprints first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import click
import numpy as np

from llm_features.config import dataclass_options

_REPO_HELP = "the Feast feature repository (the directory with feature_store.yaml)"
_DATA_HELP = (
    "data directory with the parquet tables, registry and online store "
    "[default: $LLMFEAT_DATA_DIR or <repo>/data]"
)


@dataclass
class FeastApplyConfig:
    repo: Path = field(default=Path("feast_repo"), metadata={"help": _REPO_HELP})
    data_dir: Optional[Path] = field(default=None, metadata={"help": _DATA_HELP})


@dataclass
class FeastMaterializeConfig:
    repo: Path = field(default=Path("feast_repo"), metadata={"help": _REPO_HELP})
    data_dir: Optional[Path] = field(default=None, metadata={"help": _DATA_HELP})
    views: tuple[str, ...] = field(
        default=(), metadata={"help": "feature views to materialise (repeat the option) [default: all]"}
    )
    apply: bool = field(
        default=True, metadata={"help": "run apply first (re-tags the views with the current model)"}
    )


@dataclass
class FeastLookupConfig:
    user_id: int = field(metadata={"help": "the user to look up"})
    item_ids: tuple[int, ...] = field(default=(), metadata={"help": "candidate item ids (repeat the option)"})
    service: Literal["ranker_llm", "ranker_id_only"] = field(
        default="ranker_llm", metadata={"help": "feature service"}
    )
    repo: Path = field(default=Path("feast_repo"), metadata={"help": _REPO_HELP})
    data_dir: Optional[Path] = field(default=None, metadata={"help": _DATA_HELP})


@click.group(name="feast")
def command() -> None:
    """Feast feature store: apply, materialize, lookup."""


@command.command("apply")
@dataclass_options(FeastApplyConfig)
def apply_cmd(cfg: FeastApplyConfig) -> None:
    """Register the definitions in feast_repo/ for the data dir (like `feast apply`)."""
    from llm_features.store import apply_definitions, open_store

    store = open_store(cfg.repo, cfg.data_dir)
    apply_definitions(store)


@command.command("materialize")
@dataclass_options(FeastMaterializeConfig)
def materialize_cmd(cfg: FeastMaterializeConfig) -> None:
    """Check model fingerprints, then materialise every row of the data dir into the online store."""
    from llm_features.store import apply_definitions, materialize_all, open_store

    store = open_store(cfg.repo, cfg.data_dir)
    if cfg.apply:
        apply_definitions(store)
    report = materialize_all(store, feature_views=list(cfg.views) or None)
    span = f"{report.start.isoformat()} .. {report.end.isoformat()}"
    click.echo(f"materialized {span} in {report.seconds:.1f} s")
    for name, n in sorted(report.entities.items()):
        click.echo(f"  {name:28s} {report.source_rows[name]:>9,d} source rows  {n:>9,d} entities")


@command.command("lookup")
@dataclass_options(FeastLookupConfig)
def lookup_cmd(cfg: FeastLookupConfig) -> None:
    """Print the online features of one user and some items."""
    from llm_features.store import online_features, open_store

    if cfg.user_id is None:
        raise click.UsageError("--user-id is required")
    store = open_store(cfg.repo, cfg.data_dir)
    feats = online_features(store, cfg.user_id, list(cfg.item_ids) or [0], cfg.service)
    click.echo(f"user {feats.user_id}, items {feats.item_ids.tolist()} ({cfg.service})")
    for name, value in feats.values.items():
        present = feats.present[name]
        click.echo(f"  {name:22s} present {int(present.sum())}/{len(present)}  {_preview(value)}")


def _preview(value: np.ndarray) -> str:
    if value.dtype == np.float32 and value.ndim == 2:
        head = ", ".join(f"{x:.4f}" for x in value[0, :4])
        return f"[{value.shape[0]}x{value.shape[1]}] first row [{head}, ...]"
    first = value[0]
    if isinstance(first, np.ndarray):
        return f"first {first[:8].tolist()}{' ...' if len(first) > 8 else ''}"
    return f"{[v.item() if isinstance(v, np.generic) else v for v in value[:5]]}"
