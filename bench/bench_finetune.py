"""Fine-tuning benchmark: BAHE vs token level, DTI vs sliding window, and an id-only baseline, on ML-1M.

Every configuration runs as its own ``llmfeat finetune ... --out DIR`` subprocess on one workspace,
one model and one seeded user sample; the numbers are read back from ``DIR/metrics.json``.

- **modes** (BAHE vs token level): behaviour / token level x sliding window / DTI, the same
  targets per optimizer step in each pair, a fixed number of steps. Measured: training speed and
  training memory. Token level runs every layer over ~30 behaviour texts per target and is very
  slow on CPU, hence few steps and small batches; the AUCs of these runs are not meaningful.
- **k sweep** (DTI vs sliding window): behaviour level, k in ``--ks`` (k = 1 is the sliding
  window), one epoch over every train target of the sampled users, the default batch and
  learning rate. Measured: training speed and test AUC (with a paired bootstrap over test users
  of the difference to k = 1).
- **leakage**: windowed / block / isolated at the default k.
- **id-only baselines**: user + item positive rates, and a logistic matrix factorisation, fitted on
  exactly the train targets of the k sweep and scored on exactly its test targets.

How things are measured, identically for every run:

- *speed* = training targets per second of training-step time (packing, forward, backward,
  optimizer step), leaving out each run's first 2 steps (warm-up), i.e. ``steady_targets_per_s``;
- *training memory* = peak RSS while the training steps run minus the RSS just before the first
  step (after the model, the tables and the data are loaded), i.e. ``train_rss_increase_mb``. The
  whole-process peak RSS (which adds ~0.8 GB of torch, model and workspace that every mode pays) is
  reported next to it.

Writes ``finetune.json``, ``finetune.md`` and ``finetune.png`` to ``--out``. Numbers, not
assertions: a benchmark never fails on a timing or a floor.

    HF_HUB_OFFLINE=1 python bench/bench_finetune.py --data-dir /work/ws_ft --out bench/results
    python bench/bench_finetune.py --quick          # tiny version, a few minutes
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import queue
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

FLOORS = {"bahe_time": 5.0, "bahe_memory": 5.0, "dti_speed": 10.0, "dti_auc_gap": 0.002, "bahe_dti_speed": 50.0}
PAPERS = {"bahe_time": 5.0, "bahe_memory": 5.0, "dti_time_reduction": 0.92, "dti_speed": 70.5 / 5.31}
def _default_k() -> int:
    from llm_features.finetune import FinetuneConfig

    return FinetuneConfig().targets_per_sequence


DEFAULT_K = _default_k()
TIMING_WARMUP_STEPS = 2  # llm_features.finetune.train.TIMING_WARMUP_STEPS


def llmfeat() -> list[str]:
    exe = Path(sys.executable).with_name("llmfeat")
    return [str(exe)] if exe.exists() else [sys.executable, "-c", "from llm_features.cli import run; run()"]


SAME_RECIPE, SMALL_BATCH_RECIPE = "same recipe", "small batch"
"""``sw_recipe`` of a time-to-equal-AUC comparison: the sliding window with DTI's batch and learning rate, or at
its own small-batch recipe (``--sw-reference``)."""

# Options that do not change what a run computes: a finished run that differs only in these is reused.
REUSE_IGNORED = {"out", "log_every", "save_every", "resume", "eval_batch_size", "device"}


def _reusable(out: Path, data_dir: Path, opts: dict) -> bool:
    """``out`` holds a finished run with exactly these options (the finetune defaults filling the rest)."""
    from llm_features.finetune import FinetuneConfig
    from llm_features.finetune.checkpoint import config_to_dict

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


DTI_RECIPES = ("batch_size=256,lr=2e-4,head_lr=4e-3", "batch_size=128", "batch_size=128,lr=2e-4,head_lr=4e-3",
               "batch_size=128,lr=5e-5,head_lr=1e-3,warmup_steps=50")
"""``--dti-recipes`` defaults: DTI with fewer targets per step (more steps per epoch), at three learning rates."""


def _recipe(text: str) -> dict:
    """``"batch_size=128,lr=1e-4"`` -> ``{"batch_size": 128, "lr": 0.0001}``."""
    out = {}
    for kv in filter(None, text.split(",")):
        key, sep, value = kv.partition("=")
        if not sep:
            raise SystemExit(f"--dti-recipes {text!r}: write key=value pairs separated by commas")
        out[key.strip()] = _literal(value.strip())
    return out


def _literal(text: str):
    """``"64"`` -> 64, ``"5e-5"`` -> 5e-05, anything else stays a string (so --reuse compares like with like)."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


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


# ------------------------------------------------------------------------------------------ id-only baselines
def load_targets(data_dir: Path, limit_users: int | None, max_targets: int | None, seed: int) -> dict:
    """The users, items and labels of the train / valid / test targets a finetune run with these options uses."""
    from llm_features.finetune import FinetuneConfig
    from llm_features.finetune.data import load_finetune_data
    from llm_features.finetune.train import split_targets

    cfg = FinetuneConfig(data_dir=data_dir, limit_users=limit_users, max_targets=max_targets, seed=seed)
    data = load_finetune_data(data_dir, None, need_behavior_vectors=False, limit_users=limit_users, seed=seed)
    h = data.hist
    user = np.repeat(np.arange(len(h.user_ids)), np.diff(h.offsets))
    out = {"user": user, "item": h.item_row, "label": h.label.astype(np.float64),
           "num_users": len(h.user_ids), "num_items": int(h.item_row.max()) + 1}
    for split in ("train", "valid", "test"):
        out[split] = np.flatnonzero(split_targets(cfg, data, split))
    return out


def _auc(labels: np.ndarray, scores: np.ndarray) -> float:
    from llm_features.metrics import roc_auc

    return roc_auc(labels, scores)


