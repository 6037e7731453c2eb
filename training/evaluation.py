"""Ranking evaluation of user-item data: which candidates each user's items are ranked among.

Each protocol is named for its candidate set, as RecBole names its ``full``
and ``uni100`` modes:

* ``ranking_full_catalogue``: for each evaluated user, every catalogue item
  the user did not interact with before the evaluated split; the relevant
  items are the user's positives in the split. HR@10, NDCG@10, recall@10.
* ``ranking_sampled_100``: the NCF protocol (He et al., 2017): the user's
  first positive in the split (under leave-last-out: the held-out item)
  among 100 items the user never interacted with, sampled with a generator
  seeded by ``(seed, user id)``, so a user's negatives do not depend on which
  other users are evaluated. HR@10, NDCG@10.

A user is scored at the test point: the moment of the user's first
interaction in the split. The user's history features are the ones at that
moment (what came strictly before it), so nothing from the split itself
reaches the features. The users evaluated are those with a positive in the
split, or a seeded sample of at most ``max_users`` of them.

A model scores a candidate from its user's features, the history at the
test point and the item's features: the user side and the item side are
encoded once each by the FeatureSpec (:meth:`FeatureSpec.encode_columns`)
and a candidate row is the sum of its user's and its item's encoded rows.
That is exact: each feature comes from exactly one side, and a feature
absent from the columns encodes to 0 (index 0, dense 0.0).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from featurespec import FeatureSpec
from training import metrics as metric_fns
from training.data import SPLITS, Split
from training.data.interactions import Interactions

RANKING_KEYS = ("ranking_rated_items", "ranking_full_catalogue", "ranking_sampled_100")
SAMPLED_NEGATIVES = 100
TOP_K = 10

Scorer = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""``(user_index int64[R], item_index int64[R]) -> scores float[R]``: rows of
:attr:`RankingTask.users` and :attr:`RankingTask.catalogue`."""


@runtime_checkable
class UserItemSource(Protocol):
    """What a data source hands out for the ranking evaluation (MovieLens does)."""

    def interactions(self) -> Interactions: ...

    def catalogue(self) -> np.ndarray: ...

    def user_columns(self, users: np.ndarray) -> dict[str, Any]: ...

    def item_columns(self, items: np.ndarray) -> dict[str, Any]: ...

    def history_columns(self, users: np.ndarray, timestamps: np.ndarray) -> dict[str, Any]: ...


@dataclass(frozen=True)
class RankingTask:
    """One split's ranking evaluation: who is evaluated, at which moment, over which items.

    ``U`` evaluated users, ``I`` catalogue items; the matrices are ``bool[U, I]``.
    """

    split: Split
    users: np.ndarray  # int64[U] user ids
    timestamps: np.ndarray  # int64[U] test points
    catalogue: np.ndarray  # int64[I] item ids, ascending
    seen: np.ndarray  # interacted with in an earlier split: never a full-catalogue candidate
    relevant: np.ndarray  # positive in the split
    interacted: np.ndarray  # interacted with in any split: never a sampled negative
    held_out: np.ndarray  # int64[U] catalogue index of the user's first positive in the split


@dataclass(frozen=True)
class Candidates:
    """Candidate rows of one protocol, grouped by user."""

    user_index: np.ndarray  # int64[R] rows of RankingTask.users
    item_index: np.ndarray  # int64[R] rows of RankingTask.catalogue
    relevant: np.ndarray  # bool[R]

    def __len__(self) -> int:
        return len(self.user_index)


