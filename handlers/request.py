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
  wins; ``top_k`` defaults to all candidates. The context is encoded once
  and its encoded columns copied into the candidates that lack the feature.
* An Apache Arrow IPC stream (``Content-Type:
  application/vnd.apache.arrow.stream``), one column per feature: scored
  or ranked row by row, see :mod:`handlers.arrow_request`.
* KServe v2 (``POST /v2/models/{name}/infer``): ``{"id": ..., "inputs":
  [{"name": FEATURE, "shape": [N], "datatype": ..., "data": [...]}, ...]}``,
  one input tensor per feature column (``BYTES`` or an integer datatype for
  a categorical feature, a numeric datatype for a dense one) -> ``{"id",
  "model_name", "model_version", "outputs": [{"name": "probability",
  "shape": [N], "datatype": "FP32", "data": [...]}]}``.

JSON text arriving as bytes (TorchServe's ``decode_input_request=false``,
or a body its own parser gave up on) is parsed with orjson where it is
installed, else with the standard library; bodies TorchServe already decoded
are taken as they are. A large ``{"instances": [...]}`` body is first
decoded with msgspec against the FeatureSpec's types, where msgspec is
installed (:func:`typed_request`), straight into one list per feature;
so is a large ranking body.
A response is JSON, or Arrow IPC for a score or rank request whose
``Accept`` header prefers
``application/vnd.apache.arrow.stream`` (:func:`write_responses`).

Every problem with one request is a :class:`RequestError` (HTTP 400) naming
the field, whatever raised it, so one request never fails the others of its
batch. Every request's cost is bounded by :class:`Limits`, checked before the
work they bound: nesting depth before JSON text is parsed, record counts
before encoding, text sizes before any text is hashed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Container, Mapping, Sequence
from dataclasses import dataclass, field, fields
from itertools import chain
from typing import Annotated, Any, Literal, TypeVar, Union

import numpy as np

try:  # a fast parser where the host has it; the standard library's otherwise
    import orjson
except ImportError:  # pragma: no cover - exercised on hosts without orjson
    orjson = None
try:  # large scoring requests decoded against the FeatureSpec's types, where the host has msgspec
    import msgspec
except ImportError:  # pragma: no cover - exercised on hosts without msgspec
    msgspec = None

from featurespec import FeatureError, FeatureSpec, TextLimits, json_type, short_text

logger = logging.getLogger(__name__)

RequestKind = Literal["score", "rank", "kservev2"]

_RANK_KEYS = frozenset({"context", "candidates", "top_k"})
_V2_KEYS = frozenset({"id", "inputs", "outputs", "parameters"})
_V2_INPUT_KEYS = frozenset({"name", "shape", "datatype", "data", "parameters"})
V2_INTEGER_DATATYPES = frozenset({"INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"})
V2_NUMERIC_DATATYPES = V2_INTEGER_DATATYPES | {"FP16", "FP32", "FP64"}
V2_CATEGORICAL_DATATYPES = V2_INTEGER_DATATYPES | {"BYTES"}  # text, or integer ids
V2_DATATYPES = V2_NUMERIC_DATATYPES | {"BOOL", "BYTES"}
_MAX_FIELD_CHARS = 200  # an error body quotes at most this much of a field path
_MAX_PROBLEM_CHARS = 400


class RequestError(ValueError):
    """A request that must be answered with a 400; ``field`` names what is wrong.

    Both ``field`` and ``problem`` are cut to a short prefix: an error body
    never grows with the client's text.
    """

    status = 400
    reason = "Bad Request"
    error_type = "BadRequest"

    def __init__(self, field_name: str, problem: str, *, record: int | None = None):
        self.field = short_text(field_name, limit=_MAX_FIELD_CHARS)
        self.problem = short_text(problem, limit=_MAX_PROBLEM_CHARS)
        self.record = record  # index in instances/candidates; the field names it too
        super().__init__(f"{self.field}: {self.problem}")

    @classmethod
    def from_feature_error(cls, error: FeatureError, *, records_field: str, limits: Limits | None = None) -> RequestError:
        """Wrap the FeatureSpec's error, naming the record's field in the request.

        A feature name above ``limits.max_field_name_bytes`` (only an unknown
        feature's can be) is reported as that limit's breach.
        """
        name, problem = str(error.field), error.problem
        too_long = _name_too_long(name, limits or Limits())
        if too_long:
            problem = too_long
        if not name:  # the records together
            field_name = records_field
        elif error.record is None:
            field_name = short_text(name)
        else:
            field_name = f"{records_field}[{error.record}].{short_text(name)}"
        return cls(field_name, problem, record=error.record)

    def to_json(self) -> dict[str, Any]:
        # The shape of TorchServe's own error bodies, plus the field and problem.
        body: dict[str, Any] = {
            "code": self.status,
            "type": self.error_type,
            "message": str(self),
            "field": self.field,
            "problem": self.problem,
        }
        if self.record is not None:
            body["record"] = self.record
        return body


class UnsupportedMediaType(RequestError):
    """A body in a format this server cannot read (Arrow IPC without pyarrow installed): HTTP 415."""

    status = 415
    reason = "Unsupported Media Type"
    error_type = "UnsupportedMediaType"


