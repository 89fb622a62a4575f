"""Serving benchmark: `llmfeat serve` under closed-loop HTTP load, on the SQLite and the Redis online store.

For each store it starts ``llmfeat serve`` as a subprocess on a free loopback port, waits for
``GET /health``, and drives ``POST /score`` (one user + ``--candidates`` items per request, users and
candidates sampled from the data dir's interactions with a fixed seed) with ``bench/loadgen.py`` in a
process of its own: 1, 8, 32 and 128 concurrent clients, each for ``--seconds`` after a warm-up.
Before the server starts, the same requests go through Feast's bare ``store.get_online_features``
in this process (one call for the user's features, one for the candidates', the refs the ranker
reads: what the service needs per request without its caches), for the p99 ratio at one client.

- sqlite: the data dir's own online store (``feature_store.yaml``; the data dir must be materialised);
- redis: the same data dir materialised into Redis through
  ``production/feature_store.redis_local.yaml`` (its own registry file, ``registry_redis.db``, in the
  data dir; Redis keys of project ``llmfeat``); needs ``--redis host:port`` or ``$LLMFEAT_REDIS``
  (``export LLMFEAT_REDIS=$(bash scripts/start_redis.sh)``), else that store is skipped and says so.

Usage::

    python bench/bench_serving.py [--data-dir feast_repo/data] [--ranker DIR] [--redis HOST:PORT] \\
        [--seconds 20] [--concurrency 1 8 32 128] [--out bench/results]

Needs a data dir with a trained ranker (``make demo``: ``feast_repo/data`` and ``runs/ranker_llm``)
and ``llmfeat serve``. Writes ``<out>/serving.json``, ``serving.md`` and ``serving.png``
(``serving_quick.*`` with ``--quick``). Numbers, not assertions: it never fails on a timing.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loadgen  # noqa: E402  (bench/loadgen.py, next to this file)
from llm_features.errors import UserError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REDIS_YAML = "production/feature_store.redis_local.yaml"
STORES = ("sqlite", "redis")
LEVEL_KEYS = ("rps", "p50_ms", "p99_ms", "p999_ms", "errors")


class BenchError(Exception):
    """A condition the benchmark cannot run under; its message says what to do."""


# ---------------------------------------------------------------------------------------------
# `llmfeat serve`


def llmfeat_command() -> list[str]:
    """``llmfeat`` of this checkout: the same interpreter, the checkout first on PYTHONPATH (see :func:`child_env`)."""
    return [sys.executable, "-c", "from llm_features.cli import run; run()"]


def child_env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", **extra}


def check_serve_available() -> None:
    """Refuse (:class:`BenchError`) when this checkout's ``llmfeat`` has no ``serve`` command, or one without
    the options the benchmark passes."""
    from llm_features.cli import COMMANDS

    module = COMMANDS.get("serve")
    if module is None or importlib.util.find_spec(module) is None:
        raise BenchError(
            "`llmfeat serve` is not available in this checkout (no 'serve' command in llm_features.cli), and "
            "bench_serving.py drives that HTTP service: use a checkout that has it (issue 18).")
    proc = subprocess.run([*llmfeat_command(), "serve", "--help"], capture_output=True, text=True, env=child_env(),
                          cwd=ROOT, timeout=300)
    missing = [opt for opt in ("--ranker", "--data-dir", "--feature-store-yaml", "--port", "--workers", "--threads")
               if opt not in proc.stdout]
    if proc.returncode != 0 or missing:
        raise BenchError(f"`llmfeat serve --help` exited {proc.returncode}"
                         + (f" and lacks {', '.join(missing)}" if missing else "")
                         + f": {(proc.stderr or proc.stdout).strip()[-500:]}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str, body: dict | None = None, timeout: float = 30.0) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return resp.status, json.loads(resp.read() or b"{}")


@contextlib.contextmanager
def running_server(cmd: Sequence[str], env: dict[str, str], log_path: Path, url: str,
                   startup_timeout_s: float) -> Iterator[float]:
    """``llmfeat serve`` (``cmd``) in a process group of its own, yielding once ``/health`` answers 200 with
    ``status: ok`` (the seconds that took); stopped (SIGTERM, then SIGKILL) on exit."""
    t0 = time.perf_counter()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                start_new_session=True)
    try:
        while True:
            if proc.poll() is not None:
                raise BenchError(f"`llmfeat serve` exited with {proc.returncode} before /health answered; the last "
                                 f"lines of {log_path}:\n{_tail(log_path)}")
            try:
                status, body = _get_json(f"{url}/health", timeout=2)
                if status == 200 and body.get("status") == "ok":
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError):
                pass
            if time.perf_counter() - t0 > startup_timeout_s:
                raise BenchError(f"`llmfeat serve` did not answer {url}/health within {startup_timeout_s:.0f} s; the "
                                 f"last lines of {log_path}:\n{_tail(log_path)}")
            time.sleep(0.5)
        yield time.perf_counter() - t0
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)  # the group: workers too (--workers > 1)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# ---------------------------------------------------------------------------------------------
# Requests


def sample_requests(user_ids: np.ndarray, item_ids: np.ndarray, n: int, candidates: int,
                    seed: int = 0) -> list[dict]:
    """``n`` request bodies ``{"user_id", "item_ids"}``: a user drawn from ``user_ids``, ``candidates``
    distinct items drawn from ``item_ids`` (both deduplicated first), reproducible for a ``seed``."""
    users, items = np.unique(np.asarray(user_ids)), np.unique(np.asarray(item_ids))
    if len(users) == 0 or len(items) < candidates:
        raise BenchError(f"need at least one user and {candidates} distinct items to sample requests from, "
                         f"found {len(users)} users and {len(items)} items: lower --candidates")
    rng = np.random.default_rng(seed)
    return [{"user_id": int(rng.choice(users)), "item_ids": rng.choice(items, candidates, replace=False).tolist()}
            for _ in range(n)]


def data_requests(data_dir: Path, n: int, candidates: int, seed: int) -> list[dict]:
    """:func:`sample_requests` over the users and items of the data dir's interactions."""
    import pyarrow.parquet as pq

    from llm_features.workspace import Workspace

    path = Workspace.at(data_dir).interactions
    if not path.exists():
        raise BenchError(f"{path} not found: prepare the data dir first (`make demo`, or `llmfeat demo --data-dir "
                         "DIR`) and pass --data-dir DIR")
    t = pq.read_table(path, columns=["user_id", "item_id"])
    return sample_requests(t.column("user_id").to_numpy(), t.column("item_id").to_numpy(), n, candidates, seed)


