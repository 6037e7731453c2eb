"""The handler in-process: TorchServe's own Context around it, no server.

preprocess -> inference -> postprocess run through ``BaseHandler.handle``
exactly as a worker calls it, over a tiny exported model, and the scores are
compared with the eager model's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from ts.context import Context, RequestProcessor
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
from ts.metrics.metric_type_enum import MetricTypes

from handlers.arrow_request import write_stream
from handlers.recommender_handler import RecommenderHandler
from handlers.request import ARROW_STREAM, JSON_MEDIA_TYPE, TYPED_JSON_MIN_BYTES
from loadtest.scoring_client import as_table
from loadtest.torchserve import METRICS_CONFIG

ARTIFACTS = {"torchscript": "model.ts.pt", "onnx": "model.onnx"}


@pytest.fixture(scope="module", params=["dlrm", "widedeep"])
def tiny(request, tiny_export):
    """The session's tiny export of each model (conftest ``TinyExport``: path, spec, eager_scores)."""
    return tiny_export(request.param)


def make_context(model_dir: Path, backend: str, *, gpu_id: int | None = None, max_records: int = 50) -> Context:
    manifest = {"model": {"modelName": "tiny", "modelVersion": "1.0", "serializedFile": ARTIFACTS[backend]}}
    metrics = MetricsCacheYamlImpl(config_file_path=str(METRICS_CONFIG))
    metrics.initialize_cache()
    metrics.model_name = "tiny"
    yaml_config = {"batchSize": 8, "handler": {"max_records": max_records, "threads": 1}}
    return Context("tiny", str(model_dir), manifest, 8, gpu_id, "0.12.0", metrics=metrics, model_yaml_config=yaml_config)


def run_batch(
    handler: RecommenderHandler, context: Context, bodies: list, content_types: list[str | None] | None = None
) -> list[tuple[int, dict]]:
    """One TorchServe batch: ``bodies`` as the worker hands them over (each with its Content-Type), ``(status, json)`` back."""
    kinds = content_types or [None] * len(bodies)
    context.request_processor = [RequestProcessor({} if kind is None else {"body": {"content-type": kind}}) for kind in kinds]
    context.request_ids = {index: f"request-{index}" for index in range(len(bodies))}
    context.metrics.set_request_ids(context.request_ids)
    outputs = handler.handle([{"body": body} for body in bodies], context)
    assert len(outputs) == len(bodies)
    return [(context.get_response_status(index)[0], json.loads(output)) for index, output in enumerate(outputs)]


@pytest.fixture(params=sorted(ARTIFACTS))
def served(request, tiny):
    """``(handler, context)``: a RecommenderHandler initialized on one artifact of ``tiny``."""
    context = make_context(tiny.path, request.param)
    handler = RecommenderHandler()
    handler.initialize(context)
    return handler, context


def test_batch_of_mixed_requests_matches_eager_scores(served, tiny, sample_records):
    handler, context = served
    records = sample_records(6, seed=3)
    context_features = {"I1": 7, "C1": "c1_2"}
    candidates = [{k: v for k, v in r.items() if k not in context_features} for r in records[:4]]
    responses = run_batch(
        handler,
        context,
        [
            {"instances": records},
            records[5],
            {"instances": [{"I1": "seven"}]},
            {"context": context_features, "candidates": candidates, "top_k": 3},
        ],
    )
    assert [status for status, _ in responses] == [200, 200, 400, 200]
    assert responses[0][1]["predictions"] == pytest.approx(tiny.eager_scores(records), abs=1e-5)
    assert responses[1][1]["predictions"] == pytest.approx(tiny.eager_scores(records[5:]), abs=1e-5)
    assert responses[2][1]["field"] == "instances[0].I1"
    expected = tiny.eager_scores(candidates, context=context_features)
    best = sorted(range(4), key=lambda i: -expected[i])[:3]
    assert [item["index"] for item in responses[3][1]["ranking"]] == best
    assert [item["score"] for item in responses[3][1]["ranking"]] == pytest.approx([expected[i] for i in best], abs=1e-5)


