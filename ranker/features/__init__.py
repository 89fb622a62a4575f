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

Where each part lives: :mod:`ranker.features.spec` (column names, the sparse features of the
attributes), :mod:`ranker.features.cells` (column cells to numpy), :mod:`ranker.features.raw`
(step 1), :mod:`ranker.features.encoded` (vocabularies, encoded rows and their batches),
:mod:`ranker.features.encoder` (step 2, the fitted encoder) and :mod:`ranker.features.missing`
(the counts). Import them from here.
"""

from ranker.features.encoder import FeatureEncoder
from ranker.features.missing import MissingFeatures
from ranker.features.raw import RawRows, extract, infer_frame_attributes
from ranker.features.encoded import EncodedRows, Vocabulary
from ranker.features.spec import (ALWAYS_ON, ID_FEATURES, INT_MISSING, ITEM_EMBEDDING, ITEM_ID, LABEL, LLM_COLUMNS,
                                   NOT_ATTRIBUTES, NUMERIC_FEATURES, RECENT_ITEM_IDS, RECENT_ITEMS_FEATURE,
                                   RECENT_LABELS, USER_EMBEDDING, USER_ID, SparseFeature, feature_columns,
                                   legacy_attributes, sparse_features)

__all__ = [
    "ALWAYS_ON", "ID_FEATURES", "INT_MISSING", "ITEM_EMBEDDING", "ITEM_ID", "LABEL", "LLM_COLUMNS",
    "NOT_ATTRIBUTES", "NUMERIC_FEATURES", "RECENT_ITEM_IDS", "RECENT_ITEMS_FEATURE", "RECENT_LABELS",
    "USER_EMBEDDING", "USER_ID",
    "EncodedRows", "FeatureEncoder", "MissingFeatures", "RawRows", "SparseFeature", "Vocabulary", "extract",
    "feature_columns", "infer_frame_attributes", "legacy_attributes", "sparse_features",
]
