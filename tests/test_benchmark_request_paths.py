"""The request-path benchmark: the five paths timed side by side, JSON + Markdown + PNG written."""

from __future__ import annotations

import json

import pytest

from benchmarks.request_paths import PATHS, main


def test_request_paths_benchmark_writes_every_path(tiny_dlrm, tmp_path):
    out = tmp_path / "paths"
    argv = ["--export-dir", str(tiny_dlrm.path), "--backends", "onnx,torchscript", "--batch-size", "400",
            "--threads", "1", "--out", str(out)]
    assert main([*argv, "--min-time", "0.01", "--min-iters", "3"]) == 0
    result = json.loads((out / "request_paths.json").read_text())
    assert [(row["backend"], row["path"]) for row in result["paths"]] == [
        (backend, path) for backend in ("onnx", "torchscript") for path in PATHS
    ]
    for row in result["paths"]:
        assert 0 < row["p25_ms"] <= row["median_ms"] <= row["p75_ms"] and row["iterations"] >= 3
        assert row["records_per_s"] == pytest.approx(400 / row["median_ms"] * 1e3)
    assert result["settings"]["body_bytes"]["arrow"] > 0 and result["machine"]["intra_op_threads"] == 1
    table = (out / "request_paths.md").read_text()
    assert table.startswith("Machine: ") and "| torchscript | Arrow IPC + encode + infer |" in table
    assert table.count("| 100% |") == 2
    assert (out / "request_paths.png").stat().st_size > 0
