"""``make demo``: train DLRM, Wide & Deep and the logistic model on synthetic data.

Prints one table comparing them with the oracle (the AUC of the true click
probabilities, the best any model can reach on these rows) and with the
scikit-learn baselines fitted on the same split (:mod:`training.baselines`:
logistic regression on binned and one-hot features, histogram gradient
boosting), then what the figures say:

* how much of the AUC gap between chance and the oracle each model closes,
  ``(test_auc - 0.5) / (oracle_auc - 0.5)``;
* how far each deep model is above the wide-only logistic model and above
  the best baseline, on the same rows.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from training.train import TrainOptions, train

MODELS = ("dlrm", "widedeep", "logistic")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=300_000, help="synthetic rows (80/10/10 train/val/test)")
    parser.add_argument("--runs", default="runs", help="parent directory of the checkpoints")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    results = {}
    for model in MODELS:
        out = Path(args.runs) / model
        print(f"\n== training {model} on {args.rows:,} synthetic rows -> {out}", flush=True)
        results[model] = train(TrainOptions(model=model, data="synthetic", rows=args.rows, seed=args.seed, out=str(out)))

    print("\n" + format_table(results))
    print("\n".join(summary_lines(results)))
    return 0


def baselines_of(results: dict[str, dict]) -> dict[str, dict]:
    """The baselines the runs carry (every run on one split carries the same ones)."""
    return next((r["baselines"] for r in results.values() if r.get("baselines")), {})


def format_table(results: dict[str, dict]) -> str:
    """One row per model, then one per baseline of the same split (AUC, gap closed and log loss only)."""
    name_width = max(10, *(len(name) for name in baselines_of(results)))
    header = f"{'model':<{name_width}} {'test AUC':>9} {'oracle AUC':>11} {'gap closed':>11} {'logloss':>8} " \
             f"{'calibration':>12} {'best epoch':>10} {'train samples/s':>16}"
    lines = [header, "-" * len(header)]
    for model, r in results.items():
        lines.append(
            f"{model:<{name_width}} {r['test_auc']:>9.4f} {r['oracle_auc']:>11.4f} {r['auc_gap_closed']:>11.1%} "
            f"{r['test_logloss']:>8.4f} {r['test_calibration']['calibration_ratio']:>12.3f} "
            f"{r['best_epoch']:>10d} {r['train_samples_per_sec']:>16,.0f}"
        )
    oracle = next(iter(results.values()))["oracle_auc"]
    for name, b in baselines_of(results).items():
        gap = (b["test_auc"] - 0.5) / (oracle - 0.5)
        lines.append(
            f"{name:<{name_width}} {b['test_auc']:>9.4f} {oracle:>11.4f} {gap:>11.1%} {b['test_logloss']:>8.4f} "
            f"{'-':>12} {'-':>10} {'-':>16}"
        )
    return "\n".join(lines)


def summary_lines(results: dict[str, dict]) -> list[str]:
    """What the table says, in words: share of the oracle gap closed, lift over the logistic model and the best baseline."""
    logistic = results["logistic"]["test_auc"]
    baselines = baselines_of(results)
    best = max(baselines, key=lambda name: baselines[name]["test_auc"]) if baselines else None
    lines = []
    for model in ("dlrm", "widedeep"):
        auc = results[model]["test_auc"]
        line = (f"{model}: closes {results[model]['auc_gap_closed']:.1%} of the AUC gap between chance and the oracle; "
                f"test AUC {auc - logistic:+.4f} vs the logistic model")
        if best is not None:
            line += f", {auc - baselines[best]['test_auc']:+.4f} vs the best baseline ({best})"
        lines.append(line)
    return lines


if __name__ == "__main__":
    sys.exit(main())
