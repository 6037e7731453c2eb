"""The wide-only logistic baseline that DLRM and Wide & Deep must beat.

Shapes: ``B`` batch, ``N`` dense features, ``F`` sparse features, ``S``
sparse columns (``sum(table_widths)``).

``logit = bias + w_dense . dense + sum_f w_f[id_f]``: one weight per
categorical id (multi-valued features: the mean weight of their ids), a
linear term on the dense features, no crosses, no hidden layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from training.models.layers import EmbeddingTables, WideLinear, resolve_widths, validate_inputs


@dataclass(frozen=True)
class LogisticConfig:
    """``table_widths=()`` means every feature is single-valued."""

    num_dense: int
    table_sizes: tuple[int, ...]
    table_widths: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        validate_inputs(
            "LogisticConfig", num_dense=self.num_dense, table_sizes=self.table_sizes, table_widths=self.table_widths
        )


class LogisticRegression(nn.Module):
    """``forward(dense float32[B, N], sparse int64[B, S]) -> logits float32[B]``."""

    def __init__(self, config: LogisticConfig):
        super().__init__()
        self.config = config
        widths = resolve_widths(config.table_sizes, config.table_widths)
        self.linear = WideLinear(config.num_dense, config.table_sizes, widths)

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        return self.linear(dense, sparse)  # (B,)

    def feature_embeddings(self) -> EmbeddingTables:
        """The per-id weights, one ``[table_sizes[i], 1]`` table per feature."""
        return self.linear.id_weights
