"""The retrieval stage's item index: load it from an export dir and query it (numpy and faiss only).

An export dir of ``python -m export.retrieval`` holds ``index.faiss`` (a
FAISS index over every catalogue item's embedding, inner product on unit
vectors), ``item_ids.npy`` (``int64[I]``: the item id of each index row) and
``retrieval_report.json``, whose ``index.chosen.search_parameters`` (for
example ``"efSearch=64"``) are what the index was measured with. A query is
a user-tower embedding ``float32[Q, D]``; the answer is the best ``top_n``
item ids per query, best first, never one of that query's excluded ids
(what the user has already seen, or what the request excludes).

faiss is imported when an index is loaded, not with this module: building
or serving a ranking archive (which reads this module's file names) never
needs it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import faiss

INDEX_FILE = "index.faiss"
ITEM_IDS_FILE = "item_ids.npy"
ITEM_EMBEDDINGS_FILE = "item_embeddings.npy"
REPORT_FILE = "retrieval_report.json"
# The rest of a retrieval export, named once here for training (which writes), export and serving (which read).
USER_TOWER_FILE = "user_tower.onnx"
EMBEDDING_OUTPUT = "query_embedding"  # the user tower's ONNX output
USER_FEATURES_FILE = "user_features.json"
CATALOGUE_FILE = "catalogue.parquet"
ITEM_ID_COLUMN = "item_id"  # the catalogue's id column (the item features may include the id as "item" too)


@dataclass(frozen=True)
class Retrieved:
    """One query's answer: ``ids`` int64[<= top_n] and their ``scores`` float32, best first."""

    ids: np.ndarray
    scores: np.ndarray


class RetrievalIndex:
    """A FAISS index whose row ``r`` is the item ``item_ids[r]``."""

    def __init__(self, index: faiss.Index, item_ids: np.ndarray, *, search_parameters: str = ""):
        item_ids = np.asarray(item_ids)
        if item_ids.ndim != 1 or item_ids.dtype.kind not in "iu":
            raise ValueError(f"item_ids must be a 1-d integer array, got {item_ids.dtype}{list(item_ids.shape)}")
        if index.ntotal != len(item_ids):
            raise ValueError(f"the index holds {index.ntotal} vectors but there are {len(item_ids)} item ids")
        if search_parameters:
            import faiss  # here, not at the top: a ranking host builds and serves archives without faiss

            faiss.ParameterSpace().set_index_parameters(index, search_parameters)
        self.index = index
        self.item_ids = item_ids.astype(np.int64)
        self.search_parameters = search_parameters

    @property
    def dim(self) -> int:
        return self.index.d

    def __len__(self) -> int:
        return self.index.ntotal

    @classmethod
    def load(cls, directory: str | os.PathLike[str], *, threads: int = 1) -> RetrievalIndex:
        """The index of an export dir, with the search parameters it was measured with.

        ``threads`` is FAISS's OpenMP thread count, process-wide: a serving
        worker sets it so that workers do not oversubscribe the cores.
        """
        path = Path(directory)
        for name in (INDEX_FILE, ITEM_IDS_FILE, REPORT_FILE):
            if not (path / name).is_file():
                raise FileNotFoundError(f"{path / name}: not found (is {path} a retrieval export dir?)")
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        import faiss

        faiss.omp_set_num_threads(threads)
        report = json.loads((path / REPORT_FILE).read_text(encoding="utf-8"))
        return cls(
            faiss.read_index(os.fspath(path / INDEX_FILE)),
            np.load(path / ITEM_IDS_FILE, allow_pickle=False),
            search_parameters=report["index"]["chosen"]["search_parameters"],
        )

    def search(
        self, queries: np.ndarray, *, top_n: int, exclude: Sequence[Collection[int]] | None = None
    ) -> list[Retrieved]:
        """The ``top_n`` best items of each query ``float32[Q, D]``, best first, without its excluded ids.

        ``exclude[q]`` holds item ids query ``q`` must not get back. A query
        gets fewer than ``top_n`` items only when the catalogue minus its
        exclusions (or, for an approximate index, what the index can reach)
        has fewer.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be float32[Q, {self.dim}], got shape {list(queries.shape)}")
        if top_n < 1:
            raise ValueError(f"top_n must be >= 1, got {top_n}")
        if exclude is not None and len(exclude) != len(queries):
            raise ValueError(f"exclude has {len(exclude)} entries for {len(queries)} queries")
        excluded = [np.fromiter(ids, np.int64) for ids in exclude] if exclude is not None else None
        # Ask for enough neighbours that top_n survive the exclusions; ask again, for more, when an
        # approximate index returned fewer valid rows than asked for.
        wanted = top_n + max((len(ids) for ids in excluded), default=0) if excluded else top_n
        k = min(wanted, len(self))
        while True:
            scores, rows = self.index.search(queries, k)
            answers = [self._answer(scores[q], rows[q], excluded[q] if excluded else None, top_n)
                       for q in range(len(queries))]
            short = any(len(answer.ids) < top_n for answer in answers)
            if not short or k >= len(self):
                return answers
            k = min(2 * k, len(self))

    def _answer(self, scores: np.ndarray, rows: np.ndarray, excluded: np.ndarray | None, top_n: int) -> Retrieved:
        valid = rows >= 0  # FAISS pads with -1 when it finds fewer than k
        ids = self.item_ids[rows[valid]]
        scores = scores[valid]
        if excluded is not None and len(excluded):
            keep = ~np.isin(ids, excluded)
            ids, scores = ids[keep], scores[keep]
        return Retrieved(ids[:top_n], scores[:top_n].astype(np.float32))
