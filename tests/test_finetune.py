"""Fine-tuning: k = 1 is the sliding window exactly, no target sees its label or the future, the recipe runs."""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow as pa
import pytest
import torch
from click.testing import CliRunner

from llm_features.backbone import Backbone, BackboneConfig
from llm_features.config import config_from_options
from llm_features.fingerprint import FINGERPRINT_METADATA_KEY
from llm_features.finetune import FinetuneConfig, FinetuneModel, load_finetuned
from llm_features.finetune.data import load_finetune_data
from llm_features.finetune.masks import LEAKAGE_VARIANTS
from llm_features.finetune.packing import (
    NUM_FEEDBACK,
    BehaviorPacker,
    TokenPacker,
    UserHistories,
    feedback_words,
    make_blocks,
)
from llm_features.finetune.config import config_to_dict
from llm_features.finetune.train import finetune, predict
from llm_features.metrics import roc_auc
from llm_features.parquet_io import embedding_array, utc_us, write_part
from llm_features.workspace import Workspace

N_BEHAVIORS, N_ITEMS, DIM = 9, 6, 32
TEXTS = [f"movie {i} ({1990 + i}) | genre {'abc'[i % 3]}" for i in range(N_BEHAVIORS)]


@pytest.fixture(scope="module")
def backbones(tiny_bert_dir, tiny_llama_dir):
    return {
        "bert": Backbone.load(BackboneConfig(model=tiny_bert_dir, split_layer=2)),
        "llama": Backbone.load(BackboneConfig(model=tiny_llama_dir, split_layer=2)),
    }


def random_arrays(seed: int, users: int = 3, max_len: int = 14):
    rng = np.random.default_rng(seed)
    user, time = [], []
    for u in range(users):
        m = int(rng.integers(2, max_len))
        steps = np.where(rng.random(m) < 0.35, 0, rng.integers(1, 4, m))
        user += [u] * m
        time += list(np.cumsum(steps))
    n = len(user)
    label = rng.integers(0, 2, n)
    return dict(
        user=np.array(user), time=np.array(time), behavior_row=rng.integers(0, N_BEHAVIORS, n),
        item_row=rng.integers(0, N_ITEMS, n), label=label, feedback=rng.integers(0, NUM_FEEDBACK, n),
    )


def make_model(backbone, granularity, leakage, n, seed=0, distance_bias="auto", attention="auto"):
    torch.manual_seed(seed)
    model = FinetuneModel(backbone, granularity=granularity, context_size=n, leakage=leakage,
                          distance_bias=distance_bias, attention=attention)
    with torch.no_grad():  # make every new part non-trivial
        if model.distance_bias is not None and model.distance_bias.kind == "learned":
            model.distance_bias.table.normal_(0, 1.0)
        model.query.normal_(0, 1.0)
        if model.feedback is not None:
            model.feedback.weight.normal_(0, 1.0)
    return model.eval()


def packer_for(model, hist, tables):
    if model.granularity == "behavior":
        return BehaviorPacker(hist, tables["e"], tables["v"])
    bb = model.backbone
    return TokenPacker(hist, TEXTS, tables["v"], bb.tokenize, pad_id=int(bb.tokenizer.pad_token_id))


def tables(seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"e": torch.randn(N_BEHAVIORS, DIM, generator=g), "v": torch.randn(N_ITEMS, DIM, generator=g)}


def all_logits(model, hist, tabs, k, n):
    blocks = make_blocks(hist, np.ones(len(hist), bool), k, n)
    rows, _, logits = predict(model, packer_for(model, hist, tabs), blocks, 64, torch.device("cpu"))
    return dict(zip(rows.tolist(), logits.tolist()))


