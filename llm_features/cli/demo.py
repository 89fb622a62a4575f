"""``llmfeat demo``: the main job, end to end on one MovieLens dataset with the embedded defaults.

Steps: ingest -> encode -> feast apply -> finetune (BAHE + DTI) -> embed users -> materialize ->
ranker training (id-only twin and +LLM) -> test evaluation -> a ranked list for a sample user read
from the online store. Every step is incremental: a second run with nothing new only checks.
Outputs: ``<data_dir>/demo_report.json``, ``<data_dir>/runs/`` (checkpoints and metrics) and PNG
plots in ``<data_dir>/plots/``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import click

from llm_features.atomic import write_json, write_text
from llm_features.config import dataclass_options


@dataclass
class DemoConfig:
    source: Path = field(default=Path("../shared/data/ml-1m"), metadata={
        "help": "MovieLens directory (ml-1m or ml-100k layout)."})
    repo: Path = field(default=Path("feast_repo"), metadata={"help": "The Feast feature repository."})
    data_dir: Path | None = field(default=None, metadata={
        "help": "Workspace directory (default: $LLMFEAT_DATA_DIR or <repo>/data)."})
    size: Literal["default", "small"] = field(default="default", metadata={
        "help": "small: a few minutes (fewer fine-tuning users, ranker rows and epochs) for a first look."})
    finetune_users: int | None = field(default=None, metadata={
        "help": "Users sampled for fine-tuning (default: every user; small: 300)."})
    finetune_epochs: int = field(default=1, metadata={
        "help": "Fine-tuning epochs over every train target (llmfeat finetune defaults to 2; one keeps the demo "
                "short)."})
    embed_every: int = field(default=2, metadata={
        "help": "User-embedding snapshots: a user's first N interaction times, then every N-th (embed-users "
                "--every). Staler snapshots cost the +LLM ranker AUC (bench_quality: every 8 gave about a third "
                "of the lift of fresh states on ML-1M); fresher ones cost embed-users and join time."})
    ranker_epochs: int = field(default=8, metadata={
        "help": "Most ranker epochs (both twins; each stops early when its valid AUC stops improving)."})
    sample_user: int | None = field(default=None, metadata={
        "help": "User for the online ranking (default: the most active user of the test split)."})
    num_candidates: int = field(default=100, metadata={"help": "Candidate items of the online ranking."})
    progress: bool = field(default=True, metadata={"help": "Show progress bars."})


class _Steps:
    """Times each step and prints its header."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def step(self, name: str):
        click.secho(f"== {name}", bold=True)
        # libraries reset the warning filters on import; ibis' duckdb deprecations would drown the output
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(time.perf_counter() - t0, 2)


