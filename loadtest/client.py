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

Example::

    python -m loadtest.client --model dlrm=runs/dlrm/export --model widedeep=runs/widedeep/export
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.client", description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append", required=True, metavar="NAME=EXPORT_DIR",
                        help="a served model and the export dir its archive was built from; repeatable")
    parser.add_argument("--config", type=Path, default=Path("config.properties"))
    parser.add_argument("--workdir", type=Path, default=Path("."), help="where TorchServe wrote key_file.json")
    parser.add_argument("--records", type=int, default=64)
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)

    server = server_from_config(args.config, args.workdir)
    worst = 0.0
    try:
        for entry in args.model:
            name, _, export_dir = entry.partition("=")
            worst = max(worst, check_model(server, name, Path(export_dir), records=args.records,
                                           candidates=args.candidates, seed=args.seed))
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
