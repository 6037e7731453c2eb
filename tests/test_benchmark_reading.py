"""The Criteo read + encode benchmark, run as its users run it, on a few hundred generated rows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_reading_benchmark_writes_its_figures_and_table(tmp_path):
    # A subprocess: the benchmark pins its process to one core and one thread per library,
    # which must not leak into the rest of the test session.
    out = tmp_path / "reading"
    command = [sys.executable, "-m", "benchmarks.reading", "--rows", "300", "--repeat", "1", "--chunk-rows", "128"]
    finished = subprocess.run(
        [*command, "--gzip", "--out", str(out)], check=False, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert finished.returncode == 0, finished.stderr
    report = json.loads((out / "reading.json").read_text())
    assert report["rows"] == 300 and report["rows_per_second"] == report["rows"] / report["end_to_end_seconds"]
    assert report["machine"]["usable_cores"] == 1 and report["machine"]["intra_op_threads"] == 1
    assert "parse (pyarrow CSV)" in report["stages_seconds"]
    assert "source total, gzip file (decompress + count + parse)" in report["stages_seconds"]
    table = (out / "reading.md").read_text()
    assert "Machine: " in table and "| hash strings |" in table and "target" not in table.lower()
    assert table in finished.stdout


def test_reading_benchmark_rejects_too_few_rows():
    finished = subprocess.run(
        [sys.executable, "-m", "benchmarks.reading", "--rows", "5"], check=False, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert finished.returncode == 2 and "--rows must be >= 10, got 5" in finished.stderr
