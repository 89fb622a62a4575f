"""Benchmark: Feast materialisation throughput and online lookup latency on the embedded stack
(DuckDB offline store, SQLite online store, SQL registry on SQLite).

- materialise: rows/s of ``materialize_all`` per feature view (rows = entities written online);
- lookup: ``get_online_features`` latency for 1 user + 100 candidate items through the ``ranker_llm``
  feature service, warm, in-process SDK; both the bare Feast call and ``store.online_features``
  (which adds the numpy conversion), p50/p99 over ``--reps`` repetitions.

Data: ``--data-dir`` (a workspace that ingest/encode filled), else a synthetic workspace of
``--items`` x ``--dim`` item embeddings (default 20,000 x 384) and ``--users`` users. The feature
repo is copied to a temporary directory, and its registry and online store live there, so the
workspace's own registry/online store are not touched.

Usage::

    python bench/bench_feast.py [--data-dir feast_repo/data] [--items 20000] --out bench/results

Writes ``<out>/feast.json`` and ``<out>/feast.md``. It never asserts a timing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa

from llm_features import parquet_io
from llm_features.fingerprint import FINGERPRINT_METADATA_KEY, ModelFingerprint
from llm_features.store import apply_definitions, load_config, materialize_all, online_features
from llm_features.workspace import Workspace

REPO = Path(__file__).resolve().parents[1] / "feast_repo"
T0 = datetime(2000, 1, 1, tzinfo=timezone.utc)


def synthetic_workspace(root: Path, items: int, users: int, dim: int, seed: int = 0) -> Workspace:
    """Item/user embeddings, recent behaviours and profiles in the SPEC formats."""
    rng = np.random.default_rng(seed)
    ws = Workspace.at(root)
    fp = ModelFingerprint("synthetic", "0" * 64, 3, "mean", 64, "float32", dim)
    ws.claim_fingerprint(fp)
    meta = {FINGERPRINT_METADATA_KEY: fp.to_json()}
    item_ids = np.arange(1, items + 1, dtype=np.int64)
    item_ts = parquet_io.utc_us([T0 + timedelta(minutes=int(i)) for i in item_ids])
    for lo in range(0, items, 10_000):  # parts as encode writes them
        hi = min(items, lo + 10_000)
        parquet_io.write_part(ws.item_embeddings, pa.table({
            "item_id": item_ids[lo:hi],
            "item_embedding": parquet_io.embedding_array(rng.standard_normal((hi - lo, dim), np.float32)),
            "event_timestamp": item_ts[lo:hi],
        }), metadata=meta)
    user_ids = np.arange(1, users + 1, dtype=np.int64)
    user_ts = parquet_io.utc_us([T0 + timedelta(days=1)] * users)
    parquet_io.write_part(ws.user_embeddings, pa.table({
        "user_id": user_ids,
        "user_embedding": parquet_io.embedding_array(rng.standard_normal((users, dim), dtype=np.float32)),
        "event_timestamp": user_ts,
    }), metadata=meta)
    hist = [rng.integers(1, items + 1, size=30).tolist() for _ in range(users)]
    parquet_io.write_part(ws.user_recent_behaviors, pa.table({
        "user_id": user_ids,
        "recent_behavior_ids": pa.array(hist, pa.list_(pa.int64())),
        "recent_item_ids": pa.array(hist, pa.list_(pa.int64())),
        "recent_labels": pa.array([[1, 0] * 15] * users, pa.list_(pa.int8())),
        "event_timestamp": user_ts,
    }))
    parquet_io.write_table_atomic(pa.table({
        "user_id": user_ids, "gender": ["F"] * users, "age": np.full(users, 30, np.int64),
        "occupation": ["other"] * users, "zip": ["00000"] * users, "event_timestamp": user_ts,
    }), ws.users)
    parquet_io.write_table_atomic(pa.table({
        "item_id": item_ids, "item_text": [f"Item {i}" for i in item_ids],
        "title": [f"Item {i}" for i in item_ids],
        "item_genres": pa.array([["Drama"]] * items, pa.list_(pa.string())), "event_timestamp": item_ts,
    }), ws.items)
    return ws


def open_bench_store(repo: Path, data_dir: Path, state_dir: Path):
    """A store over ``data_dir``'s tables whose registry and online store live in ``state_dir``."""
    from feast import FeatureStore

    config = load_config(repo, data_dir)
    config.registry.path = str(state_dir / "registry.db")
    config.online_store.path = str(state_dir / "online_store.db")
    return FeatureStore(repo_path=str(repo), config=config)


