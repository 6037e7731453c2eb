"""``make demo``: train DLRM, Wide & Deep and the logistic baseline on synthetic data.

Prints one table comparing them with the oracle (the AUC of the true click
probabilities, the best any model can reach on these rows), then what the
figures say:

* how much of the AUC gap between chance and the oracle each model closes,
  ``(test_auc - 0.5) / (oracle_auc - 0.5)``;
* how far each deep model is above the wide-only logistic baseline trained on
  the same rows.
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


def format_table(results: dict[str, dict]) -> str:
    header = f"{'model':<10} {'test AUC':>9} {'oracle AUC':>11} {'gap closed':>11} {'logloss':>8} " \
             f"{'calibration':>12} {'best epoch':>10} {'train samples/s':>16}"
    lines = [header, "-" * len(header)]
    for model, r in results.items():
        lines.append(
            f"{model:<10} {r['test_auc']:>9.4f} {r['oracle_auc']:>11.4f} {r['auc_gap_closed']:>11.1%} "
            f"{r['test_logloss']:>8.4f} {r['test_calibration']['calibration_ratio']:>12.3f} "
            f"{r['best_epoch']:>10d} {r['train_samples_per_sec']:>16,.0f}"
        )
    return "\n".join(lines)


def summary_lines(results: dict[str, dict]) -> list[str]:
    """What the table says, in words: share of the oracle gap closed, lift over the logistic baseline."""
    baseline = results["logistic"]["test_auc"]
    return [
        f"{model}: closes {results[model]['auc_gap_closed']:.1%} of the AUC gap between chance and the oracle; "
        f"test AUC {results[model]['test_auc'] - baseline:+.4f} vs the logistic baseline"
        for model in ("dlrm", "widedeep")
    ]


if __name__ == "__main__":
    sys.exit(main())
