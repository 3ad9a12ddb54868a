"""Generation requests and results, and the Hugging Face reference path (a static batch, done right).

The engine knows nothing of HTTP, Ray or tokenization: it takes 224x224 uint8 pixels, prompt token ids and
sampling parameters, and returns token ids. Two paths implement it:

- :class:`HFEngine` (here): the Hugging Face modules with a dynamic cache, one static batch at a time. It is
  the reference the fast path is tested against, and the fallback. It fixes a defect of transformers'
  Kosmos-2 batched generation, which derives position ids from the cache length, so every left-padded row
  drifts after the first token: here positions come from the attention mask, and a batch gives exactly the
  tokens its requests give alone.
- ``serve.fastpath.FastEngine``: continuous batching over a static KV cache, with CUDA graphs on GPUs.

Run a quick check against the tiny model with ``python -m serve tiny /tmp/tiny`` then the tests.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from transformers import DynamicCache

from serve.model import LoadedModel
from serve.sampling import SamplingParams, TokenChooser, choose_tokens

FinishReason = Literal["stop", "length"]
TokenCallback = Callable[[int, list[int]], None]
"""Called with (request index, new token ids) as tokens are generated, for streaming."""


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
    batch = torch.from_numpy(np.stack(pixels)).to(loaded.device, non_blocking=True)
    model = loaded.model
    vision = model.vision_model(pixel_values=normalize_pixels(batch, geometry, loaded.dtype))
    features = torch.nn.functional.normalize(model.vision_model.model.post_layernorm(vision[0]), dim=-1)
    return model.image_to_text_projection(features)[0]


class HFEngine:
    """The reference path: a static batch through the Hugging Face modules with correct position ids."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.geometry = ModelGeometry(loaded)

    @torch.inference_mode()
    def generate(
        self, requests: Sequence[GenerationRequest], on_tokens: TokenCallback | None = None
    ) -> list[GenerationResult]:
        """Generate for every request in one batch; each gets exactly its own parameters."""
        if not requests:
            return []
        device, geometry = self.loaded.device, self.geometry
        text_model = self.loaded.model.text_model
        image_embeds = encode_images(self.loaded, geometry, [r.pixels for r in requests])
        input_ids, attention, image_mask = self._left_pad(requests)
        positions = self._positions(attention)
        cache = DynamicCache(config=text_model.config)
        out = text_model(
            input_ids=input_ids,
            attention_mask=attention,
            image_embeds=image_embeds,
            image_embeds_position_mask=image_mask,
            position_ids=positions,
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
                if token == geometry.eos_id:
                    finish[i] = "stop"
                    continue
                generated[i].append(token)
                if on_tokens is not None:
                    on_tokens(i, [token])
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
        return (
            torch.from_numpy(ids).to(device),
            torch.from_numpy(attention).to(device),
            torch.from_numpy(image_mask).to(device),
        )

    def _positions(self, attention: torch.Tensor) -> torch.Tensor:
        """Kosmos-2 positions: real tokens count from pad id + 1; padding sits on the pad id (a zero vector)."""
        return (attention.cumsum(dim=1) * attention + self.geometry.pad_id).long()
