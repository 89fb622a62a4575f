"""Materialisation into the online store, in bounded time windows for large sources."""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from llm_features.errors import UserError
from llm_features.parquet_io import file_metadata
from llm_features.store.definitions import registered_workspace
from llm_features.store.fingerprints import _is_placeholder, _source_files, check_fingerprints
from llm_features.store.opening import TIMESTAMP_FIELD
from llm_features.workspace import Workspace

log = logging.getLogger("llm_features.store")

# ---------------------------------------------------------------------------------------------
# Materialisation


class _UnknownViewsError(UserError, KeyError):
    pass


@dataclass
class MaterializeReport:
    start: datetime
    end: datetime
    seconds: float
    source_rows: dict[str, int] = field(default_factory=dict)
    """Rows in each view's source inside [start, end)."""
    entities: dict[str, int] = field(default_factory=dict)
    """Distinct entity keys per view: the rows written to the online store."""
    windows: dict[str, int] = field(default_factory=dict)
    """Time windows each view was materialised in (1 unless its source has more than ``chunk_rows``)."""

    @property
    def total_entities(self) -> int:
        return sum(self.entities.values())


def _drop_stale_placeholders(directory: Path) -> None:
    """A placeholder part keeps an empty source readable; once real parts exist it must go, since a
    schema that differs from theirs (e.g. an extra column) would break DuckDB's multi-file read."""
    if not directory.is_dir():
        return
    files = _source_files(str(directory))
    placeholders = [p for p in files if _is_placeholder(file_metadata(p))]
    if placeholders and len(placeholders) < len(files):
        for p in placeholders:
            p.unlink(missing_ok=True)


def _source_stats(fv) -> tuple[int, int, datetime | None, datetime | None, pa.ChunkedArray | None]:
    """(rows, distinct entities, min ts, max ts, every row's ts) of a view's source."""
    join_keys = [e.name for e in fv.entity_columns]
    columns = [*join_keys, TIMESTAMP_FIELD]
    tables = [pq.read_table(p, columns=columns) for p in _source_files(fv.batch_source.path)]
    tables = [t for t in tables if t.num_rows]
    if not tables:
        return 0, 0, None, None, None
    t = pa.concat_tables(tables, promote_options="default")
    ts = t.column(TIMESTAMP_FIELD)
    keys = t.select(join_keys).group_by(join_keys).aggregate([]).num_rows
    return t.num_rows, keys, pc.min(ts).as_py(), pc.max(ts).as_py(), ts


MATERIALIZE_CHUNK_ROWS = 1_000_000
"""Source rows per materialisation window (see :func:`time_windows`)."""


