"""Checkpoint -> export dir: artifacts, parity check, report.

Artifacts are written to a hidden ``.staged/`` dir inside the export dir and
moved into place only after they pass parity, so a broken artifact is never
left where the archive step (or a person) would pick it up.
"""

from __future__ import annotations

import copy
import json
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from export import exporter
from export.backends import ARTIFACTS, artifact_predictor, torch_predictor
from export.parity import (
    AUC_TOLERANCE,
    INT8_AUC_BUDGET,
    PARITY_BATCH_SIZES,
    TOLERANCE,
    EagerReference,
    HeldOut,
    ParityResult,
    check_parity,
)
from export.records import sample_columns
from export.serving import ServingModule, example_inputs
from featurespec import FEATURES_FILE, FeatureSpec
from handlers.backends import package_metadata

FORMATS = ("torchscript", "onnx", "pt2")
# .pt2 is opt-in: AOTInductor compiles C++ for tens of seconds per model and needs a compiler on the export host.
DEFAULT_FORMATS = ("torchscript", "onnx")
REPORT_FILE = "export_report.json"


class ExportFailed(RuntimeError):
    """At least one format failed parity; ``report`` says which and by how much."""

    def __init__(self, message: str, report: dict[str, Any]):
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class ExportRequest:
    model: nn.Module  # eval mode, CPU
    spec: FeatureSpec
    out_dir: Path
    formats: tuple[str, ...] = DEFAULT_FORMATS
    quantize: bool = False
    threads: int = 2
    batch_sizes: tuple[int, ...] = PARITY_BATCH_SIZES
    source: dict[str, Any] | None = None  # checkpoint path and model name, recorded in the report
    features_file: Path | None = None  # the checkpoint's features.json, copied byte for byte
    device: str = "cpu"  # "cuda": the .pt2 is compiled for this machine's GPU, and parity runs there

    def __post_init__(self) -> None:
        unknown = [f for f in self.formats if f not in FORMATS]
        if unknown or not self.formats:
            raise ValueError(f"formats must be a non-empty subset of {', '.join(FORMATS)}, got {list(self.formats)}")
        if self.quantize and "onnx" not in self.formats:
            raise ValueError("--quantize int8 quantizes the ONNX model: include onnx in --formats")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")


def sampled_held_out(model: nn.Module, spec: FeatureSpec, *, rows: int, seed: int) -> HeldOut:
    """Records sampled from the spec, labelled by Bernoulli draws from the eager model.

    Without a real test split, labels drawn from the model's own
    probabilities give an AUC that any change of the scores would move: the
    parity check needs labels that depend on the inputs, not a good model.
    """
    dense, sparse = spec.encode_columns(sample_columns(spec, rows, seed=seed), rows)
    probabilities = score_eager(model, dense, sparse)
    labels = (np.random.default_rng(seed + 1).random(rows) < probabilities).astype(np.float32)
    return HeldOut(dense, sparse, labels, source=f"sampled from the FeatureSpec (seed {seed}), labels ~ Bernoulli(p_eager)")


def score_eager(model: nn.Module, dense: np.ndarray, sparse: np.ndarray, *, batch_size: int = 4096) -> np.ndarray:
    predict = torch_predictor(ServingModule(model).eval())
    return np.concatenate(
        [predict(dense[i : i + batch_size], sparse[i : i + batch_size]) for i in range(0, len(dense), batch_size)]
    )


