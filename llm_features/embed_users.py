"""``llmfeat embed-users``: fine-tuned deep layers over each user's recent behaviours -> ``user_embeddings/``.

A user-embedding row stamped ``T`` is the query-token output ``u`` of the fine-tuned model over the
user's last ``n`` interactions strictly before ``T`` (context tokens ``c_i = e_i + F[f_i]``, then the
query token ``Q``). It is computed by the training code path itself: the same
:class:`~llm_features.finetune.packing.BehaviorPacker` (or ``TokenPacker``), the same attention mask
and :meth:`FinetuneModel.user_states`, with ``k = 1`` (one sequence per snapshot: the sliding
window, what ``k = 1`` training and evaluation see). With ``leakage="isolated"`` DTI packing gives
exactly the ``k = 1`` states for any ``k``, so snapshots are then packed ``k`` per sequence (much
faster); with the other leakage variants a ``k > 1`` can be forced (``--targets-per-sequence``) but
is then a different (DTI-packed) state, and the checkpoint identity records it.

Snapshot cadences (mirroring :mod:`llm_features.recent`):

* ``event``: a row at each distinct interaction timestamp ``T`` of the user, holding only
  interactions strictly before ``T``, plus a final row at (last interaction + 1 s);
* ``day``: a row at the start of each UTC day with activity (interactions before that day), plus a
  final row at the start of the day after the last active day;
* ``last``: only the final row (last interaction + 1 s): a fast refresh of the online store.

A snapshot with no earlier interaction (the user's first timestamp / first day) gets no row; users
without history have no embedding, and the ranker handles the missing value.

Incremental and atomic: existing rows are read back first, and only the (user, stamp) snapshots
not yet exported are computed, in chunks of users; each chunk is one part file named after
(checkpoint id, cadence, n, user range, content digest) and written atomically, so a killed run
resumes without duplicates and a rerun with no new interactions writes nothing. Rows of a
different checkpoint (or ``n``) are refused unless ``overwrite`` removes them first. Each part
records, per user, its newest stamp and how many interactions lay before it; interactions that
arrive late (before an already exported stamp) are detected and refused (``overwrite`` recomputes).

Example::

    from llm_features.embed_users import EmbedUsersConfig, embed_users
    report = embed_users(EmbedUsersConfig(checkpoint=Path("runs/finetune"), cadence="event"))
    print(report.summary())
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from llm_features.distributed import barrier, init_from_env, sum_over_ranks
from llm_features.errors import UserError
from llm_features.backbone import configure_threads
from llm_features.fingerprint import FINGERPRINT_METADATA_KEY, FingerprintMismatchError
from llm_features.config import validate_config
from llm_features.devices import resolve_device
from llm_features.finetune.checkpoint import CONFIG, WEIGHTS, check_weights, load_finetuned, read_checkpoint_config
from llm_features.finetune.data import FinetuneData, load_finetune_data
from llm_features.finetune.model import FinetuneModel
from llm_features.finetune.packing import UserHistories, batch_indices, make_blocks
from llm_features.parquet_io import (
    PLACEHOLDER_PART,  # noqa: F401  (re-exported: the placeholder write_part removes)
    drop_placeholder,
    embedding_array,
    file_metadata,
    list_parts,
    utc_us,
    write_part,
)
from llm_features.workspace import Workspace

log = logging.getLogger(__name__)

Cadence = Literal["event", "day", "last"]
CHECKPOINT_METADATA_KEY = "llmfeat.checkpoint"
STATE_METADATA_KEY = "llmfeat.embed_users"
PART_PREFIX = "users"
US_PER_S = 1_000_000
US_PER_DAY = 86_400 * US_PER_S
DEFAULT_EXACT_K = 32
DEFAULT_EVERY = 2  # llmfeat demo's snapshots: four fifths of the exact states' ranker lift (bench_quality)
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


@dataclass
class EmbedUsersConfig:
    """Export aggregated user embeddings (query-token outputs of a fine-tuned checkpoint)."""

    checkpoint: Path | None = field(default=None, metadata={
        "help": "Checkpoint directory written by `llmfeat finetune --out` (default: <data_dir>/runs/finetune, "
                "finetune's default)."})
    data_dir: Path | None = field(default=None, metadata={
        "help": "Workspace data directory (default: $LLMFEAT_DATA_DIR or feast_repo/data)."})
    cadence: Literal["event", "day", "last"] = field(default="event", metadata={
        "help": "event: a row at every distinct interaction time (+ a final row); day: at each active day's "
                "start (+ a final row); last: only the final, current row per user (fast online refresh)."})
    every: int | None = field(default=None, metadata={
        "help": "With cadence=event (default there: 2; other cadences: 1): keep each user's first N "
                "interaction times, then every N-th (+ the final "
                "row). A row is then at most N-1 interactions stale, and Feast's offline point-in-time join, "
                "which pairs every entity row with every earlier row of its user, shrinks about N-fold. Staler "
                "snapshots cost the +LLM ranker AUC (bench_quality, ML-1M: every 2 kept four fifths of the lift "
                "of fresh states, every 8 a third).",
        "min": 1})
    context_size: int | None = field(default=None, metadata={
        "help": "n: strictly earlier interactions per embedding (default: the checkpoint's, as trained).", "min": 1})
    targets_per_sequence: int | None = field(default=None, metadata={
        "help": f"k snapshots packed per sequence (default: {DEFAULT_EXACT_K} for leakage=isolated, where it "
                "is exact, else 1 = the sliding window).", "min": 1})
    batch_size: int = field(default=1024, metadata={"help": "Snapshots per forward pass.", "min": 1})
    users_per_part: int = field(default=512, metadata={
        "help": "Users per part file (the unit a killed run resumes from).", "min": 1})
    overwrite: bool = field(default=False, metadata={
        "help": "Delete existing user_embeddings parts of another checkpoint (or stale ones) first."})
    device: str = field(default="auto", metadata={
        "help": "cpu, cuda, cuda:N, or auto (cuda when available)."})
    num_threads: int | None = field(default=None, metadata={
        "help": "CPU threads for torch (default: the cores this process may use that other processes are "
                "not keeping busy, at least 1; logged).", "min": 1})
    trust_remote_code: bool = field(default=False, metadata={
        "help": "Allow Python code from the checkpoint's model directory (off: only built-in architectures). "
                "Taken from the command line only, never from the checkpoint or a --config file.",
        "cli_only": True})

    def __post_init__(self) -> None:
        if self.every is None:
            self.every = DEFAULT_EVERY if self.cadence == "event" else 1
        if self.checkpoint is None:
            from llm_features.workspace import runs_dir

            self.checkpoint = runs_dir(self.data_dir) / "finetune"


@dataclass
class EmbedUsersReport:
    checkpoint_id: str
    cadence: str
    context_size: int
    targets_per_sequence: int
    exact: bool
    """True when the rows are the k = 1 (sliding-window) states."""
    users: int
    """Users with at least one exported row after this run."""
    rows_written: int
    rows_existing: int
    parts_written: list[str]
    seconds: float
    compute_seconds: float
    forward_states: int
    """Query states computed (>= rows_written: packed runs compute tied timestamps too)."""

    @property
    def rows_per_s(self) -> float:
        return self.rows_written / self.compute_seconds if self.compute_seconds > 0 else 0.0

    def summary(self) -> str:
        return (
            f"user_embeddings: {self.rows_written} new rows in {len(self.parts_written)} parts "
            f"({self.rows_existing} already there; cadence {self.cadence}, n={self.context_size}, "
            f"k={self.targets_per_sequence}{', exact' if self.exact else ''}) in {self.seconds:.1f}s "
            f"({self.rows_per_s:.0f} rows/s), checkpoint {self.checkpoint_id}"
        )


# ----------------------------------------------------------------------------------- checkpoint identity
def checkpoint_identity(path: str | os.PathLike) -> dict[str, Any]:
    """What identifies a checkpoint's embeddings: a hash of its weights and its (semantic) options."""
    path = Path(path)
    meta = json.loads((path / CONFIG).read_text())
    h = hashlib.sha256()
    with open(path / WEIGHTS, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    weights = h.hexdigest()
    options = {k: v for k, v in meta["finetune"].items() if k not in _NON_SEMANTIC}
    blob = json.dumps({"weights": weights, "options": options, "fingerprint": meta["fingerprint"]["digest"]},
                      sort_keys=True, default=str)
    return {
        "id": hashlib.sha256(blob.encode()).hexdigest()[:16],
        "weights_sha256": weights,
        "path": str(path.resolve()),
        "fingerprint": meta["fingerprint"]["digest"],
        "granularity": options.get("granularity"),
        "leakage": options.get("leakage"),
        "trained_context_size": options.get("context_size"),
    }


# ----------------------------------------------------------------------------------- snapshots
def with_final_queries(hist: UserHistories) -> tuple[UserHistories, np.ndarray]:
    """``hist`` plus one query-only row per user at (last interaction + 1 s), after its last row.

    The extra row is only ever a *target*: contexts of a block stop at its last target's
    ``time_start``, and no other target of the user is later, so its behaviour/feedback are never
    read. Returns the extended histories and the positions of the extra rows.
    """
    m, nu = len(hist), len(hist.user_ids)
    counts = np.diff(hist.offsets)
    user_of_row = np.repeat(np.arange(nu), counts)
    pos = np.arange(m) + user_of_row
    final = hist.offsets[1:] + np.arange(nu)
    total = m + nu

    def merged(values: np.ndarray, fill: np.ndarray | int) -> np.ndarray:
        out = np.zeros(total, dtype=values.dtype)
        out[pos] = values
        out[final] = fill
        return out

    last_time = hist.time[hist.offsets[1:] - 1] if nu else np.zeros(0, np.int64)
    ext = UserHistories.from_arrays(
        merged(np.repeat(hist.user_ids, counts), hist.user_ids),
        merged(hist.time, last_time + US_PER_S),
        merged(hist.behavior_row, 0), merged(hist.item_row, 0), merged(hist.label, 0),
        merged(hist.feedback, 0), merged(hist.split, 0),
    )
    return ext, final


@dataclass
class Snapshots:
    """One entry per exported row: ``row`` is the (extended-history) row whose query gives ``u``."""

    user_id: np.ndarray
    row: np.ndarray
    stamp: np.ndarray
    """Microseconds since the epoch, UTC."""


def snapshots(ext: UserHistories, final_rows: np.ndarray, cadence: Cadence, every: int = 1) -> Snapshots:
    """Every row ``cadence`` asks for (users' empty first snapshots excluded).

    With ``cadence="event"`` and ``every > 1``, of a user's interaction times ``1, 2, ...`` (its
    first, with no history, is ``0``) only ``1..every`` and then the multiples of ``every`` are kept.
    """
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    n = len(ext)
    rows = np.arange(n, dtype=np.int64)
    real = np.ones(n, dtype=bool)
    real[final_rows] = False
    nonempty = rows != ext.user_start
    if cadence == "event":
        starts = real & (ext.time_start == rows)
        pick = nonempty & starts
        if every > 1:
            count = np.cumsum(starts)
            idx = count - count[ext.user_start]  # 0 at the user's first interaction time
            pick &= (idx <= every) | (idx % every == 0)
        stamp = ext.time
    elif cadence == "day":
        day = np.floor_divide(ext.time, US_PER_DAY) * US_PER_DAY
        new_day = np.ones(n, dtype=bool)
        new_day[1:] = day[1:] != day[:-1]
        pick = real & nonempty & (new_day | (rows == ext.user_start))
        stamp = day
    elif cadence == "last":
        pick = np.zeros(n, dtype=bool)
        stamp = ext.time
    else:
        raise ValueError(f"cadence must be event, day or last, got {cadence!r}")
    picked = np.flatnonzero(pick)
    last_time = ext.time[final_rows - 1]
    if cadence == "day":
        final_stamp = (np.floor_divide(last_time, US_PER_DAY) + 1) * US_PER_DAY
    else:
        final_stamp = last_time + US_PER_S
    user_of_row = np.repeat(ext.user_ids, np.diff(ext.offsets))
    all_rows = np.concatenate([picked, final_rows])
    stamps = np.concatenate([stamp[picked], final_stamp])
    order = np.lexsort((stamps, user_of_row[all_rows]))
    users = user_of_row[all_rows][order]
    return Snapshots(users, all_rows[order].astype(np.int64), stamps[order].astype(np.int64))


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


def read_existing(directory: Path, identity: dict[str, Any], fingerprint_digest: str) -> Existing:
    """Rows already exported; raises :class:`CheckpointMismatchError` for rows of another checkpoint."""
    parts = list_parts(directory)
    users, stamps = [], []
    state: dict[int, tuple[int, int, str | None]] = {}
    owners: dict[int, list[Path]] = {}
    for p in parts:
        meta = file_metadata(p)
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
                f"{p} holds user embeddings of {what}, but this run exports checkpoint {identity['id']} "
                f"({identity['path']}), n={identity['context_size']}, k={identity['targets_per_sequence']}, "
                f"cadence {identity.get('cadence')}. Rows of two models or cadences must never be mixed: pass "
                "--overwrite to delete the old parts, or use another --data-dir."
            )
        fp = json.loads(meta.get(FINGERPRINT_METADATA_KEY, "{}")).get("digest")
        if fp != fingerprint_digest:
            raise FingerprintMismatchError(
                f"{p} carries backbone fingerprint {fp}, the checkpoint's backbone is {fingerprint_digest}; "
                "pass --overwrite to delete the old parts")
        t = pq.read_table(p, columns=["user_id", "event_timestamp"])
        users.append(t["user_id"].to_numpy())
        stamps.append(utc_us(t["event_timestamp"]).cast(pa.int64()).to_numpy())
        for uid, (stamp, count, *digest) in json.loads(meta.get(STATE_METADATA_KEY, "{}")).get("users", {}).items():
            uid = int(uid)
            if uid not in state or stamp > state[uid][0]:
                state[uid] = (int(stamp), int(count), digest[0] if digest else None)
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
        users = json.loads(file_metadata(p).get(STATE_METADATA_KEY, "{}")).get("users", {})
        for uid, (stamp, count, *digest) in users.items():
            if int(uid) not in state or stamp > state[int(uid)][0]:
                state[int(uid)] = (int(stamp), int(count), digest[0] if digest else None)
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