# --------------------------------------------------------------------------- the reference sliding window
@torch.no_grad()
def sliding_window_reference(model: FinetuneModel, hist: UserHistories, tabs, n: int) -> dict[int, float]:
    """One plain sequence per target, written from the definitions (timestamps, not the packing code)."""
    bb = model.backbone
    out = {}
    for j in range(len(hist)):
        same_user = [h for h in range(len(hist)) if hist.user_start[h] == hist.user_start[j]]
        earlier = [h for h in same_user if hist.time[h] < hist.time[j]]
        ctx = earlier[max(0, len(earlier) - n):]
        # per token: (span, slot, is_query); spans are contexts then the query
        if model.granularity == "behavior":
            x = [tabs["e"][hist.behavior_row[h]] + model.feedback.weight[hist.feedback[h]] for h in ctx]
            x.append(model.query)
            x = torch.stack(x)[None]
            spans = list(range(len(ctx) + 1))
            rope = list(range(len(ctx) + 1))
            causal = False
        else:
            ids, spans, rope, emb_pos = [], [], [], []
            for s, h in enumerate(ctx):
                t = bb.tokenize([f"{TEXTS[hist.behavior_row[h]]} ({feedback_words(int(hist.feedback[h]))})"])[0]
                ids += t
                spans += [s] * len(t)
                emb_pos += list(range(len(t)))
            rope = list(range(len(ids) + 1))
            ids.append(int(bb.tokenizer.pad_token_id))
            spans.append(len(ctx))
            emb_pos.append(0)
            x = bb.embed(torch.tensor([ids]), torch.tensor([emb_pos]))
            x[0, -1] = model.query
            causal = bb.family == "decoder"
        slot = [ctx[s] if s < len(ctx) else hist.time_start[j] for s in spans]
        length = len(spans)
        allowed = torch.zeros(length, length, dtype=torch.bool)
        for p in range(length):
            for t in range(length):
                if spans[p] == spans[t]:
                    allowed[p, t] = t <= p or not causal
                elif spans[t] == len(ctx):
                    allowed[p, t] = False  # nobody sees the query
                elif spans[p] == len(ctx):
                    allowed[p, t] = True  # the query sees its whole window
                elif model.leakage != "isolated":
                    allowed[p, t] = bool(hist.time[ctx[spans[t]]] < hist.time[ctx[spans[p]]])
        bias = torch.zeros(1, 1, length, length)
        if model.distance_bias is not None:
            d = torch.tensor(slot)[:, None] - torch.tensor(slot)[None, :]
            bias = model.distance_bias(d.clamp(min=0)[None])
        bias = bias.masked_fill(~allowed[None, None], torch.finfo(torch.float32).min)
        pos = torch.tensor([rope])
        if model.granularity == "token":
            x = bb.shallow(x, bias, pos)
        h = bb.deep(x, bias, pos)[0, -1]
        item = tabs["v"][hist.item_row[j]]
        out[j] = float(model.head(h[None], item[None])[0])
    return out


@pytest.mark.parametrize("granularity", ["behavior", "token"])
@pytest.mark.parametrize("kind", ["bert", "llama"])
@pytest.mark.parametrize("leakage", LEAKAGE_VARIANTS)
@pytest.mark.parametrize("attention", ["auto", "tiled"])
def test_k1_reproduces_sliding_window_logits(backbones, kind, granularity, leakage, attention):
    n = 4
    hist = UserHistories.from_arrays(**random_arrays(0))
    tabs = tables()
    model = make_model(backbones[kind], granularity, leakage, n, attention=attention)
    want = sliding_window_reference(model, hist, tabs, n)
    got = all_logits(model, hist, tabs, 1, n)
    assert got.keys() == want.keys()
    for j in want:
        assert got[j] == pytest.approx(want[j], abs=1e-5, rel=1e-5), j
    if leakage == "isolated":  # exact isolation: any k gives the sliding-window logits
        got_k = all_logits(model, hist, tabs, 5, n)
        for j in want:
            assert got_k[j] == pytest.approx(want[j], abs=1e-5, rel=1e-5), j


@pytest.mark.parametrize("kind,distance_bias", [("bert", "alibi"), ("llama", "learned"), ("bert", "none")])
def test_k1_reproduces_sliding_window_with_any_distance_bias(backbones, kind, distance_bias):
    n = 4
    hist = UserHistories.from_arrays(**random_arrays(1))
    tabs = tables()
    model = make_model(backbones[kind], "behavior", "windowed", n, distance_bias=distance_bias)
    want = sliding_window_reference(model, hist, tabs, n)
    got = all_logits(model, hist, tabs, 1, n)
    for j in want:
        assert got[j] == pytest.approx(want[j], abs=1e-5, rel=1e-5), j


# --------------------------------------------------------------------------- no label, no future
def _keyed(hist, logits):
    """Logits keyed by (user id, index within the user): stable when other users' rows shift."""
    user = np.repeat(hist.user_ids, np.diff(hist.offsets))
    return {(int(user[r]), r - int(hist.user_start[r])): v for r, v in logits.items()}


