"""The export benchmark: every (backend, batch size, mode) measured, JSON + Markdown + PNG written."""

from __future__ import annotations

import json

import pytest

from benchmarks.runtimes import main as benchmark_main
from benchmarks.runtimes import markdown
from export.pipeline import ExportRequest, run_export, sampled_held_out
from training.checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, tiny_checkpoint, held_out_rows):
    checkpoint = load_checkpoint(tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), "dlrm"))
    out = checkpoint.path / "export"
    held_out = sampled_held_out(checkpoint.model, checkpoint.spec, rows=held_out_rows, seed=1)
    source = {"checkpoint": str(checkpoint.path), "model": "dlrm"}  # the eager backend reloads it from here
    request = ExportRequest(model=checkpoint.model, spec=checkpoint.spec, out_dir=out, quantize=True, source=source)
    run_export(request, held_out)
    return out


def test_benchmark_writes_every_cell_and_the_reports(export_dir, tmp_path, capsys):
    out = tmp_path / "bench"
    argv = [str(export_dir), "--out", str(out), "--batch-sizes", "1,8", "--threads", "1", "--device", "cpu"]
    assert benchmark_main([*argv, "--min-time", "0.01", "--min-iters", "3", "--ort-options"]) == 0
    result = json.loads((out / "benchmark.json").read_text())
    cells = {(m["backend"], m["mode"], m["batch_size"]) for m in result["measurements"]}
    assert cells == {
        (backend, mode, batch)
        for backend in ("eager", "torchscript", "onnx", "onnx-int8")
        for mode in ("infer", "encode+infer", "encode+infer (columns)")
        for batch in (1, 8)
    } | {("-", "json.loads", batch) for batch in (1, 8)}
    for m in result["measurements"]:
        assert 0 < m["p50_ms"] <= m["p99_ms"] and m["iterations"] >= 3
        assert m["records_per_s"] == pytest.approx(m["batch_size"] / m["p50_ms"] * 1e3)
    assert {m["variant"] for m in result["ort_options"]} >= {"graph optimization: disable", "memory arena off"}
    assert result["machine"]["cpu"] and result["machine"]["versions"]["onnxruntime"]
    assert result["machine"]["intra_op_threads"] == 1 and result["machine"]["device"] == "cpu"
    table = (out / "benchmark.md").read_text()
    assert table.startswith("Machine: ")  # the shared header (benchmarks.common.machine_header)
    assert "| onnx-int8 | 8 |" in table and "encode+infer records/s" in table and "memory pattern off" in table
    assert "columns / infer" in table and "| 8 |" in table.split("json.loads")[1]  # the parse table
    assert (out / "records_per_s.png").read_bytes()[:4] == b"\x89PNG"
    assert "| eager | 1 |" in capsys.readouterr().out


def test_benchmark_skips_a_backend_whose_artifact_is_missing(export_dir, tmp_path):
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("features.json", "model.onnx"):
        (partial / name).write_bytes((export_dir / name).read_bytes())
    out = tmp_path / "bench"
    argv = [str(partial), "--out", str(out), "--backends", "onnx,torchscript", "--batch-sizes", "2", "--no-encode"]
    assert benchmark_main([*argv, "--min-time", "0.01", "--min-iters", "2", "--device", "cpu"]) == 0
    result = json.loads((out / "benchmark.json").read_text())
    assert [m["backend"] for m in result["measurements"]] == ["onnx"]
    assert "model.ts.pt: not found" in result["skipped"]["torchscript"]
    assert "| onnx | 2 |" in markdown(result)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--backends", "tensorrt"], "unknown ['tensorrt']"),
        (["--batch-sizes", "0,4"], "--batch-sizes must be >= 1"),
        (["--batch-sizes", "a"], "comma-separated integers"),
        (["--threads", "0"], "--threads must be >= 1"),
    ],
)
def test_benchmark_rejects_bad_arguments(export_dir, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        benchmark_main([str(export_dir), *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_benchmark_needs_an_export_dir(tmp_path, capsys):
    with pytest.raises(SystemExit):
        benchmark_main([str(tmp_path / "missing")])
    assert "not a directory (run python -m export first)" in capsys.readouterr().err
