"""The fast engine: continuous batching over a static KV cache, with the decode step as CUDA graphs.

Each :meth:`FastEngine.step` admits waiting requests into free cache slots (vision encoding and prompt
prefill as one batch, SDPA with a causal mask) and then runs one decode step for every running sequence.
A sequence leaves as soon as it ends, and its slot is reused by the next request, so a short answer never
waits for a long one.

The text decoder is re-implemented here for one purpose, the step over a preallocated cache: it calls the
Hugging Face modules' own layers (same weights, same functions), writes keys and values into
``[slots, heads, max_seq_len, head_dim]`` tensors, and attends over the first ``Tb`` cache positions only
(``Tb`` rounded up to a multiple of 32). On CUDA the decode step for each (batch bucket, length bucket) pair
is captured once as a CUDA graph and replayed, which removes the Python and launch cost that dominates
Hugging Face's step. Book-keeping is vectorized with numpy; Python runs per sequence only for sequences that
stream, sample or ban n-grams, and for those that finish.

On the tiny model in float32 on the CPU its greedy tokens equal :class:`serve.engine.HFEngine`'s
(``tests/integration/test_fastpath.py``).
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from serve.config import EngineConfig
from serve.engine import Engine, GenerationRequest, GenerationResult, Pending, Sink, encode_images
from serve.model import LoadedModel
from serve.sampling import TokenChooser, choose_special

log = logging.getLogger(__name__)

LENGTH_BUCKET = 32
"""Granularity of the attended cache length in a decode step."""


@dataclass
class Running:
    """A sequence in a cache slot."""

    id: int
    request: GenerationRequest
    sink: Sink
    chooser: TokenChooser


def batch_buckets(max_batch: int) -> list[int]:
    """Decode batch sizes that get their own graph: powers of two, and the maximum.

    >>> batch_buckets(48)
    [1, 2, 4, 8, 16, 32, 48]
    """
    sizes = [1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch]
    return [*sizes, max_batch]


class FastEngine(Engine):
    """Continuous batching with a static KV cache of ``max_batch_size`` slots of ``max_seq_len`` tokens."""

    def __init__(self, loaded: LoadedModel, config: EngineConfig) -> None:
        super().__init__(loaded, config)
        text = loaded.model.text_model
        self.decoder = text.model
        self.lm_head = text.lm_head
        text_config = text.config
        slots, length = config.max_batch_size, config.max_seq_len
        self.heads = text_config.attention_heads
        self.head_dim = text_config.embed_dim // self.heads
        device, dtype = loaded.device, loaded.dtype
        positions = self.decoder.embed_positions.weights
        first = self.geometry.pad_id + 1
        if first + length > positions.shape[0]:
            raise ValueError(f"max_seq_len {length} exceeds the model's {positions.shape[0] - first} positions")
        self.position_table = positions[first : first + length].to(device=device, dtype=dtype)
        shape = (slots, self.heads, length, self.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in self.decoder.layers]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in self.decoder.layers]
        # Inputs of the decode step, at fixed addresses so that captured graphs can read them.
        self.input_tokens = torch.full((slots,), self.geometry.pad_id, dtype=torch.long, device=device)
        self.input_index = torch.zeros(slots, dtype=torch.long, device=device)
        self.slot_index = torch.arange(slots, device=device)
        self.time_index = torch.arange(length, device=device)
        # Book-keeping on the host, one entry per slot.
        self.running: dict[int, Running] = {}
        self.free = list(range(slots))
        self.lengths = np.zeros(slots, dtype=np.int64)
        self.last_token = np.full(slots, self.geometry.pad_id, dtype=np.int64)
        self.generated = np.zeros((slots, length), dtype=np.int64)
        self.counts = np.zeros(slots, dtype=np.int64)
        self.limits = np.zeros(slots, dtype=np.int64)
        self.stops = np.zeros(slots, dtype=bool)  # whether the end token ends the sequence
        self.special: set[int] = set()
        self.streaming: set[int] = set()
        self.buckets = batch_buckets(slots)
        self.use_graphs = config.cuda_graphs and device.type == "cuda"
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.graph_pool = None

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def running_count(self) -> int:
        return len(self.running)

    def cancel(self, request_id: int) -> None:
        super().cancel(request_id)
        for slot, sequence in list(self.running.items()):
            if sequence.id == request_id:
                self._release(slot)

    @torch.inference_mode()
    def step(self) -> float | None:
        if self.waiting and self.free:
            self._admit()
        if self.running:
            self._decode()
        return None

    # -- admission: vision, prefill, first token ---------------------------------------------------------

    def _admit(self) -> None:
        count = min(len(self.waiting), len(self.free))
        batch = [self.waiting.popleft() for _ in range(count)]
        slots = [heapq.heappop(self.free) for _ in range(count)]
        try:
            logits = self._prefill(batch, slots)
        except Exception as exc:  # e.g. out of memory: fail these requests, keep serving the others
            log.exception("prefill of %d requests failed", count)
            for pending, slot in zip(batch, slots):
                heapq.heappush(self.free, slot)
                pending.sink.fail(exc)
            return
        for pending, slot in zip(batch, slots):
            request = pending.request
            self.running[slot] = Running(
                pending.id, request, pending.sink, TokenChooser(request.params, request.prompt_ids)
            )
            self.lengths[slot] = len(request.prompt_ids)
            self.counts[slot] = 0
            self.limits[slot] = request.params.max_new_tokens
            self.stops[slot] = not request.params.ignore_eos
            if not self.running[slot].chooser.simple:
                self.special.add(slot)
            if pending.sink.streaming:
                self.streaming.add(slot)
        self._accept(np.asarray(slots), self._choose(logits, slots))

    def _prefill(self, batch: list[Pending], slots: list[int]) -> torch.Tensor:
        """Encode images and prompts, fill the slots' caches, and return each prompt's last logits."""
        device = self.loaded.device
        requests = [p.request for p in batch]
        image_embeds = encode_images(self.loaded, self.geometry, [r.pixels for r in requests])
        lengths = [len(r.prompt_ids) for r in requests]
        width = max(lengths)
        ids = np.full((len(requests), width), self.geometry.pad_id, dtype=np.int64)
        image_mask = np.zeros(ids.shape, dtype=bool)
        for row, request in enumerate(requests):
            ids[row, : lengths[row]] = request.prompt_ids
            image_mask[row, request.image_offset : request.image_offset + self.geometry.image_tokens] = True
        embeds = self.decoder.embed_tokens(torch.from_numpy(ids).to(device))
        embeds[torch.from_numpy(image_mask).to(device)] = image_embeds.reshape(-1, image_embeds.shape[-1]).to(
            embeds.dtype
        )
        hidden = embeds * self.decoder.embed_scale + self.position_table[:width]
        slot_index = torch.tensor(slots, device=device)
        for layer, keys, values in zip(self.decoder.layers, self.keys, self.values):
            attention = layer.self_attn
            normed = layer.self_attn_layer_norm(hidden)
            q, k, v = (self._heads(proj(normed)) for proj in (attention.q_proj, attention.k_proj, attention.v_proj))
            keys[slot_index, :, :width] = k
            values[slot_index, :, :width] = v
            mixed = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            hidden = hidden + self._attention_output(attention, mixed)
            hidden = hidden + layer.ffn(layer.final_layer_norm(hidden))
        last = hidden[torch.arange(len(requests), device=device), torch.tensor(lengths, device=device) - 1]
        return self.lm_head(self.decoder.layer_norm(last))

    # -- decoding ------------------------------------------------------------------------------------------

    def _decode(self) -> None:
        active = np.fromiter(self.running, dtype=np.int64)
        batch = next(b for b in self.buckets if b > active.max())
        span = min(-(-int(self.lengths[active].max() + 1) // LENGTH_BUCKET) * LENGTH_BUCKET, self.config.max_seq_len)
        self.input_tokens[:batch].copy_(torch.from_numpy(self.last_token[:batch]), non_blocking=True)
        self.input_index[:batch].copy_(torch.from_numpy(self.lengths[:batch]), non_blocking=True)
        logits = self._run_step(batch, span)
        self.lengths[active] += 1
        self._accept(active, self._choose(logits, range(batch))[active])

    def _run_step(self, batch: int, span: int) -> torch.Tensor:
        if not self.use_graphs:
            return self._decode_forward(batch, span)
        key = (batch, span)
        if key not in self.graphs:
            self.graphs[key] = self._capture(batch, span)
        graph, logits = self.graphs[key]
        graph.replay()
        return logits

    def _capture(self, batch: int, span: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Record the decode step for ``batch`` slots attending over ``span`` positions."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up kernels outside the graph, as CUDA graphs require
            self._decode_forward(batch, span)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.graph_pool):
            logits = self._decode_forward(batch, span)
        self.graph_pool = graph.pool()
        log.debug("captured decode graph batch=%d span=%d", batch, span)
        return graph, logits

    def _decode_forward(self, batch: int, span: int) -> torch.Tensor:
        """One token for slots ``[0, batch)``: write its keys and values at ``input_index``, attend, and
        return the next-token logits. Free slots in the range compute garbage nobody reads."""
        tokens, where = self.input_tokens[:batch], self.input_index[:batch]
        hidden = self.decoder.embed_tokens(tokens) * self.decoder.embed_scale + self.position_table[where]
        hidden = hidden[:, None]
        visible = (self.time_index[:span][None, :] <= where[:, None])[:, None, None, :]
        slots = self.slot_index[:batch]
        for layer, keys, values in zip(self.decoder.layers, self.keys, self.values):
            attention = layer.self_attn
            normed = layer.self_attn_layer_norm(hidden)
            q, k, v = (self._heads(proj(normed)) for proj in (attention.q_proj, attention.k_proj, attention.v_proj))
            keys[slots, :, where] = k[:, :, 0]
            values[slots, :, where] = v[:, :, 0]
            mixed = F.scaled_dot_product_attention(
                q, keys[:batch, :, :span], values[:batch, :, :span], attn_mask=visible
            )
            hidden = hidden + self._attention_output(attention, mixed)
            hidden = hidden + layer.ffn(layer.final_layer_norm(hidden))
        return self.lm_head(self.decoder.layer_norm(hidden[:, 0]))

    def _heads(self, states: torch.Tensor) -> torch.Tensor:
        batch, length, _ = states.shape
        return states.view(batch, length, self.heads, self.head_dim).transpose(1, 2)

    @staticmethod
    def _attention_output(attention: torch.nn.Module, mixed: torch.Tensor) -> torch.Tensor:
        batch, _, length, _ = mixed.shape
        merged = mixed.transpose(1, 2).reshape(batch, length, -1)
        return attention.out_proj(attention.inner_attn_ln(merged))

    # -- token choice and book-keeping ---------------------------------------------------------------------

    def _choose(self, logits: torch.Tensor, rows: Sequence[int]) -> np.ndarray:
        """Next token per row of ``logits``; ``rows[i]`` is the slot of row ``i`` (argmax unless special)."""
        tokens = logits.argmax(dim=-1)
        special = [i for i, slot in enumerate(rows) if slot in self.special]
        if special:
            index = torch.tensor(special, device=logits.device)
            choosers = [self.running[rows[i]].chooser for i in special]
            tokens[index] = choose_special(logits[index].float(), choosers)
        return tokens.cpu().numpy()

    def _accept(self, slots: np.ndarray, tokens: np.ndarray) -> None:
        """Record one new token per slot (``tokens[i]`` for ``slots[i]``), stream it, and end sequences."""
        ended = (tokens == self.geometry.eos_id) & self.stops[slots]
        kept = slots[~ended]
        self.generated[kept, self.counts[kept]] = tokens[~ended]
        self.counts[kept] += 1
        self.last_token[slots] = tokens
        for slot, token, end in zip(slots.tolist(), tokens.tolist(), ended.tolist()):
            if slot in self.special:
                self.running[slot].chooser.append(token)
            if slot in self.streaming and not end:
                self.running[slot].sink.tokens([token])
        for slot in slots[ended].tolist():
            self._finish(slot, "stop")
        for slot in kept[self.counts[kept] >= self.limits[kept]].tolist():
            self._finish(slot, "length")

    def _finish(self, slot: int, reason: str) -> None:
        sequence = self.running[slot]
        count = int(self.counts[slot])
        result = GenerationResult(
            self.generated[slot, :count].tolist(), reason, len(sequence.request.prompt_ids), count + (reason == "stop")
        )
        self._release(slot)
        sequence.sink.finish(result)

    def _release(self, slot: int) -> None:
        del self.running[slot]
        self.lengths[slot] = 0
        self.special.discard(slot)
        self.streaming.discard(slot)
        heapq.heappush(self.free, slot)
