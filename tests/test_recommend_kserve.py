"""Recommend requests in KServe v2 form: the same answers as the plain JSON form, answered in v2 form,
every 400 naming the input tensor, and a bad v2 request failing alone in its batch.

The tiny retrieval and DLRM exports are test_recommend's fixtures (4 users, 5 movies).
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import test_recommend
from test_recommend import RECOMMEND_LIMITS, USER
from ts.context import Context, RequestProcessor

from handlers.recommend import Recommender
from handlers.recommend_handler import RecommendHandler
from handlers.request import RequestError
from loadtest.torchserve import METRICS_CONFIG

# test_recommend's module fixtures: its tiny exports, and the Recommender over them.
exports = test_recommend.exports
recommender = test_recommend.recommender

ID_INPUTS = ("history", "exclude", "items")
COUNT_INPUTS = ("k", "candidates", "top_k")


def user_tensor(name: str, value: Any, datatype: str | None = None) -> dict[str, Any]:
    """One user feature as a KServe v2 input of shape [1] (text and lists as BYTES)."""
    if datatype is None:
        datatype = "BYTES" if isinstance(value, (str, list)) else "INT64" if isinstance(value, int) else "FP32"
    return {"name": name, "shape": [1], "datatype": datatype, "data": [value]}


def v2_body(plain: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The KServe v2 form of a plain recommend or ranking request."""
    inputs = [user_tensor(name, value) for name, value in plain.get("user", {}).items()]
    for name in ID_INPUTS:
        if name in plain:
            inputs.append({"name": name, "shape": [len(plain[name])], "datatype": "INT64", "data": plain[name]})
    for name in COUNT_INPUTS:
        if name in plain:
            inputs.append({"name": name, "shape": [1], "datatype": "INT64", "data": [plain[name]]})
    return {**extra, "inputs": inputs}


