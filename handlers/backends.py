"""Inference backends of the recommender handler, chosen by the archived artifact.

``model.ts.pt`` runs with TorchScript, ``model.onnx`` with ONNX Runtime,
``model.pt2`` (an AOTInductor package) with its own compiled kernels. All
take ``dense float32[B, D]`` and ``sparse int64[B, S]`` numpy arrays and
return probabilities ``float32[B]`` as numpy, so the handler never branches
on the backend. ONNX Runtime's session options are set in one place,
:func:`make_session`, which export's parity check and benchmark use too.
"""

from __future__ import annotations

import json
import os
import platform
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch

GraphOptimization = Literal["disable", "basic", "extended", "all"]
Runtime = Literal["torchscript", "onnx", "pt2"]
TORCHSCRIPT_FILE = "model.ts.pt"
ONNX_FILE = "model.onnx"
PT2_FILE = "model.pt2"
# The /proc/cpuinfo flags a host needs for each CPU instruction set an AOTInductor package
# names (AOTI_CPU_ISA), from the compiler flags torch._inductor.cpu_vec_isa compiles it with.
_ISA_FLAGS = {
    "AVX2": {"avx2", "fma", "f16c"},
    "AVX512": {"avx512f", "avx512dq", "avx512vl", "avx512bw", "fma"},
    "AVX512_VNNI": {"avx512_vnni"},
    "AMX_TILE": {"amx_tile", "amx_bf16", "amx_int8"},
}


class Backend(Protocol):
    device: str

    def predict(self, dense: np.ndarray, sparse: np.ndarray) -> np.ndarray:
        """``(float32[B, D], int64[B, S])`` -> probabilities ``float32[B]``."""
        ...


def run_torch_model(model: Any, device: torch.device, dense: np.ndarray, sparse: np.ndarray) -> np.ndarray:
    """A PyTorch serving module (TorchScript or AOTInductor) on ``device``: probabilities ``float32[B]`` on the CPU."""
    dense_tensor, sparse_tensor = torch.from_numpy(dense), torch.from_numpy(sparse)
    if device.type == "cuda":
        # Pinned pages let the copy run asynchronously on the stream.
        dense_tensor = dense_tensor.pin_memory().to(device, non_blocking=True)
        sparse_tensor = sparse_tensor.pin_memory().to(device, non_blocking=True)
    with torch.inference_mode():
        probabilities = model(dense_tensor, sparse_tensor)
    return probabilities.reshape(-1).float().cpu().numpy()


class TorchScriptBackend:
    def __init__(self, path: str | os.PathLike[str], *, device: str, threads: int):
        torch.set_num_threads(threads)  # per process: each worker is its own process
        self.device = device
        self._device = torch.device(device)
        self._model = torch.jit.load(os.fspath(path), map_location=self._device).eval()

    def predict(self, dense: np.ndarray, sparse: np.ndarray) -> np.ndarray:
        return run_torch_model(self._model, self._device, dense, sparse)


# On the CPU a batch of more rows than this runs as equal slices of at most this many, one session run each.
# The kaggle preset's DLRM, 2 threads, the two ways alternating in blocks of calls: slices of 2,048 ran
# 1.03-1.07x (fp32) and 1.13x (INT8) faster than one run at 4,096 rows, 1.15-1.17x and 1.39x at 8,192;
# the demo's DLRM 1.04x / 1.07x at 4,096. Timed call by call in turn with other slice sizes, one run at
# 4,096 lost more (1.11x / 1.30x); slices of 1,024 gained no more, and of 256 lost (0.98x / 0.89x).
CPU_MAX_ROWS_PER_RUN = 2048


