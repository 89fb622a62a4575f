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
    bias = TiledBias(...)                      # from FinetuneModel.attention_bias for long DTI rows
    hidden = backbone.deep(x, bias, position_ids)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import LongTensor, Tensor, nn


_BASES = ("sdpa", "eager")


@dataclass
class TiledBias:
    """The additive attention bias of :func:`attention_bias`, kept only on the tiles where attention is allowed.

    The ``L`` positions of a row are cut into ``nt`` tiles of ``tile`` positions. Query tile ``i`` of
    row ``b`` attends only to the ``M`` key tiles ``key_tiles[b, i]`` (index ``nt`` is an all-masked
    dummy tile), so attention costs ``O(L * M * tile)`` instead of ``O(L^2)``: a DTI sequence of ``k``
    targets costs per token what a sliding-window sequence does, whatever ``k``. It is the same mask,
    only stored sparsely (built by :func:`llm_features.finetune.masks.tile_keys`); :func:`tiled_attention`
    computes with it.
    """

    tile: int
    length: int
    """``L``: the positions of the rows (the last tile may be partly beyond it)."""
    key_tiles: LongTensor
    """``[B, nt, M]``."""
    bias: Tensor
    """``[B, 1 or H, nt, tile, M * tile]``: 0 or a finite bias where allowed, ``finfo.min`` where masked.

    The diagonal (a token attending to itself) is never on the tiles: a query token's own position
    lies far from its window, and keeping it would cost a whole key tile per query tile.
    """
    self_bias: Tensor
    """``[B, 1 or H, L]``: the finite bias of each token attending to itself (always allowed)."""

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> "TiledBias":
        return TiledBias(self.tile, self.length, self.key_tiles.to(device) if device is not None else self.key_tiles,
                         self.bias.to(dtype=dtype, device=device), self.self_bias.to(dtype=dtype, device=device))

    @property
    def shape(self) -> torch.Size:
        return self.bias.shape

    def dense(self) -> Tensor:
        """The ``[B, 1 or H, L, L]`` dense bias this stands for (for tests and debugging)."""
        b, h, nt, t, mt = self.bias.shape
        m = mt // t
        out = torch.full((b, h, nt * t, (nt + 1) * t), torch.finfo(self.bias.dtype).min, dtype=self.bias.dtype,
                         device=self.bias.device)
        cols = (self.key_tiles[..., None] * t + torch.arange(t, device=self.bias.device)).reshape(b, nt, m * t)
        rows = torch.arange(nt * t, device=self.bias.device).view(nt, t)
        bi = torch.arange(b, device=self.bias.device)[:, None, None, None]
        out[bi, :, rows[None, :, :, None], cols[:, :, None, :]] = self.bias.permute(0, 2, 3, 4, 1)
        out = out[..., : self.length, : self.length].clone()
        diag = torch.arange(self.length, device=out.device)
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
    """Softmax attention restricted to the allowed tiles of ``bias``.

    Args:
        query: ``[B, H, L, d]``; key, value: ``[B, Hkv, L, d]`` (``Hkv`` divides ``H``).
        bias: the tiled additive bias.
        scaling: score scale (``d ** -0.5`` for standard attention).
        dropout: dropout probability on the attention weights (0 in eval).

    Returns:
        ``[B, L, H, d]``, the layout Hugging Face attention functions return.
    """
    b, heads, length, d = query.shape
    t = bias.tile
    nt = bias.key_tiles.shape[1]
    m = bias.key_tiles.shape[2]
    key, value = _repeat_kv(key, heads), _repeat_kv(value, heads)
    pad = nt * t - length

    def key_tiles(x: Tensor) -> Tensor:  # [B, H, L, d] -> [B, H, nt, M*t, d]
        x = F.pad(x, (0, 0, 0, pad + t))  # the tiles, then the all-masked dummy tile
        x = x.view(b, heads, nt + 1, t, d).transpose(1, 2)  # [B, nt+1, H, t, d]
        picked = x[torch.arange(b, device=x.device)[:, None, None], bias.key_tiles]  # [B, nt, M, H, t, d]
        return picked.permute(0, 3, 1, 2, 4, 5).reshape(b, heads, nt, m * t, d)

    q = F.pad(query, (0, 0, 0, pad)).view(b, heads, nt, t, d)
    scores = torch.matmul(q, key_tiles(key).transpose(-1, -2)) * scaling + bias.bias
    # each token with itself: one more score column
    own = (query * key).sum(-1) * scaling + bias.self_bias  # [B, H, L]
    own = F.pad(own, (0, pad)).view(b, heads, nt, t, 1)
    weights = torch.cat([scores, own], -1).softmax(-1)
    if dropout > 0:
        weights = F.dropout(weights, dropout, training=True)
    weights = weights.to(value.dtype)
    out = torch.matmul(weights[..., :-1], key_tiles(value))  # [B, H, nt, t, d]
    out = out + weights[..., -1:] * F.pad(value, (0, 0, 0, pad)).view(b, heads, nt, t, d)
    return out.reshape(b, heads, nt * t, d)[:, :, :length].transpose(1, 2).contiguous()


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


__all__ = ["TiledBias", "tiled_attention", "use_llmfeat_attention"]