# ---------------------------------------------------------------------------------------------
# Stores


def open_bench_store(repo: Path, data_dir: Path, store: str):
    from llm_features.store import open_store

    return open_store(repo, data_dir, fs_yaml_file=REDIS_YAML if store == "redis" else None, must_exist=True)


def materialize_redis(repo: Path, data_dir: Path) -> float:
    """Apply + materialise ``data_dir`` into Redis through the redis_local yaml ($LLMFEAT_REDIS); seconds."""
    from llm_features.store import apply_definitions, materialize_all, open_store
    from llm_features.workspace import Workspace

    t0 = time.perf_counter()
    with Workspace.at(data_dir).lock("bench_serving: materialize into Redis"):
        store = open_store(repo, data_dir, fs_yaml_file=REDIS_YAML)
        with contextlib.redirect_stdout(sys.stderr):  # feast prints every object's diff and its progress
            apply_definitions(store)
            materialize_all(store)
    return time.perf_counter() - t0


def feast_lookup_latency(store, ranker_dir: Path, bodies: Sequence[dict], reps: int, warmup: int = 20) -> dict:
    """Bare ``store.get_online_features``: per request, one call with the user's refs and one with the
    candidates' refs (those the ranker reads), ``reps`` requests after ``warmup``; ms percentiles."""
    from ranker.serve import Ranker

    user_refs, item_refs = Ranker.load(ranker_dir, store=store).feature_refs()

    def one(body: dict) -> float:
        t = time.perf_counter()
        if user_refs:
            store.get_online_features(features=user_refs, entity_rows=[{"user_id": body["user_id"]}]).to_dict()
        if item_refs:
            store.get_online_features(features=item_refs,
                                      entity_rows=[{"item_id": i} for i in body["item_ids"]]).to_dict()
        return (time.perf_counter() - t) * 1e3

    for i in range(warmup):
        one(bodies[i % len(bodies)])
    ms = sorted(one(bodies[i % len(bodies)]) for i in range(reps))
    pct = {f"p{name}_ms": round(loadgen.percentile(ms, q), 3) for name, q in (("50", 50), ("99", 99), ("999", 99.9))}
    return {**pct, "mean_ms": round(float(np.mean(ms)), 3), "reps": reps,
            "calls": {"user_refs": len(user_refs), "item_refs": len(item_refs)}}


