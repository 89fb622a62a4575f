"""Where every stage reads and writes: one data directory, laid out the same way everywhere.

The default data directory is ``feast_repo/data``: the Feast definitions in ``feast_repo/`` read
their FileSources from there. ``LLMFEAT_DATA_DIR`` moves it (both for the CLI and for
``feast apply`` run inside ``feast_repo/``).

Layout::

    <data_dir>/
      canonical/interactions.parquet   user_id, item_id, event_timestamp, behavior_id, behavior_text,
                                       label, rating, split
      canonical/items.parquet          item_id, item_text, title, genres, ...
      canonical/users.parquet          user_id and the attributes the source has
      canonical/split.json             the train/valid/test boundaries, recorded once
      atomic_behavior_embeddings/      part files: behavior_id, behavior_embedding, event_timestamp
      item_embeddings/                 part files: item_id, item_embedding, event_timestamp
      user_embeddings/                 part files: user_id, user_embedding, event_timestamp
      user_recent_behaviors/           part files: user_id, recent_behavior_ids, event_timestamp
      manifest.json                    the model fingerprint of the embeddings here
      registry.db, online_store.db     Feast's registry and SQLite online store
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from llm_features.fingerprint import FingerprintMismatchError, ModelFingerprint
from llm_features.parquet_io import write_table_atomic  # noqa: F401  (re-exported for callers)

DATA_DIR_ENV = "LLMFEAT_DATA_DIR"
DEFAULT_REPO = Path("feast_repo")


def default_data_dir(repo: str | os.PathLike = DEFAULT_REPO) -> Path:
    env = os.environ.get(DATA_DIR_ENV)
    return Path(env).resolve() if env else (Path(repo) / "data").resolve()


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def at(cls, root: str | os.PathLike | None = None) -> "Workspace":
        return cls(Path(root).resolve() if root is not None else default_data_dir())

    # canonical tables (ingest)
    @property
    def canonical(self) -> Path:
        return self.root / "canonical"

    @property
    def interactions(self) -> Path:
        return self.canonical / "interactions.parquet"

    @property
    def items(self) -> Path:
        return self.canonical / "items.parquet"

    @property
    def users(self) -> Path:
        return self.canonical / "users.parquet"

    @property
    def split(self) -> Path:
        return self.canonical / "split.json"

    # feature tables (part-file directories behind the Feast views)
    @property
    def atomic_behavior_embeddings(self) -> Path:
        return self.root / "atomic_behavior_embeddings"

    @property
    def item_embeddings(self) -> Path:
        return self.root / "item_embeddings"

    @property
    def user_embeddings(self) -> Path:
        return self.root / "user_embeddings"

    @property
    def user_recent_behaviors(self) -> Path:
        return self.root / "user_recent_behaviors"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    def read_fingerprint(self) -> ModelFingerprint | None:
        if not self.manifest.exists():
            return None
        return ModelFingerprint.from_dict(json.loads(self.manifest.read_text())["fingerprint"])

    def claim_fingerprint(self, fp: ModelFingerprint) -> None:
        """Record ``fp`` as this workspace's embedding space, or refuse a different one."""
        current = self.read_fingerprint()
        if current is not None and current.digest != fp.digest:
            raise FingerprintMismatchError(
                f"{self.manifest} holds embeddings of model fingerprint {current.digest} "
                f"({current.model_name}, split_layer={current.split_layer}, pooling={current.pooling}); "
                f"refusing to mix in {fp.digest} ({fp.model_name}, split_layer={fp.split_layer}, "
                f"pooling={fp.pooling}). Use a fresh --data-dir, or delete the embedding directories first."
            )
        if current is None:
            self.root.mkdir(parents=True, exist_ok=True)
            payload = {"fingerprint": fp.to_dict(), "embedding_dim": fp.hidden_size}
            tmp = self.manifest.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(payload, indent=2, sort_keys=True))
            os.replace(tmp, self.manifest)
