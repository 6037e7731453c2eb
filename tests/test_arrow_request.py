"""Arrow IPC requests and JSON parsed from raw bytes: the handler's faster request paths.

Unit tier: an Arrow request encodes to exactly the tensors of the same
records sent as JSON (scoring and ranking, nulls and multi-valued columns);
every 400 of the JSON path has its Arrow twin; the Arrow response form; the
orjson path for JSON bytes (NaN, nesting, JSON strings, duplicate keys).
End to end: a real TorchServe scores an Arrow request as it scores the same
records in JSON, answers in Arrow when asked, and refuses a bad one with a 400.
"""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

import handlers.request as request_module
from featurespec import FeatureSpec
from featurespec.arrow import string_column_from_arrow, string_lists_from_arrow
from handlers.arrow_request import read_stream, write_stream
from handlers.request import (
    ARROW_STREAM,
    EncodedBatch,
    Limits,
    ParsedRequest,
    RequestError,
    decode_body,
    encode_batch,
    prefers_arrow,
    write_responses,
)
from loadtest.scoring_client import (
    Client,
    ScoringError,
    as_table,
    rank_request,
    read_ranking,
    read_scores,
    score_request,
)

LIMITS = Limits(max_records=10, max_candidates=6, max_value_bytes=64, max_string_bytes=200, max_depth=6, max_field_name_bytes=16)
JSON = "application/json"

# Every case of missing: a null, a key left out, an empty list; integers for categorical features.
RECORDS = [
    {"I1": 3, "I2": 0.5, "C1": "a1", "C2": "h3", "C3": ["t1", "t2", "t3"]},
    {"I1": None, "C1": None, "C3": []},
    {"I2": -1.0, "C2": 12, "C3": ["t0", "", None]},
    {"I1": 59, "I2": 2.5, "C1": "unseen", "C2": "", "C3": ["t3"]},
]


def records_table() -> pa.Table:
    """``RECORDS`` as Arrow columns: a left-out key and a null are both null."""
    return pa.table(
        {
            "I1": pa.array([3, None, None, 59], pa.int64()),
            "I2": pa.array([0.5, None, -1.0, 2.5]),
            "C1": pa.array(["a1", None, None, "unseen"]),
            "C2": pa.array(["h3", None, "12", ""]),
            "C3": pa.array([["t1", "t2", "t3"], [], ["t0", "", None], ["t3"]], pa.list_(pa.string())),
        }
    )


@pytest.fixture(scope="module")
def spec(mixed_spec: FeatureSpec) -> FeatureSpec:
    return mixed_spec


def arrow(table: pa.Table | dict, metadata: dict[str, str] | None = None) -> bytes:
    table = table if isinstance(table, pa.Table) else pa.table(table)
    return write_stream(table.replace_schema_metadata(metadata))


def encode(spec: FeatureSpec, *bodies: tuple[object, str | None], limits: Limits = LIMITS) -> EncodedBatch:
    """One batch of ``(body, content type)`` requests."""
    return encode_batch(spec, [{"body": body} for body, _ in bodies], limits=limits, content_types=[kind for _, kind in bodies])


def tensors(batch: EncodedBatch, index: int) -> tuple[np.ndarray, np.ndarray]:
    outcome = batch.outcomes[index]
    assert not isinstance(outcome, RequestError), outcome
    start, end = batch.bounds[index]
    return batch.dense[start:end], batch.sparse[start:end]


def only_error(batch: EncodedBatch, index: int = 0) -> RequestError:
    outcome = batch.outcomes[index]
    assert isinstance(outcome, RequestError), outcome
    return outcome


def assert_same(left: tuple[np.ndarray, np.ndarray], right: tuple[np.ndarray, np.ndarray]) -> None:
    np.testing.assert_array_equal(left[0], right[0])
    np.testing.assert_array_equal(left[1], right[1])


# -- Arrow columns: the same tensors as the same records in JSON ------------------------


def test_arrow_request_encodes_like_the_same_json_records(spec):
    batch = encode(spec, ({"instances": RECORDS}, JSON), (arrow(records_table()), ARROW_STREAM))
    json_tensors, arrow_tensors = tensors(batch, 0), tensors(batch, 1)
    assert arrow_tensors[0].shape == (4, spec.num_dense) and arrow_tensors[1].shape == (4, spec.num_sparse_columns)
    assert_same(arrow_tensors, json_tensors)
    assert_same(arrow_tensors, spec.encode_records(RECORDS))
    assert (arrow_tensors[1][1] == 0).all()  # the all-missing record: index 0 everywhere
    # I2 = 2.5 lies past the training range [-1, 1]: both paths clip it to the edge before the z-score.
    assert arrow_tensors[0][3, 1] == spec.encode_records([{"I2": 1.0}])[0][0, 1]


