"""Where every stage reads and writes: one data directory, laid out the same way everywhere.

The default data directory is ``feast_repo/data``: the Feast definitions in ``feast_repo/`` read
their FileSources from there. ``LLMFEAT_DATA_DIR`` moves it (both for the CLI and for
``feast apply`` run inside ``feast_repo/``).

Layout::

    <data_dir>/
      canonical/interactions.parquet   user_id, item_id, event_timestamp, behavior_id, behavior_text,
                                       label, rating, split
      canonical/items.parquet          item_id, item_text, title, the item attributes, ...
      canonical/users.parquet          user_id and the attributes the source has
      canonical/split.json             the train/valid/test boundaries, recorded once
      atomic_behavior_embeddings/      part files: behavior_id, behavior_embedding, event_timestamp
      item_embeddings/                 part files: item_id, item_embedding, event_timestamp
      user_embeddings/                 part files: user_id, user_embedding, event_timestamp
      user_recent_behaviors/           part files: user_id, recent_behavior_ids, event_timestamp
      events/                          part files: the interactions pushed since ingest (llm_features.events)
      manifest.json                    the model fingerprint of the embeddings here
      registry.db, online_store.db     Feast's registry and SQLite online store
      runs/finetune/                   `llmfeat finetune`'s checkpoint (the --out default)
      runs/ranker_llm/, ranker_id_only/  `llmfeat ranker train`'s checkpoints of the two twins
      .llmfeat.lock                    while a stage writes: its pid, command and start time

One data dir, one owner:

- every table path resolves inside the data dir: a table directory (or ``canonical/``) that is a
  symbolic link leaving it is refused before anything is read, written or unlinked (a link inside
  the data dir is fine);
- a stage that writes (ingest, encode, embed-users, feast apply/materialize, demo) holds
  :meth:`Workspace.lock`, an exclusive ``flock`` on ``.llmfeat.lock``; a second writer is refused
  with the holder's pid, command and start time. The kernel drops the lock when its process dies.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from llm_features.atomic import write_json
from llm_features.errors import UserError
from llm_features.feature_repo import DEFAULT_REPO, is_installed_repo
from llm_features.fingerprint import ModelFingerprint
from llm_features.parquet_io import write_table_atomic  # noqa: F401  (re-exported for callers)

DATA_DIR_ENV = "LLMFEAT_DATA_DIR"
LOCK_FILE = ".llmfeat.lock"
TABLES = ("canonical", "atomic_behavior_embeddings", "item_embeddings", "user_embeddings", "user_recent_behaviors",
          "events")

# data dirs whose lock this process holds -> nesting depth (a stage inside the demo, a registry
# rebuild inside `feast apply`: the outer holder already owns the dir)
_HELD: dict[Path, int] = {}


class MissingInputError(UserError, FileNotFoundError):
    """A file or directory a stage needs is not there (what to run first is in the message)."""


class DataDirBusyError(UserError):
    """Another process holds the data dir's lock."""


class DataDirLinkError(UserError):
    """A table path of the data dir is a symbolic link that leaves it."""


def default_data_dir(repo: str | os.PathLike = DEFAULT_REPO) -> Path:
    """``$LLMFEAT_DATA_DIR``, else ``<repo>/data``; for the repository inside the installed package
    (``llm_features.feature_repo``), ``./feast_repo/data``: nothing is written into a package."""
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env).resolve()
    return ((DEFAULT_REPO if is_installed_repo(repo) else Path(repo)) / "data").resolve()


def resolve_data_dir(repo: str | os.PathLike = DEFAULT_REPO, data_dir: str | os.PathLike | None = None) -> Path:
    """``data_dir`` (``--data-dir``), else :func:`default_data_dir` of ``repo``; absolute. The one
    answer to "which data dir?" for every stage and command."""
    return Path(data_dir).resolve() if data_dir is not None else default_data_dir(repo)


