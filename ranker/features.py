"""From Feast feature rows to ranker batches: vocabularies, dense inputs and KeyedJaggedTensors.

The same two steps run at training, evaluation and serving time, so a row is turned into model
inputs in exactly one way:

1. :func:`extract` reads a feature frame -- the DataFrame of ``get_historical_features`` or
   the columns of ``get_online_features`` -- into :class:`RawRows`: the numeric block, the LLM
   vectors with their missing flags, and the raw (not yet indexed) sparse values.
2. :meth:`FeatureEncoder.index` maps the raw sparse values through the vocabularies fitted on
   the train split into :class:`EncodedRows`, from which :meth:`EncodedRows.batch` cuts
   ``torchrec`` batches (dense ``[B, F_dense]`` and a KJT of ``F`` sparse features).

Missing features have one documented policy, the same offline and online:

* **Row 0 of every table is reserved** for "unseen or missing": ids that were not in the train
  split, a missing categorical value, and an empty bag (no genres, no recent items) all map to
  it. During training a small share of ids is dropped to row 0 (``oov_dropout``) so the row
  learns what "unknown" means instead of staying at its random initialisation.
* **A missing LLM embedding** (new user without a ``user_embedding``, unknown item) is never a
  silent zero: its dense slot is zeroed *and* a missing-indicator column is set to 1. The model
  replaces the slot with a learned "missing" vector when the flag is set (see
  :class:`ranker.model.LLMVectorInput`) and also sees the flag itself.
* Every occurrence is counted in :class:`MissingFeatures`, which logs one warning per batch of
  rows with the counts.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import pandas as pd
import torch
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor, PoolingType
from torchrec.datasets.utils import Batch

from llm_features.attributes import LEGACY, Attribute
from ranker.config import ModelConfig

log = logging.getLogger(__name__)

# Column names of the Feast feature views (see feast_repo/ and the spec).
USER_ID = "user_id"
ITEM_ID = "item_id"
LABEL = "label"
USER_EMBEDDING = "user_embedding"
ITEM_EMBEDDING = "item_embedding"
RECENT_ITEM_IDS = "recent_item_ids"
RECENT_LABELS = "recent_labels"
LLM_COLUMNS = (USER_EMBEDDING, ITEM_EMBEDDING)

INT_MISSING = np.iinfo(np.int64).min
"""Raw value of a missing integer id (before indexing); indexes to the OOV row 0."""

NUMERIC_FEATURES = ("recent_count_log", "recent_positive_rate", "has_history")


@dataclass(frozen=True)
class SparseFeature:
    """One KJT key: where its raw values come from and which vocabulary indexes them."""

    name: str
    column: str
    vocab: str
    kind: str  # "int" (ids, looked up by value) or "str" (categories)
    multi: bool = False  # a bag of values per row (MEAN pooled) rather than one value
    entity: str = "user"  # "user" or "item" ("" unknown): the entity of its column
    prefix: int | None = None  # categories: keep the first ``prefix`` characters


ID_FEATURES: tuple[SparseFeature, ...] = (
    SparseFeature("user_id", USER_ID, "user_id", "int", entity="user"),
    SparseFeature("item_id", ITEM_ID, "item_id", "int", entity="item"),
)
RECENT_ITEMS_FEATURE = SparseFeature("recent_item_ids", RECENT_ITEM_IDS, "item_id", "int", multi=True)
ALWAYS_ON = ("user_id", "item_id")
# Columns of a feature frame that are never attributes (keys, labels, the fixed features, LLM vectors).
NOT_ATTRIBUTES = frozenset({
    USER_ID, ITEM_ID, LABEL, "event_timestamp", "split", "behavior_id", RECENT_ITEM_IDS, RECENT_LABELS,
    "recent_behavior_ids", USER_EMBEDDING, ITEM_EMBEDDING, "behavior_embedding", "item_text", "title",
    "genres", "release_date", "created", "true_probability",
})


def sparse_features(attributes: list[Attribute] | tuple[Attribute, ...]) -> tuple[SparseFeature, ...]:
    """The ranker's sparse features for ``attributes``, in order: the user and item ids, one per
    categorical attribute (``<name>_prefix`` with a prefix), one bag per multi attribute, and the
    user's recent items. (Numeric attributes feed the dense arch.)"""
    feats = list(ID_FEATURES)
    for a in attributes:
        if a.kind == "categorical":
            feats.append(SparseFeature(a.feature_name, a.name, a.feature_name, "str", entity=a.entity,
                                       prefix=a.prefix))
        elif a.kind == "multi":
            feats.append(SparseFeature(a.feature_name, a.name, a.feature_name, "str", multi=True, entity=a.entity))
    feats.append(RECENT_ITEMS_FEATURE)
    names = [f.name for f in feats]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"two features named {', '.join(dup)}: rename the attributes at ingest")
    return tuple(feats)


