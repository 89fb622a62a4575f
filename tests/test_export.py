"""llmfeat export: the checkpoint back out as a plain Hugging Face model (and a peft adapter).

The exported model is loaded with plain ``transformers`` (and ``peft``) only, and docs/export.md's
transformers-only recipe (extracted from docs/export.md and run as is) must reproduce
``FinetuneModel.user_states`` and the CTR logits of the checkpoint to 1e-5: for an encoder (learned
distance bias; ALiBi with ``isolated`` leakage, ``last`` pooling and an item projection), a decoder
(RoPE), full fine-tuning and LoRA (merged, and unmerged through ``PeftModel``).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from bad_input import run_bad
from click.testing import CliRunner
from safetensors.torch import load_file

from llm_features.backbone import Backbone
from llm_features.config import config_from_options
from llm_features.cli import main
from llm_features.errors import UserError
from llm_features.export import HEAD_META, HEAD_WEIGHTS, ExportConfig, export
from llm_features.finetune import FinetuneConfig, load_finetuned
from llm_features.finetune.checkpoint import build_model, save_checkpoint
from llm_features.finetune.packing import BehaviorPacker, UserHistories, make_blocks

EXPORT_DOC = Path(__file__).resolve().parents[1] / "docs" / "export.md"
TEXTS = [f"movie {i} ({1990 + i}) | genre {'abc'[i % 3]}" + " more" * i for i in range(9)]  # lengths differ
N = 4

# name -> (tiny model, FinetuneConfig options, item width)
CASES = {
    "bert": ("bert", {}, 32),
    "bert-alibi-isolated-last": ("bert", {"distance_bias": "alibi", "leakage": "isolated", "pooling": "last"},
                                 16),
    "llama": ("llama", {}, 32),
    "llama-lora": ("llama", {"lora": True}, 32),
    "bert-lora": ("bert", {"lora": True, "lora_rank": 4}, 32),
}


# --------------------------------------------------------------------------------------------------- helpers
def doc_recipe() -> dict:
    """docs/export.md's transformers-only code block, executed: load_export, user_state, ctr_logit."""
    text = EXPORT_DOC.read_text()
    block = text.split("<!-- export-recipe:start -->", 1)[1].split("<!-- export-recipe:end -->", 1)[0]
    code = re.search(r"```python\n(.*?)```", block, re.S).group(1)
    assert "llm_features" not in code  # plain transformers + safetensors + torch, nothing of ours
    namespace: dict = {}
    exec(compile(code, str(EXPORT_DOC), "exec"), namespace)
    return namespace


def make_checkpoint(out: Path, model_dir: Path, item_dim: int, seed: int = 0, **options) -> Path:
    """A checkpoint whose every trained tensor differs visibly from the base model's (and from zero)."""
    # the backbone's options (pooling) among ``options``
    cfg = config_from_options(FinetuneConfig, model=model_dir, split_layer=2, context_size=N, head_hidden=8,
                              out=out, **options)
    bb = Backbone.load(cfg.backbone)  # fresh: build_model changes the deep stack in place
    torch.manual_seed(seed)
    model = build_model(cfg, bb, item_dim)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:  # lora_B starts at zero; the deep layers at the base weights
                scale = 0.05 if "lora_" in name else 0.3 if name.startswith("backbone.") else 1.0
                p.add_(torch.randn_like(p) * scale)
    save_checkpoint(out, model, cfg, item_dim=item_dim)
    return out


def history(seed: int) -> tuple[list[int], list[int], list[int]]:
    """(behaviour, feedback id, time) of one user, time-sorted, with equal timestamps."""
    rng = np.random.default_rng(seed)
    m = 9
    times = np.cumsum(rng.choice([0, 1, 1, 2], size=m)).tolist()
    return rng.integers(0, len(TEXTS), m).tolist(), rng.integers(0, 13, m).tolist(), times


@torch.inference_mode()
def llmfeat_states(model, behaviors, feedback, times, item_table):
    """user_states and logits of every target with a strictly earlier interaction (sliding window)."""
    m = len(behaviors)
    vectors = model.backbone.encode_texts(TEXTS)
    hist = UserHistories.from_arrays(np.zeros(m), np.array(times), np.array(behaviors), np.array(behaviors),
                                     np.zeros(m), np.array(feedback))
    targets = np.array(times) > times[0]
    batch = BehaviorPacker(hist, vectors, item_table)(make_blocks(hist, targets, 1, model.context_size))
    return batch.target_rows.numpy(), model.user_states(batch), model(batch), batch.item_vectors


