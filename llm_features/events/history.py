"""The in-memory state of an :class:`~llm_features.events.EventProcessor`: every user's interactions
(:class:`_Histories`) and the part files of a directory that appeared since the last look
(:class:`_DirWatch`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from llm_features.parquet_io import list_parts, utc_us


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
