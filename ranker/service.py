"""``llmfeat serve``: the ranker behind HTTP (Starlette on uvicorn).

Endpoints; bodies are JSON, errors ``{"error": "<what was wrong and what to do>"}``:

- ``POST /score`` ``{"user_id": 42, "item_ids": [1, 2, 3]}`` -> ``{"user_id": 42, "scores": [...]}``,
  click probabilities in input order.
- ``POST /rank`` ``{"user_id": 42, "item_ids": [1, 2, 3], "top_k": 2}`` (``top_k`` optional:
  all) -> ``{"user_id": 42, "items": [{"item_id": 3, "score": 0.61}, ...]}``, best first, ties in
  input order.
- ``GET /health`` -> ``{"status": "ok", "model_fingerprint": ..., "feature_service": ..., ...}``.
- ``GET /metrics``: Prometheus text: requests by endpoint and status, a latency histogram per
  endpoint, candidate rows scored, rows served with a default by :class:`MissingFeatures` key,
  requests for users the store has no row for.
- ``POST /events``: off unless ``enable_events``; then it needs ``Authorization: Bearer <token>``
  (``$LLMFEAT_SERVE_TOKEN``) and passes the JSON body to the events handler given to
  :func:`create_app`.

Bad requests get a 4xx and are never scored: 400 malformed JSON, 413 a body over
``max_body_bytes`` (refused from its Content-Length, or as soon as the stream passes the limit),
422 a body of the wrong shape: unknown or missing fields, ids that are not JSON integers (``true``
and ``1.5`` are not), an id outside int64, an empty ``item_ids`` or more than ``max_candidates``,
a negative ``top_k``. Unknown users and items are not errors: they are scored with the documented
defaults (:mod:`ranker.features`) and counted in ``/metrics``.

A worker scores one request at a time, on its event loop: a request is CPU work of a few
milliseconds, and more workers (processes, ``--workers``) serve more at once. With several workers,
``/metrics`` adds up every worker's counts (prometheus_client's multiprocess mode, in a temporary
directory that ``llmfeat serve`` creates and removes).

Example::

    app = create_app(ServeConfig(ranker=Path("runs/ranker_llm"), data_dir=Path("data")))
    uvicorn.run(app, host="127.0.0.1", port=8000)
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import inspect
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np

from llm_features.errors import UserError
from ranker.config import ServeConfig
from ranker.online import StoreChanged
from ranker.serve import Ranker
from ranker.service_metrics import LATENCY_BUCKETS, MULTIPROC_ENV, ServiceMetrics
from ranker.service_requests import (
    INT64,
    BadRequest,
    candidate_request,
    int_field,
    json_response,
    parse_json,
    read_body,
)

__all__ = [  # the request checks and metrics live in ranker.service_requests / ranker.service_metrics
    "CONFIG_ENV", "INT64", "LATENCY_BUCKETS", "MULTIPROC_ENV", "TOKEN_ENV", "BadRequest", "EventsHandler",
    "ServiceMetrics", "app_from_env", "candidate_request", "create_app", "default_events_handler",
    "events_token", "load_ranker", "parse_json", "read_body", "serve",
]

log = logging.getLogger(__name__)

TOKEN_ENV = "LLMFEAT_SERVE_TOKEN"
"""The bearer token of ``POST /events`` (never an option: command lines are visible to every user)."""
CONFIG_ENV = "LLMFEAT_SERVE_CONFIG"
"""The :class:`ServeConfig` (JSON) that ``llmfeat serve --workers N`` hands to each worker process."""

EventsHandler = Callable[[Any], Any]
"""``handler(body)`` for ``POST /events``: the parsed JSON body in, a JSON-able result out (None:
``{"status": "ok"}``). A coroutine function is awaited; a plain function runs in a thread, so a
slow write does not hold up scoring. A ``ValueError`` (``UserError``) it raises is the client's
fault: 422 with its message."""


# ------------------------------------------------------------------------------------------------
# Start-up


def load_ranker(cfg: ServeConfig) -> Ranker:
    """The ranker of ``cfg``, its store opened and checked (:meth:`Ranker.check_store`: never
    materialised, or embeddings of another model -> :class:`UserError`)."""
    from ranker.train import CONFIG_FILE

    if not (Path(cfg.ranker) / CONFIG_FILE).is_file():
        what = f"is not a ranker checkpoint (no {CONFIG_FILE})" if Path(cfg.ranker).exists() else "does not exist"
        raise UserError(what, file=cfg.ranker, option="--ranker",
                        fix="Pass the --out directory of `llmfeat ranker train` (or run it first).")
    ranker = Ranker.load(cfg.ranker, repo=cfg.repo, data_dir=cfg.data_dir, fs_yaml_file=cfg.feature_store_yaml)
    ranker.feature_refs()
    return ranker


def events_token(cfg: ServeConfig) -> str | None:
    """The bearer token of ``POST /events`` (None when it is off); refuses to go on without one."""
    if not cfg.enable_events:
        return None
    token = os.environ.get(TOKEN_ENV, "").strip()  # (a token read from a file keeps its newline)
    if not token:
        raise UserError(f"POST /events needs a bearer token, and ${TOKEN_ENV} is not set", option="--enable-events",
                        fix=f"Set {TOKEN_ENV} to a long random secret (clients send `Authorization: Bearer "
                            f"<it>`), or leave out --enable-events.")
    return token


def default_events_handler(ranker: Ranker, cfg: ServeConfig) -> EventsHandler:
    """The ``POST /events`` handler when :func:`create_app` is given none: an
    :class:`llm_features.events.EventProcessor` over the ranker's data dir (loaded now, so a data dir
    it cannot continue stops the start). It pushes each event's user embedding and recent list to the
    online store (read fresh by every request) and re-reads the items it encoded. A batch stage that
    holds the data dir's lock gives 503 with ``Retry-After``."""
    from llm_features.events import EventProcessor
    from llm_features.store import store_data_dir
    from llm_features.workspace import DataDirBusyError

    processor = EventProcessor(data_dir=store_data_dir(ranker.store), checkpoint=cfg.finetune, repo=cfg.repo,
                               fs_yaml_file=cfg.feature_store_yaml)

    def handler(body: Any) -> Any:
        try:
            result = processor.handle_events(body)
        except DataDirBusyError as e:
            raise BadRequest(503, str(e), {"retry-after": "5"}) from None
        ranker.scorer.reread_items(result.get("items_encoded") or [])
        return result

    return handler


