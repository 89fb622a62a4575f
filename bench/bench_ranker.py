"""Ranker benchmark: id-only twin vs +LLM features over several seeds, throughput, serving latency.

Needs a prepared workspace (ingest, encode, optionally embed-users, feast apply + materialize)::

    LLMFEAT_DATA_DIR=/path/to/data python bench/bench_ranker.py --seeds 0 1 2

Writes ``bench/results/ranker.json`` and ``ranker.md``. Numbers, not assertions: a benchmark
never fails on a timing.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from llm_features.parquet_io import list_parts
from ranker.config import EvaluateConfig, TrainConfig
from ranker.serve import Ranker
from ranker.train import evaluate, train, workspace_for

log = logging.getLogger("bench_ranker")


def _llm_inputs(ws) -> tuple[str, ...]:
    """Both embeddings when the workspace has user embeddings, else the item embedding alone."""
    real_user_parts = [p for p in list_parts(ws.user_embeddings) if "placeholder" not in p.name]
    return ("user_embedding", "item_embedding") if real_user_parts else ("item_embedding",)


def _latency(ckpt: Path, repo: Path, data_dir: Path, requests: int, candidates: int, seed: int) -> dict:
    import pandas as pd

    ws = workspace_for(repo, data_dir)
    inter = pd.read_parquet(ws.interactions, columns=["user_id", "item_id"])
    users, items = inter.user_id.unique(), inter.item_id.unique()
    rng = np.random.default_rng(seed)
    ranker = Ranker.load(ckpt, repo=repo, data_dir=data_dir)
    ranker.feature_refs()
    for _ in range(5):  # warm-up: registry cache, first SQLite reads
        ranker.score(int(users[0]), items[:candidates].tolist())
    times = []
    for _ in range(requests):
        u = int(rng.choice(users))
        cand = rng.choice(items, candidates, replace=False).tolist()
        t0 = time.perf_counter()
        ranker.score(u, cand)
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    return {
        "requests": requests, "candidates": candidates,
        "p50_ms": round(times[len(times) // 2], 2), "p99_ms": round(times[int(len(times) * 0.99) - 1], 2),
        "mean_ms": round(statistics.fmean(times), 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", type=Path, default=Path("feast_repo"))
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--runs", type=Path, default=Path("runs/bench_ranker"))
    ap.add_argument("--results", type=Path, default=Path("bench/results"))
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--candidates", type=int, default=100)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("ranker.features").setLevel(logging.ERROR)  # counts go to the results instead

    ws = workspace_for(args.repo, args.data_dir)
    llm_inputs = _llm_inputs(ws)
    runs: dict[str, list[dict]] = {"id_only": [], "llm": []}
    for seed in args.seeds:
        for twin in ("id_only", "llm"):
            cfg = TrainConfig(
                llm_features=twin == "llm", llm_inputs=llm_inputs, repo=args.repo, data_dir=ws.root,
                out=args.runs / f"{twin}_seed{seed}", epochs=args.epochs, batch_size=args.batch_size,
                seed=seed, threads=args.threads, validate=False,
            )
            m = train(cfg)
            e = evaluate(EvaluateConfig(checkpoint=cfg.out, repo=args.repo, data_dir=ws.root, split="test"))
            runs[twin].append({
                "seed": seed, "test_auc": e["auc"], "test_logloss": e["logloss"], "test_rows": e["rows"],
                "train_samples_per_second": m["samples_per_second"], "train_seconds": m["train_seconds"],
                "fetch_seconds": m["fetch_seconds"], "test_missing": e["missing"],
            })
            log.info("%s seed %d: AUC %.4f LogLoss %.4f", twin, seed, e["auc"], e["logloss"])

    def summary(rs: list[dict], key: str) -> dict:
        vals = [r[key] for r in rs]
        return {"mean": round(statistics.fmean(vals), 4), "std": round(statistics.pstdev(vals), 4)}

    latency = _latency(args.runs / f"llm_seed{args.seeds[0]}", args.repo, ws.root, args.requests,
                       args.candidates, args.seeds[0])
    result = {
        "dataset": str(ws.root), "llm_inputs": list(llm_inputs), "epochs": args.epochs,
        "batch_size": args.batch_size, "seeds": args.seeds, "torch_threads": torch.get_num_threads(),
        "machine": platform.platform(),
        "summary": {twin: {k: summary(rs, k) for k in ("test_auc", "test_logloss", "train_samples_per_second")}
                    for twin, rs in runs.items()},
        "runs": runs, "serving_latency_llm": latency,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "ranker.json").write_text(json.dumps(result, indent=2) + "\n")
    s = result["summary"]
    lines = [
        "# Ranker: id-only twin vs +LLM features",
        "",
        f"Data: `{ws.root}`; test split; {len(args.seeds)} seeds ({', '.join(map(str, args.seeds))}); "
        f"{args.epochs} epochs, batch {args.batch_size}; LLM inputs: {', '.join(llm_inputs)}.",
        "",
        "| model | test AUC | test LogLoss | train samples/s |",
        "| --- | --- | --- | --- |",
    ]
    for twin in ("id_only", "llm"):
        lines.append(f"| {twin} | {s[twin]['test_auc']['mean']:.4f} ± {s[twin]['test_auc']['std']:.4f} | "
                     f"{s[twin]['test_logloss']['mean']:.4f} ± {s[twin]['test_logloss']['std']:.4f} | "
                     f"{s[twin]['train_samples_per_second']['mean']:.0f} |")
    lines += ["", f"Serving (LLM twin, 1 user + {latency['candidates']} candidates, SQLite online reads included, "
              f"{latency['requests']} requests): p50 {latency['p50_ms']} ms, p99 {latency['p99_ms']} ms.", ""]
    (args.results / "ranker.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
