"""Fine-tuning checkpoints: the trainable weights, the options and the model fingerprint.

A checkpoint directory (``--out``) holds

- ``model.safetensors``: the parameters training changed (the deep stack, or its LoRA adapters;
  the query token, feedback embedding, distance bias and CTR head),
- ``config.json``: every :class:`FinetuneConfig` option, the backbone's fingerprint and the sha256
  of the ``model.safetensors`` it goes with (written after the weights: a mixed pair is refused),
- ``best_epoch.safetensors``: the weights of the epoch with the best valid AUC so far,
- ``metrics.json``: what the run measured,
- ``test_predictions.npz``: ``row`` (history row of each test target, in the order of
  :class:`~llm_features.finetune.packing.UserHistories` for the same data options), ``label``
  and ``logit``, to compare two runs target by target,
- ``resume/ckpt-NNNNNN/``: the newest *resume set* (for ``--resume``): the weights, the config, the
  trainer state (``trainer_state.pt``: optimizer, scheduler, data position and RNG states, tensors
  and plain numbers only, loaded with ``torch.load(weights_only=True)``), the best epoch's weights
  and a ``manifest.json`` with the sha256 of each. A set is written into a temporary directory and
  committed by one directory rename, so a killed run leaves the previous set whole; ``--resume``
  verifies the manifest and falls back to an older complete set, or refuses.

Every file is written to a temporary name and renamed into place (``model.safetensors`` and
``config.json`` are hard links to the committed resume set's files where there is one).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from llm_features.atomic import atomic_path, write_json
from llm_features.backbone import Backbone, default_model_dir, weights_sha256
from llm_features.config import build_config, config_dict
from llm_features.errors import UserError
from llm_features.fingerprint import FingerprintMismatchError, ModelFingerprint
from llm_features.finetune.config import FinetuneConfig
from llm_features.finetune.model import FinetuneModel

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TRAINER_STATE = "trainer_state.pt"
BEST_WEIGHTS = "best_epoch.safetensors"
METRICS = "metrics.json"
TEST_PREDICTIONS = "test_predictions.npz"
RESUME_DIR = "resume"
MANIFEST = "manifest.json"
RESUME_FORMAT = 1
_SET_PREFIX = "ckpt-"
_TMP_PREFIX = ".tmp-"


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def link_into_place(src: Path, dest: Path) -> None:
    """``dest`` atomically becomes a hard link to ``src`` (a copy where links are not possible)."""
    with atomic_path(dest) as tmp:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_predictions(path: Path, rows, labels, logits) -> None:
    """``[T]`` target rows, labels and logits to ``path`` (``.npz``), written atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, row=np.asarray(rows, np.int64), label=np.asarray(labels, np.float32),
                 logit=np.asarray(logits, np.float32))


def build_model(cfg: FinetuneConfig, backbone: Backbone, item_dim: int) -> FinetuneModel:
    """The model ``cfg`` describes, on top of ``backbone`` (LoRA adapters injected if asked)."""
    model = FinetuneModel(backbone, granularity=cfg.granularity, context_size=cfg.context_size, leakage=cfg.leakage,
                          distance_bias=cfg.distance_bias, item_dim=item_dim, head_hidden=cfg.head_hidden,
                          attention=cfg.attention)
    if cfg.dropout is not None:
        model.set_dropout(cfg.dropout)
    if cfg.lora:
        model.apply_lora(cfg.lora_rank, cfg.lora_alpha)
    return model


def save_weights(path: Path, model: FinetuneModel) -> None:
    """The trainable tensors alone, written atomically (the best epoch's weights)."""
    with atomic_path(path) as tmp:
        save_file(_trainable_tensors(model), str(tmp), metadata={"format": "pt"})


def _trainable_tensors(model: FinetuneModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.trainable_state_dict().items()}


def _config_payload(model: FinetuneModel, cfg: FinetuneConfig, item_dim: int, tensors, weights: Path):
    return {
        "finetune": config_dict(cfg),  # nested: {"backbone": {...}, ...}; read_checkpoint_config takes both
        "fingerprint": model.backbone.fingerprint.to_dict(),
        "item_dim": item_dim,
        "hidden_size": model.backbone.hidden_size,
        "trainable": sorted(tensors),
        "weights_sha256": file_sha256(weights),
    }


def _set_number(path: Path) -> int | None:
    name = path.name
    if not name.startswith(_SET_PREFIX) or not name[len(_SET_PREFIX):].isdigit():
        return None
    return int(name[len(_SET_PREFIX):])


def resume_sets(out: Path) -> list[Path]:
    """The committed resume sets of ``out``, newest first."""
    root = Path(out) / RESUME_DIR
    if not root.is_dir():
        return []
    sets = [(n, p) for p in root.iterdir() if p.is_dir() and (n := _set_number(p)) is not None]
    return [p for _, p in sorted(sets, reverse=True)]


