"""Backends: one way to call every runtime, ``(dense, sparse) -> probability``.

The parity check and the benchmark drive eager PyTorch, TorchScript, ONNX
Runtime and AOTInductor packages through the same
:data:`export.parity.Predictor` signature, so a number in the benchmark
table and a figure in the parity report mean the same call. The exported runtimes are the TorchServe handler's own backends
(``handlers/backends.py``): what is checked and timed is what is served.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from export.parity import Predictor
from handlers.backends import Runtime, load_backend

BackendName = Literal["eager", "torchscript", "onnx", "onnx-int8", "pt2"]
BACKENDS: tuple[str, ...] = ("eager", "torchscript", "onnx", "onnx-int8", "pt2")
ARTIFACTS = {"torchscript": "model.ts.pt", "onnx": "model.onnx", "onnx-int8": "model.int8.onnx", "pt2": "model.pt2"}
RUNTIMES: dict[str, Runtime] = {"torchscript": "torchscript", "onnx": "onnx", "onnx-int8": "onnx", "pt2": "pt2"}  # artifact -> runtime


def predictor_device(predictor: Predictor, default: str) -> str:
    """Where a loaded backend runs: ONNX Runtime without its CUDA provider, or a CPU-compiled .pt2, stays on the CPU."""
    return str(getattr(getattr(predictor, "__self__", None), "device", default))


def backend_label(backend: str, runs_on: str, machine_device: str) -> str:
    """A table's backend name, with where it ran when the run asked for a GPU."""
    return backend if machine_device == "cpu" else f"{backend} ({runs_on})"


def torch_predictor(module: nn.Module | torch.jit.ScriptModule, *, device: str = "cpu") -> Predictor:
    """Eager or TorchScript module; inputs are copied to ``device``, outputs back to numpy."""
    target = torch.device(device)
    module = module.to(target)

    def predict(dense: np.ndarray, sparse: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            dense_t = torch.from_numpy(dense).to(target, non_blocking=True)
            sparse_t = torch.from_numpy(sparse).to(target, non_blocking=True)
            return module(dense_t, sparse_t).cpu().numpy()

    return predict


def artifact_predictor(
    backend: str, path: str | os.PathLike[str], *, threads: int, device: str = "cpu", **session_options: Any
) -> Predictor:
    """The handler's own backend for an artifact file of ``backend``, whatever the file is named
    (``session_options``: see :func:`handlers.backends.load_backend`)."""
    return load_backend(path, runtime=RUNTIMES[backend], device=device, threads=threads, **session_options).predict


def load_predictor(
    backend: str,
    export_dir: str | os.PathLike[str],
    *,
    threads: int,
    device: str = "cpu",
    eager_module: nn.Module | None = None,
    **session_options: Any,
) -> Predictor:
    """The predictor for ``backend`` from an export dir (eager needs ``eager_module``)."""
    if backend == "eager":
        if eager_module is None:
            raise ValueError("the eager backend needs the model itself (pass eager_module)")
        return torch_predictor(eager_module, device=device)
    if backend not in ARTIFACTS:
        raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    path = Path(export_dir) / ARTIFACTS[backend]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (was {backend} exported to {export_dir}?)")
    return artifact_predictor(backend, path, threads=threads, device=device, **session_options)
