"""The one error type for bad input and misuse: names the file, the line, the column or the option,
and says what to do.

The library raises :class:`UserError`, a plain ``ValueError``. The command line maps it at its
boundary (:func:`shown_as_click_error`, used by every llmfeat command and by the feature
repository's definitions, which the plain ``feast`` CLI imports): click prints ``str(error)`` on one
or two lines with exit code 1 and no traceback. Anything else that escapes a command is a bug and
keeps its traceback.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import click


class UserError(ValueError):
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
        self.message = message
        self.file = None if file is None else str(file)
        self.line = line
        self.column = column
        self.option = option

    def __str__(self) -> str:
        return self.message


class ClickUserError(UserError, click.ClickException):
    """A :class:`UserError` on its way out through click: still a ``UserError`` for the code that catches
    one, and a ``ClickException`` that click prints as ``Error: <message>`` with exit code 1."""

    def __init__(self, error: UserError) -> None:
        click.ClickException.__init__(self, error.message)
        self.file, self.line, self.column, self.option = error.file, error.line, error.column, error.option


@contextlib.contextmanager
def shown_as_click_error() -> Iterator[None]:
    """The command line's boundary: a :class:`UserError` leaving the block leaves as a
    :class:`ClickUserError`."""
    try:
        yield
    except ClickUserError:
        raise
    except UserError as e:
        raise ClickUserError(e) from None
