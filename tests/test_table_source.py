"""TableSource (``--data table``): reading Parquet/CSV/TSV, schemas, splits, labels, errors,
and training end to end: fail-fast validation, whole-or-nothing checkpoints, degenerate columns,
export and scoring with the table's own column names."""

from __future__ import annotations

import gzip
import json
import math
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest
import torch

from training.__main__ import main as train_main
from training.checkpoint import load_checkpoint
from training.data import SPLITS, DataError, open_source
from training.data.table import (
    MultiValued,
    TableSchema,
    TableSource,
    parse_multi_valued,
    parse_transforms,
    table_schema,
)

SCHEMA = TableSchema(
    label="clicked", dense=("age", "income"), sparse=("city", "zip"), multi_valued={"tags": MultiValued()}
)
FAST = ["--epochs", "2", "--threads", "1", "--quiet"]  # the defaults otherwise


def make_table(rows: int, *, seed: int = 0) -> pa.Table:
    """Typed columns as a Parquet writer would keep them; missing values in every feature."""
    rng = np.random.default_rng(seed)
    city = rng.integers(0, 5, rows)
    age = rng.integers(18, 80, rows).astype(np.float64)
    logit = 0.06 * (age - 45) + (city - 2) * 0.6
    clicked = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(np.int64)
    tags = [[f"t{j}" for j in rng.choice(6, size=int(rng.integers(0, 4)), replace=False)] for _ in range(rows)]
    return pa.table({
        "id": pa.array([f"r{i}" for i in range(rows)]),
        "clicked": pa.array(clicked),
        "age": pa.array(age, mask=rng.random(rows) < 0.05),
        "income": pa.array(np.round(rng.lognormal(10, 1, rows), 2)),
        "city": pa.array([f"city {c}" for c in city], mask=rng.random(rows) < 0.05),
        "zip": pa.array(rng.integers(10_000, 10_020, rows)),
        "tags": pa.array(tags, pa.list_(pa.string())),
        "ts": pa.array(rng.permutation(rows) * 60 + 1_600_000_000),
    })


def as_text_table(table: pa.Table) -> pa.Table:
    """The same rows as a CSV/TSV holds them: lists joined with ``|``, missing as empty."""
    joined = ["|".join(values) for values in table.column("tags").to_pylist()]
    return table.set_column(table.schema.get_field_index("tags"), "tags", pa.array(joined))


