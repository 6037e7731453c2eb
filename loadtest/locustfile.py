"""Locust suite for the served recommenders: inference and management traffic, an SLO gate.

Start TorchServe first (``make serve``, or any server whose ``key_file.json``
you can read), then::

    locust -f loadtest/locustfile.py --headless \\
        --host http://127.0.0.1:8080 --management-host http://127.0.0.1:8081 \\
        --model dlrm --features runs/dlrm/export/features.json --key-file key_file.json \\
        --users 8 --spawn-rate 8 --run-time 60s --stop-timeout 30 \\
        --csv results/loadtest/dlrm --html results/loadtest/dlrm.html

(``make loadtest`` runs this, after putting the second version
``dlrm_v2.mar`` in the model store) writes Locust's CSV files and HTML
report plus ``results/loadtest/dlrm_summary.json`` (requests/s, records/s,
failures, p50/p95/p99 per endpoint, per load step, per second) and exits 1
when the SLO is broken: more than ``--slo-error-ratio`` of all requests
failed (default 0.1%), or the p99 of the inference requests is above
``--slo-p99-ms`` (default 60 ms, MLPerf's DLRM server-scenario bound).
Management calls take seconds by design (synchronous scaling, registering
a model), so they count for the error ratio, not for the latency bound.

Users:

* ``InferenceUser`` (``FastHttpUser``): weighted tasks scoring one record
  (``single``), 1-64 records (``instances``), and ranking requests whose
  candidate counts follow a distribution like MLPerf DLRM's queries (100 to
  700 pairs), sent as JSON (``ranking``) and, the same requests, as Arrow
  IPC streams answered in Arrow (``arrow``). Bodies come from pools
  generated once from the model's FeatureSpec
  (:func:`export.records.sample_records`) and serialized in advance, so the
  generator spends its CPU sending requests, not building them;
  :mod:`loadtest.scoring_client`'s request functions serialize them, so
  Locust sends what the Python client sends. Every answer is checked: as
  many scores as records, in [0, 1]; ``top_k`` distinct candidates, best
  first; an Arrow answer where Arrow was asked for. ``--mix`` overrides the
  task weights (``single=6,instances=3,ranking=1,arrow=1``).

  A recommend archive (``python -m export.archive ... --retrieval``) answers
  another kind, ``recommend``, which only ``--mix recommend=1`` turns on, and
  alone (a ranker archive cannot answer it, a recommend archive cannot
  answer the others)::

      locust -f loadtest/locustfile.py --headless InferenceUser --mix recommend=1 \\
          --model recommender --features runs/retrieval/export/user_features.json \\
          --candidates 200 --top-k 10 ...

  Its bodies ``{"user", "history", "k", "exclude", "candidates"}`` draw the
  user from ``--features`` (the retrieval export's ``user_features.json``,
  or the extracted archive's) and ``--history`` / ``--exclude`` ids from the
  item ids of ``--catalogue`` (default: the ``catalogue.parquet`` beside
  ``--features``); ``--candidates`` and ``--top-k`` give ``candidates`` and
  ``k``. Every answer must hold exactly ``k`` items (fewer only when fewer
  are left outside history and exclude), distinct, none of them in the
  history or exclude, best first, scores in [0, 1]; its records are the
  items the ranker scored. Name ``InferenceUser`` on the command line: the
  management user's version cycle needs a second archive of the model.
* ``ManagementUser`` (one instance) runs an operator's cycle: list models,
  describe the model, scale it up and back down, then roll a second version
  (register ``--second-archive``, which must already be in the model store,
  make it the default, restore the default, unregister it), while the
  inference users keep running. Pick user classes by name on the command line
  (``... InferenceUser``) to leave it out.

Load: constant (``--users``, ``--spawn-rate``, ``--run-time``) unless
``--step-users N`` is given: then :class:`SteppedLoad` adds N users every
``--step-time`` seconds up to ``--users``, and the summary reports each step,
which is how ``benchmarks.serving`` finds the capacity at the SLO.

Tokens come from TorchServe's ``key_file.json`` (``--key-file`` or
``LOCUST_KEY_FILE``; default ``./key_file.json``) and are refreshed through
the token API on ``--management-host`` when they expire. Every request
follows :mod:`loadtest.resilience`: a reply that says the token expired is
retried once with a new token; an inference reply that says the worker died
under it (``500 Worker died``, ``503``, a reset connection, no answer within
``--inference-timeout`` seconds, default 10) is retried once after a short pause. The first reply of a retried request is reported under
``NAME (retried: REASON)`` as a success, and counted in the summary's
``retries``; only the retry's reply can fail. Locust's ``--help`` prints
before the locustfile is read, so the options above are listed in
:func:`add_arguments`.

One Locust process or several (``--processes N``, or ``--master`` and
``--worker``) give the same summary and verdict: the gate reads Locust's
statistics as the master aggregates them from its workers, and each worker
sends what those statistics do not hold (records scored, failure times,
inference latency per quarter second) along with its stats reports.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import gevent
from geventhttpclient.response import HTTPConnectionClosed
from geventhttpclient.useragent import EmptyResponse, RetriesExceeded
from locust import (
    FastHttpUser,
    LoadTestShape,
    SequentialTaskSet,
    between,
    constant,
    events,
    task,
)
from locust.env import Environment
from locust.runners import MasterRunner, WorkerRunner
from locust.stats import RequestStats, StatsEntry

from featurespec import FeatureSpec
from loadtest.resilience import (
    INFERENCE_TIMEOUT_S,
    KeyFileError,
    RetryReason,
    TokenStore,
    retry_reason,
    send_with_retry,
)
from loadtest.torchserve import ManagementCall, read_keys, scaled_to
from loadtest.workload import (
    DEFAULT_MIX,
    DEFAULT_SLO_ERROR_RATIO,
    DEFAULT_SLO_P99_MS,
    RECOMMEND,
    SLICES_PER_SECOND,
    RunStats,
    Tally,
    Workload,
    build_pools,
    catalogue_ids,
    check_answer,
    parse_mix,
    parse_range,
    step_windows,
    summarize,
    time_slice,
)

SUMMARY_SUFFIX = "_summary.json"
DEFAULT_RESULTS = Path("results/loadtest")
# TorchServe 0.12's answer to a scale request that meets workers still changing (a 500 with this text).
SCALE_RACE = "ConcurrentModificationException"
SCALE_RACE_RETRIES = 5
SCALE_RACE_PAUSE_S = 1.0


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


@events.init_command_line_parser.add_listener
def add_arguments(parser: Any) -> None:
    group = parser.add_argument_group("recommender load test (loadtest/locustfile.py)")
    group.add_argument("--model", default="dlrm", help="model name, as in /predictions/NAME")
    group.add_argument(
        "--features", env_var="LOCUST_FEATURES", default="", help="the model's features.json (default runs/MODEL/export/features.json)"
    )
    group.add_argument("--key-file", env_var="LOCUST_KEY_FILE", default="key_file.json", help="TorchServe's key_file.json")
    group.add_argument("--management-host", default="http://127.0.0.1:8081", help="management API base URL")
    group.add_argument(
        "--second-archive", default="", help="archive of a second version in the model store (default MODEL_v2.mar); 'none' skips the version cycle"
    )
    group.add_argument("--second-version", default="2.0", help="model version inside --second-archive")
    group.add_argument("--scale-to", type=int, default=2, help="workers the management user scales up to (and back down)")
    group.add_argument(
        "--mix",
        default="",
        help="task weights of single, instances, ranking (JSON) and arrow (the ranking requests as Arrow IPC), "
        "e.g. single=6,instances=3,ranking=1,arrow=1 (the default; 0 or absent drops a task); "
        "recommend=1 alone load-tests a recommend archive instead (never part of the default)",
    )
    group.add_argument(
        "--catalogue", default="", help="recommend: the archive's catalogue.parquet (default: beside --features)"
    )
    group.add_argument("--history", default="0-20", help="recommend: history ids per request: N or LOW-HIGH (LOW may be 0)")
    group.add_argument("--exclude", default="0-5", help="recommend: exclude ids per request: N or LOW-HIGH (LOW may be 0)")
    group.add_argument("--instances", default="1-64", help="records per multi-instance request: N or LOW-HIGH")
    group.add_argument("--candidates", default="100-700", help="candidates per ranking (or recommend) request: N or LOW-HIGH")
    group.add_argument("--top-k", type=int, default=10, help="top_k of ranking requests (k of recommend requests)")
    group.add_argument("--pool-size", type=int, default=256, help="pre-generated request bodies per task")
    group.add_argument("--seed", type=int, default=0, help="seed of the generated records")
    group.add_argument("--think-time", type=float, default=0.0, help="seconds each inference user waits between requests")
    group.add_argument(
        "--inference-timeout", type=float, default=INFERENCE_TIMEOUT_S, help="seconds to wait for an inference answer before retrying it once"
    )
    group.add_argument("--slo-p99-ms", type=float, default=DEFAULT_SLO_P99_MS, help="p99 bound of inference requests")
    group.add_argument("--slo-error-ratio", type=float, default=DEFAULT_SLO_ERROR_RATIO, help="failed / all requests bound")
    group.add_argument("--summary", default="", help="summary JSON path (default: beside --csv / --html)")
    group.add_argument("--step-users", type=int, default=0, help="stepped load: users added per step (0: constant load)")
    group.add_argument("--step-time", type=float, default=10.0, help="stepped load: seconds per step")


_workload: Workload | None = None


def workload() -> Workload:
    if _workload is None:
        raise RuntimeError("the load test was not initialized (events.init did not run)")
    return _workload


@events.init.add_listener
def prepare(environment: Environment, **_: Any) -> None:
    """Read the tokens and the FeatureSpec, build the pools, apply --mix; exit 2 on bad options."""
    global _workload
    options = environment.parsed_options
    if options is None:  # Locust used as a library without our arguments
        return
    try:
        mix = parse_mix(options.mix)
        recommend = mix.get(RECOMMEND, 0) > 0
        if recommend and not options.features:
            raise ValueError(f"--mix {RECOMMEND} needs --features: the user_features.json of the retrieval export")
        features = Path(options.features or f"runs/{options.model}/export/features.json")
        if not features.is_file():
            raise ValueError(f"--features {features}: not found (the model's features.json, from its export dir)")
        key_file = Path(options.key_file)
        if not key_file.is_file():
            raise ValueError(f"--key-file {key_file}: not found (TorchServe writes it in the directory it starts in)")
        try:
            read_keys(key_file)
        except (KeyError, ValueError) as error:
            raise ValueError(f"--key-file {key_file}: not a TorchServe key file ({error!r})") from None
        pools = build_pools(
            FeatureSpec.load(features),
            size=options.pool_size,
            instances=parse_range(options.instances, name="instances"),
            candidates=parse_range(options.candidates, name="candidates"),
            top_k=options.top_k,
            seed=options.seed,
            kinds=[kind for kind, weight in mix.items() if weight > 0],
            catalogue=catalogue_ids(features, catalogue=options.catalogue) if recommend else None,
            history=parse_range(options.history, name="history", minimum=0),
            exclude=parse_range(options.exclude, name="exclude", minimum=0),
        )
        if options.inference_timeout <= 0:
            raise ValueError(f"--inference-timeout must be > 0 seconds, got {options.inference_timeout}")
        if options.step_users < 0 or options.step_time <= 0:
            raise ValueError(f"--step-users must be >= 0 and --step-time > 0, got {options.step_users} and {options.step_time}")
    except (ValueError, OSError) as error:
        print(f"loadtest: {error}", file=sys.stderr)
        sys.exit(2)
    InferenceUser.tasks = [InferenceUser.TASKS[kind] for kind, weight in mix.items() for _ in range(weight)]
    InferenceUser.wait_time = constant(options.think_time)
    InferenceUser.network_timeout = options.inference_timeout
    _workload = Workload(options.model, TokenStore(key_file, management_url=options.management_host), pools)


# --------------------------------------------------------------------------
# What the summary needs beyond Locust's statistics, from every process
# --------------------------------------------------------------------------


class Measurements:
    """This process's records tally and its inference latency per time slice.

    The slices are Locust stats entries, one per quarter second, so that the
    timeline and the load steps get their percentiles the way Locust computes
    them. A worker sends both with each of its stats reports and starts
    afresh; the master merges them, as Locust merges its own statistics.
    """

    def __init__(self) -> None:
        self.tally = Tally()
        self.slices = RequestStats(use_response_times_cache=False)

    def add(self, name: str, response_time: float, *, records: int, failed: bool, inference: bool, retried: str | None = None) -> None:
        finished = time.time()
        self.tally.add(name, records=records, failed=failed, inference=inference, finished=finished, retried=retried)
        if inference and retried is None:
            entry = self.slices.get(str(time_slice(finished)), "inference")
            entry.log(response_time, 0)
            if failed:
                entry.log_error(None)

    def drain(self) -> dict[str, Any]:
        report = {"tally": self.tally.drain(), "slices": [entry.serialize() for entry in self.slices.entries.values()]}
        self.slices.clear_all()
        return report

    def merge(self, report: dict[str, Any]) -> None:
        self.tally.merge(report["tally"])
        for data in report["slices"]:
            entry = StatsEntry.unserialize(data, self.slices)
            self.slices.get(entry.name, entry.method).extend(entry)

    def inference_between(self, first: int, stop: int) -> StatsEntry:
        """The inference requests that finished in slices ``[first, stop)``, as one stats entry."""
        merged = StatsEntry(self.slices, "inference", "")
        for key in range(first, stop):
            entry = self.slices.entries.get((str(key), "inference"))
            if entry is not None:
                merged.extend(entry)
        return merged

    def seconds(self) -> list[int]:
        """The unix seconds in which inference requests finished."""
        return sorted({int(name) // SLICES_PER_SECOND for name, _ in self.slices.entries})


_measurements = Measurements()
_worker_share: dict[str, dict[str, float]] = {}  # on the master: requests and CPU seconds per worker
_started_unix = time.time()  # when the test started, in this process
_cpu_at_start: tuple[float, float] | None = None  # (CPU seconds, monotonic seconds) then


@events.test_start.add_listener
def start_measuring(environment: Environment, **_: Any) -> None:
    global _measurements, _cpu_at_start, _started_unix
    _measurements = Measurements()
    _worker_share.clear()
    _cpu_at_start = _cpu_now()
    _started_unix = time.time()


@events.request.add_listener
def record(name: str, response_time: float, exception: Any, context: dict[str, Any], **_: Any) -> None:
    _measurements.add(
        name,
        response_time,
        records=context.get("records", 0),
        failed=exception is not None,
        inference="records" in context,
        retried=context.get("retry"),
    )


# --------------------------------------------------------------------------
# Sending with loadtest.resilience's retry policy through Locust's client
# --------------------------------------------------------------------------


def locust_retry_reason(response: Any) -> RetryReason | None:
    """:func:`loadtest.resilience.retry_reason` of a Locust response (status 0 and ``error`` when there was no reply)."""
    error = response.error if response.status_code == 0 else None
    if isinstance(error, RetriesExceeded) and getattr(error, "original", None) is not None:
        error = error.original  # geventhttpclient wraps timeouts and closed connections in this
    if isinstance(error, (HTTPConnectionClosed, EmptyResponse)):  # geventhttpclient's names for a connection closed under the request
        error = ConnectionResetError(str(error))
    elif isinstance(error, gevent.Timeout):  # gevent's timeout is not a TimeoutError
        error = TimeoutError(str(error))
    return retry_reason(response.status_code, response.content, error=error)


def describe_failure(response: Any) -> str:
    """``status N: BODY``, or the error when no reply came (status 0)."""
    detail = (response.text or "")[:200] if response.status_code else repr(response.error)
    return f"status {response.status_code}: {detail}"


def report_retried(response: Any, reason: str) -> None:
    """Report a reply that a retry replaces under ``NAME (retried: REASON)``, as a success: the retry's reply is the answer."""
    with response:
        response.request_meta["name"] = f"{response.request_meta['name']} (retried: {reason})"
        response.request_meta["context"]["retry"] = reason
        response.success()


