"""The CPU tier: before generation, image and prompt; after it, the answer with its entities.

``Preprocessor`` is a plain class that ``serve.app.builder`` deploys on CPU replicas; it owns a request from the
Ingress to the answer. ``prepare`` builds the task's prompt and its token ids, then fetches the image (a base64
data URI, or a remote URL where the config allows it), and checks and resizes it (``serve.kosmos2.pipeline``).
``complete`` sends the prepared request to a Generator replica and turns the tokens into the answer text and
entities. ``stream`` does the same around the Generator's token stream, yielding text as it becomes certain.
The pixels thus cross one hop, to the Generator, whichever transport Serve uses between deployments (its gRPC
transport resolves a response chained through the Ingress in the Ingress, by value). Bad input comes back as a
``ServiceError`` value (so replicas do not log it as a crash).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import time
from collections.abc import AsyncIterator
from dataclasses import replace

from serve.app.config import ServiceConfig
from serve.app.messages import Finished, Job, Started, TextPiece
from serve.app.remote_images import fetch_image
from serve.engine.model import load_processor
from serve.engine.requests import GenerationResult
from serve.errors import InvalidImage, InvalidRequest, PayloadTooLarge, ServiceError
from serve.kosmos2.images import compile_resize
from serve.kosmos2.pipeline import Pipeline, Prepared


def decode_data_uri(url: str, max_bytes: int) -> bytes:
    """Bytes of a base64 ``data:`` URI, refusing oversized or malformed ones before decoding much."""
    header, comma, payload = url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise InvalidRequest("image_url.url must be a base64 data URI: data:image/png;base64,...", param="image_url")
    if len(payload) * 3 // 4 > max_bytes + 2:
        raise PayloadTooLarge(
            f"the image is about {len(payload) * 3 // 4} bytes; the limit is {max_bytes}", param="image_url"
        )
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidImage("the data URI's payload is not valid base64", param="image_url") from None


class Preprocessor:
    """Deployed on CPU replicas; holds the tokenizer, never the model."""

    def __init__(self, config: ServiceConfig, generator) -> None:
        self.config = config
        limits = config.limits.image_limits()
        self.pipeline = Pipeline(load_processor(config.model.source), limits, config.engine.max_seq_len)
        self.generator = generator
        compile_resize()

    async def ready(self) -> bool:
        return True

    async def prepare(self, job: Job) -> Prepared | ServiceError:
        """Build the prompt, then fetch, decode and check the image; or the error naming what is wrong with them."""
        try:
            self.pipeline.prompt(job.query)  # bad text or length fails before any image is fetched
            data = await self._image_bytes(job.image_url)
            return await asyncio.to_thread(self.pipeline.prepare, job.query, data)
        except ServiceError as exc:
            return exc

    async def _image_bytes(self, url: str) -> bytes:
        max_bytes = self.pipeline.limits.max_bytes
        if url.startswith("data:"):
            return decode_data_uri(url, max_bytes)
        if url.startswith(("http://", "https://")):
            return await fetch_image(url, self.config.http, max_bytes)
        raise InvalidRequest("image_url.url must be a data URI (or an http(s) URL where enabled)", param="image_url")

    async def complete(self, job: Job) -> Finished | ServiceError:
        """The whole request: prepare, generate on a Generator replica, then the answer (or the error)."""
        queued_s = max(time.time() - job.sent_at, 0.0) if job.sent_at else 0.0
        began = time.perf_counter()
        prepared = await self.prepare(job)
        if isinstance(prepared, ServiceError):
            return prepared
        sent = time.perf_counter()
        result = await self.generator.generate.remote(prepared.request)
        timings = {"queued_s": queued_s, "prepare_s": sent - began, "generate_s": time.perf_counter() - sent}
        return replace(self._finish(result, prepared), **timings)

    def _finish(self, result: GenerationResult, prepared: Prepared) -> Finished:
        """The answer's clean text and entities."""
        answer = self.pipeline.finish(prepared, result)
        return Finished(answer, result.finish_reason, result.prompt_tokens, result.completion_tokens)

    async def stream(self, job: Job) -> AsyncIterator[Started | ServiceError | TextPiece | Finished]:
        """Prepare, then stream: ``Started`` (or the error, alone), text pieces, the finished answer."""
        prepared = await self.prepare(job)
        if isinstance(prepared, ServiceError):
            yield prepared
            return
        yield Started()
        pieces = self.pipeline.stream(prepared)
        async for item in self.generator.options(stream=True).stream.remote(prepared.request):
            if isinstance(item, GenerationResult):
                finished = self._finish(item, prepared)
                rest = pieces.finish(finished.answer.text)
                if rest:
                    yield TextPiece(rest)
                yield finished
                return
            text = pieces.push(item)
            if text:
                yield TextPiece(text)
