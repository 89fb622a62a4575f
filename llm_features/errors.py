"""The one error type for bad input and misuse: names the file, the line, the column or the option,
and says what to do.

The CLI prints ``str(error)`` on one or two lines with exit code 1 and no traceback (click handles a
``ClickException``); the Python API sees a ``ValueError``. Anything else that escapes a command is a
bug and keeps its traceback.
"""

from __future__ import annotations

import os

import click


class UserError(click.ClickException, ValueError):
    """Bad input or misuse that the user can fix."""

    def __init__(
        self,
        problem: str,
        *,
        file: str | os.PathLike | None = None,
        line: int | None = None,
        column: str | None = None,
        option: str | None = None,
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
        if option is not None:
            where.append(option)
        message = (", ".join(where) + ": " if where else "") + problem
        if fix:
            message += f" {fix}" if message.endswith((".", ":", "?", "!")) else f". {fix}"
        super().__init__(message)
        self.file = None if file is None else str(file)
        self.line = line
        self.column = column
        self.option = option

    def __str__(self) -> str:  # ValueError and ClickException agree on the message
        return self.message
