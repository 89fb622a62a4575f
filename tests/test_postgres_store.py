"""Feast on PostgreSQL: the SQL registry and the online store in a real PostgreSQL server, configured by
exactly the documented file ``feast_repo/production/feature_store.postgres.yaml`` (its ``${LLMFEAT_PG_*}``
variables set from ``$LLMFEAT_TEST_POSTGRES_URL``), over the real feast_repo definitions and a small
synthetic workspace: apply, materialise, read online, compare with the written vectors.

Run it locally with::

    export LLMFEAT_TEST_POSTGRES_URL=$(bash scripts/start_postgres.sh)
    .venv/bin/python -m pytest tests/test_postgres_store.py

Without that variable the test is skipped, except under CI (``CI`` set), where a missing or unreachable
server is a failure: ``.ci/run`` starts one with ``scripts/start_postgres.sh``.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np
import pytest

from llm_features.store import apply_definitions, materialize_all, online_features, open_store
from tests.test_spark_store import require_spark, stop_spark
from tests.store_data import copy_repo, write_synthetic_workspace

URL_ENV = "LLMFEAT_TEST_POSTGRES_URL"
YAML = "production/feature_store.postgres.yaml"
SPARK_YAML = "production/feature_store.spark.yaml"
HOW = f"export {URL_ENV}=$(bash scripts/start_postgres.sh)"

pytestmark = pytest.mark.integration


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@pytest.fixture(scope="module")
def pg_url():
    """The server's SQLAlchemy URL, checked to accept connections."""
    from sqlalchemy.engine import make_url

    raw = os.environ.get(URL_ENV)
    if not raw:
        if _in_ci():
            pytest.fail(f"CI is set but {URL_ENV} is not: .ci/run must start PostgreSQL ({HOW})")
        pytest.skip(f"no PostgreSQL server; to run this test: {HOW}")
    url = make_url(raw)
    import psycopg

    try:
        with psycopg.connect(**_conn_kwargs(url), connect_timeout=5) as conn:
            conn.execute("select 1")
    except psycopg.OperationalError as err:
        # The variable asks for this server (and CI always does): unreachable is a failure, not a skip.
        shown = url.render_as_string(hide_password=True)
        pytest.fail(f"{URL_ENV}={shown} is unreachable: {err}. Start it: {HOW}")
    return url


def _conn_kwargs(url) -> dict:
    return dict(
        host=url.host or "127.0.0.1",
        port=url.port or 5432,
        dbname=url.database,
        user=url.username,
        password=url.password or "",
        sslmode=url.query.get("sslmode", "prefer"),
    )


@pytest.mark.parametrize("yaml_file", [YAML, SPARK_YAML], ids=["postgres", "spark"])
def test_postgres_registry_and_online_store_roundtrip(yaml_file, pg_url, tmp_path, monkeypatch):
    """The postgres file, and the spark one (Spark offline store and engine in local[2] mode writing
    the PostgreSQL online store; no definitions edited): the same roundtrip, the same values."""
    import psycopg

    if yaml_file == SPARK_YAML:
        require_spark()
        monkeypatch.setenv("LLMFEAT_SPARK_MASTER", "local[2]")
        monkeypatch.delenv("PYSPARK_PYTHON", raising=False)  # open_store sets it for a local[...] master
    kw = _conn_kwargs(pg_url)
    for var, value in {
        "LLMFEAT_PG_HOST": kw["host"],
        "LLMFEAT_PG_PORT": str(kw["port"]),
        "LLMFEAT_PG_DATABASE": kw["dbname"],
        "LLMFEAT_PG_USER": kw["user"],
        "LLMFEAT_PG_PASSWORD": kw["password"],
        "LLMFEAT_PG_SSLMODE": kw["sslmode"],
    }.items():
        monkeypatch.setenv(var, value)

    repo = copy_repo(tmp_path / "feast_repo")
    # The documented file, with a project name of its own so that runs sharing a database never meet.
    project = f"llmfeat_test_{uuid.uuid4().hex[:10]}"
    path = repo / yaml_file
    text = path.read_text()
    assert "\nproject: llmfeat\n" in text
    path.write_text(text.replace("\nproject: llmfeat\n", f"\nproject: {project}\n"))

    data = tmp_path / "data"
    syn = write_synthetic_workspace(data)
    store = open_store(repo, data, fs_yaml_file=yaml_file)
    assert store.config.registry.path.startswith("postgresql+psycopg://")
    assert store.config.online_store.type == "postgres"
    if yaml_file == SPARK_YAML:
        assert store.config.offline_store.type == "spark" and store.config.batch_engine.type == "spark.engine"
    schema = store.config.online_store.db_schema
    try:
        apply_definitions(store)
        report = materialize_all(store)
        assert report.entities["item_embeddings"] == 20
        assert report.entities["user_embeddings"] == 3

        # A fresh store (another process, in production) finds the definitions in the PostgreSQL registry.
        reader = open_store(repo, data, fs_yaml_file=yaml_file)
        assert {fv.name for fv in reader.list_feature_views()} >= {
            "atomic_behavior_embeddings", "item_embeddings", "user_embeddings", "user_recent_behaviors",
            "user_profile", "item_profile",
        }
        item_ids = [3, 17, 12, 20]
        feats = online_features(reader, 1, item_ids, missing="raise")
        np.testing.assert_array_equal(
            feats.values["item_embedding"], np.stack([syn.items[i] for i in item_ids])
        )
        assert feats.values["item_embedding"].dtype == np.float32
        # the online store holds each user's latest version
        np.testing.assert_array_equal(feats.values["user_embedding"], np.stack([syn.users_v2[1]] * 4))
        assert feats.values["recent_behavior_ids"][0].tolist() == [101, 202]
        assert feats.values["title"].tolist() == [f"Movie {i} (2000)" for i in item_ids]
        got = reader.get_online_features(
            features=["atomic_behavior_embeddings:behavior_embedding"],
            entity_rows=[{"behavior_id": b} for b in (101, 303)],
        ).to_dict()["behavior_embedding"]
        expected = np.stack([syn.behaviors[101], syn.behaviors[303]])
        np.testing.assert_array_equal(np.asarray(got, np.float32), expected)
        other = online_features(reader, 2, [5, 999])
        assert other.present["item_embedding"].tolist() == [True, False]
        np.testing.assert_array_equal(other.values["user_embedding"][0], syn.users_v1[2])

        # ... and the rows really are in PostgreSQL, not in a local file
        assert not (data / "registry.db").exists() and not (data / "online_store.db").exists()
        with psycopg.connect(**kw, connect_timeout=5) as conn:
            n_items = conn.execute(
                f'select count(distinct entity_key) from "{schema}"."{project}_item_embeddings"'
            ).fetchone()[0]
            n_views = conn.execute(
                "select count(*) from feature_views where project_id = %s", (project,)
            ).fetchone()[0]
        assert n_items == 20
        assert n_views == 8  # six views and the two offline-only as-of twins
        if yaml_file == SPARK_YAML:
            from feast.infra.offline_stores.contrib.spark_offline_store.spark_source import SparkSource

            assert all(type(fv.batch_source) is SparkSource for fv in reader.list_feature_views())
    finally:
        try:
            _drop_project(store, project)
        finally:
            stop_spark()


