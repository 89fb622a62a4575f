"""User and item attributes: the columns the profile views and the ranker's attribute features come from.

An attribute is one column of ``canonical/users.parquet`` or ``canonical/items.parquet`` with a kind:

* ``categorical``: one value per row (text, or an integer code) -> one sparse feature of the ranker
  (an embedding table); ``prefix=N`` keeps only the first N characters (zip or postal codes);
* ``multi``: a list of values per row (``list<string>``, e.g. genres or tags) -> one mean-pooled bag;
* ``numeric``: a number -> one dense input of the ranker, standardised on the train split.

Where they come from (``llmfeat ingest``): a format declares its own (MovieLens: gender, age,
occupation, zip and genres), a user declares them (``--user-attribute`` / ``--item-attribute``),
or ingest infers them from the user and item tables. Ingest records the list in the tables' parquet
metadata (:data:`METADATA_KEY`) and in ``ingest_report.json``, and prints it. ``feast_repo`` builds
the ``user_profile`` / ``item_profile`` views from that record, each field tagged with its kind
(:meth:`Attribute.tags`); the ranker builds its features from the tags of its feature service's
fields (:func:`attributes_of_fields`) and stores the list in its checkpoint, so serving rebuilds the
same model.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from typing import Any, Iterable

KINDS = ("categorical", "multi", "numeric")
ENTITIES = ("user", "item")
METADATA_KEY = "llmfeat.attributes"
TAG_KIND = "llmfeat_attribute"  # Feast field tag: the attribute's kind
TAG_PREFIX = "llmfeat_prefix"  # Feast field tag: categorical prefix length
TAG_ENTITY = "llmfeat_entity"

NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Column names of the canonical tables, Feast views and ranker inputs that an attribute may not take
# (feature names are global across the views).
RESERVED = frozenset({
    "user_id", "item_id", "behavior_id", "event_timestamp", "created", "label", "rating", "split",
    "item_text", "behavior_text", "title", "genres", "release_date",
    "recent_behavior_ids", "recent_item_ids", "recent_labels",
    "user_embedding", "item_embedding", "behavior_embedding",
})


@dataclass(frozen=True)
class Attribute:
    """One attribute column.

    Attributes:
        name: the column in the canonical table, the Feast feature name and (see
            :attr:`feature_name`) the ranker's feature name.
        kind: ``categorical``, ``multi`` or ``numeric``.
        entity: ``user`` or ``item`` (``""`` when unknown, e.g. inferred from a feature frame).
        prefix: categorical only: use the first ``prefix`` characters as the category.
        sep: multi only: the separator the values were split on (for display).
        source: the source column it was read from.
        origin: ``format`` (the input format's own), ``declared``, ``canonical name`` (a generic
            column named like a MovieLens attribute: gender, age, occupation, zip, genres) or
            ``inferred``.
    """

    name: str
    kind: str
    entity: str = ""
    prefix: int | None = None
    sep: str | None = None
    source: str | None = None
    origin: str = "declared"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"attribute {self.name!r}: kind must be one of {', '.join(KINDS)}, "
                             f"got {self.kind!r}")

    @property
    def feature_name(self) -> str:
        """The ranker's sparse-feature key: the name, or ``<name>_prefix`` for a prefix category."""
        return f"{self.name}_prefix" if self.prefix else self.name

    def describe(self) -> str:
        """``zip (categorical, first 2 characters, declared)``."""
        bits = [self.kind]
        if self.prefix:
            bits.append(f"first {self.prefix} characters")
        if self.sep:
            bits.append(f"split on {self.sep!r}")
        if self.source and self.source != self.name:
            bits.append(f"from column {self.source!r}")
        bits.append(self.origin)
        return f"{self.name} ({', '.join(bits)})"

    def tags(self) -> dict[str, str]:
        """The tags of its Feast field (what the ranker reads back)."""
        tags = {TAG_KIND: self.kind}
        if self.entity:
            tags[TAG_ENTITY] = self.entity
        if self.prefix:
            tags[TAG_PREFIX] = str(self.prefix)
        return tags

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Attribute":
        known = {"name", "kind", "entity", "prefix", "sep", "source", "origin"}
        return cls(**{k: v for k, v in d.items() if k in known})


def to_json(attributes: Iterable[Attribute]) -> str:
    return json.dumps([a.to_dict() for a in attributes])


def from_json(text: str | bytes) -> list[Attribute]:
    return [Attribute.from_dict(d) for d in json.loads(text)]


def metadata(attributes: Iterable[Attribute]) -> dict[str, str]:
    """Parquet metadata recording the attribute list of a canonical table."""
    return {METADATA_KEY: to_json(attributes)}


# The attributes of tables written before ingest recorded them: the only attribute columns it wrote
# then (the MovieLens adapters, and the generic adapter's --map gender/age/occupation/zip/genres).
LEGACY = {
    "user": (
        Attribute("gender", "categorical", "user", origin="format"),
        Attribute("age", "categorical", "user", origin="format"),
        Attribute("occupation", "categorical", "user", origin="format"),
        Attribute("zip", "categorical", "user", prefix=2, origin="format"),
    ),
    "item": (Attribute("item_genres", "multi", "item", sep="|", origin="format"),),
}


def read_attributes(schema, entity: str) -> list[Attribute]:
    """The attributes recorded in a canonical table's parquet schema (``pyarrow.Schema``).

    Only columns the table has are returned. A table without the record (written before ingest
    recorded attributes) gets :data:`LEGACY`, the only attribute columns such a table can hold.
    """
    meta = schema.metadata or {}
    raw = meta.get(METADATA_KEY.encode())
    attrs = from_json(raw) if raw is not None else list(LEGACY[entity])
    return [a for a in attrs if a.name in schema.names]


def attributes_of_fields(fields: Iterable[Any], entity: str = "") -> list[Attribute]:
    """The attributes among Feast fields (those tagged with :data:`TAG_KIND`)."""
    out = []
    for f in fields:
        tags = dict(getattr(f, "tags", None) or {})
        kind = tags.get(TAG_KIND)
        if kind not in KINDS:
            continue
        prefix = int(tags[TAG_PREFIX]) if tags.get(TAG_PREFIX) else None
        out.append(Attribute(f.name, kind, tags.get(TAG_ENTITY, entity), prefix=prefix, origin="feast"))
    return out


def summary(attributes: Iterable[Attribute]) -> str:
    attrs = list(attributes)
    return ", ".join(a.describe() for a in attrs) if attrs else "none"
