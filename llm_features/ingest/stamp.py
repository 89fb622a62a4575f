"""Is the ingest already done? The fingerprint of the inputs and settings, and the last run's report
(its step record, :mod:`llm_features.stamps`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from llm_features.ingest.config import IngestConfig
from llm_features.stamps import FileState, StepRecord, digest
from llm_features.workspace import Workspace

INGEST_VERSION = 1
INGEST_REPORT = "ingest_report.json"


def _input_paths(cfg: IngestConfig, fmt: str) -> list[Path]:
    """The files ingest reads: the given ones, and MovieLens's default names under ``--source``."""
    if fmt == "generic":
        paths = [*cfg.interactions, cfg.items, cfg.users]
        return [Path(p) for p in paths if p is not None]
    defaults = {
        "ml-1m": ("ratings.dat", "movies.dat", "users.dat"),
        "ml-100k": ("u.data", "u.item", "u.user"),
    }[fmt]
    base = Path(cfg.source) if cfg.source is not None else Path(".")
    inter = list(cfg.interactions) or [base / defaults[0]]
    return [Path(p) for p in [*inter, cfg.items or base / defaults[1], cfg.users or base / defaults[2]]]


def input_fingerprint(cfg: IngestConfig, fmt: str) -> tuple[str, list[dict[str, Any]]]:
    """A digest of the inputs (path, size, mtime) and of the settings that shape the output."""
    files = [FileState.of(p.resolve()).to_dict() for p in _input_paths(cfg, fmt)]
    settings = {
        k: (str(v) if isinstance(v, Path) else [str(x) for x in v] if isinstance(v, tuple) else v)
        for k, v in dataclasses.asdict(cfg).items()
        if k not in ("force", "data_dir", "source")
    }
    return digest({"version": INGEST_VERSION, "format": fmt, "files": files, "settings": settings}), files


def _record(ws: Workspace) -> StepRecord:
    """The step record of ingest: its report, whose ``input_fingerprint`` is the stamp."""
    return StepRecord(ws.canonical / INGEST_REPORT, key="input_fingerprint")


def read_report(ws: Workspace) -> dict[str, Any] | None:
    """The last run's ``ingest_report.json``, or None where there is none (or it cannot be read)."""
    return _record(ws).read()


def _outputs(ws: Workspace, report: dict[str, Any]) -> list[Path]:
    paths = [ws.interactions, ws.items, ws.users, ws.split]
    return paths + [Path(p) for p in report.get("recent", {}).get("parts", [])]


def unchanged_report(ws: Workspace, fingerprint: str, force: bool) -> dict[str, Any] | None:
    """The last run's report when it stands for this run (same fingerprint, every output still
    there, no ``--force``); else None."""
    return _record(ws).done(fingerprint, lambda report: _outputs(ws, report), force=force)


def write_report(ws: Workspace, report: dict[str, Any]) -> None:
    """Record the run (``canonical/ingest_report.json``), last, once every output is written."""
    _record(ws).write(report)
