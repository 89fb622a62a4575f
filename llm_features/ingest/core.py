"""``llmfeat ingest``: source files to the canonical tables, the split and the recent-behaviour table."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from llm_features.atomic import write_json
from llm_features.config import validate_config
from llm_features.ids import stable_id
from llm_features import attributes as attributes_mod
from llm_features.attributes import Attribute
from llm_features.ingest.attributes import check_declared
from llm_features.ingest.errors import IngestError
from llm_features.ingest.generic import load_generic, parse_mapping
from llm_features.ingest.movielens import load_ml1m, load_ml100k
from llm_features.ingest.readers import (
    DEFAULT_MIN_TIMESTAMP,
    Loaded,
    SourceFile,
    TimeBounds,
    canonical_encoding,
    check_delimiter,
)
from llm_features.ingest.split import SPLIT_CODES, SPLITS, SplitBoundaries, iso_us, parse_ratios
from llm_features.parquet_io import utc_us, write_table_atomic
from llm_features.workspace import Workspace

log = logging.getLogger(__name__)

INGEST_VERSION = 1
REPORT_NAME = "ingest_report.json"
METADATA_KEY = "llmfeat.ingest"

INTERACTIONS_SCHEMA = pa.schema(
    [
        ("user_id", pa.int64()),
        ("item_id", pa.int64()),
        ("event_timestamp", pa.timestamp("us", tz="UTC")),
        ("behavior_id", pa.int64()),
        ("behavior_text", pa.string()),
        ("label", pa.int8()),
        ("rating", pa.float32()),
        ("split", pa.string()),
    ]
)


@dataclass
class IngestConfig:
    """Options of ``llmfeat ingest`` (and of :func:`ingest`)."""

    source: Path | None = field(
        default=None,
        metadata={
            "help": "MovieLens directory (ml-1m: ratings.dat/movies.dat/users.dat, "
            "ml-100k: u.data/u.item/u.user)."
        },
    )
    format: Literal["auto", "ml-1m", "ml-100k", "generic"] = field(
        default="auto", metadata={"help": "Input format; auto detects MovieLens from --source, else generic."}
    )
    interactions: tuple[Path, ...] = field(
        default=(),
        metadata={
            "help": "Interaction log file(s): CSV/TSV/parquet for generic (repeat for several); "
            "for MovieLens "
            "it replaces the ratings file."
        },
    )
    items: Path | None = field(
        default=None, metadata={"help": "Item table (generic) or movies file (MovieLens)."}
    )
    users: Path | None = field(
        default=None, metadata={"help": "User table (generic) or users file (MovieLens)."}
    )
    map: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "Generic column mapping CANONICAL=SOURCE, repeatable, e.g. --map user_id=uid --map "
            "event_timestamp=ts. Canonical: user_id item_id event_timestamp rating label behavior_text "
            "item_text title genres gender age occupation zip."
        },
    )
    item_text_column: str | None = field(
        default=None,
        metadata={
            "help": "Generic: column(s) holding the item text "
            "(comma-separated columns are joined with ' | ')."
        },
    )
    user_attribute: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "Generic: a user attribute to keep, [NAME=]COLUMN[:TYPE], repeatable; TYPE: categorical[:N] "
            "(N: keep the first N characters), multi[:SEP] (a list, '|'-separated by default), numeric, or "
            "none (inferred). Read from --users, else from the log (one value per user). Declaring any "
            "turns inference off for the user table."
        },
    )
    item_attribute: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "Generic: an item attribute (category, tags, price...) to keep, as --user-attribute; read "
            "from --items, else from the log (one value per item)."
        },
    )
    infer_attributes: bool = field(
        default=True,
        metadata={
            "help": "Generic: keep every other column of --users / --items (for a table with no declared "
            "attribute) as an attribute of the kind its values show: lists and '|'-separated text multi, other "
            "text categorical, integers with few values categorical, other numbers numeric; identifiers "
            "and free text are skipped. Ingest prints what it kept."
        },
    )
    behavior_text_column: str | None = field(
        default=None,
        metadata={"help": "Generic: interaction column holding the behaviour text (default: the item text)."},
    )
    label_rule: str = field(
        default="rating>3", metadata={"help": "Label = 1 where COLUMN OP NUMBER holds (OP: > >= == != < <=)."}
    )
    label_column: str | None = field(
        default=None, metadata={"help": "Interaction column holding a 0/1 label (overrides --label-rule)."}
    )
    timestamp_unit: Literal["auto", "s", "ms", "us", "ns", "iso"] = field(
        default="auto",
        metadata={
            "help": "Generic timestamps: epoch unit, or iso. auto: epoch numbers in the unit their magnitude "
            "shows (< 1e11 s, < 1e14 ms, < 1e17 us, else ns; a column mixing units is an error), "
            "anything else ISO 8601 (naive = UTC)."
        },
    )
    min_timestamp: str = field(
        default=DEFAULT_MIN_TIMESTAMP,
        metadata={
            "help": "Earliest plausible event time (ISO 8601 date or time, naive = UTC); earlier, zero and "
            "negative timestamps are an error."
        },
    )
    allow_future: bool = field(
        default=False,
        metadata={
            "help": "Accept event times after now + 1 day (refused by default: future rows would become "
            "the online values)."
        },
    )
    encoding: str | None = field(
        default=None,
        metadata={"help": "Text encoding of the inputs (default: latin-1 for MovieLens, utf-8 for generic)."},
    )
    delimiter: str | None = field(
        default=None,
        metadata={"help": "Generic CSV delimiter, one character ('\\t' or tab for a tab; default: ',', "
                  "or tab for .tsv)."},
    )
    hash_ids: bool = field(
        default=False,
        metadata={
            "help": "Generic: map each user/item id's text to a stable 63-bit id (blake2b of "
            "'user:<id>' / 'item:<id>', NFKC-normalised) instead of requiring integers within int64; "
            "two ids with the same hash are an error."
        },
    )
    drop_unknown_items: bool = field(
        default=False,
        metadata={
            "help": "Drop (and count) interactions whose item is not in the item table, instead of failing."
        },
    )
    split_ratios: str = field(
        default="0.8,0.1,0.1",
        metadata={
            "help": "Train/valid/test fractions over the global time order (recorded once in split.json); "
            "each must be > 0."
        },
    )
    resplit: bool = field(
        default=False,
        metadata={"help": "Recompute the split boundaries even if split.json already records them."},
    )
    recent_n: int = field(
        default=30, metadata={"help": "Length of user_recent_behaviors lists.", "min": 1, "max": 10_000}
    )
    recent_cadence: Literal["event", "day", "none"] = field(
        default="event",
        metadata={
            "help": "user_recent_behaviors rows per user: each interaction time, each active day, or none."
        },
    )
    force: bool = field(default=False, metadata={"help": "Redo the ingest even if the inputs are unchanged."})
    data_dir: Path | None = field(
        default=None,
        metadata={"help": "Workspace data directory (default: $LLMFEAT_DATA_DIR or feast_repo/data)."},
    )

    def __post_init__(self) -> None:  # config files give strings
        self.interactions = tuple(Path(p) for p in self.interactions)
        self.map = tuple(self.map)
        self.user_attribute = tuple(self.user_attribute)
        self.item_attribute = tuple(self.item_attribute)
        for name in ("source", "items", "users", "data_dir"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, Path):
                setattr(self, name, Path(v))


# ----------------------------------------------------------------------------- formats and inputs


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


def _input_paths(cfg: IngestConfig, fmt: str) -> list[Path]:
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
    if fmt == "ml-1m":
        return load_ml1m(
            src, interactions=cfg.interactions, items=cfg.items, users=cfg.users, encoding=cfg.encoding,
            time_bounds=bounds,
        )
    if fmt == "ml-100k":
        return load_ml100k(
            src, interactions=cfg.interactions, items=cfg.items, users=cfg.users, encoding=cfg.encoding,
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


# ----------------------------------------------------------------------------- checks and labels

_RULE = re.compile(r"^\s*([A-Za-z_][\w .-]*?)\s*(>=|<=|==|!=|>|<)\s*(-?\d+(?:\.\d*)?|-?\.\d+)\s*$")
_OPS = {
    ">": np.greater,
    ">=": np.greater_equal,
    "==": np.equal,
    "!=": np.not_equal,
    "<": np.less,
    "<=": np.less_equal,
}


def parse_label_rule(rule: str) -> tuple[str, str, float]:
    """``"rating>3"`` to ``("rating", ">", 3.0)``."""
    m = _RULE.match(rule)
    if not m:
        raise IngestError(
            f"--label-rule {rule!r} is not COLUMN OP NUMBER",
            fix="For example --label-rule 'rating>3' (OP: > >= == != < <=), or use --label-column.",
        )
    return m.group(1).strip(), m.group(2), float(m.group(3))


def _where(loaded: Loaded, frame: pd.DataFrame, i: int) -> tuple[SourceFile, int]:
    return loaded.sources[int(frame["_src"].iloc[i])], int(frame["_line"].iloc[i])


def _apply_label(loaded: Loaded, inter: pd.DataFrame, cfg: IngestConfig) -> str:
    if "label" in inter.columns:
        return f"column {cfg.label_column or (loaded.column_names or {}).get('label', 'label')}"
    col, op, thr = parse_label_rule(cfg.label_rule)
    names = loaded.column_names or {}
    canon = (
        col if col in ("rating",) else next((k for k, v in names.items() if v == col and k == "rating"), None)
    )
    if canon != "rating":
        raise IngestError(
            f"--label-rule {cfg.label_rule!r} refers to '{col}', but only the rating can be thresholded",
            fix="Write the rule on rating (e.g. 'rating>3'), map the column with "
            "--map rating=COLUMN, or give a 0/1 column with --label-column.",
        )
    rating = inter["rating"].to_numpy(dtype=np.float64)
    missing = np.isnan(rating)
    if missing.all():
        raise IngestError(
            "there is no rating to apply the label rule to",
            file=loaded.sources[0].path,
            fix="Map a rating column with --map rating=COLUMN, or give a 0/1 --label-column.",
        )
    if missing.any():
        i = int(np.flatnonzero(missing)[0])
        src, line = _where(loaded, inter, i)
        raise src.error(
            f"empty rating, so --label-rule {cfg.label_rule!r} cannot label the row "
            f"({int(missing.sum())} rows in all)",
            line=line,
            column=names.get("rating", "rating"),
            fix="Fill in the rating, or give a 0/1 --label-column.",
        )
    inter["label"] = _OPS[op](rating, thr).astype(np.int8)
    return f"rule {col}{op}{thr:g}"


def _check_both_labels(inter: pd.DataFrame, label_source: str, cfg: IngestConfig) -> None:
    """Every model llmfeat trains is a click-through model: a log with one label only cannot train it."""
    labels = inter["label"].to_numpy()
    if len(labels) and labels.min() == labels.max():
        which = "1 (positive)" if labels[0] == 1 else "0 (negative)"
        raise IngestError(
            f"every interaction is labelled {which} by the {label_source}; llmfeat trains click-through "
            "models, which need both labels",
            option="--label-column" if cfg.label_column else "--label-rule",
            fix="Ingest the impressions that were not clicked too (a 0/1 --label-column), or ratings with a "
                "--label-rule that splits them; logs of positives only are not supported.",
        )


def _check_unique(src: SourceFile | None, frame: pd.DataFrame, key: str, what: str) -> None:
    dup = frame.duplicated(key, keep=False).to_numpy()
    if dup.any():
        sub = frame[dup]
        first = sub[key].iloc[0]
        lines = sub.loc[sub[key] == first, "_line"].tolist()[:2]
        word = src.row_word if src else "line"
        raise IngestError(
            f"{what} {first} is listed more than once ({word}s {lines[0]} and {lines[1]})",
            file=src.path if src else None,
            column=key,
            fix=f"Keep one row per {what}.",
        )


def _dedupe(loaded: Loaded, inter: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Drop exact duplicate (user, item, timestamp) rows; refuse conflicting ones."""
    key = ["user_id", "item_id", "ts_us"]
    dup = inter.duplicated(key, keep=False).to_numpy()
    if not dup.any():
        return inter, 0
    sub = inter[dup].sort_values(key + ["_src", "_line"], kind="stable")
    values = [c for c in ("rating", "label", "behavior_text") if c in sub.columns]
    first = sub.groupby(key, sort=False)[values].transform("first")
    same = np.ones(len(sub), dtype=bool)
    for c in values:
        a, b = sub[c], first[c]
        same &= ((a == b) | (a.isna() & b.isna())).to_numpy()
    if not same.all():
        j = int(np.flatnonzero(~same)[0])
        row = sub.iloc[j]
        other = sub[
            (sub["user_id"] == row["user_id"])
            & (sub["item_id"] == row["item_id"])
            & (sub["ts_us"] == row["ts_us"])
        ].iloc[0]
        col = next(c for c in values if not (other[c] == row[c] or (pd.isna(other[c]) and pd.isna(row[c]))))
        s1, s2 = loaded.sources[int(other["_src"])], loaded.sources[int(row["_src"])]
        where2 = (
            f"{s2.row_word} {int(row['_line'])}"
            if s2 is s1
            else f"{s2.path}, {s2.row_word} {int(row['_line'])}"
        )
        raise IngestError(
            f"conflicting duplicates: {s1.row_word} {int(other['_line'])} and {where2} are both user "
            f"{int(row['user_id'])}, item {int(row['item_id'])} at {iso_us(int(row['ts_us']))} "
            f"but their {col} "
            f"differs ({other[col]!r} vs {row[col]!r})",
            file=s1.path,
            column=(loaded.column_names or {}).get(col, col),
            fix="Remove the wrong row (exact duplicates are dropped and counted; "
            "conflicting ones are not guessed).",
        )
    drop = inter.duplicated(key, keep="first").to_numpy()
    return inter[~drop].reset_index(drop=True), int(drop.sum())


