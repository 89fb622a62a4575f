"""A bounded closed-loop HTTP load generator: ``C`` clients, each with one keep-alive HTTP/1.1
connection and at most one request in flight, sending its next request when the previous answer
has arrived; a warm-up, then a measured window of fixed length.

Run it in a process of its own, never inside the server's (it would take the server's GIL)::

    python bench/loadgen.py --url http://127.0.0.1:8000/score --requests requests.jsonl \\
        --concurrency 8 --seconds 20 --warmup 3 --out result.json

``requests.jsonl`` holds one JSON request body per line; the clients take them in turn (POST), or
send GET without ``--requests``. From Python, :func:`run_subprocess` does exactly that, and
:func:`run_load` is the same loop in the calling process (tests).

What it records, per request that starts inside the measured window and is answered before its end:
the latency and the status. Errors are non-2xx answers (``http_<status>``), connection failures
(``connect``: refused, reset, closed before the answer), ``timeout`` (no answer within
``--timeout``) and ``protocol`` (an answer that is not HTTP/1.1). ``rps`` counts the 2xx answers
per second of the window; the latency percentiles (nearest rank) are over the 2xx answers.
A request still in flight when the window ends is awaited (so the server's count of requests equals
``total.sent``) but not recorded. Only the Python standard library (and uvloop, where installed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

Request = tuple[str, str, bytes | None]
"""(method, path, body): a body is sent as ``application/json``."""


class ProtocolError(Exception):
    """An answer that is not a well-formed HTTP/1.1 response."""


@dataclass
class LoadResult:
    concurrency: int
    seconds: float
    """Length of the measured window (after the warm-up)."""
    warmup_s: float
    requests: int
    """Requests started and answered (or failed) inside the window."""
    ok: int
    errors: int
    error_kinds: dict[str, int]
    rps: float
    p50_ms: float | None
    p99_ms: float | None
    p999_ms: float | None
    mean_ms: float | None
    max_ms: float | None
    total: dict = field(default_factory=dict)
    """Over the whole run, warm-up included: ``sent``, ``by_status`` (answers), ``errors`` (by kind)."""


def percentile(sorted_ms: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in [0, 100]) of an ascending sequence; None when empty."""
    if not sorted_ms:
        return None
    rank = max(1, math.ceil(round(q / 100 * len(sorted_ms), 9)))  # round: 99.9 / 100 * 1000 is 999.0000000000001
    return sorted_ms[min(rank, len(sorted_ms)) - 1]


