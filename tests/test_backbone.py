"""Backbone: the split stacks reproduce the Hugging Face forward exactly, and the API behaves as specified."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel

from llm_features.backbone import Backbone, BackboneConfig, default_model_dir, padding_bias, weights_sha256

TEXTS = [
    "Toy Story (1995) | Animation, Children's, Comedy",
    "Heat (1995) | Action, Crime, Thriller",
    "a rather longer behaviour text with many more words than the others, to force padding in the batch",
    "x",
]


def _split_forward(bb: Backbone, enc) -> torch.Tensor:
    ids, mask = enc["input_ids"], enc["attention_mask"]
    pos = bb.default_position_ids(mask)
    bias = bb.padding_bias(mask)
    with torch.no_grad():
        return bb.deep(bb.shallow(bb.embed(ids, pos), bias, pos), bias, pos)


def _check_matches_hf(model_dir, attn: str = "sdpa", split: int | None = None) -> Backbone:
    bb = Backbone.load(BackboneConfig(model=model_dir, attn_implementation=attn, split_layer=split))
    ref = AutoModel.from_pretrained(model_dir or default_model_dir(), attn_implementation=attn).eval()
    enc = bb.tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        want = ref(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    got = _split_forward(bb, enc)
    real = enc["attention_mask"].bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)
    return bb


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral", "bert"])
def test_split_equals_hf_forward(kind, attn, request):
    bb = _check_matches_hf(request.getfixturevalue(f"tiny_{kind}_dir"), attn)
    assert bb.family == ("encoder" if kind == "bert" else "decoder")
    assert bb.uses_rope == (kind != "bert")


@pytest.mark.parametrize("split", [0, 1, 4])
def test_any_split_point_equals_hf_forward(tiny_llama_dir, split):
    bb = _check_matches_hf(tiny_llama_dir, split=split)
    assert len(bb.shallow) == split and len(bb.deep) == 4 - split


def test_minilm_split_equals_hf_forward():
    bb = _check_matches_hf(None)
    assert (bb.hidden_size, bb.num_layers, bb.split_layer) == (384, 6, 3)
    assert bb.fingerprint.model_name == "sentence-transformers/all-MiniLM-L6-v2"


def test_minilm_full_depth_mean_pool_is_sentence_embedding():
    """Split at the top, mean pooling = all-MiniLM-L6-v2's sentence embedding before normalisation."""
    bb = Backbone.load(BackboneConfig(split_layer=6))
    ref = AutoModel.from_pretrained(default_model_dir()).eval()
    enc = bb.tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = ref(**enc).last_hidden_state
    m = enc["attention_mask"][..., None].float()
    torch.testing.assert_close(bb.encode_texts(TEXTS), (h * m).sum(1) / m.sum(1), atol=1e-5, rtol=1e-5)


def test_freezing(tiny_llama_dir):
    bb = Backbone.load(BackboneConfig(model=tiny_llama_dir, split_layer=2))
    assert not any(p.requires_grad for p in bb.embeddings.parameters())
    assert not any(p.requires_grad for p in bb.shallow.parameters())
    assert all(p.requires_grad for p in bb.deep.parameters())
    assert bb.deep.norm is not None and bb.shallow.norm is None
    bb.train()
    assert bb.deep.training and not bb.shallow.training and not bb.embeddings.training


def test_deep_is_differentiable_over_behaviour_vectors(tiny_bert_dir):
    bb = Backbone.load(BackboneConfig(model=tiny_bert_dir))
    x = bb.encode_texts(TEXTS)[None]  # one user, 4 behaviours: [1, 4, D]
    bias = bb.padding_bias(torch.ones(1, 4))
    # a finite learned distance bias (ALiBi-style) is allowed next to the mask
    bias = bias - 0.1 * (torch.arange(4)[:, None] - torch.arange(4)[None, :]).abs().float()
    out = bb.deep(x, bias, torch.arange(4)[None])
    out.sum().backward()
    assert out.shape == (1, 4, 32)
    assert all(p.grad is not None for p in bb.deep.parameters())


