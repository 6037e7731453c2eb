"""Recommend from the catalogue in one call: request validation, the pipeline against a plain
re-computation, the handler in-process, and one archive served by a real TorchServe.

One tiny two-tower retrieval export and one tiny DLRM export, both trained for an epoch on the
conftest MovieLens files (4 users, 5 movies), are shared by the module.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import yaml
from ts.context import Context, RequestProcessor

from export.archive import ServingConfig, build_archive
from featurespec import FeatureSpec, StringColumn
from handlers.backends import load_backend
from handlers.recommend import (
    CATALOGUE_FILE,
    RETRIEVAL_FILES,
    Recommender,
    RecommendLimits,
    parse_item_ids,
    read_catalogue,
)
from handlers.recommend_handler import RecommendHandler
from handlers.request import Limits, RequestError
from loadtest.client import check_recommender
from loadtest.torchserve import METRICS_CONFIG, REPO_ROOT, running_torchserve

USER = {"user": "1", "age": "18", "gender": "M", "occupation": "technician", "zip_prefix": "857",
        "rated_before": 3, "liked_share": 0.5, "history_liked": ["1"]}
LIMITS = Limits(max_candidates=5)
RECOMMEND_LIMITS = RecommendLimits(default_candidates=4, max_exclude=3, max_history=3)


@pytest.fixture(scope="module")
def exports(tmp_path_factory, write_movielens) -> dict[str, Path]:
    """``{"retrieval", "ranker", "both", "data", "dlrm"}``: the two export dirs, one holding both (as an archive
    does), the MovieLens directory and the ranker's checkpoint."""
    from export.__main__ import main as export_ranker
    from export.retrieval import export_retrieval
    from training.retrieval import RetrievalOptions, train_retrieval
    from training.train import TrainOptions, train

    root = tmp_path_factory.mktemp("recommend")
    data = write_movielens("100k", root / "movielens")
    train_retrieval(RetrievalOptions(out=str(root / "tt"), data="movielens", data_path=str(data),
                                     split="leave-last-out", epochs=1, batch_size=2, embedding_dim=8, hidden=(8,), output_dim=8,
                                     baselines=False, threads=1, progress=False))
    export_retrieval(root / "tt", root / "retrieval")
    train(TrainOptions(model="dlrm", data="movielens", data_path=str(data), split="leave-last-out", epochs=1,
                       baselines=False, progress=False, threads=1, out=str(root / "dlrm")))
    assert export_ranker([str(root / "dlrm"), "--out", str(root / "ranker"), "--formats", "torchscript,onnx",
                          "--records", "4096", "--threads", "1"]) == 0
    both = root / "both"
    both.mkdir()
    for path in [root / "retrieval" / name for name in RETRIEVAL_FILES] + list((root / "ranker").iterdir()):
        shutil.copy(path, both)
    return {"retrieval": root / "retrieval", "ranker": root / "ranker", "both": both, "data": data,
            "dlrm": root / "dlrm"}


@pytest.fixture(scope="module")
def recommender(exports) -> Recommender:
    return Recommender.load(exports["both"], ranker_file="model.onnx", limits=LIMITS, recommend_limits=RECOMMEND_LIMITS)


def ranker_scores(directory: Path, user: dict, history: list[int], items: list[int]) -> dict[int, float]:
    """The ranker's score of each item, from whole records (user side + the item's catalogue row) encoded
    by its FeatureSpec: the plain computation the pipeline's column splicing must equal."""
    spec = FeatureSpec.load(directory / "features.json")
    ids, columns = read_catalogue(directory / CATALOGUE_FILE)
    item_side = {name: values for name, values in columns.items() if name in spec.feature_names}
    records = []
    for item in items:
        row = int(np.flatnonzero(ids == item)[0])
        record = {name: user[name] for name in user if name in spec.feature_names}
        record["history"] = [str(i) for i in history]
        for name, values in item_side.items():
            text = isinstance(values, StringColumn)
            value = values.take(np.array([row])).to_list()[0] if text else float(values[row])
            record[name] = None if isinstance(value, float) and np.isnan(value) else value
        records.append(record)
    dense, sparse = spec.encode_records(records)
    scores = load_backend(directory / "model.onnx", device="cpu", threads=1).predict(dense, sparse)
    return dict(zip(items, scores.tolist()))


