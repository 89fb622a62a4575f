"""Feast as its users run it, on a copy of feast_repo/ and a small synthetic data dir in <repo>/data:
``feast -c <repo>`` from another directory (apply, materialize-incremental, feature-views list),
``feast serve`` and ``feast ui`` on a loopback port, queried over HTTP; and the definitions module
itself: it declares (no directory or file is created when it is imported) and every object carries
owner, description and tags.

Each feast command is a process of its own (~10 s of imports on a busy 2-core machine); the
repository is applied and materialised once per module.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

from llm_features.errors import UserError
from llm_features.store import load_definitions, online_features, open_store
from tests.store_data import copy_repo, write_synthetic_workspace

FEAST = Path(sys.executable).with_name("feast")
PROJECT = "llmfeat"
EMBEDDING_VIEWS = ("atomic_behavior_embeddings", "item_embeddings", "user_embeddings")


def _feast(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    res = subprocess.run([str(FEAST), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"feast {' '.join(args)} failed:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
    return res.stdout


@pytest.fixture(scope="module")
def cli_repo(tmp_path_factory):
    """(repo, synthetic data, env, elsewhere): `feast -c <repo> apply` and `materialize-incremental`
    run from ``elsewhere``, a directory that is not the repo."""
    assert FEAST.exists(), f"feast CLI not found next to {sys.executable}"
    root = tmp_path_factory.mktemp("feast_cli")
    repo = copy_repo(root / "feast_repo")
    syn = write_synthetic_workspace(repo / "data")  # the plain CLI's data dir: <repo>/data
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("LLMFEAT_DATA_DIR", "FEAST_FS_YAML_FILE_PATH")}
    out = _feast(["-c", str(repo), "apply"], elsewhere, env)
    assert "item_embeddings" in out, out
    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    out = _feast(["-c", str(repo), "materialize-incremental", now], elsewhere, env)
    assert "item_embeddings" in out and "user_embeddings" in out, out
    return repo, syn, env, elsewhere


def test_feast_c_from_another_directory(cli_repo):
    """registry and online store resolve against the repo (feature_store.yaml), never the CWD."""
    repo, syn, env, elsewhere = cli_repo
    out = _feast(["-c", str(repo), "feature-views", "list"], elsewhere, env)
    listed = {line.split()[0] for line in out.splitlines()[1:] if line.strip()}
    assert {"item_embeddings", "user_embeddings", "atomic_behavior_embeddings", "user_recent_behaviors",
            "user_profile", "item_profile"} <= listed, out
    assert not list(elsewhere.iterdir()), "nothing may be created relative to the CWD"
    assert (repo / "data" / "registry.db").is_file() and (repo / "data" / "online_store.db").is_file()
    assert not [p.name for p in (repo / "data").glob(".registry.db.*.tmp")], "a registry write left its temp file"
    # what materialize-incremental wrote is what the workspace holds
    feats = online_features(open_store(repo, repo / "data", must_exist=True), 1, [3, 20])
    np.testing.assert_array_equal(feats.values["item_embedding"], np.stack([syn.items[3], syn.items[20]]))
    np.testing.assert_array_equal(feats.values["user_embedding"][0], syn.users_v2[1])  # the newest row


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(method: str, url: str, body: dict | None = None, timeout: float = 30) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


class _Server:
    """A feast server process on loopback, in its own process group; always killed at exit."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str], log: Path):
        self.log = log
        self._log_file = open(log, "wb")
        self.proc = subprocess.Popen([str(FEAST), *args], cwd=cwd, env=env, stdout=self._log_file,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def wait_until(self, url: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                status, _ = _http("GET", url, timeout=5)
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"{url} did not answer within {timeout} s:\n{self.output()}")

    def output(self) -> str:
        self._log_file.flush()
        return self.log.read_text(errors="replace")[-4000:]

    def __enter__(self) -> "_Server":
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)  # the server and the workers it forked
                self.proc.wait(timeout=20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=10)
        self._log_file.close()


def _column(response: dict, name: str) -> list:
    i = response["metadata"]["feature_names"].index(name)
    return response["results"][i]


