"""Models: shapes (B/F/D notation), golden values, config checks, pooling, export parity."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import onnxruntime as ort
import pytest
import torch

from training.models import (
    DLRM,
    DLRMConfig,
    LogisticConfig,
    LogisticRegression,
    WideDeep,
    WideDeepConfig,
    build_model,
    config_from_dict,
    config_to_dict,
)
from training.models.dlrm import CrossInteractionArch, CrossLayer, InteractionArch
from training.models.layers import EmbeddingTables
from training.models.wide_deep import CrossArch
from training.optim import build_optimizer, train_step

NUM_DENSE = 3
TABLE_SIZES = (6, 9, 5, 7)
TABLE_WIDTHS = (1, 3, 1, 1)  # feature 1 is multi-valued: 3 columns
S = sum(TABLE_WIDTHS)
F = len(TABLE_SIZES)


def tiny_configs() -> dict[str, object]:
    common = {"num_dense": NUM_DENSE, "table_sizes": TABLE_SIZES, "table_widths": TABLE_WIDTHS}
    return {
        "dlrm": DLRMConfig(**common, embedding_dim=8, bottom_mlp=(16,), top_mlp=(16,)),
        "widedeep": WideDeepConfig(**common, embedding_dim=8, deep_mlp=(16,), cross_buckets=64),
        "logistic": LogisticConfig(**common),
    }


def batch(batch_size: int, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    dense = torch.randn(batch_size, NUM_DENSE, generator=generator)
    columns = [
        torch.randint(0, size, (batch_size,), generator=generator)
        for size, width in zip(TABLE_SIZES, TABLE_WIDTHS)
        for _ in range(width)
    ]
    return dense, torch.stack(columns, dim=1)


def seeded_model(name: str, *, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model(name, tiny_configs()[name])
    if name == "logistic":  # starts at zero like any logistic regression: give it weights to compare
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.normal_()
    return model.eval()


# -- shapes --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["dlrm", "widedeep", "logistic"])
@pytest.mark.parametrize("batch_size", [1, 5])
def test_forward_returns_one_float_logit_per_row(name: str, batch_size: int) -> None:
    dense, sparse = batch(batch_size)  # (B, N), (B, S)
    logits = seeded_model(name)(dense, sparse)
    assert logits.shape == (batch_size,)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_dlrm_intermediate_shapes() -> None:
    model = seeded_model("dlrm")
    dense, sparse = batch(5)
    dense_vector = model.dense_arch(dense)
    embedded = model.sparse_arch(sparse)
    interactions = model.interaction_arch(dense_vector, embedded)
    assert dense_vector.shape == (5, 8)  # (B, D)
    assert embedded.shape == (5, F, 8)  # (B, F, D)
    assert interactions.shape == (5, 8 + F * (F + 1) // 2)  # (B, D + F*(F+1)/2)


def test_interaction_is_upper_triangle_of_gram_matrix() -> None:
    model = seeded_model("dlrm")
    dense_vector, embedded = torch.randn(2, 8), torch.randn(2, F, 8)
    out = model.interaction_arch(dense_vector, embedded)
    combined = torch.cat([dense_vector.unsqueeze(1), embedded], dim=1)
    expected = [combined[:, i] @ combined[:, j].T for i in range(F + 1) for j in range(i + 1, F + 1)]
    assert torch.allclose(out[:, :8], dense_vector)
    assert torch.allclose(out[:, 8:], torch.stack([e.diagonal() for e in expected], dim=1), atol=1e-5)


def test_kaggle_preset_matches_facebookresearch_dlrm() -> None:
    config = DLRMConfig.kaggle(num_dense=13, table_sizes=(10,) * 26)
    model = DLRM(config)
    bottom = [layer for layer in model.dense_arch.mlp.layers if isinstance(layer, torch.nn.Linear)]
    top = [layer for layer in model.over_arch.mlp.layers if isinstance(layer, torch.nn.Linear)]
    assert [bottom[0].in_features] + [layer.out_features for layer in bottom] == [13, 512, 256, 64, 16]
    assert [top[0].in_features] + [layer.out_features for layer in top] == [367, 512, 256, 1]
    assert config.embedding_dim == 16
    assert model.feature_embeddings().fused.weight.shape == (260, 16)


def test_wide_deep_crosses_every_single_valued_pair_by_default() -> None:
    config = tiny_configs()["widedeep"]
    assert config.resolved_cross_pairs() == ((0, 2), (0, 3), (2, 3))  # feature 1 is multi-valued
    assert WideDeepConfig(num_dense=1, table_sizes=(3, 3), cross_buckets=0).resolved_cross_pairs() == ()


def test_wide_deep_cross_scale_multiplies_the_crosses_contribution() -> None:
    dense, sparse = batch(5)
    logits = {}
    for scale in (0.1, 1.0):
        torch.manual_seed(0)
        config = WideDeepConfig(num_dense=NUM_DENSE, table_sizes=TABLE_SIZES, table_widths=TABLE_WIDTHS,
                                embedding_dim=8, deep_mlp=(16,), cross_buckets=64, cross_scale=scale)
        model = build_model("widedeep", config).eval()
        with torch.no_grad():
            model.crosses.weights.weight.fill_(0.5)  # crosses start at zero: give them weight
            logits[scale] = model(dense, sparse)
            crosses = model.crosses(sparse)
    # Same weights, same seed: the two logits differ by exactly 0.9 x the crosses' sum.
    torch.testing.assert_close(logits[1.0] - logits[0.1], 0.9 * crosses)
    with pytest.raises(ValueError, match=r"cross_scale must be a number > 0, got 0"):
        WideDeepConfig(num_dense=1, table_sizes=(3, 3), cross_scale=0)


# -- golden values -------------------------------------------------------------

# Recorded from torch 2.13 (CPU); they pin initialisation, pooling, crosses and layer order.
GOLDEN = {
    "dlrm": [0.489691, 0.364143, 0.306773],
    "widedeep": [-1.289447, -1.361132, -1.430886],
    "logistic": [3.250037, -3.169056, 1.260743],
}


@pytest.mark.parametrize("name", ["dlrm", "widedeep", "logistic"])
def test_seeded_golden_values(name: str) -> None:
    dense, sparse = batch(3, seed=1)
    with torch.no_grad():
        logits = seeded_model(name)(dense, sparse)
    assert torch.allclose(logits, torch.tensor(GOLDEN[name]), atol=1e-5), logits.tolist()


# -- multi-valued pooling and embeddings --------------------------------------


def test_multi_valued_features_mean_pool_non_zero_ids() -> None:
    tables = EmbeddingTables((4, 5), (1, 3), 2)
    with torch.no_grad():
        tables.fused.weight.copy_(torch.arange(18, dtype=torch.float32).view(9, 2))
    sparse = torch.tensor([[2, 1, 3, 0], [0, 0, 0, 0], [3, 4, 4, 4]])
    pooled = tables(sparse)  # (B, F, D)
    assert pooled.shape == (3, 2, 2)
    second = tables.table(1)
    assert torch.equal(pooled[:, 0], tables.table(0)[[2, 0, 3]])  # single-valued: row as is, 0 included
    assert torch.allclose(pooled[0, 1], (second[1] + second[3]) / 2)  # padding 0 ignored
    assert torch.equal(pooled[1, 1], torch.zeros(2))  # no ids -> zero vector
    assert torch.allclose(pooled[2, 1], second[4])


def test_load_table_overwrites_one_feature_and_checks_shape() -> None:
    model = seeded_model("dlrm")
    tables = model.feature_embeddings()
    before = tables.table(0).detach().clone()
    tables.load_table(2, torch.ones(5, 8), freeze=True)
    assert torch.equal(tables.table(2), torch.ones(5, 8))
    assert torch.equal(tables.table(0), before)
    assert tables.frozen_tables() == (2,)
    with pytest.raises(ValueError, match=r"table 2: weights have shape \(4, 8\), expected \(5, 8\)"):
        tables.load_table(2, torch.ones(4, 8), freeze=False)
    with pytest.raises(ValueError, match="table index 7 out of range: the model has 4 tables"):
        tables.table(7)
    with pytest.raises(ValueError, match="table 0: weights contain NaN"):
        tables.load_table(0, torch.full((6, 8), math.nan), freeze=False)


def test_cross_hash_stays_in_range_for_huge_ids() -> None:
    crosses = CrossArch(((0, 1),), (1, 1), 97)
    sparse = torch.tensor([[2**62, 2**62 + 7], [0, 0], [123456789012, 5], [2**31 - 2, 2**31 - 2]])
    with torch.no_grad():
        crosses.weights.weight.copy_(torch.arange(97, dtype=torch.float32).unsqueeze(1))
        buckets = crosses(sparse)  # one pair: the sum is the bucket itself
    assert ((buckets >= 0) & (buckets < 97)).all()
    assert buckets.tolist() == [float(b) for b in _reference_buckets(sparse, 97)]
    assert torch.equal(torch.jit.script(crosses)(sparse), buckets)


def _reference_buckets(sparse: torch.Tensor, buckets: int) -> list[int]:
    """The cross hash in Python's unbounded ints: equal means int64 never overflowed."""
    prime = 2**31 - 1
    salt = 374_761_393 % prime
    out = []
    for left, right in sparse.tolist():
        mixed = ((left % prime) * 1_540_483_477 + salt) % prime
        mixed = ((mixed + right % prime) * 668_265_263) % prime
        out.append(mixed % buckets)
    return out


