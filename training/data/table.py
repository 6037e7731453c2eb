"""Your own table as a :class:`training.data.DataSource`: Parquet, CSV or TSV, streamed.

Which column is the label and which are features is a :class:`TableSchema`
(``python -m training --data table --label ... --dense ... --sparse ...``, or
a YAML/JSON file, see :func:`table_schema`). The feature names of the model,
hence of every request it serves, are the table's column names.

* Parquet is read one row group at a time (``iter_batches``), only the
  columns the schema names.
* CSV and TSV, plain or gzip-compressed, are read with pyarrow's incremental
  CSV reader, a block at a time. The first line names the columns. Values
  are trimmed of surrounding whitespace; an empty field and the usual null
  spellings (``NA``, ``null``, ``NaN``, ...) mean missing. TSV has no quoting.

Values become the columns the FeatureSpec encodes: a dense column is read as
a float64 array (missing is NaN; numbers, booleans or numeric text); a
sparse column as a :class:`featurespec.StringColumn` built from the Arrow
buffers (integers and booleans as their text, so a request may send
``"zip": 94110`` or ``"zip": "94110"``); a multi-valued column holds strings
joined by its separator, or an Arrow list column whose values are joined.
The label is 0/1 (numbers, booleans, or that text), or, with ``positive``,
1 exactly where the label column equals that value.

Splits, 80/10/10, all without reading the whole table into memory:

* ``order`` (the default): the first 80% of rows train, the next 10%
  validate, the last 10% test, as for Criteo (the file is assumed to be in
  time order, or in no particular order).
* ``random``: rows are assigned by a permutation seeded with ``seed``.
* a time column: rows sorted by it (ties keep file order), then the earliest
  80% train, so no validation or test row precedes a training row. Only the
  time column is read into memory, in a first pass.

History features, as MovieLens has them: with a user, an item and a time
column (``--user-column``, ``--item-column``, ``--time-column``) and a
history length N (``history_length``, 20 by default, 0 for none), every row
also carries ``history`` (the items of the user's last N rows strictly
before the row's time, most recent first, multi-valued), ``history_liked``
(the same over the user's positive rows), ``rated_before`` (how many rows
the user had before; ``log1p``) and ``liked_share`` (the share of them that
are positives, missing before the first; ``standard``). Rows at the same
time never see each other. The history is taken over every split, so a
validation or test row sees the earlier rows of any split, as a serving
request carries the user's whole past. Those four names must not be columns
of the file.

Within a split, rows come in file order. Each pass over ``val`` or ``test``
of a CSV file parses the file from its top (a Parquet pass skips the row
groups it does not need); the training loop reads them once when their
encoded rows fit in memory.

A bad value stops reading with a :class:`DataError` naming the file, the
line (CSV/TSV, counting the header as line 1) or row group and row
(Parquet, both counted from 0 as pyarrow and pandas count them), and the
column::

    adult.csv:1043: column 'age': expected a number, got 'abc'
    events.parquet: row group 2, row 17 (file row 2065): column 'clicked': missing label
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from featurespec import DenseTransform, StringColumn
from featurespec.arrow import string_column_from_arrow
from training.data import SPLITS, Chunk, DataError, Split, checked_file, time_split_bounds
from training.data.interactions import (
    DEFAULT_HISTORY_LENGTH,
    HISTORY_FEATURES,
    HISTORY_SEPARATOR,
    HISTORY_STATISTICS,
    HistoryIndex,
    history_columns,
    history_schema,
)
from training.fitting import SchemaField, SparseOptions

FileFormat = Literal["parquet", "csv", "tsv"]
SplitMethod = Literal["order", "random"]
FILE_FORMATS: tuple[FileFormat, ...] = ("parquet", "csv", "tsv")
SPLIT_METHODS: tuple[SplitMethod, ...] = ("order", "random")
TRANSFORMS: tuple[DenseTransform, ...] = ("log1p", "standard", "identity")
# Unknown scales: z-scoring with the training mean and std suits any column;
# log1p (DLRM's choice for counts) is there for skewed non-negative columns.
DEFAULT_TRANSFORM: DenseTransform = "standard"
DEFAULT_MAX_VALUES = 8
SCHEMA_KEYS = (
    "label", "positive", "dense", "sparse", "multi_valued", "time_column", "user_column", "item_column", "split",
    "transforms", "format",
)

_EXTENSIONS: dict[str, FileFormat] = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".tsv": "tsv", ".tab": "tsv"}
_GZIP_MAGIC = b"\x1f\x8b"
_HEADER_LIMIT = 16 << 20  # a first line longer than this is not a header


# --------------------------------------------------------------------------
# The schema: which column is what
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class MultiValued:
    """How a multi-valued column's values are separated, and how many a row keeps (the first ones)."""

    separator: str = "|"
    max_values: int = DEFAULT_MAX_VALUES

    def __post_init__(self) -> None:
        # One ASCII character: the FeatureSpec splits packed strings at a byte.
        if not isinstance(self.separator, str) or len(self.separator) != 1 or not self.separator.isascii():
            raise ValueError(f"a multi-valued separator must be one ASCII character, got {self.separator!r}")
        if isinstance(self.max_values, bool) or not isinstance(self.max_values, int) or self.max_values < 1:
            raise ValueError(f"max_values must be an int >= 1, got {self.max_values!r}")


