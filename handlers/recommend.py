"""Recommend from a catalogue in one call: user tower -> ANN index -> catalogue -> ranker, as pure functions.

A recommend archive (``python -m export.archive RANKER_EXPORT --retrieval RETRIEVAL_EXPORT``) holds a
ranker export (``features.json`` and one artifact) beside a retrieval export (``user_tower.onnx``,
``user_features.json``, ``index.faiss``, ``item_ids.npy``, ``retrieval_report.json``,
``catalogue.parquet``). :class:`Recommender` loads them with numpy, onnxruntime (or torch, for a
TorchScript ranker), faiss and pyarrow, never ``training/``, and answers:

* ``{"user": {...}, "history": [ids], "k": 10, "exclude": [ids], "candidates": 200}``
  -> ``{"items": [{"id": 50, "score": 0.91, "retrieval_score": 0.42}, ...]}``, best first: the user
  tower embeds the user side (user features and history), the index proposes the ``candidates`` best
  items that are neither in ``history`` nor in ``exclude``, the ranker scores each of them (the user
  side plus the item's catalogue features, named as the ranker's FeatureSpec names them), and the
  ``k`` best by the ranker's score come back (``k`` in ``[1, candidates]``, default ``min(10, candidates)``;
  ``candidates`` in ``[1, max_candidates]``, default ``default_candidates``). ``retrieval_score`` is the
  index's inner product of the user's and the item's embeddings; ``score`` the ranker's probability.
* ``{"user": {...}, "history": [ids], "items": [ids], "top_k": 10}`` -> ``{"items": [{"id", "score"}]}``:
  the ranker alone, over catalogue items the client chose.
* Either request in KServe v2 form (``POST /v2/models/{name}/infer``, as KServe sends it): ``{"id": ...,
  "inputs": [...]}``, one tensor of shape ``[1]`` per user feature and ``history``, ``exclude``, ``items``
  (``INT64 [N]``), ``k``, ``candidates``, ``top_k`` (``INT64 [1]``) -> ``{"id", "model_name",
  "model_version", "outputs": [items INT64 [k], scores FP32 [k], retrieval_scores FP32 [k]]}``
  (``retrieval_scores`` where the index proposed the items); errors name the tensor (``inputs[2].data``).

``user`` holds user-side features (any feature of the user tower's or the ranker's FeatureSpec that
is not an item feature); ``history`` the items the user interacted with, most recent first, as
integers or strings of digits: it is the ``history`` feature of both models where their specs have
one, and a recommend request never gets those items back (a ranking request ranks the items it names,
whatever they are). Every bad input is a :class:`~handlers.request.RequestError`
(HTTP 400) naming the field; every request's cost is bounded by :class:`~handlers.request.Limits`
(``max_candidates``: candidates or items the ranker scores) and :class:`RecommendLimits`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from featurespec import FEATURES_FILE, FeatureError, FeatureSpec, json_type, short_text
from handlers.backends import Backend, load_backend, make_session
from handlers.request import (
    V2_INTEGER_DATATYPES,
    HandlerSettings,
    Limits,
    RequestError,
    _key_error,
    datatype_problem,
    decode_body,
    parse_v2_tensor,
    top_indices,
    v2_inputs,
    v2_output,
    v2_request_id,
    v2_response,
)
from handlers.retrieval_index import (
    CATALOGUE_FILE,
    EMBEDDING_OUTPUT,
    INDEX_FILE,
    ITEM_ID_COLUMN,
    ITEM_IDS_FILE,
    REPORT_FILE,
    USER_FEATURES_FILE,
    USER_TOWER_FILE,
    RetrievalIndex,
    Retrieved,
)

RETRIEVAL_FILES = (USER_TOWER_FILE, USER_FEATURES_FILE, INDEX_FILE, ITEM_IDS_FILE, REPORT_FILE, CATALOGUE_FILE)
HISTORY_FEATURE = "history"

logger = logging.getLogger(__name__)

_RECOMMEND_KEYS = frozenset({"user", "history", "k", "exclude", "candidates"})
_RANK_ITEMS_KEYS = frozenset({"user", "history", "items", "top_k"})
_MAX_ID_DIGITS = 19  # a string id of more digits could overflow int64
_V2_ID_INPUTS = frozenset({"history", "exclude", "items"})  # KServe v2 inputs holding item ids, shape [N]
_V2_COUNT_INPUTS = frozenset({"k", "candidates", "top_k"})  # KServe v2 inputs holding one integer, shape [1]

Embedder = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""``(dense float32[B, Nu], sparse int64[B, Su]) -> float32[B, E]``: the user tower."""


