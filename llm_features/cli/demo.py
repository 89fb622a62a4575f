"""``llmfeat demo``: the main job, end to end on one MovieLens dataset with the embedded defaults.

The options are :class:`llm_features.pipeline.PipelineConfig`; the work is
:func:`llm_features.pipeline.run_pipeline` (every stage incremental: a second run with nothing new
only checks). This command prints its progress and then the report it returns.
Outputs: ``<data_dir>/demo_report.json``, ``<data_dir>/runs/`` (checkpoints and metrics) and PNG
plots in ``<data_dir>/plots/``.
"""

from __future__ import annotations

import click

from llm_features.config import dataclass_options
from llm_features.pipeline import PipelineConfig


def _echo(line: str) -> None:
    click.secho(line, bold=line.startswith("== "))  # step headers in bold


def print_report(report: dict) -> None:
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
@dataclass_options(PipelineConfig)
def command(cfg: PipelineConfig) -> None:
    """Run the main job end to end: ingest, encode, feast apply, finetune, embed users,
    materialize, ranker training and evaluation, and an online ranking for a sample user."""
    from llm_features.pipeline import run_pipeline

    print_report(run_pipeline(cfg, echo=_echo))