class HandlerSettings:
    """Integer settings (each >= 1) of the ``handler:`` section of ``model-config.yaml``, as the fields of a
    frozen dataclass that derives from this class."""

    def __post_init__(self) -> None:
        for name in (item.name for item in fields(self)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"handler.{name} must be an integer >= 1, got {value!r}")

    @classmethod
    def from_handler_config(cls: type[SettingsT], section: Mapping[str, Any] | None) -> SettingsT:
        """The settings the section sets; the defaults for the others (keys of other settings are left alone)."""
        section = section or {}
        return cls(**{item.name: section[item.name] for item in fields(cls) if item.name in section})


SettingsT = TypeVar("SettingsT", bound=HandlerSettings)


@dataclass(frozen=True)
class Limits(HandlerSettings):
    """Per-request limits, read from the ``handler:`` section of ``model-config.yaml``.

    Each bounds the work one request can cause, so none can stall a worker:

    * ``max_records``: records of a request (instances, candidates, KServe v2 rows);
    * ``max_candidates``: candidates of a ranking request;
    * ``max_value_bytes``: UTF-8 bytes of one string value (of a multi-valued
      feature, one record's tokens together; also a KServe v2 ``id``);
    * ``max_string_bytes``: UTF-8 bytes of all string values of a request's
      records together (a ranking request's context counts on its own);
    * ``max_depth``: nesting of arrays and objects in JSON text (the contract
      needs 5: a KServe v2 multi-valued column);
    * ``max_field_name_bytes``: UTF-8 bytes of a key or feature name.
    """

    max_records: int = 1000
    max_candidates: int = 1000
    max_value_bytes: int = 65_536
    max_string_bytes: int = 4_194_304
    max_depth: int = 8
    max_field_name_bytes: int = 256

    def text_limits(self, groups: tuple[int, ...] = ()) -> TextLimits:
        """The text limits for one FeatureSpec encode call; ``groups``: the row counts of its requests."""
        return TextLimits(self.max_value_bytes, self.max_string_bytes, groups)


def _name_too_long(name: str, limits: Limits) -> str | None:
    """The problem to report when ``name`` is above ``limits.max_field_name_bytes``, else None."""
    # A character is at most 4 UTF-8 bytes: most names are decided without encoding them.
    if len(name) * 4 <= limits.max_field_name_bytes:
        return None
    size = len(name.encode("utf-8", "surrogatepass"))
    if size <= limits.max_field_name_bytes:
        return None
    return f"a field name of {size} bytes exceeds the limit of {limits.max_field_name_bytes} bytes"


def _key_error(key: str, problem: str, limits: Limits, *, where: str = "") -> RequestError:
    """The error for a key the request should not have, quoted short."""
    return RequestError(f"{where}{short_text(key)}", _name_too_long(key, limits) or problem)


@dataclass(frozen=True)
class ParsedRequest:
    """One request, validated as far as possible without the FeatureSpec."""

    kind: RequestKind
    records: Sequence[Mapping[str, Any]] = ()
    context: Mapping[str, Any] | None = None
    top_k: int | None = None
    request_id: str | None = None  # KServe v2 "id", echoed back
    # KServe v2 (and typed JSON): one array of values per feature, kept as columns
    # (never turned into one dict per record, which is most of what records cost).
    columns: Mapping[str, list[Any]] | None = None
    # KServe v2: each input's datatype, checked against the feature's kind when encoding.
    datatypes: Mapping[str, str] | None = field(default=None, compare=False)
    # An Arrow IPC request: its ``pyarrow.Table``, one column per feature (see handlers.arrow_request).
    table: Any = field(default=None, compare=False)
    # A typed JSON ranking request (columns): the rows of each context feature that its candidates lack.
    context_rows: Mapping[str, np.ndarray] | None = field(default=None, compare=False)

    @property
    def num_records(self) -> int:
        if self.table is not None:
            return int(self.table.num_rows)
        if self.columns is not None:
            return len(next(iter(self.columns.values())))
        return len(self.records)

    @property
    def columnar(self) -> bool:
        """Encoded from its own columns (KServe v2, Arrow), not with the batch's records."""
        return self.columns is not None or self.table is not None

    @property
    def records_field(self) -> str:
        return {"score": "instances", "rank": "candidates", "kservev2": "inputs"}[self.kind]


# --------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------


def _reject_constant(name: str) -> float:
    raise RequestError("body", f"not valid JSON: {name} is not a JSON number")


_JSON_CONTENT_TYPES = ("application/json",)
ARROW_STREAM = "application/vnd.apache.arrow.stream"
JSON_MEDIA_TYPE = "application/json"


def media_type(content_type: str | None) -> str:
    """The media type of a Content-Type header, lower case, without its parameters ("" for none)."""
    return (content_type or "").split(";")[0].strip().lower()


def prefers_arrow(accept: str | None) -> bool:
    """Whether an ``Accept`` header asks for an Arrow IPC stream before JSON.

    True when it names ``application/vnd.apache.arrow.stream`` with a
    quality above 0 and at least that of ``application/json`` (and of a
    wildcard, which JSON would satisfy); an absent header means JSON.
    """
    qualities: dict[str, float] = {}
    for item in (accept or "").split(","):
        name, *parameters = item.split(";")
        quality = 1.0
        for parameter in parameters:
            key, _, value = parameter.partition("=")
            if key.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        name = name.strip().lower()
        if name:
            qualities[name] = max(quality, qualities.get(name, 0.0))
    arrow = qualities.get(ARROW_STREAM, 0.0)
    json_like = max(qualities.get(n, 0.0) for n in (JSON_MEDIA_TYPE, "application/*", "*/*"))
    return arrow > 0 and arrow >= json_like
