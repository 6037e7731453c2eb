"""``python -m benchmarks.request_paths``: what a request's path into the model costs, side by side.

For one batch size (4,096 records by default) and each backend of
``--backends`` (ONNX Runtime fp32 and INT8 by default) of the DLRM ``kaggle``
preset (13 dense, 26 hashed categorical features; :mod:`export.presets`,
built untrained when no ``--export-dir`` is given: speed does not depend on
the weights), it times in one process, call by call in turns
(:func:`benchmarks.common.time_side_by_side`; each backend's paths in one
rotation, the backends one after another):

* ``infer``: encoded tensors in, probabilities out (the model alone);
* ``json.loads + encode + infer``: the ``{"instances": [...]}`` body as
  bytes, parsed with ``json.loads`` (what TorchServe's worker does with
  ``decode_input_request=true``), then the handler's preprocessing
  (:func:`handlers.request.encode_batch`) and the model;
* ``orjson bytes + encode + infer``: the same body handed over as bytes
  (``decode_input_request=false``) and parsed by the handler with orjson
  (the handler's path where msgspec is not installed);
* ``msgspec bytes + encode + infer``: the same bytes decoded by msgspec
  against the FeatureSpec's types straight into one list per feature
  (:func:`handlers.request.typed_request`, the handler's default path);
* ``Arrow IPC + encode + infer``: the same records as an Arrow IPC stream
  (:mod:`handlers.arrow_request`), encoded from the Arrow buffers.

Each path's body holds the same records and encodes to the same tensors
(checked before timing). Reports p50/p25/p75/p99 latency and records/s
(batch / p50), and each path's records/s as a share of its backend's ``infer``. Writes
``request_paths.json``, ``request_paths.md`` and ``request_paths.png`` to
``--out``. On a shared machine the absolute figures move with the load;
the turns keep the ratios comparable.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import TimedEntry, Timing, machine_header, machine_info, time_side_by_side
from benchmarks.runtimes import request_body
from export.backends import ARTIFACTS, backend_label, load_predictor, predictor_device
from export.cli import add_device_option, comma_choices, resolve_device
from export.parity import Predictor
from export.records import sample_records
from featurespec import FEATURES_FILE, FeatureSpec
from handlers.arrow_request import write_stream
from handlers.memory import settle_for_scoring
from handlers.request import ARROW_STREAM, JSON_MEDIA_TYPE, Limits, RequestError, encode_batch
from loadtest.scoring_client import as_table

DEFAULT_OUT = Path("results/request_paths")
PATHS = (
    "infer",
    "json.loads + encode + infer",
    "orjson bytes + encode + infer",
    "msgspec bytes + encode + infer",
    "Arrow IPC + encode + infer",
)
_DISTINCT_BATCHES = 4  # inputs rotate over this many different batches


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.request_paths", description=__doc__.split("\n\n")[0])
    parser.add_argument("--export-dir", type=Path, help="an export dir (default: the kaggle preset's ONNX, built untrained)")
    parser.add_argument("--backends", default="onnx,onnx-int8",
                        help="comma-separated: onnx, onnx-int8, torchscript, pt2 (the last two need --export-dir)")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads of ONNX Runtime and PyTorch")
    parser.add_argument("--min-time", type=float, default=3.0, help="seconds of timed calls per path, at least")
    parser.add_argument("--min-iters", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    add_device_option(parser, default="auto", help="where the torch backends run and ONNX Runtime asks for its CUDA provider")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.threads < 1:
        parser.error("--batch-size and --threads must be >= 1")
    args.backends = comma_choices(parser, "--backends", args.backends, ("onnx", "onnx-int8", "torchscript", "pt2"))
    if args.export_dir is None and not set(args.backends) <= {"onnx", "onnx-int8"}:
        parser.error("--backends torchscript and pt2 need --export-dir")
    args.device = resolve_device(parser, args.device)
    return args


def kaggle_onnx(directory: Path) -> FeatureSpec:
    """The kaggle preset's spec; its untrained DLRM exported to ``directory/model.onnx`` and ``model.int8.onnx``."""
    from export.exporter import export_onnx, quantize_int8
    from export.presets import kaggle_spec
    from export.serving import ServingModule, example_inputs
    from training.models import build_model
    from training.models.dlrm import DLRMConfig

    torch.manual_seed(0)
    spec = kaggle_spec()
    model = build_model("dlrm", DLRMConfig.kaggle(num_dense=spec.num_dense, table_sizes=spec.table_sizes))
    path = export_onnx(
        ServingModule(model).eval(), directory / ARTIFACTS["onnx"], example=example_inputs(spec.num_dense, spec.num_sparse_columns)
    )
    quantize_int8(path, directory / ARTIFACTS["onnx-int8"])
    return spec


