"""Export: artifacts, parity (and refusal of a broken artifact), the CLI, sampled records."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from export import exporter
from export.__main__ import main as export_main
from export.parity import EagerReference, HeldOut, ParityError, check_parity, require_parity
from export.pipeline import ExportFailed, ExportRequest, run_export, sampled_held_out
from export.records import sample_columns, sample_records
from export.serving import ServingModule
from handlers.backends import OnnxBackend, make_session
from training.checkpoint import load_checkpoint


@pytest.fixture(scope="module", params=["dlrm", "widedeep"])
def exported(request, tmp_path_factory, tiny_checkpoint, held_out_rows):
    """(checkpoint, report, export dir) for each model, exported once per module."""
    checkpoint = load_checkpoint(tiny_checkpoint(tmp_path_factory.mktemp(request.param), request.param))
    out = checkpoint.path / "export"
    held_out = sampled_held_out(checkpoint.model, checkpoint.spec, rows=held_out_rows, seed=1)
    report = run_export(ExportRequest(model=checkpoint.model, spec=checkpoint.spec, out_dir=out, quantize=True), held_out)
    return checkpoint, report, out


# -- parity of the real models ------------------------------------------------


def test_parity_holds_at_batch_1_7_4096_for_both_formats(exported, held_out_rows):
    _, report, out = exported
    for name in ("torchscript", "onnx"):
        entry = report["formats"][name]
        assert entry["passed"], entry
        assert set(entry["max_abs_diff"]) == {"batch_1", "batch_7", "batch_4096", f"all_{held_out_rows}"}
        assert max(entry["max_abs_diff"].values()) <= 1e-5
        assert abs(entry["auc_diff"]) <= 1e-4
        assert (out / entry["file"]).is_file() and entry["bytes"] > 0
    assert json.loads((out / "export_report.json").read_text()) == report


def test_int8_is_reported_with_auc_change_and_size(exported):
    _, report, out = exported
    entry = report["formats"]["onnx-int8"]
    assert (out / "model.int8.onnx").is_file()
    assert entry["within_auc_budget"] == (entry["auc_drop"] <= 0.002)
    assert entry["bytes"] == (out / "model.int8.onnx").stat().st_size


def test_artifacts_run_at_batch_1_and_10000_with_the_serving_signature(exported):
    checkpoint, _, out = exported
    spec = checkpoint.spec
    dense, sparse = spec.encode_columns(sample_columns(spec, 10_000, seed=3), 10_000)
    scripted = torch.jit.load(str(out / "model.ts.pt"))
    session = make_session(out / "model.onnx", threads=1, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["dense", "sparse"]
    assert [o.name for o in session.get_outputs()] == ["probability"]
    model = onnx.load(str(out / "model.onnx"))
    assert max(op.version for op in model.opset_import if op.domain in ("", "ai.onnx")) >= 17
    for rows in (1, 10_000):
        with torch.inference_mode():
            expected = ServingModule(checkpoint.model)(torch.from_numpy(dense[:rows]), torch.from_numpy(sparse[:rows])).numpy()
            scripted_out = scripted(torch.from_numpy(dense[:rows]), torch.from_numpy(sparse[:rows])).numpy()
        onnx_out = session.run(["probability"], {"dense": dense[:rows], "sparse": sparse[:rows]})[0]
        assert onnx_out.shape == scripted_out.shape == (rows,)
        assert onnx_out.dtype == np.float32
        np.testing.assert_allclose(scripted_out, expected, atol=1e-5, rtol=0)
        np.testing.assert_allclose(onnx_out, expected, atol=1e-5, rtol=0)


def test_the_onnx_backend_runs_a_large_cpu_batch_as_equal_slices_with_the_same_scores(exported):
    checkpoint, _, out = exported
    dense, sparse = checkpoint.spec.encode_columns(sample_columns(checkpoint.spec, 10, seed=4), 10)
    whole = OnnxBackend(out / "model.onnx", device="cpu", threads=1, max_rows_per_run=None)
    sliced = OnnxBackend(out / "model.onnx", device="cpu", threads=1, max_rows_per_run=3)
    runs, run = [], sliced.session.run
    sliced.session.run = lambda names, feeds: runs.append(len(feeds["dense"])) or run(names, feeds)
    scores = sliced.predict(dense, sparse)
    assert runs == [2, 3, 2, 3]  # ceil(10 / 3) slices of about the same size
    assert scores.dtype == np.float32 and scores.shape == (10,)
    np.testing.assert_allclose(scores, whole.predict(dense, sparse), atol=1e-6, rtol=0)
    runs.clear()
    sliced.predict(dense[:3], sparse[:3])
    assert runs == [3]  # within the limit: one run
    with pytest.raises(ValueError, match="max_rows_per_run must be >= 1"):
        OnnxBackend(out / "model.onnx", device="cpu", threads=1, max_rows_per_run=0)


# -- a broken artifact is refused ---------------------------------------------


def _perturb_onnx(path: Path) -> None:
    """Add 0.5 to the largest weight matrix initializer, as a corrupted export would."""
    model = onnx.load(str(path))
    target = max((i for i in model.graph.initializer if len(i.dims) == 2), key=lambda i: i.dims[0] * i.dims[1])
    values = onnx.numpy_helper.to_array(target) + np.float32(0.5)
    target.CopyFrom(onnx.numpy_helper.from_array(values, target.name))
    onnx.save(model, str(path))


def _broken_onnx_export(*args, **kwargs):
    path = _real_export_onnx(*args, **kwargs)
    _perturb_onnx(path)
    return path


_real_export_onnx = exporter.export_onnx


def test_a_perturbed_onnx_weight_is_refused_and_not_left_in_the_export_dir(tmp_path, monkeypatch, tiny_checkpoint, held_out_rows):
    checkpoint = load_checkpoint(tiny_checkpoint(tmp_path / "ckpt", "dlrm"))
    monkeypatch.setattr(exporter, "export_onnx", _broken_onnx_export)
    out = tmp_path / "export"
    held_out = sampled_held_out(checkpoint.model, checkpoint.spec, rows=held_out_rows, seed=1)
    request = ExportRequest(model=checkpoint.model, spec=checkpoint.spec, out_dir=out)
    with pytest.raises(ExportFailed, match=r"onnx: parity failed: max \|p - p_eager\| = [0-9.e+-]+ > 1e-05 at batch size \d+, held-out row \d+"):
        run_export(request, held_out)
    assert not (out / "model.onnx").exists()
    assert (out / "model.ts.pt").is_file()  # the format that passed is kept
    assert sorted(p.name for p in out.iterdir()) == ["export_report.json", "features.json", "model.ts.pt"]
    report = json.loads((out / "export_report.json").read_text())
    assert report["formats"]["onnx"]["passed"] is False and report["formats"]["onnx"]["file"] is None


def test_a_perturbed_torchscript_weight_is_refused_by_the_cli(tmp_path, monkeypatch, capsys, tiny_checkpoint, held_out_rows):
    checkpoint_dir = tiny_checkpoint(tmp_path / "ckpt", "widedeep")
    real_export = exporter.export_torchscript

    def broken_export(module, path, *, example):
        broken = ServingModule(load_checkpoint(checkpoint_dir).model).eval()
        with torch.no_grad():
            next(p for p in broken.parameters() if p.dim() == 2 and p.shape[0] > 1).mul_(1.5)
        return real_export(broken, path, example=example)

    monkeypatch.setattr(exporter, "export_torchscript", broken_export)
    out = tmp_path / "export"
    assert export_main([str(checkpoint_dir), "--out", str(out), "--records", str(held_out_rows)]) == 1
    error = capsys.readouterr().err
    assert "torchscript: parity failed: max |p - p_eager| = " in error
    assert "held-out row" in error
    assert not (out / "model.ts.pt").exists() and (out / "model.onnx").is_file()


def test_a_stale_artifact_from_an_earlier_export_is_removed_on_failure(tmp_path, monkeypatch, tiny_checkpoint, held_out_rows):
    checkpoint = load_checkpoint(tiny_checkpoint(tmp_path / "ckpt", "dlrm"))
    out = tmp_path / "export"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"an older export")
    monkeypatch.setattr(exporter, "export_onnx", _broken_onnx_export)
    held_out = sampled_held_out(checkpoint.model, checkpoint.spec, rows=held_out_rows, seed=1)
    with pytest.raises(ExportFailed):
        run_export(ExportRequest(model=checkpoint.model, spec=checkpoint.spec, out_dir=out, formats=("onnx",)), held_out)
    assert not (out / "model.onnx").exists()


# -- parity checker on its own ------------------------------------------------


def test_parity_message_names_format_magnitude_batch_and_row():
    rng = np.random.default_rng(0)
    dense, sparse = rng.normal(size=(5000, 3)).astype(np.float32), np.zeros((5000, 2), np.int64)
    labels = (rng.random(5000) < 0.5).astype(np.float32)

    def eager(d, s):
        return 1.0 / (1.0 + np.exp(-d[:, 0]))

    def off_at_row_42(d, s):
        out = eager(d, s)
        if len(d) == 1 and d[0, 0] == dense[42, 0]:
            out = out + 3e-3
        return out

    reference = EagerReference(eager, HeldOut(dense, sparse, labels, source="test"))
    result = check_parity("onnx", off_at_row_42, reference)
    assert not result.passed
    with pytest.raises(ParityError, match=r"^onnx: parity failed: max \|p - p_eager\| = 0\.003 > 1e-05 at batch size 1, held-out row 42$"):
        require_parity(result)
    assert check_parity("onnx", eager, reference).passed


def test_held_out_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match=r"differ in length: \[3, 4\]"):
        HeldOut(np.zeros((3, 1), np.float32), np.zeros((3, 1), np.int64), np.zeros(4, np.float32), source="x")


# -- the CLI ------------------------------------------------------------------


def test_cli_exports_end_to_end(tmp_path, capsys, tiny_checkpoint, held_out_rows):
    checkpoint_dir = tiny_checkpoint(tmp_path / "ckpt", "dlrm")
    out = tmp_path / "export"
    code = export_main([str(checkpoint_dir), "--out", str(out), "--quantize", "int8", "--records", str(held_out_rows)])
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "export_report.json", "features.json", "model.int8.onnx", "model.onnx", "model.ts.pt"
    ]
    assert (out / "features.json").read_bytes() == (checkpoint_dir / "features.json").read_bytes()
    report = json.loads((out / "export_report.json").read_text())
    assert report["model"] == "dlrm" and report["checkpoint"] == str(checkpoint_dir.resolve())
    assert report["held_out"]["records"] == held_out_rows
    assert set(report["versions"]) >= {"torch", "onnx", "onnxruntime"}
    printed = capsys.readouterr().out
    assert "torchscript  ok" in printed and "onnx         ok" in printed and "onnx-int8" in printed


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--formats", "tflite"], r"--formats: unknown \[.tflite.\]; choose from torchscript,onnx"),
        (["--records", "100"], r"--records must be >= 4096"),
        (["--quantize", "int4"], r"invalid choice: 'int4'"),
    ],
)
def test_cli_rejects_bad_arguments(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        export_main([str(tmp_path), *argv])
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_cli_names_a_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model\.pt: not found"):
        export_main([str(tmp_path / "nowhere")])


def test_quantize_needs_onnx(tiny_spec):
    with pytest.raises(ValueError, match="include onnx in --formats"):
        ExportRequest(model=torch.nn.Identity(), spec=tiny_spec, out_dir=Path("x"), formats=("torchscript",), quantize=True)


# -- sampled records and sessions ---------------------------------------------


def test_sampled_records_encode_like_sampled_columns_and_are_valid_requests(tiny_spec):
    spec = tiny_spec
    records = sample_records(spec, 500, seed=7)
    assert json.loads(json.dumps(records)) == records  # plain JSON, as a client sends it
    assert any(len(r) < len(spec.feature_names) for r in records)  # some features missing
    from_records = spec.encode_records(records)
    from_columns = spec.encode_columns(sample_columns(spec, 500, seed=7), 500)
    for got, want in zip(from_records, from_columns):
        np.testing.assert_array_equal(got, want)
    assert (from_records[1] > 0).any() and (from_records[1] == 0).any()
    assert sample_records(spec, 5, seed=1) == sample_records(spec, 5, seed=1)


def test_sample_columns_validates_arguments(tiny_spec):
    with pytest.raises(ValueError, match="num_rows must be >= 1, got 0"):
        sample_columns(tiny_spec, 0, seed=0)
    with pytest.raises(ValueError, match=r"missing_rate must be in \[0, 1\), got 1.5"):
        sample_columns(tiny_spec, 3, seed=0, missing_rate=1.5)


def test_make_session_validates_options(exported):
    _, _, out = exported
    with pytest.raises(ValueError, match="threads must be >= 1, got 0"):
        make_session(out / "model.onnx", threads=0)
    with pytest.raises(ValueError, match="graph_optimization must be one of .* got 'max'"):
        make_session(out / "model.onnx", threads=1, graph_optimization="max")


# -- bucketized features, the DCN interaction, attention pooling -------------


def _bucketized_checkpoint(directory: Path, model_name: str) -> Path:
    """A tiny checkpoint whose spec bucketizes both dense features; DLRM uses a low-rank DCN, and
    both pool the multi-valued C3 by attention to C1 (as history features attend to the item)."""
    from training.checkpoint import save_checkpoint
    from training.fitting import SchemaField, SparseOptions, fit_spec
    from training.models import build_model
    from training.models.dlrm import DLRMConfig
    from training.models.wide_deep import WideDeepConfig

    rng = np.random.default_rng(4)
    schema = [
        SchemaField("I1", dense=True, bucketize=16),
        SchemaField("I2", dense=True, transform="standard", bucketize=8),
        SchemaField("C1", dense=False, options=SparseOptions(min_count=1)),
        SchemaField("C3", dense=False, options=SparseOptions(min_count=1, multi_valued=True, max_values=3)),
    ]
    columns = {
        "I1": np.floor(rng.exponential(20.0, 400)),
        "I2": rng.normal(5.0, 2.0, 400),
        "C1": [f"a{v}" for v in rng.integers(0, 20, 400)],
        "C3": ["|".join(f"t{v}" for v in rng.integers(0, 10, k)) for k in rng.integers(0, 4, 400)],
    }
    spec = fit_spec(schema, [columns])
    shapes = dict(num_dense=spec.num_dense, table_sizes=spec.table_sizes, table_widths=spec.table_widths, embedding_dim=8)
    attention = ((spec.table_names.index("C3"), spec.table_names.index("C1")),)
    if model_name == "dlrm":
        config = DLRMConfig(**shapes, bottom_mlp=(16,), top_mlp=(16,), interaction="dcn", cross_rank=6, dropout=0.25,
                            attention=attention)
    else:
        config = WideDeepConfig(**shapes, deep_mlp=(16,), cross_buckets=64, dropout=0.25, attention=attention)
    torch.manual_seed(0)
    model = build_model(model_name, config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    return save_checkpoint(directory, model_name=model_name, config=config, model=model, spec=spec)


@pytest.mark.parametrize("model_name", ["dlrm", "widedeep"])
def test_bucketized_dcn_and_attention_export_with_parity(tmp_path, model_name, held_out_rows):
    checkpoint = load_checkpoint(_bucketized_checkpoint(tmp_path / "ckpt", model_name))
    assert len(checkpoint.model.feature_embeddings().attention) == 1
    spec = checkpoint.spec
    assert [f.name for f in spec.bucketized] == ["I1_bucket", "I2_bucket"]
    held_out = sampled_held_out(checkpoint.model, spec, rows=held_out_rows, seed=1)
    assert len(np.unique(held_out.sparse[:, -1])) > 5  # the buckets vary across the held-out rows
    request = ExportRequest(model=checkpoint.model, spec=spec, out_dir=tmp_path / "export",
                            formats=("torchscript", "onnx", "pt2"), threads=1)
    report = run_export(request, held_out)
    for name in ("torchscript", "onnx", "pt2"):
        entry = report["formats"][name]
        assert entry["passed"], entry
        assert {"batch_1", "batch_7", "batch_4096"} <= set(entry["max_abs_diff"])
        assert max(entry["max_abs_diff"].values()) <= 1e-5
    assert report["signature"]["inputs"]["sparse"] == ["B", spec.num_sparse_columns, "int64"]
    # Served records send the raw dense values; they encode as the sampled columns do.
    records = sample_records(spec, 50, seed=2)
    assert not any(key.endswith("_bucket") for record in records for key in record)
    for got, want in zip(spec.encode_records(records), spec.encode_columns(sample_columns(spec, 50, seed=2), 50)):
        np.testing.assert_array_equal(got, want)
