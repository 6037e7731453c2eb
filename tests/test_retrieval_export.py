"""Retrieval export: the query tower's parity, the item embeddings, the measured index choice, and the
index module a handler loads (numpy + faiss only): recall against exact search, excluded ids."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import onnxruntime as ort
import pytest

from export.retrieval import (
    EMBEDDING_OUTPUT,
    IndexCandidate,
    choose_index,
    eager_embedder,
    embedding_parity,
    export_retrieval,
    measure_indexes,
)
from handlers.retrieval_index import RetrievalIndex
from training.retrieval import RetrievalOptions, load_retrieval_checkpoint, train_retrieval


def unit_vectors(rows: int, dim: int, *, seed: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(rows, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    """A one-epoch two-tower checkpoint on the synthetic user-item source, and its export."""
    root = tmp_path_factory.mktemp("retrieval")
    checkpoint = root / "checkpoint"
    train_retrieval(RetrievalOptions(out=str(checkpoint), data="synthetic-useritem", rows=3_000, eval_users=100,
                                     epochs=1, batch_size=128, baselines=False, threads=1, progress=False))
    out = root / "export"
    return checkpoint, out, export_retrieval(checkpoint, out)


# -- the export dir ------------------------------------------------------------


def test_export_dir_holds_what_a_handler_loads(exported: tuple) -> None:
    _, out, report = exported
    for name in ("user_tower.onnx", "user_tower.torchscript.pt", "user_features.json", "item_features.json",
                 "item_embeddings.npy", "item_ids.npy", "index.faiss", "catalogue.parquet", "retrieval_report.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "retrieval_report.json").read_text()) == report


def test_user_tower_formats_match_eager_at_every_parity_batch(exported: tuple) -> None:
    _, _, report = exported
    for name in ("torchscript", "onnx"):
        parity = report["user_tower"]["parity"][name]
        assert parity["passed"]
        assert set(parity["max_abs_diff"]) == {"batch_1", "batch_7", "batch_4096", "all_4096"}
        assert max(parity["max_abs_diff"].values()) <= 1e-5


def test_onnx_tower_has_a_dynamic_batch_and_unit_outputs(exported: tuple) -> None:
    checkpoint_dir, out, _ = exported
    checkpoint = load_retrieval_checkpoint(checkpoint_dir)
    rows = len(checkpoint.queries["rated_before"])
    dense, sparse = checkpoint.user_spec.encode_columns(checkpoint.queries, rows)
    session = ort.InferenceSession(str(out / "user_tower.onnx"), providers=["CPUExecutionProvider"])
    assert [output.name for output in session.get_outputs()] == [EMBEDDING_OUTPUT]
    for batch in (1, 3):
        (vectors,) = session.run(None, {"dense": dense[:batch], "sparse": sparse[:batch]})
        assert vectors.shape == (batch, checkpoint.config.output_dim)
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_item_embeddings_cover_the_catalogue_in_order(exported: tuple) -> None:
    checkpoint_dir, out, report = exported
    checkpoint = load_retrieval_checkpoint(checkpoint_dir)
    embeddings, ids = np.load(out / "item_embeddings.npy"), np.load(out / "item_ids.npy")
    np.testing.assert_array_equal(ids, checkpoint.catalogue)
    assert embeddings.shape == (len(ids), report["embedding_dim"]) and embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)


def test_the_chosen_index_meets_the_recall_target_and_every_candidate_is_reported(exported: tuple) -> None:
    _, out, report = exported
    rows = {row["name"]: row for row in report["index"]["candidates"]}
    assert rows["exact"]["recall_at_k"] == 1.0
    assert any(name.startswith("hnsw") for name in rows) and any(name.startswith("ivf") for name in rows)
    chosen = rows[report["index"]["chosen"]["name"]]
    assert chosen["recall_at_k"] >= 0.95
    faster = [row for row in rows.values() if row["query_ms_median"] < chosen["query_ms_median"]]
    assert all(row["recall_at_k"] < 0.95 for row in faster)
    index = RetrievalIndex.load(out)
    assert index.search_parameters == chosen["search_parameters"] and len(index) == report["items"]


def test_loaded_index_answers_real_queries_without_excluded_items(exported: tuple) -> None:
    _, out, _ = exported
    index = RetrievalIndex.load(out)
    embeddings, ids = np.load(out / "item_embeddings.npy"), np.load(out / "item_ids.npy")
    queries = embeddings[:5] + 0.01  # near an item each: that item is the natural best answer
    exclude = [set(ids[:1].tolist()) | {int(ids[q])} for q in range(5)]
    answers = index.search(queries, top_n=20, exclude=exclude)
    for answer, excluded in zip(answers, exclude):
        assert len(answer.ids) == 20 and not excluded & set(answer.ids.tolist())
        assert bool(np.all(np.diff(answer.scores) <= 1e-6))  # best first


# -- the index module ----------------------------------------------------------------


@pytest.mark.parametrize("factory", ["Flat", "HNSW16"])
def test_excluded_ids_never_come_back(factory: str) -> None:
    items = unit_vectors(300, 8, seed=1)
    flat = faiss.index_factory(8, factory, faiss.METRIC_INNER_PRODUCT)
    flat.add(items)
    ids = np.arange(1_000, 1_300)
    index = RetrievalIndex(flat, ids, search_parameters="efSearch=64" if factory.startswith("HNSW") else "")
    queries = unit_vectors(40, 8, seed=2)
    rng = np.random.default_rng(3)
    exclude = [set(rng.choice(ids, size=rng.integers(0, 120), replace=False).tolist()) for _ in range(40)]
    # Each query's own exact best items are excluded too: they are what an index would return first.
    best = np.argsort(-(queries @ items.T), axis=1)[:, :10]
    exclude = [excluded | set(ids[best[q]].tolist()) for q, excluded in enumerate(exclude)]
    for answer, excluded in zip(index.search(queries, top_n=25, exclude=exclude), exclude):
        assert len(answer.ids) == 25
        assert not excluded & set(answer.ids.tolist())
        assert set(answer.ids.tolist()) <= set(ids.tolist())


def test_exact_index_returns_the_brute_force_top_n() -> None:
    items, queries = unit_vectors(200, 6, seed=4), unit_vectors(10, 6, seed=5)
    flat = faiss.IndexFlatIP(6)
    flat.add(items)
    answers = RetrievalIndex(flat, np.arange(200) * 7).search(queries, top_n=15)
    expected = np.argsort(-(queries @ items.T), axis=1, kind="stable")[:, :15] * 7
    for answer, ids in zip(answers, expected):
        assert set(answer.ids.tolist()) == set(ids.tolist())


def test_a_query_gets_fewer_items_only_when_the_catalogue_runs_out() -> None:
    flat = faiss.IndexFlatIP(4)
    flat.add(unit_vectors(6, 4, seed=6))
    (answer,) = RetrievalIndex(flat, np.arange(6)).search(unit_vectors(1, 4, seed=7), top_n=5, exclude=[{0, 1, 2}])
    assert sorted(answer.ids.tolist()) == [3, 4, 5]


def test_index_inputs_are_checked() -> None:
    flat = faiss.IndexFlatIP(4)
    flat.add(unit_vectors(3, 4, seed=8))
    with pytest.raises(ValueError, match=r"the index holds 3 vectors but there are 2 item ids"):
        RetrievalIndex(flat, np.arange(2))
    index = RetrievalIndex(flat, np.arange(3))
    with pytest.raises(ValueError, match=r"queries must be float32\[Q, 4\], got shape \[2, 5\]"):
        index.search(np.zeros((2, 5), np.float32), top_n=1)
    with pytest.raises(ValueError, match=r"top_n must be >= 1, got 0"):
        index.search(np.zeros((1, 4), np.float32), top_n=0)
    with pytest.raises(ValueError, match=r"exclude has 2 entries for 1 queries"):
        index.search(np.zeros((1, 4), np.float32), top_n=1, exclude=[set(), set()])


def test_index_module_needs_only_numpy_and_faiss() -> None:
    code = ("import sys, handlers.retrieval_index; "
            "print(sorted(m for m in ('torch', 'training', 'onnxruntime', 'pyarrow') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.stdout.strip() == "[]"


# -- measuring and choosing -----------------------------------------------------------


def test_measured_recall_is_against_exact_search() -> None:
    items, queries = unit_vectors(400, 8, seed=9), unit_vectors(20, 8, seed=10)
    candidates = [IndexCandidate("exact", "Flat", ""), IndexCandidate("ivf20_nprobe1", "IVF20,Flat", "nprobe=1"),
                  IndexCandidate("ivf20_nprobe20", "IVF20,Flat", "nprobe=20")]
    _, rows = measure_indexes(candidates, items, queries, k=50)
    recall = {row["name"]: row["recall_at_k"] for row in rows}
    assert recall["exact"] == 1.0 and recall["ivf20_nprobe20"] == pytest.approx(1.0)
    assert recall["ivf20_nprobe1"] < 1.0
    assert all(row["query_ms_median"] > 0 and row["queries"] == 20 for row in rows)


def test_choose_index_takes_the_fastest_that_reaches_the_target() -> None:
    rows = [{"name": "exact", "recall_at_k": 1.0, "query_ms_median": 0.9},
            {"name": "fast_but_poor", "recall_at_k": 0.80, "query_ms_median": 0.1},
            {"name": "good", "recall_at_k": 0.96, "query_ms_median": 0.3},
            {"name": "better_but_slower", "recall_at_k": 0.99, "query_ms_median": 0.5}]
    assert choose_index(rows)["name"] == "good"
    assert choose_index(rows, recall_target=0.999)["name"] == "exact"


def test_parity_reports_a_broken_embedder() -> None:
    import torch

    tower = torch.nn.Sequential(torch.nn.Linear(3, 4))

    class Tower(torch.nn.Module):
        def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
            return tower(dense)

    reference = eager_embedder(Tower())
    dense, sparse = np.random.default_rng(0).normal(size=(50, 3)).astype(np.float32), np.zeros((50, 1), np.int64)
    same = embedding_parity(reference, reference, dense, sparse)
    assert max(same.values()) == 0.0
    broken = embedding_parity(lambda d, s: reference(d, s) + 1e-3, reference, dense, sparse)
    assert min(broken.values()) == pytest.approx(1e-3, rel=1e-2)
