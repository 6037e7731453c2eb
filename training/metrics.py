"""Evaluation metrics: AUC, log loss, calibration, and per-user top-k ranking metrics.

Two kinds of ranking metric, told apart by the candidates they rank:

* :func:`ranking_metrics` ranks each user's own rated test items (what the
  test split happens to hold for the user; ``metrics.json``'s
  ``ranking_rated_items``);
* :func:`topk_metrics` ranks any candidate lists, such as the whole
  catalogue minus what the user has seen, or a held-out item among sampled
  negatives (built by :mod:`training.evaluation`).
"""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import log_loss, roc_auc_score

_EPSILON = 1e-7


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC; NaN when only one class is present (AUC is undefined then)."""
    labels = np.asarray(labels)
    if labels.min(initial=1) == labels.max(initial=0):
        return math.nan
    return float(roc_auc_score(labels, scores))


def logloss(labels: np.ndarray, probabilities: np.ndarray) -> float:
    clipped = np.clip(np.asarray(probabilities, np.float64), _EPSILON, 1 - _EPSILON)
    return float(log_loss(labels, clipped, labels=[0, 1]))


def calibration(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    """Mean predicted vs observed positive rate; a ratio of 1.0 is perfectly calibrated on average."""
    predicted, observed = float(np.mean(probabilities)), float(np.mean(labels))
    return {
        "mean_predicted": predicted,
        "observed_rate": observed,
        "calibration_ratio": predicted / observed if observed > 0 else math.nan,
    }


def binary_metrics(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    return {"auc": auc(labels, probabilities), "logloss": logloss(labels, probabilities), **calibration(labels, probabilities)}


def ranking_metrics(
    users: np.ndarray, labels: np.ndarray, scores: np.ndarray, *, ks: tuple[int, ...] = (5, 10)
) -> dict[str, float]:
    """Per-user precision@k, recall@k, MAP@k and NDCG@k over the user's rated test items, averaged over users.

    Each user's test-period items are ranked by score; relevant items are those
    with label 1. Users with no relevant item are skipped (recall, MAP and NDCG
    are undefined for them), as is common practice.
    """
    users, labels, scores = np.asarray(users), np.asarray(labels), np.asarray(scores)
    order = np.lexsort((-scores, users))  # by user, then best score first
    users, labels = users[order], labels[order].astype(np.float64)
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    ends = np.r_[starts[1:], len(users)]
    totals = {f"{name}@{k}": 0.0 for k in ks for name in ("precision", "recall", "map", "ndcg")}
    counted = 0
    for start, end in zip(starts.tolist(), ends.tolist()):
        relevant = labels[start:end]
        num_relevant = relevant.sum()
        if num_relevant == 0:
            continue
        counted += 1
        hits_so_far = np.cumsum(relevant)
        ranks = np.arange(1, len(relevant) + 1)
        gains = relevant / np.log2(ranks + 1)
        for k in ks:
            top = min(k, len(relevant))
            hits = hits_so_far[top - 1]
            totals[f"precision@{k}"] += hits / k
            totals[f"recall@{k}"] += hits / num_relevant
            precision_at_hits = (hits_so_far[:top] / ranks[:top]) * relevant[:top]
            totals[f"map@{k}"] += precision_at_hits.sum() / min(num_relevant, k)
            ideal = (1.0 / np.log2(np.arange(1, int(min(num_relevant, k)) + 1) + 1)).sum()
            totals[f"ndcg@{k}"] += gains[:top].sum() / ideal
    result = {name: (value / counted if counted else math.nan) for name, value in totals.items()}
    result["ranking_users"] = counted
    return result


def topk_metrics(groups: np.ndarray, scores: np.ndarray, relevant: np.ndarray, *, k: int = 10) -> dict[str, float]:
    """HR@k, NDCG@k and recall@k of candidate lists, averaged over the lists (users).

    ``groups[r]`` names the list candidate ``r`` belongs to, ``relevant[r]``
    whether it is relevant. In each list the candidates are ranked by score;
    HR@k is 1 when a relevant candidate is in the top k, NDCG@k the
    discounted gain of the relevant ones there over the best possible, and
    recall@k the share of the list's relevant candidates found there. A
    relevant candidate ranks below every other candidate of the same score,
    so ties never help: a constant scorer earns nothing. Lists without a
    relevant candidate are skipped.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    groups, scores, relevant = np.asarray(groups), np.asarray(scores, np.float64), np.asarray(relevant, bool)
    names = (f"hr@{k}", f"ndcg@{k}", f"recall@{k}")
    if not len(groups):
        return {**dict.fromkeys(names, math.nan), "users": 0}
    order = np.lexsort((relevant, -scores, groups))  # by list, best score first, relevant last among ties
    groups, relevant = groups[order], relevant[order]
    starts = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1]])
    ranks = np.arange(len(groups)) - np.repeat(starts, np.diff(np.r_[starts, len(groups)]))  # 0-based, per list
    found = relevant & (ranks < k)
    num_relevant = np.add.reduceat(relevant.astype(np.int64), starts)
    hits = np.add.reduceat(found.astype(np.int64), starts)
    gains = np.add.reduceat(np.where(found, 1.0 / np.log2(ranks + 2.0), 0.0), starts)
    ideal = np.cumsum(1.0 / np.log2(np.arange(k) + 2.0))[np.clip(num_relevant, 1, k) - 1]
    counted = num_relevant > 0
    if not counted.any():
        return {**dict.fromkeys(names, math.nan), "users": 0}
    values = (hits > 0, gains / ideal, hits / np.maximum(num_relevant, 1))
    return {**{name: float(np.mean(value[counted])) for name, value in zip(names, values)}, "users": int(counted.sum())}