def rate_baseline(t: dict) -> dict:
    """logit(user positive rate) + logit(item positive rate), both shrunk towards the global rate.

    The shrinkage strength (pseudo-count) is chosen on the valid targets.
    """
    y, tr = t["label"], t["train"]
    g = y[tr].mean()
    logit = lambda p: np.log(p / (1 - p))  # noqa: E731

    def rates(key: np.ndarray, size: int, alpha: float) -> np.ndarray:
        pos = np.bincount(key[tr], weights=y[tr], minlength=size)
        cnt = np.bincount(key[tr], minlength=size)
        return (pos + alpha * g) / (cnt + alpha)

    def score(rows: np.ndarray, alpha: float) -> np.ndarray:
        u, i = rates(t["user"], t["num_users"], alpha), rates(t["item"], t["num_items"], alpha)
        return logit(u[t["user"][rows]]) + logit(i[t["item"][rows]])

    alphas = [1.0, 3.0, 10.0, 30.0, 100.0]
    valid = [_auc(y[t["valid"]], score(t["valid"], a)) for a in alphas]
    best = alphas[int(np.nanargmax(valid))]
    return {"name": "user + item positive rate", "test_auc": _auc(y[t["test"]], score(t["test"], best)),
            "valid_auc": max(valid), "chosen": {"pseudo_count": best}}


def mf_baseline(t: dict, dim: int = 32, epochs: int = 30, seed: int = 0) -> dict:
    """Logistic matrix factorisation ``b + b_u + b_i + <p_u, q_i>`` (BCE, Adam), the epoch chosen on valid."""
    import torch

    torch.manual_seed(seed)
    y = torch.as_tensor(t["label"], dtype=torch.float32)
    user, item = torch.as_tensor(t["user"]), torch.as_tensor(t["item"])
    best = {"valid_auc": -1.0}
    for wd in (1e-4, 1e-3):
        emb_u = torch.nn.Embedding(t["num_users"], dim + 1)
        emb_i = torch.nn.Embedding(t["num_items"], dim + 1)
        for e in (emb_u, emb_i):
            torch.nn.init.normal_(e.weight, std=0.01)
        bias = torch.nn.Parameter(torch.zeros(()))
        params = [emb_u.weight, emb_i.weight, bias]
        opt = torch.optim.Adam(params, lr=0.01)

        def logits(rows: np.ndarray) -> torch.Tensor:
            r = torch.as_tensor(rows)
            pu, qi = emb_u(user[r]), emb_i(item[r])
            return bias + pu[:, 0] + qi[:, 0] + (pu[:, 1:] * qi[:, 1:]).sum(-1)

        gen = np.random.default_rng(seed)
        for epoch in range(epochs):
            order = gen.permutation(t["train"])
            for start in range(0, len(order), 1024):
                rows = order[start:start + 1024]
                r = torch.as_tensor(rows)
                loss = torch.nn.functional.binary_cross_entropy_with_logits(logits(rows), y[r])
                # L2 on the rows used, scaled like weight decay
                loss = loss + wd * (emb_u(user[r]).pow(2).sum(-1) + emb_i(item[r]).pow(2).sum(-1)).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            with torch.no_grad():
                v = _auc(t["label"][t["valid"]], logits(t["valid"]).numpy())
                if v > best["valid_auc"]:
                    test = _auc(t["label"][t["test"]], logits(t["test"]).numpy())
                    best = {"valid_auc": v, "test_auc": test, "chosen": {"epoch": epoch + 1, "l2": wd, "dim": dim}}
    return {"name": f"logistic MF (dim {dim})", **best}


def bootstrap_gap(a_out: str, b_out: str, users: np.ndarray, reps: int = 1000, seed: int = 0) -> dict | None:
    """AUC(a) - AUC(b) on the same test targets, with a 95% interval from resampling test users."""
    try:
        a = np.load(Path(a_out) / "test_predictions.npz")
        b = np.load(Path(b_out) / "test_predictions.npz")
    except OSError:
        return None
    order_a, order_b = np.argsort(a["row"]), np.argsort(b["row"])
    if not np.array_equal(a["row"][order_a], b["row"][order_b]):
        return None
    rows, label = a["row"][order_a], a["label"][order_a]
    sa, sb = a["logit"][order_a], b["logit"][order_b]
    u = users[rows]
    uniq, inv = np.unique(u, return_inverse=True)
    members = [np.flatnonzero(inv == i) for i in range(len(uniq))]
    rng = np.random.default_rng(seed)
    gaps = []
    for _ in range(reps):
        pick = np.concatenate([members[i] for i in rng.integers(0, len(uniq), len(uniq))])
        gaps.append(_auc(label[pick], sa[pick]) - _auc(label[pick], sb[pick]))
    gaps = np.asarray(gaps)
    gaps = gaps[np.isfinite(gaps)]
    return {"gap": _auc(label, sa) - _auc(label, sb), "ci95": [float(np.quantile(gaps, 0.025)),
            float(np.quantile(gaps, 0.975))], "test_users": int(len(uniq)), "test_targets": int(len(rows))}


