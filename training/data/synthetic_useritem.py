"""A synthetic user-item source with planted preferences, shaped like MovieLens.

The planted model: ``T`` topics with random centroids in ``R^K``; each item
belongs to a topic (its factor is the topic's centroid plus noise) and each
user prefers one (likewise). An item's popularity is Zipf-distributed over a
random order of the catalogue. The planted affinity of user ``u`` and item ``i``
is ``sharpness * <p_u, q_i> + log popularity_i``.

Each user's positives (label 1) are a draw without replacement from
``softmax(affinity(u, .))`` (Plackett-Luce, by Gumbel top-k), in that order:
the user's next positive is an unseen item with probability proportional to
``exp(affinity)``, so ranking the unseen items by the planted affinity is
the best possible ranking of a user's later positives. That is the
**oracle** reported beside the models (:meth:`SyntheticUserItemSource.affinity`).
Each user also has negatives (label 0): items drawn by popularity alone,
shown but not liked, so the rankers and matrix factorization have both
classes to learn from. Timestamps spread each user's interactions over one
shared timeline, so the time split holds later interactions of the same users.

Features, named as MovieLens names them: ``user`` and ``segment`` (the
user's topic, right 70% of the time), ``item``, ``genres`` (the item's topic,
and sometimes a second one; multi-valued) and ``release_year`` (noise), and
the history features of :mod:`training.data.interactions`. The source hands
out what the ranking evaluation reads (:class:`training.evaluation.UserItemSource`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from featurespec import StringColumn
from training.data import SPLITS, Chunk, Split
from training.data.interactions import (
    DEFAULT_HISTORY_LENGTH,
    SPLIT_NAMES,
    HistoryIndex,
    Interactions,
    SplitName,
    history_columns,
    history_schema,
    leave_last_out,
    time_split,
)
from training.fitting import SchemaField, SparseOptions

USER_FEATURES = ("user", "segment")
ITEM_FEATURES = ("item", "genres", "release_year")
_TIMELINE_SECONDS = 100_000_000
_USER_BLOCK = 1024  # users per block of the [users, items] Gumbel matrices


@dataclass(frozen=True)
class UserItemWorld:
    """The planted model of one seed; ``U`` users, ``I`` items, ``K`` latent dims, ids are row numbers."""

    user_factors: np.ndarray  # float64[U, K]
    item_factors: np.ndarray  # float64[I, K]
    log_popularity: np.ndarray  # float64[I]
    user_segments: np.ndarray  # int64[U], the topic the user feature reports
    item_genres: tuple[str, ...]  # per item, "|"-joined topics
    release_years: np.ndarray  # float64[I]
    sharpness: float

    def affinity(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """``float64[R]``: the planted affinity of each (user row, item row) pair."""
        return self.sharpness * np.einsum("rk,rk->r", self.user_factors[users], self.item_factors[items]) + \
            self.log_popularity[items]


def build_world(
    *, users: int, items: int, topics: int, latent_dim: int, sharpness: float, popularity_exponent: float, seed: int
) -> UserItemWorld:
    rng = np.random.default_rng([seed, 0x7E11])
    centroids = rng.normal(size=(topics, latent_dim)) / np.sqrt(latent_dim)
    item_topic = rng.integers(topics, size=items)
    user_topic = rng.integers(topics, size=users)
    item_factors = centroids[item_topic] + 0.5 * rng.normal(size=(items, latent_dim)) / np.sqrt(latent_dim)
    user_factors = centroids[user_topic] + 0.5 * rng.normal(size=(users, latent_dim)) / np.sqrt(latent_dim)
    ranks = rng.permutation(items) + 1
    log_popularity = -popularity_exponent * np.log(ranks)
    log_popularity -= log_popularity.mean()
    # The user feature is a noisy view of the preference: the model must still learn from history.
    segments = np.where(rng.random(users) < 0.7, user_topic, rng.integers(topics, size=users))
    second = np.where(rng.random(items) < 0.3, rng.integers(topics, size=items), -1)
    genres = tuple(
        f"t{first}" if extra < 0 or extra == first else f"t{first}|t{extra}"
        for first, extra in zip(item_topic.tolist(), second.tolist())
    )
    return UserItemWorld(user_factors, item_factors, log_popularity, segments, genres,
                         rng.integers(1950, 2020, size=items).astype(np.float64), sharpness)


def synthetic_useritem_schema(*, history_length: int = DEFAULT_HISTORY_LENGTH) -> tuple[SchemaField, ...]:
    """The raw fields and how each is fitted: every id keeps its own row, as MovieLens's do."""
    ids = SparseOptions(min_count=1)
    schema = (
        SchemaField("release_year", dense=True, transform="standard"),
        SchemaField("user", dense=False, options=ids),
        SchemaField("segment", dense=False, options=ids),
        SchemaField("item", dense=False, options=ids),
        SchemaField("genres", dense=False, options=SparseOptions(multi_valued=True, max_values=2, min_count=1)),
    )
    if history_length:
        schema += history_schema(length=history_length, items=ids, candidate="item")
    return schema