@pytest.mark.parametrize("granularity,attention", [("behavior", "auto"), ("token", "auto"), ("behavior", "tiled")])
@pytest.mark.parametrize("leakage", LEAKAGE_VARIANTS)
def test_logit_independent_of_own_label_and_later_interactions(backbones, granularity, leakage, attention):
    n = 3
    tabs = tables()
    for seed in range(3 if granularity == "behavior" else 2):
        rng = np.random.default_rng(100 + seed)
        kind = ["bert", "llama"][seed % 2]
        model = make_model(backbones[kind], granularity, leakage, n, seed=seed, attention=attention)
        base = random_arrays(seed + 10)
        hist = UserHistories.from_arrays(**base)
        cut = int(rng.choice(hist.time))  # everything at or after `cut` changes
        for k in (1, 4):
            before = _keyed(hist, all_logits(model, hist, tabs, k, n))
            changed = {key: v.copy() for key, v in base.items()}
            at_or_after = changed["time"] >= cut
            after = changed["time"] > cut
            m = int(at_or_after.sum())
            changed["label"][at_or_after] = 1 - changed["label"][at_or_after]
            changed["feedback"][at_or_after] = rng.integers(0, NUM_FEEDBACK, m)
            changed["behavior_row"][at_or_after] = rng.integers(0, N_BEHAVIORS, m)
            changed["item_row"][after] = rng.integers(0, N_ITEMS, int(after.sum()))
            hist2 = UserHistories.from_arrays(**changed)
            after_change = _keyed(hist2, all_logits(model, hist2, tabs, k, n))
            # and with the later interactions gone altogether
            keep = base["time"] <= cut
            hist3 = UserHistories.from_arrays(**{key: v[keep] for key, v in changed.items()})
            truncated = _keyed(hist3, all_logits(model, hist3, tabs, k, n))
            user = np.repeat(hist.user_ids, np.diff(hist.offsets))
            for row in range(len(hist)):
                key = (int(user[row]), row - int(hist.user_start[row]))
                value = before[key]
                if hist.time[row] <= cut:
                    assert after_change[key] == pytest.approx(value, abs=1e-5), (seed, k, key)
                    assert truncated[key] == pytest.approx(value, abs=1e-5), (seed, k, key)


def test_equal_timestamp_interactions_are_not_context(backbones):
    n = 5
    base = dict(user=np.zeros(5), time=np.array([0, 1, 2, 2, 2]), behavior_row=np.array([0, 1, 2, 3, 4]),
                item_row=np.array([0, 1, 2, 3, 4]), label=np.array([1, 0, 1, 0, 1]), feedback=np.array([1, 0, 1, 0, 1]))
    tabs = tables()
    for leakage in LEAKAGE_VARIANTS:
        model = make_model(backbones["bert"], "behavior", leakage, n)
        ref = all_logits(model, UserHistories.from_arrays(**base), tabs, 3, n)
        for other in (2, 3, 4):  # change one tied interaction: the two others at t=2 do not move
            changed = {k: v.copy() for k, v in base.items()}
            changed["behavior_row"][other] = 8
            changed["feedback"][other] = 7
            got = all_logits(model, UserHistories.from_arrays(**changed), tabs, 3, n)
            for j in (2, 3, 4):
                if j != other:
                    assert got[j] == pytest.approx(ref[j], abs=1e-6), (leakage, other, j)
        # but an earlier interaction is context
        changed = {k: v.copy() for k, v in base.items()}
        changed["feedback"][1] = 5
        got = all_logits(model, UserHistories.from_arrays(**changed), tabs, 3, n)
        assert got[3] != pytest.approx(ref[3], abs=1e-6)