def _drop_project(store, project: str) -> None:
    """Drop this run's online tables and registry rows (FeatureStore.teardown would empty the whole
    registry, every project included)."""
    try:
        views = store.list_feature_views()
        entities = store.list_entities()
        store._get_provider().teardown_infra(project, views, entities)
    finally:
        store.registry.delete_project(project)


_PROD_ENV = {
    "LLMFEAT_PG_HOST": "db.internal",
    "LLMFEAT_PG_PORT": "6543",
    "LLMFEAT_PG_DATABASE": "features",
    "LLMFEAT_PG_USER": "feast",
    "LLMFEAT_PG_PASSWORD": "s3cret",
    "LLMFEAT_PG_SSLMODE": "require",
    "LLMFEAT_REDIS": "redis.internal:6379,ssl=true",
    "LLMFEAT_SPARK_MASTER": "local[2]",
}


@pytest.mark.parametrize("variant", ["postgres", "redis", "spark"])
def test_production_yaml_variants_validate(variant, monkeypatch):
    """Every documented production yaml passes feast 0.67's own config validation (unknown keys are
    errors there), with its ${VAR}s expanded. Needs no server; redis needs redis-py (feast[redis], a
    llmfeat dependency), spark the spark extra."""
    import importlib.util

    from llm_features.store import load_config

    install = {"redis": "pip install -c constraints.txt -e .  (feast[redis]: redis-py, hiredis)",
               "spark": "pip install -c constraints.txt -e '.[spark]'"}
    module = {"redis": "redis", "spark": "pyspark"}.get(variant)
    if module and importlib.util.find_spec(module) is None:
        if _in_ci():  # scripts/bootstrap.sh installs both
            pytest.fail(f"CI is set but {module} is not installed: {install[variant]}")
        pytest.skip(f"{module} is not installed; to run this variant: {install[variant]}")
    monkeypatch.delenv("PYSPARK_PYTHON", raising=False)  # load_config sets it for a local[...] master
    for var, value in _PROD_ENV.items():
        monkeypatch.setenv(var, value)
    repo = Path(__file__).resolve().parents[1] / "feast_repo"
    config = load_config(repo, fs_yaml_file=f"production/feature_store.{variant}.yaml")
    assert config.project == "llmfeat" and config.entity_key_serialization_version == 3
    assert config.registry.registry_type == "sql"
    url = "postgresql+psycopg://feast:s3cret@db.internal:6543/features?sslmode=require"
    assert config.registry.path == url
    online = config.online_store
    if variant == "redis":
        assert online.type == "redis" and online.connection_string == "redis.internal:6379,ssl=true"
    else:
        got = (online.type, online.host, online.port, online.sslmode)
        assert got == ("postgres", "db.internal", 6543, "require")
    if variant == "spark":
        assert config.offline_store.type == "spark"
        assert config.offline_store.spark_conf["spark.master"] == "local[2]"
        assert config.batch_engine.type == "spark.engine"
    else:
        assert config.offline_store.type == "duckdb"
    assert "${" not in repr(config.model_dump()), "every ${VAR} must be expanded"
