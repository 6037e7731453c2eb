"""Property tests: whatever the bodies, the handler answers each request of a batch once, with 200 or 400.

The handler runs in-process over a tiny exported DLRM, inside TorchServe's own
Context, exactly as a worker calls it (``BaseHandler.handle``). Hypothesis
generates batches of several requests: arbitrary JSON values, bodies shaped
like the three request kinds with random features and values, and raw bytes
(JSON text, broken JSON text, Arrow IPC streams whole, cut or altered,
anything) sent as JSON or as Arrow IPC. Each batch must get one response
per request, each a JSON body with status 200 or 400, in bounded time.
Derandomized, so CI runs the same cases every time: 1,250 batches in all.
"""

from __future__ import annotations

import json
import math
import time
from datetime import timedelta
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ts.context import Context, RequestProcessor
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

from handlers.arrow_request import write_stream
from handlers.recommender_handler import RecommenderHandler
from handlers.request import ARROW_STREAM
from loadtest.torchserve import METRICS_CONFIG

FEATURES = ["I1", "I2", "C1", "C2", "C3"]  # the tiny exports' features (conftest sample_records)
BATCH_SECONDS = 5.0  # a small batch takes milliseconds; this only catches a stall
FUZZ = settings(
    derandomize=True,
    deadline=timedelta(seconds=BATCH_SECONDS),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
    database=None,
)


@pytest.fixture(scope="module")
def served(tiny_dlrm) -> tuple[RecommenderHandler, Context]:
    """A RecommenderHandler on the tiny DLRM's TorchScript artifact, with small limits so they are reached."""
    manifest = {"model": {"modelName": "tiny", "modelVersion": "1.0", "serializedFile": "model.ts.pt"}}
    metrics = MetricsCacheYamlImpl(config_file_path=str(METRICS_CONFIG))
    metrics.initialize_cache()
    metrics.model_name = "tiny"
    limits = {"max_records": 20, "max_candidates": 10, "max_value_bytes": 64, "max_string_bytes": 512, "max_depth": 6,
              "max_field_name_bytes": 16, "threads": 1}
    context = Context("tiny", str(tiny_dlrm.path), manifest, 8, None, "0.12.0", metrics=metrics,
                      model_yaml_config={"batchSize": 8, "handler": limits})
    handler = RecommenderHandler()
    handler.initialize(context)
    return handler, context


def run_batch(
    served: tuple[RecommenderHandler, Context], bodies: list[Any], content_types: list[str | None] | None = None
) -> list[tuple[int, Any]]:
    """One TorchServe batch; ``(status, JSON body)`` per request, after checking there is exactly one each.

    Without ``content_types``: decoded JSON comes with its Content-Type, bytes without (bodies TorchServe could not decode).
    """
    handler, context = served
    if content_types is None:
        content_types = [None if isinstance(body, (bytes, bytearray)) else "application/json" for body in bodies]
    context.request_processor = [
        RequestProcessor({} if kind is None else {"body": {"content-type": kind}}) for kind in content_types
    ]
    context.request_ids = {index: f"request-{index}" for index in range(len(bodies))}
    context.metrics.set_request_ids(context.request_ids)
    started = time.perf_counter()
    outputs = handler.handle([{"body": body} for body in bodies], context)
    elapsed = time.perf_counter() - started
    assert len(outputs) == len(bodies)
    assert elapsed < BATCH_SECONDS, f"{len(bodies)} requests took {elapsed:.2f}s"
    responses = []
    for index, output in enumerate(outputs):
        status = context.get_response_status(index)[0]
        responses.append((200 if status is None else status, json.loads(output)))
    return responses


def check_responses(responses: list[tuple[int, Any]]) -> None:
    for status, body in responses:
        assert status in (200, 400), body
        if status == 400:
            assert body["code"] == 400 and isinstance(body["field"], str) and isinstance(body["problem"], str)
            assert len(json.dumps(body)) < 2000  # an error body never grows with the client's text
            continue
        scores = body.get("predictions") or [item["score"] for item in body.get("ranking", [])] or body["outputs"][0]["data"]
        assert scores and all(0.0 <= score <= 1.0 and math.isfinite(score) for score in scores)