def bench_store(store: str, args, bodies: list[dict], workdir: Path) -> dict:
    """One store: bare Feast latency, then `llmfeat serve` at each concurrency."""
    out: dict = {}
    env = child_env()
    if store == "redis":
        conn = args.redis or os.environ.get("LLMFEAT_REDIS")
        if not conn:
            return {"skipped": "no Redis: pass --redis HOST:PORT or set LLMFEAT_REDIS "
                               "(export LLMFEAT_REDIS=$(bash scripts/start_redis.sh))"}
        os.environ["LLMFEAT_REDIS"] = env["LLMFEAT_REDIS"] = conn
        out["connection"] = conn
        print(f"== redis: materialising {args.data_dir} into {conn}", flush=True)
        out["materialize_s"] = round(materialize_redis(args.repo, args.data_dir), 2)
    print(f"== {store}: bare Feast get_online_features ({args.feast_reps} requests)", flush=True)
    out["feast_get_online_features"] = feast_lookup_latency(open_bench_store(args.repo, args.data_dir, store),
                                                            args.ranker, bodies, args.feast_reps)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    base = llmfeat_command()
    cmd = [*base, "serve", "--ranker", str(args.ranker), "--repo", str(args.repo),
           "--data-dir", str(args.data_dir), "--host", "127.0.0.1", "--port", str(port),
           "--workers", str(args.workers), "--threads", str(args.threads)]
    if store == "redis":
        cmd += ["--feature-store-yaml", REDIS_YAML]
    out["serve_command"] = "llmfeat " + shlex.join(cmd[len(base):])
    log = workdir / f"serve_{store}.log"
    print(f"== {store}: {out['serve_command']}", flush=True)
    with running_server(cmd, env, log, url, args.startup_timeout) as startup_s:
        out["serve_startup_s"] = round(startup_s, 2)
        status, answer = _get_json(f"{url}/score", bodies[0], timeout=args.timeout)
        scores = answer.get("scores")
        if status != 200 or not isinstance(scores, list) or len(scores) != len(bodies[0]["item_ids"]):
            raise BenchError(f"POST {url}/score answered {status} {str(answer)[:300]}: expected "
                             f"{{\"user_id\", \"scores\": [{len(bodies[0]['item_ids'])} floats]}}")
        encoded = [json.dumps(b).encode() for b in bodies]
        levels = {}
        for c in args.concurrency:
            r = loadgen.run_subprocess(f"{url}/score", encoded, c, args.seconds, args.warmup, args.timeout)
            levels[str(c)] = asdict(r)
            print(f"   {c:4d} clients: {r.rps:8.1f} rps  p50 {r.p50_ms} ms  p99 {r.p99_ms} ms  "
                  f"p99.9 {r.p999_ms} ms  errors {r.errors}", flush=True)
    feast_p99 = out["feast_get_online_features"]["p99_ms"]
    one = levels.get("1")
    if one is not None and one["p99_ms"] is not None and feast_p99:
        one["p99_ratio_to_feast"] = round(one["p99_ms"] / feast_p99, 2)
    out["levels"] = levels
    return out


# ---------------------------------------------------------------------------------------------
# Report


