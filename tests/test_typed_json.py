"""Large ``{"instances": [...]}`` and ranking bodies decoded against the FeatureSpec's types (msgspec).

The typed decoder is only a faster way to the same values: whatever body it
reads encodes to the tensors the orjson path gives, and every body it refuses
gets the answer the orjson path gives (the same tensors or the same 400).
Each case below is compared with ``encode_batch(..., typed_json=False)``.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from featurespec import FeatureSpec
from handlers.request import TYPED_JSON_MIN_BYTES, EncodedBatch, Limits, RequestError, encode_batch, typed_request

pytest.importorskip("msgspec")

LIMITS = Limits(max_records=2_000, max_value_bytes=64, max_string_bytes=1_000_000, max_depth=6)
RECORDS = 1_500  # about 90 KB of JSON: above TYPED_JSON_MIN_BYTES
RAW = "@raw@"  # a value replaced by raw JSON text after json.dumps


@pytest.fixture(scope="module")
def spec(mixed_spec: FeatureSpec) -> FeatureSpec:
    return mixed_spec  # I1, I2 dense; C1 vocabulary, C2 hashed, C3 multi-valued


def records(seed: int = 0) -> list[dict[str, Any]]:
    """Records with every kind of value the FeatureSpec takes: numbers, integers as ids, null,
    absent keys, text lists and separator-joined text, non-ASCII text."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(RECORDS):
        record: dict[str, Any] = {
            "I1": [int(rng.integers(-50, 100)), float(rng.normal() * 1e3), None, 2**53 + 1][i % 4],
            "I2": float(rng.normal()) if i % 5 else None,
            "C1": [f"a{i % 7}", i % 9, None, "é"][i % 4],
            "C2": f"h{rng.integers(0, 10**6)}" if i % 3 else int(rng.integers(-(2**62), 2**62)),
            "C3": [["t1", "t2"], "t0|t3", [3, "t1", "x"], [], None][i % 5],
        }
        for name in [name for k, name in enumerate(record) if (i + k) % 11 == 0]:
            del record[name]  # absent: missing, as null is
        out.append(dict(reversed(record.items())) if i % 2 else record)
    return out


def body_of(items: list[dict[str, Any]], *, raw: str | None = None) -> bytes:
    text = json.dumps({"instances": items}, ensure_ascii=False, separators=(", ", ": ") if raw is None else None)
    if raw is not None:
        text = text.replace(json.dumps(RAW), raw, 1)
    return text.encode("utf-8")


def both_paths(spec: FeatureSpec, body: bytes, limits: Limits = LIMITS) -> tuple[EncodedBatch, EncodedBatch]:
    items = [{"body": body}]
    return encode_batch(spec, items, limits=limits), encode_batch(spec, items, limits=limits, typed_json=False)


def assert_same(typed: EncodedBatch, plain: EncodedBatch) -> None:
    (typed_outcome,), (plain_outcome,) = typed.outcomes, plain.outcomes
    if isinstance(plain_outcome, RequestError):
        assert isinstance(typed_outcome, RequestError), "the typed path took a body the orjson path refuses"
        assert typed_outcome.to_json() == plain_outcome.to_json()
        return
    assert not isinstance(typed_outcome, RequestError), typed_outcome.to_json()
    assert (typed_outcome.kind, typed_outcome.top_k) == (plain_outcome.kind, plain_outcome.top_k)
    assert typed.bounds == plain.bounds
    np.testing.assert_array_equal(typed.dense, plain.dense)
    np.testing.assert_array_equal(typed.sparse, plain.sparse)
    # Bit for bit, signed zeros included.
    assert typed.dense.tobytes() == plain.dense.tobytes()


@pytest.mark.parametrize("seed", [0, 1])
def test_a_large_body_is_decoded_typed_into_the_same_tensors(spec, seed):
    body = body_of(records(seed))
    assert len(body) >= TYPED_JSON_MIN_BYTES
    parsed = typed_request(spec, {"body": body}, LIMITS)
    assert parsed is not None and parsed.columns is not None and parsed.num_records == RECORDS
    assert_same(*both_paths(spec, body))