# -- strategies -----------------------------------------------------------------------


def texts(max_size: int = 12) -> st.SearchStrategy[str]:
    # Any code point, lone surrogates included (JSON's \ud800 escapes carry them), and NULs.
    return st.text(st.characters(min_codepoint=0, max_codepoint=0x10FFFF, exclude_categories=()), max_size=max_size)


SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    texts(),
    st.sampled_from(["c1_1", "c1_3", "t1", "t4|t2", "", "00ab", "x" * 65, "é" * 40, "\ud800", "a\x00b"]),
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(texts(6), children, max_size=4)),
    max_leaves=20,
)
FEATURE_NAMES = st.one_of(st.sampled_from(FEATURES), st.sampled_from(["I9", "C1_bucket", "k" * 40, ""]), texts(6))
FEATURE_VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=4), JSON_VALUES)
RECORDS = st.dictionaries(FEATURE_NAMES, FEATURE_VALUES, max_size=6)
GOOD_RECORDS = st.fixed_dictionaries(
    {},
    optional={
        "I1": st.integers(0, 60),
        "I2": st.floats(-5, 5),
        "C1": st.sampled_from(["c1_1", "c1_2", "unseen"]),
        "C2": st.text("0123456789abcdef", max_size=8),
        "C3": st.lists(st.sampled_from(["t1", "t2", "t3"]), max_size=3),
    },
)
ANY_RECORDS = st.one_of(GOOD_RECORDS, RECORDS, JSON_VALUES)
V2_INPUTS = st.fixed_dictionaries(
    {
        "name": st.one_of(st.sampled_from(FEATURES), texts(4), st.none()),
        "shape": st.one_of(st.lists(st.integers(-1, 4), max_size=2), JSON_VALUES),
        "datatype": st.one_of(st.sampled_from(["BYTES", "INT64", "FP32", "FP64", "BOOL", "NOPE"]), JSON_VALUES),
        "data": st.lists(FEATURE_VALUES, max_size=4),
    },
    optional={"parameters": JSON_VALUES, "extra": SCALARS},
)
REQUESTS = st.one_of(
    st.fixed_dictionaries({"instances": st.lists(ANY_RECORDS, max_size=25)}),
    st.fixed_dictionaries(
        {"candidates": st.lists(ANY_RECORDS, max_size=12)},
        optional={"context": st.one_of(GOOD_RECORDS, RECORDS, JSON_VALUES), "top_k": st.one_of(st.integers(-2, 15), SCALARS)},
    ),
    st.fixed_dictionaries({"inputs": st.lists(V2_INPUTS, max_size=3)}, optional={"id": JSON_VALUES, "outputs": JSON_VALUES}),
    RECORDS,
    GOOD_RECORDS,
)


def as_text(value: Any) -> bytes:
    return json.dumps(value, allow_nan=True).encode("utf-8", "surrogatepass")


RAW_BODIES = st.one_of(
    st.binary(max_size=64),
    REQUESTS.map(as_text),
    JSON_VALUES.map(as_text),
    st.tuples(REQUESTS.map(as_text), st.integers(0, 200)).map(lambda cut: cut[0][: cut[1]]),  # truncated
    st.integers(1, 3000).map(lambda depth: b'{"instances": ' + b"[" * depth + b"]" * depth + b"}"),
    st.sampled_from([b"NaN", b'{"I1": Infinity}', b'"{\\"I1\\": 1}"', b"\xef\xbb\xbf{}", b"1" * 5000, b"{" * 100]),
)


