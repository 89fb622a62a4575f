"""Stable ids for atomic behaviours: one id per normalised text, the same on every machine."""

from __future__ import annotations

import hashlib
import re
import unicodedata

_WS = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """NFKC-normalise, collapse white space and strip. Case is kept (decoders are cased)."""
    return _WS.sub(" ", unicodedata.normalize("NFKC", text)).strip()


def stable_id(text: str) -> int:
    """A positive int64 id derived from the normalised text (blake2b, 63 bits).

    Two users with the same behaviour text get the same ``behavior_id``, so the behaviour is
    encoded and stored once.
    """
    digest = hashlib.blake2b(normalize_text(text).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") & 0x7FFF_FFFF_FFFF_FFFF


def user_fold(user_ids, folds: int):
    """``[N]`` int64 fold of each user id in ``0..folds-1``: a fixed mix of the id, the same on every machine.

    Cross-fitting splits users this way: the tower of fold ``f`` trains on every other fold, so the
    embeddings of fold ``f``'s users come from a tower that never saw their labels.
    """
    import numpy as np

    if folds < 1:
        raise ValueError(f"folds must be >= 1, got {folds}")
    x = np.asarray(user_ids, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):  # splitmix64 finaliser: wrapping uint64 arithmetic is the point
        x = (x + np.uint64(0x9E3779B97F4A7C15))
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x % np.uint64(folds)).astype(np.int64)
