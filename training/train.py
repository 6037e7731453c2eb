"""The training loop: fit the FeatureSpec, train with early stopping, write the checkpoint.

Runs in one process, or in several under ``torchrun`` with
DistributedDataParallel (gloo on CPU, NCCL on GPUs). Every rank reads the
same stream and takes every ``world_size``-th mini-batch of a shared
permutation, so the ranks together see each training row once per epoch.
All ranks evaluate the full validation split with identical weights, so they
reach the same early-stopping decision without exchanging it.
"""

from __future__ import annotations

import copy
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, is_dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from featurespec import FeatureSpec
from handlers.memory import reuse_freed_memory
from training import metrics as metric_fns
from training.baselines import BaselineOptions, tabular_baselines
from training.baselines_useritem import useritem_baselines
from training.checkpoint import CURVE_FILE, METRICS_FILE, save_checkpoint, staged_directory, write_json
from training.data import Chunk, DataSource, Split, open_source
from training.data.interactions import DEFAULT_HISTORY_LENGTH, SPLIT_NAMES, SplitName
from training.evaluation import (
    RANKING_KEYS,
    UserItemSource,
    model_scorer,
    rank_candidates,
    ranking_task,
)
from training.fitting import DEFAULT_BUCKETS, RangeTally, SchemaField, SparseOptions, fit_spec
from training.models import MODELS, RETRIEVAL_MODEL_NAMES, build_model
from training.models.dlrm import Interaction
from training.optim import EarlyStopping, build_optimizer, train_step
from training.warm_start import apply_warm_start

if TYPE_CHECKING:
    from training.data.table import TableSchema

Preset = Literal["default", "kaggle"]
HistoryPooling = Literal["mean", "attention"]
HISTORY_POOLINGS: tuple[str, ...] = ("mean", "attention")