def check_recipe(recipe, loaded, ckpt_model, item_table) -> None:
    """The docs/export.md recipe over ``loaded`` reproduces the checkpoint's user states and logits (a few users)."""
    model, tok, meta, extra = loaded
    checked = 0
    for seed in range(3):
        behaviors, feedback, times = history(seed)
        rows, states, logits, items = llmfeat_states(ckpt_model, behaviors, feedback, times, item_table)
        for j, row in enumerate(rows):
            before = [i for i in range(len(times)) if times[i] < times[row]]
            u = recipe["user_state"](model, tok, meta, extra, [TEXTS[behaviors[i]] for i in before],
                                     [feedback[i] for i in before], [times[i] for i in before])
            torch.testing.assert_close(u, states[j], atol=1e-5, rtol=1e-5)
            # logits reach ~10 here (head weights of scale 1): float32 rounding of the two paths is ~2e-5
            logit = recipe["ctr_logit"](extra, u, items[j])
            torch.testing.assert_close(logit, logits[j], atol=1e-4, rtol=1e-5)
            checked += 1
    assert checked >= 10


@pytest.fixture(scope="module")
def recipe():
    return doc_recipe()


@pytest.fixture(scope="module")
def tiny_dirs(tiny_bert_dir, tiny_llama_dir):
    return {"bert": tiny_bert_dir, "llama": tiny_llama_dir}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_dirs):
    """name -> (checkpoint, export dir, base model dir); each checkpoint exported with --format auto."""
    root = tmp_path_factory.mktemp("export")
    out = {}
    for name, (kind, options, item_dim) in CASES.items():
        if name == "bert-lora":
            continue  # exported with --format adapter by its own test
        ckpt = make_checkpoint(root / f"ckpt-{name}", tiny_dirs[kind], item_dim, **options)
        export(ExportConfig(checkpoint=ckpt, out=root / f"out-{name}"))
        out[name] = (ckpt, root / f"out-{name}", tiny_dirs[kind])
    return out


def item_table(item_dim: int) -> torch.Tensor:
    return torch.randn(len(TEXTS), item_dim, generator=torch.Generator().manual_seed(7))


# -------------------------------------------------------------------------------------------- the full model
@pytest.mark.parametrize("name", ["bert", "bert-alibi-isolated-last", "llama", "llama-lora"])
def test_plain_transformers_export_reproduces_user_states_and_logits(exported, recipe, name):
    ckpt, out, _ = exported[name]
    model, _ = load_finetuned(ckpt)
    loaded = recipe["load_export"](out)  # transformers.AutoModel.from_pretrained(out), no llmfeat involved
    assert type(loaded[0]).__module__.startswith("transformers.")
    check_recipe(recipe, loaded, model, item_table(CASES[name][2]))


@pytest.mark.parametrize("name", ["bert", "llama", "llama-lora"])
def test_full_model_holds_the_finetuned_deep_layers_and_the_base_model_elsewhere(exported, name):
    from transformers import AutoModel

    ckpt, out, base_dir = exported[name]
    model, ft = load_finetuned(ckpt)
    got = AutoModel.from_pretrained(out).state_dict()
    base = AutoModel.from_pretrained(base_dir).state_dict()
    assert set(got) == set(base)
    prefix = "layers" if CASES[name][0] == "llama" else "encoder.layer"
    deep = [k for k in got if any(k.startswith(f"{prefix}.{i}.") for i in (2, 3)) or k.startswith("norm.")]
    assert len(deep) > 10
    for k in got:
        if k in deep:
            continue
        assert torch.equal(got[k], base[k]), f"{k}: the frozen part changed"
    changed = [k for k in deep if not torch.equal(got[k], base[k])]
    assert len(changed) >= (14 if ft.lora else len(deep) - 1), changed  # LoRA: the adapted linear weights
    if not ft.lora:  # the exported deep layers are the checkpoint's, bit for bit
        ours = model.backbone.deep.state_dict()
        for k in deep:
            theirs = k.replace(f"{prefix}.2.", "layers.0.").replace(f"{prefix}.3.", "layers.1.")
            assert torch.equal(got[k], ours[theirs]), k
    config = json.loads((out / "config.json").read_text())
    assert "llmfeat" not in json.dumps(config)  # llmfeat's attention registration does not leak out


