"""Baselines on the same split, the auto batch size and vocabulary cut-off, the demo table, the quality benchmark."""

from __future__ import annotations

import json
import math
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from benchmarks import quality
from benchmarks.quality_data import prepare_flights
from featurespec import StringColumn
from training.__main__ import main as train_main
from training.baselines import BASELINE_NAMES, BaselineOptions, tabular_baselines
from training.data import Chunk, Split
from training.demo import format_table, summary_lines
from training.fitting import SchemaField, SparseOptions, auto_min_count
from training.train import TrainOptions, auto_batch_size, train

SPLIT_ROWS = {"train": 2400, "val": 300, "test": 300}
TINY = {"data": "synthetic", "rows": 3000, "epochs": 2, "progress": False, "threads": 1}


class PlantedSource:
    """In-memory rows whose label follows a planted logit of ``x`` and ``colour``; the rest is noise or odd.

    ``constant`` holds one value, ``sometimes`` is mostly missing, ``tags`` is
    multi-valued, ``rare`` takes a fresh value on every row (so the
    validation and test rows only hold values training never saw), and
    ``colour`` is missing on some rows.
    """

    name = "planted"

    def __init__(self, *, seed: int = 0, chunk_rows: int = 700):
        self.schema = (
            SchemaField("x", dense=True),
            SchemaField("constant", dense=True),
            SchemaField("sometimes", dense=True),
            SchemaField("colour", dense=False),
            SchemaField("rare", dense=False),
            SchemaField("tags", dense=False, options=SparseOptions(multi_valued=True, max_values=3)),
        )
        rng = np.random.default_rng(seed)
        total = sum(SPLIT_ROWS.values())
        x = rng.normal(size=total)
        colour = rng.integers(0, 6, size=total)
        logit = 1.5 * x + np.array([-1.5, -0.5, 0.0, 0.5, 1.0, 1.5])[colour]
        self.labels = (rng.random(total) < 1 / (1 + np.exp(-logit))).astype(np.float32)
        colours = np.array([f"c{c}" for c in colour], dtype=object)
        colours[rng.random(total) < 0.1] = ""
        self.columns = {
            "x": x,
            "constant": np.full(total, 3.0),
            "sometimes": np.where(rng.random(total) < 0.9, np.nan, rng.normal(size=total)),
            "colour": StringColumn.from_values(list(colours)),
            "rare": StringColumn.from_values([f"r{i}" for i in range(total)]),
            "tags": StringColumn.from_values(["|".join(f"t{t}" for t in rng.integers(0, 5, size=int(n)))
                                              for n in rng.integers(0, 3, size=total)]),
        }
        starts = np.cumsum([0] + list(SPLIT_ROWS.values()))
        self.bounds = {split: (int(a), int(b)) for split, a, b in zip(SPLIT_ROWS, starts[:-1], starts[1:])}
        self.chunk_rows = chunk_rows

    def split_rows(self, split: Split) -> int:
        start, end = self.bounds[split]
        return end - start

    def chunks(self, split: Split) -> Iterator[Chunk]:
        start, end = self.bounds[split]
        for lo in range(start, end, self.chunk_rows):
            hi = min(lo + self.chunk_rows, end)
            columns = {name: (values.slice(lo, hi) if isinstance(values, StringColumn) else values[lo:hi])
                       for name, values in self.columns.items()}
            yield Chunk(columns=columns, labels=self.labels[lo:hi])


@pytest.fixture(scope="module")
def planted() -> dict:
    return tabular_baselines(PlantedSource(seed=0), options=BaselineOptions(seed=0), threads=1)


def test_both_baselines_learn_the_planted_signal(planted):
    assert set(planted) == set(BASELINE_NAMES)
    for name, result in planted.items():
        assert result["test_auc"] > 0.75, name
        assert 0 < result["test_logloss"] < math.log(2), name
        assert result["train_rows"] == SPLIT_ROWS["train"] and result["val_rows"] == SPLIT_ROWS["val"]
    assert planted["sklearn_logistic"]["params"]["C"] in BaselineOptions().c_grid
    assert planted["hist_gradient_boosting"]["params"]["iterations"] >= 1


def test_baselines_are_deterministic_per_seed(planted):
    again = tabular_baselines(PlantedSource(seed=0), options=BaselineOptions(seed=0), threads=1)
    for name in BASELINE_NAMES:
        for key in ("test_auc", "test_logloss", "val_auc", "params"):
            assert again[name][key] == planted[name][key], (name, key)