def time_windows(ts: pa.ChunkedArray | None, start: datetime, end: datetime,
                 chunk_rows: int = MATERIALIZE_CHUNK_ROWS) -> list[tuple[datetime, datetime]]:
    """Consecutive ``[lo, hi]`` windows covering ``[start, end]``, each holding about ``chunk_rows``
    of the timestamps ``ts``.

    Feast's materialisation keeps each entity's latest row of a window with a window function over
    every row of it, so its memory grows with the rows of the window (a 10M-row view of 30-item
    lists passed 20 GB). Windows materialised in time order leave each entity's latest row of the
    whole range in the online store, as one window does, with memory bounded by ``chunk_rows``.
    Feast's window bounds are inclusive: a row at a cut lands in both windows, which is harmless.
    """
    n = 0 if ts is None else len(ts)
    if n <= chunk_rows:
        return [(start, end)]
    values = np.sort(ts.cast(pa.timestamp("us", tz="UTC")).to_numpy(zero_copy_only=False).astype("datetime64[us]"))
    k = -(-n // chunk_rows)
    cuts = np.unique(values[(np.arange(1, k) * n) // k])
    bounds = [start]
    for cut in cuts.tolist():  # datetime64[us] -> naive datetimes in UTC
        cut = cut.replace(tzinfo=timezone.utc)
        if bounds[-1] < cut < end:
            bounds.append(cut)
    bounds.append(end)
    return list(zip(bounds[:-1], bounds[1:]))


def materialize_all(
    store,
    workspace: Workspace | None = None,
    *,
    feature_views: Sequence[str] | None = None,
    check: bool = True,
    end: datetime | None = None,
    chunk_rows: int = MATERIALIZE_CHUNK_ROWS,
) -> MaterializeReport:
    """Materialise every row of every (or the named) feature view: ``[min ts - 1 s, now]``.

    A view whose source has more than ``chunk_rows`` rows is materialised in consecutive time
    windows of about that many rows (:func:`time_windows`), so memory stays bounded.

    Runs :func:`check_fingerprints` first (``check=False`` only for tests of the check itself),
    and refuses user embeddings computed from interactions that changed since (a text or a label:
    ``llm_features.embed_users.stale_user_embeddings``), so the online store serves only current rows.
    """
    if check:
        check_fingerprints(store, workspace)
        if feature_views is None or "user_embeddings" in feature_views:
            from llm_features.embed_users import stale_user_embeddings

            ws = workspace or registered_workspace(store)
            stale = stale_user_embeddings(ws.root)
            if stale:
                raise UserError(
                    f"{len(stale)} users' embeddings were computed from interactions that have changed since "
                    f"(a behaviour text or a label; e.g. user {stale[0]})", file=ws.user_embeddings,
                    fix="Run `llmfeat embed-users` first: it recomputes exactly those rows.")
    views = [fv for fv in store.list_feature_views()
             if (feature_views is None and fv.online) or (feature_views is not None and fv.name in feature_views)]
    if feature_views is not None:
        missing = sorted(set(feature_views) - {fv.name for fv in views})
        if missing:
            known = ", ".join(sorted(fv.name for fv in store.list_feature_views())) or "none"
            raise _UnknownViewsError(
                f"feature view(s) {', '.join(missing)} are not registered (registered: {known})",
                option="--views", fix="Name registered views, or run `llmfeat feast apply` first.")
    report = MaterializeReport(start=datetime.now(timezone.utc), end=datetime.now(timezone.utc), seconds=0.0)
    lo, hi = None, None
    stamps: dict[str, pa.ChunkedArray | None] = {}
    if views:
        from llm_features.feast_sources import prepare_sources

        # a table deleted since apply, or a data dir written by a stage that does not prepare them
        prepare_sources(workspace or registered_workspace(store))
    for fv in views:
        if Path(fv.batch_source.path).is_dir():
            _drop_stale_placeholders(Path(fv.batch_source.path))
        rows, keys, tmin, tmax, stamps[fv.name] = _source_stats(fv)
        report.source_rows[fv.name], report.entities[fv.name] = rows, keys
        if tmin is not None:
            lo = tmin if lo is None else min(lo, tmin)
            hi = tmax if hi is None else max(hi, tmax)
    now = end or datetime.now(timezone.utc)
    report.start = (lo - timedelta(seconds=1)) if lo is not None else now - timedelta(days=1)
    report.end = max(now, hi + timedelta(seconds=1)) if hi is not None else now
    t0 = time.perf_counter()
    if views:
        windows = {fv.name: time_windows(stamps[fv.name], report.start, report.end, chunk_rows) for fv in views}
        report.windows = {name: len(w) for name, w in windows.items()}
        small = [name for name, w in windows.items() if len(w) == 1]
        runs = ([(small, report.start, report.end)] if small else []) + [
            ([name], lo_, hi_) for name, w in windows.items() if len(w) > 1 for lo_, hi_ in w]
        with warnings.catch_warnings():
            # ibis (under feast's duckdb store) calls duckdb's deprecated fetch_arrow_table once per view
            warnings.filterwarnings("ignore", message="fetch_arrow_table", category=DeprecationWarning)
            for i, (names, lo_, hi_) in enumerate(runs, 1):
                if len(runs) > 1:
                    log.info("materialising (window %d of %d) %s from %s to %s", i, len(runs), ", ".join(names),
                             lo_.isoformat(), hi_.isoformat())
                store.materialize(start_date=lo_, end_date=hi_, feature_views=names)
    report.seconds = time.perf_counter() - t0
    return report
