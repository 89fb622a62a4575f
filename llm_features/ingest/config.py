"""The options of ``llmfeat ingest``: one dataclass, shared by the CLI, a config file and the Python call."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from llm_features.config import data_dir_field
from llm_features.ingest.readers import DEFAULT_MIN_TIMESTAMP


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
    data_dir: Path | None = data_dir_field()

    def __post_init__(self) -> None:  # config files give strings
        self.interactions = tuple(Path(p) for p in self.interactions)
        self.map = tuple(self.map)
        self.user_attribute = tuple(self.user_attribute)
        self.item_attribute = tuple(self.item_attribute)
        for name in ("source", "items", "users", "data_dir"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, Path):
                setattr(self, name, Path(v))