@pytest.mark.parametrize(
    "column_form",
    ["int32-and-float32", "integer-ids", "joined-strings", "large-types", "string-view", "list-of-int", "all-null", "several-batches"],
)
def test_every_accepted_column_type_encodes_alike(spec, column_form):
    records = [{"I1": 7, "I2": 1.5, "C1": "a2", "C2": "5", "C3": ["1", "3"]}, {"I1": 0, "C2": "77", "C3": []}]
    columns = {
        "I1": pa.array([7, 0], pa.int64()),
        "I2": pa.array([1.5, None]),
        "C1": pa.array(["a2", None]),
        "C2": pa.array(["5", "77"]),
        "C3": pa.array([["1", "3"], []], pa.list_(pa.string())),
    }
    if column_form == "int32-and-float32":
        columns.update(I1=pa.array([7, 0], pa.int32()), I2=pa.array([1.5, None], pa.float32()))
    elif column_form == "integer-ids":
        columns["C2"] = pa.array([5, 77], pa.uint16())
    elif column_form == "joined-strings":
        columns["C3"] = pa.array(["1|3", ""])
    elif column_form == "large-types":
        columns.update(C1=pa.array(["a2", None], pa.large_string()), C3=pa.array([["1", "3"], []], pa.large_list(pa.large_string())))
    elif column_form == "string-view":
        columns.update(C1=pa.array(["a2", None], pa.string_view()), C3=pa.array([["1", "3"], []], pa.list_view(pa.string())))
    elif column_form == "list-of-int":
        columns["C3"] = pa.array([[1, 3], []], pa.list_(pa.int64()))
    elif column_form == "all-null":
        columns["C1"] = pa.nulls(2)
        records = [{k: v for k, v in record.items() if k != "C1"} for record in records]
    body = arrow(pa.table(columns))
    if column_form == "several-batches":
        table = pa.table(columns)
        body = write_stream(pa.Table.from_batches([table.slice(0, 1).to_batches()[0], table.slice(1).to_batches()[0]]))
    batch = encode(spec, (body, ARROW_STREAM))
    assert_same(tensors(batch, 0), spec.encode_records(records))


def test_a_list_value_holding_the_separator_stays_one_value(spec):
    records = [{"C3": ["t1|t2", "t3"]}, {"C3": "t1|t2"}]
    batch = encode(spec, (arrow({"C3": pa.array([["t1|t2", "t3"], None])}), ARROW_STREAM), ({"instances": records[:1]}, JSON))
    assert_same(tuple(tensor[:1] for tensor in tensors(batch, 0)), tensors(batch, 1))
    joined = encode(spec, (arrow({"C3": ["t1|t2"]}), ARROW_STREAM))
    assert_same(tensors(joined, 0), spec.encode_records(records[1:]))


def test_sliced_arrays_and_null_slots_that_span_bytes():
    values = pa.array(["aa", None, "bbb", "c", None])
    assert string_column_from_arrow(values.slice(1, 3)).to_list() == ["", "bbb", "c"]
    # A null slot holding bytes (Arrow allows it): they are dropped.
    offsets = pa.py_buffer(np.array([0, 2, 5, 6], np.int32).tobytes())
    validity = pa.py_buffer(np.packbits([1, 0, 1], bitorder="little").tobytes())
    spanning = pa.Array.from_buffers(pa.string(), 3, [validity, offsets, pa.py_buffer(b"aaXYZc")], null_count=1)
    assert string_column_from_arrow(spanning).to_list() == ["aa", "", "c"]
    lists = pa.array([["x"], None, ["y", None, "zz"], []], pa.list_(pa.string())).slice(1)
    packed = string_lists_from_arrow(lists)
    assert packed.offsets.tolist() == [0, 0, 3, 3] and packed.values.to_list() == ["y", "", "zz"]
    assert packed.row_bytes().tolist() == [0, 3, 0]


# -- ranking -----------------------------------------------------------------------------


