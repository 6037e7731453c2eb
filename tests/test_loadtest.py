"""The Locust suite against a real TorchServe: traffic, management, summary JSON, SLO gate.

One TorchServe for the module (tiny DLRM, TorchScript, plus a second version
of it in the model store for the management user), on free ports; each test
runs ``locust --headless`` as a user would and reads what it wrote.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from export.archive import ServingConfig, build_archive
from export.records import sample_records
from handlers.arrow_request import read_stream, write_stream
from handlers.request import ARROW_STREAM, JSON_MEDIA_TYPE, Limits, encode_batch
from loadtest.torchserve import (
    REPO_ROOT,
    Management,
    ManagementCall,
    Response,
    Server,
    free_port,
    running_torchserve,
    scaled_to,
)
from loadtest.workload import (
    JSON_HEADERS,
    Body,
    RunStats,
    StepWindow,
    Tally,
    build_pools,
    check_answer,
    check_predictions,
    check_ranking,
    check_recommendation,
    parse_mix,
    parse_range,
    slo_violations,
    step_windows,
    summarize,
)

LOCUST = Path(sys.executable).with_name("locust")
CONFIG = ServingConfig(batch_size=16, max_batch_delay_ms=5, max_records=1000, startup_timeout_s=120)


# -- pure parts ---------------------------------------------------------------


def test_response_checks_name_the_problem():
    assert check_predictions({"predictions": [0.1, 0.9]}, 2) is None
    assert check_predictions({"predictions": [0.1]}, 2) == "1 predictions for 2 records"
    assert "in [0, 1]" in check_predictions({"predictions": [0.1, 1.5]}, 2)
    assert "in [0, 1]" in check_predictions({"predictions": [float("nan")]}, 1)
    assert check_predictions({"scores": []}, 1) == "no 'predictions' array in the response"
    good = {"ranking": [{"index": 2, "score": 0.9}, {"index": 0, "score": 0.5}]}
    assert check_ranking(good, candidates=3, top_k=2) is None
    assert check_ranking(good, candidates=3, top_k=3) == "2 ranked candidates, expected top_k=3"
    unsorted = {"ranking": [{"index": 2, "score": 0.4}, {"index": 0, "score": 0.5}]}
    assert check_ranking(unsorted, candidates=3, top_k=2) == "ranking is not sorted best first"
    repeated = {"ranking": [{"index": 2, "score": 0.9}, {"index": 2, "score": 0.5}]}
    assert "distinct integers" in check_ranking(repeated, candidates=3, top_k=2)


def test_recommend_answers_are_checked_against_k_and_the_excluded_ids():
    good = {"items": [{"id": 7, "score": 0.9, "retrieval_score": 0.3}, {"id": 2, "score": 0.4, "retrieval_score": 0.8}]}
    assert check_recommendation(good, items=2, excluded=frozenset({1, 3})) is None
    assert check_recommendation(good, items=3, excluded=frozenset()) == "2 items, expected 3"
    assert check_recommendation(good, items=2, excluded=frozenset({2})) == "items in the request's history or exclude came back: [2]"
    assert check_recommendation({"items": []}, items=0, excluded=frozenset({1})) is None  # nothing left to recommend
    repeated = {"items": [{"id": 7, "score": 0.9}, {"id": 7, "score": 0.4}]}
    assert "distinct integers" in check_recommendation(repeated, items=2, excluded=frozenset())
    unsorted = {"items": [{"id": 7, "score": 0.4}, {"id": 2, "score": 0.9}]}
    assert check_recommendation(unsorted, items=2, excluded=frozenset()) == "items are not sorted best first"
    assert "in [0, 1]" in check_recommendation({"items": [{"id": 7, "score": 1.5}]}, items=1, excluded=frozenset())
    assert check_recommendation({"ranking": []}, items=1, excluded=frozenset()) == "no 'items' array in the response"
    body = Body(b"", JSON_HEADERS, records=4, top_k=2, excluded=frozenset({1}))
    assert check_answer(body, "application/json", json.dumps(good).encode()) is None


def arrow_ranking(indices: list[int], scores: list[float]) -> bytes:
    """An Arrow ranking answer, as the handler writes it."""
    return write_stream(pa.table({"index": pa.array(indices, pa.int64()), "score": pa.array(scores, pa.float32())}))


def test_arrow_answers_are_checked_as_strictly_as_json_ones():
    asked = Body(b"", {"Content-Type": ARROW_STREAM, "Accept": ARROW_STREAM}, records=3, top_k=2)
    assert check_answer(asked, ARROW_STREAM, arrow_ranking([2, 0], [0.9, 0.5])) is None
    assert check_answer(asked, ARROW_STREAM, arrow_ranking([0, 2], [0.5, 0.9])) == "ranking is not sorted best first"
    assert check_answer(asked, ARROW_STREAM, arrow_ranking([2], [0.9])) == "1 ranked candidates, expected top_k=2"
    assert "distinct integers in [0, 3)" in check_answer(asked, ARROW_STREAM, arrow_ranking([2, 3], [0.9, 0.5]))
    assert "in [0, 1]" in check_answer(asked, ARROW_STREAM, arrow_ranking([2, 0], [1.5, 0.5]))
    assert "in [0, 1]" in check_answer(asked, ARROW_STREAM, arrow_ranking([2, 0], [float("nan"), 0.5]))
    scores_only = write_stream(pa.table({"probability": pa.array([0.5, 0.4], pa.float32())}))
    assert "not a readable application/vnd.apache.arrow.stream answer" in check_answer(asked, ARROW_STREAM, scores_only)
    assert "not a readable" in check_answer(asked, ARROW_STREAM, b"not arrow")
    # Asked for Arrow, answered in JSON (even a right ranking): the Accept header was ignored.
    right_json = json.dumps({"ranking": [{"index": 2, "score": 0.9}, {"index": 0, "score": 0.5}]}).encode()
    assert check_answer(asked, "application/json", right_json) == f"answered as application/json, asked for {ARROW_STREAM}"
    # A JSON request's answer is checked as before.
    json_asked = Body(b"", JSON_HEADERS, records=3, top_k=2)
    assert check_answer(json_asked, "application/json", right_json) is None
    assert check_answer(json_asked, None, b"<html>").startswith("the response is not a readable JSON answer")
    assert check_answer(Body(b"", JSON_HEADERS, records=2), "application/json", b'{"predictions": [0.1]}') == "1 predictions for 2 records"


@dataclass
class Latencies:
    """Stands in for Locust's ``StatsEntry``: the figures of explicit response times."""

    times_ms: list[float] = field(default_factory=list)
    num_failures: int = 0

    @property
    def num_requests(self) -> int:
        return len(self.times_ms)

    @property
    def max_response_time(self) -> float:
        return max(self.times_ms, default=0.0)

    def get_response_time_percentile(self, percent: float) -> float:
        return float(np.percentile(self.times_ms, percent * 100, method="higher"))