def save_checkpoint(
    out: Path,
    model: FinetuneModel,
    cfg: FinetuneConfig,
    *,
    item_dim: int,
    trainer_state: dict[str, Any] | None = None,
    best_weights: Path | None = None,
) -> None:
    """Write ``model.safetensors`` and ``config.json`` to ``out``; with ``trainer_state``, as a resume set.

    A resume set (the weights, the config, the trainer state, ``best_weights`` if given and a
    manifest of their sha256) is written into ``resume/.tmp-*`` and committed by renaming that
    directory to ``resume/ckpt-<n+1>``; only then are the exported files replaced (hard links to the
    set's) and older sets removed. A run killed at any point leaves a complete set to resume from.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = _trainable_tensors(model)
    if trainer_state is None:
        with atomic_path(out / WEIGHTS) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt"})
        write_json(out / CONFIG, _config_payload(model, cfg, item_dim, tensors, out / WEIGHTS))
        return
    root = out / RESUME_DIR
    root.mkdir(exist_ok=True)
    for stale in root.glob(_TMP_PREFIX + "*"):  # left by a run killed while writing a set
        shutil.rmtree(stale, ignore_errors=True)
    older = resume_sets(out)
    number = (_set_number(older[0]) if older else 0) + 1
    tmp = root / f"{_TMP_PREFIX}{_SET_PREFIX}{number:06d}"
    tmp.mkdir()
    save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
    write_json(tmp / CONFIG, _config_payload(model, cfg, item_dim, tensors, tmp / WEIGHTS))
    torch.save(trainer_state, tmp / TRAINER_STATE)
    if best_weights is not None and Path(best_weights).exists():
        link_into_place(Path(best_weights), tmp / BEST_WEIGHTS)  # best_epoch is replaced, never rewritten
    names = sorted(p.name for p in tmp.iterdir())
    for name in names:
        _fsync(tmp / name)
    step = int(trainer_state.get("state", {}).get("step", -1))
    write_json(tmp / MANIFEST, {"format": RESUME_FORMAT, "step": step,
                                "files": {name: file_sha256(tmp / name) for name in names}})
    _fsync(tmp)
    committed = root / f"{_SET_PREFIX}{number:06d}"
    os.rename(tmp, committed)  # the commit: the set is complete, or absent
    _fsync(root)
    link_into_place(committed / WEIGHTS, out / WEIGHTS)
    link_into_place(committed / CONFIG, out / CONFIG)
    for old in older:
        shutil.rmtree(old, ignore_errors=True)
    (out / TRAINER_STATE).unlink(missing_ok=True)  # the loose trainer state of an older llmfeat


def verify_resume_set(path: Path) -> str | None:
    """Why the resume set at ``path`` cannot be trusted (None: its files are the ones its manifest lists)."""
    manifest = path / MANIFEST
    try:
        meta = json.loads(manifest.read_text())
        files = meta["files"]
        if not isinstance(files, dict):
            raise TypeError("'files' is not a mapping")
    except FileNotFoundError:
        return f"{manifest}: missing (an incomplete resume set)"
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        return f"{manifest}: not a resume manifest ({e})"
    for name in (WEIGHTS, CONFIG, TRAINER_STATE):
        if name not in files:
            return f"{manifest}: lists no {name} (an incomplete resume set)"
    for name, digest in files.items():
        f = path / str(name)
        if not f.is_file():
            return f"{f}: missing (an incomplete resume set)"
        if file_sha256(f) != digest:
            return f"{f} does not match its manifest: the set is incomplete or was changed by hand"
    return None


@dataclasses.dataclass
class ResumeSet:
    """A verified resume set, read without loading any model."""

    path: Path
    cfg: FinetuneConfig
    fingerprint: ModelFingerprint
    meta: dict[str, Any]
    trainer_state: dict[str, Any]


_STATE_KEYS = ("optimizer", "scheduler", "state", "rng")


def load_trainer_state(path: Path) -> dict[str, Any]:
    """A trainer state, unpickled with ``weights_only=True``: tensors and plain data, never code."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - UnpicklingError, a corrupt archive, ...: none of them is ours
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise UserError(f"cannot be loaded safely: not a trainer state llmfeat wrote ({first})", file=path,
                        option="--resume", fix="Rerun without --resume to start over, or choose a new --out.",
                        ) from None
    if not isinstance(state, dict) or any(k not in state for k in _STATE_KEYS):
        raise UserError(f"not a trainer state llmfeat wrote (expected the keys {', '.join(_STATE_KEYS)})",
                        file=path, option="--resume", fix="Rerun without --resume, or choose a new --out.")
    return state


def rng_state() -> dict[str, Any]:
    """torch's global RNG states (CPU, and every CUDA device when there is one), for the trainer state."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set torch's global RNG states back to those :func:`rng_state` saved (CUDA ones where there is CUDA)."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_resume_set(out: str | os.PathLike) -> ResumeSet | None:
    """The newest complete resume set of ``out`` (None when there is none).

    A set whose files do not match its manifest is skipped for an older complete one (with a
    warning); when none is complete, or ``out`` holds the loose trainer state of an older llmfeat
    (whose weights cannot be told to belong to it), a :class:`UserError` refuses to resume.
    """
    out = Path(out)
    sets = resume_sets(out)
    if not sets:
        if (out / TRAINER_STATE).exists():
            raise UserError(
                "written by an older llmfeat, whose checkpoint files were not committed together: "
                "cannot tell whether they belong to one step", file=out / TRAINER_STATE, option="--resume",
                fix="Rerun without --resume to start over, or choose a new --out.")
        return None
    problems = []
    for path in sets:
        problem = verify_resume_set(path)
        if problem is None:
            break
        problems.append(problem)
    else:
        raise UserError(f"{problems[0]}; no complete resume set to fall back to", option="--resume",
                        fix="Rerun without --resume to start over, or choose a new --out.")
    if problems:
        log.warning("--resume: %s; resuming from the older complete set %s", problems[0], path)
    cfg, fp, meta = read_checkpoint_config(path)
    state = load_trainer_state(path / TRAINER_STATE)
    manifest = json.loads((path / MANIFEST).read_text())
    step = state["state"].get("step") if isinstance(state["state"], dict) else None
    if manifest.get("step") != step:
        raise UserError(f"holds the trainer state of step {step}, its manifest says step {manifest.get('step')}",
                        file=path, option="--resume", fix="Rerun without --resume, or choose a new --out.")
    return ResumeSet(path, cfg, fp, meta, state)


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