def test_feast_serve_answers_get_online_features(cli_repo, tmp_path):
    """`feast serve` on a free loopback port: POST /get-online-features returns the online store's vectors."""
    repo, syn, env, elsewhere = cli_repo
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    args = ["-c", str(repo), "serve", "-h", "127.0.0.1", "-p", str(port), "-w", "1", "--no-access-log"]
    with _Server(args, elsewhere, env, tmp_path / "serve.log") as server:
        server.wait_until(f"{base}/health")
        status, body = _http("POST", f"{base}/get-online-features", {
            "features": ["user_embeddings:user_embedding", "item_embeddings:item_embedding"],
            "entities": {"user_id": [1, 2], "item_id": [3, 999]},
        })
        assert status == 200, body[:2000]
        got = json.loads(body)
        status, body = _http("POST", f"{base}/get-online-features",
                             {"feature_service": "ranker_llm", "entities": {"user_id": [3], "item_id": [20]}})
        assert status == 200, body[:2000]
        by_service = json.loads(body)
    assert server.proc.returncode is not None, "the server must be stopped"

    store = open_store(repo, repo / "data", must_exist=True)
    direct = store.get_online_features(
        features=["user_embeddings:user_embedding", "item_embeddings:item_embedding"],
        entity_rows=[{"user_id": 1, "item_id": 3}, {"user_id": 2, "item_id": 999}]).to_dict()
    users, items = _column(got, "user_embedding"), _column(got, "item_embedding")
    assert users["statuses"] == ["PRESENT", "PRESENT"] and items["statuses"] == ["PRESENT", "NOT_FOUND"]
    for served, stored in zip(users["values"], direct["user_embedding"]):
        np.testing.assert_array_equal(np.float32(served), np.float32(stored))
    np.testing.assert_array_equal(np.float32(items["values"][0]), np.float32(direct["item_embedding"][0]))
    assert items["values"][1] is None and direct["item_embedding"][1] is None
    # ... which are the vectors the workspace holds (float32 survives JSON exactly)
    np.testing.assert_array_equal(np.float32(users["values"]), np.stack([syn.users_v2[1], syn.users_v1[2]]))
    np.testing.assert_array_equal(np.float32(items["values"][0]), syn.items[3])
    # a feature service by name: the ranker's embeddings and profile
    np.testing.assert_array_equal(np.float32(_column(by_service, "user_embedding")["values"][0]), syn.users_v1[3])
    np.testing.assert_array_equal(np.float32(_column(by_service, "item_embedding")["values"][0]), syn.items[20])
    assert _column(by_service, "age")["values"] == [45]


def test_feast_ui_answers_http(cli_repo, tmp_path):
    """`feast ui` (it needs grpcio: feast[grpcio], a llmfeat dependency) serves the UI and the registry."""
    repo, _, env, elsewhere = cli_repo
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    with _Server(["-c", str(repo), "ui", "-h", "127.0.0.1", "-p", str(port)], elsewhere, env,
                 tmp_path / "ui.log") as server:
        server.wait_until(f"{base}/")
        status, page = _http("GET", f"{base}/")
        assert status == 200 and b"<html" in page.lower(), page[:500]
        status, body = _http("GET", f"{base}/projects-list.json")
        assert status == 200 and json.loads(body)["projects"][0]["id"] == PROJECT, body[:500]
        status, body = _http("GET", f"{base}/api/v1/feature_views?project={PROJECT}")
        assert status == 200, body[:2000]
        names = {fv["spec"]["name"] for fv in json.loads(body)["featureViews"]}
        assert set(EMBEDDING_VIEWS) <= names, names
    assert server.proc.returncode is not None, "the UI server must be stopped"


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("data_state", ["missing", "empty"])
def test_definitions_import_creates_nothing(tmp_path, monkeypatch, data_state):
    """Importing feature_definitions.py (as `feast apply` does) reads the data dir and writes nothing."""
    repo = copy_repo(tmp_path / "feast_repo")
    data = tmp_path / "fresh" / "data"
    if data_state == "empty":
        data.mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # Python's __pycache__ is not the module's doing
    before = _tree(tmp_path)
    contents = load_definitions(repo, data)
    assert {fv.name for fv in contents.feature_views} >= set(EMBEDDING_VIEWS)  # it did declare the views
    assert _tree(tmp_path) == before, "importing the definitions created files or directories"
    sources = {fv.name: Path(fv.batch_source.path) for fv in contents.feature_views}
    assert all(p.is_relative_to(data) for p in sources.values()), sources


