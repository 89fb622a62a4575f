"""The compute of a push: the texts never encoded, through the frozen shallow layers
(:meth:`Backbone.encode_texts`, what ``llmfeat encode`` does), and each user's fresh row: the fine-tuned
deep layers over the user's last ``n`` behaviours (:func:`llm_features.embed_users.final_user_states`,
the code path of ``llmfeat embed-users``) and the new recent-behaviour list
(:func:`llm_features.recent.build_recent_behaviors`, what ingest writes).
"""

from __future__ import annotations

from collections import ChainMap
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from llm_features.events.history import _Rows
from llm_features.events.parsing import Event
from llm_features.events.plan import _Plan
from llm_features.ids import normalize_text, stable_id


@dataclass
class _NewTexts:
    """Step 1 of a push: the behaviours and items never encoded, with their vectors."""

    behaviors: list[int]
    """New ``atomic_behavior_embeddings`` rows (behaviour ids, sorted)."""
    items: list[int]
    """Items without an ``item_embeddings`` row (sorted)."""
    behavior_time: dict[int, int]
    """Behaviour id -> the time of its first event in the request (µs)."""
    item_time: dict[int, int]
    """Item id -> the time of its first event in the request (µs)."""
    item_key: dict[int, int]
    """New item -> its text key (the id of its normalised text)."""
    encoded: dict[int, np.ndarray]
    """Text key -> the vector encoded now."""
    vectors: dict[int, np.ndarray]
    """The vectors the new rows carry (the new items' known ones, and the ones encoded now)."""


@dataclass
class _FreshRows:
    """Step 2 of a push: the users' new rows."""

    uids: np.ndarray
    stamps: np.ndarray
    states: np.ndarray
    recent: pa.Table | None
    """The users' new recent lists (None when ingest wrote none)."""


class _Compute:
    """Encoding and the deep layers (a mixin of :class:`~llm_features.events.EventProcessor`: its
    backbone, model, checkpoint config ``ft``, histories and encoded vectors)."""

    def _encode_new_texts(self, plan: _Plan) -> _NewTexts:
        """Texts never encoded: behaviours of the events, and the items without an item_embeddings row."""
        events, new_text = plan.events, plan.new_text
        first_seen: dict[int, int] = {}
        for e, (bid, _) in zip(events, plan.behavior):
            first_seen[bid] = min(first_seen.get(bid, e.time_us), e.time_us)
        item_first: dict[int, int] = {}
        for e in events:
            item_first[e.item_id] = min(item_first.get(e.item_id, e.time_us), e.time_us)
        new_behaviors = sorted({bid for bid, _ in plan.behavior if bid not in self.vectors})
        new_items = sorted(i for i in item_first if i not in self.encoded_items)
        item_key = {i: stable_id(self._item_text(i, new_text)) for i in new_items}
        texts = {bid: normalize_text(text) for bid, text in plan.behavior if bid in new_behaviors}
        for i in new_items:
            if item_key[i] not in self.vectors:
                texts.setdefault(item_key[i], normalize_text(self._item_text(i, new_text)))
        keys = sorted(texts)
        encoded = {}
        if keys:
            encoded = dict(zip(keys, self.backbone.encode_texts([texts[k] for k in keys]).numpy()))
        vectors = {**{k: self.vectors[k] for k in item_key.values() if k in self.vectors}, **encoded}
        return _NewTexts(new_behaviors, new_items, first_seen, item_first, item_key, encoded, vectors)

    def _fresh_rows(self, plan: _Plan, encoded: dict[int, np.ndarray]) -> _FreshRows:
        """The users' new rows: deep layers over the last n behaviours (embed-users' code path)."""
        rows_of = {uid: self._rows_with(uid, evs, plan) for uid, evs in plan.by_user.items()}
        request_texts = dict(plan.behavior)  # token level: the texts the deep layers read
        uids, stamps, states = self._user_states(rows_of, ChainMap(encoded, self.vectors),
                                                 ChainMap(self.behavior_text, request_texts))
        recent = self._recent_rows(rows_of) if self.recent_n is not None else None
        return _FreshRows(uids, stamps, states, recent)

    def _item_text(self, item: int, new_text: dict[int, str]) -> str:
        return new_text[item] if item in new_text else self.item_text[item]

    def _rows_with(self, uid: int, evs: list[Event], plan: _Plan) -> _Rows:
        """The user's last interactions (enough for the deep layers and the recent list) plus the new ones."""
        bid = plan.behavior_of
        new = _Rows(np.array([e.time_us for e in evs], np.int64),
                    np.array([e.item_id for e in evs], np.int64),
                    np.array([bid[id(e)] for e in evs], np.int64), np.array([e.label for e in evs], np.int8),
                    np.array([e.rating for e in evs], np.float32))
        k = max(self.context_size, self.recent_n or 0)
        both = _Rows.concat([self.histories.last(uid, k), new]).sorted()
        return both.take(slice(max(0, len(both) - k), None))

    def _user_states(self, rows_of: dict[int, _Rows], vectors: Mapping[int, np.ndarray],
                     texts_of: Mapping[int, str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(user ids, stamps, states): each user's final state over the last n rows of ``rows_of``."""
        from llm_features.embed_users import final_user_states
        from llm_features.finetune.data import FinetuneData
        from llm_features.finetune.packing import UserHistories, feedback_index

        n = self.context_size
        parts = [(uid, r.take(slice(max(0, len(r) - n), None))) for uid, r in rows_of.items()]
        rows = _Rows.concat([r for _, r in parts])
        user = np.concatenate([np.full(len(r), uid, np.int64) for uid, r in parts])
        bids, brow = np.unique(rows.behavior, return_inverse=True)
        hist = UserHistories.from_arrays(
            user, rows.time, brow, np.zeros(len(rows), np.int64), rows.label,
            feedback_index(rows.label, rows.rating.astype(np.float64), self.ft.feedback))
        dim = self.backbone.hidden_size
        table = None
        if self.ft.granularity == "behavior":
            table = torch.from_numpy(np.stack([vectors[b] for b in bids.tolist()]).astype(np.float32))
        texts = []
        if self.ft.granularity == "token":
            texts = [texts_of[b] for b in bids.tolist()]
        data = FinetuneData(hist, table, torch.zeros(1, dim), texts)
        return final_user_states(self.model, self.ft, data, context_size=n, device=self.device)

    def _recent_rows(self, rows_of: dict[int, _Rows]) -> pa.Table:
        """Each user's final recent-behaviour row over the last ``recent_n`` rows of ``rows_of``."""
        from llm_features.recent import build_recent_behaviors

        n = int(self.recent_n)
        parts = [(uid, r.take(slice(max(0, len(r) - n), None))) for uid, r in rows_of.items()]
        rows = _Rows.concat([r for _, r in parts])
        table = build_recent_behaviors(pd.DataFrame({
            "user_id": np.concatenate([np.full(len(r), uid, np.int64) for uid, r in parts]),
            "item_id": rows.item, "event_timestamp": rows.time, "behavior_id": rows.behavior,
            "label": rows.label,
        }), n=n, cadence="event")
        users = table["user_id"].to_numpy()
        last = np.flatnonzero(np.append(users[1:] != users[:-1], True))  # each user's final row
        return table.take(pa.array(last))
