"""The load test's pure parts: request pools, response checks, the records tally and the summary.

Nothing here imports Locust (which monkey-patches the process with gevent as
soon as it is imported), so the tests and ``benchmarks.serving`` use
these functions directly; ``loadtest/locustfile.py`` wires them to Locust.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

from export.records import sample_records
from featurespec import FeatureSpec
from handlers.request import ARROW_STREAM, JSON_MEDIA_TYPE, media_type
from loadtest.resilience import TokenStore
from loadtest.scoring_client import HttpRequest, rank_request, read_ranking, read_scores, score_request

DEFAULT_SLO_P99_MS = 60.0  # MLPerf Inference DLRM, server scenario
DEFAULT_SLO_ERROR_RATIO = 0.001
# arrow: the ranking requests again, as Arrow IPC streams answered in Arrow.
DEFAULT_MIX = {"single": 6, "instances": 3, "ranking": 1, "arrow": 1}
# A recommend archive's call (user -> retrieval -> ranking): never in the default mix, since a ranker
# archive cannot answer it, nor beside the other kinds, which a recommend archive cannot answer.
RECOMMEND = "recommend"
TASK_KINDS = (*DEFAULT_MIX, RECOMMEND)
# MLPerf DLRM's server scenario sends queries of 100-700 user-item pairs,
# most near the low end with a long tail; a log-normal clipped to the range,
# with its median at the range's geometric mean (265 for 100-700), is close.
_RANKING_SIGMA = 0.45
_MAX_FAILURE_TIMES = 10_000
_JSON_ONLY = 2**62  # arrow_from_rows that no request reaches: the client's JSON body
JSON_HEADERS = {"Content-Type": JSON_MEDIA_TYPE, "Accept": JSON_MEDIA_TYPE}


# --------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------


def parse_range(text: str, *, name: str, minimum: int = 1) -> tuple[int, int]:
    """``"64"`` -> (64, 64); ``"1-64"`` -> (1, 64); LOW at least ``minimum``."""
    low, _, high = str(text).partition("-")
    try:
        bounds = (int(low), int(high or low))
    except ValueError:
        raise ValueError(f"--{name}: expected N or LOW-HIGH, got {text!r}") from None
    if bounds[0] < minimum or bounds[1] < bounds[0]:
        raise ValueError(f"--{name}: expected {minimum} <= LOW <= HIGH, got {text!r}")
    return bounds


def parse_mix(text: str) -> dict[str, int]:
    """``"single=6,ranking=1,arrow=1"`` -> weights; tasks not named keep weight 0.

    ``recommend`` is only there when named, and then alone: the other kinds ask a ranker archive.
    """
    if not text:
        return dict(DEFAULT_MIX)
    weights = dict.fromkeys(DEFAULT_MIX, 0)
    for part in text.split(","):
        key, _, value = part.partition("=")
        key = key.strip()
        if key not in TASK_KINDS:
            raise ValueError(f"--mix: unknown task {key!r}; expected one of {', '.join(TASK_KINDS)}")
        try:
            weights[key] = int(value)
        except ValueError:
            raise ValueError(f"--mix: weight of {key!r} must be an integer, got {value!r}") from None
        if weights[key] < 0:
            raise ValueError(f"--mix: weight of {key!r} must be >= 0, got {weights[key]}")
    if not any(weights.values()):
        raise ValueError(f"--mix: at least one weight must be > 0, got {text!r}")
    if weights.get(RECOMMEND) and any(weights[kind] for kind in DEFAULT_MIX):
        raise ValueError(f"--mix: {RECOMMEND} asks a recommend archive, the other tasks a ranker archive; "
                         f"name one or the other, got {text!r}")
    return weights


# --------------------------------------------------------------------------
# Request pools
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Body:
    """A serialized request, the headers it is sent with, and what a correct answer to it looks like."""

    data: bytes
    headers: Mapping[str, str]  # Content-Type, and Accept: the media type the answer must come in
    records: int  # predictions expected (instances) or candidates scored (ranking, recommend)
    top_k: int = 0  # ranking entries (items, for recommend) expected; 0 for scoring requests
    excluded: frozenset[int] | None = None  # recommend: the history and exclude ids no answer may hold

    @classmethod
    def of(cls, request: HttpRequest, records: int, top_k: int = 0) -> Body:
        return cls(request.body, request.headers, records, top_k)


@dataclass(frozen=True)
class Workload:
    """Everything the users share: the model, the tokens (refreshed when they expire), the request pools."""

    model: str
    tokens: TokenStore
    pools: dict[str, list[Body]]


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
    catalogue: np.ndarray | None = None,
    history: tuple[int, int] = (0, 20),
    exclude: tuple[int, int] = (0, 5),
) -> dict[str, list[Body]]:
    """Pre-serialized bodies per task, records drawn from ``spec``.

    Bodies are built by :mod:`loadtest.scoring_client`'s request functions,
    so Locust sends what the Python client sends: ``instances`` and
    ``ranking`` as JSON, ``arrow`` as an Arrow IPC stream answered in Arrow.
    ``single`` is one bare record object (the JSON form a one-record client
    such as curl sends). A ranking request shares the first half of the
    sparse features (the "user" side) in ``context``; its candidates carry
    the rest. ``arrow`` holds the same ranking requests as ``ranking``.

    ``recommend`` bodies ask a recommend archive for ``top_k`` items out of
    ``candidates`` retrieved ones: ``spec`` is then its user tower's
    FeatureSpec (``user_features.json``), which the ``user`` object is drawn
    from, and ``history`` and ``exclude`` (``history`` and ``exclude`` ids
    per request) are drawn from ``catalogue``, the archive's item ids.
    """
    if size < 1:
        raise ValueError(f"--pool-size must be >= 1, got {size}")
    if top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {top_k}")
    rng = np.random.default_rng(seed)
    pools: dict[str, list[Body]] = {}
    if "single" in kinds:
        records = sample_records(spec, size, seed=seed)
        pools["single"] = [Body(_dumps(record), JSON_HEADERS, 1) for record in records]
    if "instances" in kinds:
        counts = rng.integers(instances[0], instances[1] + 1, size)
        records = sample_records(spec, int(counts.sum()), seed=seed + 1)
        bounds = np.concatenate([[0], np.cumsum(counts)]).tolist()
        pools["instances"] = [
            Body.of(score_request(records[a:b], arrow_from_rows=_JSON_ONLY), b - a) for a, b in zip(bounds[:-1], bounds[1:])
        ]
    if "ranking" in kinds or "arrow" in kinds:
        shared = [feature.name for feature in spec.sparse[: max(1, len(spec.sparse) // 2)]]
        counts = candidate_counts(rng, size, candidates)
        records = sample_records(spec, int(counts.sum()), seed=seed + 2)
        contexts = sample_records(spec, size, seed=seed + 3)
        bounds = np.concatenate([[0], np.cumsum(counts)]).tolist()
        requests = []
        for context, a, b in zip(contexts, bounds[:-1], bounds[1:]):
            items = [{k: v for k, v in record.items() if k not in shared} for record in records[a:b]]
            user = {k: v for k, v in context.items() if k in shared}
            requests.append((user, items, min(top_k, b - a)))
        if "ranking" in kinds:
            pools["ranking"] = [
                Body.of(rank_request(user, items, k, arrow_from_rows=_JSON_ONLY), len(items), top_k=k) for user, items, k in requests
            ]
        if "arrow" in kinds:
            pools["arrow"] = [Body.of(_arrow_rank_request(user, items, k), len(items), top_k=k) for user, items, k in requests]
    if RECOMMEND in kinds:
        if catalogue is None or not len(catalogue):
            raise ValueError(f"--mix {RECOMMEND}: no catalogue item ids to draw history and exclude from")
        pools[RECOMMEND] = _recommend_bodies(spec, catalogue, rng, size=size, candidates=candidates, top_k=top_k,
                                             history=history, exclude=exclude, seed=seed + 4)
    return pools


def catalogue_ids(features: Path, *, catalogue: str = "") -> np.ndarray:
    """The item ids of a recommend archive's ``catalogue`` (default: the ``catalogue.parquet`` beside ``features``)."""
    from handlers.recommend import CATALOGUE_FILE, read_catalogue  # faiss and torch: recommend load tests only

    path = Path(catalogue) if catalogue else features.with_name(CATALOGUE_FILE)
    if not path.is_file():
        raise ValueError(f"--catalogue {path}: not found (the {CATALOGUE_FILE} of the retrieval export)")
    ids, _ = read_catalogue(path)
    return ids


