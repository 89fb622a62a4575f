"""Feast glue: open the feature repository from anywhere, apply it, materialise it, read it back.

``feast_repo/feature_store.yaml``'s paths are relative to the repository (the feast CLI resolves
them there). :func:`open_store` makes them absolute and moves the registry and online store into the
data directory:

- ``data/...`` paths (the file registry or a sqlite URL of an SQL registry, the SQLite online
  store) are placed in the data directory (``data_dir`` argument, else ``$LLMFEAT_DATA_DIR``, else
  ``<repo>/data``); other relative paths resolve against the repo directory, never the CWD.
- the definitions read ``$LLMFEAT_DATA_DIR`` too, so :func:`apply_definitions` imports them with
  that variable set to the store's data directory.

One data dir, one owner: the data dir's registry records (in its ``Infra``) the SQLite online store
its tables live in. A data dir that was copied or moved still records the old one, and a
``feast apply`` on it would move (drop) the original's online tables. :func:`open_store` notices
(log line) and re-registers the copy for its own files first: it forgets the other dir's tables
(never dropping them) and applies the definitions for this dir, keeping the copied online rows and
materialisation intervals. Readers that need a registry (``open_store(..., must_exist=True)``) are
told what to run when the data dir or its registry is missing.

Note: the plain feast CLI cannot see ``$LLMFEAT_DATA_DIR`` in the yaml (no defaults in
``os.path.expandvars``), so it keeps its registry and online store in ``feast_repo/data`` even when
the parquet tables live elsewhere. Use ``llmfeat feast ...`` (or pass ``data_dir``) for a moved
data directory.

Example::

    store = open_store("feast_repo")
    apply_definitions(store)
    report = materialize_all(store)          # checks model fingerprints first
    feats = online_features(store, user_id=1, item_ids=[10, 20, 30])
    feats.values["item_embedding"].shape     # (3, 384)
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import os
import sqlite3
import time
import uuid
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from llm_features.fingerprint import (
    FINGERPRINT_METADATA_KEY,
    FINGERPRINT_TAG,
    FingerprintMismatchError,
    ModelFingerprint,
)
from llm_features.errors import UserError
from llm_features.parquet_io import PLACEHOLDER_METADATA_KEY, file_metadata
from llm_features.feature_repo import find_repo
from llm_features.workspace import DATA_DIR_ENV, DEFAULT_REPO, MissingInputError, Workspace, resolve_data_dir

log = logging.getLogger(__name__)

EMBEDDING_VIEWS = ("atomic_behavior_embeddings", "item_embeddings", "user_embeddings")
TIMESTAMP_FIELD = "event_timestamp"
_STORE_DATA_DIR_ATTR = "_llmfeat_data_dir"
_STORE_YAML_ATTR = "_llmfeat_fs_yaml_file"


# ---------------------------------------------------------------------------------------------
# Opening and applying


def _relocate(path: str, repo: Path, data_dir: Path) -> str:
    """A relative path from the yaml made absolute: ``data/x`` -> ``<data_dir>/x``, else ``<repo>/path``."""
    p = Path(path)
    if p.is_absolute():
        return path
    if p.parts and p.parts[0] == "data":
        return str(data_dir.joinpath(*p.parts[1:]))
    return str((repo / p).resolve())


def _yaml_file(repo: Path, fs_yaml_file: str | os.PathLike | None) -> Path:
    """``fs_yaml_file`` (a relative path is taken from the repo dir), else ``<repo>/feature_store.yaml``."""
    if fs_yaml_file is None:
        yaml_file = repo / "feature_store.yaml"
        if not yaml_file.is_file():
            raise MissingInputError(
                "has no feature_store.yaml: not a Feast feature repository", file=repo, option="--repo",
                fix="Pass the feast_repo directory.",
            )
        return yaml_file
    yaml_file = Path(fs_yaml_file) if Path(fs_yaml_file).is_absolute() else repo / fs_yaml_file
    if not yaml_file.is_file():
        raise MissingInputError("feature store yaml does not exist", file=yaml_file)
    return yaml_file


def load_config(
    repo_path: str | os.PathLike = DEFAULT_REPO,
    data_dir: str | os.PathLike | None = None,
    fs_yaml_file: str | os.PathLike | None = None,
):
    """``feature_store.yaml`` loaded by feast's own loader, with every local path made absolute.

    ``fs_yaml_file`` picks another configuration for the same definitions, e.g.
    ``production/feature_store.postgres.yaml`` (a relative path is taken from the repo dir; default
    ``feature_store.yaml``). feast expands ``${VAR}`` references in it from the environment.
    """
    from feast.repo_config import load_repo_config

    data = resolve_data_dir(repo_path, data_dir)
    repo = find_repo(repo_path)
    yaml_file = _yaml_file(repo, fs_yaml_file)
    config = load_repo_config(repo, yaml_file)

    registry = config.registry
    reg_type = getattr(registry, "registry_type", "file")
    relative_sqlite = registry.path.startswith("sqlite:///") and not registry.path.startswith("sqlite:////")
    if reg_type == "sql" and relative_sqlite:
        # SQLAlchemy resolves a relative sqlite URL against the CWD; make it absolute.
        db = Path(_relocate(registry.path[len("sqlite:///"):], repo, data))
        db.parent.mkdir(parents=True, exist_ok=True)
        registry.path = f"sqlite:///{db}"
    elif reg_type == "file" and "://" not in registry.path:
        registry.path = _relocate(registry.path, repo, data)
        Path(registry.path).parent.mkdir(parents=True, exist_ok=True)

    online = config.online_store
    if getattr(online, "type", None) == "sqlite":
        online.path = _relocate(online.path, repo, data)
        Path(online.path).parent.mkdir(parents=True, exist_ok=True)
    from llm_features.offline_sources import spark_session_defaults

    spark_session_defaults(config)  # Spark stores only: UTC session, local workers use this Python
    return config


def _local_registry(config, data: Path) -> Path | None:
    """The local file of a registry kept in the data dir (file registry or SQLite): ``registry.db``, or
    another file there (``registry_redis.db`` of ``production/feature_store.redis_local.yaml``); else
    None (e.g. PostgreSQL)."""
    path = str(config.registry.path)
    path = path[len("sqlite:///"):] if path.startswith("sqlite:///") else path
    return Path(path) if "://" not in path and Path(path).parent == data else None


def _check_registry(config, repo: Path, data: Path, local: Path | None, fs_yaml_file, must_exist: bool) -> None:
    """Refuse a local registry :func:`open_store` cannot use: an old SQL file under a file registry, and
    for readers (``must_exist``) a missing or empty registry or one of another project."""
    from llm_features.feast_registry import is_sql_registry_file, old_sql_registry_error

    yaml_opt = f" --feature-store-yaml {fs_yaml_file}" if fs_yaml_file is not None else ""
    apply_hint = (f"Run `llmfeat feast apply --data-dir {data}{yaml_opt}` and "
                  f"`llmfeat feast materialize --data-dir {data}{yaml_opt}`.")
    if must_exist and local is not None and not local.exists():
        raise MissingInputError("the data dir has no Feast registry", file=data, option="--data-dir", fix=apply_hint)
    reg_type = getattr(config.registry, "registry_type", "file")
    if local is not None and reg_type == "file" and is_sql_registry_file(local):
        raise old_sql_registry_error(local)
    if not must_exist or local is None:
        return
    # feast's SQL registry records a project it does not hold when it opens: refuse before that
    projects = _registered_projects(local, reg_type)
    if projects is not None and config.project not in projects:
        if not projects:
            raise MissingInputError("the data dir's Feast registry is empty", file=local, option="--data-dir",
                                    fix=apply_hint)
        raise UserError(
            f"the Feast registry holds project(s) {', '.join(projects)}, not {config.project!r} (the project "
            f"of {repo}/feature_store.yaml)", file=local, option="--data-dir", fix=apply_hint)


def open_store(
    repo_path: str | os.PathLike = DEFAULT_REPO,
    data_dir: str | os.PathLike | None = None,
    fs_yaml_file: str | os.PathLike | None = None,
    *,
    must_exist: bool = False,
):
    """A ``feast.FeatureStore`` over ``repo_path`` that works from any CWD (see the module docstring).

    ``fs_yaml_file``: another configuration of the same repo (see :func:`load_config`), e.g.
    ``open_store("feast_repo", fs_yaml_file="production/feature_store.postgres.yaml")``.
    ``must_exist``: for readers -- refuse (:class:`UserError`, saying what to run) a data dir that
    does not exist or has no registry yet, rather than creating them.

    A data dir whose registry records another dir's online store (copied or moved) is re-registered
    for its own files first (see the module docstring).
    """
    from feast import FeatureStore

    data = resolve_data_dir(repo_path, data_dir)
    repo = find_repo(repo_path)
    if must_exist and not data.is_dir():
        raise MissingInputError(
            "the data dir does not exist", file=data, option="--data-dir",
            fix="Pass the data dir that `llmfeat ingest` wrote (or run it first).",
        )
    config = load_config(repo, data, fs_yaml_file)
    local = _local_registry(config, data)
    _check_registry(config, repo, data, local, fs_yaml_file, must_exist)
    if (
        local is not None
        and fs_yaml_file is None
        and repo == Path(repo_path).resolve()  # not the packaged repo a plain `feast_repo` fell back to
        and data != (repo / "data").resolve()
        and (repo / "data" / "registry.db").exists()
        and not local.exists()
    ):
        log.warning(
            "data dir %s has no Feast registry yet, but %s exists: the plain feast CLI keeps its registry in "
            "%s/data. Run `llmfeat feast apply --data-dir %s` to register this data dir.",
            data, repo / "data" / "registry.db", repo, data,
        )
    others = _other_online_stores(config, local) if local is not None and local.exists() else []
    if not others:
        store = FeatureStore(repo_path=str(repo), config=config)
        setattr(store, _STORE_DATA_DIR_ATTR, data)
        setattr(store, _STORE_YAML_ATTR, fs_yaml_file)
        return store
    # a copied or moved data dir: re-register it for its own files before feast reads the registry
    log.warning(
        "%s records the online store %s: the data dir was copied or moved. Re-registering the definitions "
        "for %s (the other dir is left untouched).", local, ", ".join(others), data,
    )
    with Workspace.at(data).lock("llmfeat: re-register a copied data dir"):
        _forget_other_online_stores(config, local)
        store = FeatureStore(repo_path=str(repo), config=config)
        setattr(store, _STORE_DATA_DIR_ATTR, data)
        setattr(store, _STORE_YAML_ATTR, fs_yaml_file)
        with contextlib.redirect_stdout(io.StringIO()):  # feast prints every object's diff
            apply_definitions(store)
    return store


def _infra_rows(db: Path, registry_type: str, project: str):
    """(read, write) of the ``Infra`` proto a local registry file stores for ``project``, read with
    sqlite3/protobuf directly. Never through feast: building its registry object instantiates a
    ``SqliteTable`` per recorded table, which connects to (so creates) each recorded file -- for a
    moved data dir, an empty online store at the old place."""
    from feast.protos.feast.core.InfraObject_pb2 import Infra as InfraProto

    if registry_type == "sql":
        where = "infra_name = 'infra_obj' AND project_id = ?"

        def read():
            with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
                try:
                    row = conn.execute(f"SELECT infra_proto FROM managed_infra WHERE {where}", (project,)).fetchone()
                except sqlite3.OperationalError:  # no such table: an empty registry
                    return None
            return InfraProto.FromString(row[0]) if row is not None else None

        def write(proto) -> None:
            with contextlib.closing(sqlite3.connect(db)) as conn, conn:
                conn.execute(f"UPDATE managed_infra SET infra_proto = ? WHERE {where}",
                             (proto.SerializeToString(), project))
        return read, write

    from feast.protos.feast.core.Registry_pb2 import Registry as RegistryProto

    def read_file():
        return RegistryProto.FromString(db.read_bytes()).infra

    def write_file(proto) -> None:
        registry = RegistryProto.FromString(db.read_bytes())
        registry.infra.CopyFrom(proto)
        tmp = db.with_name(f".{db.name}.tmp")
        tmp.write_bytes(registry.SerializeToString())
        os.replace(tmp, db)
    return read_file, write_file


def _registered_projects(db: Path, registry_type: str) -> list[str] | None:
    """The projects a local registry file holds (read-only), or None where unknown."""
    if registry_type == "file":
        from feast.protos.feast.core.Registry_pb2 import Registry as RegistryProto

        proto = RegistryProto.FromString(db.read_bytes())
        return sorted({p.spec.name for p in proto.projects}
                      | {fv.spec.project for fv in proto.feature_views})
    if registry_type != "sql":
        return None
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        try:
            return sorted(r[0] for r in conn.execute("SELECT project_name FROM projects"))
        except sqlite3.OperationalError:  # no such table: created by an older feast, or empty
            return None


def _is_sqlite_table(obj) -> bool:
    return obj.WhichOneof("infra_object") == "sqlite_table"


def _other_online_stores(config, db: Path) -> list[str]:
    """The SQLite online stores other than this config's that the registry file ``db`` records
    tables in: non-empty for a data dir that was copied or moved."""
    online = config.online_store
    if getattr(online, "type", None) != "sqlite":
        return []
    read, _ = _infra_rows(db, getattr(config.registry, "registry_type", "file"), config.project)
    infra = read()
    return sorted({o.sqlite_table.path for o in (infra.infra_objects if infra is not None else ())
                   if _is_sqlite_table(o) and o.sqlite_table.path != online.path})


def _forget_other_online_stores(config, db: Path) -> None:
    """Drop the other stores' tables from the registry's ``Infra`` record -- from the record only:
    feast would otherwise "move" them at the next apply, dropping them in the other dir."""
    read, write = _infra_rows(db, getattr(config.registry, "registry_type", "file"), config.project)
    infra = read()
    keep = [o for o in infra.infra_objects
            if not _is_sqlite_table(o) or o.sqlite_table.path == config.online_store.path]
    del infra.infra_objects[:]
    infra.infra_objects.extend(keep)
    write(infra)


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def load_definitions(
    repo_path: str | os.PathLike,
    data_dir: str | os.PathLike,
    project: str = "llmfeat",
    offline_store: str | None = None,
):
    """The Feast objects of ``repo_path``'s definitions, built for ``data_dir``, as a ``RepoContents``.

    Mirrors ``feast apply``'s module scan (every ``*.py`` not in ``.feastignore``), but imports each
    module afresh, so several data directories can be applied in one process. ``offline_store`` (an
    ``offline_store.type``, e.g. ``duckdb`` or ``spark``) picks the data source class the definitions
    declare (``llm_features.offline_sources``); default: the repo's ``feature_store.yaml``.
    """
    from feast import Entity, FeatureService, FeatureView
    from feast.data_source import DataSource
    from feast.feature_view import DUMMY_ENTITY
    from feast.on_demand_feature_view import OnDemandFeatureView
    from feast.project import Project
    from feast.repo_contents import RepoContents
    from feast.repo_operations import get_repo_files
    from feast.stream_feature_view import StreamFeatureView

    repo = Path(repo_path).resolve()
    kinds = ("data_sources", "entities", "feature_views", "feature_services", "on_demand_feature_views")
    found: dict[str, list[Any]] = {k: [] for k in kinds}

    def add(kind: str, obj: Any) -> None:
        if not any(obj is o for o in found[kind]):
            found[kind].append(obj)

    from llm_features.offline_sources import OFFLINE_STORE_ENV, configured_offline_store

    store_type = offline_store or configured_offline_store(repo)
    with _env(DATA_DIR_ENV, str(Path(data_dir).resolve())), _env(OFFLINE_STORE_ENV, store_type):
        for file in get_repo_files(repo):
            name = f"_llmfeat_feast_defs_{file.stem}_{uuid.uuid4().hex[:8]}"
            spec = importlib.util.spec_from_file_location(name, file)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            for obj in vars(module).values():
                if isinstance(obj, StreamFeatureView):
                    raise NotImplementedError("stream feature views are not used by llmfeat")
                if isinstance(obj, FeatureView):
                    add("feature_views", obj)
                    if obj.batch_source is not None:
                        add("data_sources", obj.batch_source)
                elif isinstance(obj, OnDemandFeatureView):
                    add("on_demand_feature_views", obj)
                elif isinstance(obj, Entity):
                    add("entities", obj)
                elif isinstance(obj, FeatureService):
                    add("feature_services", obj)
                elif isinstance(obj, DataSource):
                    add("data_sources", obj)
    found["entities"].append(DUMMY_ENTITY)
    return RepoContents(
        projects=[Project(name=project)], stream_feature_views=[], label_views=[], permissions=[], **found
    )


def apply_definitions(store, data_dir: str | os.PathLike | None = None) -> None:
    """``feast apply`` through the Python API: register the store's repo definitions for
    ``data_dir`` (default: the data dir the store was opened for) and delete registered objects
    the definitions no longer have, as the CLI does."""
    from feast.repo_operations import apply_total_with_repo_instance

    from llm_features.feast_sources import prepare_sources
    from llm_features.offline_sources import offline_store_type_of

    repo_path = Path(store.config.repo_path)
    data = Path(data_dir).resolve() if data_dir is not None else store_data_dir(store)
    project = store.config.project
    prepare_sources(Workspace.at(data))  # the definitions only declare: make every source readable

    repo = load_definitions(repo_path, data, project, offline_store=offline_store_type_of(store.config))
    if not repo.feature_views:
        raise MissingInputError("defines no feature views", file=repo_path, option="--repo",
                                fix="Pass the feast_repo directory.")
    apply_total_with_repo_instance(store, project, store.registry, repo, skip_source_validation=False)
    store.__dict__.pop(_PLANS_ATTR, None)


def store_data_dir(store) -> Path:
    """The data directory ``store`` was opened for (``open_store``), else the repo's default one."""
    return getattr(store, _STORE_DATA_DIR_ATTR, None) or resolve_data_dir(store.config.repo_path)


