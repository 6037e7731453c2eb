"""``python -m benchmarks.runtimes EXPORT_DIR``: how fast each runtime scores records.

For every batch size it measures every backend in these modes. A backend's
modes are timed in turns (one call of each, then the next round), and the
backends take turns in blocks (:func:`benchmarks.common.time_in_blocks`: a
runtime's idle-spinning threads never overlap another's calls), so that a
burst of load from elsewhere on a shared machine slows them alike and their
ratios hold:

* ``infer``: encoded tensors in, probabilities out (the model alone);
* ``encode+infer``: a request of JSON records in, through the handler's own
  preprocessing (request validation and ``FeatureSpec.encode_records``) and
  the model, which is what a worker pays per request;
* ``encode+infer (columns)``: the same records sent as a KServe v2 request
  (one array per feature), encoded from the columns.

The request bodies are parsed with ``json.loads`` before each timed call, as
TorchServe's worker parses ``application/json`` bodies before the handler
runs: the handler then gets freshly made objects, not ones that have sat in
memory since the start, and that changes what encoding costs. The parse
itself is timed apart (``json.loads`` table).

Each cell is warmed up, then timed call by call until ``--min-time`` seconds
and ``--min-iters`` calls have passed; it reports p50 and p99 latency and
records/s (batch size / p50 latency: medians are what stay stable on a shared
machine). Inputs rotate over several distinct batches of sampled records so
embedding lookups are not all cache hits. Writes ``benchmark.json``,
``benchmark.md`` and ``records_per_s.png`` to ``--out``.

The backends are TorchScript, ONNX Runtime (float and INT8), the AOTInductor
``.pt2`` package and eager PyTorch, each the handler's own backend, timed on
the same inputs in the same run; a backend whose artifact the export dir
lacks (``.pt2`` is exported only with ``--formats ...,pt2``) is skipped and
listed under ``skipped``.

``--ort-options`` adds a table of ONNX Runtime session options, one change
from the default at a time, to show what each is worth; ``--profile`` writes
ONNX Runtime's per-op profile and PyTorch's profiler table for the largest
batch size.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import TimedEntry, Timing, machine_header, machine_info, time_in_blocks, time_side_by_side
from export.backends import ARTIFACTS, BACKENDS, backend_label, load_predictor, predictor_device
from export.cli import add_device_option, comma_choices, resolve_device
from export.parity import Predictor
from export.records import kservev2_body, sample_records
from export.serving import ServingModule
from featurespec import FEATURES_FILE, FeatureSpec
from handlers.memory import settle_for_scoring
from handlers.request import Limits, RequestError, encode_batch

DEFAULT_BATCH_SIZES = (1, 16, 256, 4096)
ENCODE_MODES = {"encode+infer": "records", "encode+infer (columns)": "columns"}  # mode -> request format
DEFAULT_OUT = Path("results/export_benchmark")
_DISTINCT_BATCHES = 8  # inputs rotate over this many different batches per batch size
_INPUT_RECORDS = 16_384
_NO_LIMIT = Limits(max_records=_INPUT_RECORDS)

# One change per row from the defaults the handler serves with (handlers.backends: make_session, OnnxBackend), ``--ort-options``.
ORT_VARIANTS: dict[str, dict[str, Any]] = {
    "default (all, arena, pattern, spinning)": {},
    "graph optimization: disable": {"graph_optimization": "disable"},
    "graph optimization: basic": {"graph_optimization": "basic"},
    "graph optimization: extended": {"graph_optimization": "extended"},
    "memory arena off": {"memory_arena": False},
    "memory pattern off": {"memory_pattern": False},
    "spinning off": {"spinning": False},
    "whole batch in one run": {"max_rows_per_run": None},
}


@dataclass(frozen=True)
class Measurement:
    backend: str
    mode: str  # "infer", one of ENCODE_MODES, or "json.loads" (the parse alone, backend "-")
    batch_size: int
    p50_ms: float
    p99_ms: float
    records_per_s: float
    iterations: int
    variant: str = ""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.runtimes", description=__doc__.split("\n\n")[0])
    parser.add_argument("export_dir", type=Path, metavar="EXPORT_DIR")
    parser.add_argument("--batch-sizes", default=",".join(map(str, DEFAULT_BATCH_SIZES)))
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads for PyTorch and ONNX Runtime")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    add_device_option(parser, default="auto", help="where the torch backends run and ONNX Runtime asks for its CUDA provider")
    parser.add_argument("--checkpoint", type=Path, help="checkpoint for the eager backend (default: the one in export_report.json)")
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds timed per cell (after warm-up)")
    parser.add_argument("--min-iters", type=int, default=20)
    parser.add_argument("--no-encode", action="store_true", help="skip the encode+infer columns")
    parser.add_argument("--ort-options", action="store_true", help="also measure each ONNX Runtime session option")
    parser.add_argument("--profile", action="store_true", help="write ONNX Runtime and PyTorch profiles for the largest batch")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        args.batch_sizes = tuple(int(b) for b in args.batch_sizes.split(","))
    except ValueError:
        parser.error(f"--batch-sizes must be comma-separated integers, got {args.batch_sizes!r}")
    if not args.batch_sizes or min(args.batch_sizes) < 1:
        parser.error(f"--batch-sizes must be >= 1, got {args.batch_sizes}")
    args.backends = comma_choices(parser, "--backends", args.backends, BACKENDS)
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if not args.export_dir.is_dir():
        parser.error(f"{args.export_dir}: not a directory (run python -m export first)")
    args.device = resolve_device(parser, args.device)
    return args


def summarize(backend: str, mode: str, batch_size: int, latencies: np.ndarray, variant: str = "") -> Measurement:
    timing = Timing.of(latencies)
    return Measurement(
        backend, mode, batch_size, timing.median_ms, timing.p99_ms, batch_size / timing.median_ms * 1e3, timing.iterations, variant
    )


def load_eager(export_dir: Path, checkpoint: Path | None) -> torch.nn.Module:
    if checkpoint is None:
        report_path = export_dir / "export_report.json"
        report = json.loads(report_path.read_text(encoding="utf-8")) if report_path.is_file() else {}
        if "checkpoint" not in report:
            raise FileNotFoundError(f"{report_path}: no checkpoint recorded; pass --checkpoint for the eager backend")
        checkpoint = Path(report["checkpoint"])
    from training.checkpoint import load_checkpoint

    return ServingModule(load_checkpoint(checkpoint).model).eval()


def run_benchmark(args: argparse.Namespace, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    spec = FeatureSpec.load(args.export_dir / FEATURES_FILE)

    records = sample_records(spec, _INPUT_RECORDS, seed=args.seed)
    dense, sparse = spec.encode_records(records)
    batches = {b: _batches(spec, b, dense, sparse, records) for b in args.batch_sizes}
    del records  # the bodies hold what the encode columns need, as JSON text
    # As a TorchServe worker does once its model is loaded.
    machine = machine_info(threads=args.threads, device=args.device, malloc_keeps_freed_memory=settle_for_scoring())
    log(machine_header(machine))
    measurements: list[Measurement] = []
    if not args.no_encode:  # the parse that TorchServe does before the handler, for reference
        for batch_size, (_, bodies) in batches.items():
            timed = time_side_by_side(
                {fmt: (json.loads, bodies[fmt]) for fmt in ENCODE_MODES.values()}, min_time=args.min_time / 2, min_iters=args.min_iters
            )
            for fmt, latencies in timed.items():
                measurements.append(summarize("-", "json.loads", batch_size, latencies, variant=fmt))
                log(f"json.loads {fmt:9s} batch {batch_size:6d}  p50 {measurements[-1].p50_ms:9.4f} ms")
    skipped: dict[str, str] = {}
    predictors: dict[str, Predictor] = {}
    for backend in args.backends:
        try:
            predictors[backend] = _predictor(backend, args, args.device)
        except (FileNotFoundError, ValueError) as error:
            skipped[backend] = str(error)
            log(f"skipping {backend}: {error}")
    for batch_size in args.batch_sizes:
        tensors, bodies = batches[batch_size]
        groups: dict[str, dict[str, TimedEntry]] = {}
        for backend, predictor in predictors.items():
            calls: dict[str, TimedEntry] = {"infer": (lambda x, predict=predictor: predict(*x), tensors)}
            if not args.no_encode:
                for mode, fmt in ENCODE_MODES.items():
                    calls[mode] = (encode_infer(spec, predictor), bodies[fmt], json.loads)
            groups[backend] = calls
        # Backends in alternating blocks (each runtime's threads to themselves), modes of one backend call by call.
        for backend, timed in time_in_blocks(groups, min_time=args.min_time, min_iters=args.min_iters).items():
            for mode, latencies in timed.items():
                m = summarize(backend, mode, batch_size, latencies)
                measurements.append(m)
                log(f"{backend:12s} {mode:13s} batch {batch_size:6d}  p50 {m.p50_ms:9.4f} ms  p99 {m.p99_ms:9.4f} ms  {m.records_per_s:12,.0f} rec/s")
    options: list[Measurement] = []
    if args.ort_options:
        options = _ort_options(args, batches, log=log)
    result = {
        "export_dir": str(args.export_dir.resolve()),
        "machine": machine,
        "settings": {
            "min_time_s": args.min_time,
            "min_iters": args.min_iters,
            "input_records": _INPUT_RECORDS,
            "runs_on": {name: predictor_device(predictor, args.device) for name, predictor in predictors.items()},
        },
        "measurements": [asdict(m) for m in measurements],
        "ort_options": [asdict(m) for m in options],
        "skipped": skipped,
    }
    if args.profile:
        result["profiles"] = _profile(args, batches[max(args.batch_sizes)][0][0], args.device)
    return result


def _batches(
    spec: FeatureSpec, batch_size: int, dense: np.ndarray, sparse: np.ndarray, records: list[dict[str, Any]]
) -> tuple[list[tuple[np.ndarray, np.ndarray]], dict[str, list[bytes]]]:
    """Each batch as tensors and as the JSON bodies of a records request and a KServe v2 request."""
    count = max(1, min(_DISTINCT_BATCHES, len(records) // batch_size))
    starts = [(i * batch_size) % max(1, len(records) - batch_size + 1) for i in range(count)]
    tensors = [(np.ascontiguousarray(dense[s : s + batch_size]), np.ascontiguousarray(sparse[s : s + batch_size])) for s in starts]
    bodies = {fmt: [request_body(spec, records[s : s + batch_size], fmt) for s in starts] for fmt in ENCODE_MODES.values()}
    return tensors, bodies


def request_body(spec: FeatureSpec, records: list[dict[str, Any]], fmt: str) -> bytes:
    """``records`` as the JSON body a client sends: ``{"instances": [...]}`` (``records``) or KServe v2 (``columns``)."""
    payload = {"instances": records} if fmt == "records" else kservev2_body(spec, records)
    return json.dumps(payload).encode()


def encode_infer(spec: FeatureSpec, predictor: Predictor) -> Callable[[Any], np.ndarray]:
    """A parsed request body -> probabilities, the way a worker scores it: :func:`preprocess`, then ``predictor``."""
    return lambda body: predictor(*preprocess(spec, body))


def preprocess(spec: FeatureSpec, body: Any) -> tuple[np.ndarray, np.ndarray]:
    """A parsed request body -> tensors, through the handler's own preprocessing."""
    batch = encode_batch(spec, [{"body": body}], limits=_NO_LIMIT)
    (outcome,) = batch.outcomes
    if isinstance(outcome, RequestError):
        raise outcome  # sampled records are valid: a 400 here is a bug worth its traceback
    return batch.dense, batch.sparse