def test_summary_figures_and_slo_verdict():
    # Step 1 (4 users) from t=100 s: 10 ms, 2 records per request, one request per 10 ms.
    # Step 2 (8 users) from t=101 s: slower, and one failure. The load ends at t=102 s.
    marks = [(100.0, 4), (101.0, 8), (102.0, 0)]
    first_times = [10.0] * 100
    second_times = [100.0 if i % 10 == 0 else 20.0 for i in range(100)]
    tally = Tally()
    for i in range(100):
        tally.add("score", records=2, failed=False, inference=True, finished=100.0 + i * 0.01)
        tally.add("score", records=2, failed=i == 50, inference=True, finished=101.0 + i * 0.01)
    tally.add("scale up", records=0, failed=False, inference=False, finished=101.9)
    # A reply replaced by a retry is neither a failure nor records: only counted by its reason.
    tally.add("score (retried: worker died)", records=2, failed=False, inference=True, finished=101.5, retried="worker died")
    windows = step_windows(marks, end=102.0)
    # A quarter of each step settles; the steps' windows are whole quarter-second slices.
    assert windows == [StepWindow(4, 401, 404), StepWindow(8, 405, 408)] and windows[0].seconds == 0.75
    score = Latencies(first_times + second_times, num_failures=1)
    total = Latencies([*score.times_ms, 3000.0], num_failures=1)
    run = RunStats(
        started_unix=100.0,
        duration_s=2.0,
        total=total,
        inference=score,
        endpoints={"score": score, "scale up": Latencies([3000.0])},
        tally=tally,
        steps=[(windows[0], Latencies(first_times[25:])), (windows[1], Latencies(second_times[25:], num_failures=1))],
        seconds=[(100, Latencies(first_times)), (101, Latencies(second_times, num_failures=1))],
    )
    summary = summarize(run, slo_p99_ms=60, slo_error_ratio=0.001)
    assert summary["endpoints"]["score"]["requests"] == 200 and summary["endpoints"]["score"]["failures"] == 1
    assert summary["inference"]["records"] == 398 and summary["total"]["requests"] == 201
    assert summary["inference"]["records_per_s"] == 199.0
    assert summary["inference"]["p50_ms"] == 20.0 and summary["endpoints"]["scale up"]["p99_ms"] == 3000.0
    assert not summary["slo"]["passed"]
    assert summary["slo"]["violations"] == ["error ratio 0.4975% > 0.1000%", "inference p99 100.0 ms > 60 ms"]
    first, second = summary["steps"]
    assert (first["users"], second["users"]) == (4, 8)
    assert first["p99_ms"] == 10.0 and first["records_per_s"] == pytest.approx(200, rel=0.02)
    assert second["failures"] == 1 and second["p99_ms"] == 100.0
    assert summary["failure_times_s"] == [1.5]
    assert summary["retries"] == {"total": 1, "by_reason": {"worker died": 1}}
    assert [(bucket["t"], bucket["requests"], bucket["records"]) for bucket in summary["timeline"]] == [(0, 100, 200), (1, 100, 198)]
    assert summarize(run, slo_p99_ms=200, slo_error_ratio=0.01)["slo"]["passed"]
    assert slo_violations(Latencies(), Latencies(), slo_p99_ms=60, slo_error_ratio=0.001) == ["no requests were made"]


