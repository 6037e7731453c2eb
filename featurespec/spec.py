"""The FeatureSpec: feature definitions, validation and encoding to tensors.

Encoding, for a batch of B records:

* dense features -> ``float32[B, D]``: each value is first clipped to the
  range the training split spanned (when the spec records one), so a value
  beyond anything seen in training (a later month, a larger count) does not
  send the model into extrapolation; then it goes through its transform
  (``log1p`` clips negatives to 0 as DLRM does; ``standard`` z-scores with
  the training mean/std; ``identity``), and a missing value becomes 0.
* sparse features -> ``int64[B, S]``: a categorical value is hashed to 64
  bits (:func:`featurespec.strings.hash_strings`), then either looked up in a
  vocabulary fitted on the training split or reduced modulo a number of hash
  buckets. Index 0 of every table is reserved for missing and unseen values.
  A multi-valued feature takes ``max_values`` columns, padded with 0; a
  single-valued feature takes one.
* bucketized features: a dense feature's raw value can also be a categorical
  feature of its own, its quantile bin (boundaries fitted on the training
  split): ``searchsorted(boundaries, value) + 1``, missing -> 0. Each takes
  one column after the categorical features' columns. A request sends the
  raw dense value once; the bin is derived from it here.

Everything on the encoding path is vectorized over the batch: the only
per-value Python work left is collecting values out of request dicts.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from itertools import chain
from typing import Any, Literal

import numpy as np

from featurespec.strings import (
    SPARSE_TYPES,
    StringColumn,
    StringLists,
    hash_spans,
    hash_strings,
    hash_values,
    join_text,
    pack_strings,
    split_tokens,
    split_values,
    utf8_spans,
)
from featurespec.tables import MISSING_INDEX, BatchLookup, HashTable

SPEC_VERSION = 1
FEATURES_FILE = "features.json"  # the FeatureSpec's file name in checkpoint dirs, export dirs and archives

DenseTransform = Literal["log1p", "standard", "identity"]
SparseKind = Literal["vocab", "hash"]


class FeatureError(ValueError):
    """A record cannot be encoded. ``field`` names the offending feature, as
    sent (a client's name may be long: messages quote :func:`short_text` of
    it); it is empty when the problem is the records together (their text
    above :attr:`TextLimits.max_total_bytes`)."""

    def __init__(self, field_name: str, problem: str, *, record: int | None = None):
        self.field = field_name
        self.problem = problem
        self.record = record
        where = f"record {record}: " if record is not None else ""
        feature = f"feature {short_text(field_name)!r}: " if field_name else ""
        super().__init__(f"{where}{feature}{problem}")


@dataclass(frozen=True)
class TextLimits:
    """Bounds on the categorical text one encode call accepts (a server's request limits).

    ``max_value_bytes`` bounds the UTF-8 bytes of one value (of a
    multi-valued feature, one record's tokens together); ``max_total_bytes``
    the text of all values of a group of rows. ``groups`` holds the row
    counts of consecutive groups (the requests that share one call); empty
    means one group. Checked after the values' types and before any text
    is hashed or split.
    """

    max_value_bytes: int
    max_total_bytes: int
    groups: tuple[int, ...] = ()



@dataclass(frozen=True)
class DenseFeature:
    """A numeric feature; ``low``/``high`` (None: unbounded) is the raw range it is clipped to first."""

    name: str
    transform: DenseTransform = "log1p"
    mean: float = 0.0
    std: float = 1.0
    low: float | None = None
    high: float | None = None

    def __post_init__(self) -> None:
        if self.transform not in ("log1p", "standard", "identity"):
            raise ValueError(f"dense feature {self.name!r}: unknown transform {self.transform!r}")
        if not (self.std > 0 and math.isfinite(self.std)):
            raise ValueError(f"dense feature {self.name!r}: std must be > 0, got {self.std}")
        for bound in (self.low, self.high):
            if bound is not None and not (isinstance(bound, (int, float)) and math.isfinite(bound)):
                raise ValueError(f"dense feature {self.name!r}: clip bounds must be finite numbers, got {bound!r}")
        if self.low is not None and self.high is not None and self.low > self.high:
            raise ValueError(f"dense feature {self.name!r}: low {self.low} is above high {self.high}")

    def apply(self, values: np.ndarray) -> np.ndarray:
        """float64[N] with NaN for missing -> float32[N], missing -> 0."""
        if self.low is not None or self.high is not None:
            values = np.clip(values, self.low, self.high)  # NaN stays NaN: missing is still missing
        if self.transform == "log1p":
            return np.log1p(np.fmax(values, 0.0)).astype(np.float32)  # fmax takes 0 over NaN: missing -> log1p(0) = 0
        missing = np.isnan(values)
        if self.transform == "standard":
            out = (values - self.mean) / self.std
        else:
            out = values.copy()
        out[missing] = 0.0
        return out.astype(np.float32)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "transform": self.transform, "mean": self.mean, "std": self.std}
        # Optional: files without a range (all files written before it existed) load unclipped.
        out.update({key: bound for key, bound in (("low", self.low), ("high", self.high)) if bound is not None})
        return out


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
    def _table(self) -> HashTable:
        # Built on first use: a serving process looks values up through the
        # spec's fused table and never needs this one (both are ~32 bytes per
        # vocabulary entry, which matters for vocabularies of millions).
        return HashTable(self._keys, np.arange(1, len(self._keys) + 1, dtype=np.int64))

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


@dataclass(frozen=True)
class BucketizedFeature:
    """A single-valued categorical feature derived from the raw value of dense feature ``source``.

    ``boundaries`` (strictly increasing, finite) split the raw values into
    ``len(boundaries) + 1`` bins: bin ``i`` (index ``i + 1``) holds the values
    in ``(boundaries[i - 1], boundaries[i]]``; index 0 is missing. ``-inf``
    falls in the first bin, ``+inf`` in the last.
    """

    name: str
    source: str
    boundaries: tuple[float, ...] = ()
    _edges: np.ndarray = field(init=False, repr=False, compare=False)  # float64 boundaries

    def __post_init__(self) -> None:
        edges = np.asarray(self.boundaries, dtype=np.float64).reshape(-1)
        if not np.isfinite(edges).all():
            raise ValueError(f"bucketized feature {self.name!r}: boundaries must be finite, got {self.boundaries}")
        if (np.diff(edges) <= 0).any():
            raise ValueError(f"bucketized feature {self.name!r}: boundaries must be strictly increasing, got {self.boundaries}")
        object.__setattr__(self, "boundaries", tuple(edges.tolist()))
        object.__setattr__(self, "_edges", edges)

    @property
    def num_embeddings(self) -> int:
        return len(self.boundaries) + 2  # the bins + the reserved index 0

    @property
    def width(self) -> int:
        return 1

    def lookup(self, values: np.ndarray) -> np.ndarray:
        """float64[N] raw values, NaN for missing -> int64[N] indices in [0, num_embeddings)."""
        indices = np.searchsorted(self._edges, values, side="left") + 1
        indices[np.isnan(values)] = MISSING_INDEX
        return indices.astype(np.int64, copy=False)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "boundaries": list(self.boundaries)}



Columns = Mapping[str, Any]
"""Columnar raw data. Dense: float array, NaN = missing. Single-valued sparse:
a :class:`StringColumn` or an array/list of str/int/None. Multi-valued sparse:
a list of lists of values, or strings joined by the feature's separator."""


@dataclass(frozen=True)
class FeatureSpec:
    """``dense`` and ``sparse`` are what a request sends; ``bucketized`` features
    are derived from dense ones and follow the categorical features in the
    sparse tensor (and in ``table_sizes``)."""

    dense: tuple[DenseFeature, ...]
    sparse: tuple[SparseFeature, ...]
    bucketized: tuple[BucketizedFeature, ...] = ()

    def __post_init__(self) -> None:
        names = [f.name for f in self.dense] + [f.name for f in self.sparse]
        every_name = names + [f.name for f in self.bucketized]
        duplicates = sorted({n for n in every_name if every_name.count(n) > 1})
        if duplicates:
            raise ValueError(f"feature names must be unique, repeated: {duplicates}")
        if not self.dense:
            raise ValueError("a FeatureSpec needs at least one dense feature")
        if not self.sparse:
            raise ValueError("a FeatureSpec needs at least one sparse feature")
        dense_index = {f.name: j for j, f in enumerate(self.dense)}
        for feature in self.bucketized:
            if feature.source not in dense_index:
                raise ValueError(
                    f"bucketized feature {feature.name!r}: source {feature.source!r} is not a dense feature"
                )
        # Dense position of each bucketized feature's raw values.
        object.__setattr__(self, "_bucket_sources", tuple(dense_index[f.source] for f in self.bucketized))
        object.__setattr__(self, "_all_names", frozenset(names))
        # Every feature, in spec order, with its missing value: dense None, categorical "".
        template = {**dict.fromkeys(names[: len(self.dense)]), **dict.fromkeys(names[len(self.dense) :], "")}
        object.__setattr__(self, "_template", template)
        object.__setattr__(self, "_single", tuple(k for k, f in enumerate(self.sparse) if not f.multi_valued))
        # First column of each categorical feature in the sparse tensor.
        object.__setattr__(self, "_column_starts", tuple(np.cumsum([0, *self.table_widths[:-1]]).tolist()))
        object.__setattr__(self, "_single_columns", [self._column_starts[k] for k in self._single])
        object.__setattr__(self, "_feature_columns", self._columns_by_feature())

    def _columns_by_feature(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
        columns: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        first_bucket = sum(f.width for f in self.sparse)
        for j, feature in enumerate(self.dense):
            buckets = tuple(first_bucket + k for k, source in enumerate(self._bucket_sources) if source == j)
            columns[feature.name] = ((j,), buckets)
        for feature, start in zip(self.sparse, self._column_starts):
            columns[feature.name] = ((), tuple(range(start, start + feature.width)))
        return columns

    def columns_of(self, name: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The ``dense`` and ``sparse`` tensor columns that feature ``name``'s
        value alone decides (a dense feature's bucketized columns among the
        sparse ones); ``KeyError`` for a name the spec does not know."""
        return self._feature_columns[name]

    @cached_property
    def _single_lookup(self) -> BatchLookup:
        """The single-valued features' fused lookup, built on first use (training never needs it)."""
        return BatchLookup([self.sparse[k] for k in self._single])

    # -- shapes the models are built from ---------------------------------

    @property
    def num_dense(self) -> int:
        return len(self.dense)

    @property
    def num_sparse_columns(self) -> int:
        return sum(self.table_widths)

    @property
    def feature_names(self) -> list[str]:
        """The features a record may carry (bucketized features are derived, not sent)."""
        return [f.name for f in self.dense] + [f.name for f in self.sparse]

    @property
    def table_names(self) -> list[str]:
        """One name per embedding table, in ``table_sizes`` order."""
        return [f.name for f in self.sparse] + [f.name for f in self.bucketized]

    @property
    def table_sizes(self) -> tuple[int, ...]:
        return tuple(f.num_embeddings for f in (*self.sparse, *self.bucketized))

    @property
    def table_widths(self) -> tuple[int, ...]:
        return tuple(f.width for f in (*self.sparse, *self.bucketized))

    # -- encoding ---------------------------------------------------------

    def encode_columns(self, columns: Columns, num_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Columnar raw data -> ``(dense float32[B, D], sparse int64[B, S])``.

        A feature absent from ``columns`` is missing for every row.
        """
        if num_rows is None:
            num_rows = infer_rows(columns)
        dense = np.zeros((num_rows, self.num_dense), np.float32)
        raw: list[np.ndarray | None] = []
        for j, feature in enumerate(self.dense):
            values = columns.get(feature.name)
            raw.append(None if values is None else np.asarray(values, dtype=np.float64))
            if values is not None:
                dense[:, j] = feature.apply(raw[j])
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
        self._bucketize(raw, sparse)
        return dense, sparse

    def encode_records(
        self,
        records: Sequence[Mapping[str, Any]],
        *,
        base: Mapping[str, Any] | None = None,
        text_limits: TextLimits | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """JSON-like records -> tensors, validating as a server must.

        ``base`` supplies shared features (a ranking request's context) that a
        record's own value overrides. Raises :class:`FeatureError` naming the
        record and feature for an unknown feature, a wrong type, NaN/inf, or
        text above ``text_limits``. Missing and ``None`` values are legal:
        they encode as missing.
        """
        template = self._template
        if base is not None:
            if not isinstance(base, Mapping):
                raise FeatureError("context", f"expected a JSON object, got {json_type(base)}")
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
        return self._encode_values(values, len(records), text_limits)

    def encode_json_columns(
        self, columns: Mapping[str, Any], *, num_rows: int, text_limits: TextLimits | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
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
        return self._encode_values(values, num_rows, text_limits)

    def encode_packed_columns(
        self, columns: Mapping[str, Any], *, num_rows: int, text_limits: TextLimits | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Packed columns (as an Arrow request's are converted) -> tensors, names and text checked.

        ``columns`` maps a feature name to its ``num_rows`` values: a dense
        feature's as ``float64[N]``, NaN for missing (the caller has refused
        NaN and infinities sent as values); a single-valued categorical
        feature's as a :class:`StringColumn`; a multi-valued one's as a
        :class:`StringLists` or a :class:`StringColumn` of separator-joined
        values. A feature left out is missing in every row. Raises
        :class:`FeatureError` for an unknown name or text above
        ``text_limits`` (the same first breach :meth:`encode_records`
        reports for the same values).
        """
        if not columns.keys() <= self._all_names:
            raise FeatureError(min(set(columns) - self._all_names), "unknown feature")
        # Each categorical feature's value lengths, taken once: the text limits and the hash read them.
        lengths = {
            feature.name: columns[feature.name].row_bytes()
            if isinstance(columns[feature.name], StringLists) else np.diff(columns[feature.name].offsets)
            for feature in self.sparse if feature.name in columns
        }
        if text_limits is not None and lengths:
            breach = _text_breach(list(lengths), np.stack(list(lengths.values())), text_limits)
            if breach is not None:
                raise breach
        # The single-valued features' values hashed in one pass and looked up
        # together, as encode_records does: per feature, a dozen numpy calls each.
        single = [self.sparse[k].name for k in self._single]
        dense, sparse = self.encode_columns({n: v for n, v in columns.items() if n not in single}, num_rows)
        if any(name in columns for name in single):
            texts = [columns.get(name) for name in single]
            data = np.concatenate([text.data for text in texts if text is not None] or [np.zeros(0, np.uint8)])
            starts = np.zeros((len(single), num_rows), np.int64)
            value_lengths = np.zeros((len(single), num_rows), np.int64)
            base = 0
            for k, (name, text) in enumerate(zip(single, texts)):
                if text is not None:
                    np.add(text.offsets[:-1], base, out=starts[k])
                    value_lengths[k] = lengths[name]
                    base += len(text.data)
            hashes, missing = hash_spans(data, starts.ravel(), value_lengths.ravel())
            indices = self._single_lookup(hashes.reshape(len(single), num_rows), missing.reshape(len(single), num_rows))
            sparse[:, self._single_columns] = indices.T
        return dense, sparse

    def _encode_values(
        self, values: list[list[Any]], num_rows: int, text_limits: TextLimits | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """One list of raw values per feature, in ``feature_names`` order -> validated tensors."""
        encoded = _encode_valid_values(self, values, num_rows, text_limits)
        if encoded is not None:
            return encoded
        # Something to report (or text the fast path leaves alone): feature
        # by feature in spec order, so the first problem is the one reported.
        columns: dict[str, Any] = {}
        for feature, feature_values in zip(self.dense, values):
            columns[feature.name] = _dense_column(feature.name, feature_values)
        for feature, feature_values in zip(self.sparse, values[self.num_dense :]):
            columns[feature.name] = _sparse_column(feature, feature_values)
        if text_limits is not None:
            row_bytes = [
                np.diff(column.offsets) if isinstance(column, StringColumn) else _row_text_bytes(column)
                for column in (columns[feature.name] for feature in self.sparse)
            ]
            breach = _text_breach([f.name for f in self.sparse], np.array(row_bytes, np.int64), text_limits)
            if breach is not None:
                raise breach
        return self.encode_columns(columns, num_rows)

    def _bucketize(self, raw: Sequence[np.ndarray | None], sparse: np.ndarray) -> None:
        """Fill the bucketized features' columns of ``sparse`` (the last ones) in place.

        ``raw`` holds each dense feature's raw values (float64, NaN missing),
        in dense order; ``None`` is a column absent from the request.
        """
        first = sparse.shape[1] - len(self.bucketized)
        for k, (feature, source) in enumerate(zip(self.bucketized, self._bucket_sources)):
            values = raw[source]
            if values is not None:
                sparse[:, first + k] = feature.lookup(values)

    def _encode_multi(self, feature: SparseFeature, values: Any, num_rows: int) -> np.ndarray:
        if isinstance(values, StringLists):  # packed lists: their non-empty values are the tokens
            tokens, rows = values.values, values.rows()
            kept = np.diff(tokens.offsets) > 0
            if not kept.all():  # empty values span no bytes: dropping them only drops their offsets
                ends = tokens.offsets[1:][kept]
                tokens, rows = StringColumn(tokens.data, np.concatenate([[0], ends]).astype(np.int64)), rows[kept]
            return _token_slots(feature, tokens, rows, num_rows)
        split = split_tokens(values, feature.separator) if isinstance(values, StringColumn) else None
        if split is not None:  # packed strings: split and encode without a Python loop per row
            return _token_slots(feature, *split, num_rows)
        lists = [split_values(v, feature.separator) for v in (values.to_list() if isinstance(values, StringColumn) else values)]
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
        out: dict[str, Any] = {
            "version": SPEC_VERSION,
            "dense": [f.to_json() for f in self.dense],
            "sparse": [f.to_json() for f in self.sparse],
        }
        if self.bucketized:  # optional: files without it (all files written before it existed) still load
            out["bucketized"] = [f.to_json() for f in self.bucketized]
        return out

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
        bucketized = tuple(
            BucketizedFeature(name=b["name"], source=b["source"], boundaries=tuple(b["boundaries"]))
            for b in payload.get("bucketized", ())
        )
        return cls(dense=dense, sparse=sparse, bucketized=bucketized)

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



def _token_slots(feature: SparseFeature, tokens: StringColumn, rows: np.ndarray, num_rows: int) -> np.ndarray:
    """A multi-valued feature's non-empty ``tokens`` (in row order; ``rows``: the row of each)
    -> its ``int64[N, max_values]`` columns: each row's first ``max_values`` tokens, padded with 0."""
    counts = np.bincount(rows, minlength=num_rows)
    slots = np.arange(len(rows)) - (np.cumsum(counts) - counts)[rows]
    kept = slots < feature.max_values
    out = np.zeros((num_rows, feature.max_values), np.int64)
    hashes, missing = hash_strings(tokens)
    out[rows[kept], slots[kept]] = feature.lookup(hashes[kept], missing[kept])
    return out


def infer_rows(columns: Columns) -> int:
    for values in columns.values():
        if values is not None:
            return len(values)
    raise ValueError("cannot infer the number of rows from empty columns")


_DENSE_TYPES = frozenset({int, float, type(None)})


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
            if not isinstance(v, list) or not set(map(type, v)) <= SPARSE_TYPES:
                raise FeatureError(
                    feature.name, f"expected an array of strings/integers or a string, got {json_type(v)}", record=i
                )
            texts.extend(x for x in v if isinstance(x, str))
        _check_encodable(feature.name, texts, values)
        return values
    types = set(map(type, values))
    if not types <= SPARSE_TYPES:
        bad = next(i for i, v in enumerate(values) if type(v) not in SPARSE_TYPES)
        raise FeatureError(feature.name, f"expected a string or integer, got {json_type(values[bad])}", record=bad)
    column = pack_strings(values)
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



def _as_dict(record: Any, index: int) -> dict[str, Any]:
    if not isinstance(record, Mapping):
        raise FeatureError("<record>", f"expected a JSON object, got {json_type(record)}", record=index)
    return dict(record)


def _row_text_bytes(values: Sequence[Any]) -> np.ndarray:
    """UTF-8 bytes of each record's text in a multi-valued column (validated
    values: a string, a list of strings/integers, or None): int64[N]."""
    texts = [
        v if type(v) is str else "".join([x if type(x) is str else str(x) for x in v if x is not None]) if v else ""
        for v in values
    ]
    spans = utf8_spans("\x00".join(texts), len(texts)) if texts else None
    if spans is not None:
        return spans[2]
    # A value holding a NUL, or no values at all.
    return np.array([len(t.encode("utf-8", "surrogatepass")) for t in texts], np.int64)


def _text_breach(names: Sequence[str], row_bytes: np.ndarray, limits: TextLimits) -> FeatureError | None:
    """The first value (in ``names`` order, then record order) above
    ``limits.max_value_bytes``, else the first group of rows whose text is
    above ``limits.max_total_bytes``, as the error to raise; None when within both.

    ``row_bytes[k, i]`` holds the UTF-8 bytes of feature ``names[k]`` in row ``i``: int64[F, N].
    """
    num_features, num_rows = row_bytes.shape
    if not num_features or not num_rows:
        return None
    if row_bytes.max() <= limits.max_value_bytes and row_bytes.sum() <= limits.max_total_bytes:
        return None  # no value too long, and all groups together within one group's limit: the usual case, in two passes
    over = np.flatnonzero(row_bytes > limits.max_value_bytes)
    if len(over):
        feature, row = divmod(int(over[0]), num_rows)
        size = int(row_bytes[feature, row])
        return FeatureError(
            names[feature], f"{size} bytes exceed the limit of {limits.max_value_bytes} bytes per value", record=row
        )
    groups = np.asarray([g for g in limits.groups if g > 0] or [num_rows], np.int64)
    group_totals = np.add.reduceat(row_bytes.sum(axis=0), np.cumsum(groups) - groups)
    over = np.flatnonzero(group_totals > limits.max_total_bytes)
    if len(over):
        total = int(group_totals[over[0]])
        return FeatureError("", f"{total} bytes of text exceed the limit of {limits.max_total_bytes} bytes per request")
    return None



def _encode_valid_values(
    spec: FeatureSpec, values: list[list[Any]], num_rows: int, text_limits: TextLimits | None = None
) -> tuple[np.ndarray, np.ndarray] | None:
    """``encode_records``' fast path: a few C-level passes over the values,
    each dense column converted by numpy, all single-valued categorical
    values joined, encoded and hashed at once.

    ``values`` holds one list per feature, in ``feature_names`` order.
    Returns None, without raising, whenever the per-feature path must run:
    a value to report (so errors and their order stay those of
    ``_dense_column``/``_sparse_column``) or text ``joined_utf8`` leaves
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
    texts = [join_text(values[num_dense + k]) for k in single]
    if None in texts:
        return None
    spans = utf8_spans("\x00".join(texts), len(single) * num_rows) if single else None
    if single and spans is None:  # also no rows at all: the general path builds the empty tensors
        return None
    multi = {k: _sparse_column(f, values[num_dense + k]) for k, f in enumerate(spec.sparse) if f.multi_valued}
    if text_limits is not None:
        # Above a limit: the general path finds the first value to report.
        sizes = spans[2].reshape(len(single), num_rows) if spans is not None else np.zeros((0, num_rows), np.int64)
        if multi:
            sizes = np.concatenate([sizes, [_row_text_bytes(column) for column in multi.values()]])
        names = [spec.sparse[k].name for k in (*single, *multi)]
        if _text_breach(names, sizes, text_limits) is not None:
            return None
    dense = np.zeros((num_rows, num_dense), np.float32)
    for j, feature in enumerate(spec.dense):
        dense[:, j] = feature.apply(raw[j])
    sparse = np.zeros((num_rows, spec.num_sparse_columns), np.int64)
    starts = spec._column_starts
    if spans is not None:
        hashes, missing = (part.reshape(len(single), num_rows) for part in hash_spans(*spans))
        sparse[:, spec._single_columns] = spec._single_lookup(hashes, missing).T
    for k, column in multi.items():
        feature = spec.sparse[k]
        sparse[:, starts[k] : starts[k] + feature.width] = spec._encode_multi(feature, column, num_rows)
    spec._bucketize(raw, sparse)
    return dense, sparse



def short_text(text: str, *, limit: int = 64) -> str:
    """``text``, or its first ``limit`` characters and "...": how messages quote a client's text."""
    return text if len(text) <= limit else f"{text[:limit]}..."


def json_type(value: Any) -> str:
    """How an error message names a value's JSON type ("a string", "an array", ...), never a Python type."""
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
    return "a value JSON cannot hold"

