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
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from finetune_baselines import bootstrap_gap, load_targets, mf_baseline, rate_baseline  # noqa: E402
from finetune_report import SAME_RECIPE, SMALL_BATCH_RECIPE, markdown, plot  # noqa: E402
from finetune_runs import (  # noqa: E402
    DEFAULT_K, Runner, ensure_workspace, ratio, run_header, workspace_parser)

FLOORS = {"bahe_time": 5.0, "bahe_memory": 5.0, "dti_speed": 10.0, "dti_auc_gap": 0.002, "bahe_dti_speed": 50.0}
PAPERS = {"bahe_time": 5.0, "bahe_memory": 5.0, "dti_time_reduction": 0.92, "dti_speed": 70.5 / 5.31}

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



def _parse_args() -> argparse.Namespace:
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
    return args


def _submit_runs(args: argparse.Namespace, data_dir: Path) -> dict[str, dict]:
    """Every ``llmfeat finetune`` run of the benchmark, longest first; their records by group, once finished."""
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
    return {"sweep": sweep, "seeds": seeds, "longer": longer, "modes": modes, "sw_longer": sw_longer,
            "sw_speed": sw_speed, "recipes": recipes, "leakage": leakage}


def _get(rec: dict | None, key: str):
    return rec.get(key) if rec else None


def _compare(args: argparse.Namespace, groups: dict[str, dict], targets: dict, baselines: dict) -> dict:
    """The ratios against the floors and papers, whether each floor is met, and the time-to-equal-AUC pairs."""
    sweep, seeds, longer, modes = groups["sweep"], groups["seeds"], groups["longer"], groups["modes"]
    sw_longer, sw_speed = groups["sw_longer"], groups["sw_speed"]
    k, k_leak = args.default_k, max(args.ks)
    from llm_features.finetune import FinetuneConfig

    g = _get
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
    return {"ratios": ratios, "meets": meets, "equal_auc": equal_auc, "gap_ci": gap_ci}


def main() -> None:
    args = _parse_args()
    args.runs.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    data_dir = ensure_workspace(args)
    groups = _submit_runs(args, data_dir)
    sweep, seeds, longer, modes = groups["sweep"], groups["seeds"], groups["longer"], groups["modes"]
    sw_longer, sw_speed, recipes, leakage = groups["sw_longer"], groups["sw_speed"], groups["recipes"], groups["leakage"]
    # ---- id-only baselines on the k sweep's own train / test targets
    targets = load_targets(data_dir, args.limit_users, args.max_targets, args.seed)
    baselines = {"rate": rate_baseline(targets), "mf": mf_baseline(targets, seed=args.seed)}
    target_counts = {s: int(len(targets[s])) for s in ("train", "valid", "test")}
    target_counts["test_users"] = int(len(np.unique(targets["user"][targets["test"]])))

    cmp = _compare(args, groups, targets, baselines)
    g, k1, sw_ref = _get, sweep.get(1), sw_speed.get("reference")
    ratios, meets, equal_auc, gap_ci = cmp["ratios"], cmp["meets"], cmp["equal_auc"], cmp["gap_ci"]
    from llm_features.finetune import FinetuneConfig

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


if __name__ == "__main__":
    main()
