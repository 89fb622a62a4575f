"""``llmfeat demo``: the main job, end to end on one dataset with the embedded defaults.

Steps: ingest -> encode -> feast apply -> materialize -> an online lookup for a sample user,
checked against vectors computed directly by the model. Every step is incremental, so a second
run only checks that nothing changed.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import click

from llm_features.config import dataclass_options


@dataclass
class DemoConfig:
    source: Path = field(default=Path("../shared/data/ml-1m"), metadata={
        "help": "MovieLens directory (ml-1m or ml-100k layout)."})
    repo: Path = field(default=Path("feast_repo"), metadata={"help": "The Feast feature repository."})
    data_dir: Path | None = field(default=None, metadata={
        "help": "Workspace directory (default: $LLMFEAT_DATA_DIR or <repo>/data)."})
    sample_user: int | None = field(default=None, metadata={
        "help": "User for the online lookup (default: the most active user of the test split)."})
    num_candidates: int = field(default=100, metadata={"help": "Items in the online lookup."})
    progress: bool = field(default=True, metadata={"help": "Show progress bars."})


class _Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def step(self, name: str):
        timer = self

        class _Step:
            def __enter__(self) -> None:
                click.secho(f"== {name}", bold=True)
                self.t0 = time.perf_counter()

            def __exit__(self, *exc: object) -> None:
                timer.seconds[name] = time.perf_counter() - self.t0

        return _Step()


def run_demo(cfg: DemoConfig) -> dict:
    """Run the pipeline; returns the report that is printed and written to ``<data_dir>/demo_report.json``."""
    import numpy as np
    import pandas as pd

    from llm_features.backbone import Backbone
    from llm_features.encode import EncodeConfig, encode
    from llm_features.ingest import IngestConfig, format_summary, ingest
    from llm_features.store import apply_definitions, materialize_all, online_features, open_store, resolve_data_dir
    from llm_features.workspace import Workspace

    data_dir = resolve_data_dir(cfg.repo, cfg.data_dir)
    ws = Workspace.at(data_dir)
    timer = _Timer()
    report: dict = {"source": str(cfg.source), "data_dir": str(data_dir)}

    with timer.step("ingest"):
        ing = ingest(IngestConfig(source=cfg.source, data_dir=data_dir), ws)
        click.echo(format_summary(ing))
        report["ingest"] = {"counts": ing["counts"], "skipped": bool(ing.get("skipped"))}

    with timer.step("encode"):
        enc_cfg = EncodeConfig(data_dir=data_dir, progress=cfg.progress)
        backbone = Backbone.load(enc_cfg.backbone_config())
        stats = encode(enc_cfg, backbone=backbone)
        click.echo(stats.summary())
        report["encode"] = stats.to_dict()

    with timer.step("feast apply"):
        store = open_store(cfg.repo, data_dir)
        with contextlib.redirect_stdout(io.StringIO()) as diff:  # feast prints every object's proto diff
            apply_definitions(store)
        (data_dir / "feast_apply.log").write_text(diff.getvalue())
        click.echo(f"applied {len(store.list_feature_views())} feature views, "
                   f"{len(store.list_feature_services())} feature services (diff: {data_dir / 'feast_apply.log'})")

    with timer.step("materialize"):
        mat = materialize_all(store, ws)
        click.echo(f"materialized {mat.total_entities:,} entity rows in {mat.seconds:.1f}s "
                   f"({', '.join(f'{k}={v:,}' for k, v in mat.entities.items())})")
        report["materialize"] = {"seconds": mat.seconds, "entities": mat.entities}

    with timer.step("online lookup"):
        inter = pd.read_parquet(ws.interactions, columns=["user_id", "item_id", "split"])
        items = pd.read_parquet(ws.items, columns=["item_id", "item_text"])
        user = cfg.sample_user
        if user is None:
            user = int(inter.loc[inter.split == "test", "user_id"].value_counts().index[0])
        cand = items.item_id.to_numpy()[: cfg.num_candidates]
        t0 = time.perf_counter()
        feats = online_features(store, user, cand, service="ranker_llm")
        latency_ms = (time.perf_counter() - t0) * 1e3
        got = feats.values["item_embedding"]
        direct = backbone.encode_texts(items.item_text.iloc[: cfg.num_candidates].tolist()).numpy()
        max_diff = float(np.abs(got - direct).max())
        recent = feats.values["recent_item_ids"][0]
        click.echo(f"user {user}: {len(recent)} recent items, last {recent[-5:].tolist()}; "
                   f"{len(cand)} candidate item embeddings read in {latency_ms:.1f} ms; "
                   f"max |online - model| = {max_diff:.2e}")
        if max_diff > 1e-4:
            raise click.ClickException(
                f"online item embeddings differ from the model's own vectors by {max_diff:.3g}; "
                "the workspace holds stale embeddings: re-run with a fresh --data-dir")
        report["online"] = {"user_id": user, "candidates": len(cand), "latency_ms": latency_ms,
                            "max_abs_diff_vs_model": max_diff}

    report["seconds"] = timer.seconds
    (data_dir / "demo_report.json").write_text(json.dumps(report, indent=2, default=str))
    click.secho("== report", bold=True)
    c = report["ingest"]["counts"]
    click.echo(f"  interactions {c.get('interactions', '?'):,}  users {c.get('users', '?'):,}  "
               f"items {c.get('items', '?'):,}")
    click.echo(f"  dedup ratio {report['encode'].get('dedup_ratio', float('nan')):.1f}x")
    for k, v in timer.seconds.items():
        click.echo(f"  {k:<14} {v:7.1f} s")
    return report


@click.command("demo")
@dataclass_options(DemoConfig)
def command(cfg: DemoConfig) -> None:
    """Run the main job end to end (ingest, encode, feast apply, materialize, online lookup)."""
    run_demo(cfg)
