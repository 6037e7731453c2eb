"""DLRM (Naumov et al., 2019), structured like torchrec's ``torchrec/models/dlrm.py``.

Shapes: ``B`` batch, ``N`` dense features, ``F`` sparse features (tables),
``S`` sparse columns (``sum(table_widths)``), ``D`` embedding dim.

::

    dense  [B, N] -> DenseArch (bottom MLP)  -> [B, D]  ----------------+
    sparse [B, S] -> SparseArch (embeddings) -> [B, F, D] -> Interaction -> [B, I]
                                                             -> OverArch (top MLP) -> [B] logits

The interaction is DLRM's pairwise dot products (``I = D + F*(F+1)/2``) or a
DCN-v2 cross network (Wang et al., 2021) over the concatenated vectors
(``I = (F+1)*D``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from training.models.layers import (
    MLP,
    EmbeddingTables,
    resolve_widths,
    validate_attention,
    validate_dropout,
    validate_inputs,
    validate_positive,
    validate_sizes,
)

Interaction = Literal["dot", "dcn"]
INTERACTIONS: tuple[str, ...] = ("dot", "dcn")


@dataclass(frozen=True)
class DLRMConfig:
    """``table_widths=()`` means every feature is single-valued.

    ``bottom_mlp`` and ``top_mlp`` list hidden sizes only: the bottom MLP's last
    layer (width ``embedding_dim``) and the top MLP's single output are appended.
    ``interaction="dcn"`` replaces the dot products with ``cross_layers`` DCN-v2
    cross layers, full rank or, with ``cross_rank``, factored to that rank.
    ``dropout`` applies to the top MLP's hidden layers while training.
    ``attention`` lists ``(pooled, candidate)`` feature-index pairs: the
    multi-valued feature ``pooled`` (a user's past items) is pooled by DIN-style
    attention to the single-valued ``candidate`` (the item scored) instead of
    by the mean, with an activation MLP of ``attention_mlp`` hidden sizes.
    """

    num_dense: int
    table_sizes: tuple[int, ...]
    table_widths: tuple[int, ...] = ()
    embedding_dim: int = 16
    bottom_mlp: tuple[int, ...] = (64, 32)
    top_mlp: tuple[int, ...] = (128, 64)
    interaction: Interaction = "dot"
    cross_layers: int = 3
    cross_rank: int | None = None
    dropout: float = 0.0
    attention: tuple[tuple[int, int], ...] = ()
    attention_mlp: tuple[int, ...] = (32,)

    def __post_init__(self) -> None:
        validate_inputs(
            "DLRMConfig", num_dense=self.num_dense, table_sizes=self.table_sizes, table_widths=self.table_widths
        )
        validate_positive("DLRMConfig", "embedding_dim", self.embedding_dim)
        validate_sizes("DLRMConfig", "bottom_mlp", self.bottom_mlp)
        validate_sizes("DLRMConfig", "top_mlp", self.top_mlp)
        if self.interaction not in INTERACTIONS:
            raise ValueError(f"DLRMConfig: interaction must be one of {', '.join(INTERACTIONS)}, got {self.interaction!r}")
        validate_positive("DLRMConfig", "cross_layers", self.cross_layers)
        if self.cross_rank is not None:
            validate_positive("DLRMConfig", "cross_rank", self.cross_rank)
        validate_dropout("DLRMConfig", self.dropout)
        validate_attention("DLRMConfig", self.attention, resolve_widths(self.table_sizes, self.table_widths))
        validate_sizes("DLRMConfig", "attention_mlp", self.attention_mlp)

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

    def __init__(self, config: DLRMConfig, table_widths: tuple[int, ...]):
        super().__init__()
        self.embeddings = EmbeddingTables(
            config.table_sizes, table_widths, config.embedding_dim,
            attention=config.attention, attention_mlp=config.attention_mlp,
        )

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


class CrossLayer(nn.Module):
    """One DCN-v2 cross layer: ``(x0 [B, K], x [B, K]) -> x0 * (W x + b) + x``, ``[B, K]``.

    ``W`` is ``K x K``, or with ``rank`` r the product ``U V^T`` of two
    ``K x r`` matrices (``2 K r`` weights instead of ``K^2``). Weights start
    Xavier-normal and the bias at zero, as in torchrec's ``CrossNet``.
    """

    def __init__(self, width: int, rank: int | None):
        super().__init__()
        if rank is None:
            self.project: nn.Module = nn.Linear(width, width)
        else:
            self.project = nn.Sequential(nn.Linear(width, rank, bias=False), nn.Linear(rank, width))  # V^T, then U
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_normal_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x0 * self.project(x) + x  # (B, K)


class CrossInteractionArch(nn.Module):
    """DCN-v2 cross network over the dense vector and the F embeddings.

    ``([B, D], [B, F, D]) -> [B, (F+1)*D]``: ``x0`` is the two concatenated,
    and layer ``l`` computes ``x_{l+1} = x0 * (W_l x_l + b_l) + x_l``.
    """

    def __init__(self, num_features: int, embedding_dim: int, *, layers: int, rank: int | None):
        super().__init__()
        width = self.output_size(num_features, embedding_dim)
        self.layers = nn.ModuleList(CrossLayer(width, rank) for _ in range(layers))

    @staticmethod
    def output_size(num_features: int, embedding_dim: int) -> int:
        return (num_features + 1) * embedding_dim

    def forward(self, dense: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor:
        x0 = torch.cat([dense.unsqueeze(1), embedded], dim=1).flatten(1)  # (B, F+1, D) -> (B, (F+1)*D)
        crossed = x0
        for layer in self.layers:
            crossed = layer(x0, crossed)  # (B, (F+1)*D)
        return crossed


class OverArch(nn.Module):
    """Top MLP: ``[B, I] -> [B]`` logits (no activation on the output), ``I`` the interaction's width."""

    def __init__(self, in_features: int, hidden: tuple[int, ...], *, dropout: float = 0.0):
        super().__init__()
        self.mlp = MLP(in_features, (*hidden, 1), relu_last=False, dropout=dropout)

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
        self.sparse_arch = SparseArch(config, widths)
        self.interaction_arch: nn.Module
        if config.interaction == "dcn":
            self.interaction_arch = CrossInteractionArch(
                num_features, config.embedding_dim, layers=config.cross_layers, rank=config.cross_rank
            )
            interaction_size = CrossInteractionArch.output_size(num_features, config.embedding_dim)
        else:
            self.interaction_arch = InteractionArch(num_features)
            interaction_size = InteractionArch.output_size(num_features, config.embedding_dim)
        self.over_arch = OverArch(interaction_size, config.top_mlp, dropout=config.dropout)

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        dense_vector = self.dense_arch(dense)  # (B, D)
        embedded = self.sparse_arch(sparse)  # (B, F, D)
        interactions = self.interaction_arch(dense_vector, embedded)  # (B, I)
        return self.over_arch(interactions)  # (B,)

    def feature_embeddings(self) -> EmbeddingTables:
        """The per-feature tables (``[table_sizes[i], D]`` each) that warm start loads."""
        return self.sparse_arch.embeddings
