"""History features of ``--data table`` (user, item and time columns): each row's history
against a brute-force computation, the dense statistics, name clashes, schema keys and flags,
and training end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest

from training.__main__ import main as train_main
from training.checkpoint import load_checkpoint
from training.data import SPLITS, DataError
from training.data.table import TableSchema, TableSource, table_schema

HISTORY_NAMES = ["history", "history_liked", "rated_before", "liked_share"]
SCHEMA = TableSchema(label="clicked", dense=("price",), sparse=("id", "item"), time_column="ts",
                     user_column="user", item_column="item")


def click_log(rows: int, *, seed: int = 0) -> pa.Table:
    """Clicks of a few users on a few items; timestamps from a narrow range, so many rows share one."""
    rng = np.random.default_rng(seed)
    users = rng.integers(0, 7, rows)
    items = rng.integers(0, 15, rows)
    return pa.table({
        "id": pa.array([f"r{i}" for i in range(rows)]),
        "user": pa.array([f"u{u}" for u in users], mask=rng.random(rows) < 0.03),  # a few anonymous rows
        "item": pa.array(items, mask=rng.random(rows) < 0.03),  # integer ids, a few missing
        "ts": pa.array(1_700_000_000 + rng.integers(0, rows // 3, rows)),
        "clicked": pa.array((rng.random(rows) < 0.3 + 0.04 * (items % 10)).astype(np.int64)),
        "price": pa.array(np.round(rng.lognormal(3, 1, rows), 2)),
    })


def write(table: pa.Table, path: Path) -> Path:
    if path.suffix == ".parquet":
        pq.write_table(table, path, row_group_size=max(1, table.num_rows // 5))
    else:
        pa_csv.write_csv(table, path, write_options=pa_csv.WriteOptions(quoting_style="needed"))
    return path


def brute_force(table: pa.Table, row: int, *, length: int) -> tuple[str, str, float, float]:
    """history, history_liked, rated_before and liked_share of one row, by scanning every row."""
    log = table.to_pylist()
    user, time = log[row]["user"], log[row]["ts"]
    if user is None:
        return "", "", 0.0, math.nan
    earlier = [(r["ts"], position, r) for position, r in enumerate(log)
               if r["user"] == user and r["item"] is not None and r["ts"] < time]
    earlier.sort(key=lambda entry: entry[:2], reverse=True)  # most recent first; a tie: the later file row first
    items = [str(r["item"]) for _, _, r in earlier]
    liked = [str(r["item"]) for _, _, r in earlier if r["clicked"] == 1]
    share = len(liked) / len(items) if items else math.nan
    return "|".join(items[:length]), "|".join(liked[:length]), float(len(items)), share


def history_by_id(source: TableSource, split: str) -> dict[str, tuple[str, str, float, float]]:
    out = {}
    for chunk in source.chunks(split):
        columns = [chunk.columns["history"].to_list(), chunk.columns["history_liked"].to_list(),
                   chunk.columns["rated_before"], chunk.columns["liked_share"]]
        for i, row_id in enumerate(chunk.columns["id"].to_list()):
            out[row_id] = (columns[0][i], columns[1][i], float(columns[2][i]), float(columns[3][i]))
    return out


def same(got: tuple, expected: tuple) -> bool:
    return got[:3] == expected[:3] and (got[3] == expected[3] or math.isnan(got[3]) and math.isnan(expected[3]))


# -- the features -----------------------------------------------------------------


@pytest.mark.parametrize("name", ["clicks.parquet", "clicks.csv"])
def test_every_rows_history_equals_a_brute_force_scan(tmp_path: Path, name: str):
    table = click_log(240)
    source = TableSource(write(table, tmp_path / name), table=SCHEMA, history_length=4, chunk_rows=13,
                         block_size=1024)
    assert [f.name for f in source.schema][-4:] == HISTORY_NAMES
    positions = {row_id: i for i, row_id in enumerate(table.column("id").to_pylist())}
    seen = 0
    for split in SPLITS:
        for row_id, got in history_by_id(source, split).items():
            expected = brute_force(table, positions[row_id], length=4)
            assert same(got, expected), (split, row_id, got, expected)
            seen += 1
    assert seen == 240
    # The data is what the check needs: ties, full histories, val/test rows seeing training rows.
    assert len(set(table.column("ts").to_pylist())) < 120
    assert any(h.count("|") == 3 for h, *_ in history_by_id(source, "test").values())


def test_statistics_and_ties_by_hand(tmp_path: Path):
    lines = [
        "ts,user,item,clicked,price",
        "1,a,i1,1,1",
        "1,a,i2,0,1",  # the same second as i1: neither sees the other
        "2,a,i3,1,1",
        "2,b,i1,0,1",
        "3,a,i4,0,1",
        "3,b,i2,1,1",
        "4,a,i5,1,1",
        "4,b,i3,1,1",
        "5,a,i6,0,1",
        "5,c,i1,1,1",
    ]
    path = tmp_path / "hand.csv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    schema = TableSchema(label="clicked", dense=("price",), sparse=("user",), time_column="ts",
                         user_column="user", item_column="item")
    source = TableSource(path, table=schema, history_length=2)
    train = next(source.chunks("train"))  # the 8 earliest rows, in file order
    assert train.columns["history"].to_list() == ["", "", "i2|i1", "", "i3|i2", "i1", "i4|i3", "i2|i1"]
    assert train.columns["history_liked"].to_list() == ["", "", "i1", "", "i3|i1", "", "i3|i1", "i2"]
    np.testing.assert_array_equal(train.columns["rated_before"], [0, 0, 2, 0, 3, 1, 4, 2])
    np.testing.assert_allclose(train.columns["liked_share"], [np.nan, np.nan, 0.5, np.nan, 2 / 3, 0, 0.5, 0.5])
    last = next(source.chunks("test"))  # c's first row: no history
    assert last.columns["history"].to_list() == [""] and math.isnan(last.columns["liked_share"][0])
    val = next(source.chunks("val"))  # a at 5 sees its rows of every earlier split
    assert val.columns["history"].to_list() == ["i5|i4"] and val.columns["rated_before"][0] == 5


def test_no_history_at_length_zero_or_without_user_and_item_columns(tmp_path: Path):
    path = write(click_log(50), tmp_path / "t.parquet")
    plain = TableSchema(label="clicked", dense=("price",), sparse=("item",), time_column="ts")
    for source in (TableSource(path, table=SCHEMA, history_length=0), TableSource(path, table=plain)):
        assert not set(HISTORY_NAMES) & {f.name for f in source.schema}
        assert not set(HISTORY_NAMES) & set(next(source.chunks("train")).columns)


def test_history_feature_names_must_be_free(tmp_path: Path):
    table = click_log(50).append_column("liked_share", pa.array(np.zeros(50)))
    path = write(table, tmp_path / "t.parquet")
    with pytest.raises(DataError, match=r"column 'liked_share' has the name of a history feature .*--history-length 0"):
        TableSource(path, table=SCHEMA)
    TableSource(path, table=SCHEMA, history_length=0)  # no history, no clash


def test_item_ids_with_the_separator_and_list_columns_are_refused(tmp_path: Path):
    table = click_log(40)
    items = [f"a|{i}" if i == 7 else str(i) for i in range(40)]
    path = write(table.set_column(table.schema.get_field_index("item"), "item", pa.array(items)), tmp_path / "t.csv")
    with pytest.raises(DataError, match=r"column 'item' holds the item id 'a\|7', which contains '\|'"):
        TableSource(path, table=SCHEMA).split_rows("train")
    listed = table.set_column(table.schema.get_field_index("item"), "item", pa.array([[1]] * 40))
    with pytest.raises(DataError, match="column 'item' holds lists: a user or item column holds one id per row"):
        TableSource(write(listed, tmp_path / "l.parquet"), table=SCHEMA).split_rows("train")


# -- schema keys and flags ------------------------------------------------------------


def test_schema_file_and_flags_name_the_user_and_item_columns(tmp_path: Path):
    path = tmp_path / "schema.yaml"
    path.write_text("label: clicked\ndense: [price]\nsparse: [item]\ntime_column: ts\n"
                    "user_column: user\nitem_column: item\n", encoding="utf-8")
    schema = table_schema(schema_file=path)
    assert (schema.user_column, schema.item_column, schema.has_history) == ("user", "item", True)
    assert table_schema(schema_file=path, user_column="visitor").user_column == "visitor"


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"user_column": "user"}, "user_column 'user' needs item_column too"),
        ({"user_column": "user", "item_column": "item", "time_column": None},
         "need a time_column: the history holds what came strictly before each row"),
        ({"user_column": "user", "item_column": "user"}, "are the same column 'user'"),
        ({"user_column": "clicked", "item_column": "item"}, "user_column 'clicked' is the label"),
        ({"user_column": "user", "item_column": "ts"}, "item_column 'ts' is the time column"),
    ],
)
def test_schema_errors_name_the_user_and_item_problem(keys: dict, message: str):
    fields = {"label": "clicked", "dense": ("price",), "sparse": ("item",), "time_column": "ts", **keys}
    with pytest.raises(ValueError, match=message):
        TableSchema(**fields)


# -- end to end -------------------------------------------------------------------------


def test_training_with_user_item_and_time_columns_fits_the_history_features(tmp_path: Path):
    from featurespec import FeatureSpec

    path = write(click_log(400, seed=1), tmp_path / "clicks.csv")
    out = tmp_path / "run"
    args = ["--data", "table", "--data-path", str(path), "--label", "clicked", "--dense", "price",
            "--sparse", "user,item", "--user-column", "user", "--item-column", "item", "--time-column", "ts",
            "--epochs", "1", "--no-baselines", "--threads", "1", "--quiet", "--out", str(out)]
    assert train_main(args) == 0
    spec = load_checkpoint(out).spec
    assert spec.feature_names == ["price", "rated_before", "liked_share", "user", "item", "history", "history_liked"]
    history = next(f for f in spec.sparse if f.name == "history")
    assert history.multi_valued and history.max_values == 20  # the default length, as for MovieLens
    options = json.loads((out / "metrics.json").read_text())["options"]["table"]
    assert (options["user_column"], options["item_column"]) == ("user", "item")
    # A request sends the history as a list; it encodes as the packed text of training does.
    saved = FeatureSpec.load(out / "features.json")
    as_list = saved.encode_records([{"history": ["3", "11"], "rated_before": 2, "liked_share": 0.5}])
    as_text = saved.encode_records([{"history": "3|11", "rated_before": 2, "liked_share": 0.5}])
    np.testing.assert_array_equal(as_list[1], as_text[1])
    np.testing.assert_array_equal(as_list[0], as_text[0])


@pytest.mark.parametrize("model_name", ["dlrm", "widedeep"])
def test_attention_pooling_attends_from_each_history_feature_to_the_item(tmp_path: Path, model_name: str):
    path = write(click_log(400, seed=2), tmp_path / "clicks.csv")
    out = tmp_path / "run"
    args = ["--model", model_name, "--data", "table", "--data-path", str(path), "--label", "clicked",
            "--dense", "price", "--sparse", "user,item", "--user-column", "user", "--item-column", "item",
            "--time-column", "ts", "--history-pooling", "attention", "--epochs", "2", "--no-baselines",
            "--threads", "1", "--quiet", "--out", str(out)]
    assert train_main(args) == 0
    checkpoint = load_checkpoint(out)
    names = checkpoint.spec.table_names
    expected = tuple((names.index(history), names.index("item")) for history in ("history", "history_liked"))
    assert checkpoint.model.config.attention == expected
    assert json.loads((out / "metrics.json").read_text())["options"]["history_pooling"] == "attention"


def test_attention_pairs_need_a_multi_valued_field_and_a_single_valued_candidate():
    from training.fitting import SchemaField, SparseOptions, fit_spec
    from training.train import TrainOptions, attention_pairs, attention_warning, build_config

    many = SparseOptions(min_count=1, multi_valued=True, max_values=3)
    schema = [
        SchemaField("x", dense=True),
        SchemaField("item", dense=False, options=SparseOptions(min_count=1)),
        SchemaField("tags", dense=False, options=many),  # multi-valued, no candidate: mean pooled
        SchemaField("history", dense=False, options=many, candidate="item"),
        SchemaField("orphan", dense=False, options=many, candidate="absent"),  # its candidate is no feature
    ]
    columns = {"x": [1.0, 2.0], "item": ["a", "b"], "tags": ["t|u", "t"], "history": ["a|b", ""], "orphan": ["a", "b"]}
    spec = fit_spec(schema, [columns])
    assert attention_pairs(schema, spec) == ((2, 0),)  # tables: item, tags, history, orphan
    for model_name in ("dlrm", "widedeep"):
        attending = TrainOptions(model=model_name, history_pooling="attention")
        assert build_config(attending, spec, schema).attention == ((2, 0),)
        assert build_config(TrainOptions(model=model_name), spec, schema).attention == ()
        assert attention_warning(attending, build_config(attending, spec, schema)) is None
        no_candidate = [f for f in schema if f.name != "history"]
        assert "no history feature with a candidate item" in attention_warning(
            attending, build_config(attending, spec, no_candidate))
    logistic = TrainOptions(model="logistic", history_pooling="attention")
    assert "applies to dlrm and widedeep" in attention_warning(logistic, build_config(logistic, spec, schema))
    with pytest.raises(ValueError, match="only a multi-valued categorical field has a candidate"):
        SchemaField("x", dense=True, candidate="item")
    with pytest.raises(ValueError, match="unknown history pooling 'sum'; choose one of mean, attention"):
        TrainOptions(history_pooling="sum")


def test_attention_pooling_without_history_trains_with_a_warning(tmp_path: Path, capsys):
    out = tmp_path / "run"
    args = ["--model", "dlrm", "--data", "synthetic", "--rows", "400", "--history-pooling", "attention",
            "--epochs", "1", "--no-baselines", "--threads", "1", "--quiet", "--out", str(out)]
    assert train_main(args) == 0
    assert "warning: --history-pooling attention: no history feature" in capsys.readouterr().err
    assert load_checkpoint(out).model.config.attention == ()
