"""The wire format: OpenAI-compatible chat completions with Kosmos-2's extensions (pydantic, no torch).

Requests follow OpenAI's ``/v1/chat/completions``: one user message whose content holds one ``image_url``
part (a data URI) and optional text parts. Extensions: ``task``, ``region``, ``no_repeat_ngram_size`` and
``ignore_eos`` (as in vLLM: exactly ``max_tokens`` tokens, for benchmarks).
Unknown fields are accepted and ignored, as OpenAI-compatible servers do. Responses add
``choices[0].message.entities`` (and ``delta.entities`` when streaming): each phrase with its span in the
content and its boxes, normalized and in the original image's pixels.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from serve.kosmos2.tasks import Task

MAX_TEXT_CHARS = 4000
"""Longest text a request may carry in all its text parts together."""


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ImageURL(_Lenient):
    url: str
    detail: str | None = None


class ImagePart(_Lenient):
    type: Literal["image_url"]
    image_url: ImageURL


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


ContentPart = Annotated[ImagePart | TextPart, Field(discriminator="type")]


class Message(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None


class StreamOptions(_Lenient):
    include_usage: bool = False


class ChatCompletionRequest(_Lenient):
    """An OpenAI chat completion request; the ranges here are checked before anything else runs."""

    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    n: int | None = Field(default=None, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    task: Task | None = None
    region: list[float] | None = Field(default=None, min_length=4, max_length=4)
    no_repeat_ngram_size: int | None = Field(default=None, ge=0, le=16)
    ignore_eos: bool = False


class EntityOut(BaseModel):
    """A grounded phrase: ``span`` indexes the content; boxes are [x1, y1, x2, y2]."""

    phrase: str
    span: tuple[int, int]
    boxes: list[tuple[float, float, float, float]]
    boxes_px: list[tuple[float, float, float, float]]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    entities: list[EntityOut] = Field(default_factory=list)


class Choice(BaseModel):
    index: int = 0
    message: ResponseMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


class ChatCompletion(BaseModel):
    id: str = Field(default_factory=completion_id)
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    entities: list[EntityOut] | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "kosmos2-serve"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorEnvelope(BaseModel):
    error: ErrorDetail


def sse(payload: BaseModel | dict[str, Any] | str) -> str:
    """One server-sent event carrying JSON (or the literal ``[DONE]``)."""
    if isinstance(payload, BaseModel):
        payload = payload.model_dump_json(exclude_none=True)
    elif isinstance(payload, dict):
        payload = json.dumps(payload)
    return f"data: {payload}\n\n"