# -- the request ------------------------------------------------------------------


@pytest.mark.parametrize(("body", "field", "problem"), [
    ([1], "body", r"expected a JSON object, got an array"),
    ({"user": USER, "kk": 3}, "kk", r"unexpected key in a recommend request \(expected candidates, exclude"),
    ({"user": {"favourite": "x"}}, "user.favourite", r"unknown user feature"),
    ({"user": {"genres": "Comedy"}}, "user.genres", r"an item feature: the catalogue supplies it"),
    ({"user": {"history": ["1"]}}, "user.history", r"top-level 'history' list"),
    ({"user": "1"}, "user", r"expected a JSON object of user features, got a string"),
    ({"user": {"rated_before": "many"}}, "user.rated_before", r"expected a number or null, got a string"),
    ({"user": {"age": [1.5]}}, "user.age", r"expected a string or integer"),
    ({"k": 0}, "k", r"must be in \[1, candidates = 4\], got 0"),
    ({"k": 5}, "k", r"must be in \[1, candidates = 4\], got 5"),
    ({"k": 3, "candidates": 2}, "k", r"must be in \[1, candidates = 2\], got 3"),
    ({"k": True}, "k", r"expected a positive integer, got a boolean"),
    ({"candidates": 6}, "candidates", r"must be in \[1, 5\], got 6"),
    ({"candidates": "all"}, "candidates", r"expected a positive integer, got a string"),
    ({"exclude": "1,2"}, "exclude", r"expected an array of item ids, got a string"),
    ({"exclude": [1, 2, 3, 4]}, "exclude", r"4 ids exceed the limit of 3 per request"),
    ({"history": [1, 2, 3, 4]}, "history", r"4 ids exceed the limit of 3 per request"),
    ({"history": [1, 2.5]}, "history[1]", r"expected an item id \(an integer or a string of digits\), got a number"),
    ({"exclude": ["7", "seven"]}, "exclude[1]", r"not an item id: 'seven'"),
    ({"exclude": [2**70]}, "exclude[0]", r"not an item id"),
    ({"items": [1, 99]}, "items[1]", r"item 99 is not in the catalogue"),
    ({"items": []}, "items", r"empty request: no items to rank"),
    ({"items": [1, 2, 3, 4, 5, 1]}, "items", r"6 ids exceed the limit of 5 per request"),
    ({"items": [1], "k": 1}, "k", r"unexpected key in a ranking request"),
    ({"items": [1], "top_k": 0}, "top_k", r"must be >= 1, got 0"),
])
def test_bad_requests_are_400s_naming_the_field(recommender, body, field, problem) -> None:
    with pytest.raises(RequestError) as raised:
        recommender.recommend(body)
    assert raised.value.status == 400 and raised.value.field == field
    assert re.search(problem, raised.value.problem), raised.value.problem


def test_item_ids_parse_as_integers_or_digit_strings() -> None:
    np.testing.assert_array_equal(parse_item_ids([3, "42", 7], "history", limit=5), [3, 42, 7])
    assert parse_item_ids([], "exclude", limit=5).dtype == np.int64


# -- the pipeline --------------------------------------------------------------------


