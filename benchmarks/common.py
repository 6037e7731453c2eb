"""What every benchmark shares: the machine header of its results, and the side-by-side timer.

Every benchmark writes :func:`machine_info` as ``machine`` in its JSON and
starts its table with :func:`machine_header`, so figures from two runs can be
told apart by the machine, versions and settings that made them.

:func:`time_side_by_side` times variants in turns, call by call (as
``torch.utils.benchmark`` and pyperf advise: warm up, many runs, medians with
spread, variants in one process), so load from elsewhere on a shared machine
slows every variant alike and their ratios hold while absolute figures move.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

Call = Callable[[Any], Any]
# (call, inputs) or (call, inputs, prepare): ``prepare`` turns an input into the call's argument, untimed.
TimedEntry = tuple[Call, Sequence[Any]] | tuple[Call, Sequence[Any], Call]


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (``platform.processor()`` is often empty on Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def usable_cores() -> int:
    """Cores this process may run on (its affinity), which a container or a pinning can make fewer than the machine's."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 0


def machine_info(*, threads: int, malloc_keeps_freed_memory: bool, device: str = "cpu") -> dict[str, Any]:
    """The machine, library versions and settings a benchmark ran with.

    ``threads`` is the intra-op thread count the benchmark set (PyTorch's and
    ONNX Runtime's); ``malloc_keeps_freed_memory`` whether glibc was told to keep
    freed memory for reuse (:func:`handlers.memory.reuse_freed_memory`), which
    changes what every step and request costs. Call it after the benchmark has
    set both, and after any pinning, so the figures describe the timed process.
    """
    import onnxruntime
    import pyarrow
    import torch

    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count() or 0,
        "usable_cores": usable_cores(),
        "platform": platform.platform(),
        "device": device,
        "intra_op_threads": threads,
        "torch_threads": torch.get_num_threads(),
        "malloc": {
            "glibc_keeps_freed_memory": malloc_keeps_freed_memory,
            "arrow_memory_pool": pyarrow.default_memory_pool().backend_name,
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "numpy": np.__version__,
            "onnxruntime": onnxruntime.__version__,
            "pyarrow": pyarrow.__version__,
        },
        "ort_providers": onnxruntime.get_available_providers(),
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def machine_header(machine: Mapping[str, Any]) -> str:
    """:func:`machine_info` as the one line that heads a benchmark's table (and its console output)."""
    gpu = f", GPU {machine['gpu']}" if "gpu" in machine else ""
    malloc = machine["malloc"]
    versions = ", ".join(f"{name} {version}" for name, version in machine["versions"].items())
    return (
        f"Machine: {machine['cpu']}, {machine['usable_cores']} of {machine['logical_cores']} cores usable{gpu}; "
        f"{machine['platform']}; device {machine['device']}; intra-op threads: {machine['intra_op_threads']}; "
        "glibc keeps freed memory: "
        f"{'yes' if malloc['glibc_keeps_freed_memory'] else 'no'}; Arrow memory pool {malloc['arrow_memory_pool']}; "
        f"{versions}."
    )


@dataclass(frozen=True)
class Timing:
    """One variant's latencies in ms: the median and its spread (quartiles, p99)."""

    median_ms: float
    p25_ms: float
    p75_ms: float
    p99_ms: float
    iterations: int

    @classmethod
    def of(cls, latencies_ms: np.ndarray) -> Timing:
        if len(latencies_ms) == 0:
            raise ValueError("Timing.of: no latencies (time at least one call)")
        p25, median, p75, p99 = np.percentile(latencies_ms, [25, 50, 75, 99])
        return cls(float(median), float(p25), float(p75), float(p99), len(latencies_ms))

    @property
    def iqr_ms(self) -> float:
        """Interquartile range: the spread of the middle half of the calls."""
        return self.p75_ms - self.p25_ms


def time_calls(
    call: Call,
    inputs: Sequence[Any],
    *,
    min_time: float,
    min_iters: int,
    warmup: int = 10,
    prepare: Call | None = None,
) -> np.ndarray:
    """Latencies in ms of ``call(inputs[i % len])`` (of ``call(prepare(...))``, prepared untimed), after ``warmup`` untimed calls."""
    entry: TimedEntry = (call, inputs) if prepare is None else (call, inputs, prepare)
    return time_side_by_side({"": entry}, min_time=min_time, min_iters=min_iters, warmup=warmup)[""]


def time_side_by_side(
    calls: Mapping[str, TimedEntry],
    *,
    min_time: float,
    min_iters: int,
    warmup: int = 10,
) -> dict[str, np.ndarray]:
    """Latencies in ms of several ``(call, inputs[, prepare])``, timed in
    turns: one call of each, then the next round. On a shared machine a burst
    of load from elsewhere then slows every variant alike, so their ratios
    hold even when the absolute figures move. ``prepare``, when given, turns
    an input into the call's argument untimed, just before the call. Runs
    ``warmup`` untimed rounds, then until each has ``min_iters`` calls and
    ``min_time`` seconds per variant have passed in all.
    """
    entries = {name: (entry[0], entry[1], entry[2] if len(entry) > 2 else None) for name, entry in calls.items()}
    latencies: dict[str, list[int]] = {name: [] for name in calls}
    clock = time.perf_counter_ns

    def one_round(i: int, *, timed: bool) -> None:
        for name, (call, inputs, prepare) in entries.items():
            item = inputs[i % len(inputs)]
            if prepare is not None:
                item = prepare(item)
            start = clock()
            call(item)
            elapsed = clock() - start
            del item  # freed before the next call, as a server frees a finished request
            if timed:
                latencies[name].append(elapsed)

    for i in range(warmup):
        one_round(i, timed=False)
    deadline = time.perf_counter() + min_time * len(calls)
    i = 0
    while i < min_iters or time.perf_counter() < deadline:
        one_round(i, timed=True)
        i += 1
    return {name: np.asarray(times, dtype=np.float64) / 1e6 for name, times in latencies.items()}


def time_in_blocks(
    groups: Mapping[str, Mapping[str, TimedEntry]],
    *,
    min_time: float,
    min_iters: int,
    rounds: int = 5,
    warmup: int = 3,
) -> dict[str, dict[str, np.ndarray]]:
    """Latencies in ms of groups of calls, the groups taking turns in ``rounds`` blocks.

    Within a block one group's calls run in turns (:func:`time_side_by_side`,
    ``warmup`` untimed rounds first); the groups then alternate block by
    block. Use it for variants that each own a thread pool (ONNX Runtime
    sessions, PyTorch's OpenMP threads): call by call, one pool's threads
    still spinning after its call would take cores from the next variant's,
    while blocks keep each pool to itself and still spread load from
    elsewhere over every group. Each group's calls get ``min_time`` seconds
    and at least ``min_iters`` calls in all.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    parts: dict[str, dict[str, list[np.ndarray]]] = {group: {name: [] for name in calls} for group, calls in groups.items()}
    for _ in range(rounds):
        for group, calls in groups.items():
            timed = time_side_by_side(
                calls, min_time=min_time / rounds, min_iters=max(1, -(-min_iters // rounds)), warmup=warmup
            )
            for name, latencies in timed.items():
                parts[group][name].append(latencies)
    return {group: {name: np.concatenate(chunks) for name, chunks in named.items()} for group, named in parts.items()}
