"""The one parquet writer: atomic part files with llmfeat metadata.

Every table this package writes goes through here. A writer builds the file under a staging
directory next to the destination and renames it into place, so a reader (DuckDB, Feast, a
resumed run) never sees a half-written file. Part files are append-only: a new run adds parts,
it never rewrites old ones.

A writer never follows a symbolic link: a destination file, its directory or the staging
directory that is a link is refused (:class:`~llm_features.errors.UserError`), so a linked table
directory cannot make a stage write outside its data dir.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from llm_features.atomic import atomic_path, refuse_links

PART_GLOB = "part-*.parquet"
# A schema-only file that keeps an empty part-file directory readable for Feast's offline store
# (llm_features.feast_sources); removed as soon as the directory has a real part.
PLACEHOLDER_PART = "empty-schema.parquet"
PLACEHOLDER_METADATA_KEY = "llmfeat.placeholder"


def _staging_dir(dest_dir: Path) -> Path:
    # A sibling, not a child: Feast FileSources point at dest_dir and must not see staging files.
    return dest_dir.parent / f".{dest_dir.name}.staging"


def write_table_atomic(table: pa.Table, path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``table`` to ``path`` atomically (staging file, fsync, rename).

    ``metadata`` is merged into the parquet schema metadata (string to string).
    """
    path = Path(path)
    staging = _staging_dir(path.parent)
    refuse_links(path.parent, path, staging)
    path.parent.mkdir(parents=True, exist_ok=True)
    if metadata:
        merged = dict(table.schema.metadata or {})
        merged.update({k.encode(): v.encode() for k, v in metadata.items()})
        table = table.replace_schema_metadata(merged)
    staging.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, tmp_dir=staging) as tmp:
        pq.write_table(table, tmp)
    return path


def write_tables_atomic(
    tables: Iterable[pa.Table],
    path: str | os.PathLike,
    schema: pa.Schema,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Stream ``tables`` (each of ``schema``) into one parquet file at ``path``, atomically.

    The memory of a large table built block by block stays bounded by one block; a reader sees
    the whole file or none of it, as with :func:`write_table_atomic`.
    """
    path = Path(path)
    staging = _staging_dir(path.parent)
    refuse_links(path.parent, path, staging)
    path.parent.mkdir(parents=True, exist_ok=True)
    if metadata:
        merged = dict(schema.metadata or {})
        merged.update({k.encode(): v.encode() for k, v in metadata.items()})
        schema = schema.with_metadata(merged)
    staging.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, tmp_dir=staging) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        for table in tables:
            writer.write_table(table.replace_schema_metadata(schema.metadata))
    return path


def write_part(
    dest_dir: str | os.PathLike,
    table: pa.Table,
    *,
    metadata: Mapping[str, str] | None = None,
    name: str | None = None,
) -> Path:
    """Append ``table`` as a new part file ``part-<name>.parquet`` in ``dest_dir``.

    ``name`` makes the part deterministic (so a resumed run can tell a part is already there);
    by default a sortable, unique name is used.
    """
    dest_dir = Path(dest_dir)
    refuse_links(dest_dir)
    if name is None:
        name = f"{len(list_parts(dest_dir)):05d}-{uuid.uuid4().hex[:8]}"
    path = write_table_atomic(table, dest_dir / f"part-{name}.parquet", metadata)
    drop_placeholder(dest_dir)
    return path


def write_part_streamed(
    dest_dir: str | os.PathLike,
    tables: Iterable[pa.Table],
    schema: pa.Schema,
    *,
    metadata: Mapping[str, str] | None = None,
    name: str,
) -> Path:
    """:func:`write_part` for a table produced block by block (:func:`write_tables_atomic`)."""
    dest_dir = Path(dest_dir)
    refuse_links(dest_dir)
    path = write_tables_atomic(tables, dest_dir / f"part-{name}.parquet", schema, metadata)
    drop_placeholder(dest_dir)
    return path


def drop_placeholder(directory: str | os.PathLike) -> None:
    """Remove the directory's schema-only placeholder once it has real parts (DuckDB refuses files
    whose schemas differ)."""
    placeholder = Path(directory) / PLACEHOLDER_PART
    if placeholder.exists() and list_parts(directory):
        if file_metadata(placeholder).get(PLACEHOLDER_METADATA_KEY) == "true":
            placeholder.unlink(missing_ok=True)


def list_parts(dest_dir: str | os.PathLike) -> list[Path]:
    """The finished part files in ``dest_dir``, sorted by name."""
    d = Path(dest_dir)
    return sorted(d.glob(PART_GLOB)) if d.is_dir() else []


def read_parts(dest_dir: str | os.PathLike, columns: list[str] | None = None) -> pa.Table | None:
    """All parts of ``dest_dir`` as one table, or None when there are none."""
    parts = list_parts(dest_dir)
    if not parts:
        return None
    return pa.concat_tables([pq.read_table(p, columns=columns) for p in parts], promote_options="default")


def file_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata stored in a parquet file's schema."""
    raw = pq.read_schema(path).metadata or {}
    return {k.decode(): v.decode() for k, v in raw.items() if not k.startswith(b"ARROW") and k != b"pandas"}


def embedding_array(vectors: np.ndarray) -> pa.ListArray:
    """``[N, D]`` float array to a ``list<float32>`` arrow column (the Feast ``Array(Float32)`` type)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, d = vectors.shape
    offsets = pa.array(np.arange(0, n * d + 1, d, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(vectors.reshape(-1)))


def embedding_matrix(column: pa.ChunkedArray | pa.ListArray | Iterable) -> np.ndarray:
    """Inverse of :func:`embedding_array`: a ``list<float32>`` column to ``[N, D]`` float32."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if isinstance(column, (pa.ListArray, pa.LargeListArray)):
        flat = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
        return flat.reshape(len(column), -1) if len(column) else np.zeros((0, 0), np.float32)
    return np.stack([np.asarray(v, dtype=np.float32) for v in column])


def utc_us(values) -> pa.Array:
    """Timestamps as ``timestamp[us, UTC]``: DuckDB materialisation rejects nanoseconds."""
    arr = pa.array(values) if not isinstance(values, (pa.Array, pa.ChunkedArray)) else values
    if pa.types.is_timestamp(arr.type) and arr.type.tz is None:
        arr = arr.cast(pa.timestamp(arr.type.unit)).cast(pa.timestamp(arr.type.unit, tz="UTC"))
    return arr.cast(pa.timestamp("us", tz="UTC"))
