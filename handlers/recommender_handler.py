"""TorchServe handler for the recommenders: one forward pass per TorchServe batch.

Packed into every ``.mar`` (as the archive's handler file) together with the
``handlers`` and ``featurespec`` packages, ``features.json``, one artifact
and ``model-config.yaml``. The archive root is on the worker's ``sys.path``,
so the imports below are the same in the repository and in the archive.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from ts.metrics.dimension import Dimension
from ts.metrics.metric_type_enum import MetricTypes
from ts.torch_handler.base_handler import BaseHandler

from featurespec import FEATURES_FILE, FeatureSpec
from handlers.backends import load_backend
from handlers.memory import settle_for_scoring
from handlers.request import EncodedBatch, Limits, encode_batch, request_header, write_responses
from handlers.worker import set_up_worker

logger = logging.getLogger(__name__)


class RecommenderHandler(BaseHandler):
    """Scores records, ranks candidates; see :mod:`handlers.request` (JSON) and
    :mod:`handlers.arrow_request` (Arrow IPC) for the contract."""

    def initialize(self, context: Any) -> None:
        worker = set_up_worker(context)
        model_dir = Path(context.system_properties.get("model_dir"))
        self.limits = Limits.from_handler_config(worker.settings)
        self.spec = FeatureSpec.load(model_dir / FEATURES_FILE)
        model = context.manifest["model"]
        self.model_name = model.get("modelName", "")
        self.model_version = model.get("modelVersion", "")
        self.backend = load_backend(model_dir / model["serializedFile"], device=worker.device, threads=worker.threads)
        self.device = torch.device(self.backend.device)
        self.context = context
        self.initialized = True
        settle_for_scoring()

    def preprocess(self, data: list[Any]) -> EncodedBatch:
        started = time.perf_counter()
        content_types = [self._header(index, "content-type", body=True) for index in range(len(data))]
        batch = encode_batch(self.spec, data, limits=self.limits, content_types=content_types)
        self._metric("EncodeTime", (time.perf_counter() - started) * 1000, "ms")
        self._metric("RecordsPerBatch", batch.num_records, "Count", metric_type="HISTOGRAM")
        return batch

    def inference(self, batch: EncodedBatch, *args: Any, **kwargs: Any) -> tuple[EncodedBatch, Any]:
        if batch.num_records == 0:  # every request in the batch was rejected
            return batch, batch.dense[:, 0]
        started = time.perf_counter()
        scores = self.backend.predict(batch.dense, batch.sparse)
        self._metric("InferenceTime", (time.perf_counter() - started) * 1000, "ms")
        return batch, scores

    def postprocess(self, output: tuple[EncodedBatch, Any]) -> list[bytes]:
        """One body per request (JSON, or Arrow IPC where its Accept header asks); a rejected request gets its own 400."""
        batch, scores = output
        accepts = [self._header(index, "accept") for index in range(len(batch.outcomes))]
        replies = write_responses(
            batch, scores, accepts=accepts, model_name=self.model_name, model_version=self.model_version
        )
        for index, reply in enumerate(replies):
            if reply.status != 200:
                self.context.set_response_status(reply.status, reply.reason, index)
            self.context.set_response_content_type(index, reply.content_type)
        return [reply.body for reply in replies]

    def _header(self, index: int, name: str, *, body: bool = False) -> str | None:
        return request_header(self.context, index, name, body=body)

    def _metric(self, name: str, value: float, unit: str, *, metric_type: str = "GAUGE") -> None:
        dimensions = [Dimension("ModelName", self.model_name), Dimension("Level", "Model")]
        self.context.metrics.add_metric(
            name, round(value, 3), unit, dimensions=dimensions, metric_type=MetricTypes[metric_type]
        )
