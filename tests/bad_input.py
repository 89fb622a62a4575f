"""Shared checks of the bad-input suite (``tests/test_bad_input*.py``).

``run_bad`` runs one ``llmfeat`` command in process and asserts what issue 16 asks of every bad
input: exit code 1, a message of one or two lines that matches ``expect``, no traceback, and no
file changed, added or removed under the ``unchanged`` directories.

The suite (issue 16), each module listing its classes in its docstring: 112 classes.

- ``test_bad_input_ingest.py``: 47 (sources, columns, ids, timestamps, ratings, labels, options)
- ``test_bad_input_finetune.py``: 29 (finetune and embed-users: checkpoints, resume, model code, options)
- ``test_bad_input_workspace.py``: 25 (data-dir ownership, locks, links, Feast, the ranker)
- ``test_bad_input_encode.py``: 10 (encode)
"""

from __future__ import annotations

import hashlib
import os
import re
import traceback
from pathlib import Path
from typing import Iterable

from click.testing import CliRunner

from llm_features.cli import main


def snapshot(*roots: str | os.PathLike) -> dict[str, str]:
    """path -> sha1 of every file (and the target of every symlink) under ``roots``."""
    out: dict[str, str] = {}
    for root in roots:
        root = Path(root)
        if not root.exists():
            out[str(root)] = "<missing>"
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                p = Path(dirpath) / name
                if p.is_symlink():
                    out[str(p)] = "link:" + os.readlink(p)
                elif p.is_file():
                    out[str(p)] = hashlib.sha1(p.read_bytes()).hexdigest()
                elif p.is_dir():
                    out[str(p)] = "<dir>"
    return out


def error_lines(output: str) -> list[str]:
    """The lines of click's error message (from ``Error:`` on), without blank lines."""
    lines = output.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("Error:")), None)
    if start is None:
        return []
    return [line for line in lines[start:] if line.strip()]


def run_bad(args: list[str], *, expect: str, unchanged: Iterable[str | os.PathLike] = (),
            env: dict[str, str] | None = None) -> str:
    """Run ``llmfeat args``; assert a clean exit-1 error matching ``expect`` (a regex, searched
    case-insensitively in the message) and that nothing under ``unchanged`` changed. Returns the message."""
    unchanged = list(unchanged)
    before = snapshot(*unchanged)
    res = CliRunner().invoke(main, [str(a) for a in args], env=env)
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        tb = "".join(traceback.format_exception(res.exception))
        raise AssertionError(f"llmfeat {' '.join(map(str, args))} raised instead of a clean error:\n{tb}")
    out = res.output
    assert "Traceback" not in out, out
    assert res.exit_code == 1, f"exit code {res.exit_code}, output:\n{out}"
    lines = error_lines(out)
    assert 1 <= len(lines) <= 2, f"expected a one- or two-line error, got:\n{out}"
    message = " ".join(lines)
    assert re.search(expect, message, re.IGNORECASE), f"{expect!r} not in {message!r}"
    after = snapshot(*unchanged)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert not changed, f"files changed by a refused command: {changed}"
    return message
