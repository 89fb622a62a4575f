"""The BAHE deep model with DTI query tokens, and its CTR head.

For one user with interactions ``1..m`` (notation of DESIGN.md, "Model formulation"):

* context token ``c_i = e_i + F[f_i]``: the frozen atomic behaviour vector plus a learned
  feedback embedding (behaviour level); at token level, the tokens of the behaviour text with the
  feedback written as words;
* query token ``q_j = Q``: one learned vector; its deep output ``u_j`` is the user's state just
  before interaction ``j``, the exported user embedding;
* ``logit_j = H(u_j, v_j)``, an MLP over ``[u, v, u*v]`` with ``v_j`` the frozen item vector.

Behaviour positions enter through explicit ``position_ids`` for RoPE models, and through a
relative behaviour-distance bias added to the additive mask for models with absolute position
embeddings (the default MiniLM keeps those in its shallow embeddings, which the deep layers never see).

Example::

    model = FinetuneModel(backbone, granularity="behavior", context_size=30, leakage="windowed")
    logits = model(batch)                 # [T] one logit per target of a PackedBatch
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import LongTensor, Tensor, nn

from llm_features.backbone import Backbone
from llm_features.attention import TiledBias, BiasedTiles
from llm_features.finetune.config import FinetuneConfig
from llm_features.finetune.masks import (
    DEFAULT_TILE,
    Leakage,
    allowed_attention,
    attention_bias,
    interaction_distance,
    interaction_slot,
    tile_keys,
    worth_tiling,
)
from llm_features.finetune.packing import NUM_FEEDBACK, PackedBatch


def alibi_slopes(num_heads: int) -> Tensor:
    """The ALiBi head slopes ``2^(-8 h / H)`` (geometric; exact for powers of two, interpolated otherwise)."""
    return torch.tensor([2.0 ** (-8.0 * (h + 1) / num_heads) for h in range(num_heads)])


class DistanceBias(nn.Module):
    """Attention score bias over the behaviour distance ``d = slot(query) - slot(key)``.

    ``learned``: a per-head table ``b[h, min(d, max_distance)]`` (zero-initialised); ``alibi``: the
    fixed ``-slope_h * d``.
    """

    def __init__(self, num_heads: int, max_distance: int, kind: Literal["learned", "alibi"] = "learned") -> None:
        super().__init__()
        self.kind = kind
        self.max_distance = int(max_distance)
        if kind == "learned":
            self.table = nn.Parameter(torch.zeros(self.max_distance + 1, num_heads))
        elif kind == "alibi":
            self.register_buffer("slopes", alibi_slopes(num_heads), persistent=False)
        else:
            raise ValueError(f"unknown distance bias {kind!r}")

    def forward(self, distance: LongTensor) -> Tensor:
        """``[B, ...]`` distances (``[B, L, L]``, or tiles ``[B, nt, T, M*T]``) to a ``[B, H, ...]`` bias."""
        d = distance.clamp(max=self.max_distance)
        if self.kind == "learned":
            return F.embedding(d, self.table).movedim(-1, 1)
        slopes = self.slopes.view(1, -1, *([1] * (d.dim() - 1)))
        return -slopes * d[:, None].to(self.slopes.dtype)


class CTRHead(nn.Module):
    """``H(u, v)``: ``[T, D]`` user states and ``[T, Dv]`` item vectors to ``[T]`` logits.

    An MLP over ``[u, v, u*v]``; ``v`` is first projected to ``D`` when the widths differ.
    """

    def __init__(self, user_dim: int, item_dim: int, hidden: int = 256) -> None:
        super().__init__()
        self.item_proj = nn.Identity() if item_dim == user_dim else nn.Linear(item_dim, user_dim)
        self.mlp = nn.Sequential(nn.Linear(3 * user_dim, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def forward(self, user: Tensor, item: Tensor) -> Tensor:
        user = user.float()
        item = self.item_proj(item.float())
        return self.mlp(torch.cat([user, item, user * item], dim=-1)).squeeze(-1)

    def one_user(self, user: Tensor, item: Tensor) -> Tensor:
        """``forward`` for one user ``[1, D]`` against ``[T, Dv]`` items: ``[T]`` logits, equal up to
        float rounding. The first layer ``W [u, v, u*v] = W_u u + (W_v + W_uv diag(u)) v`` folds the
        user into one ``[hidden, D]`` matrix: a third of the multiply-adds (serving scores one user's
        candidates)."""
        user = user.float()
        item = self.item_proj(item.float())
        first, act, last = self.mlp
        w_u, w_v, w_uv = first.weight.split(user.shape[-1], dim=1)
        hidden = torch.addmm(user @ w_u.T + first.bias, item, (w_v + w_uv * user).T)
        return last(act(hidden)).squeeze(-1)


class FinetuneModel(nn.Module):
    """Deep layers over packed context and query tokens, plus the CTR head.

    Args:
        backbone: the loaded :class:`Backbone`; its ``deep`` stack is trained (or LoRA-adapted).
        granularity: ``behavior`` (deep layers over cached vectors) or ``token`` (all layers over text).
        context_size: ``n``.
        leakage: the context-token rule of :func:`allowed_attention`.
        distance_bias: ``auto`` (learned for absolute-position models, none for RoPE), ``learned``,
            ``alibi`` or ``none``.
        item_dim: width of the item vectors (default: the backbone width).
        head_hidden: hidden width of the CTR head.
        max_distance: distances beyond this share one bias bucket (default ``context_size + 1``).
        attention: ``dense`` (one ``L x L`` mask per row), ``tiled`` (block-sparse: only the tiles
            of the mask that allow attention are computed) or ``auto`` (tiled where it is clearly
            cheaper, i.e. long packed DTI rows; dense for short sliding-window rows). The same
            mask either way, so the same logits up to float rounding.
    """

    def __init__(
        self,
        backbone: Backbone,
        granularity: Literal["behavior", "token"] = "behavior",
        context_size: int = 30,
        leakage: Leakage = "windowed",
        distance_bias: Literal["auto", "learned", "alibi", "none"] = "auto",
        item_dim: int | None = None,
        head_hidden: int = 256,
        max_distance: int | None = None,
        attention: Literal["auto", "dense", "tiled"] = "auto",
    ) -> None:
        super().__init__()
        if attention not in ("auto", "dense", "tiled"):
            raise ValueError(f"unknown attention {attention!r}; choose auto, dense or tiled")
        self.attention = attention
        if granularity not in ("behavior", "token"):
            raise ValueError(f"unknown granularity {granularity!r}; choose behavior or token")
        self.backbone = backbone
        self.granularity = granularity
        self.context_size = int(context_size)
        self.leakage = leakage
        d = backbone.hidden_size
        self.query = nn.Parameter(torch.randn(d) * 0.02)
        self.feedback = nn.Embedding(NUM_FEEDBACK, d) if granularity == "behavior" else None
        if self.feedback is not None:
            nn.init.normal_(self.feedback.weight, std=0.02)
        kind = distance_bias
        if kind == "auto":
            kind = "none" if backbone.uses_rope else "learned"
        self.distance_bias_kind = kind
        heads = int(backbone.hf_config.num_attention_heads)
        self.distance_bias = (
            None if kind == "none" else DistanceBias(heads, max_distance or self.context_size + 1, kind)
        )
        self.head = CTRHead(d, item_dim or d, head_hidden)

    @property
    def span_causal(self) -> bool:
        """Tokens of one behaviour text attend causally in decoders, bidirectionally in encoders."""
        return self.granularity == "token" and self.backbone.family == "decoder"

    def batch_attention_bias(self, batch: PackedBatch) -> Tensor | TiledBias:
        """The additive mask of the batch (+ the distance bias where allowed).

        ``[B, 1 or H, L, L]``, or its allowed tiles (:class:`TiledBias`, see ``attention``).
        """
        layout = batch.layout
        allowed = allowed_attention(layout, self.context_size, self.leakage, span_causal=self.span_causal)
        length = allowed.shape[-1]
        if self.attention == "tiled" or (self.attention == "auto" and length > 2 * DEFAULT_TILE):
            nt, groups = tile_keys(allowed, DEFAULT_TILE)
            if self.attention == "tiled" or worth_tiling(length, nt, groups, DEFAULT_TILE):
                return self._tiled_bias(layout, length, nt, groups)
        bias = self.distance_bias(interaction_distance(layout)) if self.distance_bias is not None else None
        return attention_bias(allowed, bias, dtype=self.backbone.dtype)

    def _tiled_bias(self, layout, length: int, nt: int, groups) -> TiledBias:
        """The :class:`TiledBias` of the grouped tiles: the mask there plus the distance bias."""
        dtype = self.backbone.dtype
        rows = layout.shape[0]
        own = torch.zeros(rows, 1, length, dtype=dtype, device=layout.interaction.device)
        slot = None
        if self.distance_bias is not None:
            own = self.distance_bias(torch.zeros_like(layout.interaction)).to(dtype)  # distance 0
            slot = F.pad(interaction_slot(layout), (0, (nt + 1) * DEFAULT_TILE - length))
            query_slot = slot[:, : nt * DEFAULT_TILE].reshape(rows * nt, DEFAULT_TILE)
        out = []
        for g in groups:
            bias = None
            if slot is not None:
                d = query_slot[g.query_tiles][:, :, None] - slot[g.row[:, None], g.key_position][:, None, :]
                bias = self.distance_bias(d.clamp_(min=0))
            out.append(BiasedTiles(g.query_tiles, g.key_tiles, attention_bias(g.allowed, bias, dtype=dtype)))
        return TiledBias(DEFAULT_TILE, length, rows, nt, out, own)

    def input_hidden(self, batch: PackedBatch) -> Tensor:
        """``[B, L, D]`` inputs: ``e_i + F[f_i]`` (or token embeddings) at contexts, ``Q`` at queries, 0 at padding."""
        layout = batch.layout
        dtype = self.backbone.dtype
        if self.granularity == "behavior":
            x = batch.behavior_vectors.to(dtype) + self.feedback(batch.feedback).to(dtype)
            x = x * (~layout.is_query & layout.valid)[..., None].to(dtype)
        else:
            x = self.backbone.embed(batch.input_ids, batch.embed_position_ids)
        return torch.where(layout.is_query[..., None], self.query.to(dtype), x)

    def hidden_states(self, batch: PackedBatch) -> Tensor:
        """``[B, L, D]`` deep-stack outputs of every token."""
        bias = self.batch_attention_bias(batch)
        x = self.input_hidden(batch)
        if self.granularity == "token":
            x = self.backbone.shallow(x, bias, batch.position_ids)
        return self.backbone.deep(x, bias, batch.position_ids)

    def user_states(self, batch: PackedBatch) -> Tensor:
        """``[T, D]`` query-token outputs ``u_j``: the user state just before each target."""
        h = self.hidden_states(batch)
        return h.flatten(0, 1)[batch.query_index]

    def forward(self, batch: PackedBatch) -> Tensor:
        """``[T]`` CTR logits ``H(u_j, v_j)``."""
        return self.head(self.user_states(batch), batch.item_vectors)

    # ------------------------------------------------------------------ initialisation / adapters
    @torch.no_grad()
    def init_query(self, vector: Tensor) -> None:
        """Start ``Q`` at a typical input vector (e.g. the mean atomic behaviour vector)."""
        self.query.copy_(vector.to(self.query))

    def set_dropout(self, p: float) -> None:
        """Set every dropout probability of the deep stack (``nn.Dropout`` modules and attention dropout)."""
        for m in self.backbone.deep.modules():
            if isinstance(m, nn.Dropout):
                m.p = p
            if isinstance(getattr(m, "attention_dropout", None), float):
                m.attention_dropout = p

    def apply_lora(self, rank: int = 8, alpha: int = 16, dropout: float = 0.05) -> None:
        """Freeze the deep stack and inject LoRA adapters into all its linear layers (peft)."""
        from peft import LoraConfig, inject_adapter_in_model

        deep = self.backbone.deep
        names = sorted({n.rsplit(".", 1)[-1] for n, m in deep.named_modules() if isinstance(m, nn.Linear)})
        for p in deep.parameters():
            p.requires_grad_(False)
        inject_adapter_in_model(
            LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=names), deep
        )
        for n, p in deep.named_parameters():
            p.requires_grad_("lora_" in n)

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """The parameters that training changes (deep stack or LoRA adapters, Q, F, bias, head)."""
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}

    def param_groups(self, lr: float, head_lr: float, weight_decay: float) -> list[dict]:
        """AdamW groups: the pretrained deep stack (or adapters) at ``lr``, the new parts at ``head_lr``."""
        deep, new = [], []
        for n, p in self.named_parameters():
            if p.requires_grad:
                (deep if n.startswith("backbone.") else new).append(p)
        groups = [{"params": new, "lr": head_lr, "weight_decay": weight_decay}]
        if deep:
            groups.append({"params": deep, "lr": lr, "weight_decay": weight_decay})
        return groups


def build_model(cfg: FinetuneConfig, backbone: Backbone, item_dim: int) -> FinetuneModel:
    """The model ``cfg`` describes, on top of ``backbone`` (LoRA adapters injected if asked)."""
    model = FinetuneModel(backbone, granularity=cfg.granularity, context_size=cfg.context_size, leakage=cfg.leakage,
                          distance_bias=cfg.distance_bias, item_dim=item_dim, head_hidden=cfg.head_hidden,
                          attention=cfg.attention)
    if cfg.dropout is not None:
        model.set_dropout(cfg.dropout)
    if cfg.lora:
        model.apply_lora(cfg.lora_rank, cfg.lora_alpha)
    return model


def count_parameters(module: nn.Module, trainable: bool = True) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)


__all__ = ["CTRHead", "DistanceBias", "FinetuneModel", "alibi_slopes", "build_model", "count_parameters"]
