"""The ingest stage: MovieLens or generic logs to the canonical parquet tables of the workspace.

Public API::

    from llm_features.ingest import IngestConfig, ingest, movielens_text, IngestError
    report = ingest(IngestConfig(source=Path("ml-1m")), Workspace.at("data"))

The stage's modules, in the order data flows: :mod:`.config` (the options), :mod:`.formats` (which
format; the options checked; the adapter: :mod:`.movielens` or :mod:`.generic`, over :mod:`.readers`
and :mod:`.attributes`), :mod:`.canonical` (:mod:`.validation`, :mod:`.labels`, :mod:`.split`: the
canonical tables), :mod:`.stamp` (is it already done?), :mod:`.report`, and :mod:`.core`, which runs
them in order and writes the outputs.
"""

from llm_features.ingest.canonical import INTERACTIONS_SCHEMA, build_canonical
from llm_features.ingest.config import IngestConfig
from llm_features.ingest.core import ingest
from llm_features.ingest.errors import IngestError
from llm_features.ingest.formats import detect_format, load
from llm_features.ingest.labels import parse_label_rule
from llm_features.ingest.movielens import load_ml1m, load_ml100k, load_movielens, movielens_text
from llm_features.ingest.report import format_summary
from llm_features.ingest.split import SplitBoundaries, parse_ratios
from llm_features.ingest.stamp import INGEST_REPORT, read_report

__all__ = [
    "INTERACTIONS_SCHEMA",
    "INGEST_REPORT",
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
    "load_movielens",
    "movielens_text",
    "parse_label_rule",
    "parse_ratios",
    "read_report",
]
