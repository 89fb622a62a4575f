"""Open the feature repository from any working directory, for one data dir: its config, the registry
checks, and re-registering a copied data dir (the package docstring says how paths are placed)."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sqlite3
from pathlib import Path

from llm_features.atomic import write_bytes
from llm_features.errors import UserError
from llm_features.feature_repo import find_repo
from llm_features.workspace import DEFAULT_REPO, MissingInputError, Workspace, resolve_data_dir

log = logging.getLogger("llm_features.store")

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
        from llm_features.store.definitions import apply_definitions

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
        write_bytes(db, registry.SerializeToString())
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
