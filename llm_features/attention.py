"""The attention the backbone's layers run: dense (SDPA or eager) or block-sparse over tiles.

The Hugging Face layers are called directly (:class:`llm_features.backbone.LayerStack`) and look up
their attention function by ``config._attn_implementation`` in transformers' ``AttentionInterface``.
:func:`use_llmfeat_attention` registers ``llmfeat_sdpa`` / ``llmfeat_eager`` there and points a
loaded model at them. Both run the model's own choice (SDPA or eager) on an ordinary dense additive
mask, so nothing changes for plain inputs; given a :class:`~llm_features.finetune.masks.TiledBias`
they run :func:`tiled_attention`, which only computes the tiles where the mask allows attention.

FlexAttention would be the natural kernel for these masks on a GPU, but it has no backward pass on
CPU (torch 2.13: ``NotImplementedError: FlexAttention does not support backward on CPU``), so the
tiles are computed with plain batched matmuls that run, and train, on every device.

Example::

    backbone = Backbone.load()                 # already uses llmfeat_sdpa
    bias = TiledBias(...)                      # from FinetuneModel.batch_attention_bias for long DTI rows
    hidden = backbone.deep(x, bias, position_ids)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import LongTensor, Tensor, nn


_BASES = ("sdpa", "eager")


@dataclass
class BiasedTiles:
    """Query tiles that each read ``M`` key tiles (one group of a :class:`TiledBias`)."""

    query_tiles: LongTensor
    """``[G]`` flat query-tile index ``row * nt + i``."""
    key_tiles: LongTensor
    """``[G, M]`` flat key-tile index ``row * (nt + 1) + j``; ``j = nt`` is the row's all-masked dummy tile."""
    bias: Tensor
    """``[G, 1 or H, tile, M * tile]``: 0 or a finite bias where allowed, ``finfo.min`` where masked."""

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> "BiasedTiles":
        move = (lambda x: x.to(device)) if device is not None else (lambda x: x)  # noqa: E731
        return BiasedTiles(move(self.query_tiles), move(self.key_tiles), self.bias.to(dtype=dtype, device=device))


@dataclass
class TiledBias:
    """The additive attention bias of :func:`attention_bias`, kept only on the tiles where attention is allowed.

    The ``L`` positions of a row are cut into ``nt`` tiles of ``tile`` positions. A query tile
    attends only to the key tiles where its mask allows something, so attention costs
    ``O(L * M * tile)`` instead of ``O(L^2)``: a DTI sequence of ``k`` targets costs per token about
    what a sliding-window sequence does, whatever ``k``. Query tiles are grouped by how many key
    tiles they need (:class:`BiasedTiles`), so the few wide ones (where two packed sequences meet) do
    not make every tile pay for their width. It is the same mask, only stored sparsely (built by
    :func:`llm_features.finetune.masks.tile_keys`); :func:`tiled_attention` computes with it.

    The diagonal (a token attending to itself) is never on the tiles: a query token's own position
    lies far from its window, and keeping it would cost a whole key tile per query tile. It is
    ``self_bias``.
    """

    tile: int
    length: int
    """``L``: the positions of the rows (the last tile may be partly beyond it)."""
    rows: int
    num_tiles: int
    """``nt = ceil(L / tile)``."""
    groups: list[BiasedTiles]
    """A partition of the ``rows * nt`` query tiles."""
    self_bias: Tensor
    """``[B, 1 or H, L]``: the finite bias of each token attending to itself (always allowed)."""

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> "TiledBias":
        return TiledBias(self.tile, self.length, self.rows, self.num_tiles, [g.to(dtype, device) for g in self.groups],
                         self.self_bias.to(dtype=dtype, device=device))

    @property
    def keys_per_query(self) -> float:
        """Mean number of keys a query position reads (its key tiles plus itself)."""
        tiles = sum(len(g.query_tiles) for g in self.groups)
        return sum(len(g.query_tiles) * g.key_tiles.shape[1] for g in self.groups) * self.tile / max(1, tiles) + 1

    def dense(self) -> Tensor:
        """The ``[B, 1 or H, L, L]`` dense bias this stands for (for tests and debugging)."""
        t, nt, b = self.tile, self.num_tiles, self.rows
        h = max(g.bias.shape[1] for g in self.groups)
        dtype, device = self.self_bias.dtype, self.self_bias.device
        out = torch.full((b, h, nt * t, (nt + 1) * t), torch.finfo(dtype).min, dtype=dtype, device=device)
        span = torch.arange(t, device=device)
        for g in self.groups:
            if g.key_tiles.shape[1] == 0:
                continue
            row, i = g.query_tiles // nt, g.query_tiles % nt
            cols = ((g.key_tiles % (nt + 1))[..., None] * t + span).flatten(1)  # [G, M*t]
            rows = i[:, None] * t + span  # [G, t]
            out[row[:, None, None], :, rows[:, :, None], cols[:, None, :]] = g.bias.expand(-1, h, -1, -1).permute(0, 2, 3, 1)
        out = out[..., : self.length, : self.length].clone()
        diag = torch.arange(self.length, device=device)
        out[..., diag, diag] = self.self_bias.expand(b, h, self.length)
        return out