def _predictor(backend: str, args: argparse.Namespace, device: str, **session_options: Any) -> Predictor:
    eager = load_eager(args.export_dir, args.checkpoint) if backend == "eager" else None
    return load_predictor(backend, args.export_dir, threads=args.threads, device=device, eager_module=eager, **session_options)


def _ort_options(args: argparse.Namespace, batches: dict, *, log: Callable[[str], None], rounds: int = 5) -> list[Measurement]:
    """Infer latency per session-option variant. The variants take turns in
    ``rounds`` blocks per batch size (each block warmed up, so one session's
    idle spinning threads do not spill into the next one's timing), so load
    from elsewhere does not favour whichever variant ran in a quiet moment."""
    variants = dict(ORT_VARIANTS)
    if args.threads > 1:
        variants["1 intra-op thread"] = {"threads": 1}
    predictors = {}
    for name, options in variants.items():
        options = dict(options)
        threads = options.pop("threads", args.threads)
        predictors[name] = load_predictor("onnx", args.export_dir, threads=threads, device="cpu", **options)
    out = []
    for batch_size, (tensors, _) in batches.items():
        groups = {name: {"infer": (lambda x, predict=predictor: predict(*x), tensors)} for name, predictor in predictors.items()}
        timed = time_in_blocks(groups, min_time=args.min_time, min_iters=args.min_iters, rounds=rounds)
        for name in variants:
            m = summarize("onnx", "infer", batch_size, timed[name]["infer"], variant=name)
            out.append(m)
            log(f"ORT {name:40s} batch {batch_size:6d}  p50 {m.p50_ms:9.4f} ms  {m.records_per_s:12,.0f} rec/s")
    return out


