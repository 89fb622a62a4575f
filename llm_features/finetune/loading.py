"""A finished fine-tuning checkpoint: its config read and checked, and the model rebuilt from it.

What ``llmfeat embed-users``, ``export``, ``events`` and the ranker's ``score`` mode do with the
directory ``llmfeat finetune --out`` wrote (its files: :mod:`~llm_features.finetune.checkpoint_files`).
Everything that can refuse a checkpoint (its ``config.json``, whether ``model.safetensors`` is the
file that config was written with, whether the model directory still holds the files it was trained
on) runs before any model code or weights are loaded.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from llm_features.backbone import Backbone
from llm_features.config import build_config
from llm_features.errors import UserError
from llm_features.fingerprint import FingerprintMismatchError, ModelFingerprint
from llm_features.finetune.checkpoint_files import CONFIG, WEIGHTS, file_sha256
from llm_features.finetune.config import FinetuneConfig
from llm_features.finetune.model import FinetuneModel, build_model
from llm_features.model_dir import default_model_dir, weights_sha256


def read_checkpoint_config(path: str | os.PathLike) -> tuple[FinetuneConfig, ModelFingerprint, dict[str, Any]]:
    """The options, the fingerprint and the raw ``config.json`` of the checkpoint at ``path``, every
    value checked like its command-line option (a :class:`UserError` naming the file).

    ``trust_remote_code`` is never taken from the file: the command that loads the model decides.
    """
    path = Path(path)
    file = path / CONFIG
    fix = "Pass the directory `llmfeat finetune --out` wrote."
    if not path.exists():
        raise UserError("checkpoint directory does not exist", file=path, fix=fix)
    if not path.is_dir():
        raise UserError("not a checkpoint directory", file=path, fix=fix)
    if not file.is_file():
        raise UserError(f"no {CONFIG}: not a checkpoint `llmfeat finetune` wrote (or one still being written)",
                        file=path, fix=fix)
    try:
        meta = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"not valid JSON ({e})", file=file, fix="The checkpoint is damaged: retrain it.") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("finetune"), dict) \
            or not isinstance(meta.get("fingerprint"), dict):
        raise UserError("not a finetune checkpoint config (no 'finetune' and 'fingerprint' sections)", file=file,
                        fix=fix)
    cfg = build_config(FinetuneConfig, _without_cli_only(meta["finetune"]), str(file))
    try:
        fp = ModelFingerprint.from_dict(meta["fingerprint"])
    except (TypeError, ValueError) as e:
        raise UserError(f"'fingerprint' is damaged ({e})", file=file, fix="Retrain the checkpoint.") from None
    item_dim = meta.get("item_dim")
    if isinstance(item_dim, bool) or not isinstance(item_dim, int) or item_dim < 1:
        raise UserError(f"'item_dim' must be a positive integer, got {item_dim!r}", file=file, fix=fix)
    return cfg, fp, meta


def _without_cli_only(values: dict[str, Any]) -> dict[str, Any]:
    """A saved config (the flat form of old checkpoints or the nested one) without ``trust_remote_code``."""
    out = {k: v for k, v in values.items() if k != "trust_remote_code"}
    if isinstance(out.get("backbone"), dict):
        out["backbone"] = {k: v for k, v in out["backbone"].items() if k != "trust_remote_code"}
    return out


def check_model_files(cfg: FinetuneConfig, fp: ModelFingerprint, source: str | os.PathLike) -> None:
    """Before any model code or weights are loaded: the model directory ``cfg`` names holds the files
    the checkpoint ``source`` was trained on, and ``cfg`` describes the same split, pooling, token
    limit and dtype (a :class:`FingerprintMismatchError` otherwise)."""
    model_dir = Path(cfg.backbone.model) if cfg.backbone.model is not None else default_model_dir()
    fix = "Restore that model directory, or retrain the checkpoint on this one."
    if not model_dir.is_dir():
        raise UserError(f"was trained on the model directory {model_dir}, which does not exist", file=source,
                        fix=fix)
    try:
        got = weights_sha256(model_dir)
    except FileNotFoundError:
        got = "none"
    if got != fp.weights_sha256:
        raise FingerprintMismatchError(
            f"was trained on model files of fingerprint {fp.digest} (weights {fp.weights_sha256[:12]}), but "
            f"{model_dir} now holds other files (weights {got[:12]})", file=source, fix=fix)
    for name in ("pooling", "max_tokens", "dtype", "split_layer"):
        want, have = getattr(fp, name), getattr(cfg.backbone, name)
        if have is not None and have != want:
            raise FingerprintMismatchError(
                f"its fingerprint {fp.digest} records {name}={want!r}, its options {name}={have!r}", file=source,
                fix="The checkpoint was edited or is damaged: retrain it.")


def load_finetuned(
    path: str | os.PathLike, device: str | torch.device = "cpu", backbone: Backbone | None = None,
    *, trust_remote_code: bool = False,
) -> tuple[FinetuneModel, FinetuneConfig]:
    """Rebuild a fine-tuned model from its checkpoint directory (the backbone is loaded from the config).

    Everything that can refuse the checkpoint runs before any model code is loaded: its config,
    whether ``model.safetensors`` is the one ``config.json`` was written with, and whether the model
    directory holds the files it was trained on. ``trust_remote_code`` comes from the caller (the
    command line), never from the checkpoint.

    Raises :class:`FingerprintMismatchError` when the backbone differs from the one trained.
    """
    path = Path(path)
    cfg, fp, meta = read_checkpoint_config(path)
    weights = path / WEIGHTS
    check_weights(path, meta)
    if backbone is None:
        check_model_files(cfg, fp, path / CONFIG)
        bcfg = dataclasses.replace(cfg.backbone, trust_remote_code=trust_remote_code)
        backbone = Backbone.load(bcfg, device=device)
    fp.require_same(backbone.fingerprint, lambda loaded, trained: f"{path} was trained on model fingerprint "
                    f"{trained}; the backbone loaded is {loaded}")
    model = build_model(cfg, backbone, int(meta["item_dim"])).to(device)
    load_trainable(model, weights)
    return model.eval(), cfg


def check_weights(path: Path, meta: dict[str, Any]) -> None:
    """``model.safetensors`` exists and is the file ``config.json`` was written with (where it says)."""
    weights = Path(path) / WEIGHTS
    if not weights.is_file():
        raise UserError(f"no {WEIGHTS}: not a checkpoint `llmfeat finetune` wrote (or one still being written)",
                        file=path, fix="Pass the directory `llmfeat finetune --out` wrote.")
    want = meta.get("weights_sha256")
    if want is not None and file_sha256(weights) != want:
        raise UserError(f"does not match {CONFIG}: the checkpoint was caught mid-write or mixed by hand",
                        file=weights, fix="Rerun `llmfeat finetune` (with --resume to continue) to rewrite it.")


def load_trainable(model: FinetuneModel, weights: Path) -> None:
    try:
        state = load_file(str(weights))
    except Exception as e:  # noqa: BLE001 - safetensors' own error types
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise UserError(f"not a readable safetensors file ({first})", file=weights,
                        fix="The checkpoint is damaged: retrain it.") from None
    expected = set(model.trainable_state_dict())
    if set(state) != expected:
        raise UserError(
            f"holds {len(state)} tensors, the model expects {len(expected)} "
            f"(missing {sorted(expected - set(state))[:3]}, unexpected {sorted(set(state) - expected)[:3]})",
            file=weights, fix="It belongs to another model or options: use the checkpoint it was written with.",
        )
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            if params[name].shape != value.shape:
                raise UserError(f"tensor {name} has shape {tuple(value.shape)}, the model expects "
                                f"{tuple(params[name].shape)}", file=weights,
                                fix="It belongs to another model or options: use the checkpoint it was written with.")
            params[name].copy_(value)
