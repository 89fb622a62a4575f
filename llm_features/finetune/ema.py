"""An exponential moving average of the trained weights (``llmfeat finetune --ema-decay``).

The average, not the last iterate, is what a run with ``ema_decay > 0`` evaluates, saves in
``model.safetensors`` and exports. It smooths the step-to-step noise of the weights, which is
largest when a step's targets come from few users (DTI packs ``k`` consecutive targets of one
user into each sequence).

Example::

    ema = WeightAverage(model, decay=0.995)
    for batch in batches:
        ...; optimizer.step(); ema.update()
    with ema.applied():
        evaluate(model)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


class WeightAverage:
    """``shadow = d * shadow + (1 - d) * weights`` after every optimizer step, over the trainable parameters.

    The decay warms up as ``d_t = min(decay, (1 + t) / (10 + t))``, so the first steps do not pin the
    average to the initial weights.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.shadow = [p.detach().clone() for p in self.params]
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - d)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Inside the block the model holds the averaged weights; the trained ones come back after it."""
        with torch.no_grad():
            saved = [p.detach().clone() for p in self.params]
            torch._foreach_copy_(self.params, self.shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self.params, saved)

    def state_dict(self) -> dict[str, Any]:
        return {"shadow": [s.detach().cpu() for s in self.shadow], "updates": self.updates, "decay": self.decay}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["shadow"]) != len(self.shadow):
            raise ValueError(f"ema state holds {len(state['shadow'])} tensors, the model has {len(self.shadow)}")
        for s, v in zip(self.shadow, state["shadow"]):
            s.copy_(v)
        self.updates = int(state["updates"])

    def raw_state(self) -> list[torch.Tensor]:
        """Copies of the trained (not averaged) weights, for a resumable checkpoint."""
        return [p.detach().cpu().clone() for p in self.params]

    @torch.no_grad()
    def load_raw_state(self, raw: list[torch.Tensor]) -> None:
        for p, v in zip(self.params, raw):
            p.copy_(v)
