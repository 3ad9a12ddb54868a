"""What travels between the deployments, and how a chat request becomes a job.

Ingress -> Preprocessor: a :class:`Job` (the client's image reference and the ``Query``: task, text and
parameters). The Preprocessor prepares it (``serve.kosmos2.pipeline``). Preprocessor -> Generator: the engine's
``GenerationRequest`` alone; Generator -> Preprocessor: the engine's ``GenerationResult``, which the Preprocessor
finishes into the :class:`Finished` answer that goes back to the Ingress (streamed: :class:`Started`, then
:class:`TextPiece` events as soon as their text is certain, then :class:`Finished`). The Preprocessor makes the
Generator call itself, so the pixels cross one hop. Bad input is not an exception between deployments but a
value: a ``ServiceError`` returned to the Ingress.
"""

from __future__ import annotations

from dataclasses import dataclass

from serve.app.config import ServiceConfig
from serve.app.protocol import MAX_TEXT_CHARS, ChatCompletionRequest, ImagePart, Message, TextPart
from serve.engine.requests import SamplingParams
from serve.errors import ContextLengthExceeded, InvalidRequest, NotFound
from serve.kosmos2.decoding import TokenText
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
    """The first event of a stream: the request passed its checks, so the stream can open; how long it was
    queued before the Preprocessor and how long preparing it took."""

    queued_s: float = 0.0
    prepare_s: float = 0.0


@dataclass(frozen=True)
class TextPiece:
    """Streamed answer text that is now certain, and the tokens (with log-probabilities, when asked for) whose
    text it completes."""

    text: str
    tokens: tuple[TokenText, ...] = ()


@dataclass(frozen=True)
class Finished:
    """An answer ready for the client, and for the request's log line where its time went: from the Ingress's
    hand-over to the Preprocessor's start (Serve's routing and queues), preparing the request, and awaiting its
    tokens from the Generator (the hop, its queues and the engine); streamed, also from the hand-over to the
    first generated token. ``tokens``: every token's text and log-probabilities, when asked for."""

    answer: Answer
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    tokens: list[TokenText] | None = None
    queued_s: float = 0.0
    prepare_s: float = 0.0
    generate_s: float = 0.0
    first_token_s: float | None = None


def job_from_request(request: ChatCompletionRequest, config: ServiceConfig, request_id: str) -> Job:
    """Check the request's fields and shape (one user message, one image, the task's inputs) and build the job.

    ``system`` and ``developer`` messages are accepted for clients that always send one, and set aside: Kosmos-2
    has no system prompt (an image in one is refused, as it would be lost)."""
    request.refuse_unsupported()
    if request.model is not None and request.model != config.served_model_name:
        raise NotFound(
            f"the model {request.model!r} does not exist; this server serves {config.served_model_name!r}",
            param="model",
        )
    users = [m for m in request.messages if m.role == "user"]
    instructions = [m for m in request.messages if m.role in ("system", "developer")]
    others = sorted({m.role for m in request.messages} - {"user", "system", "developer"})
    if others or len(users) != 1:
        raise InvalidRequest(
            "Kosmos-2 takes exactly one user message (with one image and optional text), and optional system or "
            f"developer messages; got {len(users)} user message(s)"
            + (f" and {', '.join(others)} message(s)" if others else ""),
            param="messages",
        )
    if any(_images(m) for m in instructions):
        raise InvalidRequest("the image goes in the user message, not in a system or developer one", param="messages")
    parts = _parts(users[0])
    images = _images(users[0])
    if len(images) != 1:
        raise InvalidRequest(f"the message needs exactly one image_url part, got {len(images)}", param="messages")
    text = " ".join(p.text.strip() for p in parts if isinstance(p, TextPart) and p.text.strip()) or None
    if text is not None and len(text) > MAX_TEXT_CHARS:
        raise ContextLengthExceeded(
            f"the text is {len(text)} characters, more than this model's context of {config.engine.max_seq_len} "
            f"tokens can hold (at most {MAX_TEXT_CHARS} characters are read). Please reduce the length of the "
            "messages.",
            param="messages",
        )
    task = request.task or (Task.VQA if text else Task.CAPTION)
    max_tokens = request.max_completion_tokens or request.max_tokens or config.limits.default_max_tokens
    params = SamplingParams(
        max_new_tokens=max_tokens,
        temperature=request.temperature if request.temperature is not None else 0.0,
        top_p=request.top_p if request.top_p is not None else 1.0,
        seed=request.seed,
        no_repeat_ngram_size=request.no_repeat_ngram_size or 0,
        ignore_eos=request.ignore_eos,
        logprobs=(request.top_logprobs or 0) if request.logprobs else None,
    )
    region = tuple(request.region) if request.region is not None else None
    asked = request.max_completion_tokens is not None or request.max_tokens is not None
    query = Query(task, text, region, params, request.stop_strings, fit_to_context=not asked)
    return Job(request_id, images[0].image_url.url, query)


def _parts(message: Message) -> list[ImagePart | TextPart]:
    content = message.content
    return [TextPart(type="text", text=content)] if isinstance(content, str) else list(content or [])


def _images(message: Message) -> list[ImagePart]:
    return [p for p in _parts(message) if isinstance(p, ImagePart)]
