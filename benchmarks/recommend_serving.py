"""A recommend archive served by TorchServe over a synthetic catalogue of 100,000 items: latency and capacity.

``python -m benchmarks.recommend_serving [--items 100000] [--out results/recommend_serving]``

Runs, as a user would, each step's own command (printed as it runs):

1. ``python -m training --model twotower --data synthetic-useritem --items N`` and
   ``python -m training --model dlrm --data synthetic-useritem --items N``: both trained briefly
   (``--epochs``), since latency does not depend on quality; the two towers' recall@100 over the
   full catalogue is reported all the same;
2. ``python -m export.retrieval`` (its index table: each candidate's recall@100 against exact search
   and query ms, and the one chosen) and ``python -m export --formats onnx``;
3. ``python -m export.archive RANKER --retrieval RETRIEVAL --backend onnx``, served by a real
   TorchServe with 1 worker and 1 intra-op thread;
4. (a) a sequential client: one recommend request in flight, ``--requests`` after ``--warmup``,
   each answer checked as the Locust task checks it; p50/p99 latency;
   (b) Locust's ``recommend`` task (:mod:`loadtest.locustfile`, ``--mix recommend=1``), stepped
   users: requests/s, items ranked/s and p50/p99 per step.

Every request asks for ``k`` 10 out of ``candidates`` 200 (``--k``, ``--candidates``), with 0-20
history and 0-5 exclude ids of the catalogue. Writes ``OUT/recommend_serving.md``, ``.json`` and
``.png`` (latency and throughput by users). About 8-9 minutes on 2 cores, most of it training (the
data of 100,000 items alone takes about a minute and 6 GB to generate, once per model).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import Timing, machine_header
from benchmarks.recommend import combined_dir
from benchmarks.serving import machine, run_locust
from featurespec import FeatureSpec
from handlers.memory import settle_for_scoring
from handlers.recommend import Recommender, RecommendLimits
from handlers.request import Limits
from handlers.retrieval_index import CATALOGUE_FILE, REPORT_FILE, USER_FEATURES_FILE
from loadtest.torchserve import REPO_ROOT, running_torchserve
from loadtest.workload import RECOMMEND, build_pools, catalogue_ids, check_answer

MODEL_NAME = "recommender"
RANKER_FILE = "model.onnx"
RECALL_TARGET = 0.95  # export.retrieval's default: the least recall@100 of an approximate index


def step(command: Sequence[str], *, log: Path) -> float:
    """Run one of the user's commands (``python -m ...``), its output in ``log``; seconds it took."""
    print("$ python -m " + " ".join(command[2:]), flush=True)
    started = time.perf_counter()
    with open(log, "w", encoding="utf-8") as output:
        finished = subprocess.run(command, stdout=output, stderr=subprocess.STDOUT, cwd=REPO_ROOT, check=False)
    if finished.returncode != 0:
        raise RuntimeError(f"{' '.join(command[2:])} exited {finished.returncode}; see {log}")
    return time.perf_counter() - started


def model_name(delay_ms: int, delays_ms: Sequence[int]) -> str:
    """The archive of the first batch delay is ``recommender``; the others carry their delay in the name."""
    return MODEL_NAME if delay_ms == delays_ms[0] else f"{MODEL_NAME}_delay{delay_ms}"


