"""Offline writes of a push: part files in the views' source directories (``parquet_io.write_part``,
atomic), named ``part-push-<kind>-<time>-<hash>``, under the data dir's lock.

The events themselves go to ``<data dir>/events/`` first (the interactions pushed since ingest), then the
new ``atomic_behavior_embeddings`` / ``item_embeddings`` rows (what ``llmfeat encode`` writes), the users'
new ``user_embeddings`` rows (with the fingerprint and the checkpoint identity embed-users records) and
their ``user_recent_behaviors`` lists.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path

import pyarrow as pa

from llm_features.events.compute import _FreshRows, _NewTexts
from llm_features.events.parsing import US_PER_S, _iso
from llm_features.events.plan import _Plan
from llm_features.fingerprint import FINGERPRINT_METADATA_KEY
from llm_features.parquet_io import utc_us, write_part

EVENTS_METADATA_KEY = "llmfeat.events"
PUSH_PREFIX = "push"
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


class _OfflineWrites:
    """The part files of one push (a mixin of :class:`~llm_features.events.EventProcessor`); each write
    marks its part as seen (``_watch``), so that the processor does not apply it twice."""

    @staticmethod
    def _part_name(kind: str, table: pa.Table) -> str:
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        h = hashlib.sha256(sink.getvalue())
        return f"{PUSH_PREFIX}-{kind}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{h.hexdigest()[:16]}"

    def _log_events(self, plan: _Plan) -> Path:
        """The events log part (``events/``), announced to other processors and applied to the histories."""
        events, new_text = plan.events, plan.new_text
        log_table = pa.table({
            "user_id": pa.array([e.user_id for e in events], pa.int64()),
            "item_id": pa.array([e.item_id for e in events], pa.int64()),
            "event_timestamp": utc_us(pa.array([e.time_us for e in events], pa.int64())),
            "behavior_id": pa.array([b for b, _ in plan.behavior], pa.int64()),
            "behavior_text": pa.array([t for _, t in plan.behavior], pa.string()),
            "item_text": pa.array([new_text.get(e.item_id) for e in events], pa.string()),
            "label": pa.array([e.label for e in events], pa.int8()),
            "rating": pa.array([None if math.isnan(e.rating) else e.rating for e in events], pa.float32()),
        }, schema=EVENT_SCHEMA)
        pushed = {"pushed_at": _iso(int(time.time() * US_PER_S)), "pid": os.getpid()}
        part = write_part(self.paths.events, log_table, name=self._part_name("events", log_table),
                          metadata={EVENTS_METADATA_KEY: json.dumps(pushed)})
        self._watch["events"].mark(part)
        self._bump_head()
        self._apply_log(log_table)
        return part

    def _encoded_tables(self, new: _NewTexts) -> tuple[pa.Table, pa.Table]:
        """The keys and stamps of the new ``atomic_behavior_embeddings`` and ``item_embeddings`` rows."""
        behaviors_t = pa.table({
            "behavior_id": pa.array(new.behaviors, pa.int64()),
            "event_timestamp": utc_us(pa.array([new.behavior_time[b] for b in new.behaviors], pa.int64())),
        })
        items_t = pa.table({
            "item_id": pa.array(new.items, pa.int64()),
            "text_key": pa.array([new.item_key[i] for i in new.items], pa.int64()),
            "event_timestamp": utc_us(pa.array([self.item_ts.get(i, new.item_time[i]) for i in new.items],
                                               pa.int64())),
        })
        return behaviors_t, items_t

    def _write_encoded(self, new: _NewTexts, behaviors_t: pa.Table, items_t: pa.Table) -> list[Path]:
        """The rows ``llmfeat encode`` would write for the new texts; then they count as encoded here."""
        from llm_features.encode import _write_rows

        paths: list[Path] = []
        if new.behaviors or new.items:
            paths, _, _ = _write_rows(self.ws, self.fingerprint, new.vectors, behaviors_t, items_t)
            for p in paths:
                self._watch["atomic_behavior_embeddings" if p.parent == self.paths.atomic_behavior_embeddings
                            else "item_embeddings"].mark(p)
        for bid in new.behaviors:
            self.vectors[bid] = new.encoded[bid]
        self.encoded_items.update(new.items)
        return list(paths)

    def _write_user_rows(self, fresh: _FreshRows) -> tuple[pa.Table, Path]:
        """The users' new ``user_embeddings`` rows, with the metadata embed-users writes (and each user's
        stamp and interaction count)."""
        from llm_features.embed_users import CHECKPOINT_METADATA_KEY, _part_table

        uids, stamps = fresh.uids, fresh.stamps
        users_t = _part_table(uids, fresh.states, stamps)
        count = {int(u): self.histories.count(int(u)) for u in uids}
        meta = {
            FINGERPRINT_METADATA_KEY: self.fingerprint.to_json(),
            CHECKPOINT_METADATA_KEY: json.dumps(self.identity, sort_keys=True),
            EVENTS_METADATA_KEY: json.dumps(
                {"users": {str(u): [int(s), count[int(u)]] for u, s in zip(uids, stamps)}}, sort_keys=True),
        }
        p = write_part(self.paths.user_embeddings, users_t, metadata=meta,
                       name=self._part_name("users", users_t))
        self._watch["user_embeddings"].mark(p)
        return users_t, p

    def _write_recent(self, recent: pa.Table) -> Path:
        """The users' new ``user_recent_behaviors`` lists."""
        from llm_features.recent import METADATA_KEY

        return write_part(self.paths.user_recent_behaviors, recent, name=self._part_name("recent", recent),
                          metadata={METADATA_KEY: json.dumps({"n": self.recent_n, "cadence": "event",
                                                              "pushed": True})})
