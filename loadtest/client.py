"""``python -m loadtest.client``: score records over REST and check them against in-process scores.

Talks to a TorchServe started from this directory (``make serve``): the
addresses come from ``config.properties`` and the token from the
``key_file.json`` TorchServe wrote, refreshed through the token API when it
has expired; a request whose worker died under it is sent once more
(:mod:`loadtest.resilience`). For each model it

1. scores records sampled from the model's FeatureSpec, as ``{"instances": [...]}``
   and again as an Arrow IPC stream (:class:`loadtest.scoring_client.Client`),
2. ranks candidates (shared ``context`` + ``candidates`` + ``top_k``),
3. scores the same records in-process (FeatureSpec + the exported TorchScript
   artifact) and prints the largest difference.

For a recommend archive (``--recommend NAME=MAR``) it asks for a user's 10
best items out of the catalogue and compares them with the answer of the
same archive's pipeline run in-process (:class:`handlers.recommend.Recommender`).

Example::

    python -m loadtest.client --model dlrm=runs/dlrm/export --model widedeep=runs/widedeep/export \
        --recommend recommender=model_store/recommender.mar
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from loadtest.scoring_client import Client, ScoringError
from loadtest.torchserve import Server, ServerError, read_properties

TOLERANCE = 1e-5


def server_from_config(config: Path, workdir: Path) -> Server:
    properties = read_properties(config)
    urls = {api: properties[f"{api}_address"] for api in ("inference", "management", "metrics")}
    return Server(workdir=workdir, urls=urls)


def in_process_scores(export_dir: Path, records: list[dict[str, Any]], *, context: dict[str, Any] | None = None) -> np.ndarray:
    """Scores of the exported TorchScript artifact, encoded exactly as the handler encodes."""
    import torch

    from featurespec import FEATURES_FILE, FeatureSpec

    spec = FeatureSpec.load(export_dir / FEATURES_FILE)
    module = torch.jit.load(str(export_dir / "model.ts.pt"))
    dense, sparse = spec.encode_records(records, base=context)
    with torch.inference_mode():
        return module(torch.from_numpy(dense), torch.from_numpy(sparse)).numpy()


def check_model(server: Server, name: str, export_dir: Path, *, records: int, candidates: int, seed: int) -> float:
    """Score (as JSON, then as Arrow IPC) and rank over REST; returns the largest |served - in-process| difference."""
    from export.records import sample_records
    from featurespec import FEATURES_FILE, FeatureSpec

    spec = FeatureSpec.load(export_dir / FEATURES_FILE)
    instances = sample_records(spec, records, seed=seed)
    expected = in_process_scores(export_dir, instances)
    as_json = Client.for_server(server, name, arrow_from_rows=records + 1)
    as_arrow = Client.for_server(server, name, arrow_from_rows=1)

    served = as_json.score(instances)
    print(f"\nPOST /predictions/{name}  ({records} instances, JSON)")
    for record, score in list(zip(instances, served))[:3]:
        shown = {key: record[key] for key in list(record)[:4]}
        print(f"  {json.dumps(shown)[:70]:<72} -> {score:.6f}")
    print(f"  ... {records} scores, max |served - in-process| = {np.abs(served - expected).max():.2e}")
    served_arrow = as_arrow.score(instances)
    print(f"POST /predictions/{name}  (the same {records} records as an Arrow IPC stream, answered in Arrow)")
    print(f"  max |served - in-process| = {np.abs(served_arrow - expected).max():.2e}")

    # Ranking: one user's context shared by every candidate item.
    pool = sample_records(spec, candidates + 1, seed=seed + 1)
    context_keys = [f.name for f in spec.dense]
    context = {key: pool[0][key] for key in context_keys if key in pool[0]}
    items = [{k: v for k, v in record.items() if k not in context_keys} for record in pool[1:]]
    ranking = as_json.rank(context, items, top_k=5)
    expected_ranked = in_process_scores(export_dir, items, context=context)
    print(f"POST /predictions/{name}  (ranking {candidates} candidates, top_k 5)")
    for index, score in zip(ranking.indices.tolist(), ranking.scores.tolist()):
        print(f"  candidate {index:>4}  score {score:.6f}")
    best = np.argsort(-expected_ranked, kind="stable")[:5]
    same_order = ranking.indices.tolist() == best.tolist()
    print(f"  in-process top 5: {best.tolist()} ({'same order' if same_order else 'DIFFERENT ORDER'})")
    ranked_diff = np.abs(ranking.scores - expected_ranked[ranking.indices]).max()
    differences = (np.abs(served - expected).max(), np.abs(served_arrow - expected).max(), ranked_diff)
    return float(max(*differences, 0.0 if same_order else 1.0))



def check_recommender(server: Server, name: str, archive: Path, *, seed: int) -> float:
    """One recommend call over REST; returns the largest |served - in-process| score (1.0 if the items differ)."""
    from export.records import sample_records
    from featurespec import FeatureSpec
    from handlers.recommend import HISTORY_FEATURE, USER_FEATURES_FILE, Recommender, RecommendLimits
    from handlers.request import Limits

    with tempfile.TemporaryDirectory(prefix="recommender_") as unpacked:
        with zipfile.ZipFile(archive) as packed:
            packed.extractall(unpacked)
            manifest = json.loads(packed.read("MAR-INF/MANIFEST.json"))
            settings = (yaml.safe_load(packed.read("model-config.yaml")) or {}).get("handler") or {}
        recommend_limits = RecommendLimits.from_handler_config(settings)
        recommender = Recommender.load(  # with the archive's own limits, as its workers run it
            unpacked,
            ranker_file=manifest["model"]["serializedFile"],
            limits=Limits.from_handler_config(settings),
            recommend_limits=recommend_limits,
        )
        user_spec = FeatureSpec.load(Path(unpacked) / USER_FEATURES_FILE)
        (user,) = sample_records(user_spec, 1, seed=seed)
        catalogue = recommender.catalogue.ids
        length = min(5, recommend_limits.max_history)
        history = [int(item) for item in catalogue[:: max(1, len(catalogue) // length)][:length]]
        body = {  # the archive's default number of candidates
            "user": {key: value for key, value in user.items() if key != HISTORY_FEATURE},
            "history": history,
            "k": min(5, recommend_limits.default_candidates),
            "exclude": [int(catalogue[-1])],
        }
        expected = recommender.recommend(json.dumps(body).encode("utf-8"))["items"]
    reply = server.predict(name, body)
    if reply.status != 200:
        raise ServerError(f"recommend request to {name} -> {reply.status}: {reply.body[:300]!r}")
    served = reply.json()["items"]
    print(f"\nPOST /predictions/{name}  (recommend: a history of {len(history)} items, "
          f"{recommend_limits.default_candidates} candidates, k {body['k']})")
    print(f"  user {json.dumps(body['user'])[:90]}")
    for item in served:
        print(f"  item {item['id']:>6}  score {item['score']:.6f}  retrieval score {item['retrieval_score']:.4f}")
    same_items = [item["id"] for item in served] == [item["id"] for item in expected]
    print(f"  in-process: {[item['id'] for item in expected]} ({'same items' if same_items else 'DIFFERENT ITEMS'})")
    if not same_items:
        return 1.0
    return max(abs(a["score"] - b["score"]) for a, b in zip(served, expected))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.client", description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append", default=[], metavar="NAME=EXPORT_DIR",
                        help="a served model and the export dir its archive was built from; repeatable")
    parser.add_argument("--recommend", action="append", default=[], metavar="NAME=MAR",
                        help="a served recommend archive and its .mar file; repeatable")
    parser.add_argument("--config", type=Path, default=Path("config.properties"))
    parser.add_argument("--workdir", type=Path, default=Path("."), help="where TorchServe wrote key_file.json")
    parser.add_argument("--records", type=int, default=64)
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    if not args.model and not args.recommend:
        parser.error("name at least one --model or --recommend")

    server = server_from_config(args.config, args.workdir)
    worst = 0.0
    try:
        for entry in args.model:
            name, _, export_dir = entry.partition("=")
            worst = max(worst, check_model(server, name, Path(export_dir), records=args.records,
                                           candidates=args.candidates, seed=args.seed))
        for entry in args.recommend:
            name, _, archive = entry.partition("=")
            worst = max(worst, check_recommender(server, name, Path(archive), seed=args.seed))
    except (ScoringError, ServerError, OSError, KeyError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if server.retries:
        print("\nretried: " + ", ".join(f"{reason} x{count}" for reason, count in sorted(server.retries.items())))
    verdict = "OK" if worst <= TOLERANCE else "MISMATCH"
    print(f"\n{verdict}: served scores equal in-process scores (max difference {worst:.2e}, tolerance {TOLERANCE:g})")
    return 0 if worst <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
