"""Generic ingest: the user and item attribute columns kept, declared or inferred, and their values read.

``--user-attribute`` / ``--item-attribute`` (repeatable) take ``[NAME=]COLUMN[:TYPE[:ARG]]``:

* ``categorical`` (``:N`` keeps the first N characters, e.g. ``zip:categorical:3``),
* ``multi`` (a list; ``:SEP`` is the separator, ``|`` by default, e.g. ``tags:multi:;``),
* ``numeric``,
* no type: inferred from the values, as below.

User attributes come from the ``--users`` table, item attributes from the ``--items`` table; without
that table, from the interaction log, where each user's (item's) value must not change.

Without declarations, ingest infers the attributes of the ``--users`` and ``--items`` tables
from every other column (``--no-infer-attributes`` turns it off): lists and text with ``|`` in a fifth of
its values are ``multi``, other text and booleans ``categorical``, integers with at most
:data:`MAX_CATEGORIES` distinct values ``categorical``, other numbers ``numeric``; empty columns and
text with (nearly) one distinct value per row (an identifier or free text) are skipped and reported.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from llm_features.attributes import KINDS, NAME_RE, RESERVED, Attribute
from llm_features.ingest.errors import IngestError
from llm_features.ingest.readers import SourceFile, to_float

MAX_CATEGORIES = 50  # integer columns with more distinct values are numeric when inferred
MULTI_SHARE = 0.2  # text with the separator in at least this share of its values is inferred multi
UNIQUE_SHARE = 0.9  # text with at least this share of distinct values (over 10 rows) is skipped
_INT_TEXT = re.compile(r"^[+-]?(0|[1-9]\d{0,17})$")  # no leading zeros: "01234" is a code, not a number


@dataclass(frozen=True)
class AttributeSpec:
    """One ``--user-attribute`` / ``--item-attribute`` value."""

    name: str
    column: str
    kind: str | None  # None: inferred from the values
    prefix: int | None = None
    sep: str = "|"
    spec: str = ""


def sanitize(column: str) -> str:
    """A column name as an attribute name: letters, digits and ``_`` (``zip code`` -> ``zip_code``)."""
    name = re.sub(r"[^A-Za-z0-9_]+", "_", column.strip()).strip("_") or "attribute"
    return f"_{name}" if name[0].isdigit() else name


def parse_specs(specs: tuple[str, ...] | list[str], entity: str) -> list[AttributeSpec]:
    option = f"--{entity}-attribute"
    fix = (f"Write {option} [NAME=]COLUMN[:TYPE], TYPE one of categorical[:N], multi[:SEP], numeric; "
           f"e.g. {option} country, {option} tags:multi:;, {option} price:numeric.")
    out: list[AttributeSpec] = []
    for spec in specs:
        text = str(spec).strip()
        head, eq, rest = text.partition("=")
        name: str | None = head.strip() if eq else None
        body = rest if eq else text
        column, _, type_part = body.partition(":")
        column = column.strip()
        kind, _, arg = type_part.partition(":")
        kind = kind.strip() or None
        if not column or (eq and not name):
            raise IngestError(f"{spec!r} names no column", option=option, fix=fix)
        if kind is not None and kind not in KINDS:
            raise IngestError(f"{spec!r}: unknown type {kind!r}", option=option, fix=fix)
        prefix, sep = None, "|"
        if arg:
            if kind == "categorical":
                if not arg.strip().isdigit() or int(arg) < 1:
                    raise IngestError(f"{spec!r}: the prefix length must be a positive integer, got {arg!r}",
                                      option=option, fix=fix)
                prefix = int(arg)
            elif kind == "multi":
                sep = arg
            else:
                raise IngestError(f"{spec!r}: {kind or 'an inferred type'} takes no argument", option=option,
                                  fix=fix)
        if name is not None and not NAME_RE.match(name):
            raise IngestError(f"{spec!r}: {name!r} is not a valid attribute name", option=option,
                              fix="Use letters, digits and _ (not starting with a digit).")
        out.append(AttributeSpec(name or sanitize(column), column, kind, prefix, sep, text))
    return out


def check_declared(user_specs: tuple[str, ...], item_specs: tuple[str, ...]) -> None:
    """The declarations alone (before any file is read): valid, names free and distinct."""
    specs = {"user": parse_specs(user_specs, "user"), "item": parse_specs(item_specs, "item")}
    check_names({e: [Attribute(s.name, s.kind or "categorical", e, source=s.column) for s in ss]
                 for e, ss in specs.items()}, specs)


def check_names(attributes: dict[str, list[Attribute]], specs: dict[str, list[AttributeSpec]]) -> None:
    """Declared names must be free and distinct (feature names are global across the Feast views)."""
    seen: dict[str, str] = {}
    for entity in ("user", "item"):
        for a in attributes[entity]:
            spec = next((s for s in specs.get(entity, []) if s.name == a.name), None)
            option = f"--{entity}-attribute" if spec is not None else None
            if a.name in RESERVED:
                raise IngestError(
                    f"attribute name {a.name!r} is taken by llmfeat's own columns", option=option,
                    fix=f"Rename it: {option or '--' + entity + '-attribute'} NEW_NAME={a.source or a.name}.")
            if a.name in seen:
                raise IngestError(
                    f"attribute name {a.name!r} is used twice ({seen[a.name]} and {entity} attribute)",
                    option=option, fix="Feature names must be unique across users and items: rename one with "
                    "NEW_NAME=COLUMN.")
            seen[a.name] = f"{entity} attribute"


def infer_kind(s: pd.Series) -> tuple[str | None, str]:
    """``(kind, why)`` of a raw column; kind None: not kept (``why`` says why)."""
    values = s.dropna()
    if values.dtype == object and len(values):
        first = values.iloc[0]
        if isinstance(first, (list, tuple, np.ndarray)):
            return "multi", "a list column"
    if pd.api.types.is_bool_dtype(s.dtype):
        return "categorical", "true/false"
    if pd.api.types.is_numeric_dtype(s.dtype):
        arr = values.to_numpy(dtype=np.float64)
        if len(arr) == 0:
            return None, "empty"
        if np.all(arr == np.round(arr)):
            n = len(np.unique(arr))
            if n <= MAX_CATEGORIES:
                return "categorical", f"integers, {n} distinct"
            return "numeric", f"integers, {n} distinct (> {MAX_CATEGORIES})"
        return "numeric", "numbers"
    st = values.astype("string").str.strip()
    st = st[st != ""]
    if len(st) == 0:
        return None, "empty"
    ints = st.str.fullmatch(_INT_TEXT.pattern).fillna(False)
    if ints.all():
        n = st.nunique()
        if n <= MAX_CATEGORIES:
            return "categorical", f"integers, {n} distinct"
        return "numeric", f"integers, {n} distinct (> {MAX_CATEGORIES})"
    num = pd.to_numeric(st, errors="coerce")
    if num.notna().all() and np.isfinite(num.to_numpy(dtype=np.float64)).all():
        return "numeric", "numbers"
    if st.str.contains("|", regex=False).mean() >= MULTI_SHARE:
        return "multi", "'|'-separated lists"
    n = st.nunique()
    if len(st) > 10 and n >= UNIQUE_SHARE * len(st):
        return None, (f"{n} distinct values in {len(st)} rows (an identifier or free text? "
                      "declare it to keep it)")
    return "categorical", f"text, {n} distinct"


def parse_values(src: SourceFile, frame: pd.DataFrame, col: str, kind: str, sep: str = "|",
                 label: str | None = None) -> pd.Series:
    """The column's values for the canonical table: categorical -> Int64 or string (None = missing),
    numeric -> float64 (NaN = missing; text is an error naming the line), multi -> lists of strings."""
    s = frame[col].reset_index(drop=True)
    if kind == "numeric":
        return pd.Series(to_float(src, frame, col, label=label), dtype=np.float64)
    if kind == "multi":
        out = []
        for v in s:
            if isinstance(v, (list, tuple, np.ndarray)):
                items = [str(x).strip() for x in v
                         if x is not None and not (isinstance(x, float) and np.isnan(x))]
            elif v is None or v is pd.NA or (isinstance(v, float) and np.isnan(v)):
                items = []
            else:
                items = [p.strip() for p in str(v).split(sep)]
            out.append([x for x in items if x])
        return pd.Series(out, dtype=object)
    if pd.api.types.is_bool_dtype(s.dtype):
        return s.astype("string").astype(object).where(s.notna(), None)
    if pd.api.types.is_integer_dtype(s.dtype):
        return s.astype("Int64")
    if pd.api.types.is_float_dtype(s.dtype):
        arr = s.to_numpy(dtype=np.float64, na_value=np.nan)
        finite = arr[np.isfinite(arr)]
        if np.all(finite == np.round(finite)) and np.all(np.abs(finite) < 2**53):
            return pd.Series(pd.array([None if np.isnan(x) else int(x) for x in arr], dtype="Int64"))
        return pd.Series([None if np.isnan(x) else repr(float(x)) for x in arr], dtype=object)
    st = s.astype("string").str.strip()
    empty = (st.isna() | (st == "")).to_numpy()
    present = st[~empty]
    if len(present) and present.str.fullmatch(_INT_TEXT.pattern).all():
        return pd.Series(pd.array([None if e else int(v) for v, e in zip(st, empty)], dtype="Int64"))
    return pd.Series([None if e else str(v) for v, e in zip(st, empty)], dtype=object)


def declared_values(
    src: SourceFile, raw: pd.DataFrame, spec: AttributeSpec, entity: str, where: str, kind: str | None = None
) -> tuple[str, pd.Series]:
    """A declared attribute's kind and values; a missing column is an error naming the file."""
    if spec.column not in raw.columns:
        cols = ", ".join(c for c in raw.columns if c != "_line")
        whence = (f"the --{entity}s table" if where != "--interactions"
                  else f"the interaction log when there is no --{entity}s table")
        raise src.error(
            f"no column '{spec.column}' (given by --{entity}-attribute {spec.spec}); the columns are: {cols}",
            column=spec.column,
            fix=f"Name a column of this file ({entity} attributes are read from {whence}).",
        )
    kind = kind or spec.kind or infer_kind(raw[spec.column])[0] or "categorical"
    return kind, parse_values(src, raw, spec.column, kind, spec.sep)


