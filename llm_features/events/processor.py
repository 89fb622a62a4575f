"""The :class:`EventProcessor`: loads the checkpoint and the data dir's tables once, then for each batch
of events checks (:mod:`~llm_features.events.plan`), computes (:mod:`~llm_features.events.compute`) and
writes offline (:mod:`~llm_features.events.offline`) then online (:mod:`~llm_features.events.online`),
under the data dir's lock (:mod:`~llm_features.events.datadir` keeps it in step with other writers).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llm_features.errors import UserError
from llm_features.events.compute import _Compute
from llm_features.events.datadir import _DataDirState, _Paths
from llm_features.events.history import _DirWatch
from llm_features.events.offline import _OfflineWrites
from llm_features.events.online import _OnlineWrites
from llm_features.events.parsing import Event, _iso, parse_event, parse_payload
from llm_features.events.plan import _Plan, _Validation
from llm_features.fingerprint import FingerprintMismatchError
from llm_features.workspace import Workspace

log = logging.getLogger("llm_features.events")  # one logger for the package, as when it was one module


@dataclass
class PushReport:
    """What one call of :meth:`EventProcessor.process` did."""

    users_updated: list[int]
    items_encoded: list[int]
    """Items whose text was encoded through the shallow layers (new ``item_embeddings`` rows)."""
    behaviors_encoded: list[int]
    """New ``atomic_behavior_embeddings`` rows (behaviour ids)."""
    events: int
    event_timestamps: dict[int, str]
    """user_id -> the stamp of the user's new row (latest interaction + 1 s, ISO-8601 UTC)."""
    recent_pushed: bool
    parts_written: list[str] = field(default_factory=list)
    seconds: float = 0.0
    compute_seconds: float = 0.0
    """Encoding new texts, the deep layers and the recent lists."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds per phase: check (lock, sync, validation), compute, offline (part files), online (push)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-able (user ids as string keys)."""
        return {
            "users_updated": self.users_updated,
            "items_encoded": self.items_encoded,
            "behaviors_encoded": self.behaviors_encoded,
            "events": self.events,
            "event_timestamps": {str(k): v for k, v in self.event_timestamps.items()},
            "recent_pushed": self.recent_pushed,
            "seconds": round(self.seconds, 6),
        }

    def summary(self) -> str:
        return (f"push-events: {self.events} events, {len(self.users_updated)} users updated, "
                f"{len(self.items_encoded)} items encoded ({len(self.behaviors_encoded)} new behaviours); "
                f"{len(self.parts_written)} parts written in {self.seconds * 1e3:.1f} ms")



