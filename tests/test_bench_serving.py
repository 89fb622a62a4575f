"""bench/bench_serving.py: the pieces that need no `llmfeat serve` (request sampling, the report from a
fake result, starting and stopping a server subprocess, the refusal without `llmfeat serve`), and a
--quick run end to end on a small shop log (slow; needs `llmfeat serve`)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"


def _bench_serving():
    spec = importlib.util.spec_from_file_location("bench_serving_under_test", BENCH / "bench_serving.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


bs = _bench_serving()


def test_sample_requests_are_seeded_and_distinct():
    users, items = np.array([5, 5, 7, 9]), np.arange(100, 400)
    a = bs.sample_requests(users, items, n=50, candidates=100, seed=3)
    assert a == bs.sample_requests(users, items, n=50, candidates=100, seed=3)
    assert a != bs.sample_requests(users, items, n=50, candidates=100, seed=4)
    assert len(a) == 50 and {r["user_id"] for r in a} <= {5, 7, 9}
    for r in a:
        assert len(r["item_ids"]) == 100 == len(set(r["item_ids"])) and set(r["item_ids"]) <= set(items.tolist())
        assert isinstance(r["user_id"], int) and all(isinstance(i, int) for i in r["item_ids"])
    json.dumps(a)  # the bodies go out as JSON
    with pytest.raises(bs.BenchError, match="--candidates"):
        bs.sample_requests(users, np.array([1, 2, 2, 3]), n=1, candidates=4)


def test_data_requests_read_the_interactions(tmp_path):
    from llm_features.workspace import Workspace

    with pytest.raises(bs.BenchError, match="--data-dir"):
        bs.data_requests(tmp_path, 5, 2, 0)
    path = Workspace.at(tmp_path).interactions
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"user_id": [1, 1, 2, 3], "item_id": [10, 11, 12, 10], "label": [1, 0, 1, 0]}), path)
    reqs = bs.data_requests(tmp_path, 5, 3, 0)
    assert reqs == bs.sample_requests(np.array([1, 1, 2, 3]), np.array([10, 11, 12, 10]), 5, 3, 0)


def _level(rps, p99, errors=0):
    return {"concurrency": 1, "seconds": 20.0, "warmup_s": 3.0, "requests": 100 + errors, "ok": 100,
            "errors": errors, "error_kinds": {"timeout": errors} if errors else {}, "rps": rps, "p50_ms": p99 / 2,
            "p99_ms": p99, "p999_ms": p99 * 1.5, "mean_ms": p99 / 2, "max_ms": p99 * 2, "total": {}}


def fake_result() -> dict:
    sqlite = {"feast_get_online_features": {"p50_ms": 9.0, "p99_ms": 12.0, "p999_ms": 15.0, "mean_ms": 9.5,
                                            "reps": 500, "calls": {"user_refs": 6, "item_refs": 3}},
              "serve_command": "llmfeat serve --ranker r --port 1", "serve_startup_s": 8.1,
              "levels": {"1": {**_level(40.5, 30.0), "p99_ratio_to_feast": 2.5}, "8": _level(55.25, 210.0),
                         "32": _level(56.0, 800.0, errors=2)}}
    return {"benchmark": "serving", "when": "2026-01-01T00:00:00+00:00",
            "machine": {"platform": "Linux", "python": "3.11", "cpus": 2, "load_avg_1m": 1.0},
            "command": "python bench/bench_serving.py --seconds 20", "data_dir": "/d", "ranker": "/d/runs/ranker_llm",
            "settings": {"concurrency": [1, 8, 32], "seconds": 20.0, "warmup_s": 3.0, "timeout_s": 30.0,
                         "candidates": 100, "requests_sampled": 1000, "seed": 0, "feast_reps": 500, "workers": 1,
                         "threads": 1},
            "stores": {"sqlite": sqlite, "redis": {"skipped": "no Redis: pass --redis HOST:PORT"}}}


def test_report_from_a_fake_result(tmp_path):
    paths = bs.write_report(fake_result(), tmp_path / "results", "serving")
    assert [p.name for p in paths] == ["serving.json", "serving.md", "serving.png"]
    assert json.loads(paths[0].read_text()) == fake_result()
    md = paths[1].read_text()
    assert "| sqlite | 1 | 40.5 | 15.0 | 30.0 | 45.0 | 0 | 2.50x |" in md
    assert "| sqlite | 32 | 56.0 | 400.0 | 800.0 | 1,200.0 | 2 | - |" in md
    assert "| redis | - | no Redis: pass --redis HOST:PORT |" in md
    assert "| sqlite | 9.00 | 12.0 | 15.0 | 500 |" in md
    assert "Command: `python bench/bench_serving.py --seconds 20`" in md
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in (tmp_path / "results").iterdir() if p.name.startswith(".")], "no temporary files left"


def test_refuses_without_llmfeat_serve(monkeypatch, capsys, tmp_path):
    import llm_features.cli

    monkeypatch.setattr(llm_features.cli, "COMMANDS", {k: v for k, v in llm_features.cli.COMMANDS.items()
                                                       if k != "serve"})
    assert bs.main(["--quick", "--data-dir", str(tmp_path), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: `llmfeat serve` is not available") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_help_runs_as_a_script():
    proc = subprocess.run([sys.executable, str(BENCH / "bench_serving.py"), "--help"], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0 and "--redis" in proc.stdout and "--concurrency" in proc.stdout


FAKE_SERVER = """
import sys, uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

