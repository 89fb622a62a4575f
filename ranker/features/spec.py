"""What the ranker reads: the Feast column names, the sparse features (KJT keys) that follow from
the user and item attributes, and the columns a model may read."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llm_features.attributes import LEGACY, Attribute
from ranker.config import ModelConfig

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


def legacy_attributes(sparse_names: list[str], zip_prefix_len: int = 2) -> list[Attribute]:
    """The attributes of a checkpoint written before the ranker recorded them (its fixed MovieLens set)."""
    out = []
    for a in (*LEGACY["user"], *LEGACY["item"]):
        if a.prefix:
            a = Attribute(a.name, a.kind, a.entity, prefix=zip_prefix_len, origin=a.origin)
        if a.feature_name in sparse_names:
            out.append(a)
    return out