# ------------------------------------------------------------------------------------------------
# The app


def create_app(
    cfg: ServeConfig,
    *,
    events_handler: EventsHandler | None = None,
    ranker: Ranker | None = None,
) -> Any:
    """The Starlette app of ``llmfeat serve``.

    Args:
        cfg: the service's options (:class:`ranker.config.ServeConfig`).
        events_handler: ``POST /events``'s handler (:data:`EventsHandler`) when
            ``cfg.enable_events``; None: :func:`default_events_handler`.
        ranker: an already loaded ranker (default: :func:`load_ranker` of ``cfg``).

    Loads and checks everything now, so a store it cannot serve is a :class:`UserError` here,
    before any request. The item inputs are re-read in a background thread while the app runs
    (started and stopped by its lifespan).
    """
    import torch
    from starlette.applications import Starlette

    token = events_token(cfg)
    torch.set_num_threads(cfg.threads)
    ranker = ranker or load_ranker(cfg)
    ranker.scorer.refresh_seconds = cfg.refresh_seconds  # reads the item inputs now, not in the first request
    metrics = ServiceMetrics(shared=cfg.workers > 1)
    if token is not None and events_handler is None:
        events_handler = default_events_handler(ranker, cfg)
    endpoints = Endpoints(cfg, ranker, metrics, token, events_handler)
    app = Starlette(routes=endpoints.routes(), lifespan=endpoints.lifespan,
                    exception_handlers={404: endpoints.http_error, 405: endpoints.http_error})
    app.state.ranker = ranker
    app.state.metrics = metrics
    return app


