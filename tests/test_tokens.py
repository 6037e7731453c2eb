"""Expired tokens and dying workers: every client refreshes tokens and retries idempotent inference once.

A small fake TorchServe on 127.0.0.1 plays each answer on cue (``400
InvalidKeyException`` for an expired token, ``500 Worker died.``, ``503``, a
connection closed without a reply) and implements the token API as TorchServe
0.12 does: ``POST /token?type=...`` with the API key writes a new token to
``key_file.json`` and stops accepting the old one. The urllib client
(:class:`loadtest.torchserve.Server`) and the Locust suite run against it.
The last test runs a real TorchServe whose tokens expire after one minute,
with both clients working across the expiry.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from export.archive import ServingConfig, build_archive
from export.records import sample_records
from loadtest.resilience import (
    KeyFileError,
    TokenStore,
    read_key_file,
    retry_reason,
    send_with_retry,
)
from loadtest.torchserve import KEY_FILE, REPO_ROOT, Server, running_torchserve

LOCUST = Path(sys.executable).with_name("locust")
INVALID_KEY = {"code": 400, "type": "InvalidKeyException", "message": "Token Authorization failed. Token either incorrect, expired, or not provided correctly"}
WORKER_DIED = {"code": 500, "type": "InternalServerException", "message": "Worker died."}
NO_WORKER = {"code": 503, "type": "ServiceUnavailableException", "message": 'Model "dlrm" has no worker to serve inference request.'}


# -- a fake TorchServe ----------------------------------------------------------


class FakeTorchServe:
    """Inference, management and token API on one port; ``plan`` scripts the next inference answers.

    Each entry of ``plan`` answers one ``/predictions`` request: ``"died"``,
    ``"no worker"``, ``"reset"`` (the connection closes without a reply),
    ``"hang"`` (no reply for 2 s, then the connection closes) or
    ``"expire"`` (the inference token expires, and this request is refused
    as TorchServe refuses an expired token). Once ``plan`` is used up, or
    with ``cycle``, every answer comes from it in turn.
    """

    def __init__(self, workdir: Path, *, plan: list[str] | None = None, cycle: bool = False) -> None:
        self.workdir = workdir
        self.plan = list(plan or [])
        self.cycle = cycle
        self.served = 0
        self.token_calls: list[str] = []
        self.seen_tokens: list[str] = []
        self.lock = threading.Lock()
        self.keys = {"inference": "inference-0", "management": "management-0", "API": "api-key"}
        self.generation = 0
        self.write_key_file()

    @property
    def key_file(self) -> Path:
        return self.workdir / KEY_FILE

    def write_key_file(self) -> None:
        payload = {api: {"key": key, "expiration time": "2030-01-01T00:00:00Z"} for api, key in self.keys.items()}
        self.key_file.write_text(json.dumps(payload), encoding="utf-8")

    def new_token(self, api: str) -> None:
        self.generation += 1
        self.keys[api] = f"{api}-{self.generation}"
        self.write_key_file()

    def next_answer(self) -> str:
        with self.lock:
            index = self.served
            self.served += 1
            if self.cycle and self.plan:
                return self.plan[index % len(self.plan)]
            return self.plan[index] if index < len(self.plan) else "ok"

    def handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out in two writes

            def log_message(self, *args: object) -> None:
                pass

            def reply(self, status: int, payload: object | None) -> None:
                body = b"" if payload is None else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def token(self) -> str:
                return self.headers.get("Authorization", "").removeprefix("Bearer ")

            def handle_any(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path.startswith("/token"):
                    api = self.path.partition("type=")[2]
                    if self.token() != fake.keys["API"] or api not in ("inference", "management"):
                        return self.reply(400, INVALID_KEY)
                    with fake.lock:
                        fake.token_calls.append(api)
                        fake.new_token(api)
                    return self.reply(200, None)
                api = "inference" if self.path.startswith("/predictions") else "management"
                if self.token() != fake.keys[api]:
                    return self.reply(400, INVALID_KEY)
                if api == "management":
                    return self.reply(200, [{"modelName": "dlrm", "workers": []}])
                fake.seen_tokens.append(self.token())
                answer = fake.next_answer()
                if answer == "expire":
                    with fake.lock:
                        fake.keys["inference"] = f"expired-{fake.generation}"  # the file keeps the expired token
                    return self.reply(400, INVALID_KEY)
                if answer == "died":
                    return self.reply(500, WORKER_DIED)
                if answer == "no worker":
                    return self.reply(503, NO_WORKER)
                if answer == "reset":
                    self.close_connection = True
                    return None  # close without a reply
                if answer == "hang":  # as TorchServe does with a request dropped at a scale-down
                    time.sleep(2.0)
                    self.close_connection = True
                    return None
                payload = json.loads(body or b"{}")
                count = len(payload["instances"]) if isinstance(payload, dict) and "instances" in payload else 1
                return self.reply(200, {"predictions": [0.5] * count})

            do_GET = do_POST = do_PUT = do_DELETE = handle_any

        return Handler

    @contextlib.contextmanager
    def running(self) -> Iterator[str]:
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), self.handler())
        thread = threading.Thread(target=httpd.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{httpd.server_address[1]}"
        finally:
            httpd.shutdown()
            httpd.server_close()


@contextlib.contextmanager
def fake_server(tmp_path: Path, **options: object) -> Iterator[tuple[FakeTorchServe, Server]]:
    fake = FakeTorchServe(tmp_path, **options)
    with fake.running() as url:
        yield fake, Server(workdir=tmp_path, urls={"inference": url, "management": url, "metrics": url})


RECORDS = {"instances": [{"I1": 1}, {"I1": 2}]}


# -- the policy -----------------------------------------------------------------


def test_retry_reasons_follow_torchserve_answers():
    assert retry_reason(400, json.dumps(INVALID_KEY).encode()) == "token expired"
    assert retry_reason(500, json.dumps(WORKER_DIED).encode()) == "worker died"
    assert retry_reason(503, json.dumps(NO_WORKER).encode()) == "no worker"
    assert retry_reason(0, None, error=ConnectionResetError()) == "connection reset"
    assert retry_reason(0, None, error=TimeoutError()) == "no answer"
    # A bad request or a handler error is the answer: never retried.
    assert retry_reason(400, b'{"code": 400, "type": "BadRequest", "field": "I1"}') is None
    assert retry_reason(500, b'{"code": 500, "message": "handler failed"}') is None
    assert retry_reason(413, b"") is None and retry_reason(200, b"{}") is None


@pytest.mark.parametrize("answer", ["died", "no worker", "reset", "hang"])
def test_inference_is_retried_once_when_its_worker_goes(tmp_path, answer):
    with fake_server(tmp_path, plan=[answer]) as (fake, server):
        reply = server.predict("dlrm", RECORDS, timeout=0.5)
    assert reply.status == 200 and reply.json() == {"predictions": [0.5, 0.5]}
    reason = {"died": "worker died", "no worker": "no worker", "reset": "connection reset", "hang": "no answer"}[answer]
    assert server.retries == {reason: 1} and fake.served == 2


def test_a_second_worker_death_is_the_answer(tmp_path):
    with fake_server(tmp_path, plan=["died", "died", "hang", "hang"]) as (fake, server):
        reply = server.predict("dlrm", RECORDS)
        assert reply.status == 500 and b"Worker died" in reply.body
        assert server.retries == {"worker died": 1} and fake.served == 2
        with pytest.raises(TimeoutError):
            server.predict("dlrm", RECORDS, timeout=0.5)
    assert server.retries == {"worker died": 1, "no answer": 1} and fake.served == 4


def test_a_call_that_is_not_idempotent_is_not_sent_twice(tmp_path):
    with fake_server(tmp_path, plan=["died"]) as (fake, server):
        reply = server.call("inference", "POST", "/predictions/dlrm", body=RECORDS, idempotent=False)
    assert reply.status == 500 and fake.served == 1 and server.retries == {}


def test_an_expired_token_is_refreshed_through_the_token_api_and_the_request_sent_again(tmp_path):
    with fake_server(tmp_path, plan=["expire"]) as (fake, server):
        reply = server.predict("dlrm", RECORDS)
        assert reply.status == 200
        assert fake.token_calls == ["inference"] and server.tokens.refreshes == 1
        assert server.retries == {"token expired": 1}
        # The new token is the one in the key file, and the next call uses it without a refresh.
        assert fake.seen_tokens[-1] == read_key_file(fake.key_file).inference == "inference-1"
        assert server.predict("dlrm", RECORDS).status == 200 and fake.token_calls == ["inference"]


def test_a_token_another_client_refreshed_is_read_from_the_key_file(tmp_path):
    with fake_server(tmp_path) as (fake, server):
        assert server.predict("dlrm", RECORDS).status == 200
        fake.new_token("inference")  # another client refreshed: the server no longer takes ours
        assert server.predict("dlrm", RECORDS).status == 200
    assert fake.token_calls == [] and server.tokens.refreshes == 0 and server.retries == {"token expired": 1}


def test_a_management_token_is_refreshed_too(tmp_path):
    with fake_server(tmp_path) as (fake, server):
        fake.keys["management"] = "expired"
        reply = server.management.describe("dlrm")
    assert reply.status == 200 and fake.token_calls == ["management"]


def test_concurrent_clients_refresh_once(tmp_path):
    """Eight threads meet the expired token at once: one refresh, and every request is answered."""
    with fake_server(tmp_path) as (fake, server):
        assert server.predict("dlrm", RECORDS).status == 200
        fake.keys["inference"] = "expired"
        start = threading.Barrier(8)
        statuses: list[int] = []

        def client() -> None:
            start.wait()
            statuses.append(server.predict("dlrm", RECORDS).status)

        threads = [threading.Thread(target=client) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
    assert statuses == [200] * 8 and fake.token_calls == ["inference"]


def test_a_refused_api_key_is_an_error_that_says_so(tmp_path):
    with fake_server(tmp_path) as (fake, server):
        fake.keys["API"] = "another"
        fake.keys["inference"] = "expired"
        with pytest.raises(KeyFileError, match="token API refused a new inference token: 400"):
            server.predict("dlrm", RECORDS)
    with pytest.raises(KeyFileError, match="missing.json: not found"):
        TokenStore(tmp_path / "missing.json", management_url="http://127.0.0.1:9").token("inference")


def test_send_with_retry_reports_each_replaced_reply(tmp_path):
    with fake_server(tmp_path) as (fake, server):
        replies = iter([(400, b"InvalidKeyException"), (500, b"Worker died."), (200, b"ok")])
        reported: list[str] = []
        fake.new_token("inference")  # so the refresh below finds a new token in the file
        result = send_with_retry(
            lambda token: next(replies),
            lambda reply: retry_reason(*reply),
            tokens=TokenStore(fake.key_file, management_url=server.urls["management"]),
            api="inference",
            idempotent=True,
            on_retry=lambda reply, reason: reported.append(reason),
            sleep=lambda seconds: None,
        )
    assert result == (200, b"ok") and reported == ["token expired", "worker died"]


# -- Locust against the fake ------------------------------------------------------


def test_locust_retries_and_reports_retries_apart_from_failures(tmp_path, tiny_dlrm):
    """Every 4th request gets "Worker died"; once each the token expires, the connection closes and no answer
    comes (within --inference-timeout): no failure, retries counted by reason. One user, so that each
    retry meets the answer after the one it replaces."""
    plan = ["ok", "died", "ok", "ok", "ok", "ok", "expire", "ok", "reset", "ok", "hang", "ok"] + ["ok", "died", "ok", "ok"] * 500
    fake = FakeTorchServe(tmp_path, plan=plan)
    with fake.running() as url:
        command = [
            os.fspath(LOCUST), "-f", os.fspath(REPO_ROOT / "loadtest" / "locustfile.py"), "InferenceUser", "--headless",
            "--host", url, "--management-host", url, "--model", "dlrm",
            "--features", os.fspath(tiny_dlrm.path / "features.json"), "--key-file", os.fspath(fake.key_file),
            "--users", "1", "--spawn-rate", "1", "--run-time", "4s", "--mix", "single=1", "--think-time", "0.01",
            "--inference-timeout", "0.5",
            "--pool-size", "8", "--only-summary", "--csv", os.fspath(tmp_path / "run"), "--slo-p99-ms", "5000",
        ]  # fmt: skip
        finished = subprocess.run(command, capture_output=True, text=True, timeout=90, cwd=tmp_path, check=False)
    output = finished.stdout + finished.stderr
    assert finished.returncode == 0, output[-3000:]
    summary = json.loads((tmp_path / "run_summary.json").read_text())
    retries = summary["retries"]["by_reason"]
    assert retries["token expired"] == retries["connection reset"] == retries["no answer"] == 1, summary["retries"]
    assert retries["worker died"] >= 2, summary["retries"]
    assert summary["retries"]["total"] == sum(retries.values())
    assert summary["total"]["failures"] == 0 and summary["inference"]["failures"] == 0
    assert fake.token_calls == ["inference"]
    # Locust's statistics list the replaced replies under their own names, as successes.
    endpoints = summary["endpoints"]
    retried = endpoints["/predictions/dlrm [single] (retried: worker died)"]
    assert retried["requests"] == retries["worker died"] and retried["failures"] == 0
    # Only answers count as inference requests.
    assert summary["inference"]["requests"] == endpoints["/predictions/dlrm [single]"]["requests"]


# -- a real TorchServe whose tokens expire after one minute ------------------------


def expiration(key_file: Path) -> float:
    """Unix time at which the inference token in ``key_file`` expires."""
    stamp = json.loads(key_file.read_text())["inference"]["expiration time"]
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


@pytest.mark.slow
def test_clients_keep_working_across_token_expiry(tiny_dlrm, tmp_path):
    """``token_expiration_min=1``: the urllib client and a Locust run both outlive their first tokens.

    About 80 s: the server's start, then one minute until the tokens expire,
    then a few seconds of traffic with the new ones. The Locust run and the
    urllib client refresh concurrently, as separate processes sharing the
    key file.
    """
    store = tmp_path / "model_store"
    config = ServingConfig(batch_size=8, max_batch_delay_ms=5, max_records=100, startup_timeout_s=120)
    build_archive(tiny_dlrm.path, name="dlrm", backend="torchscript", model_store=store, config=config)
    records = {"instances": sample_records(tiny_dlrm.spec, 4, seed=1)}
    with running_torchserve(tmp_path / "server", model_store=store, models=["dlrm"], overrides={"token_expiration_min": "1"}) as server:
        key_file = server.workdir / KEY_FILE
        expires = expiration(key_file)
        assert 0 < expires - time.time() <= 60, "token_expiration_min=1 reached TorchServe"
        first = server.keys()
        command = [
            os.fspath(LOCUST), "-f", os.fspath(REPO_ROOT / "loadtest" / "locustfile.py"), "InferenceUser", "--headless",
            "--host", server.urls["inference"], "--management-host", server.urls["management"], "--model", "dlrm",
            "--features", os.fspath(tiny_dlrm.path / "features.json"), "--key-file", os.fspath(key_file),
            "--users", "1", "--spawn-rate", "1", "--run-time", f"{expires - time.time() + 8:.0f}s", "--think-time", "0.2",
            "--mix", "single=1,instances=1", "--pool-size", "8", "--only-summary", "--slo-p99-ms", "5000",
            "--csv", os.fspath(tmp_path / "locust"),
        ]  # fmt: skip
        locust = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
        try:
            statuses = []
            while time.time() < expires + 6:
                statuses.append(server.predict("dlrm", records).status)
                time.sleep(1.0)
            described = server.management.describe("dlrm").status  # the management token expired too
            output, _ = locust.communicate(timeout=90)
        finally:
            if locust.poll() is None:
                locust.kill()
                locust.wait()
        assert set(statuses) == {200} and described == 200
        second = server.keys()
        assert second["inference"] != first["inference"] and second["management"] != first["management"]
        assert server.retries.get("token expired", 0) >= 2  # an inference and a management call
        # log4j2.xml: no access log, no line per batch, and no token in any log.
        logs = {path.name: path.read_text(errors="replace") for path in server.log_dir.glob("*.log")}
        assert logs["access_log.log"] == "" and "Backend response time" not in logs["ts_log.log"]
        assert "Model server started" in (server.workdir / "torchserve.out").read_text() and "Initialize" in logs["ts_log.log"]
        tokens = {*first.values(), *second.values()}
        assert not [name for name, text in logs.items() if any(token in text for token in tokens)]
    assert locust.returncode == 0, output[-3000:]
    summary = json.loads((tmp_path / "locust_summary.json").read_text())
    assert summary["total"]["failures"] == 0, summary["total"]
    assert summary["retries"]["by_reason"].get("token expired", 0) >= 1, summary["retries"]
