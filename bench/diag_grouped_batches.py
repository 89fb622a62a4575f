"""Diagnostic: is DTI's AUC gap the packing or the batch composition?

Trains the sliding window (k = 1) with its batches grouped the way DTI groups targets: each DTI
block of k consecutive targets of one user (the same blocks, shuffled with the same seed) becomes a
run of k sliding-window sequences, so each 64-target step holds about 64 / k users instead of 64
random targets. If this run loses as much test AUC as DTI with ``leakage=isolated`` (the same
function as the sliding window), the gap comes from the batches, not from the packed attention.

    HF_HUB_OFFLINE=1 python bench/diag_grouped_batches.py --data-dir WS --out runs/diag_grouped_k32 \
        --k 32 -- --limit-users 200 --num-threads 1 --log-every 0

Everything after ``--`` goes to ``llmfeat finetune`` (``--packing dti --targets-per-sequence 1`` are
set here). Numbers, not assertions.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--k", type=int, default=32, help="the DTI block size whose grouping is imitated")
    ap.add_argument("finetune_args", nargs=argparse.REMAINDER)
    args = ap.parse_args()

    import llm_features.finetune.train as T
    from llm_features.finetune.packing import make_blocks

    state: dict = {}
    random_batches, make_packer = T.epoch_batches, T.make_packer

    def packer(cfg, data, backbone):
        state["hist"], state["n"] = data.hist, cfg.context_size
        return make_packer(cfg, data, backbone)

    def grouped_batches(blocks, targets_per_batch, seed, epoch):
        if "train" not in state:  # the first call is the training split; evaluation never calls this
            state["train"] = blocks
        if blocks is not state["train"]:
            return random_batches(blocks, targets_per_batch, seed, epoch)
        rows = blocks.target_start
        targets = np.zeros(len(state["hist"]), dtype=bool)
        targets[rows] = True
        dti = make_blocks(state["hist"], targets, args.k, state["n"])
        rank = np.argsort(np.random.default_rng([seed, epoch]).permutation(len(dti)))  # DTI's shuffled order
        block_of = np.searchsorted(dti.target_start, rows, side="right") - 1
        order = np.lexsort((rows, rank[block_of]))
        batches = [order[i] for i in T.batch_indices(blocks.num_targets[order], targets_per_batch)]
        user = state["hist"].user_start[rows]
        users = [len(np.unique(user[b])) for b in batches]
        shuffled = [len(np.unique(user[b])) for b in random_batches(blocks, targets_per_batch, seed, epoch)]
        print(f"[diag] epoch {epoch}: {len(batches)} steps, {np.mean(users):.1f} users per step on average "
              f"(random batches: {np.mean(shuffled):.1f})", file=sys.stderr, flush=True)
        return batches

    T.epoch_batches, T.make_packer = grouped_batches, packer
    extra = [a for a in args.finetune_args if a != "--"]
    sys.argv = ["llmfeat", "finetune", "--data-dir", str(args.data_dir), "--out", str(args.out),
                "--packing", "dti", "--targets-per-sequence", "1", *extra]
    from llm_features.cli import run

    run()


if __name__ == "__main__":
    main()