def test_tallies_of_several_processes_add_up_to_one():
    """A master merging its workers' reports holds what one process would have counted."""
    events = [("score", 3, False, True, 100.1, None), ("score", 2, True, True, 100.6, None), ("scale up", 0, False, False, 100.7, None),
              ("score", 4, False, True, 101.3, None), ("score (retried)", 4, False, True, 101.2, "worker died"),
              ("scale up (scale race)", 0, False, False, 101.4, "scale race")]  # fmt: skip
    single, master, workers = Tally(), Tally(), [Tally(), Tally()]
    for index, (name, records, failed, inference, finished, retried) in enumerate(events):
        for tally in (single, workers[index % 2]):
            tally.add(name, records=records, failed=failed, inference=inference, finished=finished, retried=retried)
    for worker in workers:
        master.merge(worker.drain())
        assert worker.drain() == {"records_by_name": {}, "inference_records_by_slice": {}, "failure_times": [], "retries": {}}
    assert master == single
    assert master.records_by_name == {"score": 7, "scale up": 0}
    assert master.inference_records_by_slice == {400: 3, 405: 4} and master.failure_times == [100.6]
    assert master.inference_records(400, 404) == 3
    assert master.retries == {"worker died": 1, "scale race": 1}


def test_management_calls_build_encoded_paths_and_queries():
    assert ManagementCall.list_models() == ManagementCall("GET", "/models")
    assert ManagementCall.list_models(limit=10, next_page_token=20).path == "/models?limit=10&next_page_token=20"
    assert ManagementCall.describe("dlrm") == ManagementCall("GET", "/models/dlrm")
    assert ManagementCall.describe("dlrm", "all").path == "/models/dlrm/all"
    assert ManagementCall.describe("a model/x", "1.0").path == "/models/a%20model%2Fx/1.0"
    assert ManagementCall.register("dlrm_v2.mar", model_name="dlrm", initial_workers=1) == ManagementCall(
        "POST", "/models?url=dlrm_v2.mar&model_name=dlrm&initial_workers=1&synchronous=true"
    )
    assert ManagementCall.register("https://host/a b.mar?x=1&y=2", synchronous=False).path == (
        "/models?url=https%3A%2F%2Fhost%2Fa+b.mar%3Fx%3D1%26y%3D2&synchronous=false"
    )
    assert ManagementCall.register("m.mar", batch_size=8, max_batch_delay_ms=5, response_timeout_s=120).path == (
        "/models?url=m.mar&synchronous=true&batch_size=8&max_batch_delay=5&response_timeout=120"
    )
    assert ManagementCall.scale("dlrm", min_worker=2, max_worker=3) == ManagementCall(
        "PUT", "/models/dlrm?min_worker=2&max_worker=3&synchronous=true"
    )
    assert ManagementCall.scale("dlrm", "2.0", min_worker=1, max_worker=1, synchronous=False).path == (
        "/models/dlrm/2.0?min_worker=1&max_worker=1&synchronous=false"
    )
    assert ManagementCall.set_default("dlrm", "2.0") == ManagementCall("PUT", "/models/dlrm/2.0/set-default")
    assert ManagementCall.unregister("dlrm") == ManagementCall("DELETE", "/models/dlrm")
    assert ManagementCall.unregister("dlrm", "2.0") == ManagementCall("DELETE", "/models/dlrm/2.0")
    # What TorchServe 0.12 accepts but cannot undo over REST is refused before it is sent.
    with pytest.raises(ValueError, match=r"min_worker=-1 max_worker=1"):
        ManagementCall.scale("dlrm", min_worker=-1, max_worker=1)
    with pytest.raises(ValueError, match=r"min_worker=3 max_worker=2"):
        ManagementCall.scale("dlrm", min_worker=3, max_worker=2)
    assert ManagementCall.scale("dlrm", min_worker=0, max_worker=1).path.startswith("/models/dlrm?min_worker=0")
    for name in ("a/b", "..", "x..y", "../dlrm", ".hidden", ""):
        with pytest.raises(ValueError, match="model_name"):
            ManagementCall.register("dlrm.mar", model_name=name)
    assert ManagementCall.register("dlrm.mar", model_name="dlrm_v2.1-onnx").path.startswith("/models?url=dlrm.mar&model_name=dlrm_v2.1-onnx")