@dataclass(frozen=True)
class RecommendLimits(HandlerSettings):
    """The recommend request's own limits, read from the ``handler:`` section of ``model-config.yaml``
    beside :class:`~handlers.request.Limits` (whose ``max_candidates`` bounds ``candidates`` and ``items``).

    * ``default_candidates``: items retrieved for ranking when a request does not say;
    * ``max_exclude``: ids in ``exclude``;
    * ``max_history``: ids in ``history``.
    """

    default_candidates: int = 200
    max_exclude: int = 1000
    max_history: int = 1000


@dataclass(frozen=True)
class KServeV2Origin:
    """Where a request sent in KServe v2 form came from: its ``id`` and the input tensor behind each field
    of the plain form (``"k"``, ``"history"``, ``"user.age"`` -> position in ``inputs``)."""

    request_id: str | None
    positions: Mapping[str, int]

    def error(self, error: RequestError, *, about_name: bool = False) -> RequestError:
        """``error`` (naming a plain-form field) naming the input tensor instead: ``history[3]`` ->
        ``inputs[1].data[3]``; ``inputs[1].name`` when ``about_name`` (the input should not be there)."""
        head, bracket, rest = error.field.partition("[")
        position = self.positions.get(head)
        if position is None:  # a field of the whole request ("body")
            return error
        where = f"inputs[{position}].name" if about_name else f"inputs[{position}].data{bracket}{rest}"
        return RequestError(where, error.problem)

    def response(self, answer: Mapping[str, Any], *, retrieved: bool, model_name: str,
                 model_version: str) -> dict[str, Any]:
        """A :func:`rank_answer` as a KServe v2 response: ``items``, ``scores`` and (where the index proposed
        the items) ``retrieval_scores`` outputs, best first."""
        items = answer["items"]
        outputs = [v2_output("items", "INT64", [item["id"] for item in items]),
                   v2_output("scores", "FP32", [item["score"] for item in items])]
        if retrieved:
            outputs.append(v2_output("retrieval_scores", "FP32", [item["retrieval_score"] for item in items]))
        return v2_response(outputs, request_id=self.request_id, model_name=model_name, model_version=model_version)


@dataclass(frozen=True)
class RecommendRequest:
    """One request, validated as far as it can be without encoding: ``items`` set means "rank these"."""

    user: Mapping[str, Any]
    history: np.ndarray  # int64[H], most recent first
    exclude: np.ndarray  # int64[E]
    k: int
    candidates: int  # items retrieved (0 when ranking given items)
    items: np.ndarray | None = None  # int64[N] catalogue ids to rank
    kservev2: KServeV2Origin | None = field(default=None, compare=False)  # sent in KServe v2 form: answered in it

    def error(self, error: RequestError) -> RequestError:
        """A problem found after parsing (encoding, an unknown item), named as the client named the field."""
        return self.kservev2.error(error) if self.kservev2 is not None else error


@dataclass(frozen=True)
class UserFeatures:
    """Which request features feed which model: the names a ``user`` object may carry, and the item features."""

    user: frozenset[str]
    item: frozenset[str]

    @classmethod
    def of(cls, user_spec: FeatureSpec, ranker_spec: FeatureSpec, item_columns: Sequence[str]) -> UserFeatures:
        item = frozenset(ranker_spec.feature_names) & frozenset(item_columns)
        user = (frozenset(user_spec.feature_names) | frozenset(ranker_spec.feature_names)) - item - {HISTORY_FEATURE}
        return cls(user=user, item=item)


