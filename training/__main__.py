"""``python -m training``: train one model and write its checkpoint directory.

Examples::

    python -m training --model dlrm --data synthetic --rows 300000 --out runs/dlrm
    python -m training --model widedeep --data criteo --data-path day_0.gz --rows 5000000 --out runs/wd
    python -m training --model dlrm --data movielens --data-path ml-1m/ --out runs/ml
    torchrun --standalone --nproc_per_node=2 -m training --model dlrm --data synthetic --out runs/dlrm-ddp
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from training.data import SOURCE_NAMES, DataError
from training.fitting import SparseOptions
from training.models import MODEL_NAMES
from training.train import TrainOptions, train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training",
        description="Train a Wide & Deep or DLRM recommender and write a checkpoint directory.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", choices=MODEL_NAMES, default="dlrm",
                        help="logistic is the wide-only baseline")
    parser.add_argument("--data", choices=SOURCE_NAMES, default="synthetic")
    parser.add_argument("--data-path", help="Criteo TSV file (.gz ok) or MovieLens directory")
    parser.add_argument("--rows", type=int, help="use the first N rows (synthetic: generate N rows; default 200000)")
    parser.add_argument("--epochs", type=int, default=TrainOptions.epochs, help="maximum epochs (early stopping may end sooner)")
    parser.add_argument("--batch-size", type=int, default=TrainOptions.batch_size)
    parser.add_argument("--lr", type=float, default=TrainOptions.lr, help="learning rate of the dense parameters")
    parser.add_argument("--embedding-lr", type=float, default=TrainOptions.embedding_lr,
                        help="learning rate of the embedding rows")
    parser.add_argument("--lr-decay", type=float, default=TrainOptions.lr_decay,
                        help="multiply the learning rates by this after every epoch")
    parser.add_argument("--patience", type=int, default=2, help="epochs without validation AUC gain before stopping")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", choices=("default", "kaggle"), default="default",
                        help="kaggle: the facebookresearch/dlrm Criteo Kaggle architecture (DLRM only)")
    parser.add_argument("--threads", type=int, help="intra-op threads per process (default: cores / processes)")
    parser.add_argument("--min-count", type=int, default=SparseOptions.min_count,
                        help="categorical values seen fewer times in training share the unseen index")
    parser.add_argument("--max-vocab", type=int, default=SparseOptions.max_vocab,
                        help="a feature with more kept values than this is hashed instead")
    parser.add_argument("--hash-buckets", type=int, default=SparseOptions.hash_buckets)
    parser.add_argument("--warm-start", action="append", default=[], metavar="[FEATURE=]PATH",
                        help="initialize embedding tables from a checkpoint dir (all shared features, or one) "
                             "or FEATURE=matrix.npy; repeatable")
    parser.add_argument("--freeze", default="", metavar="FEATURES",
                        help="comma-separated features whose tables stay fixed, or 'all'")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    parser.add_argument("--out", required=True, help="checkpoint directory to write")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        options = TrainOptions(
            model=args.model,
            data=args.data,
            data_path=args.data_path,
            rows=args.rows,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            embedding_lr=args.embedding_lr,
            lr_decay=args.lr_decay,
            seed=args.seed,
            patience=args.patience,
            preset=args.preset,
            threads=args.threads,
            sparse_options=SparseOptions(
                min_count=args.min_count, max_vocab=args.max_vocab, hash_buckets=args.hash_buckets
            ),
            warm_start=tuple(args.warm_start),
            freeze=tuple(name for name in args.freeze.split(",") if name),
            progress=not args.quiet,
            out=args.out,
        )
        result = train(options)
    except (DataError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps(_headline(result)))
    return 0


def _headline(result: dict) -> dict:
    keys = ("model", "data", "test_auc", "test_logloss", "oracle_auc", "auc_gap_closed", "train_samples_per_sec",
            "best_epoch")
    return {k: (round(v, 5) if isinstance(v, float) and math.isfinite(v) else v) for k, v in result.items() if k in keys}


if __name__ == "__main__":
    sys.exit(main())