def ranking_task(
    source: UserItemSource, split: Split = "test", *, max_users: int | None = None, seed: int = 0
) -> RankingTask:
    """The users of ``split`` with a positive in it (at most ``max_users``, a seeded sample)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if max_users is not None and max_users < 1:
        raise ValueError(f"max_users must be >= 1 (or None for every user), got {max_users}")
    every = source.interactions()
    code = SPLITS.index(split)
    catalogue = np.asarray(source.catalogue(), np.int64)
    # Interactions with items outside the catalogue cannot be candidates: left out.
    item_index = np.minimum(np.searchsorted(catalogue, every.items), len(catalogue) - 1)
    in_catalogue = catalogue[item_index] == every.items
    in_split = every.splits == code
    positive = in_split & (every.labels == 1) & in_catalogue
    users = np.unique(every.users[positive])
    if max_users is not None and len(users) > max_users:
        users = np.sort(np.random.default_rng(seed).choice(users, size=max_users, replace=False))
    row = np.searchsorted(users, every.users)
    row = np.minimum(row, max(len(users) - 1, 0))
    evaluated = (users[row] == every.users) if len(users) else np.zeros(len(every), bool)
    shape = (len(users), len(catalogue))

    def matrix(mask: np.ndarray) -> np.ndarray:
        out = np.zeros(shape, bool)
        keep = mask & evaluated & in_catalogue
        out[row[keep], item_index[keep]] = True
        return out

    # The test point: the user's first interaction in the split, and the first positive there.
    timestamps = np.full(len(users), np.iinfo(np.int64).max)
    np.minimum.at(timestamps, row[in_split & evaluated], every.timestamps[in_split & evaluated])
    held_out = np.full(len(users), -1, np.int64)
    firsts = positive & evaluated
    order = np.lexsort((np.arange(len(every)), every.timestamps))  # time, then row order
    first_rows = order[firsts[order]]
    _, first_per_user = np.unique(row[first_rows], return_index=True)
    held_out[row[first_rows[first_per_user]]] = item_index[first_rows[first_per_user]]
    return RankingTask(
        split=split,
        users=users,
        timestamps=timestamps,
        catalogue=catalogue,
        seen=matrix(every.splits < code),
        relevant=matrix(positive),
        interacted=matrix(np.ones(len(every), bool)),
        held_out=held_out,
    )


def full_catalogue_candidates(task: RankingTask) -> Candidates:
    """Every catalogue item each user has not interacted with before the split."""
    user_index, item_index = np.nonzero(~task.seen)  # row-major: grouped by user
    return Candidates(user_index, item_index, task.relevant[user_index, item_index])


def sampled_candidates(task: RankingTask, *, negatives: int = SAMPLED_NEGATIVES, seed: int = 0) -> Candidates:
    """Each user's held-out positive and ``negatives`` items the user never interacted with.

    A user with fewer such items gets all of them.
    """
    if negatives < 1:
        raise ValueError(f"negatives must be >= 1, got {negatives}")
    item_parts, relevant_parts = [], []
    for user_index, user in enumerate(task.users.tolist()):
        pool = np.flatnonzero(~task.interacted[user_index])
        sampled = np.random.default_rng([seed, user]).choice(pool, size=min(negatives, len(pool)), replace=False)
        item_parts.append(np.r_[task.held_out[user_index], np.sort(sampled)].astype(np.int64))
        relevant_parts.append(np.arange(len(item_parts[-1])) == 0)
    counts = [len(items) for items in item_parts]
    user_index = np.repeat(np.arange(len(task.users), dtype=np.int64), counts)
    item_index = np.concatenate(item_parts) if item_parts else np.zeros(0, np.int64)
    relevant = np.concatenate(relevant_parts) if relevant_parts else np.zeros(0, bool)
    return Candidates(user_index, item_index, relevant)


def rank_candidates(task: RankingTask, scorer: Scorer, *, seed: int = 0, k: int = TOP_K) -> dict[str, dict[str, Any]]:
    """Both protocols' metrics for one scorer, under their ``metrics.json`` names."""
    full = full_catalogue_candidates(task)
    sampled = sampled_candidates(task, seed=seed)
    result: dict[str, dict[str, Any]] = {}
    for name, candidates, description in (
        ("ranking_full_catalogue", full, "every catalogue item the user had not interacted with before the split"),
        ("ranking_sampled_100", sampled,
         f"the user's first positive in the split among {SAMPLED_NEGATIVES} sampled items the user never interacted with"),
    ):
        scores = scorer(candidates.user_index, candidates.item_index)
        metrics = metric_fns.topk_metrics(candidates.user_index, scores, candidates.relevant, k=k)
        if name == "ranking_sampled_100":
            metrics.pop(f"recall@{k}")  # one relevant item: recall@k is HR@k
        result[name] = {**metrics, "split": task.split, "candidates": description,
                        "mean_candidates": len(candidates) / max(len(task.users), 1)}
    return result


def model_scorer(
    model: nn.Module,
    spec: FeatureSpec,
    source: UserItemSource,
    task: RankingTask,
    *,
    device: torch.device,
    batch_rows: int = 32_768,
) -> Scorer:
    """A scorer running ``model`` on candidate rows (user features + history at the test point + item features)."""
    user_side = {**source.user_columns(task.users), **source.history_columns(task.users, task.timestamps)}
    item_side = source.item_columns(task.catalogue)
    shared = sorted(set(user_side) & set(item_side))
    if shared:
        raise ValueError(f"features {shared} come from both the user and the item side")
    user_dense, user_sparse = spec.encode_columns(user_side, len(task.users))
    item_dense, item_sparse = spec.encode_columns(item_side, len(task.catalogue))

    @torch.inference_mode()
    def score(user_index: np.ndarray, item_index: np.ndarray) -> np.ndarray:
        model.eval()
        out = np.empty(len(user_index), np.float32)
        for lo in range(0, len(user_index), batch_rows):
            users, items = user_index[lo : lo + batch_rows], item_index[lo : lo + batch_rows]
            dense = torch.from_numpy(user_dense[users] + item_dense[items]).to(device)
            sparse = torch.from_numpy(user_sparse[users] + item_sparse[items]).to(device)
            out[lo : lo + len(users)] = torch.sigmoid(model(dense, sparse)).float().cpu().numpy()
        return out

    return score