def outputs_of(answer: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {output["name"]: output for output in answer["outputs"]}


def assert_same_answer(v2_answer: dict[str, Any], plain_answer: dict[str, Any], *, retrieved: bool) -> None:
    outputs = outputs_of(v2_answer)
    items = plain_answer["items"]
    assert list(outputs) == ["items", "scores", "retrieval_scores"][: 3 if retrieved else 2]
    assert outputs["items"] == {"name": "items", "shape": [len(items)], "datatype": "INT64",
                                "data": [item["id"] for item in items]}
    assert outputs["scores"]["datatype"] == "FP32" and outputs["scores"]["shape"] == [len(items)]
    assert outputs["scores"]["data"] == pytest.approx([item["score"] for item in items], abs=1e-6)
    if retrieved:
        assert outputs["retrieval_scores"]["data"] == pytest.approx([item["retrieval_score"] for item in items],
                                                                    abs=1e-6)


@pytest.mark.parametrize("plain", [
    {"user": USER, "history": [1], "exclude": [2], "k": 2, "candidates": 4},
    {"user": USER},  # every default
    {"history": [3, 4], "k": 1},  # no user features at all
])
def test_v2_recommend_answers_as_the_plain_form(recommender, plain) -> None:
    answer = recommender.recommend(v2_body(plain, id="request-7"))
    assert list(answer) == ["id", "model_name", "model_version", "outputs"] and answer["id"] == "request-7"
    assert_same_answer(answer, recommender.recommend(plain), retrieved=True)


def test_v2_ranking_answers_as_the_plain_form_without_retrieval_scores(recommender) -> None:
    plain = {"user": USER, "history": [1], "items": [5, 2, 4], "top_k": 2}
    answer = recommender.recommend(v2_body(plain))
    assert "id" not in answer  # none sent, none echoed
    assert len(outputs_of(answer)["items"]["data"]) == 2
    assert_same_answer(answer, recommender.recommend(plain), retrieved=False)


def test_v2_id_is_echoed_only_when_a_string(recommender) -> None:
    assert recommender.recommend(v2_body({"k": 1}, id="abc"))["id"] == "abc"
    assert "id" not in recommender.recommend(v2_body({"k": 1}, id=42))  # as the scoring v2 path does


def tensor(name: str, datatype: str, data: list[Any], shape: list[int] | None = None) -> dict[str, Any]:
    return {"name": name, "shape": [len(data)] if shape is None else shape, "datatype": datatype, "data": data}


@pytest.mark.parametrize(("inputs", "field", "problem"), [
    ([user_tensor("favourite", "x")], "inputs[0].name", r"unknown user feature"),
    ([tensor("k", "INT64", [1]), user_tensor("genres", "Comedy")], "inputs[1].name", r"an item feature"),
    ([user_tensor("rated_before", "3", "BYTES")], "inputs[0].datatype",
     r"BYTES does not fit feature 'rated_before': expected a numeric datatype"),
    ([user_tensor("gender", 1.5, "FP32")], "inputs[0].datatype", r"FP32 does not fit feature 'gender'"),
    ([user_tensor("rated_before", "many", "INT64")], "inputs[0].data", r"expected a number or null, got a string"),
    ([tensor("gender", "BYTES", ["M", "F"])], "inputs[0].shape", r"expected \[1\] \(one value\), got \[2\]"),
    ([tensor("k", "FP32", [2.0])], "inputs[0].datatype", r"FP32 does not fit 'k': expected INT64"),
    ([tensor("k", "INT64", [1, 2])], "inputs[0].shape", r"expected \[1\] \(one value\), got \[2\]"),
    ([tensor("history", "INT64", [1, 2], shape=[3])], "inputs[0].data",
     r"expected a flat array of 3 values to match shape \[3\]"),
    ([tensor("history", "INT64", [], shape=[-1])], "inputs[0].data", r"expected a flat array of -1 values"),
    ([tensor("history", "INT64", [1, 2, 3, 4])], "inputs[0].data", r"4 ids exceed the limit of 3 per request"),
    ([tensor("history", "INT64", [1, 2**70])], "inputs[0].data[1]", r"not an item id"),
    ([tensor("exclude", "INT64", [1, 2.5])], "inputs[0].data[1]", r"expected an item id"),
    ([tensor("k", "INT64", [3]), tensor("candidates", "INT64", [2])], "inputs[0].data",
     r"must be in \[1, candidates = 2\], got 3"),
    ([tensor("k", "INT64", [5])], "inputs[0].data", r"must be in \[1, candidates = 4\], got 5"),
    ([tensor("candidates", "INT64", [6])], "inputs[0].data", r"must be in \[1, 5\], got 6"),
    ([tensor("items", "INT64", [1]), tensor("k", "INT64", [1])], "inputs[1].name",
     r"unexpected key in a ranking request"),
    ([tensor("items", "INT64", [])], "inputs[0].data", r"empty request: no items to rank"),
    ([tensor("items", "INT64", [1, 99])], "inputs[0].data[1]", r"item 99 is not in the catalogue"),
    ([tensor("k", "INT64", [1]), tensor("k", "INT64", [2])], "inputs[1].name", r"feature 'k' given twice"),
    ([tensor("k", "INT64", [1]), {"name": "history", "shape": [1]}], "inputs[1]", r"missing key 'data'"),
    ([], "inputs", r"expected a non-empty array of input tensors"),
])
def test_v2_bad_requests_are_400s_naming_the_input(recommender, inputs, field, problem) -> None:
    with pytest.raises(RequestError) as raised:
        recommender.recommend({"id": "bad", "inputs": inputs})
    assert raised.value.status == 400 and raised.value.field == field, raised.value
    assert re.search(problem, raised.value.problem), raised.value.problem


def test_v2_unexpected_top_level_key_is_named(recommender) -> None:
    with pytest.raises(RequestError, match=r"user: unexpected key in a KServe v2 request"):
        recommender.recommend({"inputs": [tensor("k", "INT64", [1])], "user": USER})


def test_a_bad_v2_request_fails_alone_in_its_batch(recommender: Recommender) -> None:
    good_plain = {"user": USER, "history": [2], "k": 2, "candidates": 3}
    bodies = [v2_body(good_plain, id="good"), v2_body({"user": {"favourite": "x"}}, id="bad"), good_plain,
              v2_body({"user": USER, "items": [1, 3]})]
    answers = recommender.answer_batch([recommender.parse({"body": body}) for body in bodies], model_name="rec",
                                       model_version="1.0")
    assert isinstance(answers[1], RequestError) and answers[1].field == "inputs[0].name"
    assert answers[0]["id"] == "good" and answers[0]["model_name"] == "rec" and answers[0]["model_version"] == "1.0"
    assert_same_answer(answers[0], answers[2], retrieved=True)
    assert_same_answer(answers[3], recommender.recommend({"user": USER, "items": [1, 3]}), retrieved=False)


def test_handler_answers_v2_with_the_archives_model_name(exports, recommender) -> None:
    from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

    metrics = MetricsCacheYamlImpl(config_file_path=str(METRICS_CONFIG))
    metrics.initialize_cache()
    manifest = {"model": {"modelName": "rec", "modelVersion": "2.0", "serializedFile": "model.onnx"}}
    handler_config = {"max_candidates": 5, "default_candidates": RECOMMEND_LIMITS.default_candidates,
                      "max_history": RECOMMEND_LIMITS.max_history}
    context = Context("rec", str(exports["both"]), manifest, 4, None, "0.12.0", metrics=metrics,
                      model_yaml_config={"handler": handler_config})
    handler = RecommendHandler()
    handler.initialize(context)
    plain = {"user": USER, "k": 2}
    bodies = [json.dumps(v2_body(plain, id="x")).encode(), v2_body({"k": 9})]
    context.request_processor = [RequestProcessor({}) for _ in bodies]
    context.request_ids = {index: f"request-{index}" for index in range(len(bodies))}
    replies = [json.loads(output) for output in handler.handle([{"body": body} for body in bodies], context)]
    assert [context.get_response_status(index)[0] for index in range(2)] == [200, 400]
    assert replies[0]["model_name"] == "rec" and replies[0]["model_version"] == "2.0" and replies[0]["id"] == "x"
    assert_same_answer(replies[0], recommender.recommend(plain), retrieved=True)
    assert replies[1]["field"] == "inputs[0].data" and "candidates = 4" in replies[1]["problem"]
