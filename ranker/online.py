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
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ranker.features import ITEM_ID, USER_ID, EncodedRows, FeatureEncoder, MissingFeatures

log = logging.getLogger(__name__)

READ_BATCH = 1000
"""Entity keys per ``online_read`` when the item table is filled (SQLite binds each key)."""
MAX_ABSENT_IDS = 100_000
"""Ids the store does not have that the item table remembers (beyond: read again on each request)."""


class StoreChanged(RuntimeError):
    """The online store no longer holds the embedding model the ranker was trained on."""


def embedding_model_mismatch(views: Sequence[Any], fingerprint: str | None) -> str | None:
    """Why feature ``views`` (registry objects) cannot feed a ranker trained on embeddings of model
    ``fingerprint``: an embedding view tagged with another model; None when they can (or when the
    ranker records no model: the id-only twin)."""
    from llm_features.fingerprint import FINGERPRINT_TAG

    if fingerprint is None:
        return None
    for fv in views:
        tag = fv.tags.get(FINGERPRINT_TAG)
        if tag is not None and tag != fingerprint:
            held = "no model's embeddings" if tag == "none" else f"embeddings of model {tag}"
            return (f"the ranker was trained on embeddings of model {fingerprint}, but feature view {fv.name} "
                    f"holds {held}")
    return None


def split_feature_refs(store: Any, feature_service: str, columns: set[str]) -> tuple[list[str], list[str]]:
    """``view:feature`` references of ``feature_service`` for ``columns``, split into the user-keyed
    and the item-keyed views."""
    from llm_features.store import feature_service as get_service

    service = get_service(store, feature_service) if _is_feast_store(store) else \
        store.get_feature_service(feature_service)
    user_refs, item_refs = [], []
    for proj in service.feature_view_projections:
        keys = set(store.get_feature_view(proj.name).join_keys)
        refs = [f"{proj.name}:{f.name}" for f in proj.features if f.name in columns]
        if keys == {USER_ID}:
            user_refs += refs
        elif keys == {ITEM_ID}:
            item_refs += refs
        elif refs:
            raise ValueError(f"feature view {proj.name} is keyed by {sorted(keys)}; the ranker expects "
                             f"{USER_ID} or {ITEM_ID}")
    return user_refs, item_refs


def _is_feast_store(store: Any) -> bool:
    return type(store).__module__.split(".")[0] == "feast"


def _has_values(data: dict[str, Any] | None) -> bool:
    """Whether an ``online_read`` row holds any value: SQLite answers ``None`` for an absent entity,
    Redis a dict of empty ``ValueProto``s (an HMGET of a missing hash)."""
    return data is not None and any(v.WhichOneof("val") is not None for v in data.values())


class OnlineRows:
    """Feature values of one entity kind read straight from the store's ``online_read``.

    Args:
        store: a ``feast.FeatureStore``.
        refs: ``view:feature`` references, every view keyed by ``join_key`` alone.
        join_key: ``user_id`` or ``item_id``.

    :meth:`read` returns what ``store.get_online_features(refs, rows).to_dict()`` would (same
    entity keys, same value conversion), without feast's request planning on every call.
    """

    def __init__(self, store: Any, refs: list[str], join_key: str) -> None:
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey

        self._entity_key = EntityKey
        self.join_key = join_key
        self._config = store.config
        self._provider = store._get_provider()
        by_view: dict[str, list[str]] = {}
        for ref in refs:
            view, feature = ref.split(":", 1)
            by_view.setdefault(view, []).append(feature)
        self._views = []
        self._key_type = None
        for view, features in by_view.items():
            fv = store.get_feature_view(view)
            types = {f.name: f.dtype.to_value_type() for f in fv.features}
            self._views.append((fv, features, [types[f] for f in features]))
            if self._key_type is None:
                for name in fv.entities:
                    entity = store.get_entity(name)
                    if entity.join_key == join_key:
                        self._key_type = entity.value_type
        self.columns = [f for _, features, _ in self._views for f in features]

    def read(self, ids: Sequence[int]) -> tuple[dict[str, list[Any]], np.ndarray]:
        """``(feature -> [N] values, None where absent; [N] bool: the store has a row for the id)``."""
        from feast.type_map import feast_value_type_to_python_type, python_values_to_proto_values

        if not self._views:  # the service has no view of this entity
            return {}, np.zeros(len(ids), bool)
        values = python_values_to_proto_values([int(i) for i in ids], self._key_type)
        keys = [self._entity_key(join_keys=[self.join_key], entity_values=[v]) for v in values]
        found = np.zeros(len(keys), bool)
        out: dict[str, list[Any]] = {}
        for fv, features, types in self._views:
            # a copy: Feast's Redis online_read appends its timestamp field to the list it is given, so
            # passing ours would grow it (and every later read) by one field per call
            rows = self._provider.online_read(self._config, fv, keys, list(features)) if keys else []
            found |= np.fromiter((_has_values(data) for _, data in rows), bool, count=len(keys))
            for feature, vtype in zip(features, types):
                out[feature] = [None if data is None or feature not in data
                                else feast_value_type_to_python_type(data[feature], vtype) for _, data in rows]
        return out, found