def run_export(
    request: ExportRequest, held_out: HeldOut, *, progress: Callable[[str], None] = lambda _: None
) -> dict[str, Any]:
    """Export, check, keep what passed, write the report; raise :class:`ExportFailed` on a parity failure."""
    out = request.out_dir
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(request.threads)
    module = ServingModule(request.model).eval()
    example = example_inputs(request.spec.num_dense, request.spec.num_sparse_columns, batch=3)
    reference = EagerReference(torch_predictor(module), held_out)
    results: dict[str, ParityResult] = {}
    timings: dict[str, float] = {}
    staged: dict[str, Path] = {}
    # Written under their own names in a hidden dir: a .pt2 package records its file's stem inside it.
    staging = out / ".staged"
    staging.mkdir(exist_ok=True)
    try:
        for name in request.formats:
            progress(f"exporting {name}")
            start = time.perf_counter()
            staged[name] = _write(name, module, staging / ARTIFACTS[name], example=example, device=request.device)
            if name == "onnx" and request.quantize:
                staged["onnx-int8"] = exporter.quantize_int8(staged["onnx"], staging / ARTIFACTS["onnx-int8"])
            timings[name] = time.perf_counter() - start
        for name, path in staged.items():
            progress(f"checking parity of {name} on {len(held_out)} held-out records")
            int8 = name == "onnx-int8"
            result = check_parity(
                name,
                # The handler's own backend: parity is checked on what will be served.
                artifact_predictor(name, path, threads=request.threads, device=request.device),
                reference,
                batch_sizes=request.batch_sizes,
                tolerance=None if int8 else TOLERANCE,
                auc_tolerance=None if int8 else AUC_TOLERANCE,
            )
            if int8:
                drop = -result.auc_diff
                result.extra.update(auc_drop=drop, within_auc_budget=drop <= INT8_AUC_BUDGET)
            results[name] = result
        failures = [r.failure_message() for r in results.values() if not r.passed]
        for name, path in staged.items():
            if results[name].passed:
                path.replace(out / ARTIFACTS[name])
            else:
                (out / ARTIFACTS[name]).unlink(missing_ok=True)  # never leave an older artifact that looks current
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # what failed parity, and anything a failed export left half-written
    if request.features_file is not None:
        shutil.copyfile(request.features_file, out / FEATURES_FILE)
    else:
        request.spec.save(out / FEATURES_FILE)
    report = _report(request, held_out, reference, results, timings)
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if failures:
        raise ExportFailed("\n".join(failures), report)
    return report


def _write(name: str, module: nn.Module, path: Path, *, example: tuple[torch.Tensor, torch.Tensor], device: str) -> Path:
    if name == "torchscript":
        return exporter.export_torchscript(module, path, example=example)
    if name == "pt2":
        # AOTInductor compiles for the device the module and inputs are on; the eager reference stays on the CPU.
        on_device = module if device == "cpu" else copy.deepcopy(module).to(device)
        return exporter.export_pt2(on_device, path, example=(example[0].to(device), example[1].to(device)))
    return exporter.export_onnx(module, path, example=example)


def _report(
    request: ExportRequest,
    held_out: HeldOut,
    reference: EagerReference,
    results: dict[str, ParityResult],
    timings: dict[str, float],
) -> dict[str, Any]:
    formats = {}
    for name, result in results.items():
        path = request.out_dir / ARTIFACTS[name]
        formats[name] = {
            "file": ARTIFACTS[name] if path.is_file() else None,
            "bytes": path.stat().st_size if path.is_file() else None,
            "export_seconds": timings.get(name),
            **result.to_json(),
        }
        if name == "pt2" and path.is_file():
            # Where the package can run: its compiled code is for this device and CPU instruction set.
            formats[name]["compiled_for"] = {k.removeprefix("AOTI_").lower(): v for k, v in package_metadata(path).items()}
    return {
        **(request.source or {}),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "signature": {
            "inputs": {
                "dense": ["B", request.spec.num_dense, "float32"],
                "sparse": ["B", request.spec.num_sparse_columns, "int64"],
            },
            "output": {"probability": ["B", "float32"]},
            "onnx_opset": exporter.ONNX_OPSET,
        },
        "held_out": {"records": len(held_out), "source": held_out.source, "eager_auc": reference.auc},
        "tolerances": {"max_abs_diff": TOLERANCE, "auc": AUC_TOLERANCE, "int8_auc_drop": INT8_AUC_BUDGET},
        "parity_batch_sizes": list(request.batch_sizes),
        "parity_device": request.device,
        "formats": formats,
        "versions": versions(),
    }


def versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
    }
