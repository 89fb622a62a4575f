"""The 0/1 label of each interaction: a 0/1 column, or a rule on the rating (``--label-rule rating>3``)."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from llm_features.ingest.config import IngestConfig
from llm_features.ingest.errors import IngestError
from llm_features.ingest.readers import Loaded

_RULE = re.compile(r"^\s*([A-Za-z_][\w .-]*?)\s*(>=|<=|==|!=|>|<)\s*(-?\d+(?:\.\d*)?|-?\.\d+)\s*$")
_OPS = {
    ">": np.greater,
    ">=": np.greater_equal,
    "==": np.equal,
    "!=": np.not_equal,
    "<": np.less,
    "<=": np.less_equal,
}


def parse_label_rule(rule: str) -> tuple[str, str, float]:
    """``"rating>3"`` to ``("rating", ">", 3.0)``."""
    m = _RULE.match(rule)
    if not m:
        raise IngestError(
            f"--label-rule {rule!r} is not COLUMN OP NUMBER",
            fix="For example --label-rule 'rating>3' (OP: > >= == != < <=), or use --label-column.",
        )
    return m.group(1).strip(), m.group(2), float(m.group(3))


def apply_label(loaded: Loaded, inter: pd.DataFrame, cfg: IngestConfig) -> str:
    """Set ``inter["label"]`` (unless a label column was read) and return where it comes from."""
    if "label" in inter.columns:
        return f"column {cfg.label_column or (loaded.column_names or {}).get('label', 'label')}"
    col, op, thr = parse_label_rule(cfg.label_rule)
    names = loaded.column_names or {}
    canon = (
        col if col in ("rating",) else next((k for k, v in names.items() if v == col and k == "rating"), None)
    )
    if canon != "rating":
        raise IngestError(
            f"--label-rule {cfg.label_rule!r} refers to '{col}', but only the rating can be thresholded",
            fix="Write the rule on rating (e.g. 'rating>3'), map the column with "
            "--map rating=COLUMN, or give a 0/1 column with --label-column.",
        )
    rating = inter["rating"].to_numpy(dtype=np.float64)
    missing = np.isnan(rating)
    if missing.all():
        raise IngestError(
            "there is no rating to apply the label rule to",
            file=loaded.sources[0].path,
            fix="Map a rating column with --map rating=COLUMN, or give a 0/1 --label-column.",
        )
    if missing.any():
        i = int(np.flatnonzero(missing)[0])
        src, line = loaded.row(inter, i)
        raise src.error(
            f"empty rating, so --label-rule {cfg.label_rule!r} cannot label the row "
            f"({int(missing.sum())} rows in all)",
            line=line,
            column=names.get("rating", "rating"),
            fix="Fill in the rating, or give a 0/1 --label-column.",
        )
    inter["label"] = _OPS[op](rating, thr).astype(np.int8)
    return f"rule {col}{op}{thr:g}"


def check_both_labels(inter: pd.DataFrame, label_source: str, cfg: IngestConfig) -> None:
    """Every model llmfeat trains is a click-through model: a log with one label only cannot train it."""
    labels = inter["label"].to_numpy()
    if len(labels) and labels.min() == labels.max():
        which = "1 (positive)" if labels[0] == 1 else "0 (negative)"
        raise IngestError(
            f"every interaction is labelled {which} by the {label_source}; llmfeat trains click-through "
            "models, which need both labels",
            option="--label-column" if cfg.label_column else "--label-rule",
            fix="Ingest the impressions that were not clicked too (a 0/1 --label-column), or ratings with a "
                "--label-rule that splits them; logs of positives only are not supported.",
        )