@dataclass
class _Layout:
    """Which model inputs come from the user's row and which from the item's.

    Dense columns by index; sparse features by their slot in the pooled embeddings ``[B, F, D]``
    (``encoder.sparse_names`` order); :class:`MissingFeatures` keys by owner.
    """

    user_dense: np.ndarray
    item_dense: np.ndarray
    user_slots: list[int]
    item_slots: list[int]  # the item's features, but not its id (looked up per request)
    item_id_slots: list[int]
    user_keys: list[str]
    item_keys: list[str]  # (without the item id's: counted per request)

    @classmethod
    def of(cls, encoder: FeatureEncoder, user_columns: set[str], item_columns: set[str]) -> "_Layout":
        def owner(column: str) -> str:
            # a column both sides have is the item's (get_online_features' to_dict keeps the later one);
            # one neither has takes its default on both sides, so either will do
            if column == USER_ID:
                return "user"
            if column == ITEM_ID or column in item_columns:
                return "item"
            return "user" if column in user_columns else "item"

        user_dense, item_dense = [], []
        for column, start, end in encoder.dense_columns():
            (user_dense if owner(column) == "user" else item_dense).extend(range(start, end))
        keys = {f"missing_{column}": owner(column) for column in (*encoder.numeric_stats, *encoder.llm_dims)}
        feats = encoder.features
        user_slots, item_slots, item_ids = [], [], []
        for slot, name in enumerate(encoder.sparse_names):
            column = feats[name].column
            if column == ITEM_ID:
                item_ids.append(slot)
                continue
            keys[f"unknown_{name}"] = owner(column)
            (user_slots if owner(column) == "user" else item_slots).append(slot)
        return cls(np.asarray(user_dense, np.int64), np.asarray(item_dense, np.int64), user_slots, item_slots,
                   item_ids, [k for k, o in keys.items() if o == "user"], [k for k, o in keys.items() if o == "item"])


class Tables:
    """The ranker's embedding tables as numpy arrays: the sparse arch's pooling without its per-call
    overhead (a one-row user costs microseconds)."""

    def __init__(self, model: torch.nn.Module, encoder: FeatureEncoder) -> None:
        bags = model.embedding_bag_collection.embedding_bags
        feats = encoder.features
        self.weights = {name: bags[f"t_{name}"].weight.detach().numpy() for name in encoder.sparse_names}
        self.mean = {name: feats[name].multi for name in encoder.sparse_names}  # else SUM (encoder.tables)

    def lookup(self, name: str, rows: np.ndarray) -> np.ndarray:
        """``[N, D]`` embeddings of one-valued rows."""
        return self.weights[name][rows]

    def pool(self, rows: EncodedRows, names: list[str]) -> np.ndarray:
        """``[N, len(names), D]``: the pooled embeddings of sparse features ``names`` of ``rows``."""
        n = len(rows)
        out = np.empty((n, len(names), self.weights[names[0]].shape[1] if names else 0), np.float32)
        for j, name in enumerate(names):
            offsets, vals = rows.sparse[name]
            w = self.weights[name]
            if offsets is None:
                out[:, j] = w[vals]
                continue
            # every bag holds at least one value (an empty one holds the OOV row)
            sums = np.add.reduceat(w[vals], offsets[:-1], axis=0)
            out[:, j] = sums / np.diff(offsets)[:, None] if self.mean[name] else sums
        return out


