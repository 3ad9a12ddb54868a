"""One Kosmos-2 request from the image and the task to the answer, the same wherever it runs.

:meth:`Pipeline.prepare` turns a :class:`Query` (the task, its text or region, the sampling parameters) and an
encoded image into a :class:`Prepared` request: the engine's input (224x224 uint8 pixels and the prompt's ids)
and what finishing needs (the prompt, the original image's size, the stop strings). :meth:`Pipeline.finish` turns
the engine's tokens into the clean answer and its entities, boxes scaled to the original image;
:meth:`Pipeline.decoding` does so as the tokens arrive (``serve.kosmos2.decoding``). The service's Preprocessor,
the evaluation's engine predictor and the benchmarks all go through here, so that they prepare and read answers
alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
from transformers import Kosmos2Processor

from serve.engine.base import check_length
from serve.engine.requests import GenerationRequest, GenerationResult, SamplingParams
from serve.kosmos2.decoding import Decoding
from serve.kosmos2.grounding import Box
from serve.kosmos2.images import ImageLimits, PreparedImage, prepare_image
from serve.kosmos2.tasks import Prompt, Task, build_prompt
from serve.kosmos2.text import Answer, TextCodec


@dataclass(frozen=True)
class Query:
    """What is asked of the model about one image; ``stop``: strings that end the answer's text before them;
    ``fit_to_context``: ``params.max_new_tokens`` is a default, not asked for, and shrinks to the room the
    prompt leaves in a sequence rather than refuse a long prompt."""

    task: Task
    text: str | None = None
    region: Box | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    fit_to_context: bool = False


@dataclass(frozen=True)
class Prepared:
    """The engine's request, and what turning its tokens into the answer needs."""

    request: GenerationRequest
    prompt: Prompt
    width: int
    height: int
    """The original image's size, as displayed (EXIF orientation applied)."""
    stop: tuple[str, ...] = ()


class Pipeline:
    """Prepare and finish requests with one model's processor, under the service's image limits.

    ``max_seq_len``, when given, refuses a query whose prompt and ``max_new_tokens`` cannot fit in a sequence
    before its image is decoded.
    """

    def __init__(self, processor: Kosmos2Processor, limits: ImageLimits, max_seq_len: int | None = None) -> None:
        self.codec = TextCodec(processor)
        self.limits = limits
        self.max_seq_len = max_seq_len

    def prompt(self, query: Query) -> tuple[Prompt, np.ndarray, SamplingParams]:
        """The query's prompt, its token ids and the sampling parameters it runs with; raises ``InvalidRequest``
        when the input does not fit the task, ``ContextLengthExceeded`` when it does not fit a sequence."""
        prompt = build_prompt(query.task, query.text, query.region)
        ids = self.codec.encode(prompt.text)
        params = query.params
        if self.max_seq_len is not None:
            room = self.max_seq_len - len(ids)
            if query.fit_to_context and 0 < room < params.max_new_tokens:
                params = replace(params, max_new_tokens=room)
            check_length(len(ids), params.max_new_tokens, self.max_seq_len)
        return prompt, ids, params

    def prepare(self, query: Query, image: bytes | PreparedImage) -> Prepared:
        """The engine's request for ``query`` about ``image`` (encoded bytes, or pixels already prepared);
        raises ``InvalidRequest``, ``InvalidImage`` or ``PayloadTooLarge``."""
        prompt, ids, params = self.prompt(query)
        if not isinstance(image, PreparedImage):
            image = prepare_image(image, self.limits)
        request = GenerationRequest(image.pixels, ids, params)
        return Prepared(request, prompt, image.width, image.height, query.stop)

    def finish(self, prepared: Prepared, result: GenerationResult) -> Answer:
        """The answer's clean text and entities (ending before a stop string)."""
        if prepared.stop:
            return self.decoding(prepared).finish(result).answer
        ids = prepared.request.prompt_ids.tolist()
        return self.codec.answer(prepared.prompt, ids, result.token_ids, prepared.width, prepared.height)

    def decoding(self, prepared: Prepared) -> Decoding:
        """The answer as tokens arrive: certain text, stop strings, each token's text for log-probabilities."""
        return Decoding(
            self.codec,
            prepared.prompt,
            prepared.request.prompt_ids.tolist(),
            (prepared.width, prepared.height),
            prepared.stop,
            logprobs=prepared.request.params.logprobs is not None,
        )
