"""Benchmark: DLRM training speed on the CPU (forward + backward + optimizer step), beside a plain PyTorch DLRM.

    python -m benchmarks.training [--batch-sizes 128,2048] [--steps 50] [--threads 2]
                                  [--out results/training] [--compare] [--profile]

The model is DLRM's Criteo Kaggle configuration (:meth:`DLRMConfig.kaggle`:
13 dense features, 26 tables of 100,000 rows, D=16, bottom 13-512-256-64-16,
top 367-512-256-1) on random ids and labels, trained with the project's
default optimizer. Beside it, in the same run, steps a plain PyTorch DLRM of
the same architecture (:mod:`benchmarks.reference_dlrm`: per-table
``nn.EmbeddingBag``, a Python loop over the tables, ``torch.optim.SGD``).
The two take turns step by step (:func:`benchmarks.common.time_side_by_side`),
so a busy machine slows both alike; each batch size reports each side's
median ms/step with its interquartile range, and their ratio (plain / ours).

``--compare`` times every optimizer of :mod:`training.optim` in the same
turns and trains each on a small learnable synthetic CTR task to compare
test AUC. ``--profile`` runs ``torch.profiler`` over a few steps and writes
the operators where the time goes.

Writes ``training.json``, ``training.md`` and ``training.png`` (plus
``profile.txt``) under ``--out``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import Timing, machine_header, machine_info, time_side_by_side
from benchmarks.reference_dlrm import REFERENCE_NAME, PlainDLRM, plain_sgd, plain_train_step
from handlers.memory import reuse_freed_memory
from training.metrics import auc
from training.models import DLRM, DLRMConfig
from training.models.dlrm import InteractionArch
from training.optim import DEFAULT_OPTIMIZER, OPTIMIZER_NAMES, build_optimizer, train_step

NUM_DENSE = 13
NUM_TABLES = 26
TABLE_ROWS = 100_000
# The learning rate does not change what a step costs; the plain model uses our SGD row's.
REFERENCE_LR = 0.1
# (dense lr, embedding lr) per optimizer: the first pair is used for timing; the
# quick AUC task tries every pair and keeps the best, so no optimizer loses to a bad lr.
LEARNING_RATES = {
    "rowwise_adagrad": ((1e-3, 0.02), (1e-3, 0.005), (1e-3, 0.08)),
    "sparse_adam": ((1e-3, 4e-3), (1e-3, 1e-3), (1e-3, 0.016)),
    "sgd": ((0.1, 0.1), (0.03, 0.03), (0.3, 0.3)),
}


def kaggle_config(*, tables: int = NUM_TABLES, table_rows: int = TABLE_ROWS) -> DLRMConfig:
    return DLRMConfig.kaggle(num_dense=NUM_DENSE, table_sizes=(table_rows,) * tables)


def describe(config: DLRMConfig) -> str:
    """The architecture in one line, sizes as DLRM papers write them."""
    tables = len(config.table_sizes)
    top_in = InteractionArch.output_size(tables, config.embedding_dim)
    bottom = "-".join(map(str, (config.num_dense, *config.bottom_mlp, config.embedding_dim)))
    top = "-".join(map(str, (top_in, *config.top_mlp, 1)))
    return (
        f"DLRM Kaggle preset, {tables} tables x {config.table_sizes[0]:,} rows, D={config.embedding_dim}, "
        f"bottom {bottom}, top {top}"
    )


def random_batches(
    batch_size: int, *, tables: int = NUM_TABLES, table_rows: int = TABLE_ROWS, count: int = 8, seed: int = 0
) -> list[tuple[torch.Tensor, ...]]:
    """Pre-built batches, so the timing covers the training step only."""
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.rand(batch_size, NUM_DENSE, generator=generator),
            torch.randint(0, table_rows, (batch_size, tables), generator=generator),
            torch.randint(0, 2, (batch_size,), generator=generator).float(),
        )
        for _ in range(count)
    ]


@dataclass(frozen=True)
class SpeedComparison:
    """One batch size and optimizer: our step and the plain PyTorch step, timed in the same turns."""

    batch_size: int
    optimizer: str
    ours: Timing
    reference: Timing

    @property
    def reference_over_ours(self) -> float:
        """How many of our steps fit in one plain PyTorch step (median over median)."""
        return self.reference.median_ms / self.ours.median_ms

    def samples_per_second(self, timing: Timing) -> float:
        return self.batch_size / timing.median_ms * 1e3

    def to_json(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "optimizer": self.optimizer,
            "ours": {**asdict(self.ours), "samples_per_second": self.samples_per_second(self.ours)},
            "reference": {**asdict(self.reference), "samples_per_second": self.samples_per_second(self.reference)},
            "reference_over_ours": self.reference_over_ours,
        }


def time_training(
    batch_size: int,
    *,
    optimizer_names: Sequence[str],
    steps: int,
    warmup: int,
    config: DLRMConfig,
) -> list[SpeedComparison]:
    """Our training step with each optimizer and the plain PyTorch step, taking turns step by step."""
    batches = random_batches(batch_size, tables=len(config.table_sizes), table_rows=min(config.table_sizes))
    calls: dict[str, tuple] = {}
    for name in optimizer_names:
        torch.manual_seed(0)
        model = DLRM(config)
        dense_lr, embedding_lr = LEARNING_RATES[name][0]
        optimizer = build_optimizer(model, lr=dense_lr, embedding_lr=embedding_lr, name=name)
        calls[name] = (lambda batch, model=model, optimizer=optimizer: train_step(model, optimizer, *batch), batches)
    torch.manual_seed(0)
    reference = PlainDLRM(config)
    reference_optimizer = plain_sgd(reference, lr=REFERENCE_LR)
    calls[REFERENCE_NAME] = (lambda batch: plain_train_step(reference, reference_optimizer, *batch), batches)
    timed = time_side_by_side(calls, min_time=0.0, min_iters=steps, warmup=warmup)
    reference_timing = Timing.of(timed.pop(REFERENCE_NAME))
    return [SpeedComparison(batch_size, name, Timing.of(latencies), reference_timing) for name, latencies in timed.items()]


def quick_auc(
    optimizer_name: str, *, lr: float, embedding_lr: float, steps: int = 300, batch_size: int = 256, seed: int = 0
) -> float:
    """Test AUC after ``steps`` on a learnable task: each id carries a hidden effect.

    Clicks follow ``sigmoid(sum of per-id effects + a dense term + one pairwise
    interaction)`` over 8 tables of 5,000 rows, so a model has to learn many
    rarely seen embedding rows, which is where the optimizers differ.
    """
    generator = torch.Generator().manual_seed(seed)
    tables, rows, dense_features = 8, 5_000, 4
    effects = torch.randn(tables, rows, generator=generator) * 0.8
    dense_weights = torch.randn(dense_features, generator=generator)

    def sample(count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dense = torch.randn(count, dense_features, generator=generator)
        # Zipf-like ids: a few frequent values, a long tail.
        sparse = (torch.rand(count, tables, generator=generator) ** 3 * rows).long().clamp(max=rows - 1)
        logit = effects.gather(1, sparse.t()).t().sum(1) + dense @ dense_weights
        logit = logit + 1.5 * effects[0][sparse[:, 0]] * effects[1][sparse[:, 1]] - 1.0
        labels = (torch.rand(count, generator=generator) < torch.sigmoid(logit)).float()
        return dense, sparse, labels

    torch.manual_seed(seed)
    model = DLRM(DLRMConfig(num_dense=dense_features, table_sizes=(rows,) * tables))
    optimizer = build_optimizer(model, lr=lr, embedding_lr=embedding_lr, name=optimizer_name)
    for _ in range(steps):
        train_step(model, optimizer, *sample(batch_size))
    dense, sparse, labels = sample(20_000)
    model.eval()
    with torch.inference_mode():
        scores = model(dense, sparse)
    return auc(labels.numpy(), scores.numpy())


def profile_training(batch_size: int, *, optimizer_name: str, steps: int, config: DLRMConfig, rows: int = 25) -> str:
    """The operators that take the time in ``steps`` of our training steps, as a table."""
    torch.manual_seed(0)
    model = DLRM(config)
    dense_lr, embedding_lr = LEARNING_RATES[optimizer_name][0]
    optimizer = build_optimizer(model, lr=dense_lr, embedding_lr=embedding_lr, name=optimizer_name)
    batches = random_batches(batch_size, tables=len(config.table_sizes), table_rows=min(config.table_sizes))
    for step in range(3):
        train_step(model, optimizer, *batches[step])
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        for step in range(steps):
            train_step(model, optimizer, *batches[step % len(batches)])
    return profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def spread(side: dict[str, float]) -> str:
    """A side's ms/step as ``median (p25-p75)``."""
    return f"{side['median_ms']:.1f} ({side['p25_ms']:.1f}-{side['p75_ms']:.1f})"