def _stamp(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_state(path: Path) -> list[Any]:
    st = path.stat()
    return [str(path), st.st_size, st.st_mtime_ns]


def _done(out: Path, stamp: str) -> dict | None:
    """The step's metrics when ``out`` was produced from the same inputs and options, else None."""
    marker = out / "demo_stamp.json"
    metrics = out / "metrics.json"
    if marker.exists() and metrics.exists() and json.loads(marker.read_text()).get("stamp") == stamp:
        return json.loads(metrics.read_text())
    return None


def _mark(out: Path, stamp: str) -> None:
    write_json(out / "demo_stamp.json", {"stamp": stamp})


# Where the demo departs from a stage's own defaults, and why: every other option of every stage is
# the stage's default (tests/test_step_by_step.py checks both, and runs the README's step-by-step
# commands against the demo). The README's step-by-step block passes these options explicitly.
DEMO_ONLY = {
    "finetune": {"epochs": "one epoch keeps the demo short (llmfeat finetune defaults to 2, the better tower)"},
}
# what --size small changes on top (a first look; the README's step-by-step block reproduces the default size)
SMALL_ONLY = {"finetune": {"limit_users"}, "ranker": {"epochs", "max_train_rows"}}


def stage_configs(cfg: DemoConfig, data_dir: Path) -> dict[str, Any]:
    """The configuration of every stage the demo runs (its ranker twins under ``ranker_id_only`` and
    ``ranker_llm``, their test evaluations under ``evaluate_id_only`` / ``evaluate_llm``)."""
    from llm_features.embed_users import EmbedUsersConfig
    from llm_features.encode import EncodeConfig
    from llm_features.finetune import FinetuneConfig
    from llm_features.ingest import IngestConfig
    from ranker.config import EvaluateConfig, TrainConfig

    small = cfg.size == "small"
    ft = FinetuneConfig(data_dir=data_dir, limit_users=cfg.finetune_users or (300 if small else None),
                        epochs=cfg.finetune_epochs)
    configs: dict[str, Any] = {
        "ingest": IngestConfig(source=cfg.source, data_dir=data_dir),
        "encode": EncodeConfig(data_dir=data_dir, progress=cfg.progress),
        "finetune": ft,
        "embed_users": EmbedUsersConfig(checkpoint=ft.out, data_dir=data_dir, every=cfg.embed_every),
    }
    for name, llm in (("id_only", False), ("llm", True)):
        tr = TrainConfig(repo=cfg.repo, data_dir=data_dir, llm_features=llm,
                         epochs=min(cfg.ranker_epochs, 3) if small else cfg.ranker_epochs,
                         max_train_rows=100_000 if small else None, progress=cfg.progress)
        configs[f"ranker_{name}"] = tr
        configs[f"evaluate_{name}"] = EvaluateConfig(checkpoint=tr.out, split="test", repo=cfg.repo,
                                                     data_dir=data_dir)
    return configs


def run_demo(cfg: DemoConfig) -> dict:
    """Run the pipeline; returns the report printed and written to ``<data_dir>/demo_report.json``."""
    import numpy as np
    import pandas as pd

    from llm_features.backbone import Backbone
    from llm_features.embed_users import CheckpointMismatchError, embed_users
    from llm_features.encode import encode
    from llm_features.finetune import finetune
    from llm_features.ingest import format_summary, ingest
    from llm_features.store import apply_definitions, materialize_all, open_store
    from llm_features.workspace import Workspace, resolve_data_dir
    from ranker.serve import Ranker
    from ranker.train import evaluate as evaluate_ranker
    from ranker.train import train as train_ranker

    data_dir = resolve_data_dir(cfg.repo, cfg.data_dir)
    ws = Workspace.at(data_dir)
    configs = stage_configs(cfg, data_dir)
    steps = _Steps()
    report: dict = {"source": str(cfg.source), "data_dir": str(data_dir), "options": asdict(cfg)}

    with steps.step("ingest"):
        ing = ingest(configs["ingest"], ws)
        click.echo(format_summary(ing))
        report["ingest"] = {"counts": ing["counts"], "split": ing.get("split"), "skipped": bool(ing.get("skipped"))}

    with steps.step("encode (shallow layers, each distinct text once)"):
        enc_cfg = configs["encode"]
        backbone = Backbone.load(enc_cfg.backbone_config())
        stats = encode(enc_cfg, backbone=backbone)
        click.echo(stats.summary())
        report["encode"] = stats.to_dict()

    with steps.step("feast apply"):
        store = open_store(cfg.repo, data_dir)
        with contextlib.redirect_stdout(io.StringIO()) as diff:  # feast prints every object's proto diff
            apply_definitions(store)
        write_text(data_dir / "feast_apply.log", diff.getvalue())
        click.echo(f"applied {len(store.list_feature_views())} feature views, "
                   f"{len(store.list_feature_services())} feature services")

    inputs = [_file_state(ws.interactions), backbone.fingerprint.digest]
    # finetune's defaults: DTI packing with leakage=isolated, so DTI-packed training states equal the
    # sliding-window ones and embed-users packs every event of a user into a few sequences
    ft_cfg = configs["finetune"]
    ft_out = ft_cfg.out
    with steps.step("finetune (BAHE + DTI)"):
        stamp = _stamp(inputs, asdict(ft_cfg))
        ft = _done(ft_out, stamp)
        stamp_hit = ft is not None
        if ft is None:
            ft = finetune(ft_cfg, backbone=backbone)
            _mark(ft_out, stamp)
        else:
            click.echo(f"finetune: {ft_out} is up to date; skipped")
        click.echo(f"finetune: test AUC {ft['test']['auc']:.4f}, LogLoss {ft['test']['logloss']:.4f}, "
                   f"{ft['targets_per_s']:.0f} targets/s")
        report["finetune"] = {"skipped": stamp_hit, "test": ft["test"], "targets_per_s": ft["targets_per_s"],
                              "train_seconds": ft["train_seconds"], "peak_rss_mb": ft.get("peak_rss_mb")}

    with steps.step("embed users (deep layers over recent behaviours)"):
        eu_cfg = configs["embed_users"]
        try:
            eu = embed_users(eu_cfg)
        except CheckpointMismatchError:
            # rows of an earlier checkpoint of this job (finetune ran again, e.g. on new interactions):
            # stale now, so they are replaced, never mixed in or left to stop every later run
            click.echo(f"embed-users: user_embeddings/ holds rows of an earlier checkpoint; "
                       f"recomputing them with {ft_out}")
            eu = embed_users(replace(eu_cfg, overwrite=True))
        click.echo(eu.summary())
        report["embed_users"] = {"rows_written": eu.rows_written, "rows_existing": eu.rows_existing,
                                 "seconds": eu.seconds}

    with steps.step("feast materialize"):
        mat = materialize_all(store, ws)
        click.echo(f"materialized {mat.total_entities:,} entity rows in {mat.seconds:.1f}s "
                   f"({', '.join(f'{k}={v:,}' for k, v in mat.entities.items())})")
        report["materialize"] = {"seconds": mat.seconds, "entities": mat.entities}

    ranker_inputs = [inputs, sorted(p.name for p in ws.user_embeddings.glob("part-*.parquet"))]
    report["ranker"] = {}
    for name, llm in (("id_only", False), ("llm", True)):
        tr_cfg = configs[f"ranker_{name}"]
        out = tr_cfg.out
        with steps.step(f"ranker train + test ({'+LLM features' if llm else 'id-only twin'})"):
            stamp = _stamp(ranker_inputs, asdict(tr_cfg))
            done = _done(out, stamp)
            report["ranker"][name] = {"skipped": done is not None}
            if done is None:
                metrics = train_ranker(tr_cfg)
                test = evaluate_ranker(configs[f"evaluate_{name}"])  # writes <out>/eval-test
                metrics["test"] = {k: test[k] for k in ("auc", "logloss", "per_user_auc") if k in test}
                write_json(out / "metrics.json", metrics, sort_keys=False)
                _mark(out, stamp)
            else:
                metrics = done
                click.echo(f"ranker {name}: {out} is up to date; skipped")
            click.echo(f"ranker {name}: test AUC {metrics['test']['auc']:.4f}, "
                       f"LogLoss {metrics['test']['logloss']:.4f}")
            report["ranker"][name].update(test=metrics["test"], samples_per_second=metrics.get("samples_per_second"),
                                          loss_curve=metrics.get("loss_curve"))

    with steps.step("online ranking for a sample user"):
        inter = pd.read_parquet(ws.interactions, columns=["user_id", "item_id", "split"])
        user = cfg.sample_user
        if user is None:
            user = int(inter.loc[inter.split == "test", "user_id"].value_counts().index[0])
        items = pd.read_parquet(ws.items, columns=["item_id", "title"])
        rng = np.random.default_rng(0)
        cand = rng.choice(items.item_id.to_numpy(), size=min(cfg.num_candidates, len(items)), replace=False)
        ranker = Ranker.load(configs["ranker_llm"].out, store=store)
        ranker.rank(user, cand[:5])  # warm-up: registry and model caches
        t0 = time.perf_counter()
        ranked = ranker.rank(user, cand, top_k=10)
        latency_ms = (time.perf_counter() - t0) * 1e3
        titles = dict(zip(items.item_id, items.title))
        click.echo(f"user {user}: top 10 of {len(cand)} candidates ({latency_ms:.1f} ms, feature reads included)")
        for rank, (item, prob) in enumerate(ranked, 1):
            click.echo(f"  {rank:2d}. {prob:.3f}  {titles.get(item, item)}")
        report["online"] = {"user_id": user, "candidates": len(cand), "latency_ms": latency_ms,
                            "top10": ranked}

    report["seconds"] = steps.seconds
    plots = _plots(report, ft_out, data_dir / "plots")
    report["plots"] = [str(p) for p in plots]
    write_json(data_dir / "demo_report.json", report, sort_keys=False)
    _print_report(report)
    return report


def _plots(report: dict, ft_out: Path, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    ft_metrics = json.loads((ft_out / "metrics.json").read_text())
    curve = ft_metrics.get("loss_curve") or [h["train_loss"] for h in ft_metrics.get("history", [])]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    steps = ft_metrics.get("steps", len(curve))
    axes[0].plot([steps * (i + 1) / len(curve) for i in range(len(curve))], curve,
                 marker="." if len(curve) < 30 else None)
    axes[0].set(title="finetune (BAHE + DTI): train loss", xlabel="step", ylabel="BCE")
    for name, r in report["ranker"].items():
        if r.get("loss_curve"):
            axes[1].plot([50 * (i + 1) for i in range(len(r["loss_curve"]))], r["loss_curve"], label=name)
    axes[1].set(title="ranker: train loss", xlabel="step", ylabel="BCE")
    axes[1].legend()
    fig.tight_layout()
    paths.append(out / "training_curves.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    names = list(report["ranker"])
    aucs = [report["ranker"][n]["test"]["auc"] for n in names]
    ax.bar(names, aucs, color=["#888", "#2a7"][: len(names)])
    for i, a in enumerate(aucs):
        ax.text(i, a, f"{a:.4f}", ha="center", va="bottom")
    ax.set_ylim(min(aucs) - 0.02, max(aucs) + 0.01)
    ax.set(title="ranker test AUC", ylabel="AUC")
    fig.tight_layout()
    paths.append(out / "ranker_auc.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def _print_report(report: dict) -> None:
    click.secho("== report", bold=True)
    c = report["ingest"]["counts"]
    click.echo(f"  data           {c['interactions']:,} interactions, {c['users']:,} users, {c['items']:,} items")
    enc = report["encode"]
    click.echo(f"  dedup ratio    {enc['dedup_ratio']:.1f}x ({enc['occurrences']:,} behaviour occurrences, "
               f"{enc['distinct_behaviors']:,} distinct texts encoded once)")
    ft = report["finetune"]
    click.echo(f"  finetune       test AUC {ft['test']['auc']:.4f}  ({ft['targets_per_s']:.0f} targets/s)")
    for name, r in report["ranker"].items():
        pu = r["test"].get("per_user_auc")
        click.echo(f"  ranker {name:<7} test AUC {r['test']['auc']:.4f}  LogLoss {r['test']['logloss']:.4f}"
                   + (f"  per-user AUC {pu:.4f}" if pu is not None else ""))
    rk = report["ranker"]
    if {"id_only", "llm"} <= set(rk):
        click.echo(f"  LLM lift       test AUC {rk['llm']['test']['auc'] - rk['id_only']['test']['auc']:+.4f}"
                   f"  (+LLM twin minus id-only twin, same split and budget)")
    click.echo(f"  online         {report['online']['latency_ms']:.1f} ms for 1 user + "
               f"{report['online']['candidates']} candidates")
    click.echo("  seconds        " + ", ".join(f"{k.split(' (')[0]} {v:.0f}" for k, v in report["seconds"].items()))
    click.echo(f"  total          {sum(report['seconds'].values()):.0f} s; plots: {', '.join(report['plots'])}")


@click.command("demo")
@dataclass_options(DemoConfig)
def command(cfg: DemoConfig) -> None:
    """Run the main job end to end: ingest, encode, feast apply, finetune, embed users,
    materialize, ranker training and evaluation, and an online ranking for a sample user."""
    from llm_features.workspace import Workspace, resolve_data_dir

    with Workspace.at(resolve_data_dir(cfg.repo, cfg.data_dir)).lock("llmfeat demo"):  # one writer per data dir
        run_demo(cfg)
