"""Ranking evaluation of user-item data: history look-ups, leave-last-out, candidate sets,
top-k metrics, the user-item baselines, a MovieLens training run with history, and serving it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from training.baselines_useritem import USERITEM_BASELINE_NAMES, useritem_baselines
from training.checkpoint import load_checkpoint
from training.data import SPLITS
from training.data.interactions import (
    NO_ITEM,
    TEST,
    TRAIN,
    VAL,
    HistoryIndex,
    join_ids,
    leave_last_out,
)
from training.data.movielens import GENRES_100K, MovieLensSource
from training.evaluation import (
    RANKING_KEYS,
    full_catalogue_candidates,
    model_scorer,
    rank_candidates,
    ranking_task,
    sampled_candidates,
)
from training.metrics import topk_metrics
from training.train import TrainOptions, train

NUM_USERS, NUM_ITEMS = 24, 30


def _write_generated_movielens(directory: Path, *, seed: int = 0) -> Path:
    """A MovieLens 100K directory: 24 users, 30 movies, 8-16 ratings per user with a
    planted taste (users like one genre), timestamps with ties."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    genres = rng.integers(1, 6, NUM_ITEMS)  # one genre per movie among GENRES_100K[1:6]
    lines = []
    for user in range(1, NUM_USERS + 1):
        taste = 1 + user % 5
        for item in rng.choice(np.arange(1, NUM_ITEMS + 1), size=int(rng.integers(8, 17)), replace=False):
            liked = genres[item - 1] == taste
            rating = int(rng.integers(4, 6) if liked else rng.integers(1, 5))
            lines.append(f"{user}\t{item}\t{rating}\t{880_000_000 + int(rng.integers(0, 400)) * 60}")
    (directory / "u.data").write_text("\n".join(lines) + "\n", encoding="latin-1")
    occupations = ("writer", "student", "other")
    (directory / "u.user").write_text(
        "".join(f"{u}|{20 + u}|{'MF'[u % 2]}|{occupations[u % 3]}|{10000 + u}\n" for u in range(1, NUM_USERS + 1)),
        encoding="latin-1",
    )
    movies = []
    for item in range(1, NUM_ITEMS + 1):
        flags = "|".join("1" if k == genres[item - 1] else "0" for k in range(len(GENRES_100K)))
        movies.append(f"{item}|Movie {item} (199{item % 10})|01-Jan-199{item % 10}||http://example.com/{item}|{flags}\n")
    (directory / "u.item").write_text("".join(movies), encoding="latin-1")
    return directory


@pytest.fixture(scope="module")
def movielens_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_generated_movielens(tmp_path_factory.mktemp("ml") / "ml-gen")


@pytest.fixture(scope="module", params=["time", "leave-last-out"])
def source(request: pytest.FixtureRequest, movielens_dir: Path) -> MovieLensSource:
    return MovieLensSource(movielens_dir, split=request.param, history_length=5)


# -- history look-ups and leave-last-out ------------------------------------------------------


def test_history_never_holds_the_row_itself_or_later_or_same_time_items():
    rng = np.random.default_rng(1)
    users, items, times = rng.integers(0, 6, 300), rng.integers(0, 50, 300), rng.integers(0, 40, 300)  # many ties
    index = HistoryIndex(users, items, times)
    histories = index.before(users, times, length=4)
    assert histories.shape == (300, 4)
    for row in range(300):
        earlier = [(times[r], r, items[r]) for r in range(300) if users[r] == users[row] and times[r] < times[row]]
        expected = [item for _, _, item in sorted(earlier, reverse=True)[:4]]  # most recent first, later row first
        assert histories[row].tolist() == expected + [NO_ITEM] * (4 - len(expected))


def test_join_ids_writes_the_text_a_request_list_encodes_to():
    column = join_ids(np.array([[7, 3, NO_ITEM], [NO_ITEM, NO_ITEM, NO_ITEM], [12, 5, 9]]))
    assert column.to_list() == ["7|3", "", "12|5|9"]


