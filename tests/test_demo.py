"""`llmfeat demo` end to end on ML-100K (a small run), then again: the second run does no work."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.datasets import ML100K, require_ml100k

REPO = Path(__file__).resolve().parents[1] / "feast_repo"

pytestmark = pytest.mark.integration


def _rows(directory: Path) -> int:
    return sum(pq.read_metadata(p).num_rows for p in directory.glob("part-*.parquet"))


def test_demo_runs_end_to_end_and_second_run_only_checks(tmp_path):
    require_ml100k()
    from llm_features.pipeline import PipelineConfig, run_pipeline

    repo = tmp_path / "feast_repo"
    shutil.copytree(REPO, repo, ignore=shutil.ignore_patterns("data"))
    cfg = PipelineConfig(source=ML100K, repo=repo, data_dir=tmp_path / "data", size="small", finetune_users=25,
                     num_candidates=20, progress=False)
    first = run_pipeline(cfg)
    ws = tmp_path / "data"
    assert first["ingest"]["counts"]["interactions"] == 100_000
    assert first["encode"]["distinct_behaviors"] > 1000
    assert first["embed_users"]["rows_written"] > 0
    for name in ("id_only", "llm"):
        assert 0.5 < first["ranker"][name]["test"]["auc"] < 1.0
    assert len(first["online"]["top10"]) == 10
    assert all((ws / "plots" / f).exists() for f in ("training_curves.png", "ranker_auc.png"))
    counts = {d: _rows(ws / d) for d in ("atomic_behavior_embeddings", "item_embeddings", "user_embeddings")}

    second = run_pipeline(cfg)
    assert second["ingest"]["skipped"]
    assert second["encode"]["texts_encoded"] == 0
    assert second["finetune"]["skipped"]
    assert second["embed_users"]["rows_written"] == 0
    assert all(r["skipped"] for r in second["ranker"].values())
    assert {d: _rows(ws / d) for d in counts} == counts  # nothing appended twice
    assert second["ranker"]["llm"]["test"] == first["ranker"]["llm"]["test"]
