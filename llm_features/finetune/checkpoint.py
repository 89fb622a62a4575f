"""Writing and resuming a fine-tuning run's checkpoint (``--out``; its files:
:mod:`~llm_features.finetune.checkpoint_files`).

:func:`save_checkpoint` writes ``model.safetensors`` and ``config.json`` (every
:class:`FinetuneConfig` option, the backbone's fingerprint and the sha256 of the weights, written
after them: a mixed pair is refused), and with a trainer state a *resume set* under
``resume/ckpt-NNNNNN/``: the weights, the config, the trainer state (``trainer_state.pt``: optimizer,
scheduler, data position and RNG states, tensors and plain numbers only, loaded with
``torch.load(weights_only=True)``), the best epoch's weights and a ``manifest.json`` with the sha256
of each. A set is written into a temporary directory and committed by one directory rename, so a
killed run leaves the previous set whole; ``--resume`` (:func:`load_resume_set`) verifies the
manifest and falls back to an older complete set, or refuses.

Every file is written to a temporary name and renamed into place (``model.safetensors`` and
``config.json`` are hard links to the committed resume set's files where there is one).

Using a finished checkpoint (:func:`load_finetuned`, :func:`read_checkpoint_config`, ...) lives in
:mod:`~llm_features.finetune.loading`; those names, the file names and :func:`build_model` are
re-exported here for older importers.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from llm_features.atomic import atomic_path, write_json
from llm_features.config import config_dict
from llm_features.errors import UserError
from llm_features.fingerprint import ModelFingerprint
from llm_features.finetune.checkpoint_files import (
    BEST_WEIGHTS, CONFIG, MANIFEST, METRICS, RESUME_DIR, TEST_PREDICTIONS, TRAINER_STATE, WEIGHTS, file_sha256,
)
from llm_features.finetune.config import FinetuneConfig
from llm_features.finetune.loading import (
    check_model_files, check_weights, load_finetuned, load_trainable, read_checkpoint_config,
)
from llm_features.finetune.model import FinetuneModel, build_model

log = logging.getLogger(__name__)

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


def write_predictions(path: Path, rows, labels, logits) -> None:
    """``[T]`` target rows, labels and logits to ``path`` (``.npz``), written atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, row=np.asarray(rows, np.int64), label=np.asarray(labels, np.float32),
                 logit=np.asarray(logits, np.float32))


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


__all__ = [
    "RESUME_FORMAT", "ResumeSet", "link_into_place", "load_resume_set", "load_trainer_state", "restore_rng_state",
    "resume_sets", "rng_state", "save_checkpoint", "save_weights", "verify_resume_set", "write_predictions",
    # re-exported from their homes (checkpoint_files, loading, model), for older importers
    "BEST_WEIGHTS", "CONFIG", "MANIFEST", "METRICS", "RESUME_DIR", "TEST_PREDICTIONS", "TRAINER_STATE", "WEIGHTS",
    "build_model", "check_model_files", "check_weights", "file_sha256", "load_finetuned", "load_trainable",
    "read_checkpoint_config",
]
