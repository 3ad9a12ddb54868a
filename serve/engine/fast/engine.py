"""The fast engine: continuous batching over a static KV cache, with CUDA graphs for every GPU step.

Each :meth:`FastEngine.step` may admit waiting requests into free cache slots (vision encoding and prompt
prefill as one batch), then runs one decode step for every running sequence. A sequence leaves as soon as it
ends, and its slot is reused by the next request, so a short answer never waits for a long one.

:class:`FastEngine` composes four parts, as SGLang keeps its scheduler, model runner and CUDA-graph runner apart:

- :class:`~serve.engine.fast.scheduler.Scheduler`: when waiting requests are admitted, and the host's book of
  each cache slot's sequence (its tokens so far, its limits; vectorized with numpy);
- :class:`~serve.engine.fast.runner.ModelRunner`: the model's forward passes over the KV cache, reading device
  buffers that stay in place;
- :class:`~serve.engine.fast.graphs.GraphCache`: on CUDA each decode step batch (and SDPA span) and each
  admission (batch and prompt width rounded up) captured once as a CUDA graph and replayed, which removes the
  Python and launch cost that dominates Hugging Face's steps; its buckets set the steps' shapes everywhere;
- :class:`~serve.engine.fast.transfer.Transfer`: the copies between host and device, through page-locked
  buffers so that neither waits for the other.

A large admission runs in chunks of at most ``graph_admission_rows`` requests, the host staging the first while
the decode step in flight runs and each later one while the device runs the one before. With
``EngineConfig.overlap`` each decode step is launched before the previous step's tokens are taken (its inputs
are those tokens, still on the device), so the host's book-keeping runs while the device computes, as in
SGLang's overlap scheduler; a sequence ending at its end token then costs one more step, and one ending by
length none.

Requests that ask for log-probabilities get them computed on the device for their rows alone, beside the chosen
tokens, and taken to the host with them (:class:`StepLogprobs`); a step without such requests computes none.

On the tiny model in float32 on the CPU its greedy tokens equal :class:`serve.engine.HFEngine`'s
(``tests/engine/test_fast_engine.py``).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from serve.engine.base import Engine, Pending
from serve.engine.config import EngineConfig
from serve.engine.fast.graphs import WIDTH_BUCKET, GraphCache
from serve.engine.fast.layers import LayerSteps
from serve.engine.fast.runner import COMPILE_WIDTH, ModelRunner
from serve.engine.fast.scheduler import Scheduler
from serve.engine.fast.transfer import Staged, Transfer
from serve.engine.kernels.attention import triton_available
from serve.engine.model import LoadedModel
from serve.engine.requests import TokenLogprobs
from serve.engine.sampling import choose_special, split_logprobs, token_logprobs

log = logging.getLogger(__name__)


@dataclass
class StepLogprobs:
    """A step's log-probabilities for the slots that asked for them (:func:`token_logprobs`' output: rows in the
    order of ``slots``), on the device until :meth:`by_slot` takes them to the host."""

    slots: list[int]
    counts: list[int]
    chosen: torch.Tensor
    ids: torch.Tensor
    values: torch.Tensor

    def by_slot(self) -> dict[int, TokenLogprobs]:
        return dict(zip(self.slots, split_logprobs(self.chosen, self.ids, self.values, self.counts)))


@dataclass
class InFlight:
    """A decode step launched on the device whose tokens the host has not taken yet."""

    slots: np.ndarray
    ids: np.ndarray
    """The sequences in ``slots`` at launch: a slot freed (or reused) since then is skipped."""
    tokens: torch.Tensor
    """Each row's chosen token, on the device; row ``i`` is slot ``i``."""
    logprobs: StepLogprobs | None = None


