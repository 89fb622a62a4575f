"""Spark as a drop-in: the same definitions under the Spark offline store and the Spark engine give
exactly the rows of the DuckDB default.

On ML-100K (ingested in full, encoded with a tiny BERT, user embeddings from ``embed_users`` with a
randomly initialised tower checkpoint: real stages, small models), two copies of the same workspace
are applied, one with ``feast_repo/feature_store.yaml`` (DuckDB, local engine, SQLite) and one with the
documented file ``feast_repo/production/feature_store.spark_local.yaml`` (Spark offline store and
``spark.engine`` in local[2] mode, SQLite). Nothing in the definitions is edited. Then:

* the ranker's historical fetch (``ranker.train.feast_source`` over ``ranker_llm``) for the 10,000
  rows of the test split returns the same rows from both: same keys and labels, the same feature row
  chosen point in time for every view (the user-embedding snapshots and recent-behaviour lists differ
  per version, so a different choice shows; both are also checked against the latest version at or
  before each row's timestamp, computed with pandas), the same vectors bit for bit;
* ``materialize_all`` through the Spark engine leaves the same online rows as the local engine: every
  user, item and behaviour key, with the same values and the same feature timestamps.

The entity rows are the test split only, not all 100,000 interactions: a point-in-time join in Spark on
2 cores takes about a minute for 10,000 rows here (DuckDB: a few seconds), and the full set would take
several; every source is the full ML-100K one.

Needs pyspark (``pip install -e '.[spark]'``) and Java 17+. Without them the Spark tests are skipped,
except under CI (``CI`` set), where that is a failure: ``.ci/run`` installs both.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from llm_features.errors import UserError
from llm_features.offline_sources import (
    OFFLINE_STORE_ENV,
    configured_offline_store,
    parquet_source,
    spark_session_defaults,
)
from tests.datasets import ML100K, require_ml100k
from tests.store_data import copy_repo, write_synthetic_workspace

SPARK_YAML = "production/feature_store.spark_local.yaml"
KEYS = ["user_id", "item_id", "event_timestamp"]

pytestmark = pytest.mark.filterwarnings(
    "ignore:The spark (data source API|offline store) is an experimental feature:RuntimeWarning"
)


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _java_major(java: str) -> int | None:
    out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60)
    m = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if not m:
        return None
    major = int(m.group(1))
    return int(m.group(2) or 0) if major == 1 else major  # "1.8.0" is Java 8


def spark_missing() -> str | None:
    """Why Spark cannot run here (None: it can)."""
    if importlib.util.find_spec("pyspark") is None:
        return "pyspark is not installed: pip install -e '.[spark]' (scripts/bootstrap.sh does)"
    home = os.environ.get("JAVA_HOME")
    java = str(Path(home) / "bin" / "java") if home else shutil.which("java")
    if not java or not Path(java).exists():
        return "no Java runtime: apt-get install -y openjdk-17-jre-headless (.ci/run does)"
    major = _java_major(java)
    if major is None or major < 17:
        return f"{java} is Java {major}; Spark 4 needs Java 17 or newer"
    return None


def require_spark() -> None:
    """Skip (fail under CI) unless pyspark and Java 17+ are there."""
    reason = spark_missing()
    if reason is None:
        return
    if _in_ci():
        pytest.fail(f"CI is set but Spark cannot run: {reason}")
    pytest.skip(f"Spark cannot run here: {reason}")


def stop_spark() -> None:
    """Stop the session feast started (it lives on in the process otherwise, JVM included)."""
    if importlib.util.find_spec("pyspark") is None:
        return
    from pyspark.sql import SparkSession

    session = SparkSession.getActiveSession()
    if session is not None:
        session.stop()


# ---------------------------------------------------------------------------------------------
# The definitions follow the configured store (no Spark needed)


def test_definitions_declare_the_source_class_of_the_offline_store(tmp_path, monkeypatch):
    from feast import FileSource, PushSource
    from feast.infra.offline_stores.contrib.spark_offline_store.spark_source import SparkSource

    from llm_features.store import load_definitions

    repo = copy_repo(tmp_path / "feast_repo")
    data = tmp_path / "data"
    write_synthetic_workspace(data)
    monkeypatch.delenv(OFFLINE_STORE_ENV, raising=False)
    duck = load_definitions(repo, data, offline_store="duckdb")
    spark = load_definitions(repo, data, offline_store="spark")
    # the push sources (llm_features.events) are backed by the same class as every other source
    for r, cls in ((duck, FileSource), (spark, SparkSource)):
        pushes = [s for s in r.data_sources if isinstance(s, PushSource)]
        assert len(pushes) == 4 and all(type(s.batch_source) is cls for s in pushes)

    def batch(r):
        return [s for s in r.data_sources if not isinstance(s, PushSource)]

    assert batch(duck) and all(type(s) is FileSource for s in batch(duck))
    assert all(type(s) is SparkSource for s in batch(spark))

    def sources(r):
        return {s.name: (s.path, s.timestamp_field, s.created_timestamp_column) for s in batch(r)}

    assert sources(duck) == sources(spark) and len(sources(duck)) == 6
    assert all(Path(p).is_absolute() and Path(p).is_relative_to(data) for p, _, _ in sources(spark).values())
    assert {s.file_format for s in batch(spark)} == {"parquet"}

    def views(r):
        return {fv.name: ([(f.name, f.dtype, f.vector_length) for f in fv.schema], fv.entities, fv.ttl,
                          dict(fv.tags), fv.batch_source.name) for fv in r.feature_views}

    assert views(duck) == views(spark)
    assert {fs.name for fs in duck.feature_services} == {fs.name for fs in spark.feature_services}
    assert os.environ.get(OFFLINE_STORE_ENV) is None, "load_definitions must restore the environment"


def test_configured_offline_store_resolution(tmp_path, monkeypatch):
    import click

    repo = copy_repo(tmp_path / "feast_repo")
    monkeypatch.delenv(OFFLINE_STORE_ENV, raising=False)
    monkeypatch.delenv("FEAST_FS_YAML_FILE_PATH", raising=False)
    assert configured_offline_store(repo) == "duckdb"  # feature_store.yaml
    monkeypatch.setenv("FEAST_FS_YAML_FILE_PATH", str(repo / SPARK_YAML))
    assert configured_offline_store(repo) == "spark"
    # `feast -f FILE ...`: the feast CLI's click context names the file
    with click.Context(click.Command("apply"), obj={"FS_YAML_FILE": repo / "feature_store.yaml"}):
        assert configured_offline_store(repo) == "duckdb"
    monkeypatch.setenv(OFFLINE_STORE_ENV, "spark")  # set by llm_features.store: wins over any yaml
    assert configured_offline_store(repo) == "spark"
    with pytest.raises(UserError, match="offline store type 'bigquery'.*duckdb, file, dask, spark"):
        parquet_source("x", tmp_path, "bigquery")


def test_feast_cli_f_flag_applies_spark_sources(tmp_path, monkeypatch):
    """The plain feast CLI: `feast -f production/feature_store.spark_local.yaml apply` registers
    SparkSources, plain `feast apply` FileSources (source validation skipped: no Spark session)."""
    from click.testing import CliRunner
    from feast import FileSource
    from feast.cli.cli import cli
    from feast.infra.offline_stores.contrib.spark_offline_store.spark_source import SparkSource

    from llm_features.store import open_store

    repo = copy_repo(tmp_path / "feast_repo")
    data = tmp_path / "data"
    write_synthetic_workspace(data)
    monkeypatch.setenv("LLMFEAT_DATA_DIR", str(data))
    monkeypatch.delenv(OFFLINE_STORE_ENV, raising=False)
    monkeypatch.delenv("FEAST_FS_YAML_FILE_PATH", raising=False)
    monkeypatch.chdir(repo)  # apply chdirs into the repo; the relative sqlite registry resolves there
    monkeypatch.setattr(sys, "path", list(sys.path))
    kinds = {}
    for label, args in (("spark", ["-f", str(repo / SPARK_YAML)]), ("duckdb", [])):
        sys.modules.pop("feature_definitions", None)  # feast imports it by module name; a CLI run is fresh
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # feast: "spark data source ... experimental"
            result = CliRunner().invoke(cli, [*args, "apply", "--skip-source-validation"], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        store = open_store(repo, repo / "data")  # where the CLI keeps its registry
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # feast: "spark data source ... experimental"
            kinds[label] = {type(fv.batch_source) for fv in store.list_feature_views()}
    sys.modules.pop("feature_definitions", None)
    assert kinds["spark"] == {SparkSource}
    assert kinds["duckdb"] == {FileSource}


def test_spark_session_defaults():
    from types import SimpleNamespace

    conf = {"spark.master": "local[2]"}
    config = SimpleNamespace(offline_store=SimpleNamespace(spark_conf=conf), batch_engine=SimpleNamespace())
    old = os.environ.pop("PYSPARK_PYTHON", None)
    try:
        spark_session_defaults(config)
        assert conf["spark.sql.session.timeZone"] == "UTC"
        assert os.environ["PYSPARK_PYTHON"] == sys.executable  # local workers run this interpreter
    finally:
        os.environ.pop("PYSPARK_PYTHON", None)
        if old is not None:
            os.environ["PYSPARK_PYTHON"] = old
    bad = SimpleNamespace(offline_store=SimpleNamespace(spark_conf={"spark.sql.session.timeZone": "Europe/Paris"}))
    with pytest.raises(UserError, match="offline_store.spark_conf.*Europe/Paris.*UTC"):
        spark_session_defaults(bad)


# ---------------------------------------------------------------------------------------------
# ML-100K: Spark against DuckDB, row for row


@pytest.fixture(scope="module")
def ml100k_both(tmp_path_factory, tiny_bert_dir):
    """The same ML-100K workspace applied, fetched and materialised with DuckDB and with Spark."""
    require_spark()
    require_ml100k()
    import torch

    from llm_features.backbone import Backbone, BackboneConfig
    from llm_features.config import RuntimeArgs
    from llm_features.embed_users import EmbedUsersConfig, embed_users
    from llm_features.encode import EncodeConfig, encode
    from llm_features.finetune import FinetuneConfig
    from llm_features.finetune.checkpoint import build_model, save_checkpoint
    from llm_features.ingest.core import IngestConfig, ingest
    from llm_features.store import apply_definitions, materialize_all, open_store
    from ranker.train import feast_source, load_entities

    root = tmp_path_factory.mktemp("spark_ml100k")
    data = root / "data"
    ingest(IngestConfig(source=ML100K, data_dir=data))
    encode(EncodeConfig(backbone=BackboneConfig(model=tiny_bert_dir, split_layer=2), data_dir=data,
                        progress=False, batch_size=256))
    # user embeddings from the real embed-users stage, with an untrained (random) tower: the values
    # only have to differ per user and per snapshot
    bb = Backbone.load(BackboneConfig(model=tiny_bert_dir, split_layer=2))
    ckpt_cfg = FinetuneConfig(backbone=BackboneConfig(model=tiny_bert_dir, split_layer=2), context_size=8,
                              head_hidden=8, out=root / "ckpt")
    torch.manual_seed(0)
    model = build_model(ckpt_cfg, bb, bb.fingerprint.hidden_size)
    with torch.no_grad():
        model.distance_bias.table.normal_(0, 1.0)
        model.query.normal_(0, 1.0)
        model.feedback.weight.normal_(0, 1.0)
    save_checkpoint(root / "ckpt", model, ckpt_cfg, item_dim=bb.fingerprint.hidden_size)
    embed_users(EmbedUsersConfig(checkpoint=root / "ckpt", data_dir=data, every=20,
                                 runtime=RuntimeArgs(device="cpu", num_threads=1)))
    del bb, model

    entities = load_entities(data / "canonical" / "interactions.parquet", "test")
    out = {"entities": entities.copy()}
    pyspark_python = os.environ.get("PYSPARK_PYTHON")  # open_store sets it for the local[2] master
    try:
        for name, yaml in (("duckdb", None), ("spark", SPARK_YAML)):
            shutil.copytree(data, root / name / "data")
            repo = copy_repo(root / name / "feast_repo")
            store = open_store(repo, root / name / "data", fs_yaml_file=yaml)
            apply_definitions(store)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # feast: "spark ... experimental"
                frame = feast_source(store, "ranker_llm")(entities)
                report = materialize_all(store)
            out[name] = {"store": store, "frame": frame, "report": report}
        out["entities_after"] = entities
        yield out
    finally:
        stop_spark()
        if pyspark_python is None:
            os.environ.pop("PYSPARK_PYTHON", None)


def _sorted(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sort_values(KEYS, kind="stable", ignore_index=True)


def _missing(v) -> bool:
    return v is None or (np.isscalar(v) and pd.isna(v))


def _assert_cells_equal(col: str, a: pd.Series, b: pd.Series) -> None:
    for i, (x, y) in enumerate(zip(a, b)):
        if _missing(x) or _missing(y):
            assert _missing(x) and _missing(y), f"{col} row {i}: {x!r} vs {y!r}"
        elif isinstance(x, np.ndarray):
            assert isinstance(y, np.ndarray) and x.dtype == y.dtype, f"{col} row {i}: {x!r} vs {y!r}"
            assert np.array_equal(x, y), f"{col} row {i}: {x} vs {y}"
        else:
            assert type(x) is type(y) and x == y, f"{col} row {i}: {x!r} vs {y!r}"


def test_spark_applies_spark_sources(ml100k_both):
    from feast import FileSource, PushSource
    from feast.infra.offline_stores.contrib.spark_offline_store.spark_source import SparkSource

    duck, spark = ml100k_both["duckdb"]["store"], ml100k_both["spark"]["store"]
    assert spark.config.offline_store.type == "spark" and spark.config.batch_engine.type == "spark.engine"
    assert spark.config.offline_store.spark_conf["spark.master"] == "local[2]"
    d = {fv.name: fv.batch_source for fv in duck.list_feature_views()}
    s = {fv.name: fv.batch_source for fv in spark.list_feature_views()}
    assert set(d) == set(s) and len(d) == 8  # six views and the two as-of twins
    for name in d:
        assert type(d[name]) is FileSource and type(s[name]) is SparkSource, name
        assert d[name].name == s[name].name and d[name].timestamp_field == s[name].timestamp_field
        # the same table, in the other copy of the workspace
        assert Path(d[name].path).relative_to(duck.config.repo_path.parent / "data") == Path(
            s[name].path
        ).relative_to(spark.config.repo_path.parent / "data")


def test_historical_features_equal_duckdb(ml100k_both):
    entities = ml100k_both["entities"]
    a = _sorted(ml100k_both["duckdb"]["frame"])
    b = _sorted(ml100k_both["spark"]["frame"])
    assert len(entities) == 10_000 and len(a) == len(b) == len(entities), "no entity row may be dropped"
    assert list(a.columns) == list(b.columns)
    # the ranker's fetch gives the entity timestamps back in the entity frame's dtype from both stores
    assert a.dtypes.to_dict() == b.dtypes.to_dict()
    assert b["event_timestamp"].dtype == entities["event_timestamp"].dtype == "datetime64[us, UTC]"
    pd.testing.assert_frame_equal(ml100k_both["entities_after"], entities)  # the caller's frame is untouched
    # ... so the ranker's prefetch (benchmarks, sweeps) finds its entity rows in Spark's answer
    from ranker.train import PrefetchedSource

    spark_frame = ml100k_both["spark"]["frame"]
    pre = PrefetchedSource(lambda chunk: spark_frame.copy(), entities, chunk_rows=len(entities))
    assert pre(entities.iloc[:50])["item_id"].tolist() == entities["item_id"].iloc[:50].tolist()
    pd.testing.assert_frame_equal(a[KEYS + ["label"]], _sorted(entities)[KEYS + ["label"]])
    for col in a.columns:
        if a[col].dtype == object:
            _assert_cells_equal(col, a[col], b[col])
        else:
            np.testing.assert_array_equal(a[col].to_numpy(), b[col].to_numpy(), err_msg=col)

    # the comparison covers the point-in-time choice: users have several snapshots, some rows have none
    users = a["user_embedding"]
    present = users.map(lambda v: not _missing(v))
    assert 0 < (~present).sum() < len(a) // 4
    distinct = a[present].groupby("user_id")["user_embedding"].agg(lambda s: len({v.tobytes() for v in s}))
    assert (distinct > 1).sum() > 100, "many users should get different snapshots at different times"
    assert a["recent_item_ids"].map(len).nunique() > 1
    assert a["item_embedding"].map(lambda v: v.shape).unique().tolist() == [(32,)]

    # ... and both chose the right rows: the latest version at or before each entity timestamp
    from llm_features.parquet_io import read_parts
    from llm_features.workspace import Workspace

    ws = Workspace.at(ml100k_both["duckdb"]["store"].config.repo_path.parent / "data")
    for directory, column in ((ws.user_embeddings, "user_embedding"), (ws.user_recent_behaviors, "recent_item_ids")):
        versions = read_parts(directory).select(["user_id", column, "event_timestamp"]).to_pandas()
        versions["chosen"] = versions["event_timestamp"]  # the version's own timestamp, kept by the join
        expected = pd.merge_asof(
            a[KEYS].reset_index().sort_values("event_timestamp"), versions.sort_values("event_timestamp"),
            on="event_timestamp", by="user_id", direction="backward", allow_exact_matches=True,
        ).set_index("index").sort_index()
        assert expected["chosen"].notna().sum() > len(a) // 2, column
        _assert_cells_equal(column, a[column], expected[column])


def test_materialization_equal_duckdb(ml100k_both):
    import pyarrow.parquet as pq

    from llm_features.workspace import Workspace

    duck, spark = ml100k_both["duckdb"]["store"], ml100k_both["spark"]["store"]
    rd, rs = ml100k_both["duckdb"]["report"], ml100k_both["spark"]["report"]
    assert rd.entities == rs.entities and rd.source_rows == rs.source_rows
    assert rs.entities["user_embeddings"] == 943 and rs.entities["item_embeddings"] == 1682

    ws = Workspace.at(ml100k_both["duckdb"]["store"].config.repo_path.parent / "data")
    inter = pq.read_table(ws.interactions, columns=["user_id", "item_id", "behavior_id"])
    keys = {
        "user_id": sorted(set(inter["user_id"].to_pylist())) + [10_000],  # + one unknown key
        "item_id": sorted(set(pq.read_table(ws.items, columns=["item_id"])["item_id"].to_pylist())) + [99_999],
        "behavior_id": sorted(set(inter["behavior_id"].to_pylist())) + [1],
    }
    compared = 0
    for fv in [v for v in duck.list_feature_views() if v.online]:  # the as-of twins are offline only
        (key,) = fv.join_keys
        refs = [f"{fv.name}:{f.name}" for f in fv.features]
        rows = [{key: int(k)} for k in keys[key]]
        got = {}
        for name, store in (("duckdb", duck), ("spark", spark)):
            got[name] = store.get_online_features(features=refs, entity_rows=rows).to_dict(
                include_event_timestamps=True
            )
        assert got["duckdb"].keys() == got["spark"].keys()
        for col in got["duckdb"]:
            x, y = got["duckdb"][col], got["spark"][col]
            assert len(x) == len(y) == len(rows)
            for i, (u, v) in enumerate(zip(x, y)):
                if isinstance(u, list):
                    assert isinstance(v, list) and np.array_equal(np.asarray(u), np.asarray(v)), (fv.name, col, i)
                else:
                    assert u == v, (fv.name, col, i, u, v)
        present = [v is not None for v in got["spark"][refs[0].split(":")[1]]]
        assert sum(present) == rs.entities[fv.name] and not present[-1], fv.name
        compared += sum(present)
    assert compared == 3 * 943 + 2 * 1682 + rs.entities["atomic_behavior_embeddings"]
