"""The real datasets the tests read: ``../shared/data`` next to the repository (where ``make demo``
reads ML-1M), or ``$LLMFEAT_ML100K`` / ``$LLMFEAT_ML1M``.

A test that needs one fails when it is missing, never skips: these are the product's real-data checks.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ML100K = Path(os.environ.get("LLMFEAT_ML100K", SHARED_DATA / "ml-100k"))
ML1M = Path(os.environ.get("LLMFEAT_ML1M", SHARED_DATA / "ml-1m"))


def require_ml100k() -> Path:
    """ML-100K's directory; the calling test fails when its ``u.data`` is missing."""
    if not (ML100K / "u.data").exists():
        pytest.fail(f"ML-100K not found at {ML100K}: put it there or set LLMFEAT_ML100K")
    return ML100K


def require_ml1m() -> Path:
    """ML-1M's directory; the calling test fails when its ``ratings.dat`` is missing."""
    if not (ML1M / "ratings.dat").exists():
        pytest.fail(f"ML-1M not found at {ML1M}: put it there or set LLMFEAT_ML1M")
    return ML1M