# --------------------------------------------------------------------------- the recipe on a tiny workspace
@pytest.fixture(scope="module")
def tiny_workspace(tmp_path_factory, backbones):
    """Canonical interactions + embedding parts encoded by the tiny BERT (split at 2)."""
    bb = backbones["bert"]
    root = tmp_path_factory.mktemp("ws")
    ws = Workspace.at(root)
    rng = np.random.default_rng(0)
    rows = []
    for u in range(24):
        taste = 0 if u % 4 else rng.integers(1, 3)  # most users like genre 0: the item alone is predictive
        t = 0
        for _ in range(int(rng.integers(8, 20))):
            t += int(rng.integers(0, 3)) * 3600
            b = int(rng.integers(0, N_BEHAVIORS))
            rating = float(rng.integers(3, 6) if b % 3 == taste else rng.integers(1, 4))
            rows.append((u, b, 946684800 + t, rating))
    rows.sort(key=lambda r: (r[2], r[0], r[1]))
    user, item, ts, rating = (np.array(c) for c in zip(*rows))
    cut1, cut2 = np.quantile(ts, [0.7, 0.85])
    split = np.where(ts < cut1, "train", np.where(ts < cut2, "valid", "test"))
    table = pa.table({
        "user_id": pa.array(user, pa.int64()), "item_id": pa.array(item, pa.int64()),
        "event_timestamp": utc_us(pa.array(ts * 1_000_000, pa.timestamp("us"))),
        "behavior_id": pa.array(item + 1000, pa.int64()),
        "behavior_text": pa.array([TEXTS[i] for i in item]),
        "label": pa.array((rating > 3).astype(np.int8)), "rating": pa.array(rating, pa.float32()),
        "split": pa.array(split),
    })
    from llm_features.parquet_io import write_table_atomic

    write_table_atomic(table, ws.interactions)
    vecs = bb.encode_texts(TEXTS).numpy()
    meta = {FINGERPRINT_METADATA_KEY: bb.fingerprint.to_json()}
    first = pa.array(np.full(N_BEHAVIORS, 946684800 * 1_000_000), pa.timestamp("us", tz="UTC"))
    write_part(ws.atomic_behavior_embeddings, pa.table({
        "behavior_id": pa.array(np.arange(N_BEHAVIORS) + 1000, pa.int64()),
        "behavior_embedding": embedding_array(vecs), "event_timestamp": first}), metadata=meta)
    write_part(ws.item_embeddings, pa.table({
        "item_id": pa.array(np.arange(N_BEHAVIORS), pa.int64()),
        "item_embedding": embedding_array(vecs), "event_timestamp": first}), metadata=meta)
    ws.claim_fingerprint(bb.fingerprint)
    return root


def _cfg(tiny_bert_dir, root, out, **kw):
    """Options by name; the backbone's (``pooling``) go to ``cfg.backbone``."""
    base = dict(model=tiny_bert_dir, split_layer=2, data_dir=root, out=out, context_size=4, targets_per_sequence=4,
                batch_size=16, eval_batch_size=64, warmup_steps=2, head_hidden=16, log_every=0, lr=1e-3)
    base.update(kw)
    return config_from_options(FinetuneConfig, **base)


def test_load_finetune_data(tiny_workspace, backbones):
    data = load_finetune_data(tiny_workspace, backbones["bert"].fingerprint)
    assert data.behavior_table.shape == (N_BEHAVIORS, DIM)
    assert (np.diff(data.hist.time)[np.diff(data.hist.user_start) == 0] >= 0).all()
    assert set(np.unique(data.hist.split)) == {0, 1, 2}
    assert (data.hist.feedback >= 2).all()  # ratings known
    other = Backbone.load(BackboneConfig(model=backbones["bert"].cfg.model, split_layer=1)).fingerprint
    with pytest.raises(Exception, match="split_layer"):
        load_finetune_data(tiny_workspace, other)


