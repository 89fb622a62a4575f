"""Point-in-time features at the cost of one row per entity row.

Feast's point-in-time join pairs each entity row with every earlier row of its entity and keeps the
newest. Over a view with a row per (user, interaction time), such as ``user_embeddings`` or
``user_recent_behaviors`` at event cadence, that is (a user's rows x the user's snapshots) joined
rows: about 40M on ML-1M, enough to run DuckDB out of memory.

:func:`historical_features` gives the same frame as ``store.get_historical_features(...).to_df()``
and joins such views differently. The feature repository registers an offline twin of each
(``<view>__asof``, tagged ``llmfeat_asof_of``, one-second TTL, same source). For every entity row,
the stamp of the newest row of its user at or before the row's timestamp is looked up here (an
as-of merge over the view's ``user_id, event_timestamp`` columns); then Feast joins the twin with
the entity timestamp set to that stamp, so its join sees only the rows of that second and picks the
same row. Views without a twin go through Feast unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.dataset as ds

ASOF_TAG = "llmfeat_asof_of"  # feast_repo/feature_definitions.py
_ROW = "__llmfeat_row"
_NEVER = pd.Timestamp("1970-01-01", tz="UTC")  # before every row: the twin join finds nothing


def _refs(store, features: Any) -> list[str]:
    """``view:feature`` references of a feature service or a list of references."""
    if isinstance(features, (list, tuple)):
        return list(features)
    return [f"{p.name_to_use()}:{f.name}" for p in features.feature_view_projections for f in p.features]


def _twins(store) -> dict[str, Any]:
    """view name -> its registered as-of twin."""
    return {fv.tags[ASOF_TAG]: fv for fv in store.list_feature_views()
            if ASOF_TAG in (fv.tags or {})}


class StampIndex:
    """Every (user_id, event_timestamp) of a view's source, sorted: where each user's snapshots are."""

    def __init__(self, source_path: str, join_key: str) -> None:
        path = Path(source_path)
        files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
        cols = [join_key, "event_timestamp"]
        t = ds.dataset([str(f) for f in files], format="parquet").to_table(columns=cols) if files else None
        frame = t.to_pandas() if t is not None else pd.DataFrame(columns=cols)
        frame["event_timestamp"] = pd.to_datetime(frame["event_timestamp"], utc=True).astype("datetime64[us, UTC]")
        self.key = join_key
        self.frame = (frame.rename(columns={"event_timestamp": "_stamp"}).drop_duplicates()
                      .sort_values("_stamp", kind="stable").reset_index(drop=True))

    def stamps(self, entities: pd.DataFrame) -> pd.Series:
        """For each entity row (in order): the newest stamp of its user at or before the row's time."""
        left = pd.DataFrame({
            self.key: entities[self.key].to_numpy(),
            "_t": pd.to_datetime(entities["event_timestamp"], utc=True).astype("datetime64[us, UTC]"),
            _ROW: np.arange(len(entities)),
        })
        left = left.sort_values("_t", kind="stable")
        right = self.frame.astype({self.key: left[self.key].dtype})
        got = pd.merge_asof(left, right, left_on="_t", right_on="_stamp", by=self.key,
                            direction="backward", allow_exact_matches=True)
        return got.sort_values(_ROW)["_stamp"].reset_index(drop=True)


def historical_features(store, entity_df: pd.DataFrame, features: Any,
                        stamp_indexes: dict[str, StampIndex] | None = None) -> pd.DataFrame:
    """``store.get_historical_features(entity_df, features).to_df()``, with the per-user time series
    joined through their as-of twins (see the module docstring); rows in ``entity_df``'s order.

    ``stamp_indexes`` (view name -> :class:`StampIndex`) caches the lookups across calls: pass the
    same dict to every chunk of one fetch.
    """
    refs = _refs(store, features)
    twins = _twins(store)
    by_view: dict[str, list[str]] = {}
    for ref in refs:
        view, name = ref.split(":", 1)
        by_view.setdefault(view, []).append(name)
    asof_views = [v for v in by_view if v in twins and len(twins[v].entities) == 1]
    direct = [f"{v}:{n}" for v, names in by_view.items() if v not in asof_views for n in names]
    frame = entity_df.reset_index(drop=True).copy()
    frame[_ROW] = np.arange(len(frame))
    if direct:
        # copies: the Spark offline store rewrites the caller's timestamp column in place
        out = store.get_historical_features(entity_df=frame.copy(), features=direct).to_df()
    else:
        out = frame
    out = out.sort_values(_ROW, kind="stable").reset_index(drop=True)
    cache = stamp_indexes if stamp_indexes is not None else {}
    for view in asof_views:
        twin = twins[view]
        key = twin.entity_columns[0].name if twin.entity_columns else "user_id"
        if view not in cache:
            cache[view] = StampIndex(twin.batch_source.path, key)
        stamps = cache[view].stamps(frame)
        lookup = pd.DataFrame({key: frame[key].to_numpy(),
                               "event_timestamp": stamps.fillna(_NEVER).to_numpy(),
                               _ROW: frame[_ROW].to_numpy()})
        got = store.get_historical_features(
            entity_df=lookup.copy(), features=[f"{twin.name}:{n}" for n in by_view[view]]).to_df()
        got = got.sort_values(_ROW, kind="stable").reset_index(drop=True)
        for n in by_view[view]:
            out[n] = got[n].to_numpy()
    return out.drop(columns=[_ROW])
