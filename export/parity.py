"""Parity: an exported artifact must score like the eager model it came from.

For every format, the same held-out inputs are scored by the eager serving
module and by the artifact, at several batch sizes (kernels differ with the
batch size, and a dynamic-batch bug only shows at some sizes) and on the
whole held-out set in one batch. A format passes when the largest
``|p_format - p_eager|`` is at most ``tolerance`` and the AUCs agree within
``auc_tolerance``; the failure message names the format, the magnitude and
the input (batch size and held-out row), so a broken artifact is refused
with enough detail to debug it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from training.metrics import auc

Predictor = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""``(dense float32[B, D], sparse int64[B, S]) -> probability float32[B]``."""

PARITY_BATCH_SIZES = (1, 7, 4096)
TOLERANCE = 1e-5
AUC_TOLERANCE = 1e-4
INT8_AUC_BUDGET = 0.002
_BATCHES_PER_SIZE = 64  # small batch sizes are checked on this many batches, not just the first


class ParityError(RuntimeError):
    """An artifact does not score like the eager model."""


@dataclass(frozen=True)
class HeldOut:
    """Encoded held-out inputs with labels, and where they came from."""

    dense: np.ndarray  # float32[N, D]
    sparse: np.ndarray  # int64[N, S]
    labels: np.ndarray  # float32[N], 0 or 1
    source: str

    def __post_init__(self) -> None:
        rows = {len(self.dense), len(self.sparse), len(self.labels)}
        if len(rows) != 1:
            raise ValueError(f"held-out dense, sparse and labels differ in length: {sorted(rows)}")

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class Worst:
    """Where the largest difference was seen."""

    diff: float
    batch_size: int
    row: int  # index into the held-out set


@dataclass
class ParityResult:
    format: str
    max_abs_diff: dict[str, float]  # "batch_1", "batch_7", ..., "all_10000"
    worst: Worst
    auc: float
    auc_diff: float  # auc - eager auc
    tolerance: float | None  # None: informational only (INT8)
    auc_tolerance: float | None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        if self.tolerance is None:
            return True
        return self.worst.diff <= self.tolerance and abs(self.auc_diff) <= (self.auc_tolerance or 0.0)

    def failure_message(self) -> str:
        reasons = []
        if self.tolerance is not None and not self.worst.diff <= self.tolerance:
            reasons.append(
                f"max |p - p_eager| = {self.worst.diff:.3g} > {self.tolerance:g} "
                f"at batch size {self.worst.batch_size}, held-out row {self.worst.row}"
            )
        if self.auc_tolerance is not None and not abs(self.auc_diff) <= self.auc_tolerance:
            reasons.append(f"|AUC - AUC_eager| = {abs(self.auc_diff):.3g} > {self.auc_tolerance:g}")
        return f"{self.format}: parity failed: " + "; ".join(reasons)

    def to_json(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "max_abs_diff": self.max_abs_diff,
            "worst": {"diff": self.worst.diff, "batch_size": self.worst.batch_size, "row": self.worst.row},
            "auc": self.auc,
            "auc_diff": self.auc_diff,
            **self.extra,
        }


def score(predictor: Predictor, dense: np.ndarray, sparse: np.ndarray, *, batch_size: int) -> np.ndarray:
    """Score rows in consecutive batches of ``batch_size`` (the last may be short)."""
    outputs = [
        np.asarray(predictor(dense[start : start + batch_size], sparse[start : start + batch_size]))
        for start in range(0, len(dense), batch_size)
    ]
    return np.concatenate(outputs).astype(np.float64)


def held_out_auc(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """AUC (:func:`training.metrics.auc`) of held-out scores; an error, not NaN, when one class is missing."""
    value = auc(labels, probabilities)
    if math.isnan(value):
        raise ValueError("AUC needs both positive and negative held-out labels")
    return value


class EagerReference:
    """The eager model's scores, computed once per batch size and shared by every format."""

    def __init__(self, predictor: Predictor, held_out: HeldOut):
        self.predictor = predictor
        self.held_out = held_out
        self._cache: dict[tuple[int, int], np.ndarray] = {}
        self.auc = held_out_auc(held_out.labels, self.scores(len(held_out), len(held_out)))

    def scores(self, batch_size: int, rows: int) -> np.ndarray:
        key = (batch_size, rows)
        if key not in self._cache:
            self._cache[key] = score(
                self.predictor, self.held_out.dense[:rows], self.held_out.sparse[:rows], batch_size=batch_size
            )
        return self._cache[key]


def check_parity(
    format_name: str,
    candidate: Predictor,
    reference: EagerReference,
    *,
    batch_sizes: Sequence[int] = PARITY_BATCH_SIZES,
    tolerance: float | None = TOLERANCE,
    auc_tolerance: float | None = AUC_TOLERANCE,
) -> ParityResult:
    """Compare ``candidate`` with the eager reference; never raises on a mismatch.

    Call :func:`require_parity` (or read ``result.passed``) to act on it.
    """
    held_out = reference.held_out
    total = len(held_out)
    max_abs_diff: dict[str, float] = {}
    worst = Worst(-1.0, 0, 0)
    runs = [(b, f"batch_{b}", min(total, b * max(1, _BATCHES_PER_SIZE // b))) for b in batch_sizes]
    runs.append((total, f"all_{total}", total))
    got = np.empty(0)
    for batch_size, key, rows in runs:
        got = score(candidate, held_out.dense[:rows], held_out.sparse[:rows], batch_size=batch_size)
        if got.shape != (rows,):
            raise ParityError(
                f"{format_name}: expected {rows} probabilities at batch size {batch_size}, got shape {got.shape}"
            )
        diff = np.abs(got - reference.scores(batch_size, rows))
        diff[np.isnan(diff)] = np.inf  # a NaN output is the worst possible mismatch
        row = int(np.argmax(diff))
        max_abs_diff[key] = float(diff[row])
        if diff[row] > worst.diff:
            worst = Worst(float(diff[row]), batch_size, row)
    format_auc = held_out_auc(held_out.labels, np.nan_to_num(got, nan=0.5))  # the last run scored every row
    return ParityResult(
        format=format_name,
        max_abs_diff=max_abs_diff,
        worst=worst,
        auc=format_auc,
        auc_diff=format_auc - reference.auc,
        tolerance=tolerance,
        auc_tolerance=auc_tolerance,
    )


def require_parity(result: ParityResult) -> None:
    if not result.passed:
        raise ParityError(result.failure_message())
