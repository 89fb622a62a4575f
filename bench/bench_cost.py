"""The cost curve: BAHE (behaviour level) against token level as n and behaviour length grow.

For each context size n, and for each behaviour-text length (tokens per behaviour, token level
only), one ``llmfeat finetune`` subprocess per granularity, both with sliding-window packing and
the same targets per optimizer step, on one workspace and one seeded user sample. Measured, as in
``bench_finetune.py``: steady-state training targets/s (first steps left out) and training memory
(peak RSS increase during the training steps).

Behaviour level does not read the texts while it trains: every distinct behaviour was encoded once
by ``llmfeat encode`` (at the workspace's ``--max-tokens``), so its training cost depends on n and
not on text length. Token level runs every layer over n texts per target, so it grows with both.
The length sweep therefore varies token level's ``--max-tokens`` and compares it with the one
behaviour-level run at the same n.

Writes ``cost.json``, ``cost.md`` and ``cost.png`` to ``--out`` (``cost_quick.*`` with ``--quick``).
Numbers, not assertions.

    HF_HUB_OFFLINE=1 python bench/bench_cost.py --data-dir /path/to/encoded/workspace
    python bench/bench_cost.py --quick
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from finetune_runs import (  # noqa: E402
    TIMING_WARMUP_STEPS, ensure_workspace, llmfeat, ratio, run_finetune, run_header, workspace_parser)


def text_token_lengths(data_dir: Path, limit_users: int, seed: int, workspace_max_tokens: int) -> dict:
    """Token counts (untruncated, special tokens included) of the sampled users' distinct behaviour texts."""
    from transformers import AutoTokenizer

    from llm_features.model_dir import default_model_dir
    from llm_features.finetune.data import load_finetune_data

    data = load_finetune_data(data_dir, None, need_behavior_vectors=False, limit_users=limit_users, seed=seed)
    tok = AutoTokenizer.from_pretrained(default_model_dir())
    lens = np.asarray([len(ids) for ids in tok(list(data.behavior_texts))["input_ids"]])
    return {"texts": int(len(lens)), "mean": float(lens.mean()), "p50": float(np.median(lens)),
            "p90": float(np.quantile(lens, 0.9)), "max": int(lens.max()),
            "truncated_at_workspace_max_tokens": float((lens > workspace_max_tokens).mean())}


