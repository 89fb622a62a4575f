"""The ingest stage: MovieLens or generic logs to the canonical parquet tables of the workspace.

Public API::

    from llm_features.ingest import IngestConfig, ingest, movielens_text, IngestError
    report = ingest(IngestConfig(source=Path("ml-1m")), Workspace.at("data"))
"""

from llm_features.ingest.core import (
    INTERACTIONS_SCHEMA,
    REPORT_NAME,
    IngestConfig,
    build_canonical,
    detect_format,
    format_summary,
    ingest,
    load,
    parse_label_rule,
    read_report,
)
from llm_features.ingest.errors import IngestError
from llm_features.ingest.movielens import load_ml1m, load_ml100k, movielens_text
from llm_features.ingest.split import SplitBoundaries, parse_ratios

__all__ = [
    "INTERACTIONS_SCHEMA",
    "REPORT_NAME",
    "IngestConfig",
    "IngestError",
    "SplitBoundaries",
    "build_canonical",
    "detect_format",
    "format_summary",
    "ingest",
    "load",
    "load_ml1m",
    "load_ml100k",
    "movielens_text",
    "parse_label_rule",
    "parse_ratios",
    "read_report",
]
