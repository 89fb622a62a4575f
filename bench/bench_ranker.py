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
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from llm_features.parquet_io import list_parts
from ranker.config import EvaluateConfig, ModelConfig, TrainConfig
from ranker.serve import Ranker
from ranker.features import feature_columns
from ranker.train import ENTITY_COLUMNS, PrefetchedSource, evaluate, feast_source, train, workspace_for

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
    # One intra-op thread, as a serving worker would run: a 100-row forward gains nothing from more,
    # and on a busy 2-core machine extra threads oversubscribe the cores (10x slower p50 measured).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
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
    torch.set_num_threads(threads)
    return {
        "requests": requests, "candidates": candidates,
        "torch_threads": 1,
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
    ap.add_argument("--latency-only", action="store_true",
                    help="only re-measure serving latency with the checkpoints of an earlier run (--runs)")
    ap.add_argument("--twins-only", action="store_true", help="only the two twins, not the LLM-twin variants")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--candidates", type=int, default=100)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("ranker.features").setLevel(logging.ERROR)  # counts go to the results instead

    ws = workspace_for(args.repo, args.data_dir)
    if args.latency_only:  # re-measure serving with the LLM checkpoint of an earlier full run
        result = json.loads((args.results / "ranker.json").read_text())
        result["serving_latency_llm"] = _latency(args.runs / f"llm_seed{result['seeds'][0]}", args.repo, ws.root,
                                                 args.requests, args.candidates, result["seeds"][0])
        write_report(result, args.results)
        return
    if not ws.interactions.exists():
        raise SystemExit(f"{ws.interactions} not found: prepare the workspace first (`make demo`, or "
                         "`llmfeat demo --data-dir DIR`) and pass --data-dir DIR")
    llm_inputs = _llm_inputs(ws)
    import pandas as pd

    from llm_features.store import open_store

    store = open_store(args.repo, ws.root)
    entities = pd.read_parquet(ws.interactions, columns=ENTITY_COLUMNS + ["split"])
    entities = entities[entities["split"].isin(["train", "test"])].reset_index(drop=True)
    # The two twins (defaults of `llmfeat ranker train`), then LLM-twin variants that were tried.
    variants: dict[str, dict] = {"id_only": {"llm_features": False}, "llm": {"llm_inputs": llm_inputs}}
    if not args.twins_only:
        variants.update({
            "llm + recent-item bag, LLM dropout 0.5": {"llm_inputs": llm_inputs, "recent_items_bag": True,
                                                       "llm_dropout": 0.5},
            "item embedding only + recent-item bag": {"llm_inputs": ("item_embedding",), "recent_items_bag": True},
            "llm, dense-arch input (before)": {"llm_inputs": llm_inputs, "llm_mode": "dense"},
        })
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    fetch_seconds: dict[str, float] = {}
    sources: dict[str, PrefetchedSource] = {}
    for twin, model_kw in variants.items():
        model_cfg = ModelConfig(**model_kw)
        service = model_cfg.feature_service
        if service not in sources:  # one point-in-time join per feature service (train + test rows)
            sources.clear()
            t0 = time.perf_counter()
            columns = feature_columns(replace(model_cfg, llm_inputs=("user_embedding", "item_embedding"))
                                      if model_cfg.llm_features else model_cfg)
            sources[service] = PrefetchedSource(feast_source(store, service, columns), entities)
            fetch_seconds[service] = round(time.perf_counter() - t0, 1)
            log.info("%s: get_historical_features for %d rows in %.0fs", service, len(entities),
                     fetch_seconds[service])
        source = sources[service]
        for seed in args.seeds:
            cfg = TrainConfig(
                model=model_cfg, repo=args.repo, data_dir=ws.root, out=args.runs / f"{twin}_seed{seed}",
                epochs=args.epochs, batch_size=args.batch_size, seed=seed, threads=args.threads,
                validate=False, progress=False,
            )
            m = train(cfg, entities, source)
            e = evaluate(EvaluateConfig(checkpoint=cfg.out, repo=args.repo, data_dir=ws.root, split="test"),
                         entities, source)
            runs[twin].append({
                "seed": seed, "test_auc": e["auc"], "test_logloss": e["logloss"], "test_rows": e["rows"],
                "train_samples_per_second": m["samples_per_second"], "train_seconds": m["train_seconds"],
                "test_missing": e["missing"],
            })
            log.info("%s seed %d: AUC %.4f LogLoss %.4f", twin, seed, e["auc"], e["logloss"])
    sources.clear()

    def summary(rs: list[dict], key: str) -> dict:
        vals = [r[key] for r in rs]
        return {"mean": round(statistics.fmean(vals), 4), "std": round(statistics.pstdev(vals), 4)}

    latency = _latency(args.runs / f"llm_seed{args.seeds[0]}", args.repo, ws.root, args.requests,
                       args.candidates, args.seeds[0])
    result = {
        "dataset": str(ws.root), "llm_inputs": list(llm_inputs), "fetch_seconds": fetch_seconds, "epochs": args.epochs,
        "batch_size": args.batch_size, "seeds": args.seeds, "torch_threads": torch.get_num_threads(),
        "machine": platform.platform(),
        "summary": {twin: {k: summary(rs, k) for k in ("test_auc", "test_logloss", "train_samples_per_second")}
                    for twin, rs in runs.items()},
        "variants": {k: {n: list(v) if isinstance(v, tuple) else v for n, v in kw.items()}
                     for k, kw in variants.items()},
        "runs": runs, "serving_latency_llm": latency,
    }
    write_report(result, args.results)


def write_report(result: dict, results: Path) -> None:
    """``ranker.json`` and the markdown table ``ranker.md``."""
    results.mkdir(parents=True, exist_ok=True)
    (results / "ranker.json").write_text(json.dumps(result, indent=2) + "\n")
    s, latency, variants = result["summary"], result["serving_latency_llm"], list(result["summary"])
    lines = [
        "# Ranker: id-only twin vs +LLM features",
        "",
        f"Data: `{result['dataset']}`; test split; {len(result['seeds'])} seeds "
        f"({', '.join(map(str, result['seeds']))}); {result['epochs']} epochs, batch {result['batch_size']}; "
        f"LLM inputs: {', '.join(result['llm_inputs'])}.",
        "",
        "Same split, same training budget; the first two rows are the twins `llmfeat ranker train` builds "
        "(`--no-llm-features` and the default); the others are LLM-twin variants that were tried. "
        "AUC delta is against the id-only twin.",
        "",
        "| model | test AUC | AUC delta | test LogLoss | train samples/s |",
        "| --- | --- | --- | --- | --- |",
    ]
    for twin in variants:
        delta = s[twin]["test_auc"]["mean"] - s["id_only"]["test_auc"]["mean"]
        lines.append(f"| {twin} | {s[twin]['test_auc']['mean']:.4f} ± {s[twin]['test_auc']['std']:.4f} | "
                     f"{delta:+.4f} | "
                     f"{s[twin]['test_logloss']['mean']:.4f} ± {s[twin]['test_logloss']['std']:.4f} | "
                     f"{s[twin]['train_samples_per_second']['mean']:.0f} |")
    lines += ["", f"Serving (LLM twin, 1 user + {latency['candidates']} candidates, SQLite online reads included, "
              f"{latency['requests']} requests): p50 {latency['p50_ms']} ms, p99 {latency['p99_ms']} ms.", ""]
    (results / "ranker.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