def _yaml_option(store) -> str:
    """`` --feature-store-yaml FILE`` for a store opened with another yaml of the repo, else ``""`` (hints)."""
    yaml_file = getattr(store, _STORE_YAML_ATTR, None)
    return f" --feature-store-yaml {yaml_file}" if yaml_file is not None else ""


def registered_workspace(store) -> Workspace:
    """The workspace whose tables the registered views read (from the registry's source paths)."""
    fv = feature_view(store, "item_embeddings")
    return Workspace.at(Path(fv.batch_source.path).parent)


def not_registered(store, what: str) -> UserError:
    """The error for a feature view or service the data dir's registry does not have."""
    project = store.config.project
    data = store_data_dir(store)
    repo = store.config.repo_path
    fix = f"Run `llmfeat feast apply --repo {repo} --data-dir {data}{_yaml_option(store)}`."
    try:
        projects = sorted(p.name for p in store.registry.list_projects(allow_cache=False))
    except Exception:  # noqa: BLE001 - only for the hint
        projects = []
    if projects and project not in projects:
        return UserError(
            f"the Feast registry holds project(s) {', '.join(projects)}, not {project!r} (the project of "
            f"{repo}/feature_store.yaml), so it has no {what}", file=data, option="--data-dir", fix=fix)
    return UserError(f"{what} is not registered in this data dir's Feast registry", file=data,
                     option="--data-dir", fix=fix)


