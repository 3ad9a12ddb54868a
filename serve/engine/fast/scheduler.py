"""The fast engine's schedule: when waiting requests join the running batch, and the host's book of its cache
slots.

A sequence holds a cache slot from its admission to its last token; then the slot is free for the next
request, so a short answer never waits for a long one. Free slots are taken lowest first (a heap), which keeps
the running slots low and a decode step's batch, the slots up to the highest running one, small.

An admission stalls every running sequence, so requests that trickle in are gathered first
(``EngineConfig.admit_ratio`` and ``admit_max_steps``, after Text Generation Inference's
``waiting_served_ratio`` and ``max_waiting_tokens``): they are admitted at once when nothing runs or they
fill the free slots, else once they number a fraction of the running sequences or have waited some steps.

The book is kept in numpy arrays, one entry a slot (each slot's last token and length, its tokens so far, its
limit, whether its end token ends it), so a step's tokens are recorded for every sequence at once; Python runs
per sequence only for sequences that stream, sample, ban n-grams or asked for log-probabilities, and for those
that end.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

from serve.engine.base import Pending
from serve.engine.config import EngineConfig
from serve.engine.model import ModelGeometry
from serve.engine.requests import GenerationRequest, GenerationResult, Sink, TokenLogprobs
from serve.engine.sampling import TokenChooser


@dataclass
class Running:
    """A sequence in a cache slot."""

    id: int
    request: GenerationRequest
    sink: Sink
    chooser: TokenChooser
    logprobs: TokenLogprobs | None = None
    """Its tokens' log-probabilities so far, when it asked for them."""


class Scheduler:
    """The sequences in ``max_batch_size`` cache slots of ``max_seq_len`` tokens, and the admission policy."""

    def __init__(self, config: EngineConfig, geometry: ModelGeometry) -> None:
        self.config = config
        self.eos_id = geometry.eos_id
        slots, length = config.max_batch_size, config.max_seq_len
        self.running: dict[int, Running] = {}
        self.sequence_ids = np.full(slots, -1, dtype=np.int64)  # the running request of each slot; -1: free
        self.free = list(range(slots))
        self.host_inputs = np.zeros((2, slots), dtype=np.int64)
        """A decode step's inputs as the host keeps them: each slot's last token, and its length (the position
        the step writes)."""
        self.last_token, self.lengths = self.host_inputs
        self.last_token[:] = geometry.pad_id
        self.generated = np.zeros((slots, length), dtype=np.int64)
        self.counts = np.zeros(slots, dtype=np.int64)
        self.limits = np.zeros(slots, dtype=np.int64)
        self.stops = np.zeros(slots, dtype=bool)  # whether the end token ends the sequence
        self.special: set[int] = set()
        """Slots whose tokens are sampled or ban n-grams: chosen one by one."""
        self.streaming: set[int] = set()
        self.logprob_counts: dict[int, int] = {}
        """Slots whose request asked for log-probabilities, and how many alternatives a step."""
        self.held_steps = 0  # decode steps run while requests waited

    def admission_size(self, waiting: int) -> int:
        """How many of ``waiting`` requests to admit now: none, or as many as fit, per the admission policy."""
        count = min(waiting, len(self.free))
        if not count:
            return 0
        running = len(self.running)
        if (
            count == len(self.free)
            or waiting >= self.config.admit_ratio * running
            or self.held_steps >= self.config.admit_max_steps
        ):
            self.held_steps = 0
            return count
        self.held_steps += 1
        return 0

    def take_slots(self, count: int) -> list[int]:
        """The ``count`` lowest free slots, no longer free."""
        return [heapq.heappop(self.free) for _ in range(count)]

    def return_slot(self, slot: int) -> None:
        """Free a slot taken for a request that never started."""
        heapq.heappush(self.free, slot)

    def start(self, pending: Pending, slot: int) -> None:
        """Book ``slot`` for the admitted request."""
        request = pending.request
        wanted = request.params.logprobs
        self.running[slot] = Running(
            pending.id,
            request,
            pending.sink,
            TokenChooser(request.params, request.prompt_ids),
            TokenLogprobs() if wanted is not None else None,
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
        if wanted is not None:
            self.logprob_counts[slot] = wanted

    def decoding(self, in_flight: bool) -> np.ndarray:
        """The slots the next decode step runs: every running one, less those that the step in flight (if
        ``in_flight``) ends by length, as they need no further step."""
        active = np.fromiter(self.running, dtype=np.int64)
        if in_flight:
            active = active[self.counts[active] + 1 < self.limits[active]]
        return active

    def accept(self, slots: np.ndarray, tokens: np.ndarray, logprobs: dict[int, TokenLogprobs] | None = None) -> None:
        """Record one new token per slot (``tokens[i]`` for ``slots[i]``) and its log-probabilities (``logprobs``,
        by slot, for the slots that asked), stream it, and end sequences."""
        ended = (tokens == self.eos_id) & self.stops[slots]
        kept = slots[~ended]
        self.generated[kept, self.counts[kept]] = tokens[~ended]
        self.counts[kept] += 1
        self.last_token[slots] = tokens
        if self.special or self.streaming or logprobs:
            logprobs = logprobs or {}
            for slot, token, end in zip(slots.tolist(), tokens.tolist(), ended.tolist()):
                if slot in self.special:
                    self.running[slot].chooser.append(token)
                if end:
                    continue
                entry = logprobs.get(slot)
                if entry is not None:
                    self.running[slot].logprobs.extend(entry)
                if slot in self.streaming:
                    self.running[slot].sink.tokens([token], entry)
        for slot in slots[ended].tolist():
            self.finish(slot, "stop")
        for slot in kept[self.counts[kept] >= self.limits[kept]].tolist():
            self.finish(slot, "length")

    def finish(self, slot: int, reason: str) -> None:
        """End the sequence in ``slot`` and deliver its result."""
        sequence = self.running[slot]
        count = int(self.counts[slot])
        result = GenerationResult(
            self.generated[slot, :count].tolist(),
            reason,
            len(sequence.request.prompt_ids),
            count + (reason == "stop"),
            sequence.logprobs,
        )
        self.release(slot)
        sequence.sink.finish(result)

    def release(self, slot: int) -> None:
        """Free ``slot``."""
        del self.running[slot]
        self.sequence_ids[slot] = -1
        self.lengths[slot] = 0
        self.special.discard(slot)
        self.streaming.discard(slot)
        self.logprob_counts.pop(slot, None)
        heapq.heappush(self.free, slot)

    def cancel(self, request_ids: set[int]) -> None:
        """Free the slots of the running requests in ``request_ids``; their sinks hear nothing more."""
        for slot, sequence in list(self.running.items()):
            if sequence.id in request_ids:
                self.release(slot)

    def fail_all(self, error: BaseException) -> None:
        """Free every slot, failing its request with ``error``, and forget how long requests have waited."""
        self.held_steps = 0
        for slot, sequence in list(self.running.items()):
            self.release(slot)
            sequence.sink.fail(error)
