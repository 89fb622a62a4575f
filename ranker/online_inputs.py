"""The model inputs split into a user side and an item side, so the item side is computed once per item.

:class:`InputLayout` says which dense columns and sparse slots come from the user's row and which
from the item's; :class:`Tables` pools embeddings with numpy; :class:`ItemInputs` holds the item
side (dense columns, pooled embeddings, defaults taken) of every item read so far, one row per item.
:class:`ranker.online.OnlineScorer` fills the table and gathers a request's rows from it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ranker.features import ITEM_ID, USER_ID, EncodedRows, FeatureEncoder

MAX_ABSENT_IDS = 100_000
"""Ids the store does not have that the item table remembers (beyond: read again on each request)."""


@dataclass
class InputLayout:
    """Which model inputs come from the user's row and which from the item's.

    Dense columns by index; sparse features by their slot in the pooled embeddings ``[B, F, D]``
    (``encoder.sparse_names`` order); :class:`MissingFeatures` keys by owner.
    """

    user_dense: np.ndarray
    item_dense: np.ndarray
    user_slots: list[int]
    item_slots: list[int]  # the item's features, but not its id (looked up per request)
    item_id_slots: list[int]
    user_keys: list[str]
    item_keys: list[str]  # (without the item id's: counted per request)

    @classmethod
    def of(cls, encoder: FeatureEncoder, user_columns: set[str], item_columns: set[str]) -> "InputLayout":
        def owner(column: str) -> str:
            # a column both sides have is the item's (get_online_features' to_dict keeps the later one);
            # one neither has takes its default on both sides, so either will do
            if column == USER_ID:
                return "user"
            if column == ITEM_ID or column in item_columns:
                return "item"
            return "user" if column in user_columns else "item"

        user_dense, item_dense = [], []
        for column, start, end in encoder.dense_columns():
            (user_dense if owner(column) == "user" else item_dense).extend(range(start, end))
        keys = {f"missing_{column}": owner(column) for column in (*encoder.numeric_stats, *encoder.llm_dims)}
        feats = encoder.features
        user_slots, item_slots, item_ids = [], [], []
        for slot, name in enumerate(encoder.sparse_names):
            column = feats[name].column
            if column == ITEM_ID:
                item_ids.append(slot)
                continue
            keys[f"unknown_{name}"] = owner(column)
            (user_slots if owner(column) == "user" else item_slots).append(slot)
        return cls(np.asarray(user_dense, np.int64), np.asarray(item_dense, np.int64), user_slots, item_slots,
                   item_ids, [k for k, o in keys.items() if o == "user"], [k for k, o in keys.items() if o == "item"])


class Tables:
    """The ranker's embedding tables as numpy arrays: the sparse arch's pooling without its per-call
    overhead (a one-row user costs microseconds)."""

    def __init__(self, model: torch.nn.Module, encoder: FeatureEncoder) -> None:
        bags = model.embedding_bag_collection.embedding_bags
        feats = encoder.features
        self.weights = {name: bags[f"t_{name}"].weight.detach().numpy() for name in encoder.sparse_names}
        self.mean = {name: feats[name].multi for name in encoder.sparse_names}  # else SUM (encoder.tables)

    def lookup(self, name: str, rows: np.ndarray) -> np.ndarray:
        """``[N, D]`` embeddings of one-valued rows."""
        return self.weights[name][rows]

    def pool(self, rows: EncodedRows, names: list[str]) -> np.ndarray:
        """``[N, len(names), D]``: the pooled embeddings of sparse features ``names`` of ``rows``."""
        n = len(rows)
        out = np.empty((n, len(names), self.weights[names[0]].shape[1] if names else 0), np.float32)
        for j, name in enumerate(names):
            offsets, vals = rows.sparse[name]
            w = self.weights[name]
            if offsets is None:
                out[:, j] = w[vals]
                continue
            # every bag holds at least one value (an empty one holds the OOV row)
            sums = np.add.reduceat(w[vals], offsets[:-1], axis=0)
            out[:, j] = sums / np.diff(offsets)[:, None] if self.mean[name] else sums
        return out


class ItemInputs:
    """The item side of the model inputs per item id; row 0 is an item the online store does not have.

    ``dense [rows, len(layout.item_dense)]`` (the item's dense columns, e.g. its embedding and
    missing flag), ``pooled [rows, len(layout.item_slots), D]`` (its sparse features' pooled
    embeddings), ``masks[key] [rows]`` (which defaults it took). Grows as new ids are read;
    ``version`` is the state of the item views it was read from
    (:meth:`ranker.online.OnlineScorer.item_version`).
    """

    def __init__(self, layout: InputLayout, version: Any,
                 absent: tuple[np.ndarray, np.ndarray, dict]) -> None:
        self.layout = layout
        self.version = version
        self.index: dict[int, int] = {}
        self.size = 0
        self.absent_ids = 0
        dense, pooled, _ = absent
        self.dense = np.zeros((0, dense.shape[1]), np.float32)
        self.pooled = np.zeros((0, *pooled.shape[1:]), np.float32)
        self.masks = {key: np.zeros(0, bool) for key in layout.item_keys}
        self._append(absent, np.zeros(1, np.int64))

    @property
    def items(self) -> int:
        """Item ids the store has that the table holds."""
        return self.size - 1

    def add(self, ids: Sequence[int], encoded: tuple[np.ndarray, np.ndarray, dict], found: np.ndarray) -> None:
        """Add the item inputs of ``ids`` (``(dense, pooled, masks)`` in the same order); ids the store
        does not have (``found`` False) map to row 0."""
        keep = np.flatnonzero(found)
        start = self._append(encoded, keep)
        for pos, i in enumerate(keep):
            self.index[int(ids[i])] = start + pos
        for i in np.flatnonzero(~found):
            if self.absent_ids < MAX_ABSENT_IDS:
                self.index[int(ids[i])] = 0
                self.absent_ids += 1

    def _append(self, encoded: tuple[np.ndarray, np.ndarray, dict], keep: np.ndarray) -> int:
        dense, pooled, masks = encoded
        start, end = self.size, self.size + len(keep)
        if end > len(self.dense):
            cap = max(end, 2 * len(self.dense), 64)
            self.dense = _grown(self.dense, cap, start)
            self.pooled = _grown(self.pooled, cap, start)
            self.masks = {k: _grown(v, cap, start) for k, v in self.masks.items()}
        self.dense[start:end] = dense[keep]
        self.pooled[start:end] = pooled[keep]
        for key in self.layout.item_keys:
            self.masks[key][start:end] = masks[key][keep]
        self.size = end
        return start


def dense_runs(columns: np.ndarray) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """``columns`` (ascending dense column indices) as runs: ``((start, end) in the dense block,
    (start, end) in the side's own columns)``, so a side is copied with a few slices."""
    runs: list[tuple[tuple[int, int], tuple[int, int]]] = []
    for pos, col in enumerate(columns.tolist()):
        if runs and runs[-1][0][1] == col:
            (s, _), (a, _) = runs[-1]
            runs[-1] = ((s, col + 1), (a, pos + 1))
        else:
            runs.append(((col, col + 1), (pos, pos + 1)))
    return runs


def _grown(a: np.ndarray, rows: int, keep: int) -> np.ndarray:
    out = np.zeros((rows, *a.shape[1:]), a.dtype)
    out[:keep] = a[:keep]
    return out