def render_md(r: dict) -> str:
    s = r["settings"]
    lines = [
        "# Serving: `llmfeat serve` under closed-loop load",
        "",
        f"{r['when']}, {r['machine']['platform']}, {r['machine']['cpus']} CPUs (load average "
        f"{r['machine']['load_avg_1m']} at the end). Data dir `{r['data_dir']}`, ranker `{r['ranker']}`.",
        f"`POST /score`, 1 user + {s['candidates']} candidates per request ({s['requests_sampled']} requests sampled "
        f"with seed {s['seed']}, sent in turn); each client sends its next request when the answer arrives "
        f"(`bench/loadgen.py`, its own process, HTTP/1.1 keep-alive); {s['warmup_s']} s warm-up, then "
        f"{s['seconds']} s measured per level. Server: {s['workers']} worker(s), {s['threads']} thread(s). "
        "rps: 2xx answers per second; latency percentiles over 2xx answers; errors: non-2xx, connection "
        f"failures and timeouts ({s['timeout_s']} s).",
        "",
        "| store | clients | rps | p50 ms | p99 ms | p99.9 ms | errors | p99 / Feast p99 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def cell(x) -> str:
        if x is None:
            return "-"
        return f"{x:,.2f}" if isinstance(x, float) and abs(x) < 10 else (f"{x:,.1f}" if isinstance(x, float) else f"{x:,}")

    feast_rows = []
    for store, d in r["stores"].items():
        if "skipped" in d or "error" in d:
            lines.append(f"| {store} | - | {d.get('skipped') or 'failed: ' + d['error']} | | | | | |")
            continue
        for c, lv in d["levels"].items():
            ratio = lv.get("p99_ratio_to_feast")
            lines.append(f"| {store} | {c} | {cell(lv['rps'])} | {cell(lv['p50_ms'])} | {cell(lv['p99_ms'])} | "
                         f"{cell(lv['p999_ms'])} | {lv['errors']} | {'-' if ratio is None else f'{ratio:.2f}x'} |")
        f = d["feast_get_online_features"]
        feast_rows.append(f"| {store} | {cell(f['p50_ms'])} | {cell(f['p99_ms'])} | {cell(f['p999_ms'])} | "
                          f"{f['reps']} |")
    if feast_rows:
        lines += [
            "",
            "Feast alone, in-process, one request at a time: `store.get_online_features` for the user's refs, then "
            "for the candidates' refs (the two reads `llmfeat serve` makes per request without its caches):",
            "",
            "| store | p50 ms | p99 ms | p99.9 ms | requests |",
            "|---|---:|---:|---:|---:|",
            *feast_rows,
        ]
    for store, d in r["stores"].items():
        if "serve_command" in d:
            extra = f"; materialised into Redis in {d['materialize_s']} s" if "materialize_s" in d else ""
            lines.append(f"\n{store}: `{d['serve_command']}` (ready after {d['serve_startup_s']} s{extra}).")
    lines += ["", f"Command: `{r['command']}`", ""]
    return "\n".join(lines)


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_p99, ax_rps) = plt.subplots(1, 2, figsize=(10, 4))
    for store, d in r["stores"].items():
        levels = d.get("levels") or {}
        xs = [int(c) for c in levels]
        if not xs:
            continue
        line, = ax_p99.plot(xs, [levels[str(c)]["p99_ms"] for c in xs], marker="o", label=f"{store}: serve p99")
        ax_p99.axhline(d["feast_get_online_features"]["p99_ms"], ls="--", color=line.get_color(), lw=1,
                       label=f"{store}: bare Feast p99")
        ax_rps.plot(xs, [levels[str(c)]["rps"] for c in xs], marker="o", label=store)
    levels = sorted({int(c) for d in r["stores"].values() for c in d.get("levels") or {}})
    for ax, title, unit in ((ax_p99, "p99 latency (log scale)", "ms"), (ax_rps, "throughput (2xx)", "requests/s")):
        ax.set_xscale("log", base=2)
        if levels:
            ax.set_xticks(levels, [str(c) for c in levels])
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    if ax_p99.lines:
        ax_p99.set_yscale("log")  # from a few ms at one client to seconds of queueing at 128
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def write_report(r: dict, out: Path, name: str) -> list[Path]:
    """``<name>.json``, ``<name>.md`` and ``<name>.png`` in ``out``, each written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.json", out / f"{name}.md", out / f"{name}.png"]
    for path, text in ((paths[0], json.dumps(r, indent=2) + "\n"), (paths[1], render_md(r))):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    plot(r, paths[2])
    return paths


# ---------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", type=Path, default=None,
                    help="data dir with the trained ranker [default: $LLMFEAT_DATA_DIR, else feast_repo/data]")
    ap.add_argument("--ranker", type=Path, default=None, help="ranker checkpoint [default: <data-dir>/runs/ranker_llm]")
    ap.add_argument("--repo", type=Path, default=ROOT / "feast_repo", help="the Feast feature repository")
    ap.add_argument("--redis", default=None, help="Redis connection string host:port[,db=N] [default: $LLMFEAT_REDIS]")
    ap.add_argument("--stores", nargs="+", choices=STORES, default=list(STORES))
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 128], help="client counts")
    ap.add_argument("--seconds", type=float, default=20.0, help="measured seconds per concurrency")
    ap.add_argument("--warmup", type=float, default=3.0, help="warm-up seconds before each measurement")
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds a client waits for an answer")
    ap.add_argument("--candidates", type=int, default=100, help="items per request")
    ap.add_argument("--requests", type=int, default=1000, help="distinct request bodies sampled (sent in turn)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--feast-reps", type=int, default=500, help="requests timed through bare Feast per store")
    ap.add_argument("--workers", type=int, default=1, help="llmfeat serve --workers")
    ap.add_argument("--threads", type=int, default=1, help="llmfeat serve --threads")
    ap.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to wait for /health")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: 2 s per level at 1 and 8 clients; writes serving_quick.* instead")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args(argv)
    if args.quick:
        args.seconds, args.warmup, args.concurrency = min(args.seconds, 2.0), min(args.warmup, 0.5), [1, 8]
        args.feast_reps, args.requests = min(args.feast_reps, 50), min(args.requests, 100)
    if args.data_dir is None:
        env = os.environ.get("LLMFEAT_DATA_DIR")
        args.data_dir = Path(env) if env else ROOT / "feast_repo" / "data"
    args.data_dir, args.repo = args.data_dir.resolve(), args.repo.resolve()
    args.ranker = (args.ranker or args.data_dir / "runs" / "ranker_llm").resolve()
    if min(args.concurrency) < 1 or args.seconds <= 0 or args.candidates < 1 or args.requests < 1:
        ap.error("--concurrency, --seconds, --candidates and --requests must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_serve_available()
        if not args.ranker.is_dir():
            raise BenchError(f"ranker checkpoint {args.ranker} not found: train one (`llmfeat ranker train --data-dir "
                             f"{args.data_dir}`, or `make demo`) or pass --ranker DIR")
        bodies = data_requests(args.data_dir, args.requests, args.candidates, args.seed)
        result = {
            "benchmark": "serving",
            "when": "",
            "machine": {},
            "command": "python bench/bench_serving.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
            "data_dir": str(args.data_dir), "ranker": str(args.ranker),
            "settings": {"concurrency": args.concurrency, "seconds": args.seconds, "warmup_s": args.warmup,
                         "timeout_s": args.timeout, "candidates": args.candidates, "requests_sampled": args.requests,
                         "seed": args.seed, "feast_reps": args.feast_reps, "workers": args.workers,
                         "threads": args.threads},
            "stores": {},
        }
        with tempfile.TemporaryDirectory(prefix="bench_serving_") as tmp:
            for store in args.stores:
                try:
                    result["stores"][store] = bench_store(store, args, bodies, Path(tmp))
                except (BenchError, UserError) as err:  # the other store may still run; the exit code says so
                    print(f"error: {store}: {err}", file=sys.stderr)
                    result["stores"][store] = {"error": str(err).splitlines()[0]}
    except (BenchError, UserError) as err:  # UserError: llmfeat's own, e.g. a data dir never materialised
        print(f"error: {err}", file=sys.stderr)
        return 1
    result["when"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    result["machine"] = {"platform": platform.platform(), "python": platform.python_version(),
                         "cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2)}
    paths = write_report(result, args.out, "serving_quick" if args.quick else "serving")
    print(render_md(result))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 1 if any("error" in d for d in result["stores"].values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
