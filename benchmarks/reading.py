"""Benchmark: read + encode a Criteo-like TSV on one core.

    python -m benchmarks.reading [--rows 1000000] [--out results/reading]

Generates a Criteo-shaped file (label, 13 integers with missing values and a
few negatives, 26 categorical 8-hex-character values drawn with Zipf-like
repetition) in a temporary directory, fits a FeatureSpec on its training
split, then times the training input path: :class:`CriteoSource` chunks ->
:meth:`FeatureSpec.encode_columns`, pinned to one core with pyarrow, numpy
and torch each limited to one thread. The breakdown times each stage on its
own: Arrow parsing, chunk assembly and string packing, dense transforms,
hashing, and vocabulary lookup. Writes ``reading.json`` and ``reading.md``.
"""

from __future__ import annotations

import os

# One core: thread pools size themselves when numpy/torch are first imported.
for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_variable] = "1"

import argparse
import gzip
import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv

from benchmarks.common import machine_header, machine_info
from featurespec import FeatureSpec, hash_strings
from featurespec.arrow import string_column_from_arrow
from training.data import SPLITS, Chunk
from training.data.criteo import (
    _CONVERT_OPTIONS,
    CATEGORICAL_COLUMNS,
    CRITEO_COLUMNS,
    INT_COLUMNS,
    CriteoSource,
)
from training.fitting import fit_spec


def write_criteo_like(path: Path, *, rows: int, seed: int = 0) -> None:
    """A Criteo-shaped TSV: skewed integers with missing values, Zipf-like hex categories."""
    rng = np.random.default_rng(seed)
    columns: dict[str, pa.Array] = {"label": pa.array((rng.random(rows) < 0.26).astype(np.int8))}
    for i, name in enumerate(INT_COLUMNS):
        values = np.floor(rng.lognormal(mean=0.5 + 0.3 * i, sigma=1.8, size=rows)).astype(np.int64)
        if i == 1:  # Criteo's I2 holds small negative counts
            values -= rng.integers(0, 3, rows)
        missing = rng.random(rows) < (0.02 + 0.035 * i)
        columns[name] = pa.array(values, mask=missing)
    # Table sizes spread from a handful to near one value per row, as in Criteo.
    cardinalities = np.geomspace(4, max(rows, 8), len(CATEGORICAL_COLUMNS)).astype(np.int64)
    for i, (name, cardinality) in enumerate(zip(CATEGORICAL_COLUMNS, cardinalities)):
        vocab = np.char.mod("%08x", rng.integers(0, 2**32, int(cardinality), dtype=np.uint64))
        vocab = pa.array(np.append(vocab, ""))  # the last entry stands for missing
        ranks = np.floor(cardinality * rng.random(rows) ** 3).astype(np.int64)  # a few values dominate
        ranks[rng.random(rows) < (0.3 if i % 5 == 0 else 0.02)] = cardinality
        columns[name] = vocab.take(pa.array(ranks))
    table = pa.table([columns[name] for name in CRITEO_COLUMNS], names=list(CRITEO_COLUMNS))
    pa_csv.write_csv(
        table, path, write_options=pa_csv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")
    )


