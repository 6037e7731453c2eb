"""Fixtures shared by the test modules."""

from __future__ import annotations

from pathlib import Path

import pytest
from serving_utils import METRICS_CONFIG, REPO_ROOT, TinyExport, make_tiny_export


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def metrics_config() -> Path:
    return METRICS_CONFIG


@pytest.fixture(scope="session")
def tiny_dlrm(tmp_path_factory) -> TinyExport:
    """A tiny DLRM exported as TorchScript and ONNX, with its FeatureSpec."""
    return make_tiny_export(tmp_path_factory.mktemp("tiny_dlrm"), model_name="dlrm")
