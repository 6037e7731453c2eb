"""CriteoSource: parsing, splits, chunking, encoding with a fitted FeatureSpec, and error messages."""

from __future__ import annotations

import gzip
import math
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

import training.data.criteo as criteo
from featurespec.arrow import string_column_from_arrow
from training.data import SPLITS, DataError, open_source, time_split_bounds
from training.data.criteo import (
    CATEGORICAL_COLUMNS,
    CRITEO_COLUMNS,
    INT_COLUMNS,
    CriteoSource,
    criteo_schema,
)
from training.fitting import SparseOptions, fit_spec


def _rows(source: CriteoSource, split: str) -> list[tuple[float, list[float], list[str]]]:
    out = []
    for chunk in source.chunks(split):
        ints = np.stack([chunk.columns[name] for name in INT_COLUMNS], axis=1)
        categories = [chunk.columns[name].to_list() for name in CATEGORICAL_COLUMNS]
        for i in range(len(chunk)):
            out.append((float(chunk.labels[i]), ints[i].tolist(), [column[i] for column in categories]))
    return out


@pytest.fixture
def expected_rows(criteo_record) -> Callable[[Iterable[int]], list[tuple[float, list[float], list[str]]]]:
    """``expected_rows(rows)``: those ``criteo_record`` rows as CriteoSource yields them (missing ints as NaN)."""

    def parsed(rows: Iterable[int]) -> list[tuple[float, list[float], list[str]]]:
        out = []
        for row in rows:
            label, ints, categories = criteo_record(row)
            out.append((float(label), [math.nan if v is None else float(v) for v in ints], categories))
        return out

    return parsed


def _same(actual: list, expected: list) -> bool:
    # NaN != NaN, so compare the printed forms.
    return repr(actual) == repr(expected)


def test_columns_and_schema():
    assert CRITEO_COLUMNS[0] == "label" and len(CRITEO_COLUMNS) == 40
    schema = criteo_schema(SparseOptions(min_count=5))
    assert [f.name for f in schema] == list(CRITEO_COLUMNS[1:])
    assert all(f.dense and f.transform == "log1p" for f in schema[:13])
    assert all(not f.dense and f.options.min_count == 5 for f in schema[13:])
    assert criteo_schema()[13].options == SparseOptions()


@pytest.mark.parametrize("name", ["day.tsv", "day.tsv.gz"])
def test_parses_values_in_file_order(tmp_path: Path, name: str, write_criteo, expected_rows):
    path = write_criteo(tmp_path / name, 50)
    source = CriteoSource(path, chunk_rows=7)
    rows = [row for split in SPLITS for row in _rows(source, split)]
    assert _same(rows, expected_rows(range(50)))
    chunk = next(source.chunks("train"))
    assert chunk.labels.dtype == np.float32
    assert chunk.columns["I1"].dtype == np.float64
    assert np.isnan(chunk.columns["I1"][0])  # row 0: I1 is missing
    assert chunk.columns["I2"][[2, 3, 5]].tolist() == [0.0, 1.0, -1.0]  # negatives kept
    assert np.isnan(chunk.columns["I2"][4])
    assert chunk.columns["C1"].to_list()[0] == ""  # missing category -> empty


def test_splits_are_80_10_10_by_position(tmp_path: Path, write_criteo, expected_rows):
    source = CriteoSource(write_criteo(tmp_path / "day.tsv", 50), chunk_rows=16)
    assert source.num_rows == 50
    sizes = {split: sum(len(c) for c in source.chunks(split)) for split in SPLITS}
    assert sizes == {"train": 40, "val": 5, "test": 5}
    assert [len(c) for c in source.chunks("train")] == [16, 16, 8]
    assert _same(_rows(source, "test"), expected_rows(range(45, 50)))
    assert time_split_bounds(7) == {"train": (0, 5), "val": (5, 6), "test": (6, 7)}
    assert [source.split_rows(split) for split in SPLITS] == [40, 5, 5]
    assert source.split_bounds("val") == (40, 45)


def test_rows_keeps_the_first_rows(tmp_path: Path, write_criteo, expected_rows):
    source = CriteoSource(write_criteo(tmp_path / "day.tsv.gz", 50), rows=20)
    assert source.num_rows == 20
    assert _same(_rows(source, "train"), expected_rows(range(16)))
    assert _same(_rows(source, "test"), expected_rows(range(18, 20)))


def test_same_rows_every_call(tmp_path: Path, write_criteo):
    source = CriteoSource(write_criteo(tmp_path / "day.tsv", 30), chunk_rows=4)
    assert _same(_rows(source, "val"), _rows(source, "val"))


def test_val_and_test_seek_from_the_block_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, write_criteo, expected_rows):
    path = write_criteo(tmp_path / "day.tsv", 60)
    # Tiny counting blocks: val and test then start by seeking into the middle of the file.
    monkeypatch.setattr(criteo, "_READ_BYTES", 97)
    source = CriteoSource(path, chunk_rows=5, block_size=1024)
    assert len(source._line_index().block_offsets) > 10
    rows = [row for split in SPLITS for row in _rows(source, split)]
    assert _same(rows, expected_rows(range(60)))


def test_last_line_without_newline(tmp_path: Path, criteo_line, expected_rows):
    path = tmp_path / "day.tsv"
    path.write_text("\n".join(criteo_line(r) for r in range(10)), encoding="utf-8")
    source = CriteoSource(path)
    assert source.num_rows == 10
    assert _same(_rows(source, "test"), expected_rows([9]))