@dataclass(frozen=True)
class TableSchema:
    """Which columns of a table are the label, the dense and the sparse features, and how to split it.

    ``multi_valued`` columns are sparse features (listing them in ``sparse``
    too is optional). ``transforms`` overrides a dense column's transform
    (default ``standard``). ``time_column`` and ``split`` exclude each
    other; without either, the split is by file order. ``user_column`` and
    ``item_column`` (both or neither, with a ``time_column``) name who
    interacted with what: the rows then carry the user's history (see
    :class:`TableSource`); they are features only when listed as such.
    ``format`` overrides the format the file name implies.
    """

    label: str
    dense: tuple[str, ...]
    sparse: tuple[str, ...]
    positive: str | None = None
    multi_valued: dict[str, MultiValued] = field(default_factory=dict)
    time_column: str | None = None
    user_column: str | None = None
    item_column: str | None = None
    split: SplitMethod | None = None
    transforms: dict[str, DenseTransform] = field(default_factory=dict)
    format: FileFormat | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.label, str) or not self.label:
            raise ValueError(f"label must name a column, got {self.label!r}")
        for role in ("dense", "sparse"):
            names = getattr(self, role)
            if isinstance(names, str) or not all(isinstance(n, str) and n for n in names):
                raise ValueError(f"{role} must be a list of column names, got {names!r}")
            object.__setattr__(self, role, tuple(names))
        features = self.features
        if not self.dense or not features[len(self.dense):]:
            raise ValueError(
                f"a table model needs at least one dense and one sparse column, got dense {list(self.dense)} "
                f"and sparse {list(features[len(self.dense):])}"
            )
        repeated = sorted({n for n in features if features.count(n) > 1})
        if repeated:
            raise ValueError(f"column {repeated[0]!r} is listed more than once among the features")
        if self.label in features:
            raise ValueError(f"the label column {self.label!r} cannot also be a feature")
        for name, spec in self.multi_valued.items():
            if name in self.dense:
                raise ValueError(f"column {name!r} is dense and multi-valued: a multi-valued column is sparse")
            if not isinstance(spec, MultiValued):
                raise ValueError(f"multi-valued column {name!r}: expected a MultiValued, got {spec!r}")
        for name, transform in self.transforms.items():
            if name not in self.dense:
                raise ValueError(f"a transform is given for {name!r}, which is not a dense column")
            if transform not in TRANSFORMS:
                raise ValueError(f"column {name!r}: unknown transform {transform!r}; choose one of {', '.join(TRANSFORMS)}")
        if self.positive is not None and not isinstance(self.positive, str):
            raise ValueError(f"positive must be text, got {self.positive!r}")
        if self.split is not None and self.split not in SPLIT_METHODS:
            raise ValueError(f"unknown split {self.split!r}; choose one of {', '.join(SPLIT_METHODS)} or a time column")
        if self.split is not None and self.time_column is not None:
            raise ValueError(
                f"a time column ({self.time_column!r}) decides the split: it excludes split {self.split!r}"
            )
        if self.format is not None and self.format not in FILE_FORMATS:
            raise ValueError(f"unknown format {self.format!r}; choose one of {', '.join(FILE_FORMATS)}")
        self._check_interaction_columns()

    def _check_interaction_columns(self) -> None:
        roles = {"user_column": self.user_column, "item_column": self.item_column}
        for role, name in roles.items():
            if name is not None and (not isinstance(name, str) or not name):
                raise ValueError(f"{role} must name a column, got {name!r}")
        given = [role for role, name in roles.items() if name is not None]
        if len(given) == 1:
            other = next(role for role in roles if role not in given)
            raise ValueError(f"{given[0]} {roles[given[0]]!r} needs {other} too: the history lists each user's items")
        if not given:
            return
        if self.time_column is None:
            raise ValueError(
                f"user_column {self.user_column!r} and item_column {self.item_column!r} need a time_column: "
                "the history holds what came strictly before each row"
            )
        if self.user_column == self.item_column:
            raise ValueError(f"user_column and item_column are the same column {self.user_column!r}")
        for role, name in roles.items():
            if name in (self.label, self.time_column):
                what = "label" if name == self.label else "time column"
                raise ValueError(f"{role} {name!r} is the {what}")

    @property
    def features(self) -> tuple[str, ...]:
        """Dense columns, then sparse ones (multi-valued columns not in ``sparse`` last): the spec's order."""
        return (*self.dense, *self.sparse, *(n for n in self.multi_valued if n not in self.sparse))

    @property
    def has_history(self) -> bool:
        """Whether the rows can carry history features: a user, an item and a time column are named."""
        return self.user_column is not None and self.item_column is not None and self.time_column is not None

    @property
    def split_method(self) -> Literal["order", "random", "time"]:
        return "time" if self.time_column is not None else (self.split or "order")

    def fields(self, sparse_options: SparseOptions = SparseOptions()) -> tuple[SchemaField, ...]:
        """The FeatureSpec's raw fields: every sparse column fitted with ``sparse_options``."""
        dense = tuple(SchemaField(n, dense=True, transform=self.transforms.get(n, DEFAULT_TRANSFORM)) for n in self.dense)
        sparse = []
        for name in self.features[len(self.dense):]:
            multi = self.multi_valued.get(name)
            options = sparse_options
            if multi is not None:
                options = replace(options, multi_valued=True, separator=multi.separator, max_values=multi.max_values)
            sparse.append(SchemaField(name, dense=False, options=options))
        return dense + tuple(sparse)


