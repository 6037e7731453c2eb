"""Inference backends of the recommender handler, chosen by the archived artifact.

``model.ts.pt`` runs with TorchScript, ``model.onnx`` with ONNX Runtime. Both
take ``dense float32[B, D]`` and ``sparse int64[B, S]`` numpy arrays and
return probabilities ``float32[B]`` as numpy, so the handler never branches
on the backend. ONNX Runtime's session options are set in one place,
:func:`make_session`, which export's parity check and benchmark use too.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch

GraphOptimization = Literal["disable", "basic", "extended", "all"]
Runtime = Literal["torchscript", "onnx"]
TORCHSCRIPT_FILE = "model.ts.pt"
ONNX_FILE = "model.onnx"


class Backend(Protocol):
    device: str

    def predict(self, dense: np.ndarray, sparse: np.ndarray) -> np.ndarray:
        """``(float32[B, D], int64[B, S])`` -> probabilities ``float32[B]``."""
        ...


class TorchScriptBackend:
    def __init__(self, path: str | os.PathLike[str], *, device: str, threads: int):
        torch.set_num_threads(threads)  # per process: each worker is its own process
        self.device = device
        self._device = torch.device(device)
        self._model = torch.jit.load(os.fspath(path), map_location=self._device).eval()

    def predict(self, dense: np.ndarray, sparse: np.ndarray) -> np.ndarray:
        dense_tensor, sparse_tensor = torch.from_numpy(dense), torch.from_numpy(sparse)
        if self._device.type == "cuda":
            # Pinned pages let the copy run asynchronously on the stream.
            dense_tensor = dense_tensor.pin_memory().to(self._device, non_blocking=True)
            sparse_tensor = sparse_tensor.pin_memory().to(self._device, non_blocking=True)
        with torch.inference_mode():
            probabilities = self._model(dense_tensor, sparse_tensor)
        return probabilities.reshape(-1).float().cpu().numpy()


class OnnxBackend:
    def __init__(self, path: str | os.PathLike[str], *, device: str, threads: int, **session_options: Any):
        import onnxruntime  # only archives holding an ONNX model need it

        providers: list = ["CPUExecutionProvider"]
        if device.startswith("cuda") and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            device_id = int(device.partition(":")[2] or 0)
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device_id}))
        else:
            device = "cpu"
        self.device = device
        self.session = make_session(path, threads=threads, providers=providers, **session_options)
        self._output = self.session.get_outputs()[0].name

    def predict(self, dense: np.ndarray, sparse: np.ndarray) -> np.ndarray:
        (probabilities,) = self.session.run([self._output], {"dense": dense, "sparse": sparse})
        return np.asarray(probabilities, np.float32).reshape(-1)


def make_session(
    path: str | os.PathLike[str],
    *,
    threads: int,
    providers: Sequence[Any] = ("CPUExecutionProvider",),
    graph_optimization: GraphOptimization = "all",
    memory_arena: bool = True,
    memory_pattern: bool = True,
    spinning: bool = True,
    profile_prefix: str | None = None,
) -> Any:
    """An ONNX Runtime session for ``path`` with ``threads`` intra-op threads.

    The one place session options are set: the handler serves with it, and
    export's parity check and benchmark score with it, so what is measured
    is what is served. The defaults were chosen by measurement
    (``python -m benchmarks.runtimes --ort-options``, docs/benchmarks.md):

    * graph optimization ``all``: constant folding plus Gemm/activation
      fusion and the CPU layout transforms (1.3-1.5x at batch 4096 over
      ``basic``/``disable``).
    * intra-op threads set explicitly, one inter-op thread, sequential
      execution: a recommender graph is a chain of small ops, so running
      branches in parallel only adds scheduling, and TorchServe runs one
      session per worker, so threads are a per-worker budget.
    * memory arena and memory pattern on: batch shapes repeat in serving,
      and the planned buffers save an allocation per op per call.
    * ``spinning``: idle pool threads busy-wait between ops, which halves
      batch-1 latency but burns a core while idle; workers that share cores
      may want it off.

    ``profile_prefix`` turns on ONNX Runtime's JSON profiler
    (``session.end_profiling()`` writes the file).
    """
    import onnxruntime as ort

    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if graph_optimization not in levels:
        raise ValueError(f"graph_optimization must be one of {', '.join(levels)}, got {graph_optimization!r}")
    options = ort.SessionOptions()
    options.graph_optimization_level = levels[graph_optimization]
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.enable_cpu_mem_arena = memory_arena
    options.enable_mem_pattern = memory_pattern
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return ort.InferenceSession(os.fspath(path), sess_options=options, providers=list(providers))


def load_backend(
    path: str | os.PathLike[str],
    *,
    device: str,
    threads: int,
    runtime: Runtime | None = None,
    **session_options: Any,
) -> Backend:
    """The backend for an exported artifact: the one way every part of the bundle loads one.

    ``runtime`` defaults to the one the file name says (``.onnx``: ONNX
    Runtime, ``.pt``: TorchScript); ``session_options`` go to :func:`make_session`.
    """
    if runtime is None:
        name = Path(path).name
        runtime = "onnx" if name.endswith(".onnx") else "torchscript" if name.endswith(".pt") else None
        if runtime is None:
            raise ValueError(f"{path}: unknown model artifact (expected {TORCHSCRIPT_FILE} or {ONNX_FILE})")
    if runtime == "onnx":
        return OnnxBackend(path, device=device, threads=threads, **session_options)
    if runtime == "torchscript":
        return TorchScriptBackend(path, device=device, threads=threads)
    raise ValueError(f"runtime must be 'torchscript' or 'onnx', got {runtime!r}")
