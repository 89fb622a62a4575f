"""Events in: validation of one event, of a request body and of an events file (:class:`EventError`).

Nothing here reads the data dir: what an event means for the stores (a known item, a time after the
user's latest interaction) is checked by :mod:`llm_features.events.plan`.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from llm_features.errors import UserError

US_PER_S = 1_000_000
EVENT_FIELDS = ("user_id", "item_id", "timestamp", "label", "rating", "item_text", "behavior_text")
REQUIRED_FIELDS = ("user_id", "item_id", "timestamp", "label")
MAX_EVENTS = 10_000
EARLIEST_US = 631_152_000 * US_PER_S  # 1990-01-01, ingest's --min-timestamp default
FUTURE_SLACK_US = 86_400 * US_PER_S  # as ingest: clock skew


class EventError(UserError):
    """A bad event or request: names the event (1-based, or the file's line) and the field."""


@dataclass(frozen=True)
class Event:
    """One validated interaction (``time_us``: microseconds since the epoch, UTC)."""

    user_id: int
    item_id: int
    time_us: int
    label: int
    rating: float = math.nan
    item_text: str | None = None
    behavior_text: str | None = None
    index: int = 0
    """Where it came from: the 1-based position in the request, or the line of the file."""
    source: str | None = None
    """The file it was read from (None: a request)."""
    row_word: str = "event"

    def error(self, problem: str, column: str | None = None, fix: str | None = None) -> "EventError":
        return EventError(problem, file=self.source, line=self.index, column=column, fix=fix,
                          row_word=self.row_word)


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def _iso(us: int) -> str:
    """``2001-01-01T10:00:00Z`` (microseconds shown where there are any)."""
    return (_EPOCH + timedelta(microseconds=int(us))).isoformat().replace("+00:00", "Z")


class _Where:
    def __init__(self, index: int, source: str | os.PathLike | None, row_word: str):
        self.index, self.source, self.row_word = index, source, row_word

    def error(self, problem: str, column: str | None = None, fix: str | None = None) -> EventError:
        return EventError(problem, file=self.source, line=self.index, column=column, fix=fix,
                          row_word=self.row_word)


def _integer(value: Any, name: str, where: _Where, strings: bool) -> int:
    if strings and isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise where.error(f"not an integer ({value!r})", name) from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise where.error(f"must be an integer, got {type(value).__name__} {value!r}", name)
    if not -(2**63) <= value < 2**63:
        raise where.error(f"{value} does not fit in int64", name)
    return value


def _timestamp(value: Any, where: _Where) -> int:
    """ISO-8601 (a time without offset is UTC) or epoch seconds, to µs."""
    name = "timestamp"
    if isinstance(value, str):
        text = value.strip()
        try:
            value = float(text)  # epoch seconds written as text (CSV)
        except ValueError:
            try:
                dt = datetime.fromisoformat(text)
            except ValueError:
                raise where.error(f"not an ISO-8601 time or epoch seconds ({value!r})", name,
                                  "Write e.g. 2001-01-01T10:00:00Z or 978343200.") from None
            dt = dt.replace(tzinfo=timezone.utc) if dt.tzinfo is None else dt
            us = (dt - _EPOCH) // timedelta(microseconds=1)
            value = None
    if value is not None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise where.error(f"must be an ISO-8601 string or epoch seconds, got {type(value).__name__}",
                              name)
        if not math.isfinite(value):
            raise where.error(f"not a finite number ({value!r})", name)
        if abs(value) >= 1e11:
            raise where.error(f"{value!r} is too large for epoch seconds (milliseconds?)", name,
                              "Give the time in seconds since 1970-01-01 UTC, or as ISO-8601.")
        us = int(round(value * US_PER_S))
    if us < EARLIEST_US:
        raise where.error(f"{_iso(us)} is before 1990-01-01, the earliest time ingest accepts", name)
    now = int(time.time() * US_PER_S)
    if us > now + FUTURE_SLACK_US:
        raise where.error(f"{_iso(us)} is in the future (now {_iso(now)})", name)
    return us


def _text(value: Any, name: str, where: _Where) -> str | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str):
        raise where.error(f"must be a string, got {type(value).__name__}", name)
    return value


