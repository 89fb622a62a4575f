"""The files of a fine-tuning checkpoint directory (``--out``), by name, and the digest that ties them together.

A checkpoint directory holds

- ``model.safetensors``: the parameters training changed (the deep stack, or its LoRA adapters;
  the query token, feedback embedding, distance bias and CTR head),
- ``config.json``: every :class:`~llm_features.finetune.config.FinetuneConfig` option, the backbone's
  fingerprint and the sha256 of the ``model.safetensors`` it goes with (written after the weights: a
  mixed pair is refused),
- ``best_epoch.safetensors``: the weights of the epoch with the best valid AUC so far,
- ``metrics.json``: what the run measured,
- ``test_predictions.npz``: ``row`` (history row of each test target, in the order of
  :class:`~llm_features.finetune.packing.UserHistories` for the same data options), ``label``
  and ``logit``, to compare two runs target by target,
- ``resume/ckpt-NNNNNN/``: the newest *resume set* (for ``--resume``): the weights, the config, the
  trainer state (``trainer_state.pt``), the best epoch's weights and a ``manifest.json`` with the
  sha256 of each.

:mod:`~llm_features.finetune.checkpoint` writes and resumes them;
:mod:`~llm_features.finetune.loading` checks and loads a finished one.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TRAINER_STATE = "trainer_state.pt"
BEST_WEIGHTS = "best_epoch.safetensors"
METRICS = "metrics.json"
TEST_PREDICTIONS = "test_predictions.npz"
RESUME_DIR = "resume"
MANIFEST = "manifest.json"


def file_sha256(path: Path) -> str:
    """The sha256 of the file at ``path`` (hex), read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