def percentiles(ms: list[float]) -> dict[str, float]:
    q = np.percentile(ms, [50, 90, 99])
    return {"p50_ms": round(float(q[0]), 3), "p90_ms": round(float(q[1]), 3), "p99_ms": round(float(q[2]), 3),
            "mean_ms": round(statistics.fmean(ms), 3), "reps": len(ms)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", type=Path, default=None, help="workspace to benchmark (default: synthetic)")
    ap.add_argument("--items", type=int, default=20_000)
    ap.add_argument("--users", type=int, default=1_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--candidates", type=int, default=100)
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_feast_") as tmp:
        tmp = Path(tmp)
        ignore = shutil.ignore_patterns("data", "__pycache__")
        repo = Path(shutil.copytree(REPO, tmp / "feast_repo", ignore=ignore))
        if args.data_dir is not None and parquet_io.list_parts(Workspace.at(args.data_dir).item_embeddings):
            ws, source = Workspace.at(args.data_dir), f"workspace {Path(args.data_dir).resolve()}"
        else:
            t = time.perf_counter()
            ws = synthetic_workspace(tmp / "data", args.items, args.users, args.dim)
            source = (f"synthetic: {args.items} items x {args.dim}-d, {args.users} users "
                      f"({time.perf_counter() - t:.1f} s to write)")
        store = open_bench_store(repo, ws.root, tmp)
        t = time.perf_counter()
        apply_definitions(store, ws.root)
        apply_s = time.perf_counter() - t

        per_view = {}
        views = ("item_embeddings", "atomic_behavior_embeddings", "user_embeddings", "user_recent_behaviors",
                 "user_profile", "item_profile")
        for view in views:
            rep = materialize_all(store, ws, feature_views=[view])
            n = rep.entities[view]
            per_view[view] = {
                "entities": n, "source_rows": rep.source_rows[view], "seconds": round(rep.seconds, 3),
                "rows_per_s": round(n / rep.seconds, 1) if n else None,
            }
        peak_rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2

        ids = np.asarray(parquet_io.read_parts(ws.item_embeddings, columns=["item_id"])["item_id"].to_numpy())
        user_ids = parquet_io.read_parts(ws.user_recent_behaviors, columns=["user_id"])
        user_pool = np.unique(user_ids["user_id"].to_numpy()) if user_ids is not None else np.array([1])
        rng = np.random.default_rng(1)
        service = store.get_feature_service("ranker_llm")

        def draw():
            u = int(rng.choice(user_pool))
            return u, rng.choice(ids, size=args.candidates, replace=False)

        for _ in range(20):  # warm-up: registry cache, sqlite connection, code paths
            u, c = draw()
            online_features(store, u, c)
        bare, helper = [], []
        for _ in range(args.reps):
            u, c = draw()
            rows = [{"user_id": u, "item_id": int(i)} for i in c]
            t = time.perf_counter()
            store.get_online_features(features=service, entity_rows=rows).to_dict()
            bare.append((time.perf_counter() - t) * 1e3)
            u, c = draw()
            t = time.perf_counter()
            online_features(store, u, c)
            helper.append((time.perf_counter() - t) * 1e3)

    dim = int(json.loads(ws.manifest.read_text())["embedding_dim"]) if ws.manifest.exists() else args.dim
    result = {
        "benchmark": "feast",
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "load_avg_1m": round(os.getloadavg()[0], 2),
        },
        "stack": {"offline": "duckdb", "online": "sqlite", "registry": "sql (sqlite)",
                  "online_write_batch_size": 10_000},
        "data": source,
        "embedding_dim": dim,
        "apply_s": round(apply_s, 3),
        "materialize": per_view,
        "peak_rss_gb": round(peak_rss_gb, 2),
        "lookup": {
            "service": "ranker_llm",
            "entities": f"1 user + {args.candidates} items",
            "feast_get_online_features": percentiles(bare),
            "store_online_features_numpy": percentiles(helper),
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "feast.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "feast.md").write_text(render_md(result))
    print(render_md(result))


def render_md(r: dict) -> str:
    lines = [
        "# Feast: materialisation and online lookup",
        "",
        f"{r['when']}, {r['machine']['platform']}, {r['machine']['cpus']} CPUs (shared; load average "
        f"{r['machine']['load_avg_1m']} at the end of the run). Stack: DuckDB offline, "
        "SQLite online, SQL registry on SQLite, "
        f"`online_write_batch_size` {r['stack']['online_write_batch_size']}.",
        f"Data: {r['data']}; embedding width {r['embedding_dim']}. "
        f"`feast apply` (Python API): {r['apply_s']} s. "
        f"Peak RSS of the process: {r['peak_rss_gb']} GB.",
        "",
        "| feature view | source rows | entities written | seconds | rows/s |",
        "|---|---:|---:|---:|---:|",
    ]
    for view, m in r["materialize"].items():
        rps = f"{m['rows_per_s']:,.0f}" if m["rows_per_s"] else "-"
        lines.append(f"| {view} | {m['source_rows']:,} | {m['entities']:,} | {m['seconds']} | {rps} |")
    lk = r["lookup"]
    lines += [
        "",
        f"Online lookup, {lk['entities']}, feature service `{lk['service']}`, warm, in-process SDK:",
        "",
        "| call | p50 ms | p90 ms | p99 ms | mean ms | reps |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, label in [("feast_get_online_features", "`store.get_online_features(...).to_dict()`"),
                        ("store_online_features_numpy",
                         "`llm_features.store.online_features` (numpy arrays)")]:
        p = lk[name]
        cells = [p[k] for k in ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "reps")]
        lines.append(f"| {label} | " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
