"""FeatureSpec: hashing, fitting, encoding, persistence and validation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from training.features import (
    FeatureError,
    FeatureSpec,
    SchemaField,
    SparseFeature,
    SparseOptions,
    StringColumn,
    fit_spec,
    hash_values,
)

SCHEMA = (
    SchemaField("I1", dense=True),
    SchemaField("age", dense=True, transform="standard"),
    SchemaField("C1", dense=False, options=SparseOptions(min_count=2)),
    SchemaField("C2", dense=False, options=SparseOptions(kind="hash", hash_buckets=50)),
    SchemaField("genres", dense=False, options=SparseOptions(min_count=1, multi_valued=True, max_values=3)),
)


def training_columns() -> dict:
    return {
        "I1": np.array([0.0, 3.0, np.nan, 10.0, -2.0, 1.0]),
        "age": np.array([20.0, 30.0, 40.0, np.nan, 50.0, 60.0]),
        "C1": ["a", "b", "a", "c", "a", "b"],  # c appears once: below min_count
        "C2": ["x", "y", None, "z", "x", "w"],
        "genres": ["Drama|Comedy", "Drama", "", "Action|Drama|Comedy|War", None, "Comedy"],
    }


@pytest.fixture()
def spec() -> FeatureSpec:
    return fit_spec(SCHEMA, [training_columns()])


def test_hash_is_a_fixed_contract():
    # Hash buckets depend on these values: they must never change silently.
    hashes, missing = hash_values(["68fd1e64", "", "a", "héllo wörld, a longer value"])
    assert hashes.tolist()[0] == hash_values(np.array(["68fd1e64"]))[0][0]
    assert missing.tolist() == [False, True, False, False]
    assert hashes.tolist() == [
        int(h) for h in hash_values(StringColumn.from_values(["68fd1e64", "", "a", "héllo wörld, a longer value"]))[0]
    ]
    golden = hash_values(["68fd1e64", "a", "12345678901234567"])[0].tolist()
    assert golden == [15505280131465413607, 6505842218708868821, 13989319879622154311]


def test_hash_does_not_depend_on_batch_or_width():
    alone = hash_values(["abc"])[0][0]
    with_long = hash_values(["a much longer neighbour value", "abc"])[0][1]
    as_int = hash_values([123])[0][0]
    assert alone == with_long
    assert as_int == hash_values(["123"])[0][0]


def test_fit_vocab_min_count_and_order(spec):
    c1 = spec.sparse[0]
    assert c1.kind == "vocab"
    assert c1.vocab == ("a", "b")  # most frequent first; "c" below min_count
    assert c1.num_embeddings == 3  # + reserved index 0
    assert spec.sparse[1].kind == "hash" and spec.sparse[1].num_embeddings == 51
    assert spec.sparse[2].vocab == ("Comedy", "Drama", "Action", "War")  # count ties break by text
    assert spec.table_widths == (1, 1, 3)
    assert spec.num_sparse_columns == 5


def test_dense_transforms(spec):
    age = spec.dense[1]
    assert age.mean == pytest.approx(40.0)
    assert age.std == pytest.approx(math.sqrt(200.0))
    dense, _ = spec.encode_records([{"I1": 3, "age": 50}, {"I1": -5}, {}])
    assert dense[0].tolist() == pytest.approx([math.log1p(3), 10 / math.sqrt(200.0)])
    assert dense[1].tolist() == [0.0, 0.0]  # negative counts clip to 0; missing -> 0
    assert dense.dtype == np.float32 and dense.shape == (3, 2)


def test_encode_unseen_missing_and_multi_valued(spec):
    _, sparse = spec.encode_records(
        [
            {"C1": "a", "C2": "x", "genres": ["War", "Drama", "Unknown", "Comedy"]},
            {"C1": "zzz", "genres": "Comedy|Action"},
            {},
        ]
    )
    assert sparse.dtype == np.int64 and sparse.shape == (3, 5)
    assert sparse[0, 0] == 1 and sparse[1, 0] == 0 and sparse[2, 0] == 0  # unseen and missing -> 0
    assert 1 <= sparse[0, 1] <= 50 and sparse[1, 1] == 0
    assert sparse[0, 2:].tolist() == [4, 2, 0]  # truncated to max_values; unknown -> padding 0
    assert sparse[1, 2:].tolist() == [1, 3, 0]


def test_columns_and_records_encode_identically(spec):
    records = [{"I1": 3, "age": 33.5, "C1": "b", "C2": "y", "genres": ["Drama"]}, {"C1": "a", "C2": "q"}]
    columns = {
        "I1": np.array([3.0, np.nan]),
        "age": np.array([33.5, np.nan]),
        "C1": StringColumn.from_values(["b", "a"]),
        "C2": ["y", "q"],
        "genres": [["Drama"], None],
    }
    from_records = spec.encode_records(records)
    from_columns = spec.encode_columns(columns)
    np.testing.assert_array_equal(from_records[0], from_columns[0])
    np.testing.assert_array_equal(from_records[1], from_columns[1])


def test_save_load_gives_identical_encodings(spec, tmp_path):
    path = tmp_path / "features.json"
    spec.save(path)
    loaded = FeatureSpec.load(path)
    assert loaded.to_json() == spec.to_json()
    records = [{"I1": 7, "age": 21, "C1": "a", "C2": "anything", "genres": "War|Drama"}, {"C2": 5}]
    for original, reloaded in zip(spec.encode_records(records), loaded.encode_records(records)):
        np.testing.assert_array_equal(original, reloaded)


def test_context_is_shared_and_overridden(spec):
    dense, sparse = spec.encode_records([{"C1": "b"}, {"C1": "a", "I1": 1}], base={"I1": 3, "C1": "a"})
    assert dense[:, 0].tolist() == pytest.approx([math.log1p(3), math.log1p(1)])
    assert sparse[:, 0].tolist() == [2, 1]


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"nope": 1}, r"record 0: feature 'nope': unknown feature"),
        ({"I1": "3"}, r"feature 'I1': expected a number or null, got a string"),
        ({"I1": True}, r"feature 'I1': expected a number or null, got a boolean"),
        ({"I1": float("nan")}, r"feature 'I1': must be a finite number"),
        ({"age": float("inf")}, r"feature 'age': must be a finite number"),
        ({"C1": 1.5}, r"feature 'C1': expected a string or integer, got a number"),
        ({"C1": ["a"]}, r"feature 'C1': expected a string or integer, got an array"),
        ({"genres": 3}, r"feature 'genres': expected a list of strings/integers or a string"),
    ],
)
def test_invalid_records_name_the_field(spec, record, message):
    with pytest.raises(FeatureError, match=message) as caught:
        spec.encode_records([record])
    assert caught.value.field in message


def test_error_names_the_record_index(spec):
    with pytest.raises(FeatureError, match=r"record 2: feature 'C1'") as caught:
        spec.encode_records([{"C1": "a"}, {}, {"C1": {"x": 1}}])
    assert caught.value.record == 2


def test_config_validation_messages():
    with pytest.raises(ValueError, match=r"hash buckets must be >= 1, got 0"):
        SparseFeature("C9", kind="hash", buckets=0)
    with pytest.raises(ValueError, match=r"unknown kind 'table'"):
        SparseFeature("C9", kind="table")
    with pytest.raises(ValueError, match=r"min_count must be >= 1, got 0"):
        SparseOptions(min_count=0)
    with pytest.raises(ValueError, match=r"repeated: \['C1'\]"):
        FeatureSpec(dense=(), sparse=(SparseFeature("C1"), SparseFeature("C1")))


def test_large_vocab_switches_to_hashing():
    schema = (SchemaField("I1", dense=True), SchemaField("C1", dense=False, options=SparseOptions(min_count=1, max_vocab=3)))
    spec = fit_spec(schema, [{"I1": np.zeros(5), "C1": ["a", "b", "c", "d", "e"]}])
    assert spec.sparse[0].kind == "hash"


def test_load_reports_path_and_line(tmp_path):
    bad = tmp_path / "features.json"
    bad.write_text('{\n  "version": 1,\n  "dense": [\n}\n')
    with pytest.raises(ValueError, match=r"features.json:4: not valid JSON"):
        FeatureSpec.load(bad)
    bad.write_text(json.dumps({"version": 99}))
    with pytest.raises(ValueError, match=r"unsupported FeatureSpec version 99"):
        FeatureSpec.load(bad)
    with pytest.raises(FileNotFoundError, match=r"missing.json: FeatureSpec file not found"):
        FeatureSpec.load(tmp_path / "missing.json")


def test_fit_streams_chunks_like_one_pass():
    columns = training_columns()
    halves = [{k: v[:3] for k, v in columns.items()}, {k: v[3:] for k, v in columns.items()}]
    assert fit_spec(SCHEMA, halves).to_json() == fit_spec(SCHEMA, [columns]).to_json()
