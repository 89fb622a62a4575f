"""Is the ingest already done? The fingerprint of the inputs and settings, and the last run's report."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from llm_features.ingest.config import IngestConfig
from llm_features.workspace import Workspace

INGEST_VERSION = 1
REPORT_NAME = "ingest_report.json"


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
    files = []
    for p in _input_paths(cfg, fmt):
        st = p.stat() if p.exists() else None
        files.append(
            {
                "path": str(p.resolve()),
                "size": st.st_size if st else None,
                "mtime_ns": st.st_mtime_ns if st else None,
            }
        )
    settings = {
        k: (str(v) if isinstance(v, Path) else [str(x) for x in v] if isinstance(v, tuple) else v)
        for k, v in dataclasses.asdict(cfg).items()
        if k not in ("force", "data_dir", "source")
    }
    payload = json.dumps(
        {"version": INGEST_VERSION, "format": fmt, "files": files, "settings": settings}, sort_keys=True
    )
    return hashlib.sha256(payload.encode()).hexdigest(), files


def read_report(ws: Workspace) -> dict[str, Any] | None:
    """The last run's ``ingest_report.json``, or None where there is none (or it cannot be read)."""
    path = ws.canonical / REPORT_NAME
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _outputs_present(ws: Workspace, report: dict[str, Any]) -> bool:
    paths = [ws.interactions, ws.items, ws.users, ws.split]
    paths += [Path(p) for p in report.get("recent", {}).get("parts", [])]
    return all(p.exists() for p in paths)



def unchanged_report(ws: Workspace, fingerprint: str, force: bool) -> dict[str, Any] | None:
    """The last run's report when it stands for this run (same fingerprint, every output still
    there, no ``--force``); else None."""
    previous = read_report(ws)
    if (
        not force
        and previous is not None
        and previous.get("input_fingerprint") == fingerprint
        and _outputs_present(ws, previous)
    ):
        return previous
    return None