def _repeat_kv(x: Tensor, heads: int) -> Tensor:
    """``[B, Hkv, L, d]`` to ``[B, heads, L, d]`` for grouped-query attention (each kv head serves a group)."""
    kv = x.shape[1]
    if kv == heads:
        return x
    b, _, length, d = x.shape
    return x[:, :, None].expand(b, kv, heads // kv, length, d).reshape(b, heads, length, d)


def tiled_attention(query: Tensor, key: Tensor, value: Tensor, bias: TiledBias, scaling: float,
                    dropout: float = 0.0) -> Tensor:
    """Softmax attention restricted to the allowed tiles of ``bias`` (and each token itself).

    Args:
        query: ``[B, H, L, d]``; key, value: ``[B, Hkv, L, d]`` (``Hkv`` divides ``H``).
        bias: the tiled additive bias.
        scaling: score scale (``d ** -0.5`` for standard attention).
        dropout: dropout probability on the attention weights (0 in eval).

    Returns:
        ``[B, L, H, d]``, the layout Hugging Face attention functions return.
    """
    b, heads, length, d = query.shape
    t, nt = bias.tile, bias.num_tiles
    key, value = _repeat_kv(key, heads), _repeat_kv(value, heads)
    pad = nt * t - length

    def tiles(x: Tensor, extra: int = 0) -> Tensor:  # [B, H, L, d] -> [B * (nt + extra), H, t, d]
        x = F.pad(x, (0, 0, 0, pad + extra * t))
        return x.view(b, heads, nt + extra, t, d).transpose(1, 2).reshape(b * (nt + extra), heads, t, d)

    q = tiles(query)
    k_all, v_all = tiles(key, 1), tiles(value, 1)  # the tiles, then each row's all-masked dummy tile
    own = (query * key).sum(-1) * scaling + bias.self_bias  # each token with itself: [B, H, L]
    own = F.pad(own, (0, pad)).view(b, heads, nt, t).transpose(1, 2).reshape(b * nt, heads, t, 1)
    parts, order = [], []
    for g in bias.groups:
        n, m = g.key_tiles.shape
        pick = g.key_tiles.reshape(-1)
        ks = k_all[pick].view(n, m, heads, t, d).transpose(1, 2).reshape(n, heads, m * t, d)
        vs = v_all[pick].view(n, m, heads, t, d).transpose(1, 2).reshape(n, heads, m * t, d)
        scores = torch.matmul(q[g.query_tiles], ks.transpose(-1, -2)) * scaling + g.bias
        weights = torch.cat([scores, own[g.query_tiles]], -1).softmax(-1)
        if dropout > 0:
            weights = F.dropout(weights, dropout, training=True)
        weights = weights.to(value.dtype)
        own_v = v_all[g.query_tiles + g.query_tiles // nt]  # query tile row * nt + i is key tile row * (nt + 1) + i
        parts.append(torch.matmul(weights[..., :-1], vs) + weights[..., -1:] * own_v)
        order.append(g.query_tiles)
    order_t = torch.cat(order)
    inverse = torch.empty_like(order_t)
    inverse[order_t] = torch.arange(len(order_t), device=order_t.device)
    out = torch.cat(parts)[inverse]  # [B * nt, H, t, d]
    out = out.view(b, nt, heads, t, d).transpose(1, 2).reshape(b, heads, nt * t, d)
    return out[:, :, :length].transpose(1, 2).contiguous()


def _eager(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, scaling: float, dropout: float) -> Tensor:
    heads = query.shape[1]
    key, value = _repeat_kv(key, heads), _repeat_kv(value, heads)
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if mask is not None:
        scores = scores + mask[..., : key.shape[-2]]
    weights = scores.softmax(-1)
    if dropout > 0:
        weights = F.dropout(weights, dropout, training=True)
    return torch.matmul(weights.to(value.dtype), value).transpose(1, 2).contiguous()


def _make(base: str):
    def attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask, scaling=None,
                  dropout: float = 0.0, **kwargs):
        if scaling is None:
            scaling = query.shape[-1] ** -0.5
        if isinstance(attention_mask, TiledBias):
            return tiled_attention(query, key, value, attention_mask, scaling, dropout), None
        if base == "eager":
            return _eager(query, key, value, attention_mask, scaling, dropout), None
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, scaling=scaling,
                                               dropout=dropout, **kwargs)

    attention.__name__ = f"llmfeat_{base}_attention"
    return attention


def use_llmfeat_attention(hf_model: nn.Module, base: str) -> str:
    """Register ``llmfeat_<base>`` (once) and make every layer of ``hf_model`` use it; returns the name."""
    if base not in _BASES:
        raise ValueError(f"unknown attention implementation {base!r}; choose one of {', '.join(_BASES)}")
    from transformers import AttentionInterface

    name = f"llmfeat_{base}"
    AttentionInterface.register(name, _make(base))
    hf_model.config._attn_implementation = name
    return name


__all__ = ["BiasedTiles", "TiledBias", "tiled_attention", "use_llmfeat_attention"]