def feature_columns(cfg: ModelConfig, attributes: list[Attribute] | tuple[Attribute, ...] = ()) -> set[str]:
    """Every feature column a model of ``cfg`` with ``attributes`` may read (a subset of its feature
    service). :func:`ranker.train.feast_source` adds its service's attribute columns itself."""
    cols = {a.name for a in attributes} | {RECENT_ITEM_IDS, RECENT_LABELS}
    return cols | set(cfg.extra_numeric) | (set(cfg.llm_inputs) if cfg.llm_features else set())


def infer_frame_attributes(columns: Any, cfg: ModelConfig) -> list[Attribute]:
    """Attributes of a feature frame that came with none (a custom feature source): every column that
    is not a key, label, fixed feature, LLM vector or ``extra_numeric``, by its values: lists are
    multi, text and integers categorical, other numbers numeric. (Feast sources say it with tags.)"""
    out = []
    skip = NOT_ATTRIBUTES | set(cfg.extra_numeric)
    for name in columns:
        if name in skip:
            continue
        cells = [v for v in _cells(columns[name], len(columns[name])) if not _is_missing(v)][:1000]
        if not cells:
            continue
        first = cells[0]
        if isinstance(first, (list, tuple, np.ndarray)):
            kind = "multi"
        elif isinstance(first, (str, bool, np.bool_)):
            kind = "categorical"
        elif all(isinstance(v, (int, np.integer)) or (isinstance(v, (float, np.floating)) and float(v).is_integer())
                 for v in cells):
            kind = "categorical"
        elif isinstance(first, (int, float, np.integer, np.floating)):
            kind = "numeric"
        else:
            continue
        out.append(Attribute(str(name), kind, origin="inferred"))
    if out:
        log.info("ranker: attributes inferred from the feature frame: %s", ", ".join(a.describe() for a in out))
    return out


def legacy_attributes(sparse_names: list[str], zip_prefix_len: int = 2) -> list[Attribute]:
    """The attributes of a checkpoint written before the ranker recorded them (its fixed MovieLens set)."""
    out = []
    for a in (*LEGACY["user"], *LEGACY["item"]):
        if a.prefix:
            a = Attribute(a.name, a.kind, a.entity, prefix=zip_prefix_len, origin=a.origin)
        if a.feature_name in sparse_names:
            out.append(a)
    return out


# ------------------------------------------------------------------------------------------------
# Counting missing features