def test_arrow_ranking_encodes_and_ranks_like_json(spec):
    context = {"I1": 5, "C1": "a3", "C2": "shared"}
    candidates = [{"I2": 0.1, "C3": ["t1"]}, {"I1": 9, "I2": -0.4}, {"C1": "a0", "C2": None}]
    table = pa.table(
        {  # I1 null and C1 null: the context's value; C2 None in JSON is the candidate's own (missing) value
            "I1": pa.array([None, 9, None], pa.int64()),
            "I2": pa.array([0.1, -0.4, None]),
            "C1": pa.array([None, None, "a0"]),
            "C3": pa.array([["t1"], None, None], pa.list_(pa.string())),
        }
    )
    json_candidates = [dict(candidate) for candidate in candidates]
    json_candidates[2].pop("C2")  # a JSON key left out takes the context's value, as an absent Arrow column does
    body = arrow(table, {"request": "rank", "top_k": "2", "context": json.dumps(context)})
    batch = encode(spec, ({"context": context, "candidates": json_candidates, "top_k": 2}, JSON), (body, ARROW_STREAM))
    assert_same(tensors(batch, 1), tensors(batch, 0))
    assert_same(tensors(batch, 1), spec.encode_records(json_candidates, base=context))
    assert batch.outcomes[1].kind == "rank" and batch.outcomes[1].top_k == 2
    scores = np.array([0.2, 0.9, 0.5, 0.2, 0.9, 0.5], np.float32)
    json_reply, arrow_reply = write_responses(batch, scores, accepts=[None, ARROW_STREAM])
    assert json.loads(json_reply.body) == {"ranking": [{"index": 1, "score": pytest.approx(0.9)}, {"index": 2, "score": pytest.approx(0.5)}]}
    assert arrow_reply.content_type == ARROW_STREAM
    ranked = read_stream(arrow_reply.body)
    assert ranked.schema.names == ["index", "score"] and ranked.schema.field("score").type == pa.float32()
    assert ranked.column("index").to_pylist() == [1, 2]
    assert ranked.column("score").to_pylist() == pytest.approx([0.9, 0.5])


def test_ranking_without_top_k_or_context_ranks_every_candidate(spec):
    batch = encode(spec, (arrow(records_table(), {"request": "rank"}), ARROW_STREAM))
    assert batch.outcomes[0].top_k == 4 and batch.outcomes[0].context is None
    assert_same(tensors(batch, 0), spec.encode_records(RECORDS))


# -- every 400 of the JSON path has its Arrow twin ---------------------------------------


def _rows(count: int, **column: object) -> dict:
    return {name: [value] * count for name, value in column.items()}


