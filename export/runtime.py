"""ONNX Runtime sessions configured for serving: one place for the options.

The export parity check, the benchmark and (through their own copy) the
TorchServe handlers build sessions with :func:`make_session`, so what is
benchmarked is what is served. Depends on onnxruntime only.

Defaults were chosen by measurement (``python -m export.benchmark
--ort-options``; figures in the export report and docs/benchmarks.md):

* graph optimization ``all``: constant folding plus Gemm/activation fusion
  and the CPU layout transforms.
* intra-op threads set explicitly, one inter-op thread, sequential
  execution: a recommender graph is a chain of small ops, so parallel
  execution of branches only adds scheduling cost, and TorchServe runs one
  session per worker, so threads are a per-worker budget.
* memory arena and memory pattern on: batch shapes repeat in serving, and
  the planned buffers save an allocation per op per call.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Literal

import onnxruntime as ort

GraphOptimization = Literal["disable", "basic", "extended", "all"]

_GRAPH_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def default_providers() -> list[str]:
    """The CUDA execution provider when this onnxruntime build has it, else the CPU."""
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def make_session(
    path: str | os.PathLike[str],
    *,
    threads: int,
    providers: Sequence[str] | None = None,
    graph_optimization: GraphOptimization = "all",
    memory_arena: bool = True,
    memory_pattern: bool = True,
    spinning: bool = True,
    profile_prefix: str | None = None,
) -> ort.InferenceSession:
    """An inference session for ``path`` with ``threads`` intra-op threads.

    ``spinning`` keeps idle pool threads busy-waiting between ops, which
    saves a wake-up per op at small batches but burns a core while idle:
    TorchServe workers that share cores may want it off.
    ``profile_prefix`` turns on ONNX Runtime's JSON profiler (for finding
    where the time goes; ``session.end_profiling()`` writes the file).
    """
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if graph_optimization not in _GRAPH_LEVELS:
        raise ValueError(
            f"graph_optimization must be one of {', '.join(_GRAPH_LEVELS)}, got {graph_optimization!r}"
        )
    options = ort.SessionOptions()
    options.graph_optimization_level = _GRAPH_LEVELS[graph_optimization]
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.enable_cpu_mem_arena = memory_arena
    options.enable_mem_pattern = memory_pattern
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return ort.InferenceSession(
        os.fspath(path), sess_options=options, providers=list(providers or default_providers())
    )
