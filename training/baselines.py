"""Tabular baselines trained on the same split as the models, reported beside them.

Two scikit-learn models read the source's raw columns (not the FeatureSpec's
tensors), so they answer "what would a standard tabular model get on these
rows?":

* ``sklearn_logistic``: ``LogisticRegression`` on one-hot features: every
  numeric column cut into quantile bins (``KBinsDiscretizer``) plus a
  missing-value indicator, every categorical column one-hot
  (``OneHotEncoder``; values seen fewer than ``min_frequency`` times in the
  sample share one "infrequent" column, which also takes unseen values), every
  multi-valued column one-hot of its tokens (multi-hot). The inverse
  regularization ``C`` is picked on the validation split over ``c_grid``.
* ``hist_gradient_boosting``: ``HistGradientBoostingClassifier`` on the raw
  numerics (missing values handled natively) and the categorical columns as
  native categories: each column's 254 most frequent values in the sample
  keep their own code and the rest share one (scikit-learn allows at most 255
  categories per feature); multi-valued columns become 0/1 columns of their
  ``max_tokens`` most frequent tokens. Boosting stops when the validation
  split's log loss has not improved for ``patience`` iterations.

Training and validation rows are a seeded random sample of at most
``max_train_rows`` / ``max_val_rows`` rows, read chunk by chunk, so the
baselines stay fast on large files; the test split is scored whole, chunk by
chunk. Both report test AUC and log loss, the validation AUC, the chosen
hyper-parameters, the rows used and the seconds spent.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import sparse as sp

from featurespec import StringColumn, hash_strings, split_tokens, split_values
from training import metrics as metric_fns
from training.data import DataSource, Split
from training.fitting import SchemaField

BASELINE_NAMES = ("sklearn_logistic", "hist_gradient_boosting")
# HistGradientBoostingClassifier's ceiling on a categorical feature's codes (max_bins=255): 254 own codes + "other".
_MAX_CATEGORIES = 255
# Stands for a missing categorical value among the 64-bit value hashes (a real value hashing to it is a 2**-64 event).
_MISSING_HASH = np.uint64(0)


@dataclass(frozen=True)
class BaselineOptions:
    """How the baselines sample, encode and tune."""

    max_train_rows: int = 200_000
    max_val_rows: int = 200_000
    bins: int = 16  # quantile bins per numeric column (logistic regression)
    min_frequency: int = 10  # rarer categorical values and tokens share the "infrequent" column (logistic regression)
    # Half-decade steps: on 600,000 synthetic rows a decade grid missed the best C (0.03) by 0.0007 test AUC.
    c_grid: tuple[float, ...] = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
    max_tokens: int = 32  # most frequent tokens of a multi-valued column kept as 0/1 columns (gradient boosting)
    learning_rate: float = 0.1
    max_iterations: int = 1000
    patience: int = 20
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("max_train_rows", "max_val_rows", "min_frequency", "max_tokens", "max_iterations", "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.bins < 2:
            raise ValueError(f"bins must be >= 2, got {self.bins}")
        if not self.c_grid or min(self.c_grid) <= 0:
            raise ValueError(f"c_grid must hold positive values, got {self.c_grid}")
        if not 0 < self.learning_rate <= 1:
            raise ValueError(f"learning_rate must be in (0, 1], got {self.learning_rate}")


# --------------------------------------------------------------------------
# Raw columns
# --------------------------------------------------------------------------


@dataclass
class _Rows:
    """Raw rows of one split in the form both baselines start from."""

    numeric: np.ndarray  # float64[N, numeric columns], NaN = missing
    categorical: np.ndarray  # uint64[N, categorical columns]: value hashes, _MISSING_HASH = missing
    tokens: list[tuple[np.ndarray, np.ndarray]]  # per multi-valued column: (token hashes, row of each token)
    labels: np.ndarray  # float32[N]

    def __len__(self) -> int:
        return len(self.labels)


class _Reader:
    """Turns a source's chunks into :class:`_Rows`, following its schema."""

    def __init__(self, schema: tuple[SchemaField, ...]):
        self.numeric = [f for f in schema if f.dense]
        self.categorical = [f for f in schema if not f.dense and not f.options.multi_valued]
        self.multi_valued = [f for f in schema if not f.dense and f.options.multi_valued]

    def rows(self, columns: dict[str, Any], labels: np.ndarray, keep: np.ndarray | None = None) -> _Rows:
        count = len(labels)
        keep = np.arange(count) if keep is None else keep
        numeric = np.full((len(keep), len(self.numeric)), np.nan)
        for i, f in enumerate(self.numeric):
            if f.name in columns:
                numeric[:, i] = np.asarray(columns[f.name], dtype=np.float64)[keep]
        categorical = np.full((len(keep), len(self.categorical)), _MISSING_HASH, np.uint64)
        for i, f in enumerate(self.categorical):
            if f.name in columns:
                hashes, missing = hash_strings(_as_strings(columns[f.name]))
                categorical[:, i] = np.where(missing, _MISSING_HASH, hashes)[keep]
        tokens = [self._tokens(columns.get(f.name), f, count, keep) for f in self.multi_valued]
        return _Rows(numeric, categorical, tokens, np.asarray(labels, np.float32)[keep])

    @staticmethod
    def _tokens(values: Any, f: SchemaField, count: int, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if values is None:
            return np.zeros(0, np.uint64), np.zeros(0, np.int64)
        split = split_tokens(values, f.options.separator) if isinstance(values, StringColumn) else None
        if split is None:
            listed = values.to_list() if isinstance(values, StringColumn) else list(values)
            per_row = [split_values(v, f.options.separator) for v in listed]
            flat = StringColumn.from_values([token for row in per_row for token in row])
            rows = np.repeat(np.arange(count), [len(row) for row in per_row])
        else:
            flat, rows = split
        hashes, _ = hash_strings(flat)
        # Renumber the rows to positions in ``keep``; tokens of rows left out go.
        position = np.full(count, -1, np.int64)
        position[keep] = np.arange(len(keep))
        new_rows = position[rows]
        kept = new_rows >= 0
        return hashes[kept], new_rows[kept]


def _as_strings(values: Any) -> StringColumn:
    return values if isinstance(values, StringColumn) else StringColumn.from_values(values)


def _concat(parts: list[_Rows]) -> _Rows:
    offsets = np.cumsum([0] + [len(p) for p in parts])
    tokens = []
    for j in range(len(parts[0].tokens)):
        tokens.append((
            np.concatenate([p.tokens[j][0] for p in parts]),
            np.concatenate([p.tokens[j][1] + offset for p, offset in zip(parts, offsets)]),
        ))
    return _Rows(
        np.concatenate([p.numeric for p in parts]),
        np.concatenate([p.categorical for p in parts]),
        tokens,
        np.concatenate([p.labels for p in parts]),
    )


def _read_sample(source: DataSource, split: Split, reader: _Reader, *, cap: int, seed: int) -> _Rows:
    """At most ``cap`` rows of a split, a seeded uniform sample without replacement, read chunk by chunk."""
    total = source.split_rows(split)
    chosen = None
    if total > cap:
        chosen = np.sort(np.random.default_rng([seed, 0xBA5E]).choice(total, cap, replace=False))
    parts, start = [], 0
    for chunk in source.chunks(split):
        end = start + len(chunk)
        keep = None if chosen is None else chosen[np.searchsorted(chosen, start) : np.searchsorted(chosen, end)] - start
        parts.append(reader.rows(chunk.columns, chunk.labels, keep))
        start = end
    if not parts or sum(map(len, parts)) == 0:
        raise ValueError(f"the {split} split has no rows to fit a baseline on")
    return _concat(parts)


def _read_chunks(source: DataSource, split: Split, reader: _Reader) -> Iterator[_Rows]:
    for chunk in source.chunks(split):
        yield reader.rows(chunk.columns, chunk.labels)


# --------------------------------------------------------------------------
# Encoders: fitted on the training sample, applied to any rows
# --------------------------------------------------------------------------


def _token_vocabulary(hashes: np.ndarray, *, min_count: int = 1, limit: int | None = None) -> np.ndarray:
    """Token hashes seen at least ``min_count`` times, most frequent first (at most ``limit``)."""
    unique, counts = np.unique(hashes, return_counts=True)
    order = np.lexsort((unique, -counts))  # most frequent first, ties by hash so the order is deterministic
    unique, counts = unique[order], counts[order]
    unique = unique[counts >= min_count]
    return unique if limit is None else unique[:limit]


def _multi_hot(tokens: tuple[np.ndarray, np.ndarray], vocabulary: np.ndarray, rows: int) -> sp.csr_matrix:
    """0/1 matrix [rows, len(vocabulary)]: whether each row holds each token."""
    hashes, token_rows = tokens
    sorted_vocabulary = np.sort(vocabulary)
    slots = np.argsort(vocabulary)
    found = np.searchsorted(sorted_vocabulary, hashes)
    found = np.minimum(found, max(len(vocabulary) - 1, 0))
    known = (sorted_vocabulary[found] == hashes) if len(vocabulary) else np.zeros(len(hashes), bool)
    matrix = sp.csr_matrix(
        (np.ones(int(known.sum())), (token_rows[known], slots[found[known]])), shape=(rows, len(vocabulary))
    )
    matrix.sum_duplicates()
    matrix.data[:] = 1.0  # a token repeated in one row counts once
    return matrix


class _OneHotFeatures:
    """Logistic regression's inputs: quantile bins + missing indicators, one-hot categories, multi-hot tokens."""

    def __init__(self, options: BaselineOptions):
        self.options = options

    def fit(self, rows: _Rows) -> _OneHotFeatures:
        from sklearn.preprocessing import KBinsDiscretizer, OneHotEncoder

        numeric = rows.numeric
        present = ~np.isnan(numeric)
        # A numeric column with fewer than two distinct present values has no quantile bins; its
        # missing indicator (when some are missing) still says what it can.
        self.binned = [j for j in range(numeric.shape[1]) if len(np.unique(numeric[present[:, j], j])) > 1]
        self.medians = np.array([np.median(numeric[present[:, j], j]) if present[:, j].any() else 0.0
                                 for j in range(numeric.shape[1])])
        self.indicated = [j for j in range(numeric.shape[1]) if not present[:, j].all()]
        self.bins = None
        if self.binned:
            # quantile_method is given because the default changed between scikit-learn releases.
            self.bins = KBinsDiscretizer(n_bins=self.options.bins, encode="onehot", strategy="quantile",
                                         quantile_method="averaged_inverted_cdf", subsample=None)
            with warnings.catch_warnings():
                # Heavy-tailed counts repeat quantiles; KBinsDiscretizer merges those bins and warns each time.
                warnings.simplefilter("ignore", UserWarning)
                self.bins.fit(self._filled(numeric)[:, self.binned])
        self.one_hot = None
        if rows.categorical.shape[1]:
            self.one_hot = OneHotEncoder(handle_unknown="infrequent_if_exist", min_frequency=self.options.min_frequency)
            self.one_hot.fit(rows.categorical.view(np.int64))
        self.token_vocabularies = [_token_vocabulary(hashes, min_count=self.options.min_frequency)
                                   for hashes, _ in rows.tokens]
        return self

    def _filled(self, numeric: np.ndarray) -> np.ndarray:
        return np.where(np.isnan(numeric), self.medians, numeric)

    def transform(self, rows: _Rows) -> sp.csr_matrix:
        blocks = []
        if self.bins is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                blocks.append(sp.csr_matrix(self.bins.transform(self._filled(rows.numeric)[:, self.binned])))
        if self.indicated:
            blocks.append(sp.csr_matrix(np.isnan(rows.numeric[:, self.indicated]).astype(np.float64)))
        if self.one_hot is not None:
            blocks.append(self.one_hot.transform(rows.categorical.view(np.int64)))
        blocks.extend(_multi_hot(tokens, vocabulary, len(rows))
                      for tokens, vocabulary in zip(rows.tokens, self.token_vocabularies))
        if not blocks:
            return sp.csr_matrix((len(rows), 0))
        return sp.hstack(blocks, format="csr")


class _TreeFeatures:
    """Gradient boosting's inputs: raw numerics, capped categorical codes, 0/1 columns of frequent tokens."""

    def __init__(self, options: BaselineOptions):
        self.options = options

    def fit(self, rows: _Rows) -> _TreeFeatures:
        # scikit-learn cannot bin a numeric column missing in every row; such a column carries nothing anyway.
        self.numeric = np.flatnonzero(~np.isnan(rows.numeric).all(axis=0))
        # Per categorical column: its most frequent value hashes, code i for the i-th (the rest share the last code).
        self.kept = []
        for j in range(rows.categorical.shape[1]):
            column = rows.categorical[:, j]
            self.kept.append(_token_vocabulary(column[column != _MISSING_HASH], limit=_MAX_CATEGORIES - 1))
        self.token_vocabularies = [_token_vocabulary(hashes, limit=self.options.max_tokens) for hashes, _ in rows.tokens]
        return self

    def transform(self, rows: _Rows) -> np.ndarray:
        codes = np.full(rows.categorical.shape, np.nan)
        for j, kept in enumerate(self.kept):
            column = rows.categorical[:, j]
            order = np.argsort(kept)
            position = np.minimum(np.searchsorted(kept[order], column), max(len(kept) - 1, 0))
            known = (kept[order][position] == column) if len(kept) else np.zeros(len(column), bool)
            codes[:, j] = np.where(known, order[position] if len(kept) else 0, len(kept))
            codes[column == _MISSING_HASH, j] = np.nan  # missing: scikit-learn's own missing-category branch
        token_columns = [_multi_hot(tokens, vocabulary, len(rows)).toarray()
                         for tokens, vocabulary in zip(rows.tokens, self.token_vocabularies)]
        # A constant column stands in when no column is left: the model then predicts the base rate.
        constant = [np.zeros((len(rows), 1))] if self._width(rows) == 0 else []
        return np.hstack([rows.numeric[:, self.numeric], codes, *token_columns, *constant])

    def _width(self, rows: _Rows) -> int:
        return len(self.numeric) + rows.categorical.shape[1] + sum(len(v) for v in self.token_vocabularies)

    def categorical_columns(self, rows: _Rows) -> np.ndarray:
        """Boolean mask of the columns of :meth:`transform` that are categorical."""
        mask = np.zeros(max(self._width(rows), 1), bool)
        mask[len(self.numeric) : len(self.numeric) + rows.categorical.shape[1]] = True
        return mask


# --------------------------------------------------------------------------
# Fitting and scoring
# --------------------------------------------------------------------------


def _scores(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    return {"auc": metric_fns.auc(labels, probabilities), "logloss": metric_fns.logloss(labels, probabilities)}


def _test_metrics(source: DataSource, reader: _Reader, predict: Any) -> dict[str, float]:
    """Test AUC and log loss of ``predict(rows) -> probabilities`` over the whole test split, chunk by chunk."""
    labels, probabilities = [], []
    for rows in _read_chunks(source, "test", reader):
        labels.append(rows.labels)
        probabilities.append(predict(rows))
    if not labels:
        raise ValueError("the test split has no rows to score the baselines on")
    return _scores(np.concatenate(labels), np.concatenate(probabilities))


def _fit_logistic(train: _Rows, val: _Rows, options: BaselineOptions) -> tuple[Any, dict[str, Any]]:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    features = _OneHotFeatures(options).fit(train)
    x_train, x_val = features.transform(train), features.transform(val)
    best: tuple[float, float, Any] | None = None
    tried = {}
    # Each C starts from the previous (smaller) C's solution: the same optimum, reached in fewer iterations.
    model = LogisticRegression(max_iter=1000, warm_start=True, random_state=options.seed)
    for c in sorted(options.c_grid):
        model.set_params(C=c)
        with warnings.catch_warnings():
            # A C that would need more iterations is a C that loses on validation; the grid decides.
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(x_train, train.labels)
        val_auc = _auc_or_minus_logloss(val.labels, model.predict_proba(x_val)[:, 1])
        tried[str(c)] = val_auc
        if best is None or val_auc > best[0]:
            best = (val_auc, c, copy.deepcopy(model))
    val_score, c, model = best

    def predict(rows: _Rows) -> np.ndarray:
        return model.predict_proba(features.transform(rows))[:, 1]

    return predict, {"C": c, "val_auc_by_C": tried, "val_auc": val_score, "features": x_train.shape[1]}


def _fit_boosting(train: _Rows, val: _Rows, options: BaselineOptions) -> tuple[Any, dict[str, Any]]:
    from sklearn.ensemble import HistGradientBoostingClassifier

    features = _TreeFeatures(options).fit(train)
    model = HistGradientBoostingClassifier(
        learning_rate=options.learning_rate,
        max_iter=options.max_iterations,
        early_stopping=True,
        n_iter_no_change=options.patience,
        categorical_features=features.categorical_columns(train),
        random_state=options.seed,
    )
    model.fit(features.transform(train), train.labels, X_val=features.transform(val), y_val=val.labels)
    val_auc = _auc_or_minus_logloss(val.labels, model.predict_proba(features.transform(val))[:, 1])

    def predict(rows: _Rows) -> np.ndarray:
        return model.predict_proba(features.transform(rows))[:, 1]

    return predict, {"iterations": int(model.n_iter_), "learning_rate": options.learning_rate, "val_auc": val_auc}


def _auc_or_minus_logloss(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """Validation score to maximize: AUC, or minus the log loss where AUC is undefined (one class)."""
    value = metric_fns.auc(labels, probabilities)
    return value if not math.isnan(value) else -metric_fns.logloss(labels, probabilities)


_FITTERS = {"sklearn_logistic": _fit_logistic, "hist_gradient_boosting": _fit_boosting}


def tabular_baselines(
    source: DataSource, *, options: BaselineOptions = BaselineOptions(), threads: int | None = None
) -> dict[str, dict[str, Any]]:
    """Fit both baselines on ``source``'s training split (tuned on its validation split), score its test split.

    Returns ``{name: {"test_auc", "test_logloss", "val_auc", "train_rows", "val_rows", "params", "seconds"}}``.
    ``threads`` caps the OpenMP/BLAS threads scikit-learn uses (None: its own default).
    """
    from threadpoolctl import threadpool_limits

    reader = _Reader(tuple(source.schema))
    with threadpool_limits(limits=threads):
        train = _read_sample(source, "train", reader, cap=options.max_train_rows, seed=options.seed)
        val = _read_sample(source, "val", reader, cap=options.max_val_rows, seed=options.seed + 1)
        results = {}
        for name, fit in _FITTERS.items():
            started = time.perf_counter()
            predict, params = fit(train, val, options)
            test = _test_metrics(source, reader, predict)
            results[name] = {
                "test_auc": test["auc"],
                "test_logloss": test["logloss"],
                "val_auc": params.pop("val_auc"),
                "train_rows": len(train),
                "val_rows": len(val),
                "params": params,
                "seconds": time.perf_counter() - started,
            }
    return results
