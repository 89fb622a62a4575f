"""The ranker's features in the online store: which views serve them, whether those views hold the
embedding model the ranker was trained on, and their rows read straight from the store.

:class:`OnlineRows` reads one entity kind (users or items) with the provider's ``online_read`` per
feature view and the entity key feast would build, and converts values as ``get_online_features``
does, without feast's per-call request planning (:class:`ranker.online.OnlineScorer` reads each
request's user this way, and items when it fills its item table).

Example::

    user_refs, item_refs = split_feature_refs(store, "ranker_llm", set(encoder.source_columns))
    values, found = OnlineRows(store, user_refs, "user_id").read([42])   # feature -> [1] values, [1] bool
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ranker.features import ITEM_ID, USER_ID


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
