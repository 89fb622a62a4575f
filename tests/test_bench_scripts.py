"""The fine-tuning benchmark scripts run end to end in their --quick form on ML-100K (slow: a few minutes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.datasets import ML100K, require_ml100k

BENCH = Path(__file__).resolve().parents[1] / "bench"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bench_dirs(tmp_path_factory):
    require_ml100k()
    root = tmp_path_factory.mktemp("bench")
    return root / "runs", root / "results"


def _run(script: str, runs: Path, out: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(BENCH / script), "--quick", "--source", str(ML100K),
                           "--runs", str(runs), "--out", str(out)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    name = script.removeprefix("bench_").removesuffix(".py") + "_quick"  # --quick never overwrites real results
    assert (out / f"{name}.md").exists() and (out / f"{name}.png").exists()
    return json.loads((out / f"{name}.json").read_text())


def test_bench_finetune_quick(bench_dirs):
    runs, out = bench_dirs
    r = _run("bench_finetune.py", runs, out)
    assert not [m for m in r["modes"].values() if "error" in m]
    for m in r["modes"].values():
        assert m["targets_per_s"] > 0 and m["train_rss_increase_mb"] > 0
    assert r["ratios"]["bahe_vs_token_time"] > 0 and r["ratios"]["bahe_vs_token_memory"] > 0
    assert 0.0 <= r["baselines"]["rate"]["test_auc"] <= 1.0 and 0.0 <= r["k_sweep"]["1"]["test_auc"] <= 1.0
    assert r["targets"]["train"] > 0
    recipe = r["dti_recipes"][0]
    assert recipe["recipe"] == "batch_size=8" and recipe["options"]["batch_size"] == 8
    assert 0.0 <= recipe["test_auc"] <= 1.0 and recipe["speed_vs_sw"] > 0


def test_bench_cost_quick(bench_dirs):
    runs, out = bench_dirs
    r = _run("bench_cost.py", runs, out)  # reuses the workspace the test above ingested and encoded
    for sweep in ("by_n", "by_length", "by_batch"):
        assert r[sweep]
        for pair in r[sweep].values():
            assert "error" not in pair["behavior"] and "error" not in pair["token"], pair
            assert pair["ratios"]["time"] > 0 and pair["ratios"]["memory"] > 0
    assert r["text_tokens"]["mean"] > 1


def test_bench_quality_quick(bench_dirs):
    runs, out = bench_dirs
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(BENCH / "bench_quality.py"), "--quick", "--datasets", "ml-100k",
                           "--ml100k", str(ML100K), "--runs", str(runs / "quality"), "--out", str(out),
                           "--ablations", "cross_fit", "frozen"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "quality_quick.md").exists() and (out / "quality_quick.png").exists()
    d = json.loads((out / "quality_quick.json").read_text())["datasets"]["ml-100k"]
    assert set(d["variants"]) == {"id_only", "llm", "cross_fit_score", "no_cross_fit_score", "frozen_mean_pool"}
    for key in ("llm_minus_id_only", "per_user_auc_llm_minus_id_only"):
        x = d[key]
        assert x["ci95"][0] <= x["mean"] <= x["ci95"][1] and len(x["seeds"]) == 1
    assert set(d["slices"]) == {"unseen_users", "few_train_users", "few_train_items", "rest"}
    assert sum(s["rows"] for k, s in d["slices"].items() if k != "few_train_items") <= d["rows"]["test"]
    assert set(d["baselines"]) == {"item_positive_rate", "user_item_positive_rate", "recent_positive_rate_30",
                                   "matrix_factorization"}
    assert 0.5 < d["tower_test_auc_same_rows"] < 1.0
