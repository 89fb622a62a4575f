"""Packing user histories into sequences: one code path for sliding window and DTI, at both granularities.

A *block* is ``k`` consecutive targets ``s..s+k-1`` of one user (k = 1: the sliding window). Its
sequence holds the contexts ``c_a..c_{b-1}`` that any of its targets may see, followed by the
query tokens ``q_s..q_{s+k-1}``, where ``a = max(user start, time_start[s] - n)`` and
``b = time_start[s+k-1]``. Who sees whom inside it is decided by :mod:`llm_features.finetune.masks`.

* Behaviour level (BAHE): one token per context, its input the cached atomic behaviour vector
  ``e_i`` plus the feedback embedding; one token per query.
* Token level: every context is the token span of its behaviour text with its feedback written
  as words; one token per query.

The histories come from :mod:`llm_features.finetune.histories`; the sequences of a batch are laid
into its rows by :mod:`llm_features.finetune.batch_rows`.

Example::

    from llm_features.ingest.split import SPLIT_CODES

    hist = UserHistories.from_arrays(user, time, behavior_row, item_row, label, feedback, split)
    blocks = make_blocks(hist, hist.split == SPLIT_CODES["train"], targets_per_sequence=16, context_size=30)
    packer = BehaviorPacker(hist, behavior_table, item_table)
    for idx in batch_indices(blocks.num_targets, targets_per_batch=256):
        batch = packer(blocks.take(idx))        # PackedBatch
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from llm_features.finetune.batch_rows import LONG_SEQUENCE, RowPlacer, assign_rows, balance_rows
from llm_features.finetune.histories import NUM_FEEDBACK, UserHistories, feedback_index, feedback_words
from llm_features.finetune.masks import SequenceLayout

if TYPE_CHECKING:
    from llm_features.backbone import Backbone
    from llm_features.finetune.config import FinetuneConfig
    from llm_features.finetune.data import FinetuneData


@dataclass
class Blocks:
    """Packed sequences before batching; arrays are ``[S]`` row ranges into :class:`UserHistories`.

    Sequence ``s`` holds contexts ``context_start[s]:context_end[s]`` and the queries of targets
    ``target_start[s]:target_end[s]``.
    """

    context_start: np.ndarray
    """First context row: ``n`` rows before the first target's timestamp, never before the user's first row."""
    context_end: np.ndarray
    """One past the last context row: the first row at the last target's timestamp (so the block's earlier
    targets are context of its later ones)."""
    target_start: np.ndarray
    """First target row."""
    target_end: np.ndarray
    """One past the last target row."""

    def __len__(self) -> int:
        return len(self.target_start)

    @property
    def num_targets(self) -> np.ndarray:
        return self.target_end - self.target_start

    @property
    def num_tokens(self) -> np.ndarray:
        """Behaviour-level sequence lengths."""
        return self.context_end - self.context_start + self.num_targets

    def take(self, idx: np.ndarray | slice) -> "Blocks":
        return Blocks(*(getattr(self, f.name)[idx] for f in fields(self)))


def make_blocks(
    hist: UserHistories, targets: np.ndarray, targets_per_sequence: int, context_size: int
) -> Blocks:
    """Cut each user's runs of consecutive target rows into blocks of ``k = targets_per_sequence``.

    Args:
        hist: the histories.
        targets: ``[N]`` boolean, the rows to predict (e.g. ``hist.split == SPLIT_CODES["train"]``).
        targets_per_sequence: ``k``; 1 gives the sliding window.
        context_size: ``n``.
    """
    if targets_per_sequence < 1 or context_size < 0:
        raise ValueError("targets_per_sequence must be >= 1 and context_size >= 0")
    targets = np.asarray(targets, dtype=bool)
    n = len(targets)
    rows = np.arange(n, dtype=np.int64)
    prev = np.zeros(n, dtype=bool)
    prev[1:] = targets[:-1]
    run_start = targets & (~prev | (hist.user_start == rows))
    starts = np.flatnonzero(run_start)
    # end of each run: next run start or the first non-target / user change after it
    run_id = np.cumsum(run_start) - 1
    ends = np.zeros(len(starts), dtype=np.int64)
    np.maximum.at(ends, run_id[targets], rows[targets] + 1)
    lengths = ends - starts
    k = targets_per_sequence
    per_run = -(-lengths // k)
    block_run = np.repeat(np.arange(len(starts)), per_run)
    within = np.arange(len(block_run)) - np.repeat(np.cumsum(per_run) - per_run, per_run)
    t0 = starts[block_run] + within * k
    t1 = np.minimum(t0 + k, ends[block_run])
    c0 = np.maximum(hist.user_start[t0], hist.time_start[t0] - context_size) if len(t0) else t0
    c1 = hist.time_start[t1 - 1] if len(t0) else t0
    return Blocks(c0.astype(np.int64), c1.astype(np.int64), t0.astype(np.int64), t1.astype(np.int64))


def batch_indices(num_targets: np.ndarray, targets_per_batch: int) -> list[np.ndarray]:
    """Split ``range(len(num_targets))`` into consecutive groups of about ``targets_per_batch`` targets."""
    if len(num_targets) == 0:
        return []
    cum = np.cumsum(num_targets)
    batch = (cum - 1) // max(1, targets_per_batch)
    cuts = np.flatnonzero(np.diff(batch)) + 1
    return np.split(np.arange(len(num_targets)), cuts)


@dataclass
class PackedBatch:
    """A batch of packed sequences, ready for the model.

    ``B`` sequences of ``L`` tokens, ``T`` targets in all.
    """

    layout: SequenceLayout
    position_ids: Tensor
    """``[B, L]`` positions for RoPE layers (0 at each sequence's first token slot)."""
    query_index: Tensor
    """``[T]`` flat index (``b * L + p``) of each target's query token."""
    target_rows: Tensor
    """``[T]`` history rows of the targets."""
    labels: Tensor
    """``[T]`` float labels."""
    item_vectors: Tensor
    """``[T, Dv]`` frozen item vectors ``v_j``."""
    behavior_vectors: Tensor | None = None
    """Behaviour level: ``[B, L, D]`` atomic behaviour vectors ``e_i`` (zeros at queries and padding)."""
    feedback: Tensor | None = None
    """Behaviour level: ``[B, L]`` feedback ids of the contexts (0 elsewhere)."""
    input_ids: Tensor | None = None
    """Token level: ``[B, L]`` token ids (pad id at queries and padding)."""
    embed_position_ids: Tensor | None = None
    """Token level: ``[B, L]`` absolute positions for the embedding layer (restart in every span)."""

    @property
    def num_targets(self) -> int:
        return int(self.query_index.numel())

    def to(self, device: torch.device | str) -> "PackedBatch":
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.to(device) if v is not None else None
        return PackedBatch(**out)


class BehaviorPacker:
    """Behaviour-level sequences: one token per context behaviour and one per query (fully vectorised).

    Args:
        hist: the histories.
        behavior_table: ``[NB, D]`` atomic behaviour vectors, indexed by ``hist.behavior_row``.
        item_table: ``[NI, Dv]`` item vectors, indexed by ``hist.item_row``.
        pack_rows: let short sequences share a row of the batch (exact: segments never see each
            other; it only removes padding).
    """

    def __init__(self, hist: UserHistories, behavior_table: Tensor, item_table: Tensor, pack_rows: bool = True) -> None:
        self.hist = hist
        self.behavior_table = behavior_table
        self.item_table = item_table
        self.pack_rows = pack_rows
        self._labels = torch.from_numpy(hist.label.astype(np.float32))
        self._feedback = torch.from_numpy(hist.feedback)

    def lengths(self, blocks: Blocks) -> np.ndarray:
        """``[S]`` positions of each packed sequence (one per context and one per query)."""
        return blocks.num_tokens

    def __call__(self, blocks: Blocks) -> PackedBatch:
        h = self.hist
        ntok = blocks.num_tokens
        place = RowPlacer(ntok, self.pack_rows, head=blocks.context_end - blocks.context_start)
        seq, t = place.seq, place.within
        nctx = (blocks.context_end - blocks.context_start)[seq]
        is_ctx = t < nctx
        row = np.where(is_ctx, blocks.context_start[seq] + t, blocks.target_start[seq] + t - nctx)
        time_start = h.time_start[row]
        slot = np.where(is_ctx, row, time_start)
        # positions count from each sequence's first slot
        first = np.cumsum(ntok) - ntok
        position = slot - np.minimum.reduceat(slot, first)[seq]
        layout = place.layout(row, time_start, ~is_ctx, np.where(is_ctx, row, row + len(h)),
                              pad_interaction=int(blocks.target_start[0]))
        vectors = self.behavior_table[torch.from_numpy(h.behavior_row[row])]
        vectors = vectors * torch.from_numpy(is_ctx)[:, None].to(vectors.dtype)
        feedback = torch.where(torch.from_numpy(is_ctx), self._feedback[torch.from_numpy(row)], 0)
        # flat tokens in sequence order, so the queries are in block order, then target order
        target_rows = torch.from_numpy(row[~is_ctx])
        dense = torch.zeros(place.rows * place.length, vectors.shape[-1], dtype=vectors.dtype)
        dense[torch.from_numpy(place.flat)] = vectors
        return PackedBatch(
            layout=layout,
            position_ids=torch.from_numpy(place(position, 0)),
            query_index=torch.from_numpy(place.flat[~is_ctx]),
            target_rows=target_rows,
            labels=self._labels[target_rows],
            item_vectors=self.item_table[torch.from_numpy(h.item_row)[target_rows]],
            behavior_vectors=dense.view(place.rows, place.length, -1),
            feedback=torch.from_numpy(place(feedback.numpy(), 0)),
        )


class TokenPacker:
    """Token-level sequences: each context is its behaviour text plus its feedback in words.

    Args:
        hist: the histories.
        behavior_texts: text of every behaviour row (indexed by ``hist.behavior_row``).
        item_table: ``[NI, Dv]`` item vectors.
        tokenize: texts to token id lists (e.g. :meth:`Backbone.tokenize`).
        pad_id: token id written at query and padding positions (their embeddings are replaced).
        pack_rows: let short sequences share a row of the batch (see :class:`BehaviorPacker`).
    """

    def __init__(
        self,
        hist: UserHistories,
        behavior_texts: Sequence[str],
        item_table: Tensor,
        tokenize: Callable[[list[str]], list[list[int]]],
        pad_id: int,
        pack_rows: bool = True,
    ) -> None:
        self.hist = hist
        self.pack_rows = pack_rows
        self.behavior_texts = behavior_texts
        self.item_table = item_table
        self.tokenize = tokenize
        self.pad_id = int(pad_id)
        self._labels = torch.from_numpy(hist.label.astype(np.float32))
        self._spans: dict[tuple[int, int], np.ndarray] = {}

    def span_tokens(self, rows: np.ndarray) -> list[np.ndarray]:
        """Token ids of the context span of each history row (cached per behaviour and feedback)."""
        keys = list(zip(self.hist.behavior_row[rows].tolist(), self.hist.feedback[rows].tolist()))
        missing = sorted({k for k in keys if k not in self._spans})
        if missing:
            texts = [f"{self.behavior_texts[b]} ({feedback_words(f)})" for b, f in missing]
            for k, ids in zip(missing, self.tokenize(texts)):
                self._spans[k] = np.asarray(ids, dtype=np.int64)
        return [self._spans[k] for k in keys]

    def lengths(self, blocks: Blocks) -> np.ndarray:
        """``[S]`` positions of each packed sequence: the tokens of its context texts plus one per query."""
        out = np.empty(len(blocks), np.int64)
        for i, (a, b, s, e) in enumerate(zip(blocks.context_start, blocks.context_end, blocks.target_start,
                                             blocks.target_end)):
            out[i] = sum(len(x) for x in self.span_tokens(np.arange(a, b))) + (e - s)
        return out

    def __call__(self, blocks: Blocks) -> PackedBatch:
        h = self.hist
        n_rows = len(h)
        seqs = []
        for a, b, s, e in zip(blocks.context_start, blocks.context_end, blocks.target_start, blocks.target_end):
            ctx_rows = np.arange(a, b)
            spans = self.span_tokens(ctx_rows)
            lens = np.array([len(x) for x in spans], dtype=np.int64)
            cum = np.concatenate([[0], np.cumsum(lens)])
            tgt = np.arange(s, e)
            ids = np.concatenate(spans + [np.full(len(tgt), self.pad_id, np.int64)])
            row = np.concatenate([np.repeat(ctx_rows, lens), tgt])
            within = np.arange(cum[-1]) - np.repeat(cum[:-1], lens)
            # RoPE position: token offset in the behaviour stream; q_j sits right after its last context.
            pos = np.concatenate([np.repeat(cum[:-1], lens) + within, cum[h.time_start[tgt] - a]])
            is_query = np.concatenate([np.zeros(cum[-1], bool), np.ones(len(tgt), bool)])
            embed_pos = np.concatenate([within, np.zeros(len(tgt), np.int64)])
            seqs.append((ids, row, pos, is_query, embed_pos))
        place = RowPlacer(np.array([len(x[0]) for x in seqs]), self.pack_rows,
                           head=np.array([int((~x[3]).sum()) for x in seqs]))
        ids, row, pos, is_query, embed_pos = (np.concatenate([x[i] for x in seqs]) for i in range(5))
        target_rows = torch.from_numpy(row[is_query])
        layout = place.layout(row, h.time_start[row], is_query, np.where(is_query, row + n_rows, row),
                              pad_interaction=int(blocks.target_start[0]))
        return PackedBatch(
            layout=layout,
            position_ids=torch.from_numpy(place(pos, 0)),
            query_index=torch.from_numpy(place.flat[is_query]),
            target_rows=target_rows,
            labels=self._labels[target_rows],
            item_vectors=self.item_table[torch.from_numpy(h.item_row)[target_rows]],
            input_ids=torch.from_numpy(place(ids, self.pad_id)),
            embed_position_ids=torch.from_numpy(place(embed_pos, 0)),
        )


def make_packer(cfg: FinetuneConfig, data: FinetuneData, backbone: Backbone) -> BehaviorPacker | TokenPacker:
    """The packer of ``cfg.granularity`` over ``data``: cached behaviour vectors, or the behaviour texts
    tokenized by ``backbone``. The fine-tuning recipe and ``embed-users`` pack with it."""
    if cfg.granularity == "behavior":
        return BehaviorPacker(data.hist, data.behavior_table, data.item_table)
    return TokenPacker(data.hist, data.behavior_texts, data.item_table, backbone.tokenize,
                       pad_id=int(backbone.tokenizer.pad_token_id))


__all__ = [
    "BehaviorPacker", "Blocks", "PackedBatch", "TokenPacker", "batch_indices", "make_blocks", "make_packer",
    # re-exported from their homes (histories, batch_rows), for older importers
    "LONG_SEQUENCE", "NUM_FEEDBACK", "RowPlacer", "UserHistories", "assign_rows", "balance_rows",
    "feedback_index", "feedback_words",
]
