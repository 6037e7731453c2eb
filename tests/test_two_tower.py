"""Two-tower retrieval: tower shapes (B/D notation), config checks, the logQ-corrected in-batch softmax,
the synthetic user-item source, training beside the baselines, and the checkpoint."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from training.__main__ import main as training_main
from training.data import open_source
from training.data.interactions import TEST, TRAIN, VAL
from training.data.synthetic_useritem import SyntheticUserItemSource
from training.models import build_model, config_from_dict, config_to_dict
from training.models.two_tower import ItemTower, TwoTower, TwoTowerConfig, UserTower
from training.retrieval import (
    RetrievalOptions,
    in_batch_softmax_loss,
    load_retrieval_checkpoint,
    sampling_log_probabilities,
    train_retrieval,
)

USER_SIZES, USER_WIDTHS = (6, 9, 5), (1, 4, 1)  # feature 1 is multi-valued (a history): 4 columns
ITEM_SIZES, ITEM_WIDTHS = (8, 4), (1, 2)
D = 8
# Small but learnable: the first 6,000 interactions of the default synthetic world (2,000 users, 1,000 items).
TINY_RUN = dict(data="synthetic-useritem", rows=6_000, eval_users=200, epochs=5, batch_size=128, threads=1,
                progress=False)


def tiny_config(**changes: object) -> TwoTowerConfig:
    fields = dict(user_num_dense=2, user_table_sizes=USER_SIZES, user_table_widths=USER_WIDTHS, item_num_dense=1,
                  item_table_sizes=ITEM_SIZES, item_table_widths=ITEM_WIDTHS, embedding_dim=4, hidden=(16,),
                  output_dim=D)
    return TwoTowerConfig(**{**fields, **changes})


def inputs(batch: int, num_dense: int, sizes: tuple[int, ...], widths: tuple[int, ...], *, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    dense = torch.randn(batch, num_dense, generator=generator)
    columns = [torch.randint(0, size, (batch,), generator=generator) for size, width in zip(sizes, widths)
               for _ in range(width)]
    return dense, torch.stack(columns, dim=1)


# -- the model -----------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 5])
def test_towers_return_unit_vectors_of_output_dim(batch: int) -> None:
    torch.manual_seed(0)
    config = tiny_config()
    users = UserTower(config).eval()(*inputs(batch, 2, USER_SIZES, USER_WIDTHS))
    items = ItemTower(config).eval()(*inputs(batch, 1, ITEM_SIZES, ITEM_WIDTHS))
    for vectors in (users, items):
        assert vectors.shape == (batch, D) and vectors.dtype == torch.float32
        torch.testing.assert_close(vectors.norm(dim=1), torch.ones(batch))
    cosines = TwoTower(config).eval()(*inputs(batch, 2, USER_SIZES, USER_WIDTHS), *inputs(batch, 1, ITEM_SIZES, ITEM_WIDTHS))
    assert cosines.shape == (batch,)
    assert bool((cosines.abs() <= 1 + 1e-6).all())


def test_padding_of_a_multi_valued_feature_does_not_change_the_user() -> None:
    torch.manual_seed(0)
    tower = UserTower(tiny_config()).eval()
    dense = torch.zeros(2, 2)
    sparse = torch.tensor([[1, 3, 0, 0, 0, 2], [1, 3, 3, 0, 0, 2]])  # history [3] and [3, 3]: the same mean
    vectors = tower(dense, sparse)
    torch.testing.assert_close(vectors[0], vectors[1])


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(output_dim=0), r"TwoTowerConfig: output_dim must be an int >= 1, got 0"),
        (dict(embedding_dim=-2), r"TwoTowerConfig: embedding_dim must be an int >= 1, got -2"),
        (dict(hidden=(16, 0)), r"TwoTowerConfig: hidden must be a tuple of ints >= 1, got \(16, 0\)"),
        (dict(user_table_sizes=()), r"TwoTowerConfig \(user tower\): table_sizes must be a non-empty tuple"),
        (dict(item_num_dense=0), r"TwoTowerConfig \(item tower\): num_dense must be an int >= 1, got 0"),
        (dict(item_table_widths=(1,)), r"TwoTowerConfig \(item tower\): table_widths has 1 entries but table_sizes has 2"),
    ],
)
def test_config_errors_name_the_value(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tiny_config(**changes)


def test_config_round_trips_through_json_and_the_registry() -> None:
    config = tiny_config()
    rebuilt = config_from_dict("twotower", json.loads(json.dumps(config_to_dict(config))))
    assert rebuilt == config
    assert isinstance(build_model("twotower", rebuilt), TwoTower)


# -- the loss ------------------------------------------------------------------


def test_logq_corrected_in_batch_softmax_matches_a_hand_computation() -> None:
    users = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    items = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    item_rows = torch.tensor([0, 1])
    log_q = torch.log(torch.tensor([0.75, 0.25]))
    # Row 0: logits [1/0.5 - log 0.75, 0/0.5 - log 0.25]; row 1: [0/0.5 - log 0.75, 1/0.5 - log 0.25].
    row0 = math.log(1 + math.exp((0 - math.log(0.25)) - (2 - math.log(0.75))))
    row1 = math.log(1 + math.exp((0 - math.log(0.75)) - (2 - math.log(0.25))))
    loss = in_batch_softmax_loss(users, items, item_rows, temperature=0.5, log_q=log_q)
    assert loss.item() == pytest.approx((row0 + row1) / 2, rel=1e-6)
    plain = in_batch_softmax_loss(users, items, item_rows, temperature=0.5, log_q=None)
    assert plain.item() == pytest.approx(math.log(1 + math.exp(-2.0)), rel=1e-6)
    # Subtracting log q lifts the rare item (q = 0.25) over the popular one: as row 0's negative it costs
    # more than uncorrected, as row 1's positive it costs less.
    assert row1 < math.log(1 + math.exp(-2.0)) < row0


def test_the_same_item_elsewhere_in_the_batch_is_not_a_negative() -> None:
    users = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    items = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    loss = in_batch_softmax_loss(users, items, torch.tensor([3, 3]), temperature=0.1, log_q=None)
    assert loss.item() == pytest.approx(0.0, abs=1e-7)


def test_sampling_log_probabilities_are_training_shares() -> None:
    log_q = sampling_log_probabilities(np.array([0, 0, 0, 1]), 3)
    assert log_q[:2].tolist() == pytest.approx([math.log(0.75), math.log(0.25)])
    assert log_q[2].item() == -math.inf


# -- the synthetic user-item source ------------------------------------------------


def test_synthetic_useritem_source_is_seeded_and_splits_per_user() -> None:
    first = SyntheticUserItemSource(users=50, items=40, extra_positives=5.0, seed=3, split="leave-last-out")
    again = SyntheticUserItemSource(users=50, items=40, extra_positives=5.0, seed=3, split="leave-last-out")
    every = first.interactions()
    np.testing.assert_array_equal(every.items, again.interactions().items)
    for code in (VAL, TEST):  # every user has >= 5 positives: one val and one test interaction each
        assert np.bincount(every.users[every.splits == code], minlength=50).tolist() == [1] * 50
    test_times = every.timestamps[every.splits == TEST]
    last_train = np.zeros(50, np.int64)
    np.maximum.at(last_train, every.users[every.splits == TRAIN], every.timestamps[every.splits == TRAIN])
    assert bool((last_train[every.users[every.splits == TEST]] < test_times).all())
    assert set(np.unique(every.labels)) == {0.0, 1.0}
    chunk = next(first.chunks("train"))
    assert {"user", "segment", "item", "genres", "release_year", "history", "history_liked", "rated_before",
            "liked_share"} <= set(chunk.columns)


def test_synthetic_useritem_is_a_named_source_with_an_oracle() -> None:
    source = open_source("synthetic-useritem", rows=500, split="leave-last-out")
    users, items = source.interactions().users[:4], source.interactions().items[:4]
    assert source.affinity(users, items).shape == (4,)
    with pytest.raises(ValueError, match=r"split 'leave-last-out' needs user ids.*not synthetic"):
        open_source("synthetic", rows=500, split="leave-last-out")
    # --items sizes the catalogue (benchmarks.recommend_serving serves 100,000 items); 1000 by default.
    assert len(source.catalogue()) == 1000
    assert len(open_source("synthetic-useritem", rows=500, items=3000).catalogue()) == 3000
    with pytest.raises(ValueError, match=r"items 3000 sets the catalogue of --data synthetic-useritem, not of synthetic"):
        open_source("synthetic", rows=500, items=3000)


@pytest.mark.parametrize(("changes", "message"), [
    (dict(users=0), r"users must be >= 1, got 0"),
    (dict(items=10, extra_positives=20.0), r"cannot have 5 \+ 20.0 positives among 10 items"),
    (dict(sharpness=0.0), r"sharpness must be > 0.*got 0.0"),
])
def test_synthetic_useritem_options_are_checked(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SyntheticUserItemSource(**changes)


# -- training, evaluation and the checkpoint ------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """One tiny run through the CLI (``python -m training --model twotower``): its checkpoint and metrics."""
    out = tmp_path_factory.mktemp("twotower") / "run"
    code = training_main(["--model", "twotower", "--data", "synthetic-useritem", "--rows", str(TINY_RUN["rows"]),
                          "--eval-users", str(TINY_RUN["eval_users"]), "--epochs", str(TINY_RUN["epochs"]),
                          "--batch-size", str(TINY_RUN["batch_size"]), "--threads", "1", "--quiet", "--out", str(out)])
    assert code == 0
    return out, json.loads((out / "metrics.json").read_text())


def test_two_tower_beats_popularity_and_reports_the_oracle(trained: tuple) -> None:
    _, metrics = trained
    model, popularity = metrics["ranking_full_catalogue"], metrics["baselines"]["item_popularity"]
    # Measured 0.70 against 0.42 here (seed 0); seeds 1 and 2 gave 0.70 / 0.39 and 0.67 / 0.50: the margin
    # holds with room to spare for another BLAS or thread count.
    assert model["recall@100"] > popularity["recall@100"] + 0.1
    assert metrics["oracle"]["recall@100"] >= model["recall@100"] - 0.05
    assert "matrix_factorization" in metrics["baselines"]
    for key in ("recall@10", "recall@100", "recall@200", "ndcg@10", "hr@10"):
        assert 0 <= model[key] <= 1
    assert model["recall@10"] <= model["recall@100"] <= model["recall@200"]
    assert metrics["best_epoch"] >= 1 and metrics["history"][0]["val_recall@100"] > 0


def test_checkpoint_rebuilds_the_model(trained: tuple) -> None:
    out, metrics = trained
    for name in ("model.pt", "config.json", "user_features.json", "item_features.json", "catalogue.parquet",
                 "queries.parquet", "metrics.json", "learning_curve.png"):
        assert (out / name).is_file(), name
    checkpoint = load_retrieval_checkpoint(out)
    assert checkpoint.metrics == metrics
    assert len(checkpoint.catalogue) == 1_000 and checkpoint.catalogue.dtype == np.int64
    assert set(checkpoint.item_columns) == {"item", "genres", "release_year"}
    assert {"user", "history", "rated_before"} <= set(checkpoint.queries)
    dense, sparse = checkpoint.user_spec.encode_columns(checkpoint.queries, len(checkpoint.queries["rated_before"]))
    with torch.inference_mode():
        vectors = checkpoint.model.user_tower(torch.from_numpy(dense), torch.from_numpy(sparse))
    assert vectors.shape == (len(dense), checkpoint.config.output_dim)
    assert checkpoint.config.user_table_sizes == checkpoint.user_spec.table_sizes


def test_a_failed_run_leaves_no_checkpoint(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "never"
    with pytest.raises(ValueError, match="needs user-item data"):
        train_retrieval(RetrievalOptions(out=str(out), data="synthetic", rows=1_000, progress=False))
    assert not out.exists()
    assert training_main(["--model", "twotower", "--data", "synthetic", "--rows", "1000", "--out", str(out)]) == 2
    assert "error: --model twotower needs user-item data" in capsys.readouterr().err
    assert not out.exists()


def test_retrieval_options_are_checked() -> None:
    with pytest.raises(ValueError, match=r"temperature must be > 0, got 0.0"):
        RetrievalOptions(out="x", temperature=0.0)
    with pytest.raises(ValueError, match=r"batch_size must be >= 2 .*got 1"):
        RetrievalOptions(out="x", batch_size=1)


def test_movielens_features_split_into_the_two_towers(tmp_path, write_movielens) -> None:
    directory = write_movielens("100k", tmp_path / "ml")
    out = tmp_path / "run"
    metrics = train_retrieval(RetrievalOptions(out=str(out), data="movielens", data_path=str(directory),
                                               split="leave-last-out", epochs=1, batch_size=2, threads=1,
                                               progress=False))
    checkpoint = load_retrieval_checkpoint(out)
    assert checkpoint.item_spec.feature_names == ["release_year", "item", "genres"]
    assert set(checkpoint.user_spec.feature_names) == {"user", "age", "gender", "occupation", "zip_prefix", "history",
                                                       "history_liked", "rated_before", "liked_share"}
    np.testing.assert_array_equal(checkpoint.catalogue, [1, 2, 3, 4, 5])
    assert {"item_popularity", "matrix_factorization"} == set(metrics["baselines"]) and "oracle" not in metrics


def test_the_ranking_loop_refuses_the_retrieval_model():
    from training.train import TrainOptions

    with pytest.raises(ValueError, match="twotower is a retrieval model"):
        TrainOptions(model="twotower")
