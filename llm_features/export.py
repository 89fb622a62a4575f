"""``llmfeat export``: a fine-tuned checkpoint back out as a plain Hugging Face model (and peft adapter).

A checkpoint of ``llmfeat finetune`` holds only what training changed, keyed by llmfeat's own module
names. :func:`export` writes it back into the formats the rest of the ecosystem reads:

- **the full model** (``--format full``): ``save_pretrained`` of the base model (the class its
  ``config.json`` names, e.g. ``LlamaForCausalLM``, with its task head if it has one) with the
  fine-tuned deep layers ``layers[split_layer:]`` (+ a decoder's final norm) in place, LoRA adapters
  merged, plus the tokenizer exactly as llmfeat used it (right padding, a pad token). Plain
  ``transformers.AutoModel.from_pretrained(OUT)`` loads it, no key remapping, no llmfeat.
- **a peft LoRA adapter** (``--format adapter``, checkpoints trained with ``--lora``):
  ``adapter_config.json`` + ``adapter_model.safetensors`` for the base model as llmfeat loads it
  (``AutoModel.from_pretrained(<base model dir>)``): ``peft.PeftModel.from_pretrained(base, OUT)``
  loads it and ``merge_and_unload()`` gives the full model's weights. The adapter targets the
  linear layers of the deep layers only (``layers_to_transform``).
- ``--format both`` (the default for a LoRA checkpoint): the full model in ``OUT`` and the adapter
  in ``OUT/adapter``; ``auto`` is ``both`` for LoRA checkpoints and ``full`` otherwise.

**Not** in the Hugging Face model: llmfeat's own parts, which are not Hugging Face modules. They go
next to it (in ``OUT``, and with ``--format adapter`` next to the adapter) as

- ``llmfeat_head.safetensors``: ``query`` (``Q``, the query token's input vector ``[D]``),
  ``feedback.weight`` (``F``, ``[13, D]``, behaviour level only), ``distance_bias.table``
  (``[max_distance + 1, H]``, learned bias) or ``distance_bias.slopes`` (``[H]``, ALiBi), and the
  CTR head ``head.*`` (``H(u, v)``);
- ``llmfeat_head.json``: what each tensor is, and every option needed to use them (split layer,
  ``n``, leakage, pooling, feedback vocabulary, distance-bias kind, head layout, the backbone
  fingerprint, the checkpoint it came from).

The user state ``u`` of llmfeat is *not* a standard forward pass: it is the output of the deep
layers alone over a sequence of behaviour vectors (``e_i + F[f_i]``, then ``Q``) under llmfeat's
attention mask and distance bias. A transformers-only reproduction therefore needs those extra
tensors; docs/export.md ("Your model, out again") gives the ~40 lines that compute ``u`` with
``transformers`` + ``safetensors`` alone (behaviour level; the test suite runs them and compares
with :meth:`FinetuneModel.user_states`).

This module is the command; the Hugging Face and peft side lives in :mod:`llm_features.export_hf`,
llmfeat's own tensors and their description in :mod:`llm_features.export_head`.

Example::

    report = export(ExportConfig(checkpoint=Path("runs/finetune"), out=Path("runs/export")))
    model = transformers.AutoModel.from_pretrained("runs/export")
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from safetensors.torch import save_file

from llm_features.errors import UserError
from llm_features.export_head import (  # noqa: F401  (EXPORT_FORMAT_VERSION: re-exported)
    EXPORT_FORMAT_VERSION,
    HEAD_META,
    HEAD_WEIGHTS,
    head_metadata,
    head_tensors,
)
from llm_features.export_hf import deep_layer_state, lora_adapter_model, merged_deep_state, write_full_model

log = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"

Format = Literal["auto", "full", "adapter", "both"]


@dataclass
class ExportConfig:
    """Write a fine-tuned checkpoint as a Hugging Face model directory (and a peft adapter for LoRA)."""

    checkpoint: Path | None = field(default=None, metadata={
        "help": "Checkpoint directory written by `llmfeat finetune --out` (default: <data_dir>/runs/finetune "
                "with the data dir of $LLMFEAT_DATA_DIR or feast_repo/data, finetune's default)."})
    out: Path | None = field(default=None, metadata={
        "help": "Directory to write (required; must be empty or absent unless --overwrite)."})
    format: Format = field(default="auto", metadata={
        "help": "full: the base model with the fine-tuned deep layers in place (LoRA merged); adapter: a "
                "peft LoRA adapter directory (--lora checkpoints); both: the full model in --out and the "
                "adapter in --out/adapter; auto: both for --lora checkpoints, else full."})
    overwrite: bool = field(default=False, metadata={
        "help": "Replace a non-empty --out (its old contents are deleted)."})

    def __post_init__(self) -> None:
        if self.checkpoint is None:
            from llm_features.workspace import runs_dir

            self.checkpoint = runs_dir() / "finetune"


@dataclass
class ExportReport:
    out: Path
    full_model: Path | None
    adapter: Path | None
    architecture: str
    deep_tensors: int
    """Deep-layer tensors of the Hugging Face model the checkpoint replaced (LoRA: the adapter's tensors)."""
    lora: bool
    head_tensors: list[str]

    def summary(self) -> str:
        parts = []
        if self.full_model is not None:
            what = (f"{self.deep_tensors} LoRA tensors merged" if self.lora
                    else f"{self.deep_tensors} deep-layer tensors fine-tuned")
            parts.append(f"full model ({self.architecture}, {what}) in {self.full_model}")
        if self.adapter is not None:
            parts.append(f"peft LoRA adapter in {self.adapter}")
        own = ", ".join(self.head_tensors)
        return (f"exported {' and '.join(parts)}; llmfeat's own tensors ({own}) in {HEAD_WEIGHTS} + "
                f"{HEAD_META}")


# ---------------------------------------------------------------------------------------------------- checks
def _is_within(inner: Path, outer: Path) -> bool:
    """Whether ``inner`` is ``outer`` or lies below it (both resolved)."""
    return inner == outer or outer in inner.parents


def _check_inputs(cfg: ExportConfig) -> tuple[Path, Path, Path, Any, Any, dict[str, Any]]:
    """Every bad-input check, before anything is written.

    Returns (checkpoint, out, base model directory, finetune config, fingerprint, checkpoint metadata).
    """
    from llm_features.model_dir import default_model_dir
    from llm_features.finetune.checkpoint_files import CONFIG, WEIGHTS
    from llm_features.finetune.loading import read_checkpoint_config

    from llm_features.config import validate_config

    validate_config(cfg)  # the Python API gets the command line's type and choice checks
    if cfg.out is None:
        raise UserError("missing: the directory to write the export to", option="--out",
                        fix="Pass --out DIR (an empty or new directory).")
    ckpt = Path(cfg.checkpoint)
    if not ckpt.exists():
        raise UserError("does not exist", file=ckpt, option="--checkpoint",
                        fix="Give the --out directory of an `llmfeat finetune` run.")
    if not ckpt.is_dir():
        raise UserError("is not a directory", file=ckpt, option="--checkpoint",
                        fix="Give the --out directory of an `llmfeat finetune` run.")
    for name in (CONFIG, WEIGHTS):
        if not (ckpt / name).is_file():
            raise UserError(f"is not a finetune checkpoint: it has no {name}", file=ckpt,
                            option="--checkpoint",
                            fix="Give the --out directory of a finished `llmfeat finetune` run.")
    try:
        ft, fp, meta = read_checkpoint_config(ckpt)
    except UserError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as e:  # json errors are ValueErrors
        raise UserError(f"unreadable checkpoint config ({type(e).__name__}: {e})", file=ckpt / CONFIG,
                        option="--checkpoint") from None

    fmt = cfg.format
    if fmt in ("adapter", "both") and not ft.lora:
        raise UserError(f"--format {fmt}: {ckpt} was trained without --lora, so it has no LoRA adapter to "
                        "export", option="--format", fix="Use --format full (the default for it).")

    base_dir = Path(ft.backbone.model) if ft.backbone.model is not None else default_model_dir()
    if not base_dir.is_dir():
        raise UserError(f"the checkpoint's base model directory {base_dir} does not exist", file=ckpt,
                        option="--checkpoint",
                        fix="The export starts from the base model the checkpoint was trained on; "
                            "restore it there.")

    out = Path(cfg.out)
    resolved = out.resolve()
    for what, path in (("the checkpoint", ckpt), ("the base model", base_dir)):
        if _is_within(path.resolve(), resolved):
            raise UserError(f"would replace {what} ({path})", file=out, option="--out",
                            fix="Choose a directory outside it.")
    if out.exists() and not out.is_dir():
        raise UserError("exists and is not a directory", file=out, option="--out",
                        fix="Choose a new directory.")
    if out.is_dir() and any(out.iterdir()) and not cfg.overwrite:
        raise UserError("is not empty", file=out, option="--out",
                        fix="Pass --overwrite to replace its contents, or choose another directory.")
    return ckpt, out, base_dir, ft, fp, meta


# ---------------------------------------------------------------------------------------------------- export
def export(cfg: ExportConfig) -> ExportReport:
    """Write ``cfg.checkpoint`` to ``cfg.out`` as a Hugging Face model and/or a peft adapter (see module doc).

    Everything is written to a temporary sibling of ``cfg.out`` first and renamed into place, so a
    failed export leaves ``cfg.out`` as it was.

    Raises:
        UserError: a missing or unreadable checkpoint, a missing base model, ``--format adapter`` for a
            checkpoint without LoRA, or an ``--out`` that is not empty (without ``overwrite``).
    """
    ckpt, out, base_dir, ft, fp, meta = _check_inputs(cfg)
    fmt = cfg.format if cfg.format != "auto" else ("both" if ft.lora else "full")
    model, ft = _load_checkpoint(ckpt)
    tmp, umask = _staging_dir(out)
    try:
        staged = _Layout(tmp, fmt)
        deep_state, n_deep = merged_deep_state(model, base_dir, ft, adapter_dir=staged.adapter_dir,
                                               merge=staged.full_dir is not None)
        architecture = "PeftModel(AutoModel)"
        if staged.full_dir is not None:
            architecture = write_full_model(base_dir, ft, deep_state, staged.full_dir,
                                             model.backbone.tokenizer)
        if staged.adapter_dir is not None and staged.adapter_dir != staged.full_dir:
            model.backbone.tokenizer.save_pretrained(staged.adapter_dir)
        tensors = head_tensors(model)
        payload = head_metadata(model, ft, fp, meta, ckpt, base_dir, architecture, tensors,
                                *staged.relative())
        for d in staged.dirs():
            save_file(tensors, str(d / HEAD_WEIGHTS), metadata={"format": "pt"})
            (d / HEAD_META).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
        for f in tmp.rglob("*"):  # some writers (safetensors) leave their files private; the export is not
            f.chmod((0o777 if f.is_dir() else 0o666) & ~umask)
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    done = _Layout(out, fmt)
    report = ExportReport(out=out, full_model=done.full_dir, adapter=done.adapter_dir,
                          architecture=architecture, deep_tensors=n_deep, lora=bool(ft.lora),
                          head_tensors=sorted(tensors))
    log.debug("%s", report.summary())
    return report


@dataclass(frozen=True)
class _Layout:
    """Where each part of an export in format ``fmt`` (full, adapter or both) lies below ``root``."""

    root: Path
    fmt: str

    @property
    def full_dir(self) -> Path | None:
        return self.root if self.fmt in ("full", "both") else None

    @property
    def adapter_dir(self) -> Path | None:
        if self.fmt == "both":
            return self.root / ADAPTER_DIR
        return self.root if self.fmt == "adapter" else None

    def relative(self) -> tuple[str | None, str | None]:
        """(full model, adapter) relative to ``root``, as ``llmfeat_head.json`` records them."""
        full = "." if self.full_dir is not None else None
        if self.adapter_dir is None:
            return full, None
        return full, ("." if self.adapter_dir == self.root else ADAPTER_DIR)

    def dirs(self) -> set[Path]:
        """The directories that get llmfeat's own tensors (next to the full model and the adapter)."""
        return {p for p in (self.full_dir, self.adapter_dir) if p is not None}


def _load_checkpoint(ckpt: Path):
    """(model, FinetuneConfig) of ``ckpt`` on the CPU; a :class:`UserError` when it cannot be loaded."""
    from llm_features.finetune.loading import load_finetuned

    try:
        return load_finetuned(ckpt, device="cpu")
    except UserError:
        raise
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot load the checkpoint ({type(e).__name__}: {e})", file=ckpt,
                        option="--checkpoint") from None


def _staging_dir(out: Path) -> tuple[Path, int]:
    """A new temporary sibling of ``out`` with an ordinary directory's permissions, and the umask."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the export is an ordinary directory
    return tmp, umask


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` to ``out``; an existing ``out`` (empty, or ``overwrite``) goes last."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


__all__ = ["ExportConfig", "ExportReport", "HEAD_META", "HEAD_WEIGHTS", "deep_layer_state", "export",
           "head_tensors", "lora_adapter_model"]