def test_a_small_body_takes_the_usual_path(spec):
    body = body_of(records()[:3])
    assert len(body) < TYPED_JSON_MIN_BYTES
    assert typed_request(spec, {"body": body}, LIMITS) is None


def test_duplicate_keys_keep_the_last_value_on_both_paths(spec):
    body = body_of(records())
    doubled = body.replace(b'"I2": ', b'"I2": 12345.5, "I2": ', 7)
    assert typed_request(spec, {"body": doubled}, LIMITS) is not None
    assert_same(*both_paths(spec, doubled))


@pytest.mark.parametrize(
    "raw, field",
    [
        ("NaN", "I2"),  # not JSON
        ("Infinity", "I1"),
        ("1e400", "I1"),  # beyond the float range
        ("true", "I2"),  # a boolean is not a number
        ("1.5", "C1"),  # a float is not an id
        (str(2**70), "C2"),  # beyond 64 bits: orjson reads a float
        (str(2**63 + 5), "C2"),  # within orjson's unsigned integers: an id
        (str(2**70), "I1"),
        ("-0", "I1"),
        ("-0.0", "I2"),
        ('"' + "x" * 65 + '"', "C1"),  # above max_value_bytes
        ('"\\ud800"', "C2"),  # an unpaired surrogate
        ('"caf\\u00e9 \\"quoted\\""', "C2"),  # escapes
        ("[[[[[1]]]]]", "C3"),  # deeper than max_depth
        ('[["t1"]]', "C3"),  # a list of lists
        ('{"a": 1}', "C1"),
        ("[]", "I1"),
        ('"12"', "I1"),  # a number as text
    ],
)
def test_values_the_typed_decoder_refuses_get_the_usual_answer(spec, raw, field):
    items = records()
    items[5] = {**items[5], field: RAW}
    assert_same(*both_paths(spec, body_of(items, raw=raw)))


@pytest.mark.parametrize(
    "mutate",
    [
        lambda items: [*items[:4], {"I1": 1, "unknown": 2}, *items[4:]],  # an unknown feature
        lambda items: [*items[:4], 7, *items[4:]],  # a record that is not an object
        lambda items: items * 2,  # more records than max_records
    ],
)
def test_records_the_typed_decoder_refuses_get_the_usual_answer(spec, mutate):
    assert_same(*both_paths(spec, body_of(mutate(records()))))


@pytest.mark.parametrize(
    "body",
    [
        b'{"instances": []}' + b" " * TYPED_JSON_MIN_BYTES,  # no records
        b'{"instances": [{"I1": 1}], "extra": 1}' + b" " * TYPED_JSON_MIN_BYTES,
        b'{"instances": [{"C1": "\xff"}]}' + b" " * TYPED_JSON_MIN_BYTES,  # not UTF-8
        body_of(records())[:-10],  # cut short
        body_of(records()).replace(b"{", b"[", 1),
    ],
)
def test_bodies_the_typed_decoder_refuses_get_the_usual_answer(spec, body):
    typed, plain = both_paths(spec, body)
    assert isinstance(plain.outcomes[0], RequestError)
    assert_same(typed, plain)


def test_a_bad_request_fails_alone_beside_typed_ones(spec):
    good, bad = body_of(records()), body_of([*records(), {"I1": "x"}])
    batch = encode_batch(spec, [{"body": good}, {"body": bad}, {"body": good}], limits=LIMITS)
    assert [isinstance(outcome, RequestError) for outcome in batch.outcomes] == [False, True, False]
    assert batch.outcomes[1].to_json()["message"].startswith(f"instances[{RECORDS}].I1")
    alone = encode_batch(spec, [{"body": good}], limits=LIMITS)
    np.testing.assert_array_equal(batch.dense[:RECORDS], alone.dense)
    np.testing.assert_array_equal(batch.dense[RECORDS:], alone.dense)


def test_a_low_depth_limit_leaves_bodies_to_the_usual_path(spec):
    assert typed_request(spec, {"body": body_of(records())}, Limits(max_records=2_000, max_depth=3)) is None