def summary_line(row: dict[str, Any]) -> str:
    """One speed row (:meth:`SpeedComparison.to_json`) for the console."""
    ours, reference = row["ours"], row["reference"]
    return (
        f"batch {row['batch_size']:>5}  ours ({row['optimizer']}) {spread(ours)} ms/step, "
        f"{ours['samples_per_second']:,.0f} samples/s  |  plain PyTorch {spread(reference)} ms/step, "
        f"{reference['samples_per_second']:,.0f} samples/s  |  plain / ours {row['reference_over_ours']:.2f}x"
    )


def markdown(results: dict[str, Any]) -> str:
    settings = results["settings"]
    lines = [
        "# DLRM training speed (CPU)",
        "",
        machine_header(results["machine"]),
        "",
        f"Model: {settings['model']}; random ids and labels. Each row times our training step and a "
        f"{results['reference']} of the same architecture, taking turns step by step in one run: "
        f"{settings['warmup']} warm-up steps, then {settings['steps']} timed steps each. "
        "ms/step is the median with the interquartile range in brackets; samples/s is batch / median; "
        "plain / ours is the ratio of the two medians.",
        "",
        "| batch | optimizer (ours) | ours ms/step | ours samples/s | plain PyTorch ms/step | plain PyTorch samples/s "
        "| plain / ours |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in results["speed"]:
        ours, reference = row["ours"], row["reference"]
        lines.append(
            f"| {row['batch_size']} | {row['optimizer']} | {spread(ours)} | {ours['samples_per_second']:,.0f} "
            f"| {spread(reference)} | {reference['samples_per_second']:,.0f} | {row['reference_over_ours']:.2f}x |"
        )
    if results.get("auc"):
        lines += ["", "Quick synthetic task (test AUC after 300 steps of batch 256, best learning rates):", ""]
        lines += ["| optimizer | AUC | lr | embedding lr |", "| --- | ---: | ---: | ---: |"]
        lines += [f"| {name} | {row['auc']:.4f} | {row['lr']:g} | {row['embedding_lr']:g} |"
                  for name, row in results["auc"].items()]
    return "\n".join(lines) + "\n"


def write_report(out: Path, results: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "training.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    (out / "training.md").write_text(markdown(results), encoding="utf-8")
    plot(results["speed"], out / "training.png")


def plot(speed: Sequence[dict[str, Any]], path: Path) -> None:
    """Samples/s (batch / median step) per batch size: each optimizer of ours, then the plain model; bars span the IQR."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({row["batch_size"] for row in speed})
    optimizers = list(dict.fromkeys(row["optimizer"] for row in speed))
    width = 0.8 / (len(optimizers) + 1)
    figure, axes = plt.subplots(figsize=(7, 4))
    positions = np.arange(len(batches))

    def bars(offset: int, sides: list[dict[str, Any] | None], batch_sizes: list[int], **style: Any) -> None:
        values = [b / s["median_ms"] * 1e3 if s else 0.0 for b, s in zip(batch_sizes, sides)]
        # Samples/s at the quartile step times: a slower step (p75) gives fewer samples/s.
        low = [v - b / s["p75_ms"] * 1e3 if s else 0.0 for v, b, s in zip(values, batch_sizes, sides)]
        high = [b / s["p25_ms"] * 1e3 - v if s else 0.0 for v, b, s in zip(values, batch_sizes, sides)]
        axes.bar(positions + offset * width, values, width, yerr=[low, high], capsize=2, **style)

    for index, name in enumerate(optimizers):
        sides = [next((r["ours"] for r in speed if r["batch_size"] == b and r["optimizer"] == name), None) for b in batches]
        bars(index, sides, batches, label=f"ours, {name}")
    reference = [next((r["reference"] for r in speed if r["batch_size"] == b), None) for b in batches]
    bars(len(optimizers), reference, batches, label=REFERENCE_NAME, color="grey")
    axes.set_xticks(positions + len(optimizers) * width / 2, [str(b) for b in batches])
    axes.set_xlabel("batch size")
    axes.set_ylabel("training samples / s (median step)")
    axes.set_title("DLRM (Kaggle preset) training speed, CPU, timed in turns", fontsize=10)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.training", description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", default="128,2048", help="comma-separated batch sizes")
    parser.add_argument("--steps", type=int, default=50, help="timed steps per batch size, for each side")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first, for each side")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--optimizer", choices=OPTIMIZER_NAMES, default=DEFAULT_OPTIMIZER)
    parser.add_argument("--compare", action="store_true", help="time and score every optimizer")
    parser.add_argument("--profile", action="store_true", help="profile the largest batch size")
    parser.add_argument("--tables", type=positive_int, default=NUM_TABLES, help="embedding tables (sparse features)")
    parser.add_argument("--table-rows", type=positive_int, default=TABLE_ROWS, help="rows per embedding table")
    parser.add_argument("--default-malloc", action="store_true",
                        help="keep glibc's malloc thresholds (to measure what reuse_freed_memory gains)")
    parser.add_argument("--out", type=Path, default=Path("results/training"))
    args = parser.parse_args(argv)
    try:
        batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    except ValueError:
        parser.error(f"--batch-sizes: expected comma-separated integers, got {args.batch_sizes!r}")
    if not batch_sizes or min(batch_sizes) < 1:
        parser.error(f"--batch-sizes: expected positive integers, got {args.batch_sizes!r}")
    if args.steps < 1 or args.warmup < 0 or args.threads < 1:
        parser.error(f"--steps and --threads must be >= 1, --warmup >= 0; got {args.steps}, {args.threads}, {args.warmup}")
    if args.table_rows < 2:
        parser.error(f"--table-rows must be >= 2, got {args.table_rows}")

    torch.set_num_threads(args.threads)
    allocator_tuned = False if args.default_malloc else reuse_freed_memory()
    machine = machine_info(threads=args.threads, malloc_keeps_freed_memory=allocator_tuned)
    config = kaggle_config(tables=args.tables, table_rows=args.table_rows)
    print(machine_header(machine))
    print(f"model: {describe(config)}; beside it: {REFERENCE_NAME}")
    optimizers = list(OPTIMIZER_NAMES) if args.compare else [args.optimizer]
    results: dict[str, Any] = {
        "machine": machine,
        "settings": {"model": describe(config), "steps": args.steps, "warmup": args.warmup, "batch_sizes": batch_sizes},
        "reference": REFERENCE_NAME,
        "default_optimizer": DEFAULT_OPTIMIZER,
        "speed": [],
        "auc": {},
    }
    for batch_size in batch_sizes:
        for comparison in time_training(
            batch_size, optimizer_names=optimizers, steps=args.steps, warmup=args.warmup, config=config
        ):
            results["speed"].append(comparison.to_json())
            print(summary_line(results["speed"][-1]), flush=True)
    if args.compare:
        for name in optimizers:
            scores = {pair: quick_auc(name, lr=pair[0], embedding_lr=pair[1]) for pair in LEARNING_RATES[name]}
            (lr, embedding_lr), best = max(scores.items(), key=lambda item: item[1])
            results["auc"][name] = {"auc": best, "lr": lr, "embedding_lr": embedding_lr,
                                    "tried": [[*pair, score] for pair, score in scores.items()]}
            print(f"quick task AUC {name:<16} {best:.4f} (best of {len(scores)}: lr {lr:g}, "
                  f"embedding lr {embedding_lr:g})")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.profile:
        table = profile_training(max(batch_sizes), optimizer_name=args.optimizer, steps=10, config=config)
        (args.out / "profile.txt").write_text(table + "\n", encoding="utf-8")
        print(table)
    write_report(args.out, results)
    print(f"wrote {args.out}/training.json, training.md, training.png")
    return results


if __name__ == "__main__":
    main()