@pytest.mark.parametrize("granularity,packing,lora", [
    ("behavior", "dti", False), ("behavior", "sliding-window", False), ("behavior", "dti", True),
    ("token", "dti", False),
])
def test_finetune_writes_checkpoint_and_metrics(tiny_bert_dir, tiny_workspace, tmp_path, granularity, packing,
                                                  lora):
    out = tmp_path / "ckpt"
    cfg = _cfg(tiny_bert_dir, tiny_workspace, out, granularity=granularity, packing=packing, lora=lora, epochs=2,
               measure_memory=True)
    m = finetune(cfg)
    assert {"auc", "logloss", "train_seconds", "targets_per_s", "peak_rss_mb", "valid", "test", "options"} <= set(m)
    assert 0 <= m["test"]["auc"] <= 1 and m["test"]["targets"] > 0 and m["train_targets"] > 0
    assert json.loads((out / "metrics.json").read_text())["auc"] == pytest.approx(m["auc"], nan_ok=True)
    saved = json.loads((out / "config.json").read_text())
    assert saved["finetune"]["packing"] == packing and saved["fingerprint"]["split_layer"] == 2
    if lora:
        assert all("lora_" in n or not n.startswith("backbone.") for n in saved["trainable"])
        assert any("lora_" in n for n in saved["trainable"])
    # the checkpoint reloads into the same predictions
    model, cfg2 = load_finetuned(out)
    assert cfg2 == cfg
    from llm_features.finetune.packing import make_packer
    from llm_features.finetune.train import evaluate, split_blocks

    data = load_finetune_data(tiny_workspace, model.backbone.fingerprint, need_behavior_vectors=True)
    again = evaluate(model, make_packer(cfg, data, model.backbone), split_blocks(cfg, data, "test", cfg.eval_k),
                     64, torch.device("cpu"))
    assert again["auc"] == pytest.approx(m["test"]["auc"], abs=1e-6)
    assert again["logloss"] == pytest.approx(m["test"]["logloss"], abs=1e-5)
    # the saved test predictions are the targets the test metrics were computed on
    pred = np.load(out / "test_predictions.npz")
    assert len(pred["row"]) == m["test"]["targets"] and len(np.unique(pred["row"])) == len(pred["row"])
    assert roc_auc(pred["label"], pred["logit"]) == pytest.approx(m["test"]["auc"], abs=1e-6)
    from llm_features.finetune.train import split_targets

    assert set(pred["row"].tolist()) == set(np.flatnonzero(split_targets(cfg, data, "test")).tolist())
    # speed and memory of the training steps alone (memory: with measure_memory)
    assert m["steady_targets_per_s"] > 0 and m["steady_steps"] == max(0, m["steps"] - 2)
    assert 0 < m["rss_before_train_mb"] <= m["train_peak_rss_mb"] <= m["peak_rss_mb"] + 1
    assert m["train_rss_increase_mb"] == pytest.approx(m["train_peak_rss_mb"] - m["rss_before_train_mb"])


def test_checkpoints_of_the_old_flat_config_form_still_load(tiny_bert_dir, tiny_workspace, tmp_path):
    """config.json's "finetune" section is nested ({"backbone": {...}, "runtime": {...}, ...}) since
    those options moved into FinetuneConfig.backbone and .runtime; checkpoints written before hold them
    flat, and load the same, with the same checkpoint identity (what embed-users stamps its rows with).
    ``trust_remote_code`` is never read back, in either form."""
    from llm_features.embed_users import checkpoint_identity
    from llm_features.finetune.checkpoint import build_model, read_checkpoint_config, save_checkpoint

    out = tmp_path / "ckpt"
    cfg = _cfg(tiny_bert_dir, tiny_workspace, out, pooling="mean", max_tokens=32)
    bb = Backbone.load(cfg.backbone)
    torch.manual_seed(0)
    save_checkpoint(out, build_model(cfg, bb, bb.hidden_size), cfg, item_dim=bb.hidden_size)
    meta = json.loads((out / "config.json").read_text())
    nested = meta["finetune"]
    assert nested["backbone"]["split_layer"] == 2 and nested["backbone"]["max_tokens"] == 32
    assert "split_layer" not in nested and nested["context_size"] == 4
    assert nested["runtime"] == {"device": "auto", "num_threads": None}
    assert read_checkpoint_config(out)[0] == cfg
    nested["backbone"]["trust_remote_code"] = True  # an edited file: ignored, the command line decides
    (out / "config.json").write_text(json.dumps(meta))
    assert read_checkpoint_config(out)[0] == cfg
    identity = checkpoint_identity(out)["id"]
    # the form of the checkpoints written before: one key per option
    meta["finetune"] = {k: v for k, v in nested.items() if not isinstance(v, dict)}
    for section in ("backbone", "runtime"):
        meta["finetune"].update(nested[section])
    assert meta["finetune"]["split_layer"] == 2 and meta["finetune"]["trust_remote_code"] is True
    (out / "config.json").write_text(json.dumps(meta))
    old, _, _ = read_checkpoint_config(out)
    assert old == cfg and old.backbone.trust_remote_code is False
    assert checkpoint_identity(out)["id"] == identity
    model, loaded = load_finetuned(out, backbone=bb)
    assert loaded == cfg and model.backbone.split_layer == 2


@pytest.mark.slow
def test_training_learns_the_signal(tiny_bert_dir, tiny_workspace, tmp_path):
    """Most users like one genre: a few epochs of DTI must lower the loss and beat chance on held-out data."""
    m = finetune(_cfg(tiny_bert_dir, tiny_workspace, tmp_path / "c", epochs=4, head_lr=3e-3))
    losses = [h["train_loss"] for h in m["history"]]
    assert losses[-1] < losses[0], m["history"]
    assert m["valid"]["auc"] > 0.65 and m["test"]["auc"] > 0.65, (m["valid"], m["test"])


