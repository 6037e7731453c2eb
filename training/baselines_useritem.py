"""User-item baselines on the same split as the models: item popularity and matrix factorization.

They read only who interacted with what (:class:`training.data.interactions.Interactions`),
no features, and answer "how much do the models' features and history add?":

* ``item_popularity``: each item's number of positives in the training
  split (MostPop), the same score for every user.
* ``item_positive_rate``: each item's positive rate in training, smoothed
  toward the overall rate with ``prior_ratings`` pseudo-ratings, so an item
  rated once does not score 0 or 1.
* ``matrix_factorization``: logistic MF, ``sigmoid(b + b_user + b_item +
  p_user . q_item)``, trained on the models' training rows (the ratings,
  and the sampled negatives when the source adds them) with their label
  and loss, full-batch Adam with an L2 penalty, the step kept by
  validation AUC. Users and items without training rows get zero vectors
  and biases.

Each is scored on the test rows (AUC, and log loss where the score is a
probability), on the user's rated test items (``ranking_rated_items``) and
on the protocols of :mod:`training.evaluation` (``ranking_full_catalogue``,
``ranking_sampled_100``), with the same evaluated users as the model.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from training import metrics as metric_fns
from training.data import Split
from training.data.interactions import TEST, TRAIN, Interactions
from training.evaluation import (
    RankingTask,
    Scorer,
    rank_candidates,
    ranking_task,
)

USERITEM_BASELINE_NAMES = ("item_popularity", "item_positive_rate", "matrix_factorization")


@dataclass(frozen=True)
class MFOptions:
    """Logistic matrix factorization; defaults picked on MovieLens 100K's validation AUC."""

    dim: int = 16
    epochs: int = 200  # full-batch steps at most
    lr: float = 0.02
    l2: float = 1e-4  # per-row penalty on the factors and item/user biases, as a weight on their mean square
    patience: int = 20  # steps without validation AUC gain before stopping
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("dim", "epochs", "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"MFOptions.{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0 or not self.l2 >= 0:
            raise ValueError(f"MFOptions: lr must be > 0 and l2 >= 0, got lr={self.lr}, l2={self.l2}")


def useritem_baselines(
    source: Any,
    *,
    seed: int = 0,
    max_users: int | None = None,
    prior_ratings: float = 10.0,
    mf: MFOptions | None = None,
) -> dict[str, dict[str, Any]]:
    """Every user-item baseline of ``source``'s split, by name (``metrics.json``'s ``baselines``).

    ``source`` is a :class:`training.evaluation.UserItemSource` whose chunks
    carry ``user`` and ``item`` extras (MovieLens).
    """
    every = source.interactions()
    task = ranking_task(source, "test", max_users=max_users, seed=seed)
    train = every.splits == TRAIN
    items = np.unique(every.items)
    counts = per_item(items, every.items[train], np.ones(train.sum()))
    positives = per_item(items, every.items[train], every.labels[train].astype(np.float64))
    prior = float(every.labels[train].mean()) if train.any() else 0.5
    rate = (positives + prior_ratings * prior) / (counts + prior_ratings)
    results: dict[str, dict[str, Any]] = {}
    for name, table, is_probability in (("item_popularity", positives, False), ("item_positive_rate", rate, True)):
        started = time.perf_counter()
        predict = item_scores(items, table, default=prior if is_probability else 0.0)
        results[name] = _score_all(every, task, predict, probability=is_probability, seed=seed)
        results[name]["seconds"] = time.perf_counter() - started
    started = time.perf_counter()
    model = fit_mf(split_rows(source, "train"), split_rows(source, "val"), mf or MFOptions(seed=seed))
    results["matrix_factorization"] = _score_all(every, task, model.predict, probability=True, seed=seed)
    results["matrix_factorization"].update(model.report, seconds=time.perf_counter() - started)
    return results


def _score_all(
    every: Interactions, task: RankingTask, predict: Any, *, probability: bool, seed: int
) -> dict[str, Any]:
    """``predict(users, items) -> scores`` (raw ids) on the test rows and the ranking protocols."""
    test = every.splits == TEST
    labels, scores = every.labels[test], predict(every.users[test], every.items[test])
    result: dict[str, Any] = {"test_auc": metric_fns.auc(labels, scores)}
    if probability:
        result["test_logloss"] = metric_fns.logloss(labels, scores)
    result["ranking_rated_items"] = metric_fns.ranking_metrics(every.users[test], labels, scores)
    scorer: Scorer = lambda user_index, item_index: predict(task.users[user_index], task.catalogue[item_index])
    result.update(rank_candidates(task, scorer, seed=seed))
    return result


def per_item(items: np.ndarray, item_ids: np.ndarray, weights: np.ndarray) -> np.ndarray:
    return np.bincount(np.searchsorted(items, item_ids), weights=weights, minlength=len(items))


def item_scores(items: np.ndarray, table: np.ndarray, *, default: float) -> Any:
    """``predict(users, items)`` scoring each item by ``table`` whoever the user (``default``: unknown items)."""

    def predict(users: np.ndarray, item_ids: np.ndarray) -> np.ndarray:
        position = np.minimum(np.searchsorted(items, item_ids), len(items) - 1)
        return np.where(items[position] == item_ids, table[position], default)

    return predict


# --------------------------------------------------------------------------
# Matrix factorization
# --------------------------------------------------------------------------


class _LogisticMF(nn.Module):
    """``(user rows [B], item rows [B]) -> logits [B]``; row 0 of each table stands for unseen ids and stays 0."""

    def __init__(self, num_users: int, num_items: int, dim: int):
        super().__init__()
        self.user_factors = nn.Embedding(num_users + 1, dim, padding_idx=0)
        self.item_factors = nn.Embedding(num_items + 1, dim, padding_idx=0)
        self.user_bias = nn.Embedding(num_users + 1, 1, padding_idx=0)
        self.item_bias = nn.Embedding(num_items + 1, 1, padding_idx=0)
        self.bias = nn.Parameter(torch.zeros(()))
        for table in (self.user_factors, self.item_factors):
            nn.init.normal_(table.weight, 0.0, 0.01)
            table.weight.data[0] = 0.0
        for table in (self.user_bias, self.item_bias):
            nn.init.zeros_(table.weight)

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        interaction = (self.user_factors(users) * self.item_factors(items)).sum(dim=1)  # (B,)
        return self.bias + self.user_bias(users).squeeze(1) + self.item_bias(items).squeeze(1) + interaction


@dataclass
class _FittedMF:
    model: _LogisticMF
    users: np.ndarray  # training user ids, ascending: row i + 1
    items: np.ndarray
    report: dict[str, Any]

    def rows(self, known: np.ndarray, ids: np.ndarray) -> torch.Tensor:
        position = np.minimum(np.searchsorted(known, ids), len(known) - 1)
        return torch.from_numpy(np.where(known[position] == ids, position + 1, 0).astype(np.int64))

    @torch.inference_mode()
    def predict(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        logits = self.model(self.rows(self.users, users), self.rows(self.items, items))
        return torch.sigmoid(logits).numpy().astype(np.float64)


def split_rows(source: Any, split: Split) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(users, items, labels)`` of the rows the models see in ``split``."""
    chunks = list(source.chunks(split))
    users = np.concatenate([chunk.extras["user"] for chunk in chunks])
    items = np.concatenate([chunk.extras["item"] for chunk in chunks])
    return users, items, np.concatenate([chunk.labels for chunk in chunks])


def fit_mf(
    train: tuple[np.ndarray, np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray, np.ndarray], options: MFOptions
) -> _FittedMF:
    (train_users, train_items, train_labels), (val_users, val_items, val_labels) = train, val
    users, items = np.unique(train_users), np.unique(train_items)
    torch.manual_seed(options.seed)
    fitted = _FittedMF(_LogisticMF(len(users), len(items), options.dim), users, items, {})
    user_rows, item_rows = fitted.rows(users, train_users), fitted.rows(items, train_items)
    labels = torch.from_numpy(train_labels.astype(np.float32))
    optimizer = torch.optim.Adam(fitted.model.parameters(), lr=options.lr)
    loss_fn = nn.BCEWithLogitsLoss()
    best_auc, best_step, best_state = -np.inf, 0, copy.deepcopy(fitted.model.state_dict())
    for step in range(1, options.epochs + 1):
        fitted.model.train()
        optimizer.zero_grad()
        logits = fitted.model(user_rows, item_rows)
        factors = torch.cat([fitted.model.user_factors(user_rows), fitted.model.item_factors(item_rows)], dim=1)
        biases = torch.cat([fitted.model.user_bias(user_rows), fitted.model.item_bias(item_rows)], dim=1)
        loss = loss_fn(logits, labels) + options.l2 * (factors.square().sum(dim=1).mean() + biases.square().sum(dim=1).mean())
        loss.backward()
        optimizer.step()
        if not len(val_labels):
            best_step, best_state = step, copy.deepcopy(fitted.model.state_dict())
            continue
        val_auc = metric_fns.auc(val_labels, fitted.predict(val_users, val_items))
        if val_auc > best_auc:
            best_auc, best_step, best_state = val_auc, step, copy.deepcopy(fitted.model.state_dict())
        elif step - best_step >= options.patience:
            break
    fitted.model.load_state_dict(best_state)
    fitted.report.update(val_auc=float(best_auc), best_step=best_step, dim=options.dim, l2=options.l2)
    return fitted
