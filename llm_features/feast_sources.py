"""The parquet tables behind the Feast feature views, and the schema-only stand-ins that keep an
empty one readable.

``feast_repo/feature_definitions.py`` only *declares*: it reads the data dir (table schemas, the
model fingerprint) but never writes there. Neither DuckDB nor Spark can read an empty directory or a
missing file, so the tables a stage has not written yet get a schema-only parquet file, written by
:func:`prepare_sources`, which the llmfeat writers call: ``llmfeat ingest`` (so the plain feast CLI
works on a data dir right after ingest), ``llmfeat feast apply`` / ``materialize`` and the demo.

- a part-file directory (``user_embeddings/`` before the finetune stage, ...) gets
  ``empty-schema.parquet`` (not ``_``- or ``.``-prefixed, which pyarrow's schema inference skips).
  DuckDB reads every ``*.parquet`` there, while the stages' readers (``part-*.parquet``) never see
  it. :func:`llm_features.parquet_io.write_part` removes it with the first real part, since DuckDB
  refuses files whose schemas differ;
- a missing canonical table (``users.parquet``, ``items.parquet`` before ingest) gets a stand-in
  under ``<data dir>/.feast_placeholders/``, which the definitions point at until ingest has run
  (then `feast apply` again).
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from llm_features.parquet_io import (
    PLACEHOLDER_METADATA_KEY,
    PLACEHOLDER_PART,
    drop_placeholder,
    list_parts,
    write_table_atomic,
)
from llm_features.workspace import Workspace

PLACEHOLDER_DIR = ".feast_placeholders"
TS = pa.timestamp("us", tz="UTC")
_EMB = pa.list_(pa.float32())

# Workspace attribute -> the schema of its part files (the columns the feature views read)
PART_DIR_SCHEMAS: dict[str, pa.Schema] = {
    "atomic_behavior_embeddings": pa.schema(
        [("behavior_id", pa.int64()), ("behavior_embedding", _EMB), ("event_timestamp", TS)]),
    "item_embeddings": pa.schema([("item_id", pa.int64()), ("item_embedding", _EMB), ("event_timestamp", TS)]),
    "user_embeddings": pa.schema([("user_id", pa.int64()), ("user_embedding", _EMB), ("event_timestamp", TS)]),
    "user_recent_behaviors": pa.schema(
        [
            ("user_id", pa.int64()),
            ("recent_behavior_ids", pa.list_(pa.int64())),
            ("recent_item_ids", pa.list_(pa.int64())),
            ("recent_labels", pa.list_(pa.int8())),
            ("event_timestamp", TS),
        ]
    ),
}
# Workspace attribute -> the schema a canonical table has until ingest ran: no attributes, so the
# definitions declare no user_profile / item_profile view
TABLE_SCHEMAS: dict[str, pa.Schema] = {
    "users": pa.schema([("user_id", pa.int64()), ("event_timestamp", TS)], metadata={"llmfeat.attributes": "[]"}),
    "items": pa.schema(
        [("item_id", pa.int64()), ("item_text", pa.string()), ("title", pa.string()), ("event_timestamp", TS)],
        metadata={"llmfeat.attributes": "[]"},
    ),
}


def table_path(ws: Workspace, name: str) -> Path:
    """Where the source of canonical table ``name`` (``users``/``items``) reads: the table, else its
    stand-in (written by :func:`prepare_sources`)."""
    path = getattr(ws, name)
    return path if path.exists() else ws.root / PLACEHOLDER_DIR / path.name


def table_schema(ws: Workspace, name: str) -> pa.Schema:
    """The schema of canonical table ``name`` (read from the file), else the stand-in's."""
    path = getattr(ws, name)
    return pq.read_schema(path) if path.exists() else TABLE_SCHEMAS[name]


def _write_placeholder(path: Path, schema: pa.Schema) -> None:
    write_table_atomic(schema.empty_table(), path, metadata={PLACEHOLDER_METADATA_KEY: "true"})


def prepare_sources(ws: Workspace) -> list[Path]:
    """Make every source of the feature views readable: a placeholder where a table is missing,
    none where real parts exist. Idempotent (an existing placeholder is not rewritten). Returns
    the placeholders written."""
    written = []
    for name, schema in PART_DIR_SCHEMAS.items():
        directory: Path = getattr(ws, name)
        placeholder = directory / PLACEHOLDER_PART
        if list_parts(directory):
            drop_placeholder(directory)
        elif not placeholder.exists():
            _write_placeholder(placeholder, schema)
            written.append(placeholder)
    for name, schema in TABLE_SCHEMAS.items():
        path = table_path(ws, name)
        if not path.exists():
            _write_placeholder(path, schema)
            written.append(path)
    return written