def runs_dir(data_dir: str | os.PathLike | None = None, repo: str | os.PathLike = DEFAULT_REPO) -> Path:
    """``<data_dir>/runs`` (``data_dir``, else :func:`default_data_dir`): where the stages write their
    checkpoints unless told otherwise, the layout ``llmfeat demo`` uses."""
    return (Path(data_dir) if data_dir is not None else default_data_dir(repo)) / "runs"


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def at(cls, root: str | os.PathLike | None = None) -> "Workspace":
        return cls(resolve_data_dir(DEFAULT_REPO, root))

    def _table(self, *parts: str) -> Path:
        """``root/parts``, refused when a symbolic link on the way leads out of the data dir."""
        path = self.root.joinpath(*parts)
        root = self.root.resolve()
        real = path.resolve()
        if real != root and root not in real.parents:
            link = next((p for p in (self.root.joinpath(*parts[: i + 1]) for i in range(len(parts)))
                         if p.is_symlink()), path)
            raise DataDirLinkError(
                f"is a symbolic link to {link.resolve()}, outside the data dir {root}; llmfeat never reads or "
                "writes a data dir's tables through a link that leaves it",
                file=link,
                fix="Move the files into the data dir (replace the link with a real directory), or pass "
                    "--data-dir where they live.",
            )
        return path

    def check_layout(self) -> None:
        """Refuse (:class:`DataDirLinkError`) any table path that links out of the data dir."""
        for name in TABLES:
            self._table(name)
        for prop in ("interactions", "items", "users", "split"):
            getattr(self, prop)

    @contextlib.contextmanager
    def lock(self, command: str) -> Iterator["Workspace"]:
        """Hold the data dir exclusively while a stage writes to it (``command`` names the stage).

        Checks the layout first (:meth:`check_layout`), then takes an exclusive ``flock`` on
        ``<data_dir>/.llmfeat.lock`` and writes the holder (pid, command, start time) into it; a
        second writer gets :class:`DataDirBusyError` naming that holder. Re-entrant within a process.
        Under torchrun, rank 0 takes it for the job and the other ranks share it.
        A data dir that did not exist is created for the lock and removed again if the stage left it
        empty; the lock file is removed on release, so a refused stage leaves the dir as it was.
        """
        root = self.root.resolve()
        if _HELD.get(root):
            _HELD[root] += 1
            try:
                yield self
            finally:
                _HELD[root] -= 1
            return
        self.check_layout()
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and os.environ.get("RANK", "0") != "0":
            yield self  # a torchrun worker: rank 0 holds the lock for the whole job
            return
        created = [p for p in (root, *root.parents) if not p.exists()]
        root.mkdir(parents=True, exist_ok=True)
        path = root / LOCK_FILE
        try:
            fd = _acquire(path, command)
        except BaseException:
            _remove_empty(created)
            raise
        _HELD[root] = 1
        try:
            yield self
        finally:
            _HELD.pop(root, None)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # still holding it: a waiting opener re-checks the inode (see _acquire)
            os.close(fd)
            _remove_empty(created)

    # canonical tables (ingest)
    @property
    def canonical(self) -> Path:
        return self._table("canonical")

    @property
    def interactions(self) -> Path:
        return self._table("canonical", "interactions.parquet")

    @property
    def items(self) -> Path:
        return self._table("canonical", "items.parquet")

    @property
    def users(self) -> Path:
        return self._table("canonical", "users.parquet")

    @property
    def split(self) -> Path:
        return self._table("canonical", "split.json")

    # feature tables (part-file directories behind the Feast views)
    @property
    def atomic_behavior_embeddings(self) -> Path:
        return self._table("atomic_behavior_embeddings")

    @property
    def item_embeddings(self) -> Path:
        return self._table("item_embeddings")

    @property
    def user_embeddings(self) -> Path:
        return self._table("user_embeddings")

    @property
    def user_recent_behaviors(self) -> Path:
        return self._table("user_recent_behaviors")

    @property
    def events(self) -> Path:
        """Interactions pushed by ``llm_features.events`` since ingest (not a feature view's source)."""
        return self._table("events")

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
        if current is None:
            write_json(self.manifest, {"fingerprint": fp.to_dict(), "embedding_dim": fp.hidden_size})
            return
        fp.require_same(
            current, lambda found, new: f"{self.manifest} holds embeddings of model fingerprint {found}; "
            f"refusing to mix in {new}", fix="Use a fresh --data-dir, or delete the embedding directories first.")


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info.get("pid"):
        return "another process"
    return f"pid {info['pid']} ({info.get('command', '?')}, since {info.get('since', '?')})"


def _acquire(path: Path, command: str) -> int:
    """An fd holding an exclusive flock on ``path``, with the holder written into the file."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise DataDirBusyError(
                f"the data dir is in use by {holder}", file=path.parent,
                fix="Wait for it to finish (or stop it), or use another --data-dir.",
            ) from None
        except BaseException:
            os.close(fd)
            raise
        # the previous holder unlinks the file before it lets go: lock only the file still at `path`
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    since = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    info = json.dumps({"pid": os.getpid(), "command": command, "since": since}).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, info, 0)
    return fd


def _remove_empty(dirs: list[Path]) -> None:
    """Remove the directories a lock created (deepest first) where they are still empty."""
    for d in dirs:
        try:
            d.rmdir()
        except OSError:
            return
