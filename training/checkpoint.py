"""Checkpoint directories: weights + the config that built them + the FeatureSpec.

Layout of ``DIR``::

    model.pt            state_dict of the unwrapped model (no DDP prefix)
    config.json         {"model": "dlrm", "config": {...dataclass fields...}}
    features.json       the FeatureSpec fitted on the training split
    metrics.json        test metrics, training speed, history
    learning_curve.png

``load_checkpoint`` rebuilds the model without the command line that trained it.
Training writes a checkpoint through :func:`staged_directory`, so ``DIR``
holds a complete checkpoint or none: never weights without their metrics.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from featurespec import FEATURES_FILE, FeatureSpec
from training.models import build_model, config_from_dict, config_to_dict

WEIGHTS_FILE = "model.pt"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
CURVE_FILE = "learning_curve.png"


@dataclass
class Checkpoint:
    model_name: str
    config: Any
    model: nn.Module  # on the CPU, in eval mode
    spec: FeatureSpec
    metrics: dict[str, Any]
    path: Path


def save_checkpoint(
    directory: str | os.PathLike[str],
    *,
    model_name: str,
    config: Any,
    model: nn.Module,
    spec: FeatureSpec,
    metrics: dict[str, Any] | None = None,
) -> Path:
    """Write weights, config and FeatureSpec (metrics too when given)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().cpu() for key, value in _unwrap(model).state_dict().items()}
    torch.save(state, out / WEIGHTS_FILE)
    write_json(out / CONFIG_FILE, {"model": model_name, "config": config_to_dict(config)})
    spec.save(out / FEATURES_FILE)
    if metrics is not None:
        write_json(out / METRICS_FILE, metrics)
    return out


@contextmanager
def staged_directory(target: str | os.PathLike[str]) -> Iterator[Path]:
    """A fresh directory beside ``target`` to write into; it becomes ``target`` when the block succeeds.

    The staging directory is ``.NAME.tmp-XXXXXXXX`` next to ``target``
    (the same file system, so the final step is a rename). An existing
    ``target`` is replaced only then, whole; if the block raises, the
    staging directory is removed and ``target`` is left as it was.
    """
    target = Path(os.path.abspath(target))
    if target.exists() and not target.is_dir():
        raise ValueError(f"{target}: exists and is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _new_sibling(target, "tmp", create=True)
    try:
        yield staging
        _replace_directory(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _replace_directory(staging: Path, target: Path) -> None:
    if not target.exists():
        staging.rename(target)
        return
    # A directory cannot be renamed over a non-empty one: move the old one aside first.
    old = _new_sibling(target, "old", create=False)
    target.rename(old)
    try:
        staging.rename(target)
    except BaseException:
        old.rename(target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _new_sibling(target: Path, kind: str, *, create: bool) -> Path:
    """An unused ``.NAME.KIND-XXXXXXXX`` path beside ``target`` (created, honouring the umask, if asked)."""
    while True:
        path = target.with_name(f".{target.name}.{kind}-{secrets.token_hex(4)}")
        if not create:
            if not path.exists():
                return path
            continue
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path


def load_checkpoint(directory: str | os.PathLike[str]) -> Checkpoint:
    path = Path(directory)
    for name in (WEIGHTS_FILE, CONFIG_FILE, FEATURES_FILE):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name}: not found (is {path} a checkpoint directory?)")
    header = read_json(path / CONFIG_FILE)
    try:
        model_name, config = header["model"], config_from_dict(header["model"], header["config"])
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path / CONFIG_FILE}: not a valid model config: {error}") from None
    model = build_model(model_name, config)
    model.load_state_dict(torch.load(path / WEIGHTS_FILE, map_location="cpu", weights_only=True))
    model.eval()
    metrics = read_json(path / METRICS_FILE) if (path / METRICS_FILE).is_file() else {}
    return Checkpoint(model_name, config, model, FeatureSpec.load(path / FEATURES_FILE), metrics, path)


def write_json(path: str | os.PathLike[str], payload: Any) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2, sort_keys=False)
        handle.write("\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}:{error.lineno}: not valid JSON: {error.msg}") from None


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