def write(table: pa.Table, path: Path) -> Path:
    name = path.name.removesuffix(".gz")
    if name.endswith(".parquet"):
        pq.write_table(table, path, row_group_size=max(1, table.num_rows // 4))
        return path
    delimiter = "," if name.endswith(".csv") else "\t"
    # Arrow quotes header names whatever the style; a TSV has no quoting at all.
    options = pa_csv.WriteOptions(delimiter=delimiter, include_header=False,
                                  quoting_style="needed" if delimiter == "," else "none")
    buffer = pa.BufferOutputStream()
    pa_csv.write_csv(as_text_table(table), buffer, write_options=options)
    data = (delimiter.join(table.column_names) + "\n").encode() + buffer.getvalue().to_pybytes()
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def write_csv_text(path: Path, header: str, lines: list[str]) -> Path:
    path.write_text("\n".join([header, *lines]) + "\n", encoding="utf-8")
    return path


def read_rows(source: TableSource, split: str) -> list[tuple]:
    rows = []
    for chunk in source.chunks(split):
        columns = {name: chunk.columns[name] for name in source.table.features}
        texts = {name: columns[name].to_list() for name in source.table.features if name not in source.table.dense}
        for i in range(len(chunk)):
            dense = tuple(None if math.isnan(columns[n][i]) else float(columns[n][i]) for n in source.table.dense)
            rows.append((float(chunk.labels[i]), dense, tuple(texts[n][i] for n in texts)))
    return rows


# -- reading ---------------------------------------------------------------------


def test_parquet_csv_and_tsv_gz_read_the_same_rows(tmp_path: Path):
    table = make_table(203)
    schema = TableSchema(label="clicked", dense=("age", "income"), sparse=("city", "zip", "id"),
                         multi_valued={"tags": MultiValued()})
    sources = [
        TableSource(write(table, tmp_path / name), table=schema, chunk_rows=17, block_size=1024)
        for name in ("t.parquet", "t.csv", "t.tsv.gz")
    ]
    expected = None
    for source in sources:
        rows = {split: read_rows(source, split) for split in SPLITS}
        assert [len(rows[s]) for s in SPLITS] == [162, 20, 21]
        assert [source.split_rows(s) for s in SPLITS] == [162, 20, 21]
        if expected is None:
            expected = rows
        assert rows == expected, source.path
    first = expected["train"][0]
    row = table.slice(0, 1).to_pylist()[0]
    assert first == (float(row["clicked"]), (row["age"], row["income"]),
                     (row["city"] or "", str(row["zip"]), "r0", "|".join(row["tags"])))


def test_rows_keeps_the_first_rows_and_chunks_are_the_same_every_call(tmp_path: Path):
    path = write(make_table(100), tmp_path / "t.csv")
    source = TableSource(path, table=SCHEMA, rows=50, chunk_rows=7)
    assert source.num_rows == 50
    assert [source.split_rows(s) for s in SPLITS] == [40, 5, 5]
    assert read_rows(source, "val") == read_rows(source, "val")


def test_types_become_the_featurespec_columns(tmp_path: Path):
    path = tmp_path / "typed.parquet"
    four = pa.table({
        "y": pa.array([True, False, True, False]),
        "count": pa.array([1, None, 3, 4], pa.int32()),
        "flag": pa.array([True, False, None, True]),
        "kind": pa.array(["a", "b", "a", None]).dictionary_encode(),
        "codes": pa.array([[1, 2], None, [], [3, None]], pa.list_(pa.int64())),
        "empty": pa.nulls(4, pa.string()),
    })
    pq.write_table(pa.concat_tables([four] * 3), path)
    schema = TableSchema(label="y", dense=("count",), sparse=("flag", "kind", "empty"),
                         multi_valued={"codes": MultiValued(separator=";")})
    chunk = next(TableSource(path, table=schema).chunks("train"))  # 80% of 12 rows: the first 9
    assert chunk.labels.tolist()[:4] == [1.0, 0.0, 1.0, 0.0]
    np.testing.assert_array_equal(chunk.columns["count"][:4], [1.0, np.nan, 3.0, 4.0])
    assert chunk.columns["flag"].to_list()[:4] == ["true", "false", "", "true"]
    assert chunk.columns["kind"].to_list()[:4] == ["a", "b", "a", ""]
    assert chunk.columns["codes"].to_list()[:4] == ["1;2", "", "", "3;"]  # a null inside a list: an empty token
    assert chunk.columns["empty"].to_list() == [""] * 9


def test_csv_values_are_trimmed_and_null_spellings_are_missing(tmp_path: Path):
    path = write_csv_text(tmp_path / "adult.csv", "age, workclass, income",
                          ["39, State-gov, <=50K", "50, NA, >50K", " , Private, <=50K"] + ["28, Private, >50K"] * 7)
    schema = TableSchema(label="income", positive=">50K", dense=("age",), sparse=("workclass",))
    source = TableSource(path, table=schema)
    chunk = next(source.chunks("train"))
    assert source.columns == ("age", "workclass", "income")
    assert chunk.columns["workclass"].to_list()[:4] == ["State-gov", "", "Private", "Private"]
    np.testing.assert_array_equal(chunk.columns["age"][:4], [39.0, 50.0, np.nan, 28.0])
    assert chunk.labels.tolist()[:4] == [0.0, 1.0, 0.0, 1.0]


# -- labels -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "positive", "expected"),
    [
        (pa.array([0, 1, 1, 0]), None, [0, 1, 1, 0]),
        (pa.array([0.0, 1.0, 1.0, 0.0]), None, [0, 1, 1, 0]),
        (pa.array([False, True, True, False]), None, [0, 1, 1, 0]),
        (pa.array(["false", "TRUE", "1", "0"]), None, [0, 1, 1, 0]),
        (pa.array([3, 5, 4, 5]), "5", [0, 1, 0, 1]),
        (pa.array(["no", "yes", "maybe", "yes"]), "yes", [0, 1, 0, 1]),
        (pa.array([True, False, True, True]), "false", [0, 1, 0, 0]),
    ],
)
def test_label_values_and_positive(tmp_path: Path, values: pa.Array, positive: str | None, expected: list[int]):
    path = tmp_path / "labels.parquet"
    values = pa.concat_arrays([values] * 3)  # the fewest rows that split 80/10/10 are 10
    pq.write_table(pa.table({"label": values, "x": [1.0] * 12, "c": ["a"] * 12}), path)
    schema = TableSchema(label="label", positive=positive, dense=("x",), sparse=("c",))
    source = TableSource(path, table=schema)
    labels = np.concatenate([chunk.labels for split in SPLITS for chunk in source.chunks(split)])
    assert labels.tolist() == expected * 3


def test_a_label_that_is_not_0_or_1_names_the_way_out(tmp_path: Path):
    path = write_csv_text(tmp_path / "adult.csv", "income,age,workclass",
                          ["<=50K,39,State-gov", ">50K,50,Private"] * 5)
    source = TableSource(path, table=TableSchema(label="income", dense=("age",), sparse=("workclass",)))
    with pytest.raises(DataError, match=r"adult\.csv:2: column 'income': a label must be 0/1 or true/false, "
                                        r"got '<=50K' \(name the positive class with --positive VALUE\)"):
        list(source.chunks("train"))


# -- splits -------------------------------------------------------------------------


def _ids(source: TableSource, split: str) -> list[str]:
    return [value for chunk in source.chunks(split) for value in chunk.columns["id"].to_list()]


@pytest.mark.parametrize("name", ["t.parquet", "t.csv"])
def test_time_column_split_sorts_by_time_without_leakage(tmp_path: Path, name: str):
    table = make_table(250)
    times = dict(zip(table.column("id").to_pylist(), table.column("ts").to_pylist()))
    schema = TableSchema(label="clicked", dense=("age",), sparse=("id",), time_column="ts")
    source = TableSource(write(table, tmp_path / name), table=schema, chunk_rows=16)
    ids = {split: _ids(source, split) for split in SPLITS}
    assert [len(ids[s]) for s in SPLITS] == [200, 25, 25]
    assert sorted(i for split in SPLITS for i in ids[split]) == sorted(times)  # every row once
    spans = {split: [times[i] for i in ids[split]] for split in SPLITS}
    assert max(spans["train"]) < min(spans["val"]) and max(spans["val"]) < min(spans["test"])
    file_order = {row_id: position for position, row_id in enumerate(table.column("id").to_pylist())}
    assert ids["train"] == sorted(ids["train"], key=file_order.__getitem__)  # within a split: file order


def test_time_column_reads_dates_as_text(tmp_path: Path):
    days = ["2024-01-03", "2024-01-01", "2024-01-10", "2024-01-02", "2024-01-05",
            "2024-01-04", "2024-01-09", "2024-01-06", "2024-01-08", "2024-01-07"]
    path = write_csv_text(tmp_path / "d.csv", "day,y,x,id", [f"{d},1,1,{d}" for d in days])
    source = TableSource(path, table=TableSchema(label="y", dense=("x",), sparse=("id",), time_column="day"))
    assert _ids(source, "test") == ["2024-01-10"]
    assert _ids(source, "val") == ["2024-01-09"]


def test_random_split_is_a_seeded_permutation(tmp_path: Path):
    path = write(make_table(300), tmp_path / "t.parquet")
    schema = TableSchema(label="clicked", dense=("age",), sparse=("id",), split="random")

    def splits(seed: int) -> dict[str, list[str]]:
        source = TableSource(path, table=schema, seed=seed, chunk_rows=32)
        return {split: _ids(source, split) for split in SPLITS}

    first = splits(1)
    assert first == splits(1)
    assert [len(first[s]) for s in SPLITS] == [240, 30, 30]
    assert len({i for split in SPLITS for i in first[split]}) == 300
    assert first["test"] != splits(2)["test"]
    ordered = splits(1)["train"]
    assert ordered != [f"r{i}" for i in range(240)]  # not the order split


# -- schema files and flags -----------------------------------------------------------


def test_schema_file_yaml_and_json_and_flags_override(tmp_path: Path):
    yaml_file = tmp_path / "schema.yaml"
    yaml_file.write_text(
        "label: income\n"
        "positive: yes\n"  # YAML reads yes as a boolean: it stands for the text "true"
        "dense: [age, hours]\n"
        "sparse: [workclass]\n"
        "multi_valued:\n  tags: ';'\n  genres: {separator: '|', max_values: 3}\n"
        "split: random\n"
        "transforms: {age: log1p}\n",
        encoding="utf-8",
    )
    schema = table_schema(schema_file=yaml_file)
    assert schema == TableSchema(
        label="income", positive="true", dense=("age", "hours"), sparse=("workclass",),
        multi_valued={"tags": MultiValued(";"), "genres": MultiValued("|", 3)}, split="random",
        transforms={"age": "log1p"},
    )
    assert [f.name for f in schema.fields()] == ["age", "hours", "workclass", "tags", "genres"]
    assert schema.fields()[1].transform == "standard"  # the table default
    assert schema.fields()[4].options.max_values == 3

    json_file = tmp_path / "schema.json"
    json_file.write_text(json.dumps({"label": "income", "dense": ["age"], "sparse": ["workclass"],
                                     "time_column": "day"}), encoding="utf-8")
    overridden = table_schema(schema_file=json_file, dense=("hours",), positive=">50K", split="order")
    assert (overridden.dense, overridden.positive, overridden.split, overridden.time_column) == (
        ("hours",), ">50K", "order", None)  # --split replaces the file's time column
    assert table_schema(schema_file=yaml_file, time_column="day").split is None


def test_cli_flags_build_the_same_schema_as_the_file(tmp_path: Path):
    assert parse_multi_valued("tags=|,genres=;:6,topics, sep=,") == {
        "tags": MultiValued("|"), "genres": MultiValued(";", 6), "topics": MultiValued(), "sep": MultiValued(","),
    }
    assert parse_transforms("age=log1p, hours=identity") == {"age": "log1p", "hours": "identity"}
    with pytest.raises(ValueError, match="expected COLUMN=TRANSFORM .* got 'age=sqrt'"):
        parse_transforms("age=sqrt")
    with pytest.raises(ValueError, match="one ASCII character, got '::'"):
        MultiValued("::")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("label: y\ndense: [a]\nsparse: [b]\ncolour: red\n", r"schema\.yaml: unknown key 'colour'"),
        ("label: y\ndense: [a]\nsparse: [b]\nsplit: random\ntime_column: t\n", "a time column .* excludes split"),
        ("label: y\ndense: [a]\nsparse: [y]\n", "the label column 'y' cannot also be a feature"),
        ("label: y\ndense: [a]\nsparse: []\n", "at least one dense and one sparse column"),
        ("label: y\ndense: [a]\nsparse: [b]\ntransforms: {b: log1p}\n", "not a dense column"),
        ("label: y\ndense: [a, a]\nsparse: [b]\n", "column 'a' is listed more than once"),
        ("label: [y\n", r"schema\.yaml:2: not valid YAML"),
    ],
)
def test_schema_errors_name_the_problem(tmp_path: Path, content: str, message: str):
    path = tmp_path / "schema.yaml"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        table_schema(schema_file=path)