def test_every_request_bad_still_one_400_each(served):
    handler, context = served
    responses = run_batch(handler, context, [b"{not json", {"instances": []}, {"instances": [{}] * 51}])
    assert [status for status, _ in responses] == [400, 400, 400]
    assert [body["field"] for _, body in responses] == ["body", "instances", "instances"]
    assert "exceed the limit of 50" in responses[2][1]["problem"]


def test_handler_records_per_batch_metrics(served, sample_records):
    handler, context = served
    run_batch(handler, context, [{"instances": sample_records(3)}, sample_records(1)[0]])
    records = context.metrics.get_metric("RecordsPerBatch", metric_type=MetricTypes.HISTOGRAM)
    assert records.metric_name == "RecordsPerBatch"
    for name in ("EncodeTime", "InferenceTime"):
        assert context.metrics.get_metric(name, metric_type=MetricTypes.GAUGE).metric_name == name


def test_initialize_uses_cpu_without_gpu_and_sets_threads(tiny):
    context = make_context(tiny.path, "torchscript", gpu_id=None)
    handler = RecommenderHandler()
    handler.initialize(context)
    assert handler.device == torch.device("cpu")
    assert torch.get_num_threads() == 1
    assert handler.limits.max_records == 50


def test_worker_sets_ieee_float32_matmuls_unless_the_archive_asks_otherwise(tiny):
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")  # what importing TorchServe's base_handler does on an Ampere+ GPU
        RecommenderHandler().initialize(make_context(tiny.path, "torchscript"))
        assert torch.get_float32_matmul_precision() == "highest"
        context = make_context(tiny.path, "torchscript")
        context.model_yaml_config["handler"]["float32_matmul_precision"] = "high"
        RecommenderHandler().initialize(context)
        assert torch.get_float32_matmul_precision() == "high"
        context.model_yaml_config["handler"]["float32_matmul_precision"] = "fast"
        with pytest.raises(ValueError, match="handler.float32_matmul_precision must be one of highest, high, medium, got 'fast'"):
            RecommenderHandler().initialize(context)
    finally:
        torch.set_float32_matmul_precision(previous)


def _ort_has_cuda() -> bool:
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", sorted(ARTIFACTS))
def test_cuda_scores_match_cpu_for_json_objects_json_bytes_and_arrow(tiny, backend, sample_records):
    """On ``cuda:0`` as on the CPU: decoded JSON, raw JSON bytes (the typed decoder: over 16 KiB) and Arrow IPC."""
    records = sample_records(400, seed=5)
    json_bytes = json.dumps({"instances": records}).encode()
    assert len(json_bytes) >= TYPED_JSON_MIN_BYTES
    bodies = [{"instances": records}, json_bytes, write_stream(as_table(records))]
    kinds = [JSON_MEDIA_TYPE, JSON_MEDIA_TYPE, ARROW_STREAM]
    scores = {}
    for gpu_id in (None, 0):
        context = make_context(tiny.path, backend, gpu_id=gpu_id, max_records=400)
        handler = RecommenderHandler()
        handler.initialize(context)
        if gpu_id is not None and (backend == "torchscript" or _ort_has_cuda()):
            assert handler.device.type == "cuda"
        assert torch.get_float32_matmul_precision() == "highest"  # IEEE float32 although ts asked for TF32
        responses = run_batch(handler, context, bodies, kinds)
        assert [status for status, _ in responses] == [200, 200, 200]
        first = responses[0][1]["predictions"]
        for _, body in responses[1:]:  # the same records, elsewhere in the same forward pass
            assert body["predictions"] == pytest.approx(first, abs=1e-6)
        scores[gpu_id] = first
    assert scores[0] == pytest.approx(scores[None], abs=1e-5)
    assert scores[None] == pytest.approx(tiny.eager_scores(records), abs=1e-5)


def test_fixture_scores_are_not_saturated(tiny, sample_records):
    """Guards the other tests: all-0 or all-1 scores would hide a wrong row."""
    scores = tiny.eager_scores(sample_records(20, seed=9))
    assert 0.02 < min(scores) < max(scores) < 0.98 and max(scores) - min(scores) > 1e-3


def test_model_dir_holds_what_the_handler_reads(tiny):
    assert {p.name for p in Path(tiny.path).iterdir()} >= {"model.ts.pt", "model.onnx", "features.json"}
