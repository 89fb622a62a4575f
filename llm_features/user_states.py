"""Users' query states at their snapshot stamps: the rows ``llmfeat embed-users`` computes, and how.

:func:`with_final_queries` adds each user's final query row, :func:`snapshots` picks the rows a
cadence asks for (:mod:`llm_features.schedule`), and :func:`compute_user_states` runs them through
the fine-tuned model by the training code path (packer, attention mask,
:meth:`FinetuneModel.user_states`). :func:`final_user_states` is every user's current row, the one
``llm_features.events`` refreshes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from llm_features.finetune.data import FinetuneData
from llm_features.finetune.model import FinetuneModel
from llm_features.finetune.packing import UserHistories, batch_indices, make_blocks
from llm_features.schedule import US_PER_S, Cadence, SnapshotSchedule, check_every, opens_snapshot


def with_final_queries(hist: UserHistories) -> tuple[UserHistories, np.ndarray]:
    """``hist`` plus one query-only row per user at (last interaction + 1 s), after its last row.

    The extra row is only ever a *target*: contexts of a block stop at its last target's
    ``time_start``, and no other target of the user is later, so its behaviour/feedback are never
    read. Returns the extended histories and the positions of the extra rows.
    """
    m, nu = len(hist), len(hist.user_ids)
    counts = np.diff(hist.offsets)
    user_of_row = np.repeat(np.arange(nu), counts)
    pos = np.arange(m) + user_of_row
    final = hist.offsets[1:] + np.arange(nu)
    total = m + nu

    def merged(values: np.ndarray, fill: np.ndarray | int) -> np.ndarray:
        out = np.zeros(total, dtype=values.dtype)
        out[pos] = values
        out[final] = fill
        return out

    last_time = hist.time[hist.offsets[1:] - 1] if nu else np.zeros(0, np.int64)
    ext = UserHistories.from_arrays(
        merged(np.repeat(hist.user_ids, counts), hist.user_ids),
        merged(hist.time, last_time + US_PER_S),
        merged(hist.behavior_row, 0), merged(hist.item_row, 0), merged(hist.label, 0),
        merged(hist.feedback, 0), merged(hist.split, 0),
    )
    return ext, final


@dataclass
class Snapshots:
    """One entry per exported row: ``row`` is the (extended-history) row whose query gives ``u``."""

    user_id: np.ndarray
    row: np.ndarray
    stamp: np.ndarray
    """Microseconds since the epoch, UTC."""


def snapshots(ext: UserHistories, final_rows: np.ndarray, cadence: Cadence, every: int = 1) -> Snapshots:
    """Every row ``cadence`` asks for (users' empty first snapshots excluded).

    With ``cadence="event"`` and ``every > 1``, of a user's interaction times ``1, 2, ...`` (its
    first, with no history, is ``0``) only ``1..every`` and then the multiples of ``every`` are kept.
    """
    check_every(every)
    if cadence not in ("event", "day", "last"):
        raise ValueError(f"cadence must be event, day or last, got {cadence!r}")
    schedule = SnapshotSchedule(cadence, every)
    n = len(ext)
    rows = np.arange(n, dtype=np.int64)
    real = np.ones(n, dtype=bool)
    real[final_rows] = False
    nonempty = rows != ext.user_start
    user_of_row = np.repeat(ext.user_ids, np.diff(ext.offsets))
    stamp = schedule.stamps(ext.time)
    if cadence == "last":
        pick = np.zeros(n, dtype=bool)
    else:
        pick = nonempty & schedule.kept(real & opens_snapshot(user_of_row, stamp), ext.user_start)
    picked = np.flatnonzero(pick)
    final_stamp = schedule.final_stamps(ext.time[final_rows - 1])
    all_rows = np.concatenate([picked, final_rows])
    stamps = np.concatenate([stamp[picked], final_stamp])
    order = np.lexsort((stamps, user_of_row[all_rows]))
    users = user_of_row[all_rows][order]
    return Snapshots(users, all_rows[order].astype(np.int64), stamps[order].astype(np.int64))


@torch.inference_mode()
def compute_user_states(
    model: FinetuneModel,
    packer,
    hist: UserHistories,
    rows: np.ndarray,
    *,
    context_size: int,
    targets_per_sequence: int = 1,
    batch_size: int = 1024,
    device: torch.device | str = "cpu",
) -> tuple[np.ndarray, int]:
    """``[len(rows), D]`` query states ``u`` of the given history rows (the training code path).

    ``rows`` must be sorted. With ``targets_per_sequence > 1`` every row of a user from its first
    requested row on is packed as a target (DTI blocks need consecutive targets); only the
    requested rows are returned. Returns (states, states computed).
    """
    rows = np.asarray(rows, dtype=np.int64)
    n_rows = len(hist)
    if targets_per_sequence <= 1:
        targets = np.zeros(n_rows, dtype=bool)
        targets[rows] = True
    else:  # every row from the user's first requested row to the user's end
        user_idx = np.searchsorted(hist.offsets, rows, side="right") - 1
        first = np.full(len(hist.user_ids), n_rows, dtype=np.int64)
        np.minimum.at(first, user_idx, rows)
        users = np.unique(user_idx)
        delta = np.zeros(n_rows + 1, dtype=np.int64)
        np.add.at(delta, first[users], 1)
        np.add.at(delta, hist.offsets[users + 1], -1)
        targets = np.cumsum(delta[:-1]) > 0
    blocks = make_blocks(hist, targets, max(1, targets_per_sequence), context_size)
    # long sequences together: less padding per batch
    blocks = blocks.take(np.argsort(-blocks.num_tokens, kind="stable"))
    dim = model.backbone.hidden_size
    out_rows, out_states = [], []
    for idx in batch_indices(blocks.num_targets, batch_size):
        batch = packer(blocks.take(idx)).to(device)
        out_states.append(model.user_states(batch).float().cpu().numpy())
        out_rows.append(batch.target_rows.cpu().numpy())
    if not out_rows:
        return np.zeros((0, dim), np.float32), 0
    got_rows = np.concatenate(out_rows)
    states = np.concatenate(out_states)
    order = np.argsort(got_rows)
    pos = np.searchsorted(got_rows[order], rows)
    if len(rows) and not (got_rows[order][np.minimum(pos, len(got_rows) - 1)] == rows).all():
        raise AssertionError("a requested row was not computed")
    return np.ascontiguousarray(states[order[pos]]), len(got_rows)


def final_user_states(
    model: FinetuneModel,
    ft,
    data: FinetuneData,
    *,
    context_size: int,
    batch_size: int = 1024,
    device: torch.device | str = "cpu",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every user's current row, the one embed-users writes at (last interaction + 1 s).

    The same code path as :func:`llm_features.embed_users.embed_users`: :func:`with_final_queries`,
    the checkpoint's packer (``make_packer``) and :func:`compute_user_states` with ``k = 1`` (the
    sliding window; for ``leakage="isolated"`` the DTI-packed export is the same state).
    ``data.hist`` only needs the rows a final query reads: a user's last ``context_size``
    interactions (``llm_features.events`` passes just those). Returns ``(user_ids, stamps in µs, [U, D] states)``.
    """
    from llm_features.finetune.packing import make_packer

    ext, final_rows = with_final_queries(data.hist)
    packer = make_packer(ft, FinetuneData(ext, data.behavior_table, data.item_table, data.behavior_texts),
                         model.backbone)
    states, _ = compute_user_states(model, packer, ext, final_rows, context_size=context_size,
                                    targets_per_sequence=1, batch_size=batch_size, device=device)
    return ext.user_ids.copy(), ext.time[final_rows].copy(), states


__all__ = ["Snapshots", "compute_user_states", "final_user_states", "snapshots", "with_final_queries"]