def _profile(args: argparse.Namespace, tensors: tuple[np.ndarray, np.ndarray], device: str) -> dict[str, Any]:
    """Top ops by time: ONNX Runtime's profiler and torch.profiler, on the largest batch."""
    from collections import Counter

    from handlers.backends import make_session

    profiles: dict[str, Any] = {}
    for backend in ("onnx", "onnx-int8"):
        path = args.export_dir / ARTIFACTS[backend]
        if not path.is_file():
            continue
        session = make_session(path, threads=args.threads, providers=["CPUExecutionProvider"], profile_prefix=str(args.out / f"ort_profile_{backend}"))
        feed = {"dense": tensors[0], "sparse": tensors[1]}
        for _ in range(10):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text(encoding="utf-8"))
        totals: Counter[str] = Counter()
        for event in events:
            if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
                totals[f"{event['args'].get('op_name')} {event['name'][: -len('_kernel_time')]}"] += event["dur"]
        grand = sum(totals.values()) or 1
        profiles[backend] = [{"op": op, "share": round(t / grand, 4), "us_per_run": t / 10} for op, t in totals.most_common(15)]
    for backend in ("eager", "torchscript", "pt2"):
        if backend not in args.backends or (backend != "eager" and not (args.export_dir / ARTIFACTS[backend]).is_file()):
            continue
        predictor = _predictor(backend, args, device)
        predictor(*tensors)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                predictor(*tensors)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
        (args.out / f"torch_profile_{backend}.txt").write_text(table, encoding="utf-8")
        profiles[backend] = f"torch_profile_{backend}.txt"
    return profiles