# (id, JSON body, Arrow body, field JSON names, field Arrow names, problem both name)
TWINS = [
    ("unknown-feature", {"instances": [{"C9": "x"}]}, arrow({"C9": ["x"]}), "instances[0].C9", "C9", "unknown feature"),
    ("dense-not-a-number", {"instances": [{"I1": "3"}]}, arrow({"I1": ["3"]}), "instances[0].I1", "I1", "expected a numeric column"),
    ("dense-boolean", {"instances": [{"I1": True}]}, arrow({"I1": [True]}), "instances[0].I1", "I1", "expected a numeric column"),
    ("categorical-float", {"instances": [{"C1": 1.5}]}, arrow({"C1": [1.5]}), "instances[0].C1", "C1", "expected a string or integer column"),
    ("multi-of-floats", {"instances": [{"C3": [1.5]}]}, arrow({"C3": [[1.5]]}), "instances[0].C3", "C3", "list<string> or list<int>"),
    ("nan", {"instances": [{"I2": 1.0}, {"I2": float("nan")}]}, arrow({"I2": [1.0, float("nan")]}),
     "instances[1].I2", "instances[1].I2", "must be a finite number (got NaN or infinity)"),
    ("infinity", {"instances": [{"I1": float("inf")}]}, arrow({"I1": [float("inf")]}),
     "instances[0].I1", "instances[0].I1", "must be a finite number"),
    ("too-many-records", {"instances": [{"I1": 1}] * 11}, arrow(_rows(11, I1=1)), "instances", "instances",
     "11 records exceed the limit of 10 per request"),
    ("too-many-candidates", {"candidates": [{"I1": 1}] * 7}, arrow(_rows(7, I1=1), {"request": "rank"}), "candidates", "candidates",
     "7 candidates exceed the limit of 6 per request"),
    ("value-too-long", {"instances": [{"C1": "x" * 65}]}, arrow({"C1": ["x" * 65]}), "instances[0].C1", "instances[0].C1",
     "65 bytes exceed the limit of 64 bytes per value"),
    ("list-too-long", {"instances": [{"C3": ["x" * 40, "y" * 30]}]}, arrow({"C3": [["x" * 40, "y" * 30]]}),
     "instances[0].C3", "instances[0].C3", "70 bytes exceed the limit of 64 bytes per value"),
    ("text-too-long", {"instances": [{"C2": "z" * 30}] * 10}, arrow(_rows(10, C2="z" * 30)), "instances", "instances",
     "300 bytes of text exceed the limit of 200 bytes per request"),
    ("empty", {"instances": []}, arrow(pa.table({"I1": pa.array([], pa.int64())})), "instances", "instances", "empty request"),
    ("empty-body", b"", b"", "body", "body", "empty request"),
    ("bad-top-k", {"candidates": [{"I1": 1}], "top_k": 0}, arrow({"I1": [1]}, {"request": "rank", "top_k": "0"}), "top_k", "top_k",
     "must be >= 1"),
    ("top-k-not-an-integer", {"candidates": [{"I1": 1}], "top_k": "2"}, arrow({"I1": [1]}, {"request": "rank", "top_k": "two"}),
     "top_k", "top_k", "expected a positive integer"),
    ("context-unknown-feature", {"candidates": [{"I1": 1}], "context": {"C9": 1}},
     arrow({"I1": [1]}, {"request": "rank", "context": '{"C9": 1}'}), "context.C9", "context.C9", "unknown feature"),
    ("context-not-an-object", {"candidates": [{"I1": 1}], "context": [1]},
     arrow({"I1": [1]}, {"request": "rank", "context": "[1]"}), "context", "context", "expected a JSON object"),
    ("context-nan", {"candidates": [{"I1": 1}], "context": {"I2": float("nan")}},
     arrow({"I1": [1]}, {"request": "rank", "context": '{"I2": NaN}'}), "context.I2", "context", "NaN"),
    ("long-field-name", {"instances": [{"k" * 40: 1}]}, arrow({"k" * 40: [1]}), "instances[0]." + "k" * 40, "k" * 40,
     "a field name of 40 bytes exceeds the limit of 16 bytes"),
]


@pytest.mark.parametrize(("json_body", "arrow_body", "json_field", "arrow_field", "problem"), [case[1:] for case in TWINS],
                         ids=[case[0] for case in TWINS])
def test_every_json_400_has_an_arrow_twin(spec, json_body, arrow_body, json_field, arrow_field, problem):
    batch = encode(spec, (json_body, JSON), (arrow_body, ARROW_STREAM), ({"I1": 1}, JSON))
    json_error, arrow_error = only_error(batch, 0), only_error(batch, 1)
    assert json_error.status == arrow_error.status == 400
    assert json_error.field == json_field and arrow_error.field == arrow_field
    assert problem in arrow_error.problem
    if json_field == arrow_field and json_field != "top_k":  # metadata is text: its top_k is quoted, not typed
        assert arrow_error.problem == json_error.problem
    assert batch.bounds[2] == (0, 1)  # the good request of the batch still scores


@pytest.mark.parametrize(
    ("body", "field", "problem"),
    [
        (b"not an arrow stream", "body", "not a valid Arrow IPC stream"),
        (b"\xff\xff\xff\xff\x00\x00\x00\x00", "body", "empty request: an Arrow IPC stream without a schema"),
        (arrow({"I1": [1, 2]})[:-30], "body", "not a valid Arrow IPC stream"),
        (b"ARROW1\x00\x00" + arrow({"I1": [1]}), "body", "an Arrow IPC file, not a stream"),
        (arrow({"C1": pa.array(["a0", "a1"]).dictionary_encode()}), "C1", "dictionary-encoded"),
        (arrow(pa.table([pa.array([1]), pa.array([2])], names=["I1", "I1"])), "I1", "column given twice"),
        (arrow({"I1": [1]}, {"request": "explain"}), "request", "expected 'score' or 'rank'"),
        (arrow({"I1": [1]}, {"top_k": "3"}), "top_k", "only a ranking request"),
        (arrow({"I1": [1]}, {"context": "{}"}), "context", "only a ranking request"),
        (arrow({"I1": [1]}, {"request": "rank", "context": '"{}"'}), "context", "a JSON string"),
        (arrow({"I1": [1]}, {"request": "rank", "context": "[" * 20 + "]" * 20}), "context", "levels of nesting exceed"),
    ],
    ids=["garbage", "end-of-stream-only", "truncated", "file-format", "dictionary", "duplicate-column", "unknown-request", "top-k-when-scoring",
         "context-when-scoring", "context-json-string", "context-too-deep"],
)
def test_arrow_only_problems_are_400s_naming_the_field(spec, body, field, problem):
    error = only_error(encode(spec, (body, ARROW_STREAM)))
    assert error.status == 400 and error.field == field and problem in error.problem, error


