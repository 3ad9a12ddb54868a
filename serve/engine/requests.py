"""What goes into an engine and what comes out: the types every engine and its callers share (no torch).

A :class:`GenerationRequest` is one image (224x224x3 uint8, as the Kosmos-2 processor resizes it), its prompt's
token ids and its :class:`SamplingParams`; a :class:`GenerationResult` holds the generated ids and why generation
stopped. An engine delivers each request's tokens and end to a :class:`Sink`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request. ``temperature`` 0 means greedy; ``ignore_eos`` makes the end token
    an ordinary one, so that exactly ``max_new_tokens`` come out (for benchmarks)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    no_repeat_ngram_size: int = 0
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.no_repeat_ngram_size < 0:
            raise ValueError(f"no_repeat_ngram_size must be at least 0, got {self.no_repeat_ngram_size}")

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
class GenerationResult:
    """Generated ids (without the end token), why generation stopped, and token counts.

    ``completion_tokens`` counts every token the model produced, the end token included.
    """

    token_ids: list[int]
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int


class Sink(Protocol):
    """Where an engine delivers one request's tokens (when ``streaming``) and its end."""

    streaming: bool

    def tokens(self, token_ids: list[int]) -> None: ...

    def finish(self, result: GenerationResult) -> None: ...

    def fail(self, error: BaseException) -> None: ...


class Collector:
    """A sink that keeps the result, for :meth:`Engine.generate`."""

    streaming = False

    def __init__(self) -> None:
        self.result: GenerationResult | None = None
        self.error: BaseException | None = None

    def tokens(self, token_ids: list[int]) -> None:
        pass

    def finish(self, result: GenerationResult) -> None:
        self.result = result

    def fail(self, error: BaseException) -> None:
        self.error = error
