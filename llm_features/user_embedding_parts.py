"""What ``user_embeddings/`` holds: its part schema and metadata, the checkpoint identity its rows record,
and the per-user state that incremental runs resume from and staleness checks read.

Every part carries, besides the model fingerprint, the serving identity of its rows (checkpoint
id, ``n``, ``k``, cadence: :data:`CHECKPOINT_METADATA_KEY`) and, per user, its newest stamp, how
many interactions lay before it and their :class:`HistoryDigests` digest
(:data:`STATE_METADATA_KEY`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from llm_features.config import flatten_values
from llm_features.errors import UserError
from llm_features.finetune.checkpoint_files import CONFIG, WEIGHTS, file_sha256
from llm_features.finetune.config import FinetuneConfig
from llm_features.finetune.packing import UserHistories
from llm_features.fingerprint import FINGERPRINT_METADATA_KEY, ModelFingerprint
from llm_features.parquet_io import embedding_array, file_metadata, list_parts, utc_us
from llm_features.schedule import part_name
from llm_features.stamps import digest as payload_digest
from llm_features.workspace import Workspace

PART_PREFIX = "users"
CHECKPOINT_METADATA_KEY = "llmfeat.checkpoint"
STATE_METADATA_KEY = "llmfeat.embed_users"
SCHEMA = pa.schema([
    ("user_id", pa.int64()),
    ("user_embedding", pa.list_(pa.float32())),
    ("event_timestamp", pa.timestamp("us", tz="UTC")),
])
# FinetuneConfig options that do not change what a checkpoint computes.
_NON_SEMANTIC = {"out", "data_dir", "device", "num_threads", "log_every", "save_every", "resume"}


class CheckpointMismatchError(UserError, RuntimeError):
    """user_embeddings/ already holds rows of another checkpoint (or other serving options)."""


class LateInteractionsError(UserError, RuntimeError):
    """Interactions changed before a stamp that is already exported: those rows would be stale."""


# ----------------------------------------------------------------------------------- checkpoint identity
def checkpoint_identity(path: str | os.PathLike) -> dict[str, Any]:
    """What identifies a checkpoint's embeddings: a hash of its weights and its (semantic) options."""
    path = Path(path)
    meta = json.loads((path / CONFIG).read_text())
    weights = file_sha256(path / WEIGHTS)
    # one key per option, whether the checkpoint nests them (backbone: {...}) or not (written before)
    flat = flatten_values(FinetuneConfig, meta["finetune"], str(path / CONFIG))
    options = {k: v for k, v in flat.items() if k not in _NON_SEMANTIC}
    identity = {"weights": weights, "options": options, "fingerprint": meta["fingerprint"]["digest"]}
    return {
        "id": payload_digest(identity, length=16),
        "weights_sha256": weights,
        "path": str(path.resolve()),
        "fingerprint": meta["fingerprint"]["digest"],
        "granularity": options.get("granularity"),
        "leakage": options.get("leakage"),
        "trained_context_size": options.get("context_size"),
    }


# ----------------------------------------------------------------------------------- the part format
def _part_table(user_ids: np.ndarray, states: np.ndarray, stamps: np.ndarray) -> pa.Table:
    return pa.Table.from_arrays(
        [pa.array(user_ids, pa.int64()), embedding_array(states),
         pa.array(stamps, pa.int64()).cast(pa.timestamp("us", tz="UTC"))],
        schema=SCHEMA,
    )


