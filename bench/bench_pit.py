"""Benchmark: the ranker's point-in-time fetch at event cadence, Feast's join against the as-of join.

On a real interaction log (default ML-1M, users 1-2999) ingested with ``user_recent_behaviors`` at
event cadence, plus ``user_embeddings`` at event cadence (one row per user and interaction time, and
a final row: what ``embed-users --cadence event`` writes; the vectors are random, 384-d, since the
join's cost does not depend on their values) and item embeddings, it fetches the train split's entity
rows through the ``ranker_llm`` feature service, in the ranker's chunks of 100,000 rows, two ways:

- ``feast``: ``store.get_historical_features`` (Feast's point-in-time join: each entity row paired
  with every earlier snapshot of its user, then the newest kept);
- ``asof``: ``llm_features.asof.historical_features`` (what ``llmfeat ranker train`` uses).

Each run is a child process; its peak RSS is sampled every 0.2 s and the child is killed above
``--rss-cap-gb`` (the machine has other work to do), which the table reports as such. Shares of the
users (``--fractions``) show how each path grows. On the smallest share both frames are compared
row by row.

Usage::

    python bench/bench_pit.py --source ../shared/data/ml-1m --work /tmp/pit --out bench/results

Writes ``<out>/pit.json`` and ``<out>/pit.md`` (``pit_quick.*`` with ``--quick``). It never asserts a timing. ``--reuse`` keeps the
work dir's ingest and synthetic parts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1] / "feast_repo"
DIM = 384


def prepare(source: Path, work: Path, reuse: bool) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from llm_features import parquet_io
    from llm_features.fingerprint import FINGERPRINT_METADATA_KEY, ModelFingerprint
    from llm_features.workspace import Workspace

    data = work / "data"
    done = work / "prepared.json"
    if reuse and done.exists():
        return data
    if data.exists():
        import shutil

        shutil.rmtree(data)
    subprocess.run([str(Path(sys.executable).parent / "llmfeat"), "ingest", "--source", str(source),
                    "--data-dir", str(data), "--recent-cadence", "event"], check=True)
    ws = Workspace.at(data)
    fp = ModelFingerprint("synthetic", "0" * 64, 3, "mean", 64, "float32", DIM)
    ws.claim_fingerprint(fp)
    meta = {FINGERPRINT_METADATA_KEY: fp.to_json()}
    rng = np.random.default_rng(0)
    items = pq.read_table(ws.items, columns=["item_id"])["item_id"].to_numpy()
    parquet_io.write_part(ws.item_embeddings, pa.table({
        "item_id": pa.array(items, pa.int64()),
        "item_embedding": parquet_io.embedding_array(rng.standard_normal((len(items), DIM), np.float32)),
        "event_timestamp": parquet_io.utc_us(pa.array(np.zeros(len(items), "int64") + 9 * 10**14,
                                                      pa.timestamp("us")))}), metadata=meta)
    # user embeddings at the stamps user_recent_behaviors has (each interaction time, and a final row)
    recent = parquet_io.read_parts(ws.user_recent_behaviors, columns=["user_id", "event_timestamp"])
    users = recent["user_id"].to_numpy()
    stamps = recent["event_timestamp"]
    for lo in range(0, len(users), 200_000):
        hi = min(len(users), lo + 200_000)
        parquet_io.write_part(ws.user_embeddings, pa.table({
            "user_id": pa.array(users[lo:hi], pa.int64()),
            "user_embedding": parquet_io.embedding_array(rng.standard_normal((hi - lo, DIM), np.float32)),
            "event_timestamp": stamps.slice(lo, hi - lo)}), metadata=meta)
    done.write_text(json.dumps({"user_embedding_rows": len(users)}))
    return data


def child(data: Path, path: str, fraction: float, out: Path) -> None:
    """One fetch, in this (child) process."""
    import pandas as pd

    from llm_features.asof import historical_features
    from llm_features.store import apply_definitions, open_store
    from ranker.train import ENTITY_COLUMNS, load_entities

    repo = Path(tempfile.mkdtemp()) / "feast_repo"
    import shutil

    shutil.copytree(REPO, repo, ignore=shutil.ignore_patterns("data", "__pycache__"))
    store = open_store(repo, data)
    apply_definitions(store)
    entities = load_entities(data / "canonical" / "interactions.parquet", "train")
    users = np.unique(entities["user_id"].to_numpy())
    keep = users[: max(1, int(round(len(users) * fraction)))]
    entities = entities[entities["user_id"].isin(keep)].reset_index(drop=True)[ENTITY_COLUMNS]
    service = store.get_feature_service("ranker_llm")
    t0 = time.perf_counter()
    frames, cache = [], {}
    for s in range(0, len(entities), 100_000):
        chunk = entities.iloc[s : s + 100_000]
        if path == "feast":
            frames.append(store.get_historical_features(entity_df=chunk, features=service).to_df())
        else:
            frames.append(historical_features(store, chunk, service, cache))
    seconds = time.perf_counter() - t0
    frame = pd.concat(frames, ignore_index=True)
    result = {"rows": len(entities), "users": len(keep), "seconds": seconds,
              "present_user_embedding": int(frame["user_embedding"].notna().sum())}
    if out.suffix == ".json":
        out.write_text(json.dumps(result))
    frame.sort_values(["user_id", "event_timestamp", "item_id"]).reset_index(drop=True).to_pickle(
        out.with_suffix(".pkl"))


def run_child(data: Path, path: str, fraction: float, cap_gb: float, tmp: Path) -> dict:
    from proc_sampler import run_sampled

    out = tmp / f"{path}-{fraction}.json"
    run = run_sampled([sys.executable, __file__, "--child", path, "--fraction", str(fraction),
                       "--data", str(data), "--child-out", str(out)], cap_gb=cap_gb, log_path=tmp / f"{path}-{fraction}.log")
    res = {"path": path, "fraction": fraction, "peak_rss_gb": round(run.peak_rss_mb / 1024, 2),
           "wall_seconds": round(run.seconds, 1)}
    if run.killed_at_cap:
        res["status"] = f"killed above the {cap_gb:g} GB cap"
    elif run.returncode != 0 or not out.exists():
        res["status"] = f"failed (exit {run.returncode})"
    else:
        res.update(json.loads(out.read_text()), status="ok")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", type=Path, default=Path("../shared/data/ml-1m"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/llmfeat-bench-pit"))
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--fractions", default="0.05,0.25,1.0")
    ap.add_argument("--rss-cap-gb", type=float, default=14.0)
    ap.add_argument("--reuse", action="store_true")
    ap.add_argument("--quick", action="store_true", help="2%% of the users only (a smoke test)")
    ap.add_argument("--child", choices=["feast", "asof"])
    ap.add_argument("--fraction", type=float)
    ap.add_argument("--data", type=Path)
    ap.add_argument("--child-out", type=Path)
    a = ap.parse_args()
    if a.child:
        child(a.data, a.child, a.fraction, a.child_out)
        return
    if a.quick:
        a.fractions = "0.02"
    a.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = prepare(a.source, a.work, a.reuse)
    prep_s = time.perf_counter() - t0
    tmp = Path(tempfile.mkdtemp(dir=a.work))
    fractions = [float(f) for f in a.fractions.split(",")]
    runs = []
    for f in fractions:
        for path in ("asof", "feast"):
            r = run_child(data, path, f, a.rss_cap_gb, tmp)
            print(json.dumps(r), flush=True)
            runs.append(r)
    # same frames on the smallest share
    import pandas as pd

    small = min(fractions)
    same = None
    fa, fb = tmp / f"asof-{small}.pkl", tmp / f"feast-{small}.pkl"
    if fa.exists() and fb.exists():
        x, y = pd.read_pickle(fa), pd.read_pickle(fb)
        same = len(x) == len(y) and all(
            all((np.asarray(p) == np.asarray(q)).all() if isinstance(p, (list, np.ndarray)) else
                ((pd.isna(p) and pd.isna(q)) or p == q) for p, q in zip(x[c], y[c])) for c in y.columns)
    recent_rows = json.loads((a.work / "prepared.json").read_text())["user_embedding_rows"]
    result = {"source": str(a.source), "user_embedding_rows": recent_rows, "prepare_seconds": round(prep_s, 1),
              "rss_cap_gb": a.rss_cap_gb, "frames_equal_on_smallest_share": same, "runs": runs,
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
              "command": "python bench/bench_pit.py " + " ".join(sys.argv[1:])}
    a.out.mkdir(parents=True, exist_ok=True)
    stem = "pit_quick" if a.quick else "pit"
    (a.out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    lines = ["# Point-in-time fetch at event cadence: Feast's join vs the as-of join", "",
             f"`{result['command']}`; {recent_rows:,} user-embedding rows (and as many user_recent_behaviors "
             f"rows), train entity rows of the given share of users, chunks of 100,000 rows. Frames equal "
             f"on the smallest share: {same}.", "",
             "| users | entity rows | path | seconds | peak RSS (GB) | status |", "|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r.get('users', '')} ({r['fraction']:.0%}) | {r.get('rows', '')} | {r['path']} | "
                     f"{r.get('seconds', r['wall_seconds']):.1f} | {r['peak_rss_gb']} | {r['status']} |")
    (a.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