def parse_event(raw: Any, index: int, *, source: str | os.PathLike | None = None, row_word: str = "event",
                strings: bool = False) -> Event:
    """One event from a JSON object (``strings``: every value may be text, as in a CSV row)."""
    where = _Where(index, source, row_word)
    if not isinstance(raw, Mapping):
        raise where.error(f"must be an object with {', '.join(REQUIRED_FIELDS)}, got {type(raw).__name__}")
    unknown = sorted(str(k) for k in raw if k not in EVENT_FIELDS)
    if unknown:
        raise where.error(f"unknown field(s) {', '.join(map(repr, unknown))}",
                          fix=f"Use only {', '.join(EVENT_FIELDS)}.")
    for name in REQUIRED_FIELDS:
        if raw.get(name) is None or (strings and isinstance(raw[name], str) and not raw[name].strip()):
            raise where.error("missing", name, f"Every event needs {', '.join(REQUIRED_FIELDS)}.")
    label = raw["label"]
    if isinstance(label, bool):
        label = int(label)
    label = _integer(label, "label", where, strings)
    if label not in (0, 1):
        raise where.error(f"must be 0 or 1, got {label}", "label")
    rating = raw.get("rating")
    if rating is None or (strings and isinstance(rating, str) and not rating.strip()):
        rating = math.nan
    else:
        if strings and isinstance(rating, str):
            try:
                rating = float(rating)
            except ValueError:
                raise where.error(f"not a number ({rating!r})", "rating") from None
        if isinstance(rating, bool) or not isinstance(rating, (int, float)) or not math.isfinite(rating):
            raise where.error(f"must be a finite number, got {rating!r}", "rating")
        rating = float(rating)
    return Event(
        user_id=_integer(raw["user_id"], "user_id", where, strings),
        item_id=_integer(raw["item_id"], "item_id", where, strings),
        time_us=_timestamp(raw["timestamp"], where),
        label=label,
        rating=rating,
        item_text=_text(raw.get("item_text"), "item_text", where),
        behavior_text=_text(raw.get("behavior_text"), "behavior_text", where),
        index=index,
        source=None if source is None else str(source),
        row_word=row_word,
    )


def parse_payload(payload: Any, max_events: int = MAX_EVENTS) -> list[Event]:
    """The events of a request body ``{"events": [{...}, ...]}`` (an :class:`EventError` if malformed)."""
    if not isinstance(payload, Mapping):
        raise EventError('the request body must be a JSON object {"events": [...]}, got '
                         f"{type(payload).__name__}")
    extra = sorted(str(k) for k in payload if k != "events")
    if extra:
        raise EventError(f"unknown request field(s) {', '.join(map(repr, extra))}",
                         fix='The body is {"events": [...]}.')
    events = payload.get("events")
    if not isinstance(events, list):
        raise EventError(f"'events' must be a list of event objects, got {type(events).__name__}",
                         fix='The body is {"events": [...]}.')
    if len(events) > max_events:
        raise EventError(f"{len(events)} events in one request; at most {max_events}",
                         fix="Send them in several requests.")
    return [parse_event(e, i + 1) for i, e in enumerate(events)]


def read_events_file(path: str | os.PathLike, max_events: int | None = None) -> list[Event]:
    """Events from a JSON-lines file (one object per line) or a CSV file with a header of field names."""
    path = Path(path)
    if not path.is_file():
        raise EventError("not found" + (" (it is a directory)" if path.is_dir() else ""), file=path,
                         option="--events")
    suffix = path.suffix.lower()
    events: list[Event] = []
    try:
        if suffix in (".jsonl", ".ndjson", ".json"):
            with open(path, encoding="utf-8") as f:
                for line_no, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        raw = json.loads(line)
                    except ValueError as e:
                        raise EventError(f"not valid JSON ({e})", file=path, line=line_no,
                                         fix="Write one JSON object per line.") from None
                    events.append(parse_event(raw, line_no, source=path, row_word="line"))
        elif suffix == ".csv":
            with open(path, encoding="utf-8", newline="") as f:
                reader = csv.DictReader(f)
                if not reader.fieldnames:
                    raise EventError("empty (no header line)", file=path,
                                     fix=f"The header names the fields: {', '.join(EVENT_FIELDS)}.")
                for row in reader:
                    if None in row:
                        raise EventError("more values than header fields", file=path, line=reader.line_num)
                    events.append(parse_event(row, reader.line_num, source=path, row_word="line",
                                              strings=True))
        else:
            raise EventError(f"unknown events file type {suffix or '(none)'!r}", file=path, option="--events",
                             fix="Give a .jsonl (one JSON event per line) or a .csv file.")
    except UnicodeDecodeError as e:
        raise EventError(f"not UTF-8 text (byte offset {e.start})", file=path) from None
    if max_events is not None and len(events) > max_events:
        raise EventError(f"{len(events)} events; at most {max_events} per push", file=path)
    return events