def test_chunking_and_the_training_sample_cap(planted):
    # Other chunk boundaries: the same rows, the same baselines.
    rechunked = tabular_baselines(PlantedSource(seed=0, chunk_rows=256), options=BaselineOptions(seed=0), threads=1)
    assert rechunked["sklearn_logistic"]["test_auc"] == planted["sklearn_logistic"]["test_auc"]
    capped = tabular_baselines(PlantedSource(seed=0), options=BaselineOptions(max_train_rows=1000, seed=0), threads=1)
    assert capped["hist_gradient_boosting"]["train_rows"] == 1000
    assert capped["hist_gradient_boosting"]["test_auc"] > 0.7


def test_baselines_with_only_unseen_missing_and_constant_columns():
    source = PlantedSource(seed=1)
    rows = len(source.labels)
    source.columns["never"] = np.full(rows, np.nan)
    source.columns["blank"] = StringColumn.from_values([""] * rows)
    source.schema = tuple(f for f in source.schema if f.name in ("constant", "sometimes", "rare")) + (
        SchemaField("never", dense=True), SchemaField("blank", dense=False))
    result = tabular_baselines(source, options=BaselineOptions(seed=1), threads=1)
    for name in BASELINE_NAMES:
        # Nothing to learn from: about chance, and no error.
        assert 0.3 < result[name]["test_auc"] < 0.7, name
        assert np.isfinite(result[name]["test_logloss"]), name


def test_baseline_options_are_validated():
    with pytest.raises(ValueError, match=r"bins must be >= 2, got 1"):
        BaselineOptions(bins=1)
    with pytest.raises(ValueError, match=r"c_grid must hold positive values, got \(0.0,\)"):
        BaselineOptions(c_grid=(0.0,))
    with pytest.raises(ValueError, match=r"max_train_rows must be >= 1, got 0"):
        BaselineOptions(max_train_rows=0)


# -- defaults that scale with the training split --------------------------------


@pytest.mark.parametrize(("train_rows", "batch"), [(720, 64), (4_000, 64), (40_000, 200), (80_000, 400), (480_000, 512),
                                                   (4_000_000, 512)])
def test_auto_batch_size(train_rows, batch):
    assert auto_batch_size(train_rows) == batch


@pytest.mark.parametrize(("train_rows", "min_count"), [(50, 1), (720, 7), (4_000, 40), (5_000, 50), (40_000, 50),
                                                       (4_000_000, 50)])
def test_auto_min_count(train_rows, min_count):
    assert auto_min_count(train_rows) == min_count
    assert SparseOptions().resolved_min_count(train_rows) == min_count
    assert SparseOptions(min_count=7).resolved_min_count(train_rows) == 7


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("runs") / "logistic"
    return out, train(TrainOptions(model="logistic", out=str(out), **TINY))


def test_metrics_json_carries_baselines_and_resolved_defaults(tiny_run):
    out, result = tiny_run
    saved = json.loads((out / "metrics.json").read_text())
    assert set(saved["baselines"]) >= set(BASELINE_NAMES)
    for name in BASELINE_NAMES:
        assert 0.5 < saved["baselines"][name]["test_auc"] <= 1.0
        assert saved["baselines"][name]["train_rows"] == 2400
    # 2,400 training rows: batch 64 (an epoch of 37 steps, not 4), a value seen in 1% of them has a row.
    assert saved["batch_size"] == 64 and saved["min_count"] == 24
    assert saved["options"]["batch_size"] is None and saved["options"]["sparse_options"]["min_count"] is None
    assert result["baselines"] == saved["baselines"]


def test_runs_on_one_split_share_their_baselines_and_no_baselines_skips_them(tmp_path, tiny_run):
    _, first = tiny_run
    other = train(TrainOptions(model="dlrm", out=str(tmp_path / "dlrm"), **TINY))
    assert other["baselines"] == first["baselines"]  # fitted once, reused
    code = train_main(["--model", "logistic", "--rows", "3000", "--epochs", "1", "--threads", "1", "--quiet",
                       "--no-baselines", "--out", str(tmp_path / "plain")])
    assert code == 0
    assert "baselines" not in json.loads((tmp_path / "plain" / "metrics.json").read_text())


def test_demo_table_prints_baseline_rows(tiny_run):
    _, result = tiny_run
    results = {"dlrm": result, "widedeep": result, "logistic": result}
    table = format_table(results)
    for name in BASELINE_NAMES:
        row = next(line for line in table.splitlines() if line.startswith(name))
        auc = result["baselines"][name]["test_auc"]
        gap = (auc - 0.5) / (result["oracle_auc"] - 0.5)
        assert f"{auc:.4f}" in row and f"{gap:.1%}" in row
    summary = "\n".join(summary_lines(results))
    assert "vs the best baseline" in summary


# -- the quality benchmark ----------------------------------------------------------


