"""What the benchmarks share: the machine header, the side-by-side timer and its summary."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks.common import Timing, machine_header, machine_info, time_calls, time_in_blocks, time_side_by_side


def test_machine_info_reports_cores_versions_threads_and_malloc():
    machine = machine_info(threads=3, malloc_keeps_freed_memory=True)
    assert machine["cpu"] and 1 <= machine["usable_cores"] <= machine["logical_cores"]
    assert machine["device"] == "cpu" and "gpu" not in machine
    assert machine["intra_op_threads"] == 3 and machine["torch_threads"] >= 1
    assert machine["malloc"]["glibc_keeps_freed_memory"] is True and machine["malloc"]["arrow_memory_pool"]
    assert set(machine["versions"]) == {"python", "torch", "numpy", "onnxruntime", "pyarrow"}
    assert "CPUExecutionProvider" in machine["ort_providers"]
    json.dumps(machine)  # written as is into every benchmark's JSON


def test_machine_header_is_one_line_naming_every_setting():
    machine = machine_info(threads=2, malloc_keeps_freed_memory=False)
    header = machine_header(machine)
    assert header.startswith(f"Machine: {machine['cpu']}, ") and "\n" not in header
    assert "intra-op threads: 2;" in header and "glibc keeps freed memory: no" in header
    assert f"onnxruntime {machine['versions']['onnxruntime']}" in header and "device cpu" in header
    assert ", GPU " in machine_header({**machine, "device": "cuda", "gpu": "Some GPU"})


def test_time_calls_warms_up_then_times_at_least_min_iters():
    calls = []
    latencies = time_calls(calls.append, [1, 2, 3], min_time=0.0, min_iters=7, warmup=4)
    assert len(latencies) == 7 and len(calls) == 11
    assert calls[:4] == [1, 2, 3, 1] and np.all(latencies >= 0)


def test_side_by_side_timing_takes_turns():
    calls = []
    timed = time_side_by_side(
        {"a": (lambda x: calls.append(("a", x)), [1, 2]), "b": (lambda x: calls.append(("b", x)), [7])},
        min_time=0.0,
        min_iters=3,
        warmup=1,
    )
    assert calls == [("a", 1), ("b", 7), ("a", 1), ("b", 7), ("a", 2), ("b", 7), ("a", 1), ("b", 7)]
    assert len(timed["a"]) == len(timed["b"]) == 3


def test_groups_take_turns_in_blocks_and_calls_within_a_block():
    calls = []

    def record(name):
        return lambda x: calls.append((name, x))

    groups = {"ort": {"infer": (record("ort"), [1])}, "torch": {"infer": (record("t"), [1]), "encode": (record("e"), [2])}}
    timed = time_in_blocks(groups, min_time=0.0, min_iters=4, rounds=2, warmup=1)
    # Per round: one block of ort (1 warm-up + 2 timed), then one of torch with its two calls in turns.
    block = [("ort", 1)] * 3 + [("t", 1), ("e", 2)] * 3
    assert calls == block * 2
    assert {group: {name: len(lat) for name, lat in named.items()} for group, named in timed.items()} == {
        "ort": {"infer": 4}, "torch": {"infer": 4, "encode": 4}
    }
    with pytest.raises(ValueError, match="rounds must be >= 1, got 0"):
        time_in_blocks(groups, min_time=0.0, min_iters=1, rounds=0)


def test_side_by_side_prepares_each_input_untimed_before_its_call():
    calls = []
    timed = time_side_by_side(
        {"parsed": (calls.append, ["[1]", "[2]"], json.loads), "raw": (calls.append, ["x"])},
        min_time=0.0,
        min_iters=2,
        warmup=1,
    )
    assert calls == [[1], "x", [1], "x", [2], "x"]
    assert len(timed["parsed"]) == 2


def test_side_by_side_medians_follow_what_each_call_costs(monkeypatch):
    # A fake clock that each call advances by its own cost: the timer must attribute it to that call alone.
    now = [0]
    monkeypatch.setattr("benchmarks.common.time.perf_counter_ns", lambda: now[0])

    def costing(ms: float):
        return lambda item: now.__setitem__(0, now[0] + int(ms * 1e6 * item))

    timed = time_side_by_side({"fast": (costing(1.0), [1, 1, 3]), "slow": (costing(4.0), [1])}, min_time=0.0, min_iters=6, warmup=0)
    assert timed["fast"].tolist() == [1.0, 1.0, 3.0, 1.0, 1.0, 3.0]
    assert timed["slow"].tolist() == [4.0] * 6
    fast, slow = Timing.of(timed["fast"]), Timing.of(timed["slow"])
    assert (fast.median_ms, fast.p25_ms, fast.p75_ms, fast.iterations) == (1.0, 1.0, 2.5, 6)
    assert fast.iqr_ms == pytest.approx(1.5) and slow.median_ms / fast.median_ms == 4.0 and slow.iqr_ms == 0.0


def test_timing_needs_at_least_one_latency():
    with pytest.raises(ValueError, match="no latencies"):
        Timing.of(np.array([]))