def feature_service(store, name: str):
    """``store.get_feature_service(name)``; an unregistered name is a :class:`UserError` saying what to run."""
    from feast.errors import FeatureServiceNotFoundException

    try:
        return store.get_feature_service(name)
    except FeatureServiceNotFoundException:
        raise not_registered(store, f"feature service {name!r}") from None


def feature_view(store, name: str):
    """``store.get_feature_view(name)``; an unregistered name is a :class:`UserError` saying what to run."""
    from feast.errors import FeatureViewNotFoundException

    try:
        return store.get_feature_view(name)
    except FeatureViewNotFoundException:
        raise not_registered(store, f"feature view {name!r}") from None


def check_materialized(store, service: str) -> None:
    """Refuse to serve ``service`` from an online store that was never materialised for its views
    (every feature would be missing, and every score the same default)."""
    fs = feature_service(store, service)
    empty = [p.name for p in fs.feature_view_projections
             if not feature_view(store, p.name).materialization_intervals]
    if empty:
        data = store_data_dir(store)
        online = store.config.online_store
        where = getattr(online, "path", None) if getattr(online, "type", None) == "sqlite" else data
        raise UserError(
            f"the online store has no rows for feature view(s) {', '.join(empty)} of {service}: never "
            "materialized", file=where,
            fix=f"Run `llmfeat feast materialize --data-dir {data}{_yaml_option(store)}` first.")