@pytest.mark.parametrize(("history", "exclude"), [([], []), ([1], [2]), ([3, 4], [5]), (["2"], [1, 3, 4])])
def test_seen_and_excluded_items_never_come_back_and_k_is_respected(recommender, history, exclude) -> None:
    answer = recommender.recommend({"user": USER, "history": history, "exclude": exclude, "k": 2, "candidates": 4})
    ids = [item["id"] for item in answer["items"]]
    assert not {int(i) for i in history + exclude} & set(ids)
    assert len(ids) == min(2, 5 - len({int(i) for i in history + exclude}))
    scores = [item["score"] for item in answer["items"]]
    assert scores == sorted(scores, reverse=True)
    assert all(set(item) == {"id", "score", "retrieval_score"} for item in answer["items"])


def test_served_scores_are_the_rankers_scores_of_whole_records(recommender, exports) -> None:
    history = [1]
    answer = recommender.recommend({"user": USER, "history": history, "k": 4, "candidates": 4})
    ids = [item["id"] for item in answer["items"]]
    assert sorted(ids) == [2, 3, 4, 5]  # everything but the history: the catalogue has 5 items
    expected = ranker_scores(exports["both"], USER, history, ids)
    assert [item["score"] for item in answer["items"]] == pytest.approx([expected[i] for i in ids], abs=1e-6)


def test_the_index_proposes_what_the_tower_and_index_rank_first(recommender) -> None:
    """With fewer candidates than items, the ranker sees the index's best: retrieval scores say which."""
    full = recommender.recommend({"user": USER, "k": 5, "candidates": 5})
    by_retrieval = sorted(full["items"], key=lambda item: -item["retrieval_score"])
    two = recommender.recommend({"user": USER, "k": 2, "candidates": 2})
    assert {item["id"] for item in two["items"]} == {item["id"] for item in by_retrieval[:2]}


def test_ranking_given_items(recommender, exports) -> None:
    answer = recommender.recommend({"user": USER, "history": [1], "items": [5, 2, 4], "top_k": 2})
    expected = ranker_scores(exports["both"], USER, [1], [5, 2, 4])
    best = sorted(expected, key=lambda i: -expected[i])[:2]
    assert [item["id"] for item in answer["items"]] == best
    assert [item["score"] for item in answer["items"]] == pytest.approx([expected[i] for i in best], abs=1e-6)


def test_a_batch_answers_each_request_as_alone(recommender) -> None:
    bodies = [{"user": USER, "k": 3}, {"user": {"rated_before": "x"}}, {"user": USER, "items": [1, 2]},
              {"history": [2, 3], "exclude": [4], "k": 1}]
    alone = []
    for body in bodies:
        try:
            alone.append(recommender.recommend(body))
        except RequestError as error:
            alone.append(error.to_json())
    (only_bad,) = recommender.answer_batch([recommender.parse({"body": bodies[1]})])  # nothing left to run
    assert isinstance(only_bad, RequestError) and only_bad.field == "user.rated_before"
    together = recommender.answer_batch([recommender.parse({"body": body}) for body in bodies])
    assert isinstance(together[1], RequestError) and together[1].field == "user.rated_before"
    together[1] = together[1].to_json()
    for got, expected in zip(together, alone):
        if "items" not in expected:
            assert got == expected
            continue
        assert [item["id"] for item in got["items"]] == [item["id"] for item in expected["items"]]
        assert [item["score"] for item in got["items"]] == pytest.approx([item["score"] for item in expected["items"]],
                                                                         abs=1e-6)


def test_the_pipeline_never_imports_training_or_export(repo_root) -> None:
    code = "import sys, handlers.recommend; print(sorted(m for m in ('training', 'export') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=repo_root)
    assert result.stdout.strip() == "[]"


def test_evaluation_ranks_the_catalogue_as_training_evaluated_the_ranker(exports) -> None:
    from benchmarks.recommend import METHODS, evaluate

    result = evaluate(data_path=exports["data"], ranker=exports["ranker"], retrieval=exports["retrieval"],
                      split="leave-last-out", candidates=3)
    assert list(result["methods"]) == list(METHODS)
    trained = json.loads((exports["dlrm"] / "metrics.json").read_text())["ranking_full_catalogue"]
    exhaustive = result["methods"]["exhaustive ranking"]
    assert exhaustive["ndcg@10"] == pytest.approx(trained["ndcg@10"], abs=1e-6)
    assert exhaustive["hr@10"] == pytest.approx(trained["hr@10"], abs=1e-6)
    assert result["methods"]["retrieval + ranking"]["ranker_scores_per_request"] <= 3
    assert all(row["ms_per_request"]["median"] > 0 for row in result["methods"].values())