def test_old_sql_registry_is_refused_with_a_fix(tmp_path):
    """A data dir whose registry.db is the SQL registry of an earlier llmfeat: a clear error, not a DecodeError."""
    import sqlite3

    repo = copy_repo(tmp_path / "feast_repo")
    data = tmp_path / "data"
    data.mkdir()
    with sqlite3.connect(data / "registry.db") as conn:
        conn.execute("CREATE TABLE projects (project_id TEXT)")
    with pytest.raises(UserError, match=r"registry.db: is the SQL registry of an earlier llmfeat.*rm "):
        open_store(repo, data)


def test_every_object_has_owner_description_and_tags(tmp_path):
    """Entities, feature views, on-demand views and feature services of the definitions module (and of
    the registry after apply) all say who owns them, what they are, and carry tags."""
    from feast import FeatureStore

    from llm_features.store import apply_definitions

    repo = copy_repo(tmp_path / "feast_repo")
    data = tmp_path / "data"
    write_synthetic_workspace(data)
    contents = load_definitions(repo, data)
    from feast import PushSource

    pushes = [s for s in contents.data_sources if isinstance(s, PushSource)]
    objects = [*[e for e in contents.entities if e.name != "__dummy"], *contents.feature_views,
               *contents.on_demand_feature_views, *contents.feature_services, *pushes]
    assert len(contents.feature_views) == 8 and len(contents.feature_services) == 2 and len(pushes) == 4
    for obj in objects:
        kind = type(obj).__name__
        assert obj.owner, f"{kind} {obj.name} has no owner"
        assert obj.description, f"{kind} {obj.name} has no description"
        assert obj.tags, f"{kind} {obj.name} has no tags"
    for fv in contents.feature_views:
        assert not any(f.vector_index for f in fv.features), f"{fv.name}: vector_index (feast_repo/README.md: Vector search)"
    # the same survives the registry
    store = open_store(repo, data)
    apply_definitions(store)
    assert isinstance(store, FeatureStore)
    registered = [*store.list_entities(), *store.list_feature_views(), *store.list_feature_services(),
                  *[s for s in store.list_data_sources() if isinstance(s, PushSource)]]
    assert len(registered) == len(objects)
    for obj in registered:
        assert obj.owner and obj.description and obj.tags, f"{type(obj).__name__} {obj.name} after apply"


def test_ingest_leaves_every_source_readable_for_the_plain_cli(tmp_path):
    """The definitions write nothing, so `llmfeat ingest` leaves a schema-only placeholder in each
    part-file directory no stage has filled yet (DuckDB cannot read an empty one); encode's first
    part replaces it."""
    from llm_features import parquet_io
    from llm_features.feast_sources import PART_DIR_SCHEMAS, prepare_sources
    from tests.test_ingest import run, write_ml1m

    _, ws = run(tmp_path, source=write_ml1m(tmp_path / "ml"))
    assert prepare_sources(ws) == [], "ingest left a source for the plain feast CLI to prepare"
    for name in PART_DIR_SCHEMAS:
        directory = getattr(ws, name)
        files = sorted(p.name for p in directory.glob("*.parquet"))
        if name == "user_recent_behaviors":
            assert files and parquet_io.PLACEHOLDER_PART not in files, files  # ingest wrote real parts
        else:
            assert files == [parquet_io.PLACEHOLDER_PART], (name, files)
    table = PART_DIR_SCHEMAS["item_embeddings"].empty_table()
    parquet_io.write_part(ws.item_embeddings, table)
    assert [p.name for p in ws.item_embeddings.glob("*.parquet")] == [p.name for p in
                                                                      parquet_io.list_parts(ws.item_embeddings)]
