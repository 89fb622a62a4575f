"""Diagnostic: is DTI's AUC gap the packing or the batch composition?

Trains the sliding window (k = 1) with its batches grouped the way DTI groups targets: each DTI
block of k consecutive targets of one user (the same blocks, shuffled with the same seed) becomes a
run of k sliding-window sequences, so each 64-target step holds about 64 / k users instead of 64
random targets. If this run loses as much test AUC as DTI with ``leakage=isolated`` (the same
function as the sliding window), the gap comes from the batches, not from the packed attention.

    HF_HUB_OFFLINE=1 python bench/diag_grouped_batches.py --data-dir WS --out runs/diag_grouped_k32 \
        --k 32 -- --limit-users 200 --num-threads 1 --log-every 0

Everything after ``--`` is an ``llmfeat finetune`` option (``--packing dti --targets-per-sequence 1``
are set here). The run is :class:`~llm_features.finetune.train.FinetuneRecipe` with its batch-sampler
seam overridden. Numbers, not assertions.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from llm_features.finetune.train import FinetuneRecipe


class GroupedBatchesRecipe(FinetuneRecipe):
    """The recipe, with each training batch made of whole DTI blocks of ``group_k`` targets."""

    def __init__(self, cfg, group_k: int, **kw) -> None:
        super().__init__(cfg, **kw)
        self.group_k = group_k

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        from llm_features.finetune.packing import batch_indices, make_blocks

        blocks, hist, cfg = self.train_blocks, self.data.hist, self.cfg
        rows = blocks.target_start
        targets = np.zeros(len(hist), dtype=bool)
        targets[rows] = True
        dti = make_blocks(hist, targets, self.group_k, cfg.context_size)
        rank = np.argsort(np.random.default_rng([cfg.seed, epoch]).permutation(len(dti)))  # DTI's shuffled order
        block_of = np.searchsorted(dti.target_start, rows, side="right") - 1
        order = np.lexsort((rows, rank[block_of]))
        batches = [order[i] for i in batch_indices(blocks.num_targets[order], cfg.batch_size)]
        user = hist.user_start[rows]
        users = [len(np.unique(user[b])) for b in batches]
        shuffled = [len(np.unique(user[b])) for b in super().epoch_batches(epoch)]
        print(f"[diag] epoch {epoch}: {len(batches)} steps, {np.mean(users):.1f} users per step on average "
              f"(random batches: {np.mean(shuffled):.1f})", file=sys.stderr, flush=True)
        return batches


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--k", type=int, default=32, help="the DTI block size whose grouping is imitated")
    ap.add_argument("finetune_args", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)

    import click

    from llm_features.config import dataclass_options
    from llm_features.finetune.config import FinetuneConfig

    @click.command("diag_grouped_batches")
    @dataclass_options(FinetuneConfig)
    def command(cfg: FinetuneConfig) -> None:
        m = GroupedBatchesRecipe(cfg, args.k).run()
        click.echo(f"valid AUC {m['valid']['auc']:.4f} | test AUC {m['test']['auc']:.4f} "
                   f"LogLoss {m['test']['logloss']:.4f} -> {cfg.out}")

    extra = [a for a in args.finetune_args if a != "--"]
    command.main(["--data-dir", str(args.data_dir), "--out", str(args.out), "--packing", "dti",
                  "--targets-per-sequence", "1", *extra], standalone_mode=True)


if __name__ == "__main__":
    main()
