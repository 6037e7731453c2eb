"""Start, query and stop a real TorchServe: used by the demo, ``make serve``, the tests and Locust.

Every server started here gets its own working directory, free ports on
127.0.0.1, its own copy of the configuration, its own pid file (TorchServe
keeps one in ``$TMPDIR``) and its own ``key_file.json``; ``running_torchserve``
always stops the whole process group it started, even when a test fails.

As a script (used by ``make serve``)::

    python -m loadtest.torchserve wait --models dlrm widedeep [--config config.properties] [--timeout 180]

waits until ``/ping`` is healthy and every worker of those models is READY.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from loadtest.resilience import (
    TokenStore,
    read_key_file,
    retry_reason,
    send_with_retry,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
METRICS_CONFIG = REPO_ROOT / "metrics.yaml"
KEY_FILE = "key_file.json"
TORCHSERVE = Path(sys.executable).with_name("torchserve")

Api = Literal["inference", "management", "metrics"]


class ServerError(RuntimeError):
    """TorchServe did not come up (or answer) in time; the message points at its log."""


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass(frozen=True)
class ManagementCall:
    """One request to TorchServe's management API: its method and its URL-encoded path and query.

    Built once here and sent by either HTTP client: :class:`Management` (the
    tests, the benchmarks) or the Locust operator, which sends through Locust's
    own client so that its calls appear in Locust's statistics. Options left
    at ``None`` are not sent, so TorchServe applies its own defaults.
    """

    method: Literal["GET", "POST", "PUT", "DELETE"]
    path: str

    @classmethod
    def list_models(cls, *, limit: int | None = None, next_page_token: int | None = None) -> ManagementCall:
        return cls("GET", _with_query("/models", limit=limit, next_page_token=next_page_token))

    @classmethod
    def describe(cls, name: str, version: str | None = None) -> ManagementCall:
        """``version="all"`` describes every version of the model."""
        return cls("GET", model_path(name, version))

    @classmethod
    def register(
        cls,
        url: str,
        *,
        model_name: str | None = None,
        initial_workers: int | None = None,
        synchronous: bool = True,
        batch_size: int | None = None,
        max_batch_delay_ms: int | None = None,
        response_timeout_s: int | None = None,
    ) -> ManagementCall:
        """``url``: an archive in the model store (``NAME.mar``) or a URL that ``allowed_urls`` admits.

        ``model_name`` must be one path segment of letters, digits, ``_``,
        ``-`` and ``.`` (not ``..``): TorchServe 0.12 registers a name with
        ``/`` or ``..`` but no REST call can describe, scale or unregister it.
        """
        if model_name is not None and not is_safe_model_name(model_name):
            raise ValueError(f"model_name {model_name!r}: use letters, digits, '_', '-' and '.' only, without '..'")
        query = _with_query(
            "/models",
            url=url,
            model_name=model_name,
            initial_workers=initial_workers,
            synchronous=synchronous,
            batch_size=batch_size,
            max_batch_delay=max_batch_delay_ms,
            response_timeout=response_timeout_s,
        )
        return cls("POST", query)

    @classmethod
    def scale(
        cls, name: str, version: str | None = None, *, min_worker: int, max_worker: int, synchronous: bool = True
    ) -> ManagementCall:
        """``0 <= min_worker <= max_worker``: TorchServe 0.12 takes ``min_worker=-1`` and leaves the model without a worker."""
        if not 0 <= min_worker <= max_worker:
            raise ValueError(f"scale {name}: expected 0 <= min_worker <= max_worker, got min_worker={min_worker} max_worker={max_worker}")
        path = model_path(name, version)
        return cls("PUT", _with_query(path, min_worker=min_worker, max_worker=max_worker, synchronous=synchronous))

    @classmethod
    def set_default(cls, name: str, version: str) -> ManagementCall:
        return cls("PUT", model_path(name, version) + "/set-default")

    @classmethod
    def unregister(cls, name: str, version: str | None = None) -> ManagementCall:
        """Without ``version``, TorchServe unregisters the default version."""
        return cls("DELETE", model_path(name, version))


def is_safe_model_name(name: str) -> bool:
    """A name every management call can address: one path segment, no ``..``."""
    return bool(_SAFE_MODEL_NAME.fullmatch(name)) and ".." not in name


_SAFE_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def model_path(name: str, version: str | None = None) -> str:
    """``/models/NAME[/VERSION]``, each part encoded as one path segment."""
    path = "/models/" + urllib.parse.quote(name, safe="")
    return path if version is None else path + "/" + urllib.parse.quote(version, safe="")


def _with_query(path: str, **options: str | int | bool | None) -> str:
    # TorchServe reads booleans as "true"/"false"; str(True) would be "True".
    sent = {key: str(value).lower() if isinstance(value, bool) else value for key, value in options.items() if value is not None}
    return f"{path}?{urllib.parse.urlencode(sent)}" if sent else path


@dataclass(frozen=True)
class Management:
    """TorchServe's management API with the management token.

    Every call returns the :class:`Response` whatever its status: the caller
    decides what a 404 or a 409 means to it.
    """

    server: Server

    def send(self, call: ManagementCall, *, timeout: float = 30.0) -> Response:
        return self.server.call("management", call.method, call.path, timeout=timeout)

    def __getattr__(self, name: str) -> Callable[..., Response]:
        """``management.scale(...)`` sends ``ManagementCall.scale(...)``: every call of
        :class:`ManagementCall` by the same name and arguments, plus ``timeout=`` seconds."""
        if name.startswith("_"):
            raise AttributeError(name)
        build = getattr(ManagementCall, name)  # AttributeError for anything it cannot build

        def send(*args: Any, timeout: float | None = None, **options: Any) -> Response:
            return self.send(build(*args, **options), timeout=timeout or _SLOW_CALLS.get(name, 30.0))

        return send


# Synchronous registering and scaling wait for workers to start (or stop).
_SLOW_CALLS = {"register": 300.0, "scale": 300.0, "unregister": 120.0}


@dataclass
class Server:
    """A running TorchServe: its addresses, its tokens, and a small HTTP client.

    Tokens come from the server's ``key_file.json`` through a
    :class:`~loadtest.resilience.TokenStore`, refreshed when TorchServe
    says they expired; inference calls are retried once when a worker dies
    under them (:func:`~loadtest.resilience.send_with_retry`).
    ``retries`` counts the replies replaced by a retry, by reason.
    """

    workdir: Path
    urls: dict[str, str]  # api -> http://127.0.0.1:PORT
    process: subprocess.Popen | None = None
    retries: dict[str, int] = field(default_factory=dict)
    _tokens: TokenStore | None = field(default=None, init=False, repr=False)

    @property
    def log_dir(self) -> Path:
        return self.workdir / "logs"

    @property
    def tokens(self) -> TokenStore:
        if self._tokens is None:
            self._tokens = TokenStore(self.workdir / KEY_FILE, management_url=self.urls["management"])
        return self._tokens

    def keys(self) -> dict[str, str]:
        """The tokens in ``key_file.json`` now, read afresh."""
        return read_keys(self.workdir / KEY_FILE)

    def call(
        self,
        api: Api,
        method: str,
        path: str,
        *,
        body: bytes | str | Mapping[str, Any] | list | None = None,
        token: str | None | Literal["auto"] = "auto",
        content_type: str = "application/json",
        timeout: float = 30.0,
        idempotent: bool = False,
    ) -> Response:
        """One HTTP call, and its retry when the reply asks for one.

        ``token="auto"`` sends this API's token and refreshes it when it
        expired; an explicit token (or ``None``, no token) is sent as given,
        without a retry. ``idempotent`` calls are sent once more when a
        worker died under them, the connection was reset or no answer came
        within ``timeout`` seconds.
        """
        if isinstance(body, (Mapping, list)):
            body = json.dumps(body)
        data = body.encode("utf-8") if isinstance(body, str) else body

        def send(bearer: str | None) -> Response:
            request = urllib.request.Request(self.urls[api] + path, data=data, method=method)
            if data is not None:
                request.add_header("Content-Type", content_type)
            if bearer is not None:
                request.add_header("Authorization", f"Bearer {bearer}")
            try:
                with urllib.request.urlopen(request, timeout=timeout) as reply:
                    return Response(reply.status, reply.read())
            except urllib.error.HTTPError as error:
                return Response(error.code, error.read())

        if api == "metrics" or token != "auto":
            return send(None if token == "auto" else token)
        return send_with_retry(
            send,
            lambda reply: retry_reason(reply.status, reply.body),
            tokens=self.tokens,
            api=api,
            idempotent=idempotent,
            on_retry=self.count_retry,
        )

    def count_retry(self, reply: Any, reason: str) -> None:
        """Counts one reply replaced by a retry in ``retries`` (also the ``on_retry`` of clients that share this server's tokens)."""
        self.retries[reason] = self.retries.get(reason, 0) + 1

    def predict(self, model: str, body: Any, **options: Any) -> Response:
        """``POST /predictions/MODEL``: scoring is idempotent, so it is retried once when a worker dies under it
        or no answer comes within ``timeout`` seconds (30 unless given)."""
        options.setdefault("idempotent", True)
        return self.call("inference", "POST", f"/predictions/{model}", body=body, **options)

    @property
    def management(self) -> Management:
        """The management API: ``server.management.scale("dlrm", min_worker=2, max_worker=2)``."""
        return Management(self)

    def wait_ready(self, models: Sequence[str], *, timeout: float = 180.0) -> None:
        wait_until_ready(self, models, timeout=timeout, process=self.process)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def read_keys(path: Path) -> dict[str, str]:
    """``key_file.json`` -> ``{"inference": KEY, "management": KEY}``."""
    keys = read_key_file(path)
    return {"inference": keys.inference, "management": keys.management}


def read_properties(path: Path) -> dict[str, str]:
    properties = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            properties[key.strip()] = value.strip()
    return properties


def write_test_config(
    path: Path,
    *,
    model_store: Path,
    load_models: Sequence[str] = (),
    base: Path = REPO_ROOT / "config.properties",
    overrides: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The project's ``config.properties`` with free ports, absolute paths and its own store.

    Every other setting (token auth, allowed_urls, queues) stays as shipped,
    so the tests exercise the real configuration.
    """
    properties = read_properties(base)
    properties.update(
        inference_address=f"http://127.0.0.1:{free_port()}",
        management_address=f"http://127.0.0.1:{free_port()}",
        metrics_address=f"http://127.0.0.1:{free_port()}",
        # gRPC cannot be switched off in 0.12; its fixed default ports would
        # collide with any other TorchServe on the machine.
        grpc_inference_port=str(free_port()),
        grpc_management_port=str(free_port()),
        model_store=os.fspath(model_store),
        load_models=",".join(load_models) if load_models else "",
        metrics_config=os.fspath(METRICS_CONFIG),
    )
    if "vmargs" in properties:
        properties["vmargs"] = _absolute_log_config(properties["vmargs"], base.parent)
    properties.update(overrides or {})
    if not properties["load_models"]:
        del properties["load_models"]
    path.write_text("".join(f"{key}={value}\n" for key, value in properties.items()), encoding="utf-8")
    return properties


def _absolute_log_config(vmargs: str, root: Path) -> str:
    """``-Dlog4j.configurationFile=log4j2.xml`` resolved against ``root``: the server runs in another directory."""
    option = "-Dlog4j.configurationFile="
    words = [
        option + os.fspath(root / word[len(option) :]) if word.startswith(option) and not word.startswith(option + "/") else word
        for word in vmargs.split()
    ]
    return " ".join(words)


@contextlib.contextmanager
def running_torchserve(
    workdir: Path,
    *,
    model_store: Path,
    models: Sequence[str] = (),
    overrides: Mapping[str, str] | None = None,
    timeout: float = 180.0,
) -> Iterator[Server]:
    """Start TorchServe in ``workdir`` with ``models`` (``NAME`` -> ``NAME.mar``) and stop it after.

    The server runs with ``workdir`` as its working directory and without
    ``PYTHONPATH``, so workers can import only what the archives carry.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    # A key file left by an earlier server here would hand out its dead tokens until this one writes its own.
    (workdir / KEY_FILE).unlink(missing_ok=True)
    config = workdir / "config.properties"
    properties = write_test_config(
        config, model_store=model_store, load_models=[f"{name}.mar" for name in models], overrides=overrides
    )
    server = Server(
        workdir=workdir,
        urls={api: properties[f"{api}_address"] for api in ("inference", "management", "metrics")},
    )
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    environment.update(TMPDIR=os.fspath(workdir), LOG_LOCATION=os.fspath(server.log_dir), METRICS_LOCATION=os.fspath(server.log_dir))
    command = [os.fspath(TORCHSERVE), "--start", "--foreground", "--ncs", "--ts-config", os.fspath(config), "--model-store", os.fspath(model_store)]
    with open(workdir / "torchserve.out", "wb") as output:
        # A session of its own: stopping signals the launcher, the JVM and every worker.
        server.process = subprocess.Popen(
            command, cwd=workdir, env=environment, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_until_ready(server, models, timeout=timeout, process=server.process)
        yield server
    finally:
        stop(server.process)


def stop(process: subprocess.Popen, *, grace: float = 20.0) -> None:
    """SIGTERM the process group started for ``process``, SIGKILL it after ``grace`` seconds."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    # Workers can outlive the launcher for a moment; the group is ours alone.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=5)


def wait_until_ready(
    server: Server, models: Sequence[str], *, timeout: float, process: subprocess.Popen | None = None
) -> None:
    """Poll ``/ping`` and each model's workers until all are READY, or raise ServerError."""
    deadline = time.monotonic() + timeout
    pending = list(models)
    healthy = False
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise ServerError(f"TorchServe exited with status {process.returncode}; see {server.workdir}/torchserve.out")
        try:
            if not healthy:
                keys_ready = (server.workdir / KEY_FILE).is_file()
                healthy = keys_ready and server.call("inference", "GET", "/ping", timeout=5).status == 200
            while healthy and pending:
                reply = server.management.describe(pending[0], timeout=5)
                if reply.status != 200 or not _all_workers_ready(reply.json()):
                    break
                pending.pop(0)
            if healthy and not pending:
                return
        except (OSError, ValueError, KeyError):
            pass  # not listening yet, or key_file.json half written
        time.sleep(0.5)
    raise ServerError(
        f"TorchServe not ready after {timeout:.0f}s (healthy={healthy}, models not ready: {pending}); "
        f"see {server.log_dir}/ts_log.log and model_log.log"
    )


def scaled_to(description: Mapping[str, Any], workers: int) -> bool:
    """Whether one model version's description (``GET /models/NAME``) shows ``workers`` as its minimum, all READY."""
    present = description.get("workers", [])
    return description.get("minWorkers") == workers and len(present) == workers and all(w.get("status") == "READY" for w in present)


def _all_workers_ready(description: Any) -> bool:
    versions = description if isinstance(description, list) else [description]
    workers = [worker for version in versions for worker in version.get("workers", [])]
    return bool(workers) and all(worker.get("status") == "READY" for worker in workers)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.torchserve")
    commands = parser.add_subparsers(dest="command", required=True)
    wait = commands.add_parser("wait", help="wait until TorchServe (started from this directory) is ready")
    wait.add_argument("--config", type=Path, default=Path("config.properties"))
    wait.add_argument("--models", nargs="*", default=[])
    wait.add_argument("--timeout", type=float, default=180.0)
    args = parser.parse_args(argv)
    properties = read_properties(args.config)
    server = Server(
        workdir=Path.cwd(),
        urls={api: properties.get(f"{api}_address", "") for api in ("inference", "management", "metrics")},
    )
    started = time.monotonic()
    try:
        wait_until_ready(server, args.models, timeout=args.timeout)
    except ServerError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"TorchServe ready in {time.monotonic() - started:.1f}s: {server.urls['inference']} ({', '.join(args.models) or 'no models'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
