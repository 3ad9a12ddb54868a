"""Where the model's predictions come from: the running service, or the engine in process.

- :class:`APIPredictor` (``--predictor api``): the service's ``ground`` task through ``serve.app.client``, many
  requests at once, retrying transport errors, 408, 429 and 5xx with exponential backoff (or the server's
  ``Retry-After``). A refused request (400, 413, 422) is recorded as that expression's error; 401, 403 and 404
  stop the run, since every request would fail alike.
- :class:`EnginePredictor` (``--predictor engine``): the same prompt, image path and decoding, in process, in
  batches, through ``serve.engine``, in float32 unless told otherwise, as the official run was.

``eval.references`` holds the predictors computed from the ground truth alone (the grid's ceiling, a floor).
Every predictor is an async context manager whose :meth:`Predictor.predict` turns a batch of examples into
one :class:`Prediction` each; ``eval.runner`` drives it. See ``python -m eval run --help``.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from eval.datasets import RefExample
from eval.refexp import PredictedEntity
from serve.app.client import APIError, KosmosClient

if TYPE_CHECKING:  # torch is imported only when the engine predictor is used
    from serve.engine.base import Engine
    from serve.engine.model import LoadedModel

RETRYABLE = frozenset({0, 408, 429, 500, 502, 503, 504})
"""Statuses worth another try (0: the request never got an answer)."""

FATAL = frozenset({401, 403, 404})
"""Statuses that no expression can get past: wrong key or wrong URL."""

NO_REPEAT_NGRAM_SIZE = 3
"""The official decoding's ``--no-repeat-ngram-size``."""


@dataclass(frozen=True)
class Prediction:
    """A predictor's answer to one expression: the clean text, its entities, or why there is none.

    ``text`` is the answer without its tags (the service's ``content``), ``entities`` what the predictor
    returned, each with its phrase, span, boxes and pixel boxes where it gave them.
    """

    text: str = ""
    entities: list[PredictedEntity] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None


class Predictor:
    """Base of the predictors: ``batch_size`` examples per :meth:`predict`, ``concurrency`` calls at once."""

    name = ""
    batch_size = 1
    concurrency = 1

    async def __aenter__(self) -> Predictor:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def predict(self, batch: Sequence[RefExample]) -> list[Prediction]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """The settings that shaped the predictions, for ``summary.json`` (``dtype``: the model's, None when unknown
        or when no model runs)."""
        return {"predictor": self.name, "dtype": None}


class APIPredictor(Predictor):
    """The running service's ``ground`` task, ``concurrency`` requests in flight."""

    name = "api"

    def __init__(
        self,
        url: str,
        *,
        api_key: str | None = None,
        concurrency: int = 16,
        max_retries: int = 5,
        max_tokens: int = 64,
        timeout: float = 120.0,
        backoff_s: float = 1.0,
        ready_timeout: float = 30.0,
    ) -> None:
        if concurrency < 1 or max_retries < 0 or max_tokens < 1:
            raise ValueError("concurrency and max_tokens must be at least 1, max_retries at least 0")
        self.url, self.api_key = url, api_key
        self.concurrency, self.max_retries, self.max_tokens = concurrency, max_retries, max_tokens
        self.timeout, self.backoff_s, self.ready_timeout = timeout, backoff_s, ready_timeout
        self.client: KosmosClient | None = None
        self.served_model: str | None = None
        self.retries = 0

    async def __aenter__(self) -> APIPredictor:
        """Open the connection pool and wait (up to ``ready_timeout`` s) for ``/health``, so a wrong URL fails fast."""
        self.client = KosmosClient(
            self.url, api_key=self.api_key, timeout=self.timeout, max_connections=self.concurrency
        )
        await self.client.wait_ready(self.ready_timeout)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.client is not None:
            await self.client.__aexit__(*exc)

    async def predict(self, batch: Sequence[RefExample]) -> list[Prediction]:
        return [await self.one(example) for example in batch]

    async def one(self, example: RefExample) -> Prediction:
        """One expression, retried while the failure is transient; raises :class:`APIError` when fatal."""
        assert self.client is not None, "use the predictor as an async context manager"
        image = await asyncio.to_thread(example.read_image)
        attempt = 0
        while True:
            try:
                completion = await self.client.complete(
                    image,
                    task="ground",
                    text=example.expression,
                    max_tokens=self.max_tokens,
                    temperature=0.0,
                    no_repeat_ngram_size=NO_REPEAT_NGRAM_SIZE,
                )
            except APIError as exc:
                if exc.status in FATAL:
                    raise
                if exc.status not in RETRYABLE or attempt >= self.max_retries:
                    return Prediction(error=str(exc))
                await asyncio.sleep(self.delay(attempt, exc.retry_after))
                attempt += 1
                self.retries += 1
                continue
            self.served_model = self.served_model or completion.raw.get("model")
            entities = [PredictedEntity.from_json(e) for e in completion.entities]
            return Prediction(completion.content, entities, completion.finish_reason)

    def delay(self, attempt: int, retry_after: float | None) -> float:
        """Seconds before the next try: the server's ``Retry-After``, else exponential with jitter, at most 60."""
        if retry_after is not None:
            return retry_after
        return min(self.backoff_s * 2**attempt, 60.0) * (0.5 + random.random())

    def describe(self) -> dict[str, Any]:
        return {
            "predictor": self.name,
            "url": self.url,
            "served_model": self.served_model,
            "concurrency": self.concurrency,
            "max_retries": self.max_retries,
            "retries": self.retries,
            "dtype": None,
            "max_tokens": self.max_tokens,
            "no_repeat_ngram_size": NO_REPEAT_NGRAM_SIZE,
            "temperature": 0.0,
        }


