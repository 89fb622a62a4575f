"""What a fine-tuning run trains and evaluates on: the targets of each split, their blocks, the batches
of an epoch and the passes of one optimizer step.

Example::

    blocks = split_blocks(cfg, data, "train", cfg.k)
    for idx in epoch_batches(blocks, cfg.batch_size, cfg.seed, epoch):
        passes = token_groups(packer.lengths(blocks.take(idx)), cfg.micro_batch_tokens)
"""

from __future__ import annotations

import numpy as np

from llm_features.finetune.config import FinetuneConfig
from llm_features.finetune.data import FinetuneData, limit_targets
from llm_features.finetune.packing import Blocks, batch_indices, make_blocks
from llm_features.ingest.split import SPLIT_CODES


def split_targets(cfg: FinetuneConfig, data: FinetuneData, split: str) -> np.ndarray:
    """``[N]`` boolean: the rows of ``split`` this run trains on or evaluates (after ``max_targets``).

    Baselines that must see exactly the same targets (``bench/bench_finetune.py``) call this too.
    """
    mask = data.split_mask(split)
    if split == "train" and cfg.fold is not None:
        from llm_features.ids import user_fold

        user_of_row = np.repeat(data.hist.user_ids, np.diff(data.hist.offsets))
        mask = mask & (user_fold(user_of_row, cfg.folds) != cfg.fold)
    return limit_targets(data.hist, mask, cfg.max_targets, cfg.sample_seed + SPLIT_CODES[split])


def split_blocks(cfg: FinetuneConfig, data: FinetuneData, split: str, k: int) -> Blocks:
    return make_blocks(data.hist, split_targets(cfg, data, split), k, cfg.context_size)


def token_groups(lengths: np.ndarray, max_tokens: int) -> list[np.ndarray]:
    """Split sequences (in order) into consecutive groups of at most ``max_tokens`` positions (0: one group).

    A sequence longer than ``max_tokens`` forms a group of its own.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if max_tokens <= 0 or lengths.sum() <= max_tokens:
        return [np.arange(len(lengths))]
    groups, start, used = [], 0, 0
    for i, n in enumerate(lengths.tolist()):
        if used and used + n > max_tokens:
            groups.append(np.arange(start, i))
            start, used = i, 0
        used += n
    groups.append(np.arange(start, len(lengths)))
    return groups


def epoch_batches(blocks: Blocks, targets_per_batch: int, seed: int, epoch: int) -> list[np.ndarray]:
    """The block indices of each batch of ``epoch``: a pure function of (seed, epoch), so resume can skip ahead."""
    order = np.random.default_rng([seed, epoch]).permutation(len(blocks))
    return [order[i] for i in batch_indices(blocks.num_targets[order], targets_per_batch)]


__all__ = ["epoch_batches", "split_blocks", "split_targets", "token_groups"]