def _unknown_items(
    loaded: Loaded, inter: pd.DataFrame, items: pd.DataFrame, drop: bool
) -> tuple[pd.DataFrame, int]:
    unknown = ~inter["item_id"].isin(items["item_id"]).to_numpy()
    if not unknown.any():
        return inter, 0
    if drop:
        return inter[~unknown].reset_index(drop=True), int(unknown.sum())
    i = int(np.flatnonzero(unknown)[0])
    src, line = _where(loaded, inter, i)
    n_items = len(np.unique(inter["item_id"].to_numpy()[unknown]))
    items_file = loaded.items_src.path if loaded.items_src else "the item table"
    raise src.error(
        f"item {int(inter['item_id'].iloc[i])} is not in {items_file} ({int(unknown.sum())} rows, "
        f"{n_items} unknown items in all)",
        line=line,
        column=(loaded.column_names or {}).get("item_id", "item_id"),
        fix="Add the items to the item table, or pass --drop-unknown-items to drop those rows "
        "(they are counted in ingest_report.json).",
    )


# ----------------------------------------------------------------------------- the pipeline


@dataclass
class Canonical:
    """The three canonical tables as arrow tables, plus the split and counts."""

    interactions: pa.Table
    items: pa.Table
    users: pa.Table
    split: SplitBoundaries
    split_counts: dict[str, int]
    counts: dict[str, int]
    label_source: str