def send_locust(user: FastHttpUser, method: str, url: str, *, api: Literal["inference", "management"], idempotent: bool, **options: Any) -> Any:
    """One request through ``user.client`` with the retry policy; the answer's response, not yet entered (``catch_response``)."""
    headers = options.pop("headers", {})

    def send(token: str) -> Any:
        sent = {**headers, "Authorization": f"Bearer {token}"}
        return user.client.request(method, url, headers=sent, catch_response=True, **options)

    try:
        return send_with_retry(
            send, locust_retry_reason, tokens=workload().tokens, api=api, idempotent=idempotent, on_retry=report_retried, sleep=gevent.sleep
        )
    except KeyFileError as error:
        # The token was refused and no new one can be had: that request failed (Locust also logs the error).
        user.environment.events.request.fire(
            request_type=method, name=options.get("name", url), response_time=0, response_length=0, exception=error, context={}
        )
        raise


@events.report_to_master.add_listener
def send_measurements(client_id: str, data: dict[str, Any]) -> None:
    data["recommender"] = {**_measurements.drain(), "cpu_s": process_cpu_seconds()}


@events.worker_report.add_listener
def merge_measurements(client_id: str, data: dict[str, Any]) -> None:
    report = data.get("recommender")
    if report is None:  # a worker that did not load this locustfile
        return
    _measurements.merge(report)
    share = _worker_share.setdefault(client_id, {"requests": 0, "cpu_s": 0.0})
    share["requests"] += data["stats_total"]["num_requests"]  # Locust's own count, sent since its last report
    share["cpu_s"] = report["cpu_s"]


