"""What travels between the deployments, and how a chat request becomes a job.

Ingress -> Preprocessor: a :class:`Job` (the client's image reference and the ``Query``: task, text and
parameters). The Preprocessor prepares it (``serve.kosmos2.pipeline``). Preprocessor -> Generator: the engine's
``GenerationRequest`` alone; Generator -> Preprocessor: the engine's ``GenerationResult``, which the Preprocessor
finishes into the :class:`Finished` answer that goes back to the Ingress (streamed: :class:`Started`, then
:class:`TextPiece` events, then :class:`Finished`). The Preprocessor makes the Generator call itself, so the
pixels cross one hop. Bad input is not an exception between deployments but a value: a ``ServiceError``
returned to the Ingress.
"""

from __future__ import annotations

from dataclasses import dataclass

from serve.app.config import ServiceConfig
from serve.app.protocol import MAX_TEXT_CHARS, ChatCompletionRequest, ImagePart, TextPart
from serve.engine.requests import SamplingParams
from serve.errors import InvalidRequest, NotFound, PayloadTooLarge
from serve.kosmos2.pipeline import Query
from serve.kosmos2.tasks import Task
from serve.kosmos2.text import Answer


@dataclass(frozen=True)
class Job:
    """One request, checked for shape but not yet decoded."""

    request_id: str
    image_url: str
    query: Query
    sent_at: float = 0.0
    """When the Ingress handed the job over (``time.time()``, comparable across the machines of a cluster)."""


@dataclass(frozen=True)
class Started:
    """The first event of a stream: the request passed its checks, so the stream can open."""


@dataclass(frozen=True)
class TextPiece:
    """Streamed answer text that is now certain."""

    text: str


@dataclass(frozen=True)
class Finished:
    """An answer ready for the client, and for the request's log line where its time went: from the Ingress's
    hand-over to the Preprocessor's start (Serve's routing and queues), preparing the request, and awaiting its
    tokens from the Generator (the hop, its queues and the engine)."""

    answer: Answer
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    queued_s: float = 0.0
    prepare_s: float = 0.0
    generate_s: float = 0.0


def job_from_request(request: ChatCompletionRequest, config: ServiceConfig, request_id: str) -> Job:
    """Check the request's shape (one user message, one image, the task's inputs) and build the job."""
    if request.model is not None and request.model != config.served_model_name:
        raise NotFound(
            f"the model {request.model!r} does not exist; this server serves {config.served_model_name!r}",
            param="model",
        )
    users = [m for m in request.messages if m.role == "user"]
    others = sorted({m.role for m in request.messages if m.role != "user"})
    if others or len(users) != 1:
        raise InvalidRequest(
            "Kosmos-2 takes exactly one user message (with one image and optional text); "
            f"got {len(users)} user message(s)" + (f" and {', '.join(others)} message(s)" if others else ""),
            param="messages",
        )
    content = users[0].content
    parts = [TextPart(type="text", text=content)] if isinstance(content, str) else list(content or [])
    images = [p for p in parts if isinstance(p, ImagePart)]
    if len(images) != 1:
        raise InvalidRequest(f"the message needs exactly one image_url part, got {len(images)}", param="messages")
    text = " ".join(p.text.strip() for p in parts if isinstance(p, TextPart) and p.text.strip()) or None
    if text is not None and len(text) > MAX_TEXT_CHARS:
        raise PayloadTooLarge(f"the text is {len(text)} characters; the limit is {MAX_TEXT_CHARS}", param="messages")
    task = request.task or (Task.VQA if text else Task.CAPTION)
    max_tokens = request.max_completion_tokens or request.max_tokens or config.limits.default_max_tokens
    params = SamplingParams(
        max_new_tokens=max_tokens,
        temperature=request.temperature if request.temperature is not None else 0.0,
        top_p=request.top_p if request.top_p is not None else 1.0,
        seed=request.seed,
        no_repeat_ngram_size=request.no_repeat_ngram_size or 0,
        ignore_eos=request.ignore_eos,
    )
    region = tuple(request.region) if request.region is not None else None
    return Job(request_id, images[0].image_url.url, Query(task, text, region, params))