# -- config validation ---------------------------------------------------------


DLRM_BASE = {"num_dense": 2, "table_sizes": (3, 4)}
WIDE_BASE = {"num_dense": 2, "table_sizes": (3, 4)}


@pytest.mark.parametrize(
    ("factory", "kwargs", "message"),
    [
        (DLRMConfig, {**DLRM_BASE, "num_dense": 0}, "DLRMConfig: num_dense must be an int >= 1, got 0"),
        (DLRMConfig, {**DLRM_BASE, "table_sizes": ()}, r"table_sizes must be a non-empty tuple of ints, got \(\)"),
        (DLRMConfig, {**DLRM_BASE, "table_sizes": (3, 0)}, r"table_sizes\[1\] must be an int >= 1, got 0"),
        (DLRMConfig, {**DLRM_BASE, "table_sizes": [3, 4]}, r"table_sizes must be a non-empty tuple .*got \[3, 4\]"),
        (DLRMConfig, {**DLRM_BASE, "table_widths": (1,)}, "table_widths has 1 entries but table_sizes has 2"),
        (DLRMConfig, {**DLRM_BASE, "table_widths": (1, 0)}, r"table_widths\[1\] must be an int >= 1, got 0"),
        (DLRMConfig, {**DLRM_BASE, "embedding_dim": 0}, "embedding_dim must be an int >= 1, got 0"),
        (DLRMConfig, {**DLRM_BASE, "top_mlp": (8, -1)}, r"top_mlp must be a tuple of ints >= 1, got \(8, -1\)"),
        (WideDeepConfig, {**WIDE_BASE, "cross_buckets": -1}, "cross_buckets must be an int >= 0, got -1"),
        (WideDeepConfig, {**WIDE_BASE, "cross_pairs": ((0, 2),)},
         r"cross pair \(0, 2\) must be two different feature indices in \[0, 2\)"),
        (WideDeepConfig, {**WIDE_BASE, "cross_pairs": ((True, 0),)},
         r"cross pair \(True, 0\) must be two different feature indices in \[0, 2\)"),
        (WideDeepConfig, {**WIDE_BASE, "cross_pairs": ((0, 1), (1, 0))}, r"cross pair \(1, 0\) is listed twice"),
        (WideDeepConfig, {**WIDE_BASE, "table_widths": (1, 2), "cross_pairs": ((0, 1),)},
         r"cross pair \(0, 1\): feature 1 is multi-valued"),
        (LogisticConfig, {**DLRM_BASE, "num_dense": -3}, "LogisticConfig: num_dense must be an int >= 1, got -3"),
    ],
)
def test_config_validation_names_the_bad_value(factory: type, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        factory(**kwargs)


@pytest.mark.parametrize("name", ["dlrm", "widedeep", "logistic"])
def test_config_round_trips_through_json(name: str) -> None:
    import json

    config = tiny_configs()[name]
    if name == "widedeep":
        config = WideDeepConfig(num_dense=2, table_sizes=(3, 4, 5), cross_pairs=((0, 2), (1, 2)), cross_buckets=8)
    assert config_from_dict(name, json.loads(json.dumps(config_to_dict(config)))) == config


# -- export parity -------------------------------------------------------------


@pytest.mark.parametrize("name", ["dlrm", "widedeep", "logistic"])
def test_torchscript_matches_eager(name: str) -> None:
    model = seeded_model(name)
    scripted = torch.jit.script(model)
    for batch_size in (1, 7):
        dense, sparse = batch(batch_size, seed=batch_size)
        with torch.no_grad():
            assert torch.allclose(scripted(dense, sparse), model(dense, sparse), atol=1e-6)


@pytest.mark.parametrize("name", ["dlrm", "widedeep", "logistic"])
def test_onnx_export_runs_in_onnxruntime_with_dynamic_batch(name: str) -> None:
    model = seeded_model(name)
    dense, sparse = batch(4)
    batch_dim = torch.export.Dim("batch")
    program = torch.onnx.export(
        model,
        (dense, sparse),
        input_names=["dense", "sparse"],
        output_names=["logits"],
        opset_version=18,
        dynamo=True,
        dynamic_shapes={"dense": {0: batch_dim}, "sparse": {0: batch_dim}},
    )
    session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    for batch_size in (1, 9):
        dense, sparse = batch(batch_size, seed=10 + batch_size)
        assert sparse.dtype == torch.int64
        (logits,) = session.run(None, {"dense": dense.numpy(), "sparse": sparse.numpy()})
        with torch.no_grad():
            expected = model(dense, sparse).numpy()
        assert logits.shape == (batch_size,)
        np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=0)