# ---------------------------------------------------------------------------------------------
# Fingerprints


def _source_files(source_path: str) -> list[Path]:
    """Every parquet file DuckDB reads for a FileSource: a directory means all ``*.parquet`` in it,
    not only ``part-*`` files, so the fingerprint check covers whatever would be materialised."""
    p = Path(source_path)
    if p.is_dir():
        return sorted(f for f in p.iterdir() if f.suffix == ".parquet" and f.is_file())
    return [p] if p.exists() else []


def _is_placeholder(meta: dict[str, str]) -> bool:
    return meta.get(PLACEHOLDER_METADATA_KEY) == "true"


def check_fingerprints(store, workspace: Workspace | None = None) -> ModelFingerprint | None:
    """Refuse to materialise embeddings of mixed models.

    For every registered embedding view, the fingerprint digest in each part file's metadata, in
    the workspace ``manifest.json`` and in the view's registry tags must be the same, and the view's
    ``vector_length`` must match the manifest's width. Returns the workspace fingerprint (None when
    there is neither a manifest nor an embedding part yet).

    Raises:
        FingerprintMismatchError: naming the view, the part file and both digests.
    """
    workspace = workspace or registered_workspace(store)
    manifest_fp = workspace.read_fingerprint()
    manifest_digest = manifest_fp.digest if manifest_fp is not None else None
    registered = {fv.name: fv for fv in store.list_feature_views()}
    reapply = "run `llmfeat feast apply` (or `feast apply` in feast_repo/) to re-tag the views"

    for name in EMBEDDING_VIEWS:
        fv = registered.get(name)
        if fv is None:
            continue
        tag = fv.tags.get(FINGERPRINT_TAG)
        tag = None if tag in (None, "none") else tag
        for part in _source_files(fv.batch_source.path):
            part_digest = _part_digest(name, part, workspace, manifest_digest)
            if part_digest is None:
                continue
            if tag != part_digest:
                raise FingerprintMismatchError(
                    f"feature view {name}: registry tag {FINGERPRINT_TAG}={tag} but part file {part} holds "
                    f"model fingerprint {part_digest}; {reapply}."
                )
        if tag is not None and tag != manifest_digest:
            raise FingerprintMismatchError(
                f"feature view {name}: registry tag {FINGERPRINT_TAG}={tag} but {workspace.manifest} records "
                f"{manifest_digest} (part file: none checked); {reapply}."
            )
        if manifest_fp is not None:
            width = _embedding_width(workspace, manifest_fp)
            lengths = {f.name: f.vector_length for f in fv.features if f.vector_length}
            for feat, length in lengths.items():
                if length != width:
                    raise FingerprintMismatchError(
                        f"feature view {name}: {feat} is registered with vector_length={length} but "
                        f"{workspace.manifest} (digest {manifest_digest}) records width {width}; {reapply}."
                    )
    return manifest_fp


