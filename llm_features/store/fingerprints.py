"""The model fingerprints of the embedding views: the registry's tags against the part files' metadata."""

from __future__ import annotations

import json
from pathlib import Path

from llm_features.fingerprint import (
    FINGERPRINT_METADATA_KEY,
    FINGERPRINT_TAG,
    FingerprintMismatchError,
    ModelFingerprint,
)
from llm_features.parquet_io import PLACEHOLDER_METADATA_KEY, file_metadata
from llm_features.store.definitions import registered_workspace
from llm_features.store.opening import EMBEDDING_VIEWS
from llm_features.workspace import Workspace

# ---------------------------------------------------------------------------------------------
# Fingerprints


def _source_files(source_path: str) -> list[Path]:
    """Every parquet file DuckDB reads for a FileSource: a directory means all ``*.parquet`` in it,
    not only ``part-*`` files, so the fingerprint check covers whatever would be materialised."""
    p = Path(source_path)
    if p.is_dir():
        return sorted(f for f in p.iterdir() if f.suffix == ".parquet" and f.is_file())
    return [p] if p.exists() else []


def _is_placeholder(meta: dict[str, str]) -> bool:
    return meta.get(PLACEHOLDER_METADATA_KEY) == "true"


def check_fingerprints(store, workspace: Workspace | None = None) -> ModelFingerprint | None:
    """Refuse to materialise embeddings of mixed models.

    For every registered embedding view, the fingerprint digest in each part file's metadata, in
    the workspace ``manifest.json`` and in the view's registry tags must be the same, and the view's
    ``vector_length`` must match the manifest's width. Returns the workspace fingerprint (None when
    there is neither a manifest nor an embedding part yet).

    Raises:
        FingerprintMismatchError: naming the view, the part file and both digests.
    """
    workspace = workspace or registered_workspace(store)
    manifest_fp = workspace.read_fingerprint()
    manifest_digest = manifest_fp.digest if manifest_fp is not None else None
    registered = {fv.name: fv for fv in store.list_feature_views()}
    reapply = "run `llmfeat feast apply` (or `feast apply` in feast_repo/) to re-tag the views"

    for name in EMBEDDING_VIEWS:
        fv = registered.get(name)
        if fv is None:
            continue
        tag = fv.tags.get(FINGERPRINT_TAG)
        tag = None if tag in (None, "none") else tag
        for part in _source_files(fv.batch_source.path):
            part_digest = _part_digest(name, part, workspace, manifest_digest)
            if part_digest is None:
                continue
            if tag != part_digest:
                raise FingerprintMismatchError(
                    f"feature view {name}: registry tag {FINGERPRINT_TAG}={tag} but part file {part} holds "
                    f"model fingerprint {part_digest}; {reapply}."
                )
        if tag is not None and tag != manifest_digest:
            raise FingerprintMismatchError(
                f"feature view {name}: registry tag {FINGERPRINT_TAG}={tag} but {workspace.manifest} records "
                f"{manifest_digest} (part file: none checked); {reapply}."
            )
        if manifest_fp is not None:
            width = _embedding_width(workspace, manifest_fp)
            lengths = {f.name: f.vector_length for f in fv.features if f.vector_length}
            for feat, length in lengths.items():
                if length != width:
                    raise FingerprintMismatchError(
                        f"feature view {name}: {feat} is registered with vector_length={length} but "
                        f"{workspace.manifest} (digest {manifest_digest}) records width {width}; {reapply}."
                    )
    return manifest_fp


def _part_digest(name: str, part: Path, workspace: Workspace, manifest_digest: str | None) -> str | None:
    """The model digest of one part file (None for a placeholder), refused unless it is the manifest's."""
    meta = file_metadata(part)
    if _is_placeholder(meta):
        return None
    raw = meta.get(FINGERPRINT_METADATA_KEY)
    if raw is None:
        raise FingerprintMismatchError(
            f"feature view {name}: part file {part} has no '{FINGERPRINT_METADATA_KEY}' metadata, so "
            f"its model is unknown (manifest digest {manifest_digest}). Write embeddings with "
            f"llm_features.parquet_io.write_part(..., metadata=...) or remove the file."
        )
    part_digest = ModelFingerprint.from_json(raw).digest
    if manifest_digest is None:
        raise FingerprintMismatchError(
            f"feature view {name}: part file {part} holds model fingerprint {part_digest}, but "
            f"{workspace.manifest} is missing (manifest digest None)."
        )
    if part_digest != manifest_digest:
        raise FingerprintMismatchError(
            f"feature view {name}: part file {part} holds model fingerprint {part_digest}, but "
            f"{workspace.manifest} records {manifest_digest}. Embeddings of two models would be "
            f"mixed; re-encode into a fresh data dir or delete the stale part files."
        )
    return part_digest


def check_part_fingerprints(workspace: Workspace) -> None:
    """The registry-free half of :func:`check_fingerprints`: every embedding part file of the
    workspace holds the manifest's model. ``llmfeat feast materialize`` runs it before it applies,
    so a refused materialisation leaves the data dir (registry included) as it was."""
    fp = workspace.read_fingerprint()
    for name in EMBEDDING_VIEWS:
        for part in _source_files(str(getattr(workspace, name))):  # refuses a table linked out of the dir
            _part_digest(name, part, workspace, fp.digest if fp is not None else None)


def _embedding_width(workspace: Workspace, fp: ModelFingerprint) -> int:
    manifest = json.loads(workspace.manifest.read_text())
    return int(manifest.get("embedding_dim") or fp.hidden_size)
