"""The optimizer and learning-rate schedule of fine-tuning: AdamW, linear warm-up then linear decay to 0."""

from __future__ import annotations

from collections.abc import Callable

import torch

from llm_features.finetune.config import FinetuneConfig
from llm_features.finetune.model import FinetuneModel


def make_optimizer(model: FinetuneModel, cfg: FinetuneConfig) -> torch.optim.Optimizer:
    """AdamW over the model's parameter groups, fused where the device supports it.

    Fused: one kernel for all parameters instead of a loop over tensors. The optimizer step is a
    fixed cost per step, so this matters most for short steps (DTI packs many targets in few tokens).
    """
    groups = model.param_groups(cfg.lr, cfg.head_lr, cfg.weight_decay)
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    try:
        return torch.optim.AdamW(groups, betas=betas, fused=True)
    except (RuntimeError, TypeError, ValueError):  # a device or dtype without the fused kernel
        return torch.optim.AdamW(groups, betas=betas)


def lr_factor(warmup: int, total: int) -> Callable[[int], float]:
    """The learning-rate factor of each step: up to 1 over ``warmup`` steps, then down to 0 at ``total``."""
    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))
    return f


def make_scheduler(
    optimizer: torch.optim.Optimizer, warmup: int, total: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule of :func:`lr_factor`, stepped once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(warmup, total))


__all__ = ["lr_factor", "make_optimizer", "make_scheduler"]
