"""The CPU tier: before generation, image and prompt; after it, the answer with its entities.

``Preprocessor`` is a plain class that ``serve.app.builder`` deploys on CPU replicas; it owns a request from the
Ingress to the answer. ``prepare`` decodes the image (a base64 data URI, or a remote URL where the config
allows it), checks and resizes it, and builds the task's prompt and its token ids. ``complete`` sends the
prepared request to a Generator replica and turns the tokens into the answer text and entities. ``stream``
does the same around the Generator's token stream, yielding text as it becomes certain. The pixels thus cross
one hop, to the Generator, whichever transport Serve uses between deployments (its gRPC transport resolves a
response chained through the Ingress in the Ingress, by value). Bad input comes back as a ``ServiceError``
value (so replicas do not log it as a crash).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

from serve.app.config import ServiceConfig
from serve.app.messages import Finished, Job, Prepared, PromptInfo, Started
from serve.app.remote_images import fetch_image
from serve.engine.base import check_length
from serve.engine.model import load_processor
from serve.engine.requests import GenerationRequest, GenerationResult
from serve.errors import InvalidImage, InvalidRequest, PayloadTooLarge, ServiceError
from serve.kosmos2.images import PreparedImage, compile_resize, prepare_image
from serve.kosmos2.tasks import build_prompt
from serve.kosmos2.text import AnswerStream, TextCodec


@dataclass(frozen=True)
class TextPiece:
    """Streamed answer text that is now certain."""

    text: str


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
        self.codec = TextCodec(load_processor(config.model.source))
        self.limits = config.limits.image_limits()
        self.generator = generator
        compile_resize()

    async def ready(self) -> bool:
        return True

    async def prepare(self, job: Job) -> Prepared | ServiceError:
        """Decode and check the image, build the prompt; or the error naming what is wrong with them."""
        try:
            prompt = build_prompt(job.task, job.text, job.region)
            prompt_ids = self.codec.encode(prompt.text)
            check_length(len(prompt_ids), job.params.max_new_tokens, self.config.engine.max_seq_len)
            image = await self._image(job.image_url)
        except ServiceError as exc:
            return exc
        info = PromptInfo(job.request_id, job.task, prompt, prompt_ids.tolist(), image.width, image.height)
        return Prepared(GenerationRequest(image.pixels, prompt_ids, job.params), info)

    async def _image(self, url: str) -> PreparedImage:
        limits = self.limits
        if url.startswith("data:"):
            data = decode_data_uri(url, limits.max_bytes)
        elif url.startswith(("http://", "https://")):
            data = await fetch_image(url, self.config.http, limits.max_bytes)
        else:
            raise InvalidRequest(
                "image_url.url must be a data URI (or an http(s) URL where enabled)", param="image_url"
            )
        return await asyncio.to_thread(prepare_image, data, limits)

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
        return replace(self._finish(result, prepared.info), **timings)

    def _finish(self, result: GenerationResult, info: PromptInfo) -> Finished:
        """The answer's clean text and entities."""
        answer = self.codec.answer(info.prompt, info.prompt_ids, result.token_ids, info.width, info.height)
        return Finished(answer, result.finish_reason, result.prompt_tokens, result.completion_tokens)

    async def stream(self, job: Job) -> AsyncIterator[Started | ServiceError | TextPiece | Finished]:
        """Prepare, then stream: ``Started`` (or the error, alone), text pieces, the finished answer."""
        prepared = await self.prepare(job)
        if isinstance(prepared, ServiceError):
            yield prepared
            return
        yield Started()
        info = prepared.info
        pieces = AnswerStream(self.codec, info.prompt, info.prompt_ids)
        async for item in self.generator.options(stream=True).stream.remote(prepared.request):
            if isinstance(item, GenerationResult):
                finished = self._finish(item, info)
                rest = pieces.finish(finished.answer.text)
                if rest:
                    yield TextPiece(rest)
                yield finished
                return
            text = pieces.push(item)
            if text:
                yield TextPiece(text)
