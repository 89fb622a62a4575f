"""The request bodies of ``llmfeat serve`` (:mod:`ranker.service`): read within a size limit, parsed
as JSON and checked field by field; a body it refuses is a :class:`BadRequest` (400, 413 or 422
with a message for the client). Responses are compact JSON (:func:`json_response`)."""

from __future__ import annotations

import json
from typing import Any

INT64 = (-(2**63), 2**63)


class BadRequest(Exception):
    """A request the service refuses: its status and a message for the client."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers



async def read_body(request: Any, limit: int) -> bytes:
    """The request body, refused (413) once it is known to pass ``limit`` bytes: from its
    Content-Length before reading, else while streaming."""
    length = request.headers.get("content-length")
    too_large = f"more than the limit of {limit} bytes (--max-body-bytes)"
    if length is not None:
        if not length.isdigit():
            raise BadRequest(400, f"Content-Length {length!r} is not a number of bytes")
        if int(length) > limit:
            raise BadRequest(413, f"the body has {length} bytes, {too_large}", {"connection": "close"})
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise BadRequest(413, f"the body has {too_large}", {"connection": "close"})
    return bytes(body)


def parse_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except UnicodeDecodeError:
        raise BadRequest(400, "malformed JSON: the body is not UTF-8 text") from None
    except ValueError as e:
        raise BadRequest(400, f"malformed JSON: {e}") from None


def int_field(value: Any, where: str) -> int:
    # JSON true/false parse as bool (an int subclass) and 1.0 as float: neither is an id
    if type(value) is not int:
        raise BadRequest(422, f"{where}: expected an integer, got {json.dumps(value)}")
    if not INT64[0] <= value < INT64[1]:
        raise BadRequest(422, f"{where}: {value} is outside the 64-bit integer range of the ids")
    return value


def candidate_request(data: Any, max_candidates: int, optional: tuple[str, ...] = ()) -> tuple[int, list[int]]:
    """``(user_id, item_ids)`` of a ``/score`` or ``/rank`` body (422 naming what is wrong)."""
    example = '{"user_id": 42, "item_ids": [1, 2, 3]}'
    if not isinstance(data, dict):
        raise BadRequest(422, f"the body must be a JSON object like {example}")
    allowed = ("user_id", "item_ids", *optional)
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise BadRequest(422, f"unknown field(s) {', '.join(map(repr, unknown))}; the fields are "
                              f"{', '.join(allowed)}")
    missing = [k for k in ("user_id", "item_ids") if k not in data]
    if missing:
        raise BadRequest(422, f"missing field(s) {', '.join(missing)}, as in {example}")
    user_id = int_field(data["user_id"], "user_id")
    items = data["item_ids"]
    if not isinstance(items, list):
        raise BadRequest(422, f"item_ids: expected a list of integer ids, got {json.dumps(items)[:80]}")
    if not items:
        raise BadRequest(422, "item_ids is empty: give at least one candidate")
    if len(items) > max_candidates:
        raise BadRequest(422, f"item_ids has {len(items)} candidates, more than the limit of {max_candidates} "
                              "(--max-candidates)")
    for pos, item in enumerate(items):
        if type(item) is not int or not INT64[0] <= item < INT64[1]:
            int_field(item, f"item_ids[{pos}]")
    return user_id, items


def json_response(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Any:
    from starlette.responses import Response

    return Response(json.dumps(payload, separators=(",", ":")).encode(), status_code=status,
                    headers=headers, media_type="application/json")

