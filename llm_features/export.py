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

Example::

    report = export(ExportConfig(checkpoint=Path("runs/finetune"), out=Path("runs/export")))
    model = transformers.AutoModel.from_pretrained("runs/export")
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from llm_features.errors import UserError

log = logging.getLogger(__name__)

HEAD_WEIGHTS = "llmfeat_head.safetensors"
HEAD_META = "llmfeat_head.json"
ADAPTER_DIR = "adapter"
EXPORT_FORMAT_VERSION = 1
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

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
    from llm_features.backbone import default_model_dir
    from llm_features.finetune.checkpoint import CONFIG, WEIGHTS, read_checkpoint_config

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

    base_dir = Path(ft.model) if ft.model is not None else default_model_dir()
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


# ---------------------------------------------------------------------------------------------------- pieces
def _layer_prefix(family: str) -> str:
    """The state-dict prefix of a Hugging Face base model's layer list (``decoder`` or ``encoder`` family)."""
    return "layers" if family == "decoder" else "encoder.layer"


def _layers_of(base: nn.Module, family: str) -> tuple[str, nn.ModuleList]:
    """(state-dict prefix, layer list) of a Hugging Face base model, laid out as :class:`Backbone` expects."""
    return _layer_prefix(family), (base.layers if family == "decoder" else base.encoder.layer)


def deep_layer_state(deep: nn.Module, split: int, prefix: str) -> dict[str, Tensor]:
    """The deep stack's tensors under the Hugging Face base model's own names.

    ``layers.{i}.*`` of the :class:`~llm_features.backbone.LayerStack` is ``{prefix}.{split + i}.*`` of
    the base model; ``norm.*`` (a decoder's final norm) keeps its name.
    """
    out = {}
    for name, value in deep.state_dict().items():
        head, _, rest = name.partition(".")
        if head == "layers":
            i, _, rest = rest.partition(".")
            out[f"{prefix}.{split + int(i)}.{rest}"] = value
        elif head == "norm":
            out[name] = value
        else:  # pragma: no cover - LayerStack holds layers and norm only
            raise ValueError(f"unexpected deep-stack tensor {name}")
    return out


def head_tensors(model) -> dict[str, Tensor]:
    """llmfeat's own tensors (not part of any Hugging Face module), under their FinetuneModel names."""
    out = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()
           if not k.startswith("backbone.")}
    bias = model.distance_bias
    if bias is not None and bias.kind == "alibi":  # a fixed, non-persistent buffer: written out all the same
        out["distance_bias.slopes"] = bias.slopes.detach().cpu().clone()
    return out


_ROLES = {
    "query": "Q: the input vector of every query token; its deep-layer output is the user state u.",
    "feedback.weight": "F: feedback embedding, added to each behaviour vector: c_i = e_i + F[f_i]. Row 0/1 = "
                       "label disliked/liked, row 2 + r = rating r (rounded, clipped to 0..10).",
    "distance_bias.table": "Learned attention-score bias b[min(d, max_distance), head], added to every "
                           "allowed score of the deep layers; d = slot(query) - slot(key) >= 0 in "
                           "interactions.",
    "distance_bias.slopes": "ALiBi slopes s[head]: attention-score bias -s[head] * d of the deep layers.",
    "head.item_proj.weight": "CTR head: v' = item_proj(v) (present only when the item width differs from D).",
    "head.item_proj.bias": "CTR head: v' = item_proj(v) (present only when the item width differs from D).",
    "head.mlp.0.weight": "CTR head: logit = mlp.2(gelu(mlp.0(concat[u, v', u * v']))).",
    "head.mlp.0.bias": "CTR head, first layer bias.",
    "head.mlp.2.weight": "CTR head, output layer.",
    "head.mlp.2.bias": "CTR head, output layer bias.",
}

USER_STATE_RECIPE = (
    "Behaviour level, the state of a user just before time T: take the user's last n = context_size "
    "interactions strictly before T, oldest first. (1) Behaviour vectors e_i: run the exported model over "
    "each behaviour text (its tokenizer, max_tokens, right padding) and pool hidden_states[split_layer] over "
    "the real tokens (pooling: mean, or the last real token). (2) Inputs x = [e_i + F[f_i] for each "
    "behaviour] + [Q]. (3) Additive mask, 0 where allowed and finfo.min elsewhere: every token sees itself; "
    "the query sees every behaviour; behaviour i sees behaviour h iff h's timestamp is strictly earlier than "
    "i's (leakage "
    "windowed/block), or nothing else (isolated). Add the distance bias (per head, d = slot(row) - "
    "slot(key), slots 0..L-1 with the query last) where allowed. (4) Run layers[split_layer:] of the model "
    "directly on x with that mask (decoders: position_ids = slots and the model's rotary_emb), then a "
    "decoder's final norm. u is the output at the query token; the CTR logit is head(u, item vector). The "
    "llmfeat's docs/export.md has this as code."
)


