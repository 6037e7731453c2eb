"""MovieLens 100K and 1M directories as a :class:`training.data.DataSource`.

The layout is recognised from the files present:

* 100K: ``u.data`` (user TAB item TAB rating TAB timestamp), ``u.user``
  (id|age|gender|occupation|zip), ``u.item`` (id|title|release date|video
  date|url|19 genre flags), latin-1.
* 1M: ``ratings.dat`` (UserID::MovieID::Rating::Timestamp), ``users.dat``
  (UserID::Gender::Age::Occupation::Zip-code), ``movies.dat``
  (MovieID::Title (Year)::Genres joined by ``|``), latin-1.

A rating of 4 or 5 is a positive. Features: ``user``, ``item``, ``age`` (the
1M age groups; 100K's exact ages are put in the same groups so that both
layouts mean the same thing), ``gender``, ``occupation``, ``zip_prefix``
(first 3 characters), ``genres`` (multi-valued) and ``release_year``
(dense). The split is by time: ratings sorted by timestamp, the first 80%
train, the next 10% validate, the last 10% test, so no test rating precedes
a training one. MovieLens fits in memory: the ratings are loaded once with
pandas' C parser; the small user and movie files are read line by line, so
their errors name the exact line.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pa_compute

from featurespec import StringColumn
from training.data import Chunk, DataError, Split, TimeOrderedSplits
from training.data.criteo import string_column_from_arrow
from training.fitting import SchemaField, SparseOptions

Layout = Literal["100k", "1m"]
LAYOUT_FILES: dict[Layout, tuple[str, str, str]] = {
    "100k": ("u.data", "u.user", "u.item"),
    "1m": ("ratings.dat", "users.dat", "movies.dat"),
}
GENRES_100K = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip
# MovieLens 1M's age groups, by their lower bound (1 means "under 18").
AGE_GROUPS = (1, 18, 25, 35, 45, 50, 56)

_RATING_COLUMNS = ("user", "item", "rating", "timestamp")
_RELEASE_DATE = re.compile(r"\d{1,2}-[A-Za-z]{3}-(\d{4})")
_TITLE_YEAR = re.compile(r"\((\d{4})\)\s*$")


def movielens_schema() -> tuple[SchemaField, ...]:
    """The raw fields and how each is fitted.

    ``user`` and ``item`` keep every id seen in training (``min_count=1``):
    the tables are small (at most ~6,000 users and ~4,000 movies), every
    MovieLens user has at least 20 ratings anyway, and an item rated once is
    still better served by its own (weakly trained) row than by the shared
    "unseen" row 0, which at test time stands for genuinely new ids.
    """
    ids = SparseOptions(min_count=1)
    return (
        SchemaField("release_year", dense=True, transform="standard"),
        SchemaField("user", dense=False, options=ids),
        SchemaField("item", dense=False, options=ids),
        SchemaField("age", dense=False),
        SchemaField("gender", dense=False),
        SchemaField("occupation", dense=False),
        SchemaField("zip_prefix", dense=False),
        SchemaField("genres", dense=False, options=SparseOptions(multi_valued=True, max_values=6, min_count=1)),
    )


def detect_layout(directory: str | os.PathLike[str]) -> Layout:
    """Which MovieLens layout a directory holds; a DataError names what was looked for."""
    path = os.fspath(directory)
    if not os.path.exists(path):
        raise DataError(path, "directory not found")
    if not os.path.isdir(path):
        raise DataError(path, "not a directory (expected a MovieLens 100K or 1M directory)")
    present = {layout: [os.path.isfile(os.path.join(path, f)) for f in files] for layout, files in LAYOUT_FILES.items()}
    for layout, found in present.items():
        if all(found):
            return layout
    for layout, found in present.items():
        if any(found):
            missing = [f for f, ok in zip(LAYOUT_FILES[layout], found) if not ok]
            raise DataError(path, f"incomplete MovieLens {layout.upper()} directory: missing {', '.join(missing)}")
    raise DataError(
        path,
        "not a MovieLens directory: expected u.data, u.user and u.item (MovieLens 100K) "
        "or ratings.dat, users.dat and movies.dat (MovieLens 1M)",
    )


@dataclass(frozen=True)
class _Ratings:
    """Every rating used, sorted by time, with its user and movie attributes joined."""

    dense: dict[str, np.ndarray]
    categorical: dict[str, StringColumn]  # packed once, sliced per chunk
    labels: np.ndarray
    users: np.ndarray
    timestamps: np.ndarray


class MovieLensSource(TimeOrderedSplits):
    """MovieLens ratings as click-like records; ``rows`` keeps the first N ratings by time."""

    name = "movielens"

    def __init__(self, path: str | os.PathLike[str], *, rows: int | None = None, chunk_rows: int = 262_144):
        if rows is not None and rows < 1:
            raise ValueError(f"rows must be >= 1 (or None for every rating), got {rows}")
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        self.path = os.fspath(path)
        self.layout = detect_layout(self.path)
        self.rows = rows
        self.chunk_rows = chunk_rows
        self.schema = movielens_schema()
        self._ratings: _Ratings | None = None

    @property
    def num_rows(self) -> int:
        return len(self._load().labels)

    def chunks(self, split: Split) -> Iterator[Chunk]:
        start, end = self.split_bounds(split)
        ratings = self._load()
        for lo in range(start, end, self.chunk_rows):
            hi = min(lo + self.chunk_rows, end)
            yield Chunk(
                columns={
                    **{name: values[lo:hi] for name, values in ratings.dense.items()},
                    **{name: values.slice(lo, hi) for name, values in ratings.categorical.items()},
                },
                labels=ratings.labels[lo:hi],
                extras={"user": ratings.users[lo:hi], "timestamp": ratings.timestamps[lo:hi]},
            )

    # -- loading -------------------------------------------------------------

    def _file(self, index: int) -> str:
        return os.path.join(self.path, LAYOUT_FILES[self.layout][index])

    def _load(self) -> _Ratings:
        if self._ratings is None:
            self._ratings = self._read_all()
        return self._ratings

    def _read_all(self) -> _Ratings:
        ratings = _read_ratings(self._file(0), self.layout)
        if self.layout == "100k":
            users = _read_users_100k(self._file(1))
            movies = _read_movies_100k(self._file(2))
        else:
            users = _read_users_1m(self._file(1))
            movies = _read_movies_1m(self._file(2))
        order = np.argsort(ratings["timestamp"].to_numpy(), kind="stable")  # ties keep file order
        if self.rows is not None:
            order = order[: self.rows]
        table = ratings.iloc[order].reset_index(drop=True)
        table = table.merge(users, on="user", how="left", sort=False).merge(movies, on="item", how="left", sort=False)
        if len(table) == 0:
            raise DataError(self._file(0), "no ratings")
        names = ("user", "item", "age", "gender", "occupation", "zip_prefix", "genres")
        categorical = {name: _pack(table[name]) for name in names}
        return _Ratings(
            dense={"release_year": table["release_year"].to_numpy(dtype=np.float64, na_value=np.nan)},
            categorical=categorical,
            labels=(table["rating"].to_numpy() >= 4).astype(np.float32),
            users=table["user"].to_numpy(dtype=np.int64),
            timestamps=table["timestamp"].to_numpy(dtype=np.int64),
        )


# --------------------------------------------------------------------------
# Ratings: pandas' C parser, with a line-by-line scan to name a bad line
# --------------------------------------------------------------------------


def _read_ratings(path: str, layout: Layout) -> pd.DataFrame:
    # The C parser takes one-character separators only: "::" is read as ":"
    # with an empty field between each pair of values, which must stay empty.
    separator, names = ("\t", _RATING_COLUMNS) if layout == "100k" else (":", _colon_names(_RATING_COLUMNS))
    try:
        table = pd.read_csv(
            path,
            sep=separator,
            header=None,
            names=list(names),
            dtype={name: (np.int64 if name in _RATING_COLUMNS else str) for name in names},
            engine="c",
            encoding="latin-1",
            quoting=csv.QUOTE_NONE,  # quotes are data
        )
    except pd.errors.EmptyDataError:
        raise DataError(path, "no ratings") from None
    except OSError as error:
        raise DataError(path, f"cannot read: {error.strerror or error}") from None
    except (ValueError, OverflowError) as error:  # ParserError is a ValueError
        raise _locate_rating_error(path, layout, error) from None
    gaps = [name for name in names if name not in _RATING_COLUMNS]
    if gaps and table[gaps].notna().any(axis=None):
        raise _locate_rating_error(path, layout, None)
    if not table["rating"].between(1, 5).all():
        raise _locate_rating_error(path, layout, None)
    return table[list(_RATING_COLUMNS)]


def _colon_names(names: tuple[str, ...]) -> tuple[str, ...]:
    spaced: list[str] = []
    for i, name in enumerate(names):
        spaced += [name] if i == 0 else [f"_gap{i}", name]
    return tuple(spaced)


def _locate_rating_error(path: str, layout: Layout, error: BaseException | None) -> DataError:
    separator, shown = ("\t", "TAB") if layout == "100k" else ("::", "'::'")
    try:
        for number, fields in _records(path, separator=separator, count=4, shown=shown):
            for name, value in zip(_RATING_COLUMNS, fields):
                if not _is_int(value):
                    return DataError(path, f"{name} must be an integer, got {value!r}", line=number)
            if not 1 <= int(fields[2]) <= 5:
                return DataError(path, f"rating must be an integer from 1 to 5, got {fields[2]!r}", line=number)
    except DataError as found:
        return found
    detail = f": {error}" if error is not None else ""
    return DataError(path, f"cannot parse the ratings{detail}")


# --------------------------------------------------------------------------
# Users and movies: small files, read line by line
# --------------------------------------------------------------------------


def _read_users_100k(path: str) -> pd.DataFrame:
    rows = []
    for number, (user, age, gender, occupation, zip_code) in _records(path, separator="|", count=5, shown="'|'"):
        age_group = _age_group(path, number, age)
        rows.append((_int(path, number, "user id", user), age_group, gender, occupation, zip_code[:3]))
    return _users_frame(rows)


def _read_users_1m(path: str) -> pd.DataFrame:
    rows = []
    for number, (user, gender, age, occupation, zip_code) in _records(path, separator="::", count=5, shown="'::'"):
        age_group = str(_int(path, number, "age", age))
        rows.append((_int(path, number, "user id", user), age_group, gender, occupation, zip_code[:3]))
    return _users_frame(rows)


def _users_frame(rows: list[tuple[object, ...]]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=["user", "age", "gender", "occupation", "zip_prefix"])
    return frame.astype({"user": np.int64}).drop_duplicates("user")


def _read_movies_100k(path: str) -> pd.DataFrame:
    rows = []
    for number, fields in _records(path, separator="|", count=5 + len(GENRES_100K), shown="'|'"):
        item = _int(path, number, "movie id", fields[0])
        flags = fields[5:]
        if any(flag not in ("0", "1") for flag in flags):
            bad = next(flag for flag in flags if flag not in ("0", "1"))
            raise DataError(path, f"genre flags must be 0 or 1, got {bad!r}", line=number)
        genres = "|".join(genre for genre, flag in zip(GENRES_100K, flags) if flag == "1")
        match = _RELEASE_DATE.fullmatch(fields[2].strip())
        rows.append((item, genres, float(match.group(1)) if match else np.nan))
    return _movies_frame(rows)


def _read_movies_1m(path: str) -> pd.DataFrame:
    rows = []
    for number, (item, title, genres) in _records(path, separator="::", count=3, shown="'::'"):
        match = _TITLE_YEAR.search(title)
        rows.append((_int(path, number, "movie id", item), genres.strip(), float(match.group(1)) if match else np.nan))
    return _movies_frame(rows)


def _movies_frame(rows: list[tuple[object, ...]]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=["item", "genres", "release_year"])
    return frame.astype({"item": np.int64, "release_year": np.float64}).drop_duplicates("item")


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def _records(
    path: str, *, separator: str, count: int, shown: str, encoding: str = "latin-1"
) -> Iterator[tuple[int, list[str]]]:
    """``(line number, fields)`` of every non-blank line, checking the field count."""
    try:
        with open(path, encoding=encoding, newline="") as handle:
            for number, line in enumerate(handle, start=1):
                line = line.rstrip("\r\n")
                if not line.strip():
                    continue
                fields = line.split(separator)
                if len(fields) != count:
                    problem = f"expected {count} {shown}-separated fields, found {len(fields)}"
                    raise DataError(path, problem, line=number)
                yield number, fields
    except OSError as error:
        raise DataError(path, f"cannot read: {error.strerror or error}") from None


def _pack(values: pd.Series) -> StringColumn:
    """A column as text straight through Arrow (ids as decimal text, missing as empty)."""
    array = pa.array(values, from_pandas=True)
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    if not pa.types.is_string(array.type) and not pa.types.is_large_string(array.type):
        array = pa_compute.cast(array, pa.string())
    return string_column_from_arrow(array)


def _is_int(text: str) -> bool:
    return bool(re.fullmatch(r"\s*[-+]?\d+\s*", text))


def _int(path: str, line: int, what: str, text: str) -> int:
    if not _is_int(text):
        raise DataError(path, f"{what} must be an integer, got {text!r}", line=line)
    return int(text)


def _age_group(path: str, line: int, text: str) -> str:
    age = _int(path, line, "age", text)
    return str(AGE_GROUPS[int(np.searchsorted(AGE_GROUPS, max(age, 1), side="right")) - 1])