# ------------------------------------------------------------------------------------------ main
def main() -> None:
    ap = workspace_parser(__doc__, "finetune")
    ap.add_argument("--max-targets", type=int, default=None,
                    help="cap the targets of each split of the k-sweep runs (default: every target of the users)")
    ap.add_argument("--epochs", type=int, default=1, help="epochs of the k-sweep / leakage runs")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="targets per step of the k-sweep / leakage runs (default: llmfeat finetune's default)")
    ap.add_argument("--ks", type=int, nargs="+", default=sorted({1, 4, 8, 16, 32, 64, DEFAULT_K}))
    ap.add_argument("--default-k", type=int, default=DEFAULT_K)
    ap.add_argument("--auc-seeds", type=int, default=1,
                    help="seeds of the k = 1 and default-k runs (initialisation, data order, dropout; the same users)")
    ap.add_argument("--dti-epochs", type=int, nargs="*", default=[2, 3],
                    help="epochs of extra default-k runs (first seed): does DTI reach the sliding window's AUC with "
                         "more epochs, and in how much of its time? (none: skip)")
    ap.add_argument("--sw-epochs", type=int, nargs="*", default=[2, 3],
                    help="epochs of extra sliding-window runs (first seed): the sliding window's own AUC curve, "
                         "against DTI at the same epochs (none: skip)")
    ap.add_argument("--sw-reference", nargs="*", default=["batch_size=64", "lr=5e-5", "head_lr=1e-3",
                                                          "warmup_steps=50"],
                    help="a full sliding-window run with these options instead of the defaults (a small-batch "
                         "recipe: many more steps per epoch); its AUC and speed are reported next to the same-recipe "
                         "comparison (none: skip)")
    ap.add_argument("--dti-recipes", nargs="*", default=list(DTI_RECIPES),
                    help="one-epoch DTI runs at the default k with other options, each 'key=value,key=value' (fewer "
                         "targets per step: more steps, fewer users per step); their AUC and speed against the "
                         "one-epoch sliding window (none: skip)")
    ap.add_argument("--mode-batch-size", type=int, default=16,
                    help="targets per step of the sliding-window runs of the modes table (both granularities)")
    ap.add_argument("--mode-max-targets", type=int, default=100,
                    help="targets per split of a modes run (whole users; the same for all four modes)")
    ap.add_argument("--behavior-steps", type=int, default=20, help="optimizer steps of a behaviour-level modes run")
    ap.add_argument("--token-steps", type=int, default=5, help="optimizer steps of a token-level modes run")
    ap.add_argument("--context-size", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-threads", type=int, default=1,
                    help="torch threads per run (1: robust on a shared machine; ratios are what is compared)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="runs at a time, each pinned to a core of its own (at most the cores available)")
    ap.add_argument("--reuse", action="store_true",
                    help="keep finished runs in --runs made with the same options (resume a killed benchmark)")
    ap.add_argument("--quick", action="store_true", help="tiny version to check the script works")
    ap.set_defaults(limit_users=1500)
    args = ap.parse_args()
    if args.quick:
        args.limit_users, args.max_targets = 30, 300
        args.behavior_steps, args.token_steps, args.mode_batch_size, args.mode_max_targets = 4, 3, 2, 8
        args.context_size, args.ks, args.default_k = 8, [1, 8], 8
        args.dti_epochs, args.sw_epochs, args.sw_reference = [2], [], ["batch_size=16"]
        args.dti_recipes = ["batch_size=8"]
        args.runs = args.runs.with_name(args.runs.name + "_quick")
    args.runs.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    data_dir = ensure_workspace(args)
    # data_seed: every run trains on the same users and targets, whatever its training seed
    # leakage windowed: the default when results/finetune.* were measured (now isolated); the leakage
    # runs below compare the other two against it
    common = {"limit_users": args.limit_users, "seed": args.seed, "data_seed": args.seed,
              "num_threads": args.num_threads, "context_size": args.context_size, "log_every": 0, "device": "cpu",
              "leakage": "windowed"}
    k = args.default_k

    runner = Runner(args.runs, data_dir, args.jobs, args.reuse)
    sweep_common = {"granularity": "behavior", "packing": "dti", "max_targets": args.max_targets,
                    "epochs": args.epochs, "batch_size": args.batch_size}
    sweep, seeds, longer, modes, sw_longer, sw_speed = {}, {}, {}, {}, {}, {}
    # ---- the sliding-window runs first: they are the longest, so parallel jobs finish together
    extra_seeds = [args.seed + s for s in range(1, args.auc_seeds)]
    sliding = {**sweep_common, "packing": "sliding-window"}  # k = 1
    for epochs in sorted(set(args.sw_epochs) - {args.epochs}, reverse=True):
        sw_longer[epochs] = runner.submit(f"sweep_k1_epochs{epochs}", common, {**sliding, "epochs": epochs})
    if args.sw_reference:  # the sliding window at its own small-batch recipe (AUC and speed)
        ref = {kv.split("=", 1)[0]: _literal(kv.split("=", 1)[1]) for kv in args.sw_reference}
        sw_speed["reference"] = runner.submit("sw_reference", common, {**sliding, **ref})
    if 1 in args.ks:
        sweep[1] = runner.submit("sweep_k1", common, sliding)
    for seed in extra_seeds:
        seeds[f"k1_seed{seed}"] = runner.submit(f"sweep_k1_seed{seed}", {**common, "seed": seed}, sliding)

    # ---- four modes: the same targets per step within each pair, a fixed number of steps
    for gran in ("behavior", "token"):
        for packing in ("sliding-window", "dti"):
            # token-level DTI needs one whole sequence (k targets) per step; its behaviour-level twin gets the same
            batch = args.mode_batch_size if packing == "sliding-window" else max(args.mode_batch_size, k)
            steps = args.behavior_steps if gran == "behavior" else args.token_steps
            # the same capped targets for all four (the same users and texts); as many epochs as the steps need
            extra = {"granularity": gran, "packing": packing, "targets_per_sequence": k, "batch_size": batch,
                     "eval_batch_size": batch, "max_steps": steps, "epochs": 1000, "max_targets": args.mode_max_targets}
            modes[f"{gran}/{packing}"] = runner.submit(f"mode_{gran}_{packing}", common, extra)

    # ---- time to equal AUC: the default k for more epochs, against the sliding window's runs
    # (before the one-epoch DTI runs: the longest first)
    for epochs in sorted(set(args.dti_epochs) - {args.epochs}, reverse=True):
        longer[epochs] = runner.submit(f"sweep_k{k}_epochs{epochs}", common,
                                       {**sweep_common, "targets_per_sequence": k, "epochs": epochs})

    # ---- DTI at other recipes (one epoch, the default k)
    recipes = {}
    for text in args.dti_recipes:
        opts = _recipe(text)
        recipes[text] = runner.submit("dti_recipe_" + "_".join(f"{kk}{v}" for kk, v in opts.items()), common,
                                      {**sweep_common, "targets_per_sequence": k, **opts})

    # ---- k sweep, behaviour level (k = 1 = sliding window), the same epochs over the same targets
    for kk in sorted(args.ks):  # the slow small k first
        if kk != 1:
            sweep[kk] = runner.submit(f"sweep_k{kk}", common, {**sweep_common, "targets_per_sequence": kk})
    for seed in extra_seeds:
        seeds[f"k{k}_seed{seed}"] = runner.submit(f"sweep_k{k}_seed{seed}", {**common, "seed": seed},
                                                  {**sweep_common, "targets_per_sequence": k})

    # ---- leakage variants at the largest k
    k_leak = max(args.ks)
    leakage = {}
    for variant in ("block", "isolated"):
        leakage[variant] = runner.submit(f"leakage_{variant}_k{k_leak}", common,
                                         {**sweep_common, "targets_per_sequence": k_leak, "leakage": variant})


    def done(futures: dict) -> dict:
        return {key: f.result() if f is not None else None for key, f in futures.items()}

    sweep = dict(sorted(done(sweep).items()))
    seeds, longer, modes, sw_longer, sw_speed = done(seeds), done(longer), done(modes), done(sw_longer), done(sw_speed)
    recipes = done(recipes)
    leakage = {"windowed": sweep.get(k_leak), **done(leakage)}

    # ---- id-only baselines on the k sweep's own train / test targets
    targets = load_targets(data_dir, args.limit_users, args.max_targets, args.seed)
    baselines = {"rate": rate_baseline(targets), "mf": mf_baseline(targets, seed=args.seed)}
    target_counts = {s: int(len(targets[s])) for s in ("train", "valid", "test")}
    target_counts["test_users"] = int(len(np.unique(targets["user"][targets["test"]])))

    # ---- ratios
    from llm_features.finetune import FinetuneConfig

    g = lambda rec, key: rec.get(key) if rec else None  # noqa: E731
    b_sw, t_sw, b_dti = modes["behavior/sliding-window"], modes["token/sliding-window"], modes["behavior/dti"]
    k1, kd = sweep.get(1), sweep.get(k)
    dti_auc_gap = (g(kd, "test_auc") - g(k1, "test_auc")) if g(kd, "test_auc") is not None and g(k1, "test_auc") is not None else None
    dti_speed = ratio(g(kd, "targets_per_s"), g(k1, "targets_per_s"))
    seed_gaps = [g(kd, "test_auc") - g(k1, "test_auc")] if dti_auc_gap is not None else []
    for s in range(1, args.auc_seeds):
        a, b = seeds.get(f"k{k}_seed{args.seed + s}"), seeds.get(f"k1_seed{args.seed + s}")
        if g(a, "test_auc") is not None and g(b, "test_auc") is not None:
            seed_gaps.append(a["test_auc"] - b["test_auc"])
    # time to equal AUC: every DTI run of the default k (1 epoch and more) against every sliding-window run
    # (the same recipe over its epochs, and the small-batch recipe)
    sw_ref = sw_speed.get("reference")
    dti_runs = {args.epochs: kd, **longer}
    sw_runs = [(e, SAME_RECIPE, r) for e, r in sorted({args.epochs: k1, **sw_longer}.items())]
    if sw_ref is not None:
        sw_runs.append((int(sw_ref["options"].get("epochs", args.epochs)), SMALL_BATCH_RECIPE, sw_ref))
    equal_auc = []
    for de, rec in sorted(dti_runs.items()):
        for se, recipe, sw in sw_runs:
            if g(rec, "test_auc") is None or g(sw, "test_auc") is None:
                continue
            equal_auc.append({"dti_epochs": de, "sw_epochs": se, "sw_recipe": recipe, "dti_test_auc": rec["test_auc"],
                              "sw_test_auc": sw["test_auc"], "gap": rec["test_auc"] - sw["test_auc"],
                              "dti_valid_auc": rec["valid_auc"], "sw_valid_auc": sw["valid_auc"],
                              "dti_train_seconds": rec["train_seconds"], "sw_train_seconds": sw["train_seconds"],
                              "time_ratio": ratio(sw["train_seconds"], rec["train_seconds"])})
    # the sliding window at its fastest recipe, so the speed ratio cannot come from a slow baseline
    sw_best = max([r for r in [k1, *sw_speed.values()] if g(r, "targets_per_s")], key=lambda r: r["targets_per_s"],
                  default=None)
    gap_ci = bootstrap_gap(kd["out"], k1["out"], targets["user"]) if "out" in (kd or {}) and "out" in (k1 or {}) else None
    best_baseline = max(baselines.values(), key=lambda b: b.get("test_auc") or 0.0)
    ratios = {
        "bahe_vs_token_time": ratio(g(t_sw, "seconds_per_10k_targets"), g(b_sw, "seconds_per_10k_targets")),
        # training memory: peak RSS increase over the RSS just before the first training step
        "bahe_vs_token_memory": ratio(g(t_sw, "train_rss_increase_mb"), g(b_sw, "train_rss_increase_mb")),
        "bahe_vs_token_peak_rss": ratio(g(t_sw, "peak_rss_mb"), g(b_sw, "peak_rss_mb")),
        "dti_vs_sw_speed": dti_speed,
        "dti_time_reduction": (1 - 1 / dti_speed) if dti_speed else None,
        "dti_auc_gap": dti_auc_gap,
        "dti_auc_gap_ci95": gap_ci["ci95"] if gap_ci else None,
        "dti_auc_gap_seeds": seed_gaps,
        "dti_auc_gap_seed_mean": float(np.mean(seed_gaps)) if seed_gaps else None,
        "bahe_dti_vs_token_sw_speed": ratio(g(b_dti, "targets_per_s"), g(t_sw, "targets_per_s")),
        "token_dti_vs_token_sw_speed": ratio(g(modes["token/dti"], "targets_per_s"), g(t_sw, "targets_per_s")),
        "bahe_dti_minus_id_only_auc": (g(kd, "test_auc") - best_baseline["test_auc"])
        if g(kd, "test_auc") is not None and best_baseline.get("test_auc") is not None else None,
        "default_k": k,
        "dti_vs_sw_best_batch_speed": ratio(g(kd, "targets_per_s"), g(sw_best, "targets_per_s")),
        "sw_best_batch": sw_best and (sw_best["options"].get("batch_size") or FinetuneConfig().batch_size),
        "dti_minus_sw_reference_auc": (g(kd, "test_auc") - g(sw_ref, "test_auc"))
        if g(kd, "test_auc") is not None and g(sw_ref, "test_auc") is not None else None,
        "leakage_k": k_leak,
        # the largest time saving at which DTI reaches the AUC of a sliding-window run (within the floor)
        "dti_equal_auc_best": max((e for e in equal_auc if e["gap"] >= -FLOORS["dti_auc_gap"] and e["time_ratio"]),
                                  key=lambda e: e["time_ratio"], default=None),
        # DTI minus the sliding window (same recipe) at equal epochs beyond the first: does the gap close?
        "dti_auc_gap_same_epochs": {str(e["dti_epochs"]): e["gap"] for e in equal_auc
                                    if e["dti_epochs"] == e["sw_epochs"] and e["sw_recipe"] == SAME_RECIPE},
    }
    meets = {
        "bahe_time": bool(ratios["bahe_vs_token_time"] and ratios["bahe_vs_token_time"] >= FLOORS["bahe_time"]),
        "bahe_memory": bool(ratios["bahe_vs_token_memory"] and ratios["bahe_vs_token_memory"] >= FLOORS["bahe_memory"]),
        "dti_speed": bool(dti_speed and dti_speed >= FLOORS["dti_speed"]),
        "dti_speed_vs_best_batch": bool(ratios["dti_vs_sw_best_batch_speed"]
                                        and ratios["dti_vs_sw_best_batch_speed"] >= FLOORS["dti_speed"]),
        "dti_auc": bool(dti_auc_gap is not None and dti_auc_gap >= -FLOORS["dti_auc_gap"]),
        "bahe_dti_speed": bool(ratios["bahe_dti_vs_token_sw_speed"]
                               and ratios["bahe_dti_vs_token_sw_speed"] >= FLOORS["bahe_dti_speed"]),
    }
    defaults = FinetuneConfig()
    all_runs = list({rec["name"]: rec for group in (sweep, seeds, longer, modes, sw_longer, sw_speed, leakage, recipes)
                     for rec in group.values() if rec}.values())  # the windowed leakage run is the k sweep's
    result = {
        **run_header("finetune", args),
        "finetune_defaults": {"batch_size": defaults.batch_size, "lr": defaults.lr, "head_lr": defaults.head_lr,
                              "warmup_steps": defaults.warmup_steps, "targets_per_sequence": defaults.targets_per_sequence,
                              "micro_batch_tokens": defaults.micro_batch_tokens, "attention": defaults.attention},
        "targets": target_counts,
        "modes": modes,
        "k_sweep": {str(kk): v for kk, v in sweep.items()},
        "seeds": seeds,
        "leakage": leakage,
        "baselines": baselines,
        "dti_auc_gap_bootstrap": gap_ci,
        "dti_longer": {str(kk): v for kk, v in longer.items()},
        "sw_longer": {str(kk): v for kk, v in sw_longer.items()},
        "sw_speed": {str(kk): v for kk, v in sw_speed.items()},
        "dti_recipes": [{"recipe": text, **(rec or {}),
                         "speed_vs_sw": ratio(g(rec, "targets_per_s"), g(k1, "targets_per_s")),
                         "minus_sw": (g(rec, "test_auc") - g(k1, "test_auc"))
                         if g(rec, "test_auc") is not None and g(k1, "test_auc") is not None else None,
                         "minus_sw_reference": (g(rec, "test_auc") - g(sw_ref, "test_auc"))
                         if g(rec, "test_auc") is not None and g(sw_ref, "test_auc") is not None else None}
                        for text, rec in recipes.items()],
        "equal_auc": equal_auc,
        "ratios": ratios,
        "floors": FLOORS,
        "papers": PAPERS,
        "meets_floor": meets,
        "total_seconds": time.perf_counter() - started,
        # every run's own wall time, reused runs included (a resumed benchmark's invocation alone is shorter)
        "runs_wall_seconds": float(sum(rec.get("wall_s") or 0.0 for rec in all_runs)),
        "runs_reused": sum(bool(rec.get("reused")) for rec in all_runs),
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
    d, tg = r["finetune_defaults"], r["targets"]
    k = rt["default_k"]
    yes = lambda b: "met" if b else "**not met**"  # noqa: E731
    jobs = s.get("jobs", 1)
    runs = [*r["modes"].values(), *r["k_sweep"].values(), *r["seeds"].values(), *r["leakage"].values(),
            *r["dti_longer"].values(), *r.get("sw_longer", {}).values(), *r.get("sw_speed", {}).values()]
    reused = any(rec and rec.get("reused") for rec in runs)
    lines = [
        "# Fine-tuning: BAHE / token level x DTI / sliding window (ML-1M)",
        "",
        f"{r['when']}; {r['machine']['platform']}, {r['machine']['cpus']} shared CPUs, {s['num_threads']} torch "
        f"thread(s) per run (load average {r['machine']['load_avg_1m']:.2f} at the end). Default MiniLM-L6 (split 3 "
        f"of 6), context n = {s['context_size']}, one seeded sample of {s['limit_users']} users (seed {s['seed']}) "
        f"for every run; each configuration is its own `llmfeat finetune` subprocess. Command: `{r['command']}`."
        + (" **Quick (tiny) run: numbers are only a smoke test.**" if r["quick"] else ""),
        "",
        "How every run is measured (the same definitions for every mode):",
        "",
        f"- **targets/s**: training targets per second of training-step time (packing, forward, backward, optimizer "
        f"step), the first {TIMING_WARMUP_STEPS} steps of each run left out as warm-up.",
        "- **training memory**: peak RSS while the training steps run, minus the RSS just before the first step "
        "(model, frozen tables and data already loaded; `gc` + `malloc_trim` first). The peak is the kernel's "
        "high-water mark (`VmHWM`), reset at the start of training, so it is exact, not sampled. It holds "
        "activations, gradients, optimizer state and batches. **Peak RSS** is the whole process "
        "(loading and evaluation included), shown for reference: every mode pays its ~0.8 GB fixed part.",
        "",
        "## BAHE vs token level: four modes at equal targets per step",
        "",
        f"Each pair has the same targets per optimizer step (sliding window: {s['mode_batch_size']}; DTI: "
        f"{max(s['mode_batch_size'], k)}, one token-level sequence of k = {k}); behaviour level runs "
        f"{s['behavior_steps']} steps, token level (far slower on CPU) {s['token_steps']}. AUCs of these short runs "
        f"are *not* meaningful.",
        "",
        "| mode | targets/step | timed steps | targets/s | s per 10k targets | training memory MiB | RSS before "
        "training MiB | peak RSS MiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, m in r["modes"].items():
        if "error" in m:
            lines.append(f"| {name} | failed: {m['error']} | | | | | | |")
            continue
        lines.append(f"| {name} | {m['options']['batch_size']} | {m['timed_steps']} | {m['targets_per_s']:.1f} | "
                     f"{m['seconds_per_10k_targets']:.0f} | {_f(m['train_rss_increase_mb'], '{:.0f}')} | "
                     f"{_f(m['rss_before_train_mb'], '{:.0f}')} | {m['peak_rss_mb']:.0f} |")
    bs = s["batch_size"] or d["batch_size"]
    lines += [
        "",
        f"## DTI vs sliding window: k sweep (behaviour level, {s['epochs']} epoch(s))",
        "",
        f"Every train target of the sampled users ({tg['train']} train, {tg['valid']} valid, {tg['test']} test "
        f"targets; {tg['test_users']} users have test targets), {bs} targets per step, lr {d['lr']:g} "
        f"(head {d['head_lr']:g}), {d['warmup_steps']} warm-up steps; k = 1 is the sliding window. Speed from these "
        f"same full-epoch runs.",
        "",
        "| k | sequences | steps | targets/s | s per 10k targets | training memory MiB | test AUC | test LogLoss "
        "| valid AUC |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for kk, m in r["k_sweep"].items():
        if "error" in m:
            lines.append(f"| {kk} | failed: {m['error']} | | | | | | | |")
            continue
        lines.append(f"| {kk} | {m['train_sequences']} | {m['steps']} | {m['targets_per_s']:.1f} | "
                     f"{m['seconds_per_10k_targets']:.0f} | {_f(m['train_rss_increase_mb'], '{:.0f}')} | "
                     f"{m['test_auc']:.4f} | {m['test_logloss']:.4f} | {m['valid_auc']:.4f} |")
    if r["seeds"]:
        lines += ["", "Other seeds (initialisation, data order, dropout):", "",
                  "| run | targets/s | test AUC | valid AUC |", "| --- | ---: | ---: | ---: |"]
        for name, m in r["seeds"].items():
            if "error" not in m:
                lines.append(f"| {name} | {m['targets_per_s']:.1f} | {m['test_auc']:.4f} | {m['valid_auc']:.4f} |")
    ref = (r.get("sw_speed") or {}).get("reference")
    if ref and "error" not in ref:
        o = ref["options"]
        lines += ["", f"The sliding window at a small-batch recipe ({o.get('batch_size')} targets per step, lr "
                  f"{o.get('lr')}, head {o.get('head_lr')}, {o.get('warmup_steps')} warm-up steps; {ref['steps']} "
                  "steps in the epoch), for reference:", "",
                  "| run | steps | targets/s | test AUC | test LogLoss | valid AUC |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |",
                  f"| sliding window, small batch | {ref['steps']} | {ref['targets_per_s']:.1f} | {ref['test_auc']:.4f} | "
                  f"{ref['test_logloss']:.4f} | {ref['valid_auc']:.4f} |"]
    recipes = [x for x in r.get("dti_recipes", []) if "test_auc" in x]
    if recipes:
        lines += ["", f"## DTI (k = {k}) at other recipes, one epoch", "",
                  "Fewer targets per step give DTI more steps per epoch (each with fewer users). Speed and AUC "
                  "against the one-epoch sliding window at the default recipe, and at its small-batch recipe.", "",
                  "| recipe | steps | targets/s | vs sliding window | test AUC | minus sliding window | "
                  "minus sliding window (small batch) | valid AUC |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for x in recipes:
            lines.append(f"| {x['recipe']} | {x['steps']} | {x['targets_per_s']:.1f} | {_f(x['speed_vs_sw'], '{:.1f}x')} "
                         f"| {x['test_auc']:.4f} | {_f(x['minus_sw'], '{:+.4f}')} | "
                         f"{_f(x['minus_sw_reference'], '{:+.4f}')} | {x['valid_auc']:.4f} |")
    if r.get("equal_auc"):
        lines += ["", f"## Time to equal AUC: DTI (k = {k}) and the sliding window over epochs", "",
                  "The same users, targets, batch and learning rate (the schedule decays over each run's own "
                  "epochs); training seconds are the training steps alone. Valid AUC is what one would select on.",
                  "The small-batch sliding window is the reference run above (its own batch, learning rate and "
                  "warm-up).",
                  "", "| DTI epochs | sliding window | sliding-window epochs | DTI test AUC | sliding-window test AUC | "
                  "DTI minus sliding window | DTI valid AUC | sliding-window valid AUC | sliding-window s | DTI s | "
                  "time ratio |",
                  "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for e in r["equal_auc"]:
            lines.append(f"| {e['dti_epochs']} | {e.get('sw_recipe', SAME_RECIPE)} | {e['sw_epochs']} | "
                         f"{e['dti_test_auc']:.4f} | {e['sw_test_auc']:.4f} | "
                         f"{e['gap']:+.4f} | {e['dti_valid_auc']:.4f} | {e['sw_valid_auc']:.4f} | "
                         f"{e['sw_train_seconds']:.0f} | {e['dti_train_seconds']:.0f} | {_f(e['time_ratio'], '{:.1f}x')} |")
    lines += ["", f"## Leakage variants at k = {rt.get('leakage_k', k)}", "",
              "| leakage | targets/s | test AUC | test LogLoss |", "| --- | ---: | ---: | ---: |"]
    for name, m in r["leakage"].items():
        if m is None or "error" in m:
            lines.append(f"| {name} | failed | | |")
            continue
        lines.append(f"| {name} | {m['targets_per_s']:.1f} | {m['test_auc']:.4f} | {m['test_logloss']:.4f} |")
    lines += ["", "## Id-only baselines (same users, same train and test targets as the k sweep)", "",
              "| model | test AUC | valid AUC | chosen on valid |", "| --- | ---: | ---: | --- |"]
    for b in r["baselines"].values():
        chosen = ", ".join(f"{kk} {v}" for kk, v in b.get("chosen", {}).items())
        lines.append(f"| {b['name']} | {_f(b.get('test_auc'), '{:.4f}')} | {_f(b.get('valid_auc'), '{:.4f}')} "
                     f"| {chosen} |")
    kd = r["k_sweep"].get(str(k), {})
    if "test_auc" in kd:
        lines.append(f"| BAHE + DTI (k = {k}), for comparison | {kd['test_auc']:.4f} | {kd['valid_auc']:.4f} | - |")
    gap, ci = rt["dti_auc_gap"], rt.get("dti_auc_gap_ci95")
    ci_txt = f" (95% CI over test users {ci[0]:+.4f} .. {ci[1]:+.4f})" if ci else ""
    seeds_txt = ""
    if len(rt.get("dti_auc_gap_seeds") or []) > 1:
        seeds_txt = (f"; over {len(rt['dti_auc_gap_seeds'])} seeds: "
                     + ", ".join(f"{x:+.4f}" for x in rt["dti_auc_gap_seeds"])
                     + f" (mean {rt['dti_auc_gap_seed_mean']:+.4f})")
    lines += [
        "",
        "## Ratios against the floors and the papers",
        "",
        "| comparison | measured | floor | paper | floor met |",
        "| --- | ---: | ---: | ---: | --- |",
        f"| BAHE vs token level, both sliding window, {s['mode_batch_size']} targets/step: training time per target | "
        f"{_f(rt['bahe_vs_token_time'], '{:.1f}x')} | {fl['bahe_time']:.0f}x | 5x (BAHE) | {yes(mt['bahe_time'])} |",
        f"| same: training memory (peak RSS increase during training) | {_f(rt['bahe_vs_token_memory'], '{:.1f}x')} "
        f"| {fl['bahe_memory']:.0f}x | 5x (BAHE) | {yes(mt['bahe_memory'])} |",
        f"| same: whole-process peak RSS (for reference) | {_f(rt['bahe_vs_token_peak_rss'], '{:.2f}x')} | - | - | - |",
        f"| DTI (k = {k}) vs sliding window, behaviour level, one epoch each: targets/s | "
        f"{_f(rt['dti_vs_sw_speed'], '{:.1f}x')} ({_f(rt['dti_time_reduction'] and 100 * rt['dti_time_reduction'], '{:.0f}%')} "
        f"less time) | {fl['dti_speed']:.0f}x | 92% less time (13.3x) | {yes(mt['dti_speed'])} |",
        f"| DTI (k = {k}) minus sliding window: test AUC, same epochs{ci_txt}{seeds_txt} | {_f(gap, '{:+.4f}')} | "
        f"within {fl['dti_auc_gap']} | equal AUC | {yes(mt['dti_auc'])} |",
        f"| same, against the sliding window at its fastest batch ({rt.get('sw_best_batch')} targets/step) | "
        f"{_f(rt.get('dti_vs_sw_best_batch_speed'), '{:.1f}x')} | {fl['dti_speed']:.0f}x | - | "
        f"{yes(mt.get('dti_speed_vs_best_batch'))} |",
        f"| DTI (k = {k}) minus the sliding window at its small-batch recipe: test AUC, one epoch each | "
        f"{_f(rt.get('dti_minus_sw_reference_auc'), '{:+.4f}')} | within {fl['dti_auc_gap']} | equal AUC | - |",
    ]
    same = [e for e in r.get("equal_auc", []) if e["dti_epochs"] == e["sw_epochs"] > s["epochs"]
            and e.get("sw_recipe", SAME_RECIPE) == SAME_RECIPE]
    for e in same:
        lines.append(f"| DTI (k = {k}) minus sliding window, both {e['dti_epochs']} epochs: test AUC; sliding-window "
                     f"time / DTI time | {e['gap']:+.4f}; {_f(e['time_ratio'], '{:.1f}x')} | within "
                     f"{fl['dti_auc_gap']} | equal AUC | {yes(e['gap'] >= -fl['dti_auc_gap'])} (AUC) |")
    best = rt.get("dti_equal_auc_best")
    if best:
        lines.append(f"| DTI (k = {k}) reaching a sliding-window run's test AUC: the largest time saving (DTI "
                     f"{best['dti_epochs']} epochs against {best['sw_recipe']} sliding window {best['sw_epochs']}; "
                     f"AUC {best['gap']:+.4f}) | {_f(best['time_ratio'], '{:.1f}x')} | {fl['dti_speed']:.0f}x at "
                     f"AUC within {fl['dti_auc_gap']} | equal AUC at 92% less time (13.3x) | "
                     f"{yes(best['time_ratio'] >= fl['dti_speed'])} |")
    eq = [e for e in r.get("equal_auc", []) if e["dti_epochs"] > s["epochs"] and e["sw_epochs"] == s["epochs"]]
    for e in eq:
        recipe = "" if e.get("sw_recipe", SAME_RECIPE) == SAME_RECIPE else f" ({e['sw_recipe']})"
        lines.append(f"| DTI (k = {k}) for {e['dti_epochs']} epochs minus sliding window{recipe} for {e['sw_epochs']}: test "
                     f"AUC; sliding-window time / DTI time | {e['gap']:+.4f}; {_f(e['time_ratio'], '{:.1f}x')} | "
                     f"within {fl['dti_auc_gap']} | equal AUC at 92% less time (13.3x) | - |")
    lines += [
        f"| BAHE + DTI (k = {k}) minus the best id-only baseline: test AUC | "
        f"{_f(rt.get('bahe_dti_minus_id_only_auc'), '{:+.4f}')} | - | - | - |",
        f"| BAHE + DTI vs token-level sliding window: targets/s | {_f(rt['bahe_dti_vs_token_sw_speed'], '{:.0f}x')} "
        f"| {fl['bahe_dti_speed']:.0f}x | - | {yes(mt['bahe_dti_speed'])} |",
        f"| token-level DTI vs token-level sliding window: targets/s (for reference) | "
        f"{_f(rt['token_dti_vs_token_sw_speed'], '{:.1f}x')} | - | 92% less time | - |",
        "",
        "Caveats: shared CPU cores, so absolute timings are noisy; ratios come from runs of the same script "
        + ("one after the other. " if jobs == 1 else
           f"{jobs} at a time, each pinned to a core of its own (they share memory bandwidth and caches). ")
        + ("Some runs were reused from an earlier invocation with identical options (`--reuse`). " if reused else "")
        + "Token-level numbers come from a handful of steps. The AUC gap "
        "is one seed unless seeds are listed; the interval resamples test users, not training runs, so it "
        "does not include the seed-to-seed variation.",
        "",
        f"Total benchmark time: {r['total_seconds']:.0f} s"
        + (f" ({r['runs_reused']} runs reused; {r['runs_wall_seconds']:.0f} s of run wall time in all, "
           f"{r['settings'].get('jobs', 1)} at a time)." if r.get("runs_reused") else "."),
        "",
    ]
    return "\n".join(lines)


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a3, a4) = plt.subplots(1, 3, figsize=(16, 4.5))
    ks = [int(k) for k, m in r["k_sweep"].items() if "error" not in m]
    ms = [r["k_sweep"][str(k)] for k in ks]
    a1.plot(ks, [m["test_auc"] for m in ms], "o-", color="C0", label="test AUC")
    best = max(r["baselines"].values(), key=lambda b: b.get("test_auc") or 0.0)
    if best.get("test_auc") is not None:
        a1.axhline(best["test_auc"], color="C0", ls=":", label=f"id-only: {best['name']}")
    a1.set_xscale("log", base=2)
    a1.set_xlabel("k (targets per sequence), behaviour-level DTI")
    a1.set_ylabel("test AUC", color="C0")
    a2 = a1.twinx()
    a2.plot(ks, [m["targets_per_s"] for m in ms], "s--", color="C1", label="targets/s")
    # one legend over both axes, drawn on the top one so neither curve hides it
    h1, l1 = a1.get_legend_handles_labels()
    h2, l2 = a2.get_legend_handles_labels()
    a2.legend(h1 + h2, l1 + l2, loc="center left", bbox_to_anchor=(0.02, 0.72), fontsize=8)
    a2.set_ylabel("train targets/s", color="C1")
    a1.set_title("k sweep (k = 1: sliding window)")
    names = [n for n, m in r["modes"].items() if "error" not in m]
    vals = [r["modes"][n]["targets_per_s"] for n in names]
    colors = ["C2", "C3", "C4", "C5"][: len(names)]
    a3.bar(range(len(names)), vals, color=colors)
    a3.set_yscale("log")
    a3.set_xticks(range(len(names)), names, rotation=15)
    a3.set_ylabel("train targets/s (log)")
    a3.set_title("four modes: speed")
    mem = [r["modes"][n]["train_rss_increase_mb"] or 0.0 for n in names]
    a4.bar(range(len(names)), mem, color=colors)
    a4.set_xticks(range(len(names)), names, rotation=15)
    a4.set_ylabel("training memory, MiB (peak RSS increase)")
    for i, n in enumerate(names):
        a4.annotate(f"{mem[i]:.0f} MiB\n@{r['modes'][n]['options']['batch_size']}/step", (i, mem[i]), ha="center",
                    va="bottom", fontsize=8)
    a4.set_title("four modes: training memory")
    a4.set_ylim(0, 1.15 * max(mem, default=1.0))  # room for the labels under the title
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