def table_schema(*, schema_file: str | os.PathLike[str] | None = None, **flags: Any) -> TableSchema:
    """A :class:`TableSchema` from a YAML/JSON file and command-line values.

    ``flags`` are :data:`SCHEMA_KEYS` given on the command line, already
    parsed (None: not given); a flag replaces the file's value of that key.
    ``--time-column`` on the command line replaces the file's ``split`` and
    ``--split`` the file's ``time_column``. The file holds the same keys::

        label: income
        positive: ">50K"            # label = (income == ">50K")
        dense: [age, hours_per_week]
        sparse: [workclass, education, occupation]
        multi_valued:
          tags: "|"                 # separator
          genres: {separator: ";", max_values: 6}
        time_column: signup_date    # or split: random
        user_column: user_id        # with item_column and time_column: history features
        item_column: item_id
        transforms: {age: log1p}    # dense columns default to standard
        format: csv                 # parquet, csv or tsv; default: from the file name
    """
    unknown = sorted(set(flags) - set(SCHEMA_KEYS))
    if unknown:
        raise TypeError(f"unknown schema keys: {', '.join(unknown)}")
    values: dict[str, Any] = {}
    where = ""
    if schema_file is not None:
        values = _read_schema_file(schema_file)
        where = f"{os.fspath(schema_file)}: "
    given = {key: value for key, value in flags.items() if value is not None}
    if "time_column" in given:
        values.pop("split", None)
    if "split" in given:
        values.pop("time_column", None)
    try:
        file_values = _normalize(values)
    except ValueError as error:
        raise ValueError(f"{where}{error}") from None
    merged = {**file_values, **given}
    if "label" not in merged:
        raise ValueError("--data table needs --label (or a --schema file with a label)")
    return TableSchema(
        label=merged["label"],
        dense=merged.get("dense", ()),
        sparse=merged.get("sparse", ()),
        positive=merged.get("positive"),
        multi_valued=merged.get("multi_valued", {}),
        time_column=merged.get("time_column"),
        user_column=merged.get("user_column"),
        item_column=merged.get("item_column"),
        split=merged.get("split"),
        transforms=merged.get("transforms", {}),
        format=merged.get("format"),
    )


def _read_schema_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: schema file not found") from None
    if path.suffix.lower() == ".json":
        try:
            payload = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{error.lineno}: not valid JSON: {error.msg}") from None
    else:
        import yaml

        try:
            payload = yaml.safe_load(text)
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            line = f":{mark.line + 1}" if mark is not None else ""
            raise ValueError(f"{path}{line}: not valid YAML: {getattr(error, 'problem', error)}") from None
    if not isinstance(payload, dict):
        raise ValueError(f"{path}: expected a mapping of {', '.join(SCHEMA_KEYS)}, got {type(payload).__name__}")
    unknown = sorted(set(payload) - set(SCHEMA_KEYS))
    if unknown:
        raise ValueError(f"{path}: unknown key {unknown[0]!r}; the keys are {', '.join(SCHEMA_KEYS)}")
    return payload


def _normalize(values: Mapping[str, Any]) -> dict[str, Any]:
    """A schema file's values in the types :class:`TableSchema` takes."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if value is None:
            continue
        if key in ("dense", "sparse"):
            out[key] = parse_columns(value) if isinstance(value, str) else _names(key, value)
        elif key in ("positive", "label", "time_column", "user_column", "item_column"):
            out[key] = _text(key, value)
        elif key == "multi_valued":
            out[key] = _multi_valued(value)
        elif key == "transforms":
            if not isinstance(value, dict):
                raise ValueError(f"transforms: expected a mapping of column to transform, got {value!r}")
            out[key] = {str(name): transform for name, transform in value.items()}
        else:
            out[key] = value
    return out


def _names(key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(name, (str, int)) for name in value):
        raise ValueError(f"{key}: expected a list of column names, got {value!r}")
    return tuple(str(name) for name in value)


def _text(key: str, value: Any) -> str:
    """A YAML scalar as the text it stands for (``yes``/``true`` parse as booleans, ``2024`` as a number)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int, float)):
        return str(value)
    raise ValueError(f"{key}: expected one value, got {value!r}")


def _multi_valued(value: Any) -> dict[str, MultiValued]:
    if isinstance(value, list):
        return {str(name): MultiValued() for name in value}
    if not isinstance(value, dict):
        raise ValueError(f"multi_valued: expected a mapping of column to separator, got {value!r}")
    out = {}
    for name, spec in value.items():
        if isinstance(spec, str):
            out[str(name)] = MultiValued(separator=spec)
        elif isinstance(spec, dict) and set(spec) <= {"separator", "max_values"}:
            out[str(name)] = MultiValued(**spec)
        else:
            raise ValueError(
                f"multi_valued: {name}: expected a separator or {{separator: '|', max_values: 8}}, got {spec!r}"
            )
    return out


# Command-line syntax of the schema flags.

_MULTI_ENTRY = re.compile(r"\s*([^=,\s][^=,]*?)\s*(?:=(.)(?::(\d+))?)?\s*(?:,|$)")


def parse_columns(text: str) -> tuple[str, ...]:
    """``"a, b,c"`` -> ``("a", "b", "c")``."""
    names = tuple(name.strip() for name in text.split(","))
    if not all(names):
        raise ValueError(f"expected comma-separated column names, got {text!r}")
    return names


def parse_multi_valued(text: str) -> dict[str, MultiValued]:
    """``"tags=|,genres=;:6,topics"`` -> columns with their separator (one character, default
    ``|``, may itself be a comma) and, after a colon, how many values a row keeps."""
    out: dict[str, MultiValued] = {}
    position = 0
    while position < len(text):
        match = _MULTI_ENTRY.match(text, position)
        if match is None or match.end() == position:
            raise ValueError(f"expected COLUMN[=SEPARATOR[:MAX_VALUES]],... got {text!r}")
        name, separator, max_values = match.groups()
        out[name] = MultiValued(
            separator=separator or "|", max_values=int(max_values) if max_values else DEFAULT_MAX_VALUES
        )
        position = match.end()
    if not out:
        raise ValueError(f"expected COLUMN[=SEPARATOR[:MAX_VALUES]],... got {text!r}")
    return out


def parse_transforms(text: str) -> dict[str, DenseTransform]:
    """``"age=log1p,fnlwgt=identity"`` -> ``{"age": "log1p", "fnlwgt": "identity"}``."""
    out: dict[str, Any] = {}
    for entry in text.split(","):
        name, equals, transform = entry.partition("=")
        if not equals or not name.strip() or transform.strip() not in TRANSFORMS:
            raise ValueError(f"expected COLUMN=TRANSFORM with a transform among {', '.join(TRANSFORMS)}, got {entry!r}")
        out[name.strip()] = transform.strip()
    return out


