"""TorchServe handler of recommend archives: retrieval and ranking in one call, one pass of each per batch.

Packed as the handler file of a ``.mar`` built with ``python -m export.archive RANKER_EXPORT --retrieval
RETRIEVAL_EXPORT``, beside the ``handlers`` and ``featurespec`` packages; the contract and the work are
:mod:`handlers.recommend`'s (:class:`~handlers.recommend.Recommender`), so a served answer is the
in-process pipeline's answer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ts.torch_handler.base_handler import BaseHandler

from handlers.memory import settle_for_scoring
from handlers.recommend import Recommender, RecommendLimits, RecommendRequest
from handlers.request import JSON_MEDIA_TYPE, Limits, RequestError, dump_json, request_header
from handlers.worker import set_up_worker


class RecommendHandler(BaseHandler):
    """``{"user", "history", "k", "exclude", "candidates"}`` -> ``{"items": [{"id", "score", "retrieval_score"}]}``,
    or the same request in KServe v2 form -> a KServe v2 response (see :mod:`handlers.recommend`)."""

    def initialize(self, context: Any) -> None:
        worker = set_up_worker(context)
        model = context.manifest["model"]
        self.model_name = model.get("modelName", "")
        self.model_version = model.get("modelVersion", "")
        self.recommender = Recommender.load(
            Path(context.system_properties.get("model_dir")),
            ranker_file=model["serializedFile"],
            device=worker.device,
            threads=worker.threads,
            limits=Limits.from_handler_config(worker.settings),
            recommend_limits=RecommendLimits.from_handler_config(worker.settings),
        )
        self.context = context
        self.initialized = True
        settle_for_scoring()

    def preprocess(self, data: list[Any]) -> list[RecommendRequest | RequestError]:
        return [
            self.recommender.parse(item, content_type=request_header(self.context, index, "content-type", body=True))
            for index, item in enumerate(data)
        ]

    def inference(self, requests: list[RecommendRequest | RequestError], *args: Any, **kwargs: Any) -> list[Any]:
        return self.recommender.answer_batch(requests, model_name=self.model_name, model_version=self.model_version)

    def postprocess(self, answers: list[dict[str, Any] | RequestError]) -> list[bytes]:
        """One JSON body per request; a rejected request gets its own status."""
        bodies = []
        for index, answer in enumerate(answers):
            if isinstance(answer, RequestError):
                self.context.set_response_status(answer.status, answer.reason, index)
                answer = answer.to_json()
            self.context.set_response_content_type(index, JSON_MEDIA_TYPE)
            bodies.append(dump_json(answer))
        return bodies
