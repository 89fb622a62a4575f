"""encode (and embed-users) under ``torchrun --nproc_per_node=2`` (gloo, CPU) equal one process:
the same part files, the same rows, the same vectors; a killed rank's part is written on the rerun."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_encode import EVENTS, ITEMS, table_of, write_canonical

from llm_features.parquet_io import list_parts

BIN = Path(sys.executable).parent

# more distinct texts than the two-rank test needs to give each rank several parts
MANY_ITEMS = {**ITEMS, **{i: f"Film number {i} ({1900 + i}) | Genre {i % 5}" for i in range(8, 40)}}
MANY_EVENTS = EVENTS + [(1 + i % 3, i, 20 + i) for i in range(8, 40)]


def torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    res = subprocess.run(
        [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", "--no-python", str(BIN / "llmfeat"),
         *args], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def _parts(directory: Path) -> list[str]:
    return [p.name for p in list_parts(directory)]


def test_encode_two_ranks_equal_one_process(tiny_bert_dir, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    write_canonical(one, events=MANY_EVENTS, items=MANY_ITEMS)
    shutil.copytree(one, two)
    args = ["encode", "--model", str(tiny_bert_dir), "--no-progress", "--part-size", "5", "--batch-size", "4",
            "--num-threads", "1"]
    from click.testing import CliRunner

    from llm_features.cli import main

    assert CliRunner().invoke(main, [*args, "--data-dir", str(one)]).exit_code == 0
    torchrun(*args, "--data-dir", str(two))
    for kind, key, vec in (("atomic_behavior_embeddings", "behavior_id", "behavior_embedding"),
                           ("item_embeddings", "item_id", "item_embedding")):
        assert _parts(one / kind) == _parts(two / kind) and len(_parts(one / kind)) >= 4
        a, b = table_of(one / kind, key, vec), table_of(two / kind, key, vec)
        assert set(a) == set(b)
        for k in a:
            np.testing.assert_allclose(a[k], b[k], atol=1e-5)
    r1, r2 = (json.loads((d / "encode_report.json").read_text()) for d in (one, two))
    for k in ("texts_encoded", "behavior_rows_written", "item_rows_written", "parts_written", "distinct_texts"):
        assert r1[k] == r2[k], k
    # a rank killed before its last part: the rerun writes exactly that part
    lost = list_parts(two / "atomic_behavior_embeddings")[-1]
    lost.unlink()
    torchrun(*args, "--data-dir", str(two))
    assert _parts(one / "atomic_behavior_embeddings") == _parts(two / "atomic_behavior_embeddings")
    assert json.loads((two / "encode_report.json").read_text())["parts_written"] == 1


def test_embed_users_two_ranks_equal_one_process(tiny_bert_dir, tmp_path):
    from test_embed_users import make_checkpoint, make_rows, make_workspace

    from llm_features.backbone import Backbone, BackboneConfig
    from llm_features.embed_users import read_user_embeddings

    bb = Backbone.load(BackboneConfig(model=tiny_bert_dir, split_layer=2))
    ckpt = make_checkpoint(tmp_path / "ckpt", bb, tiny_bert_dir)
    one = make_workspace(tmp_path / "one", bb, make_rows(users=7))
    two = tmp_path / "two"
    shutil.copytree(one, two)
    args = ["embed-users", "--checkpoint", str(ckpt), "--users-per-part", "2", "--num-threads", "1"]
    from click.testing import CliRunner

    from llm_features.cli import main

    res = CliRunner().invoke(main, [*args, "--data-dir", str(one)])
    assert res.exit_code == 0, res.output
    torchrun(*args, "--data-dir", str(two))
    assert _parts(one / "user_embeddings") == _parts(two / "user_embeddings")
    assert len(_parts(one / "user_embeddings")) == 4
    a, b = read_user_embeddings(one), read_user_embeddings(two)
    assert a[["user_id", "event_timestamp"]].equals(b[["user_id", "event_timestamp"]])
    np.testing.assert_allclose(np.stack(a["user_embedding"]), np.stack(b["user_embedding"]), atol=1e-5)
    lost = list_parts(two / "user_embeddings")[1]
    lost.unlink()
    out = torchrun(*args, "--data-dir", str(two))
    assert _parts(one / "user_embeddings") == _parts(two / "user_embeddings")
    assert out.stdout.count("new rows in 1 parts") == 1  # the totals, once, from rank 0