_STRUCTURE = bytes(range(256)).translate(None, delete=b'[]{}"')  # every byte but brackets and quotes
_BRACKET_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")


def json_nesting_depth(text: bytes) -> int:
    """The deepest nesting of arrays and objects in JSON ``text``, in a few C-level passes.

    Linear in the length and without recursion, so it runs before the
    parser, whose recursion is what nesting costs. Brackets inside strings do
    not count. Malformed text gets a best-effort figure (the parser rejects it).
    """
    if len(text) <= 4096 and text.count(b"[") + text.count(b"{") <= 1:  # a small record: two passes fewer
        return int(b"[" in text or b"{" in text)
    if b"\\" in text:
        # Escaped backslashes, then escaped quotes: every quote left delimits a string.
        text = text.replace(b"\\\\", b"").replace(b'\\"', b"")
    # Brackets and quotes only; adjacent quotes dropped in pairs (strings without brackets,
    # most of them), which keeps the parity of the quotes before every bracket.
    skeleton = text.translate(None, delete=_STRUCTURE).replace(b'""', b"")
    quotes = skeleton.split(b'"')[::2]  # outside strings: the even pieces
    brackets = b"".join(quotes).translate(_BRACKET_STEPS)
    if not brackets:
        return 0
    return int(np.cumsum(np.frombuffer(brackets, np.int8), dtype=np.int32).max())


def decode_body(
    item: Mapping[str, Any] | Any, *, content_type: str | None = None, limits: Limits = Limits()
) -> Any:
    """One entry of TorchServe's ``data`` list -> the JSON value of the body.

    With ``decode_input_request=true`` (TorchServe's default) the worker
    decodes ``application/json`` bodies with Python's ``json`` (which accepts
    NaN: the FeatureSpec rejects those later) and forwards bodies it cannot
    decode (too deep for its parser, not UTF-8, not JSON) as bytes; with
    ``false`` (this bundle's ``config.properties``) every body arrives as
    bytes. Bytes are parsed here after their nesting is checked: with orjson
    where installed (several times faster than ``json``; like it, it keeps
    the last of duplicate keys), else with ``json``; NaN and Infinity are
    refused either way. Text orjson refuses is read again with ``json``,
    which names the problem, and takes what orjson alone refuses (a number
    beyond the float range, an unpaired surrogate escape) so the FeatureSpec
    reports it as it does for decoded bodies. orjson reads an integer beyond
    64 bits as a float (a categorical feature then refuses it), where
    ``json`` keeps an integer. A string is parsed as JSON text unless
    ``content_type`` says the body was JSON already: then it was a JSON
    string, which is not a request (a client that encoded its request twice).
    """
    if isinstance(item, Mapping) and item and "data" not in item and "body" not in item:
        # A form post: TorchServe split the body into named form fields.
        raise RequestError("body", "expected a JSON request body (send it with Content-Type: application/json)")
    body = item.get("data", item.get("body")) if isinstance(item, Mapping) else item
    if body is None:
        raise RequestError("body", "empty request")
    if isinstance(body, str) and (content_type or "").split(";")[0].strip().lower() in _JSON_CONTENT_TYPES:
        raise _json_string_error()
    if not isinstance(body, (bytes, bytearray, str)):
        return body
    raw = bytes(body) if isinstance(body, (bytes, bytearray)) else body.encode("utf-8", "surrogatepass")
    depth = json_nesting_depth(raw)
    if depth > limits.max_depth:
        raise _depth_error(depth, limits)
    if orjson is not None:
        try:
            value = orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass  # json below says what is wrong, or reads what orjson alone refuses
        else:
            if isinstance(value, str):
                raise _json_string_error()
            return value
    if isinstance(body, (bytes, bytearray)):
        try:
            body = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise RequestError("body", f"not valid UTF-8 at byte {error.start}") from None
    if not body.strip():
        raise RequestError("body", "empty request")
    try:
        value = json.loads(body, parse_constant=_reject_constant)
    except RequestError:  # NaN or Infinity
        raise
    except json.JSONDecodeError as error:
        raise RequestError("body", f"not valid JSON: {error.msg} (line {error.lineno}, column {error.colno})") from None
    except RecursionError:  # the depth check above keeps the parser well below the interpreter's limit
        raise _depth_error(depth, limits) from None
    except ValueError:  # an integer of more digits than Python converts
        raise RequestError("body", "not valid JSON: a number with more digits than Python reads") from None
    if isinstance(value, str):
        raise _json_string_error()
    return value


def _json_string_error() -> RequestError:
    return RequestError("body", "the body is a JSON string, not an object: send the request object itself")


def _depth_error(depth: int, limits: Limits) -> RequestError:
    return RequestError("body", f"{depth} levels of nesting exceed the limit of {limits.max_depth}")


def parse_request(body: Any, *, limits: Limits) -> ParsedRequest:
    """A decoded JSON body -> :class:`ParsedRequest`, or :class:`RequestError`."""
    if not isinstance(body, Mapping):
        raise RequestError("body", f"expected a JSON object, got {json_type(body)}")
    if not body:
        raise RequestError("body", "empty request")
    if "instances" in body:
        extra = sorted(set(body) - {"instances"})
        if extra:
            raise _key_error(extra[0], "unexpected key beside 'instances'", limits)
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
    check_record_count(len(value), field_name, limits)
    return value


