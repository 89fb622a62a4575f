"""feast_repo/: the definitions themselves, and the plain feast CLI run from inside the repo."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
from feast import PushSource, ValueType
from feast.types import Array, Float32, Int64, String

from llm_features.fingerprint import FINGERPRINT_TAG
from llm_features.store import load_definitions, online_features, open_store
from tests.store_data import copy_repo, write_synthetic_workspace

FEAST = Path(sys.executable).with_name("feast")


def test_definitions_match_spec(tmp_path):
    syn = write_synthetic_workspace(tmp_path / "data")
    repo = load_definitions(copy_repo(tmp_path / "feast_repo"), tmp_path / "data")
    entities = {e.name: e for e in repo.entities if e.name != "__dummy"}
    assert {n: (e.join_key, e.value_type) for n, e in entities.items()} == {
        "user": ("user_id", ValueType.INT64),
        "item": ("item_id", ValueType.INT64),
        "behavior": ("behavior_id", ValueType.INT64),
    }
    views = {fv.name: fv for fv in repo.feature_views}
    twins = {n: views.pop(n) for n in list(views) if n.endswith("__asof")}
    assert set(views) == {"atomic_behavior_embeddings", "item_embeddings", "user_embeddings",
                          "user_recent_behaviors", "user_profile", "item_profile"}
    # offline-only as-of twins of the per-user time series (llm_features.asof): same source and features
    assert set(twins) == {"user_embeddings__asof", "user_recent_behaviors__asof"}
    for name, twin in twins.items():
        base = views[name.removesuffix("__asof")]
        assert not twin.online and twin.ttl == timedelta(seconds=1) and twin.batch_source == base.batch_source
        assert [f.name for f in twin.features] == [f.name for f in base.features]
    names = [f.name for fv in views.values() for f in fv.features]
    assert len(names) == len(set(names)), "feature names must be globally unique"
    embeddings = [("atomic_behavior_embeddings", "behavior_embedding"), ("item_embeddings", "item_embedding"),
                  ("user_embeddings", "user_embedding")]
    for name, feature in embeddings:
        (f,) = views[name].features
        assert (f.name, f.dtype, f.vector_index, f.vector_length) == (feature, Array(Float32), False, 8)
        assert views[name].tags[FINGERPRINT_TAG] == syn.fingerprint.digest
    # fresh rows (llm_features.events) are pushed to the online store through a push source per view,
    # backed by the view's own part-file source
    pushed = {"atomic_behavior_embeddings", "item_embeddings", "user_embeddings", "user_recent_behaviors"}
    for name, fv in views.items():
        if name in pushed:
            assert isinstance(fv.stream_source, PushSource) and fv.stream_source.name == f"{name}_push", name
            assert fv.stream_source.batch_source == fv.batch_source
        else:
            assert fv.stream_source is None, name
    types = {f.name: f.dtype for fv in views.values() for f in fv.features}
    assert types["recent_behavior_ids"] == Array(Int64) and types["item_genres"] == Array(String)
    assert types["occupation"] == String and types["age"] == Int64  # typed from the table itself
    for fv in views.values():
        assert fv.ttl >= timedelta(days=365 * 100)
        path = Path(fv.batch_source.path)
        assert path.is_absolute() and path.exists() and path.is_relative_to(tmp_path / "data")
        assert fv.batch_source.timestamp_field == "event_timestamp"
    services = {s.name: {p.name for p in s.feature_view_projections} for s in repo.feature_services}
    assert services == {
        "ranker_llm": {"user_profile", "item_profile", "user_recent_behaviors", "item_embeddings",
                       "user_embeddings"},
        "ranker_id_only": {"user_profile", "item_profile", "user_recent_behaviors"},
    }


def _feast(repo: Path, *args: str, env: dict[str, str]) -> str:
    res = subprocess.run([str(FEAST), *args], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"feast {' '.join(args)} failed:\n{res.stdout}\n{res.stderr[-3000:]}"
    return res.stdout


def test_feast_cli_apply_materialize_and_incremental(tmp_path):
    """`feast apply`, `materialize` and `materialize-incremental` run inside the repo with no edits."""
    assert FEAST.exists(), f"feast CLI not found next to {sys.executable}"
    repo = copy_repo(tmp_path / "feast_repo")
    data = tmp_path / "data"
    syn = write_synthetic_workspace(data)
    env = {**os.environ, "LLMFEAT_DATA_DIR": str(data)}
    out = _feast(repo, "apply", env=env)
    assert "item_embeddings" in out
    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    _feast(repo, "materialize", "1999-01-01T00:00:00", now, "-v", "item_embeddings", env=env)
    _feast(repo, "materialize-incremental", now, env=env)
    # The CLI keeps its registry and online store in <repo>/data (the yaml's relative paths).
    assert (repo / "data" / "registry.db").exists() and (repo / "data" / "online_store.db").exists()
    store = open_store(repo, repo / "data")
    feats = online_features(store, 3, [4, 20])
    np.testing.assert_array_equal(feats.values["item_embedding"], np.stack([syn.items[4], syn.items[20]]))
    np.testing.assert_array_equal(feats.values["user_embedding"][0], syn.users_v1[3])


def _registered(store) -> dict:
    """What a registry holds for the project, in a comparable form (no timestamps, no registry paths)."""
    views = {
        fv.name: {
            "features": sorted((f.name, str(f.dtype)) for f in fv.features),
            "entities": sorted(fv.entities),
            "tags": dict(fv.tags),
            "ttl": fv.ttl,
            "online": fv.online,
            "source": (type(fv.batch_source).__name__, fv.batch_source.name, getattr(fv.batch_source, "path", None)),
            "stream_source": fv.stream_source.name if fv.stream_source is not None else None,
        }
        for fv in store.list_feature_views()
    }
    services = {s.name: (sorted(p.name for p in s.feature_view_projections), dict(s.tags))
                for s in store.list_feature_services()}
    entities = {e.name: (e.join_key, str(e.value_type), dict(e.tags)) for e in store.list_entities()}
    sources = sorted((type(s).__name__, s.name) for s in store.list_data_sources())
    return {"views": views, "services": services, "entities": entities, "sources": sources}


def test_llmfeat_feast_apply_registers_what_plain_feast_apply_does(tmp_path):
    """`llmfeat feast apply --data-dir D` and the plain `feast apply` run in the repository with
    LLMFEAT_DATA_DIR=D register the same objects: the same views, features, tags, sources and services."""
    from click.testing import CliRunner

    from llm_features.cli import main as cli

    repo = copy_repo(tmp_path / "feast_repo")
    data = tmp_path / "data"
    write_synthetic_workspace(data)
    _feast(repo, "apply", env={**os.environ, "LLMFEAT_DATA_DIR": str(data)})
    res = CliRunner().invoke(cli, ["feast", "apply", "--repo", str(repo), "--data-dir", str(data)])
    assert res.exit_code == 0, res.output
    plain = _registered(open_store(repo, repo / "data"))  # the plain CLI's registry: the yaml's <repo>/data
    ours = _registered(open_store(repo, data))
    assert plain["views"] and plain == ours


def test_plain_feast_cli_shows_a_bad_setting_as_a_one_line_error(tmp_path):
    """The plain `feast` CLI imports the definitions; what they cannot read is shown as llmfeat shows
    it (`Error: ...`, exit 1), not as a traceback."""
    repo = copy_repo(tmp_path / "feast_repo")
    data = tmp_path / "data"
    write_synthetic_workspace(data)
    env = {**os.environ, "LLMFEAT_DATA_DIR": str(data), "LLMFEAT_OFFLINE_STORE": "nosuchstore"}
    res = subprocess.run([str(FEAST), "apply"], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    out = res.stdout + res.stderr
    assert res.returncode == 1, out
    assert "Traceback" not in out, out
    assert "Error: offline_store.type: offline store type 'nosuchstore' has no data source mapping" in out, out