@dataclass
class MissingFeatures:
    """Counts of rows served with a default instead of a real feature value.

    Keys: ``rows``, ``missing_<llm column>`` (embedding absent: learned missing vector + flag),
    ``unknown_<sparse feature>`` (value absent or not seen in training: OOV row 0).
    """

    counts: Counter = field(default_factory=Counter)

    def add(self, key: str, n: int) -> None:
        if n:
            self.counts[key] += int(n)

    def update(self, other: "MissingFeatures") -> None:
        self.counts.update(other.counts)

    def warn(self, context: str) -> None:
        rows = self.counts.get("rows", 0)
        parts = [f"{n} {k}" for k, n in sorted(self.counts.items()) if k != "rows" and n]
        if parts:
            log.warning(
                "%s: of %d rows, %s (embedding -> learned missing vector + flag; id/category -> OOV row 0)",
                context, rows, ", ".join(parts),
            )

    def as_dict(self) -> dict[str, int]:
        return {k: int(v) for k, v in sorted(self.counts.items())}


# ------------------------------------------------------------------------------------------------
# Step 1: feature frame -> raw rows


@dataclass
class RawRows:
    """Features of N rows before vocabulary lookup.

    ``numeric``: ``[N, 3]`` float32 (``NUMERIC_FEATURES``). ``llm[col]``: ``[N, d]`` float32,
    zero where ``llm_missing[col]`` is True (``d`` is 0 when no row of this chunk has the
    column). ``sparse[name]``: ``(offsets [N+1] or None for one value per row, values)`` with
    raw values (int64 with ``INT_MISSING``, or objects with None). ``labels``: ``[N]`` or None.
    """

    numeric: np.ndarray
    llm: dict[str, np.ndarray]
    llm_missing: dict[str, np.ndarray]
    sparse: dict[str, tuple[np.ndarray | None, np.ndarray]]
    labels: np.ndarray | None
    attributes: list[Attribute] = field(default_factory=list)
    """The attributes the rows were read with (the sparse features follow from them)."""
    attr_numeric: dict[str, np.ndarray] = field(default_factory=dict)
    """Numeric attributes: ``[N]`` float64 raw values, NaN where missing (standardised by the encoder)."""

    def __len__(self) -> int:
        return len(self.numeric)

    @staticmethod
    def concat(parts: list["RawRows"]) -> "RawRows":
        if len(parts) == 1:
            return parts[0]
        llm: dict[str, np.ndarray] = {}
        for col in parts[0].llm:
            width = max(p.llm[col].shape[1] for p in parts)
            llm[col] = np.concatenate([_pad_width(p.llm[col], width) for p in parts])
        sparse = {}
        for name in parts[0].sparse:
            offsets = [p.sparse[name][0] for p in parts]
            values = np.concatenate([p.sparse[name][1] for p in parts])
            if offsets[0] is None:
                sparse[name] = (None, values)
            else:
                shift = np.cumsum([0] + [o[-1] for o in offsets[:-1]])
                joined = np.concatenate([offsets[0]] + [o[1:] + s for o, s in zip(offsets[1:], shift[1:])])
                sparse[name] = (joined, values)
        labels = None if parts[0].labels is None else np.concatenate([p.labels for p in parts])
        return RawRows(
            numeric=np.concatenate([p.numeric for p in parts]),
            llm=llm,
            llm_missing={c: np.concatenate([p.llm_missing[c] for p in parts]) for c in parts[0].llm_missing},
            sparse=sparse,
            labels=labels,
            attributes=parts[0].attributes,
            attr_numeric={c: np.concatenate([p.attr_numeric[c] for p in parts]) for c in parts[0].attr_numeric},
        )