@dataclass
class PartInputs:
    """What the rows of a chunk of users are computed from: the part's name digests it, and its
    metadata records each user's state."""

    ext: UserHistories
    """The users' histories with their final query rows."""
    user_of_row: np.ndarray
    behavior_hash: np.ndarray
    """Per behaviour row: a hash of its text."""

    @classmethod
    def of(cls, ext: UserHistories, behavior_texts: list[str]) -> PartInputs:
        return cls(ext, np.repeat(ext.user_ids, np.diff(ext.offsets)), _behavior_hashes(behavior_texts))

    def part_name(self, identity: dict[str, Any], cadence: str, n: int, chunk_users: np.ndarray,
                  uids: np.ndarray, stamps: np.ndarray) -> str:
        """Checkpoint, cadence, n, user range, and a digest of the snapshots asked for and the histories."""
        ext = self.ext
        urows = np.flatnonzero(np.isin(self.user_of_row, chunk_users))
        key = [identity["id"], cadence, n, identity["targets_per_sequence"]]
        h = hashlib.sha256(json.dumps(key).encode())
        for arr in (uids, stamps, self.user_of_row[urows], ext.time[urows],
                    self.behavior_hash[ext.behavior_row[urows]], ext.feedback[urows]):
            h.update(np.ascontiguousarray(arr, dtype=np.int64).tobytes())
        return part_name(PART_PREFIX, identity["id"][:12], cadence, f"n{n}", f"u{int(chunk_users[0])}",
                         int(chunk_users[-1]), h.hexdigest()[:16])

    def users_state(self, rows: np.ndarray, stamps: np.ndarray, uids: np.ndarray,
                    digests: HistoryDigests | None) -> dict[str, list]:
        """Per user of a part: its newest stamp there, the interactions strictly before it, their digest."""
        ext = self.ext
        last = np.flatnonzero(np.append(uids[1:] != uids[:-1], True))
        user_state = {}
        for i in last.tolist():
            r = int(rows[i])
            before = int(ext.time_start[r] - ext.user_start[r])  # rows strictly before the query's time
            entry = [int(stamps[i]), before]
            if digests is not None:
                count, digest = digests(int(uids[i]), int(stamps[i]))
                if count == before:  # the same rows as the model saw (always, unless the table moved)
                    entry.append(digest)
            user_state[str(int(uids[i]))] = entry
        return user_state


def part_metadata(fp: ModelFingerprint, identity: dict[str, Any], serving: dict[str, Any],
                  user_state: dict[str, list]) -> dict[str, str]:
    """A part's metadata: fingerprint, serving identity, ``serving`` (cadence, n, k) and the users' state."""
    return {
        FINGERPRINT_METADATA_KEY: fp.to_json(),
        CHECKPOINT_METADATA_KEY: json.dumps(identity, sort_keys=True),
        STATE_METADATA_KEY: json.dumps({**serving, "users": user_state}, sort_keys=True),
    }


def _behavior_hashes(texts: list[str]) -> np.ndarray:
    digests = (hashlib.blake2b(t.encode(), digest_size=8).digest() for t in texts)
    return np.array([int.from_bytes(d, "little", signed=True) for d in digests], dtype=np.int64)


# ----------------------------------------------------------------------------------- existing parts
@dataclass
class Existing:
    keys: pd.MultiIndex
    state: dict[int, tuple[int, int, str | None]]
    """user_id -> (newest exported stamp, interactions strictly before it when exported, their
    :class:`HistoryDigests` digest, None in parts written before llmfeat recorded it)."""
    parts: list[Path]
    owners: dict[int, list[Path]] = field(default_factory=dict)
    """user_id -> the parts that hold the user's rows."""


def _serving_identity(ckpt: dict[str, Any], n: int, k: int, exact: bool, cadence: str) -> dict[str, Any]:
    return {**ckpt, "context_size": n, "targets_per_sequence": 1 if exact else k, "cadence": cadence}


def _merge_users_state(state: dict[int, tuple[int, int, str | None]], meta: dict[str, str]) -> list[int]:
    """Fold one part's per-user state (its metadata ``meta``) into ``state``, keeping each user's newest
    stamp; returns the part's users."""
    users = []
    recorded = json.loads(meta.get(STATE_METADATA_KEY, "{}")).get("users", {})
    for uid, (stamp, count, *digest) in recorded.items():
        uid = int(uid)
        if uid not in state or stamp > state[uid][0]:
            state[uid] = (int(stamp), int(count), digest[0] if digest else None)
        users.append(uid)
    return users


