"""A Python client for the recommender handlers: score records, rank candidates.

::

    from loadtest.scoring_client import Client

    client = Client("http://127.0.0.1:8080", "dlrm", key_file="key_file.json",
                    management_url="http://127.0.0.1:8081")
    probabilities = client.score(dataframe)            # numpy float32[N]
    ranking = client.rank({"I1": 3}, candidates, top_k=10)
    ranking.indices, ranking.scores                    # best first

``score`` takes a pandas DataFrame, a pyarrow Table or a list of record
dicts. Requests of at least ``arrow_from_rows`` rows travel as an Arrow IPC
stream (``application/vnd.apache.arrow.stream``, answered in Arrow too),
smaller ones as JSON (a few records cost less to write as JSON than as an
Arrow stream with its schema); requests above ``max_records`` rows are
split, and their answers joined. A refused request raises
:class:`ScoringError` with the server's field and problem.

Tokens follow the bundle's policy (:mod:`loadtest.resilience`): read from
TorchServe's ``key_file.json`` and refreshed through the token API when they
expire (``key_file`` + ``management_url``, or a shared ``tokens`` store, as
:attr:`loadtest.torchserve.Server.tokens`); a request whose worker died
under it is sent once more. A fixed ``token`` is sent as given, never
refreshed.

The request and response bodies are built and read by pure functions
(:func:`score_request`, :func:`rank_request`, :func:`read_scores`,
:func:`read_ranking`), so another HTTP client (Locust's) sends exactly what
this one sends.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from handlers.arrow_request import read_stream, write_stream
from handlers.request import ARROW_STREAM, JSON_MEDIA_TYPE, media_type
from loadtest.resilience import TokenStore, retry_reason, send_with_retry

if TYPE_CHECKING:  # pandas is needed only by callers that pass a DataFrame
    import pandas

Records = Union["pandas.DataFrame", pa.Table, Sequence[Mapping[str, Any]]]

DEFAULT_ARROW_FROM_ROWS = 256
DEFAULT_MAX_RECORDS = 1000  # the handlers' default handler.max_records


class ScoringError(RuntimeError):
    """The server refused a request: ``status``, and the ``field`` and ``problem`` its JSON body names."""

    def __init__(self, status: int, body: bytes):
        self.status = status
        try:
            payload = json.loads(body)
        except ValueError:
            payload = {}
        payload = payload if isinstance(payload, dict) else {}
        self.field = payload.get("field")
        self.problem = payload.get("problem") or payload.get("message") or body[:200].decode("utf-8", "replace")
        super().__init__(f"{status}: {self.field}: {self.problem}" if self.field else f"{status}: {self.problem}")


@dataclass(frozen=True)
class HttpRequest:
    """A request body and the headers it is sent with."""

    body: bytes
    headers: dict[str, str]


@dataclass(frozen=True)
class Ranking:
    """A ranking answer, best first: candidate ``indices`` (int64[K]) and their ``scores`` (float32[K])."""

    indices: np.ndarray
    scores: np.ndarray


def as_table(records: Records) -> pa.Table:
    """Records as an Arrow table, one column per feature: missing values null, categoricals plain strings.

    A DataFrame loses its index (it is not a feature) and its NaNs become
    nulls (missing); dictionary-encoded (categorical) columns are decoded,
    since the server takes plain columns only.
    """
    if isinstance(records, pa.Table):
        table = records
    elif type(records).__module__.startswith("pandas"):
        table = pa.Table.from_pandas(records, preserve_index=False)
    else:
        records = list(records)
        names = dict.fromkeys(chain.from_iterable(records))  # every record's keys (from_pylist reads the first's)
        table = pa.table({name: [record.get(name) for record in records] for name in names})
    columns = [pc.dictionary_decode(column) if pa.types.is_dictionary(column.type) else column for column in table.columns]
    return pa.table(columns, names=table.column_names)


def score_request(records: Records, *, arrow_from_rows: int = DEFAULT_ARROW_FROM_ROWS) -> HttpRequest:
    """The body and headers of one scoring request: Arrow from ``arrow_from_rows`` rows, JSON below."""
    if _rows(records) >= arrow_from_rows:
        table = _arrow_table(records)
        if table is not None:
            return HttpRequest(write_stream(table.replace_schema_metadata(None)), _headers(ARROW_STREAM))
    return HttpRequest(_json({"instances": _record_list(records)}), _headers(JSON_MEDIA_TYPE))


def rank_request(
    context: Mapping[str, Any] | None,
    candidates: Records,
    top_k: int | None = None,
    *,
    arrow_from_rows: int = DEFAULT_ARROW_FROM_ROWS,
) -> HttpRequest:
    """The body and headers of one ranking request: Arrow from ``arrow_from_rows`` candidates, JSON below."""
    if _rows(candidates) >= arrow_from_rows:
        table = _arrow_table(candidates)
        if table is not None:
            metadata = {"request": "rank"}
            if top_k is not None:
                metadata["top_k"] = str(top_k)
            if context:
                metadata["context"] = json.dumps(context, allow_nan=False)
            return HttpRequest(write_stream(table.replace_schema_metadata(metadata)), _headers(ARROW_STREAM))
    body: dict[str, Any] = {"candidates": _record_list(candidates)}
    if context:
        body["context"] = dict(context)
    if top_k is not None:
        body["top_k"] = top_k
    return HttpRequest(_json(body), _headers(JSON_MEDIA_TYPE))


def read_scores(status: int, content_type: str | None, body: bytes) -> np.ndarray:
    """A scoring answer -> float32[N]; :class:`ScoringError` for a refusal."""
    if status != 200:
        raise ScoringError(status, body)
    if media_type(content_type) == ARROW_STREAM:
        return read_stream(body).column("probability").to_numpy().astype(np.float32, copy=False)
    return np.asarray(json.loads(body)["predictions"], np.float32)


def read_ranking(status: int, content_type: str | None, body: bytes) -> Ranking:
    """A ranking answer -> :class:`Ranking`; :class:`ScoringError` for a refusal."""
    if status != 200:
        raise ScoringError(status, body)
    if media_type(content_type) == ARROW_STREAM:
        table = read_stream(body)
        return Ranking(table.column("index").to_numpy().astype(np.int64), table.column("score").to_numpy().astype(np.float32))
    ranking = json.loads(body)["ranking"]
    return Ranking(
        np.array([item["index"] for item in ranking], np.int64), np.array([item["score"] for item in ranking], np.float32)
    )


class Client:
    """Scores records and ranks candidates with one model of one TorchServe (see the module docstring)."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        key_file: str | Path | None = None,
        management_url: str | None = None,
        token: str | None = None,
        tokens: TokenStore | None = None,
        arrow_from_rows: int = DEFAULT_ARROW_FROM_ROWS,
        max_records: int = DEFAULT_MAX_RECORDS,
        timeout_s: float = 30.0,
        on_retry: Callable[[Any, str], None] | None = None,
    ) -> None:
        if sum(option is not None for option in (key_file, token, tokens)) > 1:
            raise ValueError("pass one of key_file, token or tokens")
        if key_file is not None:
            if management_url is None:
                raise ValueError("key_file needs management_url: expired tokens are renewed through its token API")
            tokens = TokenStore(Path(key_file), management_url=management_url)
        if arrow_from_rows < 1 or max_records < 1:
            raise ValueError(f"arrow_from_rows and max_records must be >= 1, got {arrow_from_rows} and {max_records}")
        self.url = f"{base_url.rstrip('/')}/predictions/{model}"
        self.tokens = tokens
        self.token = token
        self.arrow_from_rows = arrow_from_rows
        self.max_records = max_records
        self.timeout_s = timeout_s
        self.on_retry = on_retry  # told (reply, reason) of every reply replaced by a retry

    @classmethod
    def for_server(cls, server: Any, model: str, **options: Any) -> Client:
        """A client of a :class:`loadtest.torchserve.Server`, sharing its token store and its retry counts."""
        options.setdefault("on_retry", server.count_retry)
        return cls(server.urls["inference"], model, tokens=server.tokens, **options)

    def score(self, records: Records) -> np.ndarray:
        """Each record's probability, in order: float32[N] (split into requests of ``max_records`` rows)."""
        total = _rows(records)
        if total == 0:
            raise ValueError("no records to score")
        parts = []
        for start in range(0, total, self.max_records):
            request = score_request(_slice(records, start, self.max_records), arrow_from_rows=self.arrow_from_rows)
            parts.append(read_scores(*self.send(request)))
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def rank(self, context: Mapping[str, Any] | None, candidates: Records, top_k: int | None = None) -> Ranking:
        """The ``top_k`` best candidates (all when None), best first; ``context`` fills the features they lack."""
        request = rank_request(context, candidates, top_k, arrow_from_rows=self.arrow_from_rows)
        return read_ranking(*self.send(request))

    def send(self, request: HttpRequest) -> tuple[int, str | None, bytes]:
        """POST ``request`` with this client's token policy -> ``(status, Content-Type, body)``."""

        def post(bearer: str | None) -> tuple[int, str | None, bytes]:
            http = urllib.request.Request(self.url, data=request.body, method="POST", headers=request.headers)
            if bearer is not None:
                http.add_header("Authorization", f"Bearer {bearer}")
            try:
                with urllib.request.urlopen(http, timeout=self.timeout_s) as reply:
                    return reply.status, reply.headers.get("Content-Type"), reply.read()
            except urllib.error.HTTPError as error:
                return error.code, error.headers.get("Content-Type"), error.read()

        if self.tokens is None:
            return post(self.token)
        return send_with_retry(
            post,
            lambda reply: retry_reason(reply[0], reply[2]),
            tokens=self.tokens,
            api="inference",
            idempotent=True,
            on_retry=self.on_retry,
        )


