"""Criteo Display Advertising TSV files, plain or gzip-compressed, streamed.

One record per line, tab-separated, no header::

    label  I1 ... I13  C1 ... C26

``label`` is 0 or 1, ``I1``-``I13`` are integers (negative values occur,
empty means missing) and ``C1``-``C26`` are hashed categories written as
hex strings (empty means missing). Files like a Criteo day are larger than
memory, so the reader streams them with pyarrow's incremental CSV reader and
hands out fixed-size chunks.

The split is by position, like DLRM's day split: the file is in time order,
so the first 80% of rows train, the next 10% validate, the last 10% test.
Knowing where 80% lies needs the row count, which one cheap first pass
(counting newlines, no parsing) provides; the pass also records where each
block starts so that ``val`` and ``test`` of a plain file are memory-mapped
slices found without re-reading the file. A gzip stream cannot seek: each
pass over ``val`` or ``test`` decompresses (but does not parse) what comes
before it, so for many epochs over a large day, decompress it once.

A malformed line (wrong field count, a non-integer in I1-I13, a label other
than 0/1, invalid UTF-8) stops reading with a :class:`DataError` naming the
file and line: Arrow's own messages do not reliably carry line numbers, so
after a failure the region is re-read line by line in Python to find it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv

from featurespec import StringColumn
from featurespec.arrow import string_column_from_arrow
from training.data import Chunk, DataError, Split, TimeOrderedSplits, checked_file
from training.fitting import SchemaField, SparseOptions

INT_COLUMNS: tuple[str, ...] = tuple(f"I{i}" for i in range(1, 14))
CATEGORICAL_COLUMNS: tuple[str, ...] = tuple(f"C{i}" for i in range(1, 27))
CRITEO_COLUMNS: tuple[str, ...] = ("label", *INT_COLUMNS, *CATEGORICAL_COLUMNS)

_GZIP_MAGIC = b"\x1f\x8b"
_READ_BYTES = 16 << 20
# Arrow's integer parser trims spaces and accepts leading zeros and 0x-hex;
# the error-locating scan accepts the same, so it blames the line Arrow failed on.
_INTEGER = re.compile(rb"\s*-?(?:0[xX][0-9a-fA-F]+|[0-9]+)\s*")
_INT64_MAX = 2**63 - 1


def criteo_schema(sparse_options: SparseOptions = SparseOptions()) -> tuple[SchemaField, ...]:
    """I1-I13 dense with ``log1p`` (as DLRM), C1-C26 categorical fitted with ``sparse_options``."""
    dense = tuple(SchemaField(name, dense=True, transform="log1p") for name in INT_COLUMNS)
    sparse = tuple(SchemaField(name, dense=False, options=sparse_options) for name in CATEGORICAL_COLUMNS)
    return dense + sparse


@dataclass(frozen=True)
class _LineIndex:
    """What the counting pass learned: rows kept, and where each read block began."""

    num_rows: int
    block_offsets: np.ndarray  # int64: byte offset of each block read
    lines_before: np.ndarray  # int64: newlines before that offset


class CriteoSource(TimeOrderedSplits):
    """A Criteo TSV file (``.gz`` or plain) as a streaming :class:`training.data.DataSource`.

    ``rows`` keeps only the first N rows of the file (before splitting).
    ``chunk_rows`` is the size of every chunk but the last of each split.
    ``use_threads`` lets pyarrow parse on several cores; benchmarks of one
    core turn it off. ``block_size`` is how many bytes pyarrow parses at once:
    1 MiB blocks stay in cache and parsed fastest on one core in
    ``benchmarks.reading`` (16 MiB blocks were about 1.5x slower).
    """

    name = "criteo"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        rows: int | None = None,
        chunk_rows: int = 262_144,
        sparse_options: SparseOptions = SparseOptions(),
        use_threads: bool = True,
        block_size: int = 1 << 20,
    ):
        self.path = checked_file(path, rows=rows, chunk_rows=chunk_rows, block_size=block_size, expected="a Criteo TSV, plain or .gz")
        self.rows = rows
        self.chunk_rows = chunk_rows
        self.use_threads = use_threads
        self.block_size = block_size
        self.schema = criteo_schema(sparse_options)
        with open(self.path, "rb") as handle:
            self._compressed = handle.read(2) == _GZIP_MAGIC
        self._index: _LineIndex | None = None

    # -- row count and splits ----------------------------------------------

    @property
    def num_rows(self) -> int:
        """Rows used (the file's line count, capped at ``rows``); counted once per instance."""
        return self._line_index().num_rows

    def _line_index(self) -> _LineIndex:
        if self._index is None:
            self._index = self._count_lines()
        return self._index

    def _count_lines(self) -> _LineIndex:
        offsets, before = [], []
        lines = offset = 0
        last_byte = b"\n"
        with self._open_bytes() as stream:
            while block := self._read(stream, _READ_BYTES):
                offsets.append(offset)
                before.append(lines)
                lines += block.count(b"\n")
                offset += len(block)
                last_byte = block[-1:]
                if self.rows is not None and lines >= self.rows:
                    break
        if last_byte != b"\n":
            lines += 1  # the last line has no newline
        num_rows = lines if self.rows is None else min(lines, self.rows)
        if num_rows == 0:
            raise DataError(self.path, "the file has no rows")
        return _LineIndex(num_rows, np.array(offsets, np.int64), np.array(before, np.int64))

    # -- streaming ---------------------------------------------------------

    def chunks(self, split: Split) -> Iterator[Chunk]:
        start, end = self.split_bounds(split)
        if start == end:
            return
        pending: list[pa.RecordBatch] = []
        pending_rows = 0
        done = start  # rows of the split already handed out or pending
        for batch in self._batches(start, end):
            self._check_labels(batch, first_row=done)
            done += batch.num_rows
            pending.append(batch)
            pending_rows += batch.num_rows
            while pending_rows >= self.chunk_rows:
                table = pa.Table.from_batches(pending)
                yield _to_chunk(table.slice(0, self.chunk_rows))
                rest = table.slice(self.chunk_rows)
                pending, pending_rows = rest.to_batches(), rest.num_rows
        if pending_rows:
            yield _to_chunk(pa.Table.from_batches(pending))

    def _batches(self, start: int, end: int) -> Iterator[pa.RecordBatch]:
        """Parsed record batches of rows ``[start, end)``; a parse error names its line."""
        rows_read = 0
        with self._open_window(start, end) as window:
            try:
                reader = pa_csv.open_csv(
                    window,
                    read_options=pa_csv.ReadOptions(
                        column_names=list(CRITEO_COLUMNS), block_size=self.block_size, use_threads=self.use_threads
                    ),
                    parse_options=pa_csv.ParseOptions(delimiter="\t", quote_char=False, ignore_empty_lines=False),
                    convert_options=_CONVERT_OPTIONS,
                )
                for batch in reader:
                    rows_read += batch.num_rows
                    yield batch
            except (pa.ArrowInvalid, OSError) as error:
                raise self._locate_error(start + rows_read, end, error) from None
        if rows_read != end - start:
            # A lone carriage return ends a row for Arrow but not for the line count.
            raise self._locate_error(start, end, None)

    def _check_labels(self, batch: pa.RecordBatch, *, first_row: int) -> None:
        values = batch.column(0).to_numpy(zero_copy_only=False)  # NaN where null
        bad = (values != 0) & (values != 1)
        if bad.any():
            row = first_row + int(np.flatnonzero(bad)[0])
            raise self._locate_error(row, row + 1, None)

    def _locate_error(self, first_row: int, end: int, error: BaseException | None) -> DataError:
        """Re-read from ``first_row`` in Python to name the first bad line (the slow path, errors only)."""
        if isinstance(error, OSError):  # the bytes, not a line, are at fault
            return DataError(self.path, f"cannot read the file: {error}")
        budget = 4 * self.block_size + (1 << 20)  # the failing block lies within this many bytes
        line_number = first_row
        try:
            with self._open_window(first_row, end) as window:
                for line in _lines(window):
                    line_number += 1
                    problem = _check_line(line)
                    if problem is not None:
                        return DataError(self.path, problem, line=line_number)
                    budget -= len(line) + 1
                    if budget < 0:
                        break
        except OSError as read_error:
            return DataError(self.path, f"cannot read the file: {read_error}")
        detail = f": {error}" if error is not None else ""
        return DataError(self.path, f"cannot parse the rows after this line{detail}", line=first_row + 1)

    # -- byte streams --------------------------------------------------------

    def _open_bytes(self) -> BinaryIO | pa.NativeFile:
        if self._compressed:
            # Arrow's inflater is ~1.4x faster than the gzip module, and reads multi-member files too.
            return pa.CompressedInputStream(pa.OSFile(self.path), "gzip")
        return open(self.path, "rb")

    def _read(self, stream: BinaryIO | pa.NativeFile, size: int) -> bytes:
        try:
            return stream.read(size)
        except OSError as error:
            raise DataError(self.path, f"cannot decompress: {error}") from None

    def _open_window(self, first_line: int, end_line: int) -> _LineWindow | pa.BufferReader:
        """A byte stream of lines ``[first_line, end_line)``.

        A plain file is memory-mapped and sliced at the lines' byte offsets,
        so pyarrow reads it natively; a gzip stream must be decompressed from
        the top, counting newlines on the way.
        """
        if self._compressed:
            return _LineWindow(self._open_bytes(), skip_lines=first_line, keep_lines=end_line - first_line)
        start, end = self._line_offset(first_line), self._line_offset(end_line)
        mapped = pa.memory_map(self.path)
        mapped.seek(start)
        return pa.BufferReader(mapped.read_buffer(end - start))

    def _line_offset(self, line: int) -> int:
        """Byte offset at which 0-based ``line`` starts in a plain file (the file size past the last line)."""
        if line == 0:
            return 0
        index = self._line_index()
        # The last block that starts before the line's preceding newline.
        block = int(np.searchsorted(index.lines_before, line, side="left")) - 1
        position, newlines = int(index.block_offsets[block]), line - int(index.lines_before[block])
        with open(self.path, "rb") as handle:
            handle.seek(position)
            while data := handle.read(_READ_BYTES):
                found = data.count(b"\n")
                if found >= newlines:
                    return position + _nth_newline(data, newlines) + 1
                newlines -= found
                position += len(data)
        return position


_CONVERT_OPTIONS = pa_csv.ConvertOptions(
    column_types={
        "label": pa.int8(),
        **{name: pa.int64() for name in INT_COLUMNS},
        **{name: pa.string() for name in CATEGORICAL_COLUMNS},
    },
    null_values=[""],
    strings_can_be_null=False,
)


class _LineWindow:
    """A read-only byte stream of lines ``[skip_lines, skip_lines + keep_lines)`` of another stream.

    pyarrow reads it like a file (through ``read``), so the CSV parser sees
    exactly one split of a gzip file.
    """

    def __init__(self, stream: pa.NativeFile, *, skip_lines: int, keep_lines: int):
        self._stream = stream
        self._skip = skip_lines
        self._keep = keep_lines
        self._buffer = b""
        self.closed = False

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if self._skip:
            self._skip_lines()
        want = size if size is not None and size >= 0 else 1 << 62
        pieces, total = [], 0
        while total < want and self._keep > 0:
            piece = self._buffer or self._stream.read(min(want - total, _READ_BYTES))
            self._buffer = b""
            if not piece:
                break
            if len(piece) > want - total:
                piece, self._buffer = piece[: want - total], piece[want - total :]
            newlines = piece.count(b"\n")
            if newlines >= self._keep:
                piece = piece[: _nth_newline(piece, self._keep) + 1]
                newlines = self._keep
                self._buffer = b""
            self._keep -= newlines
            pieces.append(piece)
            total += len(piece)
        return b"".join(pieces)

    def _skip_lines(self) -> None:
        while self._skip:
            block = self._buffer or self._stream.read(_READ_BYTES)
            if not block:
                self._keep = 0  # fewer lines than expected: the file shrank since it was counted
                break
            newlines = block.count(b"\n")
            if newlines >= self._skip:
                self._buffer = block[_nth_newline(block, self._skip) + 1 :]
                self._skip = 0
            else:
                self._buffer = b""
                self._skip -= newlines

    def close(self) -> None:
        self.closed = True
        self._stream.close()

    def __enter__(self) -> _LineWindow:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _nth_newline(block: bytes, n: int) -> int:
    """Position of the n-th (1-based) newline in ``block``."""
    return int(np.flatnonzero(np.frombuffer(block, np.uint8) == 10)[n - 1])


def _lines(stream: _LineWindow | pa.NativeFile) -> Iterator[bytes]:
    rest = b""
    while block := stream.read(1 << 20):
        lines = (rest + block).split(b"\n")
        rest = lines.pop()
        yield from lines
    if rest:
        yield rest


def _check_line(line: bytes) -> str | None:
    """Why Arrow rejects this line (or its label), or None when it is well formed."""
    if line.endswith(b"\r"):
        line = line[:-1]
    if not line:
        return "empty line"
    if b"\r" in line:
        return "carriage return inside a line"
    fields = line.split(b"\t")
    if len(fields) != len(CRITEO_COLUMNS):
        return f"expected {len(CRITEO_COLUMNS)} tab-separated fields (label, I1-I13, C1-C26), found {len(fields)}"
    label = fields[0].strip()
    if not label:
        return "missing label"
    if not _INTEGER.fullmatch(label) or _parse_int(label) not in (0, 1):
        return f"label must be 0 or 1, got {_show(fields[0])}"
    for name, field in zip(INT_COLUMNS, fields[1:14]):
        if field and not _INTEGER.fullmatch(field):
            return f"{name} must be an integer or empty, got {_show(field)}"
        if field and abs(_parse_int(field)) > _INT64_MAX:
            return f"{name} is out of the 64-bit integer range: {_show(field)}"
    for name, field in zip(CATEGORICAL_COLUMNS, fields[14:]):
        try:
            field.decode("utf-8")
        except UnicodeDecodeError:
            return f"{name} is not valid UTF-8: {_show(field)}"
    return None


def _parse_int(text: bytes) -> int:
    text = text.strip()
    negative = text.startswith(b"-")
    digits = text[1:] if negative else text
    value = int(digits[2:], 16) if digits[:2] in (b"0x", b"0X") else int(digits)
    return -value if negative else value


def _show(field: bytes) -> str:
    text = field.decode("utf-8", errors="backslashreplace")
    return repr(text if len(text) <= 40 else text[:40] + "...")


def _to_chunk(table: pa.Table) -> Chunk:
    """Arrow rows -> a Chunk, converting straight from the parsed batches (one copy per column)."""
    columns: dict[str, object] = {}
    for name in INT_COLUMNS:
        # Nulls come out as NaN: the FeatureSpec's "missing".
        columns[name] = table.column(name).to_numpy().astype(np.float64, copy=False)
    for name in CATEGORICAL_COLUMNS:
        columns[name] = _join_strings([string_column_from_arrow(part) for part in table.column(name).chunks])
    labels = table.column("label").to_numpy().astype(np.float32)
    return Chunk(columns=columns, labels=labels)


def _join_strings(parts: list[StringColumn]) -> StringColumn:
    """Concatenate columns into fresh int64 offsets and bytes, without an intermediate Arrow copy."""
    if len(parts) == 1:
        return parts[0]
    offsets = np.empty(sum(len(part) for part in parts) + 1, np.int64)
    offsets[0] = row = base = 0
    for part in parts:
        np.add(part.offsets[1:], base, out=offsets[row + 1 : row + 1 + len(part)])
        row += len(part)
        base += len(part.data)
    return StringColumn(np.concatenate([part.data for part in parts]), offsets)