# --------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------


def parse_recommend_request(
    body: Any, *, features: UserFeatures, limits: Limits, recommend_limits: RecommendLimits
) -> RecommendRequest:
    """A decoded JSON body -> :class:`RecommendRequest`, or a :class:`RequestError` naming the field."""
    if not isinstance(body, Mapping):
        raise RequestError("body", f"expected a JSON object, got {json_type(body)}")
    ranking_items = "items" in body
    allowed = _RANK_ITEMS_KEYS if ranking_items else _RECOMMEND_KEYS
    extra = sorted(set(body) - allowed)
    if extra:
        expected = ", ".join(sorted(allowed))
        raise _key_error(extra[0], f"unexpected key in a {'ranking' if ranking_items else 'recommend'} request "
                         f"(expected {expected})", limits)
    user = body.get("user", {})
    if not isinstance(user, Mapping):
        raise RequestError("user", f"expected a JSON object of user features, got {json_type(user)}")
    for name in user:
        if name not in features.user:
            if name in features.item:
                problem = "an item feature: the catalogue supplies it for each item"
            elif name == HISTORY_FEATURE:
                problem = "send the history as the request's top-level 'history' list"
            else:
                problem = "unknown user feature"
            raise _key_error(name, problem, limits, where="user.")
    history = parse_item_ids(body.get("history", []), "history", limit=recommend_limits.max_history)
    if ranking_items:
        items = parse_item_ids(body["items"], "items", limit=limits.max_candidates)
        if not len(items):
            raise RequestError("items", "empty request: no items to rank")
        top_k = parse_count(body.get("top_k", len(items)), "top_k", upper=None)
        return RecommendRequest(user, history, np.zeros(0, np.int64), min(top_k, len(items)), 0, items)
    exclude = parse_item_ids(body.get("exclude", []), "exclude", limit=recommend_limits.max_exclude)
    default_candidates = min(recommend_limits.default_candidates, limits.max_candidates)
    candidates = parse_count(body.get("candidates", default_candidates), "candidates", upper=limits.max_candidates)
    k = parse_count(body.get("k", min(10, candidates)), "k", upper=candidates, upper_name="candidates")
    return RecommendRequest(user, history, exclude, k, candidates)


def parse_recommend_v2(
    body: Mapping[str, Any],
    *,
    features: UserFeatures,
    specs: Sequence[FeatureSpec],
    limits: Limits,
    recommend_limits: RecommendLimits,
) -> RecommendRequest:
    """A KServe v2 body -> the :class:`RecommendRequest` of the plain form it stands for, or a
    :class:`RequestError` naming the input tensor (``inputs[2].data``).

    One tensor of shape ``[1]`` per user feature (named as ``user`` names it, of a datatype that fits the
    feature's kind in ``specs``); ``history``, ``exclude``, ``items`` of shape ``[N]`` and ``k``,
    ``candidates``, ``top_k`` of shape ``[1]``, of integer datatypes. The plain form's rules all hold:
    the request is checked by :func:`parse_recommend_request`.
    """
    plain: dict[str, Any] = {}
    user: dict[str, Any] = {}
    positions: dict[str, int] = {}
    seen: set[str] = set()
    for position, tensor in enumerate(v2_inputs(body, limits)):
        name, datatype, data = parse_v2_tensor(tensor, position, seen=seen, limits=limits)
        seen.add(name)
        where = f"inputs[{position}]"
        if name in _V2_ID_INPUTS or name in _V2_COUNT_INPUTS:
            if datatype not in V2_INTEGER_DATATYPES:
                raise RequestError(f"{where}.datatype", f"{datatype} does not fit {name!r}: expected INT64 "
                                   "(or another integer datatype)")
            positions[name] = position
            plain[name] = data if name in _V2_ID_INPUTS else _one_value(data, where)
        else:
            problem = next(filter(None, (datatype_problem(spec, name, datatype) for spec in specs)), None)
            if problem:
                raise RequestError(f"{where}.datatype", problem)
            positions[f"user.{short_text(name)}"] = position  # as parse_recommend_request names it
            user[name] = _one_value(data, where)
    if user:
        plain["user"] = user
    origin = KServeV2Origin(v2_request_id(body, limits), positions)
    try:
        request = parse_recommend_request(plain, features=features, limits=limits, recommend_limits=recommend_limits)
    except RequestError as error:
        # At this stage a user feature's error is about its name (its value is checked when encoded), as is
        # an input the request's form does not take (``k`` beside ``items``).
        unexpected = set(plain) - (_RANK_ITEMS_KEYS if "items" in plain else _RECOMMEND_KEYS)
        raise origin.error(error, about_name=error.field.startswith("user.") or error.field in unexpected) from None
    return replace(request, kservev2=origin)


