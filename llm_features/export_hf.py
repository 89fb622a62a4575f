"""The Hugging Face and peft side of ``llmfeat export``: the base model fresh from disk with the
fine-tuned deep layers in place, and the LoRA adapter as a ``peft.PeftModel``.

``layers[split_layer:]`` of llmfeat's :class:`~llm_features.backbone.LayerStack` are
``{prefix}.{split_layer + i}`` of the base model (``layers`` for decoders, ``encoder.layer`` for
encoders): :func:`deep_layer_state`.
"""

from __future__ import annotations

import copy
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def _load_hf(base_dir: Path, ft, *, full_architecture: bool) -> nn.Module:
    """The base model, fresh from disk, in the dtype the checkpoint was trained in.

    ``full_architecture``: the class its ``config.json`` names (keeps a task head such as an LM head),
    else ``AutoModel`` (the base model, as llmfeat loads it).
    """
    import transformers
    from transformers import AutoConfig, AutoModel, PreTrainedModel

    bb = ft.backbone
    kwargs = dict(dtype=_DTYPES[bb.dtype], trust_remote_code=bb.trust_remote_code, local_files_only=True)
    cls = AutoModel
    if full_architecture:
        archs = AutoConfig.from_pretrained(base_dir, trust_remote_code=bb.trust_remote_code,
                                           local_files_only=True).architectures or []
        named = getattr(transformers, archs[0], None) if archs else None
        if isinstance(named, type) and issubclass(named, PreTrainedModel):
            cls = named
    with _no_progress_bar():
        return cls.from_pretrained(base_dir, **kwargs).eval()


def _save_quietly(obj, directory: Path, **kwargs) -> None:
    with _no_progress_bar():
        obj.save_pretrained(directory, **kwargs)


@contextmanager
def _no_progress_bar():
    """transformers' progress bars off for the block, then as they were."""
    from transformers.utils import logging as hf_logging

    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
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


def merged_deep_state(model, base_dir: Path, ft, *, adapter_dir: Path | None,
                      merge: bool) -> tuple[dict[str, Tensor], int]:
    """(the deep layers' tensors under the base model's names, how many tensors the checkpoint replaced).

    A LoRA checkpoint's adapter is saved to ``adapter_dir`` (if any) on the way; its deep layers are
    merged as peft merges them, and only when ``merge`` (a full model is asked for).
    """
    bb = model.backbone
    prefix = _layer_prefix(bb.family)
    if not ft.lora:
        deep_state = deep_layer_state(bb.deep, bb.split_layer, prefix)
        return deep_state, len(deep_state)
    pm = lora_adapter_model(model, base_dir, ft)
    if adapter_dir is not None:
        _save_quietly(pm, adapter_dir)
    n_deep = sum(1 for n in pm.state_dict() if "lora_" in n)
    deep_state: dict[str, Tensor] = {}
    if merge:
        merged = pm.merge_and_unload()
        _, layers = _layers_of(merged, bb.family)
        for i in range(bb.split_layer, bb.num_layers):
            deep_state.update({f"{prefix}.{i}.{k}": v for k, v in layers[i].state_dict().items()})
        if bb.family == "decoder" and getattr(merged, "norm", None) is not None:
            deep_state.update({f"norm.{k}": v for k, v in merged.norm.state_dict().items()})
    return deep_state, n_deep


def write_full_model(base_dir: Path, ft, deep_state: dict[str, Tensor], full_dir: Path, tokenizer) -> str:
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


__all__ = ["deep_layer_state", "lora_adapter_model", "merged_deep_state", "write_full_model"]
