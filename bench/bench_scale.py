"""The scale curve: every stage on the embedded defaults, on synthetic logs of 1M to 30M interactions.

A synthetic log per size with the skew of real ones: item popularity and user activity follow power
laws (Zipf exponents 1.05 and 1.2), every interaction's behaviour text is its item's text (so texts
repeat as often as items are popular), ratings 1-5, timestamps over a year. Items grow as
5,000 x sqrt(size / 1M), users as size / 150. Then, as a user would run them (each a child process
whose peak RSS, process tree included, is sampled every 0.2 s):

    ingest (generic parquet) -> encode -> finetune (--max-steps, targets/s) -> embed-users
    -> feast materialize -> ranker train (the historical fetch, then 1 epoch) -> online reads

A stage that would run for hours here gets a time budget (``--stage-budget-s``) and reports the share
it finished and its rate: embed-users writes its parts as it goes, so its share is the rows written
over the snapshots asked for; materialize may get one too (``--materialize-budget-s``: the share of
its time windows finished); finetune runs a fixed number of steps; ranker training reads at most
``--ranker-rows`` train rows. Every stage is killed above ``--rss-cap-gb`` (the table says so).

Writes ``<out>/scale.json`` (per stage, per size: ``seconds``, ``peak_rss_mb``, ``rows_per_s``, the
share, the status), ``scale.md`` and ``scale.png`` (log-log), and marks each stage whose time grows
faster than linearly (log-log slope > 1.15) and whose memory grows with the data (slope > 0.3)
rather than staying bounded, with the size at which that memory would pass this machine's RAM.

Resumable: each finished (size, stage) is kept in ``<work>/<size>/results.json`` and skipped by
``--reuse``, so the sizes can run across sessions::

    python bench/bench_scale.py --sizes 1000000 3000000 10000000 30000000 --work /tmp/scale --reuse
    python bench/bench_scale.py --quick          # 100k interactions, a smoke test
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from proc_sampler import run_sampled  # noqa: E402

BIN = Path(sys.executable).parent
STAGES = ["ingest", "encode", "finetune", "embed-users", "materialize", "ranker-train", "online"]
US_PER_S = 1_000_000


# ------------------------------------------------------------------------------------------ data
def generate(path: Path, n: int, seed: int = 0) -> dict:
    """interactions.parquet and items.parquet of a skewed synthetic log of ``n`` interactions."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    n_items = int(5000 * math.sqrt(n / 1e6))
    n_users = max(100, n // 150)
    item_p = 1.0 / np.arange(1, n_items + 1) ** 1.05
    item_p /= item_p.sum()
    user_w = 1.0 / np.arange(1, n_users + 1) ** 1.2 + 30.0 / n_users  # a floor: every user has a few rows
    counts = np.maximum(1, np.round(user_w / user_w.sum() * n)).astype(np.int64)
    counts[0] += n - counts.sum()  # exactly n rows
    users = np.repeat(rng.permutation(n_users) + 1, counts)
    items = rng.choice(n_items, size=n, p=item_p) + 1
    start = 1_600_000_000 * US_PER_S
    # distinct seconds over a year (a log has no two events of a user and an item at one instant)
    ts = start + (rng.permutation(n) * (365 * 86_400 // max(n, 365 * 86_400 // 1000))) * US_PER_S
    rating = rng.integers(1, 6, size=n)
    path.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"user": users, "item": items, "ts": pa.array(ts // US_PER_S, pa.int64()),
                             "rating": rating.astype(np.int64)}), path / "interactions.parquet",
                   row_group_size=1_000_000)
    genres = np.array(["Drama", "Comedy", "Action", "Thriller", "Romance", "Horror", "Documentary", "Sci-Fi"])
    ids = np.arange(1, n_items + 1)
    pq.write_table(pa.table({
        "item": ids,
        "title": [f"Synthetic title {i} ({1950 + i % 70})" for i in ids],
        "genres": ["|".join(genres[[i % 8, (i * 7) % 8]]) for i in ids],
    }), path / "items.parquet")
    return {"interactions": n, "items": n_items, "users": n_users}


# ------------------------------------------------------------------------------------------ stages
def _llmfeat(*args: str) -> list[str]:
    return [str(BIN / "llmfeat"), *args]


def stage_command(stage: str, work: Path, a) -> list[str]:
    data, src = work / "data", work / "source"
    if stage == "ingest":
        return _llmfeat("ingest", "--format", "generic", "--interactions", str(src / "interactions.parquet"),
                        "--items", str(src / "items.parquet"), "--map", "user_id=user", "--map", "item_id=item",
                        "--map", "event_timestamp=ts", "--map", "rating=rating", "--map", "genres=genres",
                        "--item-text-column", "title,genres", "--timestamp-unit", "s", "--data-dir", str(data))
    if stage == "encode":
        return _llmfeat("encode", "--data-dir", str(data), "--no-progress")
    if stage == "finetune":
        cap = ["--max-targets", str(a.finetune_max_targets)] if a.finetune_max_targets else []
        return _llmfeat("finetune", "--data-dir", str(data), "--out", str(work / "tower"),
                        "--max-steps", str(a.finetune_steps), "--epochs", "1", "--num-threads", str(a.threads), *cap)
    if stage == "embed-users":
        # small parts: a stage cut by its budget keeps what it finished, which measures its rate
        return _llmfeat("embed-users", "--data-dir", str(data), "--checkpoint", str(work / "tower"),
                        "--num-threads", str(a.threads), "--users-per-part", "20")
    if stage == "materialize":
        return _llmfeat("feast", "materialize", "--data-dir", str(data))
    if stage == "ranker-train":
        return _llmfeat("ranker", "train", "--data-dir", str(data), "--out", str(work / "ranker"),
                        "--tower", str(work / "tower"), "--epochs", "1", "--max-train-rows", str(a.ranker_rows),
                        "--no-validate", "--no-progress", "--threads", str(a.threads))
    if stage == "online":
        return [sys.executable, __file__, "--online-child", str(data), "--lookups", str(a.lookups)]
    raise ValueError(stage)


def online_child(data: Path, lookups: int) -> None:
    """p50/p99 of one user + 100 candidates through the ranker_llm service, warm."""
    import pyarrow.parquet as pq

    from llm_features.store import online_features, open_store

    store = open_store(REPO / "feast_repo", data)
    inter = pq.read_table(data / "canonical" / "interactions.parquet", columns=["user_id", "item_id"])
    users = np.unique(inter["user_id"].to_numpy())
    items = np.unique(inter["item_id"].to_numpy())
    rng = np.random.default_rng(0)
    online_features(store, int(users[0]), items[:100].tolist(), "ranker_llm")  # warm
    lat = []
    t0 = time.perf_counter()
    for _ in range(lookups):
        t = time.perf_counter()
        online_features(store, int(rng.choice(users)), rng.choice(items, 100, replace=False).tolist(), "ranker_llm")
        lat.append(time.perf_counter() - t)
    print(json.dumps({"rows": lookups, "seconds": time.perf_counter() - t0,
                      "p50_ms": 1e3 * float(np.percentile(lat, 50)), "p99_ms": 1e3 * float(np.percentile(lat, 99))}))


def rows_of(stage: str, work: Path, info: dict, log_tail: str) -> tuple[float, float | None]:
    """(rows the stage processed, share of the stage's whole work when it stopped short)."""
    import pyarrow.parquet as pq

    data = work / "data"
    if stage == "ingest":
        return info["interactions"], None
    if stage == "materialize":  # cut by --materialize-budget-s: the share of its time windows finished
        import re

        found = re.findall(r"materialising \(window (\d+) of (\d+)\)", (work / "materialize.log").read_text())
        if "materialized" in log_tail or not found:
            return info["interactions"], None
        share = (int(found[-1][0]) - 1) / int(found[-1][1])  # the last window named was still running
        return info["interactions"] * share, share
    if stage == "encode":
        report = json.loads((data / "encode_report.json").read_text())
        return report["texts_encoded"] + report["already_encoded"], None
    if stage == "finetune":  # training targets (the rate is end to end: loading and evaluation included)
        m = work / "tower" / "metrics.json"
        metrics = json.loads(m.read_text()) if m.exists() else {}
        return metrics.get("train_targets", 0), None
    if stage == "embed-users":
        import re

        from llm_features.parquet_io import list_parts

        written = sum(pq.read_metadata(p).num_rows for p in list_parts(data / "user_embeddings"))
        found = re.search(r"embed-users: (\d+) snapshots", (work / "embed-users.log").read_text())
        wanted = int(found.group(1)) if found else written
        return written, (written / wanted if wanted else None)
    if stage == "ranker-train":  # train rows fetched and trained on (end to end)
        m = work / "ranker" / "metrics.json"
        metrics = json.loads(m.read_text()) if m.exists() else {}
        return metrics.get("train_rows", 0), None
    if stage == "online":
        last = [line for line in log_tail.splitlines() if line.startswith("{")]
        return (json.loads(last[-1])["rows"] if last else 0), None
    return 0, None


def run_size(n: int, a) -> dict:
    work = a.work / str(n)
    results_path = work / "results.json"
    results = json.loads(results_path.read_text()) if (a.reuse and results_path.exists()) else {}
    info_path = work / "source" / "info.json"
    if not (a.reuse and info_path.exists()):
        shutil.rmtree(work, ignore_errors=True)
        t0 = time.perf_counter()
        info = generate(work / "source", n)
        info["generate_seconds"] = time.perf_counter() - t0
        info_path.write_text(json.dumps(info))
        results = {}
    info = json.loads(info_path.read_text())
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": str(a.threads)}
    for stage in STAGES:
        if stage in results and results[stage].get("status") in ("ok", "budget"):
            continue
        if any(results.get(s, {}).get("status") not in ("ok", "budget") for s in STAGES[: STAGES.index(stage)]):
            results[stage] = {"status": "skipped (an earlier stage failed)"}
            continue
        budget = (a.stage_budget_s if stage == "embed-users" else
                  a.materialize_budget_s if stage == "materialize" and a.materialize_budget_s else a.stage_timeout_s)
        run = run_sampled(stage_command(stage, work, a), cap_gb=a.rss_cap_gb, env=env,
                          log_path=work / f"{stage}.log", timeout_s=budget)
        over_budget = run.returncode not in (0, None) and not run.killed_at_cap and run.seconds >= budget - 1
        status = ("ok" if run.returncode == 0 else f"killed above the {a.rss_cap_gb:g} GB cap" if run.killed_at_cap
                  else "budget" if over_budget and stage in ("embed-users", "materialize")
                  else f"failed (exit {run.returncode})")
        rows, share = rows_of(stage, work, info, run.output_tail) if status in ("ok", "budget") else (0, None)
        results[stage] = {"status": status, "seconds": round(run.seconds, 2), "peak_rss_mb": run.peak_rss_mb,
                          "rows": rows, "rows_per_s": round(rows / run.seconds, 1) if run.seconds else None,
                          "share": share}
        if stage == "finetune" and a.finetune_max_targets:
            results[stage]["max_targets"] = a.finetune_max_targets  # evaluation on a capped share of targets
        if stage == "online" and status == "ok":
            last = [line for line in run.output_tail.splitlines() if line.startswith("{")]
            if last:
                results[stage].update({k: round(v, 2) for k, v in json.loads(last[-1]).items() if k.endswith("_ms")})
        if status not in ("ok", "budget"):
            results[stage]["log_tail"] = run.output_tail[-600:]
        print(f"[{n:,}] {stage}: {json.dumps(results[stage])}", flush=True)
        results_path.write_text(json.dumps(results, indent=2))
    return {"info": info, "stages": results}


# ------------------------------------------------------------------------------------------ report
def slope(xs: list[float], ys: list[float]) -> float | None:
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x and y and x > 0 and y > 0]
    if len(pts) < 2:
        return None
    x, y = np.array(pts).T
    return float(np.polyfit(x, y, 1)[0])


