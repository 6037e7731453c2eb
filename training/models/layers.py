"""Building blocks shared by the models: config checks, MLPs, embedding tables.

Shapes use the models' notation: ``B`` batch, ``F`` sparse features, ``S``
sparse columns (``sum(table_widths)``), ``D`` embedding dim, ``N`` dense features.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn


def resolve_widths(table_sizes: Sequence[int], table_widths: Sequence[int]) -> tuple[int, ...]:
    """``table_widths`` of a config, with ``()`` meaning "every feature single-valued"."""
    return tuple(table_widths) if table_widths else (1,) * len(table_sizes)


def validate_inputs(
    model: str, *, num_dense: int, table_sizes: Sequence[int], table_widths: Sequence[int]
) -> None:
    """Checks every config runs on its ``num_dense``/``table_sizes``/``table_widths``."""
    if not isinstance(num_dense, int) or num_dense < 1:
        raise ValueError(f"{model}: num_dense must be an int >= 1, got {num_dense!r}")
    if not isinstance(table_sizes, tuple) or not table_sizes:
        raise ValueError(f"{model}: table_sizes must be a non-empty tuple of ints, got {table_sizes!r}")
    for index, size in enumerate(table_sizes):
        # Index 0 is the missing/unseen row. A table of that row alone is legal: a
        # column with no value frequent enough in training still trains (as missing).
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"{model}: table_sizes[{index}] must be an int >= 1, got {size!r}")
    if not isinstance(table_widths, tuple):
        raise ValueError(f"{model}: table_widths must be a tuple of ints, got {table_widths!r}")
    if table_widths and len(table_widths) != len(table_sizes):
        raise ValueError(
            f"{model}: table_widths has {len(table_widths)} entries but table_sizes has "
            f"{len(table_sizes)} (use () for all single-valued)"
        )
    for index, width in enumerate(table_widths):
        if not isinstance(width, int) or width < 1:
            raise ValueError(f"{model}: table_widths[{index}] must be an int >= 1, got {width!r}")


def validate_sizes(model: str, field_name: str, sizes: Sequence[int]) -> None:
    """Hidden layer sizes: a tuple of positive ints (may be empty)."""
    if not isinstance(sizes, tuple) or any(not isinstance(s, int) or s < 1 for s in sizes):
        raise ValueError(f"{model}: {field_name} must be a tuple of ints >= 1, got {sizes!r}")


def validate_positive(model: str, field_name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{model}: {field_name} must be an int >= 1, got {value!r}")


def validate_dropout(model: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"{model}: dropout must be a number in [0, 1), got {value!r}")


def is_feature_pair(pair: object, count: int) -> bool:
    """Whether ``pair`` is a tuple of two feature indices (ints, never bools) in ``[0, count)``."""
    return (
        isinstance(pair, tuple)
        and len(pair) == 2
        and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < count for i in pair)
    )


def validate_attention(model: str, attention: object, table_widths: Sequence[int]) -> None:
    """Attention pairs ``(pooled, candidate)``: a multi-valued feature pooled by
    attention to a single-valued one, each multi-valued feature at most once."""
    if not isinstance(attention, tuple):
        raise ValueError(f"{model}: attention must be a tuple of (pooled, candidate) pairs, got {attention!r}")
    pooled: set[int] = set()
    for pair in attention:
        if not is_feature_pair(pair, len(table_widths)):
            raise ValueError(
                f"{model}: attention pair {pair!r} must be two feature indices in [0, {len(table_widths)})"
            )
        history, candidate = pair
        if table_widths[history] < 2:
            raise ValueError(f"{model}: attention pair {pair!r}: feature {history} is single-valued, nothing to pool")
        if table_widths[candidate] != 1:
            raise ValueError(f"{model}: attention pair {pair!r}: the candidate feature {candidate} is multi-valued")
        if history in pooled:
            raise ValueError(f"{model}: attention pair {pair!r}: feature {history} is pooled by attention twice")
        pooled.add(history)


class MLP(nn.Module):
    """Linear layers with ReLU between them: ``[B, in_features] -> [B, sizes[-1]]``.

    ``relu_last`` adds a ReLU after the last layer too (DLRM's bottom MLP has one;
    a layer that produces logits must not). ``dropout`` zeroes that fraction of
    each hidden layer's activations while training (never the output's); in
    eval mode, hence in every export, it is the identity.
    """

    def __init__(self, in_features: int, sizes: Sequence[int], *, relu_last: bool, dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = []
        widths = [in_features, *sizes]
        for index, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
            linear = nn.Linear(fan_in, fan_out)
            # facebookresearch/dlrm's initialisation: normal weights scaled by
            # fan-in + fan-out, normal biases scaled by fan-out.
            nn.init.normal_(linear.weight, 0.0, math.sqrt(2.0 / (fan_in + fan_out)))
            nn.init.normal_(linear.bias, 0.0, math.sqrt(1.0 / fan_out))
            layers.append(linear)
            hidden = index < len(sizes) - 1
            if relu_last or hidden:
                # Dropout shares the activation's slot, so the Linear layers keep their
                # state_dict keys (layers.0, layers.2, ...) whatever the dropout.
                activation = nn.ReLU()
                layers.append(nn.Sequential(activation, nn.Dropout(dropout)) if hidden and dropout else activation)
        self.layers = nn.Sequential(*layers)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.layers(inputs)


class TargetAttention(nn.Module):
    """DIN's activation unit (Zhou et al., 2018): how much each id of a
    multi-valued feature (a user's past items) counts, given the row's candidate.

    ``forward(present float32[B, S], vectors float32[B, S, D]) -> float32[B, S]``
    (``present``: 1 where a column holds an id, 0 on padding): pooling weights
    for the ``W`` columns ``start .. start + W``, zero in every other column.
    An MLP scores ``[h, c, h * c, h - c]`` (``h`` an id's vector,
    ``c`` the candidate's); the weights are the softmax of the scores over the
    non-padding ids, so the pooled vector is a weighted mean of the ids' rows
    (no ids: a zero vector). The MLP's output layer starts at zero, so a fresh
    model pools by the plain mean, and training learns how far to move from it.
    """

    def __init__(self, *, start: int, width: int, candidate: int, num_columns: int, embedding_dim: int,
                 hidden: Sequence[int]):
        super().__init__()
        self.start = start
        self.end = start + width
        self.candidate = candidate
        self.unit = MLP(4 * embedding_dim, (*hidden, 1), relu_last=False)
        output = self.unit.layers[-1]
        nn.init.zeros_(output.weight)
        nn.init.zeros_(output.bias)
        placement = torch.zeros(width, num_columns)
        placement[torch.arange(width), torch.arange(start, start + width)] = 1.0
        self.register_buffer("placement", placement, persistent=False)  # (W, S)

    def forward(self, present: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        history = vectors[:, self.start : self.end]  # (B, W, D)
        candidate = vectors[:, self.candidate : self.candidate + 1].expand_as(history)  # (B, W, D)
        features = torch.cat([history, candidate, history * candidate, history - candidate], dim=2)  # (B, W, 4D)
        scores = self.unit(features).squeeze(2)  # (B, W)
        # Softmax over the present ids; the max taken over all W keeps exp() finite.
        exponentials = torch.exp(scores - scores.max(dim=1, keepdim=True).values)  # (B, W)
        exponentials = exponentials * present[:, self.start : self.end]  # (B, W)
        weights = exponentials / exponentials.sum(dim=1, keepdim=True).clamp(min=1e-30)  # (B, W)
        return torch.matmul(weights, self.placement)  # (B, S), zero outside this feature's columns


class EmbeddingTables(nn.Module):
    """One embedding table per sparse feature, stored as a single fused table.

    All tables live in one ``[sum(table_sizes), D]`` weight (``fused.weight``); feature ``i`` owns
    rows ``table_offsets[i] .. table_offsets[i + 1]``. One gather and one
    sparse gradient per step instead of one per table is what makes DLRM's 26
    tables cheap to train (see ``benchmarks/training.py``).

    ``forward(sparse int64[B, S]) -> float32[B, F, D]``. A single-valued feature
    takes its column's row as is (row 0 is a learned "missing/unseen"
    embedding); a multi-valued feature averages the rows of its non-zero ids
    (padding id 0 is ignored; no ids at all gives a zero vector), or, for the
    ``(pooled, candidate)`` feature pairs of ``attention``, takes a weighted
    mean whose weights :class:`TargetAttention` computes against the candidate's row.

    A table can be overwritten and frozen (warm start, :meth:`load_table`):
    frozen rows get their gradient dropped before any optimizer sees it.
    """

    def __init__(
        self,
        table_sizes: Sequence[int],
        table_widths: Sequence[int],
        embedding_dim: int,
        *,
        init: Literal["uniform", "zeros"] = "uniform",
        sparse_grad: bool = True,
        attention: Sequence[tuple[int, int]] = (),
        attention_mlp: Sequence[int] = (32,),
    ):
        super().__init__()
        if init not in ("uniform", "zeros"):
            raise ValueError(f"EmbeddingTables: init must be 'uniform' or 'zeros', got {init!r}")
        self.table_sizes = tuple(table_sizes)
        self.table_widths = tuple(table_widths)
        self.embedding_dim = embedding_dim
        self.sparse_grad = sparse_grad
        self.num_features = len(self.table_sizes)
        offsets = [0]
        for size in self.table_sizes:
            offsets.append(offsets[-1] + size)
        self.table_offsets = tuple(offsets)
        # An nn.Embedding (not a bare Parameter) so DistributedDataParallel sees
        # ``sparse=True`` and allreduces its gradient as a sparse tensor.
        self.fused = nn.Embedding(
            offsets[-1], embedding_dim, sparse=sparse_grad, _weight=torch.empty(offsets[-1], embedding_dim)
        )  # _weight: skip nn.Embedding's own init, each table gets DLRM's below
        with torch.no_grad():
            for index in range(self.num_features):
                rows = self.fused.weight[offsets[index] : offsets[index + 1]]
                if init == "zeros":
                    rows.zero_()
                else:  # DLRM's per-table uniform(-1/sqrt(n), 1/sqrt(n))
                    bound = math.sqrt(1.0 / self.table_sizes[index])
                    rows.uniform_(-bound, bound)

        column_feature = [f for f, width in enumerate(self.table_widths) for _ in range(width)]
        column_offsets = torch.tensor([offsets[f] for f in column_feature], dtype=torch.int64)
        # Fixed index tensors: buffers so they follow .to(device), not state.
        self.register_buffer("column_offsets", column_offsets, persistent=False)  # (S,)
        self.pooled = any(width > 1 for width in self.table_widths)
        pool = torch.zeros(self.num_features, len(column_feature))
        multi = torch.zeros(len(column_feature), dtype=torch.bool)
        for column, feature in enumerate(column_feature):
            pool[feature, column] = 1.0
            multi[column] = self.table_widths[feature] > 1
        self.register_buffer("pool_matrix", pool, persistent=False)  # (F, S)
        self.register_buffer("multi_column", multi, persistent=False)  # (S,)
        first_column = [sum(self.table_widths[:f]) for f in range(self.num_features)]
        self.attention = nn.ModuleList(
            TargetAttention(
                start=first_column[pooled], width=self.table_widths[pooled], candidate=first_column[candidate],
                num_columns=len(column_feature), embedding_dim=embedding_dim, hidden=attention_mlp,
            )
            for pooled, candidate in attention
        )
        self.attends = bool(attention)
        mean_pooled = torch.ones(len(column_feature))
        for unit in self.attention:
            mean_pooled -= unit.placement.sum(dim=0)
        self.register_buffer("mean_pooled_column", mean_pooled, persistent=False)  # (S,) 0 on attended columns
        # Training-time state, not buffers: DDP would broadcast a buffer every step.
        self._frozen: set[int] = set()
        self._frozen_rows: torch.Tensor | None = None  # bool[sum(table_sizes)] once a table is frozen
        self._grad_hook: torch.utils.hooks.RemovableHandle | None = None

    def forward(self, sparse: torch.Tensor) -> torch.Tensor:
        rows = sparse + self.column_offsets  # (B, S) int64, rows of the fused table
        vectors = self.fused(rows)  # (B, S, D)
        if not self.pooled:
            return vectors  # S == F
        # Multi-valued columns: weight 1/count on each non-zero id, 0 on padding;
        # single-valued columns: weight 1. The (F, S) matrix sums columns per feature.
        present = (sparse != 0) | ~self.multi_column  # (B, S)
        present = present.to(vectors.dtype)
        counts = torch.matmul(present, self.pool_matrix.t()).clamp(min=1.0)  # (B, F)
        weights = present / torch.matmul(counts, self.pool_matrix)  # (B, S)
        if self.attends:  # the attended features' columns take their weights from attention instead
            weights = weights * self.mean_pooled_column
            for unit in self.attention:  # unrolled by TorchScript
                weights = weights + unit(present, vectors)  # (B, S)
        return torch.matmul(self.pool_matrix, vectors * weights.unsqueeze(-1))  # (B, F, D)

    # -- warm start -------------------------------------------------------

    def table(self, index: int) -> torch.Tensor:
        """Feature ``index``'s table, ``[table_sizes[index], D]`` (a view of the fused weight)."""
        self._check_index(index)
        return self.fused.weight[self.table_offsets[index] : self.table_offsets[index + 1]]

    def load_table(self, index: int, weights: torch.Tensor, *, freeze: bool) -> None:
        """Overwrite table ``index`` with ``weights``; ``freeze`` keeps it fixed while training."""
        self._check_index(index)
        expected = (self.table_sizes[index], self.embedding_dim)
        if tuple(weights.shape) != expected:
            raise ValueError(f"table {index}: weights have shape {tuple(weights.shape)}, expected {expected}")
        if not torch.isfinite(weights).all():
            raise ValueError(f"table {index}: weights contain NaN or inf")
        start, end = self.table_offsets[index], self.table_offsets[index + 1]
        with torch.no_grad():
            self.fused.weight[start:end].copy_(weights.to(self.fused.weight.dtype))
        if self._frozen_rows is None:
            self._frozen_rows = torch.zeros(self.table_offsets[-1], dtype=torch.bool, device=self.fused.weight.device)
        self._frozen_rows[start:end] = freeze
        if freeze:
            self._frozen.add(index)
        else:
            self._frozen.discard(index)
        self._update_freezing()

    def frozen_tables(self) -> tuple[int, ...]:
        return tuple(sorted(self._frozen))

    def _check_index(self, index: int) -> None:
        if not 0 <= index < self.num_features:
            raise ValueError(f"table index {index} out of range: the model has {self.num_features} tables")

    def __setstate__(self, state: dict) -> None:
        # deepcopy/pickle do not carry tensor hooks: re-attach the frozen-row filter.
        super().__setstate__(state)
        self._grad_hook = None
        self._update_freezing()

    def _update_freezing(self) -> None:
        # All frozen: no gradient at all. Some frozen: a gradient hook drops
        # their rows, so every optimizer (and DDP's allreduce) leaves them alone.
        all_frozen = len(self._frozen) == self.num_features
        self.fused.weight.requires_grad_(not all_frozen)
        wants_hook = bool(self._frozen) and not all_frozen
        if wants_hook and self._grad_hook is None:
            self._grad_hook = self.fused.weight.register_hook(self._drop_frozen_rows)
        elif not wants_hook and self._grad_hook is not None:
            self._grad_hook.remove()
            self._grad_hook = None

    def _drop_frozen_rows(self, grad: torch.Tensor) -> torch.Tensor:
        if self._frozen_rows is None:
            return grad
        if self._frozen_rows.device != grad.device:  # the model moved after freezing: move once
            self._frozen_rows = self._frozen_rows.to(grad.device)
        if not grad.is_sparse:
            return grad.masked_fill(self._frozen_rows.unsqueeze(1), 0.0)
        indices, values = grad._indices(), grad._values()
        keep = ~self._frozen_rows[indices[0]]
        return torch.sparse_coo_tensor(indices[:, keep], values[keep], grad.shape, check_invariants=False)


class WideLinear(nn.Module):
    """The linear ("wide") part: a weight per categorical id + a linear term on dense + bias.

    ``forward(dense [B, N], sparse [B, S]) -> [B]``. Multi-valued features
    contribute the mean weight of their ids. Weights start at zero, as a
    logistic regression does.
    """

    def __init__(self, num_dense: int, table_sizes: Sequence[int], table_widths: Sequence[int]):
        super().__init__()
        self.id_weights = EmbeddingTables(table_sizes, table_widths, 1, init="zeros")
        self.dense = nn.Linear(num_dense, 1)
        nn.init.zeros_(self.dense.weight)
        nn.init.zeros_(self.dense.bias)

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        categorical = self.id_weights(sparse).sum(dim=(1, 2))  # (B, F, 1) -> (B,)
        return categorical + self.dense(dense).squeeze(1)
