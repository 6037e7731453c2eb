"""A plain PyTorch DLRM: the yardstick that ``benchmarks.training`` times beside ours.

It is built the way DLRM's reference code builds it: one ``nn.EmbeddingBag``
(sum, sparse gradients, one id per row) per table, looked up in a Python loop
over the tables; ``nn.Sequential`` MLPs; the dot interaction as a batched
matmul and an index; one ``torch.optim.SGD`` over all parameters and
BCE-with-logits. Its architecture is :class:`training.models.DLRM`'s for the
same single-valued :class:`DLRMConfig` (same layers, same interaction pairs in
the same order), so only how each is built and trained differs, and that is
what the benchmark measures.

Shapes: ``B`` batch, ``N`` dense features, ``F`` tables, ``D`` embedding dim.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional

from training.models import DLRMConfig

REFERENCE_NAME = "plain PyTorch DLRM (per-table nn.EmbeddingBag, torch.optim.SGD)"


def plain_mlp(in_features: int, sizes: Sequence[int], *, relu_last: bool) -> nn.Sequential:
    """Linear layers with ReLU between them (and after the last when ``relu_last``), DLRM's initialisation."""
    layers: list[nn.Module] = []
    widths = [in_features, *sizes]
    for index, (fan_in, fan_out) in enumerate(itertools.pairwise(widths)):
        linear = nn.Linear(fan_in, fan_out)
        nn.init.normal_(linear.weight, 0.0, math.sqrt(2.0 / (fan_in + fan_out)))
        nn.init.normal_(linear.bias, 0.0, math.sqrt(1.0 / fan_out))
        layers.append(linear)
        if relu_last or index < len(sizes) - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class PlainDLRM(nn.Module):
    """``forward(dense float32[B, N], sparse int64[B, F]) -> logits float32[B]``."""

    def __init__(self, config: DLRMConfig):
        super().__init__()
        if any(width != 1 for width in config.table_widths):
            raise ValueError(f"PlainDLRM: every feature must be single-valued, got table_widths={config.table_widths}")
        num_tables, dim = len(config.table_sizes), config.embedding_dim
        self.bottom_mlp = plain_mlp(config.num_dense, (*config.bottom_mlp, dim), relu_last=True)
        self.tables = nn.ModuleList(nn.EmbeddingBag(rows, dim, mode="sum", sparse=True) for rows in config.table_sizes)
        with torch.no_grad():
            for table, rows in zip(self.tables, config.table_sizes):
                bound = math.sqrt(1.0 / rows)
                table.weight.uniform_(-bound, bound)
        vectors = num_tables + 1
        pair_rows, pair_cols = torch.triu_indices(vectors, vectors, offset=1)
        self.register_buffer("pair_rows", pair_rows, persistent=False)  # (F*(F+1)/2,)
        self.register_buffer("pair_cols", pair_cols, persistent=False)  # (F*(F+1)/2,)
        self.top_mlp = plain_mlp(dim + len(pair_rows), (*config.top_mlp, 1), relu_last=False)

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        dense_vector = self.bottom_mlp(dense)  # (B, D)
        embedded = [table(sparse[:, index : index + 1]) for index, table in enumerate(self.tables)]  # F x (B, D)
        combined = torch.stack([dense_vector, *embedded], dim=1)  # (B, F+1, D)
        gram = torch.bmm(combined, combined.transpose(1, 2))  # (B, F+1, F+1)
        pairs = gram[:, self.pair_rows, self.pair_cols]  # (B, F*(F+1)/2)
        return self.top_mlp(torch.cat([dense_vector, pairs], dim=1)).squeeze(1)  # (B,)


def plain_sgd(model: nn.Module, *, lr: float) -> torch.optim.SGD:
    """One SGD over every parameter, dense MLP weights and sparse table rows alike."""
    return torch.optim.SGD(model.parameters(), lr=lr)


def plain_train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, dense: torch.Tensor, sparse: torch.Tensor, labels: torch.Tensor
) -> float:
    """One step of mean BCE-with-logits; returns the loss (read back as ours is, so both pay the same sync)."""
    optimizer.zero_grad()
    loss = functional.binary_cross_entropy_with_logits(model(dense, sparse), labels)
    loss.backward()
    optimizer.step()
    return float(loss.detach())
