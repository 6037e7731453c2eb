"""Warm start (transfer learning): initialize embedding tables from earlier work.

A source is ``FEATURE=PATH`` or a bare ``PATH`` (meaning every feature the
two specs share). ``PATH`` is either

* a checkpoint directory: rows are matched **by value**, through the two
  FeatureSpecs, so a table transfers even when the vocabularies differ (a value
  unknown to the old spec keeps its fresh initialization); hashed features
  transfer when both use the same number of buckets; or
* a ``.npy`` matrix of shape ``[num_embeddings, embedding_dim]`` of the new table.

Frozen tables (``--freeze C1,C2`` or ``all``) keep their weights: their
parameters stop requiring gradients, so the optimizer leaves them alone.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from featurespec import FeatureSpec, SparseFeature, hash_values
from training.models.layers import EmbeddingTables


def apply_warm_start(
    model: nn.Module, spec: FeatureSpec, *, sources: Iterable[str] = (), freeze: Iterable[str] = ()
) -> list[str]:
    """Load and freeze tables in place; returns one human-readable line per action."""
    tables = _tables(model)
    names = [f.name for f in spec.sparse]
    frozen = set(names) if "all" in freeze else set(freeze)
    for name in frozen:
        _index(names, name)  # unknown names fail before anything changes
    loaded: dict[int, torch.Tensor] = {}
    lines = []
    for source in sources:
        feature, _, path = source.rpartition("=")
        lines.extend(_load(tables, spec, Path(path), [feature] if feature else None, loaded))
    for index in sorted(set(loaded) | {names.index(n) for n in frozen}):
        weights = loaded.get(index, tables.table(index).detach().clone())
        tables.load_table(index, weights, freeze=names[index] in frozen)
    lines.extend(f"warm start: froze embedding table {name}" for name in sorted(frozen, key=names.index))
    return lines


def _tables(model: nn.Module) -> EmbeddingTables:
    getter = getattr(model, "feature_embeddings", None)
    if getter is None:
        raise ValueError(f"{type(model).__name__} has no embedding tables to warm-start")
    return getter()


def _index(names: list[str], name: str) -> int:
    try:
        return names.index(name)
    except ValueError:
        raise ValueError(f"warm start: unknown sparse feature {name!r}; known: {', '.join(names)}") from None


def _load(
    tables: EmbeddingTables, spec: FeatureSpec, path: Path, targets: list[str] | None, loaded: dict[int, torch.Tensor]
) -> list[str]:
    """Put new weights for the target tables into ``loaded`` (feature index -> matrix)."""
    names = [f.name for f in spec.sparse]
    if path.suffix == ".npy":
        if targets is None:
            raise ValueError(f"warm start: {path} is one matrix; name its feature as FEATURE={path}")
        index = _index(names, targets[0])
        matrix = _load_matrix(path)
        expected = (spec.sparse[index].num_embeddings, tables.embedding_dim)
        if matrix.shape != expected:
            raise ValueError(f"warm start: {path} has shape {matrix.shape}, table {targets[0]} needs {expected}")
        loaded[index] = torch.from_numpy(matrix)
        return [f"warm start: {targets[0]} <- {path} ({matrix.shape[0]} rows)"]

    from training.checkpoint import load_checkpoint  # here: checkpoint imports the models package

    old = load_checkpoint(path)
    old_tables = _tables(old.model)
    old_names = [f.name for f in old.spec.sparse]
    wanted = targets if targets is not None else [n for n in names if n in old_names]
    if not wanted:
        raise ValueError(f"warm start: {path} shares no sparse feature with this run")
    if old_tables.embedding_dim != tables.embedding_dim:
        raise ValueError(
            f"warm start: embedding dim {old_tables.embedding_dim} in {path}, {tables.embedding_dim} here"
        )
    lines = []
    for name in wanted:
        if name not in old_names:
            raise ValueError(f"warm start: checkpoint {path} has no feature {name!r}")
        index, old_index = _index(names, name), old_names.index(name)
        new_rows, old_rows = _matching_rows(spec.sparse[index], old.spec.sparse[old_index], path)
        weights = loaded.get(index, tables.table(index).detach().clone())
        weights[torch.from_numpy(new_rows)] = old_tables.table(old_index).detach()[torch.from_numpy(old_rows)]
        loaded[index] = weights
        lines.append(f"warm start: {name} <- {path} ({len(new_rows)} of {len(weights)} rows matched)")
    return lines


def _matching_rows(new: SparseFeature, old: SparseFeature, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Row pairs (new index, old index) that stand for the same raw value."""
    if new.kind == "hash" or old.kind == "hash":
        if new.kind == old.kind and new.buckets == old.buckets:
            rows = np.arange(new.num_embeddings)
            return rows, rows
        raise ValueError(
            f"warm start: {new.name}: cannot map a {old.kind} table ({path}) onto a {new.kind} table with "
            "different buckets; use FEATURE=matrix.npy instead"
        )
    old_index = old.lookup(*hash_values(list(new.vocab)))
    found = np.flatnonzero(old_index > 0)
    # Index 0 (missing/unseen) carries over too.
    return np.r_[0, found + 1].astype(np.int64), np.r_[0, old_index[found]].astype(np.int64)


def _load_matrix(path: Path) -> np.ndarray:
    try:
        matrix = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: embedding matrix not found") from None
    except ValueError as error:
        raise ValueError(f"{path}: not a readable .npy matrix: {error}") from None
    if matrix.ndim != 2 or not np.issubdtype(matrix.dtype, np.floating):
        raise ValueError(f"{path}: expected a 2-D float matrix, got {matrix.dtype} with shape {matrix.shape}")
    return matrix.astype(np.float32)
