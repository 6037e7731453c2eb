"""Request limits and hostile bodies: every problem is one request's 400, found in bounded time.

Covers ``handlers/request.py`` (limits, nesting, error bodies, KServe v2
datatypes, a ranking context encoded once) and the FeatureSpec's side of it
(text limits, the string hash's cost linear in bytes with unchanged values).
"""

from __future__ import annotations

import json
import re
import time

import numpy as np
import pytest

from featurespec import (
    FeatureError,
    FeatureSpec,
    StringColumn,
    TextLimits,
    hash_strings,
    json_type,
)
from featurespec.strings import HASH_SEED, MIX_MULTIPLIER, hash_spans, utf8_spans
from handlers.request import (
    EncodedBatch,
    Limits,
    RequestError,
    decode_body,
    encode_batch,
    json_nesting_depth,
    parse_request,
    split_responses,
)

LIMITS = Limits(max_records=10, max_candidates=6, max_value_bytes=64, max_string_bytes=200, max_depth=6, max_field_name_bytes=16)
PYTHON_TYPE_NAME = re.compile(r"\b(NoneType|int|str|dict|list|float|bool|tuple|bytes)\b")


@pytest.fixture(scope="module")
def spec(mixed_spec: FeatureSpec) -> FeatureSpec:
    return mixed_spec


def encode(spec: FeatureSpec, *bodies: object, limits: Limits = LIMITS, content_types=None) -> EncodedBatch:
    return encode_batch(spec, [{"body": body} for body in bodies], limits=limits, content_types=content_types)


def only_error(batch: EncodedBatch, index: int = 0) -> RequestError:
    outcome = batch.outcomes[index]
    assert isinstance(outcome, RequestError), outcome
    return outcome


# -- the string hash: cost linear in bytes, values unchanged ---------------------


