"""Fine-tuning checkpoints: the trainable weights, the options and the model fingerprint.

A checkpoint directory holds

- ``model.safetensors``: the parameters training changed (the deep stack, or its LoRA adapters;
  the query token, feedback embedding, distance bias and CTR head),
- ``config.json``: every :class:`FinetuneConfig` option and the backbone's fingerprint,
- ``trainer_state.pt``: optimizer, scheduler, data position and RNG states (for ``--resume``),
- ``metrics.json``: what the run measured,
- ``test_predictions.npz``: ``row`` (history row of each test target, in the order of
  :class:`~llm_features.finetune.packing.UserHistories` for the same data options), ``label``
  and ``logit``, to compare two runs target by target.

Every file is written to a temporary name and renamed into place, so a killed run leaves the
previous checkpoint readable.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from llm_features.backbone import Backbone
from llm_features.config import build_config
from llm_features.fingerprint import FingerprintMismatchError, ModelFingerprint
from llm_features.finetune.config import FinetuneConfig
from llm_features.finetune.model import FinetuneModel

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TRAINER_STATE = "trainer_state.pt"
BEST_WEIGHTS = "best_epoch.safetensors"
METRICS = "metrics.json"
TEST_PREDICTIONS = "test_predictions.npz"


def _replace(tmp: Path, dest: Path) -> None:
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, dest)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
    _replace(tmp, path)


def write_predictions(path: Path, rows, labels, logits) -> None:
    """``[T]`` target rows, labels and logits to ``path`` (``.npz``), written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, row=np.asarray(rows, np.int64), label=np.asarray(labels, np.float32),
                 logit=np.asarray(logits, np.float32))
    _replace(tmp, path)


def config_to_dict(cfg: FinetuneConfig) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items()}


def build_model(cfg: FinetuneConfig, backbone: Backbone, item_dim: int) -> FinetuneModel:
    """The model ``cfg`` describes, on top of ``backbone`` (LoRA adapters injected if asked)."""
    model = FinetuneModel(
        backbone,
        granularity=cfg.granularity,
        context_size=cfg.context_size,
        leakage=cfg.leakage,
        distance_bias=cfg.distance_bias,
        item_dim=item_dim,
        head_hidden=cfg.head_hidden,
        attention=cfg.attention,
    )
    if cfg.dropout is not None:
        model.set_dropout(cfg.dropout)
    if cfg.lora:
        model.apply_lora(cfg.lora_rank, cfg.lora_alpha)
    return model


def save_weights(path: Path, model: FinetuneModel) -> None:
    """The trainable tensors alone, written atomically (the best epoch's weights)."""
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.trainable_state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    _replace(tmp, path)


def save_checkpoint(
    out: Path,
    model: FinetuneModel,
    cfg: FinetuneConfig,
    *,
    item_dim: int,
    trainer_state: dict[str, Any] | None = None,
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.trainable_state_dict().items()}
    tmp = out / (WEIGHTS + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    _replace(tmp, out / WEIGHTS)
    write_json(out / CONFIG, {
        "finetune": config_to_dict(cfg),
        "fingerprint": model.backbone.fingerprint.to_dict(),
        "item_dim": item_dim,
        "hidden_size": model.backbone.hidden_size,
        "trainable": sorted(tensors),
    })
    if trainer_state is not None:
        tmp = out / (TRAINER_STATE + ".tmp")
        torch.save(trainer_state, tmp)
        _replace(tmp, out / TRAINER_STATE)


def read_checkpoint_config(path: str | os.PathLike) -> tuple[FinetuneConfig, ModelFingerprint, dict[str, Any]]:
    meta = json.loads((Path(path) / CONFIG).read_text())
    cfg = build_config(FinetuneConfig, meta["finetune"])
    return cfg, ModelFingerprint.from_dict(meta["fingerprint"]), meta


def load_finetuned(
    path: str | os.PathLike, device: str | torch.device = "cpu", backbone: Backbone | None = None
) -> tuple[FinetuneModel, FinetuneConfig]:
    """Rebuild a fine-tuned model from its checkpoint directory (the backbone is loaded from the config).

    Raises :class:`FingerprintMismatchError` when the backbone differs from the one trained.
    """
    path = Path(path)
    cfg, fp, meta = read_checkpoint_config(path)
    backbone = backbone or Backbone.load(cfg.backbone_config(), device=device)
    if backbone.fingerprint.digest != fp.digest:
        raise FingerprintMismatchError(
            f"{path} was trained on {fp.model_name} (fingerprint {fp.digest}); the backbone loaded is "
            f"{backbone.fingerprint.model_name} ({backbone.fingerprint.digest})"
        )
    model = build_model(cfg, backbone, int(meta["item_dim"])).to(device)
    load_trainable(model, path / WEIGHTS)
    return model.eval(), cfg


def load_trainable(model: FinetuneModel, weights: Path) -> None:
    state = load_file(str(weights))
    expected = set(model.trainable_state_dict())
    if set(state) != expected:
        raise ValueError(
            f"{weights}: holds {len(state)} tensors, the model expects {len(expected)} "
            f"(missing {sorted(expected - set(state))[:3]}, unexpected {sorted(set(state) - expected)[:3]})"
        )
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)
