"""The CPU tier: before generation, image and prompt; after it, the answer with its entities.

``Preprocessor`` is a plain class that ``serve.app.builder`` deploys on CPU replicas; it owns a request from the
Ingress to the answer. ``prepare`` builds the task's prompt and its token ids, then fetches the image (a base64
data URI, or a remote URL where the config allows it), and checks and resizes it (``serve.kosmos2.pipeline``).
``complete`` sends the prepared request to a Generator replica and turns the tokens into the answer text and
entities. ``stream`` does the same around the Generator's token stream, yielding text as soon as it is certain
(``serve.kosmos2.decoding``). A request with stop strings is streamed from the Generator either way, so that its
generation is cancelled as soon as a stop string appears rather than run to ``max_tokens``.
The pixels thus cross one hop, to the Generator, whichever transport Serve uses between deployments (its gRPC
transport resolves a response chained through the Ingress in the Ingress, by value). Bad input comes back as a
``ServiceError`` value (so replicas do not log it as a crash). The batch mode (``serve.batch``) prepares and
finishes its requests with this module's functions (``image_bytes``, ``finished_of``), so that it answers as the
service does.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import time
from collections.abc import AsyncIterator

from serve.app.config import ServiceConfig
from serve.app.messages import Finished, Job, Started, TextPiece
from serve.app.remote_images import fetch_image
from serve.engine.model import load_processor
from serve.errors import InvalidImage, InvalidRequest, PayloadTooLarge, ServiceError
from serve.kosmos2.decoding import Decoding, Outcome, Release, follow
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
            data = await image_bytes(job.image_url, self.config)
            return await asyncio.to_thread(self.pipeline.prepare, job.query, data)
        except ServiceError as exc:
            return exc

    async def complete(self, job: Job) -> Finished | ServiceError:
        """The whole request: prepare, generate on a Generator replica, then the answer (or the error)."""
        queued_s, began = _queued(job), time.perf_counter()
        prepared = await self.prepare(job)
        if isinstance(prepared, ServiceError):
            return prepared
        sent = time.perf_counter()
        decoding = self.pipeline.decoding(prepared)
        if prepared.stop:
            async for item in self._generate(prepared, decoding):
                outcome = item
        else:
            outcome = decoding.finish(await self.generator.generate.remote(prepared.request))
        return finished_of(outcome, prepared, queued_s, sent - began, time.perf_counter() - sent)

    async def stream(self, job: Job) -> AsyncIterator[Started | ServiceError | TextPiece | Finished]:
        """Prepare, then stream: ``Started`` (or the error, alone), text pieces, the finished answer."""
        queued_s, began = _queued(job), time.perf_counter()
        prepared = await self.prepare(job)
        if isinstance(prepared, ServiceError):
            yield prepared
            return
        sent = time.perf_counter()
        yield Started(queued_s, sent - began)
        decoding = self.pipeline.decoding(prepared)
        opening = decoding.opening()  # an echo task's prompt words: certain before any token
        if opening.text:
            yield _piece(opening)
        first_token_s = None
        async for item in self._generate(prepared, decoding):
            if first_token_s is None:
                first_token_s = queued_s + time.perf_counter() - began
            release = item.rest if isinstance(item, Outcome) else item
            if release.text or release.tokens:
                yield _piece(release)
        yield finished_of(item, prepared, queued_s, sent - began, time.perf_counter() - sent, first_token_s)

    def _generate(self, prepared: Prepared, decoding: Decoding) -> AsyncIterator[Release | Outcome]:
        """Stream the tokens from a Generator into ``decoding``: what each makes certain, then the outcome. The
        generation is cancelled once a stop string has ended the text."""
        responses = self.generator.options(stream=True).stream.remote(prepared.request)
        return follow(decoding, responses, responses.cancel)


async def image_bytes(url: str, config: ServiceConfig) -> bytes:
    """The encoded image a request's ``image_url`` holds: a base64 data URI, or a remote URL where ``config``
    allows them; raises ``InvalidRequest``, ``InvalidImage`` or ``PayloadTooLarge``."""
    max_bytes = config.limits.max_image_bytes
    if url.startswith("data:"):
        return decode_data_uri(url, max_bytes)
    if url.startswith(("http://", "https://")):
        return await fetch_image(url, config.http, max_bytes)
    raise InvalidRequest("image_url.url must be a data URI (or an http(s) URL where enabled)", param="image_url")


def _queued(job: Job) -> float:
    """Seconds from the Ingress's hand-over to now (clocks of a cluster's machines agree closely enough)."""
    return max(time.time() - job.sent_at, 0.0) if job.sent_at else 0.0


def _piece(release: Release) -> TextPiece:
    return TextPiece(release.text, tuple(release.tokens))


def finished_of(
    outcome: Outcome,
    prepared: Prepared,
    queued_s: float = 0.0,
    prepare_s: float = 0.0,
    generate_s: float = 0.0,
    first_token_s: float | None = None,
) -> Finished:
    """The answer the Ingress writes out, from a request's outcome and where its time went."""
    return Finished(
        outcome.answer,
        outcome.finish_reason,
        len(prepared.request.prompt_ids),
        outcome.completion_tokens,
        outcome.tokens,
        queued_s,
        prepare_s,
        generate_s,
        first_token_s,
    )