def test_rope_positions_are_relative(tiny_qwen2_dir):
    """Shifting every position id by a constant leaves a RoPE stack's output unchanged (DTI relies on it)."""
    bb = Backbone.load(BackboneConfig(model=tiny_qwen2_dir))
    torch.manual_seed(0)
    x = torch.randn(2, 5, 32)
    bias = bb.padding_bias(torch.ones(2, 5))
    pos = torch.arange(5).expand(2, 5)
    with torch.no_grad():
        a, b = bb.deep(x, bias, pos), bb.deep(x, bias, pos + 17)
        c = bb.deep(x, bias, pos.flip(-1))
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(a, c, atol=1e-3)


def test_padding_bias_masks_padding_and_future():
    mask = torch.tensor([[1, 1, 0]])
    enc = padding_bias(mask, causal=False)
    dec = padding_bias(mask, causal=True)
    lo = torch.finfo(torch.float32).min
    assert enc.shape == dec.shape == (1, 1, 3, 3)
    assert enc[0, 0].tolist() == [[0, 0, lo]] * 3
    assert dec[0, 0].tolist() == [[0, lo, lo], [0, 0, lo], [0, 0, lo]]
    assert torch.isfinite(dec).all()


def test_padded_rows_do_not_change_real_rows_or_give_nan(tiny_llama_dir):
    """A text's vector does not depend on what it is batched with (padding is invisible), and never NaN."""
    bb = Backbone.load(BackboneConfig(model=tiny_llama_dir))
    alone = torch.cat([bb.encode_texts([t]) for t in TEXTS])
    batched = bb.encode_texts(TEXTS, batch_size=4, sort_by_length=False)
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(batched).all()


def test_encode_texts_order_batching_and_pooling(tiny_llama_dir):
    bb = Backbone.load(BackboneConfig(model=tiny_llama_dir, pooling="last"))
    seen = []
    a = bb.encode_texts(TEXTS, batch_size=2, on_batch=lambda n, real, padded: seen.append((n, real, padded)))
    b = bb.encode_texts(TEXTS, batch_size=3, sort_by_length=False)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert sum(n for n, _, _ in seen) == len(TEXTS)
    assert all(real <= padded for _, real, padded in seen)
    # last-token pooling = the shallow hidden state of the last real token
    enc = bb.tokenizer(TEXTS[:1], return_tensors="pt")
    with torch.no_grad():
        h = bb.shallow_hidden(enc["input_ids"], enc["attention_mask"])
    torch.testing.assert_close(a[0], h[0, -1], atol=1e-5, rtol=1e-5)
    assert bb.encode_texts([]).shape == (0, 32)


def test_max_tokens_truncates(tiny_bert_dir):
    bb = Backbone.load(BackboneConfig(model=tiny_bert_dir, max_tokens=5))
    assert max(len(x) for x in bb.tokenize(TEXTS)) == 5


def test_fingerprint(tiny_bert_dir, tiny_llama_dir):
    a = Backbone.load(BackboneConfig(model=tiny_bert_dir)).fingerprint
    assert a == Backbone.load(BackboneConfig(model=tiny_bert_dir)).fingerprint
    assert (a.split_layer, a.pooling, a.max_tokens, a.dtype, a.hidden_size) == (2, "mean", 64, "float32", 32)
    assert len(a.weights_sha256) == 64 and a.weights_sha256 == weights_sha256(tiny_bert_dir)
    others = [
        Backbone.load(BackboneConfig(model=tiny_bert_dir, split_layer=1)).fingerprint,
        Backbone.load(BackboneConfig(model=tiny_bert_dir, pooling="last")).fingerprint,
        Backbone.load(BackboneConfig(model=tiny_bert_dir, max_tokens=32)).fingerprint,
        Backbone.load(BackboneConfig(model=tiny_llama_dir)).fingerprint,
    ]
    assert len({a.digest, *(o.digest for o in others)}) == 5


def test_bad_split_and_missing_dir(tiny_bert_dir, tmp_path):
    with pytest.raises(ValueError, match="split_layer"):
        Backbone.load(BackboneConfig(model=tiny_bert_dir, split_layer=5))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Backbone.load(BackboneConfig(model=tmp_path / "nope"))


def test_bfloat16_runs(tiny_llama_dir):
    bb = Backbone.load(BackboneConfig(model=tiny_llama_dir, dtype="bfloat16"))
    v = bb.encode_texts(TEXTS)
    assert v.dtype == torch.float32 and torch.isfinite(v).all()
    assert bb.fingerprint.dtype == "bfloat16"
