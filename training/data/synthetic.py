"""The built-in synthetic source: Criteo-shaped records from a planted model.

Each row has 13 integer count features (heavy-tailed, some missing) and 26
categorical features (8-hex-character tokens, Zipf-distributed over
vocabularies from a handful to tens of thousands of values, some missing),
like the Criteo Display Advertising data. The label is drawn from a known
click probability::

    logit = bias + sum_i dense_effect_i(x_i)               (13 smooth curves)
                 + sum_j effect_j[value_j]                 (26 per-value effects)
                 + sum_(a, b) <left_a[value_a], right_b[value_b]>  (pairwise interactions)

The bias is calibrated so that about a quarter of the rows are positive. The
true probability of every row is kept, so the oracle AUC (the AUC of the true
probabilities, the best any model can reach on these rows) is known.

Per-value effects and interaction factors are strong on the frequent head of
each vocabulary (its 15 most frequent values) and decay with frequency rank on
the long tail, as in real click logs, where a value seen twice carries little
evidence. Everything is deterministic for a seed; chunk ``k`` of the
stream uses its own generator, so chunks can be produced independently.

Run ``python -m training.data.synthetic --rows N --out FILE.tsv`` to write the
rows as a Criteo TSV file (label, I1-I13, C1-C26; empty = missing).
"""

from __future__ import annotations

import argparse
import gzip
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from featurespec import StringColumn
from training.data import SPLITS, Chunk, Split
from training.data.criteo import criteo_schema
from training.fitting import SparseOptions

DENSE_NAMES = tuple(f.name for f in criteo_schema() if f.dense)  # I1..I13
SPARSE_NAMES = tuple(f.name for f in criteo_schema() if not f.dense)  # C1..C26
NUM_DENSE = len(DENSE_NAMES)
NUM_SPARSE = len(SPARSE_NAMES)
TARGET_POSITIVE_RATE = 0.25
_INTERACTION_RANK = 4
# Most frequent values per feature with full-strength effects (and interaction
# factors): each of the 8 interacting pairs has 15 x 15 full-strength value
# combinations. Without the interactions the oracle AUC drops by about 0.024
# (0.917 -> 0.893), so a model must learn them to approach the oracle.
_HEAD_SIZE = 15


@dataclass(frozen=True)
class _World:
    """The planted model: vocabularies, effects and interactions for one seed."""

    vocab_sizes: np.ndarray  # int64[26]
    zipf_exponents: np.ndarray  # float64[26]
    sparse_missing: np.ndarray  # float64[26], probability a value is missing
    tokens: tuple[np.ndarray, ...]  # per feature: '<U8' tokens of each value id
    value_cdfs: tuple[np.ndarray, ...]  # per feature: CDF over value ids (Zipf)
    effects: tuple[np.ndarray, ...]  # per feature: float64[vocab] logit effect
    dense_log_mean: np.ndarray  # float64[13], lognormal parameters of the counts
    dense_log_sigma: np.ndarray
    dense_missing: np.ndarray
    dense_weights: np.ndarray  # float64[13, 2]: linear and curvature weights
    pairs: tuple[tuple[int, int], ...]
    pair_factors: tuple[tuple[np.ndarray, np.ndarray], ...]  # (left[vocab_a, r], right[vocab_b, r])
    bias: float


