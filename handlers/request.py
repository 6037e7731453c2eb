"""The HTTP contract of the recommender handlers, as pure functions.

Nothing here touches TorchServe or torch, so every rule is unit-tested
without a server. One request body becomes a :class:`ParsedRequest`; the
handler encodes the records of every request in a TorchServe batch, runs one
forward pass, and gives each request its slice of the scores back through
:func:`build_response`.

Request shapes (one JSON object per HTTP request):

* ``{"instances": [record, ...]}`` or one bare record object
  -> ``{"predictions": [p, ...]}``, one per record, same order.
* ``{"context": {...}, "candidates": [record, ...], "top_k": K}``
  -> ``{"ranking": [{"index": i, "score": p}, ...]}``, best first; the
  context's features are shared by every candidate, a candidate's own value
  wins; ``top_k`` defaults to all candidates.
* KServe v2 (``POST /v2/models/{name}/infer``): ``{"id": ..., "inputs":
  [{"name": FEATURE, "shape": [N], "datatype": ..., "data": [...]}, ...]}``,
  one input tensor per feature column -> ``{"id", "model_name",
  "model_version", "outputs": [{"name": "probability", "shape": [N],
  "datatype": "FP32", "data": [...]}]}``.

Every problem is a :class:`RequestError` (HTTP 400) naming the field.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from featurespec import FeatureError, FeatureSpec, json_type

RequestKind = Literal["score", "rank", "kservev2"]

_RANK_KEYS = frozenset({"context", "candidates", "top_k"})
_V2_KEYS = frozenset({"id", "inputs", "outputs", "parameters"})
_V2_INPUT_KEYS = frozenset({"name", "shape", "datatype", "data", "parameters"})


class RequestError(ValueError):
    """A request that must be answered with a 400; ``field`` names what is wrong."""

    status = 400

    def __init__(self, field_name: str, problem: str, *, record: int | None = None):
        self.field = field_name
        self.problem = problem
        self.record = record  # index in instances/candidates; the field names it too
        super().__init__(f"{field_name}: {problem}")

    @classmethod
    def from_feature_error(cls, error: FeatureError, *, records_field: str) -> RequestError:
        """Wrap the FeatureSpec's error, naming the record's field in the request."""
        field_name = error.field if error.record is None else f"{records_field}[{error.record}].{error.field}"
        return cls(field_name, error.problem, record=error.record)

    def to_json(self) -> dict[str, Any]:
        # The shape of TorchServe's own error bodies, plus the field and problem.
        body: dict[str, Any] = {
            "code": self.status,
            "type": "BadRequest",
            "message": str(self),
            "field": self.field,
            "problem": self.problem,
        }
        if self.record is not None:
            body["record"] = self.record
        return body


@dataclass(frozen=True)
class Limits:
    """Per-request limits, read from the ``handler:`` section of ``model-config.yaml``."""

    max_records: int = 1000

    def __post_init__(self) -> None:
        if isinstance(self.max_records, bool) or not isinstance(self.max_records, int) or self.max_records < 1:
            raise ValueError(f"handler.max_records must be an integer >= 1, got {self.max_records!r}")

    @classmethod
    def from_handler_config(cls, section: Mapping[str, Any] | None) -> Limits:
        section = section or {}
        return cls(max_records=section.get("max_records", cls.max_records))


@dataclass(frozen=True)
class ParsedRequest:
    """One request, validated as far as possible without the FeatureSpec."""

    kind: RequestKind
    records: Sequence[Mapping[str, Any]] = ()
    context: Mapping[str, Any] | None = None
    top_k: int | None = None
    request_id: str | None = None  # KServe v2 "id", echoed back
    # KServe v2: one array of values per feature, kept as columns (never
    # turned into one dict per record, which is most of what records cost).
    columns: Mapping[str, list[Any]] | None = None

    @property
    def num_records(self) -> int:
        if self.columns is not None:
            return len(next(iter(self.columns.values())))
        return len(self.records)

    @property
    def records_field(self) -> str:
        return {"score": "instances", "rank": "candidates", "kservev2": "inputs"}[self.kind]


# --------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------


def _reject_constant(name: str) -> float:
    raise RequestError("body", f"not valid JSON: {name} is not a JSON number")


def decode_body(item: Mapping[str, Any] | Any) -> Any:
    """One entry of TorchServe's ``data`` list -> the JSON value of the body.

    TorchServe already decodes ``application/json`` bodies (with Python's
    ``json``, which accepts NaN: the FeatureSpec rejects those later) and
    forwards bodies it cannot decode as bytes; those are parsed here with
    NaN and Infinity refused.
    """
    if isinstance(item, Mapping) and item and "data" not in item and "body" not in item:
        # A form post: TorchServe split the body into named form fields.
        raise RequestError("body", "expected a JSON request body (send it with Content-Type: application/json)")
    body = item.get("data", item.get("body")) if isinstance(item, Mapping) else item
    if body is None:
        raise RequestError("body", "empty request")
    if isinstance(body, (bytes, bytearray)):
        try:
            body = bytes(body).decode("utf-8")
        except UnicodeDecodeError as error:
            raise RequestError("body", f"not valid UTF-8 at byte {error.start}") from None
    if isinstance(body, str):
        if not body.strip():
            raise RequestError("body", "empty request")
        try:
            body = json.loads(body, parse_constant=_reject_constant)
        except json.JSONDecodeError as error:
            raise RequestError("body", f"not valid JSON: {error.msg} (line {error.lineno}, column {error.colno})") from None
    return body


def parse_request(body: Any, *, limits: Limits) -> ParsedRequest:
    """A decoded JSON body -> :class:`ParsedRequest`, or :class:`RequestError`."""
    if not isinstance(body, Mapping):
        raise RequestError("body", f"expected a JSON object, got {json_type(body)}")
    if not body:
        raise RequestError("body", "empty request")
    if "instances" in body:
        extra = sorted(set(body) - {"instances"})
        if extra:
            raise RequestError(extra[0], "unexpected key beside 'instances'")
        records = _record_list(body["instances"], "instances", limits)
        return ParsedRequest("score", records)
    if "candidates" in body:
        return _parse_ranking(body, limits)
    if "inputs" in body:
        return _parse_kservev2(body, limits)
    return ParsedRequest("score", [body])


def _record_list(value: Any, field_name: str, limits: Limits) -> list[Any]:
    if not isinstance(value, list):
        raise RequestError(field_name, f"expected an array of records, got {json_type(value)}")
    if not value:
        raise RequestError(field_name, "empty request: no records")
    if len(value) > limits.max_records:
        raise RequestError(field_name, f"{len(value)} records exceed the limit of {limits.max_records} per request")
    return value


def _parse_ranking(body: Mapping[str, Any], limits: Limits) -> ParsedRequest:
    extra = sorted(set(body) - _RANK_KEYS)
    if extra:
        raise RequestError(extra[0], "unexpected key in a ranking request (expected context, candidates, top_k)")
    candidates = _record_list(body["candidates"], "candidates", limits)
    context = body.get("context")
    if context is not None and not isinstance(context, Mapping):
        raise RequestError("context", f"expected a JSON object, got {json_type(context)}")
    top_k = body.get("top_k", len(candidates))
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise RequestError("top_k", f"expected a positive integer, got {json_type(top_k)}")
    if top_k < 1:
        raise RequestError("top_k", f"must be >= 1, got {top_k}")
    return ParsedRequest("rank", candidates, context=context, top_k=min(top_k, len(candidates)))


def _parse_kservev2(body: Mapping[str, Any], limits: Limits) -> ParsedRequest:
    extra = sorted(set(body) - _V2_KEYS)
    if extra:
        raise RequestError(extra[0], "unexpected key in a KServe v2 request")
    inputs = body["inputs"]
    if not isinstance(inputs, list) or not inputs:
        raise RequestError("inputs", "expected a non-empty array of input tensors, one per feature")
    columns: dict[str, list[Any]] = {}
    rows: int | None = None
    for position, tensor in enumerate(inputs):
        where = f"inputs[{position}]"
        if not isinstance(tensor, Mapping):
            raise RequestError(where, f"expected a tensor object, got {json_type(tensor)}")
        missing = sorted({"name", "shape", "datatype", "data"} - set(tensor))
        if missing:
            raise RequestError(where, f"missing key {missing[0]!r}")
        extra = sorted(set(tensor) - _V2_INPUT_KEYS)
        if extra:
            raise RequestError(f"{where}.{extra[0]}", "unexpected key in a KServe v2 input")
        name, shape, data = tensor["name"], tensor["shape"], tensor["data"]
        if not isinstance(name, str) or not name:
            raise RequestError(f"{where}.name", "expected a feature name")
        if name in columns:
            raise RequestError(f"{where}.name", f"feature {name!r} given twice")
        if not (isinstance(shape, list) and len(shape) == 1 and isinstance(shape[0], int) and not isinstance(shape[0], bool)):
            raise RequestError(f"{where}.shape", f"expected [N] (one value per record), got {shape!r}")
        if not isinstance(data, list) or len(data) != shape[0]:
            raise RequestError(f"{where}.data", f"expected a flat array of {shape[0]} values to match shape {shape}")
        if rows is not None and shape[0] != rows:
            raise RequestError(f"{where}.shape", f"{shape[0]} values, but earlier inputs have {rows}")
        rows = shape[0]
        columns[name] = data
    if not rows:
        raise RequestError("inputs", "empty request: no records")
    if rows > limits.max_records:
        raise RequestError("inputs", f"{rows} records exceed the limit of {limits.max_records} per request")
    request_id = body.get("id")
    return ParsedRequest("kservev2", columns=columns, request_id=request_id if isinstance(request_id, str) else None)


# --------------------------------------------------------------------------
# Encoding a batch and splitting it back
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class EncodedBatch:
    """All records of all valid requests of a TorchServe batch, stacked.

    ``outcomes[i]`` is request i's :class:`ParsedRequest` or its
    :class:`RequestError`; ``bounds[i]`` its ``(start, end)`` rows in the
    stacked tensors (empty for a failed request).
    """

    dense: np.ndarray  # float32[B, D]
    sparse: np.ndarray  # int64[B, S]
    outcomes: list[ParsedRequest | RequestError]
    bounds: list[tuple[int, int]]

    @property
    def num_records(self) -> int:
        return int(self.dense.shape[0])


def encode_batch(spec: FeatureSpec, bodies: Sequence[Any], *, limits: Limits) -> EncodedBatch:
    """Decode, validate and encode every request; a bad one fails alone.

    ``bodies`` are TorchServe's ``data`` entries.

    The records of all record requests are encoded in one ``encode_records``
    call: its cost is mostly per call (a few numpy operations per feature),
    so 32 single-record requests encoded one by one cost about 20 times what
    they cost together. KServe v2 requests are encoded from their columns,
    one call each, and their rows follow the records'. Only when a call finds
    a problem are the requests encoded one by one, so the bad one gets its
    own 400 naming the field.
    """
    outcomes: list[ParsedRequest | RequestError] = []
    for item in bodies:
        try:
            outcomes.append(parse_request(decode_body(item), limits=limits))
        except RequestError as error:
            outcomes.append(error)
    bounds = [(0, 0)] * len(outcomes)
    dense_parts: list[np.ndarray] = []
    sparse_parts: list[np.ndarray] = []
    rows = 0
    try:
        records: list[Any] = []
        for index, outcome in enumerate(outcomes):
            if isinstance(outcome, ParsedRequest) and outcome.columns is None:
                records.extend(_with_context(outcome) if outcome.context else outcome.records)
                bounds[index] = (rows, len(records))
                rows = len(records)
        if records:
            _append(spec.encode_records(records), dense_parts, sparse_parts)
        for index, outcome in enumerate(outcomes):
            if isinstance(outcome, ParsedRequest) and outcome.columns is not None:
                bounds[index] = (rows, rows + outcome.num_records)
                rows += outcome.num_records
                _append(_encode_request(spec, outcome), dense_parts, sparse_parts)
    except FeatureError:
        return _encode_one_by_one(spec, outcomes)
    return EncodedBatch(*_stack(spec, dense_parts, sparse_parts), outcomes, bounds)


def _with_context(request: ParsedRequest) -> list[Any]:
    """A ranking request's candidates with the shared context merged in (a candidate's own value wins).

    Anything that is not a JSON object is left for ``encode_records`` to reject.
    """
    context = request.context
    return [{**context, **record} if type(record) is dict else record for record in request.records]


def _encode_request(spec: FeatureSpec, request: ParsedRequest) -> tuple[np.ndarray, np.ndarray]:
    if request.columns is not None:
        return spec.encode_json_columns(request.columns, num_rows=request.num_records)
    return spec.encode_records(request.records, base=request.context)


def _encode_one_by_one(spec: FeatureSpec, outcomes: list[ParsedRequest | RequestError]) -> EncodedBatch:
    """The slow path after a failed batch encode: each request alone, errors mapped to their request."""
    bounds: list[tuple[int, int]] = []
    dense_parts: list[np.ndarray] = []
    sparse_parts: list[np.ndarray] = []
    rows = 0
    for index, outcome in enumerate(outcomes):
        if isinstance(outcome, ParsedRequest):
            try:
                size = _append(_encode_request(spec, outcome), dense_parts, sparse_parts)
            except FeatureError as error:
                outcomes[index] = RequestError.from_feature_error(error, records_field=outcome.records_field)
            else:
                bounds.append((rows, rows + size))
                rows += size
                continue
        bounds.append((rows, rows))
    return EncodedBatch(*_stack(spec, dense_parts, sparse_parts), outcomes, bounds)


def _append(encoded: tuple[np.ndarray, np.ndarray], dense_parts: list[np.ndarray], sparse_parts: list[np.ndarray]) -> int:
    dense, sparse = encoded
    dense_parts.append(dense)
    sparse_parts.append(sparse)
    return len(dense)


def _stack(spec: FeatureSpec, dense_parts: list[np.ndarray], sparse_parts: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The parts stacked; a lone part (the usual case) is returned as it is, not copied."""
    if not dense_parts:
        return np.zeros((0, spec.num_dense), np.float32), np.zeros((0, spec.num_sparse_columns), np.int64)
    if len(dense_parts) == 1:
        return dense_parts[0], sparse_parts[0]
    return np.concatenate(dense_parts), np.concatenate(sparse_parts)


