"""Is a step already done? The stamp of its inputs and options, kept beside its outputs.

Two ways of resuming run through llmfeat, each where its work is shaped for it:

* **By step stamp** (this module): ``llmfeat ingest`` and, in ``llmfeat demo``
  (:mod:`llm_features.pipeline`), finetune and the two ranker twins. Their outputs are one whole:
  canonical tables and a split, or a trained checkpoint with its metrics. A step computes a
  :func:`digest` of what it reads (the :class:`FileState` of its input files, the model fingerprint)
  and of its options, and its :class:`StepRecord` says whether the last run stands for this one:
  same stamp, every output still there, no ``--force``. The record is written last, atomically: a
  killed run leaves no record of itself, so the next run redoes the step.
* **By parts**: ``llmfeat encode`` and ``llmfeat embed-users`` (:mod:`llm_features.encode`,
  :mod:`llm_features.embed_users`). Their work is incremental per row (a text, a user snapshot),
  and a run may take hours, so each part file is written atomically and named by a digest of the
  model fingerprint and the inputs of its rows; a run reads which rows the parts hold and
  computes only the rest. A killed run resumes exactly where it stopped, and new input rows cost
  only their own work. They use this module's :func:`digest` where they compute the same thing
  (:func:`llm_features.user_embedding_parts.checkpoint_identity`, the model fingerprint's digest).

Example::

    record = StepRecord(out / "demo_stamp.json")
    stamp = digest([FileState.of(interactions).to_list(), asdict(cfg)], length=16)
    if record.done(stamp, [out / "metrics.json"]) is None:
        train(cfg)
        record.write({"stamp": stamp})
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import asdict, astuple, dataclass
from pathlib import Path
from typing import Any

from llm_features.atomic import write_json


def digest(payload: Any, length: int | None = None) -> str:
    """sha256 (hex) of ``payload`` as sorted-key JSON (other objects as ``str``), cut to ``length``
    hex characters (default: all 64). The same payload always gives the same digest."""
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


@dataclass(frozen=True)
class FileState:
    """An input file as a stamp sees it: its path as given, its size and modification time
    (``None`` for a file that does not exist). A rewritten file gets another state, whatever it holds."""

    path: str
    size: int | None
    mtime_ns: int | None

    @classmethod
    def of(cls, path: str | os.PathLike) -> FileState:
        p = Path(path)
        st = p.stat() if p.exists() else None
        return cls(str(path), st.st_size if st else None, st.st_mtime_ns if st else None)

    def to_dict(self) -> dict[str, Any]:
        """``{"path", "size", "mtime_ns"}``, the form a report lists."""
        return asdict(self)

    def to_list(self) -> list[Any]:
        """``[path, size, mtime_ns]``, the compact form in a payload."""
        return list(astuple(self))


@dataclass(frozen=True)
class StepRecord:
    """The JSON file a step writes beside its outputs when it is done; ``key`` holds its stamp."""

    path: Path
    key: str = "stamp"

    def read(self) -> dict[str, Any] | None:
        """The record, or None where there is none (or it cannot be read)."""
        try:
            record = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def done(self, stamp: str, outputs: Iterable[Path] | Callable[[dict[str, Any]], Iterable[Path]] = (),
             force: bool = False) -> dict[str, Any] | None:
        """The record when the last run stands for this one: no ``force``, the same ``stamp``, and
        every output there (``outputs``: the paths, or a function of the record that names them).
        Else None: the step runs."""
        record = None if force else self.read()
        if record is None or record.get(self.key) != stamp:
            return None
        paths = outputs(record) if callable(outputs) else outputs
        return record if all(Path(p).exists() for p in paths) else None

    def write(self, record: dict[str, Any]) -> None:
        """Write ``record`` (holding the stamp under ``key``) atomically, in its own key order; last,
        once every output is written, so a killed run leaves no record."""
        if self.key not in record:
            raise ValueError(f"a step record needs its stamp under {self.key!r}")
        write_json(self.path, record, sort_keys=False)