def _encode(method: str, path: str, host: str, body: bytes | None) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: llmfeat-loadgen\r\nAccept: */*\r\n"
    if body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return (head + "\r\n").encode("latin-1") + (body or b"")


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """(status, keep_alive) of one response; its body is read and dropped."""
    line = await reader.readline()
    if not line:
        raise ConnectionResetError("connection closed before the status line")
    parts = line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise ProtocolError(f"bad status line {line[:80]!r}")
    status = int(parts[1])
    headers: dict[bytes, bytes] = {}
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionResetError("connection closed inside the headers")
        if line in (b"\r\n", b"\n"):
            break
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    keep_alive = headers.get(b"connection", b"").lower() != b"close" and parts[0] == b"HTTP/1.1"
    if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
        while True:
            size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
            await reader.readexactly(size + 2)  # the chunk and its CRLF (the last: just CRLF)
            if size == 0:
                break
    elif b"content-length" in headers:
        await reader.readexactly(int(headers[b"content-length"]))
    elif status not in (204, 304) and not 100 <= status < 200:
        await reader.read()  # body until the server closes
        keep_alive = False
    return status, keep_alive


class _Run:
    """Shared state of one run (one event loop, no locks needed)."""

    def __init__(self, requests: Sequence[Request], window_start: float, window_end: float) -> None:
        self.requests = requests
        self.next = 0
        self.window_start, self.window_end = window_start, window_end
        self.latencies_ok: list[float] = []
        self.window_status: Counter = Counter()
        self.window_errors: Counter = Counter()
        self.total_status: Counter = Counter()
        self.total_errors: Counter = Counter()
        self.sent = 0

    def take(self) -> Request:
        req = self.requests[self.next % len(self.requests)]
        self.next += 1
        return req

    def record(self, start: float, end: float, status: int | None, error: str | None) -> None:
        """One request: ``status`` of the answer (None without one), ``error`` its kind (None for 2xx)."""
        if status is not None:
            self.total_status[status] += 1
        if error is not None:
            self.total_errors[error] += 1
        if start < self.window_start or end > self.window_end:
            return
        if error is not None:
            self.window_errors[error] += 1
        else:
            self.window_status[status] += 1
            if 200 <= status < 300:
                self.latencies_ok.append((end - start) * 1e3)


async def _client(run: _Run, host: str, port: int, timeout_s: float) -> None:
    reader = writer = None
    try:
        while time.perf_counter() < run.window_end:
            method, path, body = run.take()
            start = time.perf_counter()
            status, error = None, None
            try:
                if writer is None:
                    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
                run.sent += 1
                writer.write(_encode(method, path, f"{host}:{port}", body))
                await writer.drain()
                status, keep_alive = await asyncio.wait_for(_read_response(reader), timeout_s)
                if not 200 <= status < 300:
                    error = f"http_{status}"
                if not keep_alive:
                    writer.close()
                    reader = writer = None
            except (asyncio.TimeoutError, TimeoutError):
                error = "timeout"
            except (ProtocolError, ValueError):  # ValueError: a malformed length
                error = "protocol"
            except (OSError, asyncio.IncompleteReadError):
                error = "connect"
            if error in ("timeout", "protocol", "connect") and writer is not None:
                writer.close()  # the connection's state is unknown: start a new one
                reader = writer = None
            end = time.perf_counter()
            run.record(start, end, status, error)
            if error == "connect":
                await asyncio.sleep(0.01)  # a refused port must not become a busy loop
    finally:
        if writer is not None:
            writer.close()


async def run_load(
    host: str,
    port: int,
    requests: Sequence[Request],
    concurrency: int,
    seconds: float,
    warmup_s: float = 0.0,
    timeout_s: float = 10.0,
) -> LoadResult:
    """``concurrency`` closed-loop clients for ``warmup_s`` + ``seconds``; see the module docstring."""
    if concurrency < 1 or seconds <= 0 or warmup_s < 0 or timeout_s <= 0 or not requests:
        raise ValueError("need concurrency >= 1, seconds > 0, warmup_s >= 0, timeout_s > 0 and a request")
    now = time.perf_counter()
    run = _Run(requests, now + warmup_s, now + warmup_s + seconds)
    await asyncio.gather(*(_client(run, host, port, timeout_s) for _ in range(concurrency)))
    lat = sorted(run.latencies_ok)
    ok = len(lat)
    errors = sum(run.window_errors.values())

    def r(x: float | None) -> float | None:
        return None if x is None else round(x, 3)

    return LoadResult(
        concurrency=concurrency, seconds=seconds, warmup_s=warmup_s, requests=ok + errors, ok=ok,
        errors=errors, error_kinds=dict(sorted(run.window_errors.items())), rps=round(ok / seconds, 2),
        p50_ms=r(percentile(lat, 50)), p99_ms=r(percentile(lat, 99)), p999_ms=r(percentile(lat, 99.9)),
        mean_ms=r(sum(lat) / ok if ok else None), max_ms=r(lat[-1] if lat else None),
        total={"sent": run.sent, "by_status": {str(k): v for k, v in sorted(run.total_status.items())},
               "errors": dict(sorted(run.total_errors.items()))},
    )


def _loop_runner():
    try:
        import uvloop

        return uvloop.run
    except ImportError:
        return asyncio.run


def run_load_sync(url: str, bodies: Sequence[bytes] | None, concurrency: int, seconds: float,
                  warmup_s: float = 0.0, timeout_s: float = 10.0) -> LoadResult:
    """:func:`run_load` on ``url`` (POST each of ``bodies`` in turn, or GET when None) in this process."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname or not parts.port:
        raise ValueError(f"--url {url!r}: need http://HOST:PORT/PATH (no TLS)")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    requests: list[Request] = [("POST", path, b) for b in bodies] if bodies else [("GET", path, None)]
    return _loop_runner()(run_load(parts.hostname, parts.port, requests, concurrency, seconds, warmup_s, timeout_s))


def run_subprocess(url: str, bodies: Sequence[bytes] | None, concurrency: int, seconds: float,
                   warmup_s: float = 0.0, timeout_s: float = 10.0) -> LoadResult:
    """:func:`run_load_sync` in a new Python process (this file run as a script); blocks until it ends."""
    with tempfile.TemporaryDirectory(prefix="llmfeat_loadgen_") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--url", url, "--concurrency", str(concurrency),
               "--seconds", str(seconds), "--warmup", str(warmup_s), "--timeout", str(timeout_s), "--out", str(out)]
        if bodies:
            req = Path(tmp) / "requests.jsonl"
            req.write_bytes(b"".join(b.rstrip(b"\n") + b"\n" for b in bodies))
            cmd += ["--requests", str(req)]
        proc = subprocess.run(cmd, capture_output=True, text=True,
                              timeout=warmup_s + seconds + 2 * timeout_s + 60)
        if proc.returncode != 0:
            raise RuntimeError(f"loadgen failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
        return LoadResult(**json.loads(out.read_text()))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", required=True, help="http://HOST:PORT/PATH")
    ap.add_argument("--requests", type=Path, default=None,
                    help="JSON lines, one POST body per line, sent in turn (default: GET, no body)")
    ap.add_argument("--concurrency", type=int, default=1, help="clients, one request in flight each")
    ap.add_argument("--seconds", type=float, default=10.0, help="measured window")
    ap.add_argument("--warmup", type=float, default=2.0, help="seconds of load before the window (not recorded)")
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for an answer")
    ap.add_argument("--out", type=Path, default=None, help="write the result as JSON here (default: stdout)")
    args = ap.parse_args(argv)
    bodies = None
    if args.requests is not None:
        try:
            bodies = [line.encode() for line in args.requests.read_text().splitlines() if line.strip()]
        except OSError as err:
            ap.error(f"--requests {args.requests}: {err.strerror}")
        if not bodies:
            ap.error(f"--requests {args.requests}: no request bodies (one JSON body per line)")
    try:
        result = run_load_sync(args.url, bodies, args.concurrency, args.seconds, args.warmup, args.timeout)
    except ValueError as err:
        ap.error(str(err))
    text = json.dumps(asdict(result), indent=2) + "\n"
    if args.out is None:
        sys.stdout.write(text)
    else:
        tmp = args.out.with_name(f".{args.out.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
