"""The one error type of ingest: names the file, the line and the column, and says what to do."""

from __future__ import annotations

import os

import click


class IngestError(click.ClickException, ValueError):
    """Bad input. The CLI prints the message without a traceback; the Python API sees a ValueError."""

    def __init__(
        self,
        problem: str,
        *,
        file: str | os.PathLike | None = None,
        line: int | None = None,
        column: str | None = None,
        fix: str | None = None,
        row_word: str = "line",
    ) -> None:
        where = []
        if file is not None:
            where.append(str(file))
        if line is not None:
            where.append(f"{row_word} {line}")
        if column is not None:
            where.append(f"column '{column}'")
        message = (", ".join(where) + ": " if where else "") + problem
        if fix:
            message += f" {fix}" if message.endswith((".", ":", "?", "!")) else f". {fix}"
        super().__init__(message)
        self.file = None if file is None else str(file)
        self.line = line
        self.column = column

    def __str__(self) -> str:  # ValueError and ClickException agree on the message
        return self.message
