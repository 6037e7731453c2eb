"""Apache Arrow IPC requests: large requests as columns, encoded from the Arrow buffers.

``POST /predictions/{model}`` with ``Content-Type:
application/vnd.apache.arrow.stream`` and an Arrow IPC *stream* as the body
(``pyarrow.ipc.new_stream``; one record batch, or several that together
form one table):

* One column per feature, named as in the FeatureSpec; a feature without a
  column is missing in every row, a null is missing in its row. A dense
  feature's column is numeric (integer or floating point; NaN and infinities
  are refused, as in JSON). A categorical feature's column holds strings,
  or integers (hashed as their decimal text, as JSON integers are); a
  multi-valued feature's column is a ``list<string>`` or ``list<int>``
  (each list's values; a value holding the separator stays one value), or
  strings joined by the feature's separator. An all-null column (Arrow
  type ``null``) is missing throughout. Dictionary-encoded columns, other
  types and compressed IPC buffers are refused (decode or decompress on the
  client: a compressed body could expand far beyond its size here).
* Scoring: every row is a record -> ``{"predictions": [p, ...]}``, one per
  row, in order.
* Ranking: schema metadata ``request=rank``; every row is a candidate;
  ``top_k`` (metadata, decimal text) defaults to all rows; ``context``
  (metadata) holds the shared features as one JSON object's text, read
  under the JSON rules. A candidate whose column is absent or null takes
  the context's value; a candidate's own value wins -> ``{"ranking":
  [{"index": i, "score": p}, ...]}``, best first. Other metadata keys
  (``pandas``, which ``pyarrow.Table.from_pandas`` adds) are ignored.
* Response: JSON as above, or an Arrow IPC stream when the request's
  ``Accept`` header prefers ``application/vnd.apache.arrow.stream``: one
  float32 column ``probability`` (scoring), or ``index`` (int64) and
  ``score`` (float32), best first (ranking). Errors are always JSON.

Every rule of the JSON path holds, with the same 400s: a problem in one row
names it as the same records in JSON would (``instances[3].I1`` for
scoring, ``candidates[3].I1`` for ranking); a problem with a whole column
names the column (``I1``); limits count rows as records and strings as
text. Values become numpy arrays and packed string columns straight from
the Arrow buffers (casts in Arrow's C++ kernels, no Python object per
value), then take the FeatureSpec's :meth:`~FeatureSpec.encode_packed_columns`.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc

from featurespec import FeatureError, FeatureSpec, StringColumn, StringLists, json_type, short_text
from featurespec.arrow import string_column_from_arrow, string_lists_from_arrow
from handlers.request import (
    Limits,
    ParsedRequest,
    RequestError,
    _name_too_long,
    check_record_count,
    copy_columns,
    decode_body,
    encode_context,
    top_indices,
)

_FILE_MAGIC = b"ARROW1"
_METADATA_KEYS = {b"request", b"top_k", b"context"}
# The flatbuffer header types of an IPC message (Arrow's Message.fbs).
_DICTIONARY_BATCH, _RECORD_BATCH = 2, 3


# --------------------------------------------------------------------------
# Reading the stream
# --------------------------------------------------------------------------


def read_request(body: bytes, *, limits: Limits) -> ParsedRequest:
    """An Arrow IPC stream body -> a :class:`ParsedRequest` holding its table, or :class:`RequestError`.

    Every message is checked before it is decoded (no compression, rows
    within ``limits.max_records``), so decoding stays zero-copy and bounded
    by the body's size; then the table is validated in full (offsets within
    their buffers, strings valid UTF-8), since the FeatureSpec reads its
    buffers directly.
    """
    if body.startswith(_FILE_MAGIC):
        raise RequestError("body", "an Arrow IPC file, not a stream: write it with pyarrow.ipc.new_stream")
    try:
        messages = ipc.MessageReader.open_stream(pa.py_buffer(body))
        first = next(messages, None)
        if first is None:
            raise RequestError("body", "empty request: an Arrow IPC stream without a schema")
        if first.type != "schema":
            raise RequestError("body", f"not a valid Arrow IPC stream: it starts with a {first.type} message, not a schema")
        schema = ipc.read_schema(first)
        kind, top_k, context = _request_metadata(schema.metadata or {}, limits)
        records_field = "candidates" if kind == "rank" else "instances"
        _check_schema(schema, limits)
        batches, rows = [], 0
        for message in messages:
            header, length, compressed = _message_header(message.metadata.to_pybytes())
            if header != _RECORD_BATCH:
                raise RequestError("body", f"unexpected {message.type} message: send plain (not dictionary-encoded) columns")
            if compressed:
                raise RequestError("body", "compressed Arrow IPC buffers are not accepted: send the stream uncompressed")
            rows += length
            check_record_count(rows, records_field, limits)
            if len(batches) >= limits.max_records:
                raise RequestError("body", f"more than {limits.max_records} record batches")
            batches.append(ipc.read_record_batch(message, schema))
        table = pa.Table.from_batches(batches, schema=schema)
        table.validate(full=True)
    except RequestError:
        raise
    except (pa.ArrowException, OSError, ValueError, struct.error) as error:  # pyarrow's I/O errors are OSErrors
        raise RequestError("body", f"not a valid Arrow IPC stream: {error}") from None
    if table.num_rows == 0:
        raise RequestError(records_field, "empty request: no records")
    top_k = table.num_rows if top_k is None else min(top_k, table.num_rows)
    return ParsedRequest(kind, context=context, top_k=top_k if kind == "rank" else None, table=table)


def _request_metadata(metadata: Mapping[bytes, bytes], limits: Limits) -> tuple[str, int | None, dict | None]:
    """The schema metadata -> ``(kind, top_k, context)``; keys other than ours are ignored."""
    kind = metadata.get(b"request", b"score").decode("utf-8", "replace")
    if kind not in ("score", "rank"):
        raise RequestError("request", f"expected 'score' or 'rank', got {short_text(kind)!r}")
    if kind == "score":
        extra = sorted(key.decode("utf-8", "replace") for key in metadata.keys() & (_METADATA_KEYS - {b"request"}))
        if extra:
            raise RequestError(extra[0], "only a ranking request (metadata request=rank) takes it")
        return kind, None, None
    top_k = None
    if b"top_k" in metadata:
        text = metadata[b"top_k"].decode("utf-8", "replace").strip()
        if not (text.isascii() and text.lstrip("-").isdigit()) or len(text) > 20:
            raise RequestError("top_k", f"expected a positive integer, got {text[:40]!r}")
        top_k = int(text)
        if top_k < 1:
            raise RequestError("top_k", f"must be >= 1, got {top_k}")
    context = None
    if b"context" in metadata:
        try:
            context = decode_body(metadata[b"context"], limits=limits)
        except RequestError as error:
            raise RequestError("context", error.problem) from None
        if not isinstance(context, dict):
            raise RequestError("context", f"expected a JSON object, got {json_type(context)}")
    return kind, top_k, context


def _check_schema(schema: pa.Schema, limits: Limits) -> None:
    """Column names: within ``limits.max_field_name_bytes``, each given once; no dictionary columns."""
    seen: set[str] = set()
    for field in schema:
        too_long = _name_too_long(field.name, limits)
        if too_long:
            raise RequestError(field.name, too_long)
        if field.name in seen:
            raise RequestError(field.name, "column given twice")
        seen.add(field.name)
        if pa.types.is_dictionary(field.type):
            raise RequestError(field.name, "a dictionary-encoded column: send its values (pyarrow.compute.dictionary_decode)")


def _message_header(metadata: bytes) -> tuple[int, int, bool]:
    """``(header type, rows, compressed)`` of an IPC message, read from its flatbuffer metadata.

    Read here, before pyarrow decodes the message's body, so that a body
    which would decompress to far more than its size is refused unread.
    Malformed metadata raises ``ValueError``.
    """
    root = _u("<I", metadata, 0)
    type_at = _field(metadata, root, 1)  # Message.header_type
    header_type = _u("<B", metadata, type_at) if type_at else 0
    header = _table(metadata, root, 2)  # Message.header
    if header_type == _DICTIONARY_BATCH and header:
        header = _table(metadata, header, 1)  # DictionaryBatch.data, a RecordBatch
    if header_type not in (_DICTIONARY_BATCH, _RECORD_BATCH) or not header:
        return header_type, 0, False
    length_at = _field(metadata, header, 0)  # RecordBatch.length
    rows = _u("<q", metadata, length_at) if length_at else 0
    if rows < 0:
        raise ValueError(f"a record batch of {rows} rows")
    return header_type, rows, _field(metadata, header, 3) != 0  # RecordBatch.compression


def _u(fmt: str, buffer: bytes, position: int) -> int:
    if position < 0 or position + struct.calcsize(fmt) > len(buffer):
        raise ValueError("message metadata out of bounds")
    return struct.unpack_from(fmt, buffer, position)[0]


def _field(buffer: bytes, table: int, slot: int) -> int:
    """The position of flatbuffer ``table``'s field ``slot``, 0 where absent."""
    vtable = table - _u("<i", buffer, table)
    entry = 4 + 2 * slot
    if entry + 2 > _u("<H", buffer, vtable):
        return 0
    offset = _u("<H", buffer, vtable + entry)
    return table + offset if offset else 0