def test_scaled_to_reads_a_models_description():
    ready = {"status": "READY"}
    assert scaled_to({"minWorkers": 2, "workers": [ready, ready]}, 2)
    assert not scaled_to({"minWorkers": 2, "workers": [ready, {"status": "UNLOADING"}]}, 2)
    assert not scaled_to({"minWorkers": 1, "workers": [ready, ready]}, 2)  # still scaling down
    assert scaled_to({"minWorkers": 0, "workers": []}, 0) and not scaled_to({"minWorkers": 0, "workers": [ready]}, 0)


def test_management_client_sends_to_the_management_api(tmp_path):
    sent = []

    class RecordingServer(Server):
        def call(self, api, method, path, **options):
            sent.append((api, method, path, options))
            return Response(404, b'{"message": "no such model"}')

    management = Management(RecordingServer(workdir=tmp_path, urls={}))
    reply = management.scale("dlrm", min_worker=2, max_worker=2, timeout=90)
    assert reply.status == 404  # returned as is: the caller decides what it means
    assert sent == [("management", "PUT", "/models/dlrm?min_worker=2&max_worker=2&synchronous=true", {"timeout": 90})]
    assert RecordingServer(workdir=tmp_path, urls={}).management.unregister("dlrm", "2.0").status == 404
    assert sent[-1][1:3] == ("DELETE", "/models/dlrm/2.0")


def test_options_are_validated():
    assert parse_range("1-64", name="instances") == (1, 64)
    assert parse_range("256", name="candidates") == (256, 256)
    with pytest.raises(ValueError, match=r"--instances: expected 1 <= LOW <= HIGH, got '9-3'"):
        parse_range("9-3", name="instances")
    assert parse_mix("single=1") == {"single": 1, "instances": 0, "ranking": 0, "arrow": 0}
    assert parse_mix("") == {"single": 6, "instances": 3, "ranking": 1, "arrow": 1}
    with pytest.raises(ValueError, match=r"--mix: unknown task 'batch'; expected one of single, instances, ranking, arrow"):
        parse_mix("batch=2")
    # recommend asks another kind of archive: only when named, and alone.
    assert parse_mix("recommend=1") == {"single": 0, "instances": 0, "ranking": 0, "arrow": 0, "recommend": 1}
    with pytest.raises(ValueError, match=r"--mix: recommend asks a recommend archive, the other tasks a ranker archive"):
        parse_mix("single=1,recommend=1")
    assert parse_range("0-20", name="history", minimum=0) == (0, 20)
    with pytest.raises(ValueError, match=r"--exclude: expected 0 <= LOW <= HIGH, got '3-1'"):
        parse_range("3-1", name="exclude", minimum=0)