def test_compressed_buffers_are_refused_before_they_are_decompressed(spec):
    sink = pa.BufferOutputStream()
    table = pa.table({"C2": ["a" * 60] * 10})
    with ipc.new_stream(sink, table.schema, options=ipc.IpcWriteOptions(compression="zstd")) as writer:
        writer.write_table(table)
    error = only_error(encode(spec, (sink.getvalue().to_pybytes(), ARROW_STREAM)))
    assert error.field == "body" and "compressed Arrow IPC buffers are not accepted" in error.problem


def test_invalid_utf8_and_offsets_out_of_bounds_are_refused(spec):
    offsets = pa.py_buffer(np.array([0, 2], np.int32).tobytes())
    bad_text = pa.Array.from_buffers(pa.string(), 1, [None, offsets, pa.py_buffer(b"\xff\xfe")])
    error = only_error(encode(spec, (arrow({"C1": bad_text}), ARROW_STREAM)))
    assert error.field == "body" and "not a valid Arrow IPC stream" in error.problem
    body = bytearray(arrow({"C1": ["ab", "cd"]}))
    at = bytes(body).find(np.array([0, 2, 4], np.int32).tobytes())
    body[at + 8 : at + 12] = np.array([4000], np.int32).tobytes()  # the last offset far past the data
    assert only_error(encode(spec, (bytes(body), ARROW_STREAM))).field == "body"


def test_without_pyarrow_an_arrow_body_is_a_415_and_json_still_works(spec, monkeypatch):
    import handlers

    monkeypatch.setitem(sys.modules, "handlers.arrow_request", None)  # its import fails, as without pyarrow
    monkeypatch.delattr(handlers, "arrow_request")
    batch = encode(spec, (arrow({"I1": [1]}), ARROW_STREAM), ({"I1": 1}, JSON))
    error = only_error(batch)
    assert error.status == 415 and error.to_json()["type"] == "UnsupportedMediaType" and "pyarrow" in error.problem
    (reply_415, reply_ok) = write_responses(batch, np.zeros(1, np.float32), accepts=[None, ARROW_STREAM])
    assert (reply_415.status, reply_415.reason) == (415, "Unsupported Media Type")
    assert reply_ok.status == 200 and reply_ok.content_type == JSON  # no Arrow writer: JSON instead


# -- responses ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("accept", "arrow_wanted"),
    [
        (None, False),
        ("", False),
        ("application/json", False),
        (ARROW_STREAM, True),
        ("application/vnd.apache.arrow.stream; q=0.9, application/json", False),
        ("application/json;q=0.5, application/vnd.apache.arrow.stream", True),
        ("*/*", False),
        ("Application/Vnd.Apache.Arrow.Stream, */*;q=0.1", True),
        ("application/vnd.apache.arrow.stream;q=0", False),
        ("application/vnd.apache.arrow.stream;q=oops", False),
    ],
)
def test_prefers_arrow(accept, arrow_wanted):
    assert prefers_arrow(accept) is arrow_wanted


def test_response_forms(spec):
    batch = encode(spec, (arrow(records_table()), ARROW_STREAM), ({"instances": RECORDS}, JSON),
                   (arrow({"C9": ["x"]}), ARROW_STREAM))
    scores = np.linspace(0.1, 0.8, 8).astype(np.float32)
    replies = write_responses(batch, scores, accepts=[ARROW_STREAM, ARROW_STREAM, ARROW_STREAM])
    assert [reply.status for reply in replies] == [200, 200, 400]
    for reply, expected in zip(replies[:2], (scores[:4], scores[4:])):
        assert reply.content_type == ARROW_STREAM
        table = read_stream(reply.body)
        assert table.schema == pa.schema([("probability", pa.float32())])
        np.testing.assert_array_equal(table.column("probability").to_numpy(), expected)
    assert replies[2].content_type == JSON and json.loads(replies[2].body)["field"] == "C9"  # errors stay JSON
    as_json = write_responses(batch, scores)
    assert json.loads(as_json[0].body) == {"predictions": pytest.approx(scores[:4].tolist())}
    assert as_json[0].body == json.dumps({"predictions": scores[:4].tolist()}, separators=(",", ":")).encode()