def _table(buffer: bytes, table: int, slot: int) -> int:
    """The position of the table that field ``slot`` of ``table`` points to, 0 where absent."""
    at = _field(buffer, table, slot)
    return at + _u("<I", buffer, at) if at else 0


# --------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------


def encode_request(spec: FeatureSpec, request: ParsedRequest, limits: Limits) -> tuple[np.ndarray, np.ndarray]:
    """An Arrow request's table -> ``(dense float32[B, D], sparse int64[B, S])``.

    Raises :class:`FeatureError` as the JSON path does: ``record`` set for
    a problem in one row, None for one with a whole column.
    """
    table = request.table
    present = set(table.column_names)  # a new list of names at every call of the property
    unknown = present - set(spec.feature_names)
    if unknown:
        raise FeatureError(min(unknown), "unknown feature")
    columns: dict[str, Any] = {}
    for feature in spec.dense:
        if feature.name in present:
            columns[feature.name] = _dense_values(feature.name, _array(table, feature.name))
    for feature in spec.sparse:
        if feature.name in present:
            array = _array(table, feature.name)
            columns[feature.name] = _multi_values(feature.name, array) if feature.multi_valued else _categorical_values(feature.name, array)
    dense, sparse = spec.encode_packed_columns(columns, num_rows=table.num_rows, text_limits=limits.text_limits())
    if request.context:
        _apply_context(spec, request, limits, dense, sparse)
    return dense, sparse


