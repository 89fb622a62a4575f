"""What ingest reports: ``ingest_report.json`` (counts, label, split, attributes, outputs) and its summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from llm_features import attributes as attributes_mod
from llm_features.attributes import Attribute
from llm_features.ingest.canonical import Canonical
from llm_features.ingest.readers import Loaded
from llm_features.ingest.split import iso_us
from llm_features.ingest.stamp import INGEST_REPORT, INGEST_VERSION
from llm_features.workspace import Workspace


def ingest_report(
    *,
    fmt: str,
    fingerprint: str,
    files: list[dict[str, Any]],
    loaded: Loaded,
    canon: Canonical,
    split_payload: dict[str, Any],
    split_reused: bool,
    recent: dict[str, Any],
    ws: Workspace,
    seconds: float,
    written_at: str,
) -> dict[str, Any]:
    """The report of a run that wrote the tables; ``files``: the inputs, as the fingerprint lists them."""
    n = canon.interactions.num_rows
    blank = {str(Path(k).resolve()): v for k, v in (loaded.blank_lines or {}).items()}
    event_us = canon.interactions.column("event_timestamp").cast(pa.int64()).to_numpy()
    return {
        "version": INGEST_VERSION,
        "format": fmt,
        "input_fingerprint": fingerprint,
        "inputs": [{**f, "blank_lines": blank.get(f["path"])} for f in files],
        "counts": canon.counts,
        "label": {"source": canon.label_source, "positive_rate": round(canon.counts["positives"] / n, 6)},
        "split": {k: split_payload[k] for k in ("ratios", "valid_start", "test_start", "counts")}
        | {"reused": split_reused},
        "time_range": [iso_us(int(us)) for us in (event_us.min(), event_us.max())],
        "recent": recent,
        "attributes": _attribute_report(canon, loaded),
        "outputs": {
            "interactions": str(ws.interactions),
            "items": str(ws.items),
            "users": str(ws.users),
            "split": str(ws.split),
        },
        "seconds": seconds,
        "written_at": written_at,
        "skipped": False,
    }


def _attribute_report(canon: Canonical, loaded: Loaded) -> dict[str, Any]:
    """What the report says of each entity's attributes: the kept ones (with how many rows have a
    value) and the columns inference skipped."""
    out: dict[str, Any] = {}
    for entity, table in (("user", canon.users), ("item", canon.items)):
        attrs = (loaded.attributes or {}).get(entity, [])
        kept = []
        for a in attrs:
            col = table.column(a.name)
            present = (pc.list_value_length(col).to_numpy(zero_copy_only=False) > 0).sum() \
                if a.kind == "multi" else col.length() - col.null_count
            kept.append({**a.to_dict(), "rows_with_value": int(present)})
        out[entity] = {"kept": kept, "skipped": (loaded.skipped_columns or {}).get(entity, [])}
    return out



def format_summary(report: dict[str, Any]) -> str:
    """A few human lines for the CLI."""
    c = report["counts"]
    if report.get("skipped"):
        head = (
            f"ingest: inputs unchanged since {report.get('written_at')}; nothing to do (use --force to redo)."
        )
    else:
        head = f"ingest ({report['format']}) done in {report['seconds']:.1f}s"
    sp = report["split"]
    lines = [
        head,
        f"  interactions {c['interactions']:,}  items {c['items']:,}  users {c['users']:,}  "
        f"behaviours {c['distinct_behaviors']:,}",
        f"  label {report['label']['source']}: positive rate {report['label']['positive_rate']:.3f}"
        + ("  (warning: one class only; the tower and the ranker learn nothing from it: a log of clicks "
           "needs the rows shown but not clicked)" if report["label"]["positive_rate"] in (0.0, 1.0) else ""),
        f"  split {'(recorded earlier) ' if sp.get('reused') else ''}valid from {sp['valid_start']}, "
        f"test from {sp['test_start']}: " + ", ".join(f"{k} {v:,}" for k, v in sp["counts"].items()),
        f"  dropped: {c['exact_duplicates_dropped']:,} exact duplicates, "
        f"{c['unknown_item_rows_dropped']:,} rows "
        f"with unknown items; {c['blank_lines_skipped']:,} blank lines skipped",
    ]
    for entity, att in (report.get("attributes") or {}).items():
        kept = [Attribute.from_dict(a) for a in att["kept"]]
        lines.append(f"  {entity} attributes: {attributes_mod.summary(kept)}")
        for a in att["kept"]:
            if not a.get("rows_with_value"):
                lines.append(f"    warning: {entity} attribute {a['name']} has no value in any row")
        if att.get("skipped"):
            lines.append("    not kept: " + "; ".join(f"{s['column']} ({s['why']})" for s in att["skipped"]))
    if c.get("users_without_profile") and (report.get("attributes") or {}).get("user", {}).get("kept", True):
        lines.append(f"  {c['users_without_profile']:,} users have no profile row (attributes left empty)")
    if report["recent"]["parts"]:
        lines.append(
            f"  user_recent_behaviors: cadence {report['recent']['cadence']}, n={report['recent']['n']}"
        )
    lines.append(f"  report: {Path(report['outputs']['interactions']).parent / INGEST_REPORT}")
    return "\n".join(lines)