def build(
    work: Path, *, items: int, epochs: int, eval_users: int, candidates: int, delays_ms: Sequence[int],
    reuse_models: bool = False,
) -> dict[str, Any]:
    """Train, export and archive both models under ``work`` (one archive per batch delay); what each step
    reported and took. ``reuse_models`` keeps the exports an earlier run left in ``work``."""
    python = [sys.executable, "-m"]
    data = ["--data", "synthetic-useritem", "--items", str(items), "--eval-users", str(eval_users), "--no-baselines",
            "--quiet", "--epochs", str(epochs)]
    seconds: dict[str, float] = {}
    if not (reuse_models and (work / "retrieval" / REPORT_FILE).is_file() and (work / "ranker" / RANKER_FILE).is_file()):
        seconds = {
            "train two towers": step([*python, "training", "--model", "twotower", *data, "--out", str(work / "tt")],
                                     log=work / "train_twotower.log"),
            "train dlrm": step([*python, "training", "--model", "dlrm", *data, "--out", str(work / "dlrm")],
                               log=work / "train_dlrm.log"),
            "export retrieval": step([*python, "export.retrieval", str(work / "tt"), "--out", str(work / "retrieval"),
                                      "--recall-target", str(RECALL_TARGET)], log=work / "export_retrieval.log"),
            "export dlrm": step([*python, "export", str(work / "dlrm"), "--out", str(work / "ranker"), "--formats",
                                 "onnx", "--threads", "1"], log=work / "export_dlrm.log"),
        }
    for delay in delays_ms:
        name = model_name(delay, delays_ms)
        seconds[f"archive {name}"] = step(
            [*python, "export.archive", str(work / "ranker"), "--retrieval", str(work / "retrieval"), "--name", name,
             "--backend", "onnx", "--model-store", str(work / "model_store"), "--max-candidates", str(candidates),
             "--default-candidates", str(candidates), "--max-batch-delay", str(delay), "--threads", "1",
             "--min-workers", "1", "--max-workers", "1", "--force"], log=work / f"archive_{name}.log")
    retrieval_metrics = json.loads((work / "tt" / "metrics.json").read_text(encoding="utf-8"))
    report = json.loads((work / "retrieval" / REPORT_FILE).read_text(encoding="utf-8"))
    return {"seconds": {name: round(value, 1) for name, value in seconds.items()},
            "two_towers": retrieval_metrics["ranking_full_catalogue"], "index": report["index"]}


def sequential_latency(
    calls: Mapping[str, Callable[[Any], bytes]], bodies: Sequence[Any], *, warmup: int, requests: int
) -> dict[str, dict[str, Any]]:
    """One request in flight at a time, the ways of answering (``calls``: a body -> the answer's JSON bytes)
    taking turns request by request, so that machine noise hits each alike; every answer checked."""
    latencies: dict[str, list[float]] = {name: [] for name in calls}
    for turn in range(warmup + requests):
        body = bodies[turn % len(bodies)]
        names = list(calls)
        for name in names[turn % len(names):] + names[: turn % len(names)]:  # rotated: none always goes first
            started = time.perf_counter()
            answer = calls[name](body.data)
            elapsed_ms = (time.perf_counter() - started) * 1e3
            problem = check_answer(body, None, answer)
            if problem:
                raise RuntimeError(f"{name}, request {turn}: {problem}")
            if turn >= warmup:
                latencies[name].append(elapsed_ms)
    results = {}
    for name, values in latencies.items():
        timing = Timing.of(np.asarray(values))
        results[name] = {"requests": requests, "warmup": warmup, "p50_ms": round(timing.median_ms, 2),
                         "p75_ms": round(timing.p75_ms, 2), "p99_ms": round(timing.p99_ms, 2),
                         "requests_per_s": round(1e3 * requests / sum(values), 1)}
    return results


def served(server: Any, name: str) -> Callable[[Any], bytes]:
    def call(body: Any) -> bytes:
        # The client keeps no headers: the answer is read as JSON, the only form a recommend call answers in.
        reply = server.predict(name, body)
        if reply.status != 200:
            raise RuntimeError(f"{name}: status {reply.status}: {reply.body[:200]!r}")
        return reply.body

    return call


def in_process(work: Path, candidates: int) -> Callable[[Any], bytes]:
    """The archive's pipeline (:class:`handlers.recommend.Recommender`) called in this process, 1 thread."""
    with tempfile.TemporaryDirectory(prefix="recommend-") as staging:  # everything is read while loading
        recommender = Recommender.load(
            combined_dir(work / "ranker", work / "retrieval", ranker_file=RANKER_FILE, into=Path(staging)),
            ranker_file=RANKER_FILE, threads=1, limits=Limits(max_candidates=candidates),
            recommend_limits=RecommendLimits(default_candidates=candidates),
        )
    return lambda body: json.dumps(recommender.recommend(body)).encode()