def check_record_count(count: int, field_name: str, limits: Limits) -> None:
    if count > limits.max_records:
        raise RequestError(field_name, f"{count} records exceed the limit of {limits.max_records} per request")
    if field_name == "candidates" and count > limits.max_candidates:
        raise RequestError(field_name, f"{count} candidates exceed the limit of {limits.max_candidates} per request")


def _parse_ranking(body: Mapping[str, Any], limits: Limits) -> ParsedRequest:
    extra = sorted(set(body) - _RANK_KEYS)
    if extra:
        raise _key_error(extra[0], "unexpected key in a ranking request (expected context, candidates, top_k)", limits)
    candidates = _record_list(body["candidates"], "candidates", limits)
    context = body.get("context")
    if context is not None and not isinstance(context, Mapping):
        raise RequestError("context", f"expected a JSON object, got {json_type(context)}")
    top_k = body.get("top_k", len(candidates))
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise RequestError("top_k", f"expected a positive integer, got {json_type(top_k)}")
    if top_k < 1:
        raise RequestError("top_k", f"must be >= 1, got {short_text(str(top_k))}")
    return ParsedRequest("rank", candidates, context=context, top_k=min(top_k, len(candidates)))


def _parse_kservev2(body: Mapping[str, Any], limits: Limits) -> ParsedRequest:
    columns: dict[str, list[Any]] = {}
    datatypes: dict[str, str] = {}
    rows: int | None = None
    for position, tensor in enumerate(v2_inputs(body, limits)):
        name, datatype, data = parse_v2_tensor(tensor, position, seen=columns, limits=limits)
        if rows is not None and len(data) != rows:
            raise RequestError(f"inputs[{position}].shape", f"{len(data)} values, but earlier inputs have {rows}")
        rows = len(data)
        columns[name] = data
        datatypes[name] = datatype
    if not rows:
        raise RequestError("inputs", "empty request: no records")
    check_record_count(rows, "inputs", limits)
    return ParsedRequest("kservev2", columns=columns, request_id=v2_request_id(body, limits), datatypes=datatypes)


def v2_inputs(body: Mapping[str, Any], limits: Limits) -> list[Any]:
    """A KServe v2 request's ``inputs`` array (its tensors not yet looked at), after its top-level keys are checked."""
    extra = sorted(set(body) - _V2_KEYS)
    if extra:
        raise _key_error(extra[0], "unexpected key in a KServe v2 request", limits)
    inputs = body["inputs"]
    if not isinstance(inputs, list) or not inputs:
        raise RequestError("inputs", "expected a non-empty array of input tensors, one per feature")
    return inputs


def parse_v2_tensor(
    tensor: Any, position: int, *, seen: Container[str], limits: Limits
) -> tuple[str, str, list[Any]]:
    """``inputs[position]`` -> its ``(name, datatype, data)``: a known datatype, shape ``[N]`` and ``N`` values,
    a name not in ``seen``; the errors name the tensor's field."""
    where = f"inputs[{position}]"
    if not isinstance(tensor, Mapping):
        raise RequestError(where, f"expected a tensor object, got {json_type(tensor)}")
    missing = sorted({"name", "shape", "datatype", "data"} - set(tensor))
    if missing:
        raise RequestError(where, f"missing key {missing[0]!r}")
    extra = sorted(set(tensor) - _V2_INPUT_KEYS)
    if extra:
        raise _key_error(extra[0], "unexpected key in a KServe v2 input", limits, where=f"{where}.")
    name, shape, datatype, data = tensor["name"], tensor["shape"], tensor["datatype"], tensor["data"]
    if not isinstance(name, str) or not name:
        raise RequestError(f"{where}.name", f"expected a feature name, got {json_type(name)}")
    too_long = _name_too_long(name, limits)
    if too_long:
        raise RequestError(f"{where}.name", too_long)
    if name in seen:
        raise RequestError(f"{where}.name", f"feature {name!r} given twice")
    if not isinstance(datatype, str):
        raise RequestError(f"{where}.datatype", f"expected a KServe v2 datatype, got {json_type(datatype)}")
    if datatype not in V2_DATATYPES:
        raise RequestError(
            f"{where}.datatype", f"unknown KServe v2 datatype {short_text(datatype)!r} (expected BYTES, INT64, FP32, ...)"
        )
    if not (isinstance(shape, list) and len(shape) == 1 and isinstance(shape[0], int) and not isinstance(shape[0], bool)):
        raise RequestError(f"{where}.shape", f"expected [N] (one value per record), got {_shape_text(shape)}")
    if not isinstance(data, list) or len(data) != shape[0]:
        raise RequestError(f"{where}.data", f"expected a flat array of {shape[0]} values to match shape {shape}")
    return name, datatype, data


def v2_request_id(body: Mapping[str, Any], limits: Limits) -> str | None:
    """A KServe v2 request's ``id``, to echo: a string within ``max_value_bytes`` (any other JSON value is ignored)."""
    request_id = body.get("id")
    if isinstance(request_id, str) and len(request_id.encode("utf-8", "surrogatepass")) > limits.max_value_bytes:
        raise RequestError("id", f"an id above the limit of {limits.max_value_bytes} bytes per value")
    return request_id if isinstance(request_id, str) else None


def _shape_text(shape: Any) -> str:
    """A wrong KServe v2 shape in a message: small lists of integers as they are, anything else by its JSON type."""
    if isinstance(shape, list) and len(shape) <= 4 and all(type(n) is int and abs(n) < 10**12 for n in shape):
        return str(shape)
    return json_type(shape)


