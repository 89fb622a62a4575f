"""The Prometheus metrics of ``llmfeat serve`` (:mod:`ranker.service`), one registry per app; with
several workers, every worker's values added up (prometheus_client's multiprocess mode)."""

from __future__ import annotations

import os
from typing import Any

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
LATENCY_BUCKETS = (0.001, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class ServiceMetrics:
    """The Prometheus metrics of one app, in its own registry (two apps in one process do not clash).

    ``shared``: the app is one of several worker processes; ``exposition`` then adds up every
    worker's values from ``$PROMETHEUS_MULTIPROC_DIR`` (prometheus_client's multiprocess mode).
    """

    PREFIX = "llmfeat_serve_"

    def __init__(self, shared: bool = False) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.shared = shared
        self.registry = CollectorRegistry()
        r, p = self.registry, self.PREFIX
        self.requests = Counter(f"{p}requests", "HTTP requests by endpoint and status code.",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram(f"{p}request_seconds",
                                 "Time from the request's arrival in the app to its response, by endpoint.",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.rows = Counter(f"{p}candidates", "Candidate rows scored (/score and /rank).", registry=r)
        self.missing = Counter(
            f"{p}missing_features",
            "Candidate rows scored with a default, by key: unknown_<sparse feature> (not in the store or not seen "
            "in training: the OOV row), missing_<column> (no value: learned missing vector + flag).",
            ["feature"], registry=r)
        self.cold_users = Counter(f"{p}cold_users",
                                  "Scoring requests for a user the online store has no row for.", registry=r)

    def exposition(self) -> bytes:
        from prometheus_client import CollectorRegistry, generate_latest

        if not self.shared:
            return generate_latest(self.registry)
        from prometheus_client import multiprocess

        # every worker's files; feast's own metrics may share the directory: only ours
        collector = multiprocess.MultiProcessCollector(None, os.environ[MULTIPROC_ENV])
        registry = CollectorRegistry()
        registry.register(_Prefixed(collector, self.PREFIX))
        return generate_latest(registry)


class _Prefixed:
    """A collector's metric families whose names start with ``prefix``."""

    def __init__(self, collector: Any, prefix: str) -> None:
        self.collector, self.prefix = collector, prefix

    def collect(self) -> list[Any]:
        return [m for m in self.collector.collect() if m.name.startswith(self.prefix)]