def path_calls(spec: FeatureSpec, predictor: Predictor, limits: Limits) -> dict[str, Callable[[Any], np.ndarray]]:
    """Each path's call, from its input (tensors or body bytes) to probabilities."""

    def encode(body: Any, content_type: str | None, *, typed_json: bool = True) -> tuple[np.ndarray, np.ndarray]:
        batch = encode_batch(spec, [{"body": body}], limits=limits, content_types=[content_type], typed_json=typed_json)
        (outcome,) = batch.outcomes
        if isinstance(outcome, RequestError):
            raise outcome  # sampled records are valid: a 400 here is a bug worth its traceback
        return batch.dense, batch.sparse

    return {
        PATHS[0]: lambda tensors: predictor(*tensors),
        PATHS[1]: lambda body: predictor(*encode(json.loads(body), JSON_MEDIA_TYPE)),
        PATHS[2]: lambda body: predictor(*encode(body, JSON_MEDIA_TYPE, typed_json=False)),
        PATHS[3]: lambda body: predictor(*encode(body, JSON_MEDIA_TYPE)),
        PATHS[4]: lambda body: predictor(*encode(body, ARROW_STREAM)),
    }


def run_benchmark(args: argparse.Namespace, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="request_paths_") as scratch:
        export_dir = args.export_dir
        if export_dir is None:
            log("exporting the kaggle preset's DLRM to ONNX and INT8 ONNX (untrained) ...")
            export_dir = Path(scratch)
            spec = kaggle_onnx(export_dir)
        else:
            spec = FeatureSpec.load(export_dir / FEATURES_FILE)
        predictors = {
            backend: load_predictor(backend, export_dir, threads=args.threads, device=args.device) for backend in args.backends
        }
    runs_on = {name: predictor_device(predictor, args.device) for name, predictor in predictors.items()}
    limits = Limits(max_records=args.batch_size)
    inputs: dict[str, list[Any]] = {name: [] for name in PATHS}
    for index in range(_DISTINCT_BATCHES):
        records = sample_records(spec, args.batch_size, seed=args.seed + index)
        json_body = request_body(spec, records, "records")
        arrow_body = write_stream(as_table(records))
        inputs[PATHS[0]].append(spec.encode_records(records))
        inputs[PATHS[1]].append(json_body)
        inputs[PATHS[2]].append(json_body)
        inputs[PATHS[3]].append(json_body)
        inputs[PATHS[4]].append(arrow_body)
    _check_same_tensors(spec, inputs, limits)
    machine = machine_info(threads=args.threads, device=args.device, malloc_keeps_freed_memory=settle_for_scoring())
    log(machine_header(machine))
    rows = []
    for backend, predictor in predictors.items():
        # One rotation per backend: a runtime called right after another one's call (its threads still
        # spinning, its weights just read) would run slower than it does in a worker that serves only it.
        calls = path_calls(spec, predictor, limits)
        entries: dict[str, TimedEntry] = {name: (calls[name], inputs[name]) for name in PATHS}
        timed = time_side_by_side(entries, min_time=args.min_time, min_iters=args.min_iters, warmup=3)
        for name in PATHS:
            timing = Timing.of(timed[name])
            rate = args.batch_size / timing.median_ms * 1000
            rows.append({"backend": backend, "path": name, **timing.__dict__, "records_per_s": rate})
            log(f"{backend:12s} {name:32s} p50 {timing.median_ms:9.3f} ms  p99 {timing.p99_ms:9.3f} ms  {rate:12,.0f} rec/s")
    return {
        "machine": machine,
        "settings": {
            "batch_size": args.batch_size,
            "min_time_s": args.min_time,
            "min_iters": args.min_iters,
            "backends": list(predictors),
            "runs_on": runs_on,
            "model": str(args.export_dir) if args.export_dir else "kaggle preset DLRM, untrained",
            "body_bytes": {"json": len(inputs[PATHS[1]][0]), "arrow": len(inputs[PATHS[4]][0])},
        },
        "paths": rows,
    }