def table_attributes(
    src: SourceFile,
    raw: pd.DataFrame,
    out: pd.DataFrame,
    entity: str,
    specs: list[AttributeSpec],
    attrs: dict[str, list[Attribute]],
    skipped: dict[str, list[dict[str, str]]],
    used: set[str],
    mapping: dict[str, str],
    infer: bool,
    declared_names: set[str],
) -> None:
    """Declared attributes of a --users / --items table, then (``infer``) every other column (under a
    name no declared or earlier attribute has)."""
    for spec in specs:
        kind, values = declared_values(src, raw, spec, entity, f"--{entity}s")
        out[spec.name] = values.set_axis(out.index)
        attrs[entity].append(Attribute(spec.name, kind, entity, prefix=spec.prefix,
                                       sep=spec.sep if kind == "multi" else None, source=spec.column))
        used.add(spec.column)
    if not infer:
        return
    taken = {a.name for es in attrs.values() for a in es} | declared_names
    for col in raw.columns:
        if col == "_line" or col in used or col in mapping.values():
            continue
        kind, why = infer_kind(raw[col])
        name = sanitize(col)
        if kind is not None and (name in RESERVED or name in taken):
            kind, why = None, f"the name {name!r} is taken (declare it as NEW_NAME={col})"
        if kind is None:
            skipped[entity].append({"column": col, "why": why})
            continue
        out[name] = parse_values(src, raw, col, kind).set_axis(out.index)
        attrs[entity].append(Attribute(name, kind, entity, sep="|" if kind == "multi" else None, source=col,
                                       origin="inferred"))
        taken.add(name)


