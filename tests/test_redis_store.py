"""Feast on Redis: the online store in a real Redis server, configured by exactly the documented file
``feast_repo/production/feature_store.redis_local.yaml`` (``${LLMFEAT_REDIS}`` set from
``$LLMFEAT_TEST_REDIS``), over the real feast_repo definitions and a small synthetic data dir: apply and
materialise through ``llmfeat feast``, then every online read must equal the SQLite default's for the
same data dir, and the SQLite store must survive the Redis apply next to it.

Run it locally with::

    export LLMFEAT_TEST_REDIS=$(bash scripts/start_redis.sh)
    .venv/bin/python -m pytest tests/test_redis_store.py

Without that variable the server tests are skipped, except under CI (``CI`` set), where a missing or
unreachable server is a failure: ``.ci/run`` starts one with ``scripts/start_redis.sh``. Each test writes
under a Feast project name of its own (Redis keys end with it) and deletes its keys at the end.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from llm_features.errors import UserError
from llm_features.store import OnlineFeatures, apply_definitions, materialize_all, online_features, open_store
from tests.test_postgres_store import _in_ci
from tests.store_data import copy_repo, write_synthetic_workspace

ENV = "LLMFEAT_TEST_REDIS"
YAML = "production/feature_store.redis_local.yaml"
HOW = f"export {ENV}=$(bash scripts/start_redis.sh)"

pytestmark = pytest.mark.integration


def _client(connection_string: str):
    """A redis-py client for feast's connection string format (host:port[,db=N][,password=...][,ssl=true])."""
    import redis
    from feast.infra.online_stores.redis import RedisOnlineStore

    nodes, params = RedisOnlineStore._parse_connection_string(connection_string)
    return redis.Redis(host=nodes[0]["host"], port=int(nodes[0]["port"]), socket_connect_timeout=5, **params)


@pytest.fixture(scope="module")
def redis_conn() -> str:
    """The server's connection string, checked to answer PING."""
    raw = os.environ.get(ENV)
    if not raw:
        if _in_ci():
            pytest.fail(f"CI is set but {ENV} is not: .ci/run must start Redis ({HOW})")
        pytest.skip(f"no Redis server; to run this test: {HOW}")
    try:
        import redis
    except ModuleNotFoundError:
        pytest.fail(f"{ENV} is set but redis-py is not installed: pip install -c constraints.txt -e . (feast[redis])")
    try:
        _client(raw).ping()
    except redis.exceptions.RedisError as err:
        # The variable asks for this server (and CI always does): unreachable is a failure, not a skip.
        pytest.fail(f"{ENV}={raw} does not answer: {err}. Start it: {HOW}")
    return raw


def _repo_with_project(dest: Path) -> tuple[Path, str]:
    """A copy of feast_repo whose Redis yaml names a project of its own (the suffix of every key it writes)."""
    repo = copy_repo(dest)
    project = f"llmfeat_test_{uuid.uuid4().hex[:10]}"
    path = repo / YAML
    text = path.read_text()
    assert "\nproject: llmfeat\n" in text
    path.write_text(text.replace("\nproject: llmfeat\n", f"\nproject: {project}\n"))
    return repo, project


def _project_keys(client, project: str) -> list[bytes]:
    return list(client.scan_iter(match=b"*" + project.encode()))


def _drop_project_keys(store) -> None:
    """Delete this test's Redis keys (feast's own teardown: every key of the project's entities)."""
    store._get_provider().teardown_infra(store.config.project, store.list_feature_views(), store.list_entities())


def assert_same_features(got: OnlineFeatures, want: OnlineFeatures) -> None:
    assert got.user_id == want.user_id
    np.testing.assert_array_equal(got.item_ids, want.item_ids)
    assert got.values.keys() == want.values.keys() and got.present.keys() == want.present.keys()
    for name, value in want.values.items():
        np.testing.assert_array_equal(got.present[name], want.present[name], err_msg=name)
        assert got.values[name].dtype == value.dtype, name
        if value.dtype == object and len(value) and isinstance(value[0], np.ndarray):  # lists per row
            assert [v.tolist() for v in got.values[name]] == [v.tolist() for v in value], name
        else:
            np.testing.assert_array_equal(got.values[name], value, err_msg=name)


