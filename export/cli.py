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
