"""Model registry.

Every ranking model is ``forward(dense float32[B, D], sparse int64[B, S]) -> logits float32[B]``
where ``S = sum(table_widths)``: a single-valued feature takes one column of
``sparse``, a multi-valued one ``width`` columns padded with index 0
(``table_widths=()`` means every feature is single-valued). Configs
are frozen dataclasses stored in ``config.json`` so a checkpoint rebuilds its
model without the command line that trained it. ``twotower`` is the retrieval
model: two towers with their own inputs (see :mod:`training.models.two_tower`),
trained by :mod:`training.retrieval`, not by the ranking loop.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from training.models.dlrm import DLRM, DLRMConfig
from training.models.logistic import LogisticConfig, LogisticRegression
from training.models.two_tower import TwoTower, TwoTowerConfig
from training.models.wide_deep import WideDeep, WideDeepConfig

MODELS: dict[str, tuple[type, type[nn.Module]]] = {
    "dlrm": (DLRMConfig, DLRM),
    "widedeep": (WideDeepConfig, WideDeep),
    "logistic": (LogisticConfig, LogisticRegression),
    "twotower": (TwoTowerConfig, TwoTower),
}
MODEL_NAMES = tuple(MODELS)
RETRIEVAL_MODEL_NAMES = ("twotower",)


def _lookup(name: str) -> tuple[type, type[nn.Module]]:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}") from None


def build_model(name: str, config: Any) -> nn.Module:
    config_type, model_type = _lookup(name)
    if not isinstance(config, config_type):
        raise ValueError(f"model {name!r} needs a {config_type.__name__}, got {type(config).__name__}")
    return model_type(config)


def config_to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def config_from_dict(name: str, payload: dict[str, Any]) -> Any:
    """Inverse of :func:`config_to_dict` (JSON lists become tuples again)."""
    config_type, _ = _lookup(name)

    def freeze(value: Any) -> Any:
        return tuple(freeze(v) for v in value) if isinstance(value, list) else value

    return config_type(**{key: freeze(value) for key, value in payload.items()})
