"""The atomic encoding stage (BAHE, offline half): every distinct text once through the frozen shallow layers.

Reads ``canonical/interactions.parquet`` and ``canonical/items.parquet`` and writes

- ``atomic_behavior_embeddings/``: behavior_id, behavior_embedding, event_timestamp (first time seen),
- ``item_embeddings/``: item_id, item_embedding, event_timestamp (the item's, else first time seen),

as parquet part files carrying the model fingerprint. Texts are keyed by ``stable_id`` of their normalised
text, so a behaviour that occurs a thousand times, or an item whose text equals a behaviour text, is
encoded once.

The stage is incremental and restartable. Ids already present in parts of the same fingerprint are
skipped; the texts left are encoded in chunks of ``part_size`` and each chunk is written as soon as it is
done, under a name derived from its content. A killed run therefore keeps its finished parts, and the
next run picks up where it stopped without duplicates. What the stage reads (the canonical texts, what
the parts hold): :mod:`llm_features.encode_inputs`.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from llm_features.atomic import write_json
from llm_features.backbone import Backbone, BackboneConfig, configure_threads
from llm_features.config import RuntimeArgs, data_dir_field, validate_config
from llm_features.devices import resolve_device
from llm_features.distributed import barrier, init_from_env, sum_over_ranks
from llm_features.encode_inputs import (
    Texts,
    existing_ids,
    find_stale_items,
    read_texts,
    stored_vectors,
    without,
)
from llm_features.fingerprint import FINGERPRINT_METADATA_KEY, ModelFingerprint
from llm_features.ids import normalize_text
from llm_features.parquet_io import embedding_array, utc_us, write_part
from llm_features.workspace import Workspace

log = logging.getLogger(__name__)

ENCODE_REPORT = "encode_report.json"


@dataclass
class EncodeConfig:
    """``llmfeat encode``: the backbone options plus where and how to encode."""

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    data_dir: Path | None = data_dir_field()
    batch_size: int = field(default=64, metadata={"help": "Texts per forward pass.", "min": 1})
    part_size: int = field(default=4096, metadata={
        "help": "Texts per part file (the unit a killed run resumes from).", "min": 1})
    runtime: RuntimeArgs = field(default_factory=RuntimeArgs)
    progress: bool = field(default=True, metadata={"help": "Show a progress bar."})


@dataclass
class EncodeStats:
    """What one encode run saw and did."""

    fingerprint: str
    occurrences: int
    """Behaviour occurrences: rows of interactions."""
    distinct_behaviors: int
    dedup_ratio: float
    """occurrences / distinct_behaviors: how many encodings the dedup saves per encoded behaviour."""
    distinct_items: int
    distinct_texts: int
    """Distinct texts over behaviours and items together."""
    shared_item_texts: int
    """Distinct item texts that equal a behaviour text (encoded once for both)."""
    already_encoded: int
    """Distinct texts skipped because a part of the same fingerprint holds them."""
    stale_items: int
    """Items whose text changed since their vector was written: old rows removed, text re-encoded."""
    texts_encoded: int
    real_tokens: int
    padded_tokens: int
    behavior_rows_written: int
    item_rows_written: int
    parts_written: int
    seconds: float
    """Wall time of the whole run (reading, model load, encoding, writing)."""
    encode_seconds: float
    """Wall time of the encoding loop alone (forward passes and part writes)."""

    @property
    def texts_per_s(self) -> float:
        return self.texts_encoded / self.encode_seconds if self.encode_seconds > 0 else 0.0

    @property
    def padding_efficiency(self) -> float:
        return self.real_tokens / self.padded_tokens if self.padded_tokens else 1.0

    def to_dict(self) -> dict:
        return {**asdict(self), "texts_per_s": self.texts_per_s,
                "padding_efficiency": self.padding_efficiency}

    def summary(self) -> str:
        return (
            f"encode [{self.fingerprint}]: {self.occurrences} behaviour occurrences, "
            f"{self.distinct_behaviors} distinct (dedup ratio {self.dedup_ratio:.1f}x); "
            f"{self.distinct_items} items, {self.shared_item_texts} sharing a behaviour text; "
            f"{self.distinct_texts} distinct texts, {self.already_encoded} already encoded, "
            + (f"{self.stale_items} items with a changed text, " if self.stale_items else "")
            + f"{self.texts_encoded} encoded in {self.encode_seconds:.1f}s ({self.texts_per_s:.0f} texts/s, "
            f"padding efficiency {self.padding_efficiency:.2f}); "
            f"wrote {self.behavior_rows_written} behaviour + {self.item_rows_written} item rows "
            f"in {self.parts_written} parts ({self.seconds:.1f}s in all)"
        )


# --------------------------------------------------------------------------- writing
def _part_name(fp: ModelFingerprint, kind: str, ids: Iterable[int]) -> str:
    """Deterministic: the same ids under the same fingerprint always give the same part name."""
    h = hashlib.blake2b(np.asarray(sorted(ids), dtype=np.int64).tobytes(), digest_size=8).hexdigest()
    return f"{fp.digest}-{kind}-{h}"


def _write(directory: Path, kind: str, columns: dict, fp: ModelFingerprint) -> Path:
    table = pa.table(columns)
    id_column = next(iter(columns))
    name = _part_name(fp, kind, table[id_column].to_pylist())
    return write_part(directory, table, metadata={FINGERPRINT_METADATA_KEY: fp.to_json()}, name=name)


def _drop_rows(part: Path, column: str, ids: set[int], fp: ModelFingerprint, kind: str) -> Path | None:
    """Rewrite ``part`` without the rows whose ``column`` is in ``ids`` (then remove the old file).

    The rewritten part is named by its content, so a run killed between the write and the unlink
    rewrites it to the same name on the next run: no row is lost, none is served twice for long.
    """
    t = pq.read_table(part)
    keep = without(t, column, ids)
    new = None
    if keep.num_rows:
        name = _part_name(fp, kind, keep[column].to_pylist())
        new = write_part(part.parent, keep, metadata={FINGERPRINT_METADATA_KEY: fp.to_json()}, name=name)
    if new != part:
        part.unlink()
    return new


def _write_rows(
    ws: Workspace,
    fp: ModelFingerprint,
    vectors: dict[int, np.ndarray],
    behaviors: pa.Table,
    items: pa.Table,
) -> tuple[list[Path], int, int]:
    """Write the behaviour rows and the item rows whose text key has a vector in ``vectors``.

    Behaviours first: if the run dies in between, the next run takes the items' vectors from the
    behaviour part instead of encoding them again.
    """
    paths, nb, ni = [], 0, 0
    keys = pa.array(sorted(vectors), pa.int64())
    b = behaviors.filter(pc.is_in(behaviors["behavior_id"], value_set=keys))
    if b.num_rows:
        vec = np.stack([vectors[k] for k in b["behavior_id"].to_pylist()])
        paths.append(_write(ws.atomic_behavior_embeddings, "behavior", {
            "behavior_id": b["behavior_id"].cast(pa.int64()),
            "behavior_embedding": embedding_array(vec),
            "event_timestamp": utc_us(b["event_timestamp"]),
        }, fp))
        nb = b.num_rows
    i = items.filter(pc.is_in(items["text_key"], value_set=keys))
    if i.num_rows:
        vec = np.stack([vectors[k] for k in i["text_key"].to_pylist()])
        paths.append(_write(ws.item_embeddings, "item", {
            "item_id": i["item_id"],
            "item_embedding": embedding_array(vec),
            "event_timestamp": utc_us(i["event_timestamp"]),
            "text_key": i["text_key"],  # the text it was encoded from: a changed text is re-encoded
        }, fp))
        ni = i.num_rows
    return paths, nb, ni


def _write_report(ws: Workspace, stats: EncodeStats) -> Path:
    return write_json(ws.root / ENCODE_REPORT, stats.to_dict())


# --------------------------------------------------------------------------- the stage
@dataclass
class _Work:
    """What is left to encode once the parts already written are accounted for."""

    behaviors: pa.Table
    """Behaviour rows without a vector of this fingerprint yet."""
    items: pa.Table
    """Item rows without a current vector (none yet, or one of an older text)."""
    text_of: dict[int, str]
    """Text key -> text, over every distinct behaviour and item text."""
    needed: set[int]
    """Text keys still without a vector."""
    done_behaviors: set[int]
    stale_items: list[int]


@dataclass
class _Progress:
    """Counts written rows and parts into ``stats`` and tells ``on_part`` of each part."""

    stats: EncodeStats
    on_part: Callable[[Path], None] | None

    def record(self, paths: list[Path], nb: int, ni: int) -> None:
        self.stats.behavior_rows_written += nb
        self.stats.item_rows_written += ni
        self.stats.parts_written += len(paths)
        for p in paths:
            if self.on_part is not None:
                self.on_part(p)


def encode(
    cfg: EncodeConfig,
    *,
    backbone: Backbone | None = None,
    on_part: Callable[[Path], None] | None = None,
) -> EncodeStats:
    """Encode every distinct behaviour and item text of the workspace not yet encoded by this model.

    Args:
        cfg: the stage's options (the backbone options included).
        backbone: an already loaded backbone (must match ``cfg``'s model); loaded from ``cfg`` if None.
        on_part: called with each part file's path right after it is written (progress hooks, tests).

    Returns:
        :class:`EncodeStats`; the same numbers are written to ``<data_dir>/encode_report.json``.
    """
    t0 = time.perf_counter()
    validate_config(cfg)
    device = resolve_device(cfg.runtime.device)
    rank, world = init_from_env(device)
    ws = Workspace.at(cfg.data_dir)
    configure_threads(cfg.runtime.num_threads)
    texts = read_texts(ws)
    bb = backbone or Backbone.load(cfg.backbone, device=device)
    fp = bb.fingerprint
    work = _plan(ws, fp, texts, rank, world)
    stats = _initial_stats(fp, texts, work)
    progress = _Progress(stats, on_part)
    # Items whose text a finished behaviour part already holds (e.g. a run killed between the two writes).
    reused = stored_vectors(ws.atomic_behavior_embeddings, (work.needed & work.done_behaviors))
    if reused and rank == 0:
        progress.record(*_write_rows(ws, fp, reused, work.behaviors.slice(0, 0), work.items))
    todo = sorted(work.needed - reused.keys())
    encode_t0 = time.perf_counter()
    _encode_parts(cfg, bb, ws, work, todo, progress, rank=rank, world=world)
    stats.encode_seconds = time.perf_counter() - encode_t0
    stats.seconds = time.perf_counter() - t0
    _finish(ws, stats, rank=rank, world=world)
    log.debug(stats.summary())
    return stats


def _plan(ws: Workspace, fp: ModelFingerprint, texts: Texts, rank: int, world: int) -> _Work:
    """What the parts of fingerprint ``fp`` lack; rank 0 drops the vectors of changed item texts."""
    done_behaviors = existing_ids(ws.atomic_behavior_embeddings, "behavior_id", fp)
    done_items, stale_parts = find_stale_items(ws.item_embeddings, fp, texts.items)
    stale_items = sorted({i for ids in stale_parts.values() for i in ids})
    barrier(world)  # every rank has read the parts before rank 0 rewrites any
    if rank == 0:
        ws.claim_fingerprint(fp)
        if stale_items:
            log.info("encode: %d items changed their text since they were encoded (e.g. item %d): their old "
                     "vectors are removed and their new texts encoded", len(stale_items), stale_items[0])
            for part, ids in stale_parts.items():
                _drop_rows(part, "item_id", ids, fp, "item")
    behaviors = without(texts.behaviors, "behavior_id", done_behaviors)
    items = without(texts.items, "item_id", done_items)

    text_of = dict(zip(texts.items["text_key"].to_pylist(), texts.items["item_text"].to_pylist()))
    behavior_ids = texts.behaviors["behavior_id"].to_pylist()
    text_of.update(zip(behavior_ids, texts.behaviors["behavior_text"].to_pylist()))
    needed = set(behaviors["behavior_id"].to_pylist()) | set(items["text_key"].to_pylist())
    return _Work(behaviors, items, text_of, needed, done_behaviors, stale_items)


def _initial_stats(fp: ModelFingerprint, texts: Texts, work: _Work) -> EncodeStats:
    """What the run saw, before it encodes anything."""
    behavior_keys = set(texts.behaviors["behavior_id"].to_pylist())
    item_keys = set(texts.items["text_key"].to_pylist())
    return EncodeStats(
        fingerprint=fp.digest,
        occurrences=texts.occurrences,
        distinct_behaviors=len(behavior_keys),
        dedup_ratio=texts.occurrences / max(len(behavior_keys), 1),
        distinct_items=texts.items.num_rows,
        distinct_texts=len(work.text_of),
        shared_item_texts=len(item_keys & behavior_keys),
        already_encoded=len(work.text_of) - len(work.needed),
        stale_items=len(work.stale_items),
        texts_encoded=0, real_tokens=0, padded_tokens=0,
        behavior_rows_written=0, item_rows_written=0, parts_written=0, seconds=0.0, encode_seconds=0.0,
    )


def _encode_parts(cfg: EncodeConfig, bb: Backbone, ws: Workspace, work: _Work, todo: list[int],
                  progress: _Progress, *, rank: int, world: int) -> None:
    """Encode this rank's share of ``todo`` in parts of ``cfg.part_size`` texts, each written when done."""
    from tqdm.auto import tqdm

    stats = progress.stats

    def on_batch(n: int, real: int, padded: int) -> None:
        stats.real_tokens += real
        stats.padded_tokens += padded
        bar.update(n)

    # part c is rank c % world's: the same part files as one process writes (see llm_features.distributed)
    mine = [start for c, start in enumerate(range(0, len(todo), cfg.part_size)) if c % world == rank]
    total = sum(len(todo[start : start + cfg.part_size]) for start in mine)
    bar = tqdm(total=total, unit="text", desc=f"encode (rank {rank}/{world})" if world > 1 else "encode",
               disable=not cfg.progress, dynamic_ncols=True)
    with bar:
        for start in mine:
            keys = todo[start : start + cfg.part_size]
            # the normalised text: the vector then does not depend on which spelling was seen first
            batch_texts = [normalize_text(work.text_of[k]) for k in keys]
            vectors = bb.encode_texts(batch_texts, batch_size=cfg.batch_size, on_batch=on_batch)
            stats.texts_encoded += len(keys)
            progress.record(*_write_rows(ws, bb.fingerprint, dict(zip(keys, vectors.numpy())), work.behaviors,
                                         work.items))


def _finish(ws: Workspace, stats: EncodeStats, *, rank: int, world: int) -> None:
    """Sum the ranks' counts (times: the slowest rank's) and write the report."""
    if world > 1:
        summed = ("texts_encoded", "real_tokens", "padded_tokens", "behavior_rows_written", "item_rows_written",
                  "parts_written", "encode_seconds", "seconds")
        total_stats = sum_over_ranks({k: getattr(stats, k) for k in summed}, world,
                                     maximum=("encode_seconds", "seconds"))
        for k, v in total_stats.items():
            setattr(stats, k, v)
    if rank == 0:
        _write_report(ws, stats)
    barrier(world)
