"""``python -m export CHECKPOINT_DIR [--out EXPORT_DIR] [--formats torchscript,onnx,pt2] [--quantize int8]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from export.cli import add_device_option, comma_choices, resolve_device
from export.parity import HeldOut
from export.pipeline import DEFAULT_FORMATS, FORMATS, ExportFailed, ExportRequest, run_export, sampled_held_out

DEFAULT_RECORDS = 10_000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m export",
        description="Export a checkpoint to TorchScript and ONNX (and an AOTInductor .pt2 on request), "
        "proving parity with the eager model.",
    )
    parser.add_argument("checkpoint", type=Path, metavar="CHECKPOINT_DIR")
    parser.add_argument("--out", type=Path, help="export dir (default: CHECKPOINT_DIR/export)")
    parser.add_argument(
        "--formats",
        default=",".join(DEFAULT_FORMATS),
        help=f"comma-separated subset of {','.join(FORMATS)} (default: {','.join(DEFAULT_FORMATS)}; "
        "pt2 compiles C++ with AOTInductor, tens of seconds per model, and needs a C++ compiler)",
    )
    parser.add_argument("--quantize", choices=["int8"], help="also write model.int8.onnx (ONNX Runtime dynamic quantization)")
    parser.add_argument("--records", type=int, default=DEFAULT_RECORDS, help="held-out records for the parity check")
    parser.add_argument(
        "--held-out",
        choices=["auto", "synthetic", "sampled"],
        default="auto",
        help="synthetic: the synthetic source's test split (when the checkpoint was trained on it); "
        "sampled: records sampled from the FeatureSpec, labels drawn from the eager model; auto: synthetic when possible",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads for the parity runs")
    add_device_option(
        parser,
        default="cpu",
        help="cuda: compile the .pt2 for this machine's GPU (it then serves on GPU workers only) and check "
        "every artifact's parity on the GPU (ONNX through the CUDA execution provider where ONNX Runtime has it)",
    )
    args = parser.parse_args(argv)
    args.formats = comma_choices(parser, "--formats", args.formats, FORMATS)
    if args.records < 4096:
        parser.error(f"--records must be >= 4096 (the largest parity batch), got {args.records}")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    args.device = resolve_device(parser, args.device)
    return args


def synthetic_held_out(checkpoint, *, rows: int) -> HeldOut | None:
    """The synthetic source's test split, if the checkpoint was trained on it.

    ``python -m training`` records ``"data": "synthetic"`` and its options
    (``rows``, ``seed``) in ``metrics.json``; the same source with the same
    options yields the same test rows, the ones held out from training.
    Returns None for any other checkpoint.
    """
    metrics = checkpoint.metrics
    if metrics.get("data") != "synthetic":
        return None
    import numpy as np

    from training.data import open_source

    options = metrics.get("options") if isinstance(metrics.get("options"), dict) else {}
    rows_option, seed = options.get("rows"), int(options.get("seed", 0))
    source = open_source("synthetic", rows=rows_option, seed=seed)
    dense, sparse, labels = [], [], []
    for chunk in source.chunks("test"):
        encoded = checkpoint.spec.encode_columns(chunk.columns, len(chunk))
        dense.append(encoded[0])
        sparse.append(encoded[1])
        labels.append(chunk.labels)
        if sum(map(len, labels)) >= rows:
            break
    if not labels or sum(map(len, labels)) < 4096:
        return None  # too small a test split for the batch-4096 check: sample instead
    return HeldOut(
        np.concatenate(dense)[:rows],
        np.concatenate(sparse)[:rows],
        np.concatenate(labels)[:rows].astype(np.float32),
        source=f"synthetic test split (rows={rows_option}, seed={seed})",
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from featurespec import FEATURES_FILE
    from training.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(args.checkpoint)
    out = args.out or args.checkpoint / "export"
    held_out = None
    if args.held_out in ("auto", "synthetic"):
        held_out = synthetic_held_out(checkpoint, rows=args.records)
        if held_out is None and args.held_out == "synthetic":
            print(f"error: {args.checkpoint}/metrics.json does not say the model was trained on synthetic data", file=sys.stderr)
            return 2
    if held_out is None:
        held_out = sampled_held_out(checkpoint.model, checkpoint.spec, rows=args.records, seed=args.seed)
    request = ExportRequest(
        model=checkpoint.model,
        spec=checkpoint.spec,
        out_dir=out,
        formats=args.formats,
        quantize=args.quantize == "int8",
        threads=args.threads,
        source={"checkpoint": str(checkpoint.path.resolve()), "model": checkpoint.model_name},
        features_file=checkpoint.path / FEATURES_FILE,
        device=args.device,
    )
    try:
        report = run_export(request, held_out, progress=lambda line: print(line, file=sys.stderr))
    except ExportFailed as failure:
        print_summary(failure.report)
        print(f"error: {failure}\nthe failing artifacts were not written to {out}", file=sys.stderr)
        return 1
    print_summary(report)
    return 0


def print_summary(report: dict) -> None:
    held = report["held_out"]
    print(f"held-out: {held['records']} records, {held['source']}; eager AUC {held['eager_auc']:.5f}; "
          f"artifacts run on {report['parity_device']}")
    for name, entry in report["formats"].items():
        diffs = "  ".join(f"{key} {value:.2e}" for key, value in entry["max_abs_diff"].items())
        size = _size(entry["bytes"])
        status = "ok" if entry["passed"] else "FAILED"
        if "within_auc_budget" in entry:
            status = "ok" if entry["within_auc_budget"] else f"FLAGGED: AUC drop {entry['auc_drop']:.4f} > budget"
        print(
            f"{name:12s} {status:6s} max|p - p_eager|: {diffs}  AUC {entry['auc']:.5f} "
            f"({entry['auc_diff']:+.1e})  {size}"
        )


def _size(num_bytes: int | None) -> str:
    if not num_bytes:
        return "not written"
    return f"{num_bytes / 1e6:.1f} MB" if num_bytes >= 1e5 else f"{num_bytes / 1e3:.1f} kB"


if __name__ == "__main__":
    sys.exit(main())