@pytest.mark.parametrize("ema_decay", [0.0, 0.8])
def test_resume_gives_identical_metrics(tiny_bert_dir, tiny_workspace, tmp_path, ema_decay):
    full = finetune(_cfg(tiny_bert_dir, tiny_workspace, tmp_path / "full", epochs=2, ema_decay=ema_decay))
    # same run, stopped after 3 steps, then resumed
    part = _cfg(tiny_bert_dir, tiny_workspace, tmp_path / "part", epochs=2, save_every=3, ema_decay=ema_decay)
    import llm_features.finetune.train as tr

    class Stop(Exception):
        pass

    real = tr.save_checkpoint
    calls = {"n": 0}

    def save_then_stop(*a, **kw):
        real(*a, **kw)
        calls["n"] += 1
        if calls["n"] == 1:
            raise Stop

    tr.save_checkpoint = save_then_stop
    try:
        with pytest.raises(Stop):
            finetune(part)
    finally:
        tr.save_checkpoint = real
    resumed = finetune(FinetuneConfig(**{**part.__dict__, "resume": True}))
    assert resumed["steps"] == full["steps"]
    assert resumed["test"]["auc"] == pytest.approx(full["test"]["auc"], abs=1e-7)
    assert resumed["test"]["logloss"] == pytest.approx(full["test"]["logloss"], abs=1e-7)


def test_weight_average_update_and_swap():
    from llm_features.finetune.ema import WeightAverage

    lin = torch.nn.Linear(3, 2)
    frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)
    lin.register_parameter("frozen", frozen)
    ema = WeightAverage(lin, decay=0.9)
    assert len(ema.shadow) == 2  # weight and bias, not the frozen parameter
    expected = [p.detach().clone() for p in (lin.weight, lin.bias)]
    for t in range(1, 6):
        with torch.no_grad():
            lin.weight.add_(1.0)
            lin.bias.sub_(0.5)
        ema.update()
        d = min(0.9, (1 + t) / (10 + t))
        expected = [d * e + (1 - d) * p.detach() for e, p in zip(expected, (lin.weight, lin.bias))]
    for s_, e in zip(ema.shadow, expected):
        torch.testing.assert_close(s_, e)
    trained = lin.weight.detach().clone()
    with ema.applied():
        torch.testing.assert_close(lin.weight.detach(), expected[0])
    torch.testing.assert_close(lin.weight.detach(), trained)
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(lin, decay=1.0)


def test_ema_weights_are_what_is_evaluated_and_saved(tiny_bert_dir, tiny_workspace, tmp_path):
    raw = finetune(_cfg(tiny_bert_dir, tiny_workspace, tmp_path / "raw", epochs=2))
    out = tmp_path / "ema"
    cfg = _cfg(tiny_bert_dir, tiny_workspace, out, epochs=2, ema_decay=0.8)
    m = finetune(cfg)
    assert raw["train_targets"] == m["train_targets"]
    a, b = np.load(tmp_path / "raw" / "test_predictions.npz"), np.load(out / "test_predictions.npz")
    assert (a["row"] == b["row"]).all() and not np.allclose(a["logit"], b["logit"])  # the average is evaluated
    model, _ = load_finetuned(out)  # and it is what the checkpoint holds
    from llm_features.finetune.packing import make_packer
    from llm_features.finetune.train import evaluate, split_blocks

    data = load_finetune_data(tiny_workspace, model.backbone.fingerprint, need_behavior_vectors=True)
    again = evaluate(model, make_packer(cfg, data, model.backbone), split_blocks(cfg, data, "test", cfg.eval_k),
                     64, torch.device("cpu"))
    assert again["auc"] == pytest.approx(m["test"]["auc"], abs=1e-6)
    assert again["logloss"] == pytest.approx(m["test"]["logloss"], abs=1e-5)


