"""``python -m benchmarks.serving EXPORT_DIR``: what TorchServe delivers, next to the in-process limit.

One TorchServe (the project's ``config.properties`` on free ports) serves
one archive at a time, registered through the management API; Locust
(``loadtest/locustfile.py``, ``InferenceUser`` only) drives each point with a
stepped load, and the summary's per-step figures give, for every point:

* the most records/s reached at any step, and its p99;
* the capacity at the SLO: the most records/s of a step whose p99 stayed
  within ``--slo-p99-ms`` (60 ms) without a failed request.

The sweep: batching off (``batchSize`` 1) vs on (8 and 32, ``maxBatchDelay``
5 ms) for concurrent single-record clients, TorchScript vs ONNX Runtime vs
AOTInductor ``.pt2`` (by default when the export dir has ``model.pt2``),
1 vs 2 workers, and request sizes and formats (1 record, 64 instances,
ranking 256 candidates as JSON and as an Arrow IPC stream answered in
Arrow). Beside each backend, size and request format stands the in-process
limit: the export benchmark's encode + infer timing
(:mod:`benchmarks.runtimes`) of the same artifact and the same records in
the same format, with as many threads as the point has workers (1 each).

``--faults`` adds a run where a worker is SIGKILLed mid-load (failed requests,
recovery time, failures after recovery); ``--soak-seconds N`` a steady run
below capacity with the frontend's and workers' memory sampled.

Every client here follows :mod:`loadtest.resilience`: tokens are refreshed
when they expire (a soak outlives ``token_expiration_min``), and an inference
request whose worker died under it is retried once. Each point, the fault run
and the soak report those retries (``retries``) apart from the failed
requests, which are the answers that were still wrong after a retry.

Locust runs on the same machine as the server: every point reports the
generator's CPU use (cores) beside the server's, so a saturated generator is
visible. Writes ``serving.json``, ``serving.md`` and ``serving.png`` (and
``soak.png``) to ``--out`` (default ``results/serving``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from benchmarks.common import machine_header
from export.archive import ServingConfig, build_archive
from export.backends import ARTIFACTS
from export.cli import comma_choices
from featurespec import FEATURES_FILE
from loadtest.torchserve import REPO_ROOT, Server, running_torchserve
from loadtest.workload import DEFAULT_SLO_P99_MS

LOCUSTFILE = REPO_ROOT / "loadtest" / "locustfile.py"
LOCUST = Path(sys.executable).with_name("locust")
DEFAULT_OUT = Path("results/serving")
BATCHING = {"off": (1, 0), "on-8": (8, 5), "on-32": (32, 5)}  # name -> (batchSize, maxBatchDelay ms)
BACKENDS = ("torchscript", "onnx", "pt2")
_LINE_STYLES = {"torchscript": "-", "onnx": "--", "pt2": ":"}  # per backend, in the plot
RequestFormat = Literal["json", "arrow"]


@dataclass(frozen=True)
class Scenario:
    """A request shape and the stepped load that explores it."""

    name: str
    records: int  # records per request
    locust_options: tuple[str, ...]
    step_users: int
    max_users: int
    request_format: RequestFormat = "json"


SCENARIOS = {
    "single": Scenario("single", 1, ("--mix", "single=1"), step_users=8, max_users=64),
    "instances-64": Scenario("instances-64", 64, ("--mix", "instances=1", "--instances", "64"), step_users=2, max_users=16),
    "ranking-256": Scenario(
        "ranking-256", 256, ("--mix", "ranking=1", "--candidates", "256", "--top-k", "10"), step_users=1, max_users=10
    ),
    "ranking-256-arrow": Scenario(
        "ranking-256-arrow", 256, ("--mix", "arrow=1", "--candidates", "256", "--top-k", "10"), step_users=1, max_users=10,
        request_format="arrow",
    ),  # fmt: skip
}


@dataclass(frozen=True)
class Point:
    backend: str
    batching: str
    workers: int
    scenario: str


def sweep_points(backends: Sequence[str], *, quick: bool = False) -> list[Point]:
    """Batching off/on for single records; request sizes and formats; 1 vs 2 workers.

    Large requests use ``on-8``: their stepped load runs up to 10 or 16 users,
    so a batch of 8 fills, where a batch of 32 would wait out its delay every
    time; ranking also runs with batching off, to show what batching buys there.
    """
    points = []
    for backend in backends:
        for batching in ("off", "on-32") if quick else BATCHING:
            points.append(Point(backend, batching, 1, "single"))
        points += [Point(backend, "on-8", 1, "instances-64"), Point(backend, "on-8", 1, "ranking-256")]
        points.append(Point(backend, "on-8", 1, "ranking-256-arrow"))
        if not quick:
            points.append(Point(backend, "off", 1, "ranking-256"))
            points += [Point(backend, "on-32", 2, "single"), Point(backend, "on-8", 2, "instances-64")]
            points += [Point(backend, "on-8", 2, "ranking-256"), Point(backend, "off", 2, "ranking-256")]
            points.append(Point(backend, "on-8", 2, "ranking-256-arrow"))
    return points


# --------------------------------------------------------------------------
# The server side
# --------------------------------------------------------------------------


def archive_name(backend: str, batching: str) -> str:
    return f"{backend}_{batching.replace('-', '')}"


def build_store(export_dir: Path, store: Path, *, backends: Sequence[str], batchings: Sequence[str]) -> None:
    for backend in backends:
        for batching in batchings:
            batch_size, delay = BATCHING[batching]
            config = ServingConfig(batch_size=batch_size, max_batch_delay_ms=delay, max_records=1000)
            build_archive(export_dir, name=archive_name(backend, batching), backend=backend, model_store=store, config=config, force=True)


def register(server: Server, name: str, *, workers: int) -> None:
    reply = server.management.register(f"{name}.mar", initial_workers=1, timeout=300)
    if reply.status != 200:
        raise RuntimeError(f"registering {name}: {reply.status} {reply.body[:300]!r}")
    if workers > 1:  # initial_workers stops at the archive's maxWorkers; scaling sets both bounds
        scale(server, name, workers=workers)


def scale(server: Server, name: str, *, workers: int) -> None:
    reply = server.management.scale(name, min_worker=workers, max_worker=workers, timeout=300)
    if reply.status != 200:
        raise RuntimeError(f"scaling {name} to {workers} workers: {reply.status} {reply.body[:300]!r}")


def unregister(server: Server, name: str) -> None:
    server.management.unregister(name, timeout=120)


def worker_pids(server: Server, name: str) -> list[int]:
    (description,) = server.management.describe(name).json()
    return [int(worker["pid"]) for worker in description["workers"] if worker.get("status") == "READY" and int(worker["pid"]) > 0]


def server_processes(server: Server) -> list[Any]:
    import psutil

    root = psutil.Process(server.process.pid)
    return [root, *root.children(recursive=True)]


def cpu_seconds(processes: Sequence[Any]) -> dict[str, float]:
    """CPU seconds so far of the frontend (the JVM) and of everything else (the Python workers)."""
    total = {"frontend": 0.0, "workers": 0.0}
    for process in processes:
        with contextlib.suppress(Exception):  # a worker may have gone
            times = process.cpu_times()
            total["frontend" if "java" in process.name() else "workers"] += times.user + times.system
    return total


# --------------------------------------------------------------------------
# One Locust run
# --------------------------------------------------------------------------


def start_locust(
    server: Server,
    *,
    model: str,
    features: Path,
    out_prefix: Path,
    options: Sequence[str],
    run_time: float,
    users: int,
    step_users: int = 0,
    step_time: float = 3.0,
    pool_size: int = 64,
) -> subprocess.Popen:
    """Locust headless against ``server`` (inference users only), its output in ``OUT_PREFIX.log``."""
    command = [
        os.fspath(LOCUST), "-f", os.fspath(LOCUSTFILE), "InferenceUser", "--headless", "--only-summary",
        "--host", server.urls["inference"], "--management-host", server.urls["management"],
        "--model", model, "--features", os.fspath(features), "--key-file", os.fspath(server.workdir / "key_file.json"),
        "--users", str(users), "--spawn-rate", str(users), "--run-time", f"{run_time:.0f}s", "--stop-timeout", "5",
        "--step-users", str(step_users), "--step-time", str(step_time), "--pool-size", str(pool_size),
        "--csv", os.fspath(out_prefix), "--summary", _summary_file(out_prefix),
        *options,
    ]  # fmt: skip
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    Path(_summary_file(out_prefix)).unlink(missing_ok=True)  # never read a previous run's figures
    with open(os.fspath(out_prefix) + ".log", "w", encoding="utf-8") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)


def run_locust(server: Server, *, out_prefix: Path, run_time: float, **options: Any) -> dict[str, Any]:
    """:func:`start_locust`, wait, and its summary JSON."""
    process = start_locust(server, out_prefix=out_prefix, run_time=run_time, **options)
    process.wait(timeout=run_time + 120)
    return read_summary(out_prefix)


def _summary_file(out_prefix: Path) -> str:
    return os.fspath(out_prefix) + "_summary.json"


def read_summary(out_prefix: Path) -> dict[str, Any]:
    path = Path(_summary_file(out_prefix))
    if not path.is_file():
        log = Path(os.fspath(out_prefix) + ".log")
        tail = log.read_text(encoding="utf-8")[-2000:] if log.is_file() else ""
        raise RuntimeError(f"Locust wrote no summary ({path}); its log ends with:\n{tail}")
    return json.loads(path.read_text(encoding="utf-8"))


def measure_point(
    server: Server, point: Point, *, features: Path, out: Path, step_time: float, slo_p99_ms: float
) -> dict[str, Any]:
    scenario = SCENARIOS[point.scenario]
    name = archive_name(point.backend, point.batching)
    steps = scenario.max_users // scenario.step_users
    processes = server_processes(server)
    cpu_before, wall_before = cpu_seconds(processes), time.monotonic()
    summary = run_locust(
        server,
        model=name,
        features=features,
        out_prefix=out / "points" / f"{name}_w{point.workers}_{point.scenario}",
        options=scenario.locust_options,
        run_time=steps * step_time + 1,
        users=scenario.max_users,
        step_users=scenario.step_users,
        step_time=step_time,
    )
    cpu_after, wall = cpu_seconds(processes), time.monotonic() - wall_before
    cores = {role: round((cpu_after[role] - cpu_before[role]) / wall, 3) for role in cpu_after}
    steps_measured = summary["steps"]
    best = max(steps_measured, key=lambda s: s["records_per_s"]) if steps_measured else None
    within = [s for s in steps_measured if s["p99_ms"] <= slo_p99_ms and s["failures"] == 0]
    capacity = max(within, key=lambda s: s["records_per_s"]) if within else None
    return {
        **asdict(point),
        "records_per_request": scenario.records,
        "request_format": scenario.request_format,
        "max_records_per_s": best["records_per_s"] if best else 0.0,
        "p99_ms_at_max": best["p99_ms"] if best else None,
        "users_at_max": best["users"] if best else None,
        "capacity_records_per_s": capacity["records_per_s"] if capacity else 0.0,
        "capacity_users": capacity["users"] if capacity else None,
        "p99_ms_at_capacity": capacity["p99_ms"] if capacity else None,
        "failures": summary["inference"]["failures"],
        "requests": summary["inference"]["requests"],
        "retries": summary["retries"],
        "generator_cores": summary["generator"]["cores_used"],
        "server_cores": round(sum(cores.values()), 3),
        "frontend_cores": cores["frontend"],
        "worker_cores": cores["workers"],
        "steps": steps_measured,
    }


# --------------------------------------------------------------------------
# In-process limit (the export benchmark's encode + infer)
# --------------------------------------------------------------------------


def in_process_cells(scenarios: Sequence[str]) -> list[tuple[RequestFormat, int]]:
    """The (request format, batch size) pairs whose in-process limit the points of ``scenarios`` are compared with."""
    return sorted({(SCENARIOS[name].request_format, SCENARIOS[name].records) for name in scenarios}, key=lambda cell: (cell[1], cell[0]))


def in_process_limits(
    export_dir: Path, *, backends: Sequence[str], cells: Sequence[tuple[RequestFormat, int]], threads: int, min_time: float = 1.0
) -> list[dict[str, Any]]:
    """parse + encode + infer records/s (batch / p50) per backend, request format and batch size, from the body bytes
    the handler gets (``config.properties`` sets ``decode_input_request=false``):

    * ``json``: an ``instances`` body, parsed by the handler (msgspec from 16 KiB, orjson below), encoded, then the
      model (``benchmarks.request_paths``' raw-bytes JSON paths);
    * ``arrow``: the same records as an Arrow IPC stream (as :mod:`loadtest.scoring_client` writes it), read and
      encoded by the handler's preprocessing (``benchmarks.request_paths``' Arrow path), then the model.

    The formats of one backend and size are timed call by call in turns.
    """
    import torch

    from benchmarks.common import time_side_by_side
    from benchmarks.request_paths import path_calls
    from benchmarks.runtimes import request_body, summarize
    from export.backends import load_predictor
    from export.records import sample_records
    from featurespec import FeatureSpec
    from handlers.memory import settle_for_scoring
    from handlers.request import Limits
    from loadtest.scoring_client import score_request

    torch.set_num_threads(threads)
    spec = FeatureSpec.load(export_dir / FEATURES_FILE)
    sizes = sorted({size for _, size in cells})
    records = sample_records(spec, max(sizes) * 8, seed=0)
    writers: dict[str, Callable[[list[dict[str, Any]]], bytes]] = {
        "json": lambda chunk: request_body(spec, chunk, "records"),
        "arrow": lambda chunk: score_request(chunk, arrow_from_rows=1).body,
    }
    bodies = {(fmt, size): [writers[fmt](records[i * size : (i + 1) * size]) for i in range(8)] for fmt, size in cells}
    del records
    settle_for_scoring()  # as the handler does
    results = []
    for backend in backends:
        predictor = load_predictor(backend, export_dir, threads=threads)
        paths = path_calls(spec, predictor, Limits(max_records=max(sizes)))
        calls = {"json": paths["msgspec bytes + encode + infer"], "arrow": paths["Arrow IPC + encode + infer"]}
        for size in sizes:
            entries = {fmt: (calls[fmt], bodies[fmt, size]) for fmt, cell_size in cells if cell_size == size}
            timed = time_side_by_side(entries, min_time=min_time, min_iters=20)
            for fmt, latencies in timed.items():
                results.append({**asdict(summarize(backend, "encode+infer", size, latencies)), "format": fmt, "threads": threads})
    return results


def export_benchmark_figures(path: Path = Path("results/export_benchmark/benchmark.json")) -> dict[str, Any] | None:
    """The last ``make bench`` export benchmark, if present (its model may differ: see export_dir)."""
    if not path.is_file():
        return None
    result = json.loads(path.read_text(encoding="utf-8"))
    cells = [m for m in result["measurements"] if m["mode"] == "encode+infer"]
    return {"export_dir": result.get("export_dir"), "threads": result["machine"].get("intra_op_threads", "?"), "encode+infer": cells}


# --------------------------------------------------------------------------
# Faults and soak
# --------------------------------------------------------------------------


def kill_worker_run(
    server: Server, *, name: str, features: Path, out: Path, run_time: float = 40.0, kill_at: float = 15.0, users: int = 16
) -> dict[str, Any]:
    """Two workers under steady load; one is SIGKILLed at ``kill_at`` s.

    Reports the failed requests (and when they finished), the recovery time
    (kill -> a new worker READY) and the failures after recovery.
    """
    prefix = out / "faults" / "kill_worker"
    process = start_locust(
        server, model=name, features=features, out_prefix=prefix, run_time=run_time, users=users,
        options=("--mix", "single=3,instances=1", "--instances", "1-16"),
    )  # fmt: skip
    time.sleep(kill_at)
    victims = worker_pids(server, name)
    victim = victims[0]
    killed = time.time()
    os.kill(victim, signal.SIGKILL)  # a worker of the TorchServe this benchmark started
    recovered = None
    while time.time() - killed < run_time:
        pids = worker_pids(server, name)
        if len(pids) == len(victims) and victim not in pids:
            recovered = time.time()
            break
        time.sleep(0.1)
    process.wait(timeout=run_time + 120)
    summary = read_summary(prefix)
    kill_t = killed - summary["started_unix"]
    recovery_t = (recovered - summary["started_unix"]) if recovered else None
    failure_times = summary["failure_times_s"]
    after = [t for t in failure_times if recovery_t is not None and t > recovery_t + 1.0]
    at_kill = [t for t in failure_times if kill_t - 0.05 <= t <= kill_t + 1.0]
    return {
        "archive": name,
        "workers": len(victims),
        "users": users,
        "killed_pid": victim,
        "kill_at_s": round(kill_t, 2),
        "recovery_s": round(recovered - killed, 2) if recovered else None,
        "requests": summary["inference"]["requests"],
        "failed_requests": summary["inference"]["failures"],
        "retries": summary["retries"],
        "failures_within_1s_of_kill": len(at_kill),
        "failure_times_s": failure_times[:50],
        "failures_after_recovery": len(after),
        "note": "a request in the killed worker's batch gets 'Worker died' and is retried once; queued requests wait for a worker",
        "timeline": summary["timeline"],
    }


def soak_run(
    server: Server, *, name: str, features: Path, out: Path, seconds: float, users: int = 4, think_time: float = 0.005, sample_every: float = 5.0
) -> dict[str, Any]:
    """A steady mixed load below capacity for ``seconds``; RSS of the frontend and the workers sampled."""
    import psutil

    prefix = out / "soak" / "soak"
    process = start_locust(
        server, model=name, features=features, out_prefix=prefix, run_time=seconds, users=users,
        options=("--think-time", str(think_time)),
    )  # fmt: skip
    frontend = psutil.Process(server.process.pid)
    java = [p for p in [frontend, *frontend.children(recursive=True)] if "java" in p.name()]
    samples = []
    started = time.time()
    while process.poll() is None:
        workers = [psutil.Process(pid) for pid in worker_pids(server, name)]
        row: dict[str, Any] = {"t": round(time.time() - started, 1)}
        with contextlib.suppress(psutil.Error):
            row["frontend_rss_mb"] = round(sum(p.memory_info().rss for p in java) / 2**20, 1)
            row["workers_rss_mb"] = round(sum(p.memory_info().rss for p in workers) / 2**20, 1)
        samples.append(row)
        time.sleep(sample_every)
    summary = read_summary(prefix)

    def growth(key: str) -> float | None:
        values = [(s["t"], s[key]) for s in samples if key in s]
        if len(values) < 4:
            return None
        settled = [v for t, v in values if t >= 60] or [v for _, v in values]  # past start-up allocation
        third = max(1, len(settled) // 3)
        return round(float(np.mean(settled[-third:]) - np.mean(settled[:third])), 1)

    return {
        "archive": name,
        "seconds": seconds,
        "users": users,
        "think_time_s": think_time,
        "requests": summary["total"]["requests"],
        "failed_requests": summary["total"]["failures"],
        "retries": summary["retries"],
        "records_per_s": summary["inference"]["records_per_s"],
        "p99_ms": summary["inference"]["p99_ms"],
        "generator_cores": summary["generator"]["cores_used"],
        "frontend_rss_growth_mb": growth("frontend_rss_mb"),
        "workers_rss_growth_mb": growth("workers_rss_mb"),
        "memory": samples,
    }


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """The machine header, with the settings every worker runs under: one intra-op thread,
    and glibc keeping freed memory (the handler's ``settle_for_scoring``, as the in-process limit does too)."""
    from benchmarks.common import machine_info
    from handlers.memory import reuse_freed_memory

    return machine_info(threads=1, malloc_keeps_freed_memory=reuse_freed_memory())


def markdown(result: dict[str, Any]) -> str:
    info, settings = result["machine"], result["settings"]
    slo = settings["slo_p99_ms"]
    lines = [
        "## Serving benchmark (TorchServe + Locust)",
        "",
        machine_header(info) + f" Model: `{result['export_dir']}`. Each worker: 1 process, 1 intra-op thread.",
        "",
        "**The load generator (Locust, one process) shares this machine with TorchServe**: the `generator cores` "
        "column is its own CPU use, the `server cores` column the frontend's and the workers' together. "
        f"Each point is a stepped load ({settings['step_time_s']:g} s per step; the first quarter of a step, at most 1 s, is left out "
        "while new users start); "
        f"*max* is the best step, *capacity at SLO* the best step with p99 <= {slo:g} ms and no failed request. "
        "*Share of in-process* is max records/s over the in-process parse + encode + infer of the same backend, batch size "
        "(records per request) and request format, with as many threads as the point has workers.",
        "",
        "| backend | batching (batchSize/delay) | workers | request | format | max records/s | p99 at max (ms) "
        "| capacity at SLO (records/s) | in-process parse+encode+infer (records/s) | share of in-process | failures (retried) "
        "| generator cores | server cores (frontend + workers) |",
        "|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    limits = in_process_index(result["in_process"])
    for p in result["points"]:
        batch_size, delay = BATCHING[p["batching"]]
        request_format = p.get("request_format", "json")  # results written before formats were recorded hold JSON only
        limit = limits.get((p["backend"], p["records_per_request"], p["workers"], request_format))
        in_process = f"{limit:,.0f} | {p['max_records_per_s'] / limit:.0%}" if limit else "- | -"
        lines.append(
            f"| {p['backend']} | {p['batching']} ({batch_size}/{delay} ms) | {p['workers']} | {p['scenario']} | {request_format} "
            f"| {p['max_records_per_s']:,.0f} | {p['p99_ms_at_max']} | {p['capacity_records_per_s']:,.0f} "
            f"| {in_process} "
            f"| {p['failures']} ({p['retries']['total']}) | {p['generator_cores']} "
            f"| {p['server_cores']} ({p['frontend_cores']} + {p['worker_cores']}) |"
        )
    lines += [
        "",
        "In-process limit (parse + encode + infer of the body bytes the handler gets, batch / p50), with as many "
        "intra-op threads as the served point has workers (each worker runs 1 thread), so both sides get the same cores. "
        "JSON: the `instances` body parsed by the handler (msgspec from 16 KiB, orjson below); "
        "Arrow: the IPC stream read by the handler:",
        "",
    ]
    lines += ["| backend | format | batch | threads | records/s | p50 (ms) |", "|---|---|---:|---:|---:|---:|"]
    for m in result["in_process"]:
        lines.append(
            f"| {m['backend']} | {m.get('format', 'json')} | {m['batch_size']} | {m['threads']} | {m['records_per_s']:,.0f} | {m['p50_ms']:.3f} |"
        )
    reference = result.get("export_benchmark")
    if reference:
        cells = ", ".join(f"{m['backend']} batch {m['batch_size']}: {m['records_per_s']:,.0f}" for m in reference["encode+infer"])
        lines.append(
            f"\nFor comparison, the last `make bench` export benchmark (another model: `{reference['export_dir']}`, "
            f"{reference['threads']} threads), encode + infer: {cells} records/s."
        )
    if result.get("checks"):
        lines += ["", "Headline ratios, computed from the points above:", ""]
        lines += [f"- {title}: {verdict}" for title, verdict in result["checks"].items()]
    faults = result.get("faults")
    if faults:
        lines += [
            "",
            "### A worker killed mid-load",
            "",
            f"`{faults['archive']}` with {faults['workers']} workers, {faults['users']} users; worker pid "
            f"{faults['killed_pid']} SIGKILLed at {faults['kill_at_s']} s: {faults['failed_requests']} of "
            f"{faults['requests']} requests failed after {faults['retries']['total']} retries "
            f"({faults['failures_within_1s_of_kill']} failures within 1 s of the kill), "
            f"a replacement worker was READY after {faults['recovery_s']} s, "
            f"and {faults['failures_after_recovery']} requests failed after that.",
        ]
    soak = result.get("soak")
    if soak:
        lines += [
            "",
            "### Soak",
            "",
            f"`{soak['archive']}`, {soak['seconds']:g} s, {soak['users']} users (think time {soak['think_time_s']} s), "
            f"default mix: {soak['requests']:,} requests, {soak['failed_requests']} failed, {soak['retries']['total']} retried "
            f"({', '.join(f'{reason}: {count}' for reason, count in soak['retries']['by_reason'].items()) or 'none'}), "
            f"{soak['records_per_s']:,.0f} records/s, p99 {soak['p99_ms']} ms, generator {soak['generator_cores']} cores. "
            f"Memory (RSS, settled last third minus first third): frontend {soak['frontend_rss_growth_mb']} MB, "
            f"workers {soak['workers_rss_growth_mb']} MB (`soak.png`).",
        ]
    lines += ["", f"Command: `{result['command']}`", ""]
    return "\n".join(lines)


def in_process_index(measurements: Sequence[dict[str, Any]]) -> dict[tuple[str, int, int, str], float]:
    """In-process records/s by (backend, batch size, threads, request format)."""
    return {(m["backend"], m["batch_size"], m["threads"], m.get("format", "json")): m["records_per_s"] for m in measurements}


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = [s for s in SCENARIOS if any(p["scenario"] == s for p in result["points"])]
    figure, axes = plt.subplots(1, len(scenarios), figsize=(5 * len(scenarios), 4.2), squeeze=False)
    slo = result["settings"]["slo_p99_ms"]
    for axis, scenario in zip(axes[0], scenarios):
        for index, p in enumerate(x for x in result["points"] if x["scenario"] == scenario):
            steps = p["steps"]
            style = _LINE_STYLES[p["backend"]]
            axis.plot(
                [s["records_per_s"] for s in steps], [s["p99_ms"] for s in steps], style, marker="o", markersize=3,
                color=f"C{index}", label=f"{p['backend']} {p['batching']} w{p['workers']}",
            )  # fmt: skip
        axis.axhline(slo, color="red", linewidth=0.8, label=f"SLO p99 {slo:g} ms")
        axis.set_yscale("log")
        axis.set_xlabel("records / s (served)")
        axis.set_ylabel("p99 latency (ms)")
        axis.set_title(f"{scenario}: each dot one load step", fontsize=9)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=6)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_soak(soak: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 3.5))
    for key, label in (("frontend_rss_mb", "frontend (JVM)"), ("workers_rss_mb", "workers (Python)")):
        values = [(s["t"], s[key]) for s in soak["memory"] if key in s]
        if values:
            axis.plot(*zip(*values), label=label)
    axis.set_xlabel("seconds")
    axis.set_ylabel("RSS (MB)")
    axis.set_title(f"soak: {soak['archive']}, {soak['records_per_s']:,.0f} records/s, {soak['failed_requests']} failed", fontsize=9)
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# --------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serving", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "export_dir", type=Path, metavar="EXPORT_DIR", help="export dir (model.ts.pt, model.onnx, features.json; model.pt2 when exported)"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument(
        "--backends",
        default=None,
        help=f"comma-separated: {', '.join(BACKENDS)} (default: all; pt2 only when EXPORT_DIR has {ARTIFACTS['pt2']})",
    )
    parser.add_argument("--step-time", type=float, default=3.0, help="seconds per load step")
    parser.add_argument("--slo-p99-ms", type=float, default=DEFAULT_SLO_P99_MS)
    parser.add_argument("--quick", action="store_true", help="fewer points (batching off vs on-32 for single records, 1 worker)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="request shapes to sweep: " + ", ".join(SCENARIOS))
    parser.add_argument("--no-sweep", action="store_true", help="skip the sweep (faults / soak only)")
    parser.add_argument(
        "--ts-option", action="append", default=[], metavar="KEY=VALUE", help="override a config.properties setting (repeatable)"
    )
    parser.add_argument("--faults", action="store_true", help="also kill a worker mid-load")
    parser.add_argument("--soak-seconds", type=float, default=0.0, help="also run a steady soak this many seconds long (make bench-serving: 600)")
    args = parser.parse_args(argv)
    args.scenarios = comma_choices(parser, "--scenarios", args.scenarios, SCENARIOS)
    if not (args.export_dir / FEATURES_FILE).is_file():
        parser.error(f"{args.export_dir}: no features.json (an export dir from `python -m export`)")
    if args.backends is None:
        args.backends = default_backends(args.export_dir)
    else:
        args.backends = comma_choices(parser, "--backends", args.backends, BACKENDS)
        missing = [backend for backend in args.backends if not (args.export_dir / ARTIFACTS[backend]).is_file()]
        if missing:
            parser.error(f"--backends {missing[0]}: {args.export_dir / ARTIFACTS[missing[0]]} not found")
    malformed = [option for option in args.ts_option if "=" not in option]
    if malformed:
        parser.error(f"--ts-option: expected KEY=VALUE, got {malformed[0]!r}")
    args.ts_option = dict(option.split("=", 1) for option in args.ts_option)
    if args.step_time < 1:
        parser.error(f"--step-time must be >= 1 second, got {args.step_time}")
    if args.soak_seconds < 0:
        parser.error(f"--soak-seconds must be >= 0, got {args.soak_seconds}")
    return args


def default_backends(export_dir: Path, *, log: Callable[[str], None] = print) -> tuple[str, ...]:
    """Every backend; ``pt2`` only when ``export_dir`` has its artifact (``python -m export --formats ...,pt2``)."""
    pt2 = export_dir / ARTIFACTS["pt2"]
    if pt2.is_file():
        return BACKENDS
    log(f"backends: pt2 left out ({pt2} not found; export with --formats torchscript,onnx,pt2 to serve it)")
    return tuple(backend for backend in BACKENDS if backend != "pt2")


def run(
    args: argparse.Namespace, *, log: Callable[[str], None] = print, save: Callable[[dict[str, Any]], None] = lambda result: None
) -> dict[str, Any]:
    """The whole benchmark; ``save`` gets the result so far after every measurement (a long run keeps its figures)."""
    features = args.export_dir / FEATURES_FILE
    points = [] if args.no_sweep else [p for p in sweep_points(args.backends, quick=args.quick) if p.scenario in args.scenarios]
    result: dict[str, Any] = {
        "export_dir": str(args.export_dir.resolve()),
        "machine": machine(),
        "settings": {
            "step_time_s": args.step_time,
            "slo_p99_ms": args.slo_p99_ms,
            "config_overrides": args.ts_option,
            "scenarios": {k: asdict(v) for k, v in SCENARIOS.items()},
        },
        "command": "python -m benchmarks.serving " + " ".join(sys.argv[1:]),
        "points": [],
    }
    log("in-process limit (encode + infer) ...")
    cells = in_process_cells(args.scenarios)
    result["in_process"] = [
        m for threads in (1, 2) for m in in_process_limits(args.export_dir, backends=args.backends, cells=cells, threads=threads)
    ]
    for m in result["in_process"]:
        log(
            f"  {m['backend']:12s} {m['format']:5s} batch {m['batch_size']:4d} threads {m['threads']}: {m['records_per_s']:10,.0f} records/s"
        )
    result["export_benchmark"] = export_benchmark_figures()
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as scratch:
        store = Path(scratch) / "model_store"
        batchings = sorted({p.batching for p in points} | ({"on-32"} if args.faults or args.soak_seconds else set()))
        build_store(args.export_dir, store, backends=args.backends, batchings=batchings)
        with running_torchserve(Path(scratch) / "server", model_store=store, overrides=args.ts_option, timeout=240) as server:
            for (backend, batching), group in _grouped(points):
                name = archive_name(backend, batching)
                register(server, name, workers=1)
                for point in group:
                    if len(worker_pids(server, name)) != point.workers:
                        scale(server, name, workers=point.workers)
                    figures = measure_point(server, point, features=features, out=args.out, step_time=args.step_time, slo_p99_ms=args.slo_p99_ms)
                    result["points"].append(figures)
                    save(result)
                    log(
                        f"{backend:12s} {batching:6s} w{point.workers} {point.scenario:17s} max {figures['max_records_per_s']:10,.0f} rec/s "
                        f"(p99 {figures['p99_ms_at_max']} ms)  capacity@SLO {figures['capacity_records_per_s']:10,.0f}  "
                        f"failures {figures['failures']} (retried {figures['retries']['total']})  generator {figures['generator_cores']} cores, server {figures['server_cores']}"
                    )
                unregister(server, name)
            if args.faults:
                name = archive_name(args.backends[0], "on-32")
                register(server, name, workers=2)
                result["faults"] = kill_worker_run(server, name=name, features=features, out=args.out)
                log(f"kill a worker: {json.dumps({k: v for k, v in result['faults'].items() if k != 'timeline'})}")
                save(result)
                unregister(server, name)
            if args.soak_seconds:
                name = archive_name(args.backends[0], "on-32")
                register(server, name, workers=1)
                result["soak"] = soak_run(server, name=name, features=features, out=args.out, seconds=args.soak_seconds)
                log(f"soak: {json.dumps({k: v for k, v in result['soak'].items() if k != 'memory'})}")
                unregister(server, name)
    result["checks"] = checks(result)
    return result


def _grouped(points: Sequence[Point]) -> Iterator[tuple[tuple[str, str], list[Point]]]:
    """Points sharing an archive, fewest workers first: one registration each."""
    groups: dict[tuple[str, str], list[Point]] = {}
    for point in points:
        groups.setdefault((point.backend, point.batching), []).append(point)
    for key, group in groups.items():
        yield key, sorted(group, key=lambda p: p.workers)


def checks(result: dict[str, Any]) -> dict[str, str]:
    """Headline ratios from the points: batching on vs off for single-record clients
    (max records/s), and ranking's served records/s (JSON, Arrow IPC) as a share of the
    in-process limit of the same request format."""
    found: dict[str, str] = {}
    by_key = {(p["backend"], p["batching"], p["workers"], p["scenario"]): p for p in result["points"]}
    limits = in_process_index(result["in_process"])
    for backend in BACKENDS:
        off = by_key.get((backend, "off", 1, "single"))
        on = [by_key[k] for k in by_key if k[0] == backend and k[1] != "off" and k[2] == 1 and k[3] == "single"]
        if off and on:
            best = max(on, key=lambda p: p["max_records_per_s"])
            ratio = best["max_records_per_s"] / max(off["max_records_per_s"], 1e-9)
            found[f"batching on vs off, {backend}, single-record clients, 1 worker"] = (
                f"{ratio:.1f}x max records/s: {best['max_records_per_s']:,.0f} ({best['batching']}) "
                f"vs {off['max_records_per_s']:,.0f} (off)"
            )
        for scenario, label in (("ranking-256", ""), ("ranking-256-arrow", " as Arrow IPC")):
            request_format = SCENARIOS[scenario].request_format
            for workers in (1, 2):
                candidates = [p for k, p in by_key.items() if k[0] == backend and k[2] == workers and k[3] == scenario]
                ranking = max(candidates, key=lambda p: p["max_records_per_s"]) if candidates else None
                limit = limits.get((backend, 256, workers, request_format))
                if ranking and limit:
                    share = ranking["max_records_per_s"] / limit
                    found[f"ranking 256 candidates{label}, {backend}, {workers} worker(s)"] = (
                        f"{ranking['max_records_per_s']:,.0f} records/s (batching {ranking['batching']}) = {share:.0%} of in-process "
                        f"parse+encode+infer at batch 256, {request_format} ({limit:,.0f} records/s, {workers} thread(s))"
                    )
    return found


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    # A plain kill (SIGTERM) unwinds like Ctrl-C, so the TorchServe started here is stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))

    def save(result: dict[str, Any]) -> None:
        (args.out / "serving.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")

    result = run(args, log=lambda line: print(line, flush=True), save=save)
    save(result)
    (args.out / "serving.md").write_text(markdown(result), encoding="utf-8")
    if result["points"]:
        plot(result, args.out / "serving.png")
    if result.get("soak"):
        plot_soak(result["soak"], args.out / "soak.png")
    print(markdown(result))
    print(f"wrote {args.out}/serving.json, serving.md, serving.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
