"""What goes into an engine and what comes out: the types every engine and its callers share (no torch).

A :class:`GenerationRequest` is one image (224x224x3 uint8, as the Kosmos-2 processor resizes it), its prompt's
token ids and its :class:`SamplingParams`; a :class:`GenerationResult` holds the generated ids and why generation
stopped. An engine delivers each request's tokens and end to a :class:`Sink`.

A request whose ``SamplingParams.logprobs`` is set also gets :class:`TokenLogprobs`: each generated token's
log-probability and the most likely tokens at its step, with the tokens as they stream (``Sink.tokens``) and in
the result. An engine that cannot compute them leaves ``Engine.supports_logprobs`` false, and such requests are
refused when submitted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np

FinishReason = Literal["stop", "length"]

MAX_TOP_LOGPROBS = 20
"""The most alternatives a request may ask for at each step (OpenAI's bound on ``top_logprobs``)."""


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request. ``temperature`` 0 means greedy; ``ignore_eos`` makes the end token
    an ordinary one, so that exactly ``max_new_tokens`` come out (for benchmarks). ``logprobs``: None for no
    log-probabilities, else how many of the most likely tokens to report beside each chosen one (0 to 20)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    no_repeat_ngram_size: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.no_repeat_ngram_size < 0:
            raise ValueError(f"no_repeat_ngram_size must be at least 0, got {self.no_repeat_ngram_size}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"logprobs must be None or in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class GenerationRequest:
    """One image and prompt. ``prompt_ids[image_offset : image_offset + 64]`` are the image slots."""

    pixels: np.ndarray
    prompt_ids: np.ndarray
    params: SamplingParams = field(default_factory=SamplingParams)
    image_offset: int = 2


@dataclass
class TokenLogprobs:
    """Log-probabilities of generated tokens under the model: the log-softmax of the logits, before temperature,
    top-p and n-gram bans. Entry ``i`` is the ``i``-th token's: ``chosen[i]`` its own, ``top_ids[i]`` and
    ``top_logprobs[i]`` the most likely tokens at its step, most likely first (as many as the request asked)."""

    chosen: list[float] = field(default_factory=list)
    top_ids: list[list[int]] = field(default_factory=list)
    top_logprobs: list[list[float]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.chosen)

    def extend(self, other: TokenLogprobs) -> None:
        self.chosen += other.chosen
        self.top_ids += other.top_ids
        self.top_logprobs += other.top_logprobs

    def slice(self, start: int, stop: int | None = None) -> TokenLogprobs:
        part = slice(start, stop)
        return TokenLogprobs(self.chosen[part], self.top_ids[part], self.top_logprobs[part])


@dataclass
class GenerationResult:
    """Generated ids (without the end token), why generation stopped, and token counts.

    ``completion_tokens`` counts every token the model produced, the end token included. ``logprobs`` holds one
    entry per id of ``token_ids`` when the request asked for them, else None.
    """

    token_ids: list[int]
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    logprobs: TokenLogprobs | None = None


@dataclass
class Generated:
    """New tokens of a streaming request (what ``serve.engine.loop``'s ``stream`` yields before the result), with
    their log-probabilities when the request asked for them."""

    token_ids: list[int]
    logprobs: TokenLogprobs | None = None


class Sink(Protocol):
    """Where an engine delivers one request's tokens (when ``streaming``) and its end. ``logprobs``, given for
    requests that asked, holds one entry per token."""

    streaming: bool

    def tokens(self, token_ids: list[int], logprobs: TokenLogprobs | None = None) -> None: ...

    def finish(self, result: GenerationResult) -> None: ...

    def fail(self, error: BaseException) -> None: ...


class Collector:
    """A sink that keeps the result, for :meth:`Engine.generate`."""

    streaming = False

    def __init__(self) -> None:
        self.result: GenerationResult | None = None
        self.error: BaseException | None = None

    def tokens(self, token_ids: list[int], logprobs: TokenLogprobs | None = None) -> None:
        pass

    def finish(self, result: GenerationResult) -> None:
        self.result = result

    def fail(self, error: BaseException) -> None:
        self.error = error
