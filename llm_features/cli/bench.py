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


def script_args(script: Path, source: Path, quick: bool, data_dir: Path | None = None) -> list[str]:
    """The options this script understands: ``--source``, ``--data-dir`` and ``--quick`` where it declares them."""
    text = script.read_text()
    args: list[str] = []
    if '"--source"' in text:
        args += ["--source", str(source)]
    if data_dir is not None and '"--data-dir"' in text:
        args += ["--data-dir", str(data_dir)]
    if quick and '"--quick"' in text:
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
        for script in scripts:
            cmd = [sys.executable, str(script)] + script_args(script, source, quick, data_dir)
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
