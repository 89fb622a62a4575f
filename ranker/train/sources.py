"""Entity rows and their Feast point-in-time features: what the ranker trains and evaluates on.

The entity rows are the labelled interactions of a split (``canonical/interactions.parquet``:
``user_id, item_id, event_timestamp, label``); their features come only from
``store.get_historical_features(entity_df, features=<feature service>)`` (a :data:`FeatureSource`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from llm_features.attributes import Attribute, attributes_of_fields
from llm_features.errors import UserError
from llm_features.workspace import MissingInputError
from ranker.config import ModelConfig
from ranker.features import LABEL, RawRows, extract, infer_frame_attributes

log = logging.getLogger("ranker.train")  # the package's logger: what callers filter on

ENTITY_COLUMNS = ["user_id", "item_id", "event_timestamp", LABEL]

FeatureSource = Callable[[pd.DataFrame], pd.DataFrame]
"""Entity rows in, the same rows with their point-in-time features out (any order)."""


def workspace_for(repo: Path, data_dir: Path | None):
    from llm_features.workspace import Workspace, resolve_data_dir

    return Workspace.at(resolve_data_dir(repo, data_dir))


def existing_workspace(repo: Path, data_dir: Path | None):
    """:func:`workspace_for`, refused when its data dir does not exist."""
    ws = workspace_for(repo, data_dir)
    if not ws.root.is_dir():
        raise MissingInputError("the data dir does not exist", file=ws.root, option="--data-dir",
                                fix="Pass the data dir that `llmfeat ingest` wrote (or run it first).")
    return ws


def workspace_source(repo: Path, ws, service_name: str, columns: set[str]) -> FeatureSource:
    """:func:`feast_source` over the feature service ``service_name`` of the workspace's Feast store."""
    from llm_features.store import open_store

    store = open_store(repo, ws.root, must_exist=True)
    return feast_source(store, service_name, columns)


def in_fetch_order(entities: pd.DataFrame) -> pd.DataFrame:
    """``entities`` sorted as :func:`fetch_rows` sorts each chunk, so that its row i is entity row i."""
    return entities.sort_values(PrefetchedSource.KEYS + [LABEL], kind="stable", ignore_index=True)


def load_entities(interactions: Path, split: str, max_rows: int | None = None, last: bool = False) -> pd.DataFrame:
    """The labelled interactions of ``split`` as a Feast entity DataFrame."""
    if not interactions.exists():
        raise MissingInputError("not found", file=interactions, option="--data-dir",
                                fix="Run `llmfeat ingest` first, or pass the data dir it wrote.")
    df = pd.read_parquet(interactions, columns=ENTITY_COLUMNS + ["split"], filters=[("split", "==", split)])
    if df.empty:
        raise UserError(f"has no rows with split == {split!r}", file=interactions, column="split",
                        fix="Re-run `llmfeat ingest` with a split that gives every split rows.")
    if max_rows is not None and len(df) > max_rows:
        df = df.iloc[-max_rows:] if last else df.iloc[:max_rows]
    return df[ENTITY_COLUMNS].reset_index(drop=True)


def feast_source(store, service_name: str, columns: set[str] | None = None) -> FeatureSource:
    """``get_historical_features`` over the named feature service as a :data:`FeatureSource`
    (through :func:`llm_features.asof.historical_features`: the same frame, a bounded join).

    With ``columns``, only the service's features of those names (and its attributes) are joined:
    the same rows and values, without paying for columns the model never reads (e.g.
    ``recent_behavior_ids``). The source's ``attributes`` are the user and item attributes of the
    service (:func:`service_attributes`), from which the ranker builds its features.
    """
    from llm_features.store import feature_service

    service = feature_service(store, service_name)
    attributes = service_attributes(store, service)
    features: Any = service
    if columns is not None:
        wanted = set(columns) | {a.name for a in attributes}
        features = [f"{p.name_to_use()}:{f.name}" for p in service.feature_view_projections
                    for f in p.features if f.name in wanted]

    from llm_features.asof import historical_features

    stamp_indexes: dict = {}  # built on the first chunk, reused by the others

    def fetch(entity_df: pd.DataFrame) -> pd.DataFrame:
        # Feast's point-in-time join, with the per-user time series joined at their as-of stamps
        # (llm_features.asof): the same rows, without pairing each row with all earlier snapshots
        frame = historical_features(store, entity_df, features, stamp_indexes)
        return _entity_timestamps_as_given(frame, entity_df)

    fetch.attributes = attributes  # type: ignore[attr-defined]
    return fetch