def _check_same_tensors(spec: FeatureSpec, inputs: dict[str, list[Any]], limits: Limits) -> None:
    """Every path's body encodes to the tensors of the records: a benchmark of different work would mislead."""
    dense, sparse = inputs[PATHS[0]][0]
    for name, content_type, typed_json in ((PATHS[2], JSON_MEDIA_TYPE, False), (PATHS[3], JSON_MEDIA_TYPE, True),
                                           (PATHS[4], ARROW_STREAM, True)):
        batch = encode_batch(spec, [{"body": inputs[name][0]}], limits=limits, content_types=[content_type],
                             typed_json=typed_json)
        if not (np.array_equal(batch.dense, dense) and np.array_equal(batch.sparse, sparse)):
            raise AssertionError(f"the body of {name!r} does not encode to the records' tensors")


def markdown(result: dict[str, Any]) -> str:
    settings = result["settings"]
    infer = {row["backend"]: row["records_per_s"] for row in result["paths"] if row["path"] == PATHS[0]}
    lines = [
        machine_header(result["machine"]),
        "",
        f"Batch of {settings['batch_size']:,} records; {settings['model']}; request bodies: "
        f"JSON {settings['body_bytes']['json']:,} bytes, Arrow IPC {settings['body_bytes']['arrow']:,} bytes. "
        "Paths timed call by call in turns; records/s = batch / p50.",
        "",
        "| backend | path | p50 (ms) | p25 (ms) | p75 (ms) | p99 (ms) | records/s | share of the backend's infer |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    runs_on = settings.get("runs_on", {})
    for row in result["paths"]:
        backend = backend_label(row["backend"], runs_on.get(row["backend"], "cpu"), result["machine"]["device"])
        lines.append(
            f"| {backend} | {row['path']} | {row['median_ms']:.2f} | {row['p25_ms']:.2f} | {row['p75_ms']:.2f} | {row['p99_ms']:.2f} "
            f"| {row['records_per_s']:,.0f} | {row['records_per_s'] / infer[row['backend']]:.0%} |"
        )
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["paths"]
    batch = result["settings"]["batch_size"]
    rates = [row["records_per_s"] for row in rows]
    # Error bars: records/s at the quartile latencies.
    low = [rate - batch / row["p75_ms"] * 1000 for rate, row in zip(rates, rows)]
    high = [batch / row["p25_ms"] * 1000 - rate for rate, row in zip(rates, rows)]
    figure, axis = plt.subplots(figsize=(7, 1.2 + 0.35 * len(rows)))
    positions = np.arange(len(rows))[::-1]
    colors = [f"C{PATHS.index(row['path'])}" for row in rows]
    axis.barh(positions, rates, xerr=[low, high], color=colors, capsize=3)
    axis.set_yticks(positions, [f"{row['backend']}: {row['path']}" for row in rows], fontsize=8)
    axis.set_xlabel(f"records / s at batch {batch:,} (batch / p50; bars: quartiles)")
    machine = result["machine"]
    axis.set_title(f"{machine['cpu']}, {machine['intra_op_threads']} threads, {machine['device']}", fontsize=9)
    axis.grid(True, axis="x", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    result = run_benchmark(args, log=lambda line: print(line, flush=True))
    (args.out / "request_paths.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    table = markdown(result)
    (args.out / "request_paths.md").write_text(table, encoding="utf-8")
    plot(result, args.out / "request_paths.png")
    print(table)
    print(f"wrote {args.out}/request_paths.json, request_paths.md, request_paths.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
