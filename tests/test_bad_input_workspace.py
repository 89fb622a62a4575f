"""Bad input to the data dir as a unit (issue 16): copies and moves, concurrent writers, linked
table directories, an unmaterialised online store, and the ranker's and feast commands' misuse.

Every refusal is checked with :func:`tests.bad_input.run_bad`: exit code 1, a one- or two-line
message naming the file or option and what to do, no traceback, nothing changed on disk.

Classes (25):
1. a copied data dir: opening, `feast apply` and `feast materialize` on the copy work on the
   copy's own files (the original stays byte-identical and its lookups work; the copy's registered
   sources, which `ranker train` reads, are the copy's tables)
2. a moved data dir: `feast materialize` on it works; the old place is not recreated
3. a second writer on a data dir in use (ingest, encode, embed-users, feast apply, feast
   materialize, demo): refused, naming the holder's pid, command and start time
4. a table directory that is a symbolic link out of the data dir (encode, embed-users --overwrite,
   parquet_io writers): refused before anything is written or unlinked
5. `ranker score` / `feast lookup` on an online store that was never materialised
6. an out-of-range ranker option on the command line (epochs, patience, batch size, lr, ...)
7. an out-of-range ranker option in a --config file
8. a --data-dir that does not exist, for a reader (lookup, ranker score/train/evaluate): not created
9. a data dir without a Feast registry (never applied), for a reader
10. a data dir whose registry holds another Feast project
11. embedding parts of another model at `feast materialize` (checked before apply rewrites the registry)
12. `feast materialize --views` naming a view the repository does not define
13. `feast materialize --no-apply` before any apply
14. a --repo that is not a Feast repository (no feature_store.yaml)
15. `feast lookup --service` naming an unknown feature service
16. a ranker --checkpoint directory that holds no checkpoint
17. a ranker checkpoint of another format (or unreadable ranker.json)
18. `ranker train` (the +LLM twin) before user embeddings exist and without --tower
19. `ranker train` before ingest (no canonical interactions)
20. `ranker train --tower` pointing at a directory without fine-tuned weights
21. `ranker score --items` with a token that is not an integer id
22. `ranker score --items` naming the same candidate twice
23. `ranker evaluate` of a checkpoint trained on another model's embeddings
24. `ranker evaluate --split` with no rows in that split
25. `feast lookup` without the required --user-id
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import yaml
from click.testing import CliRunner

import llm_features
from llm_features import parquet_io
from llm_features.cli import main
from llm_features.errors import UserError
from llm_features.fingerprint import FINGERPRINT_METADATA_KEY
from llm_features.workspace import Workspace
from tests.bad_input import run_bad, snapshot
from tests.store_data import DIM, T2, embedding_table, copy_repo, make_fingerprint, write_synthetic_workspace
from tests.datasets import ML100K

LOCK_FILE = ".llmfeat.lock"  # llm_features.workspace.LOCK_FILE


def ok(args: list) -> str:
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    assert res.exit_code == 0, res.output
    return res.output


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return copy_repo(tmp_path_factory.mktemp("ws_repo") / "feast_repo")


def materialized_dir(repo: Path, data: Path) -> Path:
    write_synthetic_workspace(data)
    ok(["feast", "materialize", "--repo", repo, "--data-dir", data])
    return data


def lookup(repo: Path, data: Path, user: int = 1, item: int = 3) -> str:
    return ok(["feast", "lookup", "--repo", repo, "--data-dir", data, "--user-id", user, "--item-ids", item])


def item_vector(repo: Path, data: Path, item: int) -> np.ndarray:
    from llm_features.store import online_features, open_store

    feats = online_features(open_store(repo, data), 1, [item])
    assert feats.present["item_embedding"].all()
    return feats.values["item_embedding"][0]


# ------------------------------------------------------------------------------------------------
# 1, 2: copies and moves


def test_copied_data_dir_works_on_its_own_files(repo, tmp_path):
    from llm_features.store import open_store, registered_workspace

    original = materialized_dir(repo, tmp_path / "data")
    before = item_vector(repo, original, 3)
    copy = Path(shutil.copytree(original, tmp_path / "copy"))
    frozen = snapshot(original)

    # a reader of the copy (ranker train opens the store like this) reads the copy's tables
    assert registered_workspace(open_store(repo, copy)).root == copy.resolve()
    ok(["feast", "apply", "--repo", repo, "--data-dir", copy])
    ok(["feast", "materialize", "--repo", repo, "--data-dir", copy])
    assert snapshot(original) == frozen, "feast apply/materialize of a copy changed the original"
    assert "item_embedding         present 1/1" in lookup(repo, original)

    # a new value in the copy is seen in the copy only
    fp = make_fingerprint()
    new = np.full((1, DIM), 7.0, np.float32)
    parquet_io.write_part(Workspace.at(copy).item_embeddings, embedding_table("item_id", "item_embedding", [3], new, [T2]),
                          metadata={FINGERPRINT_METADATA_KEY: fp.to_json()})
    ok(["feast", "materialize", "--repo", repo, "--data-dir", copy])
    np.testing.assert_array_equal(item_vector(repo, copy, 3), new[0])
    np.testing.assert_array_equal(item_vector(repo, original, 3), before)
    assert snapshot(original) == frozen


def test_moved_data_dir_works_in_its_new_place(repo, tmp_path):
    data = materialized_dir(repo, tmp_path / "data")
    before = item_vector(repo, data, 3)
    moved = Path(shutil.move(data, tmp_path / "moved"))
    ok(["feast", "materialize", "--repo", repo, "--data-dir", moved])
    assert not data.exists(), "the old place of a moved data dir was recreated"
    np.testing.assert_array_equal(item_vector(repo, moved, 3), before)


# ------------------------------------------------------------------------------------------------
# 3: one writer per data dir


WRITERS = {
    "ingest": ["ingest", "--source", "{ml}", "--data-dir", "{data}"],
    "encode": ["encode", "--data-dir", "{data}", "--part-size", "2"],
    "embed-users": ["embed-users", "--checkpoint", "{tmp}/ckpt", "--data-dir", "{data}"],
    "feast apply": ["feast", "apply", "--repo", "{repo}", "--data-dir", "{data}"],
    "feast materialize": ["feast", "materialize", "--repo", "{repo}", "--data-dir", "{data}"],
    "demo": ["demo", "--source", "{ml}", "--repo", "{repo}", "--data-dir", "{data}", "--size", "small"],
}


@pytest.mark.parametrize("command", list(WRITERS))
def test_second_writer_is_refused_naming_the_holder(repo, tmp_path, command):
    data = tmp_path / "data"
    write_synthetic_workspace(data)
    args = [a.format(tmp=tmp_path, data=data, repo=repo, ml=ML100K) for a in WRITERS[command]]
    with hold_lock(data, "llmfeat encode --part-size 4096"):
        run_bad(args, expect=rf"{re.escape(str(data.resolve()))}: the data dir is in use by pid {os.getpid()} "
                             r"\(llmfeat encode --part-size 4096, since \d{4}-\d\d-\d\dT.*\)\. Wait for it",
                unchanged=[data])



@contextlib.contextmanager
def hold_lock(data: Path, command: str):
    """Hold the data dir's lock as another writer would: an flock on the lock file, holder inside.
    (Not Workspace.lock: that one is re-entrant within a process.)"""
    fd = os.open(data / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        since = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        os.write(fd, json.dumps({"pid": os.getpid(), "command": command, "since": since}).encode())
        yield
    finally:
        os.close(fd)
        os.unlink(data / LOCK_FILE)


def test_lock_of_a_killed_writer_is_released(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    code = ("import sys, time; from llm_features.workspace import Workspace; "
            "held = Workspace.at(sys.argv[1]).lock('llmfeat encode'); held.__enter__(); print('held', flush=True); "
            "time.sleep(300)")
    env = {**os.environ, "PYTHONPATH": str(Path(llm_features.__file__).resolve().parents[1])}  # this code
    proc = subprocess.Popen([sys.executable, "-c", code, str(data)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "held"
        run_bad(["encode", "--data-dir", data], expect=rf"in use by pid {proc.pid} \(llmfeat encode, since",
                unchanged=[data])
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert (data / LOCK_FILE).exists()  # left behind by the killed process, but no longer locked
    with Workspace.at(data).lock("llmfeat ingest"):
        assert json.loads((data / LOCK_FILE).read_text())["command"] == "llmfeat ingest"
    assert not (data / LOCK_FILE).exists()


# ------------------------------------------------------------------------------------------------
# 4: table directories linked out of the data dir


def _link_out(data: Path, table: str, outside: Path) -> None:
    src = data / table
    if src.exists():
        shutil.move(src, outside)
    else:
        outside.mkdir()
        (outside / "keep.txt").write_text("not llmfeat's\n")
    src.symlink_to(outside, target_is_directory=True)


def test_encode_refuses_an_item_embeddings_link_out_of_the_data_dir(tiny_bert_dir, tmp_path):
    from tests.test_encode import write_canonical

    data = tmp_path / "data"
    write_canonical(data)
    outside = tmp_path / "elsewhere"
    _link_out(data, "item_embeddings", outside)
    run_bad(["encode", "--model", tiny_bert_dir, "--data-dir", data, "--no-progress", "--batch-size", "2",
             "--num-threads", "1"],
            expect=r"item_embeddings: is a symbolic link to .*elsewhere, outside the data dir.*Move the files",
            unchanged=[data, outside])


def test_embed_users_overwrite_refuses_a_user_embeddings_link_out_of_the_data_dir(tiny_bert_dir, tmp_path):
    from llm_features.backbone import Backbone, BackboneConfig
    from llm_features.config import RuntimeArgs
    from llm_features.embed_users import EmbedUsersConfig, embed_users
    from tests.test_embed_users import make_checkpoint, make_rows, make_workspace

    bb = Backbone.load(BackboneConfig(model=tiny_bert_dir, split_layer=2))
    data = make_workspace(tmp_path / "data", bb, make_rows())
    ckpt = make_checkpoint(tmp_path / "ckpt", bb, tiny_bert_dir)
    other = make_checkpoint(tmp_path / "other", bb, tiny_bert_dir, seed=1)
    embed_users(EmbedUsersConfig(checkpoint=other, data_dir=data, cadence="last",
                                 runtime=RuntimeArgs(device="cpu", num_threads=1)))
    outside = tmp_path / "elsewhere"
    _link_out(data, "user_embeddings", outside)
    assert parquet_io.list_parts(outside)
    run_bad(["embed-users", "--checkpoint", ckpt, "--data-dir", data, "--cadence", "last", "--overwrite",
             "--device", "cpu", "--num-threads", "1"],
            expect=r"user_embeddings: is a symbolic link to .*elsewhere, outside the data dir",
            unchanged=[data, outside])


def test_parquet_writers_refuse_linked_targets(tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    link = tmp_path / "data" / "item_embeddings"
    link.parent.mkdir()
    link.symlink_to(outside, target_is_directory=True)
    table = pa.table({"item_id": [1]})
    with pytest.raises(UserError, match="symbolic link"):
        parquet_io.write_part(link, table)
    with pytest.raises(UserError, match="symbolic link"):
        parquet_io.write_table_atomic(table, link / "x.parquet")
    with pytest.raises(UserError, match="outside the data dir"):
        Workspace.at(tmp_path / "data").item_embeddings
    assert not list(outside.iterdir())


# ------------------------------------------------------------------------------------------------
# 5: serving from an online store that was never materialised


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """An id-only ranker trained in a second on synthetic rows (no feature store)."""
    import torch

    from ranker.config import ModelConfig, TrainConfig
    from tests.synthetic_rows import SyntheticFeatureSource, synthetic_rows
    from ranker.train import train

    torch.set_num_threads(1)
    rows = synthetic_rows(n_users=20, n_items=20, n_rows=400, dim=DIM, seed=0)
    cfg = TrainConfig(model=ModelConfig(llm_features=False), out=tmp_path_factory.mktemp("ranker") / "ckpt",
                      epochs=1, batch_size=128, validate=False, progress=False)
    train(cfg, entities=rows, source=SyntheticFeatureSource(rows))
    return cfg.out


@pytest.fixture(scope="module")
def applied(repo, tmp_path_factory) -> Path:
    """A data dir that was applied but never materialised."""
    data = tmp_path_factory.mktemp("applied") / "data"
    write_synthetic_workspace(data)
    ok(["feast", "apply", "--repo", repo, "--data-dir", data])
    return data


def test_score_and_lookup_refuse_an_unmaterialized_online_store(repo, applied, checkpoint):
    expect = r"online_store.db: the online store has no rows for feature view\(s\) .*never materialized\. " \
             r"Run `llmfeat feast materialize --data-dir .*` first"
    run_bad(["ranker", "score", "--checkpoint", checkpoint, "--repo", repo, "--data-dir", applied,
             "--user-id", "1", "--items", "1,2,3"], expect=expect, unchanged=[applied, checkpoint])
    run_bad(["feast", "lookup", "--repo", repo, "--data-dir", applied, "--user-id", "1", "--item-ids", "3"],
            expect=expect, unchanged=[applied])


def test_score_after_materialize_and_for_an_unknown_user(repo, tmp_path, checkpoint):
    data = materialized_dir(repo, tmp_path / "data")
    out = tmp_path / "score"
    known = ok(["ranker", "score", "--checkpoint", checkpoint, "--repo", repo, "--data-dir", data,
                "--user-id", "1", "--items", "1,2,3", "--out", out])
    assert "cold start" not in known and "item 1 " in known
    unknown = ok(["ranker", "score", "--checkpoint", checkpoint, "--repo", repo, "--data-dir", data,
                  "--user-id", "999", "--items", "1,2,3", "--out", out])
    assert "user 999 has no features in the online store: a cold start" in unknown


# ------------------------------------------------------------------------------------------------
# 6, 7: ranker option ranges

RANGES = [
    (["ranker", "train", "--epochs", "0"], "--epochs"),
    (["ranker", "train", "--patience", "0"], "--patience"),
    (["ranker", "train", "--batch-size", "0"], "--batch-size"),
    (["ranker", "train", "--lr", "0"], "--lr"),
    (["ranker", "train", "--sparse-lr", "-0.1"], "--sparse-lr"),
    (["ranker", "train", "--oov-dropout", "1.5"], "--oov-dropout"),
    (["ranker", "train", "--llm-dropout", "1.0"], "--llm-dropout"),
    (["ranker", "train", "--embedding-dim", "0"], "--embedding-dim"),
    (["ranker", "train", "--dense-hidden", "0"], "--dense-hidden"),
    (["ranker", "train", "--max-train-rows", "0"], "--max-train-rows"),
    (["ranker", "evaluate", "--batch-size", "0"], "--batch-size"),
    (["ranker", "score", "--top-k", "0", "--items", "1"], "--top-k"),
]


@pytest.mark.parametrize("args,option", RANGES, ids=[" ".join(a[1:3]) for a, _ in RANGES])
def test_ranker_option_out_of_range(tmp_path, args, option):
    missing = tmp_path / "no-data"
    run_bad([*args, "--data-dir", missing], expect=option, unchanged=[missing, tmp_path])


def test_ranker_option_out_of_range_in_config_file(tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"lr": 0, "epochs": 2}))
    run_bad(["ranker", "train", "--config", config, "--data-dir", tmp_path / "no-data"],
            expect=rf"{re.escape(str(config))}, --lr: 0\.0 must be greater than 0", unchanged=[tmp_path])


# ------------------------------------------------------------------------------------------------
# 8-15: feast commands and readers of a data dir


@pytest.mark.parametrize("command", ["lookup", "score", "train", "evaluate"])
def test_reader_of_a_missing_data_dir(repo, tmp_path, checkpoint, command):
    missing = tmp_path / "no-such-dir"
    args = {
        "lookup": ["feast", "lookup", "--user-id", "1"],
        "score": ["ranker", "score", "--checkpoint", checkpoint, "--items", "1"],
        "train": ["ranker", "train", "--no-llm-features", "--out", tmp_path / "out"],
        "evaluate": ["ranker", "evaluate", "--checkpoint", checkpoint, "--out", tmp_path / "out"],
    }[command]
    run_bad([*args, "--repo", repo, "--data-dir", missing],
            expect=r"no-such-dir, --data-dir: the data dir does not exist\. Pass the data dir",
            unchanged=[missing, tmp_path / "out", checkpoint])


def test_reader_of_a_data_dir_without_registry(repo, tmp_path, checkpoint):
    data = tmp_path / "data"
    write_synthetic_workspace(data)
    expect = r"--data-dir: the data dir has no Feast registry\. Run `llmfeat feast apply --data-dir"
    run_bad(["feast", "lookup", "--repo", repo, "--data-dir", data, "--user-id", "1"], expect=expect,
            unchanged=[data])
    run_bad(["ranker", "score", "--checkpoint", checkpoint, "--repo", repo, "--data-dir", data, "--items", "1"],
            expect=expect, unchanged=[data, checkpoint])


def test_registry_of_another_project(repo, tmp_path):
    other = copy_repo(tmp_path / "other_repo")
    conf = yaml.safe_load((other / "feature_store.yaml").read_text())
    conf["project"] = "other"
    (other / "feature_store.yaml").write_text(yaml.safe_dump(conf))
    data = tmp_path / "data"
    write_synthetic_workspace(data)
    ok(["feast", "apply", "--repo", other, "--data-dir", data])
    run_bad(["feast", "lookup", "--repo", repo, "--data-dir", data, "--user-id", "1"],
            expect=r"registry.db, --data-dir: the Feast registry holds project\(s\) other, not .llmfeat.*Run `llmfeat feast apply",
            unchanged=[data])


def test_materialize_refuses_embeddings_of_another_model_before_applying(repo, tmp_path):
    data = materialized_dir(repo, tmp_path / "data")
    other = make_fingerprint("another-model")
    parquet_io.write_part(Workspace.at(data).item_embeddings,
                          embedding_table("item_id", "item_embedding", [1], np.ones((1, DIM), np.float32), [T2]),
                          metadata={FINGERPRINT_METADATA_KEY: other.to_json()})
    run_bad(["feast", "materialize", "--repo", repo, "--data-dir", data],
            expect=rf"item_embeddings: part file .* holds model fingerprint {other.digest}, but .*manifest.json "
                   r"records",
            unchanged=[data])


def test_materialize_unknown_view(repo, applied):
    run_bad(["feast", "materialize", "--repo", repo, "--data-dir", applied, "--views", "item_embedings"],
            expect=r"--views: feature view\(s\) item_embedings are not defined in .*\(defined: .*item_embeddings",
            unchanged=[applied])


def test_materialize_chunk_rows_below_one(repo, applied):
    run_bad(["feast", "materialize", "--repo", repo, "--data-dir", applied, "--chunk-rows", "0"],
            expect=r"--chunk-rows", unchanged=[applied])


def test_materialize_without_apply_before_any_apply(repo, tmp_path):
    data = tmp_path / "data"
    write_synthetic_workspace(data)
    run_bad(["feast", "materialize", "--no-apply", "--repo", repo, "--data-dir", data],
            expect=r"has no Feast registry\. Run `llmfeat feast apply", unchanged=[data])


@pytest.mark.parametrize("command", ["apply", "materialize", "lookup"])
def test_repo_without_feature_store_yaml(tmp_path, command):
    not_repo = tmp_path / "not_repo"
    not_repo.mkdir()
    data = tmp_path / "data"
    write_synthetic_workspace(data)
    extra = ["--user-id", "1"] if command == "lookup" else []
    run_bad(["feast", command, "--repo", not_repo, "--data-dir", data, *extra],
            expect=r"not_repo, --repo: has no feature_store.yaml.*Pass the feast_repo directory",
            unchanged=[data, not_repo])


def test_lookup_without_user_id(repo, applied):
    run_bad(["feast", "lookup", "--repo", repo, "--data-dir", applied], expect=r"--user-id: is required",
            unchanged=[applied])


def test_lookup_unknown_service(repo, applied):
    run_bad(["feast", "lookup", "--repo", repo, "--data-dir", applied, "--user-id", "1", "--service", "ranker"],
            expect=r"--service.*'ranker' is not one of 'ranker_llm', 'ranker_id_only'", unchanged=[applied])


# ------------------------------------------------------------------------------------------------
# 16-24: the ranker's inputs


def test_checkpoint_missing(repo, applied, tmp_path):
    run_bad(["ranker", "score", "--checkpoint", tmp_path / "runs", "--repo", repo, "--data-dir", applied,
             "--items", "1"],
            expect=r"runs, --checkpoint: is not a ranker checkpoint \(no ranker.json\)\. Pass the --out directory",
            unchanged=[applied, tmp_path])


@pytest.mark.parametrize("content", ['{"format": "llmfeat-ranker/0"}', "{not json"])
def test_checkpoint_of_another_format(repo, applied, checkpoint, tmp_path, content):
    ckpt = Path(shutil.copytree(checkpoint, tmp_path / "ckpt"))
    (ckpt / "ranker.json").write_text(content)
    run_bad(["ranker", "evaluate", "--checkpoint", ckpt, "--repo", repo, "--data-dir", applied],
            expect=r"ranker.json, --checkpoint: .*(format 'llmfeat-ranker/0', expected|not valid JSON)",
            unchanged=[applied, ckpt])


@pytest.fixture()
def ingested(tmp_path) -> Path:
    from tests.test_encode import write_canonical

    return write_canonical(tmp_path / "data").root


def test_train_llm_twin_before_user_embeddings(repo, ingested, tmp_path):
    run_bad(["ranker", "train", "--repo", repo, "--data-dir", ingested, "--out", tmp_path / "out"],
            expect=r"--tower: llm_mode=score needs the fine-tuned tower.*run `llmfeat embed-users` first",
            unchanged=[ingested, tmp_path / "out"])


def test_train_before_ingest(repo, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    run_bad(["ranker", "train", "--no-llm-features", "--repo", repo, "--data-dir", data, "--out", tmp_path / "out"],
            expect=r"interactions.parquet, --data-dir: not found\. Run `llmfeat ingest` first",
            unchanged=[data, tmp_path / "out"])


def test_train_tower_without_weights(repo, ingested, tmp_path):
    tower = tmp_path / "finetune"
    tower.mkdir()
    run_bad(["ranker", "train", "--tower", tower, "--repo", repo, "--data-dir", ingested, "--out", tmp_path / "out"],
            expect=r"finetune, --tower: no model.safetensors\. Pass the directory `llmfeat finetune --out` wrote",
            unchanged=[ingested, tower])


@pytest.mark.parametrize("items,expect", [
    (["1,two,3"], r"--items: 'two' is not an item id"),
    (["1,2", "2"], r"--items: item id\(s\) 2 given more than once"),
], ids=["not-an-int", "duplicate"])
def test_score_bad_items(repo, applied, checkpoint, items, expect):
    args = [x for i in items for x in ("--items", i)]
    run_bad(["ranker", "score", "--checkpoint", checkpoint, "--repo", repo, "--data-dir", applied, *args],
            expect=expect, unchanged=[applied, checkpoint])


def test_evaluate_checkpoint_of_another_model(repo, tmp_path, checkpoint):
    ckpt = Path(shutil.copytree(checkpoint, tmp_path / "ckpt"))
    payload = json.loads((ckpt / "ranker.json").read_text())
    payload["fingerprint"] = "0" * 16
    (ckpt / "ranker.json").write_text(json.dumps(payload))
    data = tmp_path / "data"
    write_synthetic_workspace(data)
    run_bad(["ranker", "evaluate", "--checkpoint", ckpt, "--repo", repo, "--data-dir", data],
            expect=r"was trained on embeddings of model 0{16}, but .*manifest.json records .*retrain the ranker",
            unchanged=[data, ckpt])


def test_evaluate_split_without_rows(repo, ingested, checkpoint, tmp_path):
    run_bad(["ranker", "evaluate", "--checkpoint", checkpoint, "--split", "test", "--repo", repo,
             "--data-dir", ingested, "--out", tmp_path / "out"],
            expect=r"interactions.parquet, column 'split': has no rows with split == 'test'",
            unchanged=[ingested, tmp_path / "out"])
