"""The main job as one library call: ``run_pipeline(PipelineConfig(...)) -> report``.

Stages: ingest -> encode -> feast apply -> finetune (BAHE + DTI) -> embed users -> materialize ->
ranker training (id-only twin and +LLM) -> test evaluation -> a ranked list for a sample user read
from the online store. Every stage is incremental: a second run with nothing new only checks.
Outputs: ``<data_dir>/demo_report.json`` (the report returned), ``<data_dir>/runs/`` (checkpoints
and metrics) and PNG plots in ``<data_dir>/plots/`` (:mod:`llm_features.pipeline_plots`).
``llmfeat demo`` builds the config from its options, calls :func:`run_pipeline` and prints the report.

Finetune and the ranker twins are skipped when ``<out>/demo_stamp.json`` holds the stamp of the same
inputs and options (their step record, :mod:`llm_features.stamps`); the other stages are incremental
themselves.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

from llm_features.atomic import write_json, write_text
from llm_features.config import data_dir_field
from llm_features.stamps import FileState, StepRecord, digest

log = logging.getLogger(__name__)

REPORT_FILE = "demo_report.json"
STAMP_FILE = "demo_stamp.json"
Echo = Callable[[str], None]  # one line of progress; step headers start with "== "


@dataclass
class PipelineConfig:
    source: Path = field(default=Path("../shared/data/ml-1m"), metadata={
        "help": "MovieLens directory (ml-1m or ml-100k layout)."})
    repo: Path = field(default=Path("feast_repo"), metadata={"help": "The Feast feature repository."})
    data_dir: Path | None = data_dir_field()
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


# Where the demo departs from a stage's own defaults, and why: every other option of every stage is
# the stage's default (tests/test_step_by_step.py checks both, and runs the README's step-by-step
# commands against the demo). The README's step-by-step block passes these options explicitly.
DEMO_ONLY = {
    "finetune": {"epochs": "one epoch keeps the demo short (llmfeat finetune defaults to 2, the better tower)"},
}
# what --size small changes on top (a first look; the README's step-by-step block reproduces the default size)
SMALL_ONLY = {"finetune": {"limit_users"}, "ranker": {"epochs", "max_train_rows"}}
TWINS = (("id_only", False), ("llm", True))  # ranker twins: name, with LLM features


def stage_configs(cfg: PipelineConfig, data_dir: Path) -> dict[str, Any]:
    """The configuration of every stage the pipeline runs (its ranker twins under ``ranker_id_only``
    and ``ranker_llm``, their test evaluations under ``evaluate_id_only`` / ``evaluate_llm``)."""
    from llm_features.embed_users import EmbedUsersConfig
    from llm_features.encode import EncodeConfig
    from llm_features.finetune import FinetuneConfig
    from llm_features.ingest import IngestConfig
    from ranker.config import EvaluateConfig, ModelConfig, TrainConfig

    small = cfg.size == "small"
    ft = FinetuneConfig(data_dir=data_dir, limit_users=cfg.finetune_users or (300 if small else None),
                        epochs=cfg.finetune_epochs)
    configs: dict[str, Any] = {
        "ingest": IngestConfig(source=cfg.source, data_dir=data_dir),
        "encode": EncodeConfig(data_dir=data_dir, progress=cfg.progress),
        "finetune": ft,
        "embed_users": EmbedUsersConfig(checkpoint=ft.out, data_dir=data_dir, every=cfg.embed_every),
    }
    for name, llm in TWINS:
        tr = TrainConfig(model=ModelConfig(llm_features=llm), repo=cfg.repo, data_dir=data_dir,
                         epochs=min(cfg.ranker_epochs, 3) if small else cfg.ranker_epochs,
                         max_train_rows=100_000 if small else None, progress=cfg.progress)
        configs[f"ranker_{name}"] = tr
        configs[f"evaluate_{name}"] = EvaluateConfig(checkpoint=tr.out, split="test", repo=cfg.repo,
                                                     data_dir=data_dir)
    return configs


# ------------------------------------------------------------------------ skip protocol (stamps)
def _stamp(*parts: Any) -> str:
    """The stamp of a step: 16 hex characters of the digest of its inputs and options."""
    return digest(parts, length=16)


def _done(out: Path, stamp: str) -> dict | None:
    """The step's metrics when ``out`` was produced from the same inputs and options, else None."""
    metrics = out / "metrics.json"
    if StepRecord(out / STAMP_FILE).done(stamp, [metrics]) is not None:
        return json.loads(metrics.read_text())
    return None


def _mark(out: Path, stamp: str) -> None:
    StepRecord(out / STAMP_FILE).write({"stamp": stamp})


