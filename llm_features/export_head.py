"""llmfeat's own tensors next to an exported model: ``llmfeat_head.safetensors`` and ``llmfeat_head.json``.

They are not Hugging Face modules: ``query`` (``Q``), ``feedback.weight`` (``F``), the distance bias
and the CTR head ``head.*`` (see :mod:`llm_features.export`). :func:`head_metadata` says what each
tensor is and every option needed to use them, including how to compute the user state ``u``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

HEAD_WEIGHTS = "llmfeat_head.safetensors"
HEAD_META = "llmfeat_head.json"
EXPORT_FORMAT_VERSION = 1


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
    from llm_features.finetune.checkpoint_files import WEIGHTS, file_sha256
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
        "dtype": ft.backbone.dtype,
        "pooling": ft.backbone.pooling,
        "max_tokens": ft.backbone.max_tokens,
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


__all__ = ["EXPORT_FORMAT_VERSION", "HEAD_META", "HEAD_WEIGHTS", "USER_STATE_RECIPE", "head_metadata",
           "head_tensors"]
