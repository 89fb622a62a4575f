"""Fresh user embeddings: bring a user's online features up to date when they act, not at the next batch.

An event is one new interaction ``{"user_id", "item_id", "timestamp", "label"}`` (optionally
``rating``, ``item_text``, ``behavior_text``). :class:`EventProcessor` loads the fine-tuned checkpoint
once and keeps it in memory with the users' histories; for each batch of events it

1. validates every event before anything is written (unknown fields, bad types, a timestamp not
   after the user's latest interaction, an unknown item without text: :class:`EventError`, a
   ``ValueError``);
2. encodes the text of an item (or behaviour) never encoded before through the frozen shallow layers
   (:meth:`Backbone.encode_texts`, what ``llmfeat encode`` does, the same normalised text);
3. runs the fine-tuned deep layers over each user's last ``n`` behaviours with their feedback
   (:func:`llm_features.embed_users.final_user_states`: the code path of ``llmfeat embed-users``, so
   the pushed vector is the row embed-users writes for the same history, at the same stamp: the
   latest interaction + 1 s), and builds the user's new recent-behaviour list
   (:func:`llm_features.recent.build_recent_behaviors`, what ingest writes);
4. writes, under the data dir's lock, the same rows to the offline store, as part files in the views'
   source directories (``parquet_io.write_part``, atomic; the embedding parts carry the fingerprint
   and the checkpoint identity embed-users records), and then to the online store through the views'
   Feast push sources (``<view>_push`` in ``feast_repo/feature_definitions.py``).

The events themselves are appended to ``<data dir>/events/`` (the interactions pushed since ingest):
the next event of the same user (in this process or another one on the same data dir) sees them. A
call holds the data dir's lock (:meth:`Workspace.lock`) while it checks and writes, so it never
interleaves with a batch stage; it is refused with ``DataDirBusyError`` while one runs.

Pushed rows carry the serving identity of the ``user_embeddings/`` parts embed-users exported
(checkpoint, n, cadence) but no embed-users state: a later ``embed-users`` treats their (user, stamp)
keys as exported and goes on as before (after a re-ingest that includes the events, it adds the rows
at the events' own times).

Why not ``store.push(..., to=PushMode.ONLINE_AND_OFFLINE)``: feast's DuckDB offline write appends by
reading the whole source and writing it back to the source path, which for llmfeat's part-file
directories fails ("Cannot open file .../user_embeddings: File exists") after the online write went
through, and would drop the parts' fingerprint metadata. The online write is the one
``store.push(name, df, to=PushMode.ONLINE)`` makes (``write_to_online_store`` for each view whose
stream source is the push source), with the push source's views resolved once instead of re-reading
the registry at every call (``store.push`` spends ~10 ms per call on that here).

Example::

    from llm_features.events import EventProcessor
    proc = EventProcessor.load(data_dir="feast_repo/data")     # checkpoint: <data dir>/runs/finetune
    proc.handle_events({"events": [{"user_id": 7, "item_id": 3, "timestamp": "2001-01-01T10:00:00Z",
                                    "label": 1}]})
    # {"users_updated": [7], "items_encoded": [], "events": 1, "event_timestamps": {"7": "..."}, ...}
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import threading
import time
from collections import ChainMap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from llm_features.errors import UserError
from llm_features.fingerprint import FINGERPRINT_METADATA_KEY, FingerprintMismatchError
from llm_features.ids import normalize_text, stable_id
from llm_features.parquet_io import (
    embedding_array,
    embedding_matrix,
    file_metadata,
    list_parts,
    utc_us,
    write_part,
)
from llm_features.workspace import Workspace

log = logging.getLogger(__name__)

US_PER_S = 1_000_000
EVENT_FIELDS = ("user_id", "item_id", "timestamp", "label", "rating", "item_text", "behavior_text")
REQUIRED_FIELDS = ("user_id", "item_id", "timestamp", "label")
EVENTS_METADATA_KEY = "llmfeat.events"
PUSH_PREFIX = "push"
MAX_EVENTS = 10_000
EARLIEST_US = 631_152_000 * US_PER_S  # 1990-01-01, ingest's --min-timestamp default
FUTURE_SLACK_US = 86_400 * US_PER_S  # as ingest: clock skew
# The interactions pushed since ingest (<data dir>/events/): canonical interaction columns, plus the
# item text an event introduced (None when the item was known).
EVENT_SCHEMA = pa.schema([
    ("user_id", pa.int64()),
    ("item_id", pa.int64()),
    ("event_timestamp", pa.timestamp("us", tz="UTC")),
    ("behavior_id", pa.int64()),
    ("behavior_text", pa.string()),
    ("item_text", pa.string()),
    ("label", pa.int8()),
    ("rating", pa.float32()),
])
PUSH_SOURCES = {
    "user_embeddings": "user_embeddings_push",
    "user_recent_behaviors": "user_recent_behaviors_push",
    "item_embeddings": "item_embeddings_push",
    "atomic_behavior_embeddings": "atomic_behavior_embeddings_push",
}


class EventError(UserError):
    """A bad event or request: names the event (1-based, or the file's line) and the field."""


# ---------------------------------------------------------------------------------------------- parsing
@dataclass(frozen=True)
class Event:
    """One validated interaction (``time_us``: microseconds since the epoch, UTC)."""

    user_id: int
    item_id: int
    time_us: int
    label: int
    rating: float = math.nan
    item_text: str | None = None
    behavior_text: str | None = None
    index: int = 0
    """Where it came from: the 1-based position in the request, or the line of the file."""
    source: str | None = None
    """The file it was read from (None: a request)."""
    row_word: str = "event"

    def error(self, problem: str, column: str | None = None, fix: str | None = None) -> "EventError":
        return EventError(problem, file=self.source, line=self.index, column=column, fix=fix,
                          row_word=self.row_word)


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def _iso(us: int) -> str:
    """``2001-01-01T10:00:00Z`` (microseconds shown where there are any)."""
    return (_EPOCH + timedelta(microseconds=int(us))).isoformat().replace("+00:00", "Z")


class _Where:
    def __init__(self, index: int, source: str | os.PathLike | None, row_word: str):
        self.index, self.source, self.row_word = index, source, row_word

    def error(self, problem: str, column: str | None = None, fix: str | None = None) -> EventError:
        return EventError(problem, file=self.source, line=self.index, column=column, fix=fix,
                          row_word=self.row_word)


def _integer(value: Any, name: str, where: _Where, strings: bool) -> int:
    if strings and isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise where.error(f"not an integer ({value!r})", name) from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise where.error(f"must be an integer, got {type(value).__name__} {value!r}", name)
    if not -(2**63) <= value < 2**63:
        raise where.error(f"{value} does not fit in int64", name)
    return value


def _timestamp(value: Any, where: _Where) -> int:
    """ISO-8601 (a time without offset is UTC) or epoch seconds, to µs."""
    name = "timestamp"
    if isinstance(value, str):
        text = value.strip()
        try:
            value = float(text)  # epoch seconds written as text (CSV)
        except ValueError:
            try:
                dt = datetime.fromisoformat(text)
            except ValueError:
                raise where.error(f"not an ISO-8601 time or epoch seconds ({value!r})", name,
                                  "Write e.g. 2001-01-01T10:00:00Z or 978343200.") from None
            dt = dt.replace(tzinfo=timezone.utc) if dt.tzinfo is None else dt
            us = (dt - _EPOCH) // timedelta(microseconds=1)
            value = None
    if value is not None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise where.error(f"must be an ISO-8601 string or epoch seconds, got {type(value).__name__}",
                              name)
        if not math.isfinite(value):
            raise where.error(f"not a finite number ({value!r})", name)
        if abs(value) >= 1e11:
            raise where.error(f"{value!r} is too large for epoch seconds (milliseconds?)", name,
                              "Give the time in seconds since 1970-01-01 UTC, or as ISO-8601.")
        us = int(round(value * US_PER_S))
    if us < EARLIEST_US:
        raise where.error(f"{_iso(us)} is before 1990-01-01, the earliest time ingest accepts", name)
    now = int(time.time() * US_PER_S)
    if us > now + FUTURE_SLACK_US:
        raise where.error(f"{_iso(us)} is in the future (now {_iso(now)})", name)
    return us


def _text(value: Any, name: str, where: _Where) -> str | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str):
        raise where.error(f"must be a string, got {type(value).__name__}", name)
    return value