def test_format_from_the_name_or_given(tmp_path: Path):
    path = write(make_table(20), tmp_path / "t.csv")
    renamed = path.rename(tmp_path / "t.data")
    with pytest.raises(DataError, match=r"t\.data: cannot tell the format from the file name: pass --format"):
        TableSource(renamed, table=SCHEMA)
    source = open_source("table", path=renamed, table=TableSchema(**{**SCHEMA.__dict__, "format": "csv"}))
    assert source.num_rows == 20


# -- errors --------------------------------------------------------------------------


def test_csv_errors_name_the_file_line_and_column(tmp_path: Path):
    good = [f"{i % 2},{20 + i},c{i % 3}" for i in range(30)]
    cases = {
        "abc": ("age", "column 'age': expected a number, got 'abc'", 27),
        "inf": ("age", "column 'age': expected a finite number, got inf", 12),
        "fields": ("age", "expected 3 comma-separated fields (as in the header), found 2", 31),
    }
    for name, (_, message, line) in cases.items():
        lines = list(good)
        lines[line - 2] = {"abc": "1,abc,c1", "inf": "0,inf,c2", "fields": "1,30"}[name]
        path = write_csv_text(tmp_path / f"{name}.csv", "y,age,city", lines)
        source = TableSource(path, table=TableSchema(label="y", dense=("age",), sparse=("city",)), block_size=1024)
        with pytest.raises(DataError) as caught:
            for split in SPLITS:
                list(source.chunks(split))
        assert str(caught.value) == f"{path}:{line}: {message}"
        assert caught.value.line == line


