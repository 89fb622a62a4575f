"""Counting the rows served with a default instead of a real feature value."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

log = logging.getLogger("ranker.features")  # the package's logger: what callers filter on


@dataclass
class MissingFeatures:
    """Counts of rows served with a default instead of a real feature value.

    Keys: ``rows``, ``missing_<llm column>`` (embedding absent: learned missing vector + flag),
    ``unknown_<sparse feature>`` (value absent or not seen in training: OOV row 0).
    """

    counts: Counter = field(default_factory=Counter)

    def add(self, key: str, n: int) -> None:
        if n:
            self.counts[key] += int(n)

    def update(self, other: "MissingFeatures") -> None:
        self.counts.update(other.counts)

    def warn(self, context: str) -> None:
        rows = self.counts.get("rows", 0)
        parts = [f"{n} {k}" for k, n in sorted(self.counts.items()) if k != "rows" and n]
        if parts:
            log.warning(
                "%s: of %d rows, %s (embedding -> learned missing vector + flag; id/category -> OOV row 0)",
                context, rows, ", ".join(parts),
            )

    def as_dict(self) -> dict[str, int]:
        return {k: int(v) for k, v in sorted(self.counts.items())}

