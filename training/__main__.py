"""``python -m training``: train one model and write its checkpoint directory.

Examples::

    python -m training --model dlrm --data synthetic --rows 300000 --out runs/dlrm
    python -m training --model widedeep --data criteo --data-path day_0.gz --rows 5000000 --out runs/wd
    python -m training --model dlrm --data movielens --data-path ml-1m/ --out runs/ml
    python -m training --data table --data-path adult.csv --label income --positive '>50K' \
        --dense age,hours_per_week --sparse workclass,education,occupation --out runs/adult
    python -m training --data table --data-path events.parquet --schema events.yaml --out runs/events
    python -m training --data table --data-path clicks.parquet --label clicked --dense price --sparse user,item \
        --user-column user --item-column item --time-column ts --out runs/clicks
    torchrun --standalone --nproc_per_node=2 -m training --model dlrm --data synthetic --out runs/dlrm-ddp
    python -m training --model twotower --data synthetic-useritem --out runs/retrieval
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from training.data import SOURCE_NAMES, DataError
from training.data.interactions import SPLIT_NAMES
from training.data.table import (
    FILE_FORMATS,
    SPLIT_METHODS,
    TableSchema,
    parse_columns,
    parse_multi_valued,
    parse_transforms,
    table_schema,
)
from training.fitting import DEFAULT_BUCKETS, SparseOptions
from training.models import MODEL_NAMES, RETRIEVAL_MODEL_NAMES
from training.models.dlrm import INTERACTIONS
from training.retrieval import RetrievalOptions, train_retrieval
from training.train import HISTORY_POOLINGS, TrainOptions, train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training",
        description="Train a Wide & Deep, DLRM or two-tower retrieval recommender and write a checkpoint directory.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", choices=MODEL_NAMES, default="dlrm",
                        help="logistic is the wide-only baseline")
    parser.add_argument("--data", choices=SOURCE_NAMES, default="synthetic")
    parser.add_argument("--data-path",
                        help="Criteo TSV file (.gz ok), MovieLens directory, or your table (Parquet, CSV or TSV)")
    parser.add_argument("--split", choices=(*SPLIT_NAMES, *SPLIT_METHODS),
                        help="how rows become train/val/test. movielens: time (the default) or leave-last-out "
                             "(each user's last rating tests, the one before validates); table: order (the "
                             "default: the file's first 80%% of rows train, then 10%% and 10%%) or random (a "
                             "permutation seeded with --seed), or --time-column")
    parser.add_argument("--history-length", type=int, default=TrainOptions.history_length, metavar="N",
                        help="movielens, and a table with --user-column, --item-column and --time-column: each "
                             "row carries the user's last N items before it (history) and last N liked items "
                             "(history_liked), multi-valued features a request sends too, with rated_before and "
                             "liked_share")
    parser.add_argument("--history-pooling", choices=HISTORY_POOLINGS, default=TrainOptions.history_pooling,
                        help="DLRM and Wide & Deep: a history feature's vector is the mean of its items' "
                             "embeddings, or (attention) a weighted mean, the weights a softmax of DIN-style "
                             "activation-unit scores against the item being scored")
    parser.add_argument("--no-history", dest="history_length", action="store_const", const=0,
                        default=argparse.SUPPRESS, help="no history features (--history-length 0)")
    parser.add_argument("--negatives", type=float, default=TrainOptions.negatives, metavar="K",
                        help="movielens: K sampled items the user has not rated, labelled 0, per training rating "
                             "(a fraction such as 2.5: 2 or 3 per rating, 2.5 on average)")
    parser.add_argument("--eval-users", type=int, metavar="N",
                        help="movielens: rank the full catalogue (and 100 sampled negatives) for at most N test "
                             "users, a sample seeded with --seed (unset: every test user with a positive)")
    parser.add_argument("--rows", type=int, help="use the first N rows (synthetic: generate N rows; default 200000)")
    parser.add_argument("--items", type=int, help="synthetic-useritem: items in the catalogue (default 1000)")
    parser.add_argument("--epochs", type=int, default=TrainOptions.epochs, help="maximum epochs (early stopping may end sooner)")
    parser.add_argument("--batch-size", type=int, default=TrainOptions.batch_size,
                        help="rows per optimizer step; unset: training rows / 200, between 64 and 512")
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
                        help="categorical values seen fewer times in training share the unseen index "
                             "(unset: 50, or 1%% of a training split under 5,000 rows)")
    parser.add_argument("--max-vocab", type=int, default=SparseOptions.max_vocab,
                        help="a feature with more kept values than this is hashed instead")
    parser.add_argument("--hash-buckets", type=int, default=SparseOptions.hash_buckets)
    parser.add_argument("--clip-dense", action=argparse.BooleanOptionalAction, default=TrainOptions.clip_dense,
                        help="clip each dense value to its column's training range before the transform, "
                             "in training and serving (--no-clip-dense: transform values as they come)")
    parser.add_argument("--bucketize", default="", metavar="COLUMNS",
                        help="comma-separated dense columns, or 'all', also encoded as a categorical feature "
                             "of their quantile bin (COLUMN_bucket); requests still send the raw value")
    parser.add_argument("--buckets", type=int, default=DEFAULT_BUCKETS,
                        help="at most this many quantile bins per bucketized column")
    parser.add_argument("--interaction", choices=INTERACTIONS, default=TrainOptions.interaction,
                        help="DLRM: pairwise dot products, or dcn (a DCN-v2 cross network)")
    parser.add_argument("--dropout", type=float, default=TrainOptions.dropout,
                        help="dropout on the hidden layers of the DLRM top MLP / Wide & Deep deep MLP")
    parser.add_argument("--weight-decay", type=float, default=TrainOptions.weight_decay,
                        help="decoupled weight decay (AdamW) on the dense weight matrices")
    parser.add_argument("--embedding-weight-decay", type=float, default=TrainOptions.embedding_weight_decay,
                        help="L2 penalty on the embedding rows each step touches")
    parser.add_argument("--warm-start", action="append", default=[], metavar="[FEATURE=]PATH",
                        help="initialize embedding tables from a checkpoint dir (all shared features, or one) "
                             "or FEATURE=matrix.npy; repeatable")
    parser.add_argument("--freeze", default="", metavar="FEATURES",
                        help="comma-separated features whose tables stay fixed, or 'all'")
    parser.add_argument("--no-baselines", dest="baselines", action="store_false",
                        help="skip the baselines (scikit-learn logistic regression and gradient boosting) "
                             "fitted on the same split into metrics.json")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    parser.add_argument("--out", required=True,
                        help="checkpoint directory to write (replaced only when the run succeeds)")
    _add_table_arguments(parser)
    retrieval = parser.add_argument_group(
        "retrieval (--model twotower)",
        "Two towers trained with an in-batch softmax on movielens or synthetic-useritem; --epochs, --batch-size "
        "(default 512), --lr, --patience, --split, --history-length and --eval-users apply too.",
    )
    retrieval.add_argument("--temperature", type=float, default=RetrievalOptions.temperature,
                           help="softmax temperature on the towers' cosines")
    retrieval.add_argument("--logq", dest="logq_correction", action=argparse.BooleanOptionalAction, default=True,
                           help="sampling-bias (logQ) correction of the in-batch negatives (--no-logq leaves it out)")
    return parser


def _add_table_arguments(parser: argparse.ArgumentParser) -> None:
    table = parser.add_argument_group(
        "your table (--data table)",
        "Which columns are the label and the features; their names are the request's feature names. "
        "A --schema file holds the same keys; a flag given here replaces the file's value.",
    )
    table.add_argument("--schema", metavar="FILE",
                       help="YAML or JSON with label, positive, dense, sparse, multi_valued, time_column, "
                            "user_column, item_column, split, transforms, format")
    table.add_argument("--label", metavar="COLUMN", help="the label column: 0/1 or true/false, or see --positive")
    table.add_argument("--positive", metavar="VALUE", help="label = 1 where the label column equals VALUE, else 0")
    table.add_argument("--dense", metavar="COLUMNS", help="comma-separated numeric feature columns")
    table.add_argument("--sparse", metavar="COLUMNS", help="comma-separated categorical feature columns")
    table.add_argument("--multi-valued", action="append", metavar="COLUMN[=SEP[:MAX]],...",
                       help="categorical columns of several values joined by SEP (one character, default |) "
                            "or Arrow lists; a row keeps its first MAX (default 8); repeatable")
    table.add_argument("--time-column", metavar="COLUMN",
                       help="split by time: rows sorted by COLUMN, the earliest 80%% train, the next 10%% validate, "
                            "the last 10%% test (instead of --split)")
    table.add_argument("--user-column", metavar="COLUMN",
                       help="who acted (with --item-column and --time-column): each row also carries the user's "
                            "history before it (see --history-length); a feature only if listed in --sparse")
    table.add_argument("--item-column", metavar="COLUMN",
                       help="what the user acted on (with --user-column): the ids the history lists")
    table.add_argument("--transform", action="append", metavar="COLUMN=TRANSFORM,...",
                       help="dense transforms: standard (the default: z-score), log1p or identity; repeatable")
    table.add_argument("--format", choices=FILE_FORMATS,
                       help="the file's format (unset: from its name: .parquet/.pq, .csv, .tsv/.tab, each .gz ok)")


_TABLE_FLAGS = (
    "schema", "label", "positive", "dense", "sparse", "multi_valued", "time_column", "user_column", "item_column",
    "transform", "format",
)


def _table_schema(args: argparse.Namespace) -> TableSchema | None:
    """The --data table schema from the file and the flags; None for the other sources."""
    given = [name for name in _TABLE_FLAGS if getattr(args, name) is not None]
    if args.data != "table":
        if given:
            raise ValueError(f"--{given[0].replace('_', '-')} describes a table: it needs --data table")
        return None
    if args.split is not None and args.split not in SPLIT_METHODS:
        raise ValueError(f"--split {args.split} applies to --data movielens; a table splits by "
                         f"{' or '.join(SPLIT_METHODS)}, or by --time-column")
    multi_valued, transforms = {}, {}
    for text in args.multi_valued or ():
        multi_valued.update(parse_multi_valued(text))
    for text in args.transform or ():
        transforms.update(parse_transforms(text))
    return table_schema(
        schema_file=args.schema,
        label=args.label,
        positive=args.positive,
        dense=parse_columns(args.dense) if args.dense is not None else None,
        sparse=parse_columns(args.sparse) if args.sparse is not None else None,
        multi_valued=multi_valued or None,
        time_column=args.time_column,
        user_column=args.user_column,
        item_column=args.item_column,
        split=args.split,
        transforms=transforms or None,
        format=args.format,
    )


def _retrieval_options(args: argparse.Namespace) -> RetrievalOptions:
    return RetrievalOptions(
        out=args.out,
        data=args.data,
        data_path=args.data_path,
        rows=args.rows,
        items=args.items,
        split=args.split or RetrievalOptions.split,
        history_length=args.history_length,
        eval_users=args.eval_users,
        clip_dense=args.clip_dense,
        temperature=args.temperature,
        logq_correction=args.logq_correction,
        epochs=args.epochs,
        batch_size=args.batch_size or RetrievalOptions.batch_size,
        lr=args.lr,
        patience=args.patience,
        seed=args.seed,
        threads=args.threads,
        baselines=args.baselines,
        progress=not args.quiet,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.model in RETRIEVAL_MODEL_NAMES:
        try:
            result = train_retrieval(_retrieval_options(args))
        except (DataError, FileNotFoundError, ValueError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        print(json.dumps({"model": args.model, "data": args.data, **{
            k: round(v, 5) for k, v in result["ranking_full_catalogue"].items() if isinstance(v, float)}}))
        return 0
    try:
        options = TrainOptions(
            model=args.model,
            data=args.data,
            data_path=args.data_path,
            table=_table_schema(args),
            # A table's split is part of its schema: the run's own split is the default.
            split=args.split if args.split is not None and args.data != "table" else TrainOptions.split,
            history_length=args.history_length,
            history_pooling=args.history_pooling,
            negatives=args.negatives,
            eval_users=args.eval_users,
            rows=args.rows,
            items=args.items,
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
            clip_dense=args.clip_dense,
            bucketize=tuple(name for name in args.bucketize.split(",") if name),
            buckets=args.buckets,
            interaction=args.interaction,
            dropout=args.dropout,
            weight_decay=args.weight_decay,
            embedding_weight_decay=args.embedding_weight_decay,
            progress=not args.quiet,
            baselines=args.baselines,
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
