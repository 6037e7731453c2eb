"""End to end: build .mar archives, serve them with a real TorchServe, call it over HTTP.

One TorchServe for the module, started in a clean directory outside the
repository (no PYTHONPATH, the .mar files copied there alone), so every test
here also proves the archives are self-contained. Free ports on 127.0.0.1,
the project's config.properties otherwise as shipped (token auth on,
allowed_urls locked), and always stopped at the end.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from export.archive import ArchiveError, ServingConfig, build_archive
from loadtest.torchserve import REPO_ROOT, Server, running_torchserve

pytestmark = pytest.mark.slow

# A longer batch delay than the shipped 5 ms, so concurrent test requests
# reliably meet in one batch on a loaded 2-core machine.
TEST_CONFIG = ServingConfig(batch_size=32, max_batch_delay_ms=50, max_records=100, startup_timeout_s=120)
MODELS = {"dlrm": ("dlrm", "torchscript"), "dlrm_onnx": ("dlrm", "onnx"), "widedeep_onnx": ("widedeep", "onnx")}


@pytest.fixture(scope="module")
def exports(tiny_export) -> dict:
    """The session's tiny export of each model (conftest ``TinyExport``), by model name."""
    return {name: tiny_export(name) for name in ("dlrm", "widedeep")}


@pytest.fixture(scope="module")
def build_store(exports, tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("build_store")
    for name, (model, backend) in MODELS.items():
        build_archive(exports[model].path, name=name, backend=backend, model_store=store, config=TEST_CONFIG)
    build_archive(
        exports["dlrm"].path, name="dlrm", backend="onnx", version="2.0", file_name="dlrm_v2", model_store=store, config=TEST_CONFIG
    )
    return store


@pytest.fixture(scope="module")
def server(build_store, tmp_path_factory) -> Server:
    clean = tmp_path_factory.mktemp("clean_host")
    store = clean / "model_store"
    store.mkdir()
    for archive in build_store.glob("*.mar"):
        shutil.copy(archive, store)  # the archives alone: no handler, encoder or repo beside them
    with running_torchserve(clean, model_store=store, models=list(MODELS), timeout=240) as running:
        yield running


def eager(exports: dict, model: str):
    return exports[MODELS[model][0]]


def records_per_batch(server: Server, model: str) -> tuple[float, float, float]:
    """(records, batches, batches of exactly one record) so far, from the Prometheus histogram."""
    values = {}
    for line in server.call("metrics", "GET", "/metrics").body.decode().splitlines():
        match = re.fullmatch(r'RecordsPerBatch_(\w+)\{ModelName="([^"]+)",(.*)\} (\S+)', line)
        if match and match[2] == model:
            bucket = re.search(r'le="([^"]+)"', match[3])
            values[match[1] + (f"_le_{bucket[1]}" if bucket else "")] = float(match[4])
    batches = values.get("count", 0.0)
    # Bucket le=1 minus bucket le=0.75: batches whose requests were all rejected hold 0 records.
    singles = values.get("bucket_le_1.0", 0.0) - values.get("bucket_le_0.75", 0.0)
    return values.get("sum", 0.0), batches, singles


# -- the archive -------------------------------------------------------------


def test_archive_holds_handler_encoder_spec_artifact_and_config(build_store):
    with zipfile.ZipFile(build_store / "dlrm_onnx.mar") as archive:
        names = set(archive.namelist())
        config = yaml.safe_load(archive.read("model-config.yaml"))
    assert {"recommender_handler.py", "features.json", "model.onnx", "model-config.yaml"} <= names
    # The serving code as packages: the same import lines as in the repository.
    assert {"featurespec/__init__.py", "featurespec/spec.py", "handlers/__init__.py", "handlers/request.py",
            "handlers/backends.py", "handlers/memory.py", "handlers/arrow_request.py", "featurespec/arrow.py"} <= names
    assert not {"request.py", "backends.py", "features.py", "memory.py", "handlers/recommender_handler.py"} & names
    assert not any("__pycache__" in name or name.startswith("training/") for name in names)
    assert "model.ts.pt" not in names
    assert config["batchSize"] == 32 and config["maxBatchDelay"] == 50 and config["startupTimeout"] == 120
    assert config["handler"] == {
        "max_records": 100, "max_candidates": 1000, "max_value_bytes": 65536, "max_string_bytes": 4194304,
        "max_depth": 8, "max_field_name_bytes": 256, "threads": 1, "float32_matmul_precision": "highest",
    }


def test_archive_refuses_to_overwrite_without_force(exports, build_store):
    with pytest.raises(ArchiveError, match=r"dlrm\.mar exists; pass --force"):
        build_archive(exports["dlrm"].path, name="dlrm", model_store=build_store)


def test_archive_errors_name_the_problem(tmp_path):
    with pytest.raises(ArchiveError, match=r"model\.onnx: not found"):
        build_archive(tmp_path, name="m", backend="onnx", model_store=tmp_path / "store")
    with pytest.raises(ValueError, match=r"model name 'bad name'"):
        build_archive(tmp_path, name="bad name", model_store=tmp_path / "store")
    with pytest.raises(ValueError, match=r"version 'v2'"):
        build_archive(tmp_path, name="m", version="v2", model_store=tmp_path / "store")
    with pytest.raises(ValueError, match=r"max_workers \(1\) must be >= min_workers \(2\)"):
        ServingConfig(min_workers=2, max_workers=1)
    with pytest.raises(ValueError, match=r"batch_size must be an integer >= 1, got 0"):
        ServingConfig(batch_size=0)


def test_server_runs_outside_the_repository(server):
    assert REPO_ROOT not in server.workdir.resolve().parents
    assert sorted(p.name for p in (server.workdir / "model_store").iterdir()) == sorted(
        [f"{name}.mar" for name in MODELS] + ["dlrm_v2.mar"]
    )


# -- scores ------------------------------------------------------------------


@pytest.mark.parametrize("model", sorted(MODELS))
def test_served_scores_equal_eager_scores(server, exports, model, sample_records):
    reference = eager(exports, model)
    records = sample_records(7, seed=11)
    single = server.predict(model, records[0])
    assert single.status == 200, single.body
    assert single.json()["predictions"] == pytest.approx(reference.eager_scores(records[:1]), abs=1e-5)
    many = server.predict(model, {"instances": records})
    assert many.status == 200, many.body
    assert many.json()["predictions"] == pytest.approx(reference.eager_scores(records), abs=1e-5)

    shared = {"I1": 4, "C1": "c1_3"}
    candidates = [{k: v for k, v in r.items() if k not in shared} for r in records]
    ranked = server.predict(model, {"context": shared, "candidates": candidates, "top_k": 4})
    assert ranked.status == 200, ranked.body
    expected = reference.eager_scores(candidates, context=shared)
    ranking = ranked.json()["ranking"]
    assert [item["index"] for item in ranking] == sorted(range(7), key=lambda i: -expected[i])[:4]
    assert [item["score"] for item in ranking] == pytest.approx([expected[item["index"]] for item in ranking], abs=1e-5)


def test_kserve_v2_infer_endpoint(server, exports):
    records = [{"I1": 3, "C1": "c1_1", "C2": "00ab"}, {"I1": 9, "C1": "c1_5", "C2": None}]
    body = {
        "id": "v2-request",
        "inputs": [
            {"name": "I1", "shape": [2], "datatype": "INT64", "data": [3, 9]},
            {"name": "C1", "shape": [2], "datatype": "BYTES", "data": ["c1_1", "c1_5"]},
            {"name": "C2", "shape": [2], "datatype": "BYTES", "data": ["00ab", None]},
        ],
    }
    reply = server.call("inference", "POST", "/v2/models/dlrm_onnx/infer", body=body)
    assert reply.status == 200, reply.body
    payload = reply.json()
    assert payload["id"] == "v2-request" and payload["model_name"] == "dlrm_onnx"
    (output,) = payload["outputs"]
    assert output["name"] == "probability" and output["shape"] == [2] and output["datatype"] == "FP32"
    assert output["data"] == pytest.approx(exports["dlrm"].eager_scores(records), abs=1e-5)


def test_concurrent_single_records_are_batched(server, exports, sample_records):
    records = sample_records(24, seed=21)
    records_before, batches_before, singles_before = records_per_batch(server, "dlrm")
    with ThreadPoolExecutor(max_workers=len(records)) as pool:
        replies = list(pool.map(lambda record: server.predict("dlrm", record), records))
    assert [reply.status for reply in replies] == [200] * len(records)
    served = [reply.json()["predictions"][0] for reply in replies]
    assert served == pytest.approx(exports["dlrm"].eager_scores(records), abs=1e-5)
    # Workers report metrics through their log, read asynchronously: wait until all records show.
    deadline = time.monotonic() + 15
    while True:
        records_after, batches_after, singles_after = records_per_batch(server, "dlrm")
        if records_after - records_before >= len(records) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert records_after - records_before == len(records)
    batches = batches_after - batches_before
    multi_record_batches = batches - (singles_after - singles_before)
    assert batches < len(records), f"{len(records)} requests took {batches} forward passes: nothing was batched"
    assert multi_record_batches >= 1


def test_one_bad_request_in_a_burst_fails_alone(server, exports, sample_records):
    records = sample_records(12, seed=31)
    bodies: list = [{"instances": [record]} for record in records]
    bodies[5] = {"instances": [{**records[5], "C9": "nope"}]}
    with ThreadPoolExecutor(max_workers=len(bodies)) as pool:
        replies = list(pool.map(lambda body: server.predict("dlrm_onnx", body), bodies))
    statuses = [reply.status for reply in replies]
    assert statuses == [200] * 5 + [400] + [200] * 6
    error = replies[5].json()
    assert error["field"] == "instances[0].C9" and error["problem"] == "unknown feature"
    good = [i for i in range(12) if i != 5]
    served = [replies[i].json()["predictions"][0] for i in good]
    assert served == pytest.approx(exports["dlrm"].eager_scores([records[i] for i in good]), abs=1e-5)


@pytest.mark.parametrize(
    ("body", "field", "problem"),
    [
        (b'{"instances": [{"I1": 1}', "body", "not valid JSON"),
        ({"instances": [{"I1": 1, "bogus": 2}]}, "instances[0].bogus", "unknown feature"),
        ({"instances": [{"I1": "12"}]}, "instances[0].I1", "expected a number or null, got a string"),
        # Bodies reach the handler as bytes (decode_input_request=false): NaN is not JSON.
        (b'{"instances": [{"I1": NaN}]}', "body", "NaN is not a JSON number"),
        (b'{"instances": [{"I2": Infinity}]}', "body", "Infinity is not a JSON number"),
        (b'{"instances": [{"I2": 1e999}]}', "instances[0].I2", "finite number"),
        ({"instances": []}, "instances", "empty request"),
        (b"", "body", "empty request"),
        ({"instances": [{"I1": 1}] * 101}, "instances", "101 records exceed the limit of 100"),
        ({"candidates": [{"I1": 1}], "top_k": -1}, "top_k", "must be >= 1"),
    ],
    ids=["malformed-json", "unknown-feature", "wrong-type", "nan", "infinity", "overflow", "empty-instances", "empty-body", "oversized", "bad-top-k"],
)
def test_bad_requests_get_a_400_naming_the_field(server, body, field, problem, sample_records):
    reply = server.predict("dlrm", body)
    assert reply.status == 400, reply.body
    payload = reply.json()
    assert payload["field"] == field and problem in payload["problem"]
    assert server.predict("dlrm", sample_records(1)[0]).status == 200  # the worker survived


# -- security, metrics -------------------------------------------------------


def test_requests_without_a_valid_token_are_refused(server, sample_records):
    record = sample_records(1)[0]
    for token in (None, "not-the-key"):
        reply = server.predict("dlrm", record, token=token)
        # TorchServe 0.12 answers a failed token check with 400 InvalidKeyException (not 401).
        assert reply.status in (400, 401) and reply.json()["type"] == "InvalidKeyException"
    assert server.call("management", "GET", "/models", token=None).status in (400, 401)
    wrong_api = server.predict("dlrm", record, token=server.keys()["management"])
    assert wrong_api.status in (400, 401)


def test_handler_metrics_on_the_prometheus_endpoint(server, sample_records):
    server.predict("widedeep_onnx", {"instances": sample_records(3)})
    text = server.call("metrics", "GET", "/metrics").body.decode()
    for name in ("RecordsPerBatch_count", "EncodeTime", "InferenceTime"):
        assert any(line.startswith(name) and 'ModelName="widedeep_onnx"' in line for line in text.splitlines()), name


# -- management (each test leaves the server as it found it: see conftest.py) --


def test_management_list_describe_scale(server, sample_records):
    management = server.management
    listed = management.list_models().json()
    assert {model["modelName"] for model in listed["models"]} >= set(MODELS)
    (description,) = management.describe("dlrm_onnx").json()
    assert description["batchSize"] == 32 and description["maxBatchDelay"] == 50
    assert len(description["workers"]) == 1

    scaled = management.scale("dlrm_onnx", min_worker=2, max_worker=2, timeout=120)
    assert scaled.status == 200, scaled.body
    (description,) = management.describe("dlrm_onnx").json()
    assert len(description["workers"]) == 2
    assert server.predict("dlrm_onnx", sample_records(1)[0]).status == 200
    back = management.scale("dlrm_onnx", min_worker=1, max_worker=1, timeout=120)
    assert back.status == 200, back.body


def test_management_versions_register_default_unregister(server, exports, sample_records):
    management = server.management
    # Sent URL-encoded: TorchServe decodes it and still refuses it.
    refused = management.register("https://example.com/evil.mar")
    assert refused.status >= 400 and "does not match any allowed URL" in refused.json()["message"]

    registered = management.register("dlrm_v2.mar", model_name="dlrm", initial_workers=1, timeout=180)
    assert registered.status == 200, registered.body
    versions = {entry["modelVersion"] for entry in management.describe("dlrm", "all").json()}
    assert versions == {"1.0", "2.0"}

    assert management.set_default("dlrm", "2.0").status == 200
    (default,) = management.describe("dlrm").json()
    assert default["modelVersion"] == "2.0"
    records = sample_records(4, seed=41)
    expected = exports["dlrm"].eager_scores(records)
    for path in ("/predictions/dlrm", "/predictions/dlrm/1.0", "/predictions/dlrm/2.0"):
        reply = server.call("inference", "POST", path, body={"instances": records})
        assert reply.status == 200, (path, reply.body)
        assert reply.json()["predictions"] == pytest.approx(expected, abs=1e-5)

    assert management.set_default("dlrm", "1.0").status == 200
    removed = management.unregister("dlrm", "2.0")
    assert removed.status == 200, removed.body
    versions = {entry["modelVersion"] for entry in management.describe("dlrm", "all").json()}
    assert versions == {"1.0"}


def test_a_killed_worker_is_replaced(server, sample_records):
    (description,) = server.management.describe("widedeep_onnx").json()
    (worker,) = description["workers"]
    old_pid = int(worker["pid"])
    os.kill(old_pid, signal.SIGKILL)  # a worker of the TorchServe this module started
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        (description,) = server.management.describe("widedeep_onnx").json()
        workers = description["workers"]
        if workers and all(w["status"] == "READY" and int(w["pid"]) not in (old_pid, -1) for w in workers):
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"no READY replacement for worker {old_pid} within 90s: {description['workers']}")
    for _ in range(3):
        reply = server.predict("widedeep_onnx", {"instances": sample_records(2)})
        assert reply.status == 200, reply.body
