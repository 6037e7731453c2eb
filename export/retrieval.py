"""``python -m export.retrieval CHECKPOINT_DIR [--out DIR]``: the retrieval stage of a two-tower checkpoint.

Writes an export dir a serving handler loads with numpy, onnxruntime (or
torch) and faiss alone, no ``training/`` import::

    user_tower.onnx            the query tower: dense float32[B, Nu], sparse int64[B, Su] -> query_embedding float32[B, D]
    user_tower.torchscript.pt  the same as frozen TorchScript
    user_features.json         the user tower's FeatureSpec (what a request's user side encodes with)
    item_features.json         the item tower's FeatureSpec (kept to re-embed the catalogue)
    item_embeddings.npy        float32[I, D]: every catalogue item's embedding, computed once, unit length
    item_ids.npy               int64[I]: the item id of each row of item_embeddings.npy and of the index
    index.faiss                the FAISS index chosen by measurement (inner product)
    catalogue.parquet          item_id and each item's raw features, named as the FeatureSpecs name them
                               (what the ranker's request needs for each retrieved item)
    retrieval_report.json      parity per format and batch size; every index candidate's recall@100
                               against exact search and query time; the chosen index and its search parameters

Both tower formats must match the eager tower within ``1e-5`` (max abs
difference of the embeddings) at batch sizes 1, 7 and 4,096 and on every
query in one batch, as :mod:`export.parity` requires of the rankers. The
index is picked among exact search (``IndexFlatIP``), HNSW and IVF variants:
the fastest one-query-at-a-time search (one thread) whose recall@100 against
exact search, over the checkpoint's real test queries, is at least 0.95.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from export.exporter import export_onnx, export_torchscript
from export.parity import PARITY_BATCH_SIZES, TOLERANCE, ParityError, score
from handlers.recommend import onnx_user_tower
from handlers.retrieval_index import (
    CATALOGUE_FILE,
    EMBEDDING_OUTPUT,
    INDEX_FILE,
    ITEM_EMBEDDINGS_FILE,
    ITEM_IDS_FILE,
    REPORT_FILE,
    USER_FEATURES_FILE,
    USER_TOWER_FILE,
    RetrievalIndex,
)
from training.checkpoint import staged_directory, write_json
from training.retrieval import (
    ITEM_FEATURES_FILE,
    RetrievalCheckpoint,
    embed,
    encode,
    load_retrieval_checkpoint,
)

USER_TOWER_TORCHSCRIPT = "user_tower.torchscript.pt"
RECALL_TARGET = 0.95
RECALL_K = 100
_PARITY_ROWS = max(PARITY_BATCH_SIZES)
_SMALL_BATCH_ROWS = 64  # batch sizes below it are checked on about this many rows, as export.parity does
_TIMING_ROUNDS = 3

Embedder = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""``(dense float32[B, N], sparse int64[B, S]) -> float32[B, D]``."""


# --------------------------------------------------------------------------
# The user tower and its parity
# --------------------------------------------------------------------------


def export_user_tower(tower: torch.nn.Module, out: Path, *, example: tuple[torch.Tensor, torch.Tensor]) -> dict[str, Path]:
    """TorchScript and ONNX (dynamic batch, output ``query_embedding``) files of the query tower."""
    torchscript = export_torchscript(tower, out / USER_TOWER_TORCHSCRIPT, example=example)
    onnx_path = export_onnx(tower, out / USER_TOWER_FILE, example=example, output_name=EMBEDDING_OUTPUT)
    return {"torchscript": torchscript, "onnx": onnx_path}


def torchscript_embedder(path: Path) -> Embedder:
    module = torch.jit.load(str(path)).eval()

    def run(dense: np.ndarray, sparse: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(dense), torch.from_numpy(sparse)).numpy()

    return run


