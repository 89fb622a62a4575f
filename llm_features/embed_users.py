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

Snapshot cadences (:mod:`llm_features.schedule`, shared with :mod:`llm_features.recent`):

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

Which rows and how they are computed: :mod:`llm_features.user_states`; what ``user_embeddings/``
holds and records: :mod:`llm_features.user_embedding_parts`; this module: the command.

Example::

    from llm_features.embed_users import EmbedUsersConfig, embed_users
    report = embed_users(EmbedUsersConfig(checkpoint=Path("runs/finetune"), cadence="event"))
    print(report.summary())
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch

from llm_features.backbone import configure_threads
from llm_features.config import RuntimeArgs, data_dir_field, validate_config
from llm_features.devices import resolve_device
from llm_features.distributed import barrier, init_from_env, sum_over_ranks
from llm_features.errors import UserError
from llm_features.finetune.loading import check_weights, load_finetuned, read_checkpoint_config
from llm_features.finetune.data import FinetuneData, load_finetune_data
from llm_features.finetune.model import FinetuneModel
from llm_features.finetune.packing import UserHistories
from llm_features.fingerprint import ModelFingerprint
from llm_features.parquet_io import (
    PLACEHOLDER_PART,  # noqa: F401  (re-exported: the placeholder write_part removes)
    drop_placeholder,
    list_parts,
    write_part,
)
from llm_features.schedule import US_PER_DAY, US_PER_S, Cadence, SnapshotSchedule, check_every  # noqa: F401
# re-exported (also the private ones llm_features.events uses): their import path before the split
from llm_features.user_embedding_parts import (  # noqa: F401
    CHECKPOINT_METADATA_KEY, PART_PREFIX, SCHEMA, STATE_METADATA_KEY, CheckpointMismatchError, Existing,
    HistoryDigests, LateInteractionsError, PartInputs, _part_table, _serving_identity,
    check_no_late_interactions, checkpoint_identity, part_metadata, read_existing, read_user_embeddings,
    stale_user_embeddings,
)
from llm_features.user_states import (  # noqa: F401
    Snapshots, compute_user_states, final_user_states, snapshots, with_final_queries,
)
from llm_features.workspace import Workspace

log = logging.getLogger(__name__)

DEFAULT_EXACT_K = 32
DEFAULT_EVERY = 2  # llmfeat demo's snapshots: four fifths of the exact states' ranker lift (bench_quality)


@dataclass
class EmbedUsersConfig:
    """Export aggregated user embeddings (query-token outputs of a fine-tuned checkpoint)."""

    checkpoint: Path | None = field(default=None, metadata={
        "help": "Checkpoint directory written by `llmfeat finetune --out` (default: <data_dir>/runs/finetune, "
                "finetune's default)."})
    data_dir: Path | None = data_dir_field()
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
    runtime: RuntimeArgs = field(default_factory=RuntimeArgs)
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



# ----------------------------------------------------------------------------------- the command
@dataclass
class _Run:
    """One embed-users run: where it runs, the loaded checkpoint and the serving options of its rows."""

    device: torch.device
    rank: int
    world: int
    ws: Workspace
    model: FinetuneModel
    ft: Any
    """The checkpoint's FinetuneConfig."""
    fp: ModelFingerprint
    identity: dict[str, Any]
    """The checkpoint identity plus n, k and the cadence label: what every part records."""
    n: int
    k: int
    exact: bool
    schedule: SnapshotSchedule

    @property
    def cadence(self) -> str:
        return self.schedule.label


@dataclass
class _Plan:
    """The snapshots asked for and which of them are still to compute."""

    data: FinetuneData
    ext: UserHistories
    snaps: Snapshots
    done: np.ndarray
    todo: np.ndarray
    work_users: np.ndarray


@dataclass
class _Progress:
    written: list[str] = field(default_factory=list)
    rows_written: int = 0
    states_computed: int = 0
    compute_seconds: float = 0.0


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
    run = _open_run(cfg, model, data_given=data is not None)
    existing, digests = _existing_rows(cfg, run)
    plan = _plan(cfg, run, data, existing)
    progress = _write_parts(cfg, run, plan, digests)
    drop_placeholder(run.ws.user_embeddings)
    users = np.unique(np.concatenate([existing.keys.get_level_values(0).to_numpy(),
                                      plan.snaps.user_id[plan.todo]]))
    report = _report(run, plan, progress, users=len(users), seconds=time.perf_counter() - started)
    log.info("%s", report.summary())
    return report