# --------------------------------------------------------------------------
# Users
# --------------------------------------------------------------------------


def inference_request_name(model: str, kind: str) -> str:
    """The name under which Locust reports one kind of inference request."""
    return f"/predictions/{model} [{kind}]"


class InferenceUser(FastHttpUser):
    """Scores records and ranks candidates against ``/predictions/MODEL``."""

    weight = 10
    wait_time = constant(0)
    # A request TorchServe drops at a scale-down is never answered: give up on it after
    # --inference-timeout seconds (and retry it once) rather than after Locust's default of 60 s.
    network_timeout = INFERENCE_TIMEOUT_S

    def on_start(self) -> None:
        self.work = workload()
        self.path = f"/predictions/{self.work.model}"

    def _post(self, kind: str) -> None:
        body = random.choice(self.work.pools[kind])
        response = send_locust(
            self,
            "POST",
            self.path,
            api="inference",
            idempotent=True,  # scoring changes nothing on the server
            data=body.data,
            headers=dict(body.headers),
            name=inference_request_name(self.work.model, kind),
            context={"records": body.records},
        )
        with response:
            if response.status_code != 200:
                response.failure(describe_failure(response))
                return
            problem = check_answer(body, (response.headers or {}).get("Content-Type"), response.content or b"")
            if problem:
                response.failure(problem)

    @task(DEFAULT_MIX["single"])
    def single(self) -> None:
        self._post("single")

    @task(DEFAULT_MIX["instances"])
    def instances(self) -> None:
        self._post("instances")

    @task(DEFAULT_MIX["ranking"])
    def ranking(self) -> None:
        self._post("ranking")

    @task(DEFAULT_MIX["arrow"])
    def arrow(self) -> None:
        self._post("arrow")

    # No @task: only --mix recommend=N (read in prepare) sends it.
    def recommend(self) -> None:
        self._post(RECOMMEND)

    TASKS = {"single": single, "instances": instances, "ranking": ranking, "arrow": arrow, RECOMMEND: recommend}