def reference_hash_spans(data: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The hash as first written (every value stepped word by word up to the longest): the values to keep."""
    fmix_1, fmix_2 = np.uint64(0xFF51AFD7ED558CCD), np.uint64(0xC4CEB9FE1A85EC53)
    hashes = np.full(len(lengths), HASH_SEED, dtype=np.uint64)
    longest = int(lengths.max()) if len(lengths) else 0
    if longest:
        padded = np.concatenate([data, np.zeros(8, np.uint8)])
        words = np.ndarray((len(padded) - 7,), dtype="<u8", buffer=padded, strides=(1,))
        with np.errstate(over="ignore"):
            for word in range(0, longest, 8):
                remaining = lengths - word
                value = words[np.minimum(starts + word, len(words) - 1)]
                short = (remaining < 8) & (remaining > 0)
                if short.any():
                    keep_bits = np.clip(remaining, 0, 8).astype(np.uint64) * np.uint64(8)
                    mask = np.where(short, (np.uint64(1) << (keep_bits & np.uint64(63))) - np.uint64(1), np.uint64(2**64 - 1))
                    value = value & mask
                mixed = (hashes ^ value) * MIX_MULTIPLIER
                mixed ^= mixed >> np.uint64(32)
                hashes = np.where(remaining > 0, mixed, hashes)
    with np.errstate(over="ignore"):
        hashes ^= lengths.astype(np.uint64)
        hashes ^= hashes >> np.uint64(33)
        hashes *= fmix_1
        hashes ^= hashes >> np.uint64(33)
        hashes *= fmix_2
        hashes ^= hashes >> np.uint64(33)
    return hashes


def random_texts(rng: np.random.Generator, lengths: list[int]) -> list[str]:
    alphabet = np.array(list("aZ09|_ -") + ["é", "ß", "中", "😀", "\u0301"])
    return ["".join(rng.choice(alphabet, size=n)) for n in lengths]


def test_hash_equals_the_reference_on_strings_of_every_length():
    rng = np.random.default_rng(7)
    edges = [0, 1, 7, 8, 9, 15, 16, 17, 31, 32, 33, 39, 40, 41, 63, 64, 65, 255, 256, 257, 1000, 4099]
    texts = random_texts(rng, edges * 2 + rng.integers(0, 400, 600).tolist()) + ["", "x" * 300_001, "é" * 70_001]
    for trial in range(6):
        chosen = [texts[i] for i in rng.permutation(len(texts))[: int(rng.integers(1, len(texts)))]]
        column = StringColumn.from_values(chosen)
        starts = column.offsets[:-1]
        expected = reference_hash_spans(column.data, starts, np.diff(column.offsets))
        hashes, missing = hash_strings(column)
        np.testing.assert_array_equal(hashes, expected, err_msg=f"trial {trial}")
        np.testing.assert_array_equal(missing, np.diff(column.offsets) == 0)


def test_hash_of_spans_in_shared_bytes_equals_the_reference():
    # The request encoder hashes NUL-separated values in place: spans, not a packed column.
    rng = np.random.default_rng(11)
    texts = random_texts(rng, rng.integers(0, 120, 300).tolist() + [5000, 0, 64, 33])
    data, starts, lengths = utf8_spans("\x00".join(texts), len(texts))
    np.testing.assert_array_equal(hash_spans(data, starts, lengths)[0], reference_hash_spans(data, starts, lengths))


@pytest.mark.parametrize(
    "values",
    [["x" * 2_500_000] + ["a"] * 999, ["y" * 6_000_000], ["z" * 40_000] * 150],
    ids=["one-long-among-many", "one-huge", "many-long"],
)
def test_hash_cost_is_linear_in_bytes(values):
    column = StringColumn.from_values(values)
    started = time.perf_counter()
    hash_strings(column)
    elapsed = time.perf_counter() - started
    # Stepping every value through the longest one's words took 6-8 s here; linear is ~0.1-0.3 s.
    assert elapsed < 3.0, f"{len(column.data)} bytes hashed in {elapsed:.2f}s"


# -- nesting depth ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "depth"),
    [
        (b"", 0),
        (b"3", 0),
        (b"{}", 1),
        (b'{"instances": [{"C3": ["a"]}]}', 4),
        (b'["[[[[", "{{{{"]', 1),
        (b'["\\"[[[", "\\\\", [[]]]', 3),
        (b'["\\\\\\"[[", 1]', 1),
        (b"[" * 10_000 + b"]" * 10_000, 10_000),
        (b'{"a": "' + b"[" * 5000 + b'"}', 1),
    ],
    ids=["empty", "scalar", "object", "request", "brackets-in-strings", "escaped-quote", "escaped-backslash-quote", "deep", "long-string"],
)
def test_json_nesting_depth(text, depth):
    assert json_nesting_depth(text) == depth


def test_deep_json_is_refused_before_parsing():
    deep = b'{"instances": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"
    with pytest.raises(RequestError, match=r"^body: 10001 levels of nesting exceed the limit of 6$"):
        decode_body({"body": deep}, limits=LIMITS)
    with pytest.raises(RequestError, match=r"levels of nesting exceed the limit of 8"):
        decode_body({"body": deep.decode()})  # a text body too, with the default limits
    assert decode_body({"body": b'{"instances": [{"C3": ["a"]}]}'}, limits=LIMITS) == {"instances": [{"C3": ["a"]}]}


def test_deep_json_in_a_batch_fails_alone(spec):
    batch = encode(spec, b"[" * 50_000 + b"]" * 50_000, {"I1": 1})
    assert only_error(batch).field == "body" and batch.bounds[1] == (0, 1)


# -- bodies -------------------------------------------------------------------------


def test_a_json_string_holding_a_request_is_refused(spec):
    request = json.dumps({"instances": [{"I1": 1}]})
    # TorchServe decoded an application/json body into a Python str: it was a JSON string.
    batch = encode(spec, request, {"I1": 1}, content_types=["application/json; charset=utf-8", "application/json"])
    error = only_error(batch)
    assert (error.field, error.problem) == ("body", "the body is a JSON string, not an object: send the request object itself")
    assert batch.bounds[1] == (0, 1)
    with pytest.raises(RequestError, match=r"the body is a JSON string"):
        decode_body({"body": json.dumps(request).encode()})  # bytes holding a JSON string
    assert decode_body({"body": request}, content_type="text/plain") == {"instances": [{"I1": 1}]}


def test_a_number_of_too_many_digits_is_a_400():
    with pytest.raises(RequestError, match=r"^body: not valid JSON: a number with more digits"):
        decode_body({"body": b'{"I1": ' + b"9" * 5000 + b"}"})


def test_any_exception_while_encoding_is_that_requests_400(spec, monkeypatch, caplog):
    original = FeatureSpec.encode_records

    def fragile(self, records, **options):
        if any(record.get("C2") == "boom" for record in records):
            raise RuntimeError("a bug no check foresaw")
        return original(self, records, **options)

    monkeypatch.setattr(FeatureSpec, "encode_records", fragile)
    batch = encode(spec, {"I1": 1}, {"instances": [{"C2": "boom"}]}, {"I1": 2}, {1: "an integer key"})
    assert [isinstance(outcome, RequestError) for outcome in batch.outcomes] == [False, True, False, True]
    assert (only_error(batch, 1).field, only_error(batch, 1).problem) == ("instances", "could not be encoded")
    assert batch.bounds == [(0, 1), (1, 1), (1, 2), (2, 2)]
    assert "a bug no check foresaw" in caplog.text  # logged for the operator, not sent to the client


# -- limits from the handler section ---------------------------------------------------


def test_limits_from_the_handler_section():
    section = {"max_records": 5, "max_candidates": 4, "max_value_bytes": 3, "max_string_bytes": 2, "max_depth": 7,
               "max_field_name_bytes": 9, "threads": 2}
    assert Limits.from_handler_config(section) == Limits(5, 4, 3, 2, 7, 9)
    assert Limits.from_handler_config({"threads": 2}) == Limits()
    assert Limits() == Limits(max_records=1000, max_candidates=1000, max_value_bytes=65536, max_string_bytes=4194304,
                              max_depth=8, max_field_name_bytes=256)


@pytest.mark.parametrize("name", ["max_records", "max_candidates", "max_value_bytes", "max_string_bytes", "max_depth", "max_field_name_bytes"])
@pytest.mark.parametrize("value", [0, -1, True, "10", 1.5])
def test_limits_must_be_positive_integers(name, value):
    with pytest.raises(ValueError, match=rf"handler\.{name} must be an integer >= 1, got {value!r}"):
        Limits(**{name: value})


# -- record counts ----------------------------------------------------------------------


def test_candidates_above_max_candidates():
    with pytest.raises(RequestError, match=r"^candidates: 7 candidates exceed the limit of 6 per request$"):
        parse_request({"candidates": [{}] * 7}, limits=LIMITS)
    with pytest.raises(RequestError, match=r"^candidates: 11 records exceed the limit of 10 per request$"):
        parse_request({"candidates": [{}] * 11}, limits=LIMITS)
    assert parse_request({"candidates": [{}] * 6}, limits=LIMITS).num_records == 6
    assert parse_request({"instances": [{}] * 7}, limits=LIMITS).num_records == 7  # instances: max_records only


# -- field names and error bodies ---------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field_prefix"),
    [
        ({"instances": [{"k" * 1_000_000: 1}]}, "instances[0].kkkk"),
        ({"k" * 1_000_000: 1}, "instances[0].kkkk"),
        ({"instances": [{}], "k" * 1_000_000: 1}, "kkkk"),
        ({"candidates": [{}], "k" * 1_000_000: 1}, "kkkk"),
        ({"context": {"k" * 1_000_000: 1}, "candidates": [{}]}, "context.kkkk"),
        ({"inputs": [{"name": "k" * 1_000_000, "shape": [1], "datatype": "BYTES", "data": ["a"]}]}, "inputs[0].name"),
        ({"inputs": [{"name": "C1", "shape": [1], "datatype": "BYTES", "data": ["a"], "k" * 1_000_000: 1}]}, "inputs[0].kkkk"),
    ],
    ids=["record-key", "bare-record-key", "beside-instances", "ranking-key", "context-key", "v2-name", "v2-input-key"],
)
def test_a_long_field_name_is_a_400_with_a_short_body(spec, body, field_prefix):
    error = only_error(encode(spec, body))
    assert error.field.startswith(field_prefix) and len(error.field) < 100
    assert error.problem == "a field name of 1000000 bytes exceeds the limit of 16 bytes"
    assert len(json.dumps(error.to_json())) < 600  # a 1 MB name is not echoed


def test_an_unknown_name_within_the_limit_is_an_unknown_feature(spec):
    error = only_error(encode(spec, {"instances": [{"I1": 1, "nope": 2}]}))
    assert (error.field, error.problem) == ("instances[0].nope", "unknown feature")


def test_error_messages_quote_a_short_prefix_of_client_text(spec):
    bodies = [
        {"inputs": [{"name": "C1", "shape": list(range(100_000)), "datatype": "BYTES", "data": ["a"]}]},
        {"inputs": [{"name": "C1", "shape": [1], "datatype": "X" * 100_000, "data": ["a"]}]},
        {"candidates": [{}], "top_k": -(10**2000)},
    ]
    for body in bodies:
        error = only_error(encode(spec, body))
        assert len(json.dumps(error.to_json())) < 1200, error.field


# -- string sizes -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("record", "field", "size"),
    [
        ({"C1": "x" * 65}, "instances[1].C1", 65),
        ({"C2": "é" * 40}, "instances[1].C2", 80),  # bytes, not characters
        ({"C3": "t1|" * 30}, "instances[1].C3", 90),
        ({"C3": ["t1"] * 40}, "instances[1].C3", 80),  # a multi-valued record's tokens together
        ({"C2": 10**70}, "instances[1].C2", 71),  # an integer id counts its decimal text
    ],
    ids=["ascii", "utf-8", "multi-valued-text", "multi-valued-list", "integer"],
)
def test_a_value_above_max_value_bytes(spec, record, field, size):
    error = only_error(encode(spec, {"instances": [{"C1": "a0"}, record]}))
    assert (error.field, error.record) == (field, 1)
    assert error.problem == f"{size} bytes exceed the limit of 64 bytes per value"


def test_text_above_max_string_bytes_fails_its_own_request_only(spec):
    big = {"instances": [{"C1": "x" * 60, "C2": "y" * 60} for _ in range(2)]}  # 240 bytes, each value within 64
    fits = {"instances": [{"C1": "x" * 60, "C2": "y" * 60}]}  # 120 bytes
    batch = encode(spec, fits, big, fits)
    error = only_error(batch, 1)
    assert (error.field, error.problem) == ("instances", "240 bytes of text exceed the limit of 200 bytes per request")
    assert batch.bounds == [(0, 1), (1, 1), (1, 2)]
    assert isinstance(batch.outcomes[0], type(batch.outcomes[2])) and not isinstance(batch.outcomes[2], RequestError)


def test_text_limits_of_kservev2_columns_and_the_context(spec):
    v2 = {"inputs": [{"name": "C1", "shape": [2], "datatype": "BYTES", "data": ["a0", "x" * 100]}]}
    error = only_error(encode(spec, v2))
    assert (error.field, error.problem) == ("inputs[1].C1", "100 bytes exceed the limit of 64 bytes per value")
    error = only_error(encode(spec, {"context": {"C1": "x" * 300_000}, "candidates": [{"I1": 1}] * 6}))
    assert (error.field, error.problem) == ("context.C1", "300000 bytes exceed the limit of 64 bytes per value")


def test_text_limits_in_the_feature_spec(spec):
    limits = TextLimits(max_value_bytes=8, max_total_bytes=20, groups=(1, 2))
    spec.encode_records([{"C1": "12345678"}, {"C1": "1234567"}, {"C2": "1234567"}], text_limits=limits)
    with pytest.raises(FeatureError, match=r"^record 0: feature 'C1': 9 bytes exceed the limit of 8 bytes per value$"):
        spec.encode_records([{"C1": "123456789"}], text_limits=limits)
    with pytest.raises(FeatureError, match=r"^22 bytes of text exceed the limit of 20 bytes per request$") as caught:
        spec.encode_records([{"C1": "1"}, {"C1": "12345678", "C2": "12345678"}, {"C3": ["12345", "1"]}], text_limits=limits)
    assert caught.value.field == "" and caught.value.record is None


def test_hostile_values_are_refused_quickly(spec):
    limits = Limits()
    bodies = [
        {"instances": [{"C1": "x" * 2_500_000}] + [{"C1": "a"}] * 999},
        {"instances": [{"C1": "x" * 6_000_000}]},
        {"context": {"C1": "x" * 300_000}, "candidates": [{"I1": i} for i in range(1000)]},
        {"instances": [{"C3": "a|" * 1_000_000}]},
    ]
    for body in bodies:
        started = time.perf_counter()
        batch = encode(spec, body, {"I1": 1}, limits=limits)
        elapsed = time.perf_counter() - started
        assert "exceed the limit of 65536 bytes per value" in only_error(batch).problem
        assert batch.bounds[1] == (0, 1)
        assert elapsed < 2.0, f"{only_error(batch).field}: {elapsed:.2f}s"


# -- a ranking request's context: encoded once, the same rows as before ------------------


def test_the_context_fills_what_each_candidate_lacks(spec):
    context = {"I1": 30, "I2": 0.5, "C1": "a1", "C3": ["t1", "t2"]}
    candidates = [
        {"C2": "h3"},
        {"I1": 3, "C1": "a4"},  # its own values win
        {"I1": None, "C3": None},  # an explicit null wins too: missing
        {"I1": 45, "I2": -0.25, "C1": "a2", "C2": "h9", "C3": "t3"},  # sets everything
        {},
    ]
    batch = encode(spec, {"context": context, "candidates": candidates, "top_k": 2})
    merged = [{**context, **candidate} for candidate in candidates]  # what the context means
    dense, sparse = spec.encode_records(merged)
    np.testing.assert_array_equal(batch.dense, dense)
    np.testing.assert_array_equal(batch.sparse, sparse)  # the bucketized I1 column included
    # Alone (after another request failed) the rows are the same.
    alone = encode(spec, {"instances": [{"nope": 1}]}, {"context": context, "candidates": candidates})
    start, end = alone.bounds[1]
    np.testing.assert_array_equal(alone.dense[start:end], dense)
    np.testing.assert_array_equal(alone.sparse[start:end], sparse)


@pytest.mark.parametrize(
    ("context", "field", "problem"),
    [
        ({"I1": "seven"}, "context.I1", "expected a number or null, got a string"),
        ({"nope": 1}, "context.nope", "unknown feature"),
        ({"C1": [1]}, "context.C1", "expected a string or integer, got an array"),
        ({"I2": float("nan")}, "context.I2", "must be a finite number (got NaN or infinity)"),
    ],
)
def test_context_errors_name_the_context_field(spec, context, field, problem):
    error = only_error(encode(spec, {"context": context, "candidates": [{"I1": 1}]}))
    assert (error.field, error.problem) == (field, problem)


def test_a_large_context_is_not_copied_per_candidate(spec):
    context = {"C1": "x" * 60, "C3": ["t1"] * 30}
    candidates = [{"I1": i} for i in range(1000)]
    limits = Limits(max_records=1000, max_candidates=1000, max_value_bytes=64, max_string_bytes=200)
    batch = encode(spec, {"context": context, "candidates": candidates}, limits=limits)
    assert not isinstance(batch.outcomes[0], RequestError)  # 120 bytes once, not 120 KB
    assert batch.sparse.shape == (1000, spec.num_sparse_columns)


# -- KServe v2 datatypes -------------------------------------------------------------------


def v2(name: str, datatype: object, data: list) -> dict:
    return {"inputs": [{"name": name, "shape": [len(data)], "datatype": datatype, "data": data}]}


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (v2("I1", "NOPE", [1]), "unknown KServe v2 datatype 'NOPE' (expected BYTES, INT64, FP32, ...)"),
        (v2("I1", 64, [1]), "expected a KServe v2 datatype, got a number"),
        (v2("I1", None, [1]), "expected a KServe v2 datatype, got null"),
        (v2("I1", "BYTES", [1]), "BYTES does not fit feature 'I1': expected a numeric datatype (INT64, INT32, FP32, FP64, ...)"),
        (v2("I2", "BOOL", [1.5]), "BOOL does not fit feature 'I2': expected a numeric datatype (INT64, INT32, FP32, FP64, ...)"),
        (v2("C1", "FP32", ["a0"]), "FP32 does not fit feature 'C1': expected BYTES (or an integer datatype for integer ids)"),
    ],
)
def test_kservev2_datatype_must_fit_the_feature(spec, body, problem):
    error = only_error(encode(spec, body))
    assert (error.field, error.problem) == ("inputs[0].datatype", problem)


@pytest.mark.parametrize(
    ("name", "datatype", "data"),
    [("I1", "INT64", [1]), ("I1", "INT32", [1]), ("I2", "FP32", [0.5]), ("I2", "FP64", [0.5]), ("I2", "FP16", [1]),
     ("C1", "BYTES", ["a0"]), ("C2", "INT64", [12345]), ("C3", "BYTES", [["t1", "t2"]])],
)
def test_kservev2_datatypes_that_fit(spec, name, datatype, data):
    batch = encode(spec, v2(name, datatype, data))
    assert not isinstance(batch.outcomes[0], RequestError)


# -- messages name JSON types, never Python types -------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        None, 3, "text", [1], True,
        {"instances": None}, {"instances": [None]}, {"instances": [3]}, {"instances": [[1]]},
        {"instances": [{"I1": None, "C1": {"a": 1}}]}, {"instances": [{"I1": [1]}]}, {"instances": [{"I1": True}]},
        {"instances": [{"C3": [None, {"x": 1}]}]}, {"instances": [{"C3": 1.5}]},
        {"candidates": [{}], "context": [1]}, {"candidates": [{}], "top_k": None}, {"candidates": [{}], "top_k": 1.5},
        {"candidates": None}, {"candidates": [1, 2]},
        {"inputs": None}, {"inputs": [None]}, {"inputs": [{"name": None, "shape": [1], "datatype": "BYTES", "data": [1]}]},
        {"inputs": [{"name": "C1", "shape": None, "datatype": "BYTES", "data": [1]}]},
        {"inputs": [{"name": "I1", "shape": [1], "datatype": "INT64", "data": [None, 1][1:] + [{}]}]},
    ],
)
def test_messages_name_json_types(spec, body):
    batch = encode(spec, body)
    error = only_error(batch)
    message = json.dumps(error.to_json())
    assert not PYTHON_TYPE_NAME.search(message), message


def test_json_type_names():
    assert [json_type(v) for v in (None, True, 1, 1.5, "s", [1], (1,), {"a": 1})] == [
        "null", "a boolean", "a number", "a number", "a string", "an array", "an array", "an object"
    ]
    assert json_type(object()) == "a value JSON cannot hold"


# -- one response per request -----------------------------------------------------------------


def test_every_body_gets_exactly_one_response(spec):
    bodies = [
        b"[" * 20_000, b"\xff", b"", None, {"a": 1}, {"instances": []}, "text", b'"{\\"I1\\": 1}"',
        {"I1": 1}, {"instances": [{"C1": "x" * 100}]}, {"inputs": [{"name": "C1"}]},
    ]
    batch = encode(spec, *bodies)
    responses = split_responses(batch, np.zeros(batch.num_records, np.float32))
    assert len(responses) == len(bodies)
    assert [status for status, _ in responses] == [400] * 8 + [200, 400, 400]