ARROW_COLUMNS = st.sampled_from(
    [
        pa.array([1, None, 3]),
        pa.array([0.5, float("nan"), float("inf")]),
        pa.array([1.5, None, -2.0], pa.float32()),
        pa.array(["c1_1", None, "x" * 70]),
        pa.array(["t1|t2", "", "é" * 40], pa.large_string()),
        pa.array([["t1", None], [], None]),
        pa.array([[1, 2], [3], []]),
        pa.array([[0.5], [], None]),
        pa.array([True, False, None]),
        pa.nulls(3),
        pa.array(["c1_1", "c1_2", "c1_1"]).dictionary_encode(),
        pa.array([{"a": 1}, None, {"a": 2}]),
    ]
)
ARROW_METADATA = st.dictionaries(
    st.sampled_from(["request", "top_k", "context", "pandas", "other"]),
    st.one_of(st.sampled_from(["rank", "score", "3", "0", "-1", "x", '{"I1": 2}', '{"C9": 1}', "[1]", '"s"', "{" * 20]), texts(8)),
    max_size=3,
)


def arrow_table(columns: list[tuple[str, pa.Array]], metadata: dict[str, str]) -> bytes:
    names = [name for name, _ in columns]
    table = pa.table([array for _, array in columns], names=names) if columns else pa.table({"I1": pa.array([], pa.int64())})
    return write_stream(table.replace_schema_metadata({k.encode("utf-8", "surrogatepass"): v.encode("utf-8", "surrogatepass") for k, v in metadata.items()}))


ARROW_BODIES = st.builds(arrow_table, st.lists(st.tuples(FEATURE_NAMES, ARROW_COLUMNS), max_size=4), ARROW_METADATA)
GOOD_ARROW_BODIES = st.lists(GOOD_RECORDS, min_size=1, max_size=20).map(
    lambda records: write_stream(pa.Table.from_pylist(records)) if any(records) else write_stream(pa.table({"I1": [1] * len(records)}))
)


def altered(body: bytes, cut: int, flips: list[tuple[int, int]]) -> bytes:
    """``body`` cut short and with some bytes changed: what a broken client or proxy may send."""
    data = bytearray(body[: max(1, len(body) - cut)])
    for position, value in flips:
        data[position % len(data)] = value
    return bytes(data)


ANY_ARROW_BODIES = st.one_of(
    ARROW_BODIES,
    GOOD_ARROW_BODIES,
    st.builds(altered, st.one_of(ARROW_BODIES, GOOD_ARROW_BODIES), st.integers(0, 40), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=3)),
)


# -- properties -----------------------------------------------------------------------


@settings(FUZZ, max_examples=250)
@given(st.lists(JSON_VALUES, min_size=1, max_size=6))
def test_any_json_values(served, bodies):
    check_responses(run_batch(served, bodies))


@settings(FUZZ, max_examples=350)
@given(st.lists(st.one_of(REQUESTS, GOOD_RECORDS), min_size=1, max_size=6))
def test_request_shaped_bodies(served, bodies):
    check_responses(run_batch(served, bodies))


@settings(FUZZ, max_examples=300)
@given(st.lists(RAW_BODIES, min_size=1, max_size=6))
def test_raw_bytes(served, bodies):
    check_responses(run_batch(served, bodies))


@settings(FUZZ, max_examples=150)
@given(st.lists(GOOD_RECORDS, min_size=1, max_size=4), st.lists(st.one_of(REQUESTS, RAW_BODIES, JSON_VALUES), min_size=1, max_size=4))
def test_good_requests_succeed_beside_any_others(served, tiny_dlrm, good, others):
    bodies: list[Any] = [{"instances": [record]} for record in good] + others
    responses = run_batch(served, bodies)
    check_responses(responses)
    assert [status for status, _ in responses[: len(good)]] == [200] * len(good)
    served_scores = [body["predictions"][0] for _, body in responses[: len(good)]]
    assert served_scores == pytest.approx(tiny_dlrm.eager_scores(good), abs=1e-5)


@settings(FUZZ, max_examples=200)
@given(st.lists(st.tuples(st.one_of(RAW_BODIES, ANY_ARROW_BODIES), st.sampled_from(["application/json", ARROW_STREAM, None])), min_size=1, max_size=6))
def test_raw_bytes_under_either_content_type(served, requests):
    check_responses(run_batch(served, [body for body, _ in requests], [kind for _, kind in requests]))