def test_leave_last_out_membership():
    users = np.array([1, 2, 1, 1, 2, 1, 3, 3, 3, 2])
    times = np.array([10, 5, 30, 20, 6, 30, 1, 2, 3, 5])  # user 1's last two tie at 30: row order decides
    codes = leave_last_out(users, times)
    assert codes.tolist() == [TRAIN, TRAIN, VAL, TRAIN, TEST, TEST, TRAIN, VAL, TEST, VAL]
    assert leave_last_out(np.array([4, 4]), np.array([1, 2])).tolist() == [TRAIN, TRAIN]  # < 3: train only


# -- candidate sets ---------------------------------------------------------------------------


def _user_items(source: MovieLensSource, user: int, splits: tuple[int, ...], *, positive: bool = False) -> set[int]:
    every = source.interactions()
    mask = (every.users == user) & np.isin(every.splits, splits) & ((every.labels == 1) | (not positive))
    return set(every.items[mask].tolist())


def test_full_catalogue_candidates_exclude_items_seen_before_the_split(source: MovieLensSource):
    task = ranking_task(source, "test")
    candidates = full_catalogue_candidates(task)
    assert len(task.users) >= 2 and set(task.catalogue.tolist()) == set(range(1, NUM_ITEMS + 1))
    for row, user in enumerate(task.users.tolist()):
        mine = candidates.user_index == row
        items = set(task.catalogue[candidates.item_index[mine]].tolist())
        assert items == set(range(1, NUM_ITEMS + 1)) - _user_items(source, user, (TRAIN, VAL))
        relevant = set(task.catalogue[candidates.item_index[mine & candidates.relevant]].tolist())
        assert relevant == _user_items(source, user, (TEST,), positive=True)
        # The test point is the user's first test rating; the history there is what came strictly before.
        every = source.interactions()
        assert task.timestamps[row] == every.timestamps[(every.users == user) & (every.splits == TEST)].min()
    assert np.array_equal(np.diff(candidates.user_index) >= 0, np.ones(len(candidates) - 1, bool))


def test_sampled_negatives_exclude_every_interacted_item_and_are_seeded(source: MovieLensSource):
    task = ranking_task(source, "test")
    first = sampled_candidates(task, negatives=6, seed=5)
    for row, user in enumerate(task.users.tolist()):
        mine = first.user_index == row
        items = task.catalogue[first.item_index[mine]]
        assert first.relevant[mine].tolist() == [True] + [False] * (len(items) - 1)  # the held-out positive first
        assert items[0] in _user_items(source, user, (TEST,), positive=True)
        negatives = set(items[1:].tolist())
        assert len(negatives) == len(items) - 1 == min(6, NUM_ITEMS - len(_user_items(source, user, (TRAIN, VAL, TEST))))
        assert not negatives & _user_items(source, user, (TRAIN, VAL, TEST))
    again = sampled_candidates(task, negatives=6, seed=5)
    assert np.array_equal(again.item_index, first.item_index)
    assert not np.array_equal(sampled_candidates(task, negatives=6, seed=6).item_index, first.item_index)
    # A user's negatives do not depend on which other users are evaluated.
    fewer = ranking_task(source, "test", max_users=2, seed=1)
    assert len(fewer.users) == 2 and set(fewer.users.tolist()) <= set(task.users.tolist())
    sampled = sampled_candidates(fewer, negatives=6, seed=5)
    for row, user in enumerate(fewer.users.tolist()):
        everyone_row = task.users.tolist().index(user)
        assert set(fewer.catalogue[sampled.item_index[sampled.user_index == row]].tolist()) == set(
            task.catalogue[first.item_index[first.user_index == everyone_row]].tolist()
        )
    assert np.array_equal(ranking_task(source, "test", max_users=2, seed=1).users, fewer.users)


def test_ranking_task_rejects_bad_options(source: MovieLensSource):
    with pytest.raises(ValueError, match="max_users must be >= 1"):
        ranking_task(source, "test", max_users=0)
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        ranking_task(source, "dev")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="negatives must be >= 1, got 0"):
        sampled_candidates(ranking_task(source, "test"), negatives=0)


# -- top-k metrics by hand --------------------------------------------------------------------