# ------------------------------------------------------------------------------------ one run
@dataclass
class _Run:
    """What the stages share: the config, the workspace, the report being built and step timings."""

    cfg: PipelineConfig
    data_dir: Path
    ws: Any  # Workspace
    configs: dict[str, Any]
    echo: Echo
    report: dict
    seconds: dict[str, float] = field(default_factory=dict)
    store: Any = None  # FeatureStore, from the feast apply stage
    backbone: Any = None  # Backbone, from the encode stage
    inputs: list[Any] = field(default_factory=list)  # what the finetune stamp covers

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        """Times the step (``report["seconds"][name]``) and echoes its header."""
        self.echo(f"== {name}")
        # libraries reset the warning filters on import; ibis' duckdb deprecations would drown the output
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(time.perf_counter() - t0, 2)


def _ingest(run: _Run) -> None:
    from llm_features.ingest import format_summary, ingest

    with run.step("ingest"):
        ing = ingest(run.configs["ingest"], run.ws)
        run.echo(format_summary(ing))
        run.report["ingest"] = {"counts": ing["counts"], "split": ing.get("split"),
                                "skipped": bool(ing.get("skipped"))}


def _encode(run: _Run) -> None:
    from llm_features.backbone import Backbone
    from llm_features.encode import encode

    with run.step("encode (shallow layers, each distinct text once)"):
        enc_cfg = run.configs["encode"]
        run.backbone = Backbone.load(enc_cfg.backbone)
        stats = encode(enc_cfg, backbone=run.backbone)
        run.echo(stats.summary())
        run.report["encode"] = stats.to_dict()


def _feast_apply(run: _Run) -> None:
    from llm_features.store import apply_definitions, open_store

    with run.step("feast apply"):
        run.store = open_store(run.cfg.repo, run.data_dir)
        with contextlib.redirect_stdout(io.StringIO()) as diff:  # feast prints every object's proto diff
            apply_definitions(run.store)
        write_text(run.data_dir / "feast_apply.log", diff.getvalue())
        run.echo(f"applied {len(run.store.list_feature_views())} feature views, "
                 f"{len(run.store.list_feature_services())} feature services")


def _finetune(run: _Run) -> None:
    from llm_features.finetune import finetune

    run.inputs = [FileState.of(run.ws.interactions).to_list(), run.backbone.fingerprint.digest]
    # finetune's defaults: DTI packing with leakage=isolated, so DTI-packed training states equal the
    # sliding-window ones and embed-users packs every event of a user into a few sequences
    ft_cfg = run.configs["finetune"]
    with run.step("finetune (BAHE + DTI)"):
        stamp = _stamp(run.inputs, asdict(ft_cfg))
        ft = _done(ft_cfg.out, stamp)
        stamp_hit = ft is not None
        if ft is None:
            ft = finetune(ft_cfg, backbone=run.backbone)
            _mark(ft_cfg.out, stamp)
        else:
            run.echo(f"finetune: {ft_cfg.out} is up to date; skipped")
        run.echo(f"finetune: test AUC {ft['test']['auc']:.4f}, LogLoss {ft['test']['logloss']:.4f}, "
                 f"{ft['targets_per_s']:.0f} targets/s")
        run.report["finetune"] = {"skipped": stamp_hit, "test": ft["test"], "targets_per_s": ft["targets_per_s"],
                                  "train_seconds": ft["train_seconds"], "peak_rss_mb": ft.get("peak_rss_mb")}


def _embed_users(run: _Run) -> None:
    from llm_features.embed_users import CheckpointMismatchError, embed_users

    with run.step("embed users (deep layers over recent behaviours)"):
        eu_cfg = run.configs["embed_users"]
        try:
            eu = embed_users(eu_cfg)
        except CheckpointMismatchError:
            # rows of an earlier checkpoint of this job (finetune ran again, e.g. on new interactions):
            # stale now, so they are replaced, never mixed in or left to stop every later run
            run.echo(f"embed-users: user_embeddings/ holds rows of an earlier checkpoint; "
                     f"recomputing them with {eu_cfg.checkpoint}")
            eu = embed_users(replace(eu_cfg, overwrite=True))
        run.echo(eu.summary())
        run.report["embed_users"] = {"rows_written": eu.rows_written, "rows_existing": eu.rows_existing,
                                     "seconds": eu.seconds}


def _materialize(run: _Run) -> None:
    from llm_features.store import materialize_all

    with run.step("feast materialize"):
        mat = materialize_all(run.store, run.ws)
        run.echo(f"materialized {mat.total_entities:,} entity rows in {mat.seconds:.1f}s "
                 f"({', '.join(f'{k}={v:,}' for k, v in mat.entities.items())})")
        run.report["materialize"] = {"seconds": mat.seconds, "entities": mat.entities}


