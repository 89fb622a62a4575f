"""Bad input to `llmfeat finetune` and `llmfeat embed-users`: model and checkpoint loading, options.

Every refusal exits 1 with a one- or two-line message naming the file or the option and what to do,
without a traceback, and leaves the checkpoint and the data directory as they were.

Classes (29):
1. finetune --resume with a trainer state that is a crafted pickle: refused, never unpickled (no code runs)
2. finetune --resume in a checkpoint of an older llmfeat (a loose trainer_state.pt, no committed resume
   set): refused, never unpickled
3. finetune killed between the files of a --save-every checkpoint: --resume continues exactly from the
   last complete checkpoint
4. finetune --resume on a resume set whose files do not match its manifest (mixed by hand): refused
5. embed-users on a checkpoint whose config.json was edited to point at another model directory with
   trust_remote_code: refused by the fingerprint before any model code is loaded
6. embed-users on a checkpoint (fingerprint included) pointing at a model directory with custom code:
   that code never runs unless --trust-remote-code is given on the command line
7. finetune --config file setting trust_remote_code: refused (only the command line may allow model code)
8. finetune --context-size 0 (a history-blind model)
9. finetune --batch-size 0
10. finetune --split-layer that leaves the deep stack empty (the model's layer count)
11. finetune --split-layer 0 (an empty shallow stack)
12. finetune --max-tokens 0
13. finetune --lr 0
14. finetune --epochs 0
15. finetune --fold outside 0..--folds-1
16. finetune --adam-beta2 1 (AdamW divides by 1 - beta)
17. embed-users --every 0
18. embed-users --every with a cadence other than event (it was silently ignored)
19. embed-users --context-size 0
20. --device that is not a torch device
21. a checkpoint whose saved config.json holds a value outside the choices ("pooling": "max")
22. embed-users --checkpoint whose model.safetensors is not the one its config.json was written with
23. embed-users --checkpoint that does not exist
24. embed-users --checkpoint whose config.json is not JSON
25. embed-users --checkpoint of another model than the workspace's (fingerprint mismatch)
26. finetune --model directory that does not exist
27. finetune --model directory that is not a Hugging Face model
28. finetune --resume with options changed since the checkpoint
29. embed-users with a data directory that does not exist (no interactions)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shlex
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from click.testing import CliRunner

from llm_features.backbone import Backbone, BackboneConfig, weights_sha256
from llm_features.cli import main
from llm_features.fingerprint import FINGERPRINT_METADATA_KEY, ModelFingerprint
from llm_features.parquet_io import embedding_array, utc_us, write_part, write_table_atomic
from llm_features.workspace import Workspace
from tests.bad_input import run_bad

N_BEHAVIORS = 7
TEXTS = [f"movie {i} ({1990 + i}) | genre {'abc'[i % 3]}" for i in range(N_BEHAVIORS)]
T0 = 946_684_800


@pytest.fixture(scope="module")
def bert(tiny_bert_dir):
    return Backbone.load(BackboneConfig(model=tiny_bert_dir, split_layer=2))


def make_ws(root: Path, bb: Backbone, fingerprint: ModelFingerprint | None = None) -> Path:
    """A workspace with train/valid/test interactions, encoded by ``bb`` (parts stamped ``fingerprint``)."""
    fingerprint = fingerprint or bb.fingerprint
    rng = np.random.default_rng(0)
    rows = []
    for u in range(16):
        t = 0
        for _ in range(int(rng.integers(8, 16))):
            t += int(rng.integers(0, 3)) * 3600
            b = int(rng.integers(0, N_BEHAVIORS))
            rows.append((u, b, T0 + t, float(rng.integers(1, 6))))
    rows.sort(key=lambda r: (r[2], r[0], r[1]))
    user, item, ts, rating = (np.array(c) for c in zip(*rows))
    cut1, cut2 = np.quantile(ts, [0.7, 0.85])
    split = np.where(ts < cut1, "train", np.where(ts < cut2, "valid", "test"))
    w = Workspace.at(root)
    write_table_atomic(pa.table({
        "user_id": pa.array(user, pa.int64()), "item_id": pa.array(item, pa.int64()),
        "event_timestamp": utc_us(pa.array(ts * 1_000_000, pa.timestamp("us"))),
        "behavior_id": pa.array(item + 1000, pa.int64()),
        "behavior_text": pa.array([TEXTS[i] for i in item]),
        "label": pa.array((rating > 3).astype(np.int8)), "rating": pa.array(rating, pa.float32()),
        "split": pa.array(split),
    }), w.interactions)
    vecs = bb.encode_texts(TEXTS).numpy()
    meta = {FINGERPRINT_METADATA_KEY: fingerprint.to_json()}
    first = pa.array(np.full(N_BEHAVIORS, T0 * 1_000_000), pa.timestamp("us", tz="UTC"))
    write_part(w.atomic_behavior_embeddings, pa.table({
        "behavior_id": pa.array(np.arange(N_BEHAVIORS) + 1000, pa.int64()),
        "behavior_embedding": embedding_array(vecs), "event_timestamp": first}), metadata=meta)
    write_part(w.item_embeddings, pa.table({
        "item_id": pa.array(np.arange(N_BEHAVIORS), pa.int64()),
        "item_embedding": embedding_array(vecs), "event_timestamp": first}), metadata=meta)
    w.claim_fingerprint(fingerprint)
    return root


@pytest.fixture(scope="module")
def ws(tmp_path_factory, bert) -> Path:
    return make_ws(tmp_path_factory.mktemp("ws"), bert)


def ft_args(model: Path, ws: Path, out: Path, *extra) -> list[str]:
    return ["finetune", "--model", model, "--split-layer", "2", "--data-dir", ws, "--out", out,
            "--context-size", "3", "--targets-per-sequence", "4", "--batch-size", "16", "--eval-batch-size", "64",
            "--head-hidden", "8", "--warmup-steps", "2", "--log-every", "0", "--device", "cpu",
            "--num-threads", "1", *extra]


RUN = ("--epochs", "1", "--max-steps", "3", "--save-every", "1")


def train(model: Path, ws: Path, out: Path) -> Path:
    """A finished `llmfeat finetune` run in ``out`` (3 steps, checkpointed every step)."""
    res = CliRunner().invoke(main, [str(a) for a in ft_args(model, ws, out, *RUN)])
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_bert_dir, ws) -> Path:
    return train(tiny_bert_dir, ws, tmp_path_factory.mktemp("trained") / "run")


def copy_ckpt(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def resume_set(out: Path) -> tuple[Path, Path | None]:
    """(directory holding the files --resume reads, its manifest or None): the newest committed resume
    set where there is one, else the checkpoint directory itself (the layout of older llmfeat)."""
    sets = sorted((out / "resume").glob("ckpt-*")) if (out / "resume").is_dir() else []
    if sets:
        return sets[-1], sets[-1] / "manifest.json"
    return out, None


def rehash(manifest: Path | None) -> None:
    """Update a resume manifest to the files as they are now (what a forger would do)."""
    if manifest is None:
        return
    meta = json.loads(manifest.read_text())
    meta["files"] = {name: sha256(manifest.parent / name) for name in meta["files"]}
    manifest.write_text(json.dumps(meta))


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


# --------------------------------------------------------------------------- 1-4: resume
def test_resume_never_unpickles_a_crafted_trainer_state(tiny_bert_dir, ws, trained, tmp_path):
    out = train(tiny_bert_dir, ws, tmp_path / "run")
    where, manifest = resume_set(out)
    marker = tmp_path / "pwned"
    torch.save(_Evil(marker), where / "trainer_state.pt")
    rehash(manifest)
    run_bad(ft_args(tiny_bert_dir, ws, out, *RUN, "--resume"),
            expect=r"trainer_state\.pt.*(safely|cannot be loaded)", unchanged=[out, ws])
    assert not marker.exists(), "--resume ran code from the trainer state"


def test_resume_refuses_an_older_checkpoint_layout(tiny_bert_dir, ws, trained, tmp_path):
    out = train(tiny_bert_dir, ws, tmp_path / "run")
    shutil.rmtree(out / "resume", ignore_errors=True)
    marker = tmp_path / "pwned"
    torch.save(_Evil(marker), out / "trainer_state.pt")
    run_bad(ft_args(tiny_bert_dir, ws, out, *RUN, "--resume"),
            expect=r"trainer_state\.pt.*older", unchanged=[out, ws])
    assert not marker.exists(), "--resume ran code from the trainer state"


class Killed(BaseException):
    """A kill -9 stand-in that no `except Exception` catches."""


def test_kill_between_checkpoint_files_resumes_from_the_last_complete_one(tiny_bert_dir, ws, tmp_path,
                                                                          monkeypatch):
    from llm_features.config import RuntimeArgs
    from llm_features.finetune import FinetuneConfig, finetune

    opts = dict(backbone=BackboneConfig(model=tiny_bert_dir, split_layer=2), data_dir=ws, context_size=3,
                targets_per_sequence=4, batch_size=16, eval_batch_size=64, head_hidden=8, warmup_steps=2,
                log_every=0, runtime=RuntimeArgs(device="cpu", num_threads=1), epochs=1, save_every=2,
                lr=1e-3)
    full = finetune(FinetuneConfig(out=tmp_path / "full", **opts))
    assert full["steps"] > 4
    real = torch.save
    calls = {"n": 0}

    def save_then_die(obj, f, *a, **kw):  # the second checkpoint (step 4) dies before its trainer state
        calls["n"] += 1
        if calls["n"] == 2:
            raise Killed
        return real(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", save_then_die)
    part = FinetuneConfig(out=tmp_path / "part", **opts)
    with pytest.raises(Killed):
        finetune(part)
    monkeypatch.setattr(torch, "save", real)
    resumed = finetune(FinetuneConfig(**{**part.__dict__, "resume": True}))
    assert resumed["steps"] == full["steps"]
    assert resumed["test"]["auc"] == pytest.approx(full["test"]["auc"], abs=1e-7)
    assert resumed["test"]["logloss"] == pytest.approx(full["test"]["logloss"], abs=1e-7)


def test_resume_refuses_a_resume_set_mixed_by_hand(tiny_bert_dir, ws, trained, tmp_path):
    from safetensors.torch import load_file, save_file

    def mix(weights: Path) -> None:  # the weights of another step
        save_file({k: v + 1.0 for k, v in load_file(str(weights)).items()}, str(weights))

    out = train(tiny_bert_dir, ws, tmp_path / "run")
    where, _ = resume_set(out)
    mix(where / "model.safetensors")
    run_bad(ft_args(tiny_bert_dir, ws, out, *RUN, "--resume"),
            expect=r"model\.safetensors.*(incomplete|does not match)", unchanged=[out, ws])

    # with an older complete set next to it (a kill between a commit and the removal of the older
    # set), --resume falls back to that one
    fresh = train(tiny_bert_dir, ws, tmp_path / "fresh")
    good, _ = resume_set(fresh)
    newer = good.with_name("ckpt-%06d" % (int(good.name.split("-")[1]) + 1))
    shutil.copytree(good, newer)
    mix(newer / "model.safetensors")
    res = CliRunner().invoke(main, [str(a) for a in ft_args(tiny_bert_dir, ws, fresh, *RUN, "--resume")])
    assert res.exit_code == 0, res.output
    assert json.loads((fresh / "metrics.json").read_text())["steps"] == 3


# --------------------------------------------------------------------------- 5-7: model code
def evil_model_dir(src: Path, dest: Path, marker: Path) -> Path:
    """A copy of ``src`` whose config.json maps AutoConfig/AutoModel to a .py that touches ``marker``."""
    shutil.copytree(src, dest)
    (dest / "evil_modeling.py").write_text(
        "import pathlib\n"
        f"pathlib.Path({str(marker)!r}).touch()\n"
        "from transformers import BertConfig, BertModel\n\n\n"
        "class EvilConfig(BertConfig):\n    model_type = 'evilbert'\n\n\n"
        "class EvilModel(BertModel):\n    config_class = EvilConfig\n"
    )
    config = json.loads((dest / "config.json").read_text())
    config["model_type"] = "evilbert"
    config["auto_map"] = {"AutoConfig": "evil_modeling.EvilConfig", "AutoModel": "evil_modeling.EvilModel"}
    (dest / "config.json").write_text(json.dumps(config))
    return dest


def edit_checkpoint(ckpt: Path, *, fingerprint_of: Path | None = None, **finetune_options) -> None:
    path = ckpt / "config.json"
    meta = json.loads(path.read_text())
    for k, v in finetune_options.items():  # a backbone option in the backbone: section, as saved
        section = meta["finetune"]["backbone"] if k in BackboneConfig.__dataclass_fields__ else meta["finetune"]
        section[k] = str(v) if isinstance(v, Path) else v
    if fingerprint_of is not None:
        fp = {k: v for k, v in meta["fingerprint"].items() if k != "digest"}
        fp.update(model_name=str(fingerprint_of), weights_sha256=weights_sha256(fingerprint_of))
        meta["fingerprint"] = ModelFingerprint(**fp).to_dict()
    path.write_text(json.dumps(meta))


def test_edited_checkpoint_config_cannot_load_another_models_code(ws, trained, tiny_bert_dir, tmp_path):
    ckpt = copy_ckpt(trained, tmp_path / "ckpt")
    marker = tmp_path / "pwned"
    evil = evil_model_dir(tiny_bert_dir, tmp_path / "evil", marker)
    edit_checkpoint(ckpt, model=evil, trust_remote_code=True)
    run_bad(["embed-users", "--checkpoint", ckpt, "--data-dir", ws, "--device", "cpu"],
            expect=r"fingerprint", unchanged=[ckpt, ws])
    assert not marker.exists(), "embed-users ran the model directory's code"


def test_model_code_runs_only_with_trust_remote_code_on_the_command_line(bert, trained, tiny_bert_dir, tmp_path):
    ckpt = copy_ckpt(trained, tmp_path / "ckpt")
    marker = tmp_path / "pwned"
    evil = evil_model_dir(tiny_bert_dir, tmp_path / "evil", marker)
    edit_checkpoint(ckpt, fingerprint_of=evil, model=evil, trust_remote_code=True)
    fp = ModelFingerprint.from_dict(json.loads((ckpt / "config.json").read_text())["fingerprint"])
    data = make_ws(tmp_path / "ws", bert, fingerprint=fp)  # a workspace encoded "by" that model
    run_bad(["embed-users", "--checkpoint", ckpt, "--data-dir", data, "--device", "cpu"],
            expect=r"evil.*--trust-remote-code", unchanged=[ckpt, data])
    assert not marker.exists(), "embed-users ran the model directory's code"


def test_config_file_cannot_allow_model_code(tiny_bert_dir, ws, tmp_path):
    conf = tmp_path / "finetune.json"
    conf.write_text(json.dumps({"trust_remote_code": True}))
    out = tmp_path / "out"
    run_bad(ft_args(tiny_bert_dir, ws, out, "--max-steps", "1", "--config", conf),
            expect=rf"{conf.name}.*--trust-remote-code.*command line", unchanged=[out, ws])


# --------------------------------------------------------------------------- 8-20: option ranges
@pytest.mark.parametrize("extra,expect", [
    (["--context-size", "0"], r"--context-size"),
    (["--batch-size", "0"], r"--batch-size"),
    (["--lr", "0"], r"--lr"),
    (["--epochs", "0"], r"--epochs"),
    (["--folds", "2", "--fold", "2"], r"--fold"),
    (["--adam-beta2", "1"], r"--adam-beta2"),
    (["--device", "gpu0"], r"--device"),
], ids=["context-size", "batch-size", "lr", "epochs", "fold", "adam-beta2", "device"])
def test_finetune_option_out_of_range(tiny_bert_dir, ws, tmp_path, extra, expect):
    out = tmp_path / "out"
    run_bad(ft_args(tiny_bert_dir, ws, out, "--max-steps", "1", *extra), expect=expect, unchanged=[out, ws])


@pytest.mark.parametrize("option,value,expect", [
    ("split_layer", 4, r"--split-layer.*deep.*4 layers"),
    ("split_layer", 0, r"--split-layer.*shallow"),
    ("max_tokens", 0, r"--max-tokens"),
], ids=["split-layer-deep-empty", "split-layer-shallow-empty", "max-tokens"])
def test_finetune_model_option_out_of_range(bert, tiny_bert_dir, tmp_path, option, value, expect):
    """The workspace is stamped with the same value (as encode took it): only the value itself is wrong."""
    data = make_ws(tmp_path / "ws", bert, fingerprint=dataclasses.replace(bert.fingerprint, **{option: value}))
    out = tmp_path / "out"
    flag = "--" + option.replace("_", "-")
    args = ft_args(tiny_bert_dir, data, out, "--max-steps", "1")
    if flag in args:
        args[args.index(flag) + 1] = str(value)
    else:
        args += [flag, str(value)]
    run_bad(args, expect=expect, unchanged=[out, data])


@pytest.mark.parametrize("extra,expect", [
    (["--every", "0"], r"--every"),
    (["--every", "2", "--cadence", "last"], r"--every.*--cadence"),
    (["--context-size", "0"], r"--context-size"),
], ids=["every", "every-cadence", "context-size"])
def test_embed_users_option_out_of_range(ws, trained, extra, expect):
    run_bad(["embed-users", "--checkpoint", trained, "--data-dir", ws, "--device", "cpu", *extra],
            expect=expect, unchanged=[trained, ws])


# --------------------------------------------------------------------------- 21-29: files
def test_checkpoint_config_value_outside_the_choices(ws, trained, tmp_path):
    ckpt = copy_ckpt(trained, tmp_path / "ckpt")
    edit_checkpoint(ckpt, pooling="max")
    run_bad(["embed-users", "--checkpoint", ckpt, "--data-dir", ws, "--device", "cpu"],
            expect=r"config\.json.*--pooling.*'max'", unchanged=[ckpt, ws])


def test_checkpoint_weights_not_the_ones_its_config_was_written_with(ws, trained, tmp_path):
    from safetensors.torch import load_file, save_file

    ckpt = copy_ckpt(trained, tmp_path / "ckpt")
    weights = ckpt / "model.safetensors"
    tensors = load_file(str(weights))
    weights.unlink()  # (a hard link into the resume set: replace the file, not its content)
    save_file({k: v * 0.5 for k, v in tensors.items()}, str(weights))  # another run's weights, same shapes
    run_bad(["embed-users", "--checkpoint", ckpt, "--data-dir", ws, "--device", "cpu"],
            expect=r"model\.safetensors.*does not match config\.json", unchanged=[ckpt, ws])


def test_missing_checkpoint(ws, tmp_path):
    run_bad(["embed-users", "--checkpoint", tmp_path / "nope", "--data-dir", ws, "--device", "cpu"],
            expect=r"nope.*(does not exist|no checkpoint)", unchanged=[ws])


def test_checkpoint_config_not_json(ws, trained, tmp_path):
    ckpt = copy_ckpt(trained, tmp_path / "ckpt")
    (ckpt / "config.json").write_text("{not json")
    run_bad(["embed-users", "--checkpoint", ckpt, "--data-dir", ws, "--device", "cpu"],
            expect=r"config\.json.*JSON", unchanged=[ckpt, ws])


def test_checkpoint_of_another_model(ws, trained, tiny_bert_dir, tmp_path):
    other = Backbone.load(BackboneConfig(model=tiny_bert_dir, split_layer=1)).fingerprint
    data = tmp_path / "ws"
    shutil.copytree(ws, data)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["fingerprint"] = other.to_dict()
    (data / "manifest.json").write_text(json.dumps(manifest))
    run_bad(["embed-users", "--checkpoint", trained, "--data-dir", data, "--device", "cpu"],
            expect=r"manifest\.json.*fingerprint", unchanged=[trained, data])


def test_model_dir_missing(ws, tmp_path):
    out = tmp_path / "out"
    run_bad(ft_args(tmp_path / "no-model", ws, out, "--max-steps", "1"),
            expect=r"no-model.*--model.*does not exist", unchanged=[out, ws])


def test_model_dir_not_a_hugging_face_model(ws, tmp_path):
    model = tmp_path / "not-a-model"
    model.mkdir()
    (model / "weights.txt").write_text("hello")
    out = tmp_path / "out"
    run_bad(ft_args(model, ws, out, "--max-steps", "1"),
            expect=r"not-a-model.*--model.*(not a Hugging Face model|config\.json)", unchanged=[out, ws, model])


def test_resume_with_changed_options(tiny_bert_dir, ws, trained, tmp_path):
    out = train(tiny_bert_dir, ws, tmp_path / "run")
    run_bad(ft_args(tiny_bert_dir, ws, out, *RUN, "--resume",
                    "--lr", "0.5"),
            expect=r"--resume.*--lr", unchanged=[out, ws])


def test_embed_users_without_a_data_dir(trained, tmp_path):
    run_bad(["embed-users", "--checkpoint", trained, "--data-dir", tmp_path / "no-data", "--device", "cpu"],
            expect=r"no-data.*interactions.*ingest", unchanged=[trained, tmp_path / "no-data"])