def test_topk_metrics_by_hand():
    groups = np.array([1, 1, 1, 1, 2, 2, 2, 3, 3])
    scores = np.array([0.9, 0.8, 0.7, 0.1, 0.5, 0.6, 0.7, 0.2, 0.3])
    relevant = np.array([0, 1, 0, 1, 1, 0, 0, 0, 0], bool)
    result = topk_metrics(groups, scores, relevant, k=2)
    # user 1: relevant at ranks 2 and 4 -> one hit in the top 2; user 2: relevant at rank 3 -> none;
    # user 3 has nothing relevant and is skipped.
    assert result["users"] == 2
    assert result["hr@2"] == pytest.approx(0.5)
    assert result["recall@2"] == pytest.approx((1 / 2 + 0) / 2)
    ideal = 1 + 1 / np.log2(3)
    assert result["ndcg@2"] == pytest.approx(((1 / np.log2(3)) / ideal + 0) / 2)
    perfect = topk_metrics(np.array([1, 1, 1]), np.array([0.9, 0.8, 0.1]), np.array([1, 1, 0], bool), k=10)
    assert perfect == {"hr@10": 1.0, "ndcg@10": pytest.approx(1.0), "recall@10": 1.0, "users": 1}


def test_topk_metrics_ties_never_help():
    groups = np.zeros(20, np.int64)
    relevant = np.arange(20) == 0
    assert topk_metrics(groups, np.ones(20), relevant, k=10)["hr@10"] == 0.0  # a constant scorer
    assert topk_metrics(groups, -np.arange(20.0), relevant, k=1)["ndcg@1"] == 1.0
    with pytest.raises(ValueError, match="k must be >= 1, got 0"):
        topk_metrics(groups, np.ones(20), relevant, k=0)


# -- baselines ----------------------------------------------------------------------------------


def test_popularity_and_mf_baselines_run(source: MovieLensSource):
    results = useritem_baselines(source, seed=0)
    assert tuple(results) == USERITEM_BASELINE_NAMES
    for result in results.values():
        assert 0.0 <= result["test_auc"] <= 1.0
        assert set(RANKING_KEYS) <= set(result)
        assert 0.0 <= result["ranking_full_catalogue"]["ndcg@10"] <= 1.0
        assert set(result["ranking_sampled_100"]) >= {"hr@10", "ndcg@10", "users"}
    assert results["matrix_factorization"]["best_step"] >= 1
    # Popularity scores by training positives alone: a user's candidates are ranked the same way for everyone.
    task = ranking_task(source, "test")
    every = source.interactions()
    counts = np.bincount(every.items[(every.splits == TRAIN) & (every.labels == 1)], minlength=NUM_ITEMS + 1)
    expected = rank_candidates(task, lambda users, items: counts[task.catalogue[items]].astype(float))
    assert results["item_popularity"]["ranking_full_catalogue"]["ndcg@10"] == pytest.approx(
        expected["ranking_full_catalogue"]["ndcg@10"]
    )


# -- a MovieLens training run with history, and serving it ------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, movielens_dir: Path) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("runs") / "ml-dlrm"
    options = TrainOptions(model="dlrm", data="movielens", data_path=str(movielens_dir), out=str(out), epochs=2,
                           batch_size=32, progress=False, threads=1, split="leave-last-out", history_length=5,
                           negatives=1)
    return out, train(options)


def test_training_with_history_writes_every_ranking_key(trained: tuple[Path, dict]):
    out, result = trained
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["test_auc"] == result["test_auc"]
    assert saved["ranking_rated_items"]["ranking_users"] >= 1
    assert saved["ranking_full_catalogue"]["users"] >= 1 and saved["ranking_full_catalogue"]["split"] == "test"
    assert set(saved["ranking_full_catalogue"]) >= {"hr@10", "ndcg@10", "recall@10", "candidates"}
    assert set(saved["ranking_sampled_100"]) >= {"hr@10", "ndcg@10"}
    for name in USERITEM_BASELINE_NAMES:
        assert set(saved["baselines"][name]) >= {"test_auc", *RANKING_KEYS}
    assert saved["options"]["split"] == "leave-last-out" and saved["options"]["history_length"] == 5
    spec = load_checkpoint(out).spec
    assert {f.name: f.max_values for f in spec.sparse if f.name.startswith("history")} == {
        "history": 5, "history_liked": 5
    }


