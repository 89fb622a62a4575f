"""Fine-tuning benchmark: the four training modes, the DTI k sweep and the leakage variants on ML-1M.

Every configuration runs as its own ``llmfeat finetune ... --out DIR`` subprocess (so the peak RSS
of one run is not inflated by another) on one workspace, one model and one seeded user sample;
the numbers are read back from ``DIR/metrics.json``.

- **modes**: behaviour / token level x sliding window / DTI, speed and peak memory over a fixed
  number of optimizer steps. Token level runs every layer over ~30 behaviour texts per target and
  is very slow on CPU, so its speed is measured on a smaller fixed batch and step count; its AUC
  is not meaningful (a few dozen training targets).
- **k sweep**: behaviour-level DTI, k in (1, 4, 8, 16, 32, 64), one full epoch over the same
  training targets (k = 1 is the sliding window), AUC and speed.
- **leakage**: windowed / block / isolated at the largest k.

Writes ``finetune.json``, ``finetune.md`` and ``finetune.png`` to ``--out``. Numbers, not
assertions: a benchmark never fails on a timing or a floor.

    HF_HUB_OFFLINE=1 python bench/bench_finetune.py --source ../shared/data/ml-1m
    python bench/bench_finetune.py --quick          # tiny version, < 2 minutes
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

FLOORS = {"bahe_time": 5.0, "bahe_memory": 5.0, "dti_speed": 10.0, "dti_auc_gap": 0.002, "bahe_dti_speed": 50.0}
PAPERS = {"bahe_time": 5.0, "bahe_memory": 5.0, "dti_time_reduction": 0.92, "dti_speed": 70.5 / 5.31}
DEFAULT_K = 32  # FinetuneConfig.targets_per_sequence


def llmfeat() -> list[str]:
    exe = Path(sys.executable).with_name("llmfeat")
    return [str(exe)] if exe.exists() else [sys.executable, "-c", "from llm_features.cli import run; run()"]


def run_finetune(name: str, runs: Path, data_dir: Path, common: dict, extra: dict) -> dict:
    """One ``llmfeat finetune`` subprocess; returns a compact record of its metrics.json."""
    out = runs / name
    shutil.rmtree(out, ignore_errors=True)
    opts = {**common, **extra}
    cmd = llmfeat() + ["finetune", "--data-dir", str(data_dir), "--out", str(out)]
    for k, v in opts.items():
        if v is None:
            continue
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    t0 = time.perf_counter()
    print(f"[bench_finetune] {name}: {' '.join(cmd[1:])}", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1",
                                                                     "TRANSFORMERS_OFFLINE": "1"})
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not (out / "metrics.json").exists():
        print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
        return {"name": name, "options": opts, "error": f"exit {proc.returncode}", "wall_s": wall}
    m = json.loads((out / "metrics.json").read_text())
    tps = m["targets_per_s"]
    rec = {
        "name": name,
        "options": opts,
        "train_targets": m["train_targets"],
        "train_sequences": m["train_sequences"],
        "steps": m["steps"],
        "train_seconds": m["train_seconds"],
        "targets_per_s": tps,
        "seconds_per_10k_targets": 1e4 / tps if tps else None,
        "peak_rss_mb": m["peak_rss_mb"],
        "test_auc": m["test"]["auc"],
        "test_logloss": m["test"]["logloss"],
        "test_targets": m["test"]["targets"],
        "valid_auc": m["valid"]["auc"],
        "wall_s": wall,
    }
    print(f"[bench_finetune]   {tps:.1f} targets/s, {m['peak_rss_mb']:.0f} MiB, test AUC {rec['test_auc']:.4f} "
          f"({wall:.0f}s)", flush=True)
    return rec


def ensure_workspace(args) -> Path:
    if args.data_dir is not None:
        return args.data_dir
    ws = args.runs / "workspace"
    if not (ws / "manifest.json").exists() or not any((ws / "atomic_behavior_embeddings").glob("*.parquet")):
        subprocess.run(llmfeat() + ["ingest", "--source", str(args.source), "--data-dir", str(ws)], check=True)
        subprocess.run(llmfeat() + ["encode", "--data-dir", str(ws)], check=True)
    return ws


def ratio(a, b):
    try:
        return a / b if a and b else None
    except TypeError:
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, default=REPO.parent / "shared" / "data" / "ml-1m",
                    help="ML-1M directory (used only when --data-dir is not given: ingest + encode first)")
    ap.add_argument("--data-dir", type=Path, default=None, help="an ingested + encoded workspace (not modified)")
    ap.add_argument("--runs", type=Path, default=REPO / "runs" / "bench_finetune")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--limit-users", type=int, default=300, help="seeded user sample shared by every run")
    ap.add_argument("--max-targets", type=int, default=3000,
                    help="targets per split of the k-sweep / leakage runs (whole users; same for every k)")
    ap.add_argument("--epochs", type=int, default=1, help="epochs of the k-sweep / leakage runs")
    ap.add_argument("--max-steps", type=int, default=20, help="optimizer steps of a behaviour-level speed run")
    ap.add_argument("--token-steps", type=int, default=2, help="optimizer steps of a token-level speed run")
    ap.add_argument("--token-batch-size", type=int, default=8, help="targets per step of a token-level speed run")
    ap.add_argument("--token-max-targets", type=int, default=16, help="targets per split of a token-level run")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--context-size", type=int, default=30)
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 4, 8, 16, 32, 64])
    ap.add_argument("--default-k", type=int, default=DEFAULT_K)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="tiny version (< 2 minutes) to check the script works")
    args = ap.parse_args()
    if args.quick:
        args.limit_users, args.max_targets, args.max_steps = 40, 300, 3
        args.token_steps, args.token_batch_size, args.token_max_targets = 1, 2, 4
        args.context_size, args.ks = 8, [1, 8, 32]
        args.default_k = 8
        args.runs = args.runs.with_name(args.runs.name + "_quick")
    args.runs.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    data_dir = ensure_workspace(args)
    common = {"limit_users": args.limit_users, "seed": args.seed, "num_threads": args.num_threads,
              "context_size": args.context_size, "log_every": 0, "device": "cpu"}

    # ---- four modes: speed + memory over a fixed number of steps
    modes = {}
    for gran in ("behavior", "token"):
        for packing in ("sliding-window", "dti"):
            extra = {"granularity": gran, "packing": packing, "targets_per_sequence": args.default_k}
            if gran == "behavior":
                extra |= {"max_targets": args.max_targets, "max_steps": args.max_steps, "batch_size": args.batch_size,
                          "eval_batch_size": args.batch_size}
            else:
                # k targets per sequence: a token-level DTI step needs at least one whole sequence
                tb = args.token_batch_size if packing == "sliding-window" else max(args.token_batch_size, args.default_k)
                extra |= {"max_targets": args.token_max_targets if packing == "sliding-window"
                          else max(args.token_max_targets, args.default_k),
                          "max_steps": args.token_steps, "batch_size": tb, "eval_batch_size": tb}
            modes[f"{gran}/{packing}"] = run_finetune(f"mode_{gran}_{packing}", args.runs, data_dir, common, extra)

    # ---- k sweep, behaviour-level DTI (k=1 = sliding window), one epoch over the same targets
    sweep = {}
    for k in args.ks:
        extra = {"granularity": "behavior", "packing": "dti", "targets_per_sequence": k,
                 "max_targets": args.max_targets, "epochs": args.epochs, "batch_size": args.batch_size}
        sweep[k] = run_finetune(f"sweep_k{k}", args.runs, data_dir, common, extra)

    # ---- leakage variants at the largest k
    kmax = max(args.ks)
    leakage = {"windowed": sweep[kmax]}
    for variant in ("block", "isolated"):
        extra = {"granularity": "behavior", "packing": "dti", "targets_per_sequence": kmax, "leakage": variant,
                 "max_targets": args.max_targets, "epochs": args.epochs, "batch_size": args.batch_size}
        leakage[variant] = run_finetune(f"leakage_{variant}_k{kmax}", args.runs, data_dir, common, extra)

    # ---- ratios
    g = lambda rec, key: rec.get(key) if rec else None  # noqa: E731
    b_sw, t_sw, b_dti = modes["behavior/sliding-window"], modes["token/sliding-window"], modes["behavior/dti"]
    k1, kd = sweep.get(1), sweep.get(args.default_k)
    dti_auc_gap = (g(kd, "test_auc") - g(k1, "test_auc")) if g(kd, "test_auc") is not None and g(k1, "test_auc") is not None else None
    dti_speed = ratio(g(kd, "targets_per_s"), g(k1, "targets_per_s"))
    ratios = {
        "bahe_vs_token_time": ratio(g(t_sw, "seconds_per_10k_targets"), g(b_sw, "seconds_per_10k_targets")),
        "bahe_vs_token_memory": ratio(g(t_sw, "peak_rss_mb"), g(b_sw, "peak_rss_mb")),
        "dti_vs_sw_speed": dti_speed,
        # the same comparison from the fixed-step speed runs of the modes section (another sample of the noise)
        "dti_vs_sw_speed_fixed_steps": ratio(g(b_dti, "targets_per_s"), g(b_sw, "targets_per_s")),
        "dti_time_reduction": (1 - 1 / dti_speed) if dti_speed else None,
        "dti_auc_gap": dti_auc_gap,
        "bahe_dti_vs_token_sw_speed": ratio(g(b_dti, "targets_per_s"), g(t_sw, "targets_per_s")),
        "token_dti_vs_token_sw_speed": ratio(g(modes["token/dti"], "targets_per_s"), g(t_sw, "targets_per_s")),
        "default_k": args.default_k,
    }
    meets = {
        "bahe_time": bool(ratios["bahe_vs_token_time"] and ratios["bahe_vs_token_time"] >= FLOORS["bahe_time"]),
        "bahe_memory": bool(ratios["bahe_vs_token_memory"] and ratios["bahe_vs_token_memory"] >= FLOORS["bahe_memory"]),
        "dti_speed": bool(dti_speed and dti_speed >= FLOORS["dti_speed"]),
        "dti_auc": bool(dti_auc_gap is not None and dti_auc_gap >= -FLOORS["dti_auc_gap"]),
        "bahe_dti_speed": bool(ratios["bahe_dti_vs_token_sw_speed"]
                               and ratios["bahe_dti_vs_token_sw_speed"] >= FLOORS["bahe_dti_speed"]),
    }
    result = {
        "benchmark": "finetune",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "quick": args.quick,
        "dataset": str(args.source) if args.data_dir is None else str(args.data_dir),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": args.num_threads,
                    "load_avg_1m": os.getloadavg()[0]},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "modes": modes,
        "k_sweep": {str(k): v for k, v in sweep.items()},
        "leakage": leakage,
        "ratios": ratios,
        "floors": FLOORS,
        "papers": PAPERS,
        "meets_floor": meets,
        "total_seconds": time.perf_counter() - started,
    }
    stem = "finetune_quick" if args.quick else "finetune"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(result))
    try:
        plot(result, args.out / f"{stem}.png")
    except Exception as exc:  # noqa: BLE001 - the numbers matter more than the picture
        print(f"[bench_finetune] plot failed: {exc}", file=sys.stderr)
    print((args.out / f"{stem}.md").read_text())


def _f(x, fmt="{:.1f}", none="-"):
    return none if x is None else fmt.format(x)


def markdown(r: dict) -> str:
    s, rt, fl, mt = r["settings"], r["ratios"], r["floors"], r["meets_floor"]
    yes = lambda b: "met" if b else "**not met**"  # noqa: E731
    lines = [
        "# Fine-tuning: BAHE / token level x DTI / sliding window (ML-1M)",
        "",
        f"{r['when']}; {r['machine']['platform']}, {r['machine']['cpus']} shared CPUs, {s['num_threads']} torch "
        f"threads (load average {r['machine']['load_avg_1m']:.2f} at the end). Default MiniLM-L6 (split 3 of 6), "
        f"context n = {s['context_size']}, one seeded sample of {s['limit_users']} users (seed {s['seed']}) for every "
        f"run; each configuration is its own `llmfeat finetune` subprocess (peak RSS is per process and includes "
        f"loading the workspace; evaluation uses the training batch size so that the peak is the training step's)." + (" **Quick (tiny) run: numbers are only a smoke test.**" if r["quick"] else ""),
        "",
        "## Four modes (speed and memory)",
        "",
        f"Behaviour level: {s['max_steps']} optimizer steps of {s['batch_size']} targets. Token level is far slower on "
        f"CPU, so its speed is measured on a small fixed subset: {s['token_steps']} steps of {s['token_batch_size']} "
        f"targets (DTI: one packed sequence of k = {s['default_k']} per step) over at most "
        f"~{s['token_max_targets']} targets per split. AUCs of these short runs are *not* meaningful "
        f"(see the k sweep for AUC).",
        "",
        "| mode | train targets | targets/s | s per 10k targets | peak RSS MiB | test AUC (not meaningful) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, m in r["modes"].items():
        if "error" in m:
            lines.append(f"| {name} | failed: {m['error']} | | | | |")
            continue
        lines.append(f"| {name} | {m['train_targets']} | {m['targets_per_s']:.1f} | {m['seconds_per_10k_targets']:.0f} "
                     f"| {m['peak_rss_mb']:.0f} | {m['test_auc']:.4f} |")
    lines += [
        "",
        f"## k sweep: behaviour-level DTI, {s['epochs']} epoch(s) over ~{s['max_targets']} train targets "
        f"(test split capped the same way; k = 1 is the sliding window)",
        "",
        "| k | train targets | sequences | targets/s | s per 10k targets | peak RSS MiB | test AUC | test LogLoss |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for k, m in r["k_sweep"].items():
        if "error" in m:
            lines.append(f"| {k} | failed: {m['error']} | | | | | | |")
            continue
        lines.append(f"| {k} | {m['train_targets']} | {m['train_sequences']} | {m['targets_per_s']:.1f} | "
                     f"{m['seconds_per_10k_targets']:.0f} | {m['peak_rss_mb']:.0f} | {m['test_auc']:.4f} | "
                     f"{m['test_logloss']:.4f} |")
    lines += ["", f"## Leakage variants at k = {max(int(k) for k in r['k_sweep'])}", "",
              "| leakage | targets/s | test AUC | test LogLoss |", "| --- | ---: | ---: | ---: |"]
    for name, m in r["leakage"].items():
        if m is None or "error" in m:
            lines.append(f"| {name} | failed | | |")
            continue
        lines.append(f"| {name} | {m['targets_per_s']:.1f} | {m['test_auc']:.4f} | {m['test_logloss']:.4f} |")
    gap = rt["dti_auc_gap"]
    lines += [
        "",
        "## Ratios against the floors and the papers",
        "",
        "| comparison | measured | floor | paper | floor met |",
        "| --- | ---: | ---: | ---: | --- |",
        f"| BAHE vs token level, both sliding window: training time per target | {_f(rt['bahe_vs_token_time'], '{:.1f}x')} "
        f"| {fl['bahe_time']:.0f}x | 5x (BAHE) | {yes(mt['bahe_time'])} |",
        f"| BAHE vs token level, both sliding window: peak RSS | {_f(rt['bahe_vs_token_memory'], '{:.2f}x')} "
        f"| {fl['bahe_memory']:.0f}x | 5x (BAHE) | {yes(mt['bahe_memory'])} |",
        f"| DTI (k = {rt['default_k']}) vs sliding window, behaviour level: targets/s | "
        f"{_f(rt['dti_vs_sw_speed'], '{:.1f}x')} ({_f(rt['dti_time_reduction'] and 100 * rt['dti_time_reduction'], '{:.0f}%')} less time) "
        f"| {fl['dti_speed']:.0f}x | 92% less time (13.3x) | {yes(mt['dti_speed'])} |",
        f"| same, from the {s['max_steps']}-step speed runs of the modes table | "
        f"{_f(rt.get('dti_vs_sw_speed_fixed_steps'), '{:.1f}x')} | {fl['dti_speed']:.0f}x | 92% less time (13.3x) | "
        f"{yes((rt.get('dti_vs_sw_speed_fixed_steps') or 0) >= fl['dti_speed'])} |",
        f"| DTI (k = {rt['default_k']}) minus sliding window: test AUC | {_f(gap, '{:+.4f}')} | within "
        f"{fl['dti_auc_gap']} | equal AUC | {yes(mt['dti_auc'])} |",
        f"| BAHE + DTI vs token-level sliding window: targets/s | {_f(rt['bahe_dti_vs_token_sw_speed'], '{:.0f}x')} "
        f"| {fl['bahe_dti_speed']:.0f}x | - | {yes(mt['bahe_dti_speed'])} |",
        f"| token-level DTI vs token-level sliding window: targets/s (for reference) | "
        f"{_f(rt['token_dti_vs_token_sw_speed'], '{:.1f}x')} | - | 92% less time | - |",
        "",
        "Caveats: 2 shared CPU cores (other jobs were running), so timings are noisy: the two DTI-vs-sliding-window "
        "speed lines measure the same thing (first: k sweep, one full epoch; second: 20-step runs) and differ "
        "because the sliding-window rate differed between them. The k-sweep runs evaluate with the default eval "
        "batch (1024 targets), so their peak RSS includes evaluation. Token-level numbers "
        "come from a handful of steps. The AUCs come from a small sample trained for one epoch; their "
        "run-to-run noise is far larger than 0.002, so the AUC line is indicative only. Peak RSS includes "
        "the process's fixed cost (torch, the workspace tables), which compresses the memory ratio.",
        "",
        f"Total benchmark time: {r['total_seconds']:.0f} s.",
        "",
    ]
    return "\n".join(lines)


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a3) = plt.subplots(1, 2, figsize=(12, 4.5))
    ks = [int(k) for k, m in r["k_sweep"].items() if "error" not in m]
    ms = [r["k_sweep"][str(k)] for k in ks]
    a1.plot(ks, [m["test_auc"] for m in ms], "o-", color="C0", label="test AUC")
    a1.set_xscale("log", base=2)
    a1.set_xlabel("k (targets per sequence), behaviour-level DTI")
    a1.set_ylabel("test AUC", color="C0")
    a2 = a1.twinx()
    a2.plot(ks, [m["targets_per_s"] for m in ms], "s--", color="C1", label="targets/s")
    a2.set_ylabel("train targets/s", color="C1")
    a1.set_title("k sweep")
    names = [n for n, m in r["modes"].items() if "error" not in m]
    vals = [r["modes"][n]["targets_per_s"] for n in names]
    a3.bar(range(len(names)), vals, color=["C2", "C3", "C4", "C5"][: len(names)])
    a3.set_yscale("log")
    a3.set_xticks(range(len(names)), names, rotation=15)
    a3.set_ylabel("train targets/s (log)")
    for i, n in enumerate(names):
        a3.annotate(f"{vals[i]:.1f}/s\n{r['modes'][n]['peak_rss_mb']:.0f} MiB", (i, vals[i]), ha="center",
                    va="bottom", fontsize=8)
    a3.set_title("four modes")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
