"""Step 2: vocabularies (raw value -> table row, row 0 for unknown) and the model-ready rows they
index into, cut into ``torchrec`` batches."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch
from torchrec import KeyedJaggedTensor
from torchrec.datasets.utils import Batch

from ranker.features.spec import ALWAYS_ON, INT_MISSING


@dataclass
class Vocabulary:
    """Raw value -> table row. Row 0 is the OOV/missing row; known values take rows 1..len(keys)."""

    kind: str  # "int" or "str"
    keys: list[Any]

    def __post_init__(self) -> None:
        if self.kind == "int":
            self._sorted = np.asarray(sorted(int(k) for k in self.keys), dtype=np.int64)
            self.keys = self._sorted.tolist()
        else:
            self.keys = sorted(str(k) for k in self.keys)
            self._index = {k: i + 1 for i, k in enumerate(self.keys)}

    @property
    def num_rows(self) -> int:
        return len(self.keys) + 1

    @classmethod
    def of(cls, kind: str, values: np.ndarray) -> "Vocabulary":
        if kind == "int":
            return cls(kind, np.unique(values[values != INT_MISSING]).tolist())
        return cls(kind, sorted({v for v in values.tolist() if v is not None}))

    def lookup(self, values: np.ndarray) -> np.ndarray:
        """``[M]`` raw values -> ``[M]`` int64 rows (0 for missing or unseen)."""
        if self.kind == "int":
            if len(self._sorted) == 0:
                return np.zeros(len(values), np.int64)
            pos = np.searchsorted(self._sorted, values)
            pos_c = np.minimum(pos, len(self._sorted) - 1)
            hit = self._sorted[pos_c] == values
            return np.where(hit, pos_c + 1, 0).astype(np.int64)
        get = self._index.get
        rows = (get(v, 0) if v is not None else 0 for v in values.tolist())
        return np.fromiter(rows, np.int64, count=len(values))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "keys": self.keys}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Vocabulary":
        return cls(d["kind"], list(d["keys"]))


@dataclass
class EncodedRows:
    """Model-ready rows: ``dense [N, F_dense]`` float32, indexed ``sparse`` bags, ``labels [N]``."""

    dense: np.ndarray
    sparse: dict[str, tuple[np.ndarray | None, np.ndarray]]
    labels: np.ndarray | None
    sparse_names: list[str]
    llm_flag_columns: list[int]  # dense columns holding a missing flag (set by missing_dropout)
    users: np.ndarray | None = None  # ``[N]`` raw user ids, where a caller needs per-user metrics
    missing: dict[str, np.ndarray] = field(default_factory=dict)
    """``[N]`` bool per :class:`MissingFeatures` key: the rows that took that default (only when asked)."""

    def __len__(self) -> int:
        return len(self.dense)

    def batch(
        self,
        idx: np.ndarray,
        rng: np.random.Generator | None = None,
        oov_dropout: float = 0.0,
        missing_dropout: float = 0.0,
    ) -> Batch:
        """The rows ``idx`` as a ``torchrec`` :class:`Batch`.

        With ``rng``, single ids of ``user_id``/``item_id`` drop to the OOV row with probability
        ``oov_dropout`` and LLM vectors are flagged missing with probability ``missing_dropout``
        (training only).
        """
        dense = self.dense[idx]
        if rng is not None and missing_dropout > 0 and self.llm_flag_columns:
            dense = dense.copy()
            for c in self.llm_flag_columns:
                drop = rng.random(len(idx)) < missing_dropout
                dense[drop, c] = 1.0  # the model swaps in its learned missing vector where the flag is set
        lengths, values = [], []
        for name in self.sparse_names:
            offsets, vals = self.sparse[name]
            if offsets is None:
                v = vals[idx]
                if rng is not None and oov_dropout > 0 and name in ALWAYS_ON:
                    v = np.where(rng.random(len(idx)) < oov_dropout, 0, v)
                lengths.append(np.ones(len(idx), np.int64))
                values.append(v)
            else:
                ln, v = _gather_bags(offsets, vals, idx)
                lengths.append(ln)
                values.append(v)
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=list(self.sparse_names),
            values=torch.from_numpy(np.concatenate(values)),
            lengths=torch.from_numpy(np.concatenate(lengths)),
        )
        labels = torch.from_numpy(self.labels[idx]) if self.labels is not None else torch.zeros(len(idx))
        dense_t = torch.from_numpy(np.ascontiguousarray(dense))
        return Batch(dense_features=dense_t, sparse_features=kjt, labels=labels)

    def batches(
        self,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        oov_dropout: float = 0.0,
        missing_dropout: float = 0.0,
        drop_last: bool = False,
        num_batches: int | None = None,
    ) -> Iterator[Batch]:
        """Consecutive (or shuffled, with training-time dropouts) batches over all rows."""
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(self)) if shuffle else np.arange(len(self))
        stop = len(self) - (len(self) % batch_size if drop_last else 0)
        starts = range(0, stop, batch_size)
        if num_batches is not None:
            starts = starts[:num_batches]
        for s in starts:
            yield self.batch(order[s : s + batch_size], rng if shuffle else None, oov_dropout, missing_dropout)


def _gather_bags(offsets: np.ndarray, values: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    starts = offsets[idx]
    lengths = offsets[idx + 1] - starts
    total = int(lengths.sum())
    within = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return lengths, values[np.repeat(starts, lengths) + within]

