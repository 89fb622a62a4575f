"""``llmfeat bench``: run every benchmark script of a source checkout, then write ``bench/results/SUMMARY.md``."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import click


def bench_dir() -> Path:
    """The ``bench/`` directory next to the package; an error outside a source checkout."""
    import llm_features

    path = Path(llm_features.__file__).resolve().parents[1] / "bench"
    if not (path / "summarize.py").is_file():
        raise click.ClickException(
            f"no benchmark scripts at {path}: `llmfeat bench` needs a source checkout of llmfeat "
            "(git clone, then `pip install -e .`), not an installed wheel"
        )
    return path


def load_summarize(bench: Path):
    spec = importlib.util.spec_from_file_location("llmfeat_bench_summarize", bench / "summarize.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


# The common options each benchmark script accepts (its argparse options that `llmfeat bench` fills in
# from its own): "source" (--source), "data_dir" (--data-dir, when a workspace is known), "quick"
# (--quick, with `llmfeat bench --quick`). A new bench_*.py gets a row here; tests/test_bench_summary.py
# checks the table against every script's add_argument calls (its own, and those of the parser it
# imports from bench/).
SCRIPT_OPTIONS: dict[str, frozenset[str]] = {
    "bench_cost": frozenset({"source", "data_dir", "quick"}),
    "bench_encode": frozenset({"source"}),
    "bench_events": frozenset({"data_dir"}),
    "bench_feast": frozenset({"data_dir"}),
    "bench_finetune": frozenset({"source", "data_dir", "quick"}),
    "bench_pit": frozenset({"source", "quick"}),
    "bench_quality": frozenset({"source", "quick"}),
    "bench_ranker": frozenset({"data_dir"}),
    "bench_scale": frozenset({"quick"}),
    "bench_serving": frozenset({"data_dir", "quick"}),
    "bench_threads": frozenset({"quick"}),
}


def script_args(script: Path, source: Path, quick: bool, data_dir: Path | None = None) -> list[str]:
    """The common options for ``script``, as :data:`SCRIPT_OPTIONS` declares them."""
    accepts = SCRIPT_OPTIONS.get(script.stem)
    if accepts is None:
        raise click.ClickException(f"{script.name} has no row in SCRIPT_OPTIONS ({__file__}): add one naming "
                                   "the common options it accepts (source, data_dir, quick), or frozenset()")
    args: list[str] = []
    if "source" in accepts:
        args += ["--source", str(source)]
    if data_dir is not None and "data_dir" in accepts:
        args += ["--data-dir", str(data_dir)]
    if quick and "quick" in accepts:
        args.append("--quick")
    return args


@click.command("bench")
@click.option("--source", type=click.Path(path_type=Path), default=Path("../shared/data/ml-1m"), show_default=True,
              help="MovieLens-1M directory passed to the scripts that take a dataset.")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None,
              help="A workspace the main job prepared (default: $LLMFEAT_DATA_DIR, else feast_repo/data when it "
                   "exists); passed to the scripts that read one (finetune, ranker).")
@click.option("--quick", is_flag=True, help="Tiny versions where a script supports it (a smoke test).")
@click.option("--summary-only", is_flag=True, help="Only rebuild SUMMARY.md from the existing JSON results.")
@click.option("--only", multiple=True, help="Run only these scripts (e.g. --only finetune); repeatable.")
def command(source: Path, data_dir: Path | None, quick: bool, summary_only: bool, only: tuple[str, ...]) -> None:
    """Run the benchmarks in bench/ (each as a subprocess) and summarise their ratios against the floors.

    Writes bench/results/<name>.json/.md per benchmark and bench/results/SUMMARY.md (measured ratios
    next to the floors and the papers' figures: BAHE 5x, DTI 92% less training time). A failed
    script is reported and the others still run. Some scripts need a prepared workspace (see their
    docstrings; bench_ranker reads $LLMFEAT_DATA_DIR).

    Example: llmfeat bench --source ../shared/data/ml-1m --quick
    """
    bench = bench_dir()
    failed: list[str] = []
    if not summary_only:
        scripts = sorted(bench.glob("bench_*.py"))
        if only:
            scripts = [s for s in scripts if s.stem.removeprefix("bench_") in only or s.stem in only]
        source = source.resolve()
        if data_dir is None:
            from llm_features.workspace import default_data_dir

            default = default_data_dir(bench.parent / "feast_repo")
            data_dir = default if (default / "canonical").is_dir() else None
        if data_dir is not None:
            data_dir = data_dir.resolve()
            click.echo(f"== workspace: {data_dir}")
        args = {script: script_args(script, source, quick, data_dir) for script in scripts}  # all known first
        for script in scripts:
            cmd = [sys.executable, str(script)] + args[script]
            click.echo(f"== {script.name}: {' '.join(cmd[2:]) or '(no options)'}")
            t0 = time.perf_counter()
            rc = subprocess.run(cmd, cwd=bench.parent, env={**os.environ, "HF_HUB_OFFLINE": "1",
                                                             "TRANSFORMERS_OFFLINE": "1"}).returncode
            click.echo(f"== {script.name}: exit {rc} after {time.perf_counter() - t0:.0f}s")
            if rc != 0:
                failed.append(script.name)
    out = load_summarize(bench).build_summary(bench / "results")
    click.echo(out.read_text())
    click.echo(f"wrote {out}")
    if failed:
        raise click.ClickException(f"failed: {', '.join(failed)} (their rows keep older results or read 'not run')")