def detect_format(path: str | os.PathLike[str]) -> FileFormat:
    """The format a file name implies (``.parquet``/``.pq``, ``.csv``, ``.tsv``/``.tab``, each optionally ``.gz``)."""
    name = os.path.basename(os.fspath(path)).lower()
    for compressed in (".gz", ".gzip"):
        name = name.removesuffix(compressed)
    file_format = _EXTENSIONS.get(os.path.splitext(name)[1])
    if file_format is None:
        raise DataError(path, "cannot tell the format from the file name: pass --format parquet, csv or tsv")
    return file_format


# --------------------------------------------------------------------------
# The source
# --------------------------------------------------------------------------


class TableSource:
    """A Parquet, CSV or TSV file as a streaming :class:`training.data.DataSource`.

    ``rows`` keeps the first N rows of the file (before splitting); ``seed``
    seeds the ``random`` split; ``chunk_rows`` is the size of every chunk
    but the last of each split. ``block_size`` is how many bytes pyarrow
    parses at once (CSV/TSV); ``use_threads`` lets it use several cores.
    ``history_length`` is the number of past items in each history feature
    when the schema names a user, an item and a time column (0: no history
    features; without those columns it has no effect).

    The history needs every row's user, item, time and label at hand: they
    are read in the one pass over the file that reads the time column for
    the split, before the first chunk. That holds at most 48 bytes per row
    for the whole run (each row's user and time codes, 16, and two sorted
    indexes of 16 bytes per entry, one of every row, one of the positive
    rows), plus each distinct user and item id once as text. While the pass
    runs, the peak is about 110 bytes per row (300,000 rows, half of them
    positive: 43 held, 110 at the peak), plus the text of the user and item
    columns. The features themselves are computed per chunk as it is read.
    """

    name = "table"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        table: TableSchema,
        rows: int | None = None,
        seed: int = 0,
        chunk_rows: int = 262_144,
        sparse_options: SparseOptions = SparseOptions(),
        block_size: int = 1 << 20,
        use_threads: bool = True,
        history_length: int = DEFAULT_HISTORY_LENGTH,
    ):
        if isinstance(history_length, bool) or not isinstance(history_length, int) or history_length < 0:
            raise ValueError(f"history_length must be an int >= 0 (0: no history features), got {history_length!r}")
        self.path = checked_file(path, rows=rows, chunk_rows=chunk_rows, block_size=block_size, expected="a Parquet, CSV or TSV file")
        self.table = table
        self.format: FileFormat = table.format or detect_format(self.path)
        self.rows = rows
        self.seed = seed
        self.chunk_rows = chunk_rows
        self.block_size = block_size
        self.use_threads = use_threads
        self.history_length = history_length if table.has_history else 0
        self.schema = table.fields(sparse_options)
        if self.history_length:
            self.schema += history_schema(
                length=self.history_length, items=sparse_options, candidate=self.table.item_column
            )
        if self.format == "parquet":
            try:
                self._parquet = pq.ParquetFile(self.path)
            except (pa.ArrowInvalid, OSError) as error:
                raise DataError(self.path, f"not a readable Parquet file: {error}") from None
            metadata = self._parquet.metadata
            sizes = [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)]
            self._group_starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
            self.columns: tuple[str, ...] = tuple(self._parquet.schema_arrow.names)
        else:
            with open(self.path, "rb") as handle:
                self._compressed = handle.read(2) == _GZIP_MAGIC
            self.columns = self._read_header()
        self._check_columns()
        self._num_rows: int | None = None
        self._assignment: np.ndarray | None = None  # int8 split code of each row (random and time splits)
        self._history: _History | None = None  # built with the time split when history_length > 0

    # -- splits --------------------------------------------------------------

    @property
    def num_rows(self) -> int:
        """Rows used: the file's rows, capped at ``rows``."""
        return self._plan()

    def split_rows(self, split: Split) -> int:
        self._plan()
        if self._assignment is None:
            start, end = self._bounds(split)
            return end - start
        return int(np.count_nonzero(self._assignment == _code(split)))

    def _bounds(self, split: Split) -> tuple[int, int]:
        return time_split_bounds(self.num_rows)[SPLITS[_code(split)]]

    def _plan(self) -> int:
        """Count the rows and, for a random or time split, assign each row to its split (once); the row count."""
        if self._num_rows is not None:
            return self._num_rows
        method = self.table.split_method
        if method == "time":
            order = np.argsort(self._read_history() if self.history_length else self._time_keys(), kind="stable")
            num_rows = len(order)
        else:
            num_rows = self._count_rows()
            order = np.random.default_rng(self.seed).permutation(num_rows) if method == "random" else None
        if num_rows < 10:  # every split needs a row
            raise DataError(self.path, f"{num_rows} rows are too few to split 80/10/10: at least 10 are needed")
        if order is not None:
            assignment = np.empty(num_rows, np.int8)
            for code, (start, end) in enumerate(time_split_bounds(num_rows).values()):
                assignment[order[start:end]] = code
            self._assignment = assignment
        self._num_rows = num_rows
        return num_rows

    def _count_rows(self) -> int:
        if self.format == "parquet":
            total = int(self._group_starts[-1])
        else:
            total = self._count_lines() - 1  # the header
        return total if self.rows is None else min(total, self.rows)

    def _count_lines(self) -> int:
        lines, last_byte = 0, b"\n"
        try:
            with self._open_stream() as stream:
                while block := stream.read(16 << 20):
                    lines += block.count(b"\n")
                    last_byte = block[-1:]
                    if self.rows is not None and lines > self.rows:
                        break
        except OSError as error:  # a damaged gzip stream
            raise DataError(self.path, f"cannot read the file: {error}") from None
        return lines + (last_byte != b"\n")  # a last line without a newline

    def _time_keys(self) -> np.ndarray:
        """The time column of the rows used, as sortable numbers (one pass reading that column only)."""
        name = self.table.time_column
        assert name is not None
        stop = self.rows if self.rows is not None else sys.maxsize
        reader = _TimeReader(self, name)
        parts = [reader.convert(batch.column(0), first) for first, batch in self._batches([name], stop=stop)]
        return np.concatenate(parts) if parts else np.zeros(0, np.float64)

    def _read_history(self) -> np.ndarray:
        """The time keys of :meth:`_time_keys`, reading the user, item and label columns in the
        same pass to index every row's interaction for the history features."""
        table = self.table
        time_name, user_name, item_name = table.time_column, table.user_column, table.item_column
        assert time_name is not None and user_name is not None and item_name is not None
        stop = self.rows if self.rows is not None else sys.maxsize
        reader = _TimeReader(self, time_name)
        times, users, items, positive = [], [], [], []
        for first, batch in self._batches([time_name, user_name, item_name, table.label], stop=stop):
            rows = np.arange(first, first + batch.num_rows, dtype=np.int64)
            times.append(reader.convert(batch.column(time_name), first))
            users.append(self._key_text(user_name, batch.column(user_name), rows))
            items.append(self._key_text(item_name, batch.column(item_name), rows))
            positive.append(self._labels(batch.column(table.label), rows) > 0)
        if not times:
            return np.zeros(0, np.float64)
        keys = np.concatenate(times)
        user_codes, _ = _codes(users)
        item_codes, item_names = _codes(items)
        del users, items
        separated = pc.match_substring(item_names, HISTORY_SEPARATOR)
        if pc.any(separated).as_py():
            example = item_names.filter(separated)[0].as_py()
            raise DataError(self.path, f"column {item_name!r} holds the item id {_show(example)}, which contains "
                                       f"{HISTORY_SEPARATOR!r}, the separator of the history features")
        # Each time's rank among the distinct times: the same order, equal times stay equal, and the
        # history index's keys stay small whatever the unit (nanosecond timestamps, fractional seconds).
        _, ranks = np.unique(keys, return_inverse=True)
        ranks = ranks.astype(np.int64).reshape(-1)
        known = (user_codes >= 0) & (item_codes >= 0)  # a row without a user or item is no interaction
        liked = known & np.concatenate(positive)
        self._history = _History(
            users=user_codes,
            times=ranks,
            every=HistoryIndex(user_codes[known], item_codes[known], ranks[known]),
            liked=HistoryIndex(user_codes[liked], item_codes[liked], ranks[liked]),
            item_names=item_names,
        )
        return keys

    # -- streaming -----------------------------------------------------------

    def chunks(self, split: Split) -> Iterator[Chunk]:
        self._plan()
        code = _code(split)
        names = [self.table.label, *self.table.features]
        if self._assignment is None:
            start, end = self._bounds(split)
            if start == end:
                return
            wanted: Callable[[int, int], bool] = lambda lo, hi: lo < end and hi > start
            stop = end
        else:
            assignment = self._assignment
            wanted = lambda lo, hi: bool((assignment[lo:hi] == code).any())
            stop = self.num_rows
        pending: list[pa.RecordBatch] = []
        pending_rows: list[np.ndarray] = []
        count = 0
        for first, batch in self._batches(names, stop=stop, wanted=wanted, expected=stop):
            if self._assignment is None:
                lo, hi = max(start - first, 0), min(end - first, batch.num_rows)
                if hi <= lo:
                    continue
                batch, rows = batch.slice(lo, hi - lo), np.arange(first + lo, first + hi, dtype=np.int64)
            else:
                mask = self._assignment[first : first + batch.num_rows] == code
                if not mask.any():
                    continue
                batch, rows = batch.filter(pa.array(mask)), np.flatnonzero(mask) + first
            pending.append(batch)
            pending_rows.append(rows)
            count += len(rows)
            while count >= self.chunk_rows:
                table, all_rows = pa.Table.from_batches(pending), np.concatenate(pending_rows)
                yield self._to_chunk(table.slice(0, self.chunk_rows), all_rows[: self.chunk_rows])
                rest = table.slice(self.chunk_rows)
                pending, pending_rows, count = rest.to_batches(), [all_rows[self.chunk_rows :]], rest.num_rows
        if count:
            yield self._to_chunk(pa.Table.from_batches(pending), np.concatenate(pending_rows))

    def _batches(
        self,
        names: list[str],
        *,
        stop: int,
        wanted: Callable[[int, int], bool] = lambda lo, hi: True,
        expected: int | None = None,
    ) -> Iterator[tuple[int, pa.RecordBatch]]:
        """``(first row, batch)`` of the rows before ``stop``, in file order, holding ``names`` only.

        ``wanted(lo, hi)`` says whether rows ``[lo, hi)`` are needed (Parquet
        skips row groups without any); ``expected`` is how many rows a text
        file must have before ``stop`` (as counted from its lines).
        """
        read = self._parquet_batches if self.format == "parquet" else self._text_batches
        for first, batch in read(names, wanted):
            if first >= stop:
                return
            yield first, batch.slice(0, stop - first) if first + batch.num_rows > stop else batch
            if first + batch.num_rows >= stop:
                return
        if expected is not None and self.format != "parquet":  # Parquet's row count is in its metadata
            raise DataError(self.path, f"the file ended before its {expected} rows: it changed while being read")

    def _parquet_batches(self, names: list[str], wanted: Callable[[int, int], bool]) -> Iterator[tuple[int, pa.RecordBatch]]:
        starts = self._group_starts
        for group in range(len(starts) - 1):
            first = int(starts[group])
            if not wanted(first, int(starts[group + 1])):
                continue
            try:
                for batch in self._parquet.iter_batches(
                    batch_size=min(self.chunk_rows, 65_536), row_groups=[group], columns=names,
                    use_threads=self.use_threads,
                ):
                    yield first, batch
                    first += batch.num_rows
            except (pa.ArrowException, OSError) as error:
                raise DataError(self.path, f"row group {group}: cannot read: {error}") from None

    def _text_batches(self, names: list[str], wanted: Callable[[int, int], bool]) -> Iterator[tuple[int, pa.RecordBatch]]:
        first = 0
        with self._open_stream() as stream:
            try:
                reader = pa_csv.open_csv(
                    stream,
                    read_options=pa_csv.ReadOptions(
                        column_names=list(self.columns), skip_rows=1, block_size=self.block_size,
                        use_threads=self.use_threads,
                    ),
                    parse_options=pa_csv.ParseOptions(
                        delimiter="," if self.format == "csv" else "\t",
                        quote_char='"' if self.format == "csv" else False,
                        ignore_empty_lines=False,  # every line is a row, so a row's line number is known
                    ),
                    convert_options=pa_csv.ConvertOptions(
                        include_columns=names,
                        column_types={name: pa.string() for name in names},
                        strings_can_be_null=True,
                    ),
                )
                for batch in reader:
                    yield first, _trimmed(batch)
                    first += batch.num_rows
            except (pa.ArrowInvalid, OSError) as error:
                raise self._locate(first, error) from None

    def _to_chunk(self, table: pa.Table, rows: np.ndarray) -> Chunk:
        """Arrow rows -> a Chunk; ``rows`` are the rows' positions in the file, for error messages."""
        columns: dict[str, Any] = {}
        for name in self.table.dense:
            columns[name] = self._dense(name, _array(table, name), rows)
        for name in self.table.features[len(self.table.dense):]:
            columns[name] = self._sparse(name, _array(table, name), rows)
        if self._history is not None:
            history = self._history
            columns.update(history_columns(history.every, history.liked, history.users[rows], history.times[rows],
                                           length=self.history_length, item_names=history.item_names))
        return Chunk(columns=columns, labels=self._labels(_array(table, self.table.label), rows))

    # -- column conversion ---------------------------------------------------

    def _dense(self, name: str, array: pa.Array, rows: np.ndarray) -> np.ndarray:
        kind = array.type
        if pa.types.is_dictionary(kind):
            return self._dense(name, array.dictionary_decode(), rows)
        if pa.types.is_null(kind):
            return np.full(len(array), np.nan)
        if pa.types.is_string(kind) or pa.types.is_large_string(kind):
            numbers = self._cast(name, array, pa.float64(), rows, "expected a number")
        elif pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind) or pa.types.is_decimal(kind):
            numbers = pc.cast(array, pa.float64())
        else:
            raise DataError(self.path, f"column {name!r} holds {kind} values: a dense column needs numbers")
        values = numbers.to_numpy(zero_copy_only=False)  # null -> NaN, the FeatureSpec's missing
        infinite = np.flatnonzero(np.isinf(values))
        if len(infinite):
            raise self._error(rows[infinite[0]], name, f"expected a finite number, got {values[infinite[0]]}")
        return values

    def _sparse(self, name: str, array: pa.Array, rows: np.ndarray) -> StringColumn:
        kind = array.type
        if pa.types.is_dictionary(kind):
            return self._sparse(name, array.dictionary_decode(), rows)
        if pa.types.is_null(kind):
            return StringColumn(np.zeros(0, np.uint8), np.zeros(len(array) + 1, np.int64))
        if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
            multi = self.table.multi_valued.get(name)
            if multi is None:
                raise DataError(self.path, f"column {name!r} holds lists: declare it multi-valued (--multi-valued {name})")
            array = self._join_lists(name, array, multi.separator, rows)
        else:
            array = self._text(name, array, rows)
        return string_column_from_arrow(array)

    def _text(self, name: str, array: pa.Array, rows: np.ndarray) -> pa.Array:
        """One value per row as text (integers and booleans as their text); missing stays null."""
        kind = array.type
        if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
            return self._cast(name, array, pa.string(), rows, "not valid UTF-8")
        if pa.types.is_string(kind) or pa.types.is_large_string(kind):
            return array
        return self._as_text(name, array)

    def _key_text(self, name: str, array: pa.Array, rows: np.ndarray) -> pa.Array:
        """A user or item column as ``string`` ids, as the sparse features read them (missing: null)."""
        kind = array.type
        if pa.types.is_dictionary(kind):
            return self._key_text(name, array.dictionary_decode(), rows)
        if pa.types.is_null(kind):
            return pa.nulls(len(array), pa.string())
        if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
            raise DataError(self.path, f"column {name!r} holds lists: a user or item column holds one id per row")
        return pc.cast(self._text(name, array, rows), pa.string())

    def _join_lists(self, name: str, array: pa.Array, separator: str, rows: np.ndarray) -> pa.Array:
        """A list column -> each row's values joined by ``separator`` (a null list: missing)."""
        values = pc.list_flatten(array)
        if pa.types.is_binary(values.type) or pa.types.is_large_binary(values.type):
            values = self._cast(name, values, pa.string(), None, "not valid UTF-8")
        elif not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
            values = self._as_text(name, values)
        lengths = pc.list_value_length(array).fill_null(0).to_numpy(zero_copy_only=False)
        offsets = np.zeros(len(array) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        # A null value inside a list is no value: it joins as an empty token, which splitting drops.
        lists = pa.LargeListArray.from_arrays(pa.array(offsets), values.fill_null(""), mask=array.is_null())
        return pc.binary_join(lists, separator)

    def _as_text(self, name: str, array: pa.Array) -> pa.Array:
        try:
            return pc.cast(array, pa.string())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raise DataError(self.path, f"column {name!r} holds {array.type} values, which have no text form") from None

    def _labels(self, array: pa.Array, rows: np.ndarray) -> np.ndarray:
        name, kind = self.table.label, array.type
        if pa.types.is_dictionary(kind):
            return self._labels(array.dictionary_decode(), rows)
        if array.null_count:
            missing = np.flatnonzero(array.is_null().to_numpy(zero_copy_only=False))
            raise self._error(rows[missing[0]], name, "missing label")
        numeric = pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind)
        if self.table.positive is not None:
            return self._positive(array, numeric).astype(np.float32)
        if pa.types.is_boolean(kind):
            return array.to_numpy(zero_copy_only=False).astype(np.float32)
        if numeric:
            values = pc.cast(array, pa.float64()).to_numpy(zero_copy_only=False)
            ones, zeros = values == 1, values == 0
        elif pa.types.is_string(kind) or pa.types.is_large_string(kind):
            text = pc.utf8_lower(array)
            ones = pc.is_in(text, value_set=pa.array(["1", "true", "1.0"])).to_numpy(zero_copy_only=False)
            zeros = pc.is_in(text, value_set=pa.array(["0", "false", "0.0"])).to_numpy(zero_copy_only=False)
        else:
            raise DataError(self.path, f"the label column {name!r} holds {kind} values: use --positive VALUE")
        bad = np.flatnonzero(~(ones | zeros))
        if len(bad):
            raise self._error(
                rows[bad[0]], name,
                f"a label must be 0/1 or true/false, got {_show(array[int(bad[0])].as_py())} "
                "(name the positive class with --positive VALUE)",
            )
        return ones.astype(np.float32)

    def _positive(self, array: pa.Array, numeric: bool) -> np.ndarray:
        positive = self.table.positive
        assert positive is not None
        if numeric:
            try:
                target = float(positive)
            except ValueError:
                raise DataError(
                    self.path, f"the label column {self.table.label!r} holds numbers; --positive {positive!r} is not one"
                ) from None
            return pc.cast(array, pa.float64()).to_numpy(zero_copy_only=False) == target
        text = pc.utf8_lower(self._as_text(self.table.label, array)) if pa.types.is_boolean(array.type) else array
        if not (pa.types.is_string(text.type) or pa.types.is_large_string(text.type)):
            text = self._as_text(self.table.label, text)
        wanted = positive.lower() if pa.types.is_boolean(array.type) else positive
        return pc.equal(text, pa.scalar(wanted, text.type)).to_numpy(zero_copy_only=False)

    def _cast(self, name: str, array: pa.Array, target: pa.DataType, rows: np.ndarray | None, problem: str) -> pa.Array:
        """Cast, or raise naming the first row whose value does not convert."""
        try:
            return pc.cast(array, target)
        except pa.ArrowInvalid:
            bad = _first_failure(array, lambda part: pc.cast(part, target))
        if rows is None:  # the value's row is not known (inside a list)
            raise DataError(self.path, f"column {name!r}: {problem}: {_show(array[bad].as_py())}")
        raise self._error(rows[bad], name, f"{problem}, got {_show(array[bad].as_py())}")

    def _error(self, row: int, column: str, problem: str) -> DataError:
        """A DataError naming the file, where the row is, and the column."""
        row = int(row)
        if self.format == "parquet":
            group = int(np.searchsorted(self._group_starts, row, side="right")) - 1
            where = f"row group {group}, row {row - int(self._group_starts[group])} (file row {row})"
            return DataError(self.path, f"{where}: column {column!r}: {problem}")
        return DataError(self.path, f"column {column!r}: {problem}", line=row + 2)  # line 1 is the header

    # -- text files ------------------------------------------------------------

    def _open_bytes(self) -> IO[bytes]:
        return gzip.open(self.path, "rb") if self._compressed else open(self.path, "rb")

    def _open_stream(self) -> pa.NativeFile:
        if self._compressed:
            # Arrow's inflater is faster than the gzip module, and reads multi-member files too.
            return pa.CompressedInputStream(pa.OSFile(self.path), "gzip")
        return pa.OSFile(self.path)

    def _dialect(self) -> dict[str, Any]:
        if self.format == "csv":
            return {"delimiter": ",", "quotechar": '"', "doublequote": True, "strict": True}
        return {"delimiter": "\t", "quoting": csv.QUOTE_NONE}

    def _read_header(self) -> tuple[str, ...]:
        head = b""
        try:
            with self._open_bytes() as stream:
                while b"\n" not in head and len(head) < _HEADER_LIMIT:
                    block = stream.read(1 << 16)
                    if not block:
                        break
                    head += block
        except (OSError, EOFError) as error:  # a damaged gzip stream
            raise DataError(self.path, f"cannot read the file: {error}") from None
        line = head.split(b"\n", 1)[0].rstrip(b"\r")
        if not line.strip():
            raise DataError(self.path, "expected a header line naming the columns", line=1)
        try:
            text = line.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise DataError(self.path, "the header is not valid UTF-8", line=1) from None
        try:
            names = next(csv.reader([text], **self._dialect()))
        except csv.Error as error:
            raise DataError(self.path, f"cannot parse the header: {error}", line=1) from None
        return tuple(name.strip() for name in names)

    def _locate(self, first_row: int, error: BaseException) -> DataError:
        """Re-read from ``first_row`` line by line to name the first line Arrow cannot parse (errors only)."""
        if isinstance(error, OSError):
            return DataError(self.path, f"cannot read the file: {error}")
        first_line = first_row + 2  # line 1 is the header
        budget = 4 * self.block_size + (1 << 20)  # the failing block lies within this many bytes
        try:
            with self._open_bytes() as stream:
                for number, line in enumerate(stream, start=1):
                    if number < first_line:
                        continue
                    problem = self._check_line(line)
                    if problem is not None:
                        return DataError(self.path, problem, line=number)
                    budget -= len(line)
                    if budget < 0:
                        break
        except (OSError, EOFError) as read_error:
            return DataError(self.path, f"cannot read the file: {read_error}")
        return DataError(self.path, f"cannot parse the rows from this line on: {error}", line=first_line)

    def _check_line(self, line: bytes) -> str | None:
        """Why Arrow rejects this line, or None when it is well formed."""
        line = line.removesuffix(b"\n").removesuffix(b"\r")
        if b"\r" in line:
            return "carriage return inside a line"
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            return "not valid UTF-8"
        if not text and len(self.columns) > 1:
            return "empty line"
        try:
            fields = next(csv.reader([text], **self._dialect()), [])
        except csv.Error as error:
            return f"cannot parse the line: {error}"
        if len(fields) != len(self.columns):
            separator = "comma" if self.format == "csv" else "tab"
            return f"expected {len(self.columns)} {separator}-separated fields (as in the header), found {len(fields)}"
        return None

    def _check_columns(self) -> None:
        needed = [self.table.label, *self.table.features]
        for name in (self.table.time_column, self.table.user_column, self.table.item_column):
            if name is not None and name not in needed:
                needed.append(name)
        for name in needed:
            count = self.columns.count(name)
            if count == 0:
                raise DataError(self.path, f"no column {name!r}; the file's columns are: {', '.join(self.columns)}")
            if count > 1:
                raise DataError(self.path, f"column {name!r} appears {count} times in the header")
        if self.history_length:
            added = (*HISTORY_FEATURES, *HISTORY_STATISTICS)
            for name in added:
                if name in self.columns:
                    raise DataError(
                        self.path,
                        f"column {name!r} has the name of a history feature ({', '.join(added)}), which the user, "
                        "item and time columns add: rename the column, or turn the history off with --history-length 0",
                    )