# ----------------------------------------------------------------------------------- computing states
def _behavior_hashes(texts: list[str]) -> np.ndarray:
    digests = (hashlib.blake2b(t.encode(), digest_size=8).digest() for t in texts)
    return np.array([int.from_bytes(d, "little", signed=True) for d in digests], dtype=np.int64)


@torch.inference_mode()
def compute_user_states(
    model: FinetuneModel,
    packer,
    hist: UserHistories,
    rows: np.ndarray,
    *,
    context_size: int,
    targets_per_sequence: int = 1,
    batch_size: int = 1024,
    device: torch.device | str = "cpu",
) -> tuple[np.ndarray, int]:
    """``[len(rows), D]`` query states ``u`` of the given history rows (the training code path).

    ``rows`` must be sorted. With ``targets_per_sequence > 1`` every row of a user from its first
    requested row on is packed as a target (DTI blocks need consecutive targets); only the
    requested rows are returned. Returns (states, states computed).
    """
    rows = np.asarray(rows, dtype=np.int64)
    n_rows = len(hist)
    if targets_per_sequence <= 1:
        targets = np.zeros(n_rows, dtype=bool)
        targets[rows] = True
    else:  # every row from the user's first requested row to the user's end
        user_idx = np.searchsorted(hist.offsets, rows, side="right") - 1
        first = np.full(len(hist.user_ids), n_rows, dtype=np.int64)
        np.minimum.at(first, user_idx, rows)
        users = np.unique(user_idx)
        delta = np.zeros(n_rows + 1, dtype=np.int64)
        np.add.at(delta, first[users], 1)
        np.add.at(delta, hist.offsets[users + 1], -1)
        targets = np.cumsum(delta[:-1]) > 0
    blocks = make_blocks(hist, targets, max(1, targets_per_sequence), context_size)
    # long sequences together: less padding per batch
    blocks = blocks.take(np.argsort(-blocks.num_tokens, kind="stable"))
    dim = model.backbone.hidden_size
    out_rows, out_states = [], []
    for idx in batch_indices(blocks.num_targets, batch_size):
        batch = packer(blocks.take(idx)).to(device)
        out_states.append(model.user_states(batch).float().cpu().numpy())
        out_rows.append(batch.target_rows.cpu().numpy())
    if not out_rows:
        return np.zeros((0, dim), np.float32), 0
    got_rows = np.concatenate(out_rows)
    states = np.concatenate(out_states)
    order = np.argsort(got_rows)
    pos = np.searchsorted(got_rows[order], rows)
    if len(rows) and not (got_rows[order][np.minimum(pos, len(got_rows) - 1)] == rows).all():
        raise AssertionError("a requested row was not computed")
    return np.ascontiguousarray(states[order[pos]]), len(got_rows)