async def health(request):
    return JSONResponse({"status": "ok"})

async def score(request):
    body = await request.json()
    return JSONResponse({"user_id": body["user_id"], "scores": [0.5] * len(body["item_ids"])})

app = Starlette(routes=[Route("/health", health), Route("/score", score, methods=["POST"])])
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""


def test_running_server_waits_for_health_and_stops_it(tmp_path):
    script = tmp_path / "fake_serve.py"
    script.write_text(FAKE_SERVER)
    port = bs.free_port()
    url = f"http://127.0.0.1:{port}"
    with bs.running_server([sys.executable, str(script), str(port)], bs.child_env(), tmp_path / "log", url, 60) as s:
        assert s > 0
        status, body = bs._get_json(f"{url}/score", {"user_id": 1, "item_ids": [1, 2, 3]})
        assert status == 200 and body["scores"] == [0.5] * 3
        r = bs.loadgen.run_subprocess(f"{url}/score", [json.dumps({"user_id": 1, "item_ids": [1]}).encode()],
                                      concurrency=2, seconds=0.3)
        assert r.ok > 0 and r.errors == 0
    with pytest.raises(urllib.error.URLError):
        bs._get_json(f"{url}/health", timeout=2)  # stopped: nothing listens any more

    with pytest.raises(bs.BenchError, match="exited with 3 before /health answered"):
        with bs.running_server([sys.executable, "-c", "print('boom'); raise SystemExit(3)"], bs.child_env(),
                               tmp_path / "log2", url, 60):
            pass


# ------------------------------------------------------------------------------------------------
# End to end (slow): a shop log -> ingest, feast materialize, the id-only ranker -> bench --quick


@pytest.mark.slow
@pytest.mark.integration
def test_bench_serving_quick_end_to_end(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from llm_features.cli import main
    from tests.test_byo_data import write_shop

    from tests.test_redis_store import _client, _project_keys, _repo_with_project

    repo, project = _repo_with_project(tmp_path / "feast_repo")  # Redis keys of this test's own project
    write_shop(tmp_path)
    data = tmp_path / "shop_data"
    monkeypatch.chdir(tmp_path)
    common = ["--data-dir", str(data)]
    for args in (["ingest", "--format", "generic", "--interactions", "clicks.csv", "--items", "items.csv",
                  "--map", "user_id=uid", "--map", "item_id=sku", "--map", "event_timestamp=ts", "--map",
                  "rating=stars", "--item-text-column", "title", "--label-rule", "rating>3", *common],
                 ["feast", "materialize", "--repo", str(repo), *common],
                 ["ranker", "train", "--no-llm-features", "--epochs", "1", "--repo", str(repo), *common]):
        res = CliRunner().invoke(main, args, catch_exceptions=False)
        assert res.exit_code == 0, f"{args[:2]}: {res.output[-3000:]}"
    stores = ["sqlite"] + (["redis"] if os.environ.get("LLMFEAT_TEST_REDIS") else [])
    argv = ["--quick", "--data-dir", str(data), "--repo", str(repo), "--ranker", str(data / "runs/ranker_id_only"),
            "--candidates", "10", "--stores", *stores, "--out", str(tmp_path / "results")]
    if "redis" in stores:
        argv += ["--redis", os.environ["LLMFEAT_TEST_REDIS"]]
    try:
        assert bs.main(argv) == 0
    finally:
        if "redis" in stores:
            client = _client(os.environ["LLMFEAT_TEST_REDIS"])
            for key in _project_keys(client, project):
                client.delete(key)
    r = json.loads((tmp_path / "results/serving_quick.json").read_text())
    assert (tmp_path / "results/serving_quick.md").exists() and (tmp_path / "results/serving_quick.png").exists()
    for store in stores:
        d = r["stores"][store]
        assert set(d["levels"]) == {"1", "8"}
        for level in d["levels"].values():
            assert level["ok"] > 0 and level["errors"] == 0 and level["p50_ms"] <= level["p99_ms"]
        assert d["levels"]["1"]["p99_ratio_to_feast"] > 0 and d["feast_get_online_features"]["reps"] == 50


def test_summary_rows_read_serving_json(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_summarize_for_serving", BENCH / "summarize.py")
    summarize = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summarize)
    bs.write_report(fake_result(), tmp_path, "serving")
    rows = {r[1]: r for r in summarize.summary_rows(tmp_path) if r[0] == "serving"}
    sqlite = rows["`llmfeat serve` on SQLite, 1 user + 100 candidates: p99 at 1 client; rps by clients"]
    assert sqlite[2] == "30.0 ms (2.50x bare Feast's); 1: 40, 8: 55, 32: 56"
    assert sqlite[3] == "10 ms, 0.5x; no errors up to 32 clients" and sqlite[5] == "**not met**"  # 30 ms, 2.5x
    assert rows["`llmfeat serve` on Redis, 1 user + 100 candidates: p99 at 1 client; rps by clients"][2] == "not run"
