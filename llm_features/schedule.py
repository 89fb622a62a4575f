"""The snapshot schedule: at which stamps a per-user table holds a row (one home for both such tables).

``user_recent_behaviors`` (:mod:`llm_features.recent`) and ``user_embeddings``
(:mod:`llm_features.embed_users`) hold, per user, snapshots of the history strictly before a
stamp ``T``. The cadence says which stamps:

* ``event``: each distinct interaction time of the user, plus a final stamp at (last interaction
  + 1 s); with ``every = k > 1`` only the user's first ``k`` times and then every ``k``-th are kept;
* ``day``: the start of each UTC day with activity, plus a final stamp at the start of the day
  after the last active day;
* ``last`` (user embeddings only): only the final stamp.

Times are int64 microseconds since the epoch, UTC. Each table names its part files
``<prefix>-<fields...>`` after its own prefix (``recent``, ``users``): :func:`part_name`.

Example::

    schedule = SnapshotSchedule("day")
    schedule.stamps(ts)            # [N] the day start of each interaction time
    schedule.final_stamps(last)    # [U] the start of the day after each user's last interaction
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

Cadence = Literal["event", "day", "last"]
US_PER_S = 1_000_000
US_PER_DAY = 86_400 * US_PER_S


def check_every(every: int) -> None:
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")


@dataclass(frozen=True)
class SnapshotSchedule:
    """Which interaction times of a user open a snapshot, and the stamp each snapshot gets."""

    cadence: Cadence = "event"
    every: int = 1
    """With cadence ``event``: keep the first ``every`` interaction times, then every ``every``-th."""

    @property
    def label(self) -> str:
        """The cadence as part names and metadata record it: ``event``, ``event<k>``, ``day``, ``last``."""
        return self.cadence if self.every == 1 or self.cadence != "event" else f"event{self.every}"

    def stamps(self, ts: np.ndarray) -> np.ndarray:
        """``[N]`` the stamp of the snapshot each time ``ts`` opens: itself, or its UTC day's start (day)."""
        return np.floor_divide(ts, US_PER_DAY) * US_PER_DAY if self.cadence == "day" else ts

    def final_stamps(self, last_ts: np.ndarray) -> np.ndarray:
        """``[U]`` the stamp of the final row after each user's last interaction time ``last_ts``."""
        if self.cadence == "day":
            return (np.floor_divide(last_ts, US_PER_DAY) + 1) * US_PER_DAY
        return last_ts + US_PER_S

    def kept(self, opens: np.ndarray, user_start: np.ndarray) -> np.ndarray:
        """``[N]`` which snapshot-opening rows ``opens`` to keep (``every`` thins cadence ``event`` only).

        ``user_start[i]`` is the first row of row ``i``'s user. A user's opening rows are numbered
        ``0, 1, 2, ...`` (``0``: its first time, with no history); ``1..every`` and then the
        multiples of ``every`` are kept.
        """
        if self.every == 1 or self.cadence != "event":
            return opens
        count = np.cumsum(opens)
        idx = count - count[user_start]  # 0 at the user's first interaction time
        return opens & ((idx <= self.every) | (idx % self.every == 0))


def opens_snapshot(users: np.ndarray, stamps: np.ndarray) -> np.ndarray:
    """``[N]`` bool: the first row of each run of equal (user, stamp) in rows sorted by user and time."""
    opens = np.ones(len(users), dtype=bool)
    opens[1:] = (users[1:] != users[:-1]) | (stamps[1:] != stamps[:-1])
    return opens


def part_name(prefix: str, *fields: object) -> str:
    """The name of a snapshot table's part file: ``<prefix>-<field>-<field>...``."""
    return "-".join([prefix, *map(str, fields)])


def is_part_of(path: Path, prefix: str) -> bool:
    """Whether part file ``path`` belongs to the snapshot table whose parts are named after ``prefix``."""
    return path.name.startswith(f"part-{prefix}-")


__all__ = ["Cadence", "SnapshotSchedule", "US_PER_DAY", "US_PER_S", "check_every", "is_part_of",
           "opens_snapshot", "part_name"]
