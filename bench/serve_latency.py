"""Latency of ``llmfeat serve`` at one client, side by side with Feast's bare online read.

Starts ``llmfeat serve`` (one worker, one torch thread) as a subprocess, then sends ``--requests``
``POST /score`` requests of one user and ``--candidates`` items over one keep-alive HTTP connection.
Between two requests it times, in this process, what the ranker read through Feast before
``llmfeat serve``: ``store.get_online_features`` for the user's refs (one call) and for the
candidates' item refs (one call), for the same user and items. Then it times the stages of one
request in this process (no HTTP) for the profile. Needs a trained ranker on a materialised data dir::

    python bench/serve_latency.py --data-dir /path/to/data --requests 2000

Writes ``bench/results/serve_latency.json`` and ``serve_latency.md``. Numbers, not assertions.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _pct(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms)
    return {"p50": round(float(np.percentile(a, 50)), 3), "p90": round(float(np.percentile(a, 90)), 3),
            "p99": round(float(np.percentile(a, 99)), 3), "mean": round(float(a.mean()), 3), "n": len(ms)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(args: argparse.Namespace, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-c", "from llm_features.cli import run; run()", "serve", "--ranker", str(args.ranker),
           "--repo", str(args.repo), "--data-dir", str(args.data_dir), "--port", str(port), "--threads", "1"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"llmfeat serve exited {proc.returncode}:\n{proc.stdout.read()}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("llmfeat serve did not answer /health within 300 s")


def _requests(data_dir: Path, n: int, candidates: int, seed: int) -> list[tuple[int, list[int]]]:
    import pandas as pd

    inter = pd.read_parquet(data_dir / "canonical" / "interactions.parquet", columns=["user_id", "item_id"])
    users, items = inter.user_id.unique(), inter.item_id.unique()
    rng = np.random.default_rng(seed)
    return [(int(rng.choice(users)), [int(i) for i in rng.choice(items, candidates, replace=False)])
            for _ in range(n)]


def _stage_profile(ranker, reqs: list[tuple[int, list[int]]]) -> dict[str, dict[str, float]]:
    """Each stage of one request timed alone in this process (no HTTP)."""
    import torch

    from ranker.features import USER_ID

    scorer = ranker.scorer
    t: dict[str, list[float]] = {k: [] for k in ("user_read", "user_encode", "inputs_total", "forward",
                                                 "score_total", "json_encode")}
    for user, items in reqs:
        a = time.perf_counter()
        values, _ = scorer.users.read([user])
        b = time.perf_counter()
        ranker.encoder.encode({USER_ID: [user], **values}, with_labels=False, row_masks=True)
        c = time.perf_counter()
        dense, pooled, _ = scorer.inputs(user, items)
        d = time.perf_counter()
        with torch.inference_mode():
            probs = torch.sigmoid(scorer.model.forward_one_user(dense, pooled)).numpy()
        e = time.perf_counter()
        scorer.score(user, items)
        f = time.perf_counter()
        json.dumps({"user_id": user, "scores": probs.tolist()}, separators=(",", ":"))
        g = time.perf_counter()
        for key, dt in zip(t, (b - a, c - b, d - c, e - d, f - e, g - f)):
            t[key].append(dt * 1000)
    return {k: _pct(v) for k, v in t.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, default=Path(os.environ.get("LLMFEAT_DATA_DIR", ROOT / "feast_repo/data")))
    ap.add_argument("--ranker", type=Path, default=None, help="default: <data-dir>/runs/ranker_llm")
    ap.add_argument("--repo", type=Path, default=ROOT / "feast_repo")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--candidates", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/serve_latency.json")
    args = ap.parse_args()
    args.data_dir = args.data_dir.resolve()
    args.ranker = (args.ranker or args.data_dir / "runs/ranker_llm").resolve()

    import torch

    torch.set_num_threads(1)
    import logging

    logging.basicConfig(level=logging.ERROR)
    from ranker.serve import Ranker

    reqs = _requests(args.data_dir, args.warmup + args.requests, args.candidates, args.seed)
    port = _free_port()
    proc = _start_server(args, port)
    try:
        ranker = Ranker.load(args.ranker, repo=args.repo, data_dir=args.data_dir)
        logging.getLogger("ranker").setLevel(logging.ERROR)
        store = ranker.store
        user_refs, item_refs = ranker.feature_refs()
        conn = http.client.HTTPConnection("127.0.0.1", port)
        http_ms, feast_ms, feast_user_ms, feast_items_ms = [], [], [], []
        for k, (user, items) in enumerate(reqs):
            body = json.dumps({"user_id": user, "item_ids": items})
            a = time.perf_counter()
            conn.request("POST", "/score", body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            payload = resp.read()
            b = time.perf_counter()
            if resp.status != 200:
                raise RuntimeError(f"/score answered {resp.status}: {payload[:200]!r}")
            store.get_online_features(features=user_refs, entity_rows=[{"user_id": user}]).to_dict()
            c = time.perf_counter()
            store.get_online_features(features=item_refs, entity_rows=[{"item_id": i} for i in items]).to_dict()
            d = time.perf_counter()
            if k >= args.warmup:
                http_ms.append((b - a) * 1000)
                feast_ms.append((d - b) * 1000)
                feast_user_ms.append((c - b) * 1000)
                feast_items_ms.append((d - c) * 1000)
        conn.request("GET", "/metrics")
        metrics_text = conn.getresponse().read().decode()
        conn.close()
        in_app = [line for line in metrics_text.splitlines()
                  if line.startswith('llmfeat_serve_request_seconds_') and 'endpoint="/score"' in line
                  and ("_sum" in line or "_count" in line)]
        app_sum, app_count = (float(line.rsplit(" ", 1)[1]) for line in sorted(in_app, reverse=True))
        profile = _stage_profile(ranker, reqs[: min(len(reqs), 500)])
    finally:
        proc.terminate()
        proc.wait(timeout=60)

    result = {
        "benchmark": "serve_latency",
        "host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "data_dir": str(args.data_dir), "ranker": str(args.ranker), "candidates": args.candidates,
        "requests": args.requests, "warmup": args.warmup, "seed": args.seed,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "http_score_ms": _pct(http_ms),
        "feast_bare_ms": _pct(feast_ms),
        "feast_bare_user_ms": _pct(feast_user_ms),
        "feast_bare_items_ms": _pct(feast_items_ms),
        "http_p99_over_feast_p99": round(_pct(http_ms)["p99"] / _pct(feast_ms)["p99"], 3),
        "in_app_mean_ms": round(app_sum / app_count * 1000, 3),
        "stages_ms": profile,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, args.out)
    h, f = result["http_score_ms"], result["feast_bare_ms"]
    lines = [
        "# llmfeat serve: latency at one client",
        "",
        f"`{result['command']}` on {result['cpus']} CPUs (1-minute load average {result['load_average_1m']}), "
        f"{args.requests} requests after {args.warmup} warm-up, 1 user + {args.candidates} candidates each.",
        "",
        "| path | p50 ms | p90 ms | p99 ms | mean ms |",
        "| --- | --- | --- | --- | --- |",
        f"| `POST /score` over HTTP (keep-alive, 1 worker, 1 torch thread) | {h['p50']} | {h['p90']} | {h['p99']} | "
        f"{h['mean']} |",
        f"| Feast `get_online_features`: user refs + item refs (2 calls) | {f['p50']} | {f['p90']} | {f['p99']} | "
        f"{f['mean']} |",
        "",
        f"HTTP p99 / Feast p99 = {result['http_p99_over_feast_p99']}. In the app (its /metrics histogram): "
        f"{result['in_app_mean_ms']} ms mean.",
        "",
        "Stages of one request, timed alone in the client process:",
        "",
        "| stage | p50 ms | p99 ms |",
        "| --- | --- | --- |",
        *(f"| {k} | {v['p50']} | {v['p99']} |" for k, v in profile.items()),
        "",
    ]
    args.out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
