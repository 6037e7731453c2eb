"""The AOTInductor ``.pt2`` artifact: parity, the handler's backend, the .mar, a live TorchServe.

AOTInductor compiles C++ for each model (about 15-25 s here), so each tiny
model is exported once for the module and every test reuses it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.runtimes import main as benchmark_main
from export.__main__ import parse_args as export_args
from export.archive import ServingConfig, build_archive
from export.backends import load_predictor
from export.pipeline import ExportRequest, run_export, sampled_held_out
from export.records import sample_columns
from export.serving import ServingModule
from handlers.backends import Pt2Backend, check_compute_capability, check_cpu_instructions, load_backend, package_metadata
from training.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exported_pt2(tmp_path_factory, tiny_checkpoint, held_out_rows) -> dict:
    """Model name -> (checkpoint, report, export dir) with model.pt2, model.ts.pt and model.onnx."""
    exports = {}
    for name in ("dlrm", "widedeep"):
        checkpoint = load_checkpoint(tiny_checkpoint(tmp_path_factory.mktemp(f"pt2_{name}"), name))
        out = checkpoint.path / "export"
        held_out = sampled_held_out(checkpoint.model, checkpoint.spec, rows=held_out_rows, seed=1)
        request = ExportRequest(
            model=checkpoint.model, spec=checkpoint.spec, out_dir=out, formats=("torchscript", "onnx", "pt2"), threads=1
        )
        exports[name] = (checkpoint, run_export(request, held_out), out)
    return exports


@pytest.mark.parametrize("model_name", ["dlrm", "widedeep"])
def test_pt2_parity_at_batch_1_7_4096_with_a_dynamic_batch(exported_pt2, model_name, held_out_rows):
    checkpoint, report, out = exported_pt2[model_name]
    entry = report["formats"]["pt2"]
    assert entry["passed"], entry
    assert entry["file"] == "model.pt2" and entry["bytes"] == (out / "model.pt2").stat().st_size
    assert set(entry["max_abs_diff"]) == {"batch_1", "batch_7", "batch_4096", f"all_{held_out_rows}"}
    assert max(entry["max_abs_diff"].values()) <= 1e-5 and abs(entry["auc_diff"]) <= 1e-4
    assert entry["compiled_for"]["device_key"] == "cpu" and entry["export_seconds"] > 0
    assert json.loads((out / "export_report.json").read_text())["formats"]["pt2"] == entry
    assert sorted(p.name for p in out.iterdir()) == [
        "export_report.json", "features.json", "model.onnx", "model.pt2", "model.ts.pt"
    ]  # no staged file left behind

    # One package, batch sizes it was never exported with, against the eager model.
    spec = checkpoint.spec
    dense, sparse = spec.encode_columns(sample_columns(spec, 5000, seed=3), 5000)
    backend = load_backend(out / "model.pt2", device="cpu", threads=1)
    assert isinstance(backend, Pt2Backend) and backend.device == "cpu"
    for rows in (1, 2, 5000):
        with torch.inference_mode():
            expected = ServingModule(checkpoint.model)(torch.from_numpy(dense[:rows]), torch.from_numpy(sparse[:rows])).numpy()
        got = backend.predict(dense[:rows], sparse[:rows])
        assert got.shape == (rows,) and got.dtype == np.float32
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_pt2_scores_like_torchscript_and_onnx_through_the_shared_predictor(exported_pt2):
    checkpoint, _, out = exported_pt2["dlrm"]
    dense, sparse = checkpoint.spec.encode_columns(sample_columns(checkpoint.spec, 64, seed=5), 64)
    scores = {name: load_predictor(name, out, threads=1)(dense, sparse) for name in ("torchscript", "onnx", "pt2")}
    np.testing.assert_allclose(scores["pt2"], scores["torchscript"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(scores["pt2"], scores["onnx"], atol=1e-5, rtol=0)


def test_pt2_is_exported_on_request_only(tmp_path):
    assert export_args([str(tmp_path)]).formats == ("torchscript", "onnx")
    assert export_args([str(tmp_path), "--formats", "torchscript,pt2"]).formats == ("torchscript", "pt2")


def test_export_device_is_the_cpu_unless_asked(tmp_path, exported_pt2, capsys):
    assert export_args([str(tmp_path)]).device == "cpu"
    assert exported_pt2["dlrm"][1]["parity_device"] == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            export_args([str(tmp_path), "--device", "cuda"])
        assert "--device cuda: torch.cuda.is_available() is False" in capsys.readouterr().err
        assert export_args([str(tmp_path), "--device", "auto"]).device == "cpu"
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda'"):
        ExportRequest(model=torch.nn.Identity(), spec=exported_pt2["dlrm"][0].spec, out_dir=tmp_path, device="cuda:0")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("model_name", ["dlrm", "widedeep"])
def test_pt2_compiled_for_cuda_holds_parity_and_serves_on_the_gpu(tmp_path, tiny_checkpoint, held_out_rows, model_name):
    checkpoint = load_checkpoint(tiny_checkpoint(tmp_path / "checkpoint", model_name))
    out = tmp_path / "export"
    held_out = sampled_held_out(checkpoint.model, checkpoint.spec, rows=held_out_rows, seed=1)
    formats = ("torchscript", "onnx", "pt2")
    request = ExportRequest(model=checkpoint.model, spec=checkpoint.spec, out_dir=out, formats=formats, threads=1, device="cuda")
    report = run_export(request, held_out)
    assert report["parity_device"] == "cuda"
    for name, entry in report["formats"].items():
        assert entry["passed"] and max(entry["max_abs_diff"].values()) <= 1e-5, (name, entry)
    assert report["formats"]["pt2"]["compiled_for"]["device_key"] == "cuda"
    backend = load_backend(out / "model.pt2", device="cuda:0", threads=1)
    assert backend.device == "cuda:0"
    with pytest.raises(ValueError, match="compiled for cuda, cannot run on cpu"):
        load_backend(out / "model.pt2", device="cpu", threads=1)
    dense, sparse = checkpoint.spec.encode_columns(sample_columns(checkpoint.spec, 4096, seed=3), 4096)
    with torch.inference_mode():
        expected = ServingModule(checkpoint.model)(torch.from_numpy(dense), torch.from_numpy(sparse)).numpy()
    for rows in (1, 7, 4096):
        np.testing.assert_allclose(backend.predict(dense[:rows], sparse[:rows]), expected[:rows], atol=1e-5, rtol=0)


def test_benchmark_times_pt2_beside_torchscript_and_onnx(exported_pt2, tmp_path):
    _, _, out = exported_pt2["dlrm"]
    argv = [str(out), "--out", str(tmp_path), "--backends", "torchscript,onnx,pt2", "--batch-sizes", "1,4096", "--no-encode"]
    assert benchmark_main([*argv, "--threads", "1", "--device", "cpu", "--min-time", "0.01", "--min-iters", "3"]) == 0
    result = json.loads((tmp_path / "benchmark.json").read_text())
    cells = [(m["backend"], m["batch_size"]) for m in result["measurements"]]
    # Timed in turns per batch size: every backend of batch 1, then every backend of batch 4096.
    assert cells == [(b, size) for size in (1, 4096) for b in ("torchscript", "onnx", "pt2")]
    assert all(m["records_per_s"] > 0 for m in result["measurements"]) and not result["skipped"]
    table = (tmp_path / "benchmark.md").read_text()
    assert table.index("| torchscript | 1 |") < table.index("| onnx | 1 |") < table.index("| pt2 | 1 |") < table.index("| pt2 | 4096 |")


def test_pt2_package_names_where_it_runs_and_a_foreign_one_is_refused(exported_pt2, tmp_path):
    _, _, out = exported_pt2["dlrm"]
    metadata = package_metadata(out / "model.pt2")
    assert metadata["AOTI_DEVICE_KEY"] == "cpu" and metadata["AOTI_CPU_ISA"]
    check_cpu_instructions(metadata["AOTI_CPU_ISA"], package=out / "model.pt2")  # compiled here, so it runs here
    # A CPU package serves on the CPU when TorchServe assigns a GPU (no CUDA needed to check that).
    assert load_backend(out / "model.pt2", device="cuda:0", threads=1).device == "cpu"
    if "amx_tile" not in Path("/proc/cpuinfo").read_text():
        with pytest.raises(ValueError, match=r"compiled for AVX512 AMX_TILE, but this CPU lacks .*amx_tile"):
            check_cpu_instructions("AVX512 AMX_TILE", package="model.pt2")
    check_compute_capability("90", (9, 0), package="model.pt2")  # the export GPU's own architecture
    check_compute_capability("80", (8, 6), package="model.pt2")  # a higher minor version runs it
    check_compute_capability("", (8, 0), package="model.pt2")  # unreadable: trusted
    for compiled, available in (("90", (8, 0)), ("90", (10, 0)), ("86", (8, 0))):
        with pytest.raises(ValueError, match=rf"compiled for GPUs of compute capability {compiled[0]}\.{compiled[1]}, "
                           rf"but this GPU's is {available[0]}\.{available[1]}"):
            check_compute_capability(compiled, available, package="model.pt2")
    not_a_package = tmp_path / "model.pt2"
    with zipfile.ZipFile(not_a_package, "w") as archive:
        archive.writestr("model/data/x.txt", "")
    with pytest.raises(ValueError, match=r"model\.pt2: not an AOTInductor package"):
        load_backend(not_a_package, device="cpu", threads=1)
    with pytest.raises(ValueError, match=r"unknown model artifact \(expected model\.ts\.pt, model\.onnx or model\.pt2\)"):
        load_backend(tmp_path / "model.bin", device="cpu", threads=1)


def test_pt2_archive_serves_from_the_extracted_archive_alone(exported_pt2, tmp_path, sample_records, metrics_config, repo_root):
    from test_archive import SCORE_FROM_ARCHIVE

    checkpoint, _, out = exported_pt2["widedeep"]
    archive = build_archive(out, name="tiny", backend="pt2", model_store=tmp_path / "store", config=ServingConfig(max_records=100))
    extracted = tmp_path / "extracted"
    with zipfile.ZipFile(archive) as packed:
        assert "model.pt2" in packed.namelist() and not {"model.ts.pt", "model.onnx"} & set(packed.namelist())
        packed.extractall(extracted)
    records = sample_records(5, seed=11)
    site_dirs = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    command = [sys.executable, "-S", "-I", "-c", SCORE_FROM_ARCHIVE, str(extracted), ":".join(site_dirs), str(metrics_config),
               json.dumps({"instances": records})]
    (tmp_path / "cwd").mkdir()
    result = subprocess.run(command, cwd=tmp_path / "cwd", capture_output=True, text=True, timeout=300, env={"PATH": "/usr/bin:/bin"},
                            check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["status"] == 200
    dense, sparse = checkpoint.spec.encode_records(records)
    with torch.inference_mode():
        expected = ServingModule(checkpoint.model)(torch.from_numpy(dense), torch.from_numpy(sparse)).tolist()
    assert outcome["response"]["predictions"] == pytest.approx(expected, abs=1e-5)
    assert {name.split(".")[0] for name in outcome["modules"]} == {"featurespec", "handlers", "recommender_handler"}
    for path in outcome["modules"].values():
        assert not Path(path).resolve().is_relative_to(repo_root)


def test_pt2_archive_over_a_live_torchserve(exported_pt2, tmp_path, sample_records):
    from loadtest.torchserve import running_torchserve

    checkpoint, _, out = exported_pt2["dlrm"]
    clean = tmp_path / "clean_host"
    store = clean / "model_store"
    store.mkdir(parents=True)
    config = ServingConfig(batch_size=8, max_batch_delay_ms=20, max_records=100, startup_timeout_s=120)
    built = build_archive(out, name="dlrm_pt2", backend="pt2", model_store=tmp_path / "build", config=config)
    shutil.copy(built, store)  # the archive alone, outside the repository
    records = sample_records(4, seed=3) + [{}]
    dense, sparse = checkpoint.spec.encode_records(records)
    with torch.inference_mode():
        expected = ServingModule(checkpoint.model)(torch.from_numpy(dense), torch.from_numpy(sparse)).tolist()
    with running_torchserve(clean, model_store=store, models=["dlrm_pt2"], timeout=180) as server:
        response = server.predict("dlrm_pt2", {"instances": records})
        assert response.status == 200, response.body
        assert response.json()["predictions"] == pytest.approx(expected, abs=1e-5)
        bad = server.predict("dlrm_pt2", {"instances": [{"I1": "three"}]})
        assert bad.status == 400 and "I1" in bad.body.decode()