def _headers(content_type: str) -> dict[str, str]:
    return {"Content-Type": content_type, "Accept": content_type}


def _json(body: Any) -> bytes:
    return json.dumps(body, separators=(",", ":"), allow_nan=False).encode("utf-8")


def _rows(records: Records) -> int:
    return records.num_rows if isinstance(records, pa.Table) else len(records)


def _slice(records: Records, start: int, count: int) -> Records:
    if isinstance(records, pa.Table):
        return records.slice(start, count)
    if type(records).__module__.startswith("pandas"):
        return records.iloc[start : start + count]
    return records[start : start + count]


def _arrow_table(records: Records) -> pa.Table | None:
    """``records`` as a table; None when their values do not form Arrow columns (mixed types: JSON then)."""
    try:
        return as_table(records)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return None


def _record_list(records: Records) -> list[dict[str, Any]]:
    """``records`` as JSON records: a table's or DataFrame's nulls (and NaNs) left out, so they read as missing."""
    if isinstance(records, pa.Table):
        rows = records.to_pylist()
    elif type(records).__module__.startswith("pandas"):  # here when its columns do not convert to Arrow
        rows = records.astype(object).where(records.notna(), None).to_dict("records")
    else:
        return [dict(record) for record in records]
    return [{name: value for name, value in row.items() if value is not None} for row in rows]
