"""The wire format: OpenAI-compatible chat completions with Kosmos-2's extensions (pydantic, no torch).

Requests follow OpenAI's ``/v1/chat/completions``: one user message whose content holds one ``image_url``
part and optional text parts; ``system`` and ``developer`` messages are accepted and their text set aside
(Kosmos-2 has no system prompt). Every OpenAI request field is known here and either honoured or refused by
:meth:`ChatCompletionRequest.refuse_unsupported` with a 400 naming it; a field OpenAI does not define is refused
too, as OpenAI refuses it (``docs/api.md`` lists each field). Extensions: ``task``, ``region``,
``no_repeat_ngram_size`` and ``ignore_eos`` (as in vLLM: exactly ``max_tokens`` tokens, for benchmarks).
Responses add ``choices[0].message.entities`` (streamed: ``delta.entities`` on the final chunk): each phrase
with its span in the content and its boxes, normalized and in the original image's pixels.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from serve.errors import InvalidRequest
from serve.kosmos2.tasks import Task

MAX_TEXT_CHARS = 4000
"""Longest text a request may carry in all its text parts together (far past any context it could fit)."""
MAX_STOP = 4
"""Stop strings a request may give, as OpenAI allows."""


class _Lenient(BaseModel):
    """Parts of a message: fields other servers add there are accepted and ignored."""

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
    name: str | None = None


class StreamOptions(_Lenient):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """An OpenAI chat completion request; the ranges here are checked before anything else runs."""

    model_config = ConfigDict(extra="forbid")

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
    stop: str | list[str] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    user: str | None = Field(default=None, max_length=256)
    safety_identifier: str | None = Field(default=None, max_length=256)
    metadata: dict[str, str] | None = Field(default=None, max_length=16)
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    prompt_cache_options: dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    # fields a Kosmos-2 server cannot honour; refused unless left at their neutral value
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[Any] | None = None
    function_call: str | dict[str, Any] | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    web_search_options: dict[str, Any] | None = None
    moderation: Any = None
    # Kosmos-2's extensions
    task: Task | None = None
    region: list[float] | None = Field(default=None, min_length=4, max_length=4)
    no_repeat_ngram_size: int | None = Field(default=None, ge=0, le=16)
    ignore_eos: bool = False

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop: str | list[str] | None) -> list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop
        if stops is not None and len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings, got {len(stops)}")
        if stops is not None and not all(stops):
            raise ValueError("a stop string must not be empty")
        return stops

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return tuple(self.stop or ())

    def refuse_unsupported(self) -> None:
        """Raise ``InvalidRequest`` naming the first field that asks for what this server cannot do."""
        for field, asked, why in (
            (
                "frequency_penalty",
                bool(self.frequency_penalty),
                "penalties are not supported; use no_repeat_ngram_size",
            ),
            ("presence_penalty", bool(self.presence_penalty), "penalties are not supported; use no_repeat_ngram_size"),
            ("logit_bias", bool(self.logit_bias), "logit_bias is not supported"),
            ("response_format", _format(self.response_format) != "text", "only the text response format is supported"),
            ("tools", bool(self.tools), "Kosmos-2 does not call tools"),
            ("tool_choice", self.tool_choice not in (None, "none"), "Kosmos-2 does not call tools"),
            ("functions", bool(self.functions), "Kosmos-2 does not call functions"),
            ("function_call", self.function_call not in (None, "none"), "Kosmos-2 does not call functions"),
            ("modalities", self.modalities not in (None, ["text"]), "Kosmos-2 answers in text only"),
            ("audio", self.audio is not None, "Kosmos-2 answers in text only"),
            ("prediction", self.prediction is not None, "predicted outputs are not supported"),
            ("store", bool(self.store), "this server does not store completions"),
            ("service_tier", self.service_tier not in (None, "auto", "default"), "one service tier: auto"),
            ("reasoning_effort", self.reasoning_effort is not None, "Kosmos-2 is not a reasoning model"),
            ("verbosity", self.verbosity is not None, "verbosity is not supported; use max_tokens"),
            ("web_search_options", self.web_search_options is not None, "Kosmos-2 does not search the web"),
            ("moderation", self.moderation is not None, "this server runs no moderation"),
            ("top_logprobs", self.top_logprobs is not None and not self.logprobs, "needs logprobs: true"),
            ("stream_options", self.stream_options is not None and not self.stream, "only with stream: true"),
        ):
            if asked:
                raise InvalidRequest(f"{field}: {why}", param=field, code="unsupported_parameter")


def _format(response_format: dict[str, Any] | None) -> str:
    return "text" if response_format is None else str(response_format.get("type"))


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


class TopLogprob(BaseModel):
    """One token's text (``bytes``: its UTF-8) and log-probability."""

    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    """A generated token: its piece of the content, its log-probability and the most likely tokens at its step."""

    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: list[TokenLogprob] | None = None


class Choice(BaseModel):
    index: int = 0
    message: ResponseMessage
    finish_reason: Literal["stop", "length"]
    logprobs: ChoiceLogprobs | None = None


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
    logprobs: ChoiceLogprobs | None = None


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