def _open_run(cfg: EmbedUsersConfig, model: FinetuneModel | None, *, data_given: bool) -> _Run:
    """Every check that can refuse the run, before any model code is loaded; then the model."""
    validate_config(cfg)
    if cfg.every > 1 and cfg.cadence != "event":
        raise UserError(f"{cfg.every} applies to --cadence event only, not {cfg.cadence}", option="--every",
                        fix="Drop --every, or use --cadence event.")
    device = resolve_device(cfg.runtime.device)  # under torchrun, cuda is this rank's GPU
    rank, world = init_from_env(device)
    configure_threads(cfg.runtime.num_threads)
    _, trained_fp, meta = read_checkpoint_config(cfg.checkpoint)
    check_weights(cfg.checkpoint, meta)
    ws = Workspace.at(cfg.data_dir)
    if not data_given and not ws.interactions.exists():
        raise UserError("not found", file=ws.interactions, option="--data-dir",
                        fix="Run `llmfeat ingest` and `llmfeat encode` for this data dir first.")
    manifest = ws.read_fingerprint()
    if manifest is not None:
        trained_fp.require_same(manifest, lambda _found, _this: (
            f"{ws.manifest} records model fingerprint {manifest.digest} ({manifest.model_name}), but "
            f"checkpoint {cfg.checkpoint} was trained on {trained_fp.digest} ({trained_fp.model_name}); its user "
            "embeddings would not match this workspace's item and behaviour embeddings."))
    model, ft, ident = _load_model(cfg, model, device)
    n, k, exact = _serving_options(cfg, model, ft)
    schedule = SnapshotSchedule(cfg.cadence, cfg.every)
    identity = _serving_identity(ident, n, k, exact, schedule.label)
    fp = model.backbone.fingerprint
    return _Run(device, rank, world, ws, model, ft, fp, identity, n, k, exact, schedule)


def _load_model(cfg: EmbedUsersConfig, model: FinetuneModel | None, device: torch.device):
    """(model on ``device``, its FinetuneConfig, its :func:`checkpoint_identity`)."""
    ident = checkpoint_identity(cfg.checkpoint)
    if model is None:
        model, ft = load_finetuned(cfg.checkpoint, device=device, trust_remote_code=cfg.trust_remote_code)
    else:
        ft = read_checkpoint_config(cfg.checkpoint)[0]
        model = model.to(device).eval()
    if checkpoint_identity(cfg.checkpoint)["id"] != ident["id"]:
        raise UserError("changed while it was being loaded", file=cfg.checkpoint,
                        fix="Retry when `llmfeat finetune` is done writing it.")
    return model, ft, ident


def _serving_options(cfg: EmbedUsersConfig, model: FinetuneModel, ft) -> tuple[int, int, bool]:
    """(n, k, exact): the context size and packing of the rows (sets ``model.context_size``)."""
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
    check_every(cfg.every)
    return n, k, exact


def _existing_rows(cfg: EmbedUsersConfig, run: _Run) -> tuple[Existing, HistoryDigests | None]:
    """The rows already exported (after ``--overwrite`` and after dropping parts whose inputs changed)."""
    directory = run.ws.user_embeddings
    if cfg.overwrite and run.rank == 0:
        for p in list_parts(directory):
            log.info("--overwrite: removing %s", p)
            p.unlink()
    barrier(run.world)
    existing = read_existing(directory, run.identity, run.fp)
    digests = HistoryDigests(run.ws.interactions) if run.ws.interactions.exists() else None
    changed = digests.changed(existing.state) if digests is not None else []
    if changed:
        stale_parts = sorted({p for uid in changed for p in existing.owners[uid]})
        barrier(run.world)  # every rank has read the parts before rank 0 removes any
        if run.rank == 0:
            log.info("embed-users: %d users' interactions changed content since their embeddings were exported "
                     "(e.g. user %d: a text or label changed); recomputing the %d parts that hold them",
                     len(changed), changed[0], len(stale_parts))
            for p in stale_parts:
                p.unlink()
        barrier(run.world)
        existing = read_existing(directory, run.identity, run.fp)
    return existing, digests


def _plan(cfg: EmbedUsersConfig, run: _Run, data: FinetuneData | None, existing: Existing) -> _Plan:
    """Every snapshot the cadence asks for, and which of them are not exported yet."""
    if data is None:
        data = load_finetune_data(cfg.data_dir, run.fp, feedback=run.ft.feedback,
                                  need_behavior_vectors=run.ft.granularity == "behavior")
    check_no_late_interactions(data.hist, existing.state)
    ext, final_rows = with_final_queries(data.hist)
    snaps = snapshots(ext, final_rows, cfg.cadence, cfg.every)
    done = pd.MultiIndex.from_arrays([snaps.user_id, snaps.stamp]).isin(existing.keys)
    todo = ~done
    work_users = np.unique(snaps.user_id[todo])
    log.info("embed-users: %d snapshots (%s cadence), %d already exported, %d to compute for %d users",
             len(snaps.row), run.cadence, int(done.sum()), int(todo.sum()), len(work_users))
    return _Plan(data, ext, snaps, done, todo, work_users)