Handler = Callable[[Any], Awaitable[Any]]
"""A Starlette request handler: the request in, its response out."""


class Endpoints:
    """The request handlers of one app and what they share: the ranker's scorer, the metrics, the
    events handler and its token (None: ``POST /events`` is off)."""

    def __init__(self, cfg: ServeConfig, ranker: Ranker, metrics: ServiceMetrics, token: str | None,
                 events_handler: EventsHandler | None) -> None:
        self.cfg, self.metrics, self.token, self.events_handler = cfg, metrics, token, events_handler
        self.scorer = ranker.scorer
        self.health = {"status": "ok", "model_fingerprint": ranker.fingerprint,
                       "feature_service": ranker.feature_service, "ranker": str(ranker.checkpoint),
                       "events": token is not None}

    def routes(self) -> list[Any]:
        from starlette.routing import Route

        return [
            Route("/score", self.counted("/score", self.score_endpoint), methods=["POST"]),
            Route("/rank", self.counted("/rank", self.rank_endpoint), methods=["POST"]),
            Route("/health", self.counted("/health", self.health_endpoint), methods=["GET"]),
            Route("/metrics", self.counted("/metrics", self.metrics_endpoint), methods=["GET"]),
            Route("/events", self.counted("/events", self.events_endpoint), methods=["POST"]),
        ]

    def counted(self, name: str, fn: Handler) -> Handler:
        """Count and time ``fn``; a :class:`BadRequest` becomes its JSON error, anything else a 500."""

        async def handle(request: Any) -> Any:
            t0 = time.perf_counter()
            try:
                response = await fn(request)
            except BadRequest as e:
                response = json_response({"error": e.message}, e.status, e.headers)
            except StoreChanged as e:  # the store was re-encoded under the service: not its fault
                response = json_response({"error": str(e)}, 503)
            except Exception:  # noqa: BLE001 - a bug: logged with its traceback, the client gets a 500
                log.exception("%s %s failed", request.method, request.url.path)
                response = json_response({"error": "internal error (logged by the server)"}, 500)
            self.metrics.requests.labels(name, str(response.status_code)).inc()
            self.metrics.latency.labels(name).observe(time.perf_counter() - t0)
            return response

        return handle

    def score(self, user_id: int, item_ids: list[int]) -> np.ndarray:
        """Click probabilities ``[len(item_ids)]``, counted in the metrics."""
        probs, stats, known = self.scorer.score(user_id, item_ids)
        self.metrics.rows.inc(len(item_ids))
        for key, count in stats.counts.items():
            if key != "rows" and count:
                self.metrics.missing.labels(key).inc(count)
        if not known:
            self.metrics.cold_users.inc()
        return probs

    async def score_endpoint(self, request: Any) -> Any:
        user_id, item_ids = candidate_request(parse_json(await read_body(request, self.cfg.max_body_bytes)),
                                              self.cfg.max_candidates)
        return json_response({"user_id": user_id, "scores": self.score(user_id, item_ids).tolist()})

    async def rank_endpoint(self, request: Any) -> Any:
        data = parse_json(await read_body(request, self.cfg.max_body_bytes))
        user_id, item_ids = candidate_request(data, self.cfg.max_candidates, optional=("top_k",))
        top_k = data.get("top_k")
        if top_k is not None and int_field(top_k, "top_k") < 0:
            raise BadRequest(422, f"top_k: must be 0 or more, got {top_k}")
        probs = self.score(user_id, item_ids)
        order = np.argsort(-probs, kind="stable")[:top_k]
        values = probs.tolist()
        items = [{"item_id": item_ids[i], "score": values[i]} for i in order.tolist()]
        return json_response({"user_id": user_id, "items": items})

    async def health_endpoint(self, request: Any) -> Any:
        if self.scorer.fault:
            fault = {"status": "error", "error": self.scorer.fault, "pid": os.getpid()}
            return json_response({**self.health, **fault}, 503)
        return json_response({**self.health, "item_inputs": self.scorer.table.items, "pid": os.getpid()})

    async def metrics_endpoint(self, request: Any) -> Any:
        from prometheus_client import CONTENT_TYPE_LATEST
        from starlette.responses import Response

        return Response(self.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    async def events_endpoint(self, request: Any) -> Any:
        from starlette.concurrency import run_in_threadpool

        if self.token is None:
            raise BadRequest(404, "POST /events is off: start llmfeat serve with --enable-events")
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
            raise BadRequest(401, "POST /events needs `Authorization: Bearer <token>` with the service's token",
                             {"www-authenticate": "Bearer"})
        body = parse_json(await read_body(request, self.cfg.max_body_bytes))
        try:
            if inspect.iscoroutinefunction(self.events_handler):
                result = await self.events_handler(body)
            else:
                result = await run_in_threadpool(self.events_handler, body)
        except BadRequest:
            raise
        except ValueError as e:  # UserError too: the event was bad
            raise BadRequest(422, str(e)) from None
        return json_response({"status": "ok"} if result is None else result)

    async def http_error(self, request: Any, exc: Any) -> Any:
        """Starlette's 404 (no such path) and 405 (wrong method) as JSON errors."""
        status = getattr(exc, "status_code", 404)
        if status == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        else:
            message = (f"no endpoint {request.url.path}: the endpoints are POST /score, POST /rank, GET /health, "
                       "GET /metrics, POST /events")
        self.metrics.requests.labels("other", str(status)).inc()
        return json_response({"error": message}, status, getattr(exc, "headers", None))

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Any):
        """Re-reads the item inputs in a background thread while the app runs."""
        self.scorer.start_refresh_thread()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, self.scorer.stop_refresh_thread)


