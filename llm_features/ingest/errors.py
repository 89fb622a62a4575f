"""The error type of ingest: a :class:`~llm_features.errors.UserError` naming the file, line and column."""

from __future__ import annotations

from llm_features.errors import UserError


class IngestError(UserError):
    """Bad input. The CLI prints the message without a traceback; the Python API sees a ValueError."""