def markdown(result: dict[str, Any]) -> str:
    lines = [
        machine_header(result["machine"]),
        "",
        (
            "| backend | batch | infer p50 (ms) | infer p99 (ms) | infer records/s "
            "| encode+infer p50 (ms) | encode+infer records/s | encode+infer / infer "
            "| columns: encode+infer p50 (ms) | columns: records/s | columns / infer |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    cells = {(m["backend"], m["mode"], m["batch_size"]): m for m in result["measurements"]}
    runs_on = result["settings"].get("runs_on", {})
    for backend, mode, batch in sorted(cells, key=lambda cell: (_backend_order(cell[0]), cell[2])):
        if mode != "infer":
            continue
        infer = cells[(backend, "infer", batch)]
        label = backend_label(backend, runs_on.get(backend, "cpu"), result["machine"]["device"])
        row = f"| {label} | {batch} | {infer['p50_ms']:.4f} | {infer['p99_ms']:.4f} | {infer['records_per_s']:,.0f} |"
        for encode_mode in ENCODE_MODES:
            both = cells.get((backend, encode_mode, batch))
            row += (
                f" {both['p50_ms']:.4f} | {both['records_per_s']:,.0f} | {both['records_per_s'] / infer['records_per_s']:.0%} |"
                if both
                else " - | - | - |"
            )
        lines.append(row)
    parses = [m for m in result["measurements"] if m["mode"] == "json.loads"]
    if parses:
        lines += [
            "",
            "`json.loads` of the request body, which TorchServe's worker runs before the handler (p50 ms):",
            "",
            "| batch | records request | KServe v2 request (columns) |",
            "|---:|---:|---:|",
        ]
        by_batch: dict[int, dict[str, float]] = {}
        for m in parses:
            by_batch.setdefault(m["batch_size"], {})[m["variant"]] = m["p50_ms"]
        for batch, row in by_batch.items():
            lines.append(f"| {batch} | {row['records']:.4f} | {row['columns']:.4f} |")
    if result["ort_options"]:
        lines += ["", "ONNX Runtime session options (one change from the default per row, infer p50 in ms):", ""]
        sizes = sorted({m["batch_size"] for m in result["ort_options"]})
        lines.append("| option | " + " | ".join(f"batch {b}" for b in sizes) + " |")
        lines.append("|---|" + "---:|" * len(sizes))
        by_variant: dict[str, dict[int, float]] = {}
        for m in result["ort_options"]:
            by_variant.setdefault(m["variant"], {})[m["batch_size"]] = m["p50_ms"]
        for variant, row in by_variant.items():
            lines.append(f"| {variant} | " + " | ".join(f"{row[b]:.4f}" for b in sizes) + " |")
    return "\n".join(lines) + "\n"


def _backend_order(backend: str) -> int:
    return BACKENDS.index(backend) if backend in BACKENDS else len(BACKENDS)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for mode, style in (("infer", "-"), ("encode+infer", "--"), ("encode+infer (columns)", ":")):
        series: dict[str, list[tuple[int, float]]] = {}
        for m in result["measurements"]:
            if m["mode"] == mode:
                series.setdefault(m["backend"], []).append((m["batch_size"], m["records_per_s"]))
        for index, (backend, points) in enumerate(series.items()):
            points.sort()
            axis.plot(*zip(*points), style, marker="o", color=f"C{BACKENDS.index(backend)}", label=f"{backend} ({mode})")
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("batch size (records)")
    axis.set_ylabel("records / s (batch / p50 latency)")
    machine = result["machine"]
    axis.set_title(f"{machine['cpu']}, {machine['intra_op_threads']} threads, {machine['device']}", fontsize=9)
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    result = run_benchmark(args, log=lambda line: print(line, flush=True))
    (args.out / "benchmark.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    table = markdown(result)
    (args.out / "benchmark.md").write_text(table, encoding="utf-8")
    if result["measurements"]:
        plot(result, args.out / "records_per_s.png")
    print(table)
    print(f"wrote {args.out}/benchmark.json, benchmark.md, records_per_s.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