def length_workspace(base: Path, runs: Path, max_tokens: int) -> Path:
    """A copy of ``base``'s canonical tables, encoded at ``max_tokens`` (reused when already encoded)."""
    ws = runs / f"workspace_tokens{max_tokens}"
    if not (ws / "manifest.json").exists():
        shutil.rmtree(ws, ignore_errors=True)
        ws.mkdir(parents=True)
        shutil.copytree(base / "canonical", ws / "canonical")
        subprocess.run(llmfeat() + ["encode", "--data-dir", str(ws), "--max-tokens", str(max_tokens)], check=True,
                       capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    return ws


def main() -> None:
    ap = workspace_parser(__doc__, "cost")
    ap.add_argument("--max-targets", type=int, default=24, help="targets per split (the same for every run)")
    ap.add_argument("--ns", type=int, nargs="+", default=[5, 10, 20, 30, 50], help="context sizes n")
    ap.add_argument("--lengths", type=int, nargs="+", default=[4, 8, 16],
                    help="--max-tokens of the behaviour-length sweep (each encodes a copy of the workspace); "
                         "the workspace's own length is added")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[2, 4, 8, 16],
                    help="targets per step of the batch sweep (token level at n = 30 needs ~0.35 GB per target)")
    ap.add_argument("--sweep-n", type=int, default=30, help="n of the length and batch sweeps")
    ap.add_argument("--batch-size", type=int, default=8, help="targets per step of the n and length sweeps")
    ap.add_argument("--behavior-steps", type=int, default=12)
    ap.add_argument("--token-steps", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="tiny version to check the script works")
    args = ap.parse_args()
    if args.quick:
        args.limit_users, args.max_targets, args.ns, args.lengths, args.sweep_n = 30, 6, [4, 8], [8], 8
        args.batch_size, args.batch_sizes, args.behavior_steps, args.token_steps = 2, [2, 4], 4, 3
        args.runs = args.runs.with_name(args.runs.name + "_quick")
    args.runs.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    data_dir = ensure_workspace(args)
    ws_max_tokens = int(json.loads((data_dir / "manifest.json").read_text())["fingerprint"]["max_tokens"])
    # one forward/backward pass per step (no micro-batches): the curve measures what a batch of that size costs
    common = {"limit_users": args.limit_users, "seed": args.seed, "num_threads": args.num_threads,
              "log_every": 0, "device": "cpu", "packing": "sliding-window", "max_targets": args.max_targets,
              "epochs": 1000, "micro_batch_tokens": 0}

    def pair(name: str, n: int, batch: int, ws: Path = data_dir, max_tokens: int | None = None) -> dict:
        """BAHE and token level at one setting; the ratios token / BAHE of time and training memory."""
        out = {}
        for gran in ("behavior", "token"):
            extra = {"granularity": gran, "context_size": n, "batch_size": batch, "eval_batch_size": batch,
                     "max_steps": args.behavior_steps if gran == "behavior" else args.token_steps}
            if max_tokens is not None:
                extra["max_tokens"] = max_tokens
            out[gran] = run_finetune(f"{name}_{gran}", args.runs, ws, common, extra)
        b, t = out["behavior"], out["token"]
        out["ratios"] = {"time": ratio(t.get("seconds_per_10k_targets"), b.get("seconds_per_10k_targets")),
                         "memory": ratio(t.get("train_rss_increase_mb"), b.get("train_rss_increase_mb"))}
        return out

    by_n = {n: pair(f"n{n}", n, args.batch_size) for n in args.ns}
    by_len = {}
    for length in sorted(set(args.lengths) | {ws_max_tokens}):
        if length == ws_max_tokens and args.sweep_n in by_n:
            by_len[length] = by_n[args.sweep_n]
        elif length == ws_max_tokens:
            by_len[length] = pair(f"n{args.sweep_n}", args.sweep_n, args.batch_size)
        else:
            ws = length_workspace(data_dir, args.runs, length)
            by_len[length] = pair(f"len{length}", args.sweep_n, args.batch_size, ws, length)
    by_batch = {}
    for batch in args.batch_sizes:
        by_batch[batch] = by_n[args.sweep_n] if batch == args.batch_size and args.sweep_n in by_n else \
            pair(f"batch{batch}", args.sweep_n, batch)

    from llm_features.finetune import FinetuneConfig

    result = {
        **run_header("cost", args),
        "finetune_default_batch_size": FinetuneConfig().batch_size,
        "workspace_max_tokens": ws_max_tokens,
        "text_tokens": text_token_lengths(data_dir, args.limit_users, args.seed, ws_max_tokens),
        "by_n": {str(k): v for k, v in by_n.items()},
        "by_length": {str(k): v for k, v in by_len.items()},
        "by_batch": {str(k): v for k, v in by_batch.items()},
        "total_seconds": time.perf_counter() - t_start,
    }
    stem = "cost_quick" if args.quick else "cost"  # a smoke test never overwrites real results
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(result))
    try:
        plot(result, args.out / f"{stem}.png")
    except Exception as exc:  # noqa: BLE001 - the plot is optional, the numbers are not
        print(f"[bench_cost] plot skipped: {exc}", file=sys.stderr)
    print((args.out / f"{stem}.md").read_text())


def _f(x, fmt="{:.1f}", none="-"):
    return none if x is None else fmt.format(x)


def _row(label: str, pair: dict) -> str:
    b, t, r = pair["behavior"], pair["token"], pair["ratios"]
    if "error" in b or "error" in t:
        return f"| {label} | failed: {b.get('error') or t.get('error')} | | | | | |"
    return (f"| {label} | {b['targets_per_s']:.1f} | {t['targets_per_s']:.2f} | {_f(r['time'], '{:.1f}x')} | "
            f"{_f(b['train_rss_increase_mb'], '{:.0f}')} | {_f(t['train_rss_increase_mb'], '{:.0f}')} | "
            f"{_f(r['memory'], '{:.1f}x')} |")