def test_models_are_registered_under_their_names() -> None:
    assert isinstance(seeded_model("dlrm"), DLRM)
    assert isinstance(seeded_model("widedeep"), WideDeep)
    assert isinstance(seeded_model("logistic"), LogisticRegression)


# -- DLRM with a DCN-v2 cross network ----------------------------------------------

D = 8
K = (F + 1) * D  # the cross network's width: the dense vector and F embeddings, concatenated


def dcn_model(*, rank: int | None = None, dropout: float = 0.0, seed: int = 0) -> DLRM:
    torch.manual_seed(seed)
    config = DLRMConfig(
        num_dense=NUM_DENSE, table_sizes=TABLE_SIZES, table_widths=TABLE_WIDTHS, embedding_dim=D,
        bottom_mlp=(16,), top_mlp=(16,), interaction="dcn", cross_layers=2, cross_rank=rank, dropout=dropout,
    )
    return DLRM(config).eval()


@pytest.mark.parametrize("rank", [None, 4])
def test_dcn_shapes_and_derived_top_mlp_input(rank: int | None) -> None:
    model = dcn_model(rank=rank)
    dense, sparse = batch(5)
    dense_vector, embedded = model.dense_arch(dense), model.sparse_arch(sparse)  # (B, D), (B, F, D)
    crossed = model.interaction_arch(dense_vector, embedded)
    assert isinstance(model.interaction_arch, CrossInteractionArch)
    assert crossed.shape == (5, K)  # (B, (F+1)*D)
    assert model.over_arch.mlp.layers[0].in_features == K
    assert model(dense, sparse).shape == (5,)
    weights = [tuple(p.shape) for p in model.interaction_arch.layers[0].parameters() if p.dim() == 2]
    assert weights == ([(K, K)] if rank is None else [(rank, K), (K, rank)])  # W, or V^T then U


