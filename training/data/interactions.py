"""User-item interactions: per-user splits and history features.

Shared by the user-item sources (MovieLens, and a table with user, item and
time columns) and by the ranking evaluation (:mod:`training.evaluation`):

* :func:`leave_last_out` assigns each user's last interaction to ``test``,
  the one before to ``val`` and the rest to ``train``.
* :class:`HistoryIndex` answers "which items did this user interact with
  strictly before time t, most recent first", for many ``(user, t)`` at once.
  Interactions at exactly ``t`` are left out, so rows with the same
  timestamp never see each other, and nothing at or after ``t`` (a later
  row, a val or test row) can leak into the history of a row at ``t``.
* :func:`join_ids` turns those item matrices into the packed ``|``-joined
  text a multi-valued FeatureSpec feature encodes, the same text a serving
  request's ``"history": ["242", "51", ...]`` list encodes to.
* :func:`history_schema` and :func:`history_columns` are the four history
  features every user-item source adds, fitted and computed one way:
  ``history`` (the items of the user's last N interactions strictly before
  the row's time, most recent first), ``history_liked`` (the same over the
  positives), ``rated_before`` (how many interactions) and ``liked_share``
  (the share of them that are positives; missing before the first one).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pa_compute

from featurespec import StringColumn
from featurespec.arrow import string_column_from_arrow
from training.data import SPLITS, time_split_bounds
from training.fitting import SchemaField, SparseOptions

SplitName = Literal["time", "leave-last-out"]
SPLIT_NAMES: tuple[SplitName, ...] = ("time", "leave-last-out")
TRAIN, VAL, TEST = (SPLITS.index(name) for name in ("train", "val", "test"))
NO_ITEM = -1  # padding of history matrices
# On MovieLens 100K's validation split (time split, DLRM, 2 sampled
# negatives) 50 items gave no more AUC or full-catalogue NDCG@10 than 20.
DEFAULT_HISTORY_LENGTH = 20
HISTORY_FEATURES = ("history", "history_liked")
# What the user's whole past says, beside the last items: how many interactions, and the share of them liked.
HISTORY_STATISTICS = ("rated_before", "liked_share")
HISTORY_SEPARATOR = "|"  # between the item ids of a packed history

# Queries per block in HistoryIndex.before: bounds the [Q, length] temporaries.
_QUERY_BLOCK = 1 << 18


@dataclass(frozen=True)
class Interactions:
    """Every interaction of a user-item source, one entry per row, in the source's row order.

    ``splits`` holds each row's split as an index into :data:`training.data.SPLITS`
    (0 train, 1 val, 2 test).
    """

    users: np.ndarray  # int64[N]
    items: np.ndarray  # int64[N]
    labels: np.ndarray  # float32[N], 1 = positive
    timestamps: np.ndarray  # int64[N]
    splits: np.ndarray  # int8[N]

    def __len__(self) -> int:
        return len(self.users)


def time_split(num_rows: int) -> np.ndarray:
    """Split codes of rows already in time order: the first 80% train, then 10% val, 10% test."""
    codes = np.zeros(num_rows, np.int8)
    for code, split in enumerate(SPLITS):
        start, end = time_split_bounds(num_rows)[split]
        codes[start:end] = code
    return codes


def leave_last_out(users: np.ndarray, timestamps: np.ndarray) -> np.ndarray:
    """Split codes: each user's last interaction is test, the one before val, the rest train.

    "Last" is by timestamp, ties broken by row order (the later row is the
    later interaction). Users with fewer than 3 interactions are train only:
    they could not give a training row beside a held-out one otherwise.
    """
    users, timestamps = np.asarray(users), np.asarray(timestamps)
    order = np.lexsort((np.arange(len(users)), timestamps, users))  # by user, time, row
    sorted_users = users[order]
    starts = np.flatnonzero(np.r_[True, sorted_users[1:] != sorted_users[:-1]])
    counts = np.diff(np.r_[starts, len(users)])
    segment = np.repeat(np.arange(len(starts)), counts)
    from_end = np.repeat(starts + counts, counts) - 1 - np.arange(len(users))  # 0 = the user's last
    eligible = counts[segment] >= 3
    codes_sorted = np.where(eligible & (from_end == 0), TEST, np.where(eligible & (from_end == 1), VAL, TRAIN))
    codes = np.empty(len(users), np.int8)
    codes[order] = codes_sorted
    return codes


class HistoryIndex:
    """Each user's interactions sorted by time, for "what came strictly before t" look-ups.

    One composite key per interaction, ``user code * span + (t - first time)``,
    makes a single ``searchsorted`` find, for every query at once, how many
    of the user's interactions precede the query time.
    """

    def __init__(self, users: np.ndarray, items: np.ndarray, timestamps: np.ndarray):
        users, items, timestamps = (np.asarray(a, np.int64) for a in (users, items, timestamps))
        self._known_users = np.unique(users)
        self._first_time = int(timestamps.min()) if len(timestamps) else 0
        last_time = int(timestamps.max()) if len(timestamps) else 0
        self._span = last_time - self._first_time + 2  # query times are clipped into [first, last + 1]
        if len(self._known_users) * self._span >= 2**62:
            raise ValueError(
                f"timestamps span {self._span:,} units over {len(self._known_users):,} users: "
                "too wide for the history index (expected seconds, as MovieLens has)"
            )
        codes = np.searchsorted(self._known_users, users)
        keys = codes * self._span + (timestamps - self._first_time)
        order = np.argsort(keys, kind="stable")
        self._keys = keys[order]
        self._items = items[order]
        # Position of each user's first interaction in the sorted arrays.
        self._user_starts = np.searchsorted(self._keys, np.arange(len(self._known_users)) * self._span)

    def before(self, users: np.ndarray, timestamps: np.ndarray, *, length: int) -> np.ndarray:
        """``int64[Q, length]``: the items of each user's last ``length`` interactions strictly
        before each timestamp, most recent first, padded with :data:`NO_ITEM`."""
        if length < 1:
            raise ValueError(f"history length must be >= 1, got {length}")
        users, timestamps = np.asarray(users, np.int64), np.asarray(timestamps, np.int64)
        out = np.full((len(users), length), NO_ITEM, np.int64)
        steps = np.arange(length)
        for lo in range(0, len(users), _QUERY_BLOCK):
            hi = min(lo + _QUERY_BLOCK, len(users))
            starts, ends = self._ranges(users[lo:hi], timestamps[lo:hi])
            positions = ends[:, None] - 1 - steps  # (Q, length), most recent first
            valid = positions >= starts[:, None]
            out[lo:hi] = np.where(valid, self._items[np.maximum(positions, 0)], NO_ITEM)
        return out

    def count_before(self, users: np.ndarray, timestamps: np.ndarray) -> np.ndarray:
        """``int64[Q]``: how many interactions each user had strictly before each timestamp."""
        starts, ends = self._ranges(np.asarray(users, np.int64), np.asarray(timestamps, np.int64))
        return ends - starts

    def _ranges(self, users: np.ndarray, timestamps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``[start, end)`` positions, in the sorted arrays, of each user's interactions strictly before t."""
        if not len(self._keys):
            empty = np.zeros(len(users), np.int64)
            return empty, empty
        codes = np.searchsorted(self._known_users, users)
        codes = np.minimum(codes, len(self._known_users) - 1)
        known = self._known_users[codes] == users
        offsets = np.clip(timestamps - self._first_time, 0, self._span - 1)
        # side="left": interactions at exactly t have equal keys and stay out.
        ends = np.searchsorted(self._keys, codes * self._span + offsets, side="left")
        starts = np.where(known, self._user_starts[codes], ends)  # an unknown user has no history
        return starts, ends