def _part_digest(name: str, part: Path, workspace: Workspace, manifest_digest: str | None) -> str | None:
    """The model digest of one part file (None for a placeholder), refused unless it is the manifest's."""
    meta = file_metadata(part)
    if _is_placeholder(meta):
        return None
    raw = meta.get(FINGERPRINT_METADATA_KEY)
    if raw is None:
        raise FingerprintMismatchError(
            f"feature view {name}: part file {part} has no '{FINGERPRINT_METADATA_KEY}' metadata, so "
            f"its model is unknown (manifest digest {manifest_digest}). Write embeddings with "
            f"llm_features.parquet_io.write_part(..., metadata=...) or remove the file."
        )
    part_digest = ModelFingerprint.from_json(raw).digest
    if manifest_digest is None:
        raise FingerprintMismatchError(
            f"feature view {name}: part file {part} holds model fingerprint {part_digest}, but "
            f"{workspace.manifest} is missing (manifest digest None)."
        )
    if part_digest != manifest_digest:
        raise FingerprintMismatchError(
            f"feature view {name}: part file {part} holds model fingerprint {part_digest}, but "
            f"{workspace.manifest} records {manifest_digest}. Embeddings of two models would be "
            f"mixed; re-encode into a fresh data dir or delete the stale part files."
        )
    return part_digest