def test_optimizer_betas_and_data_seed(tiny_bert_dir, tiny_workspace, tmp_path, backbones):
    from llm_features.finetune.checkpoint import build_model
    from llm_features.finetune.train import make_optimizer, split_targets

    cfg = _cfg(tiny_bert_dir, tiny_workspace, tmp_path, adam_beta1=0.8, adam_beta2=0.99)
    opt = make_optimizer(build_model(cfg, backbones["bert"], DIM), cfg)
    assert all(g["betas"] == (0.8, 0.99) for g in opt.param_groups)
    # --data-seed: the same users and targets whatever --seed is
    data = load_finetune_data(tiny_workspace, backbones["bert"].fingerprint)
    pick = lambda **kw: split_targets(_cfg(tiny_bert_dir, tiny_workspace, tmp_path, max_targets=20, **kw), data,
                                      "train")  # noqa: E731
    assert np.array_equal(pick(seed=1, data_seed=5), pick(seed=2, data_seed=5))
    assert np.array_equal(pick(seed=3), pick(seed=0, data_seed=3))
    assert not np.array_equal(pick(seed=1), pick(seed=2))


def test_micro_batches_make_the_same_step(tiny_bert_dir, tiny_workspace, tmp_path):
    from llm_features.finetune.train import token_groups

    assert [g.tolist() for g in token_groups(np.array([5, 5, 12, 3, 3]), 10)] == [[0, 1], [2], [3, 4]]
    assert [g.tolist() for g in token_groups(np.array([5, 5]), 0)] == [[0, 1]]
    opts = dict(epochs=1, dropout=0.0, batch_size=24)
    whole = finetune(_cfg(tiny_bert_dir, tiny_workspace, tmp_path / "whole", micro_batch_tokens=0, **opts))
    parts = finetune(_cfg(tiny_bert_dir, tiny_workspace, tmp_path / "parts", micro_batch_tokens=20, **opts))
    assert parts["steps"] == whole["steps"]
    assert parts["loss_curve"] == pytest.approx(whole["loss_curve"], abs=1e-5)
    for split in ("valid", "test"):
        assert parts[split]["logloss"] == pytest.approx(whole[split]["logloss"], abs=1e-5)


def test_recipe_seams_batch_sampler_and_packer(tiny_bert_dir, tiny_workspace, tmp_path):
    """Diagnostics swap the training batches and the packer through the recipe's seams, not by patching."""
    from llm_features.finetune.packing import make_packer
    from llm_features.finetune.train import FinetuneRecipe, epoch_batches

    sampled, packers = [], []

    def two_batches(blocks, targets_per_batch, seed, epoch):
        sampled.append((len(blocks), targets_per_batch, seed, epoch))
        return epoch_batches(blocks, targets_per_batch, seed, epoch)[:2]

    def packer(cfg, data, backbone):
        packers.append(make_packer(cfg, data, backbone))
        return packers[-1]

    recipe = FinetuneRecipe(_cfg(tiny_bert_dir, tiny_workspace, tmp_path / "seams", epochs=2, seed=3),
                            batch_sampler=two_batches, packer=packer)
    m = recipe.run()
    assert [s[1:] for s in sampled] == [(16, 3, 0), (16, 3, 1)] and sampled[0][0] > 0
    assert m["steps"] == 4 and len(m["history"]) == 2 and len(packers) == 1
    assert "train_rss_increase_mb" not in m and m["peak_rss_mb"] > 0  # the benchmarks' instrumentation is opt-in
    assert recipe.model is None  # cleanup released the model


def test_diag_grouped_batches_uses_the_recipe(tiny_bert_dir, tiny_workspace, tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "diag_grouped_batches.py"
    spec = importlib.util.spec_from_file_location("diag_grouped_batches", path)
    diag = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(diag)
    out = tmp_path / "diag"
    with pytest.raises(SystemExit) as exit_:
        diag.main(["--data-dir", str(tiny_workspace), "--out", str(out), "--k", "4", "--",
                   "--model", str(tiny_bert_dir), "--split-layer", "2", "--context-size", "4", "--batch-size", "16",
                   "--eval-batch-size", "64", "--head-hidden", "16", "--log-every", "0", "--epochs", "1"])
    assert exit_.value.code == 0
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("[diag] epoch 0:")]
    assert len(lines) == 1, lines
    grouped, shuffled = (float(x) for x in re.findall(r"\d+\.\d", lines[0]))  # users per step: ours, random
    assert grouped < shuffled  # whole blocks of 4 targets of one user: fewer users per step
    m = json.loads((out / "metrics.json").read_text())
    assert m["options"]["packing"] == "dti" and m["options"]["targets_per_sequence"] == 1 and m["steps"] > 0


