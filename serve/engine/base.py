"""The engine interface: requests in, tokens out, with the queue and checks every engine shares.

Every engine takes requests with :meth:`Engine.submit` and a sink that receives tokens and the result, and
does its work in :meth:`Engine.step`, so one thread can drive any of them (``serve.engine.loop``);
:meth:`Engine.generate` runs a list of requests to completion, for tests, benchmarks and offline runs.
"""

from __future__ import annotations

import itertools
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from serve.engine.config import EngineConfig
from serve.engine.model import LoadedModel, ModelGeometry
from serve.engine.requests import Collector, GenerationRequest, GenerationResult, Sink
from serve.errors import ContextLengthExceeded, InvalidRequest


@dataclass
class Pending:
    """A submitted request waiting for the engine."""

    id: int
    request: GenerationRequest
    sink: Sink
    arrived: float = field(default_factory=time.monotonic)


def check_length(prompt_tokens: int, max_new_tokens: int, max_seq_len: int) -> None:
    """Refuse a request whose prompt and answer cannot fit in a sequence: ``context_length_exceeded``, naming
    ``messages`` when the prompt alone leaves no room for a token, else ``max_tokens``.

    >>> check_length(300, 10, 256)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    serve.errors.ContextLengthExceeded: This model's maximum context length is 256 tokens. However, you ...
    """
    if prompt_tokens + max_new_tokens <= max_seq_len:
        return
    prompt_fits = prompt_tokens < max_seq_len
    raise ContextLengthExceeded(
        f"This model's maximum context length is {max_seq_len} tokens. However, you requested "
        f"{prompt_tokens + max_new_tokens} tokens ({prompt_tokens} in the messages, 64 of them the image, "
        f"{max_new_tokens} in the completion). "
        + (
            f"Please reduce max_tokens to at most {max_seq_len - prompt_tokens}."
            if prompt_fits
            else "Please reduce the length of the messages."
        ),
        param="max_tokens" if prompt_fits else "messages",
    )


class Engine(ABC):
    """Requests in, tokens out: the queue and checks every engine shares.

    An engine sets ``supports_logprobs`` when it reports :class:`~serve.engine.requests.TokenLogprobs` for
    requests that ask (``SamplingParams.logprobs``); otherwise :meth:`check` refuses those requests.
    """

    supports_logprobs = False

    def __init__(self, loaded: LoadedModel, config: EngineConfig) -> None:
        self.loaded = loaded
        self.config = config
        self.geometry = ModelGeometry(loaded)
        self.waiting: deque[Pending] = deque()
        self._ids = itertools.count()
        self.device_wait_s = 0.0
        """Seconds the engine has blocked waiting for its device (the fast engine on CUDA counts them)."""
        self.admissions, self.admitted, self.admission_s = 0, 0, 0.0
        """Admissions of waiting requests into the running batch, the requests they took, and the seconds they
        took, the wait for their first tokens included (the fast engine counts them)."""

    def check(self, request: GenerationRequest) -> None:
        """Refuse a request the engine cannot run, with a message for the client."""
        if request.pixels.shape != (224, 224, 3) or request.pixels.dtype != np.uint8:
            raise InvalidRequest(f"pixels must be 224x224x3 uint8, got {request.pixels.shape} {request.pixels.dtype}")
        end = request.image_offset + self.geometry.image_tokens
        if request.prompt_ids.ndim != 1 or len(request.prompt_ids) < end:
            raise InvalidRequest("the prompt has no room for the image tokens")
        check_length(len(request.prompt_ids), request.params.max_new_tokens, self.config.max_seq_len)
        if request.params.logprobs is not None and not self.supports_logprobs:
            raise InvalidRequest(f"the {type(self).__name__} does not compute log-probabilities", param="logprobs")

    def submit(self, request: GenerationRequest, sink: Sink) -> int:
        """Queue a request; returns its id (for :meth:`cancel`). Raises :class:`InvalidRequest`."""
        self.check(request)
        pending = Pending(next(self._ids), request, sink)
        self.waiting.append(pending)
        return pending.id

    def cancel(self, *request_ids: int) -> None:
        """Drop requests that are waiting (subclasses also stop running ones)."""
        dropped = set(request_ids)
        self.waiting = deque(p for p in self.waiting if p.id not in dropped)

    def fail_all(self, error: BaseException) -> None:
        """End every request in the engine with ``error``: after a step failed midway, their state is unknown."""
        waiting, self.waiting = self.waiting, deque()
        for pending in waiting:
            pending.sink.fail(error)

    def warm_up(self) -> None:  # noqa: B027 (an optional hook)
        """Prepare what the first requests would otherwise wait for (the fast engine's CUDA graphs)."""

    @property
    def has_work(self) -> bool:
        return bool(self.waiting)

    @property
    def running_count(self) -> int:
        """Sequences being generated between steps."""
        return 0

    @abstractmethod
    def step(self) -> float | None:
        """Do the next unit of work, delivering tokens and results to the sinks; or return how many seconds
        to wait for more requests first."""

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Run ``requests`` to completion and return their results in order."""
        sinks = [Collector() for _ in requests]
        for request, sink in zip(requests, sinks):
            self.submit(request, sink)
        while self.has_work:
            wait = self.step()
            if wait:
                time.sleep(wait)
        for sink in sinks:
            if sink.error is not None:
                raise sink.error
        return [sink.result for sink in sinks]