def test_cross_layer_is_x0_times_affine_plus_x() -> None:
    torch.manual_seed(3)
    x0, x = torch.randn(4, 12), torch.randn(4, 12)
    full, low = CrossLayer(12, None), CrossLayer(12, 3)
    with torch.no_grad():
        for layer in (full, low):
            for parameter in layer.parameters():
                parameter.normal_()
        w, b = full.project.weight, full.project.bias
        torch.testing.assert_close(full(x0, x), x0 * (x @ w.T + b) + x)
        v, u = low.project[0].weight, low.project[1]
        torch.testing.assert_close(low(x0, x), x0 * ((x @ v.T) @ u.weight.T + u.bias) + x)
    fresh = CrossLayer(12, None)
    assert torch.equal(fresh.project.bias, torch.zeros(12))  # starts as x0 * W x + x


def test_dcn_stacks_cross_layers_over_x0() -> None:
    model = dcn_model()
    dense_vector, embedded = torch.randn(3, D), torch.randn(3, F, D)
    x0 = torch.cat([dense_vector.unsqueeze(1), embedded], dim=1).flatten(1)
    expected = x0
    for layer in model.interaction_arch.layers:
        expected = x0 * layer.project(expected) + expected
    with torch.no_grad():
        torch.testing.assert_close(model.interaction_arch(dense_vector, embedded), expected)


