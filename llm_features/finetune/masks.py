"""THE attention-mask builder for every fine-tuning mode.

Behaviour level and token level, sliding window (k = 1) and DTI (k targets per sequence) all
describe their packed sequences with one :class:`SequenceLayout` and get their masks from
:func:`allowed_attention`, their additive bias from :func:`attention_bias` and their relative
distances from :func:`interaction_distance`. Only the layout differs between the modes.

Vocabulary (for one user, interactions ``0..m-1`` in time order, ties ordered arbitrarily):

* ``interaction``: the index ``i`` of the interaction a token belongs to. A context token of
  behaviour ``i`` (``c_i``) and the query token of target ``j`` (``q_j``) carry ``i`` and ``j``.
* ``time_start``: the index of the first interaction with the same timestamp as the token's
  interaction. Interaction ``h`` is *strictly earlier* than ``i`` iff ``h < time_start[i]``; equal
  timestamps are never context for each other.
* The *window* of ``i`` is the ``n = context_size`` interactions strictly earlier than ``i``:
  ``time_start[i] - n <= h < time_start[i]``.

Rules (query row ``p``, key column ``t``):

* ``q_j`` sees its window ``c_{j-n}..c_{j-1}`` and itself; never another query token, never
  anything at or after ``j``'s timestamp.
* A context token never sees a query token. Which earlier contexts it may see is the *leakage*
  knob, a trade-off between exactness and how much history the contexts carry:

  - ``isolated``: a context sees only itself (its own span at token level). Every target sees
    exactly ``n`` independently encoded behaviours, so DTI gives the sliding-window logits for
    *any* k, and training matches serving exactly. The price: contexts never contextualise each
    other; only the query token aggregates them.
  - ``windowed``: a context sees its own window, as in a causal sliding-window model. Through
    stacked layers the receptive field of a target grows to about ``L_deep * n`` interactions
    (DTI's *hidden-state leakage*): more history than a sliding-window prompt holds, so training
    and sliding-window serving differ slightly, and the gap grows with depth, not with k.
  - ``block``: a context sees every strictly earlier context of its packed sequence. The most
    context per layer, but how much depends on where the target sits in its block, so the
    train/serve gap grows with k.

  With k = 1 ``windowed`` and ``block`` both equal the causal sliding window.
* Tokens of one span (the tokens of one behaviour's text at token level) see each other:
  bidirectionally for encoders, causally for decoders (``span_causal``).
* Tokens of different packed sequences (``segment``) never see each other: one row of a batch
  may hold several short sequences (row packing), each as if it were alone.
* Padding tokens see only themselves (a finite softmax, no NaN) and are seen by nobody.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

import torch
import torch.nn.functional as F
from torch import BoolTensor, LongTensor, Tensor

from llm_features.attention import TiledBias  # noqa: F401 (re-exported: the tiled form of attention_bias)

Leakage = Literal["windowed", "block", "isolated"]
LEAKAGE_VARIANTS: tuple[str, ...] = ("windowed", "block", "isolated")


@dataclass
class SequenceLayout:
    """Per-token description of a batch of packed sequences; every field is ``[B, L]``.

    A row of the batch holds one or more sequences (``segment``); all tokens of one sequence belong
    to one user.
    """

    interaction: LongTensor
    """Index of the token's interaction in the user's history (any offset; only differences count)."""
    time_start: LongTensor
    """Index of the first interaction with the same timestamp as the token's interaction."""
    is_query: BoolTensor
    """True for query tokens ``q_j``."""
    span: LongTensor
    """Tokens with the same span id form one unit (one behaviour's text, or one query token)."""
    valid: BoolTensor
    """False for padding."""
    segment: LongTensor
    """Which packed sequence of the row a token belongs to; tokens of different segments never see each other."""

    def to(self, device: torch.device | str) -> "SequenceLayout":
        return SequenceLayout(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    @property
    def shape(self) -> torch.Size:
        return self.interaction.shape


def allowed_attention(
    layout: SequenceLayout, context_size: int, leakage: Leakage = "windowed", *, span_causal: bool = False
) -> BoolTensor:
    """``[B, L, L]`` boolean mask: ``allowed[b, p, t]`` is True when token ``p`` may attend to token ``t``.

    Args:
        layout: the packed sequences.
        context_size: ``n``, how many strictly earlier interactions a target sees.
        leakage: how far back a context token may look (see the module docstring).
        span_causal: within a span, a token sees only itself and earlier tokens (decoders).
    """
    if leakage not in LEAKAGE_VARIANTS:
        raise ValueError(f"unknown leakage {leakage!r}; choose one of {', '.join(LEAKAGE_VARIANTS)}")
    b, length = layout.shape
    device = layout.interaction.device
    row_start = layout.time_start[:, :, None]  # [B, L, 1]
    key = layout.interaction[:, None, :]  # [B, 1, L]
    key_is_context = (~layout.is_query & layout.valid)[:, None, :]

    earlier = key_is_context & (key < row_start)
    in_window = earlier & (key >= row_start - context_size)
    if leakage == "windowed":
        context_rule = in_window
    elif leakage == "block":
        context_rule = earlier
    else:
        context_rule = torch.zeros_like(earlier)
    allowed = torch.where(layout.is_query[:, :, None], in_window, context_rule)

    same_span = layout.span[:, :, None] == layout.span[:, None, :]
    if span_causal:
        idx = torch.arange(length, device=device)
        same_span = same_span & (idx[None, :, None] >= idx[None, None, :])
    same_segment = layout.segment[:, :, None] == layout.segment[:, None, :]
    allowed = (allowed | same_span) & same_segment & layout.valid[:, :, None] & layout.valid[:, None, :]
    # Padding rows attend to themselves only: a finite softmax, and nobody reads them.
    return allowed | torch.eye(length, dtype=torch.bool, device=device)[None]


def interaction_distance(layout: SequenceLayout) -> LongTensor:
    """``[B, L, L]`` distance in interactions from the row token to the key token (>= 0 where allowed).

    A context ``c_i`` sits at slot ``i``; a query ``q_j`` at slot ``time_start[j]``, the slot right
    after its most recent context. The distance from ``q_j`` to ``c_i`` is then what it is in the
    sliding-window sequence of ``j``, whichever block ``j`` is packed in.
    """
    slot = interaction_slot(layout)
    return (slot[:, :, None] - slot[:, None, :]).clamp_(min=0)


def interaction_slot(layout: SequenceLayout) -> LongTensor:
    """``[B, L]`` slot of every token: ``i`` for ``c_i``, ``time_start[j]`` for ``q_j``."""
    return torch.where(layout.is_query, layout.time_start, layout.interaction)


def attention_bias(allowed: BoolTensor, bias: Tensor | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """The additive float mask ``[B, 1 or H, L, L]`` that ``LayerStack.forward`` and SDPA take.

    Args:
        allowed: ``[B, L, L]`` from :func:`allowed_attention` (or its tiles ``[B, nt, T, M*T]``).
        bias: optional finite ``[B, H, L, L]`` (or broadcastable; ``[B, H, nt, T, M*T]`` for tiles)
            score bias, e.g. a distance bias; applied only where attention is allowed.
        dtype: the dtype of the attention scores.

    Returns:
        0 (or ``bias``) where allowed, ``finfo(dtype).min`` where masked.
    """
    allowed = allowed[:, None]
    masked = torch.finfo(dtype).min
    if bias is None:
        out = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        return out.masked_fill_(~allowed, masked)
    return torch.where(allowed, bias.to(dtype), torch.tensor(masked, dtype=dtype, device=allowed.device))


# ------------------------------------------------------------------------------------------ block sparsity
DEFAULT_TILE = 16


@dataclass
class MaskedTiles:
    """One group of query tiles of :func:`tile_keys`: the tiles, the key tiles they read, and the mask there."""

    query_tiles: LongTensor
    """``[G]`` flat query-tile index ``row * nt + i``."""
    key_tiles: LongTensor
    """``[G, M]`` flat key-tile index ``row * (nt + 1) + j`` (``j = nt``: the all-masked dummy tile)."""
    allowed: BoolTensor
    """``[G, tile, M * tile]``."""
    row: LongTensor
    """``[G]`` the row of each query tile."""
    key_position: LongTensor
    """``[G, M * tile]`` the position in its row of every gathered key (``>= L``: padding)."""


def _split_by_width(counts: LongTensor) -> list[tuple[BoolTensor, int]]:
    """Partition query tiles by how many key tiles they need, to cut the tiles computed for nothing.

    Tiles that need none (only themselves) form a group of width 0; the rest are split once at the
    width that minimises the tiles read, ``n(<= m) * m + n(> m) * max``, when that saves a tenth.
    """
    groups = []
    if bool((counts == 0).any()):
        groups.append((counts == 0, 0))
    rest = counts[counts > 0]
    if len(rest) == 0:
        return groups
    widest = int(rest.max())
    widths, n_at = torch.unique(rest, return_counts=True)
    below = torch.cumsum(n_at, 0)
    cost = below * widths + (len(rest) - below) * widest
    best = int(torch.argmin(cost))
    m = int(widths[best])
    if m < widest and float(cost[best]) <= 0.9 * len(rest) * widest:
        groups += [((counts > 0) & (counts <= m), m), (counts > m, widest)]
    else:
        groups.append((counts > 0, widest))
    return groups


def tile_keys(allowed: BoolTensor, tile: int = DEFAULT_TILE) -> tuple[int, list[MaskedTiles]]:
    """The block-sparse form of an ``[B, L, L]`` mask, without its diagonal (see :class:`TiledBias`).

    Returns:
        ``(nt, groups)``: the tiles per row, and the query tiles grouped by the number of key tiles
        they read (each group's key tiles ascending, padded with the dummy tile).
    """
    b, length, _ = allowed.shape
    allowed = allowed & ~torch.eye(length, dtype=torch.bool, device=allowed.device)
    nt = -(-length // tile)
    pad = nt * tile - length
    padded = F.pad(allowed, (0, pad + tile, 0, pad)).view(b * nt, tile, nt + 1, tile)  # + a dummy key tile
    occupied = padded.any(3).any(1)  # [B * nt, nt + 1]
    counts = occupied.sum(-1)
    span = torch.arange(tile, device=allowed.device)
    out = []
    for members, m in _split_by_width(counts):
        query_tiles = torch.nonzero(members).flatten()
        occ = occupied[query_tiles]
        order = torch.argsort((~occ).to(torch.int8), dim=-1, stable=True)[:, :m]  # occupied first, ascending
        local = torch.where(occ.gather(-1, order), order, nt)  # [G, M]
        rows = padded[query_tiles]  # [G, tile, nt + 1, tile]
        idx = local[:, None, :, None].expand(-1, tile, m, tile)
        on_tiles = rows.gather(2, idx).reshape(len(query_tiles), tile, m * tile)
        row = query_tiles // nt
        out.append(MaskedTiles(query_tiles, row[:, None] * (nt + 1) + local, on_tiles, row,
                            (local[..., None] * tile + span).reshape(len(query_tiles), m * tile)))
    return nt, out


def worth_tiling(length: int, nt: int, groups: list[MaskedTiles], tile: int) -> bool:
    """Tiles pay off when each query reads clearly fewer keys than the whole row (gathers cost extra)."""
    tiles = sum(len(g.query_tiles) for g in groups)
    keys = sum(len(g.query_tiles) * g.key_tiles.shape[1] for g in groups) * tile / max(1, tiles)
    return keys <= 0.6 * length