def head_metadata(model, ft, fp, meta: dict[str, Any], ckpt: Path, base_dir: Path, architecture: str,
                  tensors: dict[str, Tensor], full: str | None, adapter: str | None) -> dict[str, Any]:
    """The ``llmfeat_head.json`` payload: what the extra tensors are and every option needed to use them."""
    from llm_features.finetune.checkpoint import WEIGHTS, file_sha256
    from llm_features.finetune.packing import NUM_FEEDBACK

    bb = model.backbone
    bias = model.distance_bias
    return {
        "format": "llmfeat-export",
        "version": EXPORT_FORMAT_VERSION,
        "checkpoint": str(ckpt.resolve()),
        "checkpoint_weights_sha256": file_sha256(ckpt / WEIGHTS),
        "base_model": str(base_dir.resolve()),
        "fingerprint": fp.to_dict(),
        "exported": {"full_model": full, "peft_adapter": adapter},
        "architecture": architecture,
        "family": bb.family,
        "uses_rope": bb.uses_rope,
        "hidden_size": bb.hidden_size,
        "num_attention_heads": int(bb.hf_config.num_attention_heads),
        "num_layers": bb.num_layers,
        "split_layer": bb.split_layer,
        "deep_layers": list(range(bb.split_layer, bb.num_layers)),
        "dtype": ft.dtype,
        "pooling": ft.pooling,
        "max_tokens": ft.max_tokens,
        "granularity": ft.granularity,
        "context_size": ft.context_size,
        "leakage": ft.leakage,
        "feedback": {"mode": ft.feedback, "num_feedback": NUM_FEEDBACK,
                     "index": "0 = disliked, 1 = liked (label); 2 + r = rating r rounded, 0..10"},
        "distance_bias": None if bias is None else {"kind": bias.kind, "max_distance": bias.max_distance},
        "head": {"item_dim": int(meta["item_dim"]), "hidden": ft.head_hidden, "activation": "gelu",
                 "input": "concat[u, v', u * v'], v' = item_proj(v) or v"},
        "lora": {"rank": ft.lora_rank, "alpha": ft.lora_alpha} if ft.lora else None,
        "tensors": {name: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
                           "role": _ROLES.get(name, "")} for name, t in sorted(tensors.items())},
        "not_in_hf_model": sorted(tensors),
        "user_state": USER_STATE_RECIPE if ft.granularity == "behavior" else (
            "Token level: the user state runs every layer over the packed behaviour texts (feedback written "
            "as words) followed by the query token Q, under llmfeat's mask; see "
            "llm_features.finetune.packing.TokenPacker. The behaviour-level recipe of docs/export.md does "
            "not apply."),
    }


def _load_hf(base_dir: Path, ft, *, full_architecture: bool) -> nn.Module:
    """The base model, fresh from disk, in the dtype the checkpoint was trained in.

    ``full_architecture``: the class its ``config.json`` names (keeps a task head such as an LM head),
    else ``AutoModel`` (the base model, as llmfeat loads it).
    """
    import transformers
    from transformers import AutoConfig, AutoModel, PreTrainedModel

    kwargs = dict(dtype=_DTYPES[ft.dtype], trust_remote_code=ft.trust_remote_code, local_files_only=True)
    cls = AutoModel
    if full_architecture:
        archs = AutoConfig.from_pretrained(base_dir, trust_remote_code=ft.trust_remote_code,
                                           local_files_only=True).architectures or []
        named = getattr(transformers, archs[0], None) if archs else None
        if isinstance(named, type) and issubclass(named, PreTrainedModel):
            cls = named
    from transformers.utils import logging as hf_logging

    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return cls.from_pretrained(base_dir, **kwargs).eval()
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()


def _save_quietly(obj, directory: Path, **kwargs) -> None:
    from transformers.utils import logging as hf_logging

    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        obj.save_pretrained(directory, **kwargs)
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()


