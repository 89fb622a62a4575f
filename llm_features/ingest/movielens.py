"""MovieLens adapters (ML-1M ``.dat`` and ML-100K ``u.*``) and THE MovieLens text builder."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


@dataclass
class _MovieLensRead:
    """How one MovieLens directory is read: its encoding (the given one, else Latin-1, the original
    one) and the blank lines skipped in each file read so far."""

    encoding: str
    explicit: bool  # False: Latin-1 by default, so a UTF-8 file is refused rather than misread
    blank: dict[str, int] = field(default_factory=dict)

    @classmethod
    def make(cls, encoding: str | None) -> _MovieLensRead:
        return cls(encoding, True) if encoding else cls("latin-1", False)

    def text(self, path: Path) -> str:
        return read_text(path, self.encoding, explicit=self.explicit)

    def table(self, src: SourceFile, sep: str, names: list[str]) -> pd.DataFrame:
        """A ``sep``-separated file of ``names`` (every field a string, plus ``_line``)."""
        raw, self.blank[str(src.path)] = split_delimited(src, self.text(src.path), sep, names)
        return raw


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
    paths: list[Path], sep: str, read: _MovieLensRead, names: list[str], bounds: TimeBounds
) -> tuple[pd.DataFrame, list[SourceFile]]:
    """The ratings files (``names``: user, item, rating, epoch seconds) as one frame of interactions."""
    frames, sources = [], []
    for k, p in enumerate(paths):
        src = SourceFile(p)
        sources.append(src)
        text = read.text(p)
        raw = fast_numeric(text, sep, names, float_columns=(names[2],))
        if raw is None:
            raw, read.blank[str(p)] = split_delimited(src, text, sep, names)
        else:
            read.blank[str(p)] = 0
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


def _with_texts(src: SourceFile, movies: pd.DataFrame, title_column: str) -> pd.DataFrame:
    """Every movie titled; its item text (:func:`movielens_text`); its genres, the item_genres attribute."""
    _require_titles(src, movies, title_column)
    movies["item_text"] = pd.Series(
        [movielens_text(t, g) for t, g in zip(movies["title"], movies["genres"])],
        index=movies.index,
        dtype=object,
    )
    movies["item_genres"] = movies["genres"]
    return movies


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


def _users(
    path: Path,
    read: _MovieLensRead,
    sep: str,
    names: list[str],
    roles: tuple[str, ...],
    coded_occupation: bool,
) -> tuple[SourceFile, pd.DataFrame]:
    """A users file: ``names`` its columns in file order, ``roles`` the columns of user id, gender,
    age, occupation (an integer code where ``coded_occupation``, else a name) and zip code."""
    usrc = SourceFile(path)
    raw = read.table(usrc, sep, names)
    uid, gender, age, occupation, zip_code = roles
    users_df = pd.DataFrame(
        {
            "user_id": to_int64(usrc, raw, uid, fix=_FIX_LINE),
            "gender": raw[gender].str.strip(),
            "age": to_int64(usrc, raw, age, fix=_FIX_LINE),
            "occupation": (
                to_int64(usrc, raw, occupation, fix=_FIX_LINE)
                if coded_occupation
                else raw[occupation].str.strip()
            ),
            "zip": raw[zip_code].str.strip(),
            "_line": raw["_line"].to_numpy(),
        }
    )
    return usrc, users_df


def _loaded(
    fmt: str,
    ratings: tuple[pd.DataFrame, list[SourceFile]],
    movies: tuple[SourceFile, pd.DataFrame],
    users: tuple[SourceFile, pd.DataFrame],
    read: _MovieLensRead,
    rating_names: list[str],
    title_column: str,
) -> Loaded:
    """What a MovieLens adapter hands on; its attributes are MovieLens's own (:data:`ATTRIBUTES`)."""
    (inter, sources), (msrc, movies_df), (usrc, users_df) = ratings, movies, users
    return Loaded(
        fmt, inter, sources, items=movies_df, users=users_df, items_src=msrc, users_src=usrc, blank_lines=read.blank,
        attributes={entity: list(attrs) for entity, attrs in ATTRIBUTES.items()},
        column_names=dict(zip(("user_id", "item_id", "rating", "event_timestamp"), rating_names))
        | {"item_text": title_column},
    )