def test_quality_benchmark_end_to_end(tmp_path):
    rng = np.random.default_rng(0)
    rows = 1500
    table = pd.DataFrame({
        "age": rng.integers(18, 80, rows),
        "city": rng.choice(["a", "b", "c", "d"], rows),
        "clicked": rng.integers(0, 2, rows),
    })
    table.loc[table["city"] == "a", "clicked"] = 1  # a planted signal
    table.to_parquet(tmp_path / "clicks.parquet")
    (tmp_path / "clicks.yaml").write_text("label: clicked\ndense: [age]\nsparse: [city]\nsplit: random\n")
    doc, plot = tmp_path / "docs" / "quality.md", tmp_path / "docs" / "img" / "quality.png"
    code = quality.main([
        "--synthetic-rows", "2000", "--seeds", "0", "--models", "logistic", "--threads", "1",
        "--table", str(tmp_path / "clicks.parquet"), str(tmp_path / "clicks.yaml"),
        "--out", str(tmp_path / "results"), "--doc", str(doc), "--plot", str(plot),
    ])
    assert code == 0
    text = doc.read_text()
    for expected in ("## synthetic", "## clicks", "`logistic` | model", "`sklearn_logistic` | baseline",
                     "`hist_gradient_boosting` | baseline", "Seeds: 0.", "Machine:", "--synthetic-rows 2000",
                     "![test AUC by data set](img/quality.png)", "Oracle test AUC", "random 80/10/10"):
        assert expected in text, expected
    assert plot.stat().st_size > 0
    saved = json.loads((tmp_path / "results" / "quality.json").read_text())
    assert set(saved["runs"]) == {"synthetic", "clicks"}
    assert (tmp_path / "results" / "synthetic" / "seed0" / "logistic" / "metrics.json").is_file()


def test_quality_benchmark_runs_movielens_with_both_splits_and_negatives(tmp_path, write_movielens_parquet):
    directory = write_movielens_parquet(tmp_path / "ml")
    doc = tmp_path / "quality.md"
    code = quality.main([
        "--synthetic-rows", "0", "--seeds", "0", "--models", "logistic", "--threads", "1",
        "--movielens", str(directory), "--movielens-negatives", "1", "--history-pooling", "attention",
        "--out", str(tmp_path / "results"), "--doc", str(doc), "--plot", str(tmp_path / "quality.png"),
    ])
    assert code == 0
    saved = json.loads((tmp_path / "results" / "quality.json").read_text())
    assert list(saved["runs"]) == ["movielens-100k-parquet", "movielens-100k-parquet-leave-last-out",
                                   "movielens-100k-parquet-negatives1"]
    assert saved["runs"]["movielens-100k-parquet"]["0"]["logistic"]["options"]["history_pooling"] == "attention"
    text = doc.read_text()
    for expected in ("`item_popularity` | baseline", "`matrix_factorization` | baseline", "NDCG@10 full",
                     "NDCG@10 sampled-100", "each user's last rating tests", "1 items the user never rated"):
        assert expected in text, expected


def test_quality_benchmark_rejects_bad_arguments(tmp_path, capsys):
    assert quality.main(["--synthetic-rows", "0", "--out", str(tmp_path)]) == 2
    assert "no data set" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        quality.main(["--models", "gpt"])


def test_flights_preparation_drops_unlabeled_rows_and_leaking_columns(tmp_path):
    frame = pd.DataFrame({
        "year": [2013] * 3, "month": [1, 1, 2], "day": [1, 2, 3], "dep_time": [517.0, None, 600.0],
        "sched_dep_time": [515, 529, 600], "dep_delay": [2.0, None, 0.0], "arr_time": [830.0, None, 900.0],
        "sched_arr_time": [819, 830, 850], "arr_delay": [11.0, None, 40.0], "carrier": ["UA", "AA", "UA"],
        "flight": [1545, 1714, 1], "tailnum": ["N14228", "N24211", None], "origin": ["EWR", "LGA", "JFK"],
        "dest": ["IAH", "IAH", "MIA"], "air_time": [227.0, None, 160.0], "distance": [1400, 1416, 1089],
        "hour": [5, 5, 6], "minute": [15, 29, 0],
        "time_hour": ["2013-01-01T10:00:00Z", "2013-01-02T10:00:00Z", "2013-02-03T11:00:00Z"],
    })
    with zipfile.ZipFile(tmp_path / "flights.csv.zip", "w") as archive:
        archive.writestr("flights.csv", frame.to_csv(index=False))
    assert prepare_flights(tmp_path / "flights.csv.zip", tmp_path / "flights.parquet") == 2
    prepared = pd.read_parquet(tmp_path / "flights.parquet")
    assert prepared["delayed"].tolist() == [0, 1]
    assert not {"dep_time", "dep_delay", "arr_time", "air_time", "arr_delay"} & set(prepared.columns)