class FastEngine(Engine):
    """Continuous batching with a static KV cache of ``max_batch_size`` slots of ``max_seq_len`` tokens."""

    supports_logprobs = True

    def __init__(self, loaded: LoadedModel, config: EngineConfig) -> None:
        self.transfer = Transfer(config.max_batch_size, loaded.device)  # before Engine sets device_wait_s
        super().__init__(loaded, config)
        self.runner = ModelRunner(loaded, config, self.geometry)
        self.scheduler = Scheduler(config, self.geometry)
        self.graphs = GraphCache(config, loaded.device)
        self.in_flight: InFlight | None = None

    @property
    def device_wait_s(self) -> float:
        """Seconds the engine has blocked waiting for its device: its transfers' waits (on CUDA)."""
        return self.transfer.device_wait_s

    @device_wait_s.setter
    def device_wait_s(self, seconds: float) -> None:
        self.transfer.device_wait_s = seconds

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Compile the layers and capture every decode graph now (Triton attention: one per batch bucket), and
        the admission graphs of ``warm_admission_widths``, so that no request waits for them. With nothing
        running, these steps only write the scratch slot and cache positions that a prefill overwrites. If
        compiled layers fail to compile or to be captured, the layers run as written."""
        try:
            self._warm_up()
        except Exception:
            if not self.runner.steps.compiled:
                raise
            log.exception("compiled layers failed; they run uncompiled")
            self.runner.steps = LayerSteps()
            self.graphs.clear()
            self._warm_up()

    def _warm_up(self) -> None:
        runner = self.runner
        if runner.steps.compiled:
            for rows in (1, 2):  # Dynamo specializes on 1: these two compile every shape the engine runs
                runner.admission_forward(rows, COMPILE_WIDTH)
                runner.decode_forward(rows, 0)
        if triton_available(self.loaded.device):
            # Triton compiles the cache-write kernel anew for widths that are multiples of 16 and for those that
            # are not: padded widths are either
            for width in (WIDTH_BUCKET, 2 * WIDTH_BUCKET):
                runner.admission_forward(1, width)
        if self.graphs.enabled and runner.attention == "triton":
            self.graphs.capture_decodes(runner.decode_forward)
        if self.graphs.pad_admissions:
            self.graphs.capture_admissions(runner.admission_forward, self.config.warm_admission_widths)
        if self.graphs.enabled:
            torch.cuda.synchronize()

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.scheduler.running)

    @property
    def running_count(self) -> int:
        return len(self.scheduler.running)

    def cancel(self, *request_ids: int) -> None:
        super().cancel(*request_ids)
        self.scheduler.cancel(set(request_ids))

    def fail_all(self, error: BaseException) -> None:
        super().fail_all(error)
        self.in_flight = None
        self.scheduler.fail_all(error)

    @torch.inference_mode()
    def step(self) -> float | None:
        count = self.scheduler.admission_size(len(self.waiting))
        if count:
            self._admit(count)
        if self.scheduler.running:
            self._decode()
        return None

    # -- admission: vision, prefill, first token ---------------------------------------------------------

    def _admit(self, count: int) -> None:
        """Admit ``count`` waiting requests, in chunks of at most ``graph_admission_rows`` (each one captured graph
        on CUDA). The host stages the first chunk's inputs while the decode step in flight runs, and each later
        chunk's while the device runs the chunk before."""
        began = time.perf_counter()
        size = self.graphs.admission_rows[-1]
        staged = self._stage(list(itertools.islice(self.waiting, min(count, size))), 0)
        self._settle()  # the new sequences' slots must be free of any step in flight
        self.admissions, self.admitted = self.admissions + 1, self.admitted + count
        batch = [self.waiting.popleft() for _ in range(count)]
        slots = self.scheduler.take_slots(count)
        chosen: list[tuple[list[int], int, torch.Tensor, StepLogprobs | None]] = []  # each chunk's first tokens
        for start in range(0, count, size):
            part, part_slots = batch[start : start + size], slots[start : start + size]
            try:
                logits = self._prefill(staged if not start else self._stage(part, start), part_slots)
            except Exception as exc:  # e.g. out of memory: fail these requests, keep serving the others
                log.exception("prefill of %d requests failed", len(part))
                for pending, slot in zip(part, part_slots):
                    self.scheduler.return_slot(slot)
                    pending.sink.fail(exc)
                continue
            for pending, slot in zip(part, part_slots):
                self.scheduler.start(pending, slot)
            tokens, logprobs = self._choose(logits, part_slots)
            chosen.append((part_slots, start, self.transfer.fetch(tokens, start), logprobs))
        for part_slots, start, tokens, logprobs in chosen:
            host_tokens = self.transfer.wait(tokens, start)
            self.scheduler.accept(np.asarray(part_slots), host_tokens, logprobs.by_slot() if logprobs else None)
        self.admission_s += time.perf_counter() - began

    def _stage(self, batch: list[Pending], offset: int) -> Staged:
        """The host's part of admitting ``batch``, its pixels at ``offset`` of the page-locked buffer: at a captured
        graph's shape while admissions are padded, else at its own."""
        requests = [p.request for p in batch]
        shape = self.graphs.admission_shape(len(requests), max(len(r.prompt_ids) for r in requests))
        return self.transfer.stage(requests, offset, shape, self.geometry.pad_id, self.graphs.pad_admissions)

    def _prefill(self, staged: Staged, slots: list[int]) -> torch.Tensor:
        """Encode the staged images and prompts into ``slots``' caches (padding rows into the scratch slot), and
        return each prompt's last logits."""
        count, (rows, width) = len(staged.pixels), staged.ids.shape
        targets = np.full(rows, self.runner.scratch, dtype=np.int64)
        targets[:count] = slots
        self.transfer.send_admission(staged, targets, self.runner.admission)
        forward = partial(self.runner.admission_forward, rows, width)
        if staged.padded and self.graphs.enabled:
            try:
                return self.graphs.replay(("admit", rows, width), forward)[:count]
            except Exception:  # a module that cannot be captured: admit without graphs from now on
                log.exception("capturing the admission of %d requests failed; admissions run eagerly", rows)
                self.graphs.pad_admissions = False
        return forward()[:count]

    # -- decoding ------------------------------------------------------------------------------------------

    def _decode(self) -> None:
        """Launch one decode step for the running sequences, then take the tokens of the step before it, whose
        book-keeping thus runs while the device computes (with ``overlap``; else this step's tokens at once)."""
        active = self.scheduler.decoding(self.in_flight is not None)
        logits = self._launch(active) if len(active) else None
        launched = self.scheduler.sequence_ids[active].copy()  # before the settle, which may end some of them
        self._settle()
        if logits is not None:  # chosen after the settle: sampling and n-gram bans read the tokens it took
            tokens, logprobs = self._choose(logits, range(len(logits)))
            self.in_flight = InFlight(active, launched, self.transfer.fetch(tokens), logprobs)
            if not self.config.overlap:
                self._settle()

    def _launch(self, active: np.ndarray) -> torch.Tensor:
        """Start the decode step of the sequences in ``active`` slots; returns its logits (rows: slots)."""
        batch = self.graphs.decode_batch(int(active.max()))
        span = 0  # the Triton kernel reads each sequence's own length
        if self.runner.attention == "sdpa":
            span = self.graphs.decode_span(int(self.scheduler.lengths[active].max() + 1))
        self.transfer.send_step_inputs(self.scheduler.host_inputs, self.runner.step_inputs, batch)
        if self.in_flight is not None:  # the last tokens are still on the device
            self.runner.input_tokens[:batch].copy_(self.in_flight.tokens[:batch])
        forward = partial(self.runner.decode_forward, batch, span)
        logits = self.graphs.replay(("decode", batch, span), forward) if self.graphs.enabled else forward()
        self.scheduler.lengths[active] += 1
        return logits

    def _settle(self) -> None:
        """Take the tokens of the step in flight, for the sequences still running in its slots."""
        step, self.in_flight = self.in_flight, None
        if step is None:
            return
        tokens = self.transfer.wait(step.tokens)
        slots = step.slots[self.scheduler.sequence_ids[step.slots] == step.ids]
        self.scheduler.accept(slots, tokens[slots], step.logprobs.by_slot() if step.logprobs else None)

    def _choose(self, logits: torch.Tensor, rows: Sequence[int]) -> tuple[torch.Tensor, StepLogprobs | None]:
        """Next token per row of ``logits``, on the device, and the log-probabilities of the rows that asked;
        ``rows[i]`` is the slot of row ``i`` (argmax unless special)."""
        tokens = logits.argmax(dim=-1)
        special = self.scheduler.special
        picked = [i for i, slot in enumerate(rows) if slot in special] if special else []
        if picked:
            index = torch.tensor(picked, device=logits.device)
            choosers = [self.scheduler.running[rows[i]].chooser for i in picked]
            tokens[index] = choose_special(logits[index].float(), choosers)
        wanted = self.scheduler.logprob_counts
        if not wanted:
            return tokens, None
        slots = [slot for slot in wanted if slot in rows]
        if not slots:
            return tokens, None
        counts = [wanted[slot] for slot in slots]
        index = torch.tensor([rows.index(slot) for slot in slots], device=logits.device)
        return tokens, StepLogprobs(slots, counts, *token_logprobs(logits[index], tokens[index], counts))