def app_from_env() -> Any:
    """``create_app`` of the :class:`ServeConfig` in ``$LLMFEAT_SERVE_CONFIG`` (uvicorn's factory for
    ``--workers N``: every worker process builds its own app)."""
    from llm_features.config import build_config

    return create_app(build_config(ServeConfig, json.loads(os.environ[CONFIG_ENV])))


def serve(cfg: ServeConfig, echo: Callable[[str], None] = print) -> None:
    """Run the service until SIGINT/SIGTERM; a store it cannot serve is refused first (:class:`UserError`)."""
    user_metrics_dir = os.environ.get(MULTIPROC_ENV)  # before feast's import may set it
    import uvicorn

    events_token(cfg)
    where = f"http://{cfg.host}:{cfg.port}"
    run = dict(host=cfg.host, port=cfg.port, log_level="warning", access_log=False, lifespan="on")
    if cfg.workers == 1:
        app = create_app(cfg)
        ranker = app.state.ranker
        echo(_banner(cfg, ranker, where))
        uvicorn.run(app, **run)
        return
    ranker = load_ranker(cfg)  # refused here, before any worker starts
    echo(_banner(cfg, ranker, where))
    del ranker
    os.environ[CONFIG_ENV] = json.dumps({k: str(v) if isinstance(v, Path) else v
                                         for k, v in dataclasses.asdict(cfg).items()})
    # the workers' metric files: a directory of our own unless the caller named one (feast.metrics, once
    # imported, points the variable at a directory of its own; prometheus_client reads either name)
    own_dir = None if user_metrics_dir else tempfile.mkdtemp(prefix="llmfeat-serve-metrics-")
    for name in (MULTIPROC_ENV, "PROMETHEUS_MULTIPROCESS_DIR"):
        os.environ[name] = user_metrics_dir or own_dir
    try:
        uvicorn.run("ranker.service:app_from_env", factory=True, workers=cfg.workers, **run)
    finally:
        if own_dir:
            shutil.rmtree(own_dir, ignore_errors=True)


def _banner(cfg: ServeConfig, ranker: Ranker, where: str) -> str:
    events = "POST /events on" if cfg.enable_events else "POST /events off"
    return (f"llmfeat serve: {ranker.feature_service} ranker {ranker.checkpoint} (embedding model "
            f"{ranker.fingerprint or 'none'}) on {where}: {cfg.workers} worker(s), {cfg.threads} torch thread(s) "
            f"each, {events}; Ctrl+C stops")