class EventProcessor(_Validation, _Compute, _OfflineWrites, _OnlineWrites, _DataDirState):
    """Applies events to one data dir: model and histories loaded once, kept in memory (thread-safe).

    Args:
        data_dir: the workspace (default ``$LLMFEAT_DATA_DIR`` / ``feast_repo/data``): ingest, encode,
            embed-users (``--cadence event`` or ``last``) and ``llmfeat feast apply`` must have run.
        checkpoint: the fine-tuned checkpoint embed-users exported with (default
            ``<data dir>/runs/finetune``).
        repo: the Feast repository (``feast_repo``); ``fs_yaml_file`` another yaml of it.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
        num_threads: torch CPU threads for this process (default: leave torch's setting alone).
        store: an already opened ``feast.FeatureStore`` of the data dir (default: opened here).
        sqlite_wal: with a SQLite online store, switch its file to WAL journaling and this process's
            connection to ``synchronous=NORMAL``: a push then commits without an fsync (~0.1 ms instead of
            ~5-35 ms on a VM disk). The online store is a copy that ``llmfeat feast materialize`` rebuilds
            from the offline one; an OS crash may lose its last commits, never corrupt it.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike | None = None,
        checkpoint: str | os.PathLike | None = None,
        *,
        repo: str | os.PathLike = "feast_repo",
        fs_yaml_file: str | os.PathLike | None = None,
        device: str = "cpu",
        num_threads: int | None = None,
        trust_remote_code: bool = False,
        store: Any = None,
        sqlite_wal: bool = False,
    ) -> None:
        from llm_features.workspace import runs_dir

        t0 = time.perf_counter()
        self.ws = Workspace.at(data_dir)
        if not self.ws.root.is_dir():
            raise UserError("the data dir does not exist", file=self.ws.root, option="--data-dir",
                            fix="Pass the data dir that `llmfeat ingest` wrote.")
        self.ws.check_layout()
        # resolved once (each Workspace property resolves its path; the lock re-checks the layout per push)
        self.paths = _Paths(**{name: getattr(self.ws, name) for name in _Paths.__dataclass_fields__})
        self.checkpoint = Path(checkpoint) if checkpoint is not None else runs_dir(self.ws.root) / "finetune"
        ident = self._check_checkpoint()
        self._load_model(ident, device, num_threads, trust_remote_code)
        self._open_store(store, repo, fs_yaml_file, sqlite_wal)
        self._mutex = threading.Lock()
        self._head_file = self.paths.events / ".llmfeat-head"
        self._seen_head = -1
        self._watch = {name: _DirWatch(getattr(self.paths, name)) for name in (
            "events", "atomic_behavior_embeddings", "item_embeddings", "user_embeddings")}
        self._load_tables()
        log.info("events: loaded %s (n=%d, cadence %s) and %s in %.1fs", self.checkpoint, self.context_size,
                 self.identity["cadence"], self.ws.root, time.perf_counter() - t0)

    @classmethod
    def load(cls, **kwargs: Any) -> "EventProcessor":
        """``EventProcessor(**kwargs)``: the same, by keyword."""
        return cls(**kwargs)

    # ------------------------------------------------------------------ loading
    def _check_checkpoint(self) -> dict[str, Any]:
        """The checkpoint's weights, the model it was trained on (the data dir's encode) and the serving
        identity of the exported user embeddings; returns the checkpoint's identity."""
        from llm_features.embed_users import checkpoint_identity
        from llm_features.finetune.loading import check_weights, read_checkpoint_config

        _, trained_fp, meta = read_checkpoint_config(self.checkpoint)
        check_weights(self.checkpoint, meta)
        for need, what in ((self.paths.interactions, "ingest"), (self.paths.manifest, "encode")):
            if not need.exists():
                raise UserError("not found", file=need, option="--data-dir",
                                fix=f"Run `llmfeat {what}` for this data dir first.")
        manifest = self.ws.read_fingerprint()
        if manifest.digest != trained_fp.digest:
            raise FingerprintMismatchError(
                f"{self.paths.manifest} records model fingerprint {manifest.digest} ({manifest.model_name}), "
                f"but checkpoint {self.checkpoint} was trained on {trained_fp.digest} "
                f"({trained_fp.model_name})")
        self.fingerprint = trained_fp
        ident = checkpoint_identity(self.checkpoint)
        self.identity = self._exported_identity(ident)
        self.context_size = int(self.identity["context_size"])
        return ident

    def _load_model(self, ident: dict[str, Any], device: str, num_threads: int | None,
                    trust_remote_code: bool) -> None:
        """The fine-tuned model on ``device`` (refused when the checkpoint changed while it loaded)."""
        from llm_features.devices import resolve_device
        from llm_features.embed_users import checkpoint_identity
        from llm_features.finetune.loading import load_finetuned

        self.device = resolve_device(device)
        if num_threads is not None:
            torch.set_num_threads(int(num_threads))
        self.model, self.ft = load_finetuned(self.checkpoint, device=self.device,
                                             trust_remote_code=trust_remote_code)
        if checkpoint_identity(self.checkpoint)["id"] != ident["id"]:
            raise UserError("changed while it was being loaded", file=self.checkpoint,
                            fix="Retry when `llmfeat finetune` is done writing it.")
        self.model.context_size = self.context_size
        self.backbone = self.model.backbone

    def _open_store(self, store: Any, repo: str | os.PathLike, fs_yaml_file: str | os.PathLike | None,
                    sqlite_wal: bool) -> None:
        """The Feast store of the data dir (opened here unless given) and its push sources."""
        from llm_features.store import open_store

        if store is None:
            store = open_store(repo, self.ws.root, fs_yaml_file, must_exist=True)
        self.store = store
        self._push_views = self._resolve_push_sources()
        if sqlite_wal:
            self._sqlite_wal()

    # ------------------------------------------------------------------ the API
    def handle_events(self, payload: Any) -> dict[str, Any]:
        """HTTP handler: the body ``{"events": [...]}`` in, a JSON-able summary out.

        Raises :class:`EventError` (a ``ValueError``; HTTP 400) for a malformed body or an event that
        cannot be applied, before anything is written. ``DataDirBusyError`` (also a ``ValueError``)
        when a batch stage holds the data dir: retry later (HTTP 503).
        """
        return self.process(parse_payload(payload)).to_dict()

    def process(self, events: Sequence[Event | Mapping[str, Any]]) -> PushReport:
        """Apply ``events`` (validated :class:`Event` objects, or raw dicts parsed here)."""
        started = time.perf_counter()
        events = [e if isinstance(e, Event) else parse_event(e, i + 1) for i, e in enumerate(events)]
        with self._mutex, self.ws.lock("llmfeat push-events"):
            self._sync()
            plan = self._plan(events)  # every check; nothing written yet
            plan.checked = time.perf_counter() - started
            if not events:
                return PushReport([], [], [], 0, {}, self.recent_n is not None,
                                  seconds=time.perf_counter() - started)
            report = self._apply(plan)
        report.seconds = time.perf_counter() - started
        log.debug("%s", report.summary())
        return report

    def _apply(self, plan: _Plan) -> PushReport:
        """Compute, then write: the events, the rows (part files, atomic), then the online store."""
        t0 = time.perf_counter()
        new = self._encode_new_texts(plan)  # 1. texts never encoded
        fresh = self._fresh_rows(plan, new.encoded)  # 2. the users' new rows
        compute = time.perf_counter() - t0
        written = [self._log_events(plan)]  # 3. offline
        behaviors_t, items_t = self._encoded_tables(new)
        written += self._write_encoded(new, behaviors_t, items_t)
        users_t, users_part = self._write_user_rows(fresh)
        written.append(users_part)
        if fresh.recent is not None:
            written.append(self._write_recent(fresh.recent))
        offline = time.perf_counter() - t0 - compute
        self._push_online(new, behaviors_t, items_t, users_t, fresh.recent)  # 4. online
        uids, stamps = fresh.uids, fresh.stamps
        return PushReport(
            users_updated=sorted(int(u) for u in uids), items_encoded=new.items,
            behaviors_encoded=new.behaviors,
            events=len(plan.events), event_timestamps={int(u): _iso(int(s)) for u, s in zip(uids, stamps)},
            recent_pushed=fresh.recent is not None, parts_written=[str(p) for p in written],
            compute_seconds=compute,
            timings={"check": plan.checked, "compute": compute, "offline": offline,
                     "online": time.perf_counter() - t0 - compute - offline})
