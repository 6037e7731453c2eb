"""Valid raw records drawn from a FeatureSpec, as clients would send them.

Export uses them as held-out inputs for the parity check when no real test
split is at hand; the benchmarks and load tests use them as request bodies.
Values follow the spec: dense features get values in the range their
transform expects (non-negative counts for ``log1p``, around the training
mean for ``standard``), categorical features draw from the vocabulary with a
long tail (plus some unseen values) or from a pool of hex strings for hashed
features, and a fraction of every feature is missing.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from featurespec import DenseFeature, FeatureSpec, SparseFeature

_HASH_POOL = 200_000  # distinct hex strings per hashed feature: more than a kaggle table's rows
_POOL_SEED = 20_240_601


def sample_columns(
    spec: FeatureSpec, num_rows: int, *, seed: int, missing_rate: float = 0.05
) -> dict[str, Any]:
    """Columnar raw data for ``spec.encode_columns``: dense float64 (NaN = missing),
    single-valued sparse as object arrays of str/None, multi-valued as lists of lists."""
    if num_rows < 1:
        raise ValueError(f"num_rows must be >= 1, got {num_rows}")
    if not 0.0 <= missing_rate < 1.0:
        raise ValueError(f"missing_rate must be in [0, 1), got {missing_rate}")
    rng = np.random.default_rng(seed)
    columns: dict[str, Any] = {}
    for dense in spec.dense:
        values = _dense_values(dense, num_rows, rng)
        values[rng.random(num_rows) < missing_rate] = np.nan
        columns[dense.name] = values
    for sparse in spec.sparse:
        if sparse.multi_valued:
            counts = rng.integers(0, sparse.max_values + 1, num_rows)
            flat = _sparse_values(sparse, int(counts.sum()), rng)
            bounds = np.concatenate([[0], np.cumsum(counts)])
            columns[sparse.name] = [flat[a:b].tolist() for a, b in zip(bounds[:-1], bounds[1:])]
        else:
            values = _sparse_values(sparse, num_rows, rng)
            values[rng.random(num_rows) < missing_rate] = None
            columns[sparse.name] = values
    return columns


def sample_records(
    spec: FeatureSpec, num_rows: int, *, seed: int, missing_rate: float = 0.05
) -> list[dict[str, Any]]:
    """JSON-like records (what a client POSTs); a missing feature is left out.

    Encodes exactly like ``sample_columns`` with the same arguments.
    """
    columns = sample_columns(spec, num_rows, seed=seed, missing_rate=missing_rate)
    records: list[dict[str, Any]] = [{} for _ in range(num_rows)]
    for dense in spec.dense:
        values = columns[dense.name]
        integral = dense.transform == "log1p"  # counts, as Criteo clients send them
        for record, value in zip(records, values.tolist()):
            if value == value:  # not NaN
                record[dense.name] = int(value) if integral else value
    for sparse in spec.sparse:
        for record, value in zip(records, list(columns[sparse.name])):
            if value is not None and value != []:
                record[sparse.name] = value
    return records


def kservev2_body(spec: FeatureSpec, records: list[dict[str, Any]]) -> dict[str, Any]:
    """The KServe v2 request for ``records``: one input tensor per feature, in
    spec order, ``null`` where a record leaves the feature out."""
    inputs = []
    for feature in (*spec.dense, *spec.sparse):
        data = [record.get(feature.name) for record in records]
        datatype = "FP64" if isinstance(feature, DenseFeature) else "BYTES"
        inputs.append({"name": feature.name, "shape": [len(records)], "datatype": datatype, "data": data})
    return {"inputs": inputs}


def _dense_values(feature: DenseFeature, num_rows: int, rng: np.random.Generator) -> np.ndarray:
    if feature.transform == "log1p":
        # Heavy-tailed non-negative counts; the mean of the raw values sets the scale.
        scale = max(feature.mean, 1.0)
        return np.floor(rng.exponential(scale, num_rows) ** rng.uniform(0.5, 1.2, num_rows))
    return rng.normal(feature.mean, feature.std, num_rows)


def _sparse_values(feature: SparseFeature, count: int, rng: np.random.Generator) -> np.ndarray:
    out = np.empty(count, dtype=object)
    if count == 0:
        return out
    if feature.kind == "vocab" and feature.vocab:
        # Zipf-like ranks: the vocabulary is sorted most frequent first.
        ranks = np.minimum(rng.zipf(1.3, count) - 1, len(feature.vocab) - 1)
        out[:] = np.asarray(feature.vocab, dtype=object)[ranks]
        unseen = rng.random(count) < 0.02
        out[unseen] = [f"unseen-{v:x}" for v in rng.integers(0, 1 << 32, int(unseen.sum())).tolist()]
    else:
        # Criteo-like 8-hex tokens, Zipf-distributed over a fixed pool: real
        # categorical traffic is skewed, which is what embedding caches see.
        pool = np.random.default_rng(_POOL_SEED).integers(0, 1 << 32, _HASH_POOL)
        ranks = np.minimum(rng.zipf(1.1, count) - 1, _HASH_POOL - 1)
        out[:] = [f"{v:08x}" for v in pool[ranks].tolist()]
    return out