def test_redis_online_features_equal_sqlite(redis_conn, tmp_path, monkeypatch):
    """Apply + materialise the same data dir into SQLite (the default) and into Redis (``llmfeat feast
    materialize --feature-store-yaml``): every online read is the same, and the rows are in Redis."""
    from llm_features.cli.feast import command

    monkeypatch.setenv("LLMFEAT_REDIS", redis_conn)
    repo, project = _repo_with_project(tmp_path / "feast_repo")
    data = tmp_path / "data"
    syn = write_synthetic_workspace(data)

    sqlite = open_store(repo, data)
    apply_definitions(sqlite)
    materialize_all(sqlite)

    client = _client(redis_conn)
    redis_store = None
    try:
        args = ["--repo", str(repo), "--data-dir", str(data), "--feature-store-yaml", YAML]
        res = CliRunner().invoke(command, ["materialize", *args], catch_exceptions=False)
        assert res.exit_code == 0, res.output
        assert "item_embeddings" in res.output

        # a fresh reader (another process, in production) finds the registry of the Redis yaml in the data dir
        redis_store = open_store(repo, data, fs_yaml_file=YAML, must_exist=True)
        assert redis_store.config.online_store.type == "redis"
        assert redis_store.config.online_store.connection_string == redis_conn
        assert redis_store.config.registry.path == str(data.resolve() / "registry_redis.db")
        assert redis_store.config.project == project
        assert {fv.name for fv in redis_store.list_feature_views()} >= {
            "atomic_behavior_embeddings", "item_embeddings", "user_embeddings", "user_recent_behaviors",
            "user_profile", "item_profile",
        }

        cases = [(1, [3, 17, 12, 20]), (2, [5, 999]), (3, [1]), (999, [2, 7])]  # unknown user / item included
        for service in ("ranker_llm", "ranker_id_only"):
            for user, items in cases:
                assert_same_features(online_features(redis_store, user, items, service),
                                     online_features(sqlite, user, items, service))
        # and the values are the written ones (not two equally empty stores)
        feats = online_features(redis_store, 1, [3, 17], missing="raise")
        np.testing.assert_array_equal(feats.values["item_embedding"], np.stack([syn.items[3], syn.items[17]]))
        np.testing.assert_array_equal(feats.values["user_embedding"], np.stack([syn.users_v2[1]] * 2))
        refs = ["atomic_behavior_embeddings:behavior_embedding"]
        rows = [{"behavior_id": b} for b in (101, 303, 404)]
        got = redis_store.get_online_features(features=refs, entity_rows=rows).to_dict()
        assert got == sqlite.get_online_features(features=refs, entity_rows=rows).to_dict()
        assert got["behavior_embedding"][2] is None
        np.testing.assert_array_equal(np.asarray(got["behavior_embedding"][0], np.float32), syn.behaviors[101])

        # the service's direct reader (ranker.online.OnlineRows) asks for the same fields on every call:
        # Feast's Redis online_read appends a timestamp field to the list it is given
        from ranker.online import OnlineRows

        reader = OnlineRows(redis_store, ["item_embeddings:item_embedding"], "item_id")
        asked: list[list[str]] = []
        read = reader._provider.online_read
        monkeypatch.setattr(reader._provider, "online_read",
                            lambda config, fv, keys, features: asked.append(list(features)) or read(
                                config, fv, keys, features))
        for _ in range(3):
            values, found = reader.read([3, 17, 999])
            assert found.tolist() == [True, True, False]
            np.testing.assert_array_equal(np.asarray(values["item_embedding"][:2], np.float32),
                                          np.stack([syn.items[3], syn.items[17]]))
        assert asked == [["item_embedding"]] * 3

        # the rows really are in Redis: one hash per entity key, and none left once the keys are deleted
        assert len(_project_keys(client, project)) == 20 + 3 + 3  # one hash per item, user and behaviour
        _drop_project_keys(redis_store)
        assert _project_keys(client, project) == []
        assert not online_features(redis_store, 1, [3]).present["item_embedding"].any()
        # ... and the Redis apply next to it left the SQLite online store of the same data dir alone
        assert online_features(sqlite, 1, [3]).present["item_embedding"].all()
    finally:
        if redis_store is not None:
            _drop_project_keys(redis_store)
        else:  # materialize failed before a reader was opened: delete by the project suffix
            for key in _project_keys(client, project):
                client.delete(key)