def _require_same_serving(part: Path, meta: dict[str, str], identity: dict[str, Any]) -> None:
    """A :class:`CheckpointMismatchError` unless ``part`` (metadata ``meta``) holds rows of ``identity``."""
    raw = meta.get(CHECKPOINT_METADATA_KEY)
    got = json.loads(raw) if raw else None
    if got is not None and "cadence" not in got:  # parts written before the cadence was recorded here
        got["cadence"] = json.loads(meta.get(STATE_METADATA_KEY, "{}")).get("cadence")
    same = got is not None and all(got.get(k) == identity.get(k)
                                   for k in ("id", "context_size", "targets_per_sequence", "cadence"))
    if not same:
        what = "no checkpoint metadata" if got is None else (
            f"checkpoint {got.get('id')} ({got.get('path')}), n={got.get('context_size')}, "
            f"k={got.get('targets_per_sequence')}, cadence {got.get('cadence')}")
        raise CheckpointMismatchError(
            f"{part} holds user embeddings of {what}, but this run exports checkpoint {identity['id']} "
            f"({identity['path']}), n={identity['context_size']}, k={identity['targets_per_sequence']}, "
            f"cadence {identity.get('cadence')}. Rows of two models or cadences must never be mixed: pass "
            "--overwrite to delete the old parts, or use another --data-dir."
        )


def read_existing(directory: Path, identity: dict[str, Any], fingerprint: ModelFingerprint) -> Existing:
    """Rows already exported; raises :class:`CheckpointMismatchError` for rows of another checkpoint
    and :class:`~llm_features.fingerprint.FingerprintMismatchError` for rows of another backbone."""
    parts = list_parts(directory)
    users, stamps = [], []
    state: dict[int, tuple[int, int, str | None]] = {}
    owners: dict[int, list[Path]] = {}
    for p in parts:
        meta = file_metadata(p)
        _require_same_serving(p, meta, identity)
        found = json.loads(meta.get(FINGERPRINT_METADATA_KEY, "{}")).get("digest")
        fingerprint.require_same(found, lambda _found, _this: (
            f"{p} carries backbone fingerprint {found}, the checkpoint's backbone is {fingerprint.digest}; "
            "pass --overwrite to delete the old parts"))
        t = pq.read_table(p, columns=["user_id", "event_timestamp"])
        users.append(t["user_id"].to_numpy())
        stamps.append(utc_us(t["event_timestamp"]).cast(pa.int64()).to_numpy())
        for uid in _merge_users_state(state, meta):
            owners.setdefault(uid, []).append(p)
    u = np.concatenate(users) if users else np.zeros(0, np.int64)
    s = np.concatenate(stamps) if stamps else np.zeros(0, np.int64)
    return Existing(pd.MultiIndex.from_arrays([u, s]), state, parts, owners)


class HistoryDigests:
    """What each user's embedding was computed from, as a digest of canonical columns only.

    Over a user's interactions strictly before a stamp, sorted: behavior_id (the stable id of the
    behaviour text, so a changed text changes it), event_timestamp, label and rating. A part records
    it per user; when the canonical table later gives another digest for the same stamp, the row is
    stale (an item or behaviour text changed, a label was corrected). Anyone holding the canonical
    table can check it without the model (``llmfeat feast materialize`` does).
    """

    def __init__(self, interactions: str | os.PathLike):
        names = set(pq.read_schema(interactions).names)
        cols = ["user_id", "event_timestamp", "behavior_id", "label"] + (["rating"] if "rating" in names else [])
        t = pq.read_table(interactions, columns=cols)
        df = pd.DataFrame({
            "u": t["user_id"].to_numpy(),
            "t": utc_us(t["event_timestamp"]).cast(pa.int64()).to_numpy(),
            "b": t["behavior_id"].to_numpy(),
            "l": t["label"].to_numpy().astype(np.int64),
            "r": (np.nan_to_num(t["rating"].to_numpy(zero_copy_only=False).astype(np.float64), nan=-1e300)
                  if "rating" in cols else np.zeros(t.num_rows)),
        }).sort_values(["u", "t", "b", "l", "r"], kind="stable")
        self.user = df["u"].to_numpy()
        self.time = df["t"].to_numpy()
        self.rows = np.ascontiguousarray(np.stack([df["t"].to_numpy(), df["b"].to_numpy(), df["l"].to_numpy(),
                                                   df["r"].to_numpy().view(np.int64)], axis=1))

    def __call__(self, uid: int, stamp: int) -> tuple[int, str]:
        """(interactions of ``uid`` strictly before ``stamp``, their digest)."""
        lo, hi = np.searchsorted(self.user, [uid, uid + 1])
        end = lo + int(np.searchsorted(self.time[lo:hi], stamp, side="left"))
        return end - lo, hashlib.blake2b(self.rows[lo:end].tobytes(), digest_size=8).hexdigest()

    def changed(self, state: dict[int, tuple[int, int, str | None]]) -> list[int]:
        """Users whose recorded digest no longer matches the canonical table (same count, other content)."""
        out = []
        for uid, (stamp, count, digest) in state.items():
            if digest is not None:
                now_count, now = self(uid, stamp)
                if now_count == count and now != digest:
                    out.append(uid)
        return sorted(out)