def final_user_states(
    model: FinetuneModel,
    ft,
    data: FinetuneData,
    *,
    context_size: int,
    batch_size: int = 1024,
    device: torch.device | str = "cpu",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every user's current row, the one embed-users writes at (last interaction + 1 s).

    The same code path as :func:`embed_users`: :func:`with_final_queries`, the checkpoint's packer
    (``make_packer``) and :func:`compute_user_states` with ``k = 1`` (the sliding window; for
    ``leakage="isolated"`` the DTI-packed export is the same state). ``data.hist`` only needs the
    rows a final query reads: a user's last ``context_size`` interactions (``llm_features.events``
    passes just those). Returns ``(user_ids, stamps in µs, [U, D] states)``.
    """
    from llm_features.finetune.packing import make_packer

    ext, final_rows = with_final_queries(data.hist)
    packer = make_packer(ft, FinetuneData(ext, data.behavior_table, data.item_table, data.behavior_texts),
                         model.backbone)
    states, _ = compute_user_states(model, packer, ext, final_rows, context_size=context_size,
                                    targets_per_sequence=1, batch_size=batch_size, device=device)
    return ext.user_ids.copy(), ext.time[final_rows].copy(), states


def _part_table(user_ids: np.ndarray, states: np.ndarray, stamps: np.ndarray) -> pa.Table:
    return pa.Table.from_arrays(
        [pa.array(user_ids, pa.int64()), embedding_array(states),
         pa.array(stamps, pa.int64()).cast(pa.timestamp("us", tz="UTC"))],
        schema=SCHEMA,
    )


# ----------------------------------------------------------------------------------- the command
def embed_users(
    cfg: EmbedUsersConfig,
    *,
    model: FinetuneModel | None = None,
    data: FinetuneData | None = None,
) -> EmbedUsersReport:
    """Export (incrementally) the user embeddings of ``cfg.checkpoint`` into ``user_embeddings/``.

    Args:
        cfg: options.
        model: the loaded checkpoint (tests); loaded from ``cfg.checkpoint`` if None.
        data: already loaded workspace data (tests); read from ``cfg.data_dir`` if None.
    """
    started = time.perf_counter()
    # Everything that can refuse the run is checked before any model code is loaded.
    validate_config(cfg)
    if cfg.every > 1 and cfg.cadence != "event":
        raise UserError(f"{cfg.every} applies to --cadence event only, not {cfg.cadence}", option="--every",
                        fix="Drop --every, or use --cadence event.")
    device = resolve_device(cfg.device)  # under torchrun, cuda is this rank's GPU
    rank, world = init_from_env(device)
    configure_threads(cfg.num_threads)
    _, trained_fp, meta = read_checkpoint_config(cfg.checkpoint)
    check_weights(cfg.checkpoint, meta)
    ws = Workspace.at(cfg.data_dir)
    if data is None and not ws.interactions.exists():
        raise UserError("not found", file=ws.interactions, option="--data-dir",
                        fix="Run `llmfeat ingest` and `llmfeat encode` for this data dir first.")
    manifest = ws.read_fingerprint()
    if manifest is not None and manifest.digest != trained_fp.digest:
        raise FingerprintMismatchError(
            f"{ws.manifest} records model fingerprint {manifest.digest} ({manifest.model_name}), but "
            f"checkpoint {cfg.checkpoint} was trained on {trained_fp.digest} ({trained_fp.model_name}); its user "
            "embeddings would not match this workspace's item and behaviour embeddings."
        )
    ident = checkpoint_identity(cfg.checkpoint)
    if model is None:
        model, ft = load_finetuned(cfg.checkpoint, device=device, trust_remote_code=cfg.trust_remote_code)
    else:
        ft = read_checkpoint_config(cfg.checkpoint)[0]
        model = model.to(device).eval()
    if checkpoint_identity(cfg.checkpoint)["id"] != ident["id"]:
        raise UserError("changed while it was being loaded", file=cfg.checkpoint,
                        fix="Retry when `llmfeat finetune` is done writing it.")
    fp = model.backbone.fingerprint

    n = int(cfg.context_size or ft.context_size)
    if n < 1:
        raise ValueError(f"context_size must be >= 1, got {n}")
    if n != ft.context_size:
        log.warning("serving n=%d differs from the trained n=%d", n, ft.context_size)
    model.context_size = n
    exact_packing = model.leakage == "isolated"
    k = int(cfg.targets_per_sequence or (DEFAULT_EXACT_K if exact_packing else 1))
    exact = k == 1 or exact_packing
    if not exact:
        log.warning("leakage=%s with k=%d: DTI-packed states differ from the k=1 (sliding-window) states",
                    model.leakage, k)
    if cfg.every < 1:
        raise ValueError(f"every must be >= 1, got {cfg.every}")
    cadence = cfg.cadence if cfg.every == 1 or cfg.cadence != "event" else f"event{cfg.every}"
    identity = _serving_identity(ident, n, k, exact, cadence)

    directory = ws.user_embeddings
    if cfg.overwrite and rank == 0:
        for p in list_parts(directory):
            log.info("--overwrite: removing %s", p)
            p.unlink()
    barrier(world)
    existing = read_existing(directory, identity, fp.digest)
    digests = HistoryDigests(ws.interactions) if ws.interactions.exists() else None
    changed = digests.changed(existing.state) if digests is not None else []
    if changed:
        stale_parts = sorted({p for uid in changed for p in existing.owners[uid]})
        barrier(world)  # every rank has read the parts before rank 0 removes any
        if rank == 0:
            log.info("embed-users: %d users' interactions changed content since their embeddings were exported "
                     "(e.g. user %d: a text or label changed); recomputing the %d parts that hold them",
                     len(changed), changed[0], len(stale_parts))
            for p in stale_parts:
                p.unlink()
        barrier(world)
        existing = read_existing(directory, identity, fp.digest)

    if data is None:
        data = load_finetune_data(cfg.data_dir, fp, feedback=ft.feedback,
                                  need_behavior_vectors=ft.granularity == "behavior")
    hist = data.hist
    check_no_late_interactions(hist, existing.state)
    ext, final_rows = with_final_queries(hist)
    snaps = snapshots(ext, final_rows, cfg.cadence, cfg.every)
    done = pd.MultiIndex.from_arrays([snaps.user_id, snaps.stamp]).isin(existing.keys)
    todo = ~done
    work_users = np.unique(snaps.user_id[todo])
    log.info("embed-users: %d snapshots (%s cadence), %d already exported, %d to compute for %d users",
             len(snaps.row), cadence, int(done.sum()), int(todo.sum()), len(work_users))

    from llm_features.finetune.packing import make_packer

    packer = make_packer(ft, FinetuneData(ext, data.behavior_table, data.item_table, data.behavior_texts),
                         model.backbone)
    bhash = _behavior_hashes(data.behavior_texts)
    ext_user = np.repeat(ext.user_ids, np.diff(ext.offsets))
    written: list[str] = []
    rows_written = states_computed = 0
    compute_seconds = 0.0
    per = max(1, int(cfg.users_per_part))
    # part c is rank c % world's: the same part files as one process writes (see llm_features.distributed)
    for c in [c for i, c in enumerate(range(0, len(work_users), per)) if i % world == rank]:
        chunk_users = work_users[c : c + per]
        sel = todo & np.isin(snaps.user_id, chunk_users)
        rows, stamps, uids = snaps.row[sel], snaps.stamp[sel], snaps.user_id[sel]
        # content digest of the chunk's inputs: the snapshots asked for and the users' histories
        urows = np.flatnonzero(np.isin(ext_user, chunk_users))
        key = [identity["id"], cadence, n, identity["targets_per_sequence"]]
        h = hashlib.sha256(json.dumps(key).encode())
        for arr in (uids, stamps, ext_user[urows], ext.time[urows], bhash[ext.behavior_row[urows]],
                    ext.feedback[urows]):
            h.update(np.ascontiguousarray(arr, dtype=np.int64).tobytes())
        name = (f"{PART_PREFIX}-{identity['id'][:12]}-{cadence}-n{n}-u{int(chunk_users[0])}-"
                f"{int(chunk_users[-1])}-{h.hexdigest()[:16]}")
        if (directory / f"part-{name}.parquet").exists():
            continue
        t0 = time.perf_counter()
        order = np.argsort(rows, kind="stable")
        states_sorted, computed = compute_user_states(
            model, packer, ext, rows[order], context_size=n, targets_per_sequence=k,
            batch_size=cfg.batch_size, device=device)
        states = np.empty_like(states_sorted)
        states[order] = states_sorted
        compute_seconds += time.perf_counter() - t0
        states_computed += computed
        # per user: the newest stamp of this part and the interactions strictly before it
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
        meta = {
            FINGERPRINT_METADATA_KEY: fp.to_json(),
            CHECKPOINT_METADATA_KEY: json.dumps(identity, sort_keys=True),
            STATE_METADATA_KEY: json.dumps({"cadence": cadence, "context_size": n,
                                            "targets_per_sequence": k, "users": user_state}, sort_keys=True),
        }
        write_part(directory, _part_table(uids, states, stamps), metadata=meta, name=name)
        drop_placeholder(directory)
        written.append(name)
        rows_written += len(rows)
        log.info("embed-users: part %s, %d rows (%d users)", name, len(rows), len(chunk_users))
    drop_placeholder(directory)
    users = np.unique(np.concatenate([existing.keys.get_level_values(0).to_numpy(), snaps.user_id[todo]]))
    seconds = time.perf_counter() - started
    if world > 1:
        total = sum_over_ranks({"rows_written": rows_written, "forward_states": states_computed,
                                "compute_seconds": compute_seconds, "seconds": seconds, "parts": written},
                               world, maximum=("compute_seconds", "seconds"))
        rows_written, states_computed = total["rows_written"], total["forward_states"]
        compute_seconds, seconds, written = total["compute_seconds"], total["seconds"], sorted(total["parts"])
        barrier(world)
    report = EmbedUsersReport(
        checkpoint_id=identity["id"], cadence=cadence, context_size=n, targets_per_sequence=k,
        exact=exact, users=len(users), rows_written=rows_written, rows_existing=int(done.sum()),
        parts_written=written, seconds=seconds, compute_seconds=compute_seconds,
        forward_states=states_computed,
    )
    log.info("%s", report.summary())
    return report


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
    "CHECKPOINT_METADATA_KEY", "CheckpointMismatchError", "EmbedUsersConfig", "EmbedUsersReport",
    "LateInteractionsError", "Snapshots", "checkpoint_identity", "compute_user_states", "embed_users",
    "final_user_states", "read_user_embeddings", "snapshots", "with_final_queries",
]


