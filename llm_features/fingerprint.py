"""The model fingerprint: what identifies every embedding a backbone makes.

Two embeddings are comparable only if their fingerprints' ``digest`` is equal. The digest covers
the identity of the weights (a hash of the weight and config files, not the path), the split
layer, the pooling, the token limit and the dtype. It is written into every parquet part file's
metadata, into ``manifest.json`` of the workspace, and into the Feast feature views' tags.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from llm_features.errors import UserError
from llm_features import stamps

FINGERPRINT_METADATA_KEY = "llmfeat.fingerprint"
FINGERPRINT_TAG = "llmfeat_fingerprint"


@dataclass(frozen=True)
class ModelFingerprint:
    model_name: str
    """Human-readable name or path of the model; not part of the digest."""
    weights_sha256: str
    """sha256 over the model's weight and config files."""
    split_layer: int
    pooling: str
    max_tokens: int
    dtype: str
    hidden_size: int

    @property
    def digest(self) -> str:
        """16 hex characters identifying the embedding space."""
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k != "model_name"}
        return stamps.digest(fields, length=16)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "digest": self.digest}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelFingerprint":
        names = {f.name for f in dataclasses.fields(cls)}
        fp = cls(**{k: v for k, v in d.items() if k in names})
        if "digest" in d and d["digest"] != fp.digest:
            raise ValueError(f"fingerprint digest mismatch: stored {d['digest']}, recomputed {fp.digest}")
        return fp

    @classmethod
    def from_json(cls, s: str | bytes) -> "ModelFingerprint":
        return cls.from_dict(json.loads(s))

    def describe(self) -> str:
        """``digest (model, split_layer=L, pooling=P)``: what tells two embedding spaces apart in a message."""
        return f"{self.digest} ({self.model_name}, split_layer={self.split_layer}, pooling={self.pooling})"

    def require_same(
        self,
        found: ModelFingerprint | str | None,
        problem: Callable[[str, str], str],
        *,
        file: str | os.PathLike | None = None,
        option: str | None = None,
        fix: str | None = None,
    ) -> None:
        """Refuse ``found`` unless it is this embedding space (the same digest).

        ``found`` is a fingerprint, a bare digest, or None where nothing is recorded. On a mismatch,
        ``problem(found, this)`` words the :class:`FingerprintMismatchError` from the two sides'
        descriptions (:meth:`describe`; a bare digest as it is, None as ``none``); ``file``,
        ``option`` and ``fix`` are :class:`~llm_features.errors.UserError`'s.

        Example::

            fp.require_same(part_fp, lambda found, this: f"{part} holds {found}, this run is {this}")
        """
        digest = found.digest if isinstance(found, ModelFingerprint) else found
        if digest == self.digest:
            return
        described = found.describe() if isinstance(found, ModelFingerprint) else str(found or "none")
        raise FingerprintMismatchError(problem(described, self.describe()), file=file, option=option, fix=fix)

    def as_tags(self) -> dict[str, str]:
        """Feast tags (string to string) describing this fingerprint."""
        return {
            FINGERPRINT_TAG: self.digest,
            "llmfeat_model": self.model_name,
            "llmfeat_split_layer": str(self.split_layer),
            "llmfeat_pooling": self.pooling,
            "llmfeat_dim": str(self.hidden_size),
        }


class FingerprintMismatchError(UserError, RuntimeError):
    """Embeddings of two different models (or settings) would be mixed."""
