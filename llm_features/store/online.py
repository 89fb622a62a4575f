"""Online reads of one user and N items through a feature service."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from llm_features.store.definitions import _PLANS_ATTR, check_servable, feature_service

# ---------------------------------------------------------------------------------------------
# Online reads


@dataclass
class OnlineFeatures:
    """Online features for one user and ``N`` candidate items, one row per item.

    ``values[name]`` is ``[N, D]`` float32 for an embedding (``Array(Float32)``), ``[N]`` for a
    scalar, and an object array of 1-d arrays for other lists. ``present[name]`` is ``[N]`` bool:
    False where the store had no value (the value is then the fill: zeros or NaN for embeddings,
    0 / NaN / "" for scalars, an empty array for lists).
    """

    user_id: int
    item_ids: np.ndarray
    values: dict[str, np.ndarray]
    present: dict[str, np.ndarray]

    def missing(self) -> dict[str, np.ndarray]:
        """Item ids with no value, per feature that has any missing."""
        return {k: self.item_ids[~m] for k, m in self.present.items() if not m.all()}


@dataclass(frozen=True)
class _ServicePlan:
    """A feature service resolved once: feature refs grouped by the join keys of their views."""

    by_keys: dict[tuple[str, ...], list[str]]  # ("user_id",) -> ["user_embeddings:user_embedding", ...]
    types: dict[str, tuple[Any, int]]  # feature name -> (feast dtype, vector_length)
    service: str




def _service_plan(store, service: str) -> _ServicePlan:
    # The SQL registry rebuilds a FeatureService from protobuf on every get (~6 ms); resolve it once
    # per store. apply_definitions() drops the cache.
    plans = store.__dict__.setdefault(_PLANS_ATTR, {})
    if service not in plans:
        fs = feature_service(store, service)
        by_keys: dict[tuple[str, ...], list[str]] = {}
        types: dict[str, tuple[Any, int]] = {}
        for proj in fs.feature_view_projections:
            fv = store.get_feature_view(proj.name)
            keys = tuple(sorted(proj.join_key_map.get(k, k) for k in fv.join_keys))
            for f in proj.features:
                by_keys.setdefault(keys, []).append(f"{proj.name_to_use()}:{f.name}")
                types[f.name] = (f.dtype, f.vector_length)
        plans[service] = _ServicePlan(by_keys, types, service)
    return plans[service]


def _get_online_features(store, plan: _ServicePlan, refs: list[str],
                         rows: list[dict[str, int]]) -> dict[str, list]:
    """``store.get_online_features(refs, rows).to_dict()``; Feast's refusal of a view whose
    materialisation was interrupted becomes a :class:`UserError` saying what completes it."""
    try:
        return store.get_online_features(features=refs, entity_rows=rows).to_dict()
    except ValueError as e:
        refused = e
    check_servable(store, plan.service)  # raises when an interrupted materialisation is why
    raise refused


def _read_online(store, plan: _ServicePlan, user_id: int, item_ids: np.ndarray) -> dict[str, list]:
    """Feature name -> N values. User-level views are read once and broadcast to the N rows."""
    n = len(item_ids)
    out: dict[str, list] = {}
    for keys, refs in plan.by_keys.items():
        if keys == ("user_id",):
            rows = [{"user_id": int(user_id)}]
        elif keys == ("item_id",):
            rows = [{"item_id": int(i)} for i in item_ids]
        else:
            rows = [{"user_id": int(user_id), "item_id": int(i)} for i in item_ids]
            if not set(keys) <= {"user_id", "item_id"}:
                raise ValueError(f"feature service view keyed by {keys}: only user_id/item_id are supported")
        resp = _get_online_features(store, plan, refs, rows)
        for ref in refs:
            name = ref.split(":", 1)[1]
            col = resp[name]
            out[name] = col * n if len(rows) == 1 and n != 1 else col
    return out


def online_features(
    store,
    user_id: int,
    item_ids: Sequence[int] | np.ndarray,
    service: str = "ranker_llm",
    *,
    missing: Literal["zeros", "nan", "raise"] = "zeros",
) -> OnlineFeatures:
    """Read ``service``'s features for one user and ``N`` items from the online store.

    ``missing``: fill for absent embeddings (``zeros`` or ``nan``; scalars use 0/NaN/""), or
    ``raise`` a ``KeyError`` listing every absent (feature, ids).
    """
    from feast.types import Array, Float32, Float64, Int32, Int64, String

    plan = _service_plan(store, service)
    item_ids = np.asarray(item_ids, dtype=np.int64).reshape(-1)
    resp = _read_online(store, plan, user_id, item_ids)
    n = len(item_ids)
    values: dict[str, np.ndarray] = {}
    present: dict[str, np.ndarray] = {}
    fill = np.nan if missing == "nan" else 0.0
    for name, (dtype, length) in plan.types.items():
        col = resp[name]
        mask = np.fromiter((v is not None for v in col), dtype=bool, count=n)
        present[name] = mask
        if dtype == Array(Float32) or dtype == Array(Float64):
            dim = length or next((len(v) for v in col if v is not None), 0)
            mat = np.full((n, dim), fill, dtype=np.float32)
            if mask.any():
                mat[mask] = np.asarray([v for v in col if v is not None], dtype=np.float32)
            values[name] = mat
        elif isinstance(dtype, Array):
            elem = {Int64: np.int64, Int32: np.int64, String: object}.get(dtype.base_type, np.float64)
            arr = np.empty(n, dtype=object)
            seen: dict[int, np.ndarray] = {}  # a broadcast user value is one list object, converted once
            for i, v in enumerate(col):
                if id(v) not in seen:
                    seen[id(v)] = np.asarray(v if v is not None else [], dtype=elem)
                arr[i] = seen[id(v)]
            values[name] = arr
        elif dtype in (Int64, Int32):
            values[name] = np.array([v if v is not None else 0 for v in col], dtype=np.int64)
        elif dtype == String:
            values[name] = np.array([v if v is not None else "" for v in col], dtype=object)
        else:
            values[name] = np.array([v if v is not None else np.nan for v in col], dtype=np.float64)
    result = OnlineFeatures(user_id=int(user_id), item_ids=item_ids, values=values, present=present)
    if missing == "raise" and (absent := result.missing()):
        listing = "; ".join(f"{k}: {v.tolist()}" for k, v in absent.items())
        raise KeyError(f"online store has no value for user {user_id} / items ({listing}); run materialize")
    return result