def _recommend_bodies(
    user_spec: FeatureSpec,
    catalogue: np.ndarray,
    rng: np.random.Generator,
    *,
    size: int,
    candidates: tuple[int, int],
    top_k: int,
    history: tuple[int, int],
    exclude: tuple[int, int],
    seed: int,
) -> list[Body]:
    """``size`` recommend requests and what their answers must be: ``min(k, items left)`` items, none excluded."""
    from handlers.recommend import HISTORY_FEATURE  # the request's own list, never a user feature

    users = sample_records(user_spec, size, seed=seed)
    counts = candidate_counts(rng, size, candidates)
    catalogue_ids = np.unique(catalogue)
    bodies = []
    for user, count in zip(users, counts.tolist()):
        seen = rng.choice(catalogue_ids, min(int(rng.integers(history[0], history[1] + 1)), len(catalogue_ids)), replace=False)
        hidden = rng.choice(catalogue_ids, min(int(rng.integers(exclude[0], exclude[1] + 1)), len(catalogue_ids)), replace=False)
        excluded = frozenset(seen.tolist()) | frozenset(hidden.tolist())
        left = len(catalogue_ids) - len(excluded)
        k = min(top_k, count)
        request = {
            "user": {name: value for name, value in user.items() if name != HISTORY_FEATURE},
            "history": seen.tolist(),
            "k": k,
            "exclude": hidden.tolist(),
            "candidates": count,
        }
        # The index proposes at most the items left, the ranker scores those and the answer holds the k best.
        bodies.append(Body(_dumps(request), JSON_HEADERS, min(count, left), top_k=min(k, left), excluded=excluded))
    return bodies