class OnnxBackend:
    """An ONNX Runtime session; on the CPU, batches above ``max_rows_per_run`` rows run in equal slices
    (None: every batch in one run). The CUDA provider always takes the whole batch."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        device: str,
        threads: int,
        max_rows_per_run: int | None = CPU_MAX_ROWS_PER_RUN,
        **session_options: Any,
    ):
        if max_rows_per_run is not None and max_rows_per_run < 1:
            raise ValueError(f"max_rows_per_run must be >= 1 (or None), got {max_rows_per_run}")
        import onnxruntime  # only archives holding an ONNX model need it

        providers: list = ["CPUExecutionProvider"]
        if device.startswith("cuda") and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            device_id = int(device.partition(":")[2] or 0)
            # use_tf32 0: IEEE float32 matmuls, as the model was exported (the CUDA provider's default is TF32).
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device_id, "use_tf32": "0"}))
        self.session = make_session(path, threads=threads, providers=providers, **session_options)
        # The CUDA provider can still fail to load (a missing CUDA library): ONNX Runtime then runs on the CPU.
        self.device = device if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        self.max_rows_per_run = max_rows_per_run if self.device == "cpu" else None
        self._output = self.session.get_outputs()[0].name

    def predict(self, dense: np.ndarray, sparse: np.ndarray) -> np.ndarray:
        rows, limit = len(dense), self.max_rows_per_run
        if limit is None or rows <= limit:
            return self._run(dense, sparse)
        bounds = np.linspace(0, rows, -(-rows // limit) + 1).astype(np.int64).tolist()
        probabilities = np.empty(rows, np.float32)
        for start, end in zip(bounds[:-1], bounds[1:]):  # row slices of C-contiguous arrays: no copy
            probabilities[start:end] = self._run(dense[start:end], sparse[start:end])
        return probabilities

    def _run(self, dense: np.ndarray, sparse: np.ndarray) -> np.ndarray:
        (probabilities,) = self.session.run([self._output], {"dense": dense, "sparse": sparse})
        return np.asarray(probabilities, np.float32).reshape(-1)


class Pt2Backend:
    """An AOTInductor package (``torch._inductor.aoti_compile_and_package``).

    The package holds a shared library compiled for one device type and, on
    CPU, one instruction set: it runs where it was compiled. A CPU package
    serves on the CPU even when TorchServe assigns a GPU (as ONNX Runtime
    falls back to its CPU provider); a CUDA package needs a GPU. A package
    compiled for instructions this CPU lacks is refused at load, with both
    named, rather than killing the worker with an illegal instruction.
    """

    def __init__(self, path: str | os.PathLike[str], *, device: str, threads: int):
        torch.set_num_threads(threads)  # the compiled kernels' OpenMP threads: one budget per worker
        from torch._inductor import aoti_load_package

        requested = torch.device(device)
        metadata = package_metadata(path)
        compiled_for = metadata.get("AOTI_DEVICE_KEY", "cpu")
        if compiled_for == "cpu":
            check_cpu_instructions(metadata.get("AOTI_CPU_ISA", ""), package=path)
            self._device = torch.device("cpu")
        elif compiled_for == "cuda" and requested.type == "cuda":
            capability = torch.cuda.get_device_capability(requested)
            check_compute_capability(metadata.get("AOTI_COMPUTE_CAPABILITY", ""), capability, package=path)
            self._device = requested
        else:
            raise ValueError(f"{path}: compiled for {compiled_for}, cannot run on {device}")
        self.device = str(self._device)
        index = self._device.index if self._device.index is not None else -1
        self._model = aoti_load_package(os.fspath(path), device_index=index)

    def predict(self, dense: np.ndarray, sparse: np.ndarray) -> np.ndarray:
        return run_torch_model(self._model, self._device, dense, sparse)


def package_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The ``AOTI_*`` metadata of a ``.pt2`` package (device, CPU instruction set, platform), read without loading it."""
    with zipfile.ZipFile(path) as package:
        names = [name for name in package.namelist() if "/aotinductor/" in name and name.endswith("wrapper_metadata.json")]
        if not names:
            raise ValueError(f"{path}: not an AOTInductor package (no aotinductor metadata inside)")
        return json.loads(package.read(names[0]))


def check_cpu_instructions(compiled_isa: str, *, package: str | os.PathLike[str]) -> None:
    """Raise ``ValueError`` naming what this CPU lacks of a package's instruction set (``AOTI_CPU_ISA``).

    Only x86 sets are checked (from ``/proc/cpuinfo``); elsewhere, or when
    the flags cannot be read, the package is trusted.
    """
    needed = set().union(*(_ISA_FLAGS.get(isa, set()) for isa in compiled_isa.split()))
    if not needed or platform.machine() not in ("x86_64", "AMD64"):
        return
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            flags = next((line.split(":", 1)[1].split() for line in handle if line.startswith("flags")), None)
    except OSError:
        return
    if flags is None:
        return
    lacking = sorted(needed - set(flags))
    if lacking:
        raise ValueError(
            f"{package}: compiled for {compiled_isa}, but this CPU lacks {', '.join(lacking)}; "
            "export the .pt2 on a machine like the serving hosts (or serve model.onnx / model.ts.pt)"
        )


def check_compute_capability(compiled: str, available: tuple[int, int], *, package: str | os.PathLike[str]) -> None:
    """Raise ``ValueError`` when a GPU of compute capability ``available`` cannot run a package's
    kernels, compiled for ``compiled`` (``AOTI_COMPUTE_CAPABILITY``, for example ``"90"``).

    AOTInductor packages machine code for the export GPU's architecture, which
    runs on GPUs of the same major version and the same or a higher minor one.
    An unreadable value is trusted.
    """
    if not compiled.isdigit() or len(compiled) < 2:
        return
    major, minor = int(compiled[:-1]), int(compiled[-1])
    if available[0] != major or available[1] < minor:
        raise ValueError(
            f"{package}: compiled for GPUs of compute capability {major}.{minor}, but this GPU's is "
            f"{available[0]}.{available[1]}; export the .pt2 on a GPU like the serving ones (or serve model.onnx / model.ts.pt)"
        )


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
    Runtime, ``.pt``: TorchScript, ``.pt2``: AOTInductor); ``session_options``
    go to :class:`OnnxBackend` (``max_rows_per_run``) and :func:`make_session`.
    """
    if runtime is None:
        suffixes = {".onnx": "onnx", ".pt": "torchscript", ".pt2": "pt2"}
        runtime = suffixes.get(Path(path).suffix)
        if runtime is None:
            raise ValueError(f"{path}: unknown model artifact (expected {TORCHSCRIPT_FILE}, {ONNX_FILE} or {PT2_FILE})")
    if runtime == "onnx":
        return OnnxBackend(path, device=device, threads=threads, **session_options)
    if runtime == "torchscript":
        return TorchScriptBackend(path, device=device, threads=threads)
    if runtime == "pt2":
        return Pt2Backend(path, device=device, threads=threads)
    raise ValueError(f"runtime must be 'torchscript', 'onnx' or 'pt2', got {runtime!r}")