def check_part_fingerprints(workspace: Workspace) -> None:
    """The registry-free half of :func:`check_fingerprints`: every embedding part file of the
    workspace holds the manifest's model. ``llmfeat feast materialize`` runs it before it applies,
    so a refused materialisation leaves the data dir (registry included) as it was."""
    fp = workspace.read_fingerprint()
    for name in EMBEDDING_VIEWS:
        for part in _source_files(str(getattr(workspace, name))):  # refuses a table linked out of the dir
            _part_digest(name, part, workspace, fp.digest if fp is not None else None)


def _embedding_width(workspace: Workspace, fp: ModelFingerprint) -> int:
    manifest = json.loads(workspace.manifest.read_text())
    return int(manifest.get("embedding_dim") or fp.hidden_size)


# ---------------------------------------------------------------------------------------------
# Materialisation


class _UnknownViewsError(UserError, KeyError):
    pass


@dataclass
class MaterializeReport:
    start: datetime
    end: datetime
    seconds: float
    source_rows: dict[str, int] = field(default_factory=dict)
    """Rows in each view's source inside [start, end)."""
    entities: dict[str, int] = field(default_factory=dict)
    """Distinct entity keys per view: the rows written to the online store."""
    windows: dict[str, int] = field(default_factory=dict)
    """Time windows each view was materialised in (1 unless its source has more than ``chunk_rows``)."""

    @property
    def total_entities(self) -> int:
        return sum(self.entities.values())


def _drop_stale_placeholders(directory: Path) -> None:
    """A placeholder part keeps an empty source readable; once real parts exist it must go, since a
    schema that differs from theirs (e.g. an extra column) would break DuckDB's multi-file read."""
    if not directory.is_dir():
        return
    files = _source_files(str(directory))
    placeholders = [p for p in files if _is_placeholder(file_metadata(p))]
    if placeholders and len(placeholders) < len(files):
        for p in placeholders:
            p.unlink(missing_ok=True)


def _source_stats(fv) -> tuple[int, int, datetime | None, datetime | None, pa.ChunkedArray | None]:
    """(rows, distinct entities, min ts, max ts, every row's ts) of a view's source."""
    join_keys = [e.name for e in fv.entity_columns]
    columns = [*join_keys, TIMESTAMP_FIELD]
    tables = [pq.read_table(p, columns=columns) for p in _source_files(fv.batch_source.path)]
    tables = [t for t in tables if t.num_rows]
    if not tables:
        return 0, 0, None, None, None
    t = pa.concat_tables(tables, promote_options="default")
    ts = t.column(TIMESTAMP_FIELD)
    keys = t.select(join_keys).group_by(join_keys).aggregate([]).num_rows
    return t.num_rows, keys, pc.min(ts).as_py(), pc.max(ts).as_py(), ts


MATERIALIZE_CHUNK_ROWS = 1_000_000
"""Source rows per materialisation window (see :func:`time_windows`)."""