def test_a_kservev2_request_is_answered_in_json_whatever_it_accepts(spec):
    body = {"inputs": [{"name": "I1", "shape": [1], "datatype": "INT64", "data": [3]}]}
    (reply,) = write_responses(encode(spec, (body, JSON)), np.zeros(1, np.float32), accepts=[ARROW_STREAM])
    assert reply.content_type == JSON and "outputs" in json.loads(reply.body)


# -- JSON from raw bytes (orjson) --------------------------------------------------------


def test_raw_json_is_parsed_with_orjson():
    assert request_module.orjson is not None
    assert decode_body({"body": b'{"instances": [{"I1": 1, "C3": ["a"]}]}'}) == {"instances": [{"I1": 1, "C3": ["a"]}]}


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b'{"instances": [{"I1": NaN}]}', "not valid JSON: NaN is not a JSON number"),
        (b'{"I2": -Infinity}', "not valid JSON: -Infinity is not a JSON number"),
        (b'"{\\"I1\\": 1}"', "the body is a JSON string, not an object"),
        (b'{"instances": [', "not valid JSON: Expecting value"),
        (b"\xff{}", "not valid UTF-8 at byte 0"),
        (b"  ", "empty request"),
    ],
)
def test_raw_json_problems_read_as_before(body, problem):
    with pytest.raises(RequestError, match="^body: ") as caught:
        decode_body({"body": body})
    assert problem in caught.value.problem


def test_nesting_is_checked_before_orjson_parses(monkeypatch):
    calls = []
    monkeypatch.setattr(request_module.orjson, "loads", lambda raw: calls.append(raw))
    with pytest.raises(RequestError, match=r"^body: 20 levels of nesting exceed the limit of 6$"):
        decode_body({"body": b"[" * 20 + b"]" * 20}, limits=LIMITS)
    assert calls == []


def test_duplicate_keys_keep_the_last_as_json_does():
    body = b'{"instances": [{"I1": 1, "I1": 2}], "instances": [{"I1": 3, "C1": "a", "C1": "b"}]}'
    assert decode_body({"body": body}) == json.loads(body) == {"instances": [{"I1": 3, "C1": "b"}]}


def test_what_orjson_alone_refuses_gets_the_answer_a_decoded_body_gets(spec):
    surrogate = b'{"instances": [{"C1": "\\ud800"}]}'
    huge = b'{"instances": [{"I1": 1e400}]}'
    for body, field, problem in ((surrogate, "instances[0].C1", "unpaired surrogate"), (huge, "instances[0].I1", "finite number")):
        raw, decoded = encode(spec, (body, JSON), (json.loads(body), JSON)).outcomes
        assert isinstance(raw, RequestError) and (raw.field, raw.problem) == (decoded.field, decoded.problem)
        assert raw.field == field and problem in raw.problem


def test_bytes_and_decoded_bodies_encode_alike(spec):
    bodies = [{"instances": RECORDS}, {"context": {"I1": 4}, "candidates": RECORDS[:2], "top_k": 1}, RECORDS[0]]
    for body in bodies:
        batch = encode(spec, (json.dumps(body).encode(), JSON), (body, JSON), (json.dumps(body).encode(), None))
        assert_same(tensors(batch, 0), tensors(batch, 1))
        assert_same(tensors(batch, 2), tensors(batch, 1))


# -- the client's bodies -----------------------------------------------------------------


