"""The :class:`FeatureEncoder`: vocabularies and dense layout fitted on the train split, saved
with the checkpoint, and applied to every row at training, evaluation and serving time."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from torchrec import EmbeddingBagConfig, PoolingType

from llm_features.attributes import Attribute
from ranker.config import ModelConfig
from ranker.features.cells import _pad_width
from ranker.features.missing import MissingFeatures
from ranker.features.raw import RawRows, extract
from ranker.features.encoded import EncodedRows, Vocabulary
from ranker.features.spec import (
    ALWAYS_ON,
    NUMERIC_FEATURES,
    RECENT_ITEM_IDS,
    RECENT_LABELS,
    SparseFeature,
    legacy_attributes,
    sparse_features,
)

log = logging.getLogger("ranker.features")  # the package's logger: what callers filter on


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
