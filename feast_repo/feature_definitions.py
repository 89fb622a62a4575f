"""Feast definitions for llmfeat: entities, feature views over the workspace tables, feature services.

Every source reads the data directory (``$LLMFEAT_DATA_DIR``, default ``feast_repo/data``) through
ABSOLUTE paths: DuckDB resolves relative FileSource paths against the process CWD, not the repo.
The source class follows the configured offline store: ``FileSource`` for DuckDB (the default),
``SparkSource`` for ``offline_store: {type: spark}``, with the same names, paths, timestamp field
and schemas (``llm_features.offline_sources``), so switching the yaml needs no edit here.
Embedding views read part-file DIRECTORIES (``parquet_io.write_part`` appends parts there), so a new
encode run needs no new `feast apply`.

The module only declares: importing it reads the data dir (table schemas, the model fingerprint)
and never creates a directory or writes a file. A table a stage has not written yet (``user_embeddings/``
before the finetune stage, everything before ingest) is read through a schema-only placeholder that
the llmfeat writers put there (``llm_features.feast_sources.prepare_sources``: ``llmfeat ingest``,
``llmfeat feast apply``/``materialize``), since neither DuckDB nor Spark can read an empty directory.

The embedding views carry the model fingerprint of the workspace (``manifest.json``) as tags and
their width as ``vector_length``; ``llm_features.store.check_fingerprints`` compares both with the
part-file metadata before materialisation, so two models' embeddings are never mixed silently.
The embedding fields are not vector-indexed (``vector_index``): none of the online stores this
repository ships with serves feast's vector search (README, "Vector search").

The views that events update between batch runs (``user_embeddings``, ``user_recent_behaviors``, and
the item and atomic embedding views for items first seen in an event) take their rows from a
``PushSource`` (``<view>_push``) whose batch source is the view's part-file source: materialisation
and offline reads go through the batch source as before, and ``llm_features.events`` writes a fresh
row online through the push source and offline as a part file in the same directory.

Every entity, feature view and feature service carries an owner (``OWNER``: set it to your team's
address), a description and tags (``llmfeat_kind``, plus the fingerprint on the embedding views).
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pyarrow as pa
from feast import Entity, FeatureService, FeatureView, Field, PushSource, ValueType
from feast.data_source import DataSource
from feast.types import Array, Bool, Float32, Float64, Int32, Int64, String

from llm_features.attributes import read_attributes
from llm_features.errors import shown_as_click_error
from llm_features.feast_sources import table_path, table_schema
from llm_features.offline_sources import configured_offline_store, parquet_source, source_kind
from llm_features.workspace import Workspace, default_data_dir

REPO_DIR = Path(__file__).resolve().parent
# Who answers for these objects (feast's `owner`): put your team's address here.
OWNER = "llmfeat"

# Long enough that MovieLens-era (2000) rows join, and that `feast materialize-incremental`
# (whose first run starts at now - ttl) picks them up.
TTL = timedelta(days=36525)
DEFAULT_EMBEDDING_DIM = 384


def _embedding_dim(workspace: Workspace, fingerprint) -> int:
    if workspace.manifest.exists():
        manifest = json.loads(workspace.manifest.read_text())
        if manifest.get("embedding_dim"):
            return int(manifest["embedding_dim"])
    return fingerprint.hidden_size if fingerprint is not None else DEFAULT_EMBEDDING_DIM


# What the definitions read from the data dir, all of it here. The plain `feast` CLI imports this
# module too: a data dir it cannot read is shown there as llmfeat shows it (one or two lines, exit 1).
with shown_as_click_error():
    WORKSPACE = Workspace.at(default_data_dir(REPO_DIR))
    # FileSource for DuckDB (the default), SparkSource for the Spark offline store: the class the
    # configured offline store reads (llm_features/offline_sources.py says how the type is found).
    OFFLINE_STORE = configured_offline_store(REPO_DIR)
    source_kind(OFFLINE_STORE)  # one llmfeat declares sources for, or a clear error now
    _FINGERPRINT = WORKSPACE.read_fingerprint()
    EMBEDDING_DIM = _embedding_dim(WORKSPACE, _FINGERPRINT)
    # the attributes ingest recorded (until ingest ran: placeholders without any, so no profile view)
    _USERS_SCHEMA, _ITEMS_SCHEMA = table_schema(WORKSPACE, "users"), table_schema(WORKSPACE, "items")
    _USER_ATTRIBUTES = read_attributes(_USERS_SCHEMA, "user")
    _ITEM_ATTRIBUTES = read_attributes(_ITEMS_SCHEMA, "item")
DATA_DIR = WORKSPACE.root
# "none" until encode has written manifest.json; check_fingerprints then asks for a new `feast apply`.
EMBEDDING_TAGS = _FINGERPRINT.as_tags() if _FINGERPRINT is not None else {"llmfeat_fingerprint": "none"}


def _part_dir_source(name: str, directory: Path) -> DataSource:
    """A source over a directory of part files (``llm_features.feast_sources`` keeps it readable)."""
    return parquet_source(name, directory, OFFLINE_STORE)


def _table_source(name: str, table: str) -> DataSource:
    """A source over one canonical table (its placeholder until ingest ran)."""
    return parquet_source(name, table_path(WORKSPACE, table), OFFLINE_STORE)


def _feast_type(arrow_type: pa.DataType):
    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type):
        return String
    if pa.types.is_boolean(arrow_type):
        return Bool
    if pa.types.is_integer(arrow_type):
        return Int64
    if pa.types.is_float32(arrow_type):
        return Float32
    if pa.types.is_floating(arrow_type):
        return Float64
    if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type):
        return Array(_feast_type(arrow_type.value_type))
    raise TypeError(f"no Feast type for arrow type {arrow_type}")


def _profile_fields(schema: pa.Schema, attributes: list, extra: tuple[str, ...] = ()) -> list[Field]:
    """The attributes ingest recorded for this table (``llm_features.attributes``), typed from the table
    itself (e.g. occupation is an int code in ML-1M and a string in ML-100K) and tagged with their kind,
    which is what the ranker builds its features from; then the ``extra`` columns it has, untagged."""
    fields = [
        Field(name=a.name, dtype=_feast_type(schema.field(a.name).type), tags=a.tags(),
              description=a.describe())
        for a in attributes
    ]
    return fields + [Field(name=c, dtype=_feast_type(schema.field(c).type)) for c in extra if c in schema.names]


def _embedding_field(name: str) -> Field:
    # vector_length records the width (check_fingerprints compares it with the manifest); no
    # vector_index: no online store shipped here serves feast's vector search (README).
    return Field(name=name, dtype=Array(Float32), vector_length=EMBEDDING_DIM,
                 description=f"{EMBEDDING_DIM}-d float32 embedding of the workspace's model")


# ---------------------------------------------------------------------------------------------
# Entities

user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.INT64, owner=OWNER,
              description="A user.", tags={"llmfeat_kind": "entity"})
item = Entity(name="item", join_keys=["item_id"], value_type=ValueType.INT64, owner=OWNER,
              description="An item.", tags={"llmfeat_kind": "entity"})
behavior = Entity(
    name="behavior",
    join_keys=["behavior_id"],
    value_type=ValueType.INT64,
    owner=OWNER,
    description="An atomic behaviour: one distinct normalised behaviour text (ids.stable_id).",
    tags={"llmfeat_kind": "entity"},
)

# ---------------------------------------------------------------------------------------------
# Sources (part-file schemas: llm_features.feast_sources.PART_DIR_SCHEMAS)

atomic_behavior_embeddings_source = _part_dir_source(
    "atomic_behavior_embeddings_source", WORKSPACE.atomic_behavior_embeddings)
item_embeddings_source = _part_dir_source("item_embeddings_source", WORKSPACE.item_embeddings)
user_embeddings_source = _part_dir_source("user_embeddings_source", WORKSPACE.user_embeddings)
user_recent_behaviors_source = _part_dir_source("user_recent_behaviors_source", WORKSPACE.user_recent_behaviors)
users_source = _table_source("users_source", "users")
items_source = _table_source("items_source", "items")


def _push_source(view: str, batch_source: DataSource) -> PushSource:
    """Where fresh rows of ``view`` are pushed (``llm_features.events``): straight into the online
    store; the same row goes to ``batch_source``'s part-file directory (written by llmfeat, not by
    feast's offline write, which would rewrite the whole directory)."""
    return PushSource(name=f"{view}_push", batch_source=batch_source, owner=OWNER,
                      description=f"Fresh {view} rows pushed by `llmfeat push-events` / llm_features.events.",
                      tags={"llmfeat_kind": "push"})