def _build_world(seed: int) -> _World:
    rng = np.random.default_rng([seed, 0xC417E0])
    vocab_sizes = np.round(np.geomspace(3, 60_000, NUM_SPARSE)).astype(np.int64)
    rng.shuffle(vocab_sizes)
    zipf_exponents = rng.uniform(1.1, 1.6, NUM_SPARSE)
    sparse_missing = np.where(rng.random(NUM_SPARSE) < 0.35, rng.uniform(0.02, 0.4, NUM_SPARSE), 0.0)
    tokens, cdfs, effects = [], [], []
    for j, size in enumerate(vocab_sizes):
        # A bijection of value ids onto 32-bit tokens: odd multiplier mod 2**32.
        multiplier, offset = int(rng.integers(1, 2**31)) * 2 + 1, int(rng.integers(0, 2**32))
        codes = (np.arange(size, dtype=np.uint64) * np.uint64(multiplier) + np.uint64(offset)) & np.uint64(0xFFFFFFFF)
        tokens.append(np.array([f"{c:08x}" for c in codes.tolist()]))
        weights = 1.0 / np.arange(1, size + 1) ** zipf_exponents[j]
        cdfs.append(np.cumsum(weights) / weights.sum())
        scale = rng.uniform(0.15, 0.6)
        effects.append(rng.normal(0.0, scale, size) * _tail_decay(size))
    pairs = _choose_pairs(rng, vocab_sizes)
    pair_factors = []
    for a, b in pairs:
        left = rng.normal(0.0, 0.55, (vocab_sizes[a], _INTERACTION_RANK))
        right = rng.normal(0.0, 0.55, (vocab_sizes[b], _INTERACTION_RANK))
        pair_factors.append((left * _tail_decay(vocab_sizes[a])[:, None], right * _tail_decay(vocab_sizes[b])[:, None]))
    dense_weights = np.stack([rng.normal(0.0, 0.35, NUM_DENSE), rng.normal(0.0, 0.12, NUM_DENSE)], axis=1)
    world = _World(
        vocab_sizes=vocab_sizes,
        zipf_exponents=zipf_exponents,
        sparse_missing=sparse_missing,
        tokens=tuple(tokens),
        value_cdfs=tuple(cdfs),
        effects=tuple(effects),
        dense_log_mean=rng.uniform(0.0, 4.0, NUM_DENSE),
        dense_log_sigma=rng.uniform(0.6, 1.6, NUM_DENSE),
        dense_missing=np.where(rng.random(NUM_DENSE) < 0.5, rng.uniform(0.01, 0.3, NUM_DENSE), 0.0),
        dense_weights=dense_weights,
        pairs=pairs,
        pair_factors=tuple(pair_factors),
        bias=0.0,
    )
    # Calibrate the bias on a sample so that ~25% of rows are positive.
    sample = _sample_rows(world, np.random.default_rng([seed, 0xB1A5]), 50_000)
    logits = sample[2]
    low, high = -10.0, 10.0
    for _ in range(60):
        middle = (low + high) / 2
        if _sigmoid(logits + middle).mean() < TARGET_POSITIVE_RATE:
            low = middle
        else:
            high = middle
    return _World(**{**world.__dict__, "bias": (low + high) / 2})


def _tail_decay(size: int) -> np.ndarray:
    """Effect scale by frequency rank: 1 on the head, decaying as (head/rank)**2 beyond it."""
    ranks = np.arange(1, size + 1)
    return np.minimum(1.0, _HEAD_SIZE / ranks) ** 2


def _choose_pairs(rng: np.random.Generator, vocab_sizes: np.ndarray) -> tuple[tuple[int, int], ...]:
    """Eight interacting pairs among features with at least a few dozen values."""
    candidates = np.flatnonzero(vocab_sizes >= 20)
    chosen: set[tuple[int, int]] = set()
    while len(chosen) < 8:
        a, b = sorted(rng.choice(candidates, 2, replace=False).tolist())
        chosen.add((a, b))
    return tuple(sorted(chosen))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _sample_rows(world: _World, rng: np.random.Generator, n: int):
    """-> (dense float64[n, 13] with NaN, value ids int64[n, 26] with -1 = missing, logit without bias)."""
    counts = np.floor(np.exp(rng.normal(world.dense_log_mean, world.dense_log_sigma, (n, NUM_DENSE)))) - 1.0
    counts = np.maximum(counts, 0.0)
    dense = np.where(rng.random((n, NUM_DENSE)) < world.dense_missing, np.nan, counts)
    # Effects depend only on what a model can observe: a missing count acts as
    # a zero count (DLRM's convention, which the FeatureSpec follows), so the
    # true probability stays the best achievable from the features.
    observed = np.log1p(np.nan_to_num(dense, nan=0.0))
    standardized = (observed - world.dense_log_mean) / world.dense_log_sigma
    logit = standardized @ world.dense_weights[:, 0] + (standardized**2 - 1.0) @ world.dense_weights[:, 1]

    ids = np.empty((n, NUM_SPARSE), np.int64)
    for j in range(NUM_SPARSE):
        ids[:, j] = np.searchsorted(world.value_cdfs[j], rng.random(n), side="right")
        np.minimum(ids[:, j], world.vocab_sizes[j] - 1, out=ids[:, j])
    missing = rng.random((n, NUM_SPARSE)) < world.sparse_missing
    for j in range(NUM_SPARSE):
        logit = logit + np.where(missing[:, j], 0.0, world.effects[j][ids[:, j]])
    for (a, b), (left, right) in zip(world.pairs, world.pair_factors):
        term = np.einsum("nr,nr->n", left[ids[:, a]], right[ids[:, b]])
        logit = logit + np.where(missing[:, a] | missing[:, b], 0.0, term)
    ids[missing] = -1
    return dense, ids, logit


