"""FeatureSpec: the one definition of how a raw record becomes model tensors.

Written by training (``features.json``), read by export, the TorchServe
handlers, the benchmarks and the load tests. This module depends on numpy and
the standard library only, because it is copied into every ``.mar`` archive
and runs inside TorchServe workers that cannot import the rest of the repo.

Encoding, for a batch of B records:

* dense features -> ``float32[B, D]``: each value goes through its transform
  (``log1p`` clips negatives to 0 as DLRM does; ``standard`` z-scores with
  the training mean/std; ``identity``), and a missing value becomes 0.
* sparse features -> ``int64[B, S]``: a categorical value is hashed to 64
  bits (a word-wise multiply-xorshift hash of its UTF-8 bytes, the same in
  every process and on every machine), then either
  looked up in a vocabulary fitted on the training split or reduced modulo a
  number of hash buckets. Index 0 of every table is reserved for missing and
  unseen values. A multi-valued feature takes ``max_values`` columns, padded
  with 0; a single-valued feature takes one.

Everything on the encoding path is vectorized over the batch: the only
per-value Python work left is collecting values out of request dicts.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from itertools import chain
from typing import Any, Literal

import numpy as np

SPEC_VERSION = 1
MISSING_INDEX = 0

DenseTransform = Literal["log1p", "standard", "identity"]
SparseKind = Literal["vocab", "hash"]

_HASH_SEED = np.uint64(0xCBF29CE484222325)
_MIX_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)
_FMIX_1 = np.uint64(0xFF51AFD7ED558CCD)
_FMIX_2 = np.uint64(0xC4CEB9FE1A85EC53)
_ALL_ONES = np.uint64(0xFFFFFFFFFFFFFFFF)


class FeatureError(ValueError):
    """A record cannot be encoded. ``field`` names the offending feature."""

    def __init__(self, field_name: str, problem: str, *, record: int | None = None):
        self.field = field_name
        self.problem = problem
        self.record = record
        where = f"record {record}: " if record is not None else ""
        super().__init__(f"{where}feature {field_name!r}: {problem}")


# --------------------------------------------------------------------------
# Strings and hashing
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class StringColumn:
    """Variable-length UTF-8 strings packed like an Arrow string array.

    ``data`` holds all bytes back to back; value ``i`` is
    ``data[offsets[i]:offsets[i + 1]]``. An empty value means missing.
    Readers build it straight from Arrow buffers, so no Python string object
    is ever created on the training path.
    """

    data: np.ndarray  # uint8[total_bytes]
    offsets: np.ndarray  # int64[N + 1]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @classmethod
    def from_values(cls, values: Sequence[Any] | np.ndarray) -> StringColumn:
        """Pack str/int/None values (None and "" mean missing); bytes arrays as they are."""
        if isinstance(values, np.ndarray):
            if values.dtype.kind == "S":
                return cls._from_bytes_list(values.tolist())
            if values.dtype.kind not in "OUiu":
                raise TypeError(f"cannot pack a {values.dtype} array as strings")
            values = values.tolist()
        packed = _pack_strings(values)
        if packed is not None:
            return packed
        # A value holding a NUL, or another type: value by value (a lone surrogate raises here).
        return cls._from_bytes_list([("" if v is None else str(v)).encode("utf-8") for v in values])

    @classmethod
    def _from_bytes_list(cls, encoded: list[bytes]) -> StringColumn:
        lengths = np.fromiter(map(len, encoded), np.int64, len(encoded))
        offsets = np.zeros(len(encoded) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return cls(np.frombuffer(b"".join(encoded), np.uint8), offsets)

    def to_list(self) -> list[str]:
        raw = self.data.tobytes()
        bounds = self.offsets.tolist()
        return [raw[a:b].decode("utf-8") for a, b in zip(bounds[:-1], bounds[1:])]

    def slice(self, start: int, stop: int) -> StringColumn:
        """Rows ``[start, stop)``, sharing this column's bytes (no copy)."""
        offsets = self.offsets[start : stop + 1]
        return StringColumn(self.data[offsets[0] : offsets[-1]], offsets - offsets[0])

    def take(self, indices: np.ndarray) -> StringColumn:
        starts, ends = self.offsets[:-1][indices], self.offsets[1:][indices]
        return StringColumn._from_bytes_list(
            [self.data[a:b].tobytes() for a, b in zip(starts.tolist(), ends.tolist())]
        )


def hash_strings(column: StringColumn) -> tuple[np.ndarray, np.ndarray]:
    """64-bit hash of every value: ``(hashes uint64[N], missing bool[N])``.

    The value's UTF-8 bytes are read as little-endian 8-byte words (the last
    one zero-padded), each folded in with a multiply-xorshift step, then the
    length and a MurmurHash3 finalizer. Word-wise rather than byte-wise so
    that a typical Criteo value (8 hex characters) costs one vectorized pass.
    The hash is part of the FeatureSpec contract: hash buckets depend on it.
    """
    starts = column.offsets[:-1]
    return _hash_spans(column.data, starts, column.offsets[1:] - starts)