class OperatorCycle(SequentialTaskSet):
    """What an operator does, in order, again and again: look, scale, roll a version."""

    @task
    def list_models(self) -> None:
        listed = self.user.call(ManagementCall.list_models(), name="/models")
        if listed is not None and self.user.model not in {m.get("modelName") for m in listed.get("models", [])}:
            self.user.fail_check("/models", f"{self.user.model} is not listed")

    @task
    def describe(self) -> None:
        description = self.user.call(ManagementCall.describe(self.user.model), name="/models/[model]")
        if description is not None and not any(w.get("status") == "READY" for w in description[0].get("workers", [])):
            self.user.fail_check("/models/[model]", "no READY worker")

    @task
    def scale_up_and_down(self) -> None:
        if self.user.scale(self.user.scale_to, name="scale up") is not None:
            self.user.scale(self.user.workers, name="scale down")

    @task
    def second_version(self) -> None:
        user = self.user
        if not user.second_archive or user.default_version is None:
            return
        model, first, second = user.model, user.default_version, user.second_version
        register = ManagementCall.register(user.second_archive, model_name=model, initial_workers=1)
        if user.call(register, name="register v2", ok=(200, 409)) is None:
            return
        versions = user.call(ManagementCall.describe(model, "all"), name="/models/[model]/all")
        if versions is not None and {v.get("modelVersion") for v in versions} != {first, second}:
            user.fail_check("/models/[model]/all", f"expected versions {first} and {second}")
        user.call(ManagementCall.set_default(model, second), name="set default v2")
        gevent.sleep(1.0)
        user.call(ManagementCall.set_default(model, first), name="set default v1")
        # Requests already routed to the second version drain before it goes.
        gevent.sleep(1.0)
        user.call(ManagementCall.unregister(model, second), name="unregister v2")


