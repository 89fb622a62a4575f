"""Ranks under ``torchrun``: one process group for the stages that shard their work.

``encode`` and ``embed-users`` split their part files round robin over the ranks: part ``c`` is
written by rank ``c % world``, so the parts are the same files a single process writes, and a killed
rank's parts are simply missing on the next run, which writes them. Rank 0 alone does what must
happen once (dropping stale rows, claiming the fingerprint, writing the report), between barriers.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch


def init_from_env(device: torch.device | None = None) -> tuple[int, int]:
    """(rank, world size); joins the process group when launched by ``torchrun`` (gloo on CPU, nccl on GPU)."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device is not None and device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


@contextlib.contextmanager
def process_group(device: torch.device | None = None) -> Iterator[tuple[int, int]]:
    """:func:`init_from_env` for a block; the process group is left at its end when this call joined it
    (a caller that is already in a group keeps it)."""
    import torch.distributed as dist

    owns = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    ranks = init_from_env(device)
    try:
        yield ranks
    finally:
        if owns:
            dist.destroy_process_group()


def barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def sum_over_ranks(values: Mapping[str, float], world: int, maximum: tuple[str, ...] = ()) -> dict[str, float]:
    """``values`` summed over the ranks (lists concatenated; the keys in ``maximum``: their maximum)."""
    if world <= 1:
        return dict(values)
    import torch.distributed as dist

    gathered: list = [None] * world
    dist.all_gather_object(gathered, dict(values))
    return {k: (max if k in maximum else _total)([g[k] for g in gathered]) for k in values}


def round_robin(idx: np.ndarray, rank: int, world: int) -> np.ndarray:
    """This rank's share of ``idx``: every ``world``-th entry from ``rank`` on."""
    return idx[rank::world]


def gather_arrays(arrays: list[np.ndarray], world: int) -> list[np.ndarray]:
    """Each of ``arrays`` concatenated over the ranks, in rank order (every rank gets them all)."""
    if world == 1:
        return arrays
    import torch.distributed as dist

    out: list[Any] = [None] * world
    dist.all_gather_object(out, arrays)
    return [np.concatenate([o[i] for o in out]) for i in range(len(arrays))]


def _total(values: list):
    out = values[0]
    for v in values[1:]:
        out = out + v  # numbers add up, lists concatenate
    return out
