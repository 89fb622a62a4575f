"""The input side of ingest: which format the inputs are, the options checked, the adapter that reads them."""

from __future__ import annotations

from pathlib import Path

from llm_features.config import validate_config
from llm_features.ingest.attributes import check_declared
from llm_features.ingest.config import IngestConfig
from llm_features.ingest.errors import IngestError
from llm_features.ingest.generic import load_generic
from llm_features.ingest.generic_columns import parse_mapping
from llm_features.ingest.labels import parse_label_rule
from llm_features.ingest.movielens import load_movielens
from llm_features.ingest.readers import Loaded, TimeBounds, canonical_encoding, check_delimiter
from llm_features.ingest.split import parse_ratios


def detect_format(cfg: IngestConfig) -> str:
    """The concrete format: MovieLens by its file names, else generic."""
    if cfg.format != "auto":
        return cfg.format
    if cfg.source is not None:
        src = Path(cfg.source)
        if not src.exists():
            raise IngestError(
                "source directory not found",
                file=src,
                fix="Point --source at a MovieLens directory (ml-1m or ml-100k).",
            )
        if (src / "ratings.dat").is_file():
            return "ml-1m"
        if (src / "u.data").is_file():
            return "ml-100k"
        if not cfg.interactions:
            raise IngestError(
                "neither ratings.dat (ML-1M) nor u.data (ML-100K) is in this directory",
                file=src,
                fix="Point --source at a MovieLens directory, or pass --format generic --interactions FILE.",
            )
    names = {Path(p).name for p in cfg.interactions}
    if names == {"ratings.dat"}:
        return "ml-1m"
    if names == {"u.data"}:
        return "ml-100k"
    if not cfg.interactions:
        raise IngestError(
            "no input given",
            fix="Pass --source DIR (MovieLens) or --interactions FILE (generic CSV/parquet).",
        )
    return "generic"


def check_options(cfg: IngestConfig) -> TimeBounds:
    """Every option checked before any input is read or anything written (the Python API included);
    returns the accepted event-time range."""
    validate_config(cfg)
    parse_ratios(cfg.split_ratios)
    if cfg.label_column is None:
        parse_label_rule(cfg.label_rule)
    parse_mapping(cfg.map)
    check_declared(cfg.user_attribute, cfg.item_attribute)
    if cfg.encoding is not None:
        canonical_encoding(cfg.encoding)
    check_delimiter(cfg.delimiter)
    return TimeBounds.make(cfg.min_timestamp, cfg.allow_future)


def load(cfg: IngestConfig, fmt: str | None = None, time_bounds: TimeBounds | None = None) -> Loaded:
    """Read the inputs with the adapter of ``fmt`` (detected when None)."""
    fmt = fmt or detect_format(cfg)
    bounds = time_bounds or TimeBounds.make(cfg.min_timestamp, cfg.allow_future)
    src = Path(cfg.source) if cfg.source is not None else None
    if (cfg.user_attribute or cfg.item_attribute) and fmt != "generic":
        raise IngestError(
            f"--user-attribute and --item-attribute are for generic data; {fmt} declares its own attributes",
            option="--user-attribute" if cfg.user_attribute else "--item-attribute",
            fix="Drop them, or ingest the files with --format generic.",
        )
    if fmt in ("ml-1m", "ml-100k"):
        return load_movielens(
            fmt, src, interactions=cfg.interactions, items=cfg.items, users=cfg.users, encoding=cfg.encoding,
            time_bounds=bounds,
        )
    return load_generic(
        cfg.interactions,
        items=cfg.items,
        users=cfg.users,
        mapping=parse_mapping(cfg.map),
        item_text_column=cfg.item_text_column,
        behavior_text_column=cfg.behavior_text_column,
        label_column=cfg.label_column,
        timestamp_unit=cfg.timestamp_unit,
        encoding=cfg.encoding,
        delimiter=cfg.delimiter,
        hash_ids=cfg.hash_ids,
        time_bounds=bounds,
        user_attributes=cfg.user_attribute,
        item_attributes=cfg.item_attribute,
        infer_attributes=cfg.infer_attributes,
    )