class SyntheticSource:
    """Criteo-shaped rows with known click probabilities; the default data source."""

    name = "synthetic"

    def __init__(
        self,
        *,
        rows: int = 200_000,
        seed: int = 0,
        chunk_rows: int = 262_144,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        sparse_options: SparseOptions | None = None,
    ):
        if rows < 10:
            raise ValueError(f"synthetic data needs at least 10 rows, got {rows}")
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ValueError(f"bad split fractions: val={val_fraction}, test={test_fraction}")
        self.rows, self.seed, self.chunk_rows = rows, seed, chunk_rows
        self.schema = criteo_schema(sparse_options or SparseOptions())
        n_test = max(1, int(rows * test_fraction))
        n_val = max(1, int(rows * val_fraction))
        n_train = rows - n_val - n_test
        self._bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, rows)}
        self._world: _World | None = None

    @property
    def world(self) -> _World:
        if self._world is None:
            self._world = _build_world(self.seed)
        return self._world

    def split_rows(self, split: Split) -> int:
        start, stop = self._bounds[split]
        return stop - start

    def chunks(self, split: Split) -> Iterator[Chunk]:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
        start, stop = self._bounds[split]
        # Chunks are aligned to global row positions so every split is a fixed
        # slice of one deterministic stream.
        for chunk_start in range(start - start % self.chunk_rows, stop, self.chunk_rows):
            lo, hi = max(start - chunk_start, 0), min(stop - chunk_start, self.chunk_rows)
            if hi > lo:
                yield self._block(chunk_start // self.chunk_rows, lo, hi)

    def _block(self, index: int, lo: int, hi: int) -> Chunk:
        """Rows ``lo:hi`` of block ``index`` (the whole block is drawn, to stay deterministic)."""
        world = self.world
        rng = np.random.default_rng([self.seed, 1, index])
        dense, ids, logit = _sample_rows(world, rng, self.chunk_rows)
        probability = _sigmoid(logit + world.bias)
        labels = (rng.random(self.chunk_rows) < probability).astype(np.float32)
        dense, ids, probability, labels = dense[lo:hi], ids[lo:hi], probability[lo:hi], labels[lo:hi]
        columns: dict[str, object] = {name: dense[:, i] for i, name in enumerate(DENSE_NAMES)}
        for j, name in enumerate(SPARSE_NAMES):
            tokens = world.tokens[j][np.maximum(ids[:, j], 0)]
            columns[name] = StringColumn.from_values(np.where(ids[:, j] < 0, "", tokens))
        return Chunk(columns=columns, labels=labels, extras={"probability": probability})


def write_criteo_tsv(path: str | os.PathLike[str], *, rows: int, seed: int = 0) -> None:
    """Write ``rows`` synthetic rows (all splits, in order) as a Criteo TSV file (``.gz`` compresses)."""
    source = SyntheticSource(rows=rows, seed=seed)
    opener = gzip.open if os.fspath(path).endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8", newline="\n") as handle:
        for split in SPLITS:
            for chunk in source.chunks(split):
                fields = [chunk.labels.astype(np.int64).astype(str)]
                for name in DENSE_NAMES:
                    values = chunk.columns[name]
                    text = np.where(np.isnan(values), 0, values).astype(np.int64).astype(str)
                    fields.append(np.where(np.isnan(values), "", text))
                fields.extend(np.array(chunk.columns[name].to_list()) for name in SPARSE_NAMES)
                lines = fields[0]
                for column in fields[1:]:
                    lines = np.char.add(np.char.add(lines, "\t"), column)
                handle.write("\n".join(lines.tolist()))
                handle.write("\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write synthetic Criteo-shaped rows as a TSV file.")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="output path; .gz compresses")
    args = parser.parse_args(argv)
    write_criteo_tsv(args.out, rows=args.rows, seed=args.seed)
    print(f"wrote {args.rows} rows to {args.out}")


if __name__ == "__main__":
    main()