def _one_value(data: list[Any], where: str) -> Any:
    if len(data) != 1:
        raise RequestError(f"{where}.shape", f"expected [1] (one value), got [{len(data)}]")
    return data[0]


def parse_count(value: Any, field_name: str, *, upper: int | None, upper_name: str | None = None) -> int:
    """A positive JSON integer at most ``upper`` (named ``upper_name`` in the message, where it is another field)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(field_name, f"expected a positive integer, got {json_type(value)}")
    if value < 1 or (upper is not None and value > upper):
        bound = f"{upper_name} = {upper}" if upper_name else str(upper)
        range_text = f"in [1, {bound}]" if upper is not None else ">= 1"
        raise RequestError(field_name, f"must be {range_text}, got {short_text(str(value))}")
    return value


def parse_item_ids(value: Any, field_name: str, *, limit: int) -> np.ndarray:
    """A JSON array of item ids (integers, or strings of decimal digits) -> ``int64[N]``, at most ``limit``."""
    if not isinstance(value, list):
        raise RequestError(field_name, f"expected an array of item ids, got {json_type(value)}")
    if len(value) > limit:  # before any id is looked at: the check costs nothing
        raise RequestError(field_name, f"{len(value)} ids exceed the limit of {limit} per request")
    if set(map(type, value)) <= {int}:  # the usual case, converted in one call
        try:
            return np.array(value, np.int64)
        except OverflowError:
            pass  # the loop below names the id
    ids = np.empty(len(value), np.int64)
    for position, item in enumerate(value):
        if type(item) is str and 0 < len(item) <= _MAX_ID_DIGITS and item.isascii() and item.isdigit():
            ids[position] = int(item)
        elif type(item) is int and -(2**63) <= item < 2**63:
            ids[position] = item
        else:
            problem = f"expected an item id (an integer or a string of digits), got {json_type(item)}"
            if type(item) in (int, str):
                problem = f"not an item id: {short_text(str(item))!r}"
            raise RequestError(f"{field_name}[{position}]", problem)
    return ids


def user_record(request: RecommendRequest, spec: FeatureSpec) -> dict[str, Any]:
    """The request's user side as one record of ``spec``'s features: the user features it knows and the history."""
    names = spec.feature_names
    record = {name: value for name, value in request.user.items() if name in names}
    if HISTORY_FEATURE in names and len(request.history):
        record[HISTORY_FEATURE] = [str(item) for item in request.history.tolist()]  # the ids as training wrote them
    return record


def encode_user_sides(
    spec: FeatureSpec, requests: Sequence[RecommendRequest], *, limits: Limits
) -> list[tuple[np.ndarray, np.ndarray] | RequestError]:
    """Each request's user side encoded by ``spec`` as one row ``(float32[1, D], int64[1, S])``, or its 400.

    All requests go through one ``encode_records`` call (its cost is mostly per call); only when it
    finds a problem are they encoded one by one, so the bad one alone gets the error.
    """
    if not requests:
        return []
    records = [user_record(request, spec) for request in requests]
    try:
        dense, sparse = spec.encode_records(records, text_limits=limits.text_limits((1,) * len(records)))
        return [(dense[row : row + 1], sparse[row : row + 1]) for row in range(len(records))]
    except FeatureError:
        outcomes: list[tuple[np.ndarray, np.ndarray] | RequestError] = []
        for record in records:
            try:
                outcomes.append(spec.encode_records([record], text_limits=limits.text_limits((1,))))
            except FeatureError as error:
                outcomes.append(user_feature_error(error))
        return outcomes


def user_feature_error(error: FeatureError) -> RequestError:
    """A FeatureSpec error in a request's user side, named as the request names the field."""
    name = str(error.field)
    return RequestError(name if name == HISTORY_FEATURE else f"user.{short_text(name)}", error.problem)


