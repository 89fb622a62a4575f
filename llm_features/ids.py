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
