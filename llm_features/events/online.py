"""Online writes of a push: the new rows go to the online store through the views' Feast push sources
(``<view>_push`` in ``feast_repo/feature_definitions.py``), after the offline part files.

The write is the one ``store.push(name, df, to=PushMode.ONLINE)`` makes (``write_to_online_store`` for
each view whose stream source is the push source), with the push source's views resolved once instead
of re-reading the registry at every call (``store.push`` spends ~10 ms per call on that here).
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pyarrow as pa

from llm_features.errors import UserError
from llm_features.events.compute import _NewTexts
from llm_features.parquet_io import embedding_array

log = logging.getLogger("llm_features.events")  # one logger for the package, as when it was one module

PUSH_SOURCES = {
    "user_embeddings": "user_embeddings_push",
    "user_recent_behaviors": "user_recent_behaviors_push",
    "item_embeddings": "item_embeddings_push",
    "atomic_behavior_embeddings": "atomic_behavior_embeddings_push",
}


def _frame(table: pa.Table) -> pd.DataFrame:
    return pd.DataFrame(table.to_pydict())  # list columns as lists, as feast's push takes them


class _OnlineWrites:
    """The processor's online store (a mixin of :class:`~llm_features.events.EventProcessor`: ``store``)."""

    def _resolve_push_sources(self) -> dict[str, list[str]]:
        """Push source -> the names of the views it feeds (what ``store.push`` looks up at every call)."""
        from llm_features.store import store_data_dir

        by_source: dict[str, list[str]] = {}
        for fv in self.store.list_feature_views():
            src = getattr(fv, "stream_source", None)
            if src is not None and src.name in PUSH_SOURCES.values():
                by_source.setdefault(src.name, []).append(fv.name)
        missing = sorted(set(PUSH_SOURCES.values()) - set(by_source))
        if missing:
            raise UserError(
                f"the Feast registry has no push source {', '.join(missing)} (registered before llmfeat "
                "declared them)",
                file=store_data_dir(self.store), option="--data-dir",
                fix=f"Run `llmfeat feast apply --data-dir {store_data_dir(self.store)}`.")
        services = self.store.list_feature_services()
        self._feast_push = any(getattr(s, "precompute_online", False) for s in services)
        return by_source

    def _sqlite_wal(self) -> None:
        online = self.store.config.online_store
        if getattr(online, "type", None) != "sqlite":
            log.info("events: sqlite_wal applies to a SQLite online store only (this one is %s)",
                     getattr(online, "type", online))
            return
        conn = self.store._get_provider().online_store._get_conn(self.store.config)  # feast's own connection
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        conn.execute("PRAGMA synchronous=NORMAL")
        log.info("events: SQLite online store %s in journal mode %s, synchronous=NORMAL", online.path, mode)

    def _push_online(self, new: _NewTexts, behaviors_t: pa.Table, items_t: pa.Table, users_t: pa.Table,
                     recent: pa.Table | None) -> None:
        """The rows of one push (new behaviours and items, then users and their recent lists), online."""
        if new.behaviors:
            self._push("atomic_behavior_embeddings", _frame(pa.table({
                "behavior_id": behaviors_t["behavior_id"],
                "behavior_embedding": embedding_array(np.stack([new.encoded[b] for b in new.behaviors])),
                "event_timestamp": behaviors_t["event_timestamp"]})))
        if new.items:
            self._push("item_embeddings", _frame(pa.table({
                "item_id": items_t["item_id"],
                "item_embedding": embedding_array(np.stack([new.vectors[new.item_key[i]]
                                                            for i in new.items])),
                "event_timestamp": items_t["event_timestamp"]})))
        self._push("user_embeddings", _frame(users_t))
        if recent is not None:
            self._push("user_recent_behaviors", _frame(recent))

    def _push(self, view: str, df: pd.DataFrame) -> None:
        """``store.push(<view>_push, df, to=PushMode.ONLINE)``, with the push source's views resolved once."""
        source = PUSH_SOURCES[view]
        if self._feast_push:  # a feature service precomputes online vectors: let feast's push refresh them
            from feast.data_source import PushMode

            self.store.push(source, df, to=PushMode.ONLINE)
            return
        for name in self._push_views[source]:
            self.store.write_to_online_store(name, df)
