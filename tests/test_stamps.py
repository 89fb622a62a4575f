"""llm_features.stamps: the digest, the state of an input file, the step record; ingest and the demo
on top of it keep the stamps they wrote before (an existing data dir does not redo its steps)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import pytest

from llm_features.stamps import FileState, StepRecord, digest

PAYLOAD = {"version": 1, "format": "ml-1m", "files": [{"path": "/d/ratings.dat", "size": 10, "mtime_ns": 5}],
           "settings": {"recent_n": 30, "split_ratios": "0.8,0.1,0.1", "hash_ids": False, "items": None}}


def _ingest_formula(payload) -> str:
    """How ingest digested its payload before llm_features.stamps."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _demo_formula(*parts) -> str:
    """How the demo (llm_features.pipeline) stamped its steps before llm_features.stamps."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def test_digest_is_the_old_formulas():
    assert digest(PAYLOAD) == _ingest_formula(PAYLOAD)
    # the value itself, so the formula cannot drift with its copy above
    assert digest(PAYLOAD) == "e7d7898cac4bfd717796101cdfbe40d413fde495d2eedab61a12640b0460edfb"
    inputs = [["/d/canonical/interactions.parquet", 123, 456], "fbce47549ae25f4a"]
    options = {"out": Path("/runs/finetune"), "epochs": 1, "limit_users": None}
    assert digest([inputs, options], length=16) == _demo_formula(inputs, options)
    assert digest({"b": 1, "a": [2, 3]}) == digest({"a": [2, 3], "b": 1})  # key order does not matter
    assert digest({"a": 1}) != digest({"a": 2})


def test_file_state_follows_the_file(tmp_path):
    f = tmp_path / "ratings.dat"
    assert FileState.of(f) == FileState(str(f), None, None)
    f.write_text("1::2::3\n")
    st = f.stat()
    state = FileState.of(f)
    assert state == FileState(str(f), st.st_size, st.st_mtime_ns)
    assert state.to_list() == [str(f), st.st_size, st.st_mtime_ns]
    assert state.to_dict() == {"path": str(f), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    assert list(state.to_dict()) == ["path", "size", "mtime_ns"]  # the order a report lists
    f.write_text("1::2::3\n4::5::6\n")
    assert FileState.of(f) != state
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert FileState.of(f).mtime_ns == st.st_mtime_ns + 10**9


def test_step_record_is_done_only_for_the_same_stamp_with_every_output(tmp_path):
    out = tmp_path / "out"
    outputs = [out / "model.bin", out / "metrics.json"]
    record = StepRecord(out / "stamp.json")
    assert record.read() is None and record.done("s1", outputs) is None
    for p in outputs:
        p.parent.mkdir(exist_ok=True)
        p.write_text("x")
    record.write({"stamp": "s1", "note": "kept"})
    assert record.done("s1", outputs) == {"stamp": "s1", "note": "kept"}
    assert record.done("s2", outputs) is None  # other inputs or options
    assert record.done("s1", outputs, force=True) is None
    outputs[0].unlink()
    assert record.done("s1", outputs) is None  # an output went away
    assert record.done("s1", lambda rec: [outputs[1]]) is not None  # outputs the record names
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    (out / "stamp.json").write_text("{not json")
    assert record.read() is None and record.done("s1", [outputs[1]]) is None
    (out / "stamp.json").write_text("[1, 2]")
    assert record.read() is None
    with pytest.raises(ValueError, match="'stamp'"):
        record.write({"other": 1})


def test_step_record_keeps_the_callers_key_and_key_order(tmp_path):
    record = StepRecord(tmp_path / "report.json", key="input_fingerprint")
    record.write({"z": 1, "input_fingerprint": "abc", "a": 2})
    assert list(json.loads((tmp_path / "report.json").read_text())) == ["z", "input_fingerprint", "a"]
    assert record.done("abc") is not None and record.done("abd") is None


# ----------------------------------------------------------------------------- ingest


def test_unchanged_ingest_is_skipped_and_its_fingerprint_is_the_old_one(tmp_path):
    from llm_features.ingest import IngestConfig, ingest
    from llm_features.ingest.stamp import INGEST_VERSION, input_fingerprint
    from llm_features.workspace import Workspace
    from tests.test_ingest import OLD_TIMES, write_ml1m

    src = write_ml1m(tmp_path / "ml")
    cfg = IngestConfig(source=src, min_timestamp=OLD_TIMES)
    ws = Workspace.at(tmp_path / "data")
    first = ingest(cfg, ws)
    # the payload as ingest built it before llm_features.stamps, hashed the old way
    files = []
    for name in ("ratings.dat", "movies.dat", "users.dat"):
        st = (src / name).stat()
        files.append({"path": str((src / name).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    settings = {k: (str(v) if isinstance(v, Path) else [str(x) for x in v] if isinstance(v, tuple) else v)
                for k, v in dataclasses.asdict(cfg).items() if k not in ("force", "data_dir", "source")}
    payload = {"version": INGEST_VERSION, "format": "ml-1m", "files": files, "settings": settings}
    old = _ingest_formula(payload)
    assert first["input_fingerprint"] == old == input_fingerprint(cfg, "ml-1m")[0]
    assert [{k: f[k] for k in ("path", "size", "mtime_ns")} for f in first["inputs"]] == files

    mtimes = {p: p.stat().st_mtime_ns for p in ws.root.rglob("*") if p.is_file()}
    again = ingest(cfg, ws)
    assert again["skipped"] and again["input_fingerprint"] == old
    assert {p: p.stat().st_mtime_ns for p in ws.root.rglob("*") if p.is_file()} == mtimes  # nothing rewritten
    ws.items.unlink()  # an output went away: the record no longer stands
    assert not ingest(cfg, ws)["skipped"] and ws.items.exists()


# ----------------------------------------------------------------------------- the demo's stamps


def test_demo_stamp_file_keeps_its_format(tmp_path):
    from llm_features.pipeline import STAMP_FILE, _done, _mark, _stamp

    out = tmp_path / "runs" / "finetune"
    inputs = [FileState.of(tmp_path / "interactions.parquet").to_list(), "fbce47549ae25f4a"]
    options = {"out": out, "epochs": 1}
    stamp = _stamp(inputs, options)
    assert stamp == _demo_formula(inputs, options) and len(stamp) == 16
    assert _done(out, stamp) is None
    _mark(out, stamp)
    assert (out / STAMP_FILE).read_text() == json.dumps({"stamp": stamp}, indent=2) + "\n"
    assert _done(out, stamp) is None  # no metrics.json: not done
    (out / "metrics.json").write_text('{"test": {"auc": 0.75}}')
    assert _done(out, stamp) == {"test": {"auc": 0.75}}
    assert _done(out, _stamp(inputs, {**options, "epochs": 2})) is None


# ----------------------------------------------------------------------------- embed-users, encode


def test_checkpoint_identity_and_model_fingerprint_keep_their_digests(tmp_path):
    from llm_features.finetune.checkpoint import CONFIG, WEIGHTS
    from llm_features.fingerprint import ModelFingerprint
    from llm_features.user_embedding_parts import checkpoint_identity

    fp = ModelFingerprint("m", "abc", 3, "mean", 64, "float32", 32)
    fields = {k: v for k, v in dataclasses.asdict(fp).items() if k != "model_name"}
    assert fp.digest == hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]

    options = {"epochs": 2, "context_size": 50, "granularity": "event", "out": "/x", "device": "cpu"}
    (tmp_path / CONFIG).write_text(json.dumps({"finetune": options, "fingerprint": {"digest": fp.digest}}))
    (tmp_path / WEIGHTS).write_bytes(os.urandom(3 << 20))  # several read blocks
    weights = hashlib.sha256((tmp_path / WEIGHTS).read_bytes()).hexdigest()
    semantic = {k: v for k, v in options.items() if k not in ("out", "device")}
    blob = json.dumps({"weights": weights, "options": semantic, "fingerprint": fp.digest}, sort_keys=True,
                      default=str)
    ident = checkpoint_identity(tmp_path)
    assert ident["id"] == hashlib.sha256(blob.encode()).hexdigest()[:16]
    assert ident["weights_sha256"] == weights