def extract(frame: pd.DataFrame | dict[str, Any], cfg: ModelConfig, with_labels: bool = True,
            attributes: list[Attribute] | tuple[Attribute, ...] | None = None) -> RawRows:
    """Read a Feast feature frame into :class:`RawRows`.

    Args:
        frame: historical-features DataFrame, or a dict of equally long columns (online features).
            Embedding cells are float arrays/lists or None; list features are arrays/lists or None.
            Absent columns are treated as missing for every row.
        cfg: the model configuration (which LLM columns, recent-item length).
        with_labels: read the ``label`` column.
        attributes: the user and item attributes to read (their kinds decide the features); None
            infers them from the frame's other columns (:func:`infer_frame_attributes`).
    """
    columns = frame if isinstance(frame, dict) else {c: frame[c] for c in frame.columns}
    n = len(columns[USER_ID]) if USER_ID in columns else len(columns[ITEM_ID])
    attrs = list(attributes) if attributes is not None else infer_frame_attributes(columns, cfg)

    recent_offsets, recent_values = _int_bags(columns.get(RECENT_ITEM_IDS), n, cfg.max_recent_items)
    lengths = np.diff(recent_offsets).astype(np.float32)
    has_history = np.ones(n, np.float32)
    has_history[recent_values[recent_offsets[:-1]] == INT_MISSING] = 0.0
    lengths *= has_history
    pos_rate = _positive_rate(columns.get(RECENT_LABELS), n, cfg.max_recent_items)
    numeric = [np.log1p(lengths) / math.log1p(max(cfg.max_recent_items, 1)), pos_rate * has_history, has_history]
    for name in cfg.extra_numeric:
        cells = columns.get(name)
        values = np.zeros(n) if cells is None else pd.to_numeric(pd.Series(np.asarray(cells)), errors="coerce").to_numpy()
        numeric.append(np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0))
    numeric = np.stack(numeric, axis=1).astype(np.float32)

    llm: dict[str, np.ndarray] = {}
    llm_missing: dict[str, np.ndarray] = {}
    if cfg.llm_features:
        for col in cfg.llm_inputs:
            llm[col], llm_missing[col] = _vectors(columns.get(col), n, col)

    sparse: dict[str, tuple[np.ndarray | None, np.ndarray]] = {}
    for feat in sparse_features(attrs):
        col = columns.get(feat.column)
        if feat.name == "recent_item_ids":
            if cfg.use_recent_items:
                sparse[feat.name] = (recent_offsets, recent_values)
        elif feat.kind == "int":
            sparse[feat.name] = (None, _ints(col, n))
        elif col is None:
            continue  # absent column: left out (training) or every row unknown (serving, see index)
        elif feat.multi:
            sparse[feat.name] = _str_bags(col, n)
        else:
            sparse[feat.name] = (None, _categories(col, feat.prefix))
    attr_numeric: dict[str, np.ndarray] = {}
    for a in attrs:
        if a.kind == "numeric" and columns.get(a.name) is not None:
            cells = columns[a.name]
            values = pd.to_numeric(pd.Series(np.asarray(cells, dtype=object)), errors="coerce")
            attr_numeric[a.name] = values.to_numpy(dtype=np.float64, na_value=np.nan)

    labels = None
    if with_labels:
        labels = np.asarray(pd.to_numeric(pd.Series(np.asarray(columns[LABEL])), errors="coerce"), np.float32)
        if np.isnan(labels).any():
            raise ValueError(f"{int(np.isnan(labels).sum())} rows have no label; labels must be 0/1")
    return RawRows(numeric, llm, llm_missing, sparse, labels, attrs, attr_numeric)


def _is_missing(v: Any) -> bool:
    if v is None or v is pd.NA:
        return True
    if isinstance(v, float):
        return math.isnan(v)
    return False


def _cells(col: Any, n: int) -> list[Any]:
    if col is None:
        return [None] * n
    return list(col.to_numpy(dtype=object) if isinstance(col, pd.Series) else col)


