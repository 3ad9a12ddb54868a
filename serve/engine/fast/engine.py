"""The fast engine: continuous batching over a static KV cache, with CUDA graphs for every GPU step.

Each :meth:`FastEngine.step` may admit waiting requests into free cache slots (vision encoding and prompt
prefill as one batch, SDPA with a causal mask), then runs one decode step for every running sequence. A
sequence leaves as soon as it ends, and its slot is reused by the next request, so a short answer never
waits for a long one. An admission stalls every running sequence, so requests that trickle in are gathered
first (``EngineConfig.admit_ratio`` and ``admit_max_steps``, after Text Generation Inference's
``waiting_served_ratio`` and ``max_waiting_tokens``): they are admitted at once when nothing runs or they
fill the free slots, else once they number a fraction of the running sequences or have waited some steps.

The text decoder is re-implemented here for one purpose, the step over a preallocated cache: it calls the
Hugging Face modules' own layers (same weights, same functions) and writes keys and values into
``[slots, heads, max_seq_len, head_dim]`` tensors. A decode step attends with the Triton kernel of
``serve.engine.kernels.attention``, which reads each sequence's own length, or with SDPA over the first ``Tb`` positions
(``Tb`` rounded up to a multiple of 32) and a length mask. On CUDA each decode step batch (and SDPA span),
and each admission (batch and prompt width rounded up; a large one in chunks, the host staging the first
while the decode step in flight runs and each later one while the device runs the one before), is captured
once as a CUDA graph and replayed, which removes the Python and launch cost that dominates Hugging Face's steps.
The layers themselves are ``serve.engine.fast.layers``' functions, compiled on CUDA. Book-keeping is vectorized with
numpy; Python runs per sequence only for sequences that stream, sample or ban n-grams, and for those that
finish. With ``EngineConfig.overlap`` each decode step is launched before the previous step's tokens are taken
(its inputs are those tokens, still on the device), so the host's book-keeping runs while the device computes,
as in SGLang's overlap scheduler; a sequence ending at its end token then costs one more step, and one ending by
length none.

On the tiny model in float32 on the CPU its greedy tokens equal :class:`serve.engine.HFEngine`'s
(``tests/integration/test_fastpath.py``).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F

from serve.engine.base import Engine, Pending
from serve.engine.config import EngineConfig
from serve.engine.fast.layers import (
    ImageProjection,
    LayerSteps,
    PatchEmbedding,
    compiled_steps,
    fuse_qkv,
    image_to_text,
    merge_heads,
)
from serve.engine.kernels.attention import decode_attention, triton_available, write_cache
from serve.engine.model import LoadedModel
from serve.engine.requests import GenerationRequest, GenerationResult, Sink
from serve.engine.sampling import TokenChooser, choose_special

log = logging.getLogger(__name__)

LENGTH_BUCKET = 32
"""Granularity of the attended cache length in an SDPA decode step."""
WIDTH_BUCKET = 8
"""Granularity of the prompt width of a captured admission (the brief caption's 71 tokens pad to 72; 80 with
16, a tenth more prefill for every admission of up to 32 requests)."""
VOCAB_ALIGN = 64
"""The output projection's rows are padded to a multiple of this (aligned matrix-product kernels)."""
COMPILE_WIDTH = 19
"""The prompt width that compiles the admission's layers: a size no other dimension has, so that the compiled
code does not assume two dimensions equal (Dynamo's duck sizing)."""


@dataclass
class Running:
    """A sequence in a cache slot."""

    id: int
    request: GenerationRequest
    sink: Sink
    chooser: TokenChooser


@dataclass
class Staged:
    """An admission chunk's inputs on the host (:meth:`FastEngine._stage`), at the shape it runs as."""

    pixels: torch.Tensor
    """Its requests' pixels, in the page-locked staging buffer: one row a request."""
    ids: np.ndarray
    """``[rows, width]`` prompt ids, padded with the pad id (``rows`` >= the requests when ``padded``)."""
    offsets: np.ndarray
    last: np.ndarray
    """Each row's image offset and last prompt position."""
    padded: bool
    """Padded to a captured graph's shape."""