def test_recommend_pool_draws_users_from_the_spec_and_ids_from_the_catalogue(tiny):
    catalogue = np.arange(10, 16)
    (pool,) = build_pools(tiny.spec, size=20, instances=(1, 1), candidates=(2, 6), top_k=3, seed=1, kinds=("recommend",),
                          catalogue=catalogue, history=(0, 3), exclude=(1, 2)).values()
    for body in pool:
        request = json.loads(body.data)
        assert set(request) == {"user", "history", "k", "exclude", "candidates"}
        assert set(request["user"]) <= set(tiny.spec.feature_names) - {"history"}
        assert len(request["history"]) <= 3 and 1 <= len(request["exclude"]) <= 2
        assert body.excluded == set(request["history"]) | set(request["exclude"]) and body.excluded <= set(catalogue.tolist())
        left = len(catalogue) - len(body.excluded)
        assert 2 <= request["candidates"] <= 6 and request["k"] == min(3, request["candidates"])
        assert (body.records, body.top_k) == (min(request["candidates"], left), min(request["k"], left))
    with pytest.raises(ValueError, match="no catalogue item ids"):
        build_pools(tiny.spec, size=2, instances=(1, 1), candidates=(2, 6), top_k=3, seed=1, kinds=("recommend",))


def test_arrow_pool_holds_the_json_ranking_requests_as_arrow_streams(tiny):
    """The arrow task sends the ranking task's requests, as the Python client writes them in Arrow."""
    pools = build_pools(tiny.spec, size=6, instances=(1, 4), candidates=(3, 12), top_k=4, seed=5, kinds=("ranking", "arrow"))
    assert set(pools) == {"ranking", "arrow"}
    limits = Limits()
    for as_json, as_arrow in zip(pools["ranking"], pools["arrow"], strict=True):
        assert as_json.headers == {"Content-Type": JSON_MEDIA_TYPE, "Accept": JSON_MEDIA_TYPE}
        assert as_arrow.headers == {"Content-Type": ARROW_STREAM, "Accept": ARROW_STREAM}
        assert (as_arrow.records, as_arrow.top_k) == (as_json.records, as_json.top_k)
        request = json.loads(as_json.data)
        table = read_stream(as_arrow.data)
        metadata = {key.decode(): value.decode() for key, value in table.schema.metadata.items()}
        assert metadata["request"] == "rank" and int(metadata["top_k"]) == request["top_k"] == min(4, as_json.records)
        assert json.loads(metadata["context"]) == request["context"]
        # Row by row the same candidates (a null is a feature the JSON candidate leaves out).
        rows = [{name: value for name, value in row.items() if value is not None} for row in table.to_pylist()]
        assert rows == request["candidates"] and len(rows) == as_json.records
        # And the handler encodes both to the same tensors.
        batch = encode_batch(
            tiny.spec, [{"body": as_json.data}, {"body": as_arrow.data}], limits=limits, content_types=[JSON_MEDIA_TYPE, ARROW_STREAM]
        )
        (a, b), (c, d) = batch.bounds
        assert np.array_equal(batch.dense[a:b], batch.dense[c:d]) and np.array_equal(batch.sparse[a:b], batch.sparse[c:d])
    # The same seed draws the same requests whether or not the JSON ranking pool is built.
    alone = build_pools(tiny.spec, size=6, instances=(1, 4), candidates=(3, 12), top_k=4, seed=5, kinds=("arrow",))
    assert [body.data for body in alone["arrow"]] == [body.data for body in pools["arrow"]]


def test_a_server_batch_is_encoded_in_one_call(tiny):
    """Records of every request in a server-side batch meet in one encode_records call."""
    from handlers.request import Limits, encode_batch

    calls = []

    class CountingSpec:
        def __getattr__(self, name):
            return getattr(tiny.spec, name)

        def encode_records(self, records, base=None, **options):
            calls.append(len(records))
            return tiny.spec.encode_records(records, base=base, **options)

    records = sample_records(tiny.spec, 5, seed=1)
    bodies = [{"body": records[0]}, {"body": {"instances": records[1:3]}}, {"body": {"context": {"I1": 3}, "candidates": records[3:], "top_k": 1}}]
    batch = encode_batch(CountingSpec(), bodies, limits=Limits())
    assert calls == [5] and batch.bounds == [(0, 1), (1, 3), (3, 5)]
    one_by_one = [tiny.spec.encode_records(records[:1]), tiny.spec.encode_records(records[1:3]), tiny.spec.encode_records(records[3:], base={"I1": 3})]
    assert (batch.dense == np.concatenate([d for d, _ in one_by_one])).all()
    assert (batch.sparse == np.concatenate([s for _, s in one_by_one])).all()

    calls.clear()
    bad = [*bodies, {"body": {"instances": [{"C9": 1}]}}]
    batch = encode_batch(CountingSpec(), bad, limits=Limits())
    assert calls == [6, 1, 2, 2, 1]  # the batch, then request by request
    assert batch.outcomes[3].field == "instances[0].C9" and batch.bounds[3] == (5, 5)