def _vectors(col: Any, n: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    cells = _cells(col, n)
    missing = np.array([_is_missing(v) or len(v) == 0 for v in cells], dtype=bool)
    present = [np.asarray(v, dtype=np.float32) for v, m in zip(cells, missing) if not m]
    if not present:
        return np.zeros((n, 0), np.float32), missing
    widths = {len(v) for v in present}
    if len(widths) != 1:
        raise ValueError(f"{name}: rows have different widths {sorted(widths)}; embeddings of two models mixed?")
    out = np.zeros((n, widths.pop()), np.float32)
    out[~missing] = np.stack(present)
    bad = ~np.isfinite(out).all(axis=1)
    if bad.any():  # a non-finite vector is as good as none
        out[bad] = 0.0
        missing |= bad
    return out, missing


def _ints(col: Any, n: int) -> np.ndarray:
    if col is None:
        return np.full(n, INT_MISSING, np.int64)
    if n == 1 and not isinstance(col, pd.Series):  # one served user: an int or None, without pandas
        v = col[0]
        if v is None:
            return np.full(1, INT_MISSING, np.int64)
        if isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) and -2**63 <= v < 2**63:
            return np.array([v], np.int64)
    s = pd.to_numeric(pd.Series(np.asarray(col, dtype=object) if not isinstance(col, pd.Series) else col),
                      errors="coerce")
    out = np.full(n, INT_MISSING, np.int64)
    ok = s.notna().to_numpy()
    out[ok] = s[ok].to_numpy().astype(np.int64)
    return out


def _category_str(v: Any, prefix: int | None) -> str | None:
    if _is_missing(v):
        return None
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        v = int(v)
    s = str(v).strip()
    if prefix is not None:
        s = s[:prefix]
    return s or None


def _categories(col: Any, prefix: int | None) -> np.ndarray:
    if not isinstance(col, pd.Series) and len(col) == 1:  # one served user: what factorize would give
        out = np.empty(1, dtype=object)
        out[0] = _category_str(col[0], prefix)
        return out
    series = col if isinstance(col, pd.Series) else pd.Series(np.asarray(col, dtype=object))
    codes, uniques = pd.factorize(series)
    table = np.array([_category_str(u, prefix) for u in uniques] + [None], dtype=object)
    return table[codes]  # code -1 (missing) picks the trailing None