def parse_event(raw: Any, index: int, *, source: str | os.PathLike | None = None, row_word: str = "event",
                strings: bool = False) -> Event:
    """One event from a JSON object (``strings``: every value may be text, as in a CSV row)."""
    where = _Where(index, source, row_word)
    if not isinstance(raw, Mapping):
        raise where.error(f"must be an object with {', '.join(REQUIRED_FIELDS)}, got {type(raw).__name__}")
    unknown = sorted(str(k) for k in raw if k not in EVENT_FIELDS)
    if unknown:
        raise where.error(f"unknown field(s) {', '.join(map(repr, unknown))}",
                          fix=f"Use only {', '.join(EVENT_FIELDS)}.")
    for name in REQUIRED_FIELDS:
        if raw.get(name) is None or (strings and isinstance(raw[name], str) and not raw[name].strip()):
            raise where.error("missing", name, f"Every event needs {', '.join(REQUIRED_FIELDS)}.")
    label = raw["label"]
    if isinstance(label, bool):
        label = int(label)
    label = _integer(label, "label", where, strings)
    if label not in (0, 1):
        raise where.error(f"must be 0 or 1, got {label}", "label")
    rating = raw.get("rating")
    if rating is None or (strings and isinstance(rating, str) and not rating.strip()):
        rating = math.nan
    else:
        if strings and isinstance(rating, str):
            try:
                rating = float(rating)
            except ValueError:
                raise where.error(f"not a number ({rating!r})", "rating") from None
        if isinstance(rating, bool) or not isinstance(rating, (int, float)) or not math.isfinite(rating):
            raise where.error(f"must be a finite number, got {rating!r}", "rating")
        rating = float(rating)
    return Event(
        user_id=_integer(raw["user_id"], "user_id", where, strings),
        item_id=_integer(raw["item_id"], "item_id", where, strings),
        time_us=_timestamp(raw["timestamp"], where),
        label=label,
        rating=rating,
        item_text=_text(raw.get("item_text"), "item_text", where),
        behavior_text=_text(raw.get("behavior_text"), "behavior_text", where),
        index=index,
        source=None if source is None else str(source),
        row_word=row_word,
    )


def parse_payload(payload: Any, max_events: int = MAX_EVENTS) -> list[Event]:
    """The events of a request body ``{"events": [{...}, ...]}`` (an :class:`EventError` if malformed)."""
    if not isinstance(payload, Mapping):
        raise EventError('the request body must be a JSON object {"events": [...]}, got '
                         f"{type(payload).__name__}")
    extra = sorted(str(k) for k in payload if k != "events")
    if extra:
        raise EventError(f"unknown request field(s) {', '.join(map(repr, extra))}",
                         fix='The body is {"events": [...]}.')
    events = payload.get("events")
    if not isinstance(events, list):
        raise EventError(f"'events' must be a list of event objects, got {type(events).__name__}",
                         fix='The body is {"events": [...]}.')
    if len(events) > max_events:
        raise EventError(f"{len(events)} events in one request; at most {max_events}",
                         fix="Send them in several requests.")
    return [parse_event(e, i + 1) for i, e in enumerate(events)]