def test_cli(tiny_bert_dir, tiny_workspace, tmp_path):
    from llm_features.cli import main

    out = tmp_path / "cli"
    res = CliRunner().invoke(main, [
        "finetune", "--model", str(tiny_bert_dir), "--split-layer", "2", "--data-dir", str(tiny_workspace),
        "--out", str(out), "--packing", "dti", "--targets-per-sequence", "4", "--context-size", "4",
        "--leakage", "isolated", "--max-steps", "3", "--batch-size", "16", "--head-hidden", "8",
    ])
    assert res.exit_code == 0, res.output
    assert "test AUC" in res.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == 3 and m["options"]["leakage"] == "isolated"


@pytest.mark.distributed
def test_ddp_two_processes_match_one(tiny_bert_dir, tiny_workspace, tmp_path):
    """torchrun + gloo, 2 ranks, same global batch: the same training as one process (dropout off)."""
    import os
    import shutil
    import subprocess
    import sys

    opts = dict(epochs=2, dropout=0.0, num_threads=1, batch_size=24)
    single = finetune(_cfg(tiny_bert_dir, tiny_workspace, tmp_path / "one", **opts, micro_batch_tokens=0))
    # each rank accumulates several passes per step; gradients are averaged once, on the last
    cfg = _cfg(tiny_bert_dir, tiny_workspace, tmp_path / "two", **opts, micro_batch_tokens=30)
    args = []
    for k, v in config_to_dict(cfg).items():
        if v is None or v is False:
            continue
        flag = "--" + k.replace("_", "-")
        args += [flag] if v is True else [flag, str(v)]
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node=2", "--no-python", os.path.join(os.path.dirname(sys.executable),
         "llmfeat"), "finetune", *args], capture_output=True, text=True, env=env, timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["world_size"] == 2
    assert two["steps"] == single["steps"] and two["train_targets"] == single["train_targets"]
    for split in ("valid", "test"):
        assert two[split]["targets"] == single[split]["targets"]
        assert two[split]["auc"] == pytest.approx(single[split]["auc"], abs=1e-4)
        assert two[split]["logloss"] == pytest.approx(single[split]["logloss"], abs=1e-4)


def test_fold_trains_only_on_users_outside_it(tiny_bert_dir, tiny_workspace, tmp_path):
    from llm_features.finetune.data import load_finetune_data
    from llm_features.finetune.train import split_targets
    from llm_features.ids import user_fold

    cfg = _cfg(tiny_bert_dir, tiny_workspace, tmp_path / "f", folds=2, fold=1, epochs=1)
    data = load_finetune_data(tiny_workspace, None)
    users = np.repeat(data.hist.user_ids, np.diff(data.hist.offsets))
    train = split_targets(cfg, data, "train")
    assert train.any() and not (train & (user_fold(users, 2) == 1)).any()
    assert (train | (user_fold(users, 2) == 1) | (data.hist.split != 0)).all()  # every other train row is kept
    assert split_targets(cfg, data, "test").sum() == (data.hist.split == 2).sum()  # evaluation keeps every user
    assert finetune(cfg)["train_targets"] == train.sum()
    with pytest.raises(ValueError, match="--fold must be in 0..1"):
        _cfg(tiny_bert_dir, tiny_workspace, tmp_path / "g", folds=2, fold=2)
    assert user_fold(np.arange(1000), 3).tolist() == user_fold(np.arange(1000), 3).tolist()
    assert set(np.bincount(user_fold(np.arange(3000), 3)) // 100) <= {9, 10, 11}  # about even


def test_the_epoch_with_the_best_valid_auc_is_saved(tiny_bert_dir, tiny_workspace, tmp_path, monkeypatch):
    import llm_features.finetune.train as tr
    from safetensors.torch import load_file

    real = tr.evaluate
    valid_aucs = iter([0.9, 0.5])  # epoch 1 scores better than the last epoch

    def fake(model, packer, blocks, *a, **kw):
        m = real(model, packer, blocks, *a, **kw)
        if kw.get("predictions") is None:
            m["auc"] = next(valid_aucs, m["auc"])
        return m

    monkeypatch.setattr(tr, "evaluate", fake)
    out = tmp_path / "best"
    m = finetune(_cfg(tiny_bert_dir, tiny_workspace, out, epochs=2))
    assert m["selected"]["epoch"] == 1 and m["selected"]["auc"] == 0.9
    saved, best = load_file(str(out / "model.safetensors")), load_file(str(out / "best_epoch.safetensors"))
    assert saved.keys() == best.keys() and all(torch.equal(saved[k], best[k]) for k in saved)