def eager_embedder(tower: torch.nn.Module) -> Embedder:
    tower.eval()

    def run(dense: np.ndarray, sparse: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return tower(torch.from_numpy(dense), torch.from_numpy(sparse)).numpy()

    return run


def embedding_parity(candidate: Embedder, reference: Embedder, dense: np.ndarray, sparse: np.ndarray) -> dict[str, float]:
    """Max abs difference of the embeddings per batch size (``batch_1``, ...) and on every row at once (``all_N``)."""
    runs = [(size, f"batch_{size}", min(len(dense), size * max(1, _SMALL_BATCH_ROWS // size)))
            for size in PARITY_BATCH_SIZES]
    runs.append((len(dense), f"all_{len(dense)}", len(dense)))
    differences = {}
    for batch_size, key, rows in runs:
        got = score(candidate, dense[:rows], sparse[:rows], batch_size=batch_size)
        expected = score(reference, dense[:rows], sparse[:rows], batch_size=batch_size)
        if got.shape != expected.shape:
            raise ParityError(f"expected embeddings of shape {expected.shape} at batch size {batch_size}, got {got.shape}")
        difference = np.abs(got - expected)
        difference[np.isnan(difference)] = np.inf  # a NaN output is the worst possible mismatch
        differences[key] = float(difference.max())
    return differences


# --------------------------------------------------------------------------
# The index
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class IndexCandidate:
    name: str
    factory: str  # faiss.index_factory description
    search_parameters: str  # faiss.ParameterSpace string, "" for none


def index_candidates(num_items: int) -> list[IndexCandidate]:
    """Exact search, HNSW at two graph degrees and several search depths, IVF at several probe counts."""
    candidates = [IndexCandidate("exact", "Flat", "")]
    for links in (16, 32):
        for ef_search in (16, 32, 64, 128, 256):
            candidates.append(IndexCandidate(f"hnsw{links}_ef{ef_search}", f"HNSW{links}", f"efSearch={ef_search}"))
    # About sqrt(I) lists, with FAISS's 39 training points per centroid.
    lists = max(1, min(int(round(np.sqrt(num_items))), num_items // 39))
    for probes in sorted({1, 4, 16, lists // 4, lists // 2} - {0}):
        if probes < lists:
            candidates.append(IndexCandidate(f"ivf{lists}_nprobe{probes}", f"IVF{lists},Flat", f"nprobe={probes}"))
    return candidates


def build_index(candidate: IndexCandidate, vectors: np.ndarray) -> faiss.Index:
    index = faiss.index_factory(vectors.shape[1], candidate.factory, faiss.METRIC_INNER_PRODUCT)
    index.train(vectors)
    index.add(vectors)
    if candidate.search_parameters:
        faiss.ParameterSpace().set_index_parameters(index, candidate.search_parameters)
    return index


def measure_indexes(
    candidates: list[IndexCandidate], items: np.ndarray, queries: np.ndarray, *, k: int = RECALL_K
) -> tuple[dict[str, faiss.Index], list[dict[str, Any]]]:
    """Each candidate built over ``items``, its recall@k against exact search over ``queries`` and its
    per-query search time (one query at a time, one thread), timed in interleaved rounds."""
    faiss.omp_set_num_threads(1)
    k = min(k, len(items))
    indexes, figures = {}, {}
    for candidate in candidates:
        started = time.perf_counter()
        indexes[candidate.name] = build_index(candidate, items)
        figures[candidate.name] = {**asdict(candidate), "build_seconds": time.perf_counter() - started, "times": []}
    _, exact = indexes["exact"].search(queries, k)
    for candidate in candidates:
        _, found = indexes[candidate.name].search(queries, k)
        overlap = [len(np.intersect1d(found[q], exact[q])) / k for q in range(len(queries))]
        figures[candidate.name]["recall_at_k"] = float(np.mean(overlap))
    for _ in range(_TIMING_ROUNDS):  # interleaved, so machine noise hits every candidate alike
        for candidate in candidates:
            index = indexes[candidate.name]
            for q in range(len(queries)):
                started = time.perf_counter()
                index.search(queries[q : q + 1], k)
                figures[candidate.name]["times"].append(time.perf_counter() - started)
    rows = []
    for candidate in candidates:
        entry = figures[candidate.name]
        times = np.asarray(entry.pop("times")) * 1e3
        rows.append({**entry, "k": k, "query_ms_median": float(np.median(times)),
                     "query_ms_p90": float(np.percentile(times, 90)), "queries": len(queries)})
    return indexes, rows


def choose_index(rows: list[dict[str, Any]], *, recall_target: float = RECALL_TARGET) -> dict[str, Any]:
    """The fastest candidate (median query time) whose recall reaches the target; exact search always does."""
    qualified = [row for row in rows if row["recall_at_k"] >= recall_target]
    return min(qualified, key=lambda row: row["query_ms_median"])


# --------------------------------------------------------------------------
# The export
# --------------------------------------------------------------------------


def export_retrieval(
    checkpoint_dir: str | Path, out: str | Path, *, threads: int = 1, recall_target: float = RECALL_TARGET
) -> dict[str, Any]:
    """Write the export dir (whole or not at all); returns ``retrieval_report.json``'s payload."""
    checkpoint = load_retrieval_checkpoint(checkpoint_dir)
    torch.set_num_threads(threads)
    with staged_directory(out) as staging:
        report = _export(checkpoint, staging, threads=threads, recall_target=recall_target)
        write_json(staging / REPORT_FILE, report)
    # Loading the result is the handler's first step: prove it works.
    RetrievalIndex.load(out, threads=threads)
    return report


def _export(checkpoint: RetrievalCheckpoint, out: Path, *, threads: int, recall_target: float) -> dict[str, Any]:
    queries = len(next(iter(checkpoint.queries.values())))
    if queries == 0:
        raise ValueError(f"{checkpoint.path}: no test queries to check the export with")
    query_dense, query_sparse = (t.numpy() for t in encode(checkpoint.user_spec, checkpoint.queries, queries))
    # Real queries, repeated to fill the largest parity batch.
    repeat = np.arange(max(_PARITY_ROWS, queries)) % queries
    parity_dense, parity_sparse = query_dense[repeat], query_sparse[repeat]
    tower = checkpoint.model.user_tower.eval()
    example = (torch.from_numpy(parity_dense[:2]), torch.from_numpy(parity_sparse[:2]))
    files = export_user_tower(tower, out, example=example)
    reference = eager_embedder(tower)
    parity = {}
    for name, embedder in (("torchscript", torchscript_embedder(files["torchscript"])),
                           ("onnx", onnx_user_tower(files["onnx"], threads=threads))):
        differences = embedding_parity(embedder, reference, parity_dense, parity_sparse)
        worst = max(differences.values())
        parity[name] = {"passed": worst <= TOLERANCE, "max_abs_diff": differences, "tolerance": TOLERANCE}
        if not worst <= TOLERANCE:
            raise ParityError(f"{name}: user tower parity failed: max |e - e_eager| = {worst:.3g} > {TOLERANCE:g} "
                              f"({differences})")

    item_dense, item_sparse = encode(checkpoint.item_spec, checkpoint.item_columns, len(checkpoint.catalogue))
    item_vectors = np.ascontiguousarray(embed(checkpoint.model.item_tower, item_dense, item_sparse), np.float32)
    np.save(out / ITEM_EMBEDDINGS_FILE, item_vectors)
    np.save(out / ITEM_IDS_FILE, checkpoint.catalogue.astype(np.int64))
    query_vectors = np.ascontiguousarray(reference(query_dense, query_sparse), np.float32)
    indexes, rows = measure_indexes(index_candidates(len(item_vectors)), item_vectors, query_vectors)
    chosen = choose_index(rows, recall_target=recall_target)
    faiss.write_index(indexes[chosen["name"]], str(out / INDEX_FILE))
    for name in (USER_FEATURES_FILE, ITEM_FEATURES_FILE, CATALOGUE_FILE):
        shutil.copyfile(checkpoint.path / name, out / name)
    return {
        "checkpoint": str(checkpoint.path),
        "items": len(item_vectors),
        "embedding_dim": int(item_vectors.shape[1]),
        "score": "inner product of unit-length embeddings (cosine)",
        "user_tower": {"inputs": ["dense", "sparse"], "output": EMBEDDING_OUTPUT, "parity": parity},
        "index": {
            "chosen": {key: chosen[key] for key in ("name", "factory", "search_parameters")},
            "recall_target": recall_target,
            "protocol": f"recall@{chosen['k']} against exact search over {chosen['queries']} test queries; "
                        f"one query per search call, 1 thread, {_TIMING_ROUNDS} interleaved rounds",
            "candidates": rows,
        },
    }


def format_index_table(report: dict[str, Any]) -> str:
    chosen = report["index"]["chosen"]["name"]
    lines = [f"{'index':22}{'recall@100':>12}{'median ms':>11}{'p90 ms':>9}{'build s':>9}"]
    for row in report["index"]["candidates"]:
        mark = "  <- chosen" if row["name"] == chosen else ""
        lines.append(f"{row['name']:22}{row['recall_at_k']:>12.4f}{row['query_ms_median']:>11.4f}"
                     f"{row['query_ms_p90']:>9.4f}{row['build_seconds']:>9.2f}{mark}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m export.retrieval",
        description="Export a two-tower checkpoint's query tower (ONNX, TorchScript; parity-checked), every item's "
        "embedding and a FAISS index chosen by measured recall and speed.",
    )
    parser.add_argument("checkpoint", type=Path, metavar="CHECKPOINT_DIR")
    parser.add_argument("--out", type=Path, help="export dir (default: CHECKPOINT_DIR/retrieval_export)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads for the parity runs")
    parser.add_argument("--recall-target", type=float, default=RECALL_TARGET,
                        help="least recall@100 against exact search an approximate index must reach")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if not 0 < args.recall_target <= 1:
        parser.error(f"--recall-target must be in (0, 1], got {args.recall_target}")
    out = args.out or args.checkpoint / "retrieval_export"
    try:
        report = export_retrieval(args.checkpoint, out, threads=args.threads, recall_target=args.recall_target)
    except (FileNotFoundError, ValueError, ParityError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_index_table(report))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
