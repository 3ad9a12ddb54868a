"""Generation requests and results, the engine interface, and the Hugging Face reference path.

The engine knows nothing of HTTP, Ray or tokenization: it takes 224x224 uint8 pixels, prompt token ids and
sampling parameters, and returns token ids. Both engines take requests with :meth:`Engine.submit` and a
:class:`Sink` that receives tokens and the result, and do their work in :meth:`Engine.step`, so one thread
can drive either (``serve.engine_loop``); :meth:`Engine.generate` runs a list of requests to completion, for
tests and benchmarks. Two paths implement it:

- :class:`HFEngine` (here): the Hugging Face modules with a dynamic cache, one static batch at a time. It is
  the reference the fast path is tested against, and the fallback. It fixes a defect of transformers'
  Kosmos-2 batched generation, which derives position ids from the cache length, so every left-padded row
  drifts after the first token: here positions come from the attention mask, and a batch gives exactly the
  tokens its requests give alone (``tests/integration/test_hf_engine.py``).
- ``serve.fastpath.FastEngine``: continuous batching over a static KV cache, with CUDA graphs on GPUs.
"""

from __future__ import annotations

import itertools
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np
import torch
from transformers import DynamicCache

from serve.config import EngineConfig
from serve.errors import InvalidRequest
from serve.model import LoadedModel
from serve.sampling import SamplingParams, TokenChooser, choose_tokens

FinishReason = Literal["stop", "length"]


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


class ModelGeometry:
    """Token ids and sizes the engines need from a loaded model."""

    def __init__(self, loaded: LoadedModel) -> None:
        config = loaded.model.config
        self.pad_id: int = config.text_config.pad_token_id
        self.eos_id: int = config.text_config.eos_token_id
        self.image_tokens: int = config.latent_query_num
        processor = loaded.processor.image_processor
        self.mean = torch.tensor(processor.image_mean, device=loaded.device).view(1, 3, 1, 1)
        self.std = torch.tensor(processor.image_std, device=loaded.device).view(1, 3, 1, 1)
        self.scale = float(processor.rescale_factor)


def normalize_pixels(pixels: torch.Tensor, geometry: ModelGeometry, dtype: torch.dtype) -> torch.Tensor:
    """(B, 224, 224, 3) uint8 on the device -> (B, 3, 224, 224) CLIP-normalized, as the processor computes it."""
    values = pixels.permute(0, 3, 1, 2).to(torch.float32) * geometry.scale
    return ((values - geometry.mean) / geometry.std).to(dtype)


@torch.inference_mode()
def encode_images(loaded: LoadedModel, geometry: ModelGeometry, pixels: Sequence[np.ndarray]) -> torch.Tensor:
    """Image embeddings (B, 64, text width) for a batch of uint8 images: vision tower, then projection."""
    return encode_pixels(loaded, geometry, torch.from_numpy(np.stack(pixels)).to(loaded.device))


def encode_pixels(loaded: LoadedModel, geometry: ModelGeometry, pixels: torch.Tensor) -> torch.Tensor:
    """:func:`encode_images` for (B, 224, 224, 3) uint8 pixels already on the device."""
    model = loaded.model
    hidden = model.vision_model(pixel_values=normalize_pixels(pixels, geometry, loaded.dtype))[0]
    features = torch.nn.functional.normalize(model.vision_model.model.post_layernorm(hidden), dim=-1)
    return model.image_to_text_projection(features)[0]


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


@dataclass
class Pending:
    """A submitted request waiting for the engine."""

    id: int
    request: GenerationRequest
    sink: Sink
    arrived: float = field(default_factory=time.monotonic)


def check_length(prompt_tokens: int, max_new_tokens: int, max_seq_len: int) -> None:
    """Refuse a request whose prompt and answer cannot fit in a sequence."""
    if prompt_tokens + max_new_tokens > max_seq_len:
        raise InvalidRequest(
            f"the prompt ({prompt_tokens} tokens, 64 of them the image) plus max_tokens ({max_new_tokens}) "
            f"exceeds the {max_seq_len} tokens a sequence may hold; ask for at most "
            f"{max(max_seq_len - prompt_tokens, 0)} tokens",
            param="max_tokens",
        )


class Engine(ABC):
    """Requests in, tokens out: the queue and checks both engine paths share."""

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


