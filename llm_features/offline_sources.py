"""Which Feast data source class the definitions declare: the one the configured offline store reads.

``feast_repo/feature_definitions.py`` declares every source through :func:`parquet_source`, so the
same definitions work with every offline store this repository supports:

==========================================  ==========================================================
offline store (``offline_store.type``)      data source
==========================================  ==========================================================
``duckdb`` (the default yaml), ``file``     ``FileSource(path, file_format=ParquetFormat())``
(``dask``)
``spark``                                   ``SparkSource(path, file_format="parquet")``
==========================================  ==========================================================

Both have the same name, path, timestamp field and (inferred) schema; only the class differs, because
feast's Spark offline store refuses FileSources and the DuckDB one refuses SparkSources.

The definitions learn the store type, first match wins, from:

1. ``$LLMFEAT_OFFLINE_STORE`` (``llm_features.store.load_definitions`` sets it from the config it
   applies, so ``open_store(..., fs_yaml_file=...)`` / ``llmfeat feast`` always agree with their yaml);
2. the yaml the running feast CLI was given (``feast -f FILE apply``: read from its click context);
3. ``$FEAST_FS_YAML_FILE_PATH`` (feast's own variable for the same thing);
4. ``<repo>/feature_store.yaml``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from llm_features.errors import UserError

OFFLINE_STORE_ENV = "LLMFEAT_OFFLINE_STORE"
FEAST_YAML_ENV = "FEAST_FS_YAML_FILE_PATH"  # feast.constants.FEAST_FS_YAML_FILE_PATH_ENV_NAME
SPARK_OFFLINE_STORE_CLASS = "feast.infra.offline_stores.contrib.spark_offline_store.spark.SparkOfflineStore"
FILE_STORES = ("duckdb", "file", "dask")
SPARK_STORES = ("spark", SPARK_OFFLINE_STORE_CLASS)
SUPPORTED = FILE_STORES + ("spark",)
TIMESTAMP_FIELD = "event_timestamp"


def offline_store_type_of(config: Any) -> str:
    """``offline_store.type`` of a loaded ``RepoConfig`` (feast's default is ``dask``)."""
    store = getattr(config, "offline_store", None)
    return str(getattr(store, "type", None) or "dask")


def _feast_cli_yaml() -> Path | None:
    """The yaml of the feast CLI command running now (``feast [-f FILE] apply``), if any."""
    try:
        import click
    except ImportError:  # pragma: no cover - click comes with feast
        return None
    ctx = click.get_current_context(silent=True)
    obj = ctx.find_root().obj if ctx is not None else None
    if isinstance(obj, dict) and obj.get("FS_YAML_FILE"):
        return Path(obj["FS_YAML_FILE"])
    return None


def _yaml_store_type(yaml_file: Path) -> str:
    import yaml

    try:
        data = yaml.safe_load(os.path.expandvars(yaml_file.read_text())) or {}
    except (OSError, yaml.YAMLError) as err:
        raise UserError(f"cannot read the offline store type: {err}", file=yaml_file) from err
    store = data.get("offline_store") if isinstance(data, dict) else None
    if isinstance(store, str):
        return store
    if isinstance(store, dict) and store.get("type"):
        return str(store["type"])
    return "dask"


def configured_offline_store(repo_dir: str | os.PathLike) -> str:
    """The offline store type the definitions in ``repo_dir`` are being applied for (see module doc)."""
    env = os.environ.get(OFFLINE_STORE_ENV, "").strip()
    if env:
        return env
    yaml_file = _feast_cli_yaml()
    if yaml_file is None and os.environ.get(FEAST_YAML_ENV):
        yaml_file = Path(os.environ[FEAST_YAML_ENV])
    if yaml_file is None:
        yaml_file = Path(repo_dir) / "feature_store.yaml"
    if not yaml_file.is_file():
        return "duckdb"  # no yaml to read (e.g. definitions imported on their own): the default store
    return _yaml_store_type(yaml_file)


def source_kind(store_type: str) -> str:
    """``"file"`` or ``"spark"``: the data source family ``store_type`` reads."""
    if store_type in FILE_STORES:
        return "file"
    if store_type in SPARK_STORES:
        return "spark"
    raise UserError(
        f"offline store type '{store_type}' has no data source mapping in llmfeat's definitions",
        option="offline_store.type",
        fix=f"use one of {', '.join(SUPPORTED)} (see feast_repo/production/README.md)",
    )


def parquet_source(name: str, path: str | os.PathLike, store_type: str):
    """A Feast data source over parquet at ``path`` (a file or a directory of part files), of the
    class that ``store_type``'s offline store reads; same name, path and timestamp field for all."""
    if source_kind(store_type) == "spark":
        import warnings

        from feast.infra.offline_stores.contrib.spark_offline_store.spark_source import SparkSource

        with warnings.catch_warnings():
            # "The spark data source API is an experimental feature in alpha development": once per
            # source otherwise (six per apply); the README says the Spark store is feast contrib.
            warnings.filterwarnings("ignore", message="The spark data source API", category=RuntimeWarning)
            return SparkSource(
                name=name, path=str(path), file_format="parquet", timestamp_field=TIMESTAMP_FIELD
            )
    from feast import FileSource
    from feast.data_format import ParquetFormat

    return FileSource(name=name, path=str(path), file_format=ParquetFormat(), timestamp_field=TIMESTAMP_FIELD)


def spark_session_defaults(config: Any) -> None:
    """Settings every Spark session llmfeat starts needs, filled into a loaded ``RepoConfig``.

    * ``spark.sql.session.timeZone: UTC`` in each ``spark_conf`` block that does not set it. Spark
      returns the entity timestamps of ``get_historical_features`` tz-naive, in the session time zone;
      llmfeat reads them as UTC (``ranker.train.feast_source``), so another zone is refused.
    * ``$PYSPARK_PYTHON``: the Spark engine writes the online store from Python workers, which
      pyspark starts with ``$PYSPARK_PYTHON``, else ``python3`` from PATH (it reads only the
      environment variable, not ``spark.pyspark.python``); outside the virtual environment's PATH
      that is an interpreter without feast (``No module named 'feast'`` in the worker). When a block's
      ``spark.master`` is ``local[...]`` the workers run on this machine, so an unset
      ``$PYSPARK_PYTHON`` becomes ``sys.executable``. A cluster's executors need a Python with
      llmfeat's requirements of their own, named by ``$PYSPARK_PYTHON`` (not set here).
    """
    import sys

    local = False
    for name in ("offline_store", "batch_engine"):
        block = getattr(config, name, None)
        if block is None or not hasattr(block, "spark_conf"):
            continue
        if block.spark_conf is None:
            block.spark_conf = {}
        conf = block.spark_conf
        zone = conf.setdefault("spark.sql.session.timeZone", "UTC")
        if zone.upper() not in ("UTC", "Z", "+00:00", "ETC/UTC"):
            raise UserError(
                f"spark.sql.session.timeZone is '{zone}'; llmfeat reads Spark's timestamps as UTC",
                option=f"{name}.spark_conf",
                fix="set spark.sql.session.timeZone: \"UTC\" (or remove it: UTC is the default here)",
            )
        local = local or str(conf.get("spark.master", "")).startswith("local")
    if local and not os.environ.get("PYSPARK_PYTHON"):
        os.environ["PYSPARK_PYTHON"] = sys.executable
