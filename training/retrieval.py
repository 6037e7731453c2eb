"""Training and full-catalogue evaluation of the two-tower retrieval model.

``python -m training --model twotower --data movielens --data-path DIR --out runs/retrieval``
(or ``--data synthetic-useritem``, whose planted preferences give an oracle).

* Each tower gets its own FeatureSpec, fitted on the training split: the
  item tower the source's item features (``item_columns``: id, genres,
  year), the user tower every other feature (user id and attributes, and
  the history features of :mod:`training.data.interactions`).
* Training pairs are the training split's positives (label 1: a rating of 4
  or 5 on MovieLens) with the user side as of that interaction. The loss is
  the in-batch sampled softmax of Yi et al. (2019): each user's positive
  against the other items of the batch, logits ``<u, v> / temperature``
  minus ``log q(item)`` (the logQ correction: popular items are in-batch
  negatives more often than a full softmax would weigh them), with
  ``q`` each item's share of the training positives. An item that is also
  the positive of another row of the batch is not a negative there.
* Evaluation ranks the full catalogue (:mod:`training.evaluation`'s
  ``ranking_full_catalogue`` candidates: every item the user had not
  interacted with before the split) at recall@{10,100,200}, NDCG@10 and
  HR@10, beside item popularity and matrix factorization
  (:mod:`training.baselines_useritem`) and, on the synthetic source, the
  oracle (the planted affinity). Early stopping watches validation
  recall@100 on the same protocol.

Checkpoint directory (written whole or not at all, :func:`training.checkpoint.staged_directory`)::

    model.pt            state_dict of the TwoTower
    config.json         {"model": "twotower", "config": {...TwoTowerConfig...}}
    user_features.json  the user tower's FeatureSpec
    item_features.json  the item tower's FeatureSpec
    catalogue.parquet   every catalogue item: its id and raw item features, as the specs name them
    queries.parquet     the raw user-side features of the test users at their test points (real queries
                        for the export's parity check and index measurement)
    metrics.json        the model's and the baselines' full-catalogue metrics, history, options
    learning_curve.png
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pa_parquet
import torch
from torch import nn
from torch.nn import functional
from tqdm import tqdm

from featurespec import FeatureSpec, StringColumn
from featurespec.arrow import table_to_columns  # the inverse of columns_to_table
from handlers.retrieval_index import CATALOGUE_FILE, ITEM_ID_COLUMN, USER_FEATURES_FILE
from training import metrics as metric_fns
from training.baselines_useritem import MFOptions, fit_mf, item_scores, per_item, split_rows
from training.checkpoint import (
    CONFIG_FILE,
    CURVE_FILE,
    METRICS_FILE,
    WEIGHTS_FILE,
    read_json,
    staged_directory,
    write_json,
)
from training.data import open_source
from training.data.interactions import DEFAULT_HISTORY_LENGTH, SPLIT_NAMES, TRAIN, SplitName
from training.evaluation import RankingTask, Scorer, UserItemSource, full_catalogue_candidates, ranking_task
from training.fitting import SchemaField, fit_spec
from training.models import config_from_dict, config_to_dict
from training.models.two_tower import TwoTower, TwoTowerConfig
from training.optim import EarlyStopping

MODEL_NAME = "twotower"
ITEM_FEATURES_FILE = "item_features.json"
QUERIES_FILE = "queries.parquet"
RECALL_KS = (10, 100, 200)
EARLY_STOPPING_K = 100
MIN_VALIDATION_GAIN = 1e-4  # validation recall@100 gains below this do not extend a run


@dataclass(frozen=True)
class RetrievalOptions:
    """One two-tower training run; ``python -m training --model twotower`` builds it from its flags."""

    out: str
    data: str = "synthetic-useritem"
    data_path: str | None = None
    rows: int | None = None
    items: int | None = None  # synthetic-useritem: items in the catalogue (None: the source's default)
    split: SplitName = "time"
    history_length: int = DEFAULT_HISTORY_LENGTH
    eval_users: int | None = None  # at most this many (seeded sample) validation and test users
    clip_dense: bool = True  # each tower's dense values clipped to their training range, as the rankers do
    embedding_dim: int = 32
    hidden: tuple[int, ...] = (128,)
    output_dim: int = 64
    # Softmax temperature on the cosines: on MovieLens 100K (seed 0, both splits, lr 1e-3 and 3e-3) 0.2 gave
    # the best mean validation recall@100, 0.05 and 0.1 up to 0.02 less. lr 3e-3 was within 0.016 of 1e-3.
    temperature: float = 0.2
    logq_correction: bool = True
    epochs: int = 30
    batch_size: int = 512
    lr: float = 1e-3
    patience: int = 3  # epochs without validation recall@100 gain before stopping
    seed: int = 0
    threads: int | None = None
    baselines: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        if self.split not in SPLIT_NAMES:
            raise ValueError(f"unknown split {self.split!r}; choose one of {', '.join(SPLIT_NAMES)}")
        for name in ("epochs", "batch_size", "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 (the other rows are the negatives), got {self.batch_size}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.eval_users is not None and self.eval_users < 1:
            raise ValueError(f"eval_users must be >= 1 (or None for every user), got {self.eval_users}")
        if self.history_length < 0:
            raise ValueError(f"history_length must be >= 0 (0: no history features), got {self.history_length}")


# --------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------


def sampling_log_probabilities(item_rows: np.ndarray, num_items: int) -> torch.Tensor:
    """``float32[I]``: log of each item's share of the training positives (its in-batch sampling
    probability, up to the batch size, which the softmax cancels); ``-inf`` for an item never sampled."""
    counts = np.bincount(item_rows, minlength=num_items).astype(np.float64)
    with np.errstate(divide="ignore"):
        return torch.from_numpy(np.log(counts / counts.sum()).astype(np.float32))


def in_batch_softmax_loss(
    users: torch.Tensor,
    items: torch.Tensor,
    item_rows: torch.Tensor,
    *,
    temperature: float,
    log_q: torch.Tensor | None,
) -> torch.Tensor:
    """Mean cross-entropy of each user ``[B, D]`` against the batch's items ``[B, D]``, row ``b``'s own item
    the target.

    ``logits[b, j] = <users[b], items[j]> / temperature - log_q[item_rows[j]]`` (no correction when
    ``log_q`` is None); an item equal to row ``b``'s positive elsewhere in the batch is masked out of row ``b``.
    """
    logits = users @ items.t() / temperature  # (B, B)
    if log_q is not None:
        logits = logits - log_q[item_rows].unsqueeze(0)
    same_item = item_rows.unsqueeze(0) == item_rows.unsqueeze(1)  # (B, B)
    duplicate = same_item & ~torch.eye(len(item_rows), dtype=torch.bool, device=logits.device)
    logits = logits.masked_fill(duplicate, -math.inf)
    return functional.cross_entropy(logits, torch.arange(len(item_rows), device=logits.device))


# --------------------------------------------------------------------------
# Features: the two sides of a user-item source
# --------------------------------------------------------------------------


def split_schema(source: UserItemSource, schema: Sequence[SchemaField]) -> tuple[tuple[SchemaField, ...], ...]:
    """``(user fields, item fields)``: the item side is what ``item_columns`` hands out, the user side the rest."""
    catalogue = np.asarray(source.catalogue())
    item_names = set(source.item_columns(catalogue[:1]))
    return tuple(f for f in schema if f.name not in item_names), tuple(f for f in schema if f.name in item_names)


def query_columns(source: UserItemSource, users: np.ndarray, timestamps: np.ndarray) -> dict[str, Any]:
    """The user side of a request: the user's features and history strictly before each moment."""
    return {**source.user_columns(users), **source.history_columns(users, timestamps)}


