"""The load test's pure parts: request pools, response checks, the request log and its summary.

Nothing here imports Locust (which monkey-patches the process with gevent as
soon as it is imported), so the tests and ``benchmarks.serving`` use
these functions directly; ``loadtest/locustfile.py`` wires them to Locust.
"""

from __future__ import annotations

import json
import math
import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from export.records import sample_records
from featurespec import FeatureSpec

DEFAULT_SLO_P99_MS = 60.0  # MLPerf Inference DLRM, server scenario
DEFAULT_SLO_ERROR_RATIO = 0.001
DEFAULT_MIX = {"single": 6, "instances": 3, "ranking": 1}
# MLPerf DLRM's server scenario sends queries of 100-700 user-item pairs,
# most near the low end with a long tail; a log-normal clipped to the range,
# with its median at the range's geometric mean (265 for 100-700), is close.
_RANKING_SIGMA = 0.45
_MAX_FAILURE_TIMES = 10_000


# --------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------


def parse_range(text: str, *, name: str) -> tuple[int, int]:
    """``"64"`` -> (64, 64); ``"1-64"`` -> (1, 64)."""
    low, _, high = str(text).partition("-")
    try:
        bounds = (int(low), int(high or low))
    except ValueError:
        raise ValueError(f"--{name}: expected N or LOW-HIGH, got {text!r}") from None
    if bounds[0] < 1 or bounds[1] < bounds[0]:
        raise ValueError(f"--{name}: expected 1 <= LOW <= HIGH, got {text!r}")
    return bounds


def parse_mix(text: str) -> dict[str, int]:
    """``"single=6,ranking=1"`` -> weights; tasks not named keep weight 0."""
    if not text:
        return dict(DEFAULT_MIX)
    weights = dict.fromkeys(DEFAULT_MIX, 0)
    for part in text.split(","):
        key, _, value = part.partition("=")
        key = key.strip()
        if key not in weights:
            raise ValueError(f"--mix: unknown task {key!r}; expected {', '.join(DEFAULT_MIX)}")
        try:
            weights[key] = int(value)
        except ValueError:
            raise ValueError(f"--mix: weight of {key!r} must be an integer, got {value!r}") from None
        if weights[key] < 0:
            raise ValueError(f"--mix: weight of {key!r} must be >= 0, got {weights[key]}")
    if not any(weights.values()):
        raise ValueError(f"--mix: at least one weight must be > 0, got {text!r}")
    return weights


# --------------------------------------------------------------------------
# Request pools
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Body:
    """A serialized request and what a correct answer to it looks like."""

    data: bytes
    records: int  # predictions expected (instances) or candidates scored (ranking)
    top_k: int = 0  # ranking entries expected; 0 for scoring requests


@dataclass
class Workload:
    """Everything the users share: tokens, pools, and what the listeners record."""

    model: str
    inference_token: str
    management_token: str
    pools: dict[str, list[Body]]
    log: RequestLog = field(default_factory=lambda: RequestLog())


def candidate_counts(rng: np.random.Generator, size: int, bounds: tuple[int, int]) -> np.ndarray:
    """Candidates per ranking request: MLPerf-DLRM-like query sizes within ``bounds``."""
    low, high = bounds
    drawn = rng.lognormal(math.log(math.sqrt(low * high)), _RANKING_SIGMA, size)
    return np.clip(np.round(drawn), low, high).astype(int)