def _write_parts(cfg: EmbedUsersConfig, run: _Run, plan: _Plan, digests: HistoryDigests | None) -> _Progress:
    """Compute and write this rank's parts of the users to do, one part per ``users_per_part`` users."""
    from llm_features.finetune.packing import make_packer

    data, ext, snaps = plan.data, plan.ext, plan.snaps
    packer = make_packer(run.ft, FinetuneData(ext, data.behavior_table, data.item_table, data.behavior_texts),
                         run.model.backbone)
    inputs = PartInputs.of(ext, data.behavior_texts)
    directory = run.ws.user_embeddings
    progress = _Progress()
    per = max(1, int(cfg.users_per_part))
    # part c is rank c % world's: the same part files as one process writes (see llm_features.distributed)
    for c in [c for i, c in enumerate(range(0, len(plan.work_users), per)) if i % run.world == run.rank]:
        chunk_users = plan.work_users[c : c + per]
        sel = plan.todo & np.isin(snaps.user_id, chunk_users)
        rows, stamps, uids = snaps.row[sel], snaps.stamp[sel], snaps.user_id[sel]
        name = inputs.part_name(run.identity, run.cadence, run.n, chunk_users, uids, stamps)
        if (directory / f"part-{name}.parquet").exists():
            continue
        t0 = time.perf_counter()
        states, computed = _states_of(cfg, run, packer, ext, rows)
        progress.compute_seconds += time.perf_counter() - t0
        progress.states_computed += computed
        serving = {"cadence": run.cadence, "context_size": run.n, "targets_per_sequence": run.k}
        meta = part_metadata(run.fp, run.identity, serving, inputs.users_state(rows, stamps, uids, digests))
        write_part(directory, _part_table(uids, states, stamps), metadata=meta, name=name)
        drop_placeholder(directory)
        progress.written.append(name)
        progress.rows_written += len(rows)
        log.info("embed-users: part %s, %d rows (%d users)", name, len(rows), len(chunk_users))
    return progress


def _states_of(cfg: EmbedUsersConfig, run: _Run, packer, ext: UserHistories, rows: np.ndarray):
    """(``[len(rows), D]`` states in the order of ``rows``, states computed)."""
    order = np.argsort(rows, kind="stable")
    states_sorted, computed = compute_user_states(
        run.model, packer, ext, rows[order], context_size=run.n, targets_per_sequence=run.k,
        batch_size=cfg.batch_size, device=run.device)
    states = np.empty_like(states_sorted)
    states[order] = states_sorted
    return states, computed


def _report(run: _Run, plan: _Plan, progress: _Progress, *, users: int, seconds: float) -> EmbedUsersReport:
    """The run's report; under torchrun, summed over the ranks (times: the slowest rank's)."""
    p = progress
    rows_written, states_computed, compute_seconds, written = (
        p.rows_written, p.states_computed, p.compute_seconds, p.written)
    if run.world > 1:
        total = sum_over_ranks({"rows_written": rows_written, "forward_states": states_computed,
                                "compute_seconds": compute_seconds, "seconds": seconds, "parts": written},
                               run.world, maximum=("compute_seconds", "seconds"))
        rows_written, states_computed = total["rows_written"], total["forward_states"]
        compute_seconds, seconds, written = total["compute_seconds"], total["seconds"], sorted(total["parts"])
        barrier(run.world)
    return EmbedUsersReport(
        checkpoint_id=run.identity["id"], cadence=run.cadence, context_size=run.n, targets_per_sequence=run.k,
        exact=run.exact, users=users, rows_written=rows_written, rows_existing=int(plan.done.sum()),
        parts_written=written, seconds=seconds, compute_seconds=compute_seconds,
        forward_states=states_computed,
    )


__all__ = [
    "CHECKPOINT_METADATA_KEY", "CheckpointMismatchError", "EmbedUsersConfig", "EmbedUsersReport",
    "LateInteractionsError", "Snapshots", "checkpoint_identity", "compute_user_states", "embed_users",
    "final_user_states", "read_user_embeddings", "snapshots", "with_final_queries",
]