def _dumps(payload: Any) -> bytes:
    return json.dumps(payload, separators=(",", ":"), allow_nan=False).encode("utf-8")


def _arrow_rank_request(context: dict[str, Any], candidates: list[dict[str, Any]], top_k: int) -> HttpRequest:
    request = rank_request(context, candidates, top_k, arrow_from_rows=1)
    if request.headers["Content-Type"] != ARROW_STREAM:  # the client falls back to JSON for values that form no Arrow column
        raise ValueError("--mix arrow: this FeatureSpec's records do not form Arrow columns")
    return request


# --------------------------------------------------------------------------
# Response validation
# --------------------------------------------------------------------------


def check_answer(body: Body, content_type: str | None, content: bytes) -> str | None:
    """None if a 200's ``content`` answers ``body`` correctly, in the media type its Accept header asked for.

    An Arrow answer is read as the Python client reads it
    (:func:`loadtest.scoring_client.read_ranking`, :func:`~loadtest.scoring_client.read_scores`)
    and then checked as its JSON twin would be.
    """
    accept = media_type(body.headers.get("Accept"))
    if accept == ARROW_STREAM and media_type(content_type) != ARROW_STREAM:
        return f"answered as {content_type or 'no Content-Type'}, asked for {ARROW_STREAM}"
    try:
        if media_type(content_type) != ARROW_STREAM:
            payload = json.loads(content)
        elif body.top_k:
            ranking = read_ranking(200, content_type, content)
            payload = {"ranking": [{"index": int(i), "score": float(s)} for i, s in zip(ranking.indices, ranking.scores)]}
        else:
            payload = {"predictions": read_scores(200, content_type, content).tolist()}
    except (pa.ArrowException, OSError, KeyError, TypeError, ValueError) as error:  # pyarrow's I/O errors are OSErrors
        return f"the response is not a readable {media_type(content_type) or 'JSON'} answer: {error}"[:300]
    if body.excluded is not None:
        return check_recommendation(payload, items=body.top_k, excluded=body.excluded)
    if body.top_k:
        return check_ranking(payload, candidates=body.records, top_k=body.top_k)
    return check_predictions(payload, body.records)


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


def check_recommendation(payload: Any, *, items: int, excluded: frozenset[int]) -> str | None:
    """None if ``payload`` holds ``items`` distinct item ids, none of them ``excluded``, best first, scores in [0, 1]."""
    answer = payload.get("items") if isinstance(payload, dict) else None
    if not isinstance(answer, list):
        return "no 'items' array in the response"
    if len(answer) != items:
        return f"{len(answer)} items, expected {items}"
    try:
        ids = [entry["id"] for entry in answer]
        scores = [entry["score"] for entry in answer]
    except (TypeError, KeyError):
        return "items must be objects with 'id' and 'score'"
    if len(set(ids)) != len(ids) or not all(type(item) is int for item in ids):
        return f"item ids must be distinct integers, got {ids[:5]}..."
    returned = sorted(excluded.intersection(ids))
    if returned:
        return f"items in the request's history or exclude came back: {returned[:5]}"
    problem = _check_scores(scores) if scores else None
    if problem:
        return problem
    if any(later > earlier for earlier, later in zip(scores, scores[1:])):
        return "items are not sorted best first"
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
# The summary: Locust's aggregated statistics, plus what they do not count
# --------------------------------------------------------------------------