def _int_bags(col: Any, n: int, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Bags of int ids, the last ``max_len`` of each; an absent or empty bag becomes [INT_MISSING]."""
    empty = np.array([INT_MISSING], np.int64)
    arrays = []
    for v in _cells(col, n):
        if _is_missing(v) or len(v) == 0:
            arrays.append(empty)
        else:
            arrays.append(np.asarray(v, dtype=np.int64)[-max_len:])
    lengths = np.fromiter((len(a) for a in arrays), np.int64, count=n)
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets, (np.concatenate(arrays) if arrays else np.zeros(0, np.int64))


def _str_bags(col: Any, n: int) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.zeros(n, np.int64)
    values: list[str | None] = []
    for i, v in enumerate(_cells(col, n)):
        items = [] if _is_missing(v) else [str(x) for x in v if not _is_missing(x) and str(x)]
        if not items:
            items = [None]
        values.extend(items)
        lengths[i] = len(items)
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets, np.array(values, dtype=object)


def _positive_rate(col: Any, n: int, max_len: int) -> np.ndarray:
    out = np.zeros(n, np.float32)
    for i, v in enumerate(_cells(col, n)):
        if not _is_missing(v) and len(v):
            out[i] = float(np.mean(np.asarray(v, dtype=np.float32)[-max_len:]))
    return out


def _pad_width(m: np.ndarray, width: int) -> np.ndarray:
    if m.shape[1] == width:
        return m
    out = np.zeros((m.shape[0], width), np.float32)
    out[:, : m.shape[1]] = m
    return out


# ------------------------------------------------------------------------------------------------
# Step 2: vocabularies and indexing


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


@dataclass
class FeatureEncoder:
    """Vocabularies and input layout fitted on the train split; saved with the checkpoint.

    Dense layout (``F_dense`` columns): ``NUMERIC_FEATURES`` (3), ``extra_numeric``, the numeric
    attributes (standardised with the train split's mean and standard deviation, 0 where missing),
    then for each LLM column (LLM twin only) its ``d`` values followed by one missing flag.
    """

    model: ModelConfig
    vocabs: dict[str, Vocabulary]
    sparse_names: list[str]
    llm_dims: dict[str, int]
    tower_hidden: int | None = None
    """Hidden width of the tower's CTR head (``llm_mode=score``)."""
    tower: dict[str, Any] | None = None
    """Identity of the finetune checkpoint whose head scores the pairs (``llm_mode=score``)."""
    attributes: list[Attribute] = field(default_factory=list)
    """The user and item attributes the features were built from (recorded in the checkpoint)."""
    numeric_stats: dict[str, tuple[float, float]] = field(default_factory=dict)
    """Numeric attribute -> (mean, std) on the train split; the dense inputs, in this order."""

    @property
    def features(self) -> dict[str, SparseFeature]:
        return {f.name: f for f in sparse_features(self.attributes)}

    @classmethod
    def observe(cls, raw: RawRows) -> dict[str, Any]:
        """What :meth:`fit` needs from one shard of rows (small; gathered across ranks)."""
        by_name = {f.name: f for f in sparse_features(raw.attributes)}
        values: dict[str, list[Any]] = {}
        for name, (_, vals) in raw.sparse.items():
            feat = by_name[name]
            values.setdefault(feat.vocab, []).extend(Vocabulary.of(feat.kind, vals).keys)
        numeric = {}
        for name, v in raw.attr_numeric.items():
            ok = v[np.isfinite(v)]
            numeric[name] = [int(len(ok)), float(ok.sum()), float((ok * ok).sum())]
        return {
            "values": values,
            "sparse": sorted(raw.sparse),
            "llm_dims": {c: int(m.shape[1]) for c, m in raw.llm.items()},
            "attributes": [a.to_dict() for a in raw.attributes],
            "numeric": numeric,
        }

    @classmethod
    def fit(cls, observed: list[dict[str, Any]] | RawRows, cfg: ModelConfig) -> "FeatureEncoder":
        """Fit on :class:`RawRows` of the train split, or on :meth:`observe` outputs of every shard.

        A sparse feature whose column the rows do not have, or with no value in any train row, is
        left out (and so is a numeric attribute without any value)."""
        if isinstance(observed, RawRows):
            observed = [cls.observe(observed)]
        attributes = [Attribute.from_dict(d) for d in observed[0].get("attributes", [])]
        feats = sparse_features(attributes)
        vocabs: dict[str, Vocabulary] = {}
        for feat in feats:
            if feat.vocab in vocabs:
                continue
            merged = [v for o in observed for v in o["values"].get(feat.vocab, [])]
            if merged or feat.name in ALWAYS_ON:
                vocabs[feat.vocab] = Vocabulary(feat.kind, sorted(set(merged)))
        present = set().union(*(o["sparse"] for o in observed))
        names = [
            f.name for f in feats
            if f.name in present and (f.name in ALWAYS_ON or f.name == "recent_item_ids"
                                      or vocabs.get(f.vocab, Vocabulary(f.kind, [])).keys)
        ]
        numeric_stats: dict[str, tuple[float, float]] = {}
        for a in attributes:
            parts = [o.get("numeric", {}).get(a.name) for o in observed]
            parts = [p for p in parts if p is not None]
            count = sum(p[0] for p in parts)
            if a.kind != "numeric" or count == 0:
                continue
            mean = sum(p[1] for p in parts) / count
            var = max(sum(p[2] for p in parts) / count - mean * mean, 0.0)
            numeric_stats[a.name] = (mean, math.sqrt(var) if var > 1e-12 else 1.0)
        dropped = [f.name for f in feats if f.name not in names and f.name not in (*ALWAYS_ON, "recent_item_ids")]
        dropped += [a.name for a in attributes if a.kind == "numeric" and a.name not in numeric_stats]
        if dropped:
            log.warning("ranker: no train row has a value for %s: left out of the model", ", ".join(dropped))
        llm_dims = {}
        if cfg.llm_features:
            llm_dims = {c: max(o["llm_dims"].get(c, 0) for o in observed) for c in cfg.llm_inputs}
        empty = [c for c, d in llm_dims.items() if d == 0]
        if empty:
            raise ValueError(
                f"no training row has {', '.join(empty)}: the LLM ranker needs them. Produce them first "
                "(llmfeat encode / embed-users, then llmfeat feast materialize), pick the available ones "
                "with --llm-inputs, or train the id-only twin with --no-llm-features."
            )
        return cls(model=cfg, vocabs=vocabs, sparse_names=names, llm_dims=llm_dims, attributes=attributes,
                   numeric_stats=numeric_stats)

    @property
    def dense_dim(self) -> int:
        return self.numeric_dim + sum(d + 1 for d in self.llm_dims.values())

    @property
    def numeric_dim(self) -> int:
        """Numeric columns at the start of the dense block: ``NUMERIC_FEATURES``, ``extra_numeric``, then
        the numeric attributes."""
        return len(NUMERIC_FEATURES) + len(self.model.extra_numeric) + len(self.numeric_stats)

    def describe(self) -> dict[str, Any]:
        """The model's inputs by name: what ``ranker train`` prints and writes to ``metrics.json``."""
        return {
            "sparse": list(self.sparse_names),
            "dense": [*NUMERIC_FEATURES, *self.model.extra_numeric, *self.numeric_stats,
                      *(f"{c} (+ missing flag)" for c in self.llm_dims)],
            "attributes": [a.describe() for a in self.attributes],
        }

    @property
    def source_columns(self) -> list[str]:
        """Feast feature columns this encoder reads (for building online requests)."""
        feats = self.features
        cols = [feats[n].column for n in self.sparse_names if n not in ALWAYS_ON and n != "recent_item_ids"]
        cols += [RECENT_ITEM_IDS, RECENT_LABELS] + list(self.model.extra_numeric) + list(self.numeric_stats)
        cols += list(self.llm_dims)
        return list(dict.fromkeys(cols))

    def tables(self) -> list[EmbeddingBagConfig]:
        """One ``EmbeddingBagConfig`` per sparse feature; bags are MEAN pooled."""
        feats = self.features
        return [
            EmbeddingBagConfig(
                name=f"t_{name}",
                embedding_dim=self.model.embedding_dim,
                num_embeddings=self.vocabs[feats[name].vocab].num_rows,
                feature_names=[name],
                pooling=PoolingType.MEAN if feats[name].multi else PoolingType.SUM,
            )
            for name in self.sparse_names
        ]

    def index(self, raw: RawRows, stats: MissingFeatures | None = None, row_masks: bool = False) -> EncodedRows:
        """Look up vocabularies and lay out the dense block; counts defaults into ``stats``.

        ``row_masks``: also keep which rows took each default (``EncodedRows.missing``, the keys of
        :class:`MissingFeatures`), for a caller that combines rows and counts them later (serving)."""
        n = len(raw)
        masks: dict[str, np.ndarray] = {}
        blocks = [raw.numeric]
        width = raw.numeric.shape[1]
        if self.numeric_stats:
            attr_block = np.zeros((n, len(self.numeric_stats)), np.float32)
            for j, (name, (mean, std)) in enumerate(self.numeric_stats.items()):
                v = raw.attr_numeric.get(name)
                missing = np.ones(n, bool) if v is None else ~np.isfinite(v)
                if v is not None:
                    attr_block[~missing, j] = (v[~missing] - mean) / std
                masks[f"missing_{name}"] = missing
            blocks.append(attr_block)
            width += attr_block.shape[1]
        flag_cols: list[int] = []
        for col, d in self.llm_dims.items():
            vec = _pad_width(raw.llm[col], d) if raw.llm[col].shape[1] != d else raw.llm[col]
            if vec.shape[1] != d:
                raise ValueError(f"{col} has width {vec.shape[1]} but the ranker was trained with {d}")
            missing = raw.llm_missing[col]
            blocks += [vec, missing.astype(np.float32)[:, None]]
            width += d
            flag_cols.append(width)
            width += 1
            masks[f"missing_{col}"] = missing
        feats = self.features
        sparse: dict[str, tuple[np.ndarray | None, np.ndarray]] = {}
        for name in self.sparse_names:
            feat = feats[name]
            offsets, vals = raw.sparse.get(name, (None, None))
            if vals is None:  # column absent at serving time: every row takes the OOV row
                offsets, vals = (None, np.zeros(n, np.int64))
                rows = vals
            else:
                rows = self.vocabs[feat.vocab].lookup(vals)
            if stats is not None or row_masks:
                # A bag counts as unknown only when none of its values is known.
                masks[f"unknown_{name}"] = (rows == 0) if offsets is None else _bag_all_zero(offsets, rows)
            sparse[name] = (offsets, rows)
        if stats is not None:
            for key, mask in masks.items():
                stats.add(key, int(mask.sum()))
            stats.add("rows", n)
        dense = np.concatenate(blocks, axis=1).astype(np.float32, copy=False)
        return EncodedRows(dense, sparse, raw.labels, list(self.sparse_names), flag_cols,
                           missing=masks if row_masks else {})

    def encode(self, frame: pd.DataFrame | dict[str, Any], stats: MissingFeatures | None = None,
               with_labels: bool = True, row_masks: bool = False) -> EncodedRows:
        return self.index(extract(frame, self.model, with_labels, self.attributes), stats, row_masks)

    def dense_columns(self) -> list[tuple[str, int, int]]:
        """The dense block by source column: ``(column, start, end)``. The first columns
        (``NUMERIC_FEATURES``) come from the recent-item columns (``RECENT_ITEM_IDS``)."""
        out = [(RECENT_ITEM_IDS, 0, len(NUMERIC_FEATURES))]
        pos = len(NUMERIC_FEATURES)
        for col in (*self.model.extra_numeric, *self.numeric_stats):
            out.append((col, pos, pos + 1))
            pos += 1
        for col, d in self.llm_dims.items():
            out.append((col, pos, pos + d + 1))
            pos += d + 1
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.to_dict(),
            "sparse_names": self.sparse_names,
            "llm_dims": self.llm_dims,
            "vocabs": {k: v.to_dict() for k, v in self.vocabs.items()},
            "tower_hidden": self.tower_hidden,
            "tower": self.tower,
            "attributes": [a.to_dict() for a in self.attributes],
            "numeric_stats": {k: list(v) for k, v in self.numeric_stats.items()},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FeatureEncoder":
        sparse_names = list(d["sparse_names"])
        if "attributes" in d:
            attributes = [Attribute.from_dict(a) for a in d["attributes"]]
        else:  # a checkpoint of the fixed MovieLens feature set
            attributes = legacy_attributes(sparse_names, int(d["model"].get("zip_prefix_len", 2)))
        return cls(
            model=ModelConfig.from_dict(d["model"]),
            vocabs={k: Vocabulary.from_dict(v) for k, v in d["vocabs"].items()},
            sparse_names=sparse_names,
            llm_dims={k: int(v) for k, v in d["llm_dims"].items()},
            tower_hidden=d.get("tower_hidden"),
            tower=d.get("tower"),
            attributes=attributes,
            numeric_stats={k: (float(v[0]), float(v[1])) for k, v in d.get("numeric_stats", {}).items()},
        )


def _bag_all_zero(offsets: np.ndarray, rows: np.ndarray) -> np.ndarray:
    if len(offsets) < 2:
        return np.zeros(0, bool)
    # Every bag holds at least one value (empty bags were given the OOV value), so reduceat is safe.
    return np.add.reduceat((rows != 0).astype(np.int64), offsets[:-1]) == 0