def test_parquet_errors_name_the_row_group_and_row(tmp_path: Path):
    ages = [str(20 + i) for i in range(40)]
    ages[27] = "abc"
    path = tmp_path / "people.parquet"
    pq.write_table(pa.table({"y": [0, 1] * 20, "age": ages, "city": ["x"] * 40}), path, row_group_size=10)
    source = TableSource(path, table=TableSchema(label="y", dense=("age",), sparse=("city",)))
    with pytest.raises(DataError, match=r"people\.parquet: row group 2, row 7 \(file row 27\): column 'age': "
                                        r"expected a number, got 'abc'"):
        list(source.chunks("train"))


def test_unknown_columns_list_the_file_columns(tmp_path: Path):
    path = write(make_table(10), tmp_path / "t.parquet")
    with pytest.raises(DataError, match=r"no column 'agee'; the file's columns are: id, clicked, age, income, city"):
        TableSource(path, table=TableSchema(label="clicked", dense=("agee",), sparse=("city",)))


# -- training end to end ---------------------------------------------------------------


def _train_args(path: Path, out: Path, *extra: str) -> list[str]:
    return ["--data", "table", "--data-path", str(path), "--label", "clicked", "--dense", "age,income",
            "--sparse", "city,zip", "--multi-valued", "tags", "--out", str(out), *extra]


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def test_a_5000_row_table_trains_with_default_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    path = write(make_table(5000), tmp_path / "t.csv")
    out = tmp_path / "run"
    assert train_main(_train_args(path, out, *FAST)) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["data"] == "table" and result["test_auc"] > 0.6
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["rows"] == {"train": 4000, "val": 500, "test": 500}
    assert metrics["options"]["table"]["label"] == "clicked"
    assert load_checkpoint(out).spec.feature_names == ["age", "income", "city", "zip", "tags"]
    assert _leftovers(out) == []


