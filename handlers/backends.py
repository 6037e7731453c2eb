"""Inference backends of the recommender handler, chosen by the archived artifact.

``model.ts.pt`` runs with TorchScript, ``model.onnx`` with ONNX Runtime. Both
take ``dense float32[B, D]`` and ``sparse int64[B, S]`` numpy arrays and
return probabilities ``float32[B]`` as numpy, so the handler never branches
on the backend.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

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
    def __init__(self, path: str | os.PathLike[str], *, device: str, threads: int):
        import onnxruntime  # only archives holding an ONNX model need it

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        providers: list = ["CPUExecutionProvider"]
        if device.startswith("cuda") and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            device_id = int(device.partition(":")[2] or 0)
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device_id}))
        else:
            device = "cpu"
        self.device = device
        self._session = onnxruntime.InferenceSession(os.fspath(path), options, providers=providers)
        self._output = self._session.get_outputs()[0].name

    def predict(self, dense: np.ndarray, sparse: np.ndarray) -> np.ndarray:
        (probabilities,) = self._session.run([self._output], {"dense": dense, "sparse": sparse})
        return np.asarray(probabilities, np.float32).reshape(-1)


def load_backend(path: str | os.PathLike[str], *, device: str, threads: int) -> Backend:
    """The backend for an artifact, by its file name."""
    name = Path(path).name
    if name.endswith(".onnx"):
        return OnnxBackend(path, device=device, threads=threads)
    if name.endswith(".pt"):
        return TorchScriptBackend(path, device=device, threads=threads)
    raise ValueError(f"{path}: unknown model artifact (expected {TORCHSCRIPT_FILE} or {ONNX_FILE})")
