"""examples/: the scripts run as a user would run them, on a small applied and materialised workspace."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa

from llm_features import parquet_io
from llm_features.store import apply_definitions, materialize_all, open_store
from llm_features.workspace import Workspace
from tests.test_store import T1, copy_repo, write_synthetic_workspace

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "feast_features_in_existing_pipeline.py"


def _write_interactions(data_dir: Path, n: int = 120, seed: int = 1) -> None:
    """canonical/interactions.parquet in the SPEC schema over the synthetic users (1-3) and items (1-20),
    split by time 80/10/10."""
    rng = np.random.default_rng(seed)
    ts = sorted(T1 + timedelta(hours=int(h)) for h in rng.choice(24 * 90, size=n, replace=False))
    split = ["train"] * int(n * 0.8) + ["valid"] * int(n * 0.1)
    split += ["test"] * (n - len(split))
    item_ids = rng.integers(1, 21, size=n)
    table = pa.table(
        {
            "user_id": pa.array(rng.integers(1, 4, size=n), pa.int64()),
            "item_id": pa.array(item_ids, pa.int64()),
            "event_timestamp": parquet_io.utc_us(ts),
            "behavior_id": pa.array(rng.choice([101, 202, 303], size=n), pa.int64()),
            "behavior_text": [f"Movie {i} (2000) | Drama" for i in item_ids],
            "label": pa.array(np.arange(n) % 2, pa.int8()),
            "rating": pa.array(rng.integers(1, 6, size=n).astype(np.float32), pa.float32()),
            "split": split,
        }
    )
    parquet_io.write_table_atomic(table, Workspace.at(data_dir).interactions)


def test_feast_features_in_existing_pipeline_runs_end_to_end(tmp_path):
    repo = copy_repo(tmp_path / "feast_repo")
    data = tmp_path / "data"
    write_synthetic_workspace(data)
    _write_interactions(data)
    store = open_store(repo, data)
    apply_definitions(store)
    materialize_all(store)

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("LLMFEAT_DATA_DIR", None)
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE), "--repo", str(repo), "--data-dir", str(data),
         "--limit", "60", "--candidates", "8"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "[historical] train rows=60 valid rows=12" in out, out
    # age + gender, then the user vector, item embedding and their product (3 x DIM=8)
    assert "features=26" in out, out
    assert "[train] logistic regression" in out and "valid AUC=" in out, out
    assert "[online] user=" in out and "candidates=8 matrix=(8, 26)" in out, out
    assert "[serve] top-5 (item_id, score):" in out, out
    assert out.rstrip().endswith("OK"), out
    assert not list(tmp_path.glob("*.db")), "nothing may be written to the CWD"
