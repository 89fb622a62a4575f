"""User histories: every interaction grouped by user and sorted by time, and the feedback vocabulary
(the label, or the rounded rating) their contexts carry.

Fine-tuning reads them from a workspace (:mod:`llm_features.finetune.data`) and packs them into
sequences (:mod:`llm_features.finetune.packing`); the user states of ``embed-users`` and the event
path build them too.

Example::

    hist = UserHistories.from_arrays(user, time, behavior_row, item_row, label,
                                     feedback_index(label, rating, "rating"), split)
    rows_of_first_user = slice(hist.offsets[0], hist.offsets[1])
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Feedback vocabulary: 0/1 = label (disliked/liked); 2 + r = rating r (r rounded, 0..10).
NUM_FEEDBACK = 13


def feedback_index(label: np.ndarray, rating: np.ndarray | None, mode: str) -> np.ndarray:
    """``[N]`` feedback ids: the label (``mode="label"``), or the rounded rating where known (``"rating"``)."""
    label = np.asarray(label).astype(np.int64)
    if mode == "label" or rating is None:
        return label
    if mode != "rating":
        raise ValueError(f"unknown feedback mode {mode!r}; choose label or rating")
    rating = np.asarray(rating, dtype=np.float64)
    known = np.isfinite(rating)
    out = label.copy()
    out[known] = 2 + np.clip(np.rint(rating[known]), 0, 10).astype(np.int64)
    return out


def feedback_words(index: int) -> str:
    """The feedback of an interaction written as words (token level)."""
    if index == 0:
        return "disliked"
    if index == 1:
        return "liked"
    r = index - 2
    return f"rated {r} star" + ("" if r == 1 else "s")


@dataclass
class UserHistories:
    """All interactions grouped by user and sorted by time (ties in input order); arrays are ``[N]``.

    Row indices are global; ``offsets[u]:offsets[u+1]`` are the rows of user ``user_ids[u]``.
    """

    user_ids: np.ndarray
    offsets: np.ndarray
    time: np.ndarray
    behavior_row: np.ndarray
    item_row: np.ndarray
    label: np.ndarray
    feedback: np.ndarray
    split: np.ndarray
    time_start: np.ndarray
    """First row of the same user with the same timestamp: ``h`` is strictly earlier than ``i`` iff ``h < time_start[i]``."""
    user_start: np.ndarray
    """First row of the row's user."""

    def __len__(self) -> int:
        return len(self.time)

    @classmethod
    def from_arrays(
        cls,
        user: np.ndarray,
        time: np.ndarray,
        behavior_row: np.ndarray,
        item_row: np.ndarray,
        label: np.ndarray,
        feedback: np.ndarray | None = None,
        split: np.ndarray | None = None,
    ) -> "UserHistories":
        """Group and sort raw interaction arrays (any order) by (user, time), keeping input order for ties."""
        user = np.asarray(user, dtype=np.int64)
        time = np.asarray(time, dtype=np.int64)
        n = len(user)
        order = np.lexsort((np.arange(n), time, user))
        user, time = user[order], time[order]
        label = np.asarray(label)[order].astype(np.float32)
        feedback = (label.astype(np.int64) if feedback is None else np.asarray(feedback, dtype=np.int64)[order])
        split = np.zeros(n, np.int8) if split is None else np.asarray(split, dtype=np.int8)[order]
        new_user = np.ones(n, dtype=bool)
        new_user[1:] = user[1:] != user[:-1]
        new_time = new_user.copy()
        new_time[1:] |= time[1:] != time[:-1]
        rows = np.arange(n, dtype=np.int64)
        user_start = np.maximum.accumulate(np.where(new_user, rows, 0))
        time_start = np.maximum.accumulate(np.where(new_time, rows, 0))
        starts = np.flatnonzero(new_user)
        return cls(
            user_ids=user[starts],
            offsets=np.append(starts, n).astype(np.int64),
            time=time,
            behavior_row=np.asarray(behavior_row, dtype=np.int64)[order],
            item_row=np.asarray(item_row, dtype=np.int64)[order],
            label=label,
            feedback=feedback,
            split=split,
            time_start=time_start,
            user_start=user_start,
        )

    def select_users(self, keep: np.ndarray) -> "UserHistories":
        """The histories of the users at positions ``keep`` (indices into ``user_ids``)."""
        keep = np.sort(np.asarray(keep, dtype=np.int64))
        rows = np.concatenate([np.arange(self.offsets[u], self.offsets[u + 1]) for u in keep]) if len(keep) else (
            np.zeros(0, np.int64))
        user = np.repeat(self.user_ids[keep], np.diff(self.offsets)[keep])
        return UserHistories.from_arrays(
            user, self.time[rows], self.behavior_row[rows], self.item_row[rows], self.label[rows],
            self.feedback[rows], self.split[rows],
        )


__all__ = ["NUM_FEEDBACK", "UserHistories", "feedback_index", "feedback_words"]
