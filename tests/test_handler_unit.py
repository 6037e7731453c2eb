"""handlers/request.py: parsing, validation, batching and splitting, without TorchServe."""

from __future__ import annotations

import json

import numpy as np
import pytest

from featurespec import FeatureSpec
from handlers.request import (
    EncodedBatch,
    Limits,
    ParsedRequest,
    RequestError,
    build_response,
    decode_body,
    encode_batch,
    parse_request,
    rank,
    split_responses,
)
from training.fitting import SchemaField, SparseOptions, fit_spec

LIMITS = Limits(max_records=4)


@pytest.fixture(scope="module")
def spec() -> FeatureSpec:
    columns = {"I1": np.array([1.0, 2.0, 3.0]), "C1": ["a", "b", "a"], "C2": ["x|y", "y", ""]}
    schema = [
        SchemaField("I1", dense=True),
        SchemaField("C1", dense=False, options=SparseOptions(min_count=1)),
        SchemaField("C2", dense=False, options=SparseOptions(min_count=1, multi_valued=True, max_values=2)),
    ]
    return fit_spec(schema, [columns])


def encode(spec: FeatureSpec, *bodies: object) -> EncodedBatch:
    return encode_batch(spec, [{"body": body} for body in bodies], limits=LIMITS)


# -- decode_body -------------------------------------------------------------


def test_decode_body_accepts_decoded_json_bytes_and_text():
    assert decode_body({"body": {"I1": 1}}) == {"I1": 1}
    assert decode_body({"data": b'{"I1": 1}'}) == {"I1": 1}
    assert decode_body({"body": bytearray(b'{"I1": 2}')}) == {"I1": 2}
    assert decode_body({"body": '{"I1": 3}'}) == {"I1": 3}


@pytest.mark.parametrize(
    ("item", "match"),
    [
        ({"body": b'{"instances": ['}, r"^body: not valid JSON: .*line 1, column 16"),
        ({"body": b'{"I1": NaN}'}, r"^body: not valid JSON: NaN is not a JSON number"),
        ({"body": b'{"I1": -Infinity}'}, r"-Infinity is not a JSON number"),
        ({"body": b"\xff\xfe"}, r"^body: not valid UTF-8 at byte 0"),
        ({"body": b""}, r"^body: empty request"),
        ({"body": "   "}, r"^body: empty request"),
        ({"body": None}, r"^body: empty request"),
        ({"I1": "3"}, r"Content-Type: application/json"),
    ],
)
def test_decode_body_rejects(item, match):
    with pytest.raises(RequestError, match=match) as caught:
        decode_body(item)
    assert caught.value.field == "body" and caught.value.status == 400


# -- parse_request -----------------------------------------------------------


def test_parse_instances_bare_record_and_ranking():
    assert parse_request({"instances": [{"I1": 1}, {}]}, limits=LIMITS) == ParsedRequest("score", [{"I1": 1}, {}])
    assert parse_request({"I1": 1}, limits=LIMITS) == ParsedRequest("score", [{"I1": 1}])
    ranking = parse_request({"context": {"I1": 1}, "candidates": [{"C1": "a"}, {"C1": "b"}], "top_k": 5}, limits=LIMITS)
    assert ranking == ParsedRequest("rank", [{"C1": "a"}, {"C1": "b"}], context={"I1": 1}, top_k=2)
    assert parse_request({"candidates": [{}, {}, {}]}, limits=LIMITS).top_k == 3


@pytest.mark.parametrize(
    ("body", "field", "match"),
    [
        ([{"I1": 1}], "body", r"expected a JSON object, got an array"),
        ({}, "body", r"empty request"),
        ({"instances": []}, "instances", r"empty request: no records"),
        ({"instances": {"I1": 1}}, "instances", r"expected an array of records, got an object"),
        ({"instances": [{}] * 5}, "instances", r"5 records exceed the limit of 4 per request"),
        ({"instances": [{}], "top_k": 1}, "top_k", r"unexpected key beside 'instances'"),
        ({"candidates": []}, "candidates", r"empty request"),
        ({"candidates": [{}] * 5}, "candidates", r"5 records exceed the limit of 4"),
        ({"candidates": [{}], "top_k": 0}, "top_k", r"must be >= 1, got 0"),
        ({"candidates": [{}], "top_k": "3"}, "top_k", r"expected a positive integer, got a string"),
        ({"candidates": [{}], "top_k": True}, "top_k", r"got a boolean"),
        ({"candidates": [{}], "top_k": float("nan")}, "top_k", r"got NaN"),
        ({"candidates": [{}], "context": [1]}, "context", r"expected a JSON object, got an array"),
        ({"candidates": [{}], "limit": 3}, "limit", r"unexpected key in a ranking request"),
    ],
)
def test_parse_rejects_with_the_field(body, field, match):
    with pytest.raises(RequestError, match=match) as caught:
        parse_request(body, limits=LIMITS)
    assert caught.value.field == field
    assert caught.value.to_json()["field"] == field


