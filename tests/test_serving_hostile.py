"""End to end: hostile requests against a real TorchServe get a quick 400 and leave the worker as it was.

One TorchServe for the module, serving a tiny DLRM archive built as
``test_serving_e2e`` builds them (clean directory, free ports, the project's
config.properties). Each hostile body (a 2.5 MB value among 999 short ones,
a ~6 MB value, a 300 KB context for 1,000 candidates, JSON nested 10,000
deep, a 1 MB field name, a request wrapped in a JSON string) must get a 400
quickly, from the same worker process, whose memory barely grows; sent
together with good requests, so they share a server-side batch, it must not
cost those their 200 and their scores.
"""

from __future__ import annotations

import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from export.archive import ServingConfig, build_archive
from loadtest.torchserve import Response, Server, running_torchserve

pytestmark = pytest.mark.slow

MODEL = "dlrm"
# A batch delay long enough that concurrent requests meet in one batch on a loaded 2-core machine.
CONFIG = ServingConfig(batch_size=16, max_batch_delay_ms=200, startup_timeout_s=120)
SECONDS = 5.0  # a hostile request is answered in well under a second; this bound only keeps the test stable
RSS_GROWTH_KB = 50 * 1024
MAX_REQUEST_SIZE = 6_553_500  # TorchServe's default max_request_size, kept by config.properties

HOSTILE = {
    "long-value-among-many": json.dumps({"instances": [{"C1": "x" * 2_500_000}] + [{"C1": "a"}] * 999}),
    "six-mb-value": json.dumps({"instances": [{"C1": "x" * 6_000_000}]}),
    "large-context-many-candidates": json.dumps(
        {"context": {"C1": "x" * 300_000}, "candidates": [{"I1": i} for i in range(1000)]}
    ),
    "nested-10000-deep": '{"instances": ' + "[" * 10_000 + "]" * 10_000 + "}",
    "one-mb-field-name": json.dumps({"instances": [{"k" * 1_000_000: 1}]}),
    "request-in-a-json-string": json.dumps(json.dumps({"instances": [{"I1": 1}]})),
}
EXPECTED = {  # (field, words of the problem)
    "long-value-among-many": ("instances[0].C1", "2500000 bytes exceed the limit of 65536 bytes per value"),
    "six-mb-value": ("instances[0].C1", "6000000 bytes exceed the limit of 65536 bytes per value"),
    "large-context-many-candidates": ("context.C1", "300000 bytes exceed the limit of 65536 bytes per value"),
    "nested-10000-deep": ("body", "10001 levels of nesting exceed the limit of 8"),
    "one-mb-field-name": ("instances[0].", "a field name of 1000000 bytes exceeds the limit of 256 bytes"),
    "request-in-a-json-string": ("body", "the body is a JSON string, not an object"),
}


@pytest.fixture(scope="module")
def server(tiny_export, tmp_path_factory) -> Server:
    clean = tmp_path_factory.mktemp("hostile_host")
    store = clean / "model_store"
    store.mkdir()
    built = build_archive(tiny_export("dlrm").path, name=MODEL, backend="torchscript",
                          model_store=tmp_path_factory.mktemp("hostile_build"), config=CONFIG)
    shutil.copy(built, store)
    with running_torchserve(clean, model_store=store, models=[MODEL], timeout=240) as running:
        yield running


def worker_pid(server: Server) -> int:
    (description,) = server.management.describe(MODEL).json()
    (worker,) = description["workers"]
    return int(worker["pid"])


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for process {pid}")


def send(server: Server, body: str) -> tuple[Response, float]:
    started = time.perf_counter()
    reply = server.predict(MODEL, body, idempotent=False, timeout=60)
    return reply, time.perf_counter() - started


def check_refused(name: str, reply: Response, elapsed: float) -> None:
    assert reply.status == 400, (name, reply.status, reply.body[:300])
    payload = reply.json()
    field, problem = EXPECTED[name]
    assert payload["field"].startswith(field) and problem in payload["problem"], payload
    assert len(reply.body) < 2000  # a 1 MB name is not echoed back
    assert elapsed < SECONDS, f"{name}: {elapsed:.2f}s"


def test_hostile_bodies_fit_torchserves_request_size():
    assert all(len(body.encode()) < MAX_REQUEST_SIZE for body in HOSTILE.values())


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_request_gets_a_quick_400_from_the_same_worker(server, name, sample_records):
    assert server.predict(MODEL, sample_records(1)[0]).status == 200  # warm: the first request allocates
    pid = worker_pid(server)
    before = rss_kb(pid)
    reply, elapsed = send(server, HOSTILE[name])
    print(f"\n{name}: {len(HOSTILE[name]):,} bytes -> {reply.status} in {elapsed * 1000:.0f} ms")
    check_refused(name, reply, elapsed)
    assert worker_pid(server) == pid, "the worker was replaced"
    growth = rss_kb(pid) - before
    print(f"{name}: worker RSS {before / 1024:.0f} MB -> growth {growth / 1024:+.1f} MB")
    assert growth < RSS_GROWTH_KB, f"{name}: worker RSS grew by {growth / 1024:.0f} MB"


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_request_in_a_batch_leaves_good_requests_their_scores(server, tiny_export, name, sample_records):
    records = sample_records(6, seed=51)
    pid = worker_pid(server)
    with ThreadPoolExecutor(max_workers=len(records) + 1) as pool:
        hostile = pool.submit(send, server, HOSTILE[name])
        time.sleep(0.02)  # the large body first, so the small ones join its batch
        good = [pool.submit(send, server, json.dumps({"instances": [record]})) for record in records]
        replies = [future.result() for future in good]
        reply, elapsed = hostile.result()
    print(f"\n{name} beside {len(records)} good requests: {reply.status} in {elapsed * 1000:.0f} ms")
    check_refused(name, reply, elapsed)
    assert [good_reply.status for good_reply, _ in replies] == [200] * len(records), [r.body[:200] for r, _ in replies]
    served = [good_reply.json()["predictions"][0] for good_reply, _ in replies]
    assert served == pytest.approx(tiny_export("dlrm").eager_scores(records), abs=1e-5)
    assert worker_pid(server) == pid, "the worker was replaced"
