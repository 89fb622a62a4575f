"""Helpers for tests of the HTTP service: a uvicorn server on a free loopback port in a thread, and a
tiny trained ranker for the synthetic workspace of ``tests/store_data.py``."""

from __future__ import annotations

import http.client
import json
import threading
import time
from pathlib import Path


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


def train_tiny_ranker(out: Path, fingerprint: str, dim: int = 8) -> Path:
    """A +LLM ranker trained on synthetic rows, recorded as trained on ``fingerprint``'s embeddings."""
    import torch

    from ranker.config import ModelConfig, TrainConfig
    from tests.synthetic_rows import SyntheticFeatureSource, synthetic_rows
    from ranker.train import train

    torch.set_num_threads(1)
    rows = synthetic_rows(n_users=20, n_items=20, n_rows=600, dim=dim, seed=0)
    rows["user_id"] += 2
    cfg = TrainConfig(model=ModelConfig(llm_mode="interaction"), out=out, epochs=1, batch_size=128,
                      validate=False, progress=False)
    train(cfg, entities=rows, source=SyntheticFeatureSource(rows))
    payload = json.loads((out / "ranker.json").read_text())
    payload["fingerprint"] = fingerprint  # trained on this workspace's embeddings, as `ranker train` records
    (out / "ranker.json").write_text(json.dumps(payload))
    return out