@dataclass(frozen=True)
class _History:
    """What the history features of any row are computed from (see :class:`TableSource`)."""

    users: np.ndarray  # int64[N] each row's user code (-1: missing)
    times: np.ndarray  # int64[N] each row's rank among the distinct times
    every: HistoryIndex  # every row with a user and an item, items as codes into item_names
    liked: HistoryIndex  # the positive ones
    item_names: pa.Array  # string: each item code's id


def _codes(parts: list[pa.Array]) -> tuple[np.ndarray, pa.Array]:
    """``string`` ids -> ``int64`` codes into the distinct ids (missing and empty: -1), and those ids."""
    encoded = pc.dictionary_encode(pa.chunked_array(parts, pa.string()))
    if not encoded.num_chunks:
        return np.zeros(0, np.int64), pa.array([], pa.string())
    names = encoded.chunk(0).dictionary  # one dictionary for every chunk
    codes = np.concatenate([
        chunk.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64) for chunk in encoded.chunks
    ])
    empty = pc.index(names, "").as_py()
    if empty >= 0:  # an empty id is no id, as the FeatureSpec reads it
        codes[codes == empty] = -1
    return codes, names


class _TimeReader:
    """Converts a time column batch by batch into sortable numbers.

    Numbers, dates and timestamps sort as they are; text is read as numbers
    or, failing that, as dates/times, decided by the first batch so every
    row compares on the same scale.
    """

    def __init__(self, source: TableSource, name: str):
        self.source, self.name = source, name
        self.text_as: pa.DataType | None = None

    def convert(self, column: pa.Array, first: int) -> np.ndarray:
        array = column.dictionary_decode() if pa.types.is_dictionary(column.type) else column
        rows = np.arange(first, first + len(array), dtype=np.int64)
        if array.null_count:
            missing = np.flatnonzero(array.is_null().to_numpy(zero_copy_only=False))
            raise self.source._error(rows[missing[0]], self.name, "missing time value")
        kind = array.type
        if pa.types.is_string(kind) or pa.types.is_large_string(kind):
            if self.text_as is None:
                self.text_as = _text_time_type(array)
            array = self.source._cast(self.name, array, self.text_as, rows, "expected a number or a date/time like the rows before")
            kind = array.type
        if pa.types.is_timestamp(kind) or pa.types.is_date(kind):
            return pc.cast(pc.cast(array, pa.timestamp("ns")) if pa.types.is_date(kind) else array, pa.int64()).to_numpy()
        if pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind):
            return pc.cast(array, pa.float64()).to_numpy(zero_copy_only=False)
        raise DataError(self.source.path, f"time column {self.name!r} holds {kind} values: expected numbers, dates or times")


