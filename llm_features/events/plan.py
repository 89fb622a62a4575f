"""Validation of a request against the data dir, before anything is written: every item known or given
a text (which never changes a known item's text), no event twice, each user's events after the user's
latest interaction, and the histories the deep layers will read encoded. The result is the
:class:`_Plan` the compute and the writes follow.
"""

from __future__ import annotations

from dataclasses import dataclass

from llm_features.events.parsing import US_PER_S, Event, EventError, _iso
from llm_features.ids import normalize_text, stable_id


@dataclass
class _Plan:
    """A checked request: what a push computes and writes."""

    events: list[Event]
    by_user: dict[int, list[Event]]
    """The events of each user, in request order."""
    new_text: dict[int, str]
    """Items the events introduce -> their text."""
    behavior: list[tuple[int, str]]
    """Each event's behaviour (id, text), as ingest keeps it."""
    behavior_of: dict[int, int]
    """``id(event)`` -> its behaviour id."""
    checked: float = 0.0
    """Seconds until the plan was checked (lock, sync, validation)."""


class _Validation:
    """The checks of a request (a mixin of :class:`~llm_features.events.EventProcessor`: its item texts,
    histories and encoded vectors)."""

    def _plan(self, events: list[Event]) -> _Plan:
        new_text = self._new_item_texts(events)  # items an event introduces (with their text)
        by_user = self._events_by_user(events, new_text)  # then every item known
        self._check_time_order(by_user)
        behavior: list[tuple[int, str]] = []  # behaviour texts; the ones to encode
        for e in events:
            text = e.behavior_text if e.behavior_text is not None else self._item_text(e.item_id, new_text)
            behavior.append((stable_id(text), text))  # as ingest keeps it: the id of the normalised text
        self._check_histories_encoded(by_user)
        return _Plan(events, by_user, new_text, behavior,
                     {id(e): b for e, (b, _) in zip(events, behavior)})

    def _new_item_texts(self, events: list[Event]) -> dict[int, str]:
        """The items the events introduce, with their text (an event cannot change a known item's text)."""
        new_text: dict[int, str] = {}
        for e in events:
            if e.item_text is None:
                continue
            known = self.item_text.get(e.item_id, new_text.get(e.item_id))
            if known is not None and normalize_text(known) != normalize_text(e.item_text):
                raise e.error(f"item {e.item_id} already has the text {known!r}; an event cannot change an "
                              "item's text", "item_text",
                              "Leave item_text out for a known item (re-ingest to change it).")
            if e.item_id not in self.item_text:
                new_text[e.item_id] = e.item_text
        return new_text

    def _events_by_user(self, events: list[Event], new_text: dict[int, str]) -> dict[int, list[Event]]:
        """Each user's events; refuses an unknown item without text and an event the request repeats."""
        seen: set[tuple[int, int, int]] = set()
        by_user: dict[int, list[Event]] = {}
        for e in events:
            if e.item_id not in self.item_text and e.item_id not in new_text:
                raise e.error(f"item {e.item_id} is unknown (not in {self.paths.items.name} nor in earlier "
                              "events) and the event has no item_text", "item_id",
                              "Give the item's text (item_text) so that it can be encoded.")
            key = (e.user_id, e.item_id, e.time_us)
            if key in seen:
                raise e.error(f"repeats an earlier event of this request (user {e.user_id}, item "
                              f"{e.item_id}, {_iso(e.time_us)})")
            seen.add(key)
            by_user.setdefault(e.user_id, []).append(e)
        return by_user

    def _check_time_order(self, by_user: dict[int, list[Event]]) -> None:
        """Every event after its user's latest interaction (ingested or pushed)."""
        for uid, evs in by_user.items():
            latest = self.histories.latest(uid)
            for e in evs:
                if latest is not None and e.time_us <= latest:
                    raise e.error(
                        f"user {uid}'s event at {_iso(e.time_us)} is not after the user's latest "
                        f"interaction ({_iso(latest)}), which the user's current row (stamped "
                        f"{_iso(latest + US_PER_S)}) already holds", "timestamp",
                        "Send events in time order, newer than every interaction already pushed or ingested.")

    def _check_histories_encoded(self, by_user: dict[int, list[Event]]) -> None:
        """The history the deep layers will read must be encoded (token level: its texts)."""
        for uid in by_user:
            rows = self.histories.last(uid, self.context_size)
            known = self.vectors if self.ft.granularity == "behavior" else self.behavior_text
            missing = [b for b in rows.behavior.tolist() if b not in known]
            if missing:
                raise EventError(f"user {uid}'s history holds behaviour {missing[0]}, which has no embedding",
                                 file=self.paths.atomic_behavior_embeddings,
                                 fix="Run `llmfeat encode` for this data dir (after every ingest).")