def test_client_bodies_encode_like_the_records(spec):
    import pandas as pd

    as_text = [{**record, "C2": str(record["C2"])} if "C2" in record else record for record in RECORDS]
    requests = [
        score_request(RECORDS, arrow_from_rows=100),  # small: JSON
        score_request(as_text, arrow_from_rows=2),
        score_request(RECORDS, arrow_from_rows=2),  # C2 holds str and int: no Arrow column, so JSON
        score_request(pd.DataFrame(RECORDS), arrow_from_rows=2),
        score_request(pd.DataFrame(as_text), arrow_from_rows=2),
        score_request(as_table(as_text), arrow_from_rows=100),
    ]
    assert [request.headers["Content-Type"] for request in requests] == [JSON, ARROW_STREAM, JSON, JSON, ARROW_STREAM, JSON]
    assert [request.headers["Accept"] for request in requests[:2]] == [JSON, ARROW_STREAM]
    batch = encode(spec, *((request.body, request.headers["Content-Type"]) for request in requests))
    for index in range(len(requests)):
        assert_same(tensors(batch, index), spec.encode_records(RECORDS))
    categorical = as_table(pa.table({"C1": pa.array(["a1", "a2"]).dictionary_encode()}))
    assert categorical.schema.field("C1").type == pa.string()
    ranked = rank_request({"I1": 5}, as_text[:3], 2, arrow_from_rows=1)
    assert ranked.headers["Content-Type"] == ARROW_STREAM
    outcome = encode(spec, (ranked.body, ARROW_STREAM)).outcomes[0]
    assert isinstance(outcome, ParsedRequest) and outcome.kind == "rank" and outcome.top_k == 2 and outcome.context == {"I1": 5}


def test_client_reads_both_answer_forms():
    scores = np.array([0.25, 0.5], np.float32)
    parsed = ParsedRequest("rank", top_k=1)
    from handlers.arrow_request import write_response

    np.testing.assert_array_equal(read_scores(200, ARROW_STREAM, write_response(ParsedRequest("score"), scores)), scores)
    np.testing.assert_array_equal(read_scores(200, "application/json", b'{"predictions":[0.25,0.5]}'), scores)
    ranking = read_ranking(200, ARROW_STREAM, write_response(parsed, scores))
    assert ranking.indices.tolist() == [1] and ranking.scores.tolist() == [0.5]
    with pytest.raises(ScoringError, match=r"^400: instances\[0\]\.C9: unknown feature$"):
        read_scores(400, JSON, b'{"code":400,"field":"instances[0].C9","problem":"unknown feature"}')
    with pytest.raises(ValueError, match="key_file needs management_url"):
        Client("http://127.0.0.1:1", "m", key_file="key_file.json")


# -- end to end ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny_export, tmp_path_factory):
    """A TorchServe serving the tiny DLRM's ONNX archive, configured as shipped (raw bodies, token auth on)."""
    from export.archive import ServingConfig, build_archive
    from loadtest.torchserve import running_torchserve

    store = tmp_path_factory.mktemp("arrow_store")
    build_archive(tiny_export("dlrm").path, name="dlrm_onnx", backend="onnx", model_store=store,
                  config=ServingConfig(batch_size=8, max_batch_delay_ms=5, max_records=100, startup_timeout_s=120))
    clean = tmp_path_factory.mktemp("arrow_host")
    shutil.copytree(store, clean / "model_store")
    with running_torchserve(clean, model_store=clean / "model_store", models=["dlrm_onnx"], timeout=240) as running:
        yield running


@pytest.mark.slow
def test_served_arrow_and_json_requests_score_alike(server, tiny_export, sample_records):
    records = sample_records(40, seed=17)
    as_json = Client.for_server(server, "dlrm_onnx", arrow_from_rows=10_000)
    as_arrow = Client.for_server(server, "dlrm_onnx", arrow_from_rows=1)
    expected = tiny_export("dlrm").eager_scores(records)
    json_scores, arrow_scores = as_json.score(records), as_arrow.score(records)
    assert arrow_scores.dtype == np.float32 and len(arrow_scores) == 40
    np.testing.assert_allclose(arrow_scores, json_scores, atol=1e-6)
    np.testing.assert_allclose(arrow_scores, expected, atol=1e-5)
    request = score_request(records, arrow_from_rows=1)
    status, content_type, body = as_arrow.send(request)  # Arrow in, Arrow out
    assert (status, content_type) == (200, ARROW_STREAM)
    np.testing.assert_array_equal(read_stream(body).column("probability").to_numpy(), arrow_scores)
    # Arrow in, JSON out (no Accept header): the same scores.
    status, content_type, body = as_arrow.send(type(request)(request.body, {"Content-Type": ARROW_STREAM}))
    assert status == 200 and content_type.startswith(JSON)
    assert json.loads(body)["predictions"] == pytest.approx(json_scores.tolist(), abs=1e-6)
    context = {"I1": 4, "C1": "c1_3"}
    candidates = [{k: v for k, v in record.items() if k not in context} for record in records[:12]]
    arrow_ranking, json_ranking = as_arrow.rank(context, candidates, top_k=5), as_json.rank(context, candidates, top_k=5)
    assert arrow_ranking.indices.tolist() == json_ranking.indices.tolist()
    np.testing.assert_allclose(arrow_ranking.scores, json_ranking.scores, atol=1e-6)


