"""Block-sparse (tiled) attention computes the dense mask's attention exactly, and only where it is sparse."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llm_features.attention import TiledBias, BiasedTiles, tiled_attention
from llm_features.backbone import Backbone, BackboneConfig
from llm_features.finetune import FinetuneModel
from llm_features.finetune.masks import (
    DEFAULT_TILE,
    LEAKAGE_VARIANTS,
    allowed_attention,
    attention_bias,
    tile_keys,
)
from llm_features.finetune.packing import BehaviorPacker, TokenPacker, UserHistories, make_blocks

N_BEHAVIORS, N_ITEMS, DIM = 9, 6, 32
TEXTS = [f"movie {i} | genre {'abc'[i % 3]}" for i in range(N_BEHAVIORS)]


@pytest.fixture(scope="module")
def backbones(tiny_bert_dir, tiny_llama_dir):
    return {
        "bert": Backbone.load(BackboneConfig(model=tiny_bert_dir, split_layer=2)),
        "llama": Backbone.load(BackboneConfig(model=tiny_llama_dir, split_layer=2)),
    }


def long_histories(seed: int, users: int = 3, length: int = 90) -> UserHistories:
    rng = np.random.default_rng(seed)
    m = rng.integers(length // 2, length, users)
    user = np.repeat(np.arange(users), m)
    time = np.concatenate([np.cumsum(np.where(rng.random(k) < 0.3, 0, 1)) for k in m])
    n = len(user)
    return UserHistories.from_arrays(user, time, rng.integers(0, N_BEHAVIORS, n), rng.integers(0, N_ITEMS, n),
                                     rng.integers(0, 2, n), rng.integers(0, 13, n))


def _batch(model, hist, k, n):
    g = torch.Generator().manual_seed(3)
    e, v = torch.randn(N_BEHAVIORS, DIM, generator=g), torch.randn(N_ITEMS, DIM, generator=g)
    blocks = make_blocks(hist, np.ones(len(hist), bool), k, n)
    if model.granularity == "behavior":
        return BehaviorPacker(hist, e, v)(blocks)
    bb = model.backbone
    return TokenPacker(hist, TEXTS, v, bb.tokenize, pad_id=int(bb.tokenizer.pad_token_id))(blocks)


def _logits_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    logits = model(batch)
    (logits * torch.linspace(-1, 1, len(logits))).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


@pytest.mark.parametrize("kind", ["bert", "llama"])
@pytest.mark.parametrize("granularity", ["behavior", "token"])
@pytest.mark.parametrize("leakage", LEAKAGE_VARIANTS)
def test_tiled_attention_equals_dense(backbones, kind, granularity, leakage):
    torch.manual_seed(0)
    n = 6
    dense = FinetuneModel(backbones[kind], granularity=granularity, context_size=n, leakage=leakage,
                          attention="dense")
    with torch.no_grad():
        dense.query.normal_()
        if dense.distance_bias is not None and dense.distance_bias.kind == "learned":
            dense.distance_bias.table.normal_()
    tiled = FinetuneModel(backbones[kind], granularity=granularity, context_size=n, leakage=leakage,
                          attention="tiled")
    tiled.load_state_dict(dense.state_dict())
    for m in (dense, tiled):
        m.train()
        m.set_dropout(0.0)  # the only randomness
    hist = long_histories(1, length=90 if granularity == "behavior" else 30)
    batch = _batch(dense, hist, 24, n)
    bias = tiled.batch_attention_bias(batch)
    assert isinstance(bias, TiledBias)
    want_logits, want_grads = _logits_and_grads(dense, batch)
    got_logits, got_grads = _logits_and_grads(tiled, batch)
    torch.testing.assert_close(got_logits, want_logits, atol=1e-5, rtol=1e-5)
    assert got_grads.keys() == want_grads.keys()
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], atol=1e-4, rtol=1e-4, msg=name)


def test_tiled_bias_is_the_dense_bias_on_its_tiles(backbones):
    model = FinetuneModel(backbones["bert"], context_size=5, attention="tiled")
    with torch.no_grad():
        model.distance_bias.table.normal_()
    batch = _batch(model, long_histories(2), 40, 5)
    tiled = model.batch_attention_bias(batch)
    dense = FinetuneModel(backbones["bert"], context_size=5, attention="dense")
    dense.load_state_dict(model.state_dict())
    want = dense.batch_attention_bias(batch)
    assert torch.equal(tiled.dense().detach(), want.detach())
    # the mask's allowed entries all lie on the kept tiles, and the groups partition the query tiles
    allowed = allowed_attention(batch.layout, 5)
    nt, groups = tile_keys(allowed, DEFAULT_TILE)
    on_tiles = sum(int(g.allowed.sum()) for g in groups)
    assert on_tiles == int(allowed.sum()) - allowed.shape[0] * allowed.shape[1]  # all but the diagonal
    every = torch.cat([g.query_tiles for g in groups]).sort().values
    assert torch.equal(every, torch.arange(allowed.shape[0] * nt))


def test_auto_tiles_long_dti_rows_and_not_sliding_windows(backbones):
    model = FinetuneModel(backbones["bert"], context_size=6)
    hist = long_histories(4, users=4, length=200)
    sw = _batch(model, hist, 1, 6)
    assert isinstance(model.batch_attention_bias(sw), torch.Tensor)  # short rows: dense
    dti = _batch(model, hist, 64, 6)
    bias = model.batch_attention_bias(dti)
    assert isinstance(bias, TiledBias)
    assert bias.keys_per_query <= 0.35 * bias.length, (bias.keys_per_query, bias.length)
    # grouping by width: fewer keys than if every tile read as many key tiles as the widest
    widest = max(g.key_tiles.shape[1] for g in bias.groups)
    assert len(bias.groups) > 1 and bias.keys_per_query < widest * bias.tile + 1


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2)])
def test_tiled_attention_kernel_against_softmax(heads, kv_heads):
    torch.manual_seed(0)
    b, length, d = 2, 45, 8
    allowed = torch.rand(b, length, length) < 0.15
    allowed |= torch.eye(length, dtype=torch.bool)
    allowed[:, :, 30:] &= torch.arange(length)[None, :, None] >= 30  # some empty tiles
    q = torch.randn(b, heads, length, d, requires_grad=True)
    k = torch.randn(b, kv_heads, length, d, requires_grad=True)
    v = torch.randn(b, kv_heads, length, d, requires_grad=True)
    extra = torch.randn(b, heads, length, length)
    dense_bias = attention_bias(allowed, extra)
    nt, groups = tile_keys(allowed, 16)
    padded = torch.nn.functional.pad(extra, (0, (nt + 1) * 16 - length, 0, nt * 16 - length))
    tile_groups = []
    for g in groups:
        rows = (g.query_tiles % nt)[:, None] * 16 + torch.arange(16)  # [G, 16]
        part = padded[g.row[:, None, None], :, rows[:, :, None], g.key_position[:, None, :]]  # [G, 16, M*16, H]
        tile_groups.append(BiasedTiles(g.query_tiles, g.key_tiles, attention_bias(g.allowed, part.permute(0, 3, 1, 2))))
    diag = torch.arange(length)
    tiled = TiledBias(16, length, b, nt, tile_groups, extra[:, :, diag, diag])
    assert torch.equal(tiled.dense(), dense_bias)
    rep = heads // kv_heads
    want = torch.softmax(q @ k.repeat_interleave(rep, 1).transpose(-1, -2) * d ** -0.5 + dense_bias, -1)
    want = (want @ v.repeat_interleave(rep, 1)).transpose(1, 2)
    got = tiled_attention(q, k, v, tiled, d ** -0.5)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    g_want = torch.autograd.grad(want.sum(), (q, k, v))
    g_got = torch.autograd.grad(got.sum(), (q, k, v))
    for a, c in zip(g_got, g_want):
        torch.testing.assert_close(a, c, atol=1e-4, rtol=1e-4)