def _array(table: pa.Table, name: str) -> pa.Array:
    column = table.column(name)
    return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()


def _type_error(name: str, expected: str, array: pa.Array) -> FeatureError:
    return FeatureError(name, f"expected {expected}, got an Arrow {array.type} column")


def _dense_values(name: str, array: pa.Array) -> np.ndarray:
    """A dense feature's column -> float64[N], NaN for null; NaN or infinity sent as a value is refused."""
    if pa.types.is_null(array.type):
        return np.full(len(array), np.nan)
    if not (pa.types.is_integer(array.type) or pa.types.is_floating(array.type)):
        raise _type_error(name, "a numeric column (integers or floating point)", array)
    values = pc.cast(array, pa.float64(), safe=False)
    out = values.to_numpy(zero_copy_only=False)  # nulls become NaN
    if pa.types.is_floating(array.type):
        bad = ~np.isfinite(out)
        if values.null_count:
            bad &= pc.is_valid(values).to_numpy(zero_copy_only=False)
        if bad.any():
            raise FeatureError(name, "must be a finite number (got NaN or infinity)", record=int(np.argmax(bad)))
    return out


def _as_text(array: pa.Array) -> pa.Array | None:
    """A string or integer column as Arrow strings (integers as decimal text); None for other types."""
    if pa.types.is_string(array.type) or pa.types.is_large_string(array.type):
        return array
    if pa.types.is_string_view(array.type):
        return pc.cast(array, pa.large_string())
    if pa.types.is_integer(array.type) or pa.types.is_null(array.type):
        return pc.cast(array, pa.string())
    return None


