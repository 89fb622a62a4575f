"""The finetune benchmark's readable outputs: the markdown table and the plot of ``finetune.json``."""

from __future__ import annotations

from pathlib import Path

from finetune_runs import TIMING_WARMUP_STEPS

SAME_RECIPE, SMALL_BATCH_RECIPE = "same recipe", "small batch"
"""``sw_recipe`` of a time-to-equal-AUC comparison: the sliding window with DTI's batch and learning rate, or at
its own small-batch recipe (``--sw-reference``)."""


def _f(x, fmt="{:.1f}", none="-"):
    return none if x is None else fmt.format(x)


def _run_rows(runs: dict, columns: int, cells) -> list[str]:
    """One table row per run: its key, then ``cells(run)``; a failed run's row says so."""
    rows = []
    for key, m in runs.items():
        if "error" in m:
            rows.append(f"| {key} | failed: {m['error']} |" + " |" * (columns - 2))
        else:
            rows.append("| " + " | ".join(str(c) for c in [key, *cells(m)]) + " |")
    return rows


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
    lines += _run_rows(r["modes"], 8, lambda m: [
        m["options"]["batch_size"], m["timed_steps"], f"{m['targets_per_s']:.1f}", f"{m['seconds_per_10k_targets']:.0f}",
        _f(m["train_rss_increase_mb"], "{:.0f}"), _f(m["rss_before_train_mb"], "{:.0f}"), f"{m['peak_rss_mb']:.0f}"])
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
    lines += _run_rows(r["k_sweep"], 9, lambda m: [
        m["train_sequences"], m["steps"], f"{m['targets_per_s']:.1f}", f"{m['seconds_per_10k_targets']:.0f}",
        _f(m["train_rss_increase_mb"], "{:.0f}"), f"{m['test_auc']:.4f}", f"{m['test_logloss']:.4f}",
        f"{m['valid_auc']:.4f}"])
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

