"""Low-level readers of ingest's input files, each error naming the file, line and column.

* :mod:`.source`: an input file (:class:`SourceFile`), errors for its rows, and :class:`Loaded`,
  what a format adapter hands to the common pipeline;
* :mod:`.text`: strict decoding, delimited text (no quoting, MovieLens) and generic CSV/TSV/parquet tables;
* :mod:`.columns`: typed columns (int64 ids, numbers, 0/1 labels);
* :mod:`.timestamps`: the accepted event-time range and timestamp columns to int64 µs.
"""

from llm_features.ingest.readers.columns import INT64_MAX, INT64_MIN, to_float, to_int64, to_label
from llm_features.ingest.readers.source import Loaded, SourceFile, first_bad, require_file, shorten
from llm_features.ingest.readers.text import (
    canonical_encoding,
    check_delimiter,
    fast_numeric,
    read_table_file,
    read_text,
    split_delimited,
)
from llm_features.ingest.readers.timestamps import (
    DEFAULT_MIN_TIMESTAMP,
    EARLIEST_US,
    FUTURE_SLACK_US,
    LATEST_US,
    US_PER_S,
    TimeBounds,
    check_time_range,
    detect_epoch_unit,
    epoch_to_us,
    to_timestamp_us,
    us_to_iso,
)

__all__ = [
    "DEFAULT_MIN_TIMESTAMP",
    "EARLIEST_US",
    "FUTURE_SLACK_US",
    "INT64_MAX",
    "INT64_MIN",
    "LATEST_US",
    "US_PER_S",
    "Loaded",
    "SourceFile",
    "TimeBounds",
    "canonical_encoding",
    "check_delimiter",
    "check_time_range",
    "detect_epoch_unit",
    "epoch_to_us",
    "fast_numeric",
    "first_bad",
    "read_table_file",
    "read_text",
    "require_file",
    "shorten",
    "split_delimited",
    "to_float",
    "to_int64",
    "to_label",
    "to_timestamp_us",
    "us_to_iso",
]
