"""Score candidates for a user at request time from the Feast online store.

Example::

    ranker = Ranker.load("runs/ranker_llm")             # opens feast_repo/ lazily
    probs = ranker.score(user_id=42, item_ids=[1, 2, 3])  # [3] click probabilities, input order
    ranker.rank(42, [1, 2, 3], top_k=2)                   # [(item_id, prob), ...] best first

A request reads the user's features (``user_profile``, ``user_recent_behaviors``,
``user_embeddings``) from the online store, takes the candidates' item inputs from a cache that is
re-read when the item views are materialised again, and runs one forward pass
(:class:`ranker.online.OnlineScorer`; ``llmfeat serve`` is the same path behind HTTP). The
reference path, :meth:`Ranker.online_frame` + :meth:`Ranker.score_frame`, reads every row
through ``get_online_features`` and gives the same scores; a store that is not a
``feast.FeatureStore`` (a stand-in with the same methods) is always scored that way.
A user or item the store does not know is scored with the documented defaults (OOV rows, the
learned missing vector plus its flag; see :mod:`ranker.features`), counted in ``missing`` and
reported in one warning per request -- never an exception (``user_known`` says whether the last
request's user had any features: an unknown user is a cold start, scored with the defaults).
An online store that was never materialised for the service's views is refused
(:func:`llm_features.store.check_materialized`): every score would be the same default. So is one
whose embedding views hold another model's embeddings than the checkpoint was trained on
(:meth:`Ranker.check_store`).

A user id that is not in the ranker's ``user_id`` vocabulary (its training split never saw it) is
scored with the OOV id row and counted as ``unknown_user_id`` once per candidate row, even when the
store has the user's profile, history and LLM embedding (``user_known`` is then True): with a
global time split most later users are such users (ML-1M: user 42's interactions all fall after
the split), and their LLM user vector and recent items carry them.

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
from ranker.online import OnlineScorer
from ranker.online_rows import _is_feast_store, embedding_model_mismatch, split_feature_refs
from ranker.train import load_checkpoint

log = logging.getLogger(__name__)


class Ranker:
    """A trained ranker bound to an online store.

    Args:
        model: the unsharded :class:`RankingModel`.
        encoder: its fitted :class:`FeatureEncoder`.
        feature_service: the Feast feature service the model was trained on.
        store: a ``feast.FeatureStore``; opened from ``repo``/``data_dir`` on first use if None.
        fs_yaml_file: another configuration of the repo to open (``open_store``'s ``fs_yaml_file``).
        fingerprint: the embedding model the checkpoint was trained on (its ``ranker.json``).
        prefetch_items: read the item inputs of the whole ``item_id`` vocabulary when the first
            request comes (else only the candidates asked for; :class:`OnlineScorer`).
    """

    def __init__(
        self,
        model: RankingModel,
        encoder: FeatureEncoder,
        feature_service: str,
        store: Any = None,
        repo: str | os.PathLike = "feast_repo",
        data_dir: str | os.PathLike | None = None,
        *,
        fs_yaml_file: str | os.PathLike | None = None,
        fingerprint: str | None = None,
        checkpoint: str | os.PathLike | None = None,
        prefetch_items: bool = True,
    ) -> None:
        self.model = model.eval()
        self.encoder = encoder
        self.feature_service = feature_service
        self.fingerprint = fingerprint
        self.checkpoint = None if checkpoint is None else Path(checkpoint)
        self.missing = MissingFeatures()  # cumulative over every request
        self._store = store
        self._repo = Path(repo)
        self._data_dir = data_dir
        self._fs_yaml_file = fs_yaml_file
        self._prefetch_items = prefetch_items
        self._refs: tuple[list[str], list[str]] | None = None
        self._scorer: OnlineScorer | None = None
        self.user_known: bool | None = None  # did the last request's user have any online features?

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        store: Any = None,
        repo: str | os.PathLike = "feast_repo",
        data_dir: str | os.PathLike | None = None,
        **kwargs: Any,
    ) -> "Ranker":
        """Load a checkpoint written by ``llmfeat ranker train`` (single-process or torchrun);
        ``kwargs``: the keyword arguments of :class:`Ranker`."""
        model, encoder, payload = load_checkpoint(Path(path))
        return cls(model, encoder, payload["feature_service"], store, repo, data_dir,
                   fingerprint=payload.get("fingerprint"), checkpoint=path, **kwargs)

    @property
    def store(self) -> Any:
        if self._store is None:
            from llm_features.store import open_store

            self._store = open_store(self._repo, self._data_dir, self._fs_yaml_file, must_exist=True)
        return self._store

    def check_store(self) -> None:
        """Refuse a store this ranker cannot serve (:class:`~llm_features.errors.UserError`): one never
        materialised for the service's views, or whose embedding views hold another model's
        embeddings than the checkpoint was trained on (their registry tag)."""
        from llm_features.fingerprint import FingerprintMismatchError
        from llm_features.store import check_materialized, feature_service, feature_view, store_data_dir

        check_materialized(self.store, self.feature_service)
        views = [feature_view(self.store, p.name)
                 for p in feature_service(self.store, self.feature_service).feature_view_projections]
        problem = embedding_model_mismatch(views, self.fingerprint)
        if problem:
            raise FingerprintMismatchError(
                f"{problem} (registry of {store_data_dir(self.store)})", file=self.checkpoint,
                fix="Serve the data dir the ranker was trained on, or retrain it on this one (llmfeat ranker train).")

    def feature_refs(self) -> tuple[list[str], list[str]]:
        """``view:feature`` references of the service that the model reads, split by entity."""
        if self._refs is None:
            if _is_feast_store(self.store):
                self.check_store()
            self._refs = split_feature_refs(self.store, self.feature_service, set(self.encoder.source_columns))
        return self._refs

    def prepare(self) -> None:
        """Check the store and build the request path now rather than in the first request."""
        if _is_feast_store(self.store):
            self.scorer  # noqa: B018 - built on first access
        else:
            self.feature_refs()

    @property
    def scorer(self) -> OnlineScorer:
        """The request path over a ``feast.FeatureStore`` (built, and the store checked, on first use)."""
        if self._scorer is None:
            self.feature_refs()
            self._scorer = OnlineScorer(self.model, self.encoder, self.store, self.feature_service,
                                        prefetch=self._prefetch_items, fingerprint=self.fingerprint)
        return self._scorer

    def online_frame(self, user_id: int, item_ids: Sequence[int]) -> dict[str, list[Any]]:
        """The feature columns of ``len(item_ids)`` rows (one user) read with ``get_online_features``."""
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
        context = f"ranker score (user {user_id})"
        if not _is_feast_store(self.store):
            return self.score_frame(self.online_frame(user_id, item_ids), context=context)
        probs, stats, self.user_known = self.scorer.score(user_id, item_ids)
        stats.warn(context)
        self.missing.update(stats)
        return probs

    def rank(self, user_id: int, item_ids: Sequence[int], top_k: int | None = None) -> list[tuple[int, float]]:
        """``(item_id, probability)`` pairs, best first (ties keep the input order)."""
        probs = self.score(user_id, item_ids)
        order = np.argsort(-probs, kind="stable")[:top_k]
        return [(int(item_ids[i]), float(probs[i])) for i in order]
