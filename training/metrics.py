"""Evaluation metrics: AUC, log loss, calibration, and per-user top-k ranking metrics."""

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
    """Per-user precision@k, recall@k, MAP@k and NDCG@k, averaged over users.

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