class ManagementUser(FastHttpUser):
    """One operator running :class:`OperatorCycle` against the management API.

    The inference users keep calling ``/predictions/MODEL`` throughout: every
    change here must leave them served (scaling keeps at least one worker, the
    second version is made default only once its worker is up, and is
    unregistered only after the first version is default again).
    """

    fixed_count = 1
    wait_time = between(0.5, 1.5)
    tasks = [OperatorCycle]

    def on_start(self) -> None:
        work = workload()
        options = self.environment.parsed_options
        self.base = options.management_host.rstrip("/")
        self.model = work.model
        archive = options.second_archive or f"{self.model}_v2.mar"
        self.second_archive = None if archive == "none" else archive
        self.second_version = options.second_version
        self.scale_to = max(2, options.scale_to)
        self.default_version = None
        self.workers = 1
        description = self.call(ManagementCall.describe(self.model), name="/models/[model]")
        if description:
            self.default_version = description[0].get("modelVersion")
            self.workers = max(1, len(description[0].get("workers", [])))

    def on_stop(self) -> None:
        # Leave the server as found, even when the run ends mid-cycle.
        if self.default_version is not None:
            self.call(ManagementCall.set_default(self.model, self.default_version), name="restore", quiet=True)
            if self.second_archive:
                self.call(ManagementCall.unregister(self.model, self.second_version), name="restore", quiet=True)
        self.scale(self.workers, name="restore", quiet=True)

    def call(
        self,
        request: ManagementCall,
        *,
        name: str,
        ok: tuple[int, ...] = (200,),
        quiet: bool = False,
        on_race: Callable[[int], None] | None = None,
    ) -> Any:
        """One management call through Locust's client (so it shows in Locust's statistics), checked.

        Returns its JSON body, or None after a failure. ``quiet`` calls
        (clean-up that may find nothing to do) never count as failures.
        With ``on_race``, TorchServe's scale race (see :meth:`scale`) is
        handed to it instead of counting as a failure. An expired token is
        refreshed and the call sent again; reads (GET) are also sent again
        when the connection was reset.
        """
        response = send_locust(
            self, request.method, self.base + request.path, api="management", idempotent=request.method == "GET", name=name, context={}
        )
        with response:
            if on_race is not None and response.status_code == 500 and SCALE_RACE in (response.text or ""):
                response.request_meta["name"] = f"{name} (scale race)"
                response.request_meta["context"]["retry"] = "scale race"
                response.success()
                on_race(response.status_code)
                return None
            if response.status_code not in ok:
                if quiet:
                    response.success()
                else:
                    response.failure(describe_failure(response))
                return None
            try:
                return json.loads(response.content) if response.content else {}
            except ValueError:
                response.failure("the response is not JSON")
                return None

    def scale(self, workers: int, *, name: str, quiet: bool = False) -> Any:
        """Scale to ``workers``, riding out TorchServe's scale race.

        While workers start or stop, TorchServe 0.12's frontend can answer a
        scale request with ``500 ConcurrentModificationException``. Such an
        answer is recorded under ``NAME (scale race)`` as a success and
        counted in the summary's ``retries`` (reason ``scale race``). The
        model's state is then re-read (``describe``, recorded under
        ``/models/[model] (after scale race)``): when it already has
        ``workers`` READY workers and that minimum, the scale took effect and
        is not sent again; otherwise it is sent again, up to
        :data:`SCALE_RACE_RETRIES` times.
        """
        request = ManagementCall.scale(self.model, min_worker=workers, max_worker=workers)
        for _ in range(SCALE_RACE_RETRIES):
            raced = []
            result = self.call(request, name=name, quiet=quiet, on_race=raced.append)
            if not raced:
                return result
            gevent.sleep(SCALE_RACE_PAUSE_S)
            state = self.call(ManagementCall.describe(self.model), name="/models/[model] (after scale race)", quiet=True)
            if state and scaled_to(state[0], workers):
                return state
        return self.call(request, name=name, quiet=quiet)

    def fail_check(self, name: str, problem: str) -> None:
        """A response that was a 200 but said the wrong thing."""
        self.environment.events.request.fire(
            request_type="CHECK", name=name, response_time=0, response_length=0, exception=AssertionError(problem), context={}
        )