# -- against a real TorchServe ------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_export):
    """The session's tiny DLRM export (conftest ``TinyExport``)."""
    return tiny_export("dlrm")


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory) -> Server:
    root = tmp_path_factory.mktemp("loadtest_server")
    store = root / "model_store"
    build_archive(tiny.path, name="dlrm", backend="torchscript", model_store=store, config=CONFIG)
    build_archive(tiny.path, name="dlrm", backend="onnx", version="2.0", file_name="dlrm_v2", model_store=store, config=CONFIG)
    with running_torchserve(root / "server", model_store=store, models=["dlrm"], timeout=240) as running:
        yield running


def run_locust(server: Server, tiny, out: Path, *options: str, timeout: float = 120) -> tuple[int, dict, str]:
    command = [
        os.fspath(LOCUST), "-f", os.fspath(REPO_ROOT / "loadtest" / "locustfile.py"), "--headless",
        "--host", server.urls["inference"], "--management-host", server.urls["management"],
        "--model", "dlrm", "--features", os.fspath(tiny.path / "features.json"),
        "--key-file", os.fspath(server.workdir / "key_file.json"),
        "--csv", os.fspath(out / "run"), "--html", os.fspath(out / "run.html"),
        "--pool-size", "32", "--only-summary", "--stop-timeout", "10",
        *options,
    ]  # fmt: skip
    finished = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=out, check=False)
    summary_file = out / "run_summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    return finished.returncode, summary, finished.stdout + finished.stderr


@pytest.mark.slow
def test_headless_run_with_management_passes_the_slo_gate(server, tiny, tmp_path):
    # A loose latency bound: this checks the suite, not this shared 2-core machine.
    code, summary, output = run_locust(
        server, tiny, tmp_path, "--users", "5", "--spawn-rate", "5", "--run-time", "25s", "--slo-p99-ms", "5000",
        "--candidates", "100-300",
    )  # fmt: skip
    assert code == 0, output[-3000:]
    assert (tmp_path / "run_stats.csv").is_file() and (tmp_path / "run.html").is_file()
    endpoints = summary["endpoints"]
    for kind in ("single", "instances", "ranking", "arrow"):  # the default mix: the arrow task ran too
        figures = endpoints[f"/predictions/dlrm [{kind}]"]
        assert figures["requests"] > 0, (kind, figures)
        assert figures["p50_ms"] <= figures["p95_ms"] <= figures["p99_ms"]
    # TorchServe 0.12 stops a worker on scale-down without draining it: a request
    # in flight on that worker gets "500 Worker died" or no answer at all (or a
    # 503 while no worker takes it). The users retry such a request once (an
    # unanswered one after 10 s), so no request fails; the
    # retries are reported apart, each under its own name in Locust's statistics.
    failures = list(csv.DictReader((tmp_path / "run_failures.csv").open()))
    assert failures == [] and summary["total"]["failures"] == summary["inference"]["failures"] == 0, failures
    retries = summary["retries"]
    assert retries["total"] == sum(retries["by_reason"].values())
    assert set(retries["by_reason"]) <= {"worker died", "no answer", "no worker", "connection reset", "token expired", "scale race"}, retries
    retried_replies = sum(figures["requests"] for name, figures in endpoints.items() if "(retried: " in name or name.endswith("(scale race)"))
    assert retried_replies == retries["total"], (retries, endpoints)
    # The operator's cycle ran at least once, in full, without a failed call.
    for name in ("/models", "/models/[model]", "scale up", "scale down", "register v2", "set default v2", "set default v1", "unregister v2"):
        assert endpoints[name]["requests"] >= 1 and endpoints[name]["failures"] == 0, (name, endpoints.get(name))
    assert summary["inference"]["records_per_s"] > summary["inference"]["requests_per_s"] > 0
    assert summary["slo"]["passed"] and summary["generator"]["cores_used"] > 0
    # The server is left as found: one version, one worker.
    versions = server.management.describe("dlrm", "all").json()
    assert [(v["modelVersion"], len(v["workers"])) for v in versions] == [("1.0", 1)]