def join_ids(matrix: np.ndarray, *, separator: str = HISTORY_SEPARATOR, names: pa.Array | None = None) -> StringColumn:
    """``int64[Q, L]`` ids padded with :data:`NO_ITEM` -> each row's ids as text joined by
    ``separator``, in column order (an empty row is an empty value, i.e. missing).

    Without ``names`` an id's text is its decimal form; with ``names`` (text
    ids by code) the matrix holds codes and each becomes ``names[code]``.
    """
    valid = matrix != NO_ITEM
    offsets = np.zeros(len(matrix) + 1, np.int64)
    np.cumsum(valid.sum(axis=1), out=offsets[1:])
    ids = pa.array(matrix[valid])  # row-major: each row's ids in order
    texts = pa_compute.cast(ids, pa.string()) if names is None else names.take(ids)
    lists = pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()), texts)
    return string_column_from_arrow(pa_compute.binary_join(lists, separator))


def history_schema(*, length: int, items: SparseOptions, candidate: str) -> tuple[SchemaField, ...]:
    """The raw fields of the history features, in this order: ``history`` and
    ``history_liked`` (multi-valued item ids, at most ``length`` each, fitted
    with the ``items`` options; ``candidate`` is the item field a model may pool
    them by attention to), ``rated_before`` (``log1p``) and ``liked_share``
    (``standard``)."""
    if length < 1:
        raise ValueError(f"history length must be >= 1, got {length}")
    options = replace(items, multi_valued=True, max_values=length, separator=HISTORY_SEPARATOR)
    return (
        *(SchemaField(name, dense=False, options=options, candidate=candidate) for name in HISTORY_FEATURES),
        SchemaField("rated_before", dense=True, transform="log1p"),
        SchemaField("liked_share", dense=True, transform="standard"),
    )


def history_columns(
    history: HistoryIndex,
    liked: HistoryIndex,
    users: np.ndarray,
    timestamps: np.ndarray,
    *,
    length: int,
    item_names: pa.Array | None = None,
) -> dict[str, object]:
    """The history features of these users strictly before these moments: the last ``length``
    items interacted with and liked (packed text), the number of interactions, and the share
    of them liked (missing, NaN, for a user with none yet).

    ``history`` indexes every interaction, ``liked`` the positive ones;
    ``item_names`` is given when the indexes hold item codes (see :func:`join_ids`).
    """
    columns: dict[str, object] = {
        name: join_ids(index.before(users, timestamps, length=length), names=item_names)
        for name, index in zip(HISTORY_FEATURES, (history, liked))
    }
    rated = history.count_before(users, timestamps).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(rated > 0, liked.count_before(users, timestamps) / rated, np.nan)
    columns.update(rated_before=rated, liked_share=share)
    return columns