def log_attributes(
    inter: pd.DataFrame,
    sources: list[SourceFile],
    out: pd.DataFrame,
    entity: str,
    specs: list[AttributeSpec],
    kinds: dict[tuple[str, str], str],
    attrs: dict[str, list[Attribute]],
) -> None:
    """Declared attributes read from the interaction log: one value per user (item); a value that
    changes between two rows of the same user (item) is an error naming both."""
    key = f"{entity}_id"
    for spec in specs:
        col = f"__{entity}__{spec.name}"
        kind = kinds[(entity, spec.name)]
        cells = inter[col]
        if kind == "multi":
            norm = cells.map(lambda v: tuple(v) if len(v) else None)
        else:
            norm = cells.map(lambda v: None if v is None or v is pd.NA or (isinstance(v, float) and np.isnan(v))
                             else v)
        frame = pd.DataFrame({"k": inter[key].to_numpy(), "v": norm.to_numpy(dtype=object),
                              "_src": inter["_src"].to_numpy(), "_line": inter["_line"].to_numpy()})
        frame = frame[frame["v"].notna()].sort_values(["k", "_src", "_line"], kind="stable")
        first = frame.drop_duplicates("k")
        firsts = first.set_index("k")["v"]
        differs = frame["v"].to_numpy() != firsts.reindex(frame["k"].to_numpy()).to_numpy()
        if differs.any():
            row = frame.iloc[int(np.flatnonzero(differs)[0])]
            ref = first[first["k"] == row["k"]].iloc[0]
            s1, s2 = sources[int(ref["_src"])], sources[int(row["_src"])]
            other = f"{s2.row_word} {int(row['_line'])}"
            if s1 is not s2:
                other = f"{s2.path}, {other}"
            raise s1.error(
                f"{entity} attribute '{spec.name}' changes for {entity} {row['k']}: {ref['v']!r} here, "
                f"{row['v']!r} at {other}",
                line=int(ref["_line"]),
                column=spec.column,
                fix=f"An attribute read from the log needs one value per {entity}: give a --{entity}s table, "
                "or fix the rows.",
            )
        values = [None if v is None or (isinstance(v, float) and np.isnan(v)) else v
                  for v in firsts.reindex(out[key].to_numpy())]
        if kind == "multi":
            out[spec.name] = [list(v) if v is not None else [] for v in values]
        elif kind == "numeric":
            out[spec.name] = np.array([np.nan if v is None else float(v) for v in values], np.float64)
        elif all(isinstance(v, (int, np.integer)) for v in values if v is not None):
            out[spec.name] = pd.array(values, dtype="Int64")
        else:
            out[spec.name] = pd.Series(values, dtype=object).to_numpy()
        attrs[entity].append(Attribute(spec.name, kind, entity, prefix=spec.prefix,
                                       sep=spec.sep if kind == "multi" else None, source=spec.column))