# --------------------------------------------------------------------------
# Load shape
# --------------------------------------------------------------------------


class SteppedLoad(LoadTestShape):
    """``--step-users N``: N more users every ``--step-time`` s up to ``--users``; else constant.

    With ``--step-users 0`` (the default) this is Locust's usual constant load,
    so the common options keep their meaning either way. ``tick`` runs on the
    master (or the only process), which notes when each step began: the
    summary reports each step from those marks.
    """

    use_common_options = True

    def __init__(self) -> None:
        super().__init__()
        self.marks: list[tuple[float, int]] = []  # (unix time, target users) at each change; 0 users: the end

    def tick(self) -> tuple[int, float] | None:
        options = self.runner.environment.parsed_options
        elapsed = self.get_run_time()
        if options.run_time and elapsed > options.run_time:
            return None
        users = options.num_users or 1
        rate = options.spawn_rate or users
        if options.step_users <= 0:
            return users, rate
        steps = math.floor(elapsed / options.step_time) + 1
        if options.step_users * (steps - 1) >= users and elapsed > options.step_time * math.ceil(users / options.step_users):
            self._mark(0)
            return None  # the last step has had its full time
        target = min(users, options.step_users * steps)
        self._mark(target)
        return target, max(rate, float(options.step_users))

    def _mark(self, users: int) -> None:
        if not self.marks or self.marks[-1][1] != users:
            self.marks.append((time.time(), users))


