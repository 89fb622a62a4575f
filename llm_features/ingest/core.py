"""``llmfeat ingest``: source files to the canonical tables, the split and the recent-behaviour table.

The steps live in their own modules (:mod:`.formats` reads, :mod:`.canonical` builds, :mod:`.split`
splits, :mod:`.stamp` says whether the work is done, :mod:`.report` reports); this module runs them
in order and writes the outputs. The names below were all importable from here and still are.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timezone
from typing import Any

from llm_features.atomic import write_json
from llm_features.ingest.canonical import INTERACTIONS_SCHEMA, Canonical, build_canonical
from llm_features.ingest.config import IngestConfig
from llm_features.ingest.formats import check_options, detect_format, load
from llm_features.ingest.labels import parse_label_rule
from llm_features.ingest.report import format_summary, ingest_report
from llm_features.ingest.split import parse_ratios, recorded_split
from llm_features.ingest.stamp import (
    INGEST_VERSION,
    INGEST_REPORT,
    input_fingerprint,
    read_report,
    unchanged_report,
    write_report,
)
from llm_features.parquet_io import write_table_atomic
from llm_features.workspace import Workspace

__all__ = [
    "INGEST_VERSION",
    "INTERACTIONS_SCHEMA",
    "METADATA_KEY",
    "INGEST_REPORT",
    "Canonical",
    "IngestConfig",
    "build_canonical",
    "check_options",
    "detect_format",
    "format_summary",
    "ingest",
    "input_fingerprint",
    "load",
    "parse_label_rule",
    "read_report",
]

log = logging.getLogger(__name__)

METADATA_KEY = "llmfeat.ingest"  # in each canonical table: the format and the input fingerprint


def ingest(cfg: IngestConfig, workspace: Workspace | None = None) -> dict[str, Any]:
    """Run the ingest stage and return its report (also written to ``canonical/ingest_report.json``).

    Skips the work (``report["skipped"] = True``) when the inputs and settings match the last run.
    Every option and every input row is checked before anything is written: a refused run leaves
    the data directory as it was (a rerun after it is a fresh run).
    """
    started = time.perf_counter()
    bounds = check_options(cfg)
    ws = workspace or Workspace.at(cfg.data_dir)
    fmt = detect_format(cfg)
    fingerprint, files = input_fingerprint(cfg, fmt)
    previous = unchanged_report(ws, fingerprint, cfg.force)
    if previous is not None:
        log.debug("ingest: inputs unchanged since %s; nothing to do", previous.get("written_at"))
        return {**previous, "skipped": True}

    loaded = load(cfg, fmt, bounds)
    recorded, split_payload = recorded_split(ws.split, parse_ratios(cfg.split_ratios), cfg.resplit)
    canon = build_canonical(loaded, cfg, recorded, ws.split)

    now = datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")
    split_payload = _write_canonical(ws, canon, {"format": fmt, "input_fingerprint": fingerprint},
                                     split_payload, now)
    recent = _write_recent(ws, canon, cfg)
    report = ingest_report(
        fmt=fmt, fingerprint=fingerprint, files=files, loaded=loaded, canon=canon,
        split_payload=split_payload, split_reused=recorded is not None, recent=recent, ws=ws,
        seconds=round(time.perf_counter() - started, 3), written_at=now,
    )
    write_report(ws, report)
    from llm_features.feast_sources import prepare_sources

    prepare_sources(ws)  # schema-only stand-ins, so `feast apply` / `materialize` can read every view
    return report


def _write_canonical(
    ws: Workspace, canon: Canonical, stamp: dict[str, str], split_payload: dict[str, Any] | None, now: str
) -> dict[str, Any]:
    """Write the three tables (``stamp`` in their metadata), then ``split.json``: the recorded
    ``split_payload`` with this run's counts, else the new boundaries. Returns what it wrote there."""
    meta = {METADATA_KEY: json.dumps(stamp)}
    write_table_atomic(canon.interactions, ws.interactions, meta)
    write_table_atomic(canon.items, ws.items, meta)
    write_table_atomic(canon.users, ws.users, meta)
    if split_payload is None:
        split_payload = canon.split.to_json(canon.split_counts, now, canon.interactions.num_rows)
    split_payload["counts"] = canon.split_counts
    write_json(ws.split, split_payload, sort_keys=False)
    return split_payload


def _write_recent(ws: Workspace, canon: Canonical, cfg: IngestConfig) -> dict[str, Any]:
    """The user_recent_behaviors table (unless ``--recent-cadence none``); returns its report entry."""
    recent: dict[str, Any] = {"cadence": cfg.recent_cadence, "n": cfg.recent_n, "parts": []}
    if cfg.recent_cadence != "none":
        from llm_features.recent import write_recent_behaviors

        rec_in = canon.interactions.select(["user_id", "item_id", "event_timestamp", "behavior_id", "label"])
        parts = write_recent_behaviors(ws, rec_in, n=cfg.recent_n, cadence=cfg.recent_cadence)
        recent["parts"] = [str(p) for p in parts]
    return recent