# --------------------------------------------------------------------------
# The catalogue and the ranker's rows
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Catalogue:
    """Every item's id and its ranker-encoded item features: the item side of a ranker row.

    ``item_dense``/``item_sparse`` hold only the columns the item features decide (``dense_columns``,
    ``sparse_columns`` of the ranker's tensors); a candidate's row is its user's row with these
    columns replaced, which is exact whatever a missing feature encodes to.
    """

    ids: np.ndarray  # int64[I], ascending
    item_dense: np.ndarray  # float32[I, len(dense_columns)]
    item_sparse: np.ndarray  # int64[I, len(sparse_columns)]
    dense_columns: np.ndarray  # int64
    sparse_columns: np.ndarray  # int64

    @classmethod
    def encode(cls, ids: np.ndarray, columns: Mapping[str, Any], spec: FeatureSpec) -> Catalogue:
        """The catalogue's raw item columns (named as ``spec`` names them; others ignored), encoded by ``spec``."""
        names = [name for name in spec.feature_names if name in columns]
        if not names:
            raise ValueError(f"the ranker's FeatureSpec names none of the catalogue's columns ({sorted(columns)})")
        order = np.argsort(ids, kind="stable")
        dense, sparse = spec.encode_columns({name: columns[name] for name in names}, len(ids))
        dense_columns = np.array(sorted({c for name in names for c in spec.columns_of(name)[0]}), np.int64)
        sparse_columns = np.array(sorted({c for name in names for c in spec.columns_of(name)[1]}), np.int64)
        return cls(np.asarray(ids, np.int64)[order], dense[order][:, dense_columns], sparse[order][:, sparse_columns],
                   dense_columns, sparse_columns)

    def rows_of(self, ids: np.ndarray) -> np.ndarray:
        """Catalogue rows of ``ids``; -1 for an id the catalogue lacks."""
        positions = np.minimum(np.searchsorted(self.ids, ids), len(self.ids) - 1)
        return np.where(self.ids[positions] == ids, positions, -1)

    def ranker_rows(
        self, user_dense: np.ndarray, user_sparse: np.ndarray, rows: Sequence[np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ranker's input for every request's items: request ``r``'s user row (``[R, D]``, ``[R, S]``)
        repeated once per catalogue row in ``rows[r]``, with those items' features: ``(float32[N, D], int64[N, S])``."""
        counts = np.array([len(item_rows) for item_rows in rows], np.int64)
        owner = np.repeat(np.arange(len(rows)), counts)  # (N,) request of each row
        every_row = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        dense, sparse = user_dense[owner], user_sparse[owner]  # (N, D), (N, S): copies, changed below
        dense[:, self.dense_columns] = self.item_dense[every_row]
        sparse[:, self.sparse_columns] = self.item_sparse[every_row]
        return dense, sparse


def read_catalogue(path: str | os.PathLike[str]) -> tuple[np.ndarray, dict[str, Any]]:
    """``catalogue.parquet`` -> (item ids int64[I], the raw item feature columns)."""
    import pyarrow.parquet as pa_parquet  # only recommend archives need pyarrow

    from featurespec.arrow import table_to_columns

    columns = table_to_columns(pa_parquet.read_table(path))
    if ITEM_ID_COLUMN not in columns:
        raise ValueError(f"{path}: no {ITEM_ID_COLUMN!r} column")
    return columns.pop(ITEM_ID_COLUMN).astype(np.int64), columns


# --------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------


def onnx_user_tower(path: str | os.PathLike[str], *, threads: int) -> Embedder:
    """The user tower as an ONNX Runtime session (CPU: a batch of a few one-row queries is too small for a GPU)."""
    session = make_session(path, threads=threads)
    return lambda dense, sparse: session.run([EMBEDDING_OUTPUT], {"dense": dense, "sparse": sparse})[0]


def rank_answer(
    ids: np.ndarray, scores: np.ndarray, k: int, retrieval_scores: np.ndarray | None = None
) -> dict[str, Any]:
    """The ``k`` best items by the ranker's ``scores``, best first (ties keep retrieval order)."""
    best = top_indices(scores, k)
    items = [{"id": int(ids[i]), "score": float(scores[i])} for i in best.tolist()]
    if retrieval_scores is not None:
        for item, i in zip(items, best.tolist()):
            item["retrieval_score"] = float(retrieval_scores[i])
    return {"items": items}


class Recommender:
    """The loaded pieces of both stages; :meth:`recommend` answers one request, :meth:`answer_batch` a batch.

    This is the in-process pipeline: the TorchServe handler calls :meth:`answer_batch`, so a served
    answer is this class's answer.
    """

    def __init__(
        self,
        *,
        user_spec: FeatureSpec,
        user_tower: Embedder,
        index: RetrievalIndex,
        catalogue: Catalogue,
        ranker_spec: FeatureSpec,
        ranker: Backend,
        features: UserFeatures,
        limits: Limits = Limits(),
        recommend_limits: RecommendLimits = RecommendLimits(),
    ):
        self.user_spec = user_spec
        self.user_tower = user_tower
        self.index = index
        self.catalogue = catalogue
        self.ranker_spec = ranker_spec
        self.ranker = ranker
        self.features = features
        self.limits = limits
        self.recommend_limits = recommend_limits

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike[str],
        *,
        ranker_file: str,
        device: str = "cpu",
        threads: int = 1,
        limits: Limits = Limits(),
        recommend_limits: RecommendLimits = RecommendLimits(),
    ) -> Recommender:
        """A directory holding a retrieval export's files, the ranker's ``features.json`` and its ``ranker_file``."""
        path = Path(directory)
        for name in (*RETRIEVAL_FILES, FEATURES_FILE, ranker_file):
            if not (path / name).is_file():
                raise FileNotFoundError(f"{path / name}: not found (does {path} hold a retrieval export and a ranker?)")
        user_spec = FeatureSpec.load(path / USER_FEATURES_FILE)
        ranker_spec = FeatureSpec.load(path / FEATURES_FILE)
        ids, item_columns = read_catalogue(path / CATALOGUE_FILE)
        return cls(
            user_spec=user_spec,
            user_tower=onnx_user_tower(path / USER_TOWER_FILE, threads=threads),
            index=RetrievalIndex.load(path, threads=threads),
            catalogue=Catalogue.encode(ids, item_columns, ranker_spec),
            ranker_spec=ranker_spec,
            ranker=load_backend(path / ranker_file, device=device, threads=threads),
            features=UserFeatures.of(user_spec, ranker_spec, list(item_columns)),
            limits=limits,
            recommend_limits=recommend_limits,
        )

    def parse(self, body: Any, *, content_type: str | None = None) -> RecommendRequest | RequestError:
        """One TorchServe ``data`` entry (or a decoded body) -> its request, or the 400 to answer it with."""
        try:
            decoded = decode_body(body, content_type=content_type, limits=self.limits)
            if isinstance(decoded, Mapping) and "inputs" in decoded:
                return parse_recommend_v2(decoded, features=self.features, specs=(self.user_spec, self.ranker_spec),
                                          limits=self.limits, recommend_limits=self.recommend_limits)
            return parse_recommend_request(decoded, features=self.features, limits=self.limits,
                                           recommend_limits=self.recommend_limits)
        except RequestError as error:
            return error
        except Exception:  # anything a hostile body can provoke stays this request's problem
            logger.exception("recommend request could not be parsed")
            return RequestError("body", "could not be parsed as a request")

    def recommend(self, body: Any) -> dict[str, Any]:
        """One request (its JSON object, or its bytes) -> its answer; raises :class:`RequestError` for a bad one."""
        (outcome,) = self.answer_batch([self.parse({"body": body})])
        if isinstance(outcome, RequestError):
            raise outcome
        return outcome

    def retrieve(
        self, requests: Sequence[RecommendRequest], tower_rows: tuple[np.ndarray, np.ndarray]
    ) -> list[Retrieved]:
        """The first stage: each request's ``candidates`` best items by the index, its history and exclusions
        left out; ``tower_rows`` are the requests' user sides encoded by the user tower's spec, one row each."""
        queries = np.ascontiguousarray(self.user_tower(*tower_rows), np.float32)
        exclude = [np.union1d(request.exclude, request.history) for request in requests]
        found = self.index.search(queries, top_n=max(request.candidates for request in requests), exclude=exclude)
        return [Retrieved(each.ids[: request.candidates], each.scores[: request.candidates])
                for each, request in zip(found, requests)]

    def answer_batch(
        self, outcomes: Sequence[RecommendRequest | RequestError], *, model_name: str = "", model_version: str = ""
    ) -> list[dict[str, Any] | RequestError]:
        """Parsed requests -> one answer (or error) each: one tower run, one index search, one ranker run.

        A request sent in KServe v2 form is answered in it, with ``model_name`` and ``model_version``."""
        answers: list[dict[str, Any] | RequestError] = list(outcomes)  # errors stay as they are
        valid = [i for i, outcome in enumerate(outcomes) if isinstance(outcome, RecommendRequest)]
        requests = [outcomes[i] for i in valid]
        ranker_side = encode_user_sides(self.ranker_spec, requests, limits=self.limits)
        retrieving = [r for r, request in enumerate(requests) if request.items is None]
        tower_side = dict(zip(retrieving, encode_user_sides(self.user_spec, [requests[r] for r in retrieving],
                                                             limits=self.limits)))
        item_rows: dict[int, np.ndarray] = {}
        retrieval_scores: dict[int, np.ndarray] = {}
        for r, request in enumerate(requests):  # what fails to encode, or names an unknown item, fails alone
            error = next((side for side in (tower_side.get(r), ranker_side[r]) if isinstance(side, RequestError)), None)
            if error is None and request.items is not None:
                item_rows[r] = self.catalogue.rows_of(request.items)
                unknown = np.flatnonzero(item_rows[r] < 0)
                if len(unknown):
                    first = int(unknown[0])
                    error = RequestError(f"items[{first}]", f"item {request.items[first]} is not in the catalogue")
            if error is not None:
                answers[valid[r]] = request.error(error)
        ok = [r for r in range(len(requests)) if not isinstance(answers[valid[r]], RequestError)]
        searching = [r for r in ok if requests[r].items is None]
        if searching:
            tower_rows = (np.concatenate([tower_side[r][0] for r in searching]),
                          np.concatenate([tower_side[r][1] for r in searching]))
            for r, found in zip(searching, self.retrieve([requests[r] for r in searching], tower_rows)):
                rows_found = self.catalogue.rows_of(found.ids)
                known = rows_found >= 0  # an index row without a catalogue entry cannot be ranked
                item_rows[r], retrieval_scores[r] = rows_found[known], found.scores[known]
        if ok:
            user_dense = np.concatenate([ranker_side[r][0] for r in ok])
            user_sparse = np.concatenate([ranker_side[r][1] for r in ok])
            rows = [item_rows[r] for r in ok]
            dense, sparse = self.catalogue.ranker_rows(user_dense, user_sparse, rows)
            scores = self.ranker.predict(dense, sparse) if len(dense) else np.zeros(0, np.float32)
            start = 0
            for r, request_rows in zip(ok, rows):
                end = start + len(request_rows)
                request = requests[r]
                answer = rank_answer(self.catalogue.ids[request_rows], scores[start:end], request.k,
                                     retrieval_scores.get(r))
                if request.kservev2 is not None:
                    answer = request.kservev2.response(answer, retrieved=request.items is None, model_name=model_name,
                                                       model_version=model_version)
                answers[valid[r]] = answer
                start = end
        return answers