def test_redis_lookup_cli_and_missing_registry(redis_conn, tmp_path, monkeypatch):
    """``llmfeat feast lookup --feature-store-yaml``: refused with the command to run before the Redis
    registry exists, then reads Redis after a materialisation."""
    from llm_features.cli.feast import command

    monkeypatch.setenv("LLMFEAT_REDIS", redis_conn)
    repo, project = _repo_with_project(tmp_path / "feast_repo")
    data = tmp_path / "data"
    write_synthetic_workspace(data)
    args = ["--repo", str(repo), "--data-dir", str(data), "--feature-store-yaml", YAML]
    with pytest.raises(UserError, match="has no Feast registry") as err:
        open_store(repo, data, fs_yaml_file=YAML, must_exist=True)
    assert f"--feature-store-yaml {YAML}" in str(err.value)

    client = _client(redis_conn)
    try:
        res = CliRunner().invoke(command, ["materialize", *args], catch_exceptions=False)
        assert res.exit_code == 0, res.output
        res = CliRunner().invoke(command, ["lookup", *args, "--user-id", "1", "--item-ids", "3", "--item-ids",
                                           "999"], catch_exceptions=False)
        assert res.exit_code == 0, res.output
        assert "item_embedding" in res.output and "present 1/2" in res.output
        assert len(_project_keys(client, project)) == 20 + 3 + 3  # one hash per item, user and behaviour
        assert not (data / "registry.db").exists() and not (data / "online_store.db").exists()
    finally:
        for key in _project_keys(client, project):
            client.delete(key)


def test_redis_local_yaml_config(tmp_path, monkeypatch):
    """The documented file loads with feast 0.67's config classes (no server): file registry of its own
    in the data dir, Redis online store from ${LLMFEAT_REDIS}, DuckDB offline store."""
    from llm_features.store import load_config

    monkeypatch.setenv("LLMFEAT_REDIS", "127.0.0.1:6399,db=3")
    repo = Path(__file__).resolve().parents[1] / "feast_repo"
    config = load_config(repo, tmp_path / "data", fs_yaml_file=YAML)
    assert config.project == "llmfeat" and config.entity_key_serialization_version == 3
    assert getattr(config.registry, "registry_type", "file") == "file"
    assert config.registry.path == str(tmp_path.resolve() / "data" / "registry_redis.db")
    assert (config.online_store.type, config.online_store.connection_string) == ("redis", "127.0.0.1:6399,db=3")
    assert config.offline_store.type == "duckdb"
    assert "${" not in repr(config.model_dump()), "every ${VAR} must be expanded"


def test_serve_from_redis_equals_sqlite(redis_conn, tmp_path, monkeypatch):
    """`llmfeat serve --feature-store-yaml production/feature_store.redis_local.yaml` scores from Redis
    exactly what it scores from the SQLite default for the same data dir and ranker."""
    from ranker.config import ServeConfig
    from ranker.service import create_app
    from tests.serving_helpers import LiveServer, train_tiny_ranker

    monkeypatch.setenv("LLMFEAT_REDIS", redis_conn)
    repo, project = _repo_with_project(tmp_path / "feast_repo")
    data = tmp_path / "data"
    syn = write_synthetic_workspace(data)
    sqlite = open_store(repo, data)
    apply_definitions(sqlite)
    materialize_all(sqlite)
    redis_store = open_store(repo, data, fs_yaml_file=YAML)
    try:
        apply_definitions(redis_store)
        materialize_all(redis_store)
        ckpt = train_tiny_ranker(tmp_path / "ranker", syn.fingerprint.digest)
        requests = [{"user_id": u, "item_ids": items} for u, items in [(1, [3, 17, 12, 20]), (2, [5, 999]), (999, [2])]]
        answers = {}
        for name, yaml in (("sqlite", None), ("redis", YAML)):
            cfg = ServeConfig(ranker=ckpt, repo=repo, data_dir=data, feature_store_yaml=yaml)
            with LiveServer(create_app(cfg)) as live:
                assert live.call("GET", "/health")[0] == 200
                answers[name] = [live.call("POST", "/score", r) for r in requests]
                if name == "redis":  # it reads Redis: without the user's keys, user 1 is a cold user
                    assert len(_project_keys(_client(redis_conn), project)) == 20 + 3 + 3
                    _drop_project_keys(redis_store)
                    cold = live.call("POST", "/score", requests[0])[2]["scores"]
        for (s_status, _, s_body), (r_status, _, r_body) in zip(answers["sqlite"], answers["redis"]):
            assert s_status == r_status == 200
            np.testing.assert_allclose(r_body["scores"], s_body["scores"], rtol=1e-6)
        assert np.abs(np.subtract(cold, answers["redis"][0][2]["scores"])).max() > 1e-6
    finally:
        _drop_project_keys(redis_store)
