"""The LLM backbone, split in two at ``split_layer`` (BAHE).

The *shallow* stack (token embeddings + ``layers[:split_layer]``) is frozen: it encodes each distinct
atomic behaviour text once, pooled to one vector (:meth:`Backbone.encode_texts`). The *deep* stack
(``layers[split_layer:]`` + the final norm of a decoder) is trainable and runs over sequences of
those vectors, one position per behaviour.

Both stacks call the Hugging Face layer modules directly, with an explicit additive float mask
(``attn_bias``) and explicit ``position_ids``, so a caller (DTI packing) controls exactly who sees
whom and at which relative distance. Supported: decoders with RoPE (Llama, Qwen2, Mistral and other
models laid out as ``embed_tokens / layers / norm / rotary_emb``) and BERT-style encoders
(``embeddings / encoder.layer``), the default being the bundled all-MiniLM-L6-v2.

Example::

    bb = Backbone.load(BackboneConfig())                 # MiniLM, split at layer 3 of 6
    vecs = bb.encode_texts(["Toy Story (1995) | Animation, Children's, Comedy"])   # [1, 384]
    h = bb.deep(vecs[None], bb.padding_bias(torch.ones(1, 1)), torch.zeros(1, 1, dtype=torch.long))
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import LongTensor, Tensor, nn

from llm_features.attention import use_llmfeat_attention
from llm_features.errors import UserError
from llm_features.fingerprint import ModelFingerprint
from llm_features.model_dir import (
    DEFAULT_MODEL_NAME, ModelNotFoundError, check_model_dir, default_model_dir, weights_sha256,
)

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class BackboneConfig:
    model: Path | None = field(default=None, metadata={
        "help": "Local Hugging Face model directory (default: bundled all-MiniLM-L6-v2)."})
    split_layer: int | None = field(default=None, metadata={
        "help": "Layers below this index are frozen and encode behaviours (default: half of the layers).",
        "min": 0})
    pooling: Literal["mean", "last"] = field(default="mean", metadata={
        "help": "Pool a behaviour's tokens by their mean or by the last real token."})
    max_tokens: int = field(default=64, metadata={
        "help": "Truncate each behaviour text to this many tokens.", "min": 1})
    dtype: Literal["float32", "bfloat16", "float16"] = field(default="float32", metadata={
        "help": "Weight dtype."})
    trust_remote_code: bool = field(default=False, metadata={
        "help": "Allow model code from the model directory (off: only built-in architectures). Taken from "
                "the command line only, never from a --config file or a checkpoint.",
        "cli_only": True})
    attn_implementation: Literal["sdpa", "eager"] = field(default="sdpa", metadata={
        "help": "Attention kernel."})


def mask_value(dtype: torch.dtype) -> float:
    """The additive bias of a masked position: the dtype's most negative finite number.

    Not ``-inf``: a fully masked row (a padding query) then softmaxes to a uniform row instead of NaN.
    """
    return torch.finfo(dtype).min


def padding_bias(attention_mask: Tensor, *, causal: bool, dtype: torch.dtype = torch.float32) -> Tensor:
    """Additive attention bias ``[B, 1, T, T]`` from a ``[B, T]`` 0/1 mask of real positions.

    A query never attends to a padding key; with ``causal`` it also never attends to a later key.
    """
    keep = attention_mask.bool()[:, None, None, :]  # [B, 1, 1, T]
    if causal:
        t = attention_mask.shape[-1]
        tri = torch.ones(t, t, dtype=torch.bool, device=attention_mask.device).tril()
        keep = keep & tri[None, None]
    else:
        keep = keep.expand(-1, -1, attention_mask.shape[-1], -1)
    bias = torch.zeros(keep.shape, dtype=dtype, device=attention_mask.device)
    return bias.masked_fill_(~keep, mask_value(dtype))


class LayerStack(nn.Module):
    """A contiguous slice of the transformer's layers (+ the final norm if it is the top slice of a decoder).

    Args:
        layers: the Hugging Face layer modules, called directly.
        family: ``"decoder"`` (layers take RoPE ``position_embeddings``) or ``"encoder"`` (BERT layers).
        norm: the decoder's final norm, only on the top slice.
        rotary: the decoder's rotary embedding module (makes cos/sin from ``position_ids``).
    """

    def __init__(
        self,
        layers: Sequence[nn.Module],
        family: Literal["decoder", "encoder"],
        norm: nn.Module | None = None,
        rotary: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.family = family
        self.norm = norm
        # Not a registered child: the rotary module holds only non-persistent buffers and is shared by both
        # stacks; keeping it out of the module tree keeps state_dicts and parameter lists clean.
        self._rotary = [rotary] if rotary is not None else []

    def __len__(self) -> int:
        return len(self.layers)

    def forward(self, hidden: Tensor, attn_bias: Tensor, position_ids: LongTensor) -> Tensor:
        """Run the slice.

        Args:
            hidden: ``[B, L, D]`` input hidden states.
            attn_bias: ``[B, 1 or H, L, L]`` additive float bias: 0 = attend, ``finfo.min`` = masked; finite
                values (ALiBi, learned distance bias) are allowed. Or the same bias kept on its allowed
                tiles only (:class:`~llm_features.attention.TiledBias`), for block-sparse attention.
            position_ids: ``[B, L]``; rotary positions for RoPE models, ignored by absolute-position encoders.

        Returns:
            ``[B, L, D]`` hidden states.
        """
        attn_bias = attn_bias.to(dtype=hidden.dtype, device=hidden.device)  # a Tensor or a TiledBias
        kwargs: dict = {}
        if self.family == "decoder":
            position_ids = position_ids.to(hidden.device)
            kwargs["position_ids"] = position_ids
            if self._rotary:
                kwargs["position_embeddings"] = self._rotary[0](hidden, position_ids)
        for layer in self.layers:
            out = layer(hidden, attention_mask=attn_bias, **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
        if self.norm is not None:
            hidden = self.norm(hidden)
        return hidden


class Backbone(nn.Module):
    """A pretrained transformer split into a frozen shallow stack and a trainable deep stack.

    Attributes:
        tokenizer: the model's tokenizer (right padding; a decoder without pad token pads with EOS).
        hf_config: the Hugging Face config.
        family: ``"decoder"`` or ``"encoder"``.
        uses_rope: whether positions enter through rotary embeddings inside the layers.
        hidden_size, num_layers, split_layer: the model's width, depth and the split point.
        fingerprint: identifies the embedding space of :meth:`encode_texts`.
        embeddings: the token embedding module (frozen).
        shallow: ``layers[:split_layer]`` (frozen).
        deep: ``layers[split_layer:]`` + final norm (trainable).
    """

    def __init__(
        self, hf_model: nn.Module, tokenizer, cfg: BackboneConfig, model_dir: Path, model_name: str
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.hf_config = hf_model.config
        # dense masks run the chosen kernel as before; TiledBias masks run block-sparse attention
        use_llmfeat_attention(hf_model, cfg.attn_implementation)
        self.hidden_size = int(self.hf_config.hidden_size)

        if hasattr(hf_model, "embed_tokens") and hasattr(hf_model, "layers"):
            self.family: Literal["decoder", "encoder"] = "decoder"
            layers, norm = list(hf_model.layers), getattr(hf_model, "norm", None)
            rotary = getattr(hf_model, "rotary_emb", None)
            self.embeddings = hf_model.embed_tokens
        elif hasattr(hf_model, "embeddings") and hasattr(getattr(hf_model, "encoder", None), "layer"):
            self.family = "encoder"
            layers, norm, rotary = list(hf_model.encoder.layer), None, None
            self.embeddings = hf_model.embeddings
        else:
            raise UserError(
                f"unsupported architecture {type(hf_model).__name__}; expected a decoder with "
                "embed_tokens/layers/norm (Llama, Qwen2, Mistral) or a BERT-style encoder with "
                "embeddings/encoder.layer", file=model_dir, option="--model",
            )
        self.uses_rope = rotary is not None
        self.num_layers = len(layers)
        split = self.num_layers // 2 if cfg.split_layer is None else int(cfg.split_layer)
        if not 0 <= split <= self.num_layers:
            raise UserError(f"split_layer={split} is outside 0..{self.num_layers} for {model_name} "
                            f"({self.num_layers} layers)", option="--split-layer")
        self.split_layer = split
        self.shallow = LayerStack(layers[:split], self.family, rotary=rotary)
        self.deep = LayerStack(layers[split:], self.family, norm=norm, rotary=rotary)
        if rotary is not None:
            self.rotary_emb = rotary  # registered once here so .to(device) moves its buffers

        for p in list(self.embeddings.parameters()) + list(self.shallow.parameters()):
            p.requires_grad_(False)
        self.fingerprint = ModelFingerprint(
            model_name=model_name,
            weights_sha256=weights_sha256(model_dir),
            split_layer=split,
            pooling=cfg.pooling,
            max_tokens=cfg.max_tokens,
            dtype=cfg.dtype,
            hidden_size=self.hidden_size,
        )
        self.eval()

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, cfg: BackboneConfig | None = None, device: str | torch.device = "cpu") -> "Backbone":
        """Load a local model directory (offline, no hub access) and split it at ``cfg.split_layer``."""
        from transformers import AutoModel, AutoTokenizer

        from llm_features.config import validate_config

        cfg = cfg or BackboneConfig()
        validate_config(cfg)
        model_dir = Path(cfg.model) if cfg.model is not None else default_model_dir()
        model_name = str(cfg.model) if cfg.model is not None else DEFAULT_MODEL_NAME
        check_model_dir(model_dir, cfg.trust_remote_code)
        from transformers.utils import logging as hf_logging

        bar_was_on = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # a weight-loading bar per load is noise in every stage's output
        try:
            hf_model = AutoModel.from_pretrained(
                model_dir,
                dtype=_DTYPES[cfg.dtype],
                attn_implementation=cfg.attn_implementation,
                trust_remote_code=cfg.trust_remote_code,
                local_files_only=True,
            )
            tokenizer = AutoTokenizer.from_pretrained(
                model_dir, trust_remote_code=cfg.trust_remote_code, local_files_only=True
            )
        except (OSError, ValueError, KeyError, TypeError) as e:
            if isinstance(e, UserError):
                raise
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise UserError(f"cannot be loaded as a Hugging Face model ({first})", file=model_dir,
                            option="--model") from None
        finally:
            if bar_was_on:
                hf_logging.enable_progress_bar()
        tokenizer.padding_side = "right"
        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token is None:
                raise UserError("the tokenizer has neither a pad nor an eos token to pad with", file=model_dir,
                                option="--model")
            tokenizer.pad_token = tokenizer.eos_token
        return cls(hf_model, tokenizer, cfg, model_dir, model_name).to(device)

    @property
    def device(self) -> torch.device:
        return next(self.embeddings.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.embeddings.parameters()).dtype

    def train(self, mode: bool = True) -> "Backbone":
        """Only the deep stack ever trains; the frozen part stays in eval mode (no dropout)."""
        super().train(mode)
        self.embeddings.eval()
        self.shallow.eval()
        return self

    # ------------------------------------------------------------------ pieces
    def embed(self, input_ids: LongTensor, position_ids: LongTensor | None = None) -> Tensor:
        """``[B, T]`` token ids to ``[B, T, D]`` token embeddings.

        BERT: word + absolute position + token type + LayerNorm; decoder: ``embed_tokens``.
        """
        if self.family == "encoder":
            return self.embeddings(input_ids=input_ids, position_ids=position_ids)
        return self.embeddings(input_ids)

    def padding_bias(self, attention_mask: Tensor) -> Tensor:
        """``[B, T]`` 0/1 mask to the ``[B, 1, T, T]`` additive bias.

        Padded keys are masked; decoders are also causal.
        """
        return padding_bias(attention_mask, causal=self.family == "decoder", dtype=self.dtype)

    def default_position_ids(self, attention_mask: Tensor) -> LongTensor:
        """``[B, T]`` positions 0..T-1 (right padding, so real tokens are numbered from 0)."""
        b, t = attention_mask.shape
        return torch.arange(t, device=attention_mask.device).expand(b, t)

    def shallow_hidden(self, input_ids: LongTensor, attention_mask: Tensor) -> Tensor:
        """``[B, T]`` ids + mask to the ``[B, T, D]`` output of the frozen shallow stack."""
        pos = self.default_position_ids(attention_mask)
        return self.shallow(self.embed(input_ids, pos), self.padding_bias(attention_mask), pos)

    def pool(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        """``[B, T, D]`` to ``[B, D]`` (float32): mean over real tokens, or the last real token."""
        hidden = hidden.float()
        mask = attention_mask.to(hidden.device)
        if self.cfg.pooling == "last":
            last = mask.long().sum(1).clamp(min=1) - 1
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        m = mask.to(hidden.dtype)[..., None]
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)

    # ------------------------------------------------------------------ encoding
    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids per text (special tokens added, truncated to ``max_tokens``), unpadded."""
        enc = self.tokenizer(
            list(texts), add_special_tokens=True, truncation=True, max_length=self.cfg.max_tokens,
            padding=False,
        )
        return enc["input_ids"]

    def collate(self, ids: Sequence[Sequence[int]]) -> tuple[LongTensor, Tensor]:
        """Right-pad token id lists to ``[B, T]`` ids and a 0/1 attention mask."""
        t = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), t), int(self.tokenizer.pad_token_id), dtype=torch.long)
        mask = torch.zeros((len(ids), t), dtype=torch.long)
        for i, x in enumerate(ids):
            input_ids[i, : len(x)] = torch.as_tensor(x, dtype=torch.long)
            mask[i, : len(x)] = 1
        return input_ids.to(self.device), mask.to(self.device)

    def encode_texts(
        self,
        texts: Sequence[str],
        batch_size: int = 64,
        *,
        sort_by_length: bool = True,
        on_batch: Callable[[int, int, int], None] | None = None,
    ) -> Tensor:
        """Pooled shallow-stack vectors ``[N, D]`` (float32, CPU), in the order of ``texts``.

        Texts are batched by token length (``sort_by_length``) so batches carry little padding.
        ``on_batch(n_texts, real_tokens, padded_tokens)`` is called after every batch (progress, stats).
        """
        if len(texts) == 0:
            return torch.zeros((0, self.hidden_size), dtype=torch.float32)
        ids = self.tokenize(texts)
        order = list(range(len(ids)))
        if sort_by_length:
            order.sort(key=lambda i: len(ids[i]))
        # Allocated outside inference mode, so callers may feed the result to autograd (deep-stack training).
        out = torch.empty((len(ids), self.hidden_size), dtype=torch.float32)
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                input_ids, mask = self.collate([ids[i] for i in idx])
                out[torch.as_tensor(idx)] = self.pool(self.shallow_hidden(input_ids, mask), mask).cpu()
                if on_batch is not None:
                    on_batch(len(idx), int(mask.sum()), mask.numel())
        return out


def configure_threads(num_threads: int | None = None) -> int:
    """``num_threads`` if given, else the cores other work leaves free (:mod:`llm_features.threads`)."""
    from llm_features.threads import configure_threads as _configure

    return _configure(num_threads)


__all__ = [
    "Backbone", "BackboneConfig", "LayerStack", "configure_threads", "mask_value", "padding_bias",
    # re-exported from their home (model_dir), for older importers
    "DEFAULT_MODEL_NAME", "ModelNotFoundError", "check_model_dir", "default_model_dir", "weights_sha256",
]
