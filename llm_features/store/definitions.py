"""The repository's definitions, imported for one data dir and applied (``feast apply`` through the
Python API), and lookups of what the registry holds."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llm_features.errors import UserError
from llm_features.store.opening import _STORE_DATA_DIR_ATTR, _STORE_YAML_ATTR
from llm_features.workspace import DATA_DIR_ENV, MissingInputError, Workspace, resolve_data_dir

_PLANS_ATTR = "_llmfeat_service_plans"


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
    (every feature would be missing, and every score the same default), or one that Feast will not
    serve because a materialisation of its views was interrupted (:func:`check_servable`)."""
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
    check_servable(store, service)


def unservable_views(store, service: str) -> dict[str, str]:
    """The views of ``service`` that Feast's ``get_online_features`` refuses, with their state.

    Feast commits a view's state ``MATERIALIZING`` before it writes the view's rows and leaves it
    only when the write completes (``AVAILABLE_ONLINE``) or raises an ``Exception``; a killed or
    interrupted run (SIGKILL, a time budget, Ctrl-C) leaves it there, and a failed rerun rolls it
    back to ``GENERATED``. Feast serves neither (``MATERIALIZING`` only with the registry option
    ``serve_features_while_materializing``); the next materialisation of the view completes it.
    """
    from feast.feature_view import FeatureViewState

    servable = {FeatureViewState.STATE_UNSPECIFIED, FeatureViewState.AVAILABLE_ONLINE}
    if getattr(store.registry, "serve_features_while_materializing", False):
        servable.add(FeatureViewState.MATERIALIZING)
    states = {p.name: getattr(feature_view(store, p.name), "state", None)
              for p in feature_service(store, service).feature_view_projections}
    return {name: state.name for name, state in states.items()
            if isinstance(state, FeatureViewState) and state not in servable}


def check_servable(store, service: str) -> None:
    """A :class:`UserError` naming the views of ``service`` that Feast will not serve because their
    materialisation was interrupted (:func:`unservable_views`), and what completes it."""
    stuck = unservable_views(store, service)
    if stuck:
        data = store_data_dir(store)
        views = ", ".join(f"{name} ({state})" for name, state in sorted(stuck.items()))
        raise UserError(
            f"a materialisation of feature view(s) {views} of {service} was interrupted, and Feast serves no "
            "view until its materialisation completes", file=data,
            fix=f"Run `llmfeat feast materialize --data-dir {data}{_yaml_option(store)}` again; it completes "
                "the view.")
