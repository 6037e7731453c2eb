"""Two-tower retrieval model (Yi et al., 2019; torchrec's ``examples/retrieval``).

Shapes: ``B`` batch, ``N`` dense features, ``F`` embedding tables, ``S``
sparse columns (``sum(table_widths)``), ``E`` feature embedding dim, ``D``
output (retrieval) embedding dim. Each tower has its own ``N``, ``F`` and
``S``, from its own FeatureSpec (``user_features.json``, ``item_features.json``).

::

    user dense [B, Nu], sparse [B, Su] -> UserTower -> [B, D]  (unit length)
    item dense [B, Ni], sparse [B, Si] -> ItemTower -> [B, D]  (unit length)
    TwoTower: the cosine of each user with its paired item -> [B]

A tower embeds its F tables (multi-valued features, such as a history of
item ids or a movie's genres, average their ids' rows, as in
:class:`~training.models.layers.EmbeddingTables`), concatenates them with the
dense features and maps that through an MLP to ``D``, then L2-normalises:
the retrieval score is an inner product, which an ANN index searches, and
unit vectors keep it a bounded cosine. The temperature and the in-batch
softmax live in the training wrapper (:mod:`training.retrieval`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional

from training.models.layers import (
    MLP,
    EmbeddingTables,
    resolve_widths,
    validate_inputs,
    validate_positive,
    validate_sizes,
)


@dataclass(frozen=True)
class TwoTowerConfig:
    """``user_*`` and ``item_*`` are the shapes of each tower's FeatureSpec.

    ``hidden`` lists each tower's hidden MLP sizes; the output layer (width
    ``output_dim``) is appended. ``embedding_dim`` is the width of every
    feature table's rows.
    """

    user_num_dense: int
    user_table_sizes: tuple[int, ...]
    item_num_dense: int
    item_table_sizes: tuple[int, ...]
    user_table_widths: tuple[int, ...] = ()
    item_table_widths: tuple[int, ...] = ()
    embedding_dim: int = 32
    hidden: tuple[int, ...] = (128,)
    output_dim: int = 64

    def __post_init__(self) -> None:
        validate_inputs(
            "TwoTowerConfig (user tower)",
            num_dense=self.user_num_dense,
            table_sizes=self.user_table_sizes,
            table_widths=self.user_table_widths,
        )
        validate_inputs(
            "TwoTowerConfig (item tower)",
            num_dense=self.item_num_dense,
            table_sizes=self.item_table_sizes,
            table_widths=self.item_table_widths,
        )
        validate_positive("TwoTowerConfig", "embedding_dim", self.embedding_dim)
        validate_sizes("TwoTowerConfig", "hidden", self.hidden)
        validate_positive("TwoTowerConfig", "output_dim", self.output_dim)


class Tower(nn.Module):
    """One tower: ``(dense float32[B, N], sparse int64[B, S]) -> float32[B, D]``, each row of unit length."""

    def __init__(
        self,
        num_dense: int,
        table_sizes: tuple[int, ...],
        table_widths: tuple[int, ...],
        *,
        embedding_dim: int,
        hidden: tuple[int, ...],
        output_dim: int,
    ):
        super().__init__()
        widths = resolve_widths(table_sizes, table_widths)
        # Dense gradients: the tables are catalogue-sized and the towers train with plain Adam.
        self.embeddings = EmbeddingTables(table_sizes, widths, embedding_dim, sparse_grad=False)
        self.mlp = MLP(num_dense + len(table_sizes) * embedding_dim, (*hidden, output_dim), relu_last=False)

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        embedded = self.embeddings(sparse).flatten(1)  # (B, F, E) -> (B, F*E)
        vectors = self.mlp(torch.cat([dense, embedded], dim=1))  # (B, D)
        return functional.normalize(vectors, dim=1)


class UserTower(Tower):
    """The query tower: user features and history -> ``[B, D]``. The one exported for serving."""

    def __init__(self, config: TwoTowerConfig):
        super().__init__(
            config.user_num_dense,
            config.user_table_sizes,
            config.user_table_widths,
            embedding_dim=config.embedding_dim,
            hidden=config.hidden,
            output_dim=config.output_dim,
        )


class ItemTower(Tower):
    """The candidate tower: item features -> ``[B, D]``, run once over the catalogue at export."""

    def __init__(self, config: TwoTowerConfig):
        super().__init__(
            config.item_num_dense,
            config.item_table_sizes,
            config.item_table_widths,
            embedding_dim=config.embedding_dim,
            hidden=config.hidden,
            output_dim=config.output_dim,
        )


class TwoTower(nn.Module):
    """``forward(user_dense [B, Nu], user_sparse [B, Su], item_dense [B, Ni], item_sparse [B, Si]) -> [B]``:
    the cosine of each user with the item in the same row."""

    def __init__(self, config: TwoTowerConfig):
        super().__init__()
        self.config = config
        self.user_tower = UserTower(config)
        self.item_tower = ItemTower(config)

    def forward(
        self, user_dense: torch.Tensor, user_sparse: torch.Tensor, item_dense: torch.Tensor, item_sparse: torch.Tensor
    ) -> torch.Tensor:
        users = self.user_tower(user_dense, user_sparse)  # (B, D)
        items = self.item_tower(item_dense, item_sparse)  # (B, D)
        return (users * items).sum(dim=1)  # (B,)