def columns_to_table(columns: dict[str, Any]) -> pa.Table:
    """Raw columns (packed text or numbers) as an Arrow table, text as strings (empty = missing)."""
    arrays = {}
    for name, values in columns.items():
        if isinstance(values, StringColumn):
            arrays[name] = pa.LargeStringArray.from_buffers(
                len(values), pa.py_buffer(values.offsets.astype(np.int64)), pa.py_buffer(values.data)
            )
        else:
            arrays[name] = pa.array(np.asarray(values, np.float64))
    return pa.table(arrays)


def encode(spec: FeatureSpec, columns: dict[str, Any], rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoded tensors of ``rows`` rows; columns the spec does not name are ignored."""
    dense, sparse = spec.encode_columns(columns, rows)
    return torch.from_numpy(dense), torch.from_numpy(sparse)


@torch.inference_mode()
def embed(tower: nn.Module, dense: torch.Tensor, sparse: torch.Tensor, *, batch_rows: int = 8192) -> np.ndarray:
    """``float32[B, D]``: a tower's embeddings of encoded rows, in eval mode."""
    tower.eval()
    parts = [tower(dense[lo : lo + batch_rows], sparse[lo : lo + batch_rows]) for lo in range(0, len(dense), batch_rows)]
    return torch.cat(parts).numpy() if parts else np.zeros((0, 0), np.float32)


# --------------------------------------------------------------------------
# Full-catalogue evaluation
# --------------------------------------------------------------------------


def full_catalogue_metrics(task: RankingTask, scorer: Scorer, *, ks: Sequence[int] = RECALL_KS) -> dict[str, Any]:
    """Recall@k for each ``k``, with NDCG@10 and HR@10, over ``ranking_full_catalogue``'s candidates."""
    candidates = full_catalogue_candidates(task)
    scores = scorer(candidates.user_index, candidates.item_index)
    result: dict[str, Any] = {}
    for k in ks:
        found = metric_fns.topk_metrics(candidates.user_index, scores, candidates.relevant, k=k)
        result[f"recall@{k}"] = found[f"recall@{k}"]
        if k == 10:
            result.update({"ndcg@10": found["ndcg@10"], "hr@10": found["hr@10"]})
        result["users"] = found["users"]
    result.update(split=task.split, candidates="every catalogue item the user had not interacted with before the split",
                  mean_candidates=len(candidates) / max(len(task.users), 1))
    return result


def embedding_scorer(user_vectors: np.ndarray, item_vectors: np.ndarray) -> Scorer:
    """Scores of task rows from embeddings: one ``[U, I]`` product, then a gather."""
    scores = user_vectors @ item_vectors.T  # (U, I)
    return lambda user_index, item_index: scores[user_index, item_index]


def baseline_scorers(source: Any, task: RankingTask, *, seed: int) -> dict[str, Scorer]:
    """Item popularity (training positives) and matrix factorization, as fitted by
    :func:`training.baselines_useritem.useritem_baselines`, as scorers of ``task``'s rows."""
    popularity = item_popularity(source)
    mf = fit_mf(split_rows(source, "train"), split_rows(source, "val"), MFOptions(seed=seed))
    return {"item_popularity": id_scorer(task, popularity), "matrix_factorization": id_scorer(task, mf.predict)}


def item_popularity(source: UserItemSource) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """``predict(user ids, item ids)``: each item's number of training positives, whoever the user (0: none)."""
    every = source.interactions()
    train = every.splits == TRAIN
    items = np.unique(every.items)
    return item_scores(items, per_item(items, every.items[train], every.labels[train].astype(np.float64)), default=0.0)


def id_scorer(task: RankingTask, predict: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> Scorer:
    """``predict(user ids, item ids)`` as a scorer of ``task``'s rows."""
    return lambda user_index, item_index: predict(task.users[user_index], task.catalogue[item_index])


# --------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------


@dataclass
class _Pairs:
    """Training positives: encoded user side and the catalogue row of the item."""

    user_dense: torch.Tensor  # float32[P, Nu]
    user_sparse: torch.Tensor  # int64[P, Su]
    item_rows: torch.Tensor  # int64[P]


def _training_pairs(source: Any, user_spec: FeatureSpec, catalogue: np.ndarray) -> _Pairs:
    dense_parts, sparse_parts, row_parts = [], [], []
    for chunk in source.chunks("train"):
        positions = np.minimum(np.searchsorted(catalogue, chunk.extras["item"]), len(catalogue) - 1)
        keep = (chunk.labels == 1) & (catalogue[positions] == chunk.extras["item"])
        dense, sparse = encode(user_spec, chunk.columns, len(chunk))
        keep_rows = torch.from_numpy(np.flatnonzero(keep))
        dense_parts.append(dense[keep_rows])
        sparse_parts.append(sparse[keep_rows])
        row_parts.append(torch.from_numpy(positions[keep].astype(np.int64)))
    pairs = _Pairs(torch.cat(dense_parts), torch.cat(sparse_parts), torch.cat(row_parts))
    if len(pairs.item_rows) < 2:
        raise ValueError(f"{len(pairs.item_rows)} training positives: the in-batch softmax needs at least 2")
    return pairs


def train_retrieval(options: RetrievalOptions) -> dict[str, Any]:
    """Train, evaluate beside the baselines, write the checkpoint; returns ``metrics.json``'s payload."""
    if options.threads:
        torch.set_num_threads(options.threads)
    with staged_directory(options.out) as out:
        return _train(options, out)


def _train(options: RetrievalOptions, out: Path) -> dict[str, Any]:
    torch.manual_seed(options.seed)
    log = print if options.progress else (lambda *_: None)
    source = open_source(options.data, path=options.data_path, rows=options.rows, seed=options.seed,
                         split=options.split, history_length=options.history_length, items=options.items)
    if not isinstance(source, UserItemSource):
        raise ValueError(f"--model {MODEL_NAME} needs user-item data (movielens, synthetic-useritem), not {options.data}")
    started = time.perf_counter()
    user_schema, item_schema = split_schema(source, source.schema)
    # Each fitter reads only its own schema's columns of the chunks.
    user_spec, item_spec = (
        fit_spec(schema, (chunk.columns for chunk in source.chunks("train")), clip_dense=options.clip_dense)
        for schema in (user_schema, item_schema)
    )
    catalogue = np.asarray(source.catalogue(), np.int64)
    item_columns = source.item_columns(catalogue)
    item_dense, item_sparse = encode(item_spec, item_columns, len(catalogue))
    pairs = _training_pairs(source, user_spec, catalogue)
    log_q = sampling_log_probabilities(pairs.item_rows.numpy(), len(catalogue)) if options.logq_correction else None
    val_task = ranking_task(source, "val", max_users=options.eval_users, seed=options.seed)
    val_dense, val_sparse = encode(user_spec, query_columns(source, val_task.users, val_task.timestamps),
                                   len(val_task.users))
    log(f"specs fitted and {len(pairs.item_rows):,} training positives encoded in {time.perf_counter() - started:.1f}s; "
        f"{len(catalogue):,} items, {len(val_task.users):,} validation users")

    config = TwoTowerConfig(
        user_num_dense=user_spec.num_dense, user_table_sizes=user_spec.table_sizes,
        user_table_widths=user_spec.table_widths, item_num_dense=item_spec.num_dense,
        item_table_sizes=item_spec.table_sizes, item_table_widths=item_spec.table_widths,
        embedding_dim=options.embedding_dim, hidden=options.hidden, output_dim=options.output_dim,
    )
    model = TwoTower(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=options.lr)

    def validation_recall() -> float:
        scorer = embedding_scorer(embed(model.user_tower, val_dense, val_sparse),
                                  embed(model.item_tower, item_dense, item_sparse))
        return full_catalogue_metrics(val_task, scorer, ks=(EARLY_STOPPING_K,))[f"recall@{EARLY_STOPPING_K}"]

    history: list[dict[str, float]] = []
    stopping = EarlyStopping(model, patience=options.patience, min_gain=MIN_VALIDATION_GAIN)
    generator = torch.Generator().manual_seed(options.seed)
    train_seconds = 0.0
    batch_size = min(options.batch_size, len(pairs.item_rows))
    for epoch in range(1, options.epochs + 1):
        epoch_started = time.perf_counter()
        loss = _train_epoch(model, optimizer, pairs, item_dense, item_sparse, log_q, options, generator,
                            batch_size=batch_size, epoch=epoch)
        train_seconds += time.perf_counter() - epoch_started
        recall = validation_recall()
        history.append({"epoch": epoch, "train_loss": loss, f"val_recall@{EARLY_STOPPING_K}": recall,
                        "seconds": time.perf_counter() - epoch_started})
        log(f"epoch {epoch}: train loss {loss:.4f}  val recall@{EARLY_STOPPING_K} {recall:.4f}")
        stopping.update(epoch, recall)
        if stopping.should_stop:
            log(f"early stop: no validation recall@{EARLY_STOPPING_K} gain for {options.patience} epochs "
                f"(best epoch {stopping.best_epoch})")
            break
    stopping.restore_best()
    model.eval()

    started = time.perf_counter()
    test_task = ranking_task(source, "test", max_users=options.eval_users, seed=options.seed)
    test_columns = query_columns(source, test_task.users, test_task.timestamps)
    test_dense, test_sparse = encode(user_spec, test_columns, len(test_task.users))
    user_vectors = embed(model.user_tower, test_dense, test_sparse)
    item_vectors = embed(model.item_tower, item_dense, item_sparse)
    results = {MODEL_NAME: full_catalogue_metrics(test_task, embedding_scorer(user_vectors, item_vectors))}
    if options.baselines:
        for name, scorer in baseline_scorers(source, test_task, seed=options.seed).items():
            results[name] = full_catalogue_metrics(test_task, scorer)
    affinity: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = getattr(source, "affinity", None)
    if affinity is not None:  # the synthetic source's planted preferences: the best any model can rank
        results["oracle"] = full_catalogue_metrics(test_task, id_scorer(test_task, affinity))
    log(f"ranked the full catalogue for {len(test_task.users):,} test users in {time.perf_counter() - started:.1f}s")

    metrics: dict[str, Any] = {
        "model": MODEL_NAME,
        "data": options.data,
        "split": options.split,
        "seed": options.seed,
        "ranking_full_catalogue": results[MODEL_NAME],
        "baselines": {name: value for name, value in results.items() if name not in (MODEL_NAME, "oracle")},
        **({"oracle": results["oracle"]} if "oracle" in results else {}),
        "best_epoch": stopping.best_epoch,
        "epochs_run": len(history),
        "best_val_recall@100": stopping.best_score,
        "train_positives": len(pairs.item_rows),
        "catalogue_items": len(catalogue),
        "train_samples_per_sec": len(history) * len(pairs.item_rows) / train_seconds if train_seconds else math.nan,
        "history": history,
        "options": asdict(options),
    }
    save_retrieval_checkpoint(out, model=model, config=config, user_spec=user_spec, item_spec=item_spec,
                              catalogue=catalogue, item_columns=item_columns, queries=test_columns, metrics=metrics)
    log(format_table(metrics))
    return metrics


def _train_epoch(
    model: TwoTower,
    optimizer: torch.optim.Optimizer,
    pairs: _Pairs,
    item_dense: torch.Tensor,
    item_sparse: torch.Tensor,
    log_q: torch.Tensor | None,
    options: RetrievalOptions,
    generator: torch.Generator,
    *,
    batch_size: int,
    epoch: int,
) -> float:
    """One pass over the training positives in shuffled batches (the last partial batch dropped); the mean loss."""
    model.train()
    order = torch.randperm(len(pairs.item_rows), generator=generator)
    steps = len(order) // batch_size
    total = 0.0
    for step in tqdm(range(steps), desc=f"epoch {epoch}", leave=False, disable=not options.progress, mininterval=0.5):
        rows = order[step * batch_size : (step + 1) * batch_size]
        item_rows = pairs.item_rows[rows]
        users = model.user_tower(pairs.user_dense[rows], pairs.user_sparse[rows])  # (B, D)
        items = model.item_tower(item_dense[item_rows], item_sparse[item_rows])  # (B, D)
        loss = in_batch_softmax_loss(users, items, item_rows, temperature=options.temperature, log_q=log_q)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total += loss.item()
    return total / steps


# --------------------------------------------------------------------------
# Checkpoint
# --------------------------------------------------------------------------


@dataclass
class RetrievalCheckpoint:
    config: TwoTowerConfig
    model: TwoTower  # on the CPU, in eval mode
    user_spec: FeatureSpec
    item_spec: FeatureSpec
    catalogue: np.ndarray  # int64[I] item ids, in catalogue.parquet's order
    item_columns: dict[str, Any]  # raw item features, one row per catalogue item
    queries: dict[str, Any]  # raw user-side features of real queries
    metrics: dict[str, Any]
    path: Path


def save_retrieval_checkpoint(
    directory: str | os.PathLike[str],
    *,
    model: TwoTower,
    config: TwoTowerConfig,
    user_spec: FeatureSpec,
    item_spec: FeatureSpec,
    catalogue: np.ndarray,
    item_columns: dict[str, Any],
    queries: dict[str, Any],
    metrics: dict[str, Any],
) -> Path:
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    torch.save({key: value.detach().cpu() for key, value in model.state_dict().items()}, out / WEIGHTS_FILE)
    write_json(out / CONFIG_FILE, {"model": MODEL_NAME, "config": config_to_dict(config)})
    user_spec.save(out / USER_FEATURES_FILE)
    item_spec.save(out / ITEM_FEATURES_FILE)
    catalogue_table = columns_to_table(item_columns).add_column(0, ITEM_ID_COLUMN, pa.array(catalogue, pa.int64()))
    pa_parquet.write_table(catalogue_table, out / CATALOGUE_FILE)
    pa_parquet.write_table(columns_to_table(queries), out / QUERIES_FILE)
    write_json(out / METRICS_FILE, metrics)
    plot_learning_curve(metrics["history"], out / CURVE_FILE, title=f"{MODEL_NAME} on {metrics['data']}")
    return out


def load_retrieval_checkpoint(directory: str | os.PathLike[str]) -> RetrievalCheckpoint:
    path = Path(directory)
    for name in (WEIGHTS_FILE, CONFIG_FILE, USER_FEATURES_FILE, ITEM_FEATURES_FILE, CATALOGUE_FILE, QUERIES_FILE):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name}: not found (is {path} a two-tower checkpoint directory?)")
    header = read_json(path / CONFIG_FILE)
    if header.get("model") != MODEL_NAME:
        raise ValueError(f"{path / CONFIG_FILE}: model {header.get('model')!r}, expected {MODEL_NAME!r}")
    try:
        config = config_from_dict(MODEL_NAME, header["config"])
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path / CONFIG_FILE}: not a valid two-tower config: {error}") from None
    model = TwoTower(config)
    model.load_state_dict(torch.load(path / WEIGHTS_FILE, map_location="cpu", weights_only=True))
    model.eval()
    item_columns = table_to_columns(pa_parquet.read_table(path / CATALOGUE_FILE))
    catalogue = item_columns.pop(ITEM_ID_COLUMN).astype(np.int64)
    metrics = read_json(path / METRICS_FILE) if (path / METRICS_FILE).is_file() else {}
    return RetrievalCheckpoint(
        config, model, FeatureSpec.load(path / USER_FEATURES_FILE), FeatureSpec.load(path / ITEM_FEATURES_FILE),
        catalogue, item_columns, table_to_columns(pa_parquet.read_table(path / QUERIES_FILE)), metrics, path,
    )