@dataclass
class InFlight:
    """A decode step launched on the device whose tokens the host has not taken yet."""

    slots: np.ndarray
    ids: np.ndarray
    """The sequences in ``slots`` at launch: a slot freed (or reused) since then is skipped."""
    tokens: torch.Tensor
    """Each row's chosen token, on the device; row ``i`` is slot ``i``."""


def batch_buckets(max_batch: int) -> list[int]:
    """Batch sizes that get their own graph: powers of two to 32, then multiples of 32, and the maximum.

    >>> batch_buckets(48)
    [1, 2, 4, 8, 16, 32, 48]
    >>> batch_buckets(200)
    [1, 2, 4, 8, 16, 32, 64, 96, 128, 160, 192, 200]
    """
    sizes = [size for size in (1, 2, 4, 8, 16, *range(32, max_batch, 32)) if size < max_batch]
    return [*sizes, max_batch]


def admission_buckets(limit: int) -> list[int]:
    """Row counts of captured admissions, up to ``limit``: 1, 2, 4, then steps of 4 to 64 and of about an eighth
    of the size above. A padding row costs a whole row of the admission's arithmetic: powers of two would pad 17
    requests to 32; steps of a quarter of the size (an earlier choice) padded the service's typical admission of
    58 requests to 64, and admissions of 20 to 256 requests by 8.3% on average, against 4.0% with these, for
    twice the captures at start-up (34 graphs a prompt width for a limit of 256).

    >>> admission_buckets(300)  # doctest: +NORMALIZE_WHITESPACE
    [1, 2, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 44, 48, 52, 56, 60, 64, 72, 80, 88, 96, 104, 112, 120, 128,
     144, 160, 176, 192, 208, 224, 240, 256, 288, 300]
    """
    sizes = [size for size in (1, 2, 4) if size < limit]
    size = 8
    while size < limit:
        sizes.append(size)
        size += max(4, 2 ** (size.bit_length() - 4))
    return [*sizes, limit]


def resolve_attention(choice: str, device: torch.device) -> str:
    """The decode attention to use: ``auto`` is the Triton kernel where it can run, else SDPA."""
    if choice == "auto":
        return "triton" if triton_available(device) else "sdpa"
    if choice == "triton" and not triton_available(device):
        raise ValueError(f"decode_attention triton needs a CUDA device and the triton package; on {device} use sdpa")
    return choice


def wants_compile(choice: str, device: torch.device) -> bool:
    """Whether to compile the layers: ``auto`` compiles on CUDA (on the CPU it would only add start time)."""
    return choice == "on" or (choice == "auto" and device.type == "cuda")


