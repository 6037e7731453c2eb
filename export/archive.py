"""Pack an export dir into a self-contained TorchServe ``.mar``.

``python -m export.archive EXPORT_DIR --name NAME [--backend torchscript|onnx|onnx-int8|pt2]``
writes ``model_store/NAME.mar`` holding:

* ``recommender_handler.py``, the handler TorchServe loads, at the root;
* the ``handlers/`` package (request parsing, backends, memory settings) and
  the ``featurespec/`` package (the FeatureSpec encoder, so serving encodes
  exactly as training did), as packages: the archive root is on the
  worker's ``sys.path``, so ``from featurespec import FeatureSpec`` works
  there as it does in this repository;
* ``features.json`` and one artifact (``model.ts.pt``, ``model.onnx``,
  ``model.int8.onnx`` or ``model.pt2``, an AOTInductor package that runs on
  hosts with the export host's CPU instruction set);
* ``model-config.yaml``: TorchServe's per-model batching and worker settings
  plus a ``handler:`` section the handler reads (request limits, threads).

``--retrieval RETRIEVAL_EXPORT_DIR`` builds a recommend archive: the export
dir's model ranks what a two-tower retrieval export's index proposes, in one
call (:mod:`handlers.recommend`). It adds the retrieval files (user tower,
its FeatureSpec, the FAISS index, item ids, catalogue), takes
``recommend_handler.py`` as its handler, and its ``handler:`` section adds
``default_candidates``, ``max_exclude`` and ``max_history``
(``max_candidates`` bounds the candidates a request may ask for); the host
needs faiss and pyarrow too.

Nothing in the archive imports the rest of this repository, so any
TorchServe 0.12 host with torch, numpy and onnxruntime can serve it. The archive is built in a
temporary directory and moved into the model store in one rename, so a
running TorchServe never sees a half-written file.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from export.backends import ARTIFACTS
from featurespec import FEATURES_FILE
from handlers.recommend import RETRIEVAL_FILES, RecommendLimits
from handlers.request import Limits
from handlers.worker import DEFAULT_MATMUL_PRECISION, DEFAULT_THREADS, MATMUL_PRECISIONS, check_matmul_precision

REPO_ROOT = Path(__file__).resolve().parents[1]
HANDLER_FILE = REPO_ROOT / "handlers" / "recommender_handler.py"
RECOMMEND_HANDLER_FILE = REPO_ROOT / "handlers" / "recommend_handler.py"  # the handler of archives with --retrieval
SERVING_PACKAGES = ("featurespec", "handlers")  # packed whole: all the code the handler imports
MODEL_CONFIG_FILE = "model-config.yaml"

ArchiveBackend = Literal["torchscript", "onnx", "onnx-int8", "pt2"]
LIMIT_NAMES = (
    "max_records", "max_candidates", "max_value_bytes", "max_string_bytes", "max_depth", "max_field_name_bytes",
)  # the request limits written to the handler: section
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_VERSION = re.compile(r"[0-9]+(\.[0-9]+)*")


class ArchiveError(RuntimeError):
    """The archive cannot be built; the message says which file or step failed."""


# A recommend call is one user's request with a whole ranking inside (hundreds of candidates in one
# forward pass): waiting to batch it with others adds latency, and under load batches fill from the
# queue anyway. Measured with benchmarks.recommend_serving (100,000 items, one request in flight):
# p50/p99 13.0/20.7 ms with 5 ms, 9.0/17.8 ms with 1 ms.
RECOMMEND_MAX_BATCH_DELAY_MS = 1


@dataclass(frozen=True)
class ServingConfig:
    """What goes into ``model-config.yaml``.

    The defaults suit a small CPU box: one worker per model (each worker is
    a process with its own model copy and one intra-op thread), batches of
    up to 32 requests gathered for at most 5 ms, so that under load single
    records share a forward pass while an idle server adds at most 5 ms.
    """

    batch_size: int = 32
    max_batch_delay_ms: int = 5
    min_workers: int = 1
    max_workers: int = 1
    response_timeout_s: int = 30
    startup_timeout_s: int = 120  # separate, so a slow model load is not a response timeout
    # Request limits (handlers.request.Limits, which documents each), with its defaults.
    max_records: int = Limits.max_records  # records (instances, candidates, KServe v2 rows) per request
    max_candidates: int = Limits.max_candidates
    max_value_bytes: int = Limits.max_value_bytes
    max_string_bytes: int = Limits.max_string_bytes
    max_depth: int = Limits.max_depth
    max_field_name_bytes: int = Limits.max_field_name_bytes
    threads: int = DEFAULT_THREADS  # torch / ONNX Runtime intra-op threads per worker
    float32_matmul_precision: str = DEFAULT_MATMUL_PRECISION  # "highest": IEEE float32 (handlers.worker)

    def __post_init__(self) -> None:
        for name in ("batch_size", "min_workers", "max_workers", "response_timeout_s", "startup_timeout_s", *LIMIT_NAMES, "threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if isinstance(self.max_batch_delay_ms, bool) or not isinstance(self.max_batch_delay_ms, int) or self.max_batch_delay_ms < 0:
            raise ValueError(f"max_batch_delay_ms must be an integer >= 0, got {self.max_batch_delay_ms!r}")
        if self.max_workers < self.min_workers:
            raise ValueError(f"max_workers ({self.max_workers}) must be >= min_workers ({self.min_workers})")
        check_matmul_precision(self.float32_matmul_precision, setting="float32_matmul_precision")

    def to_model_config(self) -> dict[str, Any]:
        return {
            "minWorkers": self.min_workers,
            "maxWorkers": self.max_workers,
            "batchSize": self.batch_size,
            "maxBatchDelay": self.max_batch_delay_ms,
            "responseTimeout": self.response_timeout_s,
            "startupTimeout": self.startup_timeout_s,
            "handler": {
                **{name: getattr(self, name) for name in LIMIT_NAMES},
                "threads": self.threads,
                "float32_matmul_precision": self.float32_matmul_precision,
            },
        }


def build_archive(
    export_dir: str | os.PathLike[str],
    *,
    name: str,
    backend: ArchiveBackend = "torchscript",
    version: str = "1.0",
    model_store: str | os.PathLike[str] = "model_store",
    file_name: str | None = None,
    config: ServingConfig = ServingConfig(),
    retrieval_dir: str | os.PathLike[str] | None = None,
    recommend_limits: RecommendLimits = RecommendLimits(),
    force: bool = False,
) -> Path:
    """Build ``model_store/{file_name or name}.mar``; returns its path.

    ``file_name`` lets a second version of a model sit beside the first
    (register it with ``model_name=NAME``). An existing archive is an error
    unless ``force`` is set. With ``retrieval_dir`` (an export dir of
    ``python -m export.retrieval``) the archive recommends from the catalogue:
    it holds the retrieval files too, its handler is ``recommend_handler.py``
    and its ``handler:`` section adds ``recommend_limits``.
    """
    if not _NAME.fullmatch(name):
        raise ValueError(f"model name {name!r}: use letters, digits, '_', '.', '-' (starting with a letter or digit)")
    if file_name is not None and not _NAME.fullmatch(file_name):
        raise ValueError(f"archive file name {file_name!r}: use letters, digits, '_', '.', '-'")
    if not _VERSION.fullmatch(version):
        raise ValueError(f"version {version!r}: expected numbers separated by dots, like 1.0")
    if backend not in ARTIFACTS:
        raise ValueError(f"backend {backend!r}: expected one of {sorted(ARTIFACTS)}")
    export_path = Path(export_dir)
    artifact = export_path / ARTIFACTS[backend]
    for required in (artifact, export_path / FEATURES_FILE):
        if not required.is_file():
            raise ArchiveError(f"{required}: not found (is {export_path} an export dir made by `python -m export`?)")
    retrieval_files = [Path(retrieval_dir) / file for file in RETRIEVAL_FILES] if retrieval_dir is not None else []
    for required in retrieval_files:
        if not required.is_file():
            raise ArchiveError(
                f"{required}: not found (is {retrieval_dir} an export dir made by `python -m export.retrieval`?)"
            )
    handler = RECOMMEND_HANDLER_FILE if retrieval_dir is not None else HANDLER_FILE
    model_config_payload = config.to_model_config()
    if retrieval_dir is not None:
        model_config_payload["handler"].update(asdict(recommend_limits))
    store = Path(model_store)
    store.mkdir(parents=True, exist_ok=True)
    target = store / f"{file_name or name}.mar"
    if target.exists() and not force:
        raise ArchiveError(f"{target} exists; pass --force to overwrite it")

    with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=store) as staging:
        staged = Path(staging)
        model_config = staged / MODEL_CONFIG_FILE
        model_config.write_text(yaml.safe_dump(model_config_payload, sort_keys=False), encoding="utf-8")
        packages = _stage_packages(staged / "packages")
        extra_files = [packages, export_path / FEATURES_FILE, *retrieval_files]
        command = [
            _archiver(),
            "--model-name", name,
            "--version", version,
            "--handler", os.fspath(handler),
            "--serialized-file", os.fspath(artifact),
            "--extra-files", ",".join(os.fspath(path) for path in extra_files),
            "--config-file", os.fspath(model_config),
            "--export-path", os.fspath(staged),
        ]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        built = staged / f"{name}.mar"
        if result.returncode != 0 or not built.is_file():
            detail = (result.stderr or result.stdout).strip().splitlines()
            raise ArchiveError(
                f"torch-model-archiver failed for {name!r} (exit status {result.returncode}): "
                + (detail[-1] if detail else "no output")
            )
        os.replace(built, target)
    return target


def _stage_packages(root: Path) -> Path:
    """Copy the serving packages under ``root``; the archiver puts a directory's entries at the archive root.

    The handler modules go in as an archive's handler file, not a second time inside ``handlers/``.
    """
    for package in SERVING_PACKAGES:
        shutil.copytree(
            REPO_ROOT / package,
            root / package,
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", HANDLER_FILE.name, RECOMMEND_HANDLER_FILE.name),
        )
    return root


def _archiver() -> str:
    # The archiver installed beside this interpreter first: a venv need not be activated.
    beside = Path(sys.executable).with_name("torch-model-archiver")
    found = os.fspath(beside) if beside.is_file() else shutil.which("torch-model-archiver")
    if found is None:
        raise ArchiveError("torch-model-archiver not found: pip install torch-model-archiver==0.12.0")
    return found


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = ServingConfig()
    parser = argparse.ArgumentParser(
        prog="python -m export.archive", description="Pack an export dir into a TorchServe .mar archive."
    )
    parser.add_argument("export_dir", type=Path, help="export dir written by `python -m export`")
    parser.add_argument("--name", required=True, help="model name, the NAME in /predictions/NAME")
    parser.add_argument("--backend", choices=sorted(ARTIFACTS), default="torchscript", help="which artifact to serve")
    parser.add_argument("--version", default="1.0", help="model version (default 1.0)")
    parser.add_argument("--model-store", type=Path, default=Path("model_store"), help="where the .mar goes")
    parser.add_argument("--file-name", help="archive file name without .mar (default: NAME), for a second version")
    parser.add_argument("--force", action="store_true", help="overwrite an existing archive")
    batching = parser.add_argument_group("model-config.yaml")
    batching.add_argument("--batch-size", type=int, default=defaults.batch_size, help="max requests per batch")
    batching.add_argument("--max-batch-delay", type=int, help=f"ms to wait to fill a batch (default "
                          f"{defaults.max_batch_delay_ms}; {RECOMMEND_MAX_BATCH_DELAY_MS} with --retrieval)")
    batching.add_argument("--min-workers", type=int, default=defaults.min_workers)
    batching.add_argument("--max-workers", type=int, default=defaults.max_workers)
    batching.add_argument("--response-timeout", type=int, default=defaults.response_timeout_s, help="seconds")
    batching.add_argument("--startup-timeout", type=int, default=defaults.startup_timeout_s, help="seconds")
    batching.add_argument("--max-records", type=int, default=defaults.max_records, help="records per request")
    batching.add_argument("--max-candidates", type=int, default=defaults.max_candidates, help="candidates per ranking request")
    batching.add_argument("--max-value-bytes", type=int, default=defaults.max_value_bytes, help="UTF-8 bytes of one string value")
    batching.add_argument("--max-string-bytes", type=int, default=defaults.max_string_bytes, help="UTF-8 bytes of a request's strings")
    batching.add_argument("--max-depth", type=int, default=defaults.max_depth, help="nesting of JSON arrays and objects")
    batching.add_argument("--max-field-name-bytes", type=int, default=defaults.max_field_name_bytes, help="UTF-8 bytes of a field name")
    batching.add_argument("--threads", type=int, default=defaults.threads, help="intra-op threads per worker")
    batching.add_argument("--float32-matmul-precision", choices=MATMUL_PRECISIONS, default=defaults.float32_matmul_precision,
                          help="GPU workers: highest = IEEE float32 as exported; high = TF32, medium = bfloat16 (faster, ~1e-4 off)")
    recommend = parser.add_argument_group("recommend from the catalogue (retrieval + ranking in one call)")
    recommend.add_argument("--retrieval", type=Path, metavar="RETRIEVAL_EXPORT_DIR",
                           help="export dir of `python -m export.retrieval`: the archive recommends from its catalogue, "
                           "the export dir's model ranking what the index retrieves")
    recommend_defaults = RecommendLimits()
    recommend.add_argument("--default-candidates", type=int, default=recommend_defaults.default_candidates,
                           help="items retrieved for ranking when a request does not say (at most --max-candidates)")
    recommend.add_argument("--max-exclude", type=int, default=recommend_defaults.max_exclude, help="ids in 'exclude'")
    recommend.add_argument("--max-history", type=int, default=recommend_defaults.max_history, help="ids in 'history'")
    return parser.parse_args(argv)


def serving_config(args: argparse.Namespace) -> ServingConfig:
    """The ``model-config.yaml`` settings the command line asks for; ``ValueError`` for a bad one."""
    if args.max_batch_delay is not None:
        delay = args.max_batch_delay
    else:
        delay = RECOMMEND_MAX_BATCH_DELAY_MS if args.retrieval else ServingConfig.max_batch_delay_ms
    return ServingConfig(
        batch_size=args.batch_size,
        max_batch_delay_ms=delay,
        min_workers=args.min_workers,
        max_workers=args.max_workers,
        response_timeout_s=args.response_timeout,
        startup_timeout_s=args.startup_timeout,
        **{name: getattr(args, name) for name in LIMIT_NAMES},
        threads=args.threads,
        float32_matmul_precision=args.float32_matmul_precision,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = serving_config(args)
        path = build_archive(
            args.export_dir,
            name=args.name,
            backend=args.backend,
            version=args.version,
            model_store=args.model_store,
            file_name=args.file_name,
            config=config,
            retrieval_dir=args.retrieval,
            recommend_limits=RecommendLimits(default_candidates=args.default_candidates, max_exclude=args.max_exclude,
                                             max_history=args.max_history),
            force=args.force,
        )
    except (ValueError, ArchiveError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({args.backend}, version {args.version})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