SLICES_PER_SECOND = 4  # the timeline and the load steps are cut from quarter-second slices


def time_slice(unix_time: float) -> int:
    """The slice in which a request that finished at ``unix_time`` falls.

    Wall-clock time, so every Locust process on the machine agrees on it.
    """
    return math.floor(unix_time * SLICES_PER_SECOND)


class LatencyStats(Protocol):
    """What the summary reads of a Locust ``StatsEntry``.

    Duck-typed: importing Locust here would monkey-patch every importer
    (the tests, the benchmarks) with gevent.
    """

    num_requests: int
    num_failures: int
    max_response_time: float

    def get_response_time_percentile(self, percent: float) -> float: ...


@dataclass
class Tally:
    """What Locust's statistics do not count: the records scored, when requests failed, and retries.

    A retried request's first reply (an expired token, a worker that died
    under it) is counted by its reason in ``retries``, neither as a failure
    nor as records scored: the retry's reply is the answer.

    Each Locust process keeps one. A worker ships its tally with each of its
    stats reports and starts afresh (:meth:`drain`); the master adds the
    reports up (:meth:`merge`), as Locust does with its own statistics, so the
    master's tally covers every process.
    """

    records_by_name: dict[str, int] = field(default_factory=dict)
    inference_records_by_slice: dict[int, int] = field(default_factory=dict)
    failure_times: list[float] = field(default_factory=list)  # unix times, at most _MAX_FAILURE_TIMES
    retries: dict[str, int] = field(default_factory=dict)  # reason -> replies replaced by a retry

    def add(self, name: str, *, records: int, failed: bool, inference: bool, finished: float, retried: str | None = None) -> None:
        if retried is not None:
            self.retries[retried] = self.retries.get(retried, 0) + 1
            return
        if failed:  # a failed request scored nothing
            if len(self.failure_times) < _MAX_FAILURE_TIMES:
                self.failure_times.append(finished)
            return
        self.records_by_name[name] = self.records_by_name.get(name, 0) + records
        if inference:
            key = time_slice(finished)
            self.inference_records_by_slice[key] = self.inference_records_by_slice.get(key, 0) + records

    def drain(self) -> dict[str, Any]:
        """Everything counted since the last drain, as plain data for Locust's report to the master."""
        report = {
            "records_by_name": self.records_by_name,
            "inference_records_by_slice": self.inference_records_by_slice,
            "failure_times": self.failure_times,
            "retries": self.retries,
        }
        self.records_by_name, self.inference_records_by_slice, self.failure_times, self.retries = {}, {}, [], {}
        return report

    def merge(self, report: Mapping[str, Any]) -> None:
        for name, records in report["records_by_name"].items():
            self.records_by_name[name] = self.records_by_name.get(name, 0) + records
        for key, records in report["inference_records_by_slice"].items():
            self.inference_records_by_slice[int(key)] = self.inference_records_by_slice.get(int(key), 0) + records
        room = _MAX_FAILURE_TIMES - len(self.failure_times)
        self.failure_times.extend(report["failure_times"][:room])
        for reason, count in report.get("retries", {}).items():
            self.retries[reason] = self.retries.get(reason, 0) + count

    def inference_records(self, first: int, stop: int) -> int:
        """Records scored by inference requests that finished in slices ``[first, stop)``."""
        return sum(records for key, records in self.inference_records_by_slice.items() if first <= key < stop)


@dataclass(frozen=True)
class StepWindow:
    """The steady part of one load step, in slices ``[first, stop)``."""

    users: int
    first: int
    stop: int

    @property
    def seconds(self) -> float:
        return (self.stop - self.first) / SLICES_PER_SECOND


def step_windows(marks: Sequence[tuple[float, int]], *, end: float) -> list[StepWindow]:
    """Each load step from ``marks`` ((unix time, target users) per change; 0 users: the load ended).

    The first quarter of a step (at most 1 s), while its users start and the
    queue settles, is left out; so are slices that straddle a step change.
    """
    windows = []
    ends = [started for started, _ in marks[1:]] + [end]
    for (started, users), ended in zip(marks, ends):
        settle = min(1.0, (ended - started) / 4)
        first = math.ceil((started + settle) * SLICES_PER_SECOND)
        stop = math.floor(ended * SLICES_PER_SECOND)
        if users > 0 and stop > first:
            windows.append(StepWindow(users, first, stop))
    return windows