HEAD = ["| {} | BAHE targets/s | token targets/s | time ratio | BAHE training MiB | token training MiB | "
        "memory ratio |", "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]


def _section(title: str, intro: str, label: str, sweep: dict) -> list[str]:
    return ["", f"## {title}", "", intro, "", HEAD[0].format(label), HEAD[1]] + [_row(x, p) for x, p in sweep.items()]


def markdown(r: dict) -> str:
    s, tt = r["settings"], r["text_tokens"]
    head = HEAD
    lines = [
        "# Cost curve: BAHE vs token level as n, behaviour length and batch grow (ML-1M)",
        "",
        f"{r['when']}; {r['machine']['platform']}, {r['machine']['cpus']} shared CPUs, {s['num_threads']} torch "
        f"thread(s) per run. Default MiniLM-L6 (split 3 of 6), sliding-window packing for both granularities, "
        f"{s['behavior_steps']} optimizer steps (BAHE) and {s['token_steps']} (token level), the first "
        f"{TIMING_WARMUP_STEPS} of each left out of the speed; one seeded sample of {s['limit_users']} users, at most "
        f"{s['max_targets']} targets per split. **Time ratio** = token-level / BAHE training seconds per target. "
        f"**Training memory** = peak RSS during the training steps minus the RSS just before them (activations, "
        f"gradients, optimizer state; see `finetune.md`), **memory ratio** = token / BAHE. "
        f"Command: `{r['command']}`." + (" **Quick (tiny) run: numbers are only a smoke test.**" if r["quick"] else ""),
        "",
        f"## As the context size n grows ({s['batch_size']} targets per step)",
        "",
        head[0].format("n"), head[1],
    ]
    lines += [_row(n, p) for n, p in r["by_n"].items()]
    lines += _section(
        f"As behaviour length grows (n = {s['sweep_n']}, {s['batch_size']} targets per step)",
        f"Each length is a copy of the workspace encoded with `--max-tokens` at that length; both granularities "
        f"run with it. The sampled users' {tt['texts']} distinct behaviour texts have {tt['mean']:.1f} tokens on "
        f"average (p50 {tt['p50']:.0f}, p90 {tt['p90']:.0f}, max {tt['max']}), so MovieLens texts stop growing "
        f"beyond ~{tt['max']} tokens. BAHE does not read the texts while it trains (they were encoded once), so "
        f"its cost should not move with length; token level's grows with it.",
        "tokens per behaviour (max)", r["by_length"])
    lines += _section(
        f"As the batch grows (n = {s['sweep_n']}; llmfeat finetune's default is {r['finetune_default_batch_size']} "
        f"targets per step)",
        "Training memory is a fixed part (gradients and AdamW state of the deep layers, the same for both "
        "granularities) plus activations that grow with the batch; token level's activations per target are "
        "n texts x their tokens, BAHE's are n + 1 positions. The memory ratio therefore grows with the batch.",
        "targets per step", r["by_batch"])
    slopes, d = memory_slopes(r["by_batch"]), r["finetune_default_batch_size"]
    if slopes:
        lines += ["", f"Least-squares fit of training memory against targets per step: BAHE "
                  f"{slopes['behavior'][0]:.0f} MiB + {slopes['behavior'][1]:.2f} MiB/target, token level "
                  f"{slopes['token'][0]:.0f} MiB + {slopes['token'][1]:.2f} MiB/target: per target, token level "
                  f"needs {_f(ratio(slopes['token'][1], slopes['behavior'][1]), '{:.0f}x')} the activation memory. "
                  f"Extrapolated to the default {d} targets per step: BAHE "
                  f"{slopes['behavior'][0] + d * slopes['behavior'][1]:.0f} MiB, token level "
                  f"{slopes['token'][0] + d * slopes['token'][1]:.0f} MiB."]
    lines += ["", f"Total benchmark time: {r['total_seconds']:.0f} s.", ""]
    return "\n".join(lines)


def memory_slopes(by_batch: dict) -> dict | None:
    """(intercept MiB, MiB per target) of training memory against batch size, per granularity."""
    out = {}
    for gran in ("behavior", "token"):
        pts = [(int(b), p[gran]["train_rss_increase_mb"]) for b, p in by_batch.items()
               if "error" not in p[gran] and p[gran].get("train_rss_increase_mb") is not None]
        if len(pts) < 2:
            return None
        x, y = np.array(pts, dtype=float).T
        slope, intercept = np.polyfit(x, y, 1)
        out[gran] = (float(intercept), float(slope))
    return out


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    panels = (("by_n", "context size n"), ("by_length", "tokens per behaviour (max)"),
              ("by_batch", "targets per step"))
    for ax, (key, xlabel) in zip(axes, panels):
        xs = [int(x) for x, p in r[key].items() if "error" not in p["behavior"] and "error" not in p["token"]]
        pairs = [r[key][str(x)] for x in xs]
        if key == "by_batch":
            for gran, style in (("behavior", "o-"), ("token", "s--")):
                ax.plot(xs, [p[gran]["train_rss_increase_mb"] for p in pairs], style, label=f"{gran}")
            ax.set_ylabel("training memory, MiB (peak RSS increase)")
        else:
            for gran, style in (("behavior", "o-"), ("token", "s--")):
                ax.plot(xs, [p[gran]["seconds_per_10k_targets"] for p in pairs], style, label=f"{gran}")
            ax.set_yscale("log")
            ax.set_ylabel("training seconds per 10k targets (log)")
        ax.set_xlabel(xlabel)
        ax2 = ax.twinx()
        ax2.plot(xs, [p["ratios"]["time"] or 0.0 for p in pairs], "v:", color="C2", label="time ratio")
        ax2.plot(xs, [p["ratios"]["memory"] or 0.0 for p in pairs], "^:", color="C3", label="memory ratio")
        ax2.set_ylabel("token level / BAHE")
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="upper left")
        ax.set_title(f"BAHE vs token level, by {xlabel}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