def service_attributes(store, service) -> list[Attribute]:
    """The user and item attributes of a feature service: its fields tagged with an attribute kind
    (``feast_repo`` tags the profile views' fields with what ingest recorded), in service order."""
    from ranker.features import legacy_attributes

    out: list[Attribute] = []
    for proj in service.feature_view_projections:
        keys = set(store.get_feature_view(proj.name).join_keys)
        entity = "user" if keys == {"user_id"} else "item" if keys == {"item_id"} else ""
        found = attributes_of_fields(proj.features, entity)
        if not found and proj.name in ("user_profile", "item_profile") and proj.features:
            # a registry applied by definitions that did not tag the attributes yet: their fixed set
            names = [f.name for f in proj.features]
            found = [a for a in legacy_attributes([*names, "zip_prefix"]) if a.name in names]
            log.warning("ranker: %s has no attribute tags (applied by an older llmfeat): reading %s as before; "
                        "run `llmfeat feast apply` to register the attributes ingest recorded",
                        proj.name, ", ".join(a.name for a in found) or "nothing")
        out += found
    return out


def _entity_timestamps_as_given(frame: pd.DataFrame, entity_df: pd.DataFrame) -> pd.DataFrame:
    """The entity timestamps of a feature frame in the entity frame's dtype, whatever the offline store.

    DuckDB returns them as given (UTC-aware); Spark returns them tz-naive in the session time zone
    (UTC: ``llm_features.offline_sources.spark_session_defaults``) and in ns, so the same entity row
    would not look up the same in :class:`PrefetchedSource`.
    """
    col = "event_timestamp"
    if col not in frame or col not in entity_df:
        return frame
    want = entity_df[col].dtype
    ts = frame[col]
    if isinstance(want, pd.DatetimeTZDtype) and ts.dtype != want:
        if pd.api.types.is_datetime64_dtype(ts):  # tz-naive: Spark's session time zone, UTC
            ts = ts.dt.tz_localize("UTC")
        frame[col] = ts.astype(want)
    return frame


class PrefetchedSource:
    """A :data:`FeatureSource` that joins once and then answers from memory (benchmarks, sweeps).

    ``PrefetchedSource(feast_source(...), entities)`` calls the wrapped source on ``entities``
    (in chunks of ``chunk_rows``) once; later calls look their rows up by
    ``(user_id, item_id, event_timestamp)``, so several seeds or configurations train on the very
    rows ``get_historical_features`` returned without joining again.
    """

    KEYS = ["user_id", "item_id", "event_timestamp"]

    def __init__(self, source: FeatureSource, entities: pd.DataFrame, chunk_rows: int = 100_000) -> None:
        parts = [source(entities.iloc[s : s + chunk_rows][ENTITY_COLUMNS])
                 for s in range(0, len(entities), chunk_rows)]
        frame = pd.concat(parts, ignore_index=True).drop(columns=[LABEL], errors="ignore")
        self.attributes = getattr(source, "attributes", None)
        if frame.duplicated(self.KEYS).any():
            raise ValueError("PrefetchedSource needs unique (user_id, item_id, event_timestamp) entity rows")
        self.frame = frame.set_index(self.KEYS)

    def __call__(self, entity_df: pd.DataFrame) -> pd.DataFrame:
        keys = pd.MultiIndex.from_frame(entity_df[self.KEYS])
        missing = ~keys.isin(self.frame.index)
        if missing.any():
            raise KeyError(f"{int(missing.sum())} entity rows were not prefetched, e.g. {keys[missing][0]}")
        out = self.frame.loc[keys].reset_index()
        if LABEL in entity_df:
            out[LABEL] = entity_df[LABEL].to_numpy()
        return out


def fetch_rows(entities: pd.DataFrame, source: FeatureSource, cfg: ModelConfig, chunk_rows: int,
               attributes: list[Attribute] | None = None) -> RawRows:
    """Point-in-time features of ``entities`` in chunks, each reduced to :class:`RawRows` at once.

    ``attributes``: the user and item attributes to read; default: the source's own (``source.attributes``,
    e.g. a Feast service's tagged fields), else inferred from the first chunk's columns.
    """
    if attributes is None:
        attributes = getattr(source, "attributes", None)
    parts = []
    for start in range(0, len(entities), chunk_rows):
        chunk = entities.iloc[start : start + chunk_rows]
        frame = source(chunk)
        if len(frame) != len(chunk):
            raise RuntimeError(
                f"the feature source returned {len(frame)} rows for {len(chunk)} entity rows; a point-in-time "
                "join must keep every row (use the duckdb offline store)"
            )
        # a point-in-time join returns its rows in no fixed order: sort them, so that the seeded
        # shuffle (and with it the whole training run) is reproducible
        order = [c for c in PrefetchedSource.KEYS + [LABEL] if c in frame.columns]
        frame = frame.sort_values(order, kind="stable", ignore_index=True)
        if attributes is None:
            attributes = infer_frame_attributes(frame, cfg)
        parts.append(extract(frame, cfg, attributes=attributes))
        del frame
    return RawRows.concat(parts)