class ItemInputs:
    """The item side of the model inputs per item id; row 0 is an item the online store does not have.

    ``dense [rows, len(layout.item_dense)]`` (the item's dense columns, e.g. its embedding and
    missing flag), ``pooled [rows, len(layout.item_slots), D]`` (its sparse features' pooled
    embeddings), ``masks[key] [rows]`` (which defaults it took). Grows as new ids are read;
    ``version`` is the state of the item views it was read from (:meth:`OnlineScorer.item_version`).
    """

    def __init__(self, layout: _Layout, version: Any, absent: tuple[np.ndarray, np.ndarray, dict]) -> None:
        self.layout = layout
        self.version = version
        self.index: dict[int, int] = {}
        self.size = 0
        self.absent_ids = 0
        dense, pooled, _ = absent
        self.dense = np.zeros((0, dense.shape[1]), np.float32)
        self.pooled = np.zeros((0, *pooled.shape[1:]), np.float32)
        self.masks = {key: np.zeros(0, bool) for key in layout.item_keys}
        self._append(absent, np.zeros(1, np.int64))

    @property
    def items(self) -> int:
        """Item ids the store has that the table holds."""
        return self.size - 1

    def add(self, ids: Sequence[int], encoded: tuple[np.ndarray, np.ndarray, dict], found: np.ndarray) -> None:
        """Add the item inputs of ``ids`` (``(dense, pooled, masks)`` in the same order); ids the store
        does not have (``found`` False) map to row 0."""
        keep = np.flatnonzero(found)
        start = self._append(encoded, keep)
        for pos, i in enumerate(keep):
            self.index[int(ids[i])] = start + pos
        for i in np.flatnonzero(~found):
            if self.absent_ids < MAX_ABSENT_IDS:
                self.index[int(ids[i])] = 0
                self.absent_ids += 1

    def _append(self, encoded: tuple[np.ndarray, np.ndarray, dict], keep: np.ndarray) -> int:
        dense, pooled, masks = encoded
        start, end = self.size, self.size + len(keep)
        if end > len(self.dense):
            cap = max(end, 2 * len(self.dense), 64)
            self.dense = _grown(self.dense, cap, start)
            self.pooled = _grown(self.pooled, cap, start)
            self.masks = {k: _grown(v, cap, start) for k, v in self.masks.items()}
        self.dense[start:end] = dense[keep]
        self.pooled[start:end] = pooled[keep]
        for key in self.layout.item_keys:
            self.masks[key][start:end] = masks[key][keep]
        self.size = end
        return start


def _runs(columns: np.ndarray) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """``columns`` (ascending dense column indices) as runs: ``((start, end) in the dense block,
    (start, end) in the side's own columns)``, so a side is copied with a few slices."""
    runs: list[tuple[tuple[int, int], tuple[int, int]]] = []
    for pos, col in enumerate(columns.tolist()):
        if runs and runs[-1][0][1] == col:
            (s, _), (a, _) = runs[-1]
            runs[-1] = ((s, col + 1), (a, pos + 1))
        else:
            runs.append(((col, col + 1), (pos, pos + 1)))
    return runs


def _grown(a: np.ndarray, rows: int, keep: int) -> np.ndarray:
    out = np.zeros((rows, *a.shape[1:]), a.dtype)
    out[:keep] = a[:keep]
    return out


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
        self.layout = _Layout.of(encoder, set(self.users.columns), set(self.items.columns))
        item_id_names = [encoder.sparse_names[s] for s in self.layout.item_id_slots]
        self._item_vocab = {n: encoder.vocabs[encoder.features[n].vocab] for n in item_id_names}
        self._user_names = [encoder.sparse_names[s] for s in self.layout.user_slots]
        self.tables = Tables(self.model, encoder)
        self._user_runs = _runs(self.layout.user_dense)
        self._item_runs = _runs(self.layout.item_dense)
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
