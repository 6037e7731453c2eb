"""Command-line helpers shared by the export, benchmark and serving-benchmark entry points."""

from __future__ import annotations

import argparse
from collections.abc import Iterable


def comma_choices(parser: argparse.ArgumentParser, option: str, text: str, choices: Iterable[str]) -> tuple[str, ...]:
    """``"a, b"`` -> ``("a", "b")``; an empty list or a value not in ``choices`` is a usage error naming ``option``."""
    allowed = tuple(choices)
    values = tuple(value.strip() for value in text.split(",") if value.strip())
    unknown = [value for value in values if value not in allowed]
    if unknown or not values:
        parser.error(f"{option}: unknown {unknown or 'empty list'}; choose from {','.join(allowed)}")
    return values


def add_device_option(parser: argparse.ArgumentParser, *, default: str, help: str) -> None:
    """``--device`` (``auto``: cuda when this machine has it; ``cpu``; ``cuda``), checked by :func:`resolve_device`."""
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default=default, help=help)


def resolve_device(parser: argparse.ArgumentParser, device: str) -> str:
    """``auto`` -> ``cuda`` or ``cpu``; ``cuda`` on a machine without it is a usage error."""
    import torch

    available = torch.cuda.is_available()
    if device == "cuda" and not available:
        parser.error("--device cuda: torch.cuda.is_available() is False on this machine")
    return ("cuda" if available else "cpu") if device == "auto" else device
