"""The serving module: a trained model plus its sigmoid.

Every model returns logits (the loss lives in the training wrapper); what a
server returns is a probability. Exporting this wrapper puts the sigmoid in
the TorchScript and ONNX graphs, so handlers and clients never apply it
themselves and every backend answers the same question.
"""

from __future__ import annotations

import torch
from torch import nn


class ServingModule(nn.Module):
    """``(dense float32[B, D], sparse int64[B, S]) -> probability float32[B]``.

    ``B`` is dynamic in every exported format: batch 1 and batch 10,000 run
    through the same artifact.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model(dense, sparse))  # (B,)


def example_inputs(num_dense: int, num_sparse: int, *, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs for tracing/export: all-zero sparse ids are valid for every table (index 0)."""
    return torch.zeros(batch, num_dense, dtype=torch.float32), torch.zeros(batch, num_sparse, dtype=torch.int64)