def test_model_scorer_scores_what_whole_candidate_rows_encode_to(trained: tuple[Path, dict], movielens_dir: Path):
    out, _ = trained
    checkpoint = load_checkpoint(out)
    source = MovieLensSource(movielens_dir, split="leave-last-out", history_length=5)
    task = ranking_task(source, "test", max_users=3, seed=0)
    candidates = full_catalogue_candidates(task)
    scores = model_scorer(checkpoint.model, checkpoint.spec, source, task, device=torch.device("cpu"), batch_rows=7)(
        candidates.user_index, candidates.item_index
    )
    users, items = task.users[candidates.user_index], task.catalogue[candidates.item_index]
    columns = {**source.user_columns(users), **source.item_columns(items),
               **source.history_columns(users, task.timestamps[candidates.user_index])}
    dense, sparse = checkpoint.spec.encode_columns(columns, len(users))
    with torch.inference_mode():
        expected = torch.sigmoid(checkpoint.model(torch.from_numpy(dense), torch.from_numpy(sparse))).numpy()
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)


def test_exported_model_serves_a_request_carrying_history(trained: tuple[Path, dict], movielens_dir: Path, tmp_path: Path):
    from export.exporter import export_torchscript
    from export.serving import ServingModule, example_inputs
    from handlers.backends import load_backend
    from handlers.request import Limits, encode_batch

    out, _ = trained
    checkpoint = load_checkpoint(out)
    spec = checkpoint.spec
    artifact = export_torchscript(ServingModule(checkpoint.model).eval(), tmp_path / "model.ts.pt",
                                  example=example_inputs(spec.num_dense, spec.num_sparse_columns))
    backend = load_backend(artifact, device="cpu", threads=1)
    source = MovieLensSource(movielens_dir, split="leave-last-out", history_length=5)
    chunk = next(source.chunks("test"))
    columns = {name: (values.to_list() if hasattr(values, "to_list") else values.tolist())
               for name, values in chunk.columns.items()}
    rows = [i for i, history in enumerate(columns["history"]) if history][:4]
    assert rows, "the generated data has test rows with a history"
    # What a client sends: ids as JSON lists (strings or integers), most recent first.
    records = [
        {**{name: columns[name][i] for name in ("user", "item", "age", "gender", "occupation", "zip_prefix")},
         "release_year": columns["release_year"][i],
         "genres": columns["genres"][i].split("|"),
         "history": [int(item) for item in columns["history"][i].split("|")],
         "history_liked": columns["history_liked"][i].split("|") if columns["history_liked"][i] else [],
         "rated_before": float(columns["rated_before"][i]),
         **({} if np.isnan(columns["liked_share"][i]) else {"liked_share": float(columns["liked_share"][i])})}
        for i in rows
    ]
    batch = encode_batch(spec, [{"body": {"instances": records}}], limits=Limits())
    assert batch.bounds == [(0, len(records))], batch.outcomes
    served = backend.predict(batch.dense, batch.sparse)
    dense, sparse = spec.encode_columns(chunk.columns, len(chunk))
    history_columns = [k for k, name in enumerate(np.repeat(spec.table_names, spec.table_widths)) if name == "history"]
    assert (sparse[rows][:, history_columns] > 0).any()  # the history reaches the model
    with torch.inference_mode():
        trained_scores = torch.sigmoid(checkpoint.model(torch.from_numpy(dense), torch.from_numpy(sparse))).numpy()
    np.testing.assert_allclose(served, trained_scores[rows], rtol=1e-5, atol=1e-6)
    # Without its history the same request scores differently: the feature is used.
    bare = encode_batch(spec, [{"body": {"instances": [{**r, "history": [], "history_liked": []} for r in records]}}],
                        limits=Limits())
    assert not np.allclose(backend.predict(bare.dense, bare.sparse), served)


def test_options_reject_what_user_item_data_needs(tmp_path: Path):
    with pytest.raises(ValueError, match="split 'leave-last-out' needs user ids"):
        TrainOptions(data="synthetic", split="leave-last-out")
    with pytest.raises(ValueError, match="unknown split 'random'"):
        TrainOptions(data="movielens", split="random")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="history_length must be >= 0"):
        TrainOptions(data="movielens", history_length=-1)
    with pytest.raises(ValueError, match="eval_users must be >= 1"):
        TrainOptions(data="movielens", eval_users=0)
    assert SPLITS[TEST] == "test" and SPLITS[VAL] == "val"
