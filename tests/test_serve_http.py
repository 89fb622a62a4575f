"""``llmfeat serve``: the HTTP service over a trained ranker and a materialised SQLite store.

A tiny +LLM ranker (interaction mode) is trained on synthetic rows whose user ids are shifted by 2,
so store users 1 and 2 are online but unknown to its ``user_id`` vocabulary (like ML-1M's later
users) and user 3 is known. The store is the synthetic workspace of ``tests/store_data.py``.
Servers run in process (uvicorn in a thread on a free port) except one, started through the CLI
with two workers.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from llm_features import parquet_io
from llm_features.errors import UserError
from llm_features.fingerprint import FINGERPRINT_METADATA_KEY
from llm_features.store import apply_definitions, materialize_all, open_store
from llm_features.workspace import Workspace
from ranker.config import ModelConfig, ServeConfig, TrainConfig
from ranker.features import FeatureEncoder, MissingFeatures, extract
from ranker.model import RankingModel
from ranker.online import OnlineRows
from ranker.serve import Ranker
from ranker.service import TOKEN_ENV, create_app
from tests.synthetic_rows import SYNTHETIC_ATTRIBUTES, SyntheticFeatureSource, synthetic_rows
from ranker.train import train
from tests.serving_helpers import LiveServer, train_tiny_ranker
from tests.bad_input import run_bad
from tests.store_data import DIM, T2, copy_repo, embedding_table, make_fingerprint, write_synthetic_workspace

ROOT = Path(__file__).resolve().parents[1]
ITEMS = [3, 17, 12, 999]  # 999: no item of the store
USERS = [1, 3, 999]  # 1: online, not in the vocabulary; 3: online and known; 999: neither


def _materialized(root: Path) -> SimpleNamespace:
    repo = copy_repo(root / "feast_repo")
    data = root / "data"
    syn = write_synthetic_workspace(data)
    store = open_store(repo, data)
    apply_definitions(store)
    materialize_all(store)
    return SimpleNamespace(repo=repo, data=data, store=store, syn=syn)


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("serve")
    ws = _materialized(root)
    ws.ckpt = train_tiny_ranker(root / "ranker", ws.syn.fingerprint.digest)
    return ws


def _cfg(ws: SimpleNamespace, **kw) -> ServeConfig:
    return ServeConfig(ranker=ws.ckpt, repo=ws.repo, data_dir=ws.data, **kw)


@pytest.fixture(scope="module")
def server(served):
    app = create_app(_cfg(served, max_candidates=50, max_body_bytes=4096))
    with LiveServer(app) as live:
        live.app = app
        yield live


def _reference(ranker: Ranker, user: int, items: list[int]) -> tuple[np.ndarray, dict]:
    """The path before ``llmfeat serve``: get_online_features rows, encoded and scored whole."""
    frame = ranker.online_frame(user, items)
    stats = MissingFeatures()
    ranker.encoder.encode(frame, stats, with_labels=False)
    return ranker.score_frame(frame), stats.as_dict()


# ------------------------------------------------------------------------------------------------
# The fast path gives the reference path's values


def test_online_rows_read_what_get_online_features_returns(served):
    ranker = Ranker.load(served.ckpt, repo=served.repo, data_dir=served.data)
    user_refs, item_refs = ranker.feature_refs()
    for refs, key, ids in ((user_refs, "user_id", [1, 2, 3, 999]), (item_refs, "item_id", [*range(1, 21), 999])):
        values, found = OnlineRows(served.store, refs, key).read(ids)
        expected = served.store.get_online_features(features=refs, entity_rows=[{key: i} for i in ids]).to_dict()
        assert values == {k: v for k, v in expected.items() if k != key}
        assert found.tolist() == [i != 999 for i in ids]


def test_service_scores_equal_the_reference_path(served, server):
    ranker = Ranker.load(served.ckpt, repo=served.repo, data_dir=served.data)
    for user in USERS:
        expected, expected_stats = _reference(ranker, user, ITEMS)
        status, _, body = server.call("POST", "/score", {"user_id": user, "item_ids": ITEMS})
        assert status == 200 and body["user_id"] == user
        np.testing.assert_allclose(body["scores"], expected, rtol=1e-5, atol=1e-6)
        probs, stats, known = ranker.scorer.score(user, ITEMS)
        np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-6)
        assert stats.as_dict() == expected_stats and known == (user != 999)
        np.testing.assert_allclose(ranker.score(user, ITEMS), expected, rtol=1e-5, atol=1e-6)  # the Python API


def test_online_user_outside_the_vocabulary_is_an_unknown_id_with_its_features(served):
    """ML-1M's user 42 logs '100 unknown_user_id': an id the train split never saw takes the OOV id
    row, while its profile, history and embedding are still read and used."""
    ranker = Ranker.load(served.ckpt, repo=served.repo, data_dir=served.data)
    assert 1 not in ranker.encoder.vocabs["user_id"].keys and 3 in ranker.encoder.vocabs["user_id"].keys
    probs, stats, known = ranker.scorer.score(1, ITEMS)
    counts = stats.as_dict()
    assert known and counts["unknown_user_id"] == len(ITEMS)
    assert "missing_user_embedding" not in counts and "unknown_recent_item_ids" not in counts
    cold, cold_stats, cold_known = ranker.scorer.score(999, ITEMS)
    assert not cold_known and cold_stats.as_dict()["missing_user_embedding"] == len(ITEMS)
    assert not np.allclose(probs, cold)  # user 1's online features change its scores


@pytest.mark.parametrize("mode", ["score", "interaction", "dense", "id_only"])
def test_one_user_forward_equals_forward(mode):
    rows = synthetic_rows(n_users=30, n_items=20, n_rows=300, dim=DIM, seed=1)
    cfg = ModelConfig(llm_features=mode != "id_only", llm_mode="dense" if mode == "id_only" else mode)
    encoder = FeatureEncoder.fit(extract(rows, cfg, attributes=SYNTHETIC_ATTRIBUTES), cfg)
    if mode == "score":
        encoder.tower_hidden = 16
    torch.manual_seed(0)
    model = RankingModel(encoder).eval()
    frame = rows.iloc[:12].reset_index(drop=True)
    for col in ("user_id", "gender", "age", "occupation", "zip", "recent_item_ids", "recent_labels",
                "user_embedding"):  # one user, twelve candidates
        frame[col] = [frame.at[3, col]] * len(frame)
    batch = encoder.encode(frame).batch(np.arange(len(frame)))
    with torch.no_grad():
        expected = model(batch.dense_features, batch.sparse_features)
        got = model.forward_one_user(batch.dense_features, model.pooled_embeddings(batch.sparse_features))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_item_inputs_are_reread_after_a_materialization(tmp_path):
    ws = _materialized(tmp_path)
    ckpt = ws.ckpt = train_tiny_ranker(tmp_path / "ranker", ws.syn.fingerprint.digest)
    ranker = Ranker.load(ckpt, repo=ws.repo, data_dir=ws.data)
    scorer = ranker.scorer
    before = scorer.score(3, ITEMS)[0]
    assert not scorer.refresh()  # nothing changed
    new = np.full((1, DIM), 3.0, np.float32)
    parquet_io.write_part(Workspace.at(ws.data).item_embeddings,
                          embedding_table("item_id", "item_embedding", [17], new, [T2 + timedelta(days=400)]),
                          metadata={FINGERPRINT_METADATA_KEY: make_fingerprint().to_json()})
    materialize_all(open_store(ws.repo, ws.data))  # another process's materialization
    assert scorer.refresh()
    after = scorer.score(3, ITEMS)[0]
    assert after[1] != before[1] and np.allclose(np.delete(after, 1), np.delete(before, 1), rtol=1e-6)
    fresh = Ranker.load(ckpt, repo=ws.repo, data_dir=ws.data)
    np.testing.assert_allclose(after, _reference(fresh, 3, ITEMS)[0], rtol=1e-5, atol=1e-6)

    # the store's embedding views re-tagged with another model while serving: refused (503) until undone
    from llm_features.fingerprint import FINGERPRINT_TAG
    from ranker.online import StoreChanged

    writer = open_store(ws.repo, ws.data)
    view = writer.get_feature_view("user_embeddings")
    view.tags[FINGERPRINT_TAG] = "f" * 16
    writer.apply([view])
    app = create_app(_cfg(ws), ranker=ranker)
    with LiveServer(app) as live:
        assert not scorer.refresh() and "feature view user_embeddings holds embeddings of model ffff" in scorer.fault
        with pytest.raises(StoreChanged, match="not scoring until"):
            scorer.score(3, ITEMS)
        status, _, body = live.call("POST", "/score", {"user_id": 3, "item_ids": ITEMS})
        assert status == 503 and "model ffffffffffffffff" in body["error"]
        assert live.call("GET", "/health")[:1] == (503,)
        view.tags[FINGERPRINT_TAG] = ws.syn.fingerprint.digest
        writer.apply([view])
        scorer.refresh()
        assert scorer.fault is None and live.call("POST", "/score", {"user_id": 3, "item_ids": ITEMS})[0] == 200


# ------------------------------------------------------------------------------------------------
# The HTTP contract


def test_rank_is_best_first_with_ties_in_input_order(server):
    items = [1002, 5, 1001, 3, 17, 12]  # 1001 and 1002: unknown alike, so the same score
    _, _, scored = server.call("POST", "/score", {"user_id": 3, "item_ids": items})
    scores = dict(zip(items, scored["scores"]))
    assert scores[1001] == scores[1002]
    status, _, body = server.call("POST", "/rank", {"user_id": 3, "item_ids": items})
    assert status == 200 and body["user_id"] == 3
    ranked = [e["item_id"] for e in body["items"]]
    assert ranked == sorted(items, key=lambda i: -scores[i])  # sorted() is stable: ties keep input order
    assert ranked.index(1002) < ranked.index(1001)
    assert [e["score"] for e in body["items"]] == [scores[i] for i in ranked]
    _, _, top = server.call("POST", "/rank", {"user_id": 3, "item_ids": items, "top_k": 2})
    assert top["items"] == body["items"][:2]
    assert server.call("POST", "/rank", {"user_id": 3, "item_ids": items, "top_k": None})[2] == body
    assert server.call("POST", "/rank", {"user_id": 3, "item_ids": items, "top_k": 0})[2]["items"] == []


def test_health(server, served):
    status, _, body = server.call("GET", "/health")
    assert status == 200 and body["status"] == "ok"
    assert body["model_fingerprint"] == served.syn.fingerprint.digest and body["feature_service"] == "ranker_llm"
    assert body["item_inputs"] == 20 and body["events"] is False


BAD = [
    ("/score", b'{"user_id": 1, "item_ids": [1, 2', 400, r"malformed JSON"),
    ("/score", b"\xff\xfe", 400, r"malformed JSON"),
    ("/score", [1, 2], 422, r"must be a JSON object"),
    ("/score", {"user_id": 1, "item_ids": [1], "items": [2]}, 422, r"unknown field\(s\) 'items'"),
    ("/score", {"user_id": 1, "item_ids": [1], "top_k": 1}, 422, r"unknown field\(s\) 'top_k'"),
    ("/score", {"user_id": 1}, 422, r"missing field\(s\) item_ids"),
    ("/score", {"user_id": 1, "item_ids": []}, 422, r"item_ids is empty"),
    ("/score", {"user_id": 1, "item_ids": list(range(51))}, 422, r"51 candidates, more than the limit of 50"),
    ("/score", {"user_id": 1, "item_ids": 5}, 422, r"item_ids: expected a list"),
    ("/score", {"user_id": 1, "item_ids": [1, 1.5]}, 422, r"item_ids\[1\]: expected an integer, got 1.5"),
    ("/score", {"user_id": 1, "item_ids": [2.0]}, 422, r"item_ids\[0\]: expected an integer, got 2.0"),
    ("/score", {"user_id": 1, "item_ids": [True]}, 422, r"item_ids\[0\]: expected an integer, got true"),
    ("/score", {"user_id": "1", "item_ids": [1]}, 422, r"user_id: expected an integer, got \"1\""),
    ("/score", {"user_id": None, "item_ids": [1]}, 422, r"user_id: expected an integer, got null"),
    ("/score", {"user_id": 2**64, "item_ids": [1]}, 422, r"outside the 64-bit integer range"),
    ("/rank", {"user_id": 1, "item_ids": [1], "top_k": -1}, 422, r"top_k: must be 0 or more, got -1"),
    ("/rank", {"user_id": 1, "item_ids": [1], "top_k": 1.5}, 422, r"top_k: expected an integer"),
    ("/score", {"user_id": 1, "item_ids": list(range(10**6, 10**6 + 700))}, 413, r"more than the limit of 4096 bytes"),
]


@pytest.mark.parametrize("path,body,status,message", BAD)
def test_bad_request(server, path, body, status, message):
    import re

    got, _, payload = server.call("POST", path, body)
    assert got == status, payload
    assert re.search(message, payload["error"]), payload


def test_body_over_the_limit_is_refused_while_streaming(server):
    """No Content-Length (chunked): the body is cut at the limit, not read to its end."""
    import select

    chunks = [b'{"user_id": 1, "item_ids": [' + b"1234567890, " * 40 for _ in range(40)]
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.sendall(b"POST /score HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n")
    sent = 0
    for chunk in chunks:  # one at a time, until the server answers
        sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        sent += len(chunk)
        if select.select([sock], [], [], 0.2)[0]:
            break
    response = b""
    while data := sock.recv(65536):
        response += data
    sock.close()
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413") and b"connection: close" in head.lower()
    assert "4096 bytes" in json.loads(body)["error"]
    assert sent < sum(map(len, chunks)) / 2  # refused long before the body's end


def test_unknown_paths_and_methods(server):
    status, _, body = server.call("GET", "/score")
    assert status == 405 and "GET is not allowed on /score" in body["error"]
    status, _, body = server.call("GET", "/nope")
    assert status == 404 and "POST /score" in body["error"]
    status, _, body = server.call("POST", "/events", {"user_id": 1})
    assert status == 404 and "--enable-events" in body["error"]


def _samples(text: str) -> dict[tuple, float]:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_count_requests_latency_and_missing_features(server):
    # (counted from a snapshot: prometheus_client may keep one process's values per metric name, so
    # the other tests' requests can show in them)
    before = _samples(server.call("GET", "/metrics")[2])
    assert server.call("POST", "/score", {"user_id": 999, "item_ids": [3, 999]})[0] == 200
    assert server.call("POST", "/rank", {"user_id": 3, "item_ids": [3, 17]})[0] == 200
    assert server.call("POST", "/score", {"user_id": 1, "item_ids": []})[0] == 422
    status, headers, text = server.call("GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    after = _samples(text)
    m = {k: v - before.get(k, 0.0) for k, v in after.items()}
    assert m[("llmfeat_serve_requests_total", (("endpoint", "/score"), ("status", "200")))] == 1
    assert m[("llmfeat_serve_requests_total", (("endpoint", "/score"), ("status", "422")))] == 1
    assert m[("llmfeat_serve_requests_total", (("endpoint", "/rank"), ("status", "200")))] == 1
    assert m[("llmfeat_serve_requests_total", (("endpoint", "/metrics"), ("status", "200")))] == 1
    assert m[("llmfeat_serve_request_seconds_count", (("endpoint", "/score"),))] == 2
    assert m[("llmfeat_serve_request_seconds_bucket", (("endpoint", "/rank"), ("le", "+Inf")))] == 1
    assert m[("llmfeat_serve_candidates_total", ())] == 4
    assert m[("llmfeat_serve_cold_users_total", ())] == 1  # user 999
    missing = {dict(k[1])["feature"]: v for k, v in m.items() if k[0] == "llmfeat_serve_missing_features_total"}
    assert missing["unknown_user_id"] == 2 and missing["missing_user_embedding"] == 2  # user 999's two rows
    assert missing["missing_item_embedding"] == 1 and missing["unknown_item_genres"] == 1  # item 999
    assert not any(name.startswith("feast_") for name, _ in after)


# ------------------------------------------------------------------------------------------------
# POST /events


def test_events_need_the_token(served, monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with pytest.raises(UserError, match=r"--enable-events: POST /events needs a bearer token.*LLMFEAT_SERVE_TOKEN"):
        create_app(_cfg(served, enable_events=True))
    monkeypatch.setenv(TOKEN_ENV, "s3cret-token")
    seen = []

    def handler(body):
        if body.get("bad"):
            raise ValueError("event 0: no user_id")
        seen.append(body)
        return {"accepted": len(seen)}

    app = create_app(_cfg(served, enable_events=True, max_body_bytes=1024), events_handler=handler)
    with LiveServer(app) as live:
        event = {"user_id": 3, "item_id": 17, "label": 1}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-token"},
                        {"Authorization": "Basic s3cret-token"}):
            status, got_headers, body = live.call("POST", "/events", event, headers)
            assert status == 401 and got_headers["www-authenticate"] == "Bearer", body
        assert seen == []
        auth = {"Authorization": "Bearer s3cret-token"}
        assert live.call("POST", "/events", event, auth)[2] == {"accepted": 1} and seen == [event]
        assert live.call("POST", "/events", {"bad": 1}, auth)[:1] == (422,)
        assert live.call("POST", "/events", b"{", auth)[0] == 400
        assert live.call("POST", "/events", {"x": "y" * 2000}, auth)[0] == 413
        assert live.call("GET", "/health")[2]["events"] is True


def test_events_on_a_data_dir_without_a_finetuned_checkpoint_refuse_to_start(served, monkeypatch):
    """The default handler (llm_features.events.EventProcessor) loads at start: a data dir it cannot
    push to stops the start with the reason (here: no fine-tuned checkpoint), not a 5xx per event."""
    monkeypatch.setenv(TOKEN_ENV, "t")
    with pytest.raises(UserError, match="finetune"):
        create_app(_cfg(served, enable_events=True))


# ------------------------------------------------------------------------------------------------
# The command


@pytest.fixture
def no_uvicorn(monkeypatch):
    """A refusal must come before uvicorn starts; if it does not, fail instead of serving forever."""
    import uvicorn

    def fail(*args, **kwargs):
        raise AssertionError("uvicorn.run reached: the bad input was not refused")

    monkeypatch.setattr(uvicorn, "run", fail)


def test_serve_refuses_a_ranker_of_another_model(served, tmp_path, no_uvicorn):
    ckpt = Path(shutil.copytree(served.ckpt, tmp_path / "ckpt"))
    payload = json.loads((ckpt / "ranker.json").read_text())
    payload["fingerprint"] = "0" * 16
    (ckpt / "ranker.json").write_text(json.dumps(payload))
    run_bad(["serve", "--ranker", ckpt, "--repo", served.repo, "--data-dir", served.data],
            expect=r"ckpt: the ranker was trained on embeddings of model 0{16}, but feature view "
                   r"\w+_embeddings holds embeddings of model [0-9a-f]{16} \(registry of .*\)\. Serve the data dir",
            unchanged=[ckpt])


def test_serve_refuses_an_unmaterialized_store(served, tmp_path, no_uvicorn):
    data = tmp_path / "data"
    write_synthetic_workspace(data)
    apply_definitions(open_store(served.repo, data))
    run_bad(["serve", "--ranker", served.ckpt, "--repo", served.repo, "--data-dir", data],
            expect=r"online store has no rows for feature view\(s\) .* never materialized", unchanged=[data])


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_serve_refuses_a_directory_without_a_ranker(served, tmp_path, no_uvicorn, make):
    ckpt = tmp_path / "runs"
    if make == "empty":
        ckpt.mkdir()
    what = "does not exist" if make == "missing" else r"is not a ranker checkpoint \(no ranker.json\)"
    run_bad(["serve", "--ranker", ckpt, "--repo", served.repo, "--data-dir", served.data],
            expect=rf"runs, --ranker: {what}\. Pass the --out directory of `llmfeat ranker train`")


def test_serve_refuses_events_without_a_token(served, no_uvicorn):
    env = {TOKEN_ENV: ""}
    run_bad(["serve", "--ranker", served.ckpt, "--repo", served.repo, "--data-dir", served.data, "--enable-events"],
            expect=r"--enable-events: POST /events needs a bearer token, and \$LLMFEAT_SERVE_TOKEN is not set",
            env=env)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serves_with_two_workers(served):
    port = _free_port()
    cmd = [sys.executable, "-c", "from llm_features.cli import run; run()", "serve", "--ranker", str(served.ckpt),
           "--repo", str(served.repo), "--data-dir", str(served.data), "--port", str(port), "--workers", "2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "llmfeat serve did not answer /health within 120 s"
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        ranker = Ranker.load(served.ckpt, repo=served.repo, data_dir=served.data)
        expected = _reference(ranker, 3, ITEMS)[0]
        for _ in range(8):  # a new connection each: both workers answer, and both count
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("POST", "/score", json.dumps({"user_id": 3, "item_ids": ITEMS}))
            resp = conn.getresponse()
            assert resp.status == 200
            np.testing.assert_allclose(json.loads(resp.read())["scores"], expected, rtol=1e-5, atol=1e-6)
        conn.request("GET", "/metrics")
        m = _samples(conn.getresponse().read().decode())
        assert m[("llmfeat_serve_requests_total", (("endpoint", "/score"), ("status", "200")))] == 8
        assert m[("llmfeat_serve_candidates_total", ())] == 8 * len(ITEMS)
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert f"on http://127.0.0.1:{port}: 2 worker(s)" in out and "Traceback" not in out
