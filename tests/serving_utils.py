"""Test fixtures for serving: tiny export dirs and sample records.

Server control (start, wait, call, stop) lives in :mod:`loadtest.torchserve`;
it is re-exported here so the tests read ``serving_utils.running_torchserve``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from loadtest.torchserve import (  # noqa: F401 (re-exported for the tests)
    KEY_FILE,
    METRICS_CONFIG,
    REPO_ROOT,
    Response,
    Server,
    ServerError,
    free_port,
    read_keys,
    read_properties,
    running_torchserve,
    stop,
    wait_until_ready,
    write_test_config,
)

# --------------------------------------------------------------------------
# Tiny export dirs for the serving tests
# --------------------------------------------------------------------------


@dataclass
class TinyExport:
    """An export dir (``model.ts.pt``, ``model.onnx``, ``features.json``) and its eager model."""

    path: Path
    spec: Any  # featurespec.FeatureSpec
    model: Any  # export.serving.ServingModule: (dense, sparse) -> probability

    def eager_scores(self, records: Sequence[Mapping[str, Any]], *, context: Mapping[str, Any] | None = None) -> list[float]:
        import torch

        dense, sparse = self.spec.encode_records(records, base=context)
        with torch.inference_mode():
            return self.model(torch.from_numpy(dense), torch.from_numpy(sparse)).tolist()


def sample_records(count: int, *, seed: int = 0) -> list[dict[str, Any]]:
    """Records in the request JSON: dense I1, I2; categorical C1 (vocab), C2 (hashed), C3 (multi-valued)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    records = []
    for _ in range(count):
        record: dict[str, Any] = {
            "I1": int(rng.integers(0, 50)),
            "I2": round(float(rng.normal(2.0, 1.5)), 3),
            "C1": f"c1_{int(rng.integers(0, 12))}",
            "C2": f"{int(rng.integers(0, 10**6)):08x}",
            "C3": [f"t{int(value)}" for value in rng.integers(0, 9, size=int(rng.integers(0, 4)))],
        }
        if rng.random() < 0.2:
            del record["I2"]  # absent means missing, as in training
        records.append(record)
    return records


def make_tiny_export(out: Path, *, model_name: Literal["dlrm", "widedeep"] = "dlrm", seed: int = 0) -> TinyExport:
    """Fit a FeatureSpec on generated rows, build a tiny model, export it as the real exporter does."""
    import torch

    from export.exporter import export_onnx, export_torchscript
    from export.serving import ServingModule, example_inputs
    from training.fitting import SchemaField, SparseOptions, fit_spec
    from training.models import build_model
    from training.models.dlrm import DLRMConfig
    from training.models.wide_deep import WideDeepConfig

    rows = sample_records(200, seed=seed + 1)
    columns = {
        "I1": [r.get("I1") for r in rows],
        "I2": [float("nan") if r.get("I2") is None else r["I2"] for r in rows],
        "C1": [r["C1"] for r in rows],
        "C2": [r["C2"] for r in rows],
        "C3": [r["C3"] for r in rows],
    }
    schema = [
        SchemaField("I1", dense=True),
        SchemaField("I2", dense=True, transform="standard"),
        SchemaField("C1", dense=False, options=SparseOptions(min_count=2)),
        SchemaField("C2", dense=False, options=SparseOptions(kind="hash", hash_buckets=64)),
        SchemaField("C3", dense=False, options=SparseOptions(min_count=1, multi_valued=True, max_values=3)),
    ]
    spec = fit_spec(schema, [columns])
    sizes = dict(num_dense=spec.num_dense, table_sizes=spec.table_sizes, table_widths=spec.table_widths)
    if model_name == "dlrm":
        config = DLRMConfig(**sizes, embedding_dim=8, bottom_mlp=(8,), top_mlp=(8,))
    else:
        config = WideDeepConfig(**sizes, embedding_dim=8, deep_mlp=(8,), cross_buckets=97)
    torch.manual_seed(seed)
    model = build_model(model_name, config)
    module = ServingModule(model).eval()
    out.mkdir(parents=True, exist_ok=True)
    example = example_inputs(spec.num_dense, spec.num_sparse_columns)
    export_torchscript(module, out / "model.ts.pt", example=example)
    export_onnx(module, out / "model.onnx", example=example)
    spec.save(out / "features.json")
    return TinyExport(out, spec, module)