def time_windows(ts: pa.ChunkedArray | None, start: datetime, end: datetime,
                 chunk_rows: int = MATERIALIZE_CHUNK_ROWS) -> list[tuple[datetime, datetime]]:
    """Consecutive ``[lo, hi]`` windows covering ``[start, end]``, each holding about ``chunk_rows``
    of the timestamps ``ts``.

    Feast's materialisation keeps each entity's latest row of a window with a window function over
    every row of it, so its memory grows with the rows of the window (a 10M-row view of 30-item
    lists passed 20 GB). Windows materialised in time order leave each entity's latest row of the
    whole range in the online store, as one window does, with memory bounded by ``chunk_rows``.
    Feast's window bounds are inclusive: a row at a cut lands in both windows, which is harmless.
    """
    n = 0 if ts is None else len(ts)
    if n <= chunk_rows:
        return [(start, end)]
    values = np.sort(ts.cast(pa.timestamp("us", tz="UTC")).to_numpy(zero_copy_only=False).astype("datetime64[us]"))
    k = -(-n // chunk_rows)
    cuts = np.unique(values[(np.arange(1, k) * n) // k])
    bounds = [start]
    for cut in cuts.tolist():  # datetime64[us] -> naive datetimes in UTC
        cut = cut.replace(tzinfo=timezone.utc)
        if bounds[-1] < cut < end:
            bounds.append(cut)
    bounds.append(end)
    return list(zip(bounds[:-1], bounds[1:]))


def materialize_all(
    store,
    workspace: Workspace | None = None,
    *,
    feature_views: Sequence[str] | None = None,
    check: bool = True,
    end: datetime | None = None,
    chunk_rows: int = MATERIALIZE_CHUNK_ROWS,
) -> MaterializeReport:
    """Materialise every row of every (or the named) feature view: ``[min ts - 1 s, now]``.

    A view whose source has more than ``chunk_rows`` rows is materialised in consecutive time
    windows of about that many rows (:func:`time_windows`), so memory stays bounded.

    Runs :func:`check_fingerprints` first (``check=False`` only for tests of the check itself),
    and refuses user embeddings computed from interactions that changed since (a text or a label:
    ``llm_features.embed_users.stale_user_embeddings``), so the online store serves only current rows.
    """
    if check:
        check_fingerprints(store, workspace)
        if feature_views is None or "user_embeddings" in feature_views:
            from llm_features.embed_users import stale_user_embeddings

            ws = workspace or registered_workspace(store)
            stale = stale_user_embeddings(ws.root)
            if stale:
                raise UserError(
                    f"{len(stale)} users' embeddings were computed from interactions that have changed since "
                    f"(a behaviour text or a label; e.g. user {stale[0]})", file=ws.user_embeddings,
                    fix="Run `llmfeat embed-users` first: it recomputes exactly those rows.")
    views = [fv for fv in store.list_feature_views()
             if (feature_views is None and fv.online) or (feature_views is not None and fv.name in feature_views)]
    if feature_views is not None:
        missing = sorted(set(feature_views) - {fv.name for fv in views})
        if missing:
            known = ", ".join(sorted(fv.name for fv in store.list_feature_views())) or "none"
            raise _UnknownViewsError(
                f"feature view(s) {', '.join(missing)} are not registered (registered: {known})",
                option="--views", fix="Name registered views, or run `llmfeat feast apply` first.")
    report = MaterializeReport(start=datetime.now(timezone.utc), end=datetime.now(timezone.utc), seconds=0.0)
    lo, hi = None, None
    stamps: dict[str, pa.ChunkedArray | None] = {}
    if views:
        from llm_features.feast_sources import prepare_sources

        # a table deleted since apply, or a data dir written by a stage that does not prepare them
        prepare_sources(workspace or registered_workspace(store))
    for fv in views:
        if Path(fv.batch_source.path).is_dir():
            _drop_stale_placeholders(Path(fv.batch_source.path))
        rows, keys, tmin, tmax, stamps[fv.name] = _source_stats(fv)
        report.source_rows[fv.name], report.entities[fv.name] = rows, keys
        if tmin is not None:
            lo = tmin if lo is None else min(lo, tmin)
            hi = tmax if hi is None else max(hi, tmax)
    now = end or datetime.now(timezone.utc)
    report.start = (lo - timedelta(seconds=1)) if lo is not None else now - timedelta(days=1)
    report.end = max(now, hi + timedelta(seconds=1)) if hi is not None else now
    t0 = time.perf_counter()
    if views:
        windows = {fv.name: time_windows(stamps[fv.name], report.start, report.end, chunk_rows) for fv in views}
        report.windows = {name: len(w) for name, w in windows.items()}
        small = [name for name, w in windows.items() if len(w) == 1]
        runs = ([(small, report.start, report.end)] if small else []) + [
            ([name], lo_, hi_) for name, w in windows.items() if len(w) > 1 for lo_, hi_ in w]
        with warnings.catch_warnings():
            # ibis (under feast's duckdb store) calls duckdb's deprecated fetch_arrow_table once per view
            warnings.filterwarnings("ignore", message="fetch_arrow_table", category=DeprecationWarning)
            for names, lo_, hi_ in runs:
                if len(runs) > 1:
                    log.info("materialising %s from %s to %s", ", ".join(names), lo_.isoformat(), hi_.isoformat())
                store.materialize(start_date=lo_, end_date=hi_, feature_views=names)
    report.seconds = time.perf_counter() - t0
    return report


# ---------------------------------------------------------------------------------------------
# Online reads


@dataclass
class OnlineFeatures:
    """Online features for one user and ``N`` candidate items, one row per item.

    ``values[name]`` is ``[N, D]`` float32 for an embedding (``Array(Float32)``), ``[N]`` for a
    scalar, and an object array of 1-d arrays for other lists. ``present[name]`` is ``[N]`` bool:
    False where the store had no value (the value is then the fill: zeros or NaN for embeddings,
    0 / NaN / "" for scalars, an empty array for lists).
    """

    user_id: int
    item_ids: np.ndarray
    values: dict[str, np.ndarray]
    present: dict[str, np.ndarray]

    def missing(self) -> dict[str, np.ndarray]:
        """Item ids with no value, per feature that has any missing."""
        return {k: self.item_ids[~m] for k, m in self.present.items() if not m.all()}


@dataclass(frozen=True)
class _ServicePlan:
    """A feature service resolved once: feature refs grouped by the join keys of their views."""

    by_keys: dict[tuple[str, ...], list[str]]  # ("user_id",) -> ["user_embeddings:user_embedding", ...]
    types: dict[str, tuple[Any, int]]  # feature name -> (feast dtype, vector_length)


_PLANS_ATTR = "_llmfeat_service_plans"


def _service_plan(store, service: str) -> _ServicePlan:
    # The SQL registry rebuilds a FeatureService from protobuf on every get (~6 ms); resolve it once
    # per store. apply_definitions() drops the cache.
    plans = store.__dict__.setdefault(_PLANS_ATTR, {})
    if service not in plans:
        fs = feature_service(store, service)
        by_keys: dict[tuple[str, ...], list[str]] = {}
        types: dict[str, tuple[Any, int]] = {}
        for proj in fs.feature_view_projections:
            fv = store.get_feature_view(proj.name)
            keys = tuple(sorted(proj.join_key_map.get(k, k) for k in fv.join_keys))
            for f in proj.features:
                by_keys.setdefault(keys, []).append(f"{proj.name_to_use()}:{f.name}")
                types[f.name] = (f.dtype, f.vector_length)
        plans[service] = _ServicePlan(by_keys, types)
    return plans[service]


def _read_online(store, plan: _ServicePlan, user_id: int, item_ids: np.ndarray) -> dict[str, list]:
    """Feature name -> N values. User-level views are read once and broadcast to the N rows."""
    n = len(item_ids)
    out: dict[str, list] = {}
    for keys, refs in plan.by_keys.items():
        if keys == ("user_id",):
            rows = [{"user_id": int(user_id)}]
        elif keys == ("item_id",):
            rows = [{"item_id": int(i)} for i in item_ids]
        else:
            rows = [{"user_id": int(user_id), "item_id": int(i)} for i in item_ids]
            if not set(keys) <= {"user_id", "item_id"}:
                raise ValueError(f"feature service view keyed by {keys}: only user_id/item_id are supported")
        resp = store.get_online_features(features=refs, entity_rows=rows).to_dict()
        for ref in refs:
            name = ref.split(":", 1)[1]
            col = resp[name]
            out[name] = col * n if len(rows) == 1 and n != 1 else col
    return out


def online_features(
    store,
    user_id: int,
    item_ids: Sequence[int] | np.ndarray,
    service: str = "ranker_llm",
    *,
    missing: Literal["zeros", "nan", "raise"] = "zeros",
) -> OnlineFeatures:
    """Read ``service``'s features for one user and ``N`` items from the online store.

    ``missing``: fill for absent embeddings (``zeros`` or ``nan``; scalars use 0/NaN/""), or
    ``raise`` a ``KeyError`` listing every absent (feature, ids).
    """
    from feast.types import Array, Float32, Float64, Int32, Int64, String

    plan = _service_plan(store, service)
    item_ids = np.asarray(item_ids, dtype=np.int64).reshape(-1)
    resp = _read_online(store, plan, user_id, item_ids)
    n = len(item_ids)
    values: dict[str, np.ndarray] = {}
    present: dict[str, np.ndarray] = {}
    fill = np.nan if missing == "nan" else 0.0
    for name, (dtype, length) in plan.types.items():
        col = resp[name]
        mask = np.fromiter((v is not None for v in col), dtype=bool, count=n)
        present[name] = mask
        if dtype == Array(Float32) or dtype == Array(Float64):
            dim = length or next((len(v) for v in col if v is not None), 0)
            mat = np.full((n, dim), fill, dtype=np.float32)
            if mask.any():
                mat[mask] = np.asarray([v for v in col if v is not None], dtype=np.float32)
            values[name] = mat
        elif isinstance(dtype, Array):
            elem = {Int64: np.int64, Int32: np.int64, String: object}.get(dtype.base_type, np.float64)
            arr = np.empty(n, dtype=object)
            seen: dict[int, np.ndarray] = {}  # a broadcast user value is one list object, converted once
            for i, v in enumerate(col):
                if id(v) not in seen:
                    seen[id(v)] = np.asarray(v if v is not None else [], dtype=elem)
                arr[i] = seen[id(v)]
            values[name] = arr
        elif dtype in (Int64, Int32):
            values[name] = np.array([v if v is not None else 0 for v in col], dtype=np.int64)
        elif dtype == String:
            values[name] = np.array([v if v is not None else "" for v in col], dtype=object)
        else:
            values[name] = np.array([v if v is not None else np.nan for v in col], dtype=np.float64)
    result = OnlineFeatures(user_id=int(user_id), item_ids=item_ids, values=values, present=present)
    if missing == "raise" and (absent := result.missing()):
        listing = "; ".join(f"{k}: {v.tolist()}" for k, v in absent.items())
        raise KeyError(f"online store has no value for user {user_id} / items ({listing}); run materialize")
    return result