def read_events_file(path: str | os.PathLike, max_events: int | None = None) -> list[Event]:
    """Events from a JSON-lines file (one object per line) or a CSV file with a header of field names."""
    path = Path(path)
    if not path.is_file():
        raise EventError("not found" + (" (it is a directory)" if path.is_dir() else ""), file=path,
                         option="--events")
    suffix = path.suffix.lower()
    events: list[Event] = []
    try:
        if suffix in (".jsonl", ".ndjson", ".json"):
            with open(path, encoding="utf-8") as f:
                for line_no, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        raw = json.loads(line)
                    except ValueError as e:
                        raise EventError(f"not valid JSON ({e})", file=path, line=line_no,
                                         fix="Write one JSON object per line.") from None
                    events.append(parse_event(raw, line_no, source=path, row_word="line"))
        elif suffix == ".csv":
            with open(path, encoding="utf-8", newline="") as f:
                reader = csv.DictReader(f)
                if not reader.fieldnames:
                    raise EventError("empty (no header line)", file=path,
                                     fix=f"The header names the fields: {', '.join(EVENT_FIELDS)}.")
                for row in reader:
                    if None in row:
                        raise EventError("more values than header fields", file=path, line=reader.line_num)
                    events.append(parse_event(row, reader.line_num, source=path, row_word="line",
                                              strings=True))
        else:
            raise EventError(f"unknown events file type {suffix or '(none)'!r}", file=path, option="--events",
                             fix="Give a .jsonl (one JSON event per line) or a .csv file.")
    except UnicodeDecodeError as e:
        raise EventError(f"not UTF-8 text (byte offset {e.start})", file=path) from None
    if max_events is not None and len(events) > max_events:
        raise EventError(f"{len(events)} events; at most {max_events} per push", file=path)
    return events