# -- ranking bodies ---------------------------------------------------------

CONTEXT = {"I1": 7, "C1": "a3", "C3": ["t2"]}


def ranking_body(context: Any = CONTEXT, *, top_k: Any = RAW, raw: str = "5", extra: str = "") -> bytes:
    """Candidates that set, null or lack each context feature (absent: the context's value)."""
    candidates = records()[:1_000]
    payload: dict[str, Any] = {"candidates": candidates}
    if context is not None:
        payload["context"] = context
    if top_k is not None:
        payload["top_k"] = top_k
    text = json.dumps(payload, ensure_ascii=False).replace(json.dumps(RAW), raw, 1)
    return (text[:-1] + extra + "}").encode("utf-8")


def test_a_large_ranking_body_is_decoded_typed_into_the_same_tensors(spec):
    body = ranking_body()
    parsed = typed_request(spec, {"body": body}, LIMITS)
    assert parsed is not None and parsed.kind == "rank" and parsed.top_k == 5 and parsed.context == CONTEXT
    lacking = {name: len(rows) for name, rows in parsed.context_rows.items()}
    assert set(lacking) == set(CONTEXT) and all(0 < count < 1_000 for count in lacking.values())
    typed, plain = both_paths(spec, body)
    assert_same(typed, plain)
    # The context's value reached the rows that lack the feature, and only those.
    with_context = encode_batch(spec, [{"body": body}], limits=LIMITS)
    without = encode_batch(spec, [{"body": ranking_body(context={})}], limits=LIMITS)
    changed = np.flatnonzero((with_context.sparse != without.sparse).any(axis=1) | (with_context.dense != without.dense).any(axis=1))
    assert set(changed) <= set(np.concatenate(list(parsed.context_rows.values())).tolist())


@pytest.mark.parametrize(
    "context, top_k, raw",
    [
        (None, None, ""),  # no context, no top_k
        ({}, 2_000, ""),  # top_k above the candidates
        ({"I2": None, "C2": 17}, 1, ""),  # null and integer id in the context
        (CONTEXT, RAW, "0"),
        (CONTEXT, RAW, "-3"),
        (CONTEXT, RAW, "true"),
        (CONTEXT, RAW, "3.0"),
        (CONTEXT, RAW, "null"),
        (CONTEXT, RAW, '"3"'),
        (CONTEXT, RAW, str(2**70)),
        ({"I1": "seven"}, 3, ""),  # a wrong type in the context
        ({"unknown": 1}, 3, ""),  # an unknown feature in the context
        ({"C1": "x" * 65}, 3, ""),  # above max_value_bytes
        ({"C2": "y" * 65, "C1": "x" * 65}, 3, ""),  # two problems: the same one named first
        ([1, 2], 3, ""),  # a context that is not an object
    ],
)
def test_ranking_bodies_get_the_usual_answer(spec, context, top_k, raw):
    assert_same(*both_paths(spec, ranking_body(context, top_k=top_k, raw=raw)))


@pytest.mark.parametrize(
    "extra, limits",
    [
        (', "instances": []', LIMITS),  # a key beside a ranking request
        (', "extra": 1', LIMITS),
        ("", Limits(max_records=2_000, max_candidates=999, max_depth=6)),  # more candidates than allowed
        ("", Limits(max_records=999, max_depth=6)),
    ],
)
def test_ranking_bodies_the_typed_decoder_refuses_get_the_usual_answer(spec, extra, limits):
    typed, plain = both_paths(spec, ranking_body(extra=extra), limits)
    assert isinstance(plain.outcomes[0], RequestError)
    assert_same(typed, plain)


def test_a_bad_candidate_gets_the_usual_400(spec):
    candidates = records()[:1_000]
    candidates[17] = {**candidates[17], "C3": [["nested"]]}
    body = json.dumps({"context": CONTEXT, "candidates": candidates}).encode()
    typed, plain = both_paths(spec, body)
    assert isinstance(plain.outcomes[0], RequestError)
    assert_same(typed, plain)
