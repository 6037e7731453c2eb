"""Small raw data files for the data-source tests: Criteo TSV and MovieLens directories."""

from __future__ import annotations

import gzip
from pathlib import Path

CRITEO_INTS = 13
CRITEO_CATEGORIES = 26


def criteo_record(row: int) -> tuple[int, list[int | None], list[str]]:
    """A deterministic record: label, 13 ints (some negative, some missing), 26 hex strings (some missing)."""
    label = 1 if row % 3 == 0 else 0
    ints: list[int | None] = []
    for j in range(CRITEO_INTS):
        if (row + j) % 5 == 0:
            ints.append(None)
        elif j == 1:
            ints.append(row % 4 - 2)  # I2: -2..1, as in Criteo
        else:
            ints.append(row * (j + 1))
    categories = ["" if (row * 7 + j) % 11 == 0 else f"{(row % 6) * 1000 + j:08x}" for j in range(CRITEO_CATEGORIES)]
    return label, ints, categories


def criteo_line(row: int) -> str:
    label, ints, categories = criteo_record(row)
    return "\t".join([str(label), *("" if v is None else str(v) for v in ints), *categories])


def write_criteo(path: Path, rows: int, *, replace: dict[int, str] | None = None) -> Path:
    """Write ``rows`` records (``.gz`` when the name says so); ``replace`` swaps in raw lines by 0-based row."""
    lines = [criteo_line(row) for row in range(rows)]
    for row, line in (replace or {}).items():
        lines[row] = line
    text = "\n".join(lines) + "\n"
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as handle:
            handle.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


# MovieLens: 4 users, 5 movies, 20 ratings whose timestamps are not in file order.
ML_USERS = [
    # id, age, gender, occupation, zip
    (1, 24, "M", "technician", "85711"),
    (2, 53, "F", "other", "94043"),
    (3, 17, "M", "student", "T8H1N"),
    (4, 33, "F", "writer", "15213"),
]
ML_MOVIES = [
    # id, title, year or None, genres
    (1, "Toy Story", 1995, ("Animation", "Children's", "Comedy")),
    (2, "GoldenEye", 1995, ("Action", "Adventure", "Thriller")),
    (3, "Four Rooms", 1995, ("Thriller",)),
    (4, "Amélie", 2001, ("Comedy", "Romance")),
    (5, "Unknown Film", None, ()),
]
ML_RATINGS = [
    # user, item, rating, timestamp
    (row % 4 + 1, row % 5 + 1, row % 5 + 1, 880_000_000 + (row * 7919) % 20 * 1000)
    for row in range(20)
]
GENRES_100K = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip
AGE_GROUP_1M = {24: 18, 53: 50, 17: 1, 33: 25}


def write_movielens_100k(directory: Path, *, ratings: list[str] | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    lines = ratings if ratings is not None else ["\t".join(map(str, r)) for r in ML_RATINGS]
    (directory / "u.data").write_text("\n".join(lines) + "\n", encoding="latin-1")
    (directory / "u.user").write_text(
        "".join(f"{u}|{age}|{g}|{occupation}|{zip_code}\n" for u, age, g, occupation, zip_code in ML_USERS),
        encoding="latin-1",
    )
    items = []
    for item, title, year, genres in ML_MOVIES:
        date = f"01-Jan-{year}" if year else ""
        flags = "|".join("1" if g in genres else "0" for g in GENRES_100K)
        items.append(f"{item}|{title} ({year})|{date}||http://example.com/{item}|{flags}\n")
    (directory / "u.item").write_text("".join(items), encoding="latin-1")
    return directory


def write_movielens_1m(directory: Path, *, ratings: list[str] | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    lines = ratings if ratings is not None else ["::".join(map(str, r)) for r in ML_RATINGS]
    (directory / "ratings.dat").write_text("\n".join(lines) + "\n", encoding="latin-1")
    (directory / "users.dat").write_text(
        "".join(
            f"{u}::{g}::{AGE_GROUP_1M[age]}::{i}::{zip_code}\n" for i, (u, age, g, _, zip_code) in enumerate(ML_USERS)
        ),
        encoding="latin-1",
    )
    (directory / "movies.dat").write_text(
        "".join(
            f"{item}::{title}{f' ({year})' if year else ''}::{'|'.join(genres)}\n"
            for item, title, year, genres in ML_MOVIES
        ),
        encoding="latin-1",
    )
    return directory