def _categorical_values(name: str, array: pa.Array) -> StringColumn:
    text = _as_text(array)
    if text is None:
        raise _type_error(name, "a string or integer column", array)
    return string_column_from_arrow(text)


def _multi_values(name: str, array: pa.Array) -> StringColumn | StringLists:
    """A multi-valued feature's column: lists of strings/integers, or separator-joined strings."""
    if pa.types.is_list(array.type) or pa.types.is_large_list(array.type) or pa.types.is_list_view(array.type):
        values_type = array.type.value_type
        if pa.types.is_string(values_type) or pa.types.is_large_string(values_type):
            lists = array
        elif pa.types.is_integer(values_type) or pa.types.is_null(values_type) or pa.types.is_string_view(values_type):
            lists = pc.cast(array, pa.large_list(pa.large_string()))
        else:
            raise _type_error(name, "a list<string> or list<int> column, or strings", array)
        if pa.types.is_list_view(lists.type):
            lists = pc.cast(lists, pa.large_list(lists.type.value_type))
        return string_lists_from_arrow(lists)
    text = _as_text(array)
    if text is None:
        raise _type_error(name, "a list<string> or list<int> column, or strings", array)
    return string_column_from_arrow(text)


def _apply_context(
    spec: FeatureSpec, request: ParsedRequest, limits: Limits, dense: np.ndarray, sparse: np.ndarray
) -> None:
    """Give each candidate (its encoded rows, changed in place) the context's value of every
    feature whose column it lacks or holds a null in; the context is encoded once."""
    context = request.context or {}
    shared = encode_context(spec, context, limits)
    table = request.table
    present = set(table.column_names)
    absent = [name for name in context if name not in present]
    if absent:
        copy_columns(spec, absent, slice(None), shared, (dense, sparse))
    for name in context:
        if name in present and table.column(name).null_count:
            rows = np.flatnonzero(pc.is_null(_array(table, name)).to_numpy(zero_copy_only=False))
            copy_columns(spec, [name], rows, shared, (dense, sparse))


# --------------------------------------------------------------------------
# Responses
# --------------------------------------------------------------------------


def write_response(parsed: ParsedRequest, scores: np.ndarray) -> bytes:
    """One request's scores (float32[N]) -> an Arrow IPC stream: ``probability``, or ``index`` and ``score`` best first."""
    scores = np.asarray(scores, np.float32)
    if parsed.kind == "rank":
        order = top_indices(scores, parsed.top_k or len(scores))
        table = pa.table({"index": pa.array(order.astype(np.int64)), "score": pa.array(scores[order])})
    else:
        table = pa.table({"probability": pa.array(scores)})
    return write_stream(table)


def write_stream(table: pa.Table) -> bytes:
    """``table`` as Arrow IPC stream bytes."""
    sink = pa.BufferOutputStream()
    with ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def read_stream(body: bytes) -> pa.Table:
    """Arrow IPC stream bytes -> the table (a client reading an Arrow response)."""
    return ipc.open_stream(pa.py_buffer(body)).read_all()
