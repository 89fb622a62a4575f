"""Fresh user embeddings: bring a user's online features up to date when they act, not at the next batch.

An event is one new interaction ``{"user_id", "item_id", "timestamp", "label"}`` (optionally
``rating``, ``item_text``, ``behavior_text``). :class:`EventProcessor` loads the fine-tuned checkpoint
once and keeps it in memory with the users' histories; for each batch of events it

1. validates every event before anything is written (unknown fields, bad types, a timestamp not
   after the user's latest interaction, an unknown item without text: :class:`EventError`, a
   ``ValueError``);
2. encodes the text of an item (or behaviour) never encoded before through the frozen shallow layers
   (:meth:`Backbone.encode_texts`, what ``llmfeat encode`` does, the same normalised text);
3. runs the fine-tuned deep layers over each user's last ``n`` behaviours with their feedback
   (:func:`llm_features.embed_users.final_user_states`: the code path of ``llmfeat embed-users``, so
   the pushed vector is the row embed-users writes for the same history, at the same stamp: the
   latest interaction + 1 s), and builds the user's new recent-behaviour list
   (:func:`llm_features.recent.build_recent_behaviors`, what ingest writes);
4. writes, under the data dir's lock, the same rows to the offline store, as part files in the views'
   source directories (``parquet_io.write_part``, atomic; the embedding parts carry the fingerprint
   and the checkpoint identity embed-users records), and then to the online store through the views'
   Feast push sources (``<view>_push`` in ``feast_repo/feature_definitions.py``).

The events themselves are appended to ``<data dir>/events/`` (the interactions pushed since ingest):
the next event of the same user (in this process or another one on the same data dir) sees them. A
call holds the data dir's lock (:meth:`Workspace.lock`) while it checks and writes, so it never
interleaves with a batch stage; it is refused with ``DataDirBusyError`` while one runs.

Pushed rows carry the serving identity of the ``user_embeddings/`` parts embed-users exported
(checkpoint, n, cadence) but no embed-users state: a later ``embed-users`` treats their (user, stamp)
keys as exported and goes on as before (after a re-ingest that includes the events, it adds the rows
at the events' own times).

Why not ``store.push(..., to=PushMode.ONLINE_AND_OFFLINE)``: feast's DuckDB offline write appends by
reading the whole source and writing it back to the source path, which for llmfeat's part-file
directories fails ("Cannot open file .../user_embeddings: File exists") after the online write went
through, and would drop the parts' fingerprint metadata. The online write is the one
``store.push(name, df, to=PushMode.ONLINE)`` makes (``write_to_online_store`` for each view whose
stream source is the push source), with the push source's views resolved once instead of re-reading
the registry at every call (``store.push`` spends ~10 ms per call on that here).

The package: :mod:`~llm_features.events.parsing` (events in, :class:`EventError`),
:mod:`~llm_features.events.plan` (the checks against the data dir), :mod:`~llm_features.events.compute`
(new texts encoded, the users' fresh rows), :mod:`~llm_features.events.offline` (part files),
:mod:`~llm_features.events.online` (push sources), :mod:`~llm_features.events.datadir` and
:mod:`~llm_features.events.history` (the in-memory state) and :mod:`~llm_features.events.processor`
(the :class:`EventProcessor` that runs them in order).

Example::

    from llm_features.events import EventProcessor
    proc = EventProcessor.load(data_dir="feast_repo/data")     # checkpoint: <data dir>/runs/finetune
    proc.handle_events({"events": [{"user_id": 7, "item_id": 3, "timestamp": "2001-01-01T10:00:00Z",
                                    "label": 1}]})
    # {"users_updated": [7], "items_encoded": [], "events": 1, "event_timestamps": {"7": "..."}, ...}
"""

from __future__ import annotations

import threading
from typing import Any

from llm_features.events.offline import EVENT_SCHEMA, EVENTS_METADATA_KEY, PUSH_PREFIX
from llm_features.events.online import PUSH_SOURCES
from llm_features.events.parsing import (
    EARLIEST_US,
    EVENT_FIELDS,
    FUTURE_SLACK_US,
    MAX_EVENTS,
    REQUIRED_FIELDS,
    US_PER_S,
    Event,
    EventError,
    parse_event,
    parse_payload,
    read_events_file,
)
from llm_features.events.processor import EventProcessor, PushReport

# ---------------------------------------------------------------------------------------------- module API
_DEFAULT: EventProcessor | None = None
_DEFAULT_LOCK = threading.Lock()


def default_processor(**kwargs: Any) -> EventProcessor:
    """The process-wide :class:`EventProcessor` (built on first use from ``kwargs``, else the defaults:
    ``$LLMFEAT_DATA_DIR``, its ``runs/finetune``, ``feast_repo``)."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            _DEFAULT = EventProcessor(**kwargs)
        return _DEFAULT


def handle_events(payload: Any, processor: EventProcessor | None = None) -> dict[str, Any]:
    """``POST /events``: ``{"events": [...]}`` in, ``{"users_updated": [...], "items_encoded": [...], ...}``.

    Uses ``processor`` (else :func:`default_processor`). Bad input raises :class:`EventError`, a
    ``ValueError`` (map it to HTTP 400); nothing is written then.
    """
    return (processor or default_processor()).handle_events(payload)


__all__ = [
    "EARLIEST_US", "EVENTS_METADATA_KEY", "EVENT_FIELDS", "EVENT_SCHEMA", "FUTURE_SLACK_US", "MAX_EVENTS",
    "PUSH_PREFIX", "PUSH_SOURCES", "REQUIRED_FIELDS", "US_PER_S",
    "Event", "EventError", "EventProcessor", "PushReport", "default_processor",
    "handle_events", "parse_event", "parse_payload", "read_events_file",
]