def _text_time_type(array: pa.Array) -> pa.DataType:
    """Numbers or timestamps: whichever reads more of the leading values of a text column."""
    candidates = (pa.float64(), pa.timestamp("ns"))
    reach = []
    for candidate in candidates:
        try:
            pc.cast(array, candidate)
            return candidate
        except pa.ArrowInvalid:
            reach.append(_first_failure(array, lambda part, target=candidate: pc.cast(part, target)))
    return candidates[int(np.argmax(reach))]


def _code(split: Split) -> int:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    return SPLITS.index(split)


def _array(table: pa.Table, name: str) -> pa.Array:
    column = table.column(name)
    return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()


# Arrow's own null spellings (empty, NA, null, NaN, ...), matched again once values are trimmed.
_NULL_SPELLINGS = pa.array(pa_csv.ConvertOptions().null_values, pa.string())


def _trimmed(batch: pa.RecordBatch) -> pa.RecordBatch:
    """Text values without surrounding whitespace (``a, b`` files); `` NA`` is missing like ``NA``."""
    columns = []
    for column in batch.columns:
        trimmed = pc.utf8_trim_whitespace(column)
        columns.append(pc.if_else(pc.is_in(trimmed, value_set=_NULL_SPELLINGS), pa.scalar(None, pa.string()), trimmed))
    return pa.RecordBatch.from_arrays(columns, names=batch.schema.names)


def _first_failure(array: pa.Array, convert: Callable[[pa.Array], Any]) -> int:
    """Index of the first value ``convert`` rejects, by bisection (``convert`` rejects ``array``)."""
    low, high = 0, len(array)  # the first failure lies in [low, high)
    while high - low > 1:
        middle = (low + high) // 2
        try:
            convert(array.slice(low, middle - low))
            low = middle
        except pa.ArrowInvalid:
            high = middle
    return low


def _show(value: Any) -> str:
    text = value if isinstance(value, str) else str(value)
    return repr(text if len(text) <= 40 else text[:40] + "...")
