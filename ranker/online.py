"""Scoring candidates at request time: one online read of the user, cached item inputs, one forward pass.

The reference path (:meth:`ranker.serve.Ranker.online_frame` + ``score_frame``) reads the user and
all ``N`` candidates through ``get_online_features`` and encodes ``N`` full rows on every request;
for 100 candidates on ML-1M that is ~12 ms in Feast and ~7 ms of encoding. :class:`OnlineScorer`
gives the same scores (``tests/test_serve_http.py`` compares them) with less work per request:

* **Item inputs are cached, encoded.** An item's features change only when a materialisation
  writes new item rows (or the model changes), so the item side of the model inputs (its dense
  columns, the pooled embeddings of its sparse features, which defaults it took) is computed once
  per item and kept in :class:`ItemInputs`. The items of the ranker's ``item_id`` vocabulary are read at start-up;
  any other id is read on its first request (an id the store does not have maps to one shared
  "absent item" row). :meth:`OnlineScorer.refresh` rebuilds the table when the registry says
  the item views were materialised again or their model fingerprint changed (checked at most every
  ``refresh_seconds``; ``llmfeat serve`` checks in a background thread).
* **The user is read straight from the online store**: the provider's ``online_read`` per user
  view with the entity key feast would build, values converted as ``get_online_features``
  converts them (:class:`OnlineRows`), without feast's per-call request planning. The user is never
  cached: a fresh user embedding pushed to the store is served by the next request.
* Per request: one user read (one ``online_read`` per user view), the user's one-row encoding, the
  ``[N, F_dense]`` block and the pooled embeddings ``[N, F, D]`` gathered from both sides, one
  forward pass (:meth:`ranker.model.RankingModel.forward_one_user`).
* **A store that changes model is not served.** When the registry says an embedding view of the
  service now holds another model's embeddings than the checkpoint was trained on (a re-encode and
  materialisation while serving), :meth:`OnlineScorer.score` raises :class:`StoreChanged` until
  it holds the checkpoint's model again.

Example::

    scorer = OnlineScorer(model, encoder, store, "ranker_llm")
    probs, stats, user_known = scorer.score(42, [1, 2, 3])   # [3] probabilities, MissingFeatures
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ranker.features import ITEM_ID, USER_ID, FeatureEncoder, MissingFeatures
from ranker.online_inputs import MAX_ABSENT_IDS, InputLayout, ItemInputs, Tables, dense_runs
from ranker.online_rows import OnlineRows, StoreChanged, embedding_model_mismatch, split_feature_refs

__all__ = ["MAX_ABSENT_IDS", "READ_BATCH", "InputLayout", "ItemInputs", "OnlineRows", "OnlineScorer",
           "StoreChanged", "Tables", "embedding_model_mismatch", "split_feature_refs"]

log = logging.getLogger(__name__)

READ_BATCH = 1000
"""Entity keys per ``online_read`` when the item table is filled (SQLite binds each key)."""


class OnlineScorer:
    """Click probabilities for one user and ``N`` candidates from the online store (see the module
    docstring for what is read, cached and refreshed).

    Args:
        model: the unsharded :class:`ranker.model.RankingModel` (eval mode).
        encoder: its :class:`FeatureEncoder`.
        store: a ``feast.FeatureStore`` (its online store and registry).
        feature_service: the service the model was trained on.
        refresh_seconds: how often :meth:`maybe_refresh` looks at the registry for new item rows.
        prefetch: read every item of the ``item_id`` vocabulary now (else on first request).
    """

    def __init__(self, model: torch.nn.Module, encoder: FeatureEncoder, store: Any, feature_service: str,
                 refresh_seconds: float = 5.0, prefetch: bool = True, fingerprint: str | None = None) -> None:
        self.model = model.eval()
        self.encoder = encoder
        self.store = store
        self.feature_service = feature_service
        self.refresh_seconds = refresh_seconds
        self.fingerprint = fingerprint
        self.fault: str | None = None  # why the store cannot be served now (StoreChanged)
        user_refs, item_refs = split_feature_refs(store, feature_service, set(encoder.source_columns))
        self.service_views = sorted({ref.split(":", 1)[0] for ref in (*user_refs, *item_refs)})
        self.users = OnlineRows(store, user_refs, USER_ID)
        self.items = OnlineRows(store, item_refs, ITEM_ID)
        self.item_views = sorted({ref.split(":", 1)[0] for ref in item_refs})
        self.layout = InputLayout.of(encoder, set(self.users.columns), set(self.items.columns))
        item_id_names = [encoder.sparse_names[s] for s in self.layout.item_id_slots]
        self._item_vocab = {n: encoder.vocabs[encoder.features[n].vocab] for n in item_id_names}
        self._user_names = [encoder.sparse_names[s] for s in self.layout.user_slots]
        self.tables = Tables(self.model, encoder)
        self._user_runs = dense_runs(self.layout.user_dense)
        self._item_runs = dense_runs(self.layout.item_dense)
        self._background = False
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._checked = time.monotonic()
        self.table = self._build_table(self.item_version(), self._prefetch_ids() if prefetch else [])

    # -- the item table -------------------------------------------------------------------------

    def item_version(self, refresh_registry: bool = False) -> tuple:
        """The state of the item views in the registry: materialisation intervals, fingerprint tag,
        last update. A new materialisation or apply changes it."""
        from llm_features.fingerprint import FINGERPRINT_TAG

        registry, project = self.store.registry, self.store.project
        if refresh_registry:
            registry.refresh(project)
        out = []
        for name in self.item_views:
            fv = registry.get_feature_view(name, project, allow_cache=True)
            ends = [end for _, end in fv.materialization_intervals]
            out.append((name, fv.tags.get(FINGERPRINT_TAG), len(ends), max(ends) if ends else None,
                        fv.last_updated_timestamp))
        return tuple(out)

    def _prefetch_ids(self) -> list[int]:
        ids: set[int] = set()
        for vocab in self._item_vocab.values():
            ids.update(int(k) for k in vocab.keys)
        return sorted(ids)

    @torch.inference_mode()
    def _item_side(self, frame: dict[str, list[Any]]) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        rows = self.encoder.encode(frame, with_labels=False, row_masks=True)
        names = [self.encoder.sparse_names[s] for s in self.layout.item_slots]
        return rows.dense[:, self.layout.item_dense], self.tables.pool(rows, names), rows.missing

    def _encode_items(self, ids: Sequence[int]) -> tuple[tuple[np.ndarray, np.ndarray, dict], np.ndarray]:
        values, found = self.items.read(ids)
        return self._item_side({ITEM_ID: list(ids), **values}), found

    def _build_table(self, version: Any, ids: Sequence[int]) -> ItemInputs:
        absent = self._item_side({ITEM_ID: [0], **{c: [None] for c in self.items.columns}})
        table = ItemInputs(self.layout, version, absent)
        for s in range(0, len(ids), READ_BATCH):
            chunk = list(ids[s:s + READ_BATCH])
            table.add(chunk, *self._encode_items(chunk))
        return table

    def refresh(self) -> bool:
        """Re-read the item table if the registry says the item views changed; True if it did.
        The new table replaces the old one whole, so a request never sees half of each. A store whose
        embedding views now hold another model is not read: :attr:`fault` says why."""
        version = self.item_version(refresh_registry=True)
        self._checked = time.monotonic()
        registry, project = self.store.registry, self.store.project
        views = [registry.get_feature_view(name, project, allow_cache=True) for name in self.service_views]
        fault = embedding_model_mismatch(views, self.fingerprint)
        if fault != self.fault:
            (log.error if fault else log.warning)("online store: %s", fault or "serving again: the embedding "
                                                  "views hold the ranker's model")
        self.fault = fault
        if fault or version == self.table.version:
            return False
        old = self.table
        ids = sorted(set(self._prefetch_ids()) | {i for i, row in old.index.items() if row})
        t0 = time.perf_counter()
        self.table = self._build_table(version, ids)
        log.info("item inputs re-read after the item views changed: %d items in %.2f s",
                 self.table.items, time.perf_counter() - t0)
        return True

    def reread_items(self, item_ids: Sequence[int]) -> None:
        """Read ``item_ids`` from the online store again now (items an event has just pushed), instead
        of at the next materialisation."""
        ids = list(dict.fromkeys(int(i) for i in item_ids))
        if not ids:
            return
        encoded, found = self._encode_items(ids)
        with self._lock:
            self.table.add(ids, encoded, found)

    def maybe_refresh(self) -> None:
        """:meth:`refresh` if ``refresh_seconds`` have passed since the last look."""
        if time.monotonic() - self._checked >= self.refresh_seconds:
            self.refresh()

    def _item_rows(self, item_ids: Sequence[int]) -> tuple[ItemInputs, np.ndarray]:
        """The item table and the ``[N]`` rows of ``item_ids`` in it, reading ids it has not seen."""
        table = self.table
        rows = [table.index.get(i, -1) for i in item_ids]
        if -1 in rows:
            new = list(dict.fromkeys(i for i, r in zip(item_ids, rows) if r == -1))
            encoded, found = self._encode_items(new)
            with self._lock:
                if table is self.table:
                    table.add(new, encoded, found)
                    rows = [table.index.get(i, -1) for i in item_ids]
            if -1 in rows:  # the table was replaced meanwhile, or absent ids past MAX_ABSENT_IDS
                table = self._build_table(table.version, list(dict.fromkeys(item_ids)))
                rows = [table.index.get(i, 0) for i in item_ids]
        return table, np.asarray(rows, np.int64)

    # -- scoring --------------------------------------------------------------------------------

    @torch.inference_mode()
    def inputs(self, user_id: int, item_ids: Sequence[int], stats: MissingFeatures | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """The model inputs for ``user_id`` and ``N`` candidates: ``dense [N, F_dense]``, the pooled
        embeddings ``[N, F, D]`` (:meth:`RankingModel.forward_one_user`), and whether the store had
        any row for the user. Defaults taken are counted into ``stats`` as
        :meth:`FeatureEncoder.index` counts them for the same ``N`` rows."""
        n = len(item_ids)
        values, found = self.users.read([user_id])
        user = self.encoder.encode({USER_ID: [int(user_id)], **values}, with_labels=False, row_masks=True)
        table, rows = self._item_rows(item_ids)
        lay = self.layout
        dense = np.empty((n, self.encoder.dense_dim), np.float32)
        for (start, end), _ in self._user_runs:
            dense[:, start:end] = user.dense[0, start:end]
        item_dense = table.dense[rows]
        for (start, end), (a, b) in self._item_runs:
            dense[:, start:end] = item_dense[:, a:b]
        pooled = np.empty((n, len(self.encoder.sparse_names), self.encoder.model.embedding_dim), np.float32)
        if lay.user_slots:
            pooled[:, lay.user_slots] = self.tables.pool(user, self._user_names)
        if lay.item_slots:
            pooled[:, lay.item_slots] = table.pooled[rows]
        for slot, (name, vocab) in zip(lay.item_id_slots, self._item_vocab.items()):
            ids = vocab.lookup(np.asarray(item_ids, np.int64))
            pooled[:, slot] = self.tables.lookup(name, ids)
            if stats is not None:
                stats.add(f"unknown_{name}", int((ids == 0).sum()))
        if stats is not None:
            for key in lay.user_keys:
                stats.add(key, n * int(user.missing[key][0]))
            for key in lay.item_keys:
                stats.add(key, int(table.masks[key][rows].sum()))
            stats.add("rows", n)
        return torch.from_numpy(dense), torch.from_numpy(pooled), bool(found[0])

    @torch.inference_mode()
    def score(self, user_id: int, item_ids: Sequence[int]) -> tuple[np.ndarray, MissingFeatures, bool]:
        """``(probabilities [N] in input order, the defaults taken, whether the store knew the user)``."""
        stats = MissingFeatures()
        if self.refresh_seconds > 0 and not self._background:
            self.maybe_refresh()
        if self.fault:
            raise StoreChanged(f"{self.fault}; not scoring until it holds the ranker's model again")
        if len(item_ids) == 0:
            return np.zeros(0, np.float32), stats, bool(self.users.read([user_id])[1][0])
        dense, pooled, user_known = self.inputs(user_id, item_ids, stats)
        return torch.sigmoid(self.model.forward_one_user(dense, pooled)).numpy(), stats, user_known

    # -- background refresh (the HTTP service) --------------------------------------------------

    def start_refresh_thread(self) -> None:
        """Look for new item rows every ``refresh_seconds`` in a daemon thread instead of in
        :meth:`inputs`, so no request pays for reading the registry."""
        self._background = True
        self._stop = threading.Event()

        def loop() -> None:
            while not self._stop.wait(self.refresh_seconds):
                try:
                    self.refresh()
                except Exception:  # noqa: BLE001 - a registry hiccup must not end the thread
                    log.exception("item inputs: refresh failed; serving the previous ones")

        self._thread = threading.Thread(target=loop, name="llmfeat-item-refresh", daemon=True)
        self._thread.start()

    def stop_refresh_thread(self) -> None:
        if getattr(self, "_thread", None) is not None:
            self._stop.set()
            self._thread.join(timeout=10)
            self._thread = None
        self._background = False
