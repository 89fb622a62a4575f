"""Running ``llmfeat finetune`` as benchmark subprocesses: one run per options set, reusable, pinned to a core.

Shared by the finetune-style benchmarks (``bench_finetune.py``, ``bench_cost.py``): the workspace they
run on, their common options, the header of their result files.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import shutil
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def _default_k() -> int:
    from llm_features.finetune import FinetuneConfig

    return FinetuneConfig().targets_per_sequence


DEFAULT_K = _default_k()
TIMING_WARMUP_STEPS = 2  # llm_features.finetune.train.TIMING_WARMUP_STEPS


def llmfeat() -> list[str]:
    exe = Path(sys.executable).with_name("llmfeat")
    return [str(exe)] if exe.exists() else [sys.executable, "-c", "from llm_features.cli import run; run()"]



# Options that do not change what a run computes: a finished run that differs only in these is reused.
REUSE_IGNORED = {"out", "log_every", "save_every", "resume", "eval_batch_size", "device"}


def _reusable(out: Path, data_dir: Path, opts: dict) -> bool:
    """``out`` holds a finished run with exactly these options (the finetune defaults filling the rest)."""
    from llm_features.finetune import FinetuneConfig
    from llm_features.finetune.config import config_to_dict

    try:
        m = json.loads((out / "metrics.json").read_text())
    except (OSError, ValueError):
        return False
    defaults = config_to_dict(FinetuneConfig())
    want = {**defaults, **{k: v for k, v in opts.items() if v is not None}}
    saved = {**defaults, **m.get("options", {})}  # an option newer than the run: the run had its default
    if Path(str(saved.get("data_dir"))).resolve() != Path(data_dir).resolve():
        return False
    if opts.get("device") not in (None, "auto") and m.get("device") != opts["device"]:
        return False
    return all(str(saved.get(k)) == str(v) for k, v in want.items() if k not in REUSE_IGNORED | {"data_dir"})


def run_finetune(name: str, runs: Path, data_dir: Path, common: dict, extra: dict, *,
                 core: int | None = None, reuse: bool = False) -> dict:
    """One ``llmfeat finetune`` subprocess; returns a compact record of its metrics.json.

    Args:
        core: pin the subprocess to this CPU core (parallel runs must not share cores).
        reuse: keep a finished run in ``runs/name`` made with the same options instead of running it
            again (a killed benchmark resumes; the code must not have changed in between).
    """
    out = runs / name
    # measure_memory: the training steps' own memory (train_rss_increase_mb), which this benchmark records
    opts = {"measure_memory": True, **common, **extra}
    cmd = llmfeat() + ["finetune", "--data-dir", str(data_dir), "--out", str(out)]
    for k, v in opts.items():
        if v is None:
            continue
        flag = f"--{k.replace('_', '-')}"
        cmd += ([flag] if v else [f"--no-{flag[2:]}"]) if isinstance(v, bool) else [flag, str(v)]
    t0 = time.perf_counter()
    if reuse and _reusable(out, data_dir, opts):
        print(f"[bench_finetune] {name}: reusing the finished run in {out}", flush=True)
        reused = True
    else:
        reused = False
        shutil.rmtree(out, ignore_errors=True)
        where = f" (core {core})" if core is not None else ""
        print(f"[bench_finetune] {name}{where}: {' '.join(cmd[1:])}", flush=True)
        # PASSIVE: idle OpenMP threads sleep instead of spinning, which matters on a shared machine.
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}
        pin = (lambda: os.sched_setaffinity(0, {core})) if core is not None else None
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, preexec_fn=pin)
        if proc.returncode != 0 or not (out / "metrics.json").exists():
            print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
            return {"name": name, "options": opts, "error": f"exit {proc.returncode}",
                    "wall_s": time.perf_counter() - t0}
    m = json.loads((out / "metrics.json").read_text())
    wall = m.get("wall_seconds") if reused else time.perf_counter() - t0
    tps = m["steady_targets_per_s"]
    rec = {
        "name": name,
        "out": str(out),
        "options": opts,
        "train_targets": m["train_targets"],
        "train_sequences": m["train_sequences"],
        "steps": m["steps"],
        "timed_steps": m["steady_steps"],
        "train_seconds": m["train_seconds"],
        "targets_per_s": tps,  # steady state: the first TIMING_WARMUP_STEPS steps left out
        "targets_per_s_all_steps": m["targets_per_s"],
        "seconds_per_10k_targets": 1e4 / tps if tps else None,
        "peak_rss_mb": m["peak_rss_mb"],
        "rss_before_train_mb": m.get("rss_before_train_mb"),
        "train_peak_rss_mb": m.get("train_peak_rss_mb"),
        "train_rss_increase_mb": m.get("train_rss_increase_mb"),
        "train_memory_method": m.get("train_memory_method"),
        "test_auc": m["test"]["auc"],
        "test_logloss": m["test"]["logloss"],
        "test_targets": m["test"]["targets"],
        "valid_auc": m["valid"]["auc"],
        "wall_s": wall,
        "core": None if reused else core,
        "reused": reused,
    }
    print(f"[bench_finetune]   {tps:.1f} targets/s, training +{rec['train_rss_increase_mb'] or 0:.0f} MiB "
          f"(peak RSS {m['peak_rss_mb']:.0f} MiB), test AUC {rec['test_auc']:.4f} ({wall:.0f}s)", flush=True)
    return rec


class Runner:
    """Runs :func:`run_finetune` calls ``jobs`` at a time; with ``jobs > 1`` each subprocess gets a core of its own.

    Calls start in the order they are submitted, so submit the longest first.
    """

    def __init__(self, runs: Path, data_dir: Path, jobs: int = 1, reuse: bool = False) -> None:
        self.runs, self.data_dir, self.reuse = runs, data_dir, reuse
        cores = sorted(os.sched_getaffinity(0))
        if not 1 <= jobs <= len(cores):
            raise SystemExit(f"--jobs {jobs}: choose 1 to {len(cores)} (the cores this process may use)")
        self._free: queue.Queue = queue.Queue()
        for c in cores[:jobs]:
            self._free.put(c if jobs > 1 else None)
        self._pool = ThreadPoolExecutor(jobs)

    def submit(self, name: str, common: dict, extra: dict) -> Future:
        def job() -> dict:
            core = self._free.get()
            try:
                return run_finetune(name, self.runs, self.data_dir, common, extra, core=core, reuse=self.reuse)
            finally:
                self._free.put(core)

        return self._pool.submit(job)


def ensure_workspace(args) -> Path:
    if args.data_dir is not None:
        return args.data_dir
    ws = args.runs / "workspace"
    if not (ws / "manifest.json").exists() or not any((ws / "atomic_behavior_embeddings").glob("*.parquet")):
        subprocess.run(llmfeat() + ["ingest", "--source", str(args.source), "--data-dir", str(ws)], check=True)
        subprocess.run(llmfeat() + ["encode", "--data-dir", str(ws)], check=True)
    return ws


def workspace_parser(doc: str, benchmark: str) -> argparse.ArgumentParser:
    """The options every finetune-style benchmark shares: where the data is, where runs and results go."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--source", type=Path, default=REPO.parent / "shared" / "data" / "ml-1m",
                    help="ML-1M directory (used only when --data-dir is not given: ingest + encode first)")
    ap.add_argument("--data-dir", type=Path, default=None, help="an ingested + encoded workspace (not modified)")
    ap.add_argument("--runs", type=Path, default=REPO / "runs" / f"bench_{benchmark}")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--limit-users", type=int, default=200, help="seeded user sample shared by every run")
    return ap


def run_header(benchmark: str, args: argparse.Namespace) -> dict:
    """What every result file of a finetune-style benchmark starts with: when, where, how it was run."""
    return {
        "benchmark": benchmark,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "quick": args.quick,
        "dataset": str(args.source) if args.data_dir is None else str(args.data_dir),
        "command": " ".join([Path(sys.executable).name, f"bench/bench_{benchmark}.py"] + sys.argv[1:]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": args.num_threads,
                    "load_avg_1m": os.getloadavg()[0]},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }


def ratio(a, b):
    try:
        return a / b if a and b else None
    except TypeError:
        return None