def _degenerate(codes: np.ndarray) -> bool:
    return bool((codes == 0).sum() == 0 or (codes > 0).sum() == 0)


def build_canonical(
    loaded: Loaded, cfg: IngestConfig, split: SplitBoundaries | None, split_path: Path | None = None
) -> Canonical:
    """Validate, label, dedupe, sort and split; ``split=None`` computes fresh boundaries."""
    inter = loaded.interactions
    items = loaded.items
    if len(inter) == 0:
        raise IngestError(
            "no interactions", file=loaded.sources[0].path, fix="Give a non-empty interaction log."
        )
    if items is None:
        raise IngestError("no item table", fix="Pass --items FILE or --item-text-column.")
    _check_unique(loaded.items_src, items, "item_id", "item")
    if loaded.users is not None:
        _check_unique(loaded.users_src, loaded.users, "user_id", "user")
    rows_read = len(inter)
    inter, n_unknown = _unknown_items(loaded, inter, items, cfg.drop_unknown_items)
    if len(inter) == 0:
        raise IngestError(
            "every interaction refers to an unknown item", fix="Check --items and the item ids."
        )
    if "behavior_text" not in inter.columns:
        text_of = pd.Series(items["item_text"].to_numpy(), index=items["item_id"].to_numpy())
        inter["behavior_text"] = text_of.reindex(inter["item_id"].to_numpy()).to_numpy()
    label_source = _apply_label(loaded, inter, cfg)
    _check_both_labels(inter, label_source, cfg)
    inter, n_dups = _dedupe(loaded, inter)

    order = np.lexsort((inter["item_id"].to_numpy(), inter["user_id"].to_numpy(), inter["ts_us"].to_numpy()))
    inter = inter.iloc[order].reset_index(drop=True)
    ts = inter["ts_us"].to_numpy(dtype=np.int64)
    codes, uniq = pd.factorize(inter["behavior_text"], sort=False)
    behavior_id = np.array([stable_id(t) for t in uniq], dtype=np.int64)[codes]
    ratios = parse_ratios(cfg.split_ratios)
    fresh = SplitBoundaries.compute(ts, ratios)
    if split is None:
        split = fresh
    split_codes = split.assign(ts)
    if split is not fresh and _degenerate(split_codes) and not _degenerate(fresh.assign(ts)):
        raise IngestError(
            f"the recorded split (valid from {iso_us(split.valid_start_us)}, "
            f"test from {iso_us(split.test_start_us)}) leaves "
            f"{'no training' if (split_codes == SPLIT_CODES['train']).sum() == 0 else 'no validation or test'} rows in this "
            f"data ({iso_us(int(ts.min()))} to {iso_us(int(ts.max()))}): "
            "is this workspace for another dataset?",
            file=split_path,
            fix="Use a fresh --data-dir, or pass --resplit to record new boundaries.",
        )
    split_counts = {name: int((split_codes == code).sum()) for name, code in SPLIT_CODES.items()}
    rating = inter["rating"].to_numpy(dtype=np.float32)
    interactions = pa.Table.from_arrays(
        [
            pa.array(inter["user_id"].to_numpy(np.int64)),
            pa.array(inter["item_id"].to_numpy(np.int64)),
            utc_us(pa.array(ts)),
            pa.array(behavior_id),
            pa.DictionaryArray.from_arrays(
                pa.array(codes.astype(np.int32)), pa.array(uniq.to_numpy(dtype=object), pa.string())
            ).cast(pa.string()),
            pa.array(inter["label"].to_numpy(np.int8)),
            pa.array(rating, mask=np.isnan(rating)),
            pa.DictionaryArray.from_arrays(
                pa.array(split_codes.astype(np.int32)), pa.array(list(SPLITS))
            ).cast(pa.string()),
        ],
        schema=INTERACTIONS_SCHEMA,
    )

    t0 = int(ts.min())
    first_item = inter.groupby("item_id", sort=False)["ts_us"].min()
    items = items.sort_values("item_id").reset_index(drop=True)
    item_ts = first_item.reindex(items["item_id"].to_numpy()).fillna(t0).to_numpy(dtype=np.int64)
    attrs = loaded.attributes or {"user": [], "item": []}
    item_cols: dict[str, pa.Array] = {
        "item_id": pa.array(items["item_id"].to_numpy(np.int64)),
        "item_text": pa.array(items["item_text"].astype(str).tolist(), pa.string()),
    }
    if "title" in items.columns:
        item_cols["title"] = pa.array(items["title"].astype("string").tolist(), pa.string())
    if any(a.name == "item_genres" for a in attrs["item"]):  # also joined, as ingest always wrote it
        item_cols["genres"] = pa.array(["|".join(g) for g in items["item_genres"]], pa.string())
    for a in attrs["item"]:
        item_cols[a.name] = _attribute_array(items[a.name], a)
    if "release_date" in items.columns:
        item_cols["release_date"] = pa.array(items["release_date"].astype("string").tolist(), pa.string())
    item_cols["event_timestamp"] = utc_us(pa.array(item_ts))
    items_table = pa.table(item_cols).replace_schema_metadata(attributes_mod.metadata(attrs["item"]))

    first_user = inter.groupby("user_id", sort=True)["ts_us"].min()
    if loaded.users is not None:
        users = loaded.users.drop(columns=["_line"]).set_index("user_id")
        all_ids = np.union1d(users.index.to_numpy(np.int64), first_user.index.to_numpy(np.int64))
        users = users.reindex(all_ids)
        without_profile = int(
            (~np.isin(first_user.index.to_numpy(), loaded.users["user_id"].to_numpy())).sum()
        )
    else:
        all_ids = first_user.index.to_numpy(np.int64)
        users = pd.DataFrame(index=all_ids)
        without_profile = len(all_ids)
    user_cols: dict[str, pa.Array] = {
        "user_id": pa.array(all_ids, pa.int64()),
        "event_timestamp": utc_us(pa.array(first_user.reindex(all_ids).fillna(t0).to_numpy(dtype=np.int64))),
    }
    for a in attrs["user"]:
        user_cols[a.name] = _attribute_array(users[a.name], a)
    users_table = pa.table(user_cols).replace_schema_metadata(attributes_mod.metadata(attrs["user"]))

    counts = {
        "rows_read": rows_read,
        "blank_lines_skipped": int(sum((loaded.blank_lines or {}).values())),
        "unknown_item_rows_dropped": n_unknown,
        "exact_duplicates_dropped": n_dups,
        "interactions": interactions.num_rows,
        "items": items_table.num_rows,
        "items_without_interactions": int(len(items) - len(first_item)),
        "users": users_table.num_rows,
        "users_with_interactions": int(len(first_user)),
        "users_without_profile": without_profile,
        "distinct_behaviors": int(len(uniq)),
        "positives": int(inter["label"].sum()),
    }
    return Canonical(interactions, items_table, users_table, split, split_counts, counts, label_source)


