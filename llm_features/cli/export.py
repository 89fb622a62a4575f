"""``llmfeat export``: a fine-tuned checkpoint as a Hugging Face model directory (and a peft LoRA adapter)."""

from __future__ import annotations

import click

from llm_features.config import dataclass_options
from llm_features.export import ExportConfig


@click.command("export")
@dataclass_options(ExportConfig)
def command(cfg: ExportConfig) -> None:
    """Write the fine-tuned deep layers back into a Hugging Face model directory (and a peft adapter).

    The full model is the base model (save_pretrained, the tokenizer included) with the fine-tuned deep
    layers in place, LoRA merged: transformers.AutoModel.from_pretrained(OUT) loads it. A --lora
    checkpoint also gets a peft adapter (OUT/adapter; --format adapter: OUT itself) for
    peft.PeftModel.from_pretrained(AutoModel.from_pretrained(BASE), ...). llmfeat's own parts (query
    token, feedback embedding, distance bias, CTR head) are not Hugging Face modules: they are written
    next to it as llmfeat_head.safetensors, described by llmfeat_head.json.

    Example: llmfeat export --checkpoint runs/finetune --out runs/export
    """
    from llm_features.export import export

    click.echo(export(cfg).summary())
