"""Reading a workspace into what fine-tuning needs: user histories, behaviour and item tables.

The tables must come from the same model (fingerprint) as the backbone being fine-tuned: the
deep layers only make sense on top of their own shallow layers.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor

from llm_features.errors import UserError
from llm_features.fingerprint import FINGERPRINT_METADATA_KEY, FingerprintMismatchError, ModelFingerprint
from llm_features.finetune.packing import UserHistories, feedback_index
from llm_features.ingest.split import SPLIT_CODES
from llm_features.parquet_io import embedding_matrix, file_metadata, list_parts
from llm_features.workspace import Workspace

log = logging.getLogger(__name__)


@dataclass
class FinetuneData:
    """Histories plus the frozen tables their rows index."""

    hist: UserHistories
    behavior_table: Tensor | None
    """``[NB, D]`` atomic behaviour vectors by ``hist.behavior_row`` (None when not loaded)."""
    item_table: Tensor
    """``[NI, Dv]`` item vectors by ``hist.item_row``."""
    behavior_texts: list[str]
    """Behaviour text by ``hist.behavior_row``."""

    def split_mask(self, split: str) -> np.ndarray:
        return self.hist.split == SPLIT_CODES[split]


def _check_parts(directory: Path, fp: ModelFingerprint) -> list[Path]:
    parts = list_parts(directory)
    if not parts:
        raise UserError("no part files", file=directory, fix="Run `llmfeat encode` on this data dir first.")
    for p in parts:
        raw = file_metadata(p).get(FINGERPRINT_METADATA_KEY)
        if raw is None:
            raise FingerprintMismatchError(f"no {FINGERPRINT_METADATA_KEY} metadata", file=p,
                                           fix="Re-run `llmfeat encode` on this data dir.")
        fp.require_same(
            ModelFingerprint.from_json(raw),
            lambda found, loaded: f"{p} was encoded by model fingerprint {found} but finetune loaded {loaded}",
            fix="Pass the same --model/--split-layer/--pooling/--max-tokens/--dtype as `llmfeat encode`.")
    return parts


def _lookup(directory: Path, parts: list[Path], id_column: str, vec_column: str, wanted: np.ndarray) -> Tensor:
    """``[len(wanted), D]`` vectors of the ids ``wanted`` from the part files."""
    table = pa.concat_tables([pq.read_table(p, columns=[id_column, vec_column]) for p in parts])
    ids = table[id_column].to_numpy()
    order = np.argsort(ids, kind="stable")
    pos = np.searchsorted(ids[order], wanted)
    pos = np.minimum(pos, len(ids) - 1)
    found = ids[order][pos] == wanted
    if not found.all():
        missing = wanted[~found]
        raise UserError(
            f"{len(missing)} {id_column}s of the interactions have no embedding (e.g. {missing[:3].tolist()})",
            file=directory, fix="Run `llmfeat encode` on this data dir.",
        )
    matrix = embedding_matrix(table[vec_column])
    return torch.from_numpy(np.ascontiguousarray(matrix[order[pos]]))


def load_finetune_data(
    data_dir: str | Path | None,
    fingerprint: ModelFingerprint | None,
    *,
    feedback: str = "rating",
    need_behavior_vectors: bool = True,
    limit_users: int | None = None,
    seed: int = 0,
) -> FinetuneData:
    """Read canonical interactions and the embedding part files of a workspace.

    Args:
        data_dir: the workspace (None: the default data directory).
        fingerprint: the backbone's fingerprint; the embedding parts must carry the same one
            (None skips the check, for tests).
        feedback: ``rating`` or ``label`` (see :func:`feedback_index`).
        need_behavior_vectors: load the atomic behaviour table (behaviour level).
        limit_users: keep a seeded random sample of this many users.
    """
    ws = Workspace.at(data_dir)
    if not ws.interactions.exists():
        raise UserError("not found", file=ws.interactions, option="--data-dir",
                        fix="Run `llmfeat ingest` (and `llmfeat encode`) for this data dir first.")
    cols = ["user_id", "item_id", "event_timestamp", "behavior_id", "behavior_text", "label", "rating", "split"]
    t = pq.read_table(ws.interactions, columns=cols)
    user = t["user_id"].to_numpy()
    if limit_users is not None:
        users = np.unique(user)
        if limit_users < len(users):
            keep = np.random.default_rng(seed).choice(users, size=limit_users, replace=False)
            t = t.filter(pa.array(np.isin(user, keep)))
            user = t["user_id"].to_numpy()
    time = t["event_timestamp"].cast(pa.timestamp("us", tz="UTC")).cast(pa.int64()).to_numpy()
    behavior_id = t["behavior_id"].to_numpy()
    item_id = t["item_id"].to_numpy()
    label = t["label"].to_numpy(zero_copy_only=False).astype(np.int64)
    rating = t["rating"].to_numpy(zero_copy_only=False).astype(np.float64)
    split_names = t["split"].to_numpy(zero_copy_only=False)
    unknown = set(np.unique(split_names)) - set(SPLIT_CODES)
    if unknown:
        raise UserError(f"unknown split values {sorted(unknown)}; expected train/valid/test", file=ws.interactions,
                        column="split", fix="Re-run `llmfeat ingest`.")
    split = np.select([split_names == s for s in SPLIT_CODES], list(SPLIT_CODES.values())).astype(np.int8)

    b_ids, b_first, b_row = np.unique(behavior_id, return_index=True, return_inverse=True)
    i_ids, i_row = np.unique(item_id, return_inverse=True)
    texts = t["behavior_text"].to_numpy(zero_copy_only=False)[b_first].tolist()

    behavior_table = None
    if fingerprint is not None:
        bparts = _check_parts(ws.atomic_behavior_embeddings, fingerprint)
        iparts = _check_parts(ws.item_embeddings, fingerprint)
    else:
        bparts, iparts = list_parts(ws.atomic_behavior_embeddings), list_parts(ws.item_embeddings)
    if need_behavior_vectors:
        behavior_table = _lookup(ws.atomic_behavior_embeddings, bparts, "behavior_id", "behavior_embedding", b_ids)
    item_table = _lookup(ws.item_embeddings, iparts, "item_id", "item_embedding", i_ids)

    hist = UserHistories.from_arrays(
        user, time, b_row, i_row, label, feedback_index(label, rating, feedback), split,
    )
    log.info("finetune data: %d users, %d interactions, %d behaviours, %d items",
             len(hist.user_ids), len(hist), len(b_ids), len(i_ids))
    return FinetuneData(hist, behavior_table, item_table, texts)


def split_info(data_dir: str | Path | None) -> dict:
    ws = Workspace.at(data_dir)
    return json.loads(ws.split.read_text()) if ws.split.exists() else {}


def limit_targets(hist: UserHistories, targets: np.ndarray, max_targets: int | None, seed: int) -> np.ndarray:
    """Keep whole users, in a seeded random order, until about ``max_targets`` targets (independent of k)."""
    if max_targets is None or targets.sum() <= max_targets:
        return targets
    user_of_row = np.repeat(np.arange(len(hist.user_ids)), np.diff(hist.offsets))
    per_user = np.bincount(user_of_row, weights=targets, minlength=len(hist.user_ids))
    order = np.random.default_rng(seed).permutation(len(hist.user_ids))
    order = order[per_user[order] > 0]
    cum = np.cumsum(per_user[order])
    keep_users = order[: int(np.searchsorted(cum, max_targets)) + 1]
    return targets & np.isin(user_of_row, keep_users)