def check_datatypes(spec: FeatureSpec, request: ParsedRequest) -> None:
    """KServe v2: each input's datatype fits its feature (see :func:`datatype_problem`)."""
    for position, (name, datatype) in enumerate((request.datatypes or {}).items()):
        problem = datatype_problem(spec, name, datatype)
        if problem:
            raise RequestError(f"inputs[{position}].datatype", problem)


def datatype_problem(spec: FeatureSpec, name: str, datatype: str) -> str | None:
    """Why KServe v2 ``datatype`` does not fit feature ``name`` of ``spec`` (numeric for a dense feature, BYTES
    or an integer type for a categorical one), or None; an unknown feature is left for the FeatureSpec to report."""
    try:
        dense_columns, _ = spec.columns_of(name)
    except KeyError:
        return None
    if dense_columns and datatype not in V2_NUMERIC_DATATYPES:
        expected = "a numeric datatype (INT64, INT32, FP32, FP64, ...)"
    elif not dense_columns and datatype not in V2_CATEGORICAL_DATATYPES:
        expected = "BYTES (or an integer datatype for integer ids)"
    else:
        return None
    return f"{datatype} does not fit feature {name!r}: expected {expected}"


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


def request_header(context: Any, index: int, name: str, *, body: bool = False) -> str | None:
    """Request ``index``'s header ``name`` (lower case; any case matches), where TorchServe's context
    passed it; with ``body``, the body parameter's own header (how TorchServe passes its Content-Type)."""
    processors = getattr(context, "request_processor", None) or []
    headers = processors[index].get_request_properties() if index < len(processors) else None
    headers = headers if isinstance(headers, Mapping) else {}
    if body:
        headers = headers.get("body") or headers.get("data")
        headers = headers if isinstance(headers, Mapping) else {}
    return next((value for key, value in headers.items() if str(key).lower() == name and isinstance(value, str)), None)


def parse_item(item: Any, *, limits: Limits, content_type: str | None = None) -> ParsedRequest | RequestError:
    """One TorchServe ``data`` entry -> its :class:`ParsedRequest`, or the
    :class:`RequestError` to answer it with, whatever went wrong."""
    try:
        if media_type(content_type) == ARROW_STREAM:
            return _parse_arrow(item, limits)
        return parse_request(decode_body(item, content_type=content_type, limits=limits), limits=limits)
    except RequestError as error:
        return error
    except Exception:  # anything a hostile body can provoke stays this request's problem
        logger.exception("request body could not be parsed")
        return RequestError("body", "could not be parsed as a request")


def _parse_arrow(item: Any, limits: Limits) -> ParsedRequest:
    body = item.get("data", item.get("body")) if isinstance(item, Mapping) else item
    if not isinstance(body, (bytes, bytearray)) or not body:
        raise RequestError("body", "empty request" if not body else "expected an Arrow IPC stream body")
    try:
        from handlers import arrow_request
    except ImportError:
        raise UnsupportedMediaType(
            "body", "this server cannot read Arrow IPC bodies (pyarrow is not installed): send JSON"
        ) from None
    return arrow_request.read_request(bytes(body), limits=limits)


# From this size a JSON body is first tried with the typed decoder: below it
# orjson and the records' path cost about as little.
TYPED_JSON_MIN_BYTES = 16 * 1024
_CACHED_DECODERS = 8  # a worker serves one spec (and its clients one set of context keys); tests make many
_decoders: dict[tuple[int, frozenset[str] | None], tuple[FeatureSpec, Any]] = {}


def typed_request(spec: FeatureSpec, item: Any, limits: Limits) -> ParsedRequest | None:
    """A large ``{"instances": [...]}`` or ``{"context", "candidates", "top_k"}`` JSON body
    decoded against ``spec``'s types, as one list of values per feature (as KServe v2
    columns are), or None: for a smaller body, without msgspec, and for any body the
    decoder refuses.

    msgspec reads each record into a struct of the spec's features, typed as the
    FeatureSpec checks them (a dense feature: number or null; a categorical one: string,
    integer or null; a multi-valued one: also an array of strings and integers), refusing
    unknown keys, and keeps the last of duplicate keys, as orjson and ``json`` do.
    Integers outside int64 are left to the orjson path (which reads those beyond 64 bits
    as floats). The nesting these types allow is bounded, so no depth check runs first.
    Everything it refuses (NaN, a wrong type, an unknown feature, deep nesting, too many
    records, a bad ``top_k``, invalid UTF-8) takes the usual path, which names the
    problem as it always has. The values are those the usual path parses, and take the
    same checks and encoding, so the tensors are the same.

    A ranking request's context is read first; a candidate that lacks one of its
    features takes the context's value, as on the usual path, so the candidates'
    struct tells an absent key from a null for those features alone.
    """
    if msgspec is None or not isinstance(item, Mapping) or limits.max_depth < 4:  # object, array, record, list
        return None
    body = item.get("data", item.get("body"))
    if not isinstance(body, (bytes, bytearray)) or len(body) < TYPED_JSON_MIN_BYTES:
        return None
    unset = msgspec.UNSET
    try:
        envelope = _decoder(spec, None).decode(body)
        if envelope.instances is not unset:
            if (envelope.context, envelope.candidates, envelope.top_k) != (unset, unset, unset):
                return None  # a key beside "instances": the usual path's 400
            columns = _typed_columns(spec, envelope.instances, limits, candidates=False)
            return None if columns is None else ParsedRequest("score", columns=columns)
        if envelope.candidates is unset:
            return None
        context = None
        if envelope.context is not unset:
            values = msgspec.structs.astuple(_decoder(spec, frozenset()).decode(envelope.context))
            context = {name: value for name, value in zip(spec.feature_names, values) if value is not unset}
        candidates = _decoder(spec, frozenset(context or ())).decode(envelope.candidates)
        top_k = len(candidates) if envelope.top_k is unset else msgspec.json.decode(envelope.top_k)
    except (msgspec.MsgspecError, ValueError):  # invalid JSON or UTF-8, or a value of another type
        return None
    if type(top_k) is not int or not 1 <= top_k < 2**63:  # noqa: E721 -- bool, float, null: the usual path's 400
        return None  # (as are integers beyond 64 bits, which orjson reads as floats)
    columns = _typed_columns(spec, candidates, limits, candidates=True)
    if columns is None:
        return None
    dense = {feature.name for feature in spec.dense}
    rows = {}
    for name in context or ():  # candidates lacking the feature (UNSET) take the context's value
        column = columns[name]
        rows[name] = np.flatnonzero([value is unset for value in column])
        missing = None if name in dense else ""  # then overwritten by the context's encoded value
        for row in rows[name].tolist():
            column[row] = missing
    return ParsedRequest("rank", columns=columns, context=context, top_k=min(top_k, len(candidates)), context_rows=rows)


