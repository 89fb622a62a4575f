"""Atomic file writes: a reader sees the old file or the whole new one, never a half-written one.

Every file llmfeat writes goes through :func:`atomic_path` (the parquet tables through
:mod:`llm_features.parquet_io`, which uses it too): the content is written to a temporary file in
the destination's directory (or a staging directory beside it), fsynced, and renamed over the
destination. A writer that fails leaves the old file and no temporary one.

A destination that is a symbolic link is refused (:class:`~llm_features.errors.UserError`):
renaming over it would silently replace the link, not write where it points. A linked *directory*
is the parquet writer's concern (a table directory must not lead out of its data dir); an output
directory such as ``--out`` may be a link.

Example::

    write_json(out / "metrics.json", {"auc": 0.81})
    with atomic_path(out / "model.safetensors") as tmp:
        save_file(tensors, str(tmp))
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from llm_features.errors import UserError


def refuse_links(*paths: Path) -> None:
    """A :class:`UserError` for the first of ``paths`` that is a symbolic link."""
    for p in paths:
        if p.is_symlink():
            raise UserError(
                f"is a symbolic link to {os.readlink(p)}; refusing to write through it", file=p,
                fix="Replace the link with a real file or directory (for a table: inside the data dir).",
            )


@contextmanager
def atomic_path(path: str | os.PathLike, tmp_dir: Path | None = None) -> Iterator[Path]:
    """Yield a temporary path to write; on success it becomes ``path`` (fsync, rename), else it is removed.

    ``tmp_dir`` (default: ``path``'s directory) must be on the same file system as ``path``.
    """
    path = Path(path)
    refuse_links(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = (tmp_dir or path.parent) / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        if os.path.lexists(tmp):  # a hard link to the file ``path`` already is: rename(2) leaves both
            os.unlink(tmp)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def json_default(o: Any) -> Any:
    """What json cannot write: numpy numbers and arrays as numbers, anything else (a path) as its ``str``."""
    if isinstance(o, (np.integer, np.floating, np.bool_)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def write_json(path: str | os.PathLike, payload: Any, *, sort_keys: bool = True) -> Path:
    """``payload`` as indented JSON (paths and other objects as strings, see :func:`json_default`)."""
    return write_text(path, json.dumps(payload, indent=2, sort_keys=sort_keys, default=json_default) + "\n")
