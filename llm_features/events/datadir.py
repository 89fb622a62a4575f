"""What the batch stages left in the data dir, and what other processors pushed since: the
:class:`~llm_features.events.EventProcessor`'s checks at load and its in-memory tables, kept in step
with the data dir (a re-ingest reloads them; new part files are applied as they appear).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from llm_features.atomic import write_json
from llm_features.errors import UserError
from llm_features.events.history import _Histories, _Rows, _stat_key
from llm_features.events.offline import PUSH_PREFIX
from llm_features.fingerprint import FingerprintMismatchError
from llm_features.parquet_io import embedding_matrix, file_metadata, list_parts, utc_us

log = logging.getLogger("llm_features.events")  # one logger for the package, as when it was one module


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


class _DataDirState:
    """The processor's view of its data dir (a mixin of :class:`~llm_features.events.EventProcessor`):
    the serving identity of the exported user embeddings, ingest's recent-list n, the histories, item
    texts and encoded ids, and the events log shared with other processors (``events/.llmfeat-head``)."""

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
        write_json(self._head_file, {"pushes": self._seen_head, "pid": os.getpid()})

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
