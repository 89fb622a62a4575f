"""MovieLens adapters (ML-1M ``.dat`` and ML-100K ``u.*``) and THE MovieLens text builder."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from llm_features.attributes import LEGACY
from llm_features.ids import normalize_text
from llm_features.ingest.readers import (
    Loaded,
    SourceFile,
    TimeBounds,
    epoch_to_us,
    fast_numeric,
    read_text,
    require_file,
    split_delimited,
    to_float,
    to_int64,
)

# MovieLens declares its own attributes: gender, age, occupation and the zip code's first 2 characters
# (users), and the genres (items), as ingest always wrote them.
ATTRIBUTES = {entity: list(attrs) for entity, attrs in LEGACY.items()}

_FIX_LINE = "Fix or remove the line (MovieLens ids, ages, occupations and timestamps are integers)."

ML100K_GENRES = [
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
]


def movielens_text(title: str, genres: Sequence[str]) -> str:
    """The behaviour text and item text of a movie: ``"<Title (Year)> | <Genre, Genre>"``.

    The one place this text is built; ``behavior_id = ids.stable_id(movielens_text(...))``.
    """
    t = normalize_text(title)
    gs = [normalize_text(g) for g in genres if g and g.strip()]
    return f"{t} | {', '.join(gs)}" if gs else t


def _movie_texts(items: pd.DataFrame) -> pd.Series:
    return pd.Series(
        [movielens_text(t, g) for t, g in zip(items["title"], items["genres"])],
        index=items.index,
        dtype=object,
    )


def _fix_for(flag: str, name: str) -> str:
    return f"Point --source at the MovieLens directory that holds {name}, or pass --{flag} FILE."


def _files(source: Path | None, given: tuple[Path, ...] | Path | None, default: str, flag: str) -> list[Path]:
    if given:
        paths = list(given) if isinstance(given, tuple) else [given]
    elif source is not None:
        paths = [source / default]
    else:
        paths = [Path(default)]
    return [require_file(p, f"{default.split('.')[0]} file", _fix_for(flag, default)) for p in paths]


def _ratings(
    paths: list[Path],
    sep: str,
    encoding: str,
    explicit: bool,
    names: list[str],
    blank: dict[str, int],
    bounds: TimeBounds,
) -> tuple[pd.DataFrame, list[SourceFile]]:
    frames, sources = [], []
    for k, p in enumerate(paths):
        src = SourceFile(p)
        sources.append(src)
        text = read_text(p, encoding, explicit=explicit)
        raw = fast_numeric(text, sep, names, float_columns=(names[2],))
        if raw is None:
            raw, blank[str(p)] = split_delimited(src, text, sep, names)
        else:
            blank[str(p)] = 0
        frames.append(
            pd.DataFrame(
                {
                    "user_id": to_int64(src, raw, names[0], fix=_FIX_LINE),
                    "item_id": to_int64(src, raw, names[1], fix=_FIX_LINE),
                    "rating": to_float(src, raw, names[2], allow_empty=False),
                    "ts_us": epoch_to_us(  # MovieLens times are epoch seconds
                        src, raw, to_int64(src, raw, names[3], fix=_FIX_LINE), names[3], "s", bounds,
                        unit_option=False,
                    ),
                    "_src": np.full(len(raw), k, dtype=np.int32),
                    "_line": raw["_line"].to_numpy(),
                }
            )
        )
    return pd.concat(frames, ignore_index=True), sources


def load_ml1m(
    source: Path | None,
    *,
    interactions: tuple[Path, ...] = (),
    items: Path | None = None,
    users: Path | None = None,
    encoding: str | None = None,
    time_bounds: TimeBounds | None = None,
) -> Loaded:
    """ML-1M: ``ratings.dat``, ``movies.dat``, ``users.dat`` (``::``-separated, Latin-1)."""
    enc, explicit = (encoding, True) if encoding else ("latin-1", False)
    blank: dict[str, int] = {}
    rnames = ["UserID", "MovieID", "Rating", "Timestamp"]
    inter, sources = _ratings(
        _files(source, interactions, "ratings.dat", "interactions"), "::", enc, explicit, rnames, blank,
        time_bounds or TimeBounds.make(),
    )

    mpath = _files(source, items, "movies.dat", "items")[0]
    msrc = SourceFile(mpath)
    raw, blank[str(mpath)] = split_delimited(
        msrc, read_text(mpath, enc, explicit=explicit), "::", ["MovieID", "Title", "Genres"]
    )
    movies = pd.DataFrame(
        {
            "item_id": to_int64(msrc, raw, "MovieID", fix=_FIX_LINE),
            "title": raw["Title"].str.strip(),
            "genres": [[g for g in s.strip().split("|") if g] for s in raw["Genres"]],
            "_line": raw["_line"].to_numpy(),
        }
    )
    _require_titles(msrc, movies, "Title")
    movies["item_text"] = _movie_texts(movies)
    movies["item_genres"] = movies["genres"]

    upath = _files(source, users, "users.dat", "users")[0]
    usrc = SourceFile(upath)
    raw, blank[str(upath)] = split_delimited(
        usrc, read_text(upath, enc, explicit=explicit), "::", ["UserID", "Gender", "Age", "Occupation", "Zip"]
    )
    users_df = pd.DataFrame(
        {
            "user_id": to_int64(usrc, raw, "UserID", fix=_FIX_LINE),
            "gender": raw["Gender"].str.strip(),
            "age": to_int64(usrc, raw, "Age", fix=_FIX_LINE),
            "occupation": to_int64(usrc, raw, "Occupation", fix=_FIX_LINE),
            "zip": raw["Zip"].str.strip(),
            "_line": raw["_line"].to_numpy(),
        }
    )
    return Loaded(
        "ml-1m",
        inter,
        sources,
        items=movies,
        users=users_df,
        items_src=msrc,
        users_src=usrc,
        blank_lines=blank,
        attributes={entity: list(attrs) for entity, attrs in ATTRIBUTES.items()},
        column_names={
            "user_id": "UserID",
            "item_id": "MovieID",
            "rating": "Rating",
            "event_timestamp": "Timestamp",
            "item_text": "Title",
        },
    )


def load_ml100k(
    source: Path | None,
    *,
    interactions: tuple[Path, ...] = (),
    items: Path | None = None,
    users: Path | None = None,
    encoding: str | None = None,
    time_bounds: TimeBounds | None = None,
) -> Loaded:
    """ML-100K: ``u.data`` (tab), ``u.item`` (``|``, Latin-1, 19 genre flags), ``u.user`` (``|``)."""
    enc, explicit = (encoding, True) if encoding else ("latin-1", False)
    blank: dict[str, int] = {}
    rnames = ["user id", "item id", "rating", "timestamp"]
    inter, sources = _ratings(
        _files(source, interactions, "u.data", "interactions"), "\t", enc, explicit, rnames, blank,
        time_bounds or TimeBounds.make(),
    )

    genre_names = ML100K_GENRES
    ipath = _files(source, items, "u.item", "items")[0]
    gpath = ipath.parent / "u.genre"
    if gpath.is_file():
        graw, _ = split_delimited(
            SourceFile(gpath), read_text(gpath, enc, explicit=explicit), "|", ["genre", "index"]
        )
        if len(graw) == len(ML100K_GENRES):
            genre_names = [g.strip() for g in graw["genre"]]
    isrc = SourceFile(ipath)
    names = ["movie id", "movie title", "release date", "video release date", "IMDb URL", *genre_names]
    raw, blank[str(ipath)] = split_delimited(isrc, read_text(ipath, enc, explicit=explicit), "|", names)
    flags = (
        np.stack([to_int64(isrc, raw, g, fix=_FIX_LINE) for g in genre_names], axis=1)
        if len(raw)
        else np.zeros((0, len(genre_names)), np.int64)
    )
    movies = pd.DataFrame(
        {
            "item_id": to_int64(isrc, raw, "movie id", fix=_FIX_LINE),
            "title": raw["movie title"].str.strip(),
            "genres": [[genre_names[j] for j in np.flatnonzero(row)] for row in flags],
            "release_date": raw["release date"].str.strip(),
            "_line": raw["_line"].to_numpy(),
        }
    )
    _require_titles(isrc, movies, "movie title")
    movies["item_text"] = _movie_texts(movies)
    movies["item_genres"] = movies["genres"]

    upath = _files(source, users, "u.user", "users")[0]
    usrc = SourceFile(upath)
    raw, blank[str(upath)] = split_delimited(
        usrc,
        read_text(upath, enc, explicit=explicit),
        "|",
        ["user id", "age", "gender", "occupation", "zip code"],
    )
    users_df = pd.DataFrame(
        {
            "user_id": to_int64(usrc, raw, "user id", fix=_FIX_LINE),
            "gender": raw["gender"].str.strip(),
            "age": to_int64(usrc, raw, "age", fix=_FIX_LINE),
            "occupation": raw["occupation"].str.strip(),
            "zip": raw["zip code"].str.strip(),
            "_line": raw["_line"].to_numpy(),
        }
    )
    return Loaded(
        "ml-100k",
        inter,
        sources,
        items=movies,
        users=users_df,
        items_src=isrc,
        users_src=usrc,
        blank_lines=blank,
        attributes={entity: list(attrs) for entity, attrs in ATTRIBUTES.items()},
        column_names={
            "user_id": "user id",
            "item_id": "item id",
            "rating": "rating",
            "event_timestamp": "timestamp",
            "item_text": "movie title",
        },
    )


def _require_titles(src: SourceFile, movies: pd.DataFrame, column: str) -> None:
    empty = (movies["title"] == "").to_numpy()
    if empty.any():
        i = int(np.flatnonzero(empty)[0])
        raise src.error(
            f"empty title for item {movies['item_id'].iloc[i]}",
            line=int(movies["_line"].iloc[i]),
            column=column,
            fix="Fill in the title, or remove the item and its ratings.",
        )
