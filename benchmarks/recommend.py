"""Retrieval + ranking against exhaustive ranking of the whole catalogue, in process, on MovieLens.

``python -m benchmarks.recommend --data-path DIR --ranker RANKER_EXPORT --retrieval RETRIEVAL_EXPORT --split time``

For each test user of the split (``training.evaluation.ranking_task``: users with a positive in the
test split, scored at their first test interaction, with the user features and history of that
moment), four ways to recommend 10 items are compared, each over the same candidate set as
``ranking_full_catalogue`` (every catalogue item the user had not interacted with before the split):

* ``retrieval + ranking``: :class:`handlers.recommend.Recommender`, the pipeline the recommend archive
  serves: the user tower, the FAISS index's best ``--candidates`` items (the seen items excluded), the
  ranker's top 10 of them;
* ``retrieval only``: the first stage alone, the index's 10 best unseen items in its own order;
* ``exhaustive ranking``: the same ranker scoring every unseen catalogue item (the recommend
  archive's ranking request, ``"items"``);
* ``item popularity``: unseen items by their number of training positives.

Each user's relevant items are the positives in the split; NDCG@10 and HR@10 are computed over the
user's ranked list as ``training.metrics.topk_metrics`` defines them (ideal DCG over at most 10 of the
user's relevant items). The four are timed per request, in turns user by user (one thread), so
machine noise hits each alike. Writes ``OUT/movielens-{split}.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from benchmarks.common import Timing, machine_header, machine_info
from featurespec import FEATURES_FILE, StringColumn
from handlers.memory import settle_for_scoring
from handlers.recommend import HISTORY_FEATURE, RETRIEVAL_FILES, Recommender, RecommendLimits, encode_user_sides
from handlers.request import Limits
from training.data import open_source
from training.data.interactions import HISTORY_FEATURES, HISTORY_SEPARATOR, SPLIT_NAMES
from training.evaluation import RankingTask, ranking_task
from training.retrieval import item_popularity

TOP_K = 10
DEFAULT_CANDIDATES = 200
METHODS = ("retrieval + ranking", "retrieval only", "exhaustive ranking", "item popularity")


def user_requests(source: Any, task: RankingTask) -> list[dict[str, Any]]:
    """Each evaluated user's request side at the test point: ``{"user": {...}, "history": [ids]}``.

    The history is the ``history`` feature (the last items before the test point, most recent first);
    the other features, ``history_liked`` among them, go in ``user`` as the training rows carried them.
    """
    columns = {**source.user_columns(task.users), **source.history_columns(task.users, task.timestamps)}
    values: dict[str, list[Any]] = {}
    for name, column in columns.items():
        if isinstance(column, StringColumn):
            texts = column.to_list()
            multi_valued = name in HISTORY_FEATURES
            values[name] = [(text.split(HISTORY_SEPARATOR) if text else []) if multi_valued else (text or None)
                            for text in texts]
        else:
            values[name] = [None if np.isnan(value) else float(value) for value in np.asarray(column, np.float64)]
    histories = values.pop(HISTORY_FEATURE)
    return [{"user": {name: values[name][row] for name in values}, "history": [int(item) for item in histories[row]]}
            for row in range(len(task.users))]


def ranked_list_metrics(
    ranked: list[np.ndarray], relevant: np.ndarray, catalogue: np.ndarray, *, k: int
) -> dict[str, float]:
    """Mean NDCG@k and HR@k of each user's ranked item ids against the user's row of ``relevant`` ``bool[U, I]``."""
    discounts = 1.0 / np.log2(np.arange(k) + 2.0)
    ndcg, hits = [], []
    for user, ids in enumerate(ranked):
        rows = np.searchsorted(catalogue, ids[:k])
        gains = relevant[user, rows].astype(np.float64)
        ideal = discounts[: max(1, min(int(relevant[user].sum()), k))].sum()
        ndcg.append(float((gains * discounts[: len(gains)]).sum() / ideal))
        hits.append(float(gains.any()))
    return {f"ndcg@{k}": float(np.mean(ndcg)), f"hr@{k}": float(np.mean(hits))}


def combined_dir(ranker: Path, retrieval: Path, *, ranker_file: str, into: Path) -> Path:
    """A directory laid out as a recommend archive (links to both exports' files)."""
    for path in [retrieval / name for name in RETRIEVAL_FILES] + [ranker / FEATURES_FILE, ranker / ranker_file]:
        (into / path.name).symlink_to(path.resolve())
    return into


def evaluate(
    *,
    data_path: Path,
    ranker: Path,
    retrieval: Path,
    split: str,
    seed: int = 0,
    candidates: int = DEFAULT_CANDIDATES,
    ranker_file: str = "model.onnx",
    max_users: int | None = None,
) -> dict[str, Any]:
    """Every method's NDCG@10, HR@10, items scored per request and per-request latency on one split."""
    source = open_source("movielens", path=data_path, seed=seed, split=split)
    task = ranking_task(source, "test", max_users=max_users, seed=seed)
    catalogue = task.catalogue
    requests = user_requests(source, task)
    popularity = item_popularity(source)
    with tempfile.TemporaryDirectory(prefix="recommend-") as staging:
        # Limits wide enough for the whole catalogue: exhaustive ranking asks for every unseen item.
        recommender = Recommender.load(
            combined_dir(ranker, retrieval, ranker_file=ranker_file, into=Path(staging)), ranker_file=ranker_file,
            limits=Limits(max_candidates=len(catalogue)),
            recommend_limits=RecommendLimits(max_exclude=len(catalogue), max_history=len(catalogue)),
        )
    settle_for_scoring()

    def two_stage(user: int) -> np.ndarray:
        seen = catalogue[task.seen[user]].tolist()
        answer = recommender.recommend({**requests[user], "exclude": seen, "k": min(TOP_K, candidates),
                                        "candidates": candidates})
        return np.array([item["id"] for item in answer["items"]], np.int64)

    def retrieval_only(user: int) -> np.ndarray:
        seen = catalogue[task.seen[user]].tolist()
        top = min(TOP_K, len(catalogue))
        request = recommender.parse({"body": {**requests[user], "exclude": seen, "k": top, "candidates": top}})
        (tower_rows,) = encode_user_sides(recommender.user_spec, [request], limits=recommender.limits)
        (found,) = recommender.retrieve([request], tower_rows)
        return found.ids

    def exhaustive(user: int) -> np.ndarray:
        unseen = catalogue[~task.seen[user]].tolist()
        answer = recommender.recommend({**requests[user], "items": unseen, "top_k": TOP_K})
        return np.array([item["id"] for item in answer["items"]], np.int64)

    def most_popular(user: int) -> np.ndarray:
        unseen = catalogue[~task.seen[user]]
        scores = popularity(np.full(len(unseen), task.users[user]), unseen)
        return unseen[np.argsort(-scores, kind="stable")[:TOP_K]]

    methods: dict[str, Callable[[int], np.ndarray]] = dict(zip(METHODS, (two_stage, retrieval_only, exhaustive,
                                                                           most_popular)))
    ranked: dict[str, list[np.ndarray]] = {name: [] for name in METHODS}
    latencies: dict[str, list[float]] = {name: [] for name in METHODS}
    for user in tqdm(range(len(task.users)), desc=f"{split}: users", mininterval=1.0):
        # Rotated, so that no method always runs right after another.
        order = METHODS[user % len(METHODS) :] + METHODS[: user % len(METHODS)]
        for name in order:
            started = time.perf_counter()
            ranked[name].append(methods[name](user))
            latencies[name].append((time.perf_counter() - started) * 1e3)
    unseen_counts = (~task.seen).sum(axis=1)
    scored = {"retrieval + ranking": float(np.minimum(unseen_counts, candidates).mean()), "retrieval only": 0.0,
              "exhaustive ranking": float(unseen_counts.mean()), "item popularity": 0.0}
    rows = {}
    for name in METHODS:
        timing = Timing.of(np.asarray(latencies[name]))
        rows[name] = {**ranked_list_metrics(ranked[name], task.relevant, catalogue, k=TOP_K),
                      "ranker_scores_per_request": scored[name],
                      "ms_per_request": {"median": timing.median_ms, "p25": timing.p25_ms, "p75": timing.p75_ms,
                                         "p99": timing.p99_ms}}
    return {
        "data": f"MovieLens ({data_path})",
        "split": split,
        "seed": seed,
        "users": len(task.users),
        "catalogue_items": len(catalogue),
        "candidates": candidates,
        "ranker": str(ranker / ranker_file),
        "retrieval": str(retrieval),
        "index": recommender.index.search_parameters or "exact",
        "protocol": "full catalogue: every item the user had not interacted with before the split, ranked at the "
                    "user's first test interaction; relevant: the user's positives in the test split",
        "methods": rows,
        "machine": machine_info(threads=1, malloc_keeps_freed_memory=True),
    }


def format_table(result: dict[str, Any]) -> str:
    lines = [
        f"MovieLens, {result['split']} split, seed {result['seed']}: {result['users']} test users, "
        f"{result['catalogue_items']} catalogue items, {result['candidates']} retrieved candidates; "
        f"{result['protocol']}.",
        "",
        "| method | ranker scores per request | NDCG@10 | HR@10 | ms per request: median (p25-p75), p99 |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, row in result["methods"].items():
        ms = row["ms_per_request"]
        lines.append(f"| {name} | {row['ranker_scores_per_request']:.0f} | {row['ndcg@10']:.4f} | {row['hr@10']:.4f} | "
                     f"{ms['median']:.2f} ({ms['p25']:.2f}-{ms['p75']:.2f}), {ms['p99']:.2f} |")
    lines += ["", machine_header(result["machine"])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.recommend", description=__doc__.split("\n")[0])
    parser.add_argument("--data-path", type=Path, required=True, help="MovieLens directory")
    parser.add_argument("--ranker", type=Path, required=True,
                        help="export dir of `python -m export` (DLRM or Wide & Deep)")
    parser.add_argument("--retrieval", type=Path, required=True, help="export dir of `python -m export.retrieval`")
    parser.add_argument("--split", choices=SPLIT_NAMES, default="time", help="the split both models were trained on")
    parser.add_argument("--seed", type=int, default=0, help="the seed both models were trained with")
    parser.add_argument("--candidates", type=int, default=DEFAULT_CANDIDATES, help="items retrieved for ranking")
    parser.add_argument("--ranker-file", default="model.onnx", help="the ranker artifact in --ranker")
    parser.add_argument("--users", type=int, help="at most this many test users (a seeded sample)")
    parser.add_argument("--out", type=Path, default=Path("results/recommend"))
    args = parser.parse_args(argv)
    if args.candidates < 1:
        parser.error(f"--candidates must be >= 1, got {args.candidates}")
    result = evaluate(data_path=args.data_path, ranker=args.ranker, retrieval=args.retrieval, split=args.split,
                      seed=args.seed, candidates=args.candidates, ranker_file=args.ranker_file, max_users=args.users)
    args.out.mkdir(parents=True, exist_ok=True)
    table = format_table(result)
    (args.out / f"movielens-{args.split}.md").write_text(table + "\n", encoding="utf-8")
    (args.out / f"movielens-{args.split}.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