class EnginePredictor(Predictor):
    """The engine in process: the service's preprocessing, prompt and answer parsing, without HTTP."""

    name = "engine"

    def __init__(self, loaded: LoadedModel, engine: Engine, *, batch_size: int = 8, max_tokens: int = 64) -> None:
        from serve.app.config import LimitsConfig
        from serve.kosmos2.pipeline import Pipeline

        self.loaded, self.engine = loaded, engine
        self.pipeline = Pipeline(loaded.processor, LimitsConfig().image_limits())
        self.batch_size, self.max_tokens = batch_size, max_tokens

    async def predict(self, batch: Sequence[RefExample]) -> list[Prediction]:
        return await asyncio.to_thread(self.run, batch)

    def run(self, batch: Sequence[RefExample]) -> list[Prediction]:
        """Prepare every example, generate for those that could be prepared, parse the answers."""
        from serve.engine.requests import SamplingParams
        from serve.errors import ServiceError
        from serve.kosmos2.pipeline import Query
        from serve.kosmos2.tasks import Task

        params = SamplingParams(max_new_tokens=self.max_tokens, no_repeat_ngram_size=NO_REPEAT_NGRAM_SIZE)
        predictions: dict[int, Prediction] = {}
        jobs = []
        for i, example in enumerate(batch):
            try:
                prepared = self.pipeline.prepare(
                    Query(Task.GROUND, example.expression, params=params), example.read_image()
                )
                self.engine.check(prepared.request)
            except (ServiceError, OSError) as exc:
                predictions[i] = Prediction(error=f"{type(exc).__name__}: {exc}")
                continue
            jobs.append((i, prepared))
        results = self.engine.generate([prepared.request for _, prepared in jobs])
        for (i, prepared), result in zip(jobs, results):
            answer = self.pipeline.finish(prepared, result)
            entities = [PredictedEntity(e.phrase, list(e.boxes), e.span, list(e.boxes_px)) for e in answer.entities]
            predictions[i] = Prediction(answer.text, entities, result.finish_reason)
        return [predictions[i] for i in range(len(batch))]

    def describe(self) -> dict[str, Any]:
        return {
            "predictor": self.name,
            "engine": type(self.engine).__name__,
            "model": str(getattr(self.loaded.model.config, "_name_or_path", "")),
            "device": str(self.loaded.device),
            "dtype": str(self.loaded.dtype).removeprefix("torch."),
            "batch_size": self.batch_size,
            "max_tokens": self.max_tokens,
            "no_repeat_ngram_size": NO_REPEAT_NGRAM_SIZE,
            "temperature": 0.0,
        }