class FastEngine(Engine):
    """Continuous batching with a static KV cache of ``max_batch_size`` slots of ``max_seq_len`` tokens."""

    def __init__(self, loaded: LoadedModel, config: EngineConfig) -> None:
        super().__init__(loaded, config)
        text = loaded.model.text_model
        self.decoder = text.model
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
        self.attention = resolve_attention(config.decode_attention, device)
        self.steps = compiled_steps() if wants_compile(config.compile, device) else LayerSteps()
        self.qkv = [fuse_qkv(layer.self_attn) for layer in self.decoder.layers]
        self.tower = loaded.model.vision_model.model
        geometry = self.geometry
        self.patches = PatchEmbedding.of(self.tower.embeddings, geometry.mean, geometry.std, geometry.scale)
        self.projection = ImageProjection.of(loaded.model.image_to_text_projection)
        # The output projection padded with zero rows to a multiple of 64: an odd vocabulary (Kosmos-2's 65,037)
        # leaves cuBLAS only unaligned kernels, 1.45 of a 7 ms decode step at batch 512 on an H200.
        head = text.lm_head.weight
        self.vocab = head.shape[0]
        self.head = F.pad(head, (0, 0, 0, -self.vocab % VOCAB_ALIGN))
        self.scratch = slots  # an extra cache slot, written by the padding rows of captured admissions
        shape = (slots + 1, self.heads, length, self.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in self.decoder.layers]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in self.decoder.layers]
        # Inputs of the GPU steps, at fixed addresses so that captured graphs can read them.
        self.step_inputs = torch.zeros((2, slots), dtype=torch.long, device=device)  # one copy a step
        self.input_tokens, self.input_index = self.step_inputs  # each slot's last token, and its position
        self.admit_pixels = torch.zeros((slots, 224, 224, 3), dtype=torch.uint8, device=device)
        # Host buffers the device copies from and to without waiting (page-locked), on CUDA.
        pinned = device.type == "cuda"
        self.staged_pixels = torch.zeros((slots, 224, 224, 3), dtype=torch.uint8, pin_memory=pinned)
        self.host_tokens = torch.zeros(slots, dtype=torch.long, pin_memory=pinned)
        self.copied = torch.cuda.Event(blocking=True) if pinned else None
        # Two, used in turn: the device may still be reading one when the host fills the other.
        self.staged_inputs = [torch.zeros((2, slots), dtype=torch.long, pin_memory=pinned) for _ in range(2)]
        self.steps_launched = 0
        self.in_flight: InFlight | None = None
        self.admit_ids = torch.full((slots, length), self.geometry.pad_id, dtype=torch.long, device=device)
        self.admit_offsets = torch.zeros(slots, dtype=torch.long, device=device)
        self.admit_last = torch.zeros(slots, dtype=torch.long, device=device)
        self.admit_slots = torch.full((slots,), self.scratch, dtype=torch.long, device=device)
        self.slot_index = torch.arange(slots, device=device)
        self.time_index = torch.arange(length, device=device)
        # Book-keeping on the host, one entry per slot.
        self.running: dict[int, Running] = {}
        self.sequence_ids = np.full(slots, -1, dtype=np.int64)  # the running request of each slot; -1: free
        self.free = list(range(slots))
        self.host_inputs = np.zeros((2, slots), dtype=np.int64)  # step_inputs as the host keeps them
        self.last_token, self.lengths = self.host_inputs
        self.last_token[:] = self.geometry.pad_id
        self.generated = np.zeros((slots, length), dtype=np.int64)
        self.counts = np.zeros(slots, dtype=np.int64)
        self.limits = np.zeros(slots, dtype=np.int64)
        self.stops = np.zeros(slots, dtype=bool)  # whether the end token ends the sequence
        self.special: set[int] = set()
        self.streaming: set[int] = set()
        self.held_steps = 0  # decode steps run while requests waited
        self.buckets = batch_buckets(slots)
        self.admission_rows = admission_buckets(min(config.graph_admission_rows, slots))
        self.use_graphs = config.cuda_graphs and device.type == "cuda"
        self.graph_admissions = self.use_graphs  # padded to graph shapes; off if a capture fails
        self.graphs: dict[tuple[str, int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.graph_pool = None

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Compile the layers and capture every decode graph now (Triton attention: one per batch bucket), and
        the admission graphs of ``warm_admission_widths``, so that no request waits for them. With nothing
        running, these steps only write the scratch slot and cache positions that a prefill overwrites. If
        compiled layers fail to compile or to be captured, the layers run as written."""
        try:
            self._warm_up()
        except Exception:
            if not self.steps.compiled:
                raise
            log.exception("compiled layers failed; they run uncompiled")
            self.steps = LayerSteps()
            self.graphs, self.graph_pool = {}, None
            self._warm_up()

    def _warm_up(self) -> None:
        if self.steps.compiled:
            for rows in (1, 2):  # Dynamo specializes on 1: these two compile every shape the engine runs
                self._admission_forward(rows, COMPILE_WIDTH)
                self._decode_forward(rows, 0)
        if triton_available(self.loaded.device):
            # Triton compiles the cache-write kernel anew for widths that are multiples of 16 and for those that
            # are not: padded widths are either
            for width in (WIDTH_BUCKET, 2 * WIDTH_BUCKET):
                self._admission_forward(1, width)
        if self.use_graphs and self.attention == "triton":
            for batch in self.buckets:
                self._capture(("decode", batch, 0), partial(self._decode_forward, batch, 0))
        if self.graph_admissions:
            self._capture_admissions()
        if self.use_graphs:
            torch.cuda.synchronize()

    def _capture_admissions(self) -> None:
        """Capture the admission graphs of every row bucket at the configured prompt widths (their padding rows
        and the cache's writes go to the scratch slot). If one cannot be captured, admissions run eagerly."""
        widths = {self._padded_width(width) for width in self.config.warm_admission_widths}
        try:
            for width in sorted(widths):
                for rows in self.admission_rows:
                    self._capture(("admit", rows, width), partial(self._admission_forward, rows, width))
        except Exception:
            log.exception("capturing the admission graphs failed; admissions run eagerly")
            self.graph_admissions = False

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def running_count(self) -> int:
        return len(self.running)

    def cancel(self, *request_ids: int) -> None:
        super().cancel(*request_ids)
        dropped = set(request_ids)
        for slot, sequence in list(self.running.items()):
            if sequence.id in dropped:
                self._release(slot)

    def fail_all(self, error: BaseException) -> None:
        super().fail_all(error)
        self.in_flight, self.held_steps = None, 0
        for slot, sequence in list(self.running.items()):
            self._release(slot)
            sequence.sink.fail(error)

    @torch.inference_mode()
    def step(self) -> float | None:
        count = self._admission_size()
        if count:
            self._admit(count)
        if self.running:
            self._decode()
        return None

    # -- admission: vision, prefill, first token ---------------------------------------------------------

    def _admission_size(self) -> int:
        """How many waiting requests to admit now: none, or as many as fit, per the admission policy."""
        count = min(len(self.waiting), len(self.free))
        if not count:
            return 0
        running = len(self.running)
        if (
            count == len(self.free)
            or len(self.waiting) >= self.config.admit_ratio * running
            or self.held_steps >= self.config.admit_max_steps
        ):
            self.held_steps = 0
            return count
        self.held_steps += 1
        return 0

    def _admit(self, count: int) -> None:
        """Admit ``count`` waiting requests, in chunks of at most ``graph_admission_rows`` (each one captured graph
        on CUDA). The host stages the first chunk's inputs while the decode step in flight runs, and each later
        chunk's while the device runs the chunk before."""
        began = time.perf_counter()
        size = self.admission_rows[-1]
        staged = self._stage(list(itertools.islice(self.waiting, min(count, size))), 0)
        self._settle()  # the new sequences' slots must be free of any step in flight
        self.admissions, self.admitted = self.admissions + 1, self.admitted + count
        batch = [self.waiting.popleft() for _ in range(count)]
        slots = [heapq.heappop(self.free) for _ in range(count)]
        chosen: list[tuple[list[int], int, torch.Tensor]] = []  # each chunk's slots, offset and first tokens
        for start in range(0, count, size):
            part, part_slots = batch[start : start + size], slots[start : start + size]
            try:
                logits = self._prefill(staged if not start else self._stage(part, start), part_slots)
            except Exception as exc:  # e.g. out of memory: fail these requests, keep serving the others
                log.exception("prefill of %d requests failed", len(part))
                for pending, slot in zip(part, part_slots):
                    heapq.heappush(self.free, slot)
                    pending.sink.fail(exc)
                continue
            for pending, slot in zip(part, part_slots):
                self._start(pending, slot)
            chosen.append((part_slots, start, self._fetch(self._choose(logits, part_slots), start)))
        for part_slots, start, tokens in chosen:
            self._accept(np.asarray(part_slots), self._wait(tokens, start))
        self.admission_s += time.perf_counter() - began

    def _start(self, pending: Pending, slot: int) -> None:
        """Book ``slot`` for the admitted request."""
        request = pending.request
        self.running[slot] = Running(
            pending.id, request, pending.sink, TokenChooser(request.params, request.prompt_ids)
        )
        self.sequence_ids[slot] = pending.id
        self.lengths[slot] = len(request.prompt_ids)
        self.counts[slot] = 0
        self.limits[slot] = request.params.max_new_tokens
        self.stops[slot] = not request.params.ignore_eos
        if not self.running[slot].chooser.simple:
            self.special.add(slot)
        if pending.sink.streaming:
            self.streaming.add(slot)

    def _stage(self, batch: list[Pending], offset: int) -> Staged:
        """The host's part of admitting ``batch``: its prompts laid out as the admission runs them, and its pixels
        stacked at ``offset`` in the page-locked buffer (apart from those of an earlier chunk still copying).

        An admission is padded to a captured shape: its padding rows write the scratch slot, and the padding
        columns sit after each prompt, where causal attention keeps them from the prompt's tokens.
        """
        requests = [p.request for p in batch]
        count = len(requests)
        lengths = np.array([len(r.prompt_ids) for r in requests])
        rows, width = count, int(lengths.max())
        if self.graph_admissions:  # a chunk holds at most the largest captured row count
            rows = next(size for size in self.admission_rows if size >= count)
            width = self._padded_width(width)
        ids = np.full((rows, width), self.geometry.pad_id, dtype=np.int64)
        offsets, last = np.zeros(rows, dtype=np.int64), np.zeros(rows, dtype=np.int64)
        for row, request in enumerate(requests):
            ids[row, : lengths[row]] = request.prompt_ids
            offsets[row], last[row] = request.image_offset, lengths[row] - 1
        pixels = self.staged_pixels[offset : offset + count]
        np.stack([r.pixels for r in requests], out=pixels.numpy())
        return Staged(pixels, ids, offsets, last, padded=self.graph_admissions)

    def _prefill(self, staged: Staged, slots: list[int]) -> torch.Tensor:
        """Encode the staged images and prompts into ``slots``' caches, and return each prompt's last logits."""
        count, (rows, width) = len(staged.pixels), staged.ids.shape
        targets = np.full(rows, self.scratch, dtype=np.int64)
        targets[:count] = slots
        self.admit_pixels[:count].copy_(staged.pixels, non_blocking=True)
        self.admit_ids[:rows, :width].copy_(torch.from_numpy(staged.ids))
        inputs = ((self.admit_offsets, staged.offsets), (self.admit_last, staged.last), (self.admit_slots, targets))
        for buffer, values in inputs:
            buffer[:rows].copy_(torch.from_numpy(values))
        forward = partial(self._admission_forward, rows, width)
        if staged.padded and self.use_graphs:
            try:
                return self._replay(("admit", rows, width), forward)[:count]
            except Exception:  # a module that cannot be captured: admit without graphs from now on
                log.exception("capturing the admission of %d requests failed; admissions run eagerly", rows)
                self.graph_admissions = False
        return forward()[:count]

    def _padded_width(self, width: int) -> int:
        """The prompt width of the captured admission that holds prompts of up to ``width`` tokens."""
        return min(-(-width // WIDTH_BUCKET) * WIDTH_BUCKET, self.config.max_seq_len)

    def _admission_forward(self, rows: int, width: int) -> torch.Tensor:
        """Vision and prefill for the first ``rows`` admission inputs, ``width`` tokens each: fill the target
        slots' caches, and return the logits at each prompt's last token."""
        image = self.encode(self.admit_pixels[:rows])
        place = self.time_index[None, :width] - self.admit_offsets[:rows, None]
        is_image = (place >= 0) & (place < self.geometry.image_tokens)
        pictured = image[self.slot_index[:rows, None], place.clamp(0, self.geometry.image_tokens - 1)]
        tokens = self.decoder.embed_tokens(self.admit_ids[:rows, :width])
        embeds = torch.where(is_image[..., None], pictured.to(tokens.dtype), tokens)
        hidden = embeds * self.decoder.embed_scale + self.position_table[:width]
        targets, rows_index, last = self.admit_slots[:rows], self.slot_index[:rows], self.admit_last[:rows]
        *layers, final = zip(self.decoder.layers, self.qkv, self.keys, self.values)
        for layer, qkv, keys, values in layers:
            q, k, v = self.steps.attention_inputs(layer, qkv, hidden, self.head_dim)
            write_cache(keys, values, k, v, targets)
            mixed = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            hidden = self.steps.layer_output(layer, hidden, merge_heads(mixed))
        # The last layer's keys and values fill the cache at every position, but only each prompt's last position
        # goes on to the logits: its attention, projection and feed-forward block run for that position alone.
        layer, qkv, keys, values = final
        q, k, v = self.steps.attention_inputs(layer, qkv, hidden, self.head_dim)
        write_cache(keys, values, k, v, targets)
        query = q[rows_index, :, last][:, :, None]
        visible = (self.time_index[None, :width] <= last[:, None])[:, None, None, :]
        mixed = F.scaled_dot_product_attention(query, k, v, attn_mask=visible)
        hidden = self.steps.layer_output(layer, hidden[rows_index, last][:, None], merge_heads(mixed))
        return self._logits(hidden[:, 0])

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Image embeddings of ``(B, 224, 224, 3)`` uint8 pixels on the device, through the engine's layers."""
        hidden = self.steps.vision_embeddings(self.patches, self.tower.pre_layrnorm, pixels)
        for layer in self.tower.encoder.layers:
            hidden = self.steps.vision(layer, hidden)
        return image_to_text(self.projection, F.normalize(self.tower.post_layernorm(hidden), dim=-1))

    # -- decoding ------------------------------------------------------------------------------------------

    def _decode(self) -> None:
        """Launch one decode step for the running sequences, then take the tokens of the step before it, whose
        book-keeping thus runs while the device computes (with ``overlap``; else this step's tokens at once)."""
        active = np.fromiter(self.running, dtype=np.int64)
        if self.in_flight is not None:  # the step in flight ends these by length: they need no further step
            active = active[self.counts[active] + 1 < self.limits[active]]
        logits = self._launch(active) if len(active) else None
        launched = self.sequence_ids[active].copy()  # before the settle, which may end some of them
        self._settle()
        if logits is not None:  # chosen after the settle: sampling and n-gram bans read the tokens it took
            tokens = self._fetch(self._choose(logits, range(len(logits))))
            self.in_flight = InFlight(active, launched, tokens)
            if not self.config.overlap:
                self._settle()

    def _launch(self, active: np.ndarray) -> torch.Tensor:
        """Start the decode step of the sequences in ``active`` slots; returns its logits (rows: slots)."""
        batch = next(b for b in self.buckets if b > active.max())
        span = 0  # the Triton kernel reads each sequence's own length
        if self.attention == "sdpa":
            longest = int(self.lengths[active].max() + 1)
            span = min(-(-longest // LENGTH_BUCKET) * LENGTH_BUCKET, self.config.max_seq_len)
        staged = self.staged_inputs[self.steps_launched % 2]
        staged[:, :batch].copy_(torch.from_numpy(self.host_inputs[:, :batch]))
        self.step_inputs[:, :batch].copy_(staged[:, :batch], non_blocking=True)
        if self.in_flight is not None:  # the last tokens are still on the device
            self.input_tokens[:batch].copy_(self.in_flight.tokens[:batch])
        if self.use_graphs:
            logits = self._replay(("decode", batch, span), partial(self._decode_forward, batch, span))
        else:
            logits = self._decode_forward(batch, span)
        self.lengths[active] += 1
        self.steps_launched += 1
        return logits

    def _settle(self) -> None:
        """Take the tokens of the step in flight, for the sequences still running in its slots."""
        step, self.in_flight = self.in_flight, None
        if step is None:
            return
        tokens = self._wait(step.tokens)
        slots = step.slots[self.sequence_ids[step.slots] == step.ids]
        self._accept(slots, tokens[slots])

    def _replay(self, key: tuple[str, int, int], forward: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Replay the graph recorded for ``key`` (recording it on first use) and return its output."""
        self._capture(key, forward)
        graph, output = self.graphs[key]
        graph.replay()
        return output

    def _capture(self, key: tuple[str, int, int], forward: Callable[[], torch.Tensor]) -> None:
        """Record ``forward`` as the graph of ``key``, unless it is recorded already."""
        if key in self.graphs:
            return
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up kernels outside the graph, as CUDA graphs require
            forward()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.graph_pool):
            output = forward()
        self.graph_pool = graph.pool()
        self.graphs[key] = graph, output
        log.debug("captured %s graph batch=%d size=%d", *key)

    def _decode_forward(self, batch: int, span: int) -> torch.Tensor:
        """One token for slots ``[0, batch)``: write its keys and values at ``input_index``, attend, and
        return the next-token logits. Free slots in the range compute garbage nobody reads."""
        tokens, where = self.input_tokens[:batch], self.input_index[:batch]
        hidden = self.decoder.embed_tokens(tokens) * self.decoder.embed_scale + self.position_table[where]
        hidden = hidden[:, None]
        visible = (self.time_index[:span][None, :] <= where[:, None])[:, None, None, :] if span else None
        slots, lengths, scale = self.slot_index[:batch], where + 1, self.head_dim**-0.5
        for layer, qkv, keys, values in zip(self.decoder.layers, self.qkv, self.keys, self.values):
            q, k, v = self.steps.attention_inputs(layer, qkv, hidden, self.head_dim)
            if self.attention == "triton":  # the kernel writes the new key and value into the cache itself
                mixed = decode_attention(q[:, :, 0], k[:, :, 0], v[:, :, 0], keys, values, lengths, scale)
                mixed = mixed.view(batch, 1, -1)
            else:
                keys[slots, :, where] = k[:, :, 0]
                values[slots, :, where] = v[:, :, 0]
                mixed = merge_heads(
                    F.scaled_dot_product_attention(
                        q, keys[:batch, :, :span], values[:batch, :, :span], attn_mask=visible
                    )
                )
            hidden = self.steps.layer_output(layer, hidden, mixed)
        return self._logits(hidden[:, 0])

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The next-token logits of final hidden states (a view without the padding columns)."""
        return F.linear(self.decoder.layer_norm(hidden), self.head)[:, : self.vocab]

    # -- token choice and book-keeping ---------------------------------------------------------------------

    def _choose(self, logits: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
        """Next token per row of ``logits``, on the device; ``rows[i]`` is the slot of row ``i`` (argmax
        unless special)."""
        tokens = logits.argmax(dim=-1)
        special = [i for i, slot in enumerate(rows) if slot in self.special] if self.special else []
        if special:
            index = torch.tensor(special, device=logits.device)
            choosers = [self.running[rows[i]].chooser for i in special]
            tokens[index] = choose_special(logits[index].float(), choosers)
        return tokens

    def _fetch(self, tokens: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """Start copying chosen tokens to the host (page-locked memory at ``offset``, on CUDA); returns them as
        given."""
        if self.copied is not None:
            self.host_tokens[offset : offset + len(tokens)].copy_(tokens, non_blocking=True)
            self.copied.record()
        return tokens

    def _wait(self, tokens: torch.Tensor, offset: int = 0) -> np.ndarray:
        """The tokens fetched at ``offset``, on the host, once every fetch so far has landed. On CUDA the thread
        sleeps until then (a blocking event) instead of spinning on a core the process's other threads could use."""
        if self.copied is None:
            return tokens.cpu().numpy()
        began = time.perf_counter()
        self.copied.synchronize()
        self.device_wait_s += time.perf_counter() - began
        return self.host_tokens[offset : offset + len(tokens)].numpy().copy()

    def _accept(self, slots: np.ndarray, tokens: np.ndarray) -> None:
        """Record one new token per slot (``tokens[i]`` for ``slots[i]``), stream it, and end sequences."""
        ended = (tokens == self.geometry.eos_id) & self.stops[slots]
        kept = slots[~ended]
        self.generated[kept, self.counts[kept]] = tokens[~ended]
        self.counts[kept] += 1
        self.last_token[slots] = tokens
        if self.special or self.streaming:
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
        self.sequence_ids[slot] = -1
        self.lengths[slot] = 0
        self.special.discard(slot)
        self.streaming.discard(slot)
        heapq.heappush(self.free, slot)
