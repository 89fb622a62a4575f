"""bench/loadgen.py against a tiny Starlette app served by uvicorn on a free loopback port: the counts
agree with the server's, non-2xx answers, refused connections and timeouts are errors of their kind,
and no client ever has two requests in flight. No timing is asserted."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import socket
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _loadgen():
    spec = importlib.util.spec_from_file_location("bench_loadgen_under_test", BENCH / "loadgen.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


loadgen = _loadgen()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class App:
    """Routes: /ok (JSON echo of the body size), /fail (500), /flaky (every 3rd request 500), /slow (1 s,
    not counted: its answers arrive after the client gave up)."""

    def __init__(self) -> None:
        from starlette.applications import Starlette
        from starlette.responses import JSONResponse, PlainTextResponse
        from starlette.routing import Route

        self.by_status: Counter = Counter()
        self.inflight = self.max_inflight = self.flaky_n = 0

        def counted(handler):
            async def endpoint(request):
                self.inflight += 1
                self.max_inflight = max(self.max_inflight, self.inflight)
                try:
                    await asyncio.sleep(0.001)  # let the other clients' requests arrive meanwhile
                    response = await handler(request)
                finally:
                    self.inflight -= 1
                self.by_status[response.status_code] += 1
                return response
            return endpoint

        async def ok(request):
            body = await request.body()
            return JSONResponse({"bytes": len(body), "user_id": json.loads(body)["user_id"] if body else None})

        async def fail(request):
            return PlainTextResponse("boom", status_code=500)

        async def flaky(request):
            self.flaky_n += 1
            return PlainTextResponse("boom", status_code=500) if self.flaky_n % 3 == 0 else JSONResponse({})

        async def slow(request):
            await asyncio.sleep(1.0)
            return JSONResponse({})

        self.app = Starlette(routes=[
            Route("/ok", counted(ok), methods=["GET", "POST"]), Route("/fail", counted(fail), methods=["POST"]),
            Route("/flaky", counted(flaky), methods=["POST"]), Route("/slow", slow, methods=["GET"]),
        ])


@pytest.fixture(scope="module")
def server():
    import uvicorn

    app = App()
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app.app, host="127.0.0.1", port=port, log_level="warning", lifespan="off",
                                        timeout_graceful_shutdown=3))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            pytest.fail("uvicorn did not start")
        time.sleep(0.02)
    yield app, f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(10)


def _reset(app: App) -> None:
    app.by_status.clear()
    app.max_inflight = 0


BODIES = [json.dumps({"user_id": u, "item_ids": list(range(100))}).encode() for u in (1, 2, 3)]


def test_counts_match_the_server(server):
    app, url = server
    _reset(app)
    r = loadgen.run_load_sync(f"{url}/ok", BODIES, concurrency=4, seconds=0.5, warmup_s=0.2)
    assert r.errors == 0 and r.error_kinds == {}
    assert r.ok == r.requests > 0
    # every request sent (warm-up and the in-flight ones at the end included) was answered once, with 200
    assert r.total["sent"] == app.by_status[200] == r.total["by_status"]["200"]
    assert r.total["sent"] >= r.requests and r.total["errors"] == {}
    assert 1 <= app.max_inflight <= 4  # closed loop: one request in flight per client
    assert r.p50_ms <= r.p99_ms <= r.p999_ms <= r.max_ms and r.rps == pytest.approx(r.ok / 0.5, rel=0.01)


def test_server_errors_are_counted(server):
    app, url = server
    _reset(app)
    r = loadgen.run_load_sync(f"{url}/fail", BODIES, concurrency=3, seconds=0.4)
    assert r.ok == 0 and r.errors == r.requests > 0 and r.error_kinds == {"http_500": r.errors}
    assert r.p50_ms is None and r.rps == 0
    assert r.total["by_status"] == {"500": app.by_status[500]} and r.total["errors"] == {"http_500": app.by_status[500]}

    _reset(app)
    r = loadgen.run_load_sync(f"{url}/flaky", BODIES, concurrency=2, seconds=0.4)
    assert r.ok > 0 and r.errors > 0 and r.ok + r.errors == r.requests
    assert r.total["by_status"] == {"200": app.by_status[200], "500": app.by_status[500]}
    assert r.total["sent"] == app.by_status[200] + app.by_status[500]


def test_refused_connections_and_timeouts(server):
    app, url = server
    r = loadgen.run_load_sync(f"http://127.0.0.1:{free_port()}/ok", None, concurrency=2, seconds=0.2)
    assert r.ok == 0 and r.errors > 0 and set(r.error_kinds) == {"connect"} and r.total["sent"] == 0

    r = loadgen.run_load_sync(f"{url}/slow", None, concurrency=2, seconds=0.4, timeout_s=0.1)
    assert r.ok == 0 and r.error_kinds.get("timeout", 0) > 0 and set(r.error_kinds) == {"timeout"}


def test_subprocess_and_cli(server, tmp_path):
    app, url = server
    _reset(app)
    r = loadgen.run_subprocess(f"{url}/ok", BODIES, concurrency=2, seconds=0.3, warmup_s=0.1)
    assert r.ok == r.requests > 0 and r.errors == 0
    assert r.total["sent"] == app.by_status[200]
    with pytest.raises(SystemExit):  # argparse's error: exit 2 with a one-line message
        loadgen.main(["--url", "https://example.org/x"])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(SystemExit):
        loadgen.main(["--url", f"{url}/ok", "--requests", str(empty)])


def test_percentile_nearest_rank():
    xs = [float(i) for i in range(1, 1001)]
    assert loadgen.percentile(xs, 50) == 500.0 and loadgen.percentile(xs, 99) == 990.0
    assert loadgen.percentile(xs, 99.9) == 999.0 and loadgen.percentile(xs[:10], 99.9) == 10.0
    assert loadgen.percentile([], 50) is None
