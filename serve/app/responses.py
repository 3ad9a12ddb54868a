"""What the Ingress reads and writes besides routes: the request body in, the completion out, errors named.

:func:`parse_body` turns the raw body into the request model or an ``InvalidRequest`` naming the field
(:func:`parse_request` a body already decoded, as a batch file's lines are); :func:`completion` and
:func:`logprobs_of` turn a :class:`~serve.app.messages.Finished` answer into the OpenAI response; :func:`translate`
turns an exception raised here or in a replica (Ray wraps those) into the service's own, which
``serve.errors.error_response`` then writes as the OpenAI error envelope.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence

from pydantic import ValidationError
from ray import exceptions as ray_errors
from ray.serve import exceptions as serve_errors

from serve.app.messages import Finished
from serve.app.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    Choice,
    ChoiceLogprobs,
    EntityOut,
    ResponseMessage,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from serve.errors import InvalidRequest, ServiceError, Timeout, Unavailable
from serve.kosmos2.decoding import TokenText


def parse_body(body: bytes) -> ChatCompletionRequest:
    """The request model, or an ``InvalidRequest`` naming the first offending field."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequest("the body is not valid JSON") from None
    return parse_request(data)


def parse_request(data: object) -> ChatCompletionRequest:
    """The request model of a decoded JSON body (``parse_body``'s second half, for bodies that arrive decoded:
    a batch file's lines)."""
    if not isinstance(data, dict):
        raise InvalidRequest("the body must be a JSON object")
    try:
        return ChatCompletionRequest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = str(first["loc"][0]) if first["loc"] else None
        if first["type"] == "extra_forbidden":  # as OpenAI words it
            raise InvalidRequest(f"Unrecognized request argument supplied: {param}", param=param) from None
        where = ".".join(str(part) for part in first["loc"])
        raise InvalidRequest(f"{where}: {first['msg'].removeprefix('Value error, ')}", param=param) from None


def entities_out(finished: Finished) -> list[EntityOut]:
    return [
        EntityOut(phrase=e.phrase, span=e.span, boxes=e.boxes, boxes_px=e.boxes_px) for e in finished.answer.entities
    ]


def usage_of(finished: Finished) -> Usage:
    return Usage(
        prompt_tokens=finished.prompt_tokens,
        completion_tokens=finished.completion_tokens,
        total_tokens=finished.prompt_tokens + finished.completion_tokens,
    )


def logprobs_of(tokens: Sequence[TokenText] | None) -> ChoiceLogprobs | None:
    """OpenAI's ``logprobs`` of generated tokens (None when the request did not ask)."""
    if tokens is None:
        return None

    def top(text: str, logprob: float) -> TopLogprob:
        return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode()))

    return ChoiceLogprobs(
        content=[
            TokenLogprob(
                token=t.text,
                logprob=t.logprob,
                bytes=list(t.text.encode()),
                top_logprobs=[top(text, logprob) for text, logprob in t.top],
            )
            for t in tokens
        ]
    )


def completion(finished: Finished, request_id: str, model: str) -> ChatCompletion:
    """The response to a request that did not stream."""
    message = ResponseMessage(content=finished.answer.text, entities=entities_out(finished))
    choice = Choice(message=message, finish_reason=finished.finish_reason, logprobs=logprobs_of(finished.tokens))
    return ChatCompletion(id=request_id, model=model, choices=[choice], usage=usage_of(finished))


def translate(exc: BaseException) -> BaseException:
    """Our error for an exception raised here or in a replica (Ray wraps those)."""
    while isinstance(exc, ray_errors.RayTaskError) and exc.cause is not None:  # nested: raised two hops away
        exc = exc.cause
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, serve_errors.BackPressureError):
        return Unavailable("the service is at capacity; retry shortly", code="overloaded", retry_after=1)
    if isinstance(exc, ray_errors.RayError | serve_errors.RayServeException):  # a replica, node or object lost
        return Unavailable("a replica serving this request was lost; retry", code="replica_lost", retry_after=1)
    if isinstance(exc, asyncio.TimeoutError):
        return Timeout("the request took longer than this server allows")
    if isinstance(exc, ValueError):
        return InvalidRequest(str(exc))
    return exc