class _Stopwatch:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def time(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start


def _all_chunks(source: CriteoSource) -> Iterator[Chunk]:
    for split in SPLITS:
        yield from source.chunks(split)


def time_end_to_end(path: Path, spec: FeatureSpec, *, chunk_rows: int) -> tuple[float, int]:
    """Seconds to stream every split and encode it (row count cached, as from the second epoch on)."""
    source = CriteoSource(path, chunk_rows=chunk_rows, use_threads=False)
    _ = source.num_rows
    rows = 0
    start = time.perf_counter()
    for chunk in _all_chunks(source):
        spec.encode_columns(chunk.columns, len(chunk))
        rows += len(chunk)
    return time.perf_counter() - start, rows


def time_stages(path: Path, spec: FeatureSpec, *, chunk_rows: int) -> dict[str, float]:
    """Seconds per stage of the same work, each stage timed on its own."""
    watch = _Stopwatch()
    with watch.time("count rows (first pass, once per source)"):
        source = CriteoSource(path, chunk_rows=chunk_rows, use_threads=False)
        _ = source.num_rows
    with watch.time("parse (pyarrow CSV)"):
        reader = pa_csv.open_csv(
            path,
            read_options=pa_csv.ReadOptions(
                column_names=list(CRITEO_COLUMNS), block_size=source.block_size, use_threads=False
            ),
            parse_options=pa_csv.ParseOptions(delimiter="\t", quote_char=False, ignore_empty_lines=False),
            convert_options=_CONVERT_OPTIONS,
        )
    while True:
        with watch.time("parse (pyarrow CSV)"):
            batch = next(reader, None)
        if batch is None:
            break
        with watch.time("string packing (Arrow buffers -> StringColumn)"):
            for name in CATEGORICAL_COLUMNS:
                string_column_from_arrow(batch.column(name))
    chunks = _all_chunks(source)
    dense_features = {f.name: f for f in spec.dense}
    sparse_features = {f.name: f for f in spec.sparse}
    while True:
        with watch.time("source total (parse + chunks + string packing)"):
            chunk = next(chunks, None)
        if chunk is None:
            break
        with watch.time("dense transforms"):
            for name in INT_COLUMNS:
                dense_features[name].apply(chunk.columns[name])
        for name in CATEGORICAL_COLUMNS:
            with watch.time("hash strings"):
                hashes, missing = hash_strings(chunk.columns[name])
            with watch.time("lookup (vocab table / buckets)"):
                sparse_features[name].lookup(hashes, missing)
    return watch.seconds


def time_gzip_source(path: Path, *, chunk_rows: int) -> float:
    """Seconds to stream every split of the same rows from a gzip file (count pass included)."""
    compressed = path.with_name(path.name + ".gz")
    with open(path, "rb") as plain, gzip.open(compressed, "wb", compresslevel=1) as packed:
        shutil.copyfileobj(plain, packed, 16 << 20)
    start = time.perf_counter()
    for _ in _all_chunks(CriteoSource(compressed, chunk_rows=chunk_rows, use_threads=False)):
        pass
    seconds = time.perf_counter() - start
    compressed.unlink()
    return seconds


def pin_to_one_core() -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    import torch

    torch.set_num_threads(1)


def markdown_table(report: dict[str, object]) -> str:
    rows = report["rows"]
    lines = [
        f"# Criteo read + encode, one core ({rows:,} rows, {report['file_mib']:.0f} MiB)",
        "",
        machine_header(report["machine"]),
        "",
        f"**read + encode: {report['rows_per_second']:,.0f} rows/s** "
        f"({report['end_to_end_seconds']:.2f} s for all splits, best of {report['repeat']} runs)",
        "",
        "| stage | seconds | rows/s | share of read + encode |",
        "| --- | ---: | ---: | ---: |",
    ]
    total = report["end_to_end_seconds"]
    for stage, seconds in report["stages_seconds"].items():
        rate = rows / seconds if seconds > 0 else float("inf")
        lines.append(f"| {stage} | {seconds:.3f} | {rate:,.0f} | {seconds / total:.0%} |")
    lines.append("")
    lines.append(f"Fitting the FeatureSpec on the training split took {report['fit_seconds']:.2f} s.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.reading", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows in the generated file")
    parser.add_argument("--chunk-rows", type=int, default=262_144)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement; the fastest is reported")
    parser.add_argument("--out", type=Path, default=Path("results/reading"))
    parser.add_argument("--gzip", action="store_true", help="also time reading a gzip copy of the file")
    args = parser.parse_args(argv)
    if args.rows < 10:
        parser.error(f"--rows must be >= 10, got {args.rows}")
    if args.repeat < 1:
        parser.error(f"--repeat must be >= 1, got {args.repeat}")

    pin_to_one_core()
    with tempfile.TemporaryDirectory(prefix="bench_reading_") as tmp:
        path = Path(tmp) / "criteo_like.tsv"
        print(f"writing {args.rows:,} Criteo-like rows to {path} ...", flush=True)
        write_criteo_like(path, rows=args.rows, seed=args.seed)
        file_mib = path.stat().st_size / 2**20

        start = time.perf_counter()
        train = CriteoSource(path, chunk_rows=args.chunk_rows, use_threads=False)
        spec = fit_spec(train.schema, (chunk.columns for chunk in train.chunks("train")))
        fit_seconds = time.perf_counter() - start
        kinds = [f"{f.name}:{f.kind}:{f.num_embeddings}" for f in spec.sparse]
        print(f"fitted in {fit_seconds:.2f} s; tables {' '.join(kinds)}", flush=True)

        # Each figure is the best of --repeat runs: on a shared machine the
        # minimum is the run least disturbed by other processes.
        runs = [time_end_to_end(path, spec, chunk_rows=args.chunk_rows) for _ in range(args.repeat)]
        end_to_end, rows = min(seconds for seconds, _ in runs), runs[0][1]
        stage_runs = [time_stages(path, spec, chunk_rows=args.chunk_rows) for _ in range(args.repeat)]
        stages = {stage: min(run[stage] for run in stage_runs) for stage in stage_runs[0]}
        stages["chunk assembly + conversion (source total - parse)"] = (
            stages["source total (parse + chunks + string packing)"] - stages["parse (pyarrow CSV)"]
        )
        if args.gzip:
            print("timing a gzip copy ...", flush=True)
            stages["source total, gzip file (decompress + count + parse)"] = time_gzip_source(
                path, chunk_rows=args.chunk_rows
            )

    report: dict[str, object] = {
        "rows": rows,
        "file_mib": file_mib,
        "chunk_rows": args.chunk_rows,
        "repeat": args.repeat,
        "end_to_end_seconds": end_to_end,
        "rows_per_second": rows / end_to_end,
        "fit_seconds": fit_seconds,
        "stages_seconds": stages,
        # Pinned to one core, one thread each, glibc's malloc left as it is.
        "machine": machine_info(threads=1, malloc_keeps_freed_memory=False),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "reading.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    table = markdown_table(report)
    (args.out / "reading.md").write_text(table, encoding="utf-8")
    print(table)
    return report


if __name__ == "__main__":
    main()
