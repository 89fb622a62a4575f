"""``llmfeat feast``: apply the feature repository, materialise it, look features up.

The same operations as the feast CLI run inside ``feast_repo/``, but from any directory and for any
data dir (``--data-dir`` / ``$LLMFEAT_DATA_DIR``), and ``materialize`` always checks the model
fingerprints first.

``apply`` and ``materialize`` hold the data dir's lock (:meth:`Workspace.lock`); ``lookup`` reads
only: it refuses a data dir without a registry and an online store that was never materialised.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import click
import numpy as np

from llm_features.config import data_dir_field, dataclass_options

_REPO_HELP = ("the Feast feature repository (the directory with feature_store.yaml); feast_repo is ./feast_repo "
              "where there is one, else the repository packaged with llmfeat")
_YAML_HELP = ("another configuration of the repository, relative to it, e.g. "
              "production/feature_store.redis_local.yaml [default: feature_store.yaml]")


@dataclass
class FeastApplyConfig:
    repo: Path = field(default=Path("feast_repo"), metadata={"help": _REPO_HELP})
    data_dir: Optional[Path] = data_dir_field()
    feature_store_yaml: Optional[Path] = field(default=None, metadata={"help": _YAML_HELP})


@dataclass
class FeastMaterializeConfig:
    repo: Path = field(default=Path("feast_repo"), metadata={"help": _REPO_HELP})
    data_dir: Optional[Path] = data_dir_field()
    feature_store_yaml: Optional[Path] = field(default=None, metadata={"help": _YAML_HELP})
    views: tuple[str, ...] = field(
        default=(), metadata={"help": "feature views to materialise (repeat the option) [default: all]"}
    )
    apply: bool = field(
        default=True, metadata={"help": "run apply first (re-tags the views with the current model)"}
    )
    chunk_rows: int = field(
        default=1_000_000,  # llm_features.store.MATERIALIZE_CHUNK_ROWS (not imported: the CLI loads lazily)
        metadata={"help": "a view with more source rows is materialised in time windows of about this many rows, "
                          "which bounds memory", "min": 1},
    )


@dataclass
class FeastLookupConfig:
    user_id: int = field(metadata={"help": "the user to look up"})
    item_ids: tuple[int, ...] = field(default=(), metadata={"help": "candidate item ids (repeat the option)"})
    service: Literal["ranker_llm", "ranker_id_only"] = field(
        default="ranker_llm", metadata={"help": "feature service"}
    )
    repo: Path = field(default=Path("feast_repo"), metadata={"help": _REPO_HELP})
    data_dir: Optional[Path] = data_dir_field()
    feature_store_yaml: Optional[Path] = field(default=None, metadata={"help": _YAML_HELP})


@click.group(name="feast")
def command() -> None:
    """Feast feature store: apply, materialize, lookup."""


@command.command("apply")
@dataclass_options(FeastApplyConfig)
def apply_cmd(cfg: FeastApplyConfig) -> None:
    """Register the repository's definitions for the data dir (like `feast apply`)."""
    from llm_features.store import apply_definitions, open_store, resolve_data_dir
    from llm_features.workspace import Workspace

    with Workspace.at(resolve_data_dir(cfg.repo, cfg.data_dir)).lock("llmfeat feast apply"):
        store = open_store(cfg.repo, cfg.data_dir, cfg.feature_store_yaml)
        apply_definitions(store)


@command.command("materialize")
@dataclass_options(FeastMaterializeConfig)
def materialize_cmd(cfg: FeastMaterializeConfig) -> None:
    """Check model fingerprints, then materialise every row of the data dir into the online store."""
    from llm_features.store import (
        apply_definitions,
        check_part_fingerprints,
        materialize_all,
        open_store,
        resolve_data_dir,
    )
    from llm_features.workspace import Workspace

    ws = Workspace.at(resolve_data_dir(cfg.repo, cfg.data_dir))
    with ws.lock("llmfeat feast materialize"):
        # checked before apply rewrites the registry: a refused run changes nothing
        check_part_fingerprints(ws)
        store = open_store(cfg.repo, cfg.data_dir, cfg.feature_store_yaml, must_exist=not cfg.apply)
        if cfg.views and cfg.apply:
            _check_views(store, cfg.views, ws.root)
        if cfg.apply:
            apply_definitions(store)
        report = materialize_all(store, feature_views=list(cfg.views) or None, chunk_rows=cfg.chunk_rows)
    span = f"{report.start.isoformat()} .. {report.end.isoformat()}"
    click.echo(f"materialized {span} in {report.seconds:.1f} s")
    for name, n in sorted(report.entities.items()):
        windows = report.windows.get(name, 1)
        extra = f"  ({windows} time windows)" if windows > 1 else ""
        click.echo(f"  {name:28s} {report.source_rows[name]:>9,d} source rows  {n:>9,d} entities{extra}")


def _check_views(store, views: tuple[str, ...], data_dir: Path) -> None:
    from llm_features.errors import UserError
    from llm_features.store import load_definitions

    defs = load_definitions(store.config.repo_path, data_dir, store.config.project)
    defined = {fv.name for fv in defs.feature_views}
    unknown = sorted(set(views) - defined)
    if unknown:
        raise UserError(f"feature view(s) {', '.join(unknown)} are not defined in {store.config.repo_path} "
                        f"(defined: {', '.join(sorted(defined))})", option="--views",
                        fix="Name views of the feature repository.")


@command.command("lookup")
@dataclass_options(FeastLookupConfig)
def lookup_cmd(cfg: FeastLookupConfig) -> None:
    """Print the online features of one user and some items."""
    from llm_features.store import check_materialized, online_features, open_store

    store = open_store(cfg.repo, cfg.data_dir, cfg.feature_store_yaml, must_exist=True)
    check_materialized(store, cfg.service)
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
