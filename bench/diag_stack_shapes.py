"""Diagnostic: what the deep layers cost per position at the sliding window's and DTI's batch shapes.

With 64 targets per step at n = 30, the sliding window runs 64 sequences of 31 positions; DTI at
k = 32 runs about 2 sequences of ~95 (the n-context of the block, one context and one query token
per target). This times forward + backward of the embedded default model's deep layers alone on
those shapes (and a few more), with an all-zero attention bias, on the current thread count, so the
best DTI speed-up the layers allow can be read off without the rest of the training step.

    HF_HUB_OFFLINE=1 python bench/diag_stack_shapes.py --threads 1 [--out runs/diag_stack_shapes.json]

Numbers, not assertions.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

SHAPES = [(64, 31), (2, 95), (1, 190), (4, 95), (8, 95)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", type=Path, default=None, help="also write the numbers as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from llm_features.backbone import Backbone

    deep = Backbone.load().deep.train()
    width = next(deep.parameters()).shape[-1]
    rows = []
    for batch, length in SHAPES:
        x = torch.randn(batch, length, width, requires_grad=True)
        bias = torch.zeros(batch, 1, length, length)
        pos = torch.arange(length).expand(batch, length)
        for i in range(args.reps + 2):  # 2 warm-up repetitions
            if i == 2:
                t0 = time.perf_counter()
            deep(x, bias, pos).sum().backward()
        step = (time.perf_counter() - t0) / args.reps
        rows.append({"sequences": batch, "length": length, "positions": batch * length, "ms_per_step": 1e3 * step,
                     "us_per_position": 1e6 * step / (batch * length)})
        print(f"{batch:3d} x {length:4d} = {batch * length:5d} positions: {1e3 * step:7.1f} ms per forward + "
              f"backward, {1e6 * step / (batch * length):6.1f} us per position", flush=True)
    sw, dti = rows[0], rows[1]
    print(f"sliding window ({sw['sequences']} x {sw['length']}) / DTI ({dti['sequences']} x {dti['length']}) time: "
          f"{sw['ms_per_step'] / dti['ms_per_step']:.1f}x for {sw['positions'] / dti['positions']:.1f}x the positions")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"threads": args.threads, "reps": args.reps, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
