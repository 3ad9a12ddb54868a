"""The HTTP edge: OpenAI-compatible routes on FastAPI, deployed by ``serve.app.builder`` as the Serve ingress.

It authenticates, reads and validates the body (size first), turns the request into a job, and hands it to
a Preprocessor replica, which owns it to the answer (``Preprocessor.complete``, which calls the Generator):
one call per request from here, and only small records reach this process. A streaming request goes to
``Preprocessor.stream``, whose first event says whether it passed its checks before the stream opens (so bad
input still gets a plain error); its text is then relayed as server-sent events (``serve.app.streaming``).
Bodies are read and answers written by ``serve.app.responses``. Every error, from here or from a replica,
leaves through ``serve.errors.error_response``; every request leaves one structured log line and its metrics.
Until both tiers have answered once, and while its instance drains before a stop (``serve.app.launch``), it
answers ``/health`` and requests with a 503 and ``Retry-After`` at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException

from serve.app.config import ServiceConfig
from serve.app.instance import DRAIN_FLAG, INSTANCE_DIR_ENV
from serve.app.messages import Finished, Started, job_from_request
from serve.app.metrics import RequestMetrics
from serve.app.protocol import ChatCompletionRequest, ModelCard, ModelList, completion_id
from serve.app.responses import completion, parse_body, translate
from serve.app.streaming import sse_chunks
from serve.errors import (
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    ServiceError,
    Unauthorized,
    Unavailable,
    error_response,
)

log = logging.getLogger("ray.serve")

READY_WAIT_S = 0.5
"""How long a request waits for the tiers' first answers before a 503 (the round trip when they are up)."""

api = FastAPI(title="Kosmos-2", description="Grounded vision-language completions, OpenAI-compatible.")


def _request_body_schema() -> dict[str, Any]:
    """The chat request's JSON schema for the OpenAPI document (the route reads the raw body itself, so that
    it can check the size first and answer every error in the OpenAI envelope)."""
    schema = ChatCompletionRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    definitions = schema.pop("$defs", {})
    return {
        "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
        "x-components": definitions,
    }


def _openapi() -> dict[str, Any]:
    """FastAPI's document, with the request models' definitions moved where OpenAPI expects them."""
    if api.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        document = get_openapi(title=api.title, version="1", description=api.description, routes=api.routes)
        schemas = document.setdefault("components", {}).setdefault("schemas", {})
        for path in document["paths"].values():
            for operation in path.values():
                schemas.update(operation.pop("x-components", {}))
        api.openapi_schema = document
    return api.openapi_schema


api.openapi = _openapi


@api.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """Unknown routes and methods answer in the OpenAI envelope too."""
    if exc.status_code == 404:
        error: ServiceError = NotFound(f"no route {request.method} {request.url.path}", code="not_found")
    else:
        error = InvalidRequest(str(exc.detail), code=f"http_{exc.status_code}")
        error.status = exc.status_code
    return _error(error)


def _error(exc: BaseException) -> JSONResponse:
    status, body, headers = error_response(exc)
    return JSONResponse(body, status_code=status, headers=headers)