def _ranker(run: _Run, name: str, llm: bool, inputs: list[Any]) -> None:
    """Train one twin and evaluate it on the test split, unless its stamp says it is up to date."""
    from ranker.train import evaluate as evaluate_ranker
    from ranker.train import train as train_ranker

    tr_cfg = run.configs[f"ranker_{name}"]
    out = tr_cfg.out
    with run.step(f"ranker train + test ({'+LLM features' if llm else 'id-only twin'})"):
        stamp = _stamp(inputs, asdict(tr_cfg))
        done = _done(out, stamp)
        run.report["ranker"][name] = {"skipped": done is not None}
        if done is None:
            metrics = train_ranker(tr_cfg)
            test = evaluate_ranker(run.configs[f"evaluate_{name}"])  # writes <out>/eval-test
            metrics["test"] = {k: test[k] for k in ("auc", "logloss", "per_user_auc") if k in test}
            write_json(out / "metrics.json", metrics, sort_keys=False)
            _mark(out, stamp)
        else:
            metrics = done
            run.echo(f"ranker {name}: {out} is up to date; skipped")
        run.echo(f"ranker {name}: test AUC {metrics['test']['auc']:.4f}, "
                 f"LogLoss {metrics['test']['logloss']:.4f}")
        run.report["ranker"][name].update(test=metrics["test"], samples_per_second=metrics.get("samples_per_second"),
                                          loss_curve=metrics.get("loss_curve"))


def _rankers(run: _Run) -> None:
    ranker_inputs = [run.inputs, sorted(p.name for p in run.ws.user_embeddings.glob("part-*.parquet"))]
    run.report["ranker"] = {}
    for name, llm in TWINS:
        _ranker(run, name, llm, ranker_inputs)


def _online(run: _Run) -> None:
    """Rank ``num_candidates`` random items (seed 0) for the sample user from the online store, timed."""
    import numpy as np
    import pandas as pd

    from ranker.serve import Ranker

    with run.step("online ranking for a sample user"):
        inter = pd.read_parquet(run.ws.interactions, columns=["user_id", "item_id", "split"])
        user = run.cfg.sample_user
        if user is None:
            user = int(inter.loc[inter.split == "test", "user_id"].value_counts().index[0])
        items = pd.read_parquet(run.ws.items, columns=["item_id", "title"])
        rng = np.random.default_rng(0)
        cand = rng.choice(items.item_id.to_numpy(), size=min(run.cfg.num_candidates, len(items)), replace=False)
        ranker = Ranker.load(run.configs["ranker_llm"].out, store=run.store)
        ranker.rank(user, cand[:5])  # warm-up: registry and model caches
        t0 = time.perf_counter()
        ranked = ranker.rank(user, cand, top_k=10)
        latency_ms = (time.perf_counter() - t0) * 1e3
        titles = dict(zip(items.item_id, items.title))
        run.echo(f"user {user}: top 10 of {len(cand)} candidates ({latency_ms:.1f} ms, feature reads included)")
        for rank, (item, prob) in enumerate(ranked, 1):
            run.echo(f"  {rank:2d}. {prob:.3f}  {titles.get(item, item)}")
        run.report["online"] = {"user_id": user, "candidates": len(cand), "latency_ms": latency_ms,
                                "top10": ranked}


STAGES: tuple[Callable[[_Run], None], ...] = (
    _ingest, _encode, _feast_apply, _finetune, _embed_users, _materialize, _rankers, _online)


def run_pipeline(cfg: PipelineConfig, echo: Echo = log.info) -> dict:
    """Run every stage under the data dir's lock; returns the report, also written to
    ``<data_dir>/demo_report.json``. ``echo`` gets each progress line (default: this module's logger)."""
    from llm_features.pipeline_plots import plot_report
    from llm_features.workspace import Workspace, resolve_data_dir

    data_dir = resolve_data_dir(cfg.repo, cfg.data_dir)
    ws = Workspace.at(data_dir)
    with ws.lock("llmfeat demo"):  # one writer per data dir
        run = _Run(cfg=cfg, data_dir=data_dir, ws=ws, configs=stage_configs(cfg, data_dir), echo=echo,
                   report={"source": str(cfg.source), "data_dir": str(data_dir), "options": asdict(cfg)})
        for stage in STAGES:
            stage(run)
        report = run.report
        report["seconds"] = run.seconds
        plots = plot_report(report, run.configs["finetune"].out, data_dir / "plots")
        report["plots"] = [str(p) for p in plots]
        write_json(data_dir / REPORT_FILE, report, sort_keys=False)
    return report
