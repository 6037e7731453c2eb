"""DLRM (Naumov et al., 2019), structured like torchrec's ``torchrec/models/dlrm.py``.

Shapes: ``B`` batch, ``N`` dense features, ``F`` sparse features (tables),
``S`` sparse columns (``sum(table_widths)``), ``D`` embedding dim.

::

    dense  [B, N] -> DenseArch (bottom MLP)  -> [B, D]  ----------------+
    sparse [B, S] -> SparseArch (embeddings) -> [B, F, D] -> Interaction -> [B, D + F*(F+1)/2]
                                                             -> OverArch (top MLP) -> [B] logits
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from training.models.layers import (
    MLP,
    EmbeddingTables,
    resolve_widths,
    validate_inputs,
    validate_positive,
    validate_sizes,
)


@dataclass(frozen=True)
class DLRMConfig:
    """``table_widths=()`` means every feature is single-valued.

    ``bottom_mlp`` and ``top_mlp`` list hidden sizes only: the bottom MLP's last
    layer (width ``embedding_dim``) and the top MLP's single output are appended.
    """

    num_dense: int
    table_sizes: tuple[int, ...]
    table_widths: tuple[int, ...] = ()
    embedding_dim: int = 16
    bottom_mlp: tuple[int, ...] = (64, 32)
    top_mlp: tuple[int, ...] = (128, 64)

    def __post_init__(self) -> None:
        validate_inputs(
            "DLRMConfig", num_dense=self.num_dense, table_sizes=self.table_sizes, table_widths=self.table_widths
        )
        validate_positive("DLRMConfig", "embedding_dim", self.embedding_dim)
        validate_sizes("DLRMConfig", "bottom_mlp", self.bottom_mlp)
        validate_sizes("DLRMConfig", "top_mlp", self.top_mlp)

    @classmethod
    def kaggle(cls, *, num_dense: int, table_sizes: tuple[int, ...], table_widths: tuple[int, ...] = ()) -> DLRMConfig:
        """facebookresearch/dlrm's Criteo Kaggle model: D=16, bottom N-512-256-64-16, top 512-256-1."""
        return cls(
            num_dense=num_dense,
            table_sizes=table_sizes,
            table_widths=table_widths,
            embedding_dim=16,
            bottom_mlp=(512, 256, 64),
            top_mlp=(512, 256),
        )


class DenseArch(nn.Module):
    """Bottom MLP: ``[B, N] -> [B, D]`` (ReLU on every layer, as in DLRM)."""

    def __init__(self, num_dense: int, hidden: tuple[int, ...], embedding_dim: int):
        super().__init__()
        self.mlp = MLP(num_dense, (*hidden, embedding_dim), relu_last=True)

    def forward(self, dense: torch.Tensor) -> torch.Tensor:
        return self.mlp(dense)


class SparseArch(nn.Module):
    """One embedding table per feature: ``[B, S] int64 -> [B, F, D]``."""

    def __init__(self, table_sizes: tuple[int, ...], table_widths: tuple[int, ...], embedding_dim: int):
        super().__init__()
        self.embeddings = EmbeddingTables(table_sizes, table_widths, embedding_dim)

    def forward(self, sparse: torch.Tensor) -> torch.Tensor:
        return self.embeddings(sparse)


class InteractionArch(nn.Module):
    """Pairwise dot products of the dense vector and the F embeddings.

    ``([B, D], [B, F, D]) -> [B, D + F*(F+1)/2]``: the dense vector followed by
    the strict upper triangle of the ``(F+1) x (F+1)`` Gram matrix.
    """

    def __init__(self, num_features: int):
        super().__init__()
        vectors = num_features + 1
        rows, cols = torch.triu_indices(vectors, vectors, offset=1)
        self.register_buffer("pair_index", rows * vectors + cols, persistent=False)  # (F*(F+1)/2,)

    @staticmethod
    def output_size(num_features: int, embedding_dim: int) -> int:
        return embedding_dim + num_features * (num_features + 1) // 2

    def forward(self, dense: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor:
        combined = torch.cat([dense.unsqueeze(1), embedded], dim=1)  # (B, F+1, D)
        gram = torch.bmm(combined, combined.transpose(1, 2))  # (B, F+1, F+1)
        # gather, not index_select: its backward (a scatter-add) is several times faster on CPU.
        index = self.pair_index.unsqueeze(0).expand(gram.shape[0], -1)  # (B, F*(F+1)/2)
        pairs = torch.gather(gram.flatten(1), 1, index)  # (B, F*(F+1)/2)
        return torch.cat([dense, pairs], dim=1)


class OverArch(nn.Module):
    """Top MLP: ``[B, D + F*(F+1)/2] -> [B]`` logits (no activation on the output)."""

    def __init__(self, in_features: int, hidden: tuple[int, ...]):
        super().__init__()
        self.mlp = MLP(in_features, (*hidden, 1), relu_last=False)

    def forward(self, interactions: torch.Tensor) -> torch.Tensor:
        return self.mlp(interactions).squeeze(1)


class DLRM(nn.Module):
    """``forward(dense float32[B, N], sparse int64[B, S]) -> logits float32[B]``."""

    def __init__(self, config: DLRMConfig):
        super().__init__()
        self.config = config
        widths = resolve_widths(config.table_sizes, config.table_widths)
        num_features = len(config.table_sizes)
        self.dense_arch = DenseArch(config.num_dense, config.bottom_mlp, config.embedding_dim)
        self.sparse_arch = SparseArch(config.table_sizes, widths, config.embedding_dim)
        self.interaction_arch = InteractionArch(num_features)
        self.over_arch = OverArch(InteractionArch.output_size(num_features, config.embedding_dim), config.top_mlp)

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        dense_vector = self.dense_arch(dense)  # (B, D)
        embedded = self.sparse_arch(sparse)  # (B, F, D)
        interactions = self.interaction_arch(dense_vector, embedded)  # (B, D + F*(F+1)/2)
        return self.over_arch(interactions)  # (B,)

    def feature_embeddings(self) -> EmbeddingTables:
        """The per-feature tables (``[table_sizes[i], D]`` each) that warm start loads."""
        return self.sparse_arch.embeddings