def load_movielens(
    fmt: str,
    source: Path | None,
    *,
    interactions: tuple[Path, ...] = (),
    items: Path | None = None,
    users: Path | None = None,
    encoding: str | None = None,
    time_bounds: TimeBounds | None = None,
) -> Loaded:
    """A MovieLens directory in the layout ``fmt`` (``ml-1m`` or ``ml-100k``); ``interactions``,
    ``items`` and ``users`` replace the layout's default file names under ``source``."""
    layout = _LAYOUTS[fmt]
    read = _MovieLensRead.make(encoding)
    rnames = list(layout.rating_names)
    ratings = _ratings(
        _files(source, interactions, layout.ratings, "interactions"), layout.ratings_sep, read, rnames,
        time_bounds or TimeBounds.make(),
    )
    movies = layout.read_movies(_files(source, items, layout.movies, "items")[0], read)
    users_read = _users(_files(source, users, layout.users, "users")[0], read, layout.users_sep,
                        list(layout.user_names), layout.user_order, coded_occupation=layout.coded_occupation)
    return _loaded(fmt, ratings, movies, users_read, read, rnames, layout.title)


def load_ml1m(source: Path | None, **options: Any) -> Loaded:
    """ML-1M: ``ratings.dat``, ``movies.dat``, ``users.dat`` (``::``-separated, Latin-1); the options of
    :func:`load_movielens`."""
    return load_movielens("ml-1m", source, **options)


def load_ml100k(source: Path | None, **options: Any) -> Loaded:
    """ML-100K: ``u.data`` (tab), ``u.item`` (``|``, Latin-1, 19 genre flags), ``u.user`` (``|``); the
    options of :func:`load_movielens`."""
    return load_movielens("ml-100k", source, **options)


def _ml1m_movies(mpath: Path, read: _MovieLensRead) -> tuple[SourceFile, pd.DataFrame]:
    """``movies.dat``: id, title and ``|``-separated genres."""
    msrc = SourceFile(mpath)
    raw = read.table(msrc, "::", ["MovieID", "Title", "Genres"])
    movies = pd.DataFrame(
        {
            "item_id": to_int64(msrc, raw, "MovieID", fix=_FIX_LINE),
            "title": raw["Title"].str.strip(),
            "genres": [[g for g in s.strip().split("|") if g] for s in raw["Genres"]],
            "_line": raw["_line"].to_numpy(),
        }
    )
    return msrc, _with_texts(msrc, movies, "Title")

def _ml100k_movies(ipath: Path, read: _MovieLensRead) -> tuple[SourceFile, pd.DataFrame]:
    """``u.item``: id, title, release date and 19 genre flags (named by ``u.genre`` where it lists 19)."""
    genre_names = ML100K_GENRES
    gpath = ipath.parent / "u.genre"
    if gpath.is_file():
        graw, _ = split_delimited(SourceFile(gpath), read.text(gpath), "|", ["genre", "index"])
        if len(graw) == len(ML100K_GENRES):
            genre_names = [g.strip() for g in graw["genre"]]
    isrc = SourceFile(ipath)
    raw = read.table(isrc, "|", ["movie id", "movie title", "release date", "video release date", "IMDb URL",
                                 *genre_names])
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
    return isrc, _with_texts(isrc, movies, "movie title")


@dataclass(frozen=True)
class _Layout:
    """Where a MovieLens release keeps what, and how its files are written."""

    ratings: str
    ratings_sep: str
    rating_names: tuple[str, ...]
    movies: str
    read_movies: Callable[[Path, _MovieLensRead], tuple[SourceFile, pd.DataFrame]]
    users: str
    users_sep: str
    user_names: tuple[str, ...]
    """The columns of the users file, in file order."""
    user_order: tuple[str, ...]
    """The same columns as (user id, gender, age, occupation, zip)."""
    coded_occupation: bool
    title: str


_ML1M_USERS = ("UserID", "Gender", "Age", "Occupation", "Zip")
_LAYOUTS = {
    "ml-1m": _Layout("ratings.dat", "::", ("UserID", "MovieID", "Rating", "Timestamp"), "movies.dat",
                     _ml1m_movies, "users.dat", "::", _ML1M_USERS, _ML1M_USERS, True, "Title"),
    "ml-100k": _Layout("u.data", "\t", ("user id", "item id", "rating", "timestamp"), "u.item", _ml100k_movies,
                       "u.user", "|", ("user id", "age", "gender", "occupation", "zip code"),
                       ("user id", "gender", "age", "occupation", "zip code"), False, "movie title"),
}
