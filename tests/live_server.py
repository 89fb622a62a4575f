"""A uvicorn server on a free loopback port in a thread, for tests of the HTTP service."""

from __future__ import annotations

import http.client
import json
import threading
import time


class LiveServer:
    """uvicorn serving ``app`` on a free loopback port in a thread."""

    def __init__(self, app) -> None:
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        return self

    def __exit__(self, *exc) -> None:
        self.conn.close()
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def call(self, method: str, path: str, body=None, headers: dict | None = None, fresh: bool = False):
        """``(status, headers, parsed JSON or text)``; ``fresh``: on a new connection."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30) if fresh else self.conn
        if isinstance(body, (dict, list)):
            body = json.dumps(body)
        try:
            conn.request(method, path, body, headers or {})
            resp = conn.getresponse()
            raw = resp.read()
        except (http.client.HTTPException, ConnectionError):
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            raise
        if resp.getheader("connection") == "close" and not fresh:
            self.conn.close()
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        ctype = resp.getheader("content-type", "")
        return resp.status, resp.headers, json.loads(raw) if "json" in ctype else raw.decode()