class Ingress:
    """Routes; holds no model. Bound with handles to the two other deployments (the Generator's for health)."""

    def __init__(self, config: ServiceConfig, preprocessor, generator) -> None:
        self.config = config
        self.preprocessor = preprocessor
        self.generator = generator
        self.keys = [key.encode() for key in config.api_keys()]
        self.created = int(time.time())
        self.inflight = 0
        self.metrics = RequestMetrics()
        self.ready = False  # both tiers have answered once
        self._probe: asyncio.Future[bool] | None = None
        instance = os.environ.get(INSTANCE_DIR_ENV)
        self.drain_flag = Path(instance, DRAIN_FLAG) if instance else None

    @api.get("/health")
    async def health(self) -> Response:
        """200 when both tiers answer; 503 while the service starts (at once) or drains, or a tier is lost."""
        refusal = await self._refusal()
        if refusal is not None:
            return _error(refusal)
        try:
            await asyncio.wait_for(
                asyncio.gather(self.preprocessor.ready.remote(), self.generator.ready.remote()), timeout=10
            )
        except Exception:
            return _error(Unavailable("the service is not ready", code="not_ready", retry_after=5))
        return JSONResponse({"status": "ok"})

    async def _refusal(self) -> Unavailable | None:
        """Why a request is answered 503 at once: the instance is draining before a stop (its launcher made the
        flag, ``serve.app.instance``), or the tiers have not answered yet; None when neither."""
        if self.drain_flag is not None and self.drain_flag.exists():
            retry_after = self.config.limits.retry_after_s
            return Unavailable("the service is shutting down", code="shutting_down", retry_after=retry_after)
        if self.ready:
            return None
        if self._probe is None or self._probe.done():
            self._probe = asyncio.ensure_future(self._await_tiers())
        with contextlib.suppress(asyncio.TimeoutError):  # the first answers take a round trip when the tiers are up
            await asyncio.wait_for(asyncio.shield(self._probe), READY_WAIT_S)
        return None if self.ready else Unavailable("the service is starting", code="not_ready", retry_after=5)

    async def _await_tiers(self) -> bool:
        try:
            await asyncio.gather(self.preprocessor.ready.remote(), self.generator.ready.remote())
        except Exception:  # a replica lost on the way: the next request asks again
            return False
        self.ready = True
        return True

    @api.get("/v1/models")
    async def models(self, request: Request) -> Response:
        try:
            self._authorize(request)
        except ServiceError as exc:
            return _error(exc)
        return JSONResponse(ModelList(data=[self._card()]).model_dump())

    @api.get("/v1/models/{model:path}")
    async def model(self, model: str, request: Request) -> Response:
        """The served model's card; any other id is a 404 ``model_not_found``."""
        try:
            self._authorize(request)
            if model != self.config.served_model_name:
                raise NotFound(f"the model {model!r} does not exist", param="model")
        except ServiceError as exc:
            return _error(exc)
        return JSONResponse(self._card().model_dump())

    def _card(self) -> ModelCard:
        return ModelCard(id=self.config.served_model_name, created=self.created)

    @api.post("/v1/chat/completions", openapi_extra=_request_body_schema())
    async def chat_completions(self, request: Request) -> Response:
        started, request_id = time.monotonic(), completion_id()
        record: dict[str, Any] = {"id": request_id, "task": None, "stream": False}
        refusal = await self._refusal()
        if refusal is None and self.inflight >= self.config.limits.max_inflight:
            refusal = Unavailable(
                "the service is at capacity; retry shortly",
                code="overloaded",
                retry_after=self.config.limits.retry_after_s,
            )
        if refusal is not None:
            response = _error(refusal)
            self._log(record, response.status_code, started)
            return response
        self.inflight += 1
        try:
            return await self._chat(request, record, started)
        finally:
            self.inflight -= 1

    async def _chat(self, request: Request, record: dict[str, Any], started: float) -> Response:
        request_id = record["id"]
        try:
            self._authorize(request)
            parsed = parse_body(await self._read_body(request))
            job = job_from_request(parsed, self.config, request_id)
            record.update(task=job.query.task.value, stream=parsed.stream, user=parsed.safety_identifier or parsed.user)
            if parsed.metadata:
                record["metadata"] = parsed.metadata
            timeout = self.config.limits.request_timeout_s
            handed_over = time.monotonic()
            job = replace(job, sent_at=time.time())
            if parsed.stream:
                return await self._stream(job, parsed, record, started, handed_over)
            finished = await asyncio.wait_for(self.preprocessor.complete.remote(job), timeout)
            if isinstance(finished, ServiceError):
                raise finished
        except Exception as exc:
            response = _error(self._translate(exc))
            self._log(record, response.status_code, started)
            return response
        self._log(record, 200, started, finished)
        return JSONResponse(completion(finished, request_id, self.config.served_model_name).model_dump())

    async def _stream(
        self, job, parsed: ChatCompletionRequest, record: dict[str, Any], started: float, handed_over: float
    ) -> Response:
        """Open the stream once the Preprocessor has accepted the request (else raise its error)."""
        timeout = self.config.limits.request_timeout_s
        events = self.preprocessor.options(stream=True).stream.remote(job)
        first = await asyncio.wait_for(events.__anext__(), timeout)
        if isinstance(first, ServiceError):  # refused before the stream opens: a plain JSON error
            raise first
        assert isinstance(first, Started)

        def close(status: int, finished: Finished | None) -> None:
            if finished is not None and finished.first_token_s is not None:
                record["ttft_s"] = round(handed_over - started + finished.first_token_s, 4)
            self._log(record, status, started, finished)

        chunks = sse_chunks(
            events,
            request_id=job.request_id,
            model=self.config.served_model_name,
            include_usage=bool(parsed.stream_options and parsed.stream_options.include_usage),
            deadline=started + timeout,
            translate=self._translate,
            close=close,
        )
        return StreamingResponse(chunks, media_type="text/event-stream")

    @staticmethod
    def _translate(exc: BaseException) -> BaseException:
        """``translate``, logging what it cannot name (those become a 500 that hides the details)."""
        error = translate(exc)
        if not isinstance(error, ServiceError):
            log.error("unexpected error while serving a request", exc_info=error)
        return error

    def _authorize(self, request: Request) -> None:
        if not self.keys:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip().encode()
        matched = False
        for key in self.keys:  # compare against every key, in constant time each
            matched |= hmac.compare_digest(given, key)
        if scheme.lower() != "bearer" or not matched:
            raise Unauthorized("missing or invalid API key; send 'Authorization: Bearer <key>'")

    async def _read_body(self, request: Request) -> bytes:
        limit = self.config.limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge(f"the body is {declared} bytes; the limit is {limit}")
        body = bytearray()
        async for piece in request.stream():
            body += piece
            if len(body) > limit:
                raise PayloadTooLarge(f"the body exceeds the limit of {limit} bytes")
        return bytes(body)

    def _log(self, record: dict[str, Any], status: int, started: float, finished: Finished | None = None) -> None:
        if finished is not None:
            record.update(prompt_tokens=finished.prompt_tokens, completion_tokens=finished.completion_tokens)
            for name in ("queued_s", "prepare_s", "generate_s"):
                record[name] = round(getattr(finished, name), 4)
        record.update(status=status, latency_s=round(time.monotonic() - started, 4))
        log.info(json.dumps({"event": "request", **{k: v for k, v in record.items() if v is not None}}))
        self.metrics.observe(record)


HTTPIngress = serve.ingress(api)(Ingress)
"""``Ingress`` with its routes bound to ``api``: done at import time, so that every replica that imports this
module gets the same routes."""
