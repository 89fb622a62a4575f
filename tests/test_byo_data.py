"""The "Bring your own data" example of docs/bring-your-own.md, run as written: every line of its
code block, in order, through the ``llmfeat`` command line, on a small shop log made to fit its
description (``clicks.csv``: ``uid,sku,ts,stars``; ``items.csv``: ``sku,title,category,price``; no
user table), from a directory laid out like the checkout (``feast_repo/`` next to the data files).
The default model (all-MiniLM-L6-v2, from its PyPI package) and every default option of the
commands are used.
"""

from __future__ import annotations

import os
import shlex
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
BYO_DOC = ROOT / "docs" / "bring-your-own.md"

CATEGORIES = ["shoes", "hats", "scarves", "bags", "socks"]


def doc_commands() -> list[list[str]]:
    """The command lines of the first ```bash block of docs/bring-your-own.md's "Bring your own data" section."""
    section = BYO_DOC.read_text().split("## Bring your own data\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [tokens for line in block.replace("\\\n", " ").splitlines()
            if (tokens := shlex.split(line, comments=True))]


def write_shop(d: Path, n_users: int = 40, n_items: int = 30, per_user: int = 20, seed: int = 0) -> None:
    """Users 1..n_users (7 among them), items 101..100+n_items; each user likes one category (4-5 stars)
    and rates the others 1-3, so the labels of rating>3 follow the category."""
    rng = np.random.default_rng(seed)
    items = pd.DataFrame({
        "sku": np.arange(101, 101 + n_items),
        "title": [f"{c.title()} model {i}" for i, c in
                  zip(range(n_items), np.resize(CATEGORIES, n_items))],
        "category": np.resize(CATEGORIES, n_items),
        "price": np.round(rng.uniform(5, 80, n_items), 2),
    })
    items.to_csv(d / "items.csv", index=False)
    likes = rng.integers(0, len(CATEGORIES), n_users)
    t0 = pd.Timestamp("2024-03-01T08:00:00Z")
    rows = []
    for u in range(n_users):
        skus = rng.choice(items.sku.to_numpy(), per_user, replace=False)
        for k, sku in enumerate(skus):
            liked = items.category[sku - 101] == CATEGORIES[likes[u]]
            stars = int(rng.integers(4, 6) if liked or rng.random() < 0.15 else rng.integers(1, 4))
            ts = t0 + pd.Timedelta(minutes=int(k * 997 + u * 13))
            rows.append((u + 1, int(sku), ts.isoformat().replace("+00:00", "Z"), stars))
    pd.DataFrame(rows, columns=["uid", "sku", "ts", "stars"]).to_csv(d / "clicks.csv", index=False)


def test_bring_your_own_data_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from llm_features.cli import main

    commands = doc_commands()
    assert [c[:3] for c in commands if c[0] == "llmfeat"][0] == ["llmfeat", "ingest", "--format"]
    shutil.copytree(ROOT / "feast_repo", tmp_path / "feast_repo",
                    ignore=shutil.ignore_patterns("data", "__pycache__"))
    write_shop(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PWD", str(tmp_path))
    outputs: dict[str, str] = {}
    for tokens in commands:
        if tokens[0] == "export":
            name, _, value = tokens[1].partition("=")
            monkeypatch.setenv(name, os.path.expandvars(value))
            continue
        assert tokens[0] == "llmfeat", f"not an llmfeat command: {tokens}"
        res = CliRunner().invoke(main, tokens[1:], catch_exceptions=False)
        assert res.exit_code == 0, f"{shlex.join(tokens)} failed:\n{res.output[-3000:]}"
        outputs[" ".join(tokens[1:3])] = res.output

    data = tmp_path / "shop_data"
    assert os.environ["LLMFEAT_DATA_DIR"] == str(data) and (data / "canonical/interactions.parquet").exists()
    # ingest shows what it kept: no user table, the two item columns besides the title
    ingest_out = outputs["ingest --format"]
    assert "user attributes: none" in ingest_out
    assert "category (categorical, inferred)" in ingest_out and "price (numeric, inferred)" in ingest_out
    # the ranker's features come from them (and so do the Feast views: no user_profile without users)
    for name in ("ranker_id_only", "ranker_llm"):
        # the stages' outputs default under the data dir, as in llmfeat demo
        metrics = json.loads((data / "runs" / name / "metrics.json").read_text())
        assert metrics["features"]["sparse"] == ["user_id", "item_id", "category", "recent_item_ids"], metrics
        assert "price" in metrics["features"]["dense"]
        assert np.isfinite(metrics["valid"]["auc"])
    assert "features (ranker_llm): sparse user_id, item_id, category, recent_item_ids" in outputs["ranker train"]
    from llm_features.store import open_store

    assert (data / "runs/finetune/model.safetensors").exists() and not (tmp_path / "runs").exists()
    views = {v.name for v in open_store(tmp_path / "feast_repo", data).list_feature_views()}
    assert "item_profile" in views and "user_profile" not in views
    # the ranked list: the four candidates, each once, with probabilities
    score = outputs["ranker score"].splitlines()
    ranked = [line.split() for line in score if line.strip().split(" ")[0].isdigit()]
    assert sorted(int(r[2]) for r in ranked) == [101, 102, 103, 104], score
    assert all(0.0 < float(r[3]) < 1.0 for r in ranked)
