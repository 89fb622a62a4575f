"""The pipeline's PNG plots: training curves (fine-tuning, both ranker twins) and the twins' test AUC."""

from __future__ import annotations

import json
from pathlib import Path


def plot_report(report: dict, ft_out: Path, out: Path) -> list[Path]:
    """Write ``training_curves.png`` and ``ranker_auc.png`` under ``out``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    out.mkdir(parents=True, exist_ok=True)
    ft_metrics = json.loads((ft_out / "metrics.json").read_text())
    return [_training_curves(report, ft_metrics, out / "training_curves.png"),
            _ranker_auc(report, out / "ranker_auc.png")]


def _training_curves(report: dict, ft_metrics: dict, path: Path) -> Path:
    import matplotlib.pyplot as plt

    curve = ft_metrics.get("loss_curve") or [h["train_loss"] for h in ft_metrics.get("history", [])]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    steps = ft_metrics.get("steps", len(curve))
    axes[0].plot([steps * (i + 1) / len(curve) for i in range(len(curve))], curve,
                 marker="." if len(curve) < 30 else None)
    axes[0].set(title="finetune (BAHE + DTI): train loss", xlabel="step", ylabel="BCE")
    for name, r in report["ranker"].items():
        if r.get("loss_curve"):  # mean loss per 50 steps (ranker.train)
            axes[1].plot([50 * (i + 1) for i in range(len(r["loss_curve"]))], r["loss_curve"], label=name)
    axes[1].set(title="ranker: train loss", xlabel="step", ylabel="BCE")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _ranker_auc(report: dict, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    names = list(report["ranker"])
    aucs = [report["ranker"][n]["test"]["auc"] for n in names]
    ax.bar(names, aucs, color=["#888", "#2a7"][: len(names)])
    for i, a in enumerate(aucs):
        ax.text(i, a, f"{a:.4f}", ha="center", va="bottom")
    ax.set_ylim(min(aucs) - 0.02, max(aucs) + 0.01)
    ax.set(title="ranker test AUC", ylabel="AUC")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