# --------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------


def format_table(metrics: dict[str, Any]) -> str:
    """The test metrics of the model, its baselines and the oracle, one line each."""
    rows = {MODEL_NAME: metrics["ranking_full_catalogue"], **metrics.get("baselines", {})}
    if "oracle" in metrics:
        rows["oracle"] = metrics["oracle"]
    columns = [f"recall@{k}" for k in RECALL_KS] + ["ndcg@10", "hr@10"]
    first = metrics["ranking_full_catalogue"]
    lines = [f"{metrics['data']}, {metrics['split']} split, seed {metrics['seed']}: full catalogue "
             f"({first['mean_candidates']:.0f} candidates per user on average), {first['users']} test users",
             f"{'':22}" + "".join(f"{name:>11}" for name in columns)]
    for name, values in rows.items():
        lines.append(f"{name:22}" + "".join(f"{values[column]:>11.4f}" for column in columns))
    return "\n".join(lines)


def plot_learning_curve(history: list[dict[str, float]], path: Path, *, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    figure, (loss_axis, recall_axis) = plt.subplots(1, 2, figsize=(10, 4))
    loss_axis.plot(epochs, [h["train_loss"] for h in history], marker="o")
    loss_axis.set_xlabel("epoch")
    loss_axis.set_ylabel("in-batch softmax loss (train)")
    key = f"val_recall@{EARLY_STOPPING_K}"
    recall_axis.plot(epochs, [h[key] for h in history], marker="o")
    recall_axis.set_xlabel("epoch")
    recall_axis.set_ylabel(f"validation {key} (full catalogue)")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