def test_fitted_spec_encodes_chunks(tmp_path: Path, write_criteo):
    source = CriteoSource(write_criteo(tmp_path / "day.tsv", 60), sparse_options=SparseOptions(min_count=1))
    spec = fit_spec(source.schema, (chunk.columns for chunk in source.chunks("train")))
    assert spec.num_dense == 13 and spec.num_sparse_columns == 26
    chunk = next(source.chunks("val"))
    dense, sparse = spec.encode_columns(chunk.columns, len(chunk))
    assert dense.shape == (6, 13) and dense.dtype == np.float32
    assert sparse.shape == (6, 26) and sparse.dtype == np.int64
    assert (sparse >= 0).all() and (sparse < np.array(spec.table_sizes)).all()
    # Missing dense -> 0; negatives clip to 0 under log1p; missing category -> index 0.
    assert np.isnan(chunk.columns["I1"][2]) and dense[2, 0] == 0  # row 50: I1 missing
    assert dense[:, 1].min() == 0.0
    missing_c6 = np.array(chunk.columns["C6"].to_list()) == ""
    assert missing_c6.tolist() == [True, False, False, False, False, False]  # row 48
    assert sparse[0, 5] == 0 and (sparse[1:, 5] > 0).all()


def test_string_column_from_sliced_arrow_array_with_nulls():
    array = pa.array(["ab", None, "", "cde", "f"]).slice(1, 4)
    column = string_column_from_arrow(array)
    assert column.to_list() == ["", "", "cde", "f"]
    assert column.offsets.tolist() == [0, 0, 0, 3, 4]
    assert string_column_from_arrow(pa.array(["xy", "z"]).slice(1)).to_list() == ["z"]
    with pytest.raises(TypeError, match="expected an Arrow string array"):
        string_column_from_arrow(pa.array([1, 2]))


def test_open_source_builds_criteo(tmp_path: Path, write_criteo):
    source = open_source("criteo", path=write_criteo(tmp_path / "day.tsv", 20), rows=10, chunk_rows=3)
    assert source.name == "criteo" and source.num_rows == 10
    assert [len(c) for c in source.chunks("train")] == [3, 3, 2]


# -- errors -------------------------------------------------------------------


def _read_everything(source: CriteoSource) -> None:
    for split in SPLITS:
        for _ in source.chunks(split):
            pass


def test_missing_file(tmp_path: Path):
    with pytest.raises(DataError, match=r"nope\.tsv: file not found"):
        CriteoSource(tmp_path / "nope.tsv")


def test_empty_file(tmp_path: Path):
    (tmp_path / "empty.tsv").write_bytes(b"")
    with pytest.raises(DataError, match=r"empty\.tsv: the file has no rows"):
        _read_everything(CriteoSource(tmp_path / "empty.tsv"))


@pytest.mark.parametrize("name", ["day.tsv", "day.tsv.gz"])
def test_wrong_number_of_fields_names_the_line(tmp_path: Path, name: str, write_criteo, criteo_line):
    short = "\t".join(criteo_line(33).split("\t")[:-1])
    path = write_criteo(tmp_path / name, 50, replace={33: short})
    with pytest.raises(DataError, match=rf"{name}:34: expected 40 tab-separated fields .* found 39"):
        _read_everything(CriteoSource(path, block_size=1024))


@pytest.mark.parametrize("name", ["day.tsv", "day.tsv.gz"])
def test_non_integer_in_i3_names_the_line(tmp_path: Path, name: str, write_criteo, criteo_line):
    fields = criteo_line(46).split("\t")  # row 46 is in the test split
    fields[3] = "3.5"
    path = write_criteo(tmp_path / name, 50, replace={46: "\t".join(fields)})
    with pytest.raises(DataError, match=rf"{name}:47: I3 must be an integer or empty, got '3\.5'"):
        _read_everything(CriteoSource(path))


@pytest.mark.parametrize(("label", "problem"), [("2", "label must be 0 or 1, got '2'"), ("", "missing label")])
def test_bad_label_names_the_line(tmp_path: Path, label: str, problem: str, write_criteo, criteo_line):
    fields = criteo_line(41).split("\t")
    fields[0] = label
    path = write_criteo(tmp_path / "day.tsv", 50, replace={41: "\t".join(fields)})
    with pytest.raises(DataError, match=rf"day\.tsv:42: {problem}"):
        _read_everything(CriteoSource(path))


def test_empty_line_names_the_line(tmp_path: Path, write_criteo):
    path = write_criteo(tmp_path / "day.tsv", 20, replace={5: ""})
    with pytest.raises(DataError, match=r"day\.tsv:6: empty line"):
        _read_everything(CriteoSource(path))


def test_truncated_gzip(tmp_path: Path, write_criteo):
    path = write_criteo(tmp_path / "day.tsv.gz", 200)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"day\.tsv\.gz: cannot decompress"):
        _read_everything(CriteoSource(path))


def test_bad_options():
    with pytest.raises(ValueError, match="rows must be >= 1"):
        CriteoSource("x.tsv", rows=0)
    with pytest.raises(ValueError, match="chunk_rows must be >= 1, got 0"):
        CriteoSource("x.tsv", chunk_rows=0)


def test_gzip_with_plain_name_is_detected(tmp_path: Path, criteo_line, expected_rows):
    path = tmp_path / "day.tsv"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write("".join(criteo_line(r) + "\n" for r in range(10)))
    assert _same(_rows(CriteoSource(path), "test"), expected_rows([9]))
