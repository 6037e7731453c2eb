"""Optimizers and the training step: learning, sparse row-wise updates, frozen tables, DDP."""

from __future__ import annotations

import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from training.models import DLRM, DLRMConfig, LogisticConfig, LogisticRegression, WideDeep, WideDeepConfig
from training.optim import (
    OPTIMIZER_NAMES,
    EarlyStopping,
    RowWiseAdagrad,
    build_optimizer,
    embedding_parameters,
    init_embedding_table,
    train_step,
)

TABLE_SIZES = (20, 30, 10)
LEARNING_RATES = {"rowwise_adagrad": (0.01, 0.05), "sparse_adam": (0.01, 0.05), "sgd": (0.5, 0.5)}


def toy_problem(count: int, *, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Labels depend on one dense feature and on the id of table 0: learnable by every model."""
    generator = torch.Generator().manual_seed(seed)
    dense = torch.randn(count, 2, generator=generator)
    sparse = torch.stack([torch.randint(0, size, (count,), generator=generator) for size in TABLE_SIZES], dim=1)
    logit = 2.0 * dense[:, 0] + torch.where(sparse[:, 0] % 2 == 0, 2.0, -2.0)
    labels = (torch.rand(count, generator=generator) < torch.sigmoid(logit)).float()
    return dense, sparse, labels


def tiny_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "dlrm":
        return DLRM(DLRMConfig(num_dense=2, table_sizes=TABLE_SIZES, embedding_dim=8, bottom_mlp=(8,), top_mlp=(8,)))
    if name == "widedeep":
        config = WideDeepConfig(num_dense=2, table_sizes=TABLE_SIZES, embedding_dim=8, deep_mlp=(8,), cross_buckets=32)
        return WideDeep(config)
    return LogisticRegression(LogisticConfig(num_dense=2, table_sizes=TABLE_SIZES))


@pytest.mark.parametrize("optimizer_name", OPTIMIZER_NAMES)
@pytest.mark.parametrize("model_name", ["dlrm", "widedeep", "logistic"])
def test_training_steps_lower_the_loss(model_name: str, optimizer_name: str) -> None:
    model = tiny_model(model_name)
    lr, embedding_lr = LEARNING_RATES[optimizer_name]
    optimizer = build_optimizer(model, lr=lr, embedding_lr=embedding_lr, name=optimizer_name)
    dense, sparse, labels = toy_problem(512, seed=1)
    first = train_step(model, optimizer, dense, sparse, labels)
    for _ in range(60):
        last = train_step(model, optimizer, dense, sparse, labels)
    assert isinstance(last, float)
    assert last < 0.8 * first, (first, last)


def test_embedding_tables_get_sparse_gradients_and_a_sparse_optimizer() -> None:
    model = tiny_model("widedeep")
    tables = embedding_parameters(model)
    # wide id weights, deep embeddings, cross weights
    assert len(tables) == 3
    optimizer = build_optimizer(model, lr=0.01)
    assert isinstance(optimizer.optimizers["sparse"], RowWiseAdagrad)
    dense, sparse, labels = toy_problem(8, seed=2)
    train_step(model, optimizer, dense, sparse, labels)
    assert all(table.grad is None or table.grad.is_sparse for table in tables)


def test_rowwise_adagrad_matches_the_formula_with_duplicate_rows() -> None:
    weight = torch.nn.Parameter(torch.zeros(5, 2))
    optimizer = RowWiseAdagrad([weight], lr=0.5, eps=0.0)
    # rows 1 and 3; row 1 appears twice, so its gradients add up first
    weight.grad = torch.sparse_coo_tensor(
        torch.tensor([[1, 3, 1]]), torch.tensor([[1.0, 3.0], [2.0, 2.0], [1.0, 1.0]]), (5, 2), check_invariants=True
    )
    optimizer.step()
    row1_grad, row3_grad = torch.tensor([2.0, 4.0]), torch.tensor([2.0, 2.0])
    expected = torch.zeros(5, 2)
    expected[1] = -0.5 * row1_grad / row1_grad.pow(2).mean().sqrt()
    expected[3] = -0.5 * row3_grad / row3_grad.pow(2).mean().sqrt()
    assert torch.allclose(weight.detach(), expected)
    assert torch.allclose(optimizer.state[weight]["sum"], torch.tensor([0.0, 10.0, 0.0, 4.0, 0.0]))


@pytest.mark.parametrize("optimizer_name", OPTIMIZER_NAMES)
def test_frozen_table_stays_unchanged_while_others_learn(optimizer_name: str) -> None:
    model = tiny_model("dlrm")
    warm = torch.full((TABLE_SIZES[1], 8), 0.25)
    init_embedding_table(model, 1, warm, freeze=True)
    tables = model.feature_embeddings()
    before_other = tables.table(0).detach().clone()
    lr, embedding_lr = LEARNING_RATES[optimizer_name]
    optimizer = build_optimizer(model, lr=lr, embedding_lr=embedding_lr, name=optimizer_name)
    dense, sparse, labels = toy_problem(256, seed=3)
    for _ in range(5):
        train_step(model, optimizer, dense, sparse, labels)
    assert torch.equal(tables.table(1), warm)
    assert not torch.equal(tables.table(0), before_other)


def test_a_deep_copy_keeps_its_table_frozen() -> None:
    model = tiny_model("dlrm")
    init_embedding_table(model, 0, torch.zeros(TABLE_SIZES[0], 8), freeze=True)
    copied = copy.deepcopy(model)
    train_step(copied, build_optimizer(copied, lr=0.1), *toy_problem(64, seed=6))
    assert torch.equal(copied.feature_embeddings().table(0), torch.zeros(TABLE_SIZES[0], 8))


def test_fully_frozen_tables_are_left_out_of_the_optimizer() -> None:
    model = tiny_model("logistic")
    for index, size in enumerate(TABLE_SIZES):
        init_embedding_table(model, index, torch.full((size, 1), 0.1), freeze=True)
    weights = model.feature_embeddings().fused.weight
    assert not weights.requires_grad
    optimizer = build_optimizer(model, lr=0.1)
    assert "sparse" not in optimizer.optimizers
    train_step(model, optimizer, *toy_problem(64, seed=4))
    assert torch.equal(weights, torch.full_like(weights, 0.1))
    init_embedding_table(model, 0, torch.zeros(TABLE_SIZES[0], 1), freeze=False)  # unfreezing one restores grads
    assert weights.requires_grad


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": 0.0}, "lr must be > 0, got 0.0"),
        ({"lr": 0.1, "embedding_lr": -1.0}, "embedding_lr must be > 0, got -1.0"),
        ({"lr": 0.1, "name": "adamw"}, "unknown optimizer 'adamw'; choose one of rowwise_adagrad, sparse_adam, sgd"),
    ],
)
def test_build_optimizer_rejects_bad_options(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_optimizer(tiny_model("logistic"), **kwargs)


def test_init_embedding_table_rejects_models_without_tables() -> None:
    with pytest.raises(ValueError, match="Linear has no per-feature embedding tables"):
        init_embedding_table(torch.nn.Linear(2, 1), 0, torch.zeros(2, 1), freeze=False)


def _ddp_worker(rank: int, world_size: int, port: int, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        model = tiny_model("dlrm")
        init_embedding_table(model, 2, torch.zeros(TABLE_SIZES[2], 8), freeze=True)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        optimizer = build_optimizer(ddp, lr=0.01, embedding_lr=0.05)
        dense, sparse, labels = toy_problem(64, seed=10 + rank)  # each rank its own data
        for _ in range(3):
            train_step(ddp, optimizer, dense, sparse, labels)
        results[rank] = [p.detach().clone() for p in model.parameters()]
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_gloo_steps_keep_replicas_identical() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_ddp_worker, args=(2, port, results), nprocs=2, join=True)
        first, second = results[0], results[1]
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    offsets = tiny_model("dlrm").feature_embeddings().table_offsets
    table_weights = [p for p in first if p.shape == (sum(TABLE_SIZES), 8)][0]
    assert torch.equal(table_weights[offsets[2] : offsets[3]], torch.zeros(TABLE_SIZES[2], 8))


def test_wide_deep_without_crosses_leaves_no_parameter_waiting_for_a_gradient() -> None:
    model = WideDeep(WideDeepConfig(num_dense=2, table_sizes=TABLE_SIZES, embedding_dim=8, deep_mlp=(8,), cross_buckets=0))
    dense, sparse, labels = toy_problem(32, seed=5)
    train_step(model, build_optimizer(model, lr=0.01), dense, sparse, labels)
    # DDP (find_unused_parameters=False) needs a gradient for every parameter that requires one.
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


# -- regularization ----------------------------------------------------------------


def test_no_weight_decay_steps_exactly_as_adam_and_rowwise_adagrad() -> None:
    # Off by default: the optimizer must compute what it computed before decay existed.
    ours, reference = tiny_model("dlrm"), tiny_model("dlrm")
    tables = embedding_parameters(reference)
    dense_params = [p for p in reference.parameters() if all(p is not t for t in tables)]
    by_hand = [torch.optim.Adam(dense_params, lr=0.01, fused=True), RowWiseAdagrad(tables, lr=0.05)]
    optimizer = build_optimizer(ours, lr=0.01, embedding_lr=0.05)
    for step in range(5):
        dense, sparse, labels = toy_problem(64, seed=20 + step)
        train_step(ours, optimizer, dense, sparse, labels)
        for inner in by_hand:
            inner.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(reference(dense, sparse), labels).backward()
        for inner in by_hand:
            inner.step()
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), reference.parameters()))


@pytest.mark.parametrize("optimizer_name", ["rowwise_adagrad", "sgd"])
def test_weight_decay_is_decoupled_and_spares_biases(optimizer_name: str) -> None:
    model = tiny_model("dlrm")
    optimizer = build_optimizer(model, lr=0.1, name=optimizer_name, weight_decay=0.5)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    tables = {id(p) for p in embedding_parameters(model)}
    for p in model.parameters():
        if id(p) not in tables:
            p.grad = torch.zeros_like(p)  # no gradient: only the decay moves anything
    optimizer.step()
    for name, p in model.named_parameters():
        if id(p) in tables:
            continue
        expected = before[name] * (1 - 0.1 * 0.5) if p.dim() >= 2 else before[name]
        torch.testing.assert_close(p.detach(), expected)


@pytest.mark.parametrize("optimizer_name", OPTIMIZER_NAMES)
def test_embedding_weight_decay_shrinks_only_the_rows_a_step_touched(optimizer_name: str) -> None:
    model = tiny_model("logistic")
    weight = model.feature_embeddings().fused.weight
    with torch.no_grad():
        weight.fill_(1.0)
    optimizer = build_optimizer(model, lr=0.1, name=optimizer_name, embedding_weight_decay=0.5)
    # Rows 2 and 7 touched (2 twice), with a zero data gradient: only the L2 term acts.
    weight.grad = torch.sparse_coo_tensor(torch.tensor([[2, 7, 2]]), torch.zeros(3, 1), weight.shape, check_invariants=True)
    optimizer.step()
    touched = torch.zeros(weight.shape[0], dtype=torch.bool)
    touched[[2, 7]] = True
    assert (weight[touched] < 1.0).all()
    assert torch.equal(weight[~touched], torch.ones(int((~touched).sum()), 1))
    if optimizer_name == "sgd":
        torch.testing.assert_close(weight[touched], torch.full((2, 1), 1.0 - 0.1 * 0.5))


def test_regularized_training_still_learns() -> None:
    model = tiny_model("widedeep")
    optimizer = build_optimizer(model, lr=0.01, embedding_lr=0.05, weight_decay=0.01, embedding_weight_decay=1e-4)
    dense, sparse, labels = toy_problem(512, seed=1)
    first = train_step(model, optimizer, dense, sparse, labels)
    for _ in range(60):
        last = train_step(model, optimizer, dense, sparse, labels)
    assert last < 0.8 * first, (first, last)


@pytest.mark.parametrize("option", ["weight_decay", "embedding_weight_decay"])
def test_weight_decay_must_not_be_negative(option: str) -> None:
    with pytest.raises(ValueError, match=rf"{option} must be >= 0, got -0.1"):
        build_optimizer(tiny_model("logistic"), lr=0.1, **{option: -0.1})


def test_early_stopping_keeps_the_best_weights_and_stops_after_patience_epochs_without_gain():
    model = nn.Linear(2, 1)
    stopping = EarlyStopping(model, patience=2, min_gain=0.01)
    scores = {1: 0.50, 2: 0.60, 3: 0.605, 4: 0.59}  # epoch 3: best, but not a gain of 0.01
    weights = {}
    for epoch, score in scores.items():
        with torch.no_grad():
            model.weight.fill_(epoch)
        weights[epoch] = stopping.update(epoch, score)
        if stopping.should_stop:
            break
    assert weights == {1: True, 2: True, 3: True, 4: False}
    assert stopping.should_stop and stopping.best_epoch == 3 and stopping.best_score == 0.605
    stopping.restore_best()
    assert torch.equal(model.weight, torch.full((1, 2), 3.0))


def test_early_stopping_does_not_stop_while_scores_gain():
    stopping = EarlyStopping(nn.Linear(2, 1), patience=1, min_gain=0.01)
    for epoch, score in enumerate([0.1, 0.2, 0.3, 0.4], start=1):
        stopping.update(epoch, score)
        assert not stopping.should_stop
    assert stopping.best_epoch == 4
