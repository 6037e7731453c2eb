"""Data sources: each yields chunks of raw columns that the FeatureSpec encodes.

A source knows its raw schema (which fields are dense, how categorical ones
are fitted) and splits its rows into ``train``, ``val`` and ``test`` without
leaking: the FeatureSpec is fitted on ``train`` only. Sources stream chunks,
so a file larger than memory can be trained on.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np

from training.fitting import (
    DEFAULT_BUCKETS,
    SchemaField,
    SparseOptions,
    bucketize_schema,
)

if TYPE_CHECKING:
    from training.data.table import TableSchema

Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = ("train", "val", "test")
SOURCE_NAMES = ("synthetic", "criteo", "movielens", "table", "synthetic-useritem")
# Sources with user ids and timestamps: they can be split per user (leave-last-out).
USER_ITEM_SOURCE_NAMES = ("movielens", "synthetic-useritem")


class DataError(ValueError):
    """A data file cannot be read; the message names the path (and line when known)."""

    def __init__(self, path: str | os.PathLike[str], problem: str, *, line: int | None = None):
        self.path = os.fspath(path)
        self.line = line
        self.problem = problem
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {problem}")


@dataclass
class Chunk:
    """Rows of one split: raw feature columns, labels, and per-row extras.

    ``columns`` follows :data:`featurespec.Columns`. ``extras`` carries
    what evaluation needs beyond the label: ``probability`` (the synthetic
    source's true click probability, for the oracle AUC), ``user`` and
    ``timestamp`` (MovieLens, for per-user ranking metrics).
    """

    columns: dict[str, Any]
    labels: np.ndarray  # float32[N], 0 or 1
    extras: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)


class DataSource(Protocol):
    name: str
    schema: tuple[SchemaField, ...]

    def chunks(self, split: Split) -> Iterator[Chunk]:
        """Stream the rows of one split; the same rows in the same order on every call."""
        ...

    def split_rows(self, split: Split) -> int:
        """How many rows one split has."""
        ...


def checked_file(
    path: str | os.PathLike[str], *, rows: int | None, chunk_rows: int, block_size: int, expected: str
) -> str:
    """The reading options of a file source checked, and its path as a string.

    ``expected`` names the kind of file in the error for a path that is not a file.
    """
    if rows is not None and rows < 1:
        raise ValueError(f"rows must be >= 1 (or None for the whole file), got {rows}")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    if block_size < 1024:
        raise ValueError(f"block_size must be >= 1024 bytes, got {block_size}")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(path, "file not found")
    if not os.path.isfile(path):
        raise DataError(path, f"not a file (expected {expected})")
    return path


_SPLIT_TENTHS = {"train": (0, 8), "val": (8, 9), "test": (9, 10)}


def time_split_bounds(num_rows: int) -> dict[Split, tuple[int, int]]:
    """``[start, end)`` row ranges of each split: the first 80% train, then 10% val, 10% test."""
    return {split: (num_rows * lo // 10, num_rows * hi // 10) for split, (lo, hi) in _SPLIT_TENTHS.items()}


class TimeOrderedSplits:
    """Mixin for sources whose rows are in time order: splits are consecutive 80/10/10 slices.

    The subclass provides ``num_rows``.
    """

    num_rows: int

    def split_bounds(self, split: Split) -> tuple[int, int]:
        """``[start, end)`` row positions (0-based, in time order) of one split."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        return time_split_bounds(self.num_rows)[split]

    def split_rows(self, split: Split) -> int:
        """How many rows one split has."""
        start, end = self.split_bounds(split)
        return end - start


def open_source(
    name: str,
    *,
    path: str | os.PathLike[str] | None = None,
    rows: int | None = None,
    seed: int = 0,
    chunk_rows: int = 262_144,
    sparse_options: SparseOptions | None = None,
    bucketize: Sequence[str] = (),
    buckets: int = DEFAULT_BUCKETS,
    table: TableSchema | None = None,
    split: str = "time",
    history_length: int | None = None,
    negatives: float = 0,
    items: int | None = None,
) -> DataSource:
    """Build a data source by name (the ``--data`` choices of ``python -m training``).

    ``sparse_options`` (how categorical features are fitted) applies to the
    Criteo-shaped sources and to every sparse column of a table; MovieLens
    has per-feature defaults of its own. ``table`` says which columns of a
    ``table`` source are the label and the features.
    ``bucketize`` names dense fields (or ``"all"``) that also get a
    categorical feature of their quantile bin, out of at most ``buckets``.
    ``split`` (``"time"`` or ``"leave-last-out"``) and ``negatives``
    (sampled negatives per training rating) apply to user-item data
    (MovieLens); ``history_length`` (past items per history feature, 0 for
    none, None for the default) to MovieLens and to a table with user, item
    and time columns. ``items`` (the catalogue's size, None for the source's
    default) applies to synthetic-useritem only.
    """
    if items is not None and name != "synthetic-useritem":
        raise ValueError(f"items {items} sets the catalogue of --data synthetic-useritem, not of {name}")
    if split != "time" and name not in USER_ITEM_SOURCE_NAMES:
        raise ValueError(
            f"split {split!r} needs user ids: it applies to --data {' or '.join(USER_ITEM_SOURCE_NAMES)}, not {name}"
        )
    options = sparse_options or SparseOptions()
    from training.data.interactions import DEFAULT_HISTORY_LENGTH

    history = DEFAULT_HISTORY_LENGTH if history_length is None else history_length
    source: DataSource
    if name == "synthetic":
        from training.data.synthetic import SyntheticSource

        source = SyntheticSource(rows=rows or 200_000, seed=seed, chunk_rows=chunk_rows, sparse_options=options)
    elif name == "synthetic-useritem":
        from training.data.synthetic_useritem import SyntheticUserItemSource

        catalogue = {} if items is None else {"items": items}
        source = SyntheticUserItemSource(rows=rows, seed=seed, chunk_rows=chunk_rows, split=split,  # type: ignore[arg-type]
                                         history_length=history, **catalogue)
    elif name not in SOURCE_NAMES:
        raise ValueError(f"unknown data source {name!r}; choose one of {', '.join(SOURCE_NAMES)}")
    elif path is None:
        raise ValueError(f"--data {name} needs --data-path")
    elif name == "criteo":
        from training.data.criteo import CriteoSource

        source = CriteoSource(path, rows=rows, chunk_rows=chunk_rows, sparse_options=options)
    elif name == "table":
        from training.data.table import TableSource

        if table is None:
            raise ValueError("--data table needs --label, --dense and --sparse (or --schema FILE)")
        source = TableSource(path, table=table, rows=rows, seed=seed, chunk_rows=chunk_rows, sparse_options=options,
                             history_length=history)
    else:
        from training.data.movielens import MovieLensSource

        source = MovieLensSource(path, rows=rows, chunk_rows=chunk_rows, split=split,  # type: ignore[arg-type]
                                 history_length=history, negatives=negatives, seed=seed)
    if bucketize:
        source.schema = bucketize_schema(source.schema, bucketize, bins=buckets)
    return source