def _typed_columns(spec: FeatureSpec, records: list[Any], limits: Limits, *, candidates: bool) -> dict[str, list[Any]] | None:
    """Decoded record structs -> one list of values per feature; None where the usual path answers 400
    (no records, or more than the limits allow)."""
    if not records or len(records) > limits.max_records or (candidates and len(records) > limits.max_candidates):
        return None
    # All values record by record, then every width-th one: one list per feature.
    values = list(chain.from_iterable(map(msgspec.structs.astuple, records)))
    names = spec.feature_names
    return {name: values[j :: len(names)] for j, name in enumerate(names)}


def _decoder(spec: FeatureSpec, context_keys: frozenset[str] | None) -> Any:
    """msgspec decoders for ``spec`` (built once per spec and key set):

    * ``None``: the body's envelope, ``instances`` typed, ``context``,
      ``candidates`` and ``top_k`` kept as raw JSON until the context is known;
    * an empty set: a ranking context, every feature optional (absent: UNSET);
    * the context's keys: the candidates, absent keys UNSET for those features.
    """
    key = (id(spec), context_keys)
    cached = _decoders.get(key)
    if cached is not None and cached[0] is spec:
        return cached[1]
    integer = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]  # int64: orjson reads these as int too
    categorical = Union[str, integer, None]
    multi_valued = Union[list[Union[str, integer]], str, integer, None]
    types = {feature.name: Union[integer, float, None] for feature in spec.dense}
    types.update({feature.name: multi_valued if feature.multi_valued else categorical for feature in spec.sparse})

    def record_struct(optional: Container[str]) -> Any:
        # Field names are identifiers; `rename` maps them to the features' names, which may be any text. An absent
        # key takes the feature's missing value of encode_records, None (dense) or "" (categorical), or UNSET.
        fields_ = [
            (f"f{index}", kind, msgspec.UNSET if name in optional else (None if index < spec.num_dense else ""))
            for index, (name, kind) in enumerate(types.items())
        ]
        return msgspec.defstruct("Record", fields_, rename=dict(zip((f[0] for f in fields_), types)),
                                 forbid_unknown_fields=True, gc=False)

    if context_keys is None:
        unset = msgspec.UNSET
        raw_or_unset = Union[msgspec.Raw, msgspec.UnsetType]
        envelope = msgspec.defstruct(
            "Envelope",
            [("instances", Union[list[record_struct(())], msgspec.UnsetType], unset), ("context", raw_or_unset, unset),
             ("candidates", raw_or_unset, unset), ("top_k", raw_or_unset, unset)],
            forbid_unknown_fields=True,
        )
        decoder = msgspec.json.Decoder(envelope)
    elif not context_keys:
        decoder = msgspec.json.Decoder(record_struct(types))
    else:
        decoder = msgspec.json.Decoder(list[record_struct(context_keys)])
    if len(_decoders) >= _CACHED_DECODERS:
        _decoders.clear()
    _decoders[key] = (spec, decoder)
    return decoder


def encode_batch(
    spec: FeatureSpec,
    bodies: Sequence[Any],
    *,
    limits: Limits,
    content_types: Sequence[str | None] | None = None,
    typed_json: bool = True,
) -> EncodedBatch:
    """Decode, validate and encode every request; a bad one fails alone.

    ``bodies`` are TorchServe's ``data`` entries; ``content_types`` their
    Content-Type headers, where known. ``typed_json=False`` parses every JSON
    body with orjson (or ``json``), never with the typed decoder of
    :func:`typed_request` (which gives the same tensors and answers).

    The records of all record requests are encoded in one ``encode_records``
    call: its cost is mostly per call (a few numpy operations per feature),
    so 32 single-record requests encoded one by one cost about 20 times what
    they cost together. A ranking request's context is encoded once, as a
    one-row column set, and copied into its candidates' rows. KServe v2
    requests are encoded from their columns, one call each, and their rows
    follow the records'. Only when a call finds a problem are the requests
    encoded one by one, so the bad one gets its own 400 naming the field.
    """
    types = list(content_types or ())
    outcomes = []
    for index, item in enumerate(bodies):
        content_type = types[index] if index < len(types) else None
        typed = typed_request(spec, item, limits) if typed_json and media_type(content_type) != ARROW_STREAM else None
        outcomes.append(typed if typed is not None else parse_item(item, limits=limits, content_type=content_type))
    try:
        return _encode_together(spec, outcomes, limits)
    except Exception:  # noqa: BLE001 -- a request to report (or a value no check foresaw): each request alone
        return _encode_one_by_one(spec, outcomes, limits)


