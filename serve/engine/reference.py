"""The reference engine: the Hugging Face modules with a dynamic cache, one static batch at a time.

:class:`HFEngine` is what the fast engine is tested against, and its fallback. It mends a defect of
transformers' Kosmos-2 batched generation, which derives position ids from the cache length, so that every
left-padded row drifts after the first token: here positions come from the attention mask, and a batch gives
exactly the tokens its requests give alone (``tests/engine/test_reference.py``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch
from transformers import DynamicCache

from serve.engine.base import Engine
from serve.engine.model import LoadedModel, ModelGeometry
from serve.engine.requests import FinishReason, GenerationRequest, GenerationResult, Sink, TokenLogprobs
from serve.engine.sampling import TokenChooser, choose_tokens, split_logprobs, token_logprobs


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


class HFEngine(Engine):
    """The reference path: static batches through the Hugging Face modules, with correct position ids."""

    supports_logprobs = True

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
        logprobs = [TokenLogprobs() if r.params.logprobs is not None else None for r in requests]
        logits = out.logits[:, -1]
        while True:
            tokens = choose_tokens(logits, choosers)
            entries = self._logprobs(logits, tokens, requests, [f is None for f in finish])
            for i, token in enumerate(tokens):
                if finish[i] is not None:
                    continue
                choosers[i].append(token)
                if token == geometry.eos_id and not requests[i].params.ignore_eos:
                    finish[i] = "stop"
                    continue
                generated[i].append(token)
                entry = entries.get(i)
                if entry is not None:
                    logprobs[i].extend(entry)
                if sinks[i].streaming:
                    sinks[i].tokens([token], entry)
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
            GenerationResult(ids, reason, len(r.prompt_ids), len(ids) + (reason == "stop"), entries)
            for ids, reason, r, entries in zip(generated, finish, requests, logprobs)
        ]

    @staticmethod
    def _logprobs(
        logits: torch.Tensor, tokens: list[int], requests: Sequence[GenerationRequest], running: list[bool]
    ) -> dict[int, TokenLogprobs]:
        """This step's log-probabilities of the running rows that asked for them, by row."""
        rows = [i for i, r in enumerate(requests) if running[i] and r.params.logprobs is not None]
        if not rows:
            return {}
        counts = [requests[i].params.logprobs for i in rows]
        index = torch.tensor(rows, device=logits.device)
        chosen = torch.tensor([tokens[i] for i in rows], device=logits.device)
        return dict(zip(rows, split_logprobs(*token_logprobs(logits[index], chosen, counts), counts)))

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