def v2_input(name: str, data: list, datatype: str = "BYTES") -> dict:
    return {"name": name, "shape": [len(data)], "datatype": datatype, "data": data}


def test_parse_kservev2_keeps_columns():
    body = {"id": "r1", "inputs": [v2_input("I1", [1, 2], "INT64"), v2_input("C1", ["a", None])]}
    parsed = parse_request(body, limits=LIMITS)
    assert parsed == ParsedRequest("kservev2", columns={"I1": [1, 2], "C1": ["a", None]}, request_id="r1")
    assert parsed.num_records == 2


@pytest.mark.parametrize(
    ("inputs", "field", "match"),
    [
        ([], "inputs", r"non-empty array"),
        ([{"name": "I1", "shape": [1], "data": [1]}], "inputs[0]", r"missing key 'datatype'"),
        ([{**v2_input("I1", [1]), "shape": [1, 1]}], "inputs[0].shape", r"expected \[N\]"),
        ([{**v2_input("I1", [1, 2]), "shape": [3]}], "inputs[0].data", r"flat array of 3 values"),
        ([v2_input("I1", [1]), v2_input("C1", ["a", "b"])], "inputs[1].shape", r"2 values, but earlier inputs have 1"),
        ([v2_input("I1", [1]), v2_input("I1", [2])], "inputs[1].name", r"given twice"),
        ([v2_input("I1", [])], "inputs", r"empty request"),
        ([v2_input("I1", [1] * 5)], "inputs", r"exceed the limit of 4"),
    ],
)
def test_parse_kservev2_rejects(inputs, field, match):
    with pytest.raises(RequestError, match=match) as caught:
        parse_request({"inputs": inputs}, limits=LIMITS)
    assert caught.value.field == field


def test_limits_from_handler_config():
    assert Limits.from_handler_config({"max_records": 7, "threads": 2}) == Limits(max_records=7)
    assert Limits.from_handler_config(None) == Limits()
    with pytest.raises(ValueError, match=r"handler.max_records must be an integer >= 1, got 0"):
        Limits(max_records=0)


# -- encode_batch / split_responses ------------------------------------------


def test_encode_batch_stacks_requests_and_isolates_a_bad_one(spec):
    batch = encode(
        spec,
        {"instances": [{"I1": 1, "C1": "a"}, {"C2": ["x", "y"]}]},
        {"instances": [{"I1": "oops"}]},
        {"C1": "b"},
        {"context": {"C1": "a"}, "candidates": [{"I1": 2}, {"I1": 3, "C1": "b"}]},
    )
    assert batch.dense.shape == (5, spec.num_dense) and batch.dense.dtype == np.float32  # (B, D)
    assert batch.sparse.shape == (5, spec.num_sparse_columns) and batch.sparse.dtype == np.int64  # (B, S)
    assert batch.bounds == [(0, 2), (2, 2), (2, 3), (3, 5)]
    error = batch.outcomes[1]
    assert isinstance(error, RequestError)
    assert (error.field, error.record) == ("instances[0].I1", 0)
    assert "expected a number or null, got a string" in error.problem
    # The same records encoded alone give the same rows: stacking changes nothing.
    alone_dense, alone_sparse = spec.encode_records([{"I1": 2, "C1": "a"}, {"I1": 3, "C1": "b"}])
    np.testing.assert_array_equal(batch.dense[3:5], alone_dense)
    np.testing.assert_array_equal(batch.sparse[3:5], alone_sparse)


def test_kservev2_columns_encode_like_records_and_keep_their_rows(spec):
    v2 = {"inputs": [v2_input("C1", ["b", None, "a"]), v2_input("I1", [2, None, 3.5], "FP64"), v2_input("C2", [["x"], "y|x", None])]}
    want = spec.encode_records([{"C1": "b", "I1": 2, "C2": ["x"]}, {"C2": "y|x"}, {"C1": "a", "I1": 3.5}])
    batch = encode(spec, {"instances": [{"I1": 1}]}, v2, {"C1": "a"})
    assert batch.bounds == [(0, 1), (2, 5), (1, 2)]  # the records first, in request order, then each v2 request
    # With a bad request the batch is encoded request by request: the bad one fails alone.
    with_bad = encode(spec, {"instances": [{"I1": 1}]}, v2, {"C1": "a"}, {"inputs": [v2_input("I1", ["x"], "INT64")]})
    assert with_bad.bounds == [(0, 1), (1, 4), (4, 5), (5, 5)]
    error = with_bad.outcomes[3]
    assert isinstance(error, RequestError) and error.field == "inputs[0].I1" and "got a string" in error.problem
    for encoded in (batch, with_bad):
        start, end = encoded.bounds[1]
        np.testing.assert_array_equal(encoded.dense[start:end], want[0])
        np.testing.assert_array_equal(encoded.sparse[start:end], want[1])