def _encode_together(spec: FeatureSpec, outcomes: list[ParsedRequest | RequestError], limits: Limits) -> EncodedBatch:
    bounds = [(0, 0)] * len(outcomes)
    dense_parts: list[np.ndarray] = []
    sparse_parts: list[np.ndarray] = []
    records: list[Any] = []
    groups: list[int] = []
    for index, outcome in enumerate(outcomes):
        if isinstance(outcome, ParsedRequest) and not outcome.columnar:
            bounds[index] = (len(records), len(records) + outcome.num_records)
            records.extend(outcome.records)
            groups.append(outcome.num_records)
    if records:
        dense, sparse = spec.encode_records(records, text_limits=limits.text_limits(tuple(groups)))
        for outcome, (start, end) in zip(outcomes, bounds):
            if isinstance(outcome, ParsedRequest) and outcome.context:
                _apply_context(spec, outcome, dense[start:end], sparse[start:end], limits)
        _append((dense, sparse), dense_parts, sparse_parts)
    rows = len(records)
    for index, outcome in enumerate(outcomes):
        if isinstance(outcome, ParsedRequest) and outcome.columnar:
            bounds[index] = (rows, rows + outcome.num_records)
            rows += outcome.num_records
            _append(_encode_request(spec, outcome, limits), dense_parts, sparse_parts)
    return EncodedBatch(*_stack(spec, dense_parts, sparse_parts), outcomes, bounds)


def _apply_context(
    spec: FeatureSpec, request: ParsedRequest, dense: np.ndarray, sparse: np.ndarray, limits: Limits
) -> None:
    """Give a ranking request's candidates (their encoded rows, changed in
    place) the context's encoded value of each feature they do not set.

    The context is encoded once, as one row: never copied into one dict per
    candidate, so its size is paid once, not once per candidate.
    """
    context = request.context or {}
    names = context.keys()
    records = request.records
    # Most candidates set none of the context's features: they take all of
    # its columns at once; the others feature by feature.
    apart = np.fromiter(map(names.isdisjoint, records), bool, count=len(records))
    shared = encode_context(spec, context, limits)
    copy_columns(spec, list(names), slice(None) if apart.all() else np.flatnonzero(apart), shared, (dense, sparse))
    for row in np.flatnonzero(~apart).tolist():
        lacking = [name for name in names if name not in records[row]]
        copy_columns(spec, lacking, slice(row, row + 1), shared, (dense, sparse))


def encode_context(spec: FeatureSpec, context: Mapping[str, Any], limits: Limits) -> tuple[np.ndarray, np.ndarray]:
    """A ranking request's context -> its one-row ``(dense, sparse)`` tensors; errors name ``context.FEATURE``."""
    try:
        shared_dense, shared_sparse = spec.encode_json_columns(
            {name: [value] for name, value in context.items()}, num_rows=1, text_limits=limits.text_limits()
        )
    except FeatureError as error:
        if not isinstance(error.field, str):  # a key no JSON object has: not this request's feature problem
            raise
        too_long = _name_too_long(error.field, limits)
        where = f"context.{short_text(error.field)}" if error.field else "context"
        raise RequestError(where, too_long or error.problem) from None
    return shared_dense, shared_sparse


def copy_columns(
    spec: FeatureSpec,
    names: list[str],
    rows: slice | np.ndarray,
    source: tuple[np.ndarray, np.ndarray],
    target: tuple[np.ndarray, np.ndarray],
) -> None:
    """Copy features ``names``' columns of the one-row ``source`` tensors into ``rows`` of ``target`` (in place)."""
    for kind, (shared, tensor) in enumerate(zip(source, target)):  # dense, then sparse
        columns = sorted({column for name in names for column in spec.columns_of(name)[kind]})
        if columns:
            if isinstance(rows, slice):
                tensor[rows, columns] = shared[0, columns]
            else:
                tensor[np.ix_(rows, columns)] = shared[0, columns]


def _encode_request(spec: FeatureSpec, request: ParsedRequest, limits: Limits) -> tuple[np.ndarray, np.ndarray]:
    if request.table is not None:
        from handlers import arrow_request  # parsed there: pyarrow is installed

        return arrow_request.encode_request(spec, request, limits)
    if request.columns is not None:
        check_datatypes(spec, request)
        dense, sparse = spec.encode_json_columns(request.columns, num_rows=request.num_records, text_limits=limits.text_limits())
        if request.context:
            shared = encode_context(spec, request.context, limits)
            for name, rows in (request.context_rows or {}).items():
                copy_columns(spec, [name], rows, shared, (dense, sparse))
        return dense, sparse
    dense, sparse = spec.encode_records(request.records, text_limits=limits.text_limits())
    if request.context:
        _apply_context(spec, request, dense, sparse, limits)
    return dense, sparse


def _request_error(error: Exception, request: ParsedRequest, limits: Limits) -> RequestError:
    """What a request whose encoding raised ``error`` is answered with."""
    if isinstance(error, RequestError):
        return error
    if isinstance(error, FeatureError) and isinstance(error.field, str):
        return RequestError.from_feature_error(error, records_field=request.records_field, limits=limits)
    logger.error("request could not be encoded", exc_info=error)
    return RequestError(request.records_field, "could not be encoded")


