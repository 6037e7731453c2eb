"""What a TorchServe worker sets before it loads a model: the device, the intra-op threads, float32 matmul precision.

Both handlers (:mod:`handlers.recommender_handler`, :mod:`handlers.recommend_handler`)
start here, so a setting of the ``handler:`` section of ``model-config.yaml``
means the same in every archive.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

DEFAULT_THREADS = 1  # one worker per core on a small box; raise it with handler.threads
# torch.set_float32_matmul_precision: "highest" is IEEE float32, as the model was trained and exported;
# "high" and "medium" let matmuls use TF32 or bfloat16 on GPUs that have them (faster, about 1e-4 off).
MATMUL_PRECISIONS = ("highest", "high", "medium")
DEFAULT_MATMUL_PRECISION = "highest"


def check_matmul_precision(precision: Any, *, setting: str) -> None:
    """``ValueError`` naming ``setting`` unless ``precision`` is one of :data:`MATMUL_PRECISIONS`."""
    if precision not in MATMUL_PRECISIONS:
        raise ValueError(f"{setting} must be one of {', '.join(MATMUL_PRECISIONS)}, got {precision!r}")


@dataclass(frozen=True)
class Worker:
    device: str  # "cuda:N" when TorchServe gave the worker a GPU (and CUDA is there), else "cpu"
    threads: int
    settings: Mapping[str, Any]  # the handler: section of model-config.yaml


def set_up_worker(context: Any) -> Worker:
    """The worker's device and settings from TorchServe's ``context``; sets torch's threads and matmul precision.

    TorchServe 0.12's ``base_handler`` module, when imported on a GPU of
    compute capability 8.0 or newer, sets ``torch.set_float32_matmul_precision("high")``
    for the whole worker: TF32 matmuls, scores about 1e-4 from the exported
    model's. The precision is set back to ``handler.float32_matmul_precision``
    (default ``highest``) here, after that import.
    """
    gpu_id = context.system_properties.get("gpu_id")
    device = f"cuda:{gpu_id}" if gpu_id is not None and torch.cuda.is_available() else "cpu"
    settings = (getattr(context, "model_yaml_config", None) or {}).get("handler") or {}
    threads = int(settings.get("threads", DEFAULT_THREADS))
    precision = settings.get("float32_matmul_precision", DEFAULT_MATMUL_PRECISION)
    check_matmul_precision(precision, setting="handler.float32_matmul_precision")
    torch.set_num_threads(threads)
    torch.set_float32_matmul_precision(precision)
    return Worker(device=device, threads=threads, settings=settings)