@pytest.mark.slow
def test_a_large_served_json_body_scores_as_its_arrow_twin(server, tiny_export, sample_records):
    """An `instances` body above TYPED_JSON_MIN_BYTES, which the worker decodes with msgspec, scores as Arrow does."""
    records = [{**record, "C2": f"{record.get('C2') or ''}{'x' * 200}{index}"}  # long, unseen: hashed, not refused
               for index, record in enumerate(sample_records(100, seed=23))]
    as_json = Client.for_server(server, "dlrm_onnx", arrow_from_rows=10_000)
    request = score_request(records, arrow_from_rows=10_000)
    assert len(request.body) >= request_module.TYPED_JSON_MIN_BYTES
    json_scores = as_json.score(records)
    arrow_scores = Client.for_server(server, "dlrm_onnx", arrow_from_rows=1).score(records)
    np.testing.assert_allclose(json_scores, arrow_scores, atol=1e-6)
    np.testing.assert_allclose(json_scores, tiny_export("dlrm").eager_scores(records), atol=1e-5)


@pytest.mark.slow
def test_a_large_served_ranking_body_ranks_as_the_eager_model(server, tiny_export, sample_records):
    """A ranking body above TYPED_JSON_MIN_BYTES (the typed decoder), its candidates lacking, nulling or setting
    the context's features: a lacking feature takes the context's value, a null stays missing."""
    candidates = [{**record, "C2": f"{record.get('C2') or ''}{'x' * 200}{index}"} for index, record in enumerate(sample_records(100, seed=29))]
    for index, candidate in enumerate(candidates):
        candidate.pop("C1", None)  # every candidate takes the context's C1
        if index % 3 == 0:
            candidate.pop("I1", None)  # takes the context's I1
        elif index % 3 == 1:
            candidate["I1"] = None  # missing, whatever the context says
    context = {"I1": 9, "C1": "c1_4"}
    request = rank_request(context, candidates, 100, arrow_from_rows=10_000)
    assert len(request.body) >= request_module.TYPED_JSON_MIN_BYTES
    ranking = Client.for_server(server, "dlrm_onnx", arrow_from_rows=10_000).rank(context, candidates, 100)
    expected = np.array(tiny_export("dlrm").eager_scores(candidates, context=context), np.float32)
    np.testing.assert_allclose(ranking.scores, expected[ranking.indices], atol=1e-5)
    np.testing.assert_allclose(ranking.scores, np.sort(expected)[::-1], atol=1e-5)


@pytest.mark.slow
def test_served_arrow_400_names_the_field(server):
    client = Client.for_server(server, "dlrm_onnx", arrow_from_rows=1)
    with pytest.raises(ScoringError) as caught:
        client.score(pa.table({"I1": [1.0, float("nan")], "C1": ["c1_1", "c1_2"]}))
    assert caught.value.status == 400 and caught.value.field == "instances[1].I1" and "finite" in caught.value.problem
    with pytest.raises(ScoringError) as caught:
        client.score(pa.table({"I1": [1, 2], "bogus": ["x", "y"]}))
    assert (caught.value.status, caught.value.field, caught.value.problem) == (400, "bogus", "unknown feature")
    garbage = client.send(type(score_request([{}], arrow_from_rows=1))(b"\x00" * 64, {"Content-Type": ARROW_STREAM}))
    assert garbage[0] == 400 and json.loads(garbage[2])["field"] == "body"
    assert len(client.score([{"I1": 1}, {"I1": 2}])) == 2  # the worker is still there


@pytest.mark.slow
def test_demo_client_scores_as_json_and_arrow_like_the_exported_model(server, tiny_export, capsys):
    from loadtest.client import check_model

    worst = check_model(server, "dlrm_onnx", tiny_export("dlrm").path, records=20, candidates=30, seed=3)
    printed = capsys.readouterr().out
    assert worst <= 1e-5
    assert "as an Arrow IPC stream" in printed and "same order" in printed
