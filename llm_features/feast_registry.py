"""The registry store of ``feast_repo/feature_store.yaml``: feast's file registry, written atomically.

``registry: {path: data/registry.db, registry_store_type: llm_features.feast_registry.AtomicFileRegistryStore}``

- a relative path resolves against the feature repository, never the working directory (feast's
  ``FileRegistryStore`` does the same), so ``feast -c /path/to/feast_repo ...`` works from anywhere;
  a sqlite URL of the SQL registry would resolve against the working directory;
- each write goes to a temporary file next to the registry, is fsynced and renamed over it, so a
  reader (``feast serve``, a second command) or a crash never sees a half-written registry (feast's
  own file store truncates and rewrites in place);
- a ``registry.db`` that is an SQLite database is the SQL registry of an earlier llmfeat: refused
  with what to do, instead of feast's protobuf ``DecodeError``.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from feast.infra.registry.file import FileRegistryStore

from llm_features.atomic import write_bytes
from llm_features.errors import UserError

SQLITE_MAGIC = b"SQLite format 3\x00"


def is_sql_registry_file(path: str | os.PathLike) -> bool:
    """Is ``path`` an SQLite database (the SQL registry earlier llmfeat versions kept there)?"""
    try:
        with open(path, "rb") as f:
            return f.read(len(SQLITE_MAGIC)) == SQLITE_MAGIC
    except OSError:
        return False


def old_sql_registry_error(path: str | os.PathLike) -> UserError:
    return UserError(
        "is the SQL registry of an earlier llmfeat; the feature repository now keeps a file registry there",
        file=path,
        fix=f"Delete it (`rm {path}`; the parquet tables and the online store stay) and run "
        "`llmfeat feast apply` (or `feast apply`) again.",
    )


class AtomicFileRegistryStore(FileRegistryStore):
    """feast's ``FileRegistryStore`` (path relative to the repo) with atomic writes."""

    def get_registry_proto(self):
        if is_sql_registry_file(self._filepath):
            raise old_sql_registry_error(self._filepath)
        return super().get_registry_proto()

    def _write_registry(self, registry_proto) -> None:
        from feast.utils import _utc_now

        registry_proto.version_id = str(uuid.uuid4())
        registry_proto.last_updated.FromDatetime(_utc_now())
        write_bytes(Path(self._filepath), registry_proto.SerializeToString())