def build_pools(
    spec: FeatureSpec,
    *,
    size: int,
    instances: tuple[int, int],
    candidates: tuple[int, int],
    top_k: int,
    seed: int,
    kinds: Sequence[str] = tuple(DEFAULT_MIX),
) -> dict[str, list[Body]]:
    """Pre-serialized bodies per task, records drawn from ``spec``.

    A ranking request shares the first half of the sparse features (the
    "user" side) in ``context``; its candidates carry the rest.
    """
    if size < 1:
        raise ValueError(f"--pool-size must be >= 1, got {size}")
    if top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {top_k}")
    rng = np.random.default_rng(seed)
    pools: dict[str, list[Body]] = {}
    if "single" in kinds:
        records = sample_records(spec, size, seed=seed)
        pools["single"] = [Body(_dumps(record), 1) for record in records]
    if "instances" in kinds:
        counts = rng.integers(instances[0], instances[1] + 1, size)
        records = sample_records(spec, int(counts.sum()), seed=seed + 1)
        bounds = np.concatenate([[0], np.cumsum(counts)]).tolist()
        pools["instances"] = [
            Body(_dumps({"instances": records[a:b]}), b - a) for a, b in zip(bounds[:-1], bounds[1:])
        ]
    if "ranking" in kinds:
        shared = [feature.name for feature in spec.sparse[: max(1, len(spec.sparse) // 2)]]
        counts = candidate_counts(rng, size, candidates)
        records = sample_records(spec, int(counts.sum()), seed=seed + 2)
        contexts = sample_records(spec, size, seed=seed + 3)
        bounds = np.concatenate([[0], np.cumsum(counts)]).tolist()
        pool = []
        for context, a, b in zip(contexts, bounds[:-1], bounds[1:]):
            items = [{k: v for k, v in record.items() if k not in shared} for record in records[a:b]]
            user = {k: v for k, v in context.items() if k in shared}
            k = min(top_k, b - a)
            pool.append(Body(_dumps({"context": user, "candidates": items, "top_k": k}), b - a, top_k=k))
        pools["ranking"] = pool
    return pools


def _dumps(payload: Any) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode("utf-8")


# --------------------------------------------------------------------------
# Response validation
# --------------------------------------------------------------------------


def check_predictions(payload: Any, expected: int) -> str | None:
    """None if ``payload`` holds ``expected`` scores in [0, 1], else what is wrong."""
    predictions = payload.get("predictions") if isinstance(payload, dict) else None
    if not isinstance(predictions, list):
        return "no 'predictions' array in the response"
    if len(predictions) != expected:
        return f"{len(predictions)} predictions for {expected} records"
    return _check_scores(predictions)


def check_ranking(payload: Any, *, candidates: int, top_k: int) -> str | None:
    """None if ``payload`` ranks ``top_k`` distinct candidates best first with scores in [0, 1]."""
    ranking = payload.get("ranking") if isinstance(payload, dict) else None
    if not isinstance(ranking, list):
        return "no 'ranking' array in the response"
    if len(ranking) != top_k:
        return f"{len(ranking)} ranked candidates, expected top_k={top_k}"
    try:
        indices = [entry["index"] for entry in ranking]
        scores = [entry["score"] for entry in ranking]
    except (TypeError, KeyError):
        return "ranking entries must be objects with 'index' and 'score'"
    if len(set(indices)) != len(indices) or not all(type(i) is int and 0 <= i < candidates for i in indices):
        return f"ranking indices must be distinct integers in [0, {candidates}), got {indices[:5]}..."
    problem = _check_scores(scores)
    if problem:
        return problem
    if any(later > earlier for earlier, later in zip(scores, scores[1:])):
        return "ranking is not sorted best first"
    return None


def _check_scores(scores: list[Any]) -> str | None:
    try:
        low, high = min(scores), max(scores)
    except TypeError:
        return "scores must be numbers"
    if not (isinstance(low, float) or isinstance(low, int)) or isinstance(low, bool):
        return "scores must be numbers"
    if not 0.0 <= low <= high <= 1.0:  # also false for NaN
        return f"scores must lie in [0, 1], got min {low} max {high}"
    return None


# --------------------------------------------------------------------------
# What happened, request by request (for records/s and per-step figures)
# --------------------------------------------------------------------------


class RequestLog:
    """Compact per-request columns; a 10-minute run is a few million numbers."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self._index: dict[str, int] = {}
        self.name_ids = array("H")
        self.times = array("d")  # seconds since the log started
        self.latencies_ms = array("d")
        self.records = array("l")  # records scored; 0 for failures and management calls
        self.failed = array("b")
        self.inference = array("b")
        self.steps: list[tuple[float, int]] = []  # (seconds since the start, target users) per load step
        self.started = time.monotonic()
        self.started_unix = time.time()  # to line the log up with events outside Locust

    def mark_step(self, users: int) -> None:
        """The load shape moved to ``users`` users (0: the stepped load ended)."""
        if not self.steps or self.steps[-1][1] != users:
            self.steps.append((time.monotonic() - self.started, users))

    def add(self, name: str, latency_ms: float, *, records: int, failed: bool, inference: bool) -> None:
        index = self._index.get(name)
        if index is None:
            index = self._index[name] = len(self.names)
            self.names.append(name)
        self.name_ids.append(index)
        self.times.append(time.monotonic() - self.started)
        self.latencies_ms.append(latency_ms)
        self.records.append(0 if failed else records)
        self.failed.append(failed)
        self.inference.append(inference)

    def columns(self) -> dict[str, np.ndarray]:
        return {
            "name": np.frombuffer(self.name_ids, np.uint16) if len(self.name_ids) else np.zeros(0, np.uint16),
            "time": np.asarray(self.times),
            "latency": np.asarray(self.latencies_ms),
            "records": np.asarray(self.records),
            "failed": np.asarray(self.failed, bool),
            "inference": np.asarray(self.inference, bool),
        }


def summarize(log: RequestLog, *, slo_p99_ms: float, slo_error_ratio: float) -> dict[str, Any]:
    """The summary JSON: totals, per endpoint, per load step, per second, and the SLO verdict.

    The latency bound applies to the inference requests; the error ratio to all of them.
    """
    columns = log.columns()
    times, latency, failed = columns["time"], columns["latency"], columns["failed"]
    duration = float(times.max() - times.min()) if len(times) > 1 else 0.0

    def figures(mask: np.ndarray, seconds: float) -> dict[str, Any]:
        count = int(mask.sum())
        values = latency[mask]
        out: dict[str, Any] = {
            "requests": count,
            "failures": int(failed[mask].sum()),
            "records": int(columns["records"][mask].sum()),
            "requests_per_s": round(count / seconds, 2) if seconds > 0 else 0.0,
            "records_per_s": round(float(columns["records"][mask].sum()) / seconds, 2) if seconds > 0 else 0.0,
        }
        for label, q in (("p50_ms", 50), ("p95_ms", 95), ("p99_ms", 99)):
            out[label] = round(float(np.percentile(values, q)), 3) if count else None
        out["max_ms"] = round(float(values.max()), 3) if count else None
        return out

    endpoints = {name: figures(columns["name"] == i, duration) for i, name in enumerate(log.names)}
    inference = figures(columns["inference"], duration)
    total = figures(np.ones(len(times), bool), duration)
    error_ratio = total["failures"] / total["requests"] if total["requests"] else 0.0
    violations = []
    if not total["requests"]:
        violations.append("no requests were made")
    if error_ratio > slo_error_ratio:
        violations.append(f"error ratio {error_ratio:.4%} > {slo_error_ratio:.4%}")
    if inference["p99_ms"] is not None and inference["p99_ms"] > slo_p99_ms:
        violations.append(f"inference p99 {inference['p99_ms']:.1f} ms > {slo_p99_ms:g} ms")
    return {
        "started_unix": round(log.started_unix, 3),
        "duration_s": round(duration, 2),
        "slo": {
            "p99_ms": slo_p99_ms,
            "error_ratio": slo_error_ratio,
            "measured_p99_ms": inference["p99_ms"],
            "measured_error_ratio": round(error_ratio, 6),
            "passed": not violations,
            "violations": violations,
        },
        "total": total,
        "inference": inference,
        "endpoints": endpoints,
        "steps": _steps(columns, log.steps),
        "timeline": _timeline(columns),
        "failure_times_s": [round(t, 3) for t in times[failed][:_MAX_FAILURE_TIMES].tolist()],
    }


def _timeline(columns: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """Inference requests second by second (``t``: seconds since the log started)."""
    mask = columns["inference"]
    seconds = columns["time"][mask].astype(int)
    latency, records, failed = columns["latency"][mask], columns["records"][mask], columns["failed"][mask]
    timeline = []
    for second in np.unique(seconds).tolist():
        here = seconds == second
        timeline.append(
            {
                "t": second,
                "requests": int(here.sum()),
                "failures": int(failed[here].sum()),
                "records": int(records[here].sum()),
                "p99_ms": round(float(np.percentile(latency[here], 99)), 3),
            }
        )
    return timeline


def _steps(columns: dict[str, np.ndarray], marks: Sequence[tuple[float, int]]) -> list[dict[str, Any]]:
    """Inference figures per load step, by the time requests finished.

    The first quarter of a step (at most 1 s), while its users start and the
    queue settles, is left out.
    """
    steps = []
    mask = columns["inference"]
    times, latency = columns["time"][mask], columns["latency"][mask]
    records, failed = columns["records"][mask], columns["failed"][mask]
    if not len(times):
        return steps
    ends = [t for t, _ in marks[1:]] + [float(times.max())]
    for (start, users), end in zip(marks, ends):
        settle = min(1.0, (end - start) / 4)
        steady = (times >= start + settle) & (times < end)
        seconds = end - start - settle
        if users == 0 or seconds <= 0 or not steady.any():
            continue
        values = latency[steady]
        steps.append(
            {
                "users": users,
                "seconds": round(seconds, 2),
                "requests_per_s": round(int(steady.sum()) / seconds, 2),
                "records_per_s": round(float(records[steady].sum()) / seconds, 2),
                "failures": int(failed[steady].sum()),
                "p50_ms": round(float(np.percentile(values, 50)), 3),
                "p99_ms": round(float(np.percentile(values, 99)), 3),
            }
        )
    return steps


