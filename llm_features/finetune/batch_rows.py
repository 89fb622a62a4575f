"""Placing variable-length sequences into the rows of a batch, with little padding.

Short sequences (the sliding window) share rows as long as the longest of them (best-fit decreasing,
:func:`assign_rows`); long ones (DTI blocks) are balanced over a few longer rows (:func:`balance_rows`).
:class:`RowPlacer` scatters the flat tokens of the sequences into those ``[R, L]`` rows; the packers of
:mod:`llm_features.finetune.packing` use it for every tensor of a batch.
"""

from __future__ import annotations

import bisect
import heapq

import numpy as np
import torch

from llm_features.finetune.masks import SequenceLayout


def assign_rows(lengths: np.ndarray, capacity: int | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """Place sequences of ``lengths`` tokens into as few rows of ``capacity`` tokens as best-fit decreasing finds.

    Row packing removes most of the padding of a batch without making its rows longer: the capacity
    defaults to the longest sequence. Deterministic (ties keep the input order).

    Returns:
        ``(row, offset, rows)``: each sequence's row and first column, and the number of rows.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    capacity = int(lengths.max()) if capacity is None and len(lengths) else int(capacity or 0)
    if len(lengths) and lengths.max() > capacity:
        raise ValueError(f"a sequence of {int(lengths.max())} tokens does not fit rows of {capacity}")
    row = np.zeros(len(lengths), np.int64)
    offset = np.zeros(len(lengths), np.int64)
    free: list[tuple[int, int]] = []  # (free tokens, row), sorted
    used: list[int] = []
    for i in np.argsort(-lengths, kind="stable").tolist():
        n = int(lengths[i])
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):  # the fullest row that still fits it
            _, r = free.pop(at)
        else:
            r = len(used)
            used.append(0)
        row[i], offset[i] = r, used[r]
        used[r] += n
        if used[r] < capacity:
            bisect.insort(free, (capacity - used[r], r))
    return row, offset, len(used)


def balance_rows(lengths: np.ndarray, rows: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Spread sequences over ``rows`` rows so that the longest row is as short as greedy finds.

    Longest first, each into the currently shortest row (LPT): rows end up within one sequence
    of each other, so there is little padding even when the rows are few.

    Returns:
        ``(row, offset, longest row)``.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    rows = max(1, min(int(rows), len(lengths)))
    row = np.zeros(len(lengths), np.int64)
    offset = np.zeros(len(lengths), np.int64)
    heap = [(0, r) for r in range(rows)]
    for i in np.argsort(-lengths, kind="stable").tolist():
        used, r = heapq.heappop(heap)
        row[i], offset[i] = r, used
        heapq.heappush(heap, (used + int(lengths[i]), r))
    return row, offset, max(u for u, _ in heap)


LONG_SEQUENCE = 64
"""Sequences at least this long (DTI blocks) are balanced over rows up to four times as long as the longest."""


class RowPlacer:
    """Scatters the tokens of variable-length sequences, given flat in sequence order, into ``[R, L]`` rows.

    With ``pack_rows`` several sequences may share a row; without it each sequence gets its own row
    and ``L`` is the longest sequence. Short sequences (sliding window) fill rows as long as the
    longest of them (:func:`assign_rows`). Long ones (DTI blocks) are balanced over the number of rows
    (each at most four times the longest sequence) that pads least (:func:`balance_rows`);
    block-sparse attention (:class:`~llm_features.attention.TiledBias`) makes long rows cost little.

    With ``head`` (the first ``head[s]`` tokens of sequence ``s``: its contexts), a row holds the
    heads of all its sequences first, then their tails (the query tokens), each part in sequence
    order. Queries attend to contexts only, and their windows then sit side by side in one region
    of the row, so a tile of query rows needs few key tiles even where it spans two sequences.
    """

    def __init__(self, lengths: np.ndarray, pack_rows: bool, head: np.ndarray | None = None) -> None:
        lengths = np.asarray(lengths, dtype=np.int64)
        longest = int(lengths.max())
        if not pack_rows:
            seq_row, seq_offset, self.rows = np.arange(len(lengths)), np.zeros(len(lengths), np.int64), len(lengths)
            self.length = longest
        elif longest >= LONG_SEQUENCE:
            # the row count with the least padding, rows at most 4x the longest sequence
            total = int(lengths.sum())
            best = None
            for rows in range(max(1, -(-total // (4 * longest))), -(-total // longest) + 1):
                placed = balance_rows(lengths, rows)
                if best is None or rows * placed[2] < best[0] * best[1][2]:
                    best = (rows, placed)
            self.rows, (seq_row, seq_offset, self.length) = best
        else:
            self.length = longest
            seq_row, seq_offset, self.rows = assign_rows(lengths, self.length)
        self.seq = np.repeat(np.arange(len(lengths)), lengths)
        """``[N]`` sequence of each flat token."""
        self.within = np.arange(len(self.seq)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        """``[N]`` index of each flat token inside its sequence."""
        column = seq_offset[self.seq] + self.within
        if head is not None:
            head = np.asarray(head, dtype=np.int64)
            tail = lengths - head
            order = np.lexsort((seq_offset, seq_row))  # the sequences of each row, left to right
            first = np.ones(len(order), bool)
            first[1:] = seq_row[order][1:] != seq_row[order][:-1]
            group = np.cumsum(first) - 1
            starts = np.flatnonzero(first)

            def before(x: np.ndarray) -> np.ndarray:  # sum of x over the earlier sequences of the same row
                c = np.cumsum(x[order]) - x[order]
                out = np.empty(len(x), np.int64)
                out[order] = c - c[starts][group]
                return out

            row_heads = np.bincount(seq_row, weights=head, minlength=self.rows).astype(np.int64)
            head_at = before(head)
            tail_at = row_heads[seq_row] + before(tail)
            in_head = self.within < head[self.seq]
            column = np.where(in_head, head_at[self.seq] + self.within,
                              tail_at[self.seq] + self.within - head[self.seq])
        self.flat = seq_row[self.seq] * self.length + column
        """``[N]`` index of each flat token in the ``[R, L]`` rows (row-major)."""

    def __call__(self, values: np.ndarray, fill) -> np.ndarray:
        out = np.full(self.rows * self.length, fill, dtype=np.asarray(values).dtype)
        out[self.flat] = values
        return out.reshape(self.rows, self.length)

    def layout(self, interaction: np.ndarray, time_start: np.ndarray, is_query: np.ndarray, span: np.ndarray,
               pad_interaction: int) -> SequenceLayout:
        """The :class:`SequenceLayout` of the flat tokens (padding: not valid, its own segment -1)."""
        return SequenceLayout(
            interaction=torch.from_numpy(self(interaction, pad_interaction)),
            time_start=torch.from_numpy(self(time_start, pad_interaction)),
            is_query=torch.from_numpy(self(is_query, False)),
            span=torch.from_numpy(self(span, -1)),
            valid=torch.from_numpy(self(np.ones(len(self.seq), bool), False)),
            segment=torch.from_numpy(self(self.seq, -1)),
        )


__all__ = ["LONG_SEQUENCE", "RowPlacer", "assign_rows", "balance_rows"]