class HFEngine(Engine):
    """The reference path: static batches through the Hugging Face modules, with correct position ids."""

    def step(self) -> float | None:
        if len(self.waiting) < self.config.max_batch_size:
            wait = self.waiting[0].arrived + self.config.batch_wait_s - time.monotonic()
            if wait > 0:
                return wait  # gather the requests that arrive together into one batch
        batch = [self.waiting.popleft() for _ in range(min(len(self.waiting), self.config.max_batch_size))]
        try:
            results = self.run_batch([p.request for p in batch], [p.sink for p in batch])
        except Exception as exc:  # e.g. out of memory: fail this batch, keep serving
            for pending in batch:
                pending.sink.fail(exc)
            return None
        for pending, result in zip(batch, results):
            pending.sink.finish(result)
        return None

    @torch.inference_mode()
    def run_batch(self, requests: Sequence[GenerationRequest], sinks: Sequence[Sink]) -> list[GenerationResult]:
        """Generate for every request in one batch; each gets exactly its own parameters."""
        device, geometry = self.loaded.device, self.geometry
        text_model = self.loaded.model.text_model
        image_embeds = encode_images(self.loaded, geometry, [r.pixels for r in requests])
        input_ids, attention, image_mask = self._left_pad(requests)
        cache = DynamicCache(config=text_model.config)
        out = text_model(
            input_ids=input_ids,
            attention_mask=attention,
            image_embeds=image_embeds,
            image_embeds_position_mask=image_mask,
            position_ids=self._positions(attention),
            past_key_values=cache,
            use_cache=True,
        )
        choosers = [TokenChooser(r.params, r.prompt_ids) for r in requests]
        generated: list[list[int]] = [[] for _ in requests]
        finish: list[FinishReason | None] = [None] * len(requests)
        logits = out.logits[:, -1]
        while True:
            tokens = choose_tokens(logits, choosers)
            for i, token in enumerate(tokens):
                if finish[i] is not None:
                    continue
                choosers[i].append(token)
                if token == geometry.eos_id and not requests[i].params.ignore_eos:
                    finish[i] = "stop"
                    continue
                generated[i].append(token)
                if sinks[i].streaming:
                    sinks[i].tokens([token])
                if len(generated[i]) >= requests[i].params.max_new_tokens:
                    finish[i] = "length"
            if all(reason is not None for reason in finish):
                break
            step = torch.tensor(
                [[t if reason is None else geometry.pad_id] for t, reason in zip(tokens, finish)], device=device
            )
            attention = torch.cat([attention, torch.ones_like(step)], dim=1)
            out = text_model(
                input_ids=step,
                attention_mask=attention,
                position_ids=self._positions(attention)[:, -1:],
                past_key_values=cache,
                use_cache=True,
            )
            logits = out.logits[:, -1]
        return [
            GenerationResult(ids, reason, len(r.prompt_ids), len(ids) + (reason == "stop"))
            for ids, reason, r in zip(generated, finish, requests)
        ]

    def _left_pad(self, requests: Sequence[GenerationRequest]) -> tuple[torch.Tensor, ...]:
        width = max(len(r.prompt_ids) for r in requests)
        ids = np.full((len(requests), width), self.geometry.pad_id, dtype=np.int64)
        attention = np.zeros_like(ids)
        image_mask = np.zeros_like(ids, dtype=bool)
        for row, request in enumerate(requests):
            pad = width - len(request.prompt_ids)
            ids[row, pad:] = request.prompt_ids
            attention[row, pad:] = 1
            start = pad + request.image_offset
            image_mask[row, start : start + self.geometry.image_tokens] = True
        device = self.loaded.device
        return tuple(torch.from_numpy(a).to(device) for a in (ids, attention, image_mask))

    def _positions(self, attention: torch.Tensor) -> torch.Tensor:
        """Kosmos-2 positions: real tokens count from pad id + 1; padding sits on the pad id (a zero vector)."""
        return (attention.cumsum(dim=1) * attention + self.geometry.pad_id).long()


def build_engine(loaded: LoadedModel, config: EngineConfig) -> Engine:
    """The engine ``config.kind`` names, around a loaded model."""
    if config.kind == "hf":
        return HFEngine(loaded, config)
    from serve.fastpath import FastEngine

    return FastEngine(loaded, config)
