"""Training end to end: the CLI, checkpoints, reproducibility, warm start, torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from training.__main__ import main as train_main
from training.checkpoint import load_checkpoint
from training.data.synthetic import SyntheticSource, write_criteo_tsv
from training.metrics import ranking_metrics
from training.train import TrainOptions, train

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = dict(data="synthetic", rows=6000, epochs=2, batch_size=256, progress=False, threads=1)


@pytest.fixture(scope="module")
def dlrm_run(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("runs") / "dlrm"
    return out, train(TrainOptions(model="dlrm", out=str(out), **TINY))


def test_checkpoint_dir_is_complete(dlrm_run):
    out, metrics = dlrm_run
    for name in ("model.pt", "config.json", "features.json", "metrics.json", "learning_curve.png"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "metrics.json").read_text())
    for key in ("test_auc", "test_logloss", "train_samples_per_sec", "oracle_auc", "test_calibration", "history"):
        assert key in saved
    assert 0.5 < saved["test_auc"] <= 1.0
    assert saved["oracle_auc"] > saved["test_auc"] - 0.05
    assert saved["rows"] == {"train": 4800, "val": 600, "test": 600}
    assert metrics["test_auc"] == saved["test_auc"]


def test_checkpoint_rebuilds_the_model_that_scored_the_test_split(dlrm_run):
    out, metrics = dlrm_run
    checkpoint = load_checkpoint(out)
    source = SyntheticSource(rows=6000, seed=0)
    chunk = next(source.chunks("test"))
    dense, sparse = checkpoint.spec.encode_columns(chunk.columns, len(chunk))
    with torch.inference_mode():
        scores = torch.sigmoid(checkpoint.model(torch.from_numpy(dense), torch.from_numpy(sparse))).numpy()
    from training.metrics import auc

    assert auc(chunk.labels, scores) == pytest.approx(metrics["test_auc"], abs=1e-6)


def test_training_is_reproducible_for_a_seed(tmp_path, dlrm_run):
    _, first = dlrm_run
    again = train(TrainOptions(model="dlrm", out=str(tmp_path / "again"), **TINY))
    assert again["test_auc"] == first["test_auc"]
    assert [h["train_loss"] for h in again["history"]] == [h["train_loss"] for h in first["history"]]


@pytest.mark.parametrize("model", ["widedeep", "logistic"])
def test_other_models_train(tmp_path, model):
    metrics = train(TrainOptions(model=model, out=str(tmp_path / model), **TINY))
    assert 0.5 < metrics["test_auc"] <= 1.0
    assert load_checkpoint(tmp_path / model).model_name == model


def test_warm_start_from_checkpoint_and_npy_with_freeze(tmp_path, dlrm_run):
    previous, _ = dlrm_run
    old = load_checkpoint(previous)
    table = old.model.feature_embeddings().table(0).detach().clone()
    matrix = np.full((old.spec.sparse[1].num_embeddings, 16), 0.25, np.float32)
    np.save(tmp_path / "c2.npy", matrix)
    out = tmp_path / "warm"
    train(
        TrainOptions(
            model="dlrm",
            out=str(out),
            warm_start=(str(previous), f"C2={tmp_path / 'c2.npy'}"),
            freeze=("C1", "C2"),
            **TINY,
        )
    )
    new = load_checkpoint(out)
    # Same data and seed: the vocabularies match, so C1 is copied row for row and stays frozen.
    torch.testing.assert_close(new.model.feature_embeddings().table(0), table)
    torch.testing.assert_close(new.model.feature_embeddings().table(1), torch.from_numpy(matrix))
    assert not torch.equal(new.model.feature_embeddings().table(2), old.model.feature_embeddings().table(2))


def test_warm_start_errors_are_clear(tmp_path, dlrm_run):
    previous, _ = dlrm_run
    np.save(tmp_path / "wrong.npy", np.zeros((3, 16), np.float32))
    with pytest.raises(ValueError, match=r"wrong.npy has shape \(3, 16\), table C1 needs"):
        train(TrainOptions(model="dlrm", out=str(tmp_path / "x"), warm_start=(f"C1={tmp_path / 'wrong.npy'}",), **TINY))
    with pytest.raises(ValueError, match=r"unknown sparse feature 'C99'"):
        train(TrainOptions(model="dlrm", out=str(tmp_path / "y"), freeze=("C99",), **TINY))


def test_cli_trains_from_a_criteo_file(tmp_path, capsys):
    data = tmp_path / "day.tsv.gz"
    write_criteo_tsv(data, rows=3000, seed=3)
    code = train_main(["--model", "dlrm", "--data", "criteo", "--data-path", str(data), "--epochs", "1",
                       "--batch-size", "128", "--quiet", "--threads", "1", "--out", str(tmp_path / "run")])
    assert code == 0
    headline = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert headline["data"] == "criteo" and 0.0 <= headline["test_auc"] <= 1.0
    assert "oracle_auc" not in headline  # only synthetic data knows its true probabilities


def test_cli_reports_bad_input_without_a_traceback(tmp_path, capsys):
    code = train_main(["--data", "criteo", "--data-path", str(tmp_path / "nope.tsv"), "--out", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err
    assert "nope.tsv" in err and "Traceback" not in err
    code = train_main(["--data", "criteo", "--out", str(tmp_path / "o")])
    assert code == 2
    assert "--data criteo needs --data-path" in capsys.readouterr().err
    code = train_main(["--model", "widedeep", "--preset", "kaggle", "--out", str(tmp_path / "o")])
    assert code == 2
    assert "kaggle preset is a DLRM architecture" in capsys.readouterr().err


def test_options_validation():
    with pytest.raises(ValueError, match=r"epochs must be >= 1, got 0"):
        TrainOptions(epochs=0)
    with pytest.raises(ValueError, match=r"unknown model 'gpt'"):
        TrainOptions(model="gpt")
    with pytest.raises(ValueError, match=r"lr_decay must be in \(0, 1\], got 2"):
        TrainOptions(lr_decay=2)


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "training", "--model", "dlrm", "--rows", "6000", "--epochs", "2", "--batch-size", "256",
               "--quiet", "--out", str(out)]
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert metrics["test_auc"] > 0.6
    # The DDP checkpoint is an ordinary one: no "module." prefixes, loads and scores.
    checkpoint = load_checkpoint(out)
    assert not any(key.startswith("module.") for key in checkpoint.model.state_dict())


def test_ranking_metrics_by_hand():
    users = np.array([1, 1, 1, 2, 2, 3])
    labels = np.array([1, 0, 1, 0, 1, 0])
    scores = np.array([0.9, 0.8, 0.1, 0.7, 0.2, 0.5])
    result = ranking_metrics(users, labels, scores, ks=(2,))
    # user 1 ranks [1, 0, 1]; user 2 ranks [0, 1]; user 3 has no positive and is skipped.
    assert result["ranking_users"] == 2
    assert result["precision@2"] == pytest.approx((0.5 + 0.5) / 2)
    assert result["recall@2"] == pytest.approx((0.5 + 1.0) / 2)
    assert result["map@2"] == pytest.approx((1.0 / 2 + 0.5 / 1) / 2)
    ndcg_user1 = 1.0 / (1 + 1 / np.log2(3))
    ndcg_user2 = (1 / np.log2(3)) / 1.0
    assert result["ndcg@2"] == pytest.approx((ndcg_user1 + ndcg_user2) / 2)


def test_synthetic_source_is_deterministic_and_calibrated():
    first = SyntheticSource(rows=20_000, seed=4, chunk_rows=7000)
    second = SyntheticSource(rows=20_000, seed=4, chunk_rows=7000)
    a, b = list(first.chunks("val")), list(second.chunks("val"))
    assert sum(map(len, a)) == 2000
    np.testing.assert_array_equal(np.concatenate([c.labels for c in a]), np.concatenate([c.labels for c in b]))
    labels = np.concatenate([c.labels for c in first.chunks("train")])
    assert 0.2 <= labels.mean() <= 0.3
    chunk = a[0]
    assert set(chunk.columns) == {f"I{i}" for i in range(1, 14)} | {f"C{i}" for i in range(1, 27)}
    assert np.isnan(np.concatenate([chunk.columns[f"I{i}"] for i in range(1, 14)])).any()
    assert "probability" in chunk.extras