class SyntheticUserItemSource:
    """Interactions drawn from a :class:`UserItemWorld`; ``rows`` keeps the first N by time.

    Each user has ``min_positives`` plus Poisson(``extra_positives``)
    positives and about ``negative_share`` as many negatives. ``split`` and
    ``history_length`` mean what they mean for MovieLens.
    """

    name = "synthetic-useritem"

    def __init__(
        self,
        *,
        users: int = 2_000,
        items: int = 1_000,
        topics: int = 12,
        latent_dim: int = 16,
        sharpness: float = 6.0,
        popularity_exponent: float = 0.8,
        min_positives: int = 5,
        extra_positives: float = 20.0,
        negative_share: float = 0.5,
        rows: int | None = None,
        chunk_rows: int = 262_144,
        split: SplitName = "time",
        history_length: int = DEFAULT_HISTORY_LENGTH,
        seed: int = 0,
    ):
        for name, value in (("users", users), ("items", items), ("topics", topics), ("latent_dim", latent_dim),
                            ("min_positives", min_positives), ("chunk_rows", chunk_rows)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if min_positives + extra_positives > items:
            raise ValueError(f"users cannot have {min_positives} + {extra_positives} positives among {items} items")
        if not sharpness > 0 or extra_positives < 0 or negative_share < 0 or popularity_exponent < 0:
            raise ValueError(
                f"sharpness must be > 0, and extra_positives, negative_share and popularity_exponent >= 0; got "
                f"{sharpness}, {extra_positives}, {negative_share}, {popularity_exponent}"
            )
        if rows is not None and rows < 1:
            raise ValueError(f"rows must be >= 1 (or None for every interaction), got {rows}")
        if split not in SPLIT_NAMES:
            raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLIT_NAMES)}")
        if history_length < 0:
            raise ValueError(f"history_length must be >= 0 (0: no history features), got {history_length}")
        self.world = build_world(users=users, items=items, topics=topics, latent_dim=latent_dim, sharpness=sharpness,
                                 popularity_exponent=popularity_exponent, seed=seed)
        self.min_positives, self.extra_positives, self.negative_share = min_positives, extra_positives, negative_share
        self.rows, self.chunk_rows, self.split, self.history_length, self.seed = rows, chunk_rows, split, history_length, seed
        self.schema = synthetic_useritem_schema(history_length=history_length)
        self._loaded: tuple[Interactions, dict[Split, tuple[int, int]], HistoryIndex, HistoryIndex] | None = None
        self._columns: dict[str, object] | None = None

    # -- DataSource ------------------------------------------------------------

    @property
    def num_rows(self) -> int:
        return len(self._load()[0])

    def split_bounds(self, split: Split) -> tuple[int, int]:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        return self._load()[1][split]

    def split_rows(self, split: Split) -> int:
        start, end = self.split_bounds(split)
        return end - start

    def chunks(self, split: Split) -> Iterator[Chunk]:
        start, end = self.split_bounds(split)
        every, columns = self._load()[0], self._all_columns()
        for lo in range(start, end, self.chunk_rows):
            hi = min(lo + self.chunk_rows, end)
            yield Chunk(
                columns={name: values.slice(lo, hi) if isinstance(values, StringColumn) else values[lo:hi]
                         for name, values in columns.items()},
                labels=every.labels[lo:hi],
                extras={"user": every.users[lo:hi], "item": every.items[lo:hi], "timestamp": every.timestamps[lo:hi]},
            )

    # -- UserItemSource (training.evaluation) -------------------------------------

    def interactions(self) -> Interactions:
        return self._load()[0]

    def catalogue(self) -> np.ndarray:
        return np.arange(len(self.world.item_factors), dtype=np.int64)

    def user_columns(self, users: np.ndarray) -> dict[str, StringColumn]:
        users = np.asarray(users, np.int64)
        return {"user": _text(users), "segment": _text(self.world.user_segments[users], prefix="t")}

    def item_columns(self, items: np.ndarray) -> dict[str, object]:
        items = np.asarray(items, np.int64)
        return {
            "item": _text(items),
            "genres": StringColumn.from_values([self.world.item_genres[i] for i in items.tolist()]),
            "release_year": self.world.release_years[items],
        }

    def history_columns(self, users: np.ndarray, timestamps: np.ndarray) -> dict[str, object]:
        _, _, history, liked = self._load()
        if not self.history_length:
            return {}
        return history_columns(history, liked, users, timestamps, length=self.history_length)

    def affinity(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """The oracle's score: the planted affinity of each (user id, item id) pair."""
        return self.world.affinity(np.asarray(users, np.int64), np.asarray(items, np.int64))

    # -- generation ----------------------------------------------------------------

    def _load(self) -> tuple[Interactions, dict[Split, tuple[int, int]], HistoryIndex, HistoryIndex]:
        if self._loaded is None:
            self._loaded = self._generate()
        return self._loaded

    def _generate(self) -> tuple[Interactions, dict[Split, tuple[int, int]], HistoryIndex, HistoryIndex]:
        world, rng = self.world, np.random.default_rng([self.seed, 0x5EED])
        num_users, num_items = len(world.user_factors), len(world.item_factors)
        positives = self.min_positives + rng.poisson(self.extra_positives, size=num_users).clip(
            0, num_items - self.min_positives)
        negatives = np.minimum(rng.poisson(self.negative_share * positives), num_items - positives)
        user_parts, item_parts, label_parts = [], [], []
        for lo in range(0, num_users, _USER_BLOCK):
            block = np.arange(lo, min(lo + _USER_BLOCK, num_users))
            gumbel = rng.gumbel(size=(len(block), num_items))
            affinity = world.sharpness * world.user_factors[block] @ world.item_factors.T + world.log_popularity
            liked_order = np.argsort(-(affinity + gumbel), axis=1)  # Plackett-Luce draws, in order
            shown_keys = world.log_popularity + rng.gumbel(size=(len(block), num_items))
            for row, user in enumerate(block.tolist()):
                liked = liked_order[row, : positives[user]]
                keys = shown_keys[row].copy()
                keys[liked] = -np.inf  # a negative is an item the user does not like
                disliked = np.argpartition(-keys, negatives[user])[: negatives[user]] if negatives[user] else liked[:0]
                # Interleave at random, keeping the positives' draw order.
                slots = np.sort(rng.choice(len(liked) + len(disliked), size=len(liked), replace=False))
                items = np.empty(len(liked) + len(disliked), np.int64)
                is_liked = np.zeros(len(items), bool)
                is_liked[slots] = True
                items[is_liked], items[~is_liked] = liked, rng.permutation(disliked)
                user_parts.append(np.full(len(items), user, np.int64))
                item_parts.append(items)
                label_parts.append(is_liked.astype(np.float32))
        users, items, labels = (np.concatenate(parts) for parts in (user_parts, item_parts, label_parts))
        timestamps = _timestamps(rng, users)
        order = np.argsort(timestamps, kind="stable")
        if self.rows is not None:
            order = order[: self.rows]
        users, items, labels, timestamps = users[order], items[order], labels[order], timestamps[order]
        codes = time_split(len(users)) if self.split == "time" else leave_last_out(users, timestamps)
        grouped = np.argsort(codes, kind="stable")  # rows grouped by split, in time order within each
        every = Interactions(users[grouped], items[grouped], labels[grouped], timestamps[grouped], codes[grouped])
        counts = np.bincount(codes, minlength=len(SPLITS))
        ends = np.cumsum(counts)
        bounds = {split: (int(end - count), int(end)) for split, count, end in zip(SPLITS, counts, ends)}
        positive = every.labels == 1
        history = HistoryIndex(every.users, every.items, every.timestamps)
        liked_index = HistoryIndex(every.users[positive], every.items[positive], every.timestamps[positive])
        return every, bounds, history, liked_index

    def _all_columns(self) -> dict[str, object]:
        """Every row's raw features, in row order, computed once."""
        if self._columns is None:
            every = self._load()[0]
            columns: dict[str, object] = {**self.user_columns(every.users), **self.item_columns(every.items)}
            columns.update(self.history_columns(every.users, every.timestamps))
            self._columns = columns
        return self._columns


def _timestamps(rng: np.random.Generator, users: np.ndarray) -> np.ndarray:
    """Distinct times on one timeline, increasing within each user's run of rows (its interaction order)."""
    times = rng.choice(_TIMELINE_SECONDS, size=len(users), replace=False)
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    segment = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, len(users)]))
    order = np.lexsort((times, segment))  # each user's times ascending, users in row order
    return times[order].astype(np.int64)


def _text(values: np.ndarray, *, prefix: str = "") -> StringColumn:
    return StringColumn.from_values([f"{prefix}{value}" for value in values.tolist()])