@pytest.mark.slow
def test_broken_slo_fails_the_run(server, tiny, tmp_path):
    code, summary, output = run_locust(
        server, tiny, tmp_path, "InferenceUser", "--users", "2", "--spawn-rate", "2", "--run-time", "6s",
        "--slo-p99-ms", "0.001", "--mix", "single=1,instances=1",
    )  # fmt: skip
    assert code == 1, output[-3000:]
    assert not summary["slo"]["passed"]
    assert any("p99" in violation for violation in summary["slo"]["violations"])
    assert summary["total"]["failures"] == 0 and summary["total"]["requests"] > 0


def worker_requests(summary: dict) -> list[int]:
    return [process["requests"] for process in summary["generator"]["processes"] if process["process"].startswith("worker")]


def two_processes() -> list[str]:
    """``--processes 2`` with a master port of its own on 127.0.0.1.

    Locust's default (5557, on every interface) would collide with any other
    distributed Locust run on the machine, which then exits 1 before it starts.
    """
    port = str(free_port())
    return ["--processes", "2", "--master-bind-host", "127.0.0.1", "--master-bind-port", port, "--master-port", port]


@pytest.mark.slow
def test_two_processes_pass_the_slo_gate_with_both_counted(server, tiny, tmp_path):
    """``--processes 2``: a master and two workers; the gate and the summary see every worker's requests."""
    code, summary, output = run_locust(
        server, tiny, tmp_path, "InferenceUser", *two_processes(), "--users", "4", "--spawn-rate", "4",
        "--step-users", "2", "--step-time", "5", "--run-time", "30s", "--slo-p99-ms", "5000",
        "--mix", "single=2,instances=1", "--json-file", os.fspath(tmp_path / "locust"),
    )  # fmt: skip
    assert code == 0, output[-3000:]
    assert summary["duration_s"] < 20, "the stepped load ends the run after its two 5 s steps, before --run-time"
    assert summary["slo"]["passed"], summary["slo"]
    # Both workers sent requests, and the summary holds all of them: as many as Locust's own final statistics.
    requests = worker_requests(summary)
    assert len(requests) == 2 and min(requests) > 0, summary["generator"]
    locust_final = json.loads((tmp_path / "locust.json").read_text())
    assert sum(requests) == summary["total"]["requests"] == sum(entry["num_requests"] for entry in locust_final)
    # Records come from the workers' tallies; steps and seconds from their quarter-second slices.
    assert summary["inference"]["records"] > summary["inference"]["requests"] > 0
    assert sum(bucket["requests"] for bucket in summary["timeline"]) == summary["inference"]["requests"]
    assert [step["users"] for step in summary["steps"]] == [2, 4], summary["steps"]
    assert all(step["records_per_s"] >= step["requests_per_s"] > 0 for step in summary["steps"]), summary["steps"]


@pytest.mark.slow
def test_two_processes_fail_the_run_on_a_broken_slo(server, tiny, tmp_path):
    code, summary, output = run_locust(
        server, tiny, tmp_path, "InferenceUser", *two_processes(), "--users", "2", "--spawn-rate", "2",
        "--run-time", "8s", "--slo-p99-ms", "0.001", "--mix", "single=1",
    )  # fmt: skip
    assert code == 1 and summary, output[-3000:]
    assert summary["slo"]["violations"] == [f"inference p99 {summary['slo']['measured_p99_ms']:.1f} ms > 0.001 ms"]
    assert summary["total"]["failures"] == 0
    requests = worker_requests(summary)
    assert len(requests) == 2 and min(requests) > 0 and sum(requests) == summary["total"]["requests"]


@pytest.mark.slow
def test_bad_options_exit_with_a_message(server, tiny, tmp_path):
    code, _, output = run_locust(server, tiny, tmp_path, "--run-time", "5s", "--key-file", os.fspath(tmp_path / "missing.json"))
    assert code == 2
    assert "--key-file" in output and "missing.json: not found" in output