def analyse(sizes: list[int], per_size: dict) -> dict:
    ram_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
    out = {}
    for stage in STAGES:
        ok = [(n, per_size[str(n)]["stages"].get(stage, {})) for n in sizes]
        ok = [(n, r) for n, r in ok if r.get("status") in ("ok", "budget")]
        # time per unit of work, so a stage cut by its budget still compares; a finetune whose evaluation
        # was capped (--finetune-max-targets) did other work than an uncapped one: not in the time slope
        timed = [(n, r) for n, r in ok if not r.get("max_targets")]
        t = slope([n for n, _ in timed], [r["seconds"] / (r["share"] or 1.0) for _, r in timed])
        m = slope([n for n, _ in ok], [r["peak_rss_mb"] for _, r in ok])
        entry = {"time_slope": t, "memory_slope": m,
                 "superlinear": t is not None and t > 1.15,
                 "memory": None if m is None else ("grows with the data" if m > 0.3 else "bounded")}
        if m is not None and m > 0.3 and ok:
            n0, r0 = ok[-1]
            entry["stops_at_interactions"] = int(n0 * (ram_mb / r0["peak_rss_mb"]) ** (1 / m))
        out[stage] = entry
    return out


def write_report(a, sizes: list[int], per_size: dict) -> None:
    analysis = analyse(sizes, per_size)
    stem = "scale_quick" if a.quick else "scale"
    payload = {"sizes": sizes, "per_size": per_size, "analysis": analysis,
               "stages": {st: {str(n): {k: per_size[str(n)]["stages"].get(st, {}).get(k)
                                        for k in ("seconds", "peak_rss_mb", "rows_per_s", "share", "status")}
                               for n in sizes} for st in STAGES},
               "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                           "ram_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)},
               "command": "python bench/bench_scale.py " + " ".join(sys.argv[1:])}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"{stem}.json").write_text(json.dumps(payload, indent=2))
    lines = ["# Scale: every stage on the embedded defaults, synthetic skewed logs", "",
             f"`{payload['command']}` on {payload['machine']['cpus']} CPUs, {payload['machine']['ram_gb']} GB RAM. "
             "Share: the part of the stage's work done within its budget (rates are per processed row).", "",
             "| stage | " + " | ".join(f"{n:,}" for n in sizes) + " | time slope | memory |",
             "|---|" + "---|" * len(sizes) + "---|---|"]
    for st in STAGES:
        cells = []
        for n in sizes:
            r = per_size[str(n)]["stages"].get(st, {})
            if st == "online" and r.get("status") == "ok":
                cells.append(f"p50 {r.get('p50_ms', 0):.0f} ms, p99 {r.get('p99_ms', 0):.0f} ms, "
                             f"{r['peak_rss_mb'] / 1024:.1f} GB")
            elif r.get("status") in ("ok", "budget"):
                share = f", {r['share']:.0%} share" if r.get("share") not in (None, 1.0) else ""
                share += f", at most {r['max_targets']:,} targets per split" if r.get("max_targets") else ""
                cells.append(f"{r['seconds']:.0f} s, {r['peak_rss_mb'] / 1024:.1f} GB, "
                             f"{r['rows_per_s'] or 0:,.0f}/s{share}")
            else:
                cells.append(r.get("status", "not run"))
        an = analysis[st]
        ts = "n/a" if an["time_slope"] is None else f"{an['time_slope']:.2f}{' (superlinear)' if an['superlinear'] else ''}"
        mem = an["memory"] or "n/a"
        if an.get("stops_at_interactions"):
            mem += f"; passes RAM near {an['stops_at_interactions']:,}"
        lines.append(f"| {st} | " + " | ".join(cells) + f" | {ts} | {mem} |")
    (a.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for st in STAGES:
            pts = [(n, per_size[str(n)]["stages"].get(st, {})) for n in sizes]
            pts = [(n, r) for n, r in pts if r.get("status") in ("ok", "budget")]
            if pts:
                axes[0].loglog([n for n, _ in pts], [r["seconds"] / (r["share"] or 1) for _, r in pts], "o-", label=st)
                axes[1].loglog([n for n, _ in pts], [r["peak_rss_mb"] for _, r in pts], "o-", label=st)
        axes[0].set(xlabel="interactions", ylabel="seconds (for the whole work)", title="time")
        axes[1].set(xlabel="interactions", ylabel="peak RSS (MB)", title="memory")
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(a.out / f"{stem}.png", dpi=110)
    except ImportError:
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 3_000_000, 10_000_000, 30_000_000])
    ap.add_argument("--work", type=Path, default=Path("/tmp/llmfeat-bench-scale"))
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--reuse", action="store_true", help="keep finished (size, stage) results in --work")
    ap.add_argument("--quick", action="store_true", help="100k interactions only, small budgets")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--finetune-steps", type=int, default=40)
    ap.add_argument("--finetune-max-targets", type=int, default=None,
                    help="finetune --max-targets: cap each split's targets (its evaluation, mostly) to a labelled "
                         "share; left out of finetune's time slope")
    ap.add_argument("--ranker-rows", type=int, default=1_000_000)
    ap.add_argument("--lookups", type=int, default=200)
    ap.add_argument("--stage-budget-s", type=float, default=900, help="time budget of embed-users")
    ap.add_argument("--materialize-budget-s", type=float, default=None,
                    help="time budget of materialize (default: none); cut short, the share of its time windows "
                         "finished is reported, and the stages after it read what was materialised")
    ap.add_argument("--stage-timeout-s", type=float, default=3 * 3600, help="any other stage: a failure past this")
    ap.add_argument("--rss-cap-gb", type=float, default=20.0)
    ap.add_argument("--report-only", action="store_true",
                    help="write the report from the finished (size, stage) results in --work, run nothing")
    ap.add_argument("--online-child", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.online_child:
        online_child(a.online_child, a.lookups)
        return
    if a.quick:
        a.sizes, a.finetune_steps, a.ranker_rows, a.lookups, a.stage_budget_s = [100_000], 5, 50_000, 20, 120
    per_size = {}
    for n in a.sizes:
        if a.report_only:
            work = a.work / str(n)
            if not (work / "results.json").exists():
                continue
            per_size[str(n)] = {"info": json.loads((work / "source" / "info.json").read_text()),
                                "stages": json.loads((work / "results.json").read_text())}
        else:
            per_size[str(n)] = run_size(n, a)
    a.sizes = [n for n in a.sizes if str(n) in per_size]
    write_report(a, a.sizes, per_size)


if __name__ == "__main__":
    main()
