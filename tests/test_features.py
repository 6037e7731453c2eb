"""FeatureSpec: hashing, fitting, encoding, persistence and validation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from featurespec import (
    BucketizedFeature,
    DenseFeature,
    FeatureError,
    FeatureSpec,
    SparseFeature,
    StringColumn,
    hash_values,
)
from featurespec.tables import BatchLookup
from training.fitting import DEFAULT_BUCKETS, RangeTally, SchemaField, SparseOptions, bucketize_schema, fit_spec

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


def test_dense_values_clip_to_the_training_range(spec):
    i1, age = spec.dense
    assert (i1.low, i1.high, age.low, age.high) == (-2.0, 10.0, 20.0, 60.0)  # NaN in training is not a bound
    dense, _ = spec.encode_records([{"I1": 1e9, "age": 99}, {"I1": 10, "age": 60}, {"age": -1e300}, {"age": 20}])
    np.testing.assert_array_equal(dense[0], dense[1])  # beyond the range reads as its edge
    np.testing.assert_array_equal(dense[2], dense[3])
    assert dense[2, 0] == 0.0  # missing is still missing, not the edge
    unclipped = fit_spec(SCHEMA, [training_columns()], clip_dense=False)
    assert all(f.low is None and f.high is None for f in unclipped.dense)
    assert "low" not in unclipped.to_json()["dense"][0]
    assert unclipped.encode_records([{"I1": 1e9}])[0][0, 0] == pytest.approx(math.log1p(1e9))
    # Serving reads the range from features.json; a file without it (written before it existed) loads unclipped.
    assert spec.to_json()["dense"][1] == {
        "name": "age", "transform": "standard", "mean": 40.0, "std": pytest.approx(math.sqrt(200.0)), "low": 20.0, "high": 60.0
    }
    assert FeatureSpec.from_json(spec.to_json()) == spec
    assert FeatureSpec.from_json(unclipped.to_json()) == unclipped


def test_values_outside_the_training_range_are_counted_for_a_warning(spec):
    tally = RangeTally(spec)  # I1 spans [-2, 10] in training, age [20, 60]
    tally.update({"I1": np.array([1.0, 11.0, np.nan, 3.0]), "age": [61.0, 19.0, 18.0, 40.0]})
    tally.update({"I1": np.array([12.0, 0.0])})  # a column absent from a chunk counts nothing there
    assert {name: (c.present, c.below, c.above) for name, c in tally.counts.items()} == {"I1": (5, 0, 2), "age": (4, 2, 1)}
    lines = tally.warnings("test")
    assert lines[0].startswith("column 'I1': 40.0% above the training range [-2, 10] in the test split, clipped to it")
    assert lines[1].startswith("column 'age': 50.0% below and 25.0% above the training range [20, 60]")
    assert RangeTally(spec).warnings("val") == []  # nothing seen, nothing to say
    quiet = RangeTally(spec)
    quiet.update({"I1": np.r_[np.zeros(199), 11.0]})  # 0.5%: below the warning's share
    assert quiet.warnings("val") == []
    assert RangeTally(fit_spec(SCHEMA, [training_columns()], clip_dense=False)).features == []


def test_dense_clip_bounds_are_validated():
    with pytest.raises(ValueError, match=r"dense feature 'I1': low 5.0 is above high 1.0"):
        DenseFeature("I1", low=5.0, high=1.0)
    with pytest.raises(ValueError, match=r"dense feature 'I1': clip bounds must be finite numbers, got inf"):
        DenseFeature("I1", high=math.inf)
    with pytest.raises(ValueError, match=r"clip bounds must be finite numbers, got '3'"):
        DenseFeature("I1", low="3")


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
        ({"genres": 3}, r"feature 'genres': expected an array of strings/integers or a string"),
        ({"C1": "ok\ud800"}, r"feature 'C1': not valid Unicode text \(an unpaired surrogate\)"),
        ({"genres": ["War", "\udfff"]}, r"feature 'genres': not valid Unicode text"),
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


def test_records_may_be_any_mapping_but_nothing_else(spec):
    from types import MappingProxyType

    as_proxy = spec.encode_records([MappingProxyType({"C1": "a", "I1": 2})])
    as_dict = spec.encode_records([{"C1": "a", "I1": 2}])
    np.testing.assert_array_equal(as_proxy[1], as_dict[1])
    with pytest.raises(FeatureError, match=r"record 1: feature '<record>': expected a JSON object, got an array"):
        spec.encode_records([{}, ["C1", "a"]])


def _reference_encoding(spec: FeatureSpec, records: list[dict], base: dict) -> tuple[np.ndarray, np.ndarray]:
    """What encode_records must produce, built the slow, obvious way: value by value."""
    merged = [{**base, **record} for record in records]
    columns = {}
    for feature in spec.dense:
        values = [record.get(feature.name) for record in merged]
        columns[feature.name] = np.array([np.nan if v is None else float(v) for v in values])
    for feature in spec.sparse:
        values = [record.get(feature.name) for record in merged]
        if feature.multi_valued:
            columns[feature.name] = values
        else:  # each value hashed from its own UTF-8 bytes
            encoded = [b"" if v is None else str(v).encode("utf-8") for v in values]
            columns[feature.name] = StringColumn._from_bytes_list(encoded)
    return spec.encode_columns(columns, len(records))


@pytest.mark.parametrize("seed", range(4))
def test_fast_record_path_matches_value_by_value_encoding(spec, seed):
    # Absent, null, "", ints, non-ASCII, NUL-holding and unseen values, with
    # and without a shared context: every mix must encode exactly as the
    # value-by-value reference (the fast path, or its fallback, must agree).
    rng = np.random.default_rng(seed)
    pool = {
        "I1": [None, 0, 3, 2.5, -1, 10**6],
        "age": [None, 18, 33.5, 90.25],
        "C1": [None, "", "a", "b", "c", 7, "é", "a\x00b", "Ünïcödé-long-value-over-8-bytes"],
        "C2": [None, "", "x", "y", 12345678901234567, "日本", "a\x00"],
        "genres": [None, "", "Drama|War", ["Comedy", "Drama"], [], ["War", 3]],
    }
    if seed < 2:  # without NUL-holding text, which sends the whole batch to the general path
        pool = {name: [v for v in values if not (isinstance(v, str) and "\x00" in v)] for name, values in pool.items()}
    records = []
    for _ in range(40):
        record = {}
        for name, values in pool.items():
            if rng.random() < 0.8:
                record[name] = values[rng.integers(len(values))]
        records.append(record)
    base = {"C2": "x", "I1": 1} if seed % 2 else {}
    got = spec.encode_records(records, base=base)
    want = _reference_encoding(spec, records, base)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    # The same values sent as columns (a KServe v2 request): None is missing, a left-out column too.
    merged = [{**base, **record} for record in records]
    present = {name for record in merged for name in record}
    columns = {name: [record.get(name) for record in merged] for name in sorted(present)}
    got_columns = spec.encode_json_columns(columns, num_rows=len(records))
    np.testing.assert_array_equal(got_columns[0], want[0])
    np.testing.assert_array_equal(got_columns[1], want[1])


def test_no_records_encode_to_empty_tensors(spec):
    for dense, sparse in (spec.encode_records([]), spec.encode_json_columns({"C1": []}, num_rows=0)):
        assert dense.shape == (0, spec.num_dense) and sparse.shape == (0, spec.num_sparse_columns)


@pytest.mark.parametrize(
    ("columns", "message"),
    [
        ({"nope": [1, 2]}, r"feature 'nope': unknown feature"),
        ({"I1": 3}, r"feature 'I1': expected an array of values, got a number"),
        ({"I1": [1, 2, 3]}, r"feature 'I1': expected 2 values, got 3"),
        ({"I1": [1, float("nan")]}, r"record 1: feature 'I1': must be a finite number"),
        ({"C1": ["a", 1.5]}, r"record 1: feature 'C1': expected a string or integer, got a number"),
        ({"C1": [None, "\ud800"]}, r"record 1: feature 'C1': not valid Unicode text"),
        ({"genres": ["Drama", {"x": 1}]}, r"record 1: feature 'genres': expected an array of strings/integers"),
    ],
)
def test_invalid_columns_name_the_field_and_row(spec, columns, message):
    with pytest.raises(FeatureError, match=message):
        spec.encode_json_columns(columns, num_rows=2)


def test_batch_lookup_never_returns_another_features_index():
    # Two vocabularies sharing values, plus a hashed feature: the fused table
    # must give each feature its own index, and the per-feature fallback
    # (used if salted keys ever collided) must agree with it.
    spec = FeatureSpec(
        dense=(DenseFeature("I1"),),
        sparse=(
            SparseFeature("A", vocab=("x", "y", "z")),
            SparseFeature("B", vocab=("z", "x")),
            SparseFeature("H", kind="hash", buckets=7),
            SparseFeature("M", vocab=("x",), multi_valued=True, max_values=2),
        ),
    )
    records = [{"A": "x", "B": "x", "H": "x"}, {"A": "z", "B": "y", "H": "q"}, {"A": "w", "B": "z"}, {}]
    _, sparse = spec.encode_records(records)
    assert sparse[:, 0].tolist() == [1, 3, 0, 0]
    assert sparse[:, 1].tolist() == [2, 0, 1, 0]  # "y" is A's, not B's
    hashes, missing = hash_values(["x", "x", "x", "z", "y", "q"])
    fused = spec._single_lookup(hashes.reshape(3, 2), missing.reshape(3, 2))
    fallback = BatchLookup(spec.sparse[:3])
    fallback._table = None
    np.testing.assert_array_equal(fused, fallback(hashes.reshape(3, 2), missing.reshape(3, 2)))
    assert fused[:, 0].tolist() == [1, 2, spec.sparse[2].lookup(hashes[4:5], missing[4:5])[0]]  # A "x", B "x", H "y"


def test_packing_matches_value_by_value_bytes():
    values = ["68fd1e64", "", "héllo", "a\x00b", "x" * 20, None, 42]
    column = StringColumn.from_values(values)
    reference = StringColumn._from_bytes_list([b"" if v is None else str(v).encode("utf-8") for v in values])
    assert column.to_list() == reference.to_list() == ["68fd1e64", "", "héllo", "a\x00b", "x" * 20, "", "42"]
    np.testing.assert_array_equal(hash_values(values)[0], hash_values(reference)[0])


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


# -- bucketized dense features ----------------------------------------------------

BUCKET_SCHEMA = (
    SchemaField("I1", dense=True, bucketize=4),
    SchemaField("age", dense=True, transform="standard"),
    SchemaField("score", dense=True, transform="identity", bucketize=8),
    SchemaField("C1", dense=False, options=SparseOptions(min_count=1)),
    SchemaField("genres", dense=False, options=SparseOptions(min_count=1, multi_valued=True, max_values=2)),
)


@pytest.fixture()
def bucket_spec() -> FeatureSpec:
    rng = np.random.default_rng(0)
    rows = 1000
    columns = {
        "I1": np.arange(1, rows + 1, dtype=np.float64),  # quantiles known exactly
        "age": rng.normal(40, 10, rows),
        "score": np.where(rng.random(rows) < 0.1, np.nan, rng.normal(0, 1, rows)),
        "C1": [f"c{v}" for v in rng.integers(0, 5, rows)],
        "genres": ["|".join(f"g{v}" for v in rng.integers(0, 4, k)) for k in rng.integers(0, 3, rows)],
    }
    chunks = [{name: values[start : start + 300] for name, values in columns.items()} for start in range(0, rows, 300)]
    return fit_spec(BUCKET_SCHEMA, chunks)


def test_bucket_boundaries_are_the_training_quantiles(bucket_spec):
    i1, score = bucket_spec.bucketized
    assert (i1.name, i1.source, i1.boundaries) == ("I1_bucket", "I1", (250.0, 500.0, 750.0))
    assert score.source == "score" and len(score.boundaries) == 7
    assert bucket_spec.table_names[-2:] == ["I1_bucket", "score_bucket"]
    assert bucket_spec.table_sizes[-2:] == (5, 9)  # bins + the missing index 0
    assert bucket_spec.table_widths == (1, 2, 1, 1)
    assert bucket_spec.num_sparse_columns == 5
    assert bucket_spec.feature_names == ["I1", "age", "score", "C1", "genres"]  # what a request sends


def test_bucket_boundaries_merge_ties_and_handle_degenerate_columns():
    schema = (
        SchemaField("counts", dense=True, bucketize=4),
        SchemaField("constant", dense=True, bucketize=4),
        SchemaField("empty", dense=True, bucketize=4),
        SchemaField("C1", dense=False),
    )
    counts = np.array([0.0] * 50 + [1.0] * 20 + [5.0] * 30)  # quartiles 0, 0, 5
    spec = fit_spec(schema, [{"counts": counts, "constant": np.full(100, 3.0), "empty": np.full(100, np.nan)}])
    boundaries = {f.source: f.boundaries for f in spec.bucketized}
    # Equal quantiles merge; 5.0, the maximum, would only bound an empty bin above it.
    assert boundaries == {"counts": (0.0,), "constant": (), "empty": ()}
    _, sparse = spec.encode_columns({"counts": np.array([0.0, 1.0, 5.0, 9.0]), "constant": np.array([3.0, 4.0, 2.0, np.nan])})
    assert sparse[:, 1].tolist() == [1, 2, 2, 2]
    assert sparse[:, 2].tolist() == [1, 1, 1, 0]  # one bin; missing -> 0
    assert spec.table_sizes[1:] == (3, 2, 2)


def test_bucket_sketch_is_accurate_on_a_long_stream_and_ignores_chunking():
    rng = np.random.default_rng(1)
    values = rng.lognormal(0.0, 1.5, 200_000)
    schema = (SchemaField("x", dense=True, bucketize=32), SchemaField("C1", dense=False))

    def fit(chunk_rows: int) -> tuple[float, ...]:
        chunks = [{"x": values[i : i + chunk_rows]} for i in range(0, len(values), chunk_rows)]
        return fit_spec(schema, chunks).bucketized[0].boundaries

    boundaries = fit(50_000)
    assert len(boundaries) == 31
    assert fit(7_777) == boundaries  # the sample depends on the rows, not on the chunks
    ranks = np.searchsorted(np.sort(values), boundaries, side="right") / len(values)
    np.testing.assert_allclose(ranks, np.arange(1, 32) / 32, atol=0.005)  # within half a percent of the true quantile


def test_bucketized_columns_encode_identically_on_every_path(bucket_spec):
    rng = np.random.default_rng(2)
    pool = {
        "I1": [None, 0, 1, 250, 250.5, 500, 751, 10**6, -3, 2.5],
        "score": [None, -2.0, 0, 0.1, 3, -0.75],
        "C1": [None, "c1", "c9"],
        "genres": [None, "g1|g2", ["g0"]],
    }
    records = [
        {name: values[rng.integers(len(values))] for name, values in pool.items() if rng.random() < 0.85} for _ in range(60)
    ]
    fast = bucket_spec.encode_records(records)
    by_columns = bucket_spec.encode_json_columns(
        {name: [r.get(name) for r in records] for name in pool}, num_rows=len(records)
    )
    raw = {name: np.array([np.nan if r.get(name) is None else r[name] for r in records], np.float64) for name in ("I1", "score")}
    columnar = bucket_spec.encode_columns(
        {**raw, "C1": [r.get("C1") for r in records], "genres": [r.get("genres") for r in records]}
    )
    # A NUL in a categorical value sends a batch down the general path: buckets must not change.
    general = bucket_spec.encode_records([*records, {"C1": "a\x00b"}])
    for got in (by_columns, columnar, tuple(part[:-1] for part in general)):
        np.testing.assert_array_equal(got[0], fast[0])
        np.testing.assert_array_equal(got[1], fast[1])
    for k, feature in enumerate(bucket_spec.bucketized):
        values = raw[feature.source]
        expected = np.where(np.isnan(values), 0, np.searchsorted(feature.boundaries, values) + 1)
        assert fast[1][:, 3 + k].tolist() == expected.tolist()
    assert (fast[1][:, 3] == 0).any() and (fast[1][:, 3] == 4).any()


def test_bucket_missing_nan_and_infinity(bucket_spec):
    # Columns (training data): NaN is missing; infinities fall in the outermost bins.
    _, sparse = bucket_spec.encode_columns({"I1": np.array([np.nan, np.inf, -np.inf, 250.0, 250.001])})
    assert sparse[:, 3].tolist() == [0, 4, 1, 1, 2]
    assert sparse[:, 4].tolist() == [0] * 5  # score absent: missing
    # Requests: null and an absent raw column are missing; NaN/inf are refused, naming the raw column.
    _, sparse = bucket_spec.encode_records([{"I1": None}, {}, {"I1": 600}])
    assert sparse[:, 3].tolist() == [0, 0, 3]
    with pytest.raises(FeatureError, match=r"record 1: feature 'I1': must be a finite number"):
        bucket_spec.encode_records([{"I1": 3}, {"I1": float("inf")}])
    with pytest.raises(FeatureError, match=r"feature 'I1_bucket': unknown feature"):
        bucket_spec.encode_records([{"I1_bucket": 2}])
    with pytest.raises(FeatureError, match=r"feature 'I1_bucket': unknown feature"):
        bucket_spec.encode_json_columns({"I1_bucket": [2]}, num_rows=1)


def test_bucketized_spec_round_trips_and_older_files_still_load(bucket_spec, spec, tmp_path):
    path = tmp_path / "features.json"
    bucket_spec.save(path)
    payload = json.loads(path.read_text())
    assert payload["version"] == 1
    assert payload["bucketized"][0] == {"name": "I1_bucket", "source": "I1", "boundaries": [250.0, 500.0, 750.0]}
    loaded = FeatureSpec.load(path)
    assert loaded == bucket_spec and loaded.to_json() == bucket_spec.to_json()
    records = [{"I1": 300, "score": 0.2, "C1": "c2"}, {"I1": 10**6}]
    for original, reloaded in zip(bucket_spec.encode_records(records), loaded.encode_records(records)):
        np.testing.assert_array_equal(original, reloaded)
    # A spec without bucketized features writes no key, and a file without the key loads as before.
    assert "bucketized" not in spec.to_json()
    assert FeatureSpec.from_json(spec.to_json()).bucketized == ()


def test_bucketize_validation_messages(spec):
    with pytest.raises(ValueError, match=r"'x_bucket': boundaries must be strictly increasing, got \(1.0, 1.0\)"):
        BucketizedFeature("x_bucket", "x", (1.0, 1.0))
    with pytest.raises(ValueError, match=r"'x_bucket': boundaries must be finite"):
        BucketizedFeature("x_bucket", "x", (1.0, math.inf))
    with pytest.raises(ValueError, match=r"bucketized feature 'b': source 'C1' is not a dense feature"):
        FeatureSpec(dense=spec.dense, sparse=spec.sparse, bucketized=(BucketizedFeature("b", "C1"),))
    with pytest.raises(ValueError, match=r"repeated: \['C1'\]"):
        FeatureSpec(dense=spec.dense, sparse=spec.sparse, bucketized=(BucketizedFeature("C1", "I1"),))
    with pytest.raises(ValueError, match=r"field 'C1': only a dense field can be bucketized"):
        SchemaField("C1", dense=False, bucketize=8)
    with pytest.raises(ValueError, match=r"field 'I1': bucketize must be a number of bins >= 2, got 1"):
        SchemaField("I1", dense=True, bucketize=1)
    assert [f.bucketize for f in bucketize_schema(SCHEMA, ["all"], bins=16)] == [16, 16, None, None, None]
    assert [f.bucketize for f in bucketize_schema(SCHEMA, ["age"])] == [None, DEFAULT_BUCKETS, None, None, None]
    with pytest.raises(ValueError, match=r"cannot bucketize 'C1': not a dense field; dense fields: I1, age"):
        bucketize_schema(SCHEMA, ["C1"])
    with pytest.raises(ValueError, match=r"buckets must be an int >= 2, got 1"):
        bucketize_schema(SCHEMA, ["all"], bins=1)
