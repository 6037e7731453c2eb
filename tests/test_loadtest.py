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
from pathlib import Path

import numpy as np
import pytest
from serving_utils import REPO_ROOT, Server, TinyExport, make_tiny_export, running_torchserve

from export.archive import ServingConfig, build_archive
from export.records import sample_records
from loadtest.workload import RequestLog, check_predictions, check_ranking, parse_mix, parse_range, summarize

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


def test_summary_figures_and_slo_verdict(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr("loadtest.workload.time.monotonic", lambda: clock[0])
    log = RequestLog()
    log.mark_step(4)
    for i in range(100):  # step 1: 4 users, 10 ms, 2 records per request, one request per 10 ms
        clock[0] = 100.0 + i * 0.01
        log.add("score", 10.0, records=2, failed=False, inference=True)
    log.mark_step(8)
    for i in range(100):  # step 2: slower, and one failure
        clock[0] = 101.0 + i * 0.01
        log.add("score", 100.0 if i % 10 == 0 else 20.0, records=2, failed=i == 50, inference=True)
    log.add("scale up", 3000.0, records=0, failed=False, inference=False)
    summary = summarize(log, slo_p99_ms=60, slo_error_ratio=0.001)
    assert summary["endpoints"]["score"]["requests"] == 200 and summary["endpoints"]["score"]["failures"] == 1
    assert summary["inference"]["records"] == 398 and summary["total"]["requests"] == 201
    assert summary["inference"]["p50_ms"] == 15.0 and summary["endpoints"]["scale up"]["p99_ms"] == 3000.0
    assert not summary["slo"]["passed"]
    assert summary["slo"]["violations"] == ["error ratio 0.4975% > 0.1000%", "inference p99 100.0 ms > 60 ms"]
    first, second = summary["steps"]
    assert (first["users"], second["users"]) == (4, 8)
    assert first["p99_ms"] == 10.0 and first["records_per_s"] == pytest.approx(200, rel=0.02)
    assert second["failures"] == 1 and second["p99_ms"] == 100.0
    assert summary["failure_times_s"] == [1.5]
    assert [bucket["requests"] for bucket in summary["timeline"]] == [100, 100]  # inference only
    assert summarize(log, slo_p99_ms=200, slo_error_ratio=0.01)["slo"]["passed"]


def test_options_are_validated():
    assert parse_range("1-64", name="instances") == (1, 64)
    assert parse_range("256", name="candidates") == (256, 256)
    with pytest.raises(ValueError, match=r"--instances: expected 1 <= LOW <= HIGH, got '9-3'"):
        parse_range("9-3", name="instances")
    assert parse_mix("single=1") == {"single": 1, "instances": 0, "ranking": 0}
    with pytest.raises(ValueError, match=r"--mix: unknown task 'batch'"):
        parse_mix("batch=2")


def test_a_server_batch_is_encoded_in_one_call(tiny):
    """The hot path of issue 5: records of all requests meet in one encode_records call."""
    from handlers.request import Limits, encode_batch

    calls = []

    class CountingSpec:
        def __getattr__(self, name):
            return getattr(tiny.spec, name)

        def encode_records(self, records, base=None):
            calls.append(len(records))
            return tiny.spec.encode_records(records, base=base)

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
def tiny(tmp_path_factory) -> TinyExport:
    return make_tiny_export(tmp_path_factory.mktemp("export") / "dlrm")


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory) -> Server:
    root = tmp_path_factory.mktemp("loadtest_server")
    store = root / "model_store"
    build_archive(tiny.path, name="dlrm", backend="torchscript", model_store=store, config=CONFIG)
    build_archive(tiny.path, name="dlrm", backend="onnx", version="2.0", file_name="dlrm_v2", model_store=store, config=CONFIG)
    with running_torchserve(root / "server", model_store=store, models=["dlrm"], timeout=240) as running:
        yield running


def run_locust(server: Server, tiny: TinyExport, out: Path, *options: str, timeout: float = 120) -> tuple[int, dict, str]:
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
    for kind in ("single", "instances", "ranking"):
        figures = endpoints[f"/predictions/dlrm [{kind}]"]
        assert figures["requests"] > 0, (kind, figures)
        assert figures["p50_ms"] <= figures["p95_ms"] <= figures["p99_ms"]
    # TorchServe 0.12 stops a worker on scale-down without draining it: a request
    # in flight on that worker gets "500 Worker died". That, once per scale-down,
    # is the only inference failure allowed.
    failures = list(csv.DictReader((tmp_path / "run_failures.csv").open()))
    assert all("Worker died" in row["Error"] for row in failures), failures
    assert sum(int(row["Occurrences"]) for row in failures) <= endpoints["scale down"]["requests"], failures
    # The operator's cycle ran at least once, in full, without a failed call.
    for name in ("/models", "/models/[model]", "scale up", "scale down", "register v2", "set default v2", "set default v1", "unregister v2"):
        assert endpoints[name]["requests"] >= 1 and endpoints[name]["failures"] == 0, (name, endpoints.get(name))
    assert summary["inference"]["records_per_s"] > summary["inference"]["requests_per_s"] > 0
    assert summary["slo"]["passed"] and summary["generator"]["cores_used"] > 0
    # The server is left as found: one version, one worker.
    versions = server.call("management", "GET", "/models/dlrm/all").json()
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


@pytest.mark.slow
def test_bad_options_exit_with_a_message(server, tiny, tmp_path):
    code, _, output = run_locust(server, tiny, tmp_path, "--run-time", "5s", "--key-file", os.fspath(tmp_path / "missing.json"))
    assert code == 2
    assert "--key-file" in output and "missing.json: not found" in output