def _attribute_array(col: pd.Series, a: Attribute) -> pa.Array:
    """An attribute column for the canonical table: list<string>, float64, int64 or string (null = missing)."""
    if a.kind == "multi":
        return pa.array([list(v) if isinstance(v, (list, tuple, np.ndarray)) else [] for v in col],
                        pa.list_(pa.string()))
    if a.kind == "numeric":
        return pa.array([None if pd.isna(v) else float(v) for v in col], pa.float64())
    if pd.api.types.is_numeric_dtype(col.dtype) and not pd.api.types.is_bool_dtype(col.dtype):
        return pa.array([None if pd.isna(v) else int(v) for v in col], pa.int64())
    return pa.array([None if v is None or v is pd.NA or (isinstance(v, float) and np.isnan(v)) else str(v)
                     for v in col], pa.string())


def _attribute_report(canon: "Canonical", loaded: Loaded) -> dict[str, Any]:
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


def read_report(ws: Workspace) -> dict[str, Any] | None:
    path = ws.canonical / REPORT_NAME
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _outputs_present(ws: Workspace, report: dict[str, Any]) -> bool:
    paths = [ws.interactions, ws.items, ws.users, ws.split]
    paths += [Path(p) for p in report.get("recent", {}).get("parts", [])]
    return all(p.exists() for p in paths)


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
    previous = read_report(ws)
    if (
        not cfg.force
        and previous is not None
        and previous.get("input_fingerprint") == fingerprint
        and _outputs_present(ws, previous)
    ):
        log.debug("ingest: inputs unchanged since %s; nothing to do", previous.get("written_at"))
        return {**previous, "skipped": True}

    loaded = load(cfg, fmt, bounds)
    ratios = parse_ratios(cfg.split_ratios)
    recorded: SplitBoundaries | None = None
    split_payload: dict[str, Any] | None = None
    if ws.split.exists() and not cfg.resplit:
        recorded = SplitBoundaries.from_json(ws.split)
        if not np.allclose(recorded.ratios, ratios):
            raise IngestError(
                f"the recorded split has ratios {list(recorded.ratios)} but --split-ratios is {list(ratios)}",
                file=ws.split,
                fix="Keep the recorded ratios, or pass --resplit to record new boundaries.",
            )
        split_payload = json.loads(ws.split.read_text())
    canon = build_canonical(loaded, cfg, recorded, ws.split)

    now = datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")
    meta = {METADATA_KEY: json.dumps({"format": fmt, "input_fingerprint": fingerprint})}
    write_table_atomic(canon.interactions, ws.interactions, meta)
    write_table_atomic(canon.items, ws.items, meta)
    write_table_atomic(canon.users, ws.users, meta)
    if split_payload is None:
        split_payload = canon.split.to_json(canon.split_counts, now, canon.interactions.num_rows)
    split_payload["counts"] = canon.split_counts
    write_json(ws.split, split_payload, sort_keys=False)

    recent: dict[str, Any] = {"cadence": cfg.recent_cadence, "n": cfg.recent_n, "parts": []}
    if cfg.recent_cadence != "none":
        from llm_features.recent import write_recent_behaviors

        rec_in = canon.interactions.select(["user_id", "item_id", "event_timestamp", "behavior_id", "label"])
        parts = write_recent_behaviors(ws, rec_in, n=cfg.recent_n, cadence=cfg.recent_cadence)
        recent["parts"] = [str(p) for p in parts]

    n = canon.interactions.num_rows
    blank = {str(Path(k).resolve()): v for k, v in (loaded.blank_lines or {}).items()}
    report: dict[str, Any] = {
        "version": INGEST_VERSION,
        "format": fmt,
        "input_fingerprint": fingerprint,
        "inputs": [{**f, "blank_lines": blank.get(f["path"])} for f in files],
        "counts": canon.counts,
        "label": {"source": canon.label_source, "positive_rate": round(canon.counts["positives"] / n, 6)},
        "split": {k: split_payload[k] for k in ("ratios", "valid_start", "test_start", "counts")}
        | {"reused": recorded is not None},
        "time_range": [
            iso_us(int(pc))
            for pc in (
                canon.interactions.column("event_timestamp").cast(pa.int64()).to_numpy().min(),
                canon.interactions.column("event_timestamp").cast(pa.int64()).to_numpy().max(),
            )
        ],
        "recent": recent,
        "attributes": _attribute_report(canon, loaded),
        "outputs": {
            "interactions": str(ws.interactions),
            "items": str(ws.items),
            "users": str(ws.users),
            "split": str(ws.split),
        },
        "seconds": round(time.perf_counter() - started, 3),
        "written_at": now,
        "skipped": False,
    }
    write_json(ws.canonical / REPORT_NAME, report, sort_keys=False)
    from llm_features.feast_sources import prepare_sources

    prepare_sources(ws)  # schema-only stand-ins, so `feast apply` / `materialize` can read every view
    return report


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
    lines.append(f"  report: {Path(report['outputs']['interactions']).parent / REPORT_NAME}")
    return "\n".join(lines)