def _hash_spans(data: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`hash_strings` of the values ``data[starts[i] : starts[i] + lengths[i]]``."""
    hashes = np.full(len(lengths), _HASH_SEED, dtype=np.uint64)
    longest = int(lengths.max()) if len(lengths) else 0
    if longest:
        padded = np.concatenate([data, np.zeros(8, np.uint8)])
        # Every byte offset seen as the start of an (unaligned) uint64 word.
        words = np.ndarray((len(padded) - 7,), dtype="<u8", buffer=padded, strides=(1,))
        with np.errstate(over="ignore"):
            for word in range(0, longest, 8):
                remaining = lengths - word
                value = words[np.minimum(starts + word, len(words) - 1)]
                short = (remaining < 8) & (remaining > 0)
                if short.any():
                    keep_bits = np.clip(remaining, 0, 8).astype(np.uint64) * np.uint64(8)
                    mask = np.where(short, (np.uint64(1) << (keep_bits & np.uint64(63))) - np.uint64(1), _ALL_ONES)
                    value = value & mask
                mixed = (hashes ^ value) * _MIX_MULTIPLIER
                mixed ^= mixed >> np.uint64(32)
                hashes = np.where(remaining > 0, mixed, hashes)
    with np.errstate(over="ignore"):
        hashes ^= lengths.astype(np.uint64)
        hashes ^= hashes >> np.uint64(33)
        hashes *= _FMIX_1
        hashes ^= hashes >> np.uint64(33)
        hashes *= _FMIX_2
        hashes ^= hashes >> np.uint64(33)
    return hashes, lengths == 0


def hash_values(values: Sequence[Any] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hash plain values (str/int/None) exactly as :func:`hash_strings` would."""
    column = values if isinstance(values, StringColumn) else StringColumn.from_values(values)
    return hash_strings(column)


class _HashTable:
    """uint64 key -> int64 value, open addressing with linear probing, in numpy.

    Lookups are vectorized: each round probes one slot for every unresolved
    key, and at a load factor <= 0.5 nearly all keys resolve in the first
    round, which therefore runs over all keys without an index array. Faster
    than ``np.searchsorted`` on large vocabularies because each probe is one
    random access instead of ~log2(V); key and value share a row of
    ``_slots``, so that access touches one cache line, not two.
    """

    def __init__(self, keys: np.ndarray, values: np.ndarray):
        bits = max(4, int(np.ceil(np.log2(max(len(keys), 1) * 2))) + 1)
        self._shift = np.uint64(64 - bits)
        self._mask = (1 << bits) - 1
        slot_keys = np.zeros(1 << bits, np.uint64)
        slot_values = np.full(1 << bits, -1, np.int64)  # -1 marks an empty slot
        pending = np.arange(len(keys))
        slots = self._home(keys)
        while len(pending):
            # Claim free slots; of keys that want the same slot, the first wins.
            free = slot_values[slots] < 0
            unique_slots, first = np.unique(slots[free], return_index=True)
            winners = pending[free][first]
            slot_keys[unique_slots] = keys[winners]
            slot_values[unique_slots] = values[winners]
            lost = np.ones(len(pending), bool)
            lost[np.flatnonzero(free)[first]] = False
            pending, slots = pending[lost], (slots[lost] + 1) & self._mask
        self._slots = np.stack([slot_keys, slot_values.view(np.uint64)], axis=1)  # (slots, 2): key, value

    def _home(self, keys: np.ndarray) -> np.ndarray:
        return (keys >> self._shift).astype(np.int64)  # top bits: the hash mixes them best

    def _probe(self, slots: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(hit, value, go_on)`` of one probe: go on past slots that hold another key."""
        rows = self._slots.take(slots, axis=0)
        values = rows[:, 1].view(np.int64)
        occupied = values >= 0  # an empty slot ends the probe: not present
        hit = (rows[:, 0] == keys) & occupied
        return hit, values, occupied & ~hit

    def get(self, keys: np.ndarray, *, default: int) -> np.ndarray:
        slots = self._home(keys)
        hit, values, go_on = self._probe(slots, keys)
        result = np.where(hit, values, default)
        pending = np.flatnonzero(go_on)
        slots = slots[pending]
        while len(pending):
            slots = (slots + 1) & self._mask
            hit, values, go_on = self._probe(slots, keys[pending])
            result[pending[hit]] = values[hit]
            pending, slots = pending[go_on], slots[go_on]
        return result


# --------------------------------------------------------------------------
# Feature definitions
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class DenseFeature:
    name: str
    transform: DenseTransform = "log1p"
    mean: float = 0.0
    std: float = 1.0

    def __post_init__(self) -> None:
        if self.transform not in ("log1p", "standard", "identity"):
            raise ValueError(f"dense feature {self.name!r}: unknown transform {self.transform!r}")
        if not (self.std > 0 and math.isfinite(self.std)):
            raise ValueError(f"dense feature {self.name!r}: std must be > 0, got {self.std}")

    def apply(self, values: np.ndarray) -> np.ndarray:
        """float64[N] with NaN for missing -> float32[N], missing -> 0."""
        missing = np.isnan(values)
        if self.transform == "log1p":
            out = np.log1p(np.maximum(values, 0.0))
        elif self.transform == "standard":
            out = (values - self.mean) / self.std
        else:
            out = values.copy()
        out[missing] = 0.0
        return out.astype(np.float32)


@dataclass(frozen=True)
class SparseFeature:
    """A categorical feature; ``num_embeddings`` counts the reserved index 0."""

    name: str
    kind: SparseKind = "vocab"
    vocab: tuple[str, ...] = ()
    buckets: int = 0
    multi_valued: bool = False
    max_values: int = 1
    separator: str = "|"
    _keys: np.ndarray = field(init=False, repr=False, compare=False)  # uint64 hash of each vocab value

    def __post_init__(self) -> None:
        if self.kind not in ("vocab", "hash"):
            raise ValueError(f"sparse feature {self.name!r}: unknown kind {self.kind!r}")
        if self.kind == "hash" and self.buckets < 1:
            raise ValueError(f"sparse feature {self.name!r}: hash buckets must be >= 1, got {self.buckets}")
        if self.max_values < 1 or (not self.multi_valued and self.max_values != 1):
            raise ValueError(
                f"sparse feature {self.name!r}: max_values must be 1 for a single-valued "
                f"feature and >= 1 otherwise, got {self.max_values}"
            )
        keys, _ = hash_values(list(self.vocab))
        if len(np.unique(keys)) != len(keys):
            raise ValueError(f"sparse feature {self.name!r}: vocabulary has duplicate or colliding values")
        object.__setattr__(self, "_keys", keys)

    @cached_property
    def _table(self) -> _HashTable:
        # Built on first use: a serving process looks values up through the
        # spec's fused table and never needs this one (both are ~32 bytes per
        # vocabulary entry, which matters for vocabularies of millions).
        return _HashTable(self._keys, np.arange(1, len(self._keys) + 1, dtype=np.int64))

    @property
    def num_embeddings(self) -> int:
        return (len(self.vocab) if self.kind == "vocab" else self.buckets) + 1

    @property
    def width(self) -> int:
        """Number of columns this feature takes in the sparse tensor."""
        return self.max_values

    def lookup(self, hashes: np.ndarray, missing: np.ndarray) -> np.ndarray:
        """uint64 hashes -> int64 indices in [0, num_embeddings)."""
        if self.kind == "hash":
            indices = (hashes % np.uint64(self.buckets)).astype(np.int64) + 1
        else:
            indices = self._table.get(hashes, default=MISSING_INDEX)
        indices[missing] = MISSING_INDEX
        return indices

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "kind": self.kind}
        if self.multi_valued:
            out.update(multi_valued=True, max_values=self.max_values, separator=self.separator)
        if self.kind == "hash":
            out["buckets"] = self.buckets
        else:
            out["vocab"] = list(self.vocab)
        return out


class _BatchLookup:
    """Looks up K single-valued features at once: ``hashes uint64[K, B]`` ->
    indices ``int64[K, B]``, exactly as each feature's own ``lookup``.

    Per-feature lookups cost a dozen small numpy calls each, which dominates
    small batches. Here the hashed features take one modulo over all their
    rows, and the vocabularies share one table: vocabulary k's keys are
    XORed with a per-feature salt (so equal values of different features
    differ), and its entries get the global numbers ``start_k ...
    start_k + V_k - 1``. A hit counts only if its number falls in the
    querying feature's range, so even a key shared across features cannot
    return another feature's index: the result is exact, not probabilistic.
    If two salted keys ever collide, the vocabularies keep their own tables.
    """

    def __init__(self, features: Sequence[SparseFeature]):
        self._features = tuple(features)
        hashed = [k for k, f in enumerate(features) if f.kind == "hash"]
        self._hashed = np.array(hashed, np.int64)
        self._buckets = np.array([[features[k].buckets] for k in hashed], np.uint64).reshape(-1, 1)
        self._vocab = np.array([k for k, f in enumerate(features) if f.kind == "vocab"], np.int64)
        sizes = np.array([len(features[k].vocab) for k in self._vocab.tolist()], np.int64)
        self._salts = _splitmix(self._vocab.astype(np.uint64) + np.uint64(1)).reshape(-1, 1)
        self._starts = (np.cumsum(sizes) - sizes).reshape(-1, 1)
        self._sizes = sizes.reshape(-1, 1)
        keys = np.concatenate(
            [features[k]._keys ^ salt for k, salt in zip(self._vocab.tolist(), self._salts[:, 0])]
        ) if len(self._vocab) else np.zeros(0, np.uint64)
        unique = len(np.unique(keys)) == len(keys)
        self._table = _HashTable(keys, np.arange(len(keys), dtype=np.int64)) if unique else None

    def __call__(self, hashes: np.ndarray, missing: np.ndarray) -> np.ndarray:
        out = np.empty(hashes.shape, np.int64)
        if len(self._hashed):
            out[self._hashed] = (hashes[self._hashed] % self._buckets).astype(np.int64) + 1
        if len(self._vocab):
            if self._table is None:
                for k in self._vocab.tolist():
                    out[k] = self._features[k].lookup(hashes[k], missing[k])
            else:
                salted = (hashes[self._vocab] ^ self._salts).ravel()
                found = self._table.get(salted, default=-1).reshape(len(self._vocab), -1) - self._starts
                out[self._vocab] = np.where((found >= 0) & (found < self._sizes), found + 1, MISSING_INDEX)
        out[missing] = MISSING_INDEX
        return out


def _splitmix(values: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer: well-spread 64-bit salts from small integers."""
    with np.errstate(over="ignore"):
        z = values * _MIX_MULTIPLIER
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


# --------------------------------------------------------------------------
# The spec
# --------------------------------------------------------------------------

Columns = Mapping[str, Any]
"""Columnar raw data. Dense: float array, NaN = missing. Single-valued sparse:
a :class:`StringColumn` or an array/list of str/int/None. Multi-valued sparse:
a list of lists of values, or strings joined by the feature's separator."""


@dataclass(frozen=True)
class FeatureSpec:
    dense: tuple[DenseFeature, ...]
    sparse: tuple[SparseFeature, ...]

    def __post_init__(self) -> None:
        names = [f.name for f in self.dense] + [f.name for f in self.sparse]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"feature names must be unique, repeated: {duplicates}")
        if not self.dense:
            raise ValueError("a FeatureSpec needs at least one dense feature")
        if not self.sparse:
            raise ValueError("a FeatureSpec needs at least one sparse feature")
        object.__setattr__(self, "_all_names", frozenset(names))
        # Every feature, in spec order, with its missing value: dense None, categorical "".
        template = {**dict.fromkeys(names[: len(self.dense)]), **dict.fromkeys(names[len(self.dense) :], "")}
        object.__setattr__(self, "_template", template)
        object.__setattr__(self, "_single", tuple(k for k, f in enumerate(self.sparse) if not f.multi_valued))
        # First column of each categorical feature in the sparse tensor.
        object.__setattr__(self, "_column_starts", tuple(np.cumsum([0, *self.table_widths[:-1]]).tolist()))

    @cached_property
    def _single_lookup(self) -> _BatchLookup:
        """The single-valued features' fused lookup, built on first use (training never needs it)."""
        return _BatchLookup([self.sparse[k] for k in self._single])

    # -- shapes the models are built from ---------------------------------

    @property
    def num_dense(self) -> int:
        return len(self.dense)

    @property
    def num_sparse_columns(self) -> int:
        return sum(f.width for f in self.sparse)

    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.dense] + [f.name for f in self.sparse]

    @property
    def table_sizes(self) -> tuple[int, ...]:
        return tuple(f.num_embeddings for f in self.sparse)

    @property
    def table_widths(self) -> tuple[int, ...]:
        return tuple(f.width for f in self.sparse)

    # -- encoding ---------------------------------------------------------

    def encode_columns(self, columns: Columns, num_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Columnar raw data -> ``(dense float32[B, D], sparse int64[B, S])``.

        A feature absent from ``columns`` is missing for every row.
        """
        if num_rows is None:
            num_rows = _infer_rows(columns)
        dense = np.zeros((num_rows, self.num_dense), np.float32)
        for j, feature in enumerate(self.dense):
            values = columns.get(feature.name)
            if values is not None:
                dense[:, j] = feature.apply(np.asarray(values, dtype=np.float64))
        sparse = np.zeros((num_rows, self.num_sparse_columns), np.int64)
        start = 0
        for feature in self.sparse:
            values = columns.get(feature.name)
            if values is not None:
                if feature.multi_valued:
                    sparse[:, start : start + feature.width] = self._encode_multi(feature, values, num_rows)
                else:
                    sparse[:, start] = feature.lookup(*hash_values(values))
            start += feature.width
        return dense, sparse

    def encode_records(
        self, records: Sequence[Mapping[str, Any]], *, base: Mapping[str, Any] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """JSON-like records -> tensors, validating as a server must.

        ``base`` supplies shared features (a ranking request's context) that a
        record's own value overrides. Raises :class:`FeatureError` naming the
        record and feature for an unknown feature, a wrong type, or NaN/inf.
        Missing and ``None`` values are legal: they encode as missing.
        """
        template = self._template
        if base is not None:
            if not isinstance(base, Mapping):
                raise FeatureError("context", f"expected a JSON object, got {type(base).__name__}")
            if not base.keys() <= self._all_names:
                raise FeatureError(sorted(set(base) - self._all_names)[0], "unknown feature (in context)")
            template = {**template, **base}
        if not set(map(type, records)) <= {dict}:
            records = [_as_dict(record, i) for i, record in enumerate(records)]
        # Each record merged over the template (one C-level dict merge) holds
        # every feature in spec order, so its values() are a row of the batch.
        # The merged dicts die one by one as the chain goes: none lives long
        # enough for the garbage collector to scan it.
        width = len(template)
        flat = list(chain.from_iterable(map(dict.values, map(template.__or__, records))))
        if len(flat) != width * len(records):  # a record named a feature the template lacks
            record = next(i for i, r in enumerate(records) if not r.keys() <= self._all_names)
            raise FeatureError(sorted(set(records[record]) - self._all_names)[0], "unknown feature", record=record)
        values = [flat[j::width] for j in range(width)]  # one list per feature, spec order
        return self._encode_values(values, len(records))

    def encode_json_columns(self, columns: Mapping[str, Any], *, num_rows: int) -> tuple[np.ndarray, np.ndarray]:
        """JSON-like columns -> tensors, validated as :meth:`encode_records` validates records.

        ``columns`` maps a feature name to an array of ``num_rows`` raw values
        (a KServe v2 request's inputs); a feature left out is missing in every
        row, and ``None`` is missing, as in records. The values take the same
        path as records' values without first being put into one dict per row,
        which is most of what records cost. Errors are :class:`FeatureError`
        with the row as ``record``.
        """
        if not columns.keys() <= self._all_names:
            raise FeatureError(min(set(columns) - self._all_names), "unknown feature")
        values = []
        for name, missing in self._template.items():
            if name not in columns:
                values.append([missing] * num_rows)
                continue
            column = columns[name]
            if not isinstance(column, list):
                raise FeatureError(name, f"expected an array of values, got {json_type(column)}")
            if len(column) != num_rows:
                raise FeatureError(name, f"expected {num_rows} values, got {len(column)}")
            values.append(column)
        return self._encode_values(values, num_rows)

    def _encode_values(self, values: list[list[Any]], num_rows: int) -> tuple[np.ndarray, np.ndarray]:
        """One list of raw values per feature, in ``feature_names`` order -> validated tensors."""
        encoded = _encode_valid_values(self, values, num_rows)
        if encoded is not None:
            return encoded
        # Something to report (or text the fast path leaves alone): feature
        # by feature in spec order, so the first problem is the one reported.
        columns: dict[str, Any] = {}
        for feature, feature_values in zip(self.dense, values):
            columns[feature.name] = _dense_column(feature.name, feature_values)
        for feature, feature_values in zip(self.sparse, values[self.num_dense :]):
            columns[feature.name] = _sparse_column(feature, feature_values)
        return self.encode_columns(columns, num_rows)

    def _encode_multi(self, feature: SparseFeature, values: Any, num_rows: int) -> np.ndarray:
        split = _split_tokens(values, feature.separator) if isinstance(values, StringColumn) else None
        if split is not None:  # packed strings: split and encode without a Python loop per row
            tokens, rows = split
            counts = np.bincount(rows, minlength=num_rows)
            slots = np.arange(len(rows)) - (np.cumsum(counts) - counts)[rows]
            kept = slots < feature.max_values
            out = np.zeros((num_rows, feature.max_values), np.int64)
            hashes, missing = hash_strings(tokens)
            out[rows[kept], slots[kept]] = feature.lookup(hashes[kept], missing[kept])
            return out
        lists = [_split_multi(feature, v) for v in (values.to_list() if isinstance(values, StringColumn) else values)]
        counts = np.fromiter((min(len(v), feature.max_values) for v in lists), np.int64, num_rows)
        flat = [x for v in lists for x in v[: feature.max_values]]
        out = np.zeros((num_rows, feature.max_values), np.int64)
        if flat:
            indices = feature.lookup(*hash_values(flat))
            rows = np.repeat(np.arange(num_rows), counts)
            slots = np.arange(len(flat)) - np.repeat(np.cumsum(counts) - counts, counts)
            out[rows, slots] = indices
        return out

    # -- persistence ------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "version": SPEC_VERSION,
            "dense": [
                {"name": f.name, "transform": f.transform, "mean": f.mean, "std": f.std} for f in self.dense
            ],
            "sparse": [f.to_json() for f in self.sparse],
        }

    @classmethod
    def from_json(cls, payload: Mapping[str, Any]) -> FeatureSpec:
        version = payload.get("version")
        if version != SPEC_VERSION:
            raise ValueError(f"unsupported FeatureSpec version {version!r} (expected {SPEC_VERSION})")
        dense = tuple(DenseFeature(**d) for d in payload["dense"])
        sparse = tuple(
            SparseFeature(
                name=s["name"],
                kind=s["kind"],
                vocab=tuple(s.get("vocab", ())),
                buckets=int(s.get("buckets", 0)),
                multi_valued=bool(s.get("multi_valued", False)),
                max_values=int(s.get("max_values", 1)),
                separator=s.get("separator", "|"),
            )
            for s in payload["sparse"]
        )
        return cls(dense=dense, sparse=sparse)

    def save(self, path: str | os.PathLike[str]) -> None:
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(self.to_json(), handle, indent=1)
            handle.write("\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> FeatureSpec:
        try:
            with open(path, encoding="utf-8") as handle:
                payload = json.load(handle)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: FeatureSpec file not found") from None
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{error.lineno}: not valid JSON: {error.msg}") from None
        try:
            return cls.from_json(payload)
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{path}: not a valid FeatureSpec: {error}") from None


# --------------------------------------------------------------------------
# Fitting (training split only)
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class SparseOptions:
    """How one categorical feature is fitted."""

    # Values seen fewer times share the unseen row. On the synthetic data at the
    # demo size (480,000 training rows) rarer values only gave the tables noise
    # to memorize: Wide & Deep's test AUC 0.8952 at 2, 0.8976 at 20, 0.8987 at 50.
    min_count: int = 50
    max_vocab: int = 200_000  # above this many kept values, hash instead
    hash_buckets: int = 100_000
    kind: SparseKind | None = None  # force "vocab" or "hash"
    multi_valued: bool = False
    max_values: int = 1
    separator: str = "|"

    def __post_init__(self) -> None:
        if self.min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {self.min_count}")
        if self.hash_buckets < 1:
            raise ValueError(f"hash_buckets must be >= 1, got {self.hash_buckets}")


@dataclass(frozen=True)
class SchemaField:
    """A raw field of a data source: its name, whether it is dense, its fitting options."""

    name: str
    dense: bool
    transform: DenseTransform = "log1p"
    options: SparseOptions = SparseOptions()


class SpecFitter:
    """Accumulates statistics over chunks of the training split, then builds a FeatureSpec.

    Vocabulary counts are kept per 64-bit hash, with the first spelling seen,
    so a file larger than memory can be fitted chunk by chunk.
    """

    def __init__(self, schema: Sequence[SchemaField]):
        self.schema = tuple(schema)
        self._counts: dict[str, dict[int, int]] = {f.name: {} for f in schema if not f.dense}
        self._spelling: dict[str, dict[int, str]] = {f.name: {} for f in schema if not f.dense}
        self._moments: dict[str, list[float]] = {f.name: [0.0, 0.0, 0.0] for f in schema if f.dense}
        self.rows_seen = 0

    def update(self, columns: Columns, num_rows: int | None = None) -> None:
        num_rows = _infer_rows(columns) if num_rows is None else num_rows
        self.rows_seen += num_rows
        for f in self.schema:
            values = columns.get(f.name)
            if values is None:
                continue
            if f.dense:
                array = np.asarray(values, dtype=np.float64)
                present = array[~np.isnan(array)]
                moments = self._moments[f.name]
                moments[0] += present.size
                moments[1] += float(present.sum())
                moments[2] += float(np.square(present).sum())
            else:
                self._count(f, values)

    def _count(self, f: SchemaField, values: Any) -> None:
        packed = f.options.multi_valued and isinstance(values, StringColumn)
        split = _split_tokens(values, f.options.separator) if packed else None
        if split is not None:
            column = split[0]
        elif f.options.multi_valued:
            listed = values.to_list() if isinstance(values, StringColumn) else values
            probe = SparseFeature(f.name, kind="hash", buckets=1, multi_valued=True, separator=f.options.separator, max_values=max(1, f.options.max_values))
            flat = [x for v in listed for x in _split_multi(probe, v)]
            column = StringColumn.from_values(flat)
        else:
            column = values if isinstance(values, StringColumn) else StringColumn.from_values(values)
        hashes, missing = hash_strings(column)
        present = np.flatnonzero(~missing)
        unique, first, counts = np.unique(hashes[present], return_index=True, return_counts=True)
        table, spelling = self._counts[f.name], self._spelling[f.name]
        new_positions = []
        for key, count, position in zip(unique.tolist(), counts.tolist(), first.tolist()):
            previous = table.get(key)
            if previous is None:
                new_positions.append((key, position))
                table[key] = count
            else:
                table[key] = previous + count
        if new_positions:
            rows = present[np.array([p for _, p in new_positions], np.int64)]
            for (key, _), text in zip(new_positions, column.take(rows).to_list()):
                spelling[key] = text

    def finish(self) -> FeatureSpec:
        if self.rows_seen == 0:
            raise ValueError("cannot fit a FeatureSpec on zero training rows")
        dense, sparse = [], []
        for f in self.schema:
            if f.dense:
                count, total, total_sq = self._moments[f.name]
                mean = total / count if count else 0.0
                variance = max(total_sq / count - mean * mean, 0.0) if count else 0.0
                std = math.sqrt(variance) if variance > 1e-12 else 1.0
                dense.append(DenseFeature(f.name, f.transform, mean=mean, std=std))
                continue
            options = f.options
            counts, spelling = self._counts[f.name], self._spelling[f.name]
            kept = [(c, spelling[k]) for k, c in counts.items() if c >= options.min_count]
            kind = options.kind or ("hash" if len(kept) > options.max_vocab else "vocab")
            common = dict(
                name=f.name,
                multi_valued=options.multi_valued,
                max_values=options.max_values,
                separator=options.separator,
            )
            if kind == "hash":
                sparse.append(SparseFeature(kind="hash", buckets=options.hash_buckets, **common))
            else:
                kept.sort(key=lambda item: (-item[0], item[1]))  # most frequent first, ties by text
                sparse.append(SparseFeature(kind="vocab", vocab=tuple(text for _, text in kept), **common))
        return FeatureSpec(dense=tuple(dense), sparse=tuple(sparse))


def fit_spec(schema: Sequence[SchemaField], chunks: Iterable[Columns]) -> FeatureSpec:
    fitter = SpecFitter(schema)
    for chunk in chunks:
        fitter.update(chunk)
    return fitter.finish()


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def _infer_rows(columns: Columns) -> int:
    for values in columns.values():
        if values is not None:
            return len(values)
    raise ValueError("cannot infer the number of rows from empty columns")


_DENSE_TYPES = frozenset({int, float, type(None)})
_SPARSE_TYPES = frozenset({str, int, type(None)})


def _dense_column(name: str, values: Sequence[Any]) -> np.ndarray:
    types = set(map(type, values))
    if not types <= _DENSE_TYPES:
        bad = next(i for i, v in enumerate(values) if type(v) not in _DENSE_TYPES)
        raise FeatureError(name, f"expected a number or null, got {json_type(values[bad])}", record=bad)
    try:
        array = np.array(values, np.float64)  # numpy turns None into NaN
    except OverflowError:
        bad = next(i for i, v in enumerate(values) if isinstance(v, int) and abs(v) > 1e308)
        raise FeatureError(name, "number out of range", record=bad) from None
    # Only null means missing; a NaN or infinity sent by a client is an error.
    # Only the non-finite positions are looked at value by value.
    for bad in np.flatnonzero(~np.isfinite(array)).tolist():
        if values[bad] is not None:
            raise FeatureError(name, "must be a finite number (got NaN or infinity)", record=bad)
    return array


def _sparse_column(feature: SparseFeature, values: Sequence[Any]) -> Any:
    if feature.multi_valued:
        texts: list[str] = []
        for i, v in enumerate(values):
            if v is None or isinstance(v, str):
                texts.append(v or "")
                continue
            if not isinstance(v, list) or not set(map(type, v)) <= _SPARSE_TYPES:
                raise FeatureError(
                    feature.name, f"expected a list of strings/integers or a string, got {json_type(v)}", record=i
                )
            texts.extend(x for x in v if isinstance(x, str))
        _check_encodable(feature.name, texts, values)
        return values
    types = set(map(type, values))
    if not types <= _SPARSE_TYPES:
        bad = next(i for i, v in enumerate(values) if type(v) not in _SPARSE_TYPES)
        raise FeatureError(feature.name, f"expected a string or integer, got {json_type(values[bad])}", record=bad)
    column = _pack_strings(values)
    if column is not None:
        return column
    _check_encodable(feature.name, [v for v in values if isinstance(v, str)], values)
    return StringColumn.from_values(values)  # a value holds a NUL


def _check_encodable(name: str, texts: list[str], values: Sequence[Any]) -> None:
    """Raise naming the record whose text has no UTF-8 form (an unpaired
    surrogate, which JSON's ``\\ud800`` escapes can carry)."""
    try:
        "".join(texts).encode("utf-8")
    except UnicodeEncodeError:
        for i, v in enumerate(values):
            parts = v if isinstance(v, list) else [v]
            if any(isinstance(x, str) and not _utf8_encodable(x) for x in parts):
                raise FeatureError(name, "not valid Unicode text (an unpaired surrogate)", record=i) from None


def _utf8_encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _joined_utf8(values: Sequence[Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """``values`` joined with NUL separators and encoded to UTF-8 at once:
    ``(bytes uint8[total], start int64[N], length int64[N] of each value)``,
    in a few C-level passes instead of one Python step per value.

    None and ints are converted first (None is missing, an int its decimal
    text). Returns None, without raising, for no values, any other type, a
    value holding a NUL (a cut would be ambiguous) or one that is not
    encodable UTF-8 (a lone surrogate): the caller's general path then
    reports or handles it.
    """
    if not values:
        return None
    joined = _join_text(values)
    return None if joined is None else _utf8_spans(joined, len(values))


def _join_text(values: Sequence[Any]) -> str | None:
    """str/int/None values joined with NUL separators (None: see :func:`_joined_utf8`)."""
    try:
        return "\x00".join(values)
    except TypeError:  # None, int, or a wrong type among the values
        pass
    try:  # None alone (a column's missing values) costs one pass more
        return "\x00".join(["" if v is None else v for v in values])
    except TypeError:
        if not set(map(type, values)) <= _SPARSE_TYPES:
            return None
        return "\x00".join(["" if v is None else str(v) for v in values])


def _utf8_spans(joined: str, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The UTF-8 bytes of ``count`` NUL-joined values and each value's span (None: see :func:`_joined_utf8`)."""
    try:
        data = np.frombuffer(joined.encode("utf-8"), np.uint8)
    except UnicodeEncodeError:
        return None
    cuts = np.flatnonzero(data == 0)
    if len(cuts) != count - 1:
        return None
    starts = np.empty(count, np.int64)
    starts[0] = 0
    starts[1:] = cuts + 1
    ends = np.empty_like(starts)
    ends[:-1] = cuts
    ends[-1] = len(data)
    return data, starts, ends - starts


def _pack_strings(values: Sequence[Any]) -> StringColumn | None:
    """Pack str/int/None values into a :class:`StringColumn` (None: see :func:`_joined_utf8`)."""
    joined = _joined_utf8(values)
    if joined is None:
        return None
    data, _, lengths = joined
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return StringColumn(data[data != 0], offsets)  # the separators dropped


def _as_dict(record: Any, index: int) -> dict[str, Any]:
    if not isinstance(record, Mapping):
        raise FeatureError("<record>", f"expected a JSON object, got {type(record).__name__}", record=index)
    return dict(record)


def _split_tokens(column: StringColumn, separator: str) -> tuple[StringColumn, np.ndarray] | None:
    """Split packed values at a one-byte separator: ``(non-empty tokens, row of each token)``.

    The same tokens as :func:`_split_multi` on each decoded value (an ASCII
    byte never occurs inside a multi-byte UTF-8 character), in row order.
    None for a separator that is not one ASCII character.
    """
    if len(separator) != 1 or not separator.isascii():
        return None
    is_separator = column.data == ord(separator)
    cuts = np.flatnonzero(is_separator)
    cut_rows = np.searchsorted(column.offsets, cuts, side="right") - 1
    # Value v holds (its separators + 1) tokens; the token after separator i
    # has index i + (row of i) + 1, since every earlier row adds one token.
    per_row = np.bincount(cut_rows, minlength=len(column)) + 1
    last = np.cumsum(per_row) - 1
    starts = np.empty(last[-1] + 1 if len(last) else 0, np.int64)
    ends = np.empty_like(starts)
    starts[last - per_row + 1] = column.offsets[:-1]
    starts[np.arange(len(cuts)) + cut_rows + 1] = cuts + 1
    ends[np.arange(len(cuts)) + cut_rows] = cuts
    ends[last] = column.offsets[1:]
    lengths = ends - starts
    kept = lengths > 0  # empty values and empty tokens ("a||b") carry nothing
    offsets = np.zeros(int(kept.sum()) + 1, np.int64)
    np.cumsum(lengths[kept], out=offsets[1:])
    rows = np.repeat(np.arange(len(column)), per_row)[kept]
    return StringColumn(column.data[~is_separator], offsets), rows


def _encode_valid_values(spec: FeatureSpec, values: list[list[Any]], num_rows: int) -> tuple[np.ndarray, np.ndarray] | None:
    """``encode_records``' fast path: a few C-level passes over the values,
    each dense column converted by numpy, all single-valued categorical
    values joined, encoded and hashed at once.

    ``values`` holds one list per feature, in ``feature_names`` order.
    Returns None, without raising, whenever the per-feature path must run:
    a value to report (so errors and their order stay those of
    ``_dense_column``/``_sparse_column``) or text ``_joined_utf8`` leaves
    to the general path. The result is identical to ``encode_columns`` on
    the same values.
    """
    # As few passes over the values as possible: values a server gets were
    # just made by json.loads, scattered in memory, so every pass costs about
    # a cache miss per value. Text is joined a column at a time, so a
    # column's values stay in cache between the join's own passes.
    num_dense = spec.num_dense
    dense_values = values[:num_dense]
    if not set(map(type, chain.from_iterable(dense_values))) <= _DENSE_TYPES:
        return None
    raw = np.empty((num_dense, num_rows), np.float64)
    try:
        raw[...] = dense_values  # None -> NaN
    except OverflowError:
        return None
    # None is the only legal non-finite value: any other is a NaN or infinity sent by the client.
    non_finite = np.flatnonzero(~np.isfinite(raw)).tolist()
    if [dense_values[i // num_rows][i % num_rows] for i in non_finite].count(None) != len(non_finite):
        return None
    single = spec._single
    texts = [_join_text(values[num_dense + k]) for k in single]
    if None in texts:
        return None
    spans = _utf8_spans("\x00".join(texts), len(single) * num_rows) if single else None
    if single and spans is None:  # also no rows at all: the general path builds the empty tensors
        return None
    multi = {k: _sparse_column(f, values[num_dense + k]) for k, f in enumerate(spec.sparse) if f.multi_valued}
    dense = np.zeros((num_rows, num_dense), np.float32)
    for j, feature in enumerate(spec.dense):
        dense[:, j] = feature.apply(raw[j])
    sparse = np.zeros((num_rows, spec.num_sparse_columns), np.int64)
    starts = spec._column_starts
    if spans is not None:
        hashes, missing = (part.reshape(len(single), num_rows) for part in _hash_spans(*spans))
        sparse[:, [starts[k] for k in single]] = spec._single_lookup(hashes, missing).T
    for k, column in multi.items():
        feature = spec.sparse[k]
        sparse[:, starts[k] : starts[k] + feature.width] = spec._encode_multi(feature, column, num_rows)
    return dense, sparse


def _split_multi(feature: SparseFeature, value: Any) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [x for x in value.split(feature.separator) if x]
    return [str(x) for x in value if x is not None and x != ""]


def json_type(value: Any) -> str:
    """How an error message names a value's JSON type ("a string", "an array", ...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "NaN" if isinstance(value, float) and math.isnan(value) else "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "an array"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__