# Fresh rows between batch runs (llm_features.events): a user's new embedding and recent list after
# an event, and the embeddings of an item first seen in an event. Materialisation and offline reads
# still go through each push source's batch source.
atomic_behavior_embeddings_push = _push_source("atomic_behavior_embeddings",
                                               atomic_behavior_embeddings_source)
item_embeddings_push = _push_source("item_embeddings", item_embeddings_source)
user_embeddings_push = _push_source("user_embeddings", user_embeddings_source)
user_recent_behaviors_push = _push_source("user_recent_behaviors", user_recent_behaviors_source)

# ---------------------------------------------------------------------------------------------
# Feature views (feature names are globally unique across views)


def _embedding_view(name: str, entity: Entity, level: str, source: PushSource,
                    description: str) -> FeatureView:
    """A view of one embedding per ``entity`` (feature ``<level>_embedding``), tagged with the model's fingerprint."""
    return FeatureView(
        name=name,
        entities=[entity],
        ttl=TTL,
        schema=[_embedding_field(f"{level}_embedding")],
        source=source,
        online=True,
        owner=OWNER,
        tags={"llmfeat_kind": "embedding", "llmfeat_level": level, **EMBEDDING_TAGS},
        description=description,
    )


atomic_behavior_embeddings = _embedding_view(
    "atomic_behavior_embeddings", behavior, "behavior", atomic_behavior_embeddings_push,
    "Frozen shallow-layer embedding of each distinct behaviour text (BAHE).")