def stale_user_embeddings(data_dir: str | os.PathLike | None) -> list[int]:
    """Users whose exported embeddings were computed from interactions that have changed since."""
    ws = Workspace.at(data_dir)
    state: dict[int, tuple[int, int, str | None]] = {}
    for p in list_parts(ws.user_embeddings):
        _merge_users_state(state, file_metadata(p))
    if not state or not ws.interactions.exists():
        return []
    return HistoryDigests(ws.interactions).changed(state)


def check_no_late_interactions(hist: UserHistories, state: dict[int, tuple[int, int]]) -> None:
    """Raise when a user's interactions before an exported stamp differ in number from then."""
    if not state:
        return
    uids = np.fromiter(state, dtype=np.int64, count=len(state))
    pos = np.searchsorted(hist.user_ids, uids)
    pos = np.minimum(pos, max(len(hist.user_ids) - 1, 0))
    bad = []
    for uid, p in zip(uids.tolist(), pos.tolist()):
        stamp, count, _ = state[uid]
        if len(hist.user_ids) == 0 or hist.user_ids[p] != uid:
            now = 0
        else:
            lo, hi = hist.offsets[p], hist.offsets[p + 1]
            now = int(np.searchsorted(hist.time[lo:hi], stamp, side="left"))
        if now != count:
            bad.append((uid, stamp, count, now))
    if bad:
        uid, stamp, count, now = bad[0]
        raise LateInteractionsError(
            f"{len(bad)} users have interactions that changed before an already exported embedding "
            f"(e.g. user {uid}: {count} interactions before {pd.Timestamp(stamp, unit='us', tz='UTC')} "
            f"when exported, {now} now). Those rows would be stale: rerun with --overwrite to recompute "
            "user_embeddings/."
        )



def read_user_embeddings(data_dir: str | os.PathLike | None) -> pd.DataFrame:
    """All exported rows: user_id, event_timestamp (UTC), user_embedding ([D] float32 arrays)."""
    parts = list_parts(Workspace.at(data_dir).user_embeddings)
    if not parts:
        return pd.DataFrame({"user_id": pd.Series([], dtype="int64"),
                             "event_timestamp": pd.Series([], dtype="datetime64[us, UTC]"),
                             "user_embedding": pd.Series([], dtype=object)})
    table = pa.concat_tables([pq.read_table(p) for p in parts])
    return table.to_pandas().sort_values(["user_id", "event_timestamp"], kind="stable").reset_index(drop=True)


__all__ = [
    "CHECKPOINT_METADATA_KEY", "CheckpointMismatchError", "Existing", "HistoryDigests",
    "LateInteractionsError", "PART_PREFIX", "PartInputs", "SCHEMA", "STATE_METADATA_KEY",
    "check_no_late_interactions", "checkpoint_identity", "part_metadata", "read_existing",
    "read_user_embeddings", "stale_user_embeddings",
]