def markdown(result: dict[str, Any]) -> str:
    settings = result["settings"]
    two_towers = result["build"]["two_towers"]
    index = result["build"]["index"]
    chosen = next(row for row in index["candidates"] if row["name"] == index["chosen"]["name"])
    lines = [
        f"Recommend archive (two towers + FAISS index + DLRM ranker, ONNX) served by TorchServe 0.12, 1 worker, "
        f"1 intra-op thread; synthetic-useritem, {settings['items']:,} catalogue items; every request: k "
        f"{settings['k']} of {settings['candidates']} candidates, 0-20 history and 0-5 exclude ids. Models trained "
        f"{settings['epochs']} epoch(s): two towers' recall@100 over the full catalogue "
        f"{two_towers.get('recall@100', float('nan')):.4f} ({settings['eval_users']} test users). "
        "The machine is shared: other jobs may have run beside this one.",
        "",
        f"Index ({index['protocol']}); chosen: **{chosen['name']}**, recall@100 {chosen['recall_at_k']:.4f} "
        f"(the fastest with recall@100 >= {index['recall_target']}).",
        "",
        "| index | recall@100 vs exact | query ms (median) |",
        "| --- | ---: | ---: |",
    ]
    lines += [f"| {row['name']} | {row['recall_at_k']:.4f} | {row['query_ms_median']:.4f} |" for row in index["candidates"]]
    sequential = result["sequential"]
    first = next(iter(sequential.values()))
    lines += [
        "",
        f"One request in flight ({first['requests']} requests after {first['warmup']} warm-up; the ways below take "
        "turns request by request; in process: the archive's pipeline called in the benchmark's process):",
        "",
        "| answered by | p50 ms | p75 ms | p99 ms | requests/s |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    lines += [f"| {name} | {row['p50_ms']} | {row['p75_ms']} | {row['p99_ms']} | {row['requests_per_s']} |"
              for name, row in sequential.items()]
    lines += [
        "",
        f"Locust, maxBatchDelay {settings['locust_batch_delay_ms']} ms:",
        "",
        "| Locust users | requests/s | items ranked/s | p50 ms | p99 ms | failures |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += [f"| {row['users']} | {row['requests_per_s']:.1f} | {row['records_per_s']:.0f} | {row['p50_ms']} | "
              f"{row['p99_ms']} | {row['failures']} |" for row in result["locust"]["steps"]]
    lines += ["", machine_header(result["machine"])]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = result["locust"]["steps"]
    users = [row["users"] for row in steps]
    figure, (latency, throughput) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("p50_ms", "p50"), ("p99_ms", "p99")):
        latency.plot(users, [row[key] for row in steps], marker="o", label=label)
    latency.set(xlabel="Locust users", ylabel="ms per recommend call", title="latency by users")
    latency.legend()
    throughput.plot(users, [row["requests_per_s"] for row in steps], marker="o")
    throughput.set(xlabel="Locust users", ylabel="requests/s", title="throughput by users")
    figure.suptitle(f"recommend, {result['settings']['items']:,} items, 1 worker x 1 thread")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    built = build(work, items=args.items, epochs=args.epochs, eval_users=args.eval_users, candidates=args.candidates,
                  delays_ms=args.batch_delays, reuse_models=args.reuse_models)
    for row in built["index"]["candidates"]:
        print(f"  index {row['name']:22} recall@100 {row['recall_at_k']:.4f}  query {row['query_ms_median']:.4f} ms")
    print(f"  chosen: {built['index']['chosen']['name']}; two towers' recall@100 "
          f"{built['two_towers'].get('recall@100')}", flush=True)
    user_features = work / "retrieval" / USER_FEATURES_FILE
    catalogue = catalogue_ids(user_features, catalogue=str(work / "retrieval" / CATALOGUE_FILE))
    (bodies,) = build_pools(FeatureSpec.load(user_features), size=256, instances=(1, 1),
                            candidates=(args.candidates, args.candidates), top_k=args.k, seed=0, kinds=(RECOMMEND,),
                            catalogue=catalogue).values()
    names = {delay: model_name(delay, args.batch_delays) for delay in args.batch_delays}
    with running_torchserve(work / "server", model_store=work / "model_store", models=list(names.values()),
                            timeout=300) as server:
        calls = {f"served, maxBatchDelay {delay} ms": served(server, name) for delay, name in names.items()}
        calls["in process"] = in_process(work, args.candidates)
        settle_for_scoring()
        sequential = sequential_latency(calls, bodies, warmup=args.warmup, requests=args.requests)
        for name, row in sequential.items():
            print(f"  one in flight, {name}: p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms", flush=True)
        locust_model = names[args.batch_delays[0]]
        summary = run_locust(
            server, model=locust_model, features=user_features, out_prefix=args.out / "locust",
            options=["--mix", f"{RECOMMEND}=1", "--candidates", str(args.candidates), "--top-k", str(args.k),
                     "--slo-p99-ms", "60000"],  # a report of what was measured, no gate
            run_time=args.step_time * args.max_users / args.step_users, users=args.max_users,
            step_users=args.step_users, step_time=args.step_time, pool_size=256,
        )
    return {
        "settings": {"items": args.items, "epochs": args.epochs, "eval_users": args.eval_users, "k": args.k,
                     "candidates": args.candidates, "workers": 1, "threads": 1, "step_users": args.step_users,
                     "step_time_s": args.step_time, "max_users": args.max_users,
                     "batch_delays_ms": args.batch_delays, "locust_batch_delay_ms": args.batch_delays[0]},
        "build": built,
        "sequential": sequential,
        "locust": {"steps": summary["steps"], "total": summary["inference"], "retries": summary["retries"]},
        "machine": machine(),
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.recommend_serving", description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=100_000, help="catalogue items of the synthetic data")
    parser.add_argument("--epochs", type=int, default=2, help="training epochs of both models")
    parser.add_argument("--eval-users", type=int, default=100, help="test users of the full-catalogue evaluation")
    parser.add_argument("--k", type=int, default=10, help="items per answer")
    parser.add_argument("--candidates", type=int, default=200, help="items retrieved and ranked per request")
    parser.add_argument("--warmup", type=int, default=50, help="sequential requests before timing")
    parser.add_argument("--requests", type=int, default=300, help="sequential requests timed")
    parser.add_argument("--step-users", type=int, default=4, help="Locust users added per step")
    parser.add_argument("--max-users", type=int, default=24, help="Locust users of the last step")
    parser.add_argument("--step-time", type=float, default=10.0, help="seconds per Locust step")
    parser.add_argument("--batch-delays", default="5,1",
                        help="comma-separated maxBatchDelay values (ms), one archive each; Locust loads the first")
    parser.add_argument("--work", type=Path, help="keep the checkpoints, exports and archive here (default: a temp dir)")
    parser.add_argument("--reuse-models", action="store_true",
                        help="keep the models and exports an earlier run left in --work (only the archives are rebuilt)")
    parser.add_argument("--out", type=Path, default=Path("results/recommend_serving"))
    args = parser.parse_args(argv)
    if args.reuse_models and args.work is None:
        parser.error("--reuse-models needs --work")
    for name in ("items", "epochs", "eval_users", "k", "candidates", "requests", "step_users", "max_users"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    try:
        args.batch_delays = [int(value) for value in args.batch_delays.split(",")]
    except ValueError:
        parser.error(f"--batch-delays must be comma-separated integers, got {args.batch_delays!r}")
    if any(delay < 0 for delay in args.batch_delays) or len(set(args.batch_delays)) != len(args.batch_delays):
        parser.error(f"--batch-delays must be distinct integers >= 0, got {args.batch_delays}")
    if args.k > args.candidates:
        parser.error(f"--k must be <= --candidates, got {args.k} > {args.candidates}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="recommend_serving-") as scratch:
        work = args.work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        result = run(args, work.resolve())
    (args.out / "recommend_serving.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    table = markdown(result)
    (args.out / "recommend_serving.md").write_text(table + "\n", encoding="utf-8")
    plot(result, args.out / "recommend_serving.png")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