@pytest.mark.parametrize("kind", ["constant", "always missing"])
def test_degenerate_columns_train_with_default_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str):
    table = make_table(1000)
    if kind == "constant":
        table = table.append_column("d", pa.array([3.5] * 1000)).append_column("c", pa.array(["same"] * 1000))
    else:
        table = table.append_column("d", pa.nulls(1000, pa.float64())).append_column("c", pa.nulls(1000, pa.string()))
    path = write(table, tmp_path / "t.parquet")
    out = tmp_path / "run"
    args = ["--data", "table", "--data-path", str(path), "--label", "clicked", "--dense", "age,d",
            "--sparse", "city,c", "--out", str(out), *FAST]
    assert train_main(args) == 0
    captured = capsys.readouterr()
    spec = load_checkpoint(out).spec
    sizes = dict(zip([f.name for f in spec.sparse], spec.table_sizes))
    if kind == "constant":
        assert sizes["c"] == 2  # the value and the missing/unseen row
        assert "warning: column 'd' has one value in every training row" in captured.err
    else:
        assert sizes["c"] == 1  # the missing/unseen row alone
        assert "warning: column 'c' is missing in every training row: it only carries missing/unseen" in captured.err
        assert "warning: column 'd' is missing in every training row" in captured.err
    assert math.isfinite(json.loads((out / "metrics.json").read_text())["test_logloss"])


