"""Step 1: a feature frame (historical or online) to :class:`RawRows`, before any vocabulary lookup."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from llm_features.attributes import Attribute
from ranker.config import ModelConfig
from ranker.features.cells import (
    _categories,
    _cells,
    _int_bags,
    _ints,
    _is_missing,
    _pad_width,
    _positive_rate,
    _str_bags,
    _vectors,
)
from ranker.features.spec import (
    INT_MISSING,
    ITEM_ID,
    LABEL,
    NOT_ATTRIBUTES,
    RECENT_ITEM_IDS,
    RECENT_LABELS,
    USER_ID,
    sparse_features,
)

log = logging.getLogger("ranker.features")  # the package's logger: what callers filter on


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

    recent = _int_bags(columns.get(RECENT_ITEM_IDS), n, cfg.max_recent_items)
    numeric = _numeric_block(columns, n, cfg, recent)
    llm: dict[str, np.ndarray] = {}
    llm_missing: dict[str, np.ndarray] = {}
    if cfg.llm_features:
        for col in cfg.llm_inputs:
            llm[col], llm_missing[col] = _vectors(columns.get(col), n, col)
    sparse = _sparse_values(columns, n, cfg, attrs, recent)
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


def _numeric_block(columns: Any, n: int, cfg: ModelConfig, recent: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """``[N, 3 + len(extra_numeric)]`` float32: ``NUMERIC_FEATURES`` from the recent items (bags of
    ``recent``: offsets, values) and their labels, then the ``extra_numeric`` columns (0 where missing)."""
    recent_offsets, recent_values = recent
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
    return np.stack(numeric, axis=1).astype(np.float32)


def _sparse_values(columns: Any, n: int, cfg: ModelConfig, attrs: list[Attribute],
                   recent: tuple[np.ndarray, np.ndarray]) -> dict[str, tuple[np.ndarray | None, np.ndarray]]:
    """The raw values of every sparse feature of ``attrs`` the frame has a column for (ids always)."""
    sparse: dict[str, tuple[np.ndarray | None, np.ndarray]] = {}
    for feat in sparse_features(attrs):
        col = columns.get(feat.column)
        if feat.name == "recent_item_ids":
            if cfg.use_recent_items:
                sparse[feat.name] = recent
        elif feat.kind == "int":
            sparse[feat.name] = (None, _ints(col, n))
        elif col is None:
            continue  # absent column: left out (training) or every row unknown (serving, see index)
        elif feat.multi:
            sparse[feat.name] = _str_bags(col, n)
        else:
            sparse[feat.name] = (None, _categories(col, feat.prefix))
    return sparse


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