# -- the handler in-process ------------------------------------------------------------


def test_handler_answers_one_response_per_request_and_a_bad_one_fails_alone(exports, recommender) -> None:
    handler_config = {"max_candidates": 5, **asdict(RECOMMEND_LIMITS), "threads": 1}
    from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

    metrics = MetricsCacheYamlImpl(config_file_path=str(METRICS_CONFIG))
    metrics.initialize_cache()
    manifest = {"model": {"modelName": "rec", "modelVersion": "1.0", "serializedFile": "model.ts.pt"}}
    context = Context("rec", str(exports["both"]), manifest, 4, None, "0.12.0", metrics=metrics,
                      model_yaml_config={"handler": handler_config})
    handler = RecommendHandler()
    handler.initialize(context)
    bodies = [{"user": USER, "k": 2}, {"user": USER, "k": 9}, json.dumps({"history": ["3"], "k": 1}).encode()]
    context.request_processor = [RequestProcessor({}) for _ in bodies]
    context.request_ids = {index: f"request-{index}" for index in range(len(bodies))}
    outputs = handler.handle([{"body": body} for body in bodies], context)
    assert len(outputs) == 3
    statuses = [context.get_response_status(index)[0] for index in range(3)]
    replies = [json.loads(output) for output in outputs]
    assert statuses == [200, 400, 200]
    assert replies[1]["field"] == "k" and "candidates = 4" in replies[1]["problem"]
    # A TorchScript ranker here, ONNX in the fixture: the same model, so the same answers.
    for reply, body in ((replies[0], bodies[0]), (replies[2], {"history": ["3"], "k": 1})):
        expected = recommender.recommend(body)
        assert [item["id"] for item in reply["items"]] == [item["id"] for item in expected["items"]]
        assert [item["score"] for item in reply["items"]] == pytest.approx(
            [item["score"] for item in expected["items"]], abs=1e-5)


# -- the archive, served -----------------------------------------------------------------