def lora_adapter_model(model, base_dir: Path, ft) -> nn.Module:
    """A ``peft.PeftModel`` over a fresh ``AutoModel`` of ``base_dir`` holding the checkpoint's LoRA weights.

    The adapter config is the one training injected into the deep stack, restricted to the deep layers
    (``layers_to_transform``) of the whole model.
    """
    from peft import get_peft_model

    bb = model.backbone
    prefix = _layer_prefix(bb.family)
    trained = {k.removeprefix("backbone.deep."): v for k, v in model.trainable_state_dict().items()
               if k.startswith("backbone.deep.")}
    peft_cfg = copy.deepcopy(bb.deep.peft_config["default"])
    peft_cfg.layers_to_transform = list(range(bb.split_layer, bb.num_layers))
    peft_cfg.layers_pattern = prefix.rsplit(".", 1)[-1]
    peft_cfg.base_model_name_or_path = str(base_dir.resolve())
    peft_cfg.inference_mode = True
    with warnings.catch_warnings():  # peft 0.21 calls a transformers 5 deprecated property; nothing to act on
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        pm = get_peft_model(_load_hf(base_dir, ft, full_architecture=False), peft_cfg)
    params = dict(pm.named_parameters())
    mapped = {}
    for name, value in trained.items():  # layers.{i}.<module>.lora_A.default.weight
        _, i, rest = name.split(".", 2)
        mapped[f"base_model.model.{prefix}.{bb.split_layer + int(i)}.{rest}"] = value
    lora_params = {n for n in params if "lora_" in n}
    if set(mapped) != lora_params:
        raise RuntimeError(  # a bug (or a peft that names things differently), never bad input
            f"LoRA tensors do not line up: checkpoint-only {sorted(set(mapped) - lora_params)[:3]}, "
            f"adapter-only {sorted(lora_params - set(mapped))[:3]}"
        )
    with torch.no_grad():
        for name, value in mapped.items():
            params[name].copy_(value)
    return pm.eval()


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
        deep_state, n_deep = _deep_state(model, base_dir, ft, staged)
        architecture = "PeftModel(AutoModel)"
        if staged.full_dir is not None:
            architecture = _write_full_model(base_dir, ft, deep_state, staged.full_dir,
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
    from llm_features.finetune.checkpoint import load_finetuned

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


def _deep_state(model, base_dir: Path, ft, staged: _Layout) -> tuple[dict[str, Tensor], int]:
    """(the deep layers' tensors under the base model's names, how many tensors the checkpoint replaced).

    A LoRA checkpoint's adapter is saved to ``staged.adapter_dir`` (if any) on the way; its deep layers
    are merged as peft merges them, and only when a full model is asked for.
    """
    bb = model.backbone
    prefix = _layer_prefix(bb.family)
    if not ft.lora:
        deep_state = deep_layer_state(bb.deep, bb.split_layer, prefix)
        return deep_state, len(deep_state)
    pm = lora_adapter_model(model, base_dir, ft)
    if staged.adapter_dir is not None:
        _save_quietly(pm, staged.adapter_dir)
    n_deep = sum(1 for n in pm.state_dict() if "lora_" in n)
    deep_state: dict[str, Tensor] = {}
    if staged.full_dir is not None:
        merged = pm.merge_and_unload()
        _, layers = _layers_of(merged, bb.family)
        for i in range(bb.split_layer, bb.num_layers):
            deep_state.update({f"{prefix}.{i}.{k}": v for k, v in layers[i].state_dict().items()})
        if bb.family == "decoder" and getattr(merged, "norm", None) is not None:
            deep_state.update({f"norm.{k}": v for k, v in merged.norm.state_dict().items()})
    return deep_state, n_deep


def _write_full_model(base_dir: Path, ft, deep_state: dict[str, Tensor], full_dir: Path, tokenizer) -> str:
    """Save the base model (its config's architecture) with ``deep_state`` in place, and the tokenizer.

    Returns the architecture's class name.
    """
    hf = _load_hf(base_dir, ft, full_architecture=True)
    missing, unexpected = hf.base_model.load_state_dict(deep_state, strict=False)
    if unexpected:
        raise RuntimeError(f"deep-layer tensors the base model does not have: {unexpected[:3]}")
    not_loaded = sorted(set(deep_state) & set(missing))
    if not_loaded:
        raise RuntimeError(f"deep-layer tensors not loaded: {not_loaded[:3]}")
    _save_quietly(hf, full_dir)
    tokenizer.save_pretrained(full_dir)
    return type(hf).__name__


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