def rank(scores: np.ndarray, top_k: int) -> list[dict[str, Any]]:
    """Indices of the ``top_k`` best scores, best first; ties keep request order."""
    order = np.argsort(-scores, kind="stable")[:top_k]
    return [{"index": int(i), "score": float(scores[i])} for i in order]


def build_response(
    parsed: ParsedRequest, scores: np.ndarray, *, model_name: str = "", model_version: str = ""
) -> dict[str, Any]:
    """One request's scores (float32[N], its slice of the batch) -> its JSON body."""
    if parsed.kind == "rank":
        return {"ranking": rank(scores, parsed.top_k or len(scores))}
    if parsed.kind == "kservev2":
        response: dict[str, Any] = {
            "model_name": model_name,
            "model_version": model_version,
            "outputs": [
                {"name": "probability", "shape": [len(scores)], "datatype": "FP32", "data": scores.tolist()}
            ],
        }
        if parsed.request_id is not None:
            response = {"id": parsed.request_id, **response}
        return response
    return {"predictions": scores.tolist()}


def split_responses(
    batch: EncodedBatch, scores: np.ndarray, *, model_name: str = "", model_version: str = ""
) -> list[tuple[int, dict[str, Any]]]:
    """Scores of the whole batch -> one ``(status, body)`` per request, in order."""
    if len(scores) != batch.num_records:
        raise ValueError(f"the model returned {len(scores)} scores for {batch.num_records} records")
    responses = []
    for outcome, (start, end) in zip(batch.outcomes, batch.bounds):
        if isinstance(outcome, RequestError):
            responses.append((outcome.status, outcome.to_json()))
        else:
            body = build_response(outcome, scores[start:end], model_name=model_name, model_version=model_version)
            responses.append((200, body))
    return responses