# --------------------------------------------------------------------------
# Summary and SLO gate
# --------------------------------------------------------------------------


def summary_path(options: Any) -> Path:
    """Beside Locust's reports: ``PREFIX_summary.json`` for ``--csv PREFIX``, ``REPORT_summary.json`` for ``--html``."""
    if options.summary:
        return Path(options.summary)
    if getattr(options, "csv_prefix", None):
        return Path(options.csv_prefix + SUMMARY_SUFFIX)
    if getattr(options, "html_file", None):
        html = Path(options.html_file)
        return html.with_name(html.stem + SUMMARY_SUFFIX)
    return DEFAULT_RESULTS / "summary.json"


def run_stats(environment: Environment, model: str) -> RunStats:
    """Locust's aggregated statistics by request name and for the inference requests, with the measurements."""
    stats = environment.stats
    inference_names = {inference_request_name(model, kind) for kind in InferenceUser.TASKS}
    # Locust keys its entries by name and method; the summary by name (a failed
    # check is reported under the name of the call it checked).
    endpoints: dict[str, StatsEntry] = {}
    inference = StatsEntry(stats, "inference", "")
    for entry in stats.entries.values():
        endpoints.setdefault(entry.name, StatsEntry(stats, entry.name, "")).extend(entry)
        if entry.name in inference_names:
            inference.extend(entry)
    last_request = stats.total.last_request_timestamp or time.time()
    shape = environment.shape_class
    marks = shape.marks if isinstance(shape, SteppedLoad) else []
    steps = [(window, _measurements.inference_between(window.first, window.stop)) for window in step_windows(marks, end=last_request)]
    seconds = [
        (second, _measurements.inference_between(second * SLICES_PER_SECOND, (second + 1) * SLICES_PER_SECOND))
        for second in _measurements.seconds()
    ]
    return RunStats(
        started_unix=_started_unix,
        duration_s=max(0.0, last_request - _started_unix),
        total=stats.total,
        inference=inference,
        endpoints=endpoints,
        tally=_measurements.tally,
        steps=steps,
        seconds=seconds,
    )