@pytest.mark.parametrize(
    ("body", "field", "problem"),
    [
        ({"instances": [{"I1": 1}, {"nope": 1}]}, "instances[1].nope", "unknown feature"),
        ({"instances": [{"I1": float("nan")}]}, "instances[0].I1", "finite number"),
        ({"instances": [{"I1": float("inf")}]}, "instances[0].I1", "finite number"),
        ({"instances": [{"I1": True}]}, "instances[0].I1", "got a boolean"),
        ({"instances": [{"C1": 1.5}]}, "instances[0].C1", "expected a string or integer, got a number"),
        ({"instances": ["I1"]}, "instances[0].<record>", "expected a JSON object"),
        ({"context": {"bad": 1}, "candidates": [{}]}, "context.bad", "unknown feature"),
    ],
)
def test_encode_batch_feature_errors_name_the_field(spec, body, field, problem):
    (outcome,) = encode(spec, body).outcomes
    assert isinstance(outcome, RequestError)
    assert outcome.field == field and problem in outcome.problem


def test_all_requests_rejected_gives_an_empty_batch(spec):
    batch = encode(spec, {"instances": []}, b"{")
    assert batch.num_records == 0 and batch.dense.shape == (0, spec.num_dense)
    statuses = [status for status, _ in split_responses(batch, np.zeros(0, np.float32))]
    assert statuses == [400, 400]


def test_split_responses_one_body_per_request(spec):
    batch = encode(
        spec,
        {"instances": [{"I1": 1}, {"I1": 2}]},
        {"instances": [{"nope": 1}]},
        {"candidates": [{"I1": 1}, {"I1": 2}, {"I1": 3}], "top_k": 2},
        {"inputs": [v2_input("I1", [4], "INT64")], "id": "q"},
    )
    scores = np.array([0.1, 0.2, 0.5, 0.9, 0.7, 0.3], np.float32)
    responses = split_responses(batch, scores, model_name="m", model_version="2.0")
    assert [status for status, _ in responses] == [200, 400, 200, 200]
    assert responses[0][1] == {"predictions": pytest.approx([0.1, 0.2])}
    assert responses[1][1]["field"] == "instances[0].nope" and responses[1][1]["code"] == 400
    assert responses[2][1] == {"ranking": [{"index": 1, "score": pytest.approx(0.9)}, {"index": 2, "score": pytest.approx(0.7)}]}
    v2 = responses[3][1]
    assert (v2["id"], v2["model_name"], v2["model_version"]) == ("q", "m", "2.0")
    assert v2["outputs"][0]["name"] == "probability" and v2["outputs"][0]["shape"] == [1]
    json.dumps([body for _, body in responses])  # every body is plain JSON
    with pytest.raises(ValueError, match=r"the model returned 2 scores for 6 records"):
        split_responses(batch, scores[:2])


def test_rank_is_best_first_and_stable():
    scores = np.array([0.2, 0.9, 0.2, 0.5], np.float32)
    assert [item["index"] for item in rank(scores, 4)] == [1, 3, 0, 2]
    assert rank(scores, 1) == [{"index": 1, "score": pytest.approx(0.9)}]


def test_build_response_scores_are_python_floats():
    body = build_response(ParsedRequest("score", [{}]), np.array([0.25], np.float32))
    assert body == {"predictions": [0.25]} and type(body["predictions"][0]) is float


# -- a spec with a bucketized dense column ----------------------------------------


def test_requests_send_the_raw_column_of_a_bucketized_feature():
    columns = {"I1": np.arange(1.0, 101.0), "C1": ["a", "b"] * 50}
    schema = [SchemaField("I1", dense=True, bucketize=4), SchemaField("C1", dense=False, options=SparseOptions(min_count=1))]
    spec = fit_spec(schema, [columns])
    assert spec.bucketized[0].boundaries == (25.0, 50.0, 75.0)
    v2 = {"inputs": [v2_input("I1", [80, None], "FP64")]}
    batch = encode(
        spec,
        {"instances": [{"I1": 10, "C1": "a"}, {"C1": "b"}, {"I1": 50.5}]},
        v2,
        {"context": {"I1": 26}, "candidates": [{}, {"I1": 1000}]},
        {"instances": [{"I1_bucket": 2}]},
        {"instances": [{"I1": float("inf")}]},
    )
    assert batch.sparse.shape == (7, 2)  # (B, S): C1, then I1_bucket
    buckets = [batch.sparse[start:end, 1].tolist() for start, end in batch.bounds[:3]]
    assert buckets == [[1, 0, 3], [4, 0], [2, 4]]  # missing -> 0; the context's I1 shared, a candidate's wins
    start, end = batch.bounds[0]
    assert batch.dense[start:end, 0].tolist() == pytest.approx(np.log1p([10, 0, 50.5]).tolist())
    unknown, not_finite = batch.outcomes[3:]
    assert isinstance(unknown, RequestError) and (unknown.field, unknown.problem) == ("instances[0].I1_bucket", "unknown feature")
    assert isinstance(not_finite, RequestError) and not_finite.field == "instances[0].I1"
