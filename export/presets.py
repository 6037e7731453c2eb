"""``python -m export.presets OUT_DIR``: the benchmark's reference checkpoint, untrained.

DLRM with the ``kaggle`` preset (D=16, bottom 13-512-256-64-16, top
512-256-1) over 13 ``log1p`` dense features and 26 hashed categorical
features of 100,000 rows each (99,999 buckets + the missing row), the size
of the DLRM configuration for the Criteo Kaggle data. Speed does not depend
on the weights, so the
checkpoint is built directly instead of trained: it takes seconds, and the
benchmark can be rerun anywhere with nothing but this repository.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from featurespec import DenseFeature, FeatureSpec, SparseFeature
from training.checkpoint import save_checkpoint
from training.models import build_model
from training.models.dlrm import DLRMConfig

KAGGLE_ROWS_PER_TABLE = 100_000


def kaggle_spec(*, rows_per_table: int = KAGGLE_ROWS_PER_TABLE) -> FeatureSpec:
    if rows_per_table < 2:
        raise ValueError(f"rows_per_table must be >= 2, got {rows_per_table}")
    return FeatureSpec(
        dense=tuple(DenseFeature(f"I{i}", "log1p", mean=20.0) for i in range(1, 14)),
        sparse=tuple(SparseFeature(f"C{i}", kind="hash", buckets=rows_per_table - 1) for i in range(1, 27)),
    )


def write_kaggle_checkpoint(out_dir: Path, *, rows_per_table: int = KAGGLE_ROWS_PER_TABLE, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    spec = kaggle_spec(rows_per_table=rows_per_table)
    config = DLRMConfig.kaggle(num_dense=spec.num_dense, table_sizes=spec.table_sizes)
    model = build_model("dlrm", config)
    return save_checkpoint(
        out_dir, model_name="dlrm", config=config, model=model, spec=spec, metrics={"note": "untrained, for benchmarks"}
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.presets", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, metavar="OUT_DIR")
    parser.add_argument("--rows-per-table", type=int, default=KAGGLE_ROWS_PER_TABLE)
    args = parser.parse_args(argv)
    print(write_kaggle_checkpoint(args.out, rows_per_table=args.rows_per_table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