# Registered as the locustfile is imported, before Locust creates its runner:
# quitting listeners run last-registered first, so on a master this runs after
# the runner has asked its workers to quit and taken their final reports.
@events.quitting.add_listener
def slo_gate(environment: Environment, **_: Any) -> None:
    """On the master (or the only process): write the summary JSON and set the exit code, 1 when the SLO is broken."""
    if _workload is None or isinstance(environment.runner, WorkerRunner):
        return  # a worker's figures are in the master's statistics
    options = environment.parsed_options
    summary = summarize(run_stats(environment, _workload.model), slo_p99_ms=options.slo_p99_ms, slo_error_ratio=options.slo_error_ratio)
    summary = {
        "model": _workload.model,
        "host": environment.host,
        "users": options.num_users,
        "load": {"step_users": options.step_users, "step_time_s": options.step_time} if options.step_users > 0 else "constant",
        "mix": parse_mix(options.mix),
        "generator": generator_cpu(environment),
        **summary,
    }
    path = summary_path(options)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    verdict = "passed" if summary["slo"]["passed"] else "BROKEN: " + "; ".join(summary["slo"]["violations"])
    print(
        f"SLO {verdict} (p99 {summary['slo']['measured_p99_ms']} ms, errors {summary['slo']['measured_error_ratio']:.4%}); "
        f"{summary['inference']['records_per_s']:.0f} records/s; summary: {path}"
    )
    environment.process_exit_code = 0 if summary["slo"]["passed"] else 1


def _cpu_now() -> tuple[float, float]:
    import psutil  # a Locust dependency

    times = psutil.Process().cpu_times()
    return times.user + times.system, time.monotonic()


def process_cpu_seconds() -> float:
    """This process's CPU seconds since the test started."""
    busy_end, _ = _cpu_now()
    busy_start, _ = _cpu_at_start or (busy_end, 0.0)
    return busy_end - busy_start


def generator_cpu(environment: Environment) -> dict[str, Any]:
    """The Locust processes' CPU use during the test (they share the machine with the server), and each one's requests."""
    _, wall_end = _cpu_now()
    wall = wall_end - (_cpu_at_start or (0.0, wall_end))[1]
    own_cpu_s = round(process_cpu_seconds(), 2)
    if isinstance(environment.runner, MasterRunner):
        processes = [{"process": "master", "requests": 0, "cpu_s": own_cpu_s}]
        processes += [
            {"process": f"worker {index}", "requests": int(share["requests"]), "cpu_s": round(share["cpu_s"], 2)}
            for index, share in enumerate(_worker_share.values())
        ]
    else:
        processes = [{"process": "local", "requests": environment.stats.total.num_requests, "cpu_s": own_cpu_s}]
    busy = sum(process["cpu_s"] for process in processes)
    return {
        "cpu_s": round(busy, 2),
        "wall_s": round(wall, 2),
        "cores_used": round(busy / wall, 3) if wall > 0 else 0.0,
        "processes": processes,
    }
