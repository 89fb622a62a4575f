"""Score candidates for a user at request time from the Feast online store.

Example::

    ranker = Ranker.load("runs/ranker_llm")             # opens feast_repo/ lazily
    probs = ranker.score(user_id=42, item_ids=[1, 2, 3])  # [3] click probabilities, input order
    ranker.rank(42, [1, 2, 3], top_k=2)                   # [(item_id, prob), ...] best first

One request makes two online reads: the user's features once (``user_profile``,
``user_recent_behaviors``, ``user_embeddings``) and every candidate's item features in one
batched call (``item_profile``, ``item_embeddings``); then one forward pass over the candidates.
A user or item the store does not know is scored with the documented defaults (OOV rows, the
learned missing vector plus its flag; see :mod:`ranker.features`), counted in ``missing`` and
reported in one warning per request -- never an exception (``user_known`` says whether the last
request's user had any features: an unknown user is a cold start, scored with the defaults).
An online store that was never materialised for the service's views is refused
(:func:`llm_features.store.check_materialized`): every score would be the same default.

Threads: a forward pass over ~100 candidates gains nothing from several intra-op threads; run a
serving worker with ``torch.set_num_threads(1)`` (one worker per core). On a busy 2-core machine
the default (one thread per core in every process) oversubscribed the cores and made p50 about
10x slower in ``bench/bench_ranker.py``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ranker.features import ITEM_ID, USER_ID, FeatureEncoder, MissingFeatures
from ranker.model import RankingModel
from ranker.train import load_checkpoint

log = logging.getLogger(__name__)


class Ranker:
    """A trained ranker bound to an online store.

    Args:
        model: the unsharded :class:`RankingModel`.
        encoder: its fitted :class:`FeatureEncoder`.
        feature_service: the Feast feature service the model was trained on.
        store: a ``feast.FeatureStore``; opened from ``repo``/``data_dir`` on first use if None.
    """

    def __init__(
        self,
        model: RankingModel,
        encoder: FeatureEncoder,
        feature_service: str,
        store: Any = None,
        repo: str | os.PathLike = "feast_repo",
        data_dir: str | os.PathLike | None = None,
    ) -> None:
        self.model = model.eval()
        self.encoder = encoder
        self.feature_service = feature_service
        self.missing = MissingFeatures()  # cumulative over every request
        self._store = store
        self._repo = Path(repo)
        self._data_dir = data_dir
        self._refs: tuple[list[str], list[str]] | None = None
        self.user_known: bool | None = None  # did the last request's user have any online features?

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        store: Any = None,
        repo: str | os.PathLike = "feast_repo",
        data_dir: str | os.PathLike | None = None,
    ) -> "Ranker":
        """Load a checkpoint written by ``llmfeat ranker train`` (single-process or torchrun)."""
        model, encoder, payload = load_checkpoint(Path(path))
        return cls(model, encoder, payload["feature_service"], store, repo, data_dir)

    @property
    def store(self) -> Any:
        if self._store is None:
            from llm_features.store import open_store

            self._store = open_store(self._repo, self._data_dir, must_exist=True)
        return self._store

    def feature_refs(self) -> tuple[list[str], list[str]]:
        """``view:feature`` references of the service that the model reads, split by entity."""
        if self._refs is None:
            wanted = set(self.encoder.source_columns)
            user_refs, item_refs = [], []
            if _is_feast_store(self.store):
                from llm_features.store import check_materialized, feature_service

                service = feature_service(self.store, self.feature_service)
                check_materialized(self.store, self.feature_service)
            else:  # a stand-in with the same methods (tests, a custom online source)
                service = self.store.get_feature_service(self.feature_service)
            for proj in service.feature_view_projections:
                keys = set(self.store.get_feature_view(proj.name).join_keys)
                refs = [f"{proj.name}:{f.name}" for f in proj.features if f.name in wanted]
                if keys == {USER_ID}:
                    user_refs += refs
                elif keys == {ITEM_ID}:
                    item_refs += refs
                elif refs:
                    raise ValueError(f"feature view {proj.name} is keyed by {sorted(keys)}; the ranker expects "
                                     f"{USER_ID} or {ITEM_ID}")
            self._refs = (user_refs, item_refs)
        return self._refs

    def online_frame(self, user_id: int, item_ids: Sequence[int]) -> dict[str, list[Any]]:
        """The feature columns of ``len(item_ids)`` rows (one user) read from the online store."""
        user_refs, item_refs = self.feature_refs()
        n = len(item_ids)
        frame: dict[str, list[Any]] = {USER_ID: [int(user_id)] * n, ITEM_ID: [int(i) for i in item_ids]}
        if user_refs:
            user = self.store.get_online_features(
                features=user_refs, entity_rows=[{USER_ID: int(user_id)}]
            ).to_dict()
            self.user_known = any(values[0] is not None for name, values in user.items() if name != USER_ID)
            for name, values in user.items():
                if name != USER_ID:
                    frame[name] = [values[0]] * n
        if item_refs and n:
            items = self.store.get_online_features(
                features=item_refs, entity_rows=[{ITEM_ID: int(i)} for i in item_ids]
            ).to_dict()
            for name, values in items.items():
                if name != ITEM_ID:
                    frame[name] = list(values)
        return frame

    @torch.inference_mode()
    def score_frame(self, frame: Any, context: str = "ranker score") -> np.ndarray:
        """Click probabilities ``[N]`` for feature rows (a DataFrame or a dict of columns)."""
        stats = MissingFeatures()
        rows = self.encoder.encode(frame, stats, with_labels=False)
        stats.warn(context)
        self.missing.update(stats)
        if len(rows) == 0:
            return np.zeros(0, np.float32)
        batch = rows.batch(np.arange(len(rows)))
        return torch.sigmoid(self.model(batch.dense_features, batch.sparse_features)).numpy()

    def score(self, user_id: int, item_ids: Sequence[int]) -> np.ndarray:
        """Click probabilities ``[len(item_ids)]`` of ``user_id`` for each candidate, in input order."""
        return self.score_frame(self.online_frame(user_id, item_ids), context=f"ranker score (user {user_id})")

    def rank(self, user_id: int, item_ids: Sequence[int], top_k: int | None = None) -> list[tuple[int, float]]:
        """``(item_id, probability)`` pairs, best first (ties keep the input order)."""
        probs = self.score(user_id, item_ids)
        order = np.argsort(-probs, kind="stable")[:top_k]
        return [(int(item_ids[i]), float(probs[i])) for i in order]


def _is_feast_store(store: Any) -> bool:
    return type(store).__module__.split(".")[0] == "feast"