def test_a_split_beyond_the_training_range_warns_and_trains(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    table = make_table(1000).append_column("step", pa.array(np.arange(1000, dtype=np.float64)))  # grows with time
    path = write(table, tmp_path / "t.parquet")
    out = tmp_path / "run"
    args = ["--data", "table", "--data-path", str(path), "--label", "clicked", "--dense", "age,step",
            "--sparse", "city", "--out", str(out), *FAST]
    assert train_main(args) == 0
    err = capsys.readouterr().err
    assert "warning: column 'step': 100.0% above the training range [0, 799] in the val split, clipped to it" in err
    assert "warning: column 'step': 100.0% above the training range [0, 799] in the test split" in err
    assert "'age'" not in err  # drawn alike in every split
    assert (out / "metrics.json").exists()


def test_rare_values_only_warn_and_train(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    path = write(make_table(600), tmp_path / "t.parquet")
    out = tmp_path / "run"
    args = ["--data", "table", "--data-path", str(path), "--label", "clicked", "--dense", "age",
            "--sparse", "city,id", "--min-count", "5", "--out", str(out), *FAST]
    assert train_main(args) == 0
    assert "warning: column 'id' has no value seen 5 times in training: it only carries missing/unseen" in (
        capsys.readouterr().err)


def test_a_bad_line_in_the_test_split_stops_the_run_before_training(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    path = write(make_table(3000), tmp_path / "t.csv")
    lines = path.read_text(encoding="utf-8").splitlines()
    bad_line = 2950  # in the last 10%: the test split
    fields = lines[bad_line - 1].split(",")
    fields[2] = "forty"  # age
    lines[bad_line - 1] = ",".join(fields)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "run"
    started = time.perf_counter()
    assert train_main(_train_args(path, out, "--epochs", "1", "--threads", "1")) == 2
    assert time.perf_counter() - started < 30
    captured = capsys.readouterr()
    assert f"error: {path}:{bad_line}: column 'age': expected a number, got 'forty'" in captured.err
    assert "epoch 1" not in captured.out and "epoch 1" not in captured.err
    assert not out.exists()
    assert _leftovers(out) == []


def test_a_failed_run_leaves_an_existing_out_untouched(tmp_path: Path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "model.pt").write_bytes(b"the previous weights")
    (out / "metrics.json").write_text('{"test_auc": 0.8}', encoding="utf-8")
    path = write_csv_text(tmp_path / "t.csv", "clicked,age,income,city,zip,tags",
                          [f"{i % 2},{i},1.0,c,1,a" for i in range(99)] + ["1,2,3,c,1,a,surplus"])
    assert train_main(_train_args(path, out, *FAST)) == 2
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "model.pt"]
    assert (out / "model.pt").read_bytes() == b"the previous weights"
    assert _leftovers(out) == []


def test_a_successful_run_replaces_out_whole(tmp_path: Path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "stale.txt").write_text("from an older run", encoding="utf-8")
    path = write(make_table(400), tmp_path / "t.parquet")
    assert train_main(_train_args(path, out, *FAST, "--min-count", "1", "--split", "random")) == 0
    assert not (out / "stale.txt").exists()
    assert json.loads((out / "metrics.json").read_text())["options"]["table"]["split"] == "random"
    assert {"model.pt", "config.json", "features.json", "metrics.json"} <= {p.name for p in out.iterdir()}
    assert _leftovers(out) == []


def test_table_flags_need_data_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert train_main(["--data", "synthetic", "--label", "y", "--out", str(tmp_path / "run")]) == 2
    assert "error: --label describes a table: it needs --data table" in capsys.readouterr().err
    assert train_main(["--data", "table", "--data-path", "x.csv", "--out", str(tmp_path / "run")]) == 2
    assert "--data table needs --label" in capsys.readouterr().err
    args = ["--data", "table", "--data-path", "x.csv", "--label", "y", "--split", "leave-last-out", "--out", "o"]
    assert train_main(args) == 2
    assert "--split leave-last-out applies to --data movielens" in capsys.readouterr().err


def test_exported_table_model_scores_records_with_the_column_names(tmp_path: Path):
    from export.__main__ import main as export_main
    from featurespec import FeatureSpec
    from handlers.backends import OnnxBackend, TorchScriptBackend
    from handlers.request import Limits, RequestError, encode_batch

    table = make_table(1200).append_column("never", pa.nulls(1200, pa.string()))
    path = write(table, tmp_path / "t.parquet")
    checkpoint_dir, export_dir = tmp_path / "run", tmp_path / "export"
    args = _train_args(path, checkpoint_dir, *FAST, "--model", "widedeep")
    args[args.index("city,zip")] = "city,zip,never"  # a 1-row table goes through export too
    assert train_main(args) == 0
    assert export_main([str(checkpoint_dir), "--out", str(export_dir), "--records", "4096", "--threads", "1"]) == 0

    spec = FeatureSpec.load(export_dir / "features.json")
    assert spec.feature_names == ["age", "income", "city", "zip", "never", "tags"]
    records = [
        {"age": 31, "income": 52000.5, "city": "city 3", "zip": 10004, "tags": ["t1", "t4"]},
        {"age": None, "city": "a city never seen", "zip": "10011", "tags": "t2|t0", "never": "x"},
        {"income": 1.0},
    ]
    # The handler's path: a JSON body as TorchServe forwards it, the table's column names as feature names.
    batch = encode_batch(spec, [{"body": json.dumps({"instances": records}).encode()}], limits=Limits())
    dense, sparse = batch.dense, batch.sparse
    np.testing.assert_array_equal(sparse, spec.encode_records(records)[1])
    unknown = encode_batch(spec, [{"body": json.dumps({"instances": [{"Age": 3}]}).encode()}], limits=Limits())
    assert isinstance(unknown.outcomes[0], RequestError) and "Age" in str(unknown.outcomes[0])
    eager = load_checkpoint(checkpoint_dir)
    with torch.inference_mode():
        expected = torch.sigmoid(eager.model(torch.from_numpy(dense), torch.from_numpy(sparse))).numpy()
    onnx = OnnxBackend(export_dir / "model.onnx", device="cpu", threads=1).predict(dense, sparse)
    scripted = TorchScriptBackend(export_dir / "model.ts.pt", device="cpu", threads=1).predict(dense, sparse)
    np.testing.assert_allclose(onnx, expected, atol=1e-5)
    np.testing.assert_allclose(scripted, expected, atol=1e-5)
    # The integer 10004 and the text "10004" are the same category, as in the file.
    same = spec.encode_records([{"zip": 10004}, {"zip": "10004"}])[1]
    assert (same[0] == same[1]).all() and same[0][spec.feature_names.index("zip") - spec.num_dense] > 0