def test_decoder_export_keeps_its_architecture_and_tokenizer(exported, tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, out, _ = exported["llama"]
    lm = AutoModelForCausalLM.from_pretrained(out)
    assert type(lm).__name__ == "LlamaForCausalLM"
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.padding_side == "right" and tok.pad_token_id is not None
    base_tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    assert tok("hello world")["input_ids"] == base_tok("hello world")["input_ids"]


def test_extra_tensors_and_their_description(exported):
    ckpt, out, _ = exported["bert-alibi-isolated-last"]
    model, ft = load_finetuned(ckpt)
    extra = load_file(out / HEAD_WEIGHTS)
    meta = json.loads((out / HEAD_META).read_text())
    ours = {k: v for k, v in model.state_dict().items() if not k.startswith("backbone.")}
    assert set(extra) == set(ours) | {"distance_bias.slopes"}
    for k, v in ours.items():
        assert torch.equal(extra[k], v), k
    assert torch.equal(extra["distance_bias.slopes"], model.distance_bias.slopes)
    assert "head.item_proj.weight" in extra  # item width 16 != 32
    assert set(meta["tensors"]) == set(extra) and all(meta["tensors"][k]["role"] for k in extra)
    assert meta["not_in_hf_model"] == sorted(extra)
    options = (meta["split_layer"], meta["context_size"], meta["leakage"], meta["pooling"])
    assert options == (2, N, "isolated", "last")
    assert meta["distance_bias"] == {"kind": "alibi", "max_distance": N + 1}
    assert meta["fingerprint"]["digest"] == model.backbone.fingerprint.digest
    assert meta["exported"] == {"full_model": ".", "peft_adapter": None}
    assert not (out / "adapter").exists()


# ------------------------------------------------------------------------------------------------------ LoRA
def test_lora_adapter_loads_with_peft_merges_to_the_full_export_and_reproduces_user_states(exported, recipe):
    from peft import PeftModel
    from transformers import AutoModel

    ckpt, out, base_dir = exported["llama-lora"]
    adapter = out / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["layers_to_transform"] == [2, 3] and config["r"] == 8
    pm = PeftModel.from_pretrained(AutoModel.from_pretrained(base_dir), adapter)
    model, _ = load_finetuned(ckpt)
    check_recipe(recipe, recipe["load_export"](adapter, model=pm), model, item_table(32))  # unmerged
    merged = pm.merge_and_unload().state_dict()
    full = AutoModel.from_pretrained(out).state_dict()
    assert set(merged) == set(full)
    for k in full:
        torch.testing.assert_close(merged[k], full[k], atol=1e-6, rtol=0)
    exported_parts = json.loads((out / HEAD_META).read_text())["exported"]
    assert exported_parts == {"full_model": ".", "peft_adapter": "adapter"}


def test_format_adapter_writes_only_the_adapter(tmp_path, tiny_bert_dir, recipe):
    from peft import PeftModel
    from transformers import AutoModel

    kind, options, item_dim = CASES["bert-lora"]
    ckpt = make_checkpoint(tmp_path / "ckpt", tiny_bert_dir, item_dim, **options)
    out = tmp_path / "adapter"
    report = export(ExportConfig(checkpoint=ckpt, out=out, format="adapter"))
    assert report.full_model is None and report.adapter == out
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", HEAD_WEIGHTS, HEAD_META,
            "tokenizer.json"} <= names
    assert "model.safetensors" not in names and "config.json" not in names
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary directory left
    pm = PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_bert_dir), out)
    model, _ = load_finetuned(ckpt)
    check_recipe(recipe, recipe["load_export"](out, model=pm.merge_and_unload()), model, item_table(item_dim))


# ----------------------------------------------------------------------------------------- CLI and bad input
def test_cli_exports_and_overwrite_replaces(exported, tmp_path):
    ckpt, _, _ = exported["bert"]
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["export", "--checkpoint", str(ckpt), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "full model (BertModel" in res.output and str(out) in res.output
    (out / "stale.txt").write_text("from before")
    res = CliRunner().invoke(main, ["export", "--checkpoint", str(ckpt), "--out", str(out), "--overwrite"])
    assert res.exit_code == 0, res.output
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary or old directory left


def test_bad_input_is_refused_and_nothing_is_written(exported, tmp_path):
    ckpt, _, _ = exported["bert"]
    out = tmp_path / "out"
    run_bad(["export", "--checkpoint", tmp_path / "nope", "--out", out],
            expect=r"nope.*--checkpoint.*does not exist", unchanged=[tmp_path])
    half = tmp_path / "half"
    shutil.copytree(ckpt, half)
    (half / "model.safetensors").unlink()
    run_bad(["export", "--checkpoint", half, "--out", out],
            expect=r"not a finetune checkpoint.*model\.safetensors", unchanged=[tmp_path])
    run_bad(["export", "--checkpoint", ckpt], expect=r"--out", unchanged=[tmp_path])
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    run_bad(["export", "--checkpoint", ckpt, "--out", out], expect=r"not empty.*--overwrite",
            unchanged=[tmp_path])
    run_bad(["export", "--checkpoint", ckpt, "--out", tmp_path / "new", "--format", "adapter"],
            expect=r"without --lora", unchanged=[tmp_path])
    inner = tmp_path / "runs" / "ckpt"
    shutil.copytree(ckpt, inner)
    run_bad(["export", "--checkpoint", inner, "--out", inner.parent, "--overwrite"],
            expect=r"would replace the checkpoint", unchanged=[tmp_path])
    (tmp_path / "file").write_text("x")
    run_bad(["export", "--checkpoint", ckpt, "--out", tmp_path / "file", "--overwrite"],
            expect=r"not a directory", unchanged=[tmp_path])
    bad_config = tmp_path / "badcfg"
    shutil.copytree(ckpt, bad_config)
    (bad_config / "config.json").write_text("{not json")
    run_bad(["export", "--checkpoint", bad_config, "--out", tmp_path / "new"],
            expect=r"config\.json.*(unreadable|not valid JSON)", unchanged=[tmp_path])
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_python_api_raises_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        export(ExportConfig(checkpoint=tmp_path / "missing", out=tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    with pytest.raises(UserError, match="--format"):
        export(ExportConfig(checkpoint=tmp_path / "missing", out=tmp_path / "out", format="merged"))
    assert not (tmp_path / "out").exists()
