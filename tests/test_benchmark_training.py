"""The training benchmark: our DLRM step beside a plain PyTorch DLRM step, and that plain model itself."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks.reference_dlrm import REFERENCE_NAME, PlainDLRM, plain_sgd, plain_train_step
from benchmarks.training import main as training_main
from training.models import DLRM, DLRMConfig

B, N, F, D = 5, 3, 4, 8  # batch, dense features, tables, embedding dim
TINY = DLRMConfig(num_dense=N, table_sizes=(7, 11, 5, 9), embedding_dim=D, bottom_mlp=(16,), top_mlp=(12,))


def tiny_batch(config: DLRMConfig, batch_size: int, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    dense = torch.rand(batch_size, config.num_dense, generator=generator)
    sparse = torch.stack([torch.randint(0, rows, (batch_size,), generator=generator) for rows in config.table_sizes], dim=1)
    labels = torch.randint(0, 2, (batch_size,), generator=generator).float()
    return dense, sparse, labels


def copy_weights(ours: DLRM, plain: PlainDLRM) -> None:
    """Our fused table split back into one table per feature; the MLPs layer by layer."""
    tables = ours.sparse_arch.embeddings
    with torch.no_grad():
        for index, table in enumerate(plain.tables):
            table.weight.copy_(tables.table(index))
    plain.bottom_mlp.load_state_dict(ours.dense_arch.mlp.layers.state_dict())
    plain.top_mlp.load_state_dict(ours.over_arch.mlp.layers.state_dict())


def test_plain_dlrm_is_our_architecture_built_the_plain_way():
    torch.manual_seed(0)
    ours, plain = DLRM(TINY), PlainDLRM(TINY)
    assert len(plain.tables) == F and all(isinstance(t, torch.nn.EmbeddingBag) and t.sparse for t in plain.tables)
    assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in ours.parameters())
    dense, sparse, _ = tiny_batch(TINY, B)
    assert plain(dense, sparse).shape == ours(dense, sparse).shape == (B,)
    copy_weights(ours, plain)
    torch.testing.assert_close(plain(dense, sparse), ours(dense, sparse))


def test_plain_dlrm_trains_with_sgd_and_sparse_table_gradients():
    torch.manual_seed(0)
    model = PlainDLRM(TINY)
    optimizer = plain_sgd(model, lr=0.3)
    assert isinstance(optimizer, torch.optim.SGD)
    assert len(optimizer.param_groups[0]["params"]) == len(list(model.parameters()))
    dense, sparse, _ = tiny_batch(TINY, 64, seed=1)
    labels = (sparse[:, 0] % 2).float()  # learnable only through the first table's rows
    losses = [plain_train_step(model, optimizer, dense, sparse, labels) for _ in range(60)]
    assert model.tables[0].weight.grad.is_sparse
    assert losses[-1] < 0.5 * losses[0]


def test_plain_dlrm_refuses_multi_valued_features():
    config = DLRMConfig(num_dense=N, table_sizes=(7, 11), table_widths=(1, 3), embedding_dim=D)
    with pytest.raises(ValueError, match=r"single-valued, got table_widths=\(1, 3\)"):
        PlainDLRM(config)


def test_benchmark_times_both_sides_and_reports_their_ratio(tmp_path, capsys):
    out = tmp_path / "training"
    argv = ["--batch-sizes", "4,16", "--steps", "3", "--warmup", "1", "--threads", "1"]
    results = training_main([*argv, "--tables", "3", "--table-rows", "20", "--out", str(out)])
    written = json.loads((out / "training.json").read_text())
    assert written == json.loads(json.dumps(results))
    assert written["reference"] == REFERENCE_NAME
    assert written["machine"]["intra_op_threads"] == 1 and written["machine"]["versions"]["torch"]
    assert [row["batch_size"] for row in written["speed"]] == [4, 16]
    for row in written["speed"]:
        ours, reference = row["ours"], row["reference"]
        assert ours["iterations"] == reference["iterations"] == 3
        assert 0 < ours["p25_ms"] <= ours["median_ms"] <= ours["p75_ms"]
        assert 0 < reference["p25_ms"] <= reference["median_ms"] <= reference["p75_ms"]
        assert row["reference_over_ours"] == pytest.approx(reference["median_ms"] / ours["median_ms"])
        assert ours["samples_per_second"] == pytest.approx(row["batch_size"] / ours["median_ms"] * 1e3)
    table = (out / "training.md").read_text()
    assert "Machine: " in table and REFERENCE_NAME in table
    assert "| ours ms/step | ours samples/s | plain PyTorch ms/step | plain PyTorch samples/s | plain / ours |" in table
    first = written["speed"][0]
    assert f"| 4 | rowwise_adagrad | {first['ours']['median_ms']:.1f} (" in table
    assert f"| {first['reference_over_ours']:.2f}x |" in table
    assert "target" not in table.lower()
    assert (out / "training.png").read_bytes()[:4] == b"\x89PNG"
    assert "plain / ours" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--batch-sizes", "0"], "--batch-sizes: expected positive integers"),
        (["--steps", "0"], "--steps and --threads must be >= 1"),
        (["--table-rows", "1"], "--table-rows must be >= 2"),
        (["--tables", "0"], "expected an integer >= 1"),
    ],
)
def test_benchmark_rejects_bad_arguments(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        training_main([*argv, "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
