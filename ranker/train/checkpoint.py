"""The ranker checkpoint: one unsharded ``model.safetensors`` next to ``ranker.json`` (configuration
and vocabularies), so serving loads it without a process group; and the fine-tuned tower whose head
scores pairs (``llm_mode=score``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from llm_features.atomic import atomic_path, write_json
from llm_features.errors import UserError
from llm_features.workspace import MissingInputError
from ranker.features import FeatureEncoder
from ranker.model import RankingModel

CHECKPOINT_FORMAT = "llmfeat-ranker/1"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "ranker.json"


def save_checkpoint(out: Path, model: RankingModel, encoder: FeatureEncoder, extra: dict[str, Any]) -> None:
    """``model.safetensors`` (unsharded state dict) and ``ranker.json`` (config, vocabularies)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(out / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp))
    payload = {"format": CHECKPOINT_FORMAT, "feature_service": encoder.model.feature_service,
               "encoder": encoder.to_dict(), **extra}
    write_json(out / CONFIG_FILE, payload)


def load_checkpoint(path: Path) -> tuple[RankingModel, FeatureEncoder, dict[str, Any]]:
    """The unsharded model (eval mode), its encoder, and the ``ranker.json`` payload."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / CONFIG_FILE).exists() or not (path / WEIGHTS_FILE).exists():
        missing = CONFIG_FILE if not (path / CONFIG_FILE).exists() else WEIGHTS_FILE
        raise MissingInputError(
            f"is not a ranker checkpoint (no {missing})", file=path, option="--checkpoint",
            fix="Pass the --out directory of `llmfeat ranker train` (or run it first).",
        )
    try:
        payload = json.loads((path / CONFIG_FILE).read_text())
    except ValueError as e:
        raise UserError(f"is not valid JSON ({e})", file=path / CONFIG_FILE, option="--checkpoint",
                        fix="Re-run `llmfeat ranker train` to rewrite the checkpoint.") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else None
        raise UserError(f"format {found!r}, expected {CHECKPOINT_FORMAT!r}", file=path / CONFIG_FILE,
                        option="--checkpoint", fix="Pass a checkpoint written by `llmfeat ranker train`.")
    encoder = FeatureEncoder.from_dict(payload["encoder"])
    model = RankingModel(encoder)
    model.load_state_dict(load_file(str(path / WEIGHTS_FILE)))
    model.eval()
    return model, encoder, payload



def resolve_tower(tower: Path | None, ws) -> tuple[dict[str, Any], int, dict[str, torch.Tensor]]:
    """The finetune checkpoint whose head scores pairs: (identity, head width, its tensors).

    Default: the checkpoint recorded in the workspace's ``user_embeddings/`` parts. A given
    ``tower`` must be that same checkpoint (same weights and options) when the parts exist: a head
    scoring another model's user embeddings would be a silent mismatch.
    """
    from safetensors.torch import load_file

    from llm_features.embed_users import CHECKPOINT_METADATA_KEY, checkpoint_identity
    from llm_features.finetune.checkpoint_files import WEIGHTS
    from llm_features.finetune.loading import read_checkpoint_config
    from llm_features.parquet_io import file_metadata, list_parts

    exported = None
    if ws is not None:
        for part in list_parts(ws.user_embeddings):
            raw = file_metadata(part).get(CHECKPOINT_METADATA_KEY)
            if raw is not None:
                exported = json.loads(raw)
                break
    if tower is None:
        if exported is None:
            where = ws.user_embeddings if ws is not None else None
            raise UserError(
                "llm_mode=score needs the fine-tuned tower, and no user embeddings record one"
                + (f" ({where} has no parts)" if where is not None else ""), option="--tower",
                fix="Pass --tower <llmfeat finetune --out dir>, or run `llmfeat embed-users` first "
                    "(or train the id-only twin: --no-llm-features).")
        tower = Path(exported["path"])
    tower = Path(tower)
    if not (tower / WEIGHTS).exists():
        raise MissingInputError(f"no {WEIGHTS}", file=tower, option="--tower",
                                fix="Pass the directory `llmfeat finetune --out` wrote.")
    identity = checkpoint_identity(tower)
    if exported is not None and exported.get("id") != identity["id"]:
        raise UserError(
            f"{ws.user_embeddings} holds user embeddings of checkpoint {exported.get('id')} "
            f"({exported.get('path')}), but this is checkpoint {identity['id']}", file=tower, option="--tower",
            fix="Run `llmfeat embed-users --overwrite` with this checkpoint, or pass the one that exported them."
        )
    ft_cfg, _, _ = read_checkpoint_config(tower)
    return identity, int(ft_cfg.head_hidden), load_file(str(tower / WEIGHTS))


