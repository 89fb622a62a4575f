"""The global-time train/valid/test split, recorded once in ``split.json``."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from llm_features.ingest.errors import IngestError

# The splits, in time order; a split's code (0/1/2) is its position, as stored in the `split` column.
SPLITS = ("train", "valid", "test")
SPLIT_CODES = {name: code for code, name in enumerate(SPLITS)}


def parse_ratios(spec: str) -> tuple[float, float, float]:
    """``"0.8,0.1,0.1"`` or ``"8:1:1"`` to three fractions summing to 1; each must be > 0 (an empty
    valid or test split would leave the ranker nothing to stop on or to report)."""
    try:
        vals = [float(v) for v in re.split(r"[,:/\s]+", str(spec).strip()) if v]
    except ValueError:
        vals = []
    if len(vals) != 3 or not all(math.isfinite(v) for v in vals) or min(vals) < 0 or sum(vals) <= 0:
        raise IngestError(
            f"{spec!r} is not three non-negative numbers (train, valid, test)",
            option="--split-ratios",
            fix="For example --split-ratios 0.8,0.1,0.1 or 8:1:1.",
        )
    empty = [name for name, v in zip(SPLITS, vals) if v == 0]
    if empty:
        raise IngestError(
            f"{spec!r} leaves the {' and '.join(empty)} split{'s' if len(empty) > 1 else ''} empty "
            "(the ranker trains on train, stops on valid and reports its AUC on test)",
            option="--split-ratios",
            fix="Give every split a share > 0, e.g. --split-ratios 0.8,0.1,0.1.",
        )
    total = sum(vals)
    r = [round(v / total, 10) for v in vals]
    return r[0], r[1], r[2]


def iso_us(us: int) -> str:
    return datetime.fromtimestamp(us / 1e6, tz=timezone.utc).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class SplitBoundaries:
    ratios: tuple[float, float, float]
    valid_start_us: int
    test_start_us: int

    @classmethod
    def compute(cls, ts_us: np.ndarray, ratios: tuple[float, float, float]) -> SplitBoundaries:
        """Boundaries at the 80% / 90% row positions of the time order; a boundary is a timestamp, so
        rows with equal timestamps always land on the same side."""
        s = np.sort(np.asarray(ts_us, dtype=np.int64))
        n = len(s)

        def at(frac: float) -> int:
            k = int(round(frac * n))
            return int(s[k]) if k < n else int(s[-1]) + 1

        valid = at(ratios[0])
        test = max(at(ratios[0] + ratios[1]), valid)
        return cls(tuple(ratios), valid, test)  # type: ignore[arg-type]

    def assign(self, ts_us: np.ndarray) -> np.ndarray:
        """Split codes 0/1/2 (train/valid/test) for each timestamp."""
        ts = np.asarray(ts_us, dtype=np.int64)
        return (ts >= self.valid_start_us).astype(np.int8) + (ts >= self.test_start_us).astype(np.int8)

    def to_json(self, counts: dict[str, int], recorded_at: str, rows_when_recorded: int) -> dict[str, Any]:
        return {
            "method": "global_time",
            "ratios": list(self.ratios),
            "valid_start": iso_us(self.valid_start_us),
            "test_start": iso_us(self.test_start_us),
            "valid_start_us": self.valid_start_us,
            "test_start_us": self.test_start_us,
            "rule": "train: ts < valid_start; valid: valid_start <= ts < test_start; test: ts >= test_start",
            "recorded_at": recorded_at,
            "rows_when_recorded": rows_when_recorded,
            "counts": counts,
        }

    @classmethod
    def from_json(cls, path: Path) -> SplitBoundaries:
        try:
            d = json.loads(path.read_text())
            r0, r1, r2 = (float(r) for r in d["ratios"])
            return cls((r0, r1, r2), int(d["valid_start_us"]), int(d["test_start_us"]))
        except (ValueError, KeyError, TypeError) as e:
            raise IngestError(
                f"cannot read the recorded split ({e!r})",
                file=path,
                fix="Pass --resplit to compute and record it again.",
            ) from None


def recorded_split(
    path: Path, ratios: tuple[float, float, float], resplit: bool
) -> tuple[SplitBoundaries | None, dict[str, Any] | None]:
    """The boundaries ``split.json`` records and its whole content, or ``(None, None)`` where there is
    none or ``resplit``; recorded ratios other than ``ratios`` are an error."""
    if not path.exists() or resplit:
        return None, None
    recorded = SplitBoundaries.from_json(path)
    if not np.allclose(recorded.ratios, ratios):
        raise IngestError(
            f"the recorded split has ratios {list(recorded.ratios)} but --split-ratios is {list(ratios)}",
            file=path,
            fix="Keep the recorded ratios, or pass --resplit to record new boundaries.",
        )
    return recorded, json.loads(path.read_text())


def _degenerate(codes: np.ndarray) -> bool:
    return bool((codes == 0).sum() == 0 or (codes > 0).sum() == 0)


def assign_split(
    ts: np.ndarray, ratios: tuple[float, float, float], recorded: SplitBoundaries | None, path: Path | None
) -> tuple[SplitBoundaries, np.ndarray]:
    """The boundaries (``recorded``, else fresh ones of ``ratios``) and the split code of each time.

    Recorded boundaries that leave no training rows, or no validation and test rows, where fresh
    ones would not are refused: the workspace is likely another dataset's."""
    fresh = SplitBoundaries.compute(ts, ratios)
    split = fresh if recorded is None else recorded
    split_codes = split.assign(ts)
    if split is not fresh and _degenerate(split_codes) and not _degenerate(fresh.assign(ts)):
        raise IngestError(
            f"the recorded split (valid from {iso_us(split.valid_start_us)}, "
            f"test from {iso_us(split.test_start_us)}) leaves "
            f"{'no training' if (split_codes == SPLIT_CODES['train']).sum() == 0 else 'no validation or test'} rows in this "
            f"data ({iso_us(int(ts.min()))} to {iso_us(int(ts.max()))}): "
            "is this workspace for another dataset?",
            file=path,
            fix="Use a fresh --data-dir, or pass --resplit to record new boundaries.",
        )
    return split, split_codes