def _encode_one_by_one(spec: FeatureSpec, outcomes: list[ParsedRequest | RequestError], limits: Limits) -> EncodedBatch:
    """The slow path after a failed batch encode: each request alone, errors mapped to their request."""
    bounds: list[tuple[int, int]] = []
    dense_parts: list[np.ndarray] = []
    sparse_parts: list[np.ndarray] = []
    rows = 0
    for index, outcome in enumerate(outcomes):
        if isinstance(outcome, ParsedRequest):
            try:
                size = _append(_encode_request(spec, outcome, limits), dense_parts, sparse_parts)
            except Exception as error:  # noqa: BLE001 -- logged by _request_error unless a 400 of ours
                outcomes[index] = _request_error(error, outcome, limits)
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


def top_indices(scores: np.ndarray, top_k: int) -> np.ndarray:
    """Indices of the ``top_k`` best scores, best first; ties keep request order: int64[min(K, N)]."""
    return np.argsort(-scores, kind="stable")[:top_k]


def rank(scores: np.ndarray, top_k: int) -> list[dict[str, Any]]:
    """The ``top_k`` best scores with their indices, best first (see :func:`top_indices`)."""
    return [{"index": int(i), "score": float(scores[i])} for i in top_indices(scores, top_k)]


def build_response(
    parsed: ParsedRequest, scores: np.ndarray, *, model_name: str = "", model_version: str = ""
) -> dict[str, Any]:
    """One request's scores (float32[N], its slice of the batch) -> its JSON body."""
    if parsed.kind == "rank":
        return {"ranking": rank(scores, parsed.top_k or len(scores))}
    if parsed.kind == "kservev2":
        outputs = [v2_output("probability", "FP32", scores.tolist())]
        return v2_response(outputs, request_id=parsed.request_id, model_name=model_name, model_version=model_version)
    return {"predictions": scores.tolist()}


def v2_output(name: str, datatype: str, data: list[Any]) -> dict[str, Any]:
    """One KServe v2 output tensor of shape ``[len(data)]``."""
    return {"name": name, "shape": [len(data)], "datatype": datatype, "data": data}


def v2_response(
    outputs: list[dict[str, Any]], *, request_id: str | None, model_name: str, model_version: str
) -> dict[str, Any]:
    """A KServe v2 response body: the request's ``id`` first where it had one."""
    response: dict[str, Any] = {"model_name": model_name, "model_version": model_version, "outputs": outputs}
    if request_id is not None:
        response = {"id": request_id, **response}
    return response


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


@dataclass(frozen=True)
class Reply:
    """One request's HTTP answer: status and its reason phrase, Content-Type, body bytes."""

    status: int
    reason: str
    content_type: str
    body: bytes


# The body of a request whose response cannot be written: that request alone gets a 500.
UNWRITABLE_RESPONSE = b'{"code":500,"type":"InternalServerError","message":"the response could not be written"}'


def dump_json(body: Any) -> bytes:
    """Compact JSON bytes (orjson where installed: the same text as ``json.dumps`` with compact separators)."""
    if orjson is not None:
        return orjson.dumps(body)
    return json.dumps(body, separators=(",", ":")).encode("utf-8")


def write_responses(
    batch: EncodedBatch,
    scores: np.ndarray,
    *,
    accepts: Sequence[str | None] = (),
    model_name: str = "",
    model_version: str = "",
) -> list[Reply]:
    """Scores of the whole batch -> one :class:`Reply` per request, in order.

    ``accepts`` holds each request's ``Accept`` header, where known: a score
    or rank request that prefers ``application/vnd.apache.arrow.stream``
    (:func:`prefers_arrow`) is answered with an Arrow IPC stream where
    pyarrow is installed; everything else, errors included, with JSON. A
    response that cannot be written is that request's 500.
    """
    if len(scores) != batch.num_records:
        raise ValueError(f"the model returned {len(scores)} scores for {batch.num_records} records")
    replies = []
    for index, (outcome, (start, end)) in enumerate(zip(batch.outcomes, batch.bounds)):
        if isinstance(outcome, RequestError):
            replies.append(Reply(outcome.status, outcome.reason, JSON_MEDIA_TYPE, dump_json(outcome.to_json())))
            continue
        try:
            arrow = None
            if outcome.kind != "kservev2" and prefers_arrow(accepts[index] if index < len(accepts) else None):
                arrow = _arrow_response(outcome, scores[start:end])
            if arrow is not None:
                replies.append(Reply(200, "OK", ARROW_STREAM, arrow))
            else:
                body = build_response(outcome, scores[start:end], model_name=model_name, model_version=model_version)
                replies.append(Reply(200, "OK", JSON_MEDIA_TYPE, dump_json(body)))
        except Exception:  # noqa: BLE001 -- never expected; it must not cost the batch's other requests
            logger.exception("response %d could not be written", index)
            replies.append(Reply(500, "Internal Server Error", JSON_MEDIA_TYPE, UNWRITABLE_RESPONSE))
    return replies


def _arrow_response(parsed: ParsedRequest, scores: np.ndarray) -> bytes | None:
    """The Arrow IPC body for ``parsed``'s scores; None where pyarrow is not installed (JSON then)."""
    try:
        from handlers import arrow_request
    except ImportError:
        return None
    return arrow_request.write_response(parsed, scores)
