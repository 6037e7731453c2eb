"""Tokens that expire and workers that go away: the one retry policy every client of the bundle follows.

TorchServe 0.12 writes three keys to ``key_file.json`` in its working
directory: the inference and management tokens, which expire after
``token_expiration_min`` minutes (60 unless configured), and the API key,
which does not expire and is used only to replace them. An expired or
replaced token is answered with ``400 InvalidKeyException``. On that answer a
client re-reads the key file (another client may have replaced the token
already) and, when the file still holds the rejected token, asks the token
API on the management address for a new one::

    POST {management}/token?type=inference     Authorization: Bearer {API key}

TorchServe writes the new token to the key file (the reply body is empty) and
stops accepting the old one at once, so the refresh happens under a lock:
a thread lock inside the process and ``flock`` on the key file across
processes (Locust's ``--processes``), and it is skipped when the file already
holds a token other than the rejected one.

TorchServe also stops a worker without draining it (scale-down, a crashed
worker): a request in its batch gets ``500 Worker died.`` or, when the batch
was still being handed to the stopping worker, no answer at all (TorchServe
logs ``Unexpected job in sendError()`` and the client waits for its
timeout); a request that meets a model with no worker left gets ``503``.
Scoring is idempotent, so an inference request is sent once more after a
short pause, also when its connection was reset or it timed out. A request whose
token was refused was not executed, so any request is retried after a
refresh. Each reason is retried at most once: a second failure is the answer.

:func:`send_with_retry` holds that policy for any HTTP client: the urllib
client of :class:`loadtest.torchserve.Server` (the demo client, the tests, the
benchmarks) and Locust's client (``loadtest/locustfile.py``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

TokenApi = Literal["inference", "management"]
RetryReason = Literal["token expired", "worker died", "no worker", "connection reset", "no answer"]

RETRY_BACKOFF_S = 0.2
# How long a load-test user waits for an inference answer before it retries: TorchServe answers
# in milliseconds or never (a request dropped at a scale-down), and a ranking request under
# load takes well under a second.
INFERENCE_TIMEOUT_S = 10.0
# Errors of a connection the server closed under a request (urllib raises them;
# http.client.RemoteDisconnected is a ConnectionResetError).
CONNECTION_RESET_ERRORS: tuple[type[BaseException], ...] = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)
TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (*CONNECTION_RESET_ERRORS, TimeoutError)

Reply = TypeVar("Reply")


class KeyFileError(OSError):
    """``key_file.json`` is missing, or the token API refused its API key."""


@dataclass(frozen=True)
class Keys:
    """The contents of ``key_file.json``."""

    inference: str
    management: str
    api: str

    def token(self, api: TokenApi) -> str:
        return self.inference if api == "inference" else self.management


def read_key_file(path: Path, *, attempts: int = 5, pause_s: float = 0.05) -> Keys:
    """``key_file.json`` -> :class:`Keys`, riding out a file TorchServe is rewriting this instant."""
    for attempt in range(attempts):
        try:
            payload = json.loads(Path(path).read_text(encoding="utf-8"))
            return Keys(inference=payload["inference"]["key"], management=payload["management"]["key"], api=payload["API"]["key"])
        except (ValueError, KeyError, TypeError):
            if attempt == attempts - 1:
                raise
            time.sleep(pause_s)  # half written: TorchServe truncates, then writes
    raise AssertionError("unreachable")


def retry_reason(status: int, body: bytes | None, *, error: BaseException | None = None) -> RetryReason | None:
    """Why a reply may be retried, or None when it is the answer.

    ``error`` is what broke the exchange when there is no reply (Locust
    reports those as status 0 with an error): a reset connection, or a
    timeout waiting for the answer.
    """
    text = body or b""
    if isinstance(error, CONNECTION_RESET_ERRORS):
        return "connection reset"
    if isinstance(error, TimeoutError):
        return "no answer"
    if status == 400 and b"InvalidKeyException" in text:
        return "token expired"
    if status == 500 and b"Worker died" in text:
        return "worker died"
    if status == 503:
        # TorchServe's text for an empty or full job queue: 'Model "NAME" has no worker to serve inference request'.
        return "no worker"
    return None


class TokenStore:
    """The tokens of one TorchServe, read from its ``key_file.json`` and refreshed through its token API.

    Thread-safe (and greenlet-safe under gevent's patched ``threading``), and
    safe across processes sharing one key file. ``refreshes`` counts the token
    API calls this store made.
    """

    def __init__(self, key_file: Path, *, management_url: str, timeout_s: float = 10.0) -> None:
        self.key_file = Path(key_file)
        self.management_url = management_url.rstrip("/")
        self.timeout_s = timeout_s
        self.refreshes = 0
        self._lock = threading.Lock()
        self._keys: Keys | None = None

    def keys(self) -> Keys:
        if self._keys is None:
            try:
                self._keys = read_key_file(self.key_file)
            except FileNotFoundError:
                raise KeyFileError(f"{self.key_file}: not found (TorchServe writes it in the directory it starts in)") from None
        return self._keys

    def token(self, api: TokenApi) -> str:
        return self.keys().token(api)

    def refresh(self, api: TokenApi, *, rejected: str) -> str:
        """A token for ``api`` other than ``rejected``: from the key file if another client replaced it, else a new one."""
        with self._lock, self._file_lock():
            keys = read_key_file(self.key_file)
            if keys.token(api) == rejected:
                self._request_new_token(api, keys.api)
                keys = read_key_file(self.key_file)
            self._keys = keys
            return keys.token(api)

    def _request_new_token(self, api: TokenApi, api_key: str) -> None:
        request = urllib.request.Request(f"{self.management_url}/token?type={api}", data=b"", method="POST")
        request.add_header("Authorization", f"Bearer {api_key}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as reply:
                reply.read()
        except urllib.error.HTTPError as error:
            raise KeyFileError(f"the token API refused a new {api} token: {error.code} {error.read()[:200]!r}") from None
        self.refreshes += 1

    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        # TorchServe rewrites the key file in place, so a lock on it holds for the refresh.
        with open(self.key_file, "rb") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def send_with_retry(
    send: Callable[[str], Reply],
    judge: Callable[[Reply], RetryReason | None],
    *,
    tokens: TokenStore,
    api: TokenApi,
    idempotent: bool,
    on_retry: Callable[[Reply | None, RetryReason], None] | None = None,
    backoff_s: float = RETRY_BACKOFF_S,
    sleep: Callable[[float], None] = time.sleep,
) -> Reply:
    """``send(token)`` with this module's policy; returns the reply that is the answer.

    ``judge`` says why a reply may be retried (:func:`retry_reason` on its
    status and body). ``on_retry(reply, reason)`` is told of every reply
    that is replaced by a retry (``None`` when ``send`` raised a connection
    reset or a timeout), so that a caller can report it apart from the answers.
    A refused token is refreshed and the request sent again, whatever it
    is; a worker that went away is retried only for an ``idempotent``
    request, after ``backoff_s`` seconds. Each at most once. When no new
    token can be had (the key file is gone, the token API refuses the API
    key), :class:`KeyFileError` says why.
    """
    token = tokens.token(api)
    refreshed = resent = False
    while True:
        try:
            reply: Reply | None = send(token)
            reason = judge(reply)
        except TRANSPORT_ERRORS as error:
            if not idempotent or resent:
                raise
            reply, reason = None, retry_reason(0, None, error=error)
        if reason is None:
            return reply
        if reason == "token expired" and not refreshed:
            refreshed = True
            token = tokens.refresh(api, rejected=token)  # KeyFileError when no new token can be had
            if on_retry is not None:
                on_retry(reply, reason)
        elif reason != "token expired" and idempotent and not resent:
            resent = True
            if on_retry is not None:
                on_retry(reply, reason)
            sleep(backoff_s)
        else:
            return reply