# ---------------------------------------------------------------------------------------------- state
class _DirWatch:
    """The part files of a directory that appeared since the last look (gated on the directory's mtime)."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.seen: set[str] = set()
        self.mtime: int | None = None

    def _mtime(self) -> int | None:
        try:
            return os.stat(self.directory).st_mtime_ns
        except FileNotFoundError:
            return None

    def new_parts(self, force: bool = False) -> list[Path]:
        mtime = self._mtime()
        if not force and mtime is not None and mtime == self.mtime:
            return []
        self.mtime = mtime
        parts = [p for p in list_parts(self.directory) if p.name not in self.seen]
        self.seen.update(p.name for p in parts)
        return parts

    def mark(self, *parts: Path) -> None:
        """Parts this process wrote (under the data dir's lock): already applied to the state."""
        self.seen.update(p.name for p in parts)
        self.mtime = self._mtime()


def _stat_key(path: Path) -> tuple | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass
class _Rows:
    """Interactions of one user (or several), sorted by (time, item_id): what a history is made of."""

    time: np.ndarray
    item: np.ndarray
    behavior: np.ndarray
    label: np.ndarray
    rating: np.ndarray

    FIELDS = ("time", "item", "behavior", "label", "rating")

    def take(self, idx) -> "_Rows":
        return _Rows(*(getattr(self, f)[idx] for f in self.FIELDS))

    def __len__(self) -> int:
        return len(self.time)

    @staticmethod
    def concat(parts: Sequence["_Rows"]) -> "_Rows":
        return _Rows(*(np.concatenate([getattr(p, f) for p in parts]) for f in _Rows.FIELDS))

    def sorted(self) -> "_Rows":
        return self.take(np.lexsort((self.item, self.time)))


class _Histories:
    """Every user's interactions: the canonical table (ingest) plus the events pushed since."""

    def __init__(self, interactions: Path):
        names = set(pq.read_schema(interactions).names)
        cols = ["user_id", "item_id", "event_timestamp", "behavior_id", "label"]
        t = pq.read_table(interactions, columns=cols + (["rating"] if "rating" in names else []))
        user = t["user_id"].to_numpy()
        item = t["item_id"].to_numpy()
        ts = utc_us(t["event_timestamp"]).cast(pa.int64()).to_numpy()
        order = np.lexsort((item, ts, user))  # ingest's (time, user, item) order, by user
        self.user = np.ascontiguousarray(user[order])
        rating = (t["rating"].to_numpy(zero_copy_only=False).astype(np.float32) if "rating" in names
                  else np.full(len(order), np.nan, np.float32))
        self.rows = _Rows(ts[order], item[order], t["behavior_id"].to_numpy()[order],
                          t["label"].to_numpy(zero_copy_only=False).astype(np.int8)[order], rating[order])
        self.extra: dict[int, _Rows] = {}

    def _canonical(self, user_id: int) -> _Rows:
        lo, hi = np.searchsorted(self.user, [user_id, user_id + 1])
        return self.rows.take(slice(lo, hi))

    def add(self, user_id: int, rows: _Rows) -> None:
        """Pushed rows of a user (those already in the canonical table, after a re-ingest, are dropped)."""
        canon = self._canonical(user_id)
        if len(canon):
            known = set(zip(canon.time.tolist(), canon.item.tolist()))
            pairs = zip(rows.time.tolist(), rows.item.tolist())
            keep = np.array([pair not in known for pair in pairs], bool)
            rows = rows.take(keep)
        if len(rows):
            old = self.extra.get(user_id)
            self.extra[user_id] = (_Rows.concat([old, rows]) if old is not None else rows).sorted()

    def last(self, user_id: int, k: int) -> _Rows:
        """The user's last ``k`` interactions, oldest first."""
        canon = self._canonical(user_id)
        extra = self.extra.get(user_id)
        if extra is None:
            return canon.take(slice(max(0, len(canon) - k), None))
        both = _Rows.concat([canon.take(slice(max(0, len(canon) - k), None)), extra]).sorted()
        return both.take(slice(max(0, len(both) - k), None))

    def count(self, user_id: int) -> int:
        lo, hi = np.searchsorted(self.user, [user_id, user_id + 1])
        extra = self.extra.get(user_id)
        return int(hi - lo) + (len(extra) if extra is not None else 0)

    def latest(self, user_id: int) -> int | None:
        last = self.last(user_id, 1)
        return int(last.time[0]) if len(last) else None


def _identity_of(part: Path) -> dict[str, Any] | None:
    from llm_features.embed_users import CHECKPOINT_METADATA_KEY, STATE_METADATA_KEY

    meta = file_metadata(part)
    raw = meta.get(CHECKPOINT_METADATA_KEY)
    if not raw:
        return None
    got = json.loads(raw)
    if "cadence" not in got:  # parts written before embed-users recorded it there
        got["cadence"] = json.loads(meta.get(STATE_METADATA_KEY, "{}")).get("cadence")
    return got


_IDENTITY_KEYS = ("id", "context_size", "targets_per_sequence", "cadence")


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


# ---------------------------------------------------------------------------------------------- processor
@dataclass(frozen=True)
class _Paths:
    """The data dir's tables, resolved once (a Workspace property resolves its path at every access)."""

    interactions: Path
    items: Path
    manifest: Path
    events: Path
    atomic_behavior_embeddings: Path
    item_embeddings: Path
    user_embeddings: Path
    user_recent_behaviors: Path


class EventProcessor:
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
        from llm_features.devices import resolve_device
        from llm_features.embed_users import checkpoint_identity
        from llm_features.finetune.checkpoint import check_weights, load_finetuned, read_checkpoint_config
        from llm_features.store import open_store
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

        if store is None:
            store = open_store(repo, self.ws.root, fs_yaml_file, must_exist=True)
        self.store = store
        self._push_views = self._resolve_push_sources()
        if sqlite_wal:
            self._sqlite_wal()
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

    # ------------------------------------------------------------------ what the batch stages left
    def _exported_identity(self, ident: dict[str, Any]) -> dict[str, Any]:
        """The serving identity (checkpoint, n, k, cadence) of ``user_embeddings/``: pushed rows carry it."""
        parts = list_parts(self.paths.user_embeddings)
        identity = None
        for p in parts:
            got = _identity_of(p)
            if got is None:
                continue
            if identity is None:
                identity = got
            elif any(got.get(k) != identity.get(k) for k in _IDENTITY_KEYS):
                raise UserError(f"holds user embeddings of two checkpoints or cadences ({p.name})",
                                file=self.paths.user_embeddings,
                                fix="Rerun `llmfeat embed-users --overwrite`.")
        fix = (f"Run `llmfeat embed-users --checkpoint {self.checkpoint} --cadence event` (or `--cadence "
               "last`) first: fresh rows continue the exported ones.")
        if identity is None:
            raise UserError("has no user embeddings yet", file=self.paths.user_embeddings, fix=fix)
        if identity["id"] != ident["id"]:
            raise UserError(
                f"holds the embeddings of checkpoint {identity['id']} ({identity.get('path')}), not of "
                f"{self.checkpoint} ({ident['id']}): rows of two models must never be mixed",
                file=self.paths.user_embeddings, option="--checkpoint",
                fix="Pass the checkpoint embed-users used.")
        cadence = str(identity.get("cadence"))
        if not (cadence == "last" or cadence.startswith("event")):
            raise UserError(
                f"was exported with --cadence {cadence}: its final row of a user is stamped at the next "
                "day's start, and a fresh row stamped at an event before it would be shadowed by it",
                file=self.paths.user_embeddings, fix=fix)
        if int(identity.get("targets_per_sequence") or 1) != 1:
            raise UserError(
                f"holds DTI-packed states (k={identity['targets_per_sequence']}, leakage not isolated), "
                "which differ from the sliding-window state a fresh row is", file=self.paths.user_embeddings,
                fix="Rerun `llmfeat embed-users --overwrite` without --targets-per-sequence.")
        return identity

    def _recent_n(self) -> int | None:
        """The n of ``user_recent_behaviors/`` (ingest's ``--recent-n``), None when ingest wrote none."""
        from llm_features.recent import METADATA_KEY

        parts = list_parts(self.paths.user_recent_behaviors)  # ingest's first: they set n
        for p in sorted(parts, key=lambda p: p.name.startswith(f"part-{PUSH_PREFIX}-")):
            raw = file_metadata(p).get(METADATA_KEY)
            if raw:
                meta = json.loads(raw)
                if meta.get("cadence") != "event":
                    raise UserError(
                        f"was written with --recent-cadence {meta.get('cadence')}: a fresh list stamped at "
                        "an event would be shadowed by the row at the next day's start",
                        file=self.paths.user_recent_behaviors,
                        fix="Re-run `llmfeat ingest --recent-cadence event`.")
                return int(meta["n"])
        return None

    def _resolve_push_sources(self) -> dict[str, list[str]]:
        """Push source -> the names of the views it feeds (what ``store.push`` looks up at every call)."""
        from llm_features.store import store_data_dir

        by_source: dict[str, list[str]] = {}
        for fv in self.store.list_feature_views():
            src = getattr(fv, "stream_source", None)
            if src is not None and src.name in PUSH_SOURCES.values():
                by_source.setdefault(src.name, []).append(fv.name)
        missing = sorted(set(PUSH_SOURCES.values()) - set(by_source))
        if missing:
            raise UserError(
                f"the Feast registry has no push source {', '.join(missing)} (registered before llmfeat "
                "declared them)",
                file=store_data_dir(self.store), option="--data-dir",
                fix=f"Run `llmfeat feast apply --data-dir {store_data_dir(self.store)}`.")
        services = self.store.list_feature_services()
        self._feast_push = any(getattr(s, "precompute_online", False) for s in services)
        return by_source

    def _sqlite_wal(self) -> None:
        online = self.store.config.online_store
        if getattr(online, "type", None) != "sqlite":
            log.info("events: sqlite_wal applies to a SQLite online store only (this one is %s)",
                     getattr(online, "type", online))
            return
        conn = self.store._get_provider().online_store._get_conn(self.store.config)  # feast's own connection
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        conn.execute("PRAGMA synchronous=NORMAL")
        log.info("events: SQLite online store %s in journal mode %s, synchronous=NORMAL", online.path, mode)

    def _load_tables(self) -> None:
        """Histories, item texts and the encoded ids, read from the data dir (again after a re-ingest)."""
        ws = self.paths
        self._canonical_key = tuple(_stat_key(p) for p in (ws.interactions, ws.items, ws.manifest))
        self.recent_n = self._recent_n()
        self.histories = _Histories(ws.interactions)
        self.item_text: dict[int, str] = {}
        self.item_ts: dict[int, int] = {}
        if ws.items.exists():
            names = pq.read_schema(ws.items).names
            t = pq.read_table(ws.items, columns=["item_id", "item_text"] + (
                ["event_timestamp"] if "event_timestamp" in names else []))
            self.item_text = dict(zip(t["item_id"].to_pylist(), t["item_text"].to_pylist()))
            if "event_timestamp" in names:
                ts = utc_us(t["event_timestamp"]).cast(pa.int64()).to_pylist()
                self.item_ts = {i: v for i, v in zip(t["item_id"].to_pylist(), ts) if v is not None}
        self.behavior_text: dict[int, str] = {}
        if self.ft.granularity == "token":  # the deep layers read the behaviour texts themselves
            t = pq.read_table(ws.interactions, columns=["behavior_id", "behavior_text"])
            g = t.group_by("behavior_id", use_threads=False).aggregate([("behavior_text", "first")])
            self.behavior_text = dict(zip(g["behavior_id"].to_pylist(), g["behavior_text_first"].to_pylist()))
        self.vectors: dict[int, np.ndarray] = {}  # behaviour id (= stable_id of its text) -> shallow vector
        self.encoded_items: set[int] = set()
        for watch in self._watch.values():
            watch.seen.clear()
            watch.mtime = None
        self._sync_parts()

    def _head(self) -> int:
        """How many pushes every processor of this data dir has made (``events/.llmfeat-head``)."""
        try:
            return int(json.loads(self._head_file.read_text())["pushes"])
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return 0

    def _bump_head(self) -> None:
        """One push more (under the data dir's lock). A directory's mtime may not change between two
        writes a few ms apart (coarse file times), so processors tell each other through this file."""
        self._seen_head = self._head() + 1
        tmp = self._head_file.with_name(f".llmfeat-head.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"pushes": self._seen_head, "pid": os.getpid()}))
        os.replace(tmp, self._head_file)

    def _sync_parts(self) -> None:
        """Apply the part files other writers (or earlier processes) added since the last look."""
        from llm_features.finetune.data import _check_parts

        head = self._head()
        force = head != self._seen_head  # another processor pushed: look at every directory
        self._seen_head = head
        new = self._watch["atomic_behavior_embeddings"].new_parts(force)
        if new:
            _check_parts(self.paths.atomic_behavior_embeddings, self.fingerprint)  # every part of this model
            for p in new:
                t = pq.read_table(p, columns=["behavior_id", "behavior_embedding"])
                for bid, vec in zip(t["behavior_id"].to_pylist(), embedding_matrix(t["behavior_embedding"])):
                    self.vectors[bid] = vec
        for p in self._watch["item_embeddings"].new_parts(force):
            self.encoded_items.update(pq.read_table(p, columns=["item_id"])["item_id"].to_pylist())
        for p in self._watch["user_embeddings"].new_parts(force):
            got = _identity_of(p)
            if got is not None and any(got.get(k) != self.identity.get(k) for k in _IDENTITY_KEYS):
                raise UserError(
                    f"{p.name} holds checkpoint {got.get('id')} (cadence {got.get('cadence')}, "
                    f"n={got.get('context_size')}); "
                    f"this processor serves {self.identity['id']} (cadence {self.identity['cadence']}, "
                    f"n={self.context_size})", file=self.paths.user_embeddings,
                    fix="Restart the event processor with the checkpoint embed-users used.")
        for p in self._watch["events"].new_parts(force):
            self._apply_log(pq.read_table(p))

    def _apply_log(self, t: pa.Table) -> None:
        """Rows of the events log into the histories (and the item texts they introduced)."""
        items = t["item_id"].to_numpy()
        for item, text in zip(items.tolist(), t["item_text"].to_pylist()):
            if text is not None and item not in self.item_text:
                self.item_text[item] = text
        if self.ft.granularity == "token":  # the first spelling of a behaviour is its text, as in embed-users
            for bid, text in zip(t["behavior_id"].to_pylist(), t["behavior_text"].to_pylist()):
                self.behavior_text.setdefault(bid, text)
        users = t["user_id"].to_numpy()
        rows = _Rows(utc_us(t["event_timestamp"]).cast(pa.int64()).to_numpy(), items,
                     t["behavior_id"].to_numpy(), t["label"].to_numpy().astype(np.int8),
                     t["rating"].to_numpy(zero_copy_only=False).astype(np.float32))
        order = np.argsort(users, kind="stable")
        bounds = np.flatnonzero(np.diff(users[order])) + 1
        for idx in np.split(order, bounds) if len(order) else []:
            self.histories.add(int(users[idx[0]]), rows.take(idx).sorted())

    def _sync(self) -> None:
        key = tuple(_stat_key(p) for p in (self.paths.interactions, self.paths.items, self.paths.manifest))
        if key != self._canonical_key:
            log.info("events: the canonical tables changed (re-ingest): reloading %s", self.ws.root)
            fp = self.ws.read_fingerprint()
            if fp is None or fp.digest != self.fingerprint.digest:
                raise FingerprintMismatchError(
                    f"{self.paths.manifest} now records model fingerprint {fp.digest if fp else None}; this "
                    f"processor serves {self.fingerprint.digest}. Restart it with the new checkpoint.")
            self._load_tables()
        else:
            self._sync_parts()

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
            plan["checked"] = time.perf_counter() - started
            if not events:
                return PushReport([], [], [], 0, {}, self.recent_n is not None,
                                  seconds=time.perf_counter() - started)
            report = self._apply(plan)
        report.seconds = time.perf_counter() - started
        log.debug("%s", report.summary())
        return report

    # ------------------------------------------------------------------ validation
    def _plan(self, events: list[Event]) -> dict[str, Any]:
        def error(e: Event, problem: str, column: str | None = None, fix: str | None = None) -> EventError:
            return e.error(problem, column, fix)

        # items an event introduces (with their text), then every item known
        new_text: dict[int, str] = {}
        for e in events:
            if e.item_text is None:
                continue
            known = self.item_text.get(e.item_id, new_text.get(e.item_id))
            if known is not None and normalize_text(known) != normalize_text(e.item_text):
                raise error(e, f"item {e.item_id} already has the text {known!r}; an event cannot change an "
                               "item's text", "item_text",
                            "Leave item_text out for a known item (re-ingest to change it).")
            if e.item_id not in self.item_text:
                new_text[e.item_id] = e.item_text
        seen: set[tuple[int, int, int]] = set()
        by_user: dict[int, list[Event]] = {}
        for e in events:
            if e.item_id not in self.item_text and e.item_id not in new_text:
                raise error(e, f"item {e.item_id} is unknown (not in {self.paths.items.name} nor in earlier "
                               "events) and the event has no item_text", "item_id",
                            "Give the item's text (item_text) so that it can be encoded.")
            key = (e.user_id, e.item_id, e.time_us)
            if key in seen:
                raise error(e, f"repeats an earlier event of this request (user {e.user_id}, item "
                               f"{e.item_id}, {_iso(e.time_us)})")
            seen.add(key)
            by_user.setdefault(e.user_id, []).append(e)
        for uid, evs in by_user.items():
            latest = self.histories.latest(uid)
            for e in evs:
                if latest is not None and e.time_us <= latest:
                    raise error(
                        e, f"user {uid}'s event at {_iso(e.time_us)} is not after the user's latest "
                           f"interaction ({_iso(latest)}), which the user's current row (stamped "
                           f"{_iso(latest + US_PER_S)}) already holds", "timestamp",
                        "Send events in time order, newer than every interaction already pushed or ingested.")
        # behaviour texts; the ones to encode
        behavior: list[tuple[int, str]] = []
        for e in events:
            text = e.behavior_text if e.behavior_text is not None else self._item_text(e.item_id, new_text)
            behavior.append((stable_id(text), text))  # as ingest keeps it: the id of the normalised text
        for uid in by_user:  # the history the deep layers will read must be encoded (token level: its texts)
            rows = self.histories.last(uid, self.context_size)
            known = self.vectors if self.ft.granularity == "behavior" else self.behavior_text
            missing = [b for b in rows.behavior.tolist() if b not in known]
            if missing:
                raise EventError(f"user {uid}'s history holds behaviour {missing[0]}, which has no embedding",
                                 file=self.paths.atomic_behavior_embeddings,
                                 fix="Run `llmfeat encode` for this data dir (after every ingest).")
        return {"events": events, "by_user": by_user, "new_text": new_text, "behavior": behavior,
                "behavior_of": {id(e): b for e, (b, _) in zip(events, behavior)}}

    # ------------------------------------------------------------------ computing and writing
    def _apply(self, plan: dict[str, Any]) -> PushReport:
        from llm_features.embed_users import CHECKPOINT_METADATA_KEY, _part_table

        events: list[Event] = plan["events"]
        new_text: dict[int, str] = plan["new_text"]
        fp = self.fingerprint
        t0 = time.perf_counter()
        # 1. texts never encoded: behaviours of the events, and the items without an item_embeddings row
        first_seen: dict[int, int] = {}
        for e, (bid, _) in zip(events, plan["behavior"]):
            first_seen[bid] = min(first_seen.get(bid, e.time_us), e.time_us)
        item_first: dict[int, int] = {}
        for e in events:
            item_first[e.item_id] = min(item_first.get(e.item_id, e.time_us), e.time_us)
        new_behaviors = sorted({bid for bid, _ in plan["behavior"] if bid not in self.vectors})
        new_items = sorted(i for i in item_first if i not in self.encoded_items)
        item_key = {i: stable_id(self._item_text(i, new_text)) for i in new_items}
        texts = {bid: normalize_text(text) for bid, text in plan["behavior"] if bid in new_behaviors}
        for i in new_items:
            if item_key[i] not in self.vectors:
                texts.setdefault(item_key[i], normalize_text(self._item_text(i, new_text)))
        keys = sorted(texts)
        encoded = {}
        if keys:
            encoded = dict(zip(keys, self.backbone.encode_texts([texts[k] for k in keys]).numpy()))
        vectors = {**{k: self.vectors[k] for k in item_key.values() if k in self.vectors}, **encoded}

        # 2. the users' new rows: deep layers over the last n behaviours (embed-users' code path)
        rows_of = {uid: self._rows_with(uid, evs, plan) for uid, evs in plan["by_user"].items()}
        request_texts = dict(plan["behavior"])  # token level: the texts the deep layers read
        uids, stamps, states = self._user_states(rows_of, ChainMap(encoded, self.vectors),
                                                 ChainMap(self.behavior_text, request_texts))
        recent = self._recent_rows(rows_of) if self.recent_n is not None else None
        compute = time.perf_counter() - t0

        # 3. offline: the events, then the rows (part files, atomic), then the online store
        written: list[Path] = []
        log_table = pa.table({
            "user_id": pa.array([e.user_id for e in events], pa.int64()),
            "item_id": pa.array([e.item_id for e in events], pa.int64()),
            "event_timestamp": utc_us(pa.array([e.time_us for e in events], pa.int64())),
            "behavior_id": pa.array([b for b, _ in plan["behavior"]], pa.int64()),
            "behavior_text": pa.array([t for _, t in plan["behavior"]], pa.string()),
            "item_text": pa.array([new_text.get(e.item_id) for e in events], pa.string()),
            "label": pa.array([e.label for e in events], pa.int8()),
            "rating": pa.array([None if math.isnan(e.rating) else e.rating for e in events], pa.float32()),
        }, schema=EVENT_SCHEMA)
        pushed = {"pushed_at": _iso(int(time.time() * US_PER_S)), "pid": os.getpid()}
        part = write_part(self.paths.events, log_table, name=self._part_name("events", log_table),
                          metadata={EVENTS_METADATA_KEY: json.dumps(pushed)})
        written.append(part)
        self._watch["events"].mark(part)
        self._bump_head()
        self._apply_log(log_table)

        from llm_features.encode import _write_rows

        behaviors_t = pa.table({
            "behavior_id": pa.array(new_behaviors, pa.int64()),
            "event_timestamp": utc_us(pa.array([first_seen[b] for b in new_behaviors], pa.int64())),
        })
        items_t = pa.table({
            "item_id": pa.array(new_items, pa.int64()),
            "text_key": pa.array([item_key[i] for i in new_items], pa.int64()),
            "event_timestamp": utc_us(pa.array([self.item_ts.get(i, item_first[i]) for i in new_items],
                                               pa.int64())),
        })
        if new_behaviors or new_items:
            paths, _, _ = _write_rows(self.ws, fp, vectors, behaviors_t, items_t)
            written += paths
            for p in paths:
                self._watch["atomic_behavior_embeddings" if p.parent == self.paths.atomic_behavior_embeddings
                            else "item_embeddings"].mark(p)
        for bid in new_behaviors:
            self.vectors[bid] = encoded[bid]
        self.encoded_items.update(new_items)

        users_t = _part_table(uids, states, stamps)
        count = {int(u): self.histories.count(int(u)) for u in uids}
        meta = {
            FINGERPRINT_METADATA_KEY: fp.to_json(),
            CHECKPOINT_METADATA_KEY: json.dumps(self.identity, sort_keys=True),
            EVENTS_METADATA_KEY: json.dumps(
                {"users": {str(u): [int(s), count[int(u)]] for u, s in zip(uids, stamps)}}, sort_keys=True),
        }
        p = write_part(self.paths.user_embeddings, users_t, metadata=meta,
                       name=self._part_name("users", users_t))
        written.append(p)
        self._watch["user_embeddings"].mark(p)
        if recent is not None:
            from llm_features.recent import METADATA_KEY

            p = write_part(self.paths.user_recent_behaviors, recent, name=self._part_name("recent", recent),
                           metadata={METADATA_KEY: json.dumps({"n": self.recent_n, "cadence": "event",
                                                               "pushed": True})})
            written.append(p)

        offline = time.perf_counter() - t0 - compute
        # online, through the push sources
        def frame(table: pa.Table) -> pd.DataFrame:
            return pd.DataFrame(table.to_pydict())  # list columns as lists, as feast's push takes them

        if new_behaviors:
            self._push("atomic_behavior_embeddings", frame(pa.table({
                "behavior_id": behaviors_t["behavior_id"],
                "behavior_embedding": embedding_array(np.stack([encoded[b] for b in new_behaviors])),
                "event_timestamp": behaviors_t["event_timestamp"]})))
        if new_items:
            self._push("item_embeddings", frame(pa.table({
                "item_id": items_t["item_id"],
                "item_embedding": embedding_array(np.stack([vectors[item_key[i]] for i in new_items])),
                "event_timestamp": items_t["event_timestamp"]})))
        self._push("user_embeddings", frame(users_t))
        if recent is not None:
            self._push("user_recent_behaviors", frame(recent))
        return PushReport(
            users_updated=sorted(int(u) for u in uids), items_encoded=new_items,
            behaviors_encoded=new_behaviors,
            events=len(events), event_timestamps={int(u): _iso(int(s)) for u, s in zip(uids, stamps)},
            recent_pushed=recent is not None, parts_written=[str(p) for p in written],
            compute_seconds=compute,
            timings={"check": plan["checked"], "compute": compute, "offline": offline,
                     "online": time.perf_counter() - t0 - compute - offline})

    @staticmethod
    def _part_name(kind: str, table: pa.Table) -> str:
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        h = hashlib.sha256(sink.getvalue())
        return f"{PUSH_PREFIX}-{kind}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{h.hexdigest()[:16]}"

    def _item_text(self, item: int, new_text: dict[int, str]) -> str:
        return new_text[item] if item in new_text else self.item_text[item]

    def _rows_with(self, uid: int, evs: list[Event], plan: dict[str, Any]) -> _Rows:
        """The user's last interactions (enough for the deep layers and the recent list) plus the new ones."""
        bid = plan["behavior_of"]
        new = _Rows(np.array([e.time_us for e in evs], np.int64),
                    np.array([e.item_id for e in evs], np.int64),
                    np.array([bid[id(e)] for e in evs], np.int64), np.array([e.label for e in evs], np.int8),
                    np.array([e.rating for e in evs], np.float32))
        k = max(self.context_size, self.recent_n or 0)
        both = _Rows.concat([self.histories.last(uid, k), new]).sorted()
        return both.take(slice(max(0, len(both) - k), None))

    def _user_states(self, rows_of: dict[int, _Rows], vectors: Mapping[int, np.ndarray],
                     texts_of: Mapping[int, str]):
        from llm_features.embed_users import final_user_states
        from llm_features.finetune.data import FinetuneData
        from llm_features.finetune.packing import UserHistories, feedback_index

        n = self.context_size
        parts = [(uid, r.take(slice(max(0, len(r) - n), None))) for uid, r in rows_of.items()]
        rows = _Rows.concat([r for _, r in parts])
        user = np.concatenate([np.full(len(r), uid, np.int64) for uid, r in parts])
        bids, brow = np.unique(rows.behavior, return_inverse=True)
        hist = UserHistories.from_arrays(
            user, rows.time, brow, np.zeros(len(rows), np.int64), rows.label,
            feedback_index(rows.label, rows.rating.astype(np.float64), self.ft.feedback))
        dim = self.backbone.hidden_size
        table = None
        if self.ft.granularity == "behavior":
            table = torch.from_numpy(np.stack([vectors[b] for b in bids.tolist()]).astype(np.float32))
        texts = []
        if self.ft.granularity == "token":
            texts = [texts_of[b] for b in bids.tolist()]
        data = FinetuneData(hist, table, torch.zeros(1, dim), texts)
        return final_user_states(self.model, self.ft, data, context_size=n, device=self.device)

    def _recent_rows(self, rows_of: dict[int, _Rows]) -> pa.Table:
        from llm_features.recent import build_recent_behaviors

        n = int(self.recent_n)
        parts = [(uid, r.take(slice(max(0, len(r) - n), None))) for uid, r in rows_of.items()]
        rows = _Rows.concat([r for _, r in parts])
        table = build_recent_behaviors(pd.DataFrame({
            "user_id": np.concatenate([np.full(len(r), uid, np.int64) for uid, r in parts]),
            "item_id": rows.item, "event_timestamp": rows.time, "behavior_id": rows.behavior,
            "label": rows.label,
        }), n=n, cadence="event")
        users = table["user_id"].to_numpy()
        last = np.flatnonzero(np.append(users[1:] != users[:-1], True))  # each user's final row
        return table.take(pa.array(last))

    def _push(self, view: str, df: pd.DataFrame) -> None:
        """``store.push(<view>_push, df, to=PushMode.ONLINE)``, with the push source's views resolved once."""
        source = PUSH_SOURCES[view]
        if self._feast_push:  # a feature service precomputes online vectors: let feast's push refresh them
            from feast.data_source import PushMode

            self.store.push(source, df, to=PushMode.ONLINE)
            return
        for name in self._push_views[source]:
            self.store.write_to_online_store(name, df)


# ---------------------------------------------------------------------------------------------- module API
_DEFAULT: EventProcessor | None = None
_DEFAULT_LOCK = threading.Lock()


def default_processor(**kwargs: Any) -> EventProcessor:
    """The process-wide :class:`EventProcessor` (built on first use from ``kwargs``, else the defaults:
    ``$LLMFEAT_DATA_DIR``, its ``runs/finetune``, ``feast_repo``)."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            _DEFAULT = EventProcessor(**kwargs)
        return _DEFAULT


def handle_events(payload: Any, processor: EventProcessor | None = None) -> dict[str, Any]:
    """``POST /events``: ``{"events": [...]}`` in, ``{"users_updated": [...], "items_encoded": [...], ...}``.

    Uses ``processor`` (else :func:`default_processor`). Bad input raises :class:`EventError`, a
    ``ValueError`` (map it to HTTP 400); nothing is written then.
    """
    return (processor or default_processor()).handle_events(payload)


__all__ = [
    "EVENT_FIELDS", "Event", "EventError", "EventProcessor", "PushReport", "default_processor",
    "handle_events", "parse_event", "parse_payload", "read_events_file",
]