@dataclass(frozen=True)
class RunStats:
    """What the summary is made of, as the master (or the only Locust process) holds it."""

    started_unix: float
    duration_s: float
    total: LatencyStats  # every request: Locust's ``stats.total``
    inference: LatencyStats  # the inference requests' entries together
    endpoints: Mapping[str, LatencyStats]  # per request name
    tally: Tally
    steps: Sequence[tuple[StepWindow, LatencyStats]]  # inference requests in each step's window
    seconds: Sequence[tuple[int, LatencyStats]]  # inference requests per unix second, for the timeline


def slo_violations(total: LatencyStats, inference: LatencyStats, *, slo_p99_ms: float, slo_error_ratio: float) -> list[str]:
    """Why the run broke the SLO (empty: it held).

    The error ratio counts every request; the latency bound applies to the
    inference requests, with the p99 as Locust computes it (two significant
    digits from 100 ms up).
    """
    violations = []
    if not total.num_requests:
        violations.append("no requests were made")
    error_ratio = total.num_failures / total.num_requests if total.num_requests else 0.0
    if error_ratio > slo_error_ratio:
        violations.append(f"error ratio {error_ratio:.4%} > {slo_error_ratio:.4%}")
    p99 = inference.get_response_time_percentile(0.99) if inference.num_requests else None
    if p99 is not None and p99 > slo_p99_ms:
        violations.append(f"inference p99 {p99:.1f} ms > {slo_p99_ms:g} ms")
    return violations


def summarize(run: RunStats, *, slo_p99_ms: float, slo_error_ratio: float) -> dict[str, Any]:
    """The summary JSON: totals, per endpoint, per load step, per second, and the SLO verdict."""
    duration = run.duration_s
    inference_records = sum(run.tally.inference_records_by_slice.values())
    inference = _figures(run.inference, records=inference_records, seconds=duration)
    total = _figures(run.total, records=sum(run.tally.records_by_name.values()), seconds=duration)
    endpoints = {
        name: _figures(stats, records=run.tally.records_by_name.get(name, 0), seconds=duration)
        for name, stats in sorted(run.endpoints.items())
    }
    violations = slo_violations(run.total, run.inference, slo_p99_ms=slo_p99_ms, slo_error_ratio=slo_error_ratio)
    error_ratio = run.total.num_failures / run.total.num_requests if run.total.num_requests else 0.0
    steps = []
    for window, stats in run.steps:
        if not stats.num_requests:
            continue
        figures = _figures(stats, records=run.tally.inference_records(window.first, window.stop), seconds=window.seconds)
        steps.append({"users": window.users, "seconds": window.seconds, **_pick(figures, _STEP_KEYS)})
    started_second = math.floor(run.started_unix)
    timeline = []
    for second, stats in run.seconds:
        if not stats.num_requests:
            continue
        first = second * SLICES_PER_SECOND
        figures = _figures(stats, records=run.tally.inference_records(first, first + SLICES_PER_SECOND), seconds=1.0)
        timeline.append({"t": second - started_second, **_pick(figures, _TIMELINE_KEYS)})
    return {
        "started_unix": round(run.started_unix, 3),
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
        # Replies replaced by a retry, by reason; each retry's own reply is counted in the figures above.
        "retries": {"total": sum(run.tally.retries.values()), "by_reason": dict(sorted(run.tally.retries.items()))},
        "endpoints": endpoints,
        "steps": steps,
        "timeline": timeline,
        "failure_times_s": [round(t - run.started_unix, 3) for t in sorted(run.tally.failure_times)],
    }


_STEP_KEYS = ("requests_per_s", "records_per_s", "failures", "p50_ms", "p99_ms")
_TIMELINE_KEYS = ("requests", "failures", "records", "p99_ms")


def _figures(stats: LatencyStats, *, records: int, seconds: float) -> dict[str, Any]:
    count = stats.num_requests
    figures: dict[str, Any] = {
        "requests": count,
        "failures": stats.num_failures,
        "records": records,
        "requests_per_s": round(count / seconds, 2) if seconds > 0 else 0.0,
        "records_per_s": round(records / seconds, 2) if seconds > 0 else 0.0,
    }
    for label, percent in (("p50_ms", 0.5), ("p95_ms", 0.95), ("p99_ms", 0.99)):
        figures[label] = stats.get_response_time_percentile(percent) if count else None
    figures["max_ms"] = round(stats.max_response_time, 3) if count else None
    return figures


def _pick(figures: Mapping[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    return {key: figures[key] for key in keys}
