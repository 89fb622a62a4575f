"""Why a fresh feature built from the user's own recent labels loses per-user AUC: a simulation.

Every simulated user has a fixed positive rate ``p_u`` and independent labels: the next label does
not depend on earlier ones, so the true per-user AUC of ANY feature is 0.5. The feature is the
positive rate of the user's last ``--window`` labels before the row (what ``recent_positive_rate_30``
is, and what a user embedding refreshed on every event can track), scored, as bench_quality scores
its test window, over a window of each user's last ``--test-rows`` rows whose features include the
earlier labels of that same window.

Within one user, a pair (positive row, negative row) is biased against the positive row: when the
positive row comes first its label raises the negative row's feature, and when the negative row comes
first its label lowers the positive row's feature. So the per-user AUC falls below 0.5 with no dynamics
at all, while the pooled AUC (across users) is high because the feature tracks ``p_u``. The same
feature frozen at the start of the test window (no label of the window inside) scores exactly 0.5
per user (a constant within each user), and loses most of the pooled signal with it.

    python bench/diag_per_user_freshness.py [--users 3000] [--history 100] [--test-rows 16] [--seeds 3]

Writes JSON and a markdown table (``--out``, default bench/results/per_user_freshness.{json,md}).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llm_features.metrics import mean_per_user_auc, roc_auc  # noqa: E402


def simulate(users: int, history: int, test_rows: int, window: int, seed: int) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    p = rng.beta(2.0, 1.5, size=users)  # user positive rates; ML-1M's rating>3 rate is about 0.58
    labels = rng.random((users, history + test_rows)) < p[:, None]
    csum = np.concatenate([np.zeros((users, 1)), np.cumsum(labels, axis=1)], axis=1)
    rows = np.arange(history, history + test_rows)
    fresh = (csum[:, rows] - csum[:, rows - window]) / window  # last `window` labels before each row
    frozen = np.repeat(fresh[:, :1], test_rows, axis=1)  # the state at the window's start
    y = labels[:, rows].astype(np.int8)
    groups = np.repeat(np.arange(users), test_rows)
    out = {}
    for name, feature in (("fresh", fresh), ("frozen_at_window_start", frozen), ("true_rate", np.repeat(
            p[:, None], test_rows, axis=1))):
        out[f"{name}_pooled_auc"] = float(roc_auc(y.ravel(), feature.ravel()))
        out[f"{name}_per_user_auc"] = float(mean_per_user_auc(groups, y.ravel(), feature.ravel()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=3000)
    ap.add_argument("--history", type=int, default=100, help="labels before the test window")
    ap.add_argument("--test-rows", type=int, default=16, help="rows per user in the test window")
    ap.add_argument("--window", type=int, default=30, help="labels in the recent positive rate")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "per_user_freshness")
    args = ap.parse_args()
    runs = [simulate(args.users, args.history, args.test_rows, args.window, s) for s in range(args.seeds)]
    summary = {k: {"mean": round(float(np.mean([r[k] for r in runs])), 4),
                   "min": round(float(np.min([r[k] for r in runs])), 4),
                   "max": round(float(np.max([r[k] for r in runs])), 4)} for k in runs[0]}
    command = "python bench/diag_per_user_freshness.py " + " ".join(sys.argv[1:])
    out = {"command": command, "options": {k: v for k, v in vars(args).items() if k != "out"} | {"out": str(
        args.out)}, "runs": runs, "summary": summary}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(out, indent=2) + "\n")
    lines = [
        "# Per-user AUC of a fresh label-tracking feature when labels are independent",
        "",
        f"Command: `{command}`. {args.users} users, each with a fixed positive rate and independent labels; "
        f"the feature is the positive rate of the last {args.window} labels, scored over each user's last "
        f"{args.test_rows} rows. Mean (min, max) over {args.seeds} seeds. The true per-user AUC of any "
        "feature here is 0.5.",
        "",
        "| feature | pooled AUC | per-user AUC |",
        "| --- | --- | --- |",
    ]
    for name in ("fresh", "frozen_at_window_start", "true_rate"):
        cells = [summary[f"{name}_{m}_auc"] for m in ("pooled", "per_user")]
        lines.append(f"| {name} | " + " | ".join(f"{c['mean']:.4f} ({c['min']:.4f}, {c['max']:.4f})"
                                                  for c in cells) + " |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