@dataclass(frozen=True)
class TrainOptions:
    """Everything one training run needs; the CLI builds it from its flags."""

    model: str = "dlrm"
    data: str = "synthetic"
    out: str = "runs/dlrm"
    data_path: str | None = None
    table: TableSchema | None = None  # --data table: which columns are the label and the features
    rows: int | None = None
    items: int | None = None  # synthetic-useritem: items in the catalogue (None: the source's default)
    # User-item data (MovieLens; a table with user, item and time columns for
    # the history): how ratings are split, how many past items each history
    # feature holds (0: none), and at most how many users (a seeded sample)
    # the ranking evaluation scores over the full catalogue.
    split: SplitName = "time"
    history_length: int = DEFAULT_HISTORY_LENGTH
    # DLRM and Wide & Deep: a history feature's vector is the mean of its items' rows, or
    # "attention": a weighted mean, the weights a softmax of DIN-style activation-unit scores against the candidate.
    history_pooling: HistoryPooling = "mean"
    negatives: float = 0  # sampled unrated items per training rating, labelled 0 (a fraction: on average)
    eval_users: int | None = None
    # Early stopping on validation AUC ends a run (keeping its best epoch's
    # weights), so the epoch cap only bounds it; small data needs more epochs.
    epochs: int = 30
    batch_size: int | None = None  # None: auto_batch_size(training rows)
    lr: float = 1e-3  # Adam on the dense parameters
    embedding_lr: float = 0.05  # row-wise Adagrad on the embedding rows; 0.02 underfit, 0.1 overfit after epoch 2
    # Both learning rates are multiplied by this after every epoch. With early stopping 0.4 starved
    # longer runs (1% of the rate by epoch 6): 0.7 gained 0.002-0.003 test AUC on Adult (every seed)
    # and DLRM on NYC flights, and cost Wide & Deep 0.0007 on 600,000 synthetic rows.
    lr_decay: float = 0.7
    seed: int = 0
    patience: int = 2
    preset: Preset = "default"
    threads: int | None = None
    sparse_options: SparseOptions = field(default_factory=SparseOptions)
    warm_start: tuple[str, ...] = ()
    freeze: tuple[str, ...] = ()
    progress: bool = True
    # Each dense value is clipped to its column's training range before its transform (the range is
    # in the FeatureSpec, so serving clips alike): a later month or a larger count than training saw
    # reads as the edge of what it saw instead of an extrapolation. Against no clipping: NYC flights
    # (tested on months past training's) +0.008 / +0.021 DLRM / Wide & Deep test AUC over 5 seeds, every
    # seed up; Adult, MovieLens 100K (both splits) and 600,000 synthetic rows unchanged to four decimals.
    clip_dense: bool = True
    bucketize: tuple[str, ...] = ()  # dense fields (or "all") also encoded as their quantile bin
    buckets: int = DEFAULT_BUCKETS  # at most this many bins per bucketized field
    interaction: Interaction = "dot"  # DLRM: pairwise dot products, or "dcn" for a DCN-v2 cross network
    # Regularization. Dropout and dense weight decay are off by default (0 keeps the measured defaults above).
    dropout: float = 0.0  # DLRM top MLP / Wide & Deep deep MLP hidden layers, while training
    weight_decay: float = 0.0  # decoupled (AdamW), on the dense weight matrices
    # L2 on the embedding rows each step touches. Against 0 (3 seeds each, DLRM / Wide & Deep test AUC):
    # MovieLens 100K time split +0.006 / +0.004, NYC flights +0.007 / +0.007, 600,000 synthetic rows
    # +0.003 / +0.002, Adult +0.000 / -0.000, MovieLens leave-last-out -0.006 / -0.001. 1e-3 gained about
    # as much where it helped and lost more where it hurt (Adult -0.001, leave-last-out validation -0.005 / -0.009).
    embedding_weight_decay: float = 3e-4
    baselines: bool = True  # also fit the baselines of training.baselines on the same split, into metrics.json

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; choose one of {', '.join(MODELS)}")
        if self.model in RETRIEVAL_MODEL_NAMES:
            raise ValueError(f"{self.model} is a retrieval model: training.retrieval trains it, not the ranking loop")
        if not 0 < self.lr_decay <= 1:
            raise ValueError(f"lr_decay must be in (0, 1], got {self.lr_decay}")
        for name in ("epochs", "batch_size", "patience"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.rows is not None and self.rows < 10:
            raise ValueError(f"rows must be >= 10, got {self.rows}")
        if self.split not in SPLIT_NAMES:
            raise ValueError(f"unknown split {self.split!r}; choose one of {', '.join(SPLIT_NAMES)}")
        if self.split != "time" and self.data != "movielens":
            raise ValueError(f"split {self.split!r} needs user ids: it applies to --data movielens, not {self.data}")
        if self.history_length < 0:
            raise ValueError(f"history_length must be >= 0 (0: no history features), got {self.history_length}")
        if not math.isfinite(self.negatives) or self.negatives < 0:
            raise ValueError(f"negatives must be >= 0, got {self.negatives}")
        if self.negatives and self.data != "movielens":
            raise ValueError(f"negatives are sampled from user-item data: --data movielens, not {self.data}")
        if self.eval_users is not None and self.eval_users < 1:
            raise ValueError(f"eval_users must be >= 1 (or None for every user), got {self.eval_users}")
        if self.preset == "kaggle" and self.model != "dlrm":
            raise ValueError(f"the kaggle preset is a DLRM architecture, not a {self.model} one")
        if self.history_pooling not in HISTORY_POOLINGS:
            raise ValueError(f"unknown history pooling {self.history_pooling!r}; choose one of "
                             f"{', '.join(HISTORY_POOLINGS)}")
        if self.interaction != "dot" and self.model != "dlrm":
            raise ValueError(f"interaction {self.interaction!r} is a DLRM option, not a {self.model} one")
        if self.dropout and self.model == "logistic":
            raise ValueError("dropout applies to hidden layers, and the logistic model has none")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        for name in ("weight_decay", "embedding_weight_decay"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class EncodedChunk:
    dense: torch.Tensor  # float32[N, D]
    sparse: torch.Tensor  # int64[N, S]
    labels: torch.Tensor  # float32[N]
    extras: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.labels)


class EncodedSplit:
    """One split, encoded by the FeatureSpec chunk by chunk.

    The encoded tensors stay in memory when they fit in ``cache_bytes``;
    otherwise each pass streams and encodes the source again, so a file
    larger than memory still trains.
    """

    def __init__(self, source: DataSource, split: Split, spec: FeatureSpec, *, cache_bytes: int = 4 << 30):
        self.source, self.split, self.spec = source, split, spec
        self._budget = cache_bytes
        self._cache: list[EncodedChunk] | None = None
        self.rows = source.split_rows(split)

    def __iter__(self) -> Iterator[EncodedChunk]:
        return self._chunks()

    def read(self, observe: Callable[[Chunk], None]) -> None:
        """One pass, as iterating makes (caching what fits), that shows each raw chunk to ``observe``."""
        for _ in self._chunks(observe):
            pass

    def _chunks(self, observe: Callable[[Chunk], None] | None = None) -> Iterator[EncodedChunk]:
        if self._cache is not None and observe is None:
            yield from self._cache
            return
        kept: list[EncodedChunk] | None = []
        used = 0
        for chunk in self.source.chunks(self.split):
            if observe is not None:
                observe(chunk)
            encoded = _encode(self.spec, chunk)
            if kept is not None:
                used += sum(t.numel() * t.element_size() for t in (encoded.dense, encoded.sparse, encoded.labels))
                if used <= self._budget:
                    kept.append(encoded)
                else:
                    kept = None
            yield encoded
        self._cache = kept


def _encode(spec: FeatureSpec, chunk: Chunk) -> EncodedChunk:
    dense, sparse = spec.encode_columns(chunk.columns, len(chunk))
    return EncodedChunk(
        torch.from_numpy(dense), torch.from_numpy(sparse), torch.from_numpy(chunk.labels.astype(np.float32)), chunk.extras
    )


# --------------------------------------------------------------------------
# Distributed plumbing
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Runtime:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _start_runtime(threads: int | None) -> Runtime:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    cuda = torch.cuda.is_available()
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    # Ranks sharing a machine split its cores instead of oversubscribing them.
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // world_size))
    return Runtime(rank, world_size, device)


# --------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------


def attention_pairs(schema: Sequence[SchemaField], spec: FeatureSpec) -> tuple[tuple[int, int], ...]:
    """``(pooled, candidate)`` table indices of the multi-valued fields that name a candidate
    field (the history features name the item), where the candidate is a single-valued table."""
    index = {name: i for i, name in enumerate(spec.table_names)}
    widths = spec.table_widths
    pairs = []
    for schema_field in schema:
        pooled, candidate = index.get(schema_field.name), index.get(schema_field.candidate or "")
        if pooled is not None and candidate is not None and widths[pooled] > 1 and widths[candidate] == 1:
            pairs.append((pooled, candidate))
    return tuple(pairs)


def build_config(options: TrainOptions, spec: FeatureSpec, schema: Sequence[SchemaField]) -> Any:
    """The model config of a run; ``schema`` (the source's fields) names what history pooling attends to."""
    config_type, _ = MODELS[options.model]
    shape = dict(num_dense=spec.num_dense, table_sizes=spec.table_sizes, table_widths=spec.table_widths)
    attention = attention_pairs(schema, spec) if options.history_pooling == "attention" else ()
    extra = {
        "dlrm": dict(interaction=options.interaction, dropout=options.dropout, attention=attention),
        "widedeep": dict(dropout=options.dropout, attention=attention),
    }.get(options.model, {})
    if options.preset == "kaggle":
        return replace(config_type.kaggle(**shape), **extra)
    return config_type(**shape, **extra)


def attention_warning(options: TrainOptions, config: Any) -> str | None:
    """Why ``--history-pooling attention`` changes nothing in this run, or None when it takes effect."""
    if options.history_pooling != "attention":
        return None
    if not hasattr(config, "attention"):
        return f"--history-pooling attention applies to dlrm and widedeep; {options.model} is trained as it always is"
    if config.attention:
        return None
    return ("--history-pooling attention: no history feature with a candidate item in this data (history features "
            "come from MovieLens or a table with user, item and time columns, with --history-length > 0); "
            "multi-valued features are mean-pooled")


# Validation gains below this do not extend a run (the best epoch's weights are kept all the same): once
# the learning rate has decayed, validation AUC creeps up by 1e-5 an epoch (Wide & Deep on 600,000
# synthetic rows: epochs 4 to 17 of 17 added 0.0002).
MIN_VALIDATION_GAIN = 1e-4


def auto_batch_size(train_rows: int) -> int:
    """The batch size when none is given: about 200 optimizer steps per epoch, between 64 and 512 rows.

    A fixed 512 left small training splits a handful of steps per epoch
    (4,000 rows: 7). Measured against 512 (3 seeds each): on Adult (39,000
    training rows, batch 195) test AUC +0.004 for DLRM and Wide & Deep, on
    50,000 synthetic rows (batch 200) +0.010 and +0.003; with early stopping,
    5,000 synthetic rows went from 0.672 to 0.806 (DLRM) and 0.786 to 0.828
    (Wide & Deep, 6 seeds). From 102,400 training rows on it is 512, as before.
    """
    return min(512, max(64, train_rows // 200))


# Options that change how a model trains, not which rows it trains and is
# tested on: runs differing only in these share their baselines, fitted once
# per process (``make demo`` trains three models on one split).
_MODEL_ONLY_OPTIONS = frozenset({
    "model", "out", "epochs", "batch_size", "lr", "embedding_lr", "lr_decay", "patience", "preset", "threads",
    "sparse_options", "warm_start", "freeze", "progress", "clip_dense", "bucketize", "buckets", "interaction", "dropout",
    "history_pooling", "weight_decay", "embedding_weight_decay", "baselines",
})
_fitted_baselines: dict[str, dict[str, dict[str, Any]]] = {}


def _baselines(options: TrainOptions, source: DataSource, log: Any) -> dict[str, dict[str, Any]]:
    """Every baseline of this run's split, by name: the one place that fills ``metrics.json``'s ``baselines``."""
    key = repr(sorted((name, value) for name, value in options.__dict__.items() if name not in _MODEL_ONLY_OPTIONS))
    if key not in _fitted_baselines:
        started = time.perf_counter()
        _fitted_baselines[key] = tabular_baselines(
            source, options=BaselineOptions(seed=options.seed), threads=torch.get_num_threads()
        )
        if isinstance(source, UserItemSource):  # popularity and matrix factorization need user ids
            _fitted_baselines[key].update(useritem_baselines(source, seed=options.seed, max_users=options.eval_users))
        log(f"baselines fitted in {time.perf_counter() - started:.1f}s: " + ", ".join(
            f"{name} test AUC {result['test_auc']:.4f}" for name, result in _fitted_baselines[key].items()))
    return copy.deepcopy(_fitted_baselines[key])


def train(options: TrainOptions) -> dict[str, Any]:
    """Train one model; returns the metrics also written to ``OUT/metrics.json``."""
    runtime = _start_runtime(options.threads)
    reuse_freed_memory()
    try:
        # Rank 0 writes into a staging directory that becomes ``out`` only once
        # everything is written: a failed run leaves no partial checkpoint.
        with staged_directory(options.out) if runtime.is_main else nullcontext() as out:
            return _train(options, runtime, out)
    finally:
        if runtime.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _train(options: TrainOptions, runtime: Runtime, out: Path | None) -> dict[str, Any]:
    """The run; ``out`` is the directory rank 0 writes the checkpoint into (None on other ranks)."""
    torch.manual_seed(options.seed)
    np.random.seed(options.seed)
    log = print if runtime.is_main and options.progress else (lambda *_: None)
    source = open_source(options.data, path=options.data_path, rows=options.rows, seed=options.seed,
                         sparse_options=options.sparse_options, bucketize=options.bucketize, buckets=options.buckets,
                         table=options.table, split=options.split, history_length=options.history_length,
                         negatives=options.negatives, items=options.items)
    train_rows = source.split_rows("train")
    batch_size = options.batch_size or auto_batch_size(train_rows)

    started = time.perf_counter()
    warn = (lambda message: print(f"warning: {message}", file=sys.stderr)) if runtime.is_main else (lambda _: None)
    spec = fit_spec(source.schema, (chunk.columns for chunk in source.chunks("train")),
                    clip_dense=options.clip_dense, warn=warn)
    log(f"FeatureSpec fitted in {time.perf_counter() - started:.1f}s: {spec.num_dense} dense, "
        f"{len(spec.sparse)} sparse features, {sum(spec.table_sizes):,} embedding rows")
    splits = {name: EncodedSplit(source, name, spec) for name in ("train", "val", "test")}
    # Read val and test once before training (fitting read train): a bad row
    # anywhere stops the run now, not after hours, and the encoded splits
    # stay cached for evaluation when they fit in memory.
    started = time.perf_counter()
    for name in ("val", "test"):
        tally = RangeTally(spec)
        splits[name].read(lambda chunk: tally.update(chunk.columns))
        for line in tally.warnings(name):
            warn(line)
    log(f"val and test read in {time.perf_counter() - started:.1f}s: "
        f"{splits['val'].rows:,} and {splits['test'].rows:,} rows")

    config = build_config(options, spec, source.schema)
    if (message := attention_warning(options, config)) is not None:
        warn(message)
    model = build_model(options.model, config)
    if options.warm_start or options.freeze:
        for line in apply_warm_start(model, spec, sources=options.warm_start, freeze=options.freeze):
            log(line)
    model.to(runtime.device)
    trained: nn.Module = model
    if runtime.world_size > 1:
        # The models' buffers are fixed index tensors: no need to broadcast them every step.
        device_ids = [runtime.device] if runtime.device.type == "cuda" else None
        trained = nn.parallel.DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)
    optimizer = build_optimizer(trained, lr=options.lr, embedding_lr=options.embedding_lr,
                                weight_decay=options.weight_decay, embedding_weight_decay=options.embedding_weight_decay)
    log(f"{options.model}: {sum(p.numel() for p in model.parameters()):,} parameters, world size {runtime.world_size}")

    history: list[dict[str, float]] = []
    stopping = EarlyStopping(model, patience=options.patience, min_gain=MIN_VALIDATION_GAIN)
    train_seconds, train_samples = 0.0, 0
    for epoch in range(1, options.epochs + 1):
        epoch_started = time.perf_counter()
        loss, samples, seconds = _train_epoch(trained, optimizer, splits["train"], options, runtime, epoch,
                                              batch_size=batch_size)
        train_seconds += seconds
        train_samples += samples
        val = _evaluate(model, splits["val"], runtime.device)
        score = val["auc"] if not math.isnan(val["auc"]) else -val["logloss"]
        history.append({"epoch": epoch, "train_loss": loss, "val_auc": val["auc"], "val_logloss": val["logloss"],
                        "seconds": time.perf_counter() - epoch_started})
        log(f"epoch {epoch}: train loss {loss:.4f}  val AUC {val['auc']:.4f}  val logloss {val['logloss']:.4f}")
        if stopping.update(epoch, score) and out is not None:
            save_checkpoint(out, model_name=options.model, config=config, model=model, spec=spec)
        if stopping.should_stop:
            log(f"early stop: no validation AUC gain of {MIN_VALIDATION_GAIN} for {options.patience} epochs "
                f"(best epoch {stopping.best_epoch})")
            break
        for inner in optimizer.optimizers.values():
            for group in inner.param_groups:
                group["lr"] *= options.lr_decay

    stopping.restore_best()
    test = _evaluate(model, splits["test"], runtime.device, extras=True)
    if isinstance(source, UserItemSource) and runtime.is_main:
        started = time.perf_counter()
        task = ranking_task(source, "test", max_users=options.eval_users, seed=options.seed)
        test.update(rank_candidates(task, model_scorer(model, spec, source, task, device=runtime.device),
                                    seed=options.seed))
        log(f"ranked the catalogue for {len(task.users):,} test users in {time.perf_counter() - started:.1f}s: "
            f"NDCG@10 {test['ranking_full_catalogue']['ndcg@10']:.4f}")
    baselines = _baselines(options, source, log) if options.baselines and runtime.is_main else {}
    result = _summarize(
        options, runtime, splits, test, history,
        best_epoch=stopping.best_epoch, train_samples=train_samples, train_seconds=train_seconds,
        batch_size=batch_size, min_count=options.sparse_options.resolved_min_count(train_rows), baselines=baselines,
    )
    if out is not None:
        write_json(out / METRICS_FILE, result)
        plot_learning_curve(history, out / CURVE_FILE, title=f"{options.model} on {options.data}",
                            oracle_auc=result.get("oracle_auc"))
    return result


def _train_epoch(
    model: nn.Module, optimizer: Any, split: EncodedSplit, options: TrainOptions, runtime: Runtime, epoch: int,
    *, batch_size: int,
) -> tuple[float, int, float]:
    """One pass over the training split; returns (mean loss, samples, seconds spent training)."""
    model.train()
    generator = torch.Generator().manual_seed(options.seed * 1_000_003 + epoch)
    total_loss, steps, samples, seconds = 0.0, 0, 0, 0.0
    expected = split.rows
    bar = tqdm(total=expected, unit="rows", desc=f"epoch {epoch}", leave=False,
               disable=not (runtime.is_main and options.progress), mininterval=0.5)
    for chunk in split:
        started = time.perf_counter()
        order = torch.randperm(len(chunk), generator=generator)
        # Every rank runs the same number of steps, or DDP's allreduce would hang.
        batch = min(batch_size, max(1, len(chunk) // runtime.world_size))
        num_steps = len(chunk) // (batch * runtime.world_size)
        for step in range(num_steps):
            first = (step * runtime.world_size + runtime.rank) * batch
            rows = order[first : first + batch]
            dense = chunk.dense[rows].to(runtime.device, non_blocking=True)
            sparse = chunk.sparse[rows].to(runtime.device, non_blocking=True)
            labels = chunk.labels[rows].to(runtime.device, non_blocking=True)
            total_loss += train_step(model, optimizer, dense, sparse, labels)
            steps += 1
            bar.update(batch * runtime.world_size)
        samples += num_steps * batch * runtime.world_size
        seconds += time.perf_counter() - started
        if steps:
            bar.set_postfix(loss=f"{total_loss / steps:.4f}")
    bar.close()
    return (total_loss / steps if steps else math.nan), samples, seconds


@torch.inference_mode()
def predict(model: nn.Module, split: EncodedSplit, device: torch.device, *, batch_size: int = 32_768):
    """Probabilities, labels and extras of a whole split, in order."""
    model.eval()
    probabilities, labels, extras = [], [], []
    for chunk in split:
        for start in range(0, len(chunk), batch_size):
            dense = chunk.dense[start : start + batch_size].to(device)
            sparse = chunk.sparse[start : start + batch_size].to(device)
            probabilities.append(torch.sigmoid(model(dense, sparse)).float().cpu().numpy())
        labels.append(chunk.labels.numpy())
        extras.append(chunk.extras)
    merged = {key: np.concatenate([e[key] for e in extras]) for key in (extras[0] if extras else {})}
    return np.concatenate(probabilities), np.concatenate(labels), merged


def _evaluate(model: nn.Module, split: EncodedSplit, device: torch.device, *, extras: bool = False) -> dict[str, Any]:
    probabilities, labels, more = predict(model, split, device)
    result: dict[str, Any] = metric_fns.binary_metrics(labels, probabilities)
    if extras:
        result["rows"] = len(labels)
        if "probability" in more:  # synthetic: the true probabilities give the oracle
            result["oracle"] = metric_fns.binary_metrics(labels, more["probability"])
        if "user" in more:
            result["ranking_rated_items"] = metric_fns.ranking_metrics(more["user"], labels, probabilities)
    return result


def _summarize(
    options: TrainOptions,
    runtime: Runtime,
    splits: dict[str, EncodedSplit],
    test: dict[str, Any],
    history: list[dict[str, float]],
    *,
    best_epoch: int,
    train_samples: int,
    train_seconds: float,
    batch_size: int,
    min_count: int,
    baselines: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """The ``metrics.json`` payload."""
    result: dict[str, Any] = {
        "model": options.model,
        "data": options.data,
        "test_auc": test["auc"],
        "test_logloss": test["logloss"],
        "test_calibration": {k: test[k] for k in ("mean_predicted", "observed_rate", "calibration_ratio")},
        "train_samples_per_sec": train_samples / train_seconds if train_seconds else math.nan,
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "rows": {name: split.rows for name, split in splits.items()},
        "world_size": runtime.world_size,
        "threads_per_rank": torch.get_num_threads(),
        # What the options left to "auto" (None) came to for this split.
        "batch_size": batch_size,
        "min_count": min_count,
        "history": history,
        "options": {k: (asdict(v) if is_dataclass(v) else v) for k, v in options.__dict__.items()},
    }
    if "oracle" in test:
        result["oracle_auc"] = test["oracle"]["auc"]
        result["oracle_logloss"] = test["oracle"]["logloss"]
        result["auc_gap_closed"] = (test["auc"] - 0.5) / (test["oracle"]["auc"] - 0.5)
    for key in RANKING_KEYS:
        if key in test:
            result[key] = test[key]
    if baselines:
        result["baselines"] = baselines
    return result


def plot_learning_curve(history: list[dict[str, float]], path: Path, *, title: str, oracle_auc: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    epochs = [h["epoch"] for h in history]
    figure, (loss_axis, auc_axis) = plt.subplots(1, 2, figsize=(10, 4))
    loss_axis.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train loss")
    loss_axis.plot(epochs, [h["val_logloss"] for h in history], marker="o", label="validation log loss")
    loss_axis.set_xlabel("epoch")
    loss_axis.set_ylabel("log loss")
    loss_axis.legend()
    auc_axis.plot(epochs, [h["val_auc"] for h in history], marker="o", label="validation AUC")
    if oracle_auc is not None:
        auc_axis.axhline(oracle_auc, color="gray", linestyle="--", label=f"oracle AUC (test) {oracle_auc:.4f}")
    auc_axis.set_xlabel("epoch")
    auc_axis.set_ylabel("AUC")
    auc_axis.legend()
    for axis in (loss_axis, auc_axis):
        axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