@pytest.mark.slow
def test_recommend_archive_served_by_torchserve_answers_as_in_process(exports, recommender, tmp_path) -> None:
    store = tmp_path / "build"
    config = ServingConfig(max_candidates=5, max_batch_delay_ms=50)
    archive = build_archive(exports["ranker"], name="recommender", backend="onnx", model_store=store, config=config,
                            retrieval_dir=exports["retrieval"], recommend_limits=RECOMMEND_LIMITS)
    with zipfile.ZipFile(archive) as packed:
        names = set(packed.namelist())
        handler_section = yaml.safe_load(packed.read("model-config.yaml"))["handler"]
    assert {"recommend_handler.py", "model.onnx", "features.json", *RETRIEVAL_FILES} <= names
    assert not {"recommender_handler.py", "handlers/recommend_handler.py", "model.ts.pt"} & names
    assert handler_section["max_candidates"] == 5 and handler_section["default_candidates"] == 4
    assert handler_section["max_exclude"] == 3 and handler_section["max_history"] == 3

    clean = tmp_path / "clean_host"
    (clean / "model_store").mkdir(parents=True)
    shutil.copy(archive, clean / "model_store")  # the archive alone: no repository beside it
    body = {"user": USER, "history": [1], "exclude": ["2"], "k": 2, "candidates": 3}
    with running_torchserve(clean, model_store=clean / "model_store", models=["recommender"], timeout=180) as server:
        reply = server.predict("recommender", body)
        bad = server.predict("recommender", {"user": USER, "k": 4, "candidates": 3})
        ranked = server.predict("recommender", {"user": USER, "items": [3, 4], "top_k": 1})
        v2_inputs = [{"name": name, "shape": [len(data)], "datatype": "INT64", "data": data}
                     for name, data in (("history", [1]), ("exclude", [2]), ("k", [2]), ("candidates", [3]))]
        v2_reply = server.call("inference", "POST", "/v2/models/recommender/infer",
                               body={"id": "v2", "inputs": v2_inputs})
        demo_difference = check_recommender(server, "recommender", archive, seed=3)  # what make demo's client checks
    assert reply.status == 200, reply.body
    served, expected = reply.json()["items"], recommender.recommend(body)["items"]
    assert [item["id"] for item in served] == [item["id"] for item in expected]
    for got, want in zip(served, expected):
        assert got["score"] == pytest.approx(want["score"], abs=1e-5)
        assert got["retrieval_score"] == pytest.approx(want["retrieval_score"], abs=1e-5)
    assert demo_difference <= 1e-5
    assert bad.status == 400 and bad.json()["field"] == "k"
    assert ranked.status == 200
    (best,) = recommender.recommend({"user": USER, "items": [3, 4], "top_k": 1})["items"]
    assert [item["id"] for item in ranked.json()["items"]] == [best["id"]]
    assert v2_reply.status == 200, v2_reply.body
    v2_answer = v2_reply.json()
    assert v2_answer["id"] == "v2" and v2_answer["model_name"] == "recommender"
    plain = recommender.recommend({"history": [1], "exclude": [2], "k": 2, "candidates": 3})["items"]
    assert v2_answer["outputs"][0]["data"] == [item["id"] for item in plain]
    assert v2_answer["outputs"][1]["data"] == pytest.approx([item["score"] for item in plain], abs=1e-5)


@pytest.mark.slow
def test_locust_recommend_task_runs_against_a_served_recommend_archive(exports, tmp_path) -> None:
    """``--mix recommend=1``: every answer checked (k items, none seen or excluded, best first), none fails."""
    store = tmp_path / "model_store"
    build_archive(exports["ranker"], name="recommender", backend="onnx", model_store=store,
                  config=ServingConfig(max_candidates=5, max_batch_delay_ms=5), retrieval_dir=exports["retrieval"],
                  recommend_limits=RECOMMEND_LIMITS)
    with running_torchserve(tmp_path / "server", model_store=store, models=["recommender"], timeout=180) as server:
        command = [
            str(Path(sys.executable).with_name("locust")), "-f", str(REPO_ROOT / "loadtest" / "locustfile.py"),
            "--headless", "InferenceUser", "--host", server.urls["inference"],
            "--management-host", server.urls["management"], "--key-file", str(server.workdir / "key_file.json"),
            "--model", "recommender", "--mix", "recommend=1",
            "--features", str(exports["retrieval"] / "user_features.json"),  # the catalogue.parquet beside it
            # Within the archive's limits: 5 candidates, 3 history and 3 exclude ids; 1 item always left.
            "--candidates", "2-5", "--top-k", "3", "--history", "0-2", "--exclude", "0-2",
            "--users", "2", "--spawn-rate", "2", "--run-time", "6s", "--pool-size", "32", "--slo-p99-ms", "5000",
            "--csv", str(tmp_path / "run"), "--only-summary", "--stop-timeout", "10",
        ]
        finished = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path, check=False)
    output = finished.stdout + finished.stderr
    assert finished.returncode == 0, output[-3000:]
    summary = json.loads((tmp_path / "run_summary.json").read_text())
    figures = summary["endpoints"]["/predictions/recommender [recommend]"]
    assert figures["requests"] > 0 and figures["failures"] == summary["total"]["failures"] == 0, summary["endpoints"]
    assert summary["mix"]["recommend"] == 1 and summary["inference"]["records"] >= figures["requests"]
