"""Per-event latency of fresh user embeddings (``llm_features.events``) on a served data dir.

Pushes one event per call (a random user, a known item, stamped after every interaction of the data
dir) and times :meth:`EventProcessor.process` end to end: validation, the deep layers over the user's
last n behaviours, the offline part files and the online writes. ``--new-items`` events carry an item
the data dir has never seen (its text is encoded through the shallow layers first).

Pushing events writes part files and online rows, so by default the script works on a temporary copy
of ``--data-dir`` (removed afterwards) and leaves the data dir as it was; ``--in-place`` writes into
the data dir itself (never use it on a data dir that serves anything)::

    python bench/bench_events.py --data-dir feast_repo/data --events 200 --new-items 50 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def stats_ms(values: list[float]) -> dict[str, float]:
    a = np.asarray(values) * 1e3
    return {"n": len(a), "p50_ms": round(float(np.percentile(a, 50)), 2),
            "p90_ms": round(float(np.percentile(a, 90)), 2), "p99_ms": round(float(np.percentile(a, 99)), 2),
            "mean_ms": round(float(a.mean()), 2), "max_ms": round(float(a.max()), 2)}


def markdown(out: dict, command: str) -> str:
    """The results as a readable table (next to the JSON)."""
    lines = ["# Fresh user embeddings: latency per event", "",
             f"`{command}`; {out['device']}, {out['torch_threads']} torch thread(s), recent n={out['recent_n']}, "
             f"online writes: {out['online_write']}, sqlite_wal={out['sqlite_wal']}; processor loaded in "
             f"{out['load_seconds']} s.", "",
             "| one event | calls | p50 ms | p90 ms | p99 ms | max ms |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for case in ("known_item", "new_item"):
        for phase, st in (out.get(case) or {}).items():
            label = f"{case.replace('_', ' ')}: {phase}"
            lines.append(f"| {label} | {st['n']} | {st['p50_ms']} | {st['p90_ms']} | {st['p99_ms']} | {st['max_ms']} |")
    batch = out.get("one_call_many_users") or {}
    if batch:
        lines += ["", f"One call with {batch['events']} events (one per user): {batch['seconds']} s "
                      f"({batch['compute_seconds']} s in the deep layers)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, required=True)
    ap.add_argument("--checkpoint", type=Path, default=None)
    ap.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[1] / "feast_repo")
    ap.add_argument("--events", type=int, default=200, help="one-event calls with a known item")
    ap.add_argument("--new-items", type=int, default=50, help="one-event calls with a never-seen item")
    ap.add_argument("--batch", type=int, default=100, help="then one call with this many events (users)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--feast-push", action="store_true", help="online writes through store.push (comparison)")
    ap.add_argument("--sqlite-wal", action="store_true", help="EventProcessor(sqlite_wal=True)")
    ap.add_argument("--out", type=Path, default=None,
                    help="write the results as JSON here, and a markdown table next to it (.md)")
    ap.add_argument("--report-only", action="store_true", help="rewrite the .md of an existing --out JSON")
    ap.add_argument("--in-place", action="store_true",
                    help="push into --data-dir itself instead of a temporary copy of it")
    args = ap.parse_args()
    command = "python bench/bench_events.py " + " ".join(sys.argv[1:])
    if args.report_only:
        out = json.loads(args.out.read_text())
        args.out.with_suffix(".md").write_text(markdown(out, out.get("command", command)))
        return
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)

    from llm_features.events import EventProcessor
    from llm_features.workspace import Workspace

    if not Path(args.data_dir).is_dir():
        sys.exit(f"--data-dir {args.data_dir}: no such directory (run the main job first: make demo)")
    with tempfile.TemporaryDirectory(prefix="bench_events_") as scratch:
        data_dir = Path(args.data_dir)
        if not args.in_place:
            data_dir = Path(scratch) / "data"
            shutil.copytree(args.data_dir, data_dir, symlinks=True)
        run(args, command, Workspace.at(data_dir), EventProcessor)
    sys.stdout.flush()
    os._exit(0)  # skip duckdb's noisy interpreter-exit messages (after the copy is removed)


def run(args: argparse.Namespace, command: str, ws, EventProcessor) -> None:
    t0 = time.perf_counter()
    proc = EventProcessor(data_dir=ws.root, checkpoint=args.checkpoint, repo=args.repo, device=args.device,
                          num_threads=args.threads, sqlite_wal=args.sqlite_wal)
    load_s = time.perf_counter() - t0
    proc._feast_push = bool(args.feast_push)
    inter = pq.read_table(ws.interactions, columns=["user_id", "item_id", "event_timestamp"])
    users = np.unique(inter["user_id"].to_numpy()).tolist()
    items = np.unique(inter["item_id"].to_numpy()).tolist()
    start = int(pc.max(inter["event_timestamp"]).as_py().timestamp()) + 60
    for p in ws.events.glob("part-*.parquet") if ws.events.is_dir() else []:  # events of earlier runs
        start = max(start, int(pc.max(pq.read_table(p)["event_timestamp"]).as_py().timestamp()) + 60)
    rng = random.Random(0)
    clock = iter(range(start, start + 10_000_000))

    def ev(user: int, item: int, text: str | None = None) -> dict:
        e = {"user_id": user, "item_id": item, "timestamp": next(clock), "label": rng.randint(0, 1),
             "rating": float(rng.randint(1, 5))}
        if text is not None:
            e["item_text"] = text
        return e

    for _ in range(5):  # warm-up (first forward passes, sqlite connection)
        proc.process([ev(rng.choice(users), rng.choice(items))])
    total, compute = [], []
    phases: dict[str, list[float]] = {}
    for _ in range(args.events):
        t = time.perf_counter()
        rep = proc.process([ev(rng.choice(users), rng.choice(items))])
        total.append(time.perf_counter() - t)
        compute.append(rep.compute_seconds)
        for k, v in rep.timings.items():
            phases.setdefault(k, []).append(v)
    new_total, new_compute = [], []
    base_item = 10_000_000 + next(clock) % 1_000_000 * 10
    for i in range(args.new_items):
        t = time.perf_counter()
        text = f"Benchmark Movie {base_item + i} (2001) | Drama"
        rep = proc.process([ev(rng.choice(users), base_item + i, text)])
        new_total.append(time.perf_counter() - t)
        new_compute.append(rep.compute_seconds)
        assert rep.items_encoded == [base_item + i]
    batch = {}
    if args.batch:
        chosen = rng.sample(users, min(args.batch, len(users)))
        t = time.perf_counter()
        rep = proc.process([ev(u, rng.choice(items)) for u in chosen])
        batch = {"events": len(chosen), "seconds": round(time.perf_counter() - t, 4),
                 "compute_seconds": round(rep.compute_seconds, 4)}
    import torch

    out = {
        "data_dir": str(args.data_dir), "in_place": bool(args.in_place), "checkpoint": str(proc.checkpoint),
        "device": str(proc.device),
        "torch_threads": torch.get_num_threads(), "context_size": proc.context_size,
        "recent_n": proc.recent_n,
        "cadence": proc.identity["cadence"], "granularity": proc.ft.granularity, "online_write":
        "store.push" if args.feast_push else "write_to_online_store (push source's views resolved once)",
        "sqlite_wal": args.sqlite_wal, "load_seconds": round(load_s, 2),
        "known_item": {"total": stats_ms(total), **{k: stats_ms(v) for k, v in phases.items()}},
        "new_item": {"total": stats_ms(new_total), "compute": stats_ms(new_compute)} if new_total else None,
        "one_call_many_users": batch, "command": command,
    }
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
        args.out.with_suffix(".md").write_text(markdown(out, command))


if __name__ == "__main__":
    main()