# Recorded from torch 2.13 (CPU): they pin the cross layers' initialisation and order.
DCN_GOLDEN = {
    None: [-0.722968, -0.894091, -0.721235],
    4: [-0.427105, -0.167890, -0.301749],
}


@pytest.mark.parametrize("rank", [None, 4])
def test_dcn_seeded_golden_values(rank: int | None) -> None:
    dense, sparse = batch(3, seed=1)
    with torch.no_grad():
        logits = dcn_model(rank=rank)(dense, sparse)
    assert torch.allclose(logits, torch.tensor(DCN_GOLDEN[rank]), atol=1e-5), logits.tolist()


def test_dot_interaction_stays_the_default() -> None:
    config = tiny_configs()["dlrm"]
    assert (config.interaction, config.dropout) == ("dot", 0.0)
    assert isinstance(seeded_model("dlrm").interaction_arch, InteractionArch)


def assert_torchscript_and_onnx_parity(model: torch.nn.Module, *, seed: int, rows_without_ids: bool = False) -> None:
    """Frozen TorchScript and ONNX (dynamo, dynamic batch) score as the eager model at batch 1, 7 and 300;
    ``rows_without_ids``: half the rows carry no id of the multi-valued feature."""
    scripted = torch.jit.freeze(torch.jit.script(model))
    dense, sparse = batch(4)
    batch_dim = torch.export.Dim("batch")
    program = torch.onnx.export(
        model, (dense, sparse), input_names=["dense", "sparse"], output_names=["logits"], opset_version=18,
        dynamo=True, dynamic_shapes={"dense": {0: batch_dim}, "sparse": {0: batch_dim}},
    )
    session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    for batch_size in (1, 7, 300):
        dense, sparse = batch(batch_size, seed=seed + batch_size)
        if rows_without_ids:
            sparse[: batch_size // 2, 1:4] = 0
        with torch.no_grad():
            expected = model(dense, sparse)
            np.testing.assert_allclose(scripted(dense, sparse).numpy(), expected.numpy(), atol=1e-5, rtol=0)
        (logits,) = session.run(None, {"dense": dense.numpy(), "sparse": sparse.numpy()})
        np.testing.assert_allclose(logits, expected.numpy(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("rank", [None, 4])
def test_dcn_exports_to_torchscript_and_onnx_with_parity(rank: int | None) -> None:
    assert_torchscript_and_onnx_parity(dcn_model(rank=rank, dropout=0.3), seed=20)


def test_dcn_trains() -> None:
    model = dcn_model(rank=4).train()
    generator = torch.Generator().manual_seed(5)
    dense, sparse = batch(512, seed=5)
    labels = (torch.rand(512, generator=generator) < torch.sigmoid(2 * dense[:, 0] * (sparse[:, 0] % 2 - 0.5))).float()
    optimizer = build_optimizer(model, lr=0.01, embedding_lr=0.05)
    first = train_step(model, optimizer, dense, sparse, labels)
    for _ in range(80):
        last = train_step(model, optimizer, dense, sparse, labels)
    assert last < 0.8 * first, (first, last)


# -- dropout -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["dlrm", "widedeep"])
def test_dropout_acts_only_while_training_and_keeps_the_weight_layout(name: str) -> None:
    plain = seeded_model(name)
    torch.manual_seed(0)  # dropout adds no parameters: same seed, same weights
    dropped = build_model(name, replace(tiny_configs()[name], dropout=0.5)).eval()
    assert list(dropped.state_dict()) == list(plain.state_dict())
    dense, sparse = batch(64, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(dropped(dense, sparse), plain(dense, sparse))  # eval: identity
        dropped.train()
        assert not torch.allclose(dropped(dense, sparse), plain(dense, sparse))
    mlp = dropped.over_arch.mlp if name == "dlrm" else dropped.deep
    assert sum(isinstance(m, torch.nn.Dropout) for m in mlp.modules()) == 1  # the hidden layer only, not the output


@pytest.mark.parametrize(
    ("factory", "kwargs", "message"),
    [
        (DLRMConfig, {**DLRM_BASE, "interaction": "cross"}, r"interaction must be one of dot, dcn, got 'cross'"),
        (DLRMConfig, {**DLRM_BASE, "cross_layers": 0}, r"DLRMConfig: cross_layers must be an int >= 1, got 0"),
        (DLRMConfig, {**DLRM_BASE, "cross_rank": 0}, r"DLRMConfig: cross_rank must be an int >= 1, got 0"),
        (DLRMConfig, {**DLRM_BASE, "dropout": 1.0}, r"DLRMConfig: dropout must be a number in \[0, 1\), got 1.0"),
        (WideDeepConfig, {**WIDE_BASE, "dropout": -0.1}, r"WideDeepConfig: dropout must be a number in \[0, 1\), got -0.1"),
    ],
)
def test_new_config_options_name_the_bad_value(factory: type, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        factory(**kwargs)


def test_dcn_config_round_trips_and_older_configs_still_load() -> None:
    import json

    config = DLRMConfig(num_dense=2, table_sizes=(3, 4), interaction="dcn", cross_layers=2, cross_rank=5, dropout=0.2)
    assert config_from_dict("dlrm", json.loads(json.dumps(config_to_dict(config)))) == config
    older = {"num_dense": 2, "table_sizes": [3, 4], "table_widths": [], "embedding_dim": 16,
             "bottom_mlp": [64, 32], "top_mlp": [128, 64]}
    assert config_from_dict("dlrm", older) == DLRMConfig(num_dense=2, table_sizes=(3, 4))
    older_wide = {"num_dense": 2, "table_sizes": [3, 4], "deep_mlp": [8], "cross_buckets": 8}
    assert config_from_dict("widedeep", older_wide).dropout == 0.0


# -- attention pooling (DIN) ---------------------------------------------------------

ATTENTION = ((1, 0),)  # feature 1 (multi-valued, 3 columns) pooled by attention to feature 0


def attention_model(name: str, *, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(name, replace(tiny_configs()[name], attention=ATTENTION)).eval()


@pytest.mark.parametrize("name", ["dlrm", "widedeep"])
def test_fresh_attention_pools_by_the_mean(name: str) -> None:
    plain, attending = seeded_model(name), attention_model(name)
    result = attending.load_state_dict(plain.state_dict(), strict=False)
    assert result.unexpected_keys == [] and all(".attention.0.unit." in key for key in result.missing_keys)
    dense, sparse = batch(64, seed=4)
    sparse[:5, 1:4] = 0  # rows without any id of the pooled feature
    with torch.no_grad():
        torch.testing.assert_close(attending(dense, sparse), plain(dense, sparse), rtol=0, atol=1e-6)


def test_attention_weights_are_a_softmax_over_the_present_ids() -> None:
    tables = EmbeddingTables((4, 6), (1, 3), 2, attention=((1, 0),), attention_mlp=(5,))
    unit = tables.attention[0]
    with torch.no_grad():
        for parameter in unit.parameters():
            parameter.normal_()  # scores that differ from id to id
    sparse = torch.tensor([[2, 1, 3, 0], [1, 0, 0, 0], [3, 5, 5, 4]])  # (B, S): id 0 of feature 1 is padding
    with torch.no_grad():
        pooled = tables(sparse)  # (B, F, D)
        rows = tables.table(1)[sparse[:, 1:]]  # (B, W, D)
        candidate = tables.table(0)[sparse[:, :1]].expand_as(rows)  # (B, W, D)
        scores = unit.unit(torch.cat([rows, candidate, rows * candidate, rows - candidate], dim=2)).squeeze(2)
        scores = scores.masked_fill(sparse[:, 1:] == 0, -math.inf)  # (B, W)
        weights = torch.softmax(scores, dim=1).nan_to_num(0.0)  # (B, W); a row without ids: all 0
        expected = (weights.unsqueeze(2) * rows).sum(dim=1)  # (B, D)
        torch.testing.assert_close(pooled[:, 1], expected)
        torch.testing.assert_close(pooled[:, 0], tables.table(0)[sparse[:, 0]])  # the candidate itself: as before
        # Huge scores stay finite, and padding never gets a weight.
        unit.unit.layers[-1].bias.fill_(1e4)
        assert torch.isfinite(tables(sparse)).all()
        assert torch.equal(tables(torch.tensor([[1, 0, 0, 0]]))[0, 1], torch.zeros(2))


@pytest.mark.parametrize("name", ["dlrm", "widedeep"])
def test_attention_exports_to_torchscript_and_onnx_with_parity(name: str) -> None:
    model = attention_model(name)
    with torch.no_grad():
        for parameter in model.feature_embeddings().attention.parameters():
            parameter.normal_()
    assert_torchscript_and_onnx_parity(model, seed=30, rows_without_ids=True)


def test_attention_trains_its_unit() -> None:
    model = attention_model("dlrm").train()
    dense, sparse = batch(256, seed=6)
    # The label depends on whether the candidate's id appears among the pooled ids.
    labels = (sparse[:, 1:4] == sparse[:, :1]).any(dim=1).float()
    optimizer = build_optimizer(model, lr=0.01, embedding_lr=0.05)
    first = train_step(model, optimizer, dense, sparse, labels)
    for _ in range(60):
        last = train_step(model, optimizer, dense, sparse, labels)
    assert last < 0.8 * first, (first, last)
    assert model.feature_embeddings().attention[0].unit.layers[-1].weight.abs().sum() > 0  # it left the plain mean


@pytest.mark.parametrize(
    ("attention", "message"),
    [
        (((0, 2),), r"attention pair \(0, 2\): feature 0 is single-valued, nothing to pool"),
        (((1, 1),), r"attention pair \(1, 1\): the candidate feature 1 is multi-valued"),
        (((1, 0), (1, 2)), r"attention pair \(1, 2\): feature 1 is pooled by attention twice"),
        (((1, 4),), r"attention pair \(1, 4\) must be two feature indices in \[0, 4\)"),
        ([(1, 0)], r"attention must be a tuple of \(pooled, candidate\) pairs, got \[\(1, 0\)\]"),
    ],
)
@pytest.mark.parametrize("factory", [DLRMConfig, WideDeepConfig])
def test_attention_config_names_the_bad_pair(factory: type, attention: object, message: str) -> None:
    common = {"num_dense": NUM_DENSE, "table_sizes": TABLE_SIZES, "table_widths": TABLE_WIDTHS}
    with pytest.raises(ValueError, match=f"{factory.__name__}: {message}"):
        factory(**common, attention=attention)


def test_attention_config_round_trips() -> None:
    import json

    config = replace(tiny_configs()["widedeep"], attention=ATTENTION, attention_mlp=(12, 6))
    assert config_from_dict("widedeep", json.loads(json.dumps(config_to_dict(config)))) == config
