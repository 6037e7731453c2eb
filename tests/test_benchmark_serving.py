"""The serving benchmark's pure parts: the sweep, the backends it picks, the in-process limit, the report."""

from __future__ import annotations

import shutil

import pytest

from benchmarks.common import machine_info
from benchmarks.serving import (
    SCENARIOS,
    Point,
    checks,
    in_process_cells,
    in_process_limits,
    markdown,
    parse_args,
    sweep_points,
)


def test_sweep_has_the_arrow_ranking_beside_the_json_one():
    quick = sweep_points(["onnx", "pt2"], quick=True)
    for backend in ("onnx", "pt2"):
        assert Point(backend, "on-8", 1, "ranking-256-arrow") in quick
        assert Point(backend, "on-8", 1, "ranking-256") in quick
    assert {p.workers for p in quick} == {1} and len(quick) == 2 * 5
    full = sweep_points(["torchscript"])
    arrow = [p for p in full if p.scenario == "ranking-256-arrow"]
    assert arrow == [Point("torchscript", "on-8", 1, "ranking-256-arrow"), Point("torchscript", "on-8", 2, "ranking-256-arrow")]
    assert len(full) == 12 and len(set(full)) == len(full)
    arrow_scenario = SCENARIOS["ranking-256-arrow"]
    assert arrow_scenario.request_format == "arrow" and arrow_scenario.records == SCENARIOS["ranking-256"].records == 256
    assert arrow_scenario.locust_options[:2] == ("--mix", "arrow=1")
    assert in_process_cells(["single", "ranking-256", "ranking-256-arrow"]) == [("json", 1), ("arrow", 256), ("json", 256)]


def test_pt2_is_a_default_backend_only_when_exported(tiny_dlrm, tmp_path, capsys):
    export_dir = tmp_path / "export"
    shutil.copytree(tiny_dlrm.path, export_dir)  # model.ts.pt, model.onnx, features.json: no model.pt2
    assert parse_args([str(export_dir)]).backends == ("torchscript", "onnx")
    assert "pt2 left out" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        parse_args([str(export_dir), "--backends", "onnx,pt2"])
    error = capsys.readouterr().err
    assert "--backends pt2:" in error and "model.pt2 not found" in error
    (export_dir / "model.pt2").write_bytes(b"")
    assert parse_args([str(export_dir)]).backends == ("torchscript", "onnx", "pt2")
    assert "left out" not in capsys.readouterr().out
    assert parse_args([str(export_dir), "--backends", "pt2"]).backends == ("pt2",)


def test_in_process_limit_times_json_and_arrow_bodies(tiny_dlrm):
    cells = [("json", 4), ("arrow", 4), ("json", 1)]
    measured = in_process_limits(tiny_dlrm.path, backends=["onnx"], cells=cells, threads=1, min_time=0.01)
    assert sorted((m["format"], m["batch_size"]) for m in measured) == sorted(cells)
    assert all(m["backend"] == "onnx" and m["threads"] == 1 and m["records_per_s"] > 0 for m in measured)


def point(scenario: str, max_records_per_s: float, *, request_format: str) -> dict:
    return {
        "backend": "onnx", "batching": "on-8", "workers": 1, "scenario": scenario, "records_per_request": 256,
        "request_format": request_format, "max_records_per_s": max_records_per_s, "p99_ms_at_max": 40.0,
        "capacity_records_per_s": max_records_per_s, "failures": 0, "retries": {"total": 0, "by_reason": {}},
        "generator_cores": 0.5, "server_cores": 1.2, "frontend_cores": 0.2, "worker_cores": 1.0, "steps": [],
    }  # fmt: skip


def test_report_compares_each_point_with_the_in_process_figure_of_its_format():
    limit = {"backend": "onnx", "mode": "encode+infer", "batch_size": 256, "threads": 1, "p50_ms": 1.0}
    result = {
        "export_dir": "/tmp/export",
        "machine": machine_info(threads=1, malloc_keeps_freed_memory=True),
        "settings": {"step_time_s": 3.0, "slo_p99_ms": 60.0},
        "command": "python -m benchmarks.serving /tmp/export",
        "points": [point("ranking-256", 500, request_format="json"), point("ranking-256-arrow", 500, request_format="arrow")],
        "in_process": [{**limit, "format": "json", "records_per_s": 1000.0}, {**limit, "format": "arrow", "records_per_s": 2000.0}],
    }
    result["checks"] = checks(result)
    table = markdown(result)
    assert "| ranking-256 | json | 500 | 40.0 | 500 | 1,000 | 50% |" in table
    assert "| ranking-256-arrow | arrow | 500 | 40.0 | 500 | 2,000 | 25% |" in table
    assert "| onnx | arrow | 256 | 1 | 2,000 | 1.000 |" in table
    assert "share of in-process" in table
    assert result["checks"]["ranking 256 candidates as Arrow IPC, onnx, 1 worker(s)"].startswith("500 records/s (batching on-8) = 25%")
    assert "= 50% of in-process parse+encode+infer at batch 256, json" in result["checks"]["ranking 256 candidates, onnx, 1 worker(s)"]
    # A result written before request formats were recorded: every figure is JSON.
    for entry in (*result["points"], *result["in_process"]):
        entry.pop("request_format", None), entry.pop("format", None)
    result["in_process"] = result["in_process"][:1]
    assert "| ranking-256-arrow | json | 500 | 40.0 | 500 | 1,000 | 50% |" in markdown(result)
