"""Feast glue: open the feature repository from anywhere, apply it, materialise it, read it back.

``feast_repo/feature_store.yaml``'s paths are relative to the repository (the feast CLI resolves
them there). :func:`open_store` makes them absolute and moves the registry and online store into the
data directory:

- ``data/...`` paths (the file registry or a sqlite URL of an SQL registry, the SQLite online
  store) are placed in the data directory (``data_dir`` argument, else ``$LLMFEAT_DATA_DIR``, else
  ``<repo>/data``); other relative paths resolve against the repo directory, never the CWD.
- the definitions read ``$LLMFEAT_DATA_DIR`` too, so :func:`apply_definitions` imports them with
  that variable set to the store's data directory.

One data dir, one owner: the data dir's registry records (in its ``Infra``) the SQLite online store
its tables live in. A data dir that was copied or moved still records the old one, and a
``feast apply`` on it would move (drop) the original's online tables. :func:`open_store` notices
(log line) and re-registers the copy for its own files first: it forgets the other dir's tables
(never dropping them) and applies the definitions for this dir, keeping the copied online rows and
materialisation intervals. Readers that need a registry (``open_store(..., must_exist=True)``) are
told what to run when the data dir or its registry is missing.

Note: the plain feast CLI cannot see ``$LLMFEAT_DATA_DIR`` in the yaml (no defaults in
``os.path.expandvars``), so it keeps its registry and online store in ``feast_repo/data`` even when
the parquet tables live elsewhere. Use ``llmfeat feast ...`` (or pass ``data_dir``) for a moved
data directory.

Example::

    store = open_store("feast_repo")
    apply_definitions(store)
    report = materialize_all(store)          # checks model fingerprints first
    feats = online_features(store, user_id=1, item_ids=[10, 20, 30])
    feats.values["item_embedding"].shape     # (3, 384)

The package: :mod:`~llm_features.store.opening` (config, :func:`open_store`, registry checks),
:mod:`~llm_features.store.definitions` (load and apply the definitions, registry lookups),
:mod:`~llm_features.store.fingerprints` (model fingerprints of the embedding views),
:mod:`~llm_features.store.materialize` (:func:`materialize_all` in time windows) and
:mod:`~llm_features.store.online` (:func:`online_features`).
"""

from llm_features.store.definitions import (
    apply_definitions,
    check_materialized,
    feature_service,
    feature_view,
    load_definitions,
    not_registered,
    registered_workspace,
    store_data_dir,
)
from llm_features.store.fingerprints import check_fingerprints, check_part_fingerprints
from llm_features.store.materialize import MATERIALIZE_CHUNK_ROWS, MaterializeReport, materialize_all, time_windows
from llm_features.store.online import OnlineFeatures, online_features
from llm_features.store.opening import EMBEDDING_VIEWS, TIMESTAMP_FIELD, load_config, open_store
from llm_features.workspace import resolve_data_dir

__all__ = [
    "EMBEDDING_VIEWS", "MATERIALIZE_CHUNK_ROWS", "TIMESTAMP_FIELD", "MaterializeReport", "OnlineFeatures",
    "apply_definitions", "check_fingerprints", "check_materialized", "check_part_fingerprints", "feature_service",
    "feature_view", "load_config", "load_definitions", "materialize_all", "not_registered", "online_features",
    "open_store", "registered_workspace", "resolve_data_dir", "store_data_dir", "time_windows",
]