item_embeddings = _embedding_view(
    "item_embeddings", item, "item", item_embeddings_push, "Shallow-layer embedding of each item's text.")
user_embeddings = _embedding_view(
    "user_embeddings", user, "user", user_embeddings_push,
    "Aggregated user embedding (deep layers over the recent behaviours); a row stamped T uses only interactions "
    "strictly before T.")
user_recent_behaviors = FeatureView(
    name="user_recent_behaviors",
    entities=[user],
    ttl=TTL,
    schema=[
        Field(name="recent_behavior_ids", dtype=Array(Int64), description="behavior_id of each, oldest first"),
        Field(name="recent_item_ids", dtype=Array(Int64), description="item_id of each, oldest first"),
        Field(name="recent_labels", dtype=Array(Int32), description="label (0/1) of each, oldest first"),
    ],
    source=user_recent_behaviors_push,
    online=True,
    owner=OWNER,
    tags={"llmfeat_kind": "sequence"},
    description="The user's last n interactions strictly before the row's timestamp, oldest first.",
)
user_profile = FeatureView(
    name="user_profile",
    entities=[user],
    ttl=TTL,
    schema=_profile_fields(_USERS_SCHEMA, _USER_ATTRIBUTES),
    source=users_source,
    online=True,
    owner=OWNER,
    tags={"llmfeat_kind": "profile"},
    description="Static user attributes from canonical/users.parquet (the ones ingest kept: declared, "
    "given by the input format, or inferred).",
)
item_profile = FeatureView(
    name="item_profile",
    entities=[item],
    ttl=TTL,
    schema=_profile_fields(_ITEMS_SCHEMA, _ITEM_ATTRIBUTES, extra=("title",)),
    source=items_source,
    online=True,
    owner=OWNER,
    tags={"llmfeat_kind": "profile"},
    description="Static item attributes from canonical/items.parquet (the ones ingest kept), and the title.",
)

# ---------------------------------------------------------------------------------------------
# As-of twins of the per-user time series, offline only. A point-in-time join over a view with a
# row per (user, interaction time) pairs every entity row with every earlier row of its user (rows x
# snapshots, quadratic in a user's activity) before keeping the newest. The ranker's fetch
# (llm_features.asof) looks up each entity row's snapshot stamp itself and joins the twin AT that
# stamp: with a one-second TTL, the join touches only rows of that second. Same source, same
# features, same rows chosen (tests/test_asof.py compares both paths).

ASOF_TTL = timedelta(seconds=1)
ASOF_TAG = "llmfeat_asof_of"


def _asof_twin(view: FeatureView) -> FeatureView:
    return FeatureView(
        name=f"{view.name}__asof",
        entities=[user],
        ttl=ASOF_TTL,
        schema=[Field(name=f.name, dtype=f.dtype) for f in view.features],
        source=view.batch_source,
        online=False,
        owner=OWNER,
        tags={**view.tags, ASOF_TAG: view.name},
        description=f"Offline twin of {view.name} for the as-of fetch (llm_features.asof); never materialized.",
    )


user_embeddings__asof = _asof_twin(user_embeddings)
user_recent_behaviors__asof = _asof_twin(user_recent_behaviors)

# ---------------------------------------------------------------------------------------------
# Feature services: what the ranker reads, and its id-only baseline twin

# A profile view exists only when the data has attributes for it: a log without a user table (or
# an item table with nothing but its text) gets no empty view, which Feast cannot register.
_PROFILES = [v for v in (user_profile, item_profile) if v.features]
if not user_profile.features:
    del user_profile
if not item_profile.features:
    del item_profile

ranker_llm = FeatureService(
    name="ranker_llm",
    features=[*_PROFILES, user_recent_behaviors, item_embeddings, user_embeddings],
    owner=OWNER,
    tags={"llmfeat_kind": "ranker", "llmfeat_model": "llm"},
    description="Ranker features including the LLM-derived user and item embeddings.",
)
ranker_id_only = FeatureService(
    name="ranker_id_only",
    features=[*_PROFILES, user_recent_behaviors],
    owner=OWNER,
    tags={"llmfeat_kind": "ranker", "llmfeat_model": "id_only"},
    description="The id-only baseline: the same features without LLM embeddings.",
)
