"""The engine's closed and open loops on a simulated engine and clock, whose every figure is known in advance.

The simulated engine batches continuously: each step takes STEP seconds of the simulated clock, admits waiting
requests into its free slots and gives every running request one token; a request ends with its TOKENS-th.
Nothing here depends on how fast the machine running the tests is.
"""

from __future__ import annotations

import itertools
from collections import deque

import pytest

from bench.engine_loops import OPEN_LOOP_WARMUP_S, time_closed_loop, time_open_loop
from serve.engine.base import Pending
from serve.engine.requests import GenerationResult

STEP = 1 / 64
"""Seconds a step takes (a power of two, so that sums of steps are exact)."""
TOKENS = 4
SLOTS = 3
WINDOW = 1.0
"""Timed seconds of each loop: 64 steps."""


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class SimulatedEngine:
    """The stepping interface of ``serve.engine.base.Engine`` with known timing."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.waiting: deque[Pending] = deque()
        self.running: list[list] = []  # [pending, tokens so far]
        self.ids = itertools.count()

    def submit(self, request, sink) -> int:
        pending = Pending(next(self.ids), request, sink)
        self.waiting.append(pending)
        return pending.id

    def cancel(self, *ids: int) -> None:
        self.waiting = deque(p for p in self.waiting if p.id not in ids)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def running_count(self) -> int:
        return len(self.running)

    def step(self) -> None:
        self.clock.now += STEP
        while self.waiting and len(self.running) < SLOTS:
            self.running.append([self.waiting.popleft(), 0])
        for entry in self.running:
            entry[1] += 1
        done = [entry for entry in self.running if entry[1] == TOKENS]
        self.running = [entry for entry in self.running if entry[1] < TOKENS]
        for pending, tokens in done:
            pending.sink.finish(GenerationResult([], "length", 0, tokens))


def closed_loop(concurrency: int) -> dict:
    clock = Clock()
    engine = SimulatedEngine(clock)
    return time_closed_loop(engine, ["request"], concurrency, WINDOW, clock=clock, sleep=clock.sleep)


def test_a_closed_loop_below_the_slots_runs_its_requests_in_lockstep():
    """Two requests kept in a three-slot engine run together: both end every TOKENS steps, each after exactly
    TOKENS steps, so the 64-step window holds 16 such ends, the last in its last step; Little's law holds
    exactly: images/s x mean latency = the requests kept in the engine."""
    point = closed_loop(2)
    assert point["requests"] == 32
    assert point["images_per_s"] == 32 / WINDOW and point["tokens_per_s"] == 32 * TOKENS / WINDOW
    assert point["latency_mean_s"] == point["latency_p50_s"] == point["latency_p99_s"] == TOKENS * STEP
    assert point["images_per_s"] * point["latency_mean_s"] == 2
    assert point["steps_per_s"] == 64 / WINDOW
    # two running after each step but the 16 that end both requests (new ones are admitted at the next step)
    assert point["mean_batch"] == 2 * (64 - 16) / 64


def test_a_closed_loop_above_the_slots_queues_the_rest():
    """Six requests kept in three slots: two groups of three take turns, so each waits TOKENS steps for a slot
    and runs TOKENS steps, and three end every TOKENS steps: the engine's capacity, with Little's law exact."""
    point = closed_loop(6)
    assert point["requests"] == 16 * SLOTS
    assert point["latency_mean_s"] == point["latency_p50_s"] == point["latency_p99_s"] == 2 * TOKENS * STEP
    assert point["images_per_s"] == SLOTS / (TOKENS * STEP)
    assert point["images_per_s"] * point["latency_mean_s"] == 6
    assert point["mean_batch"] == SLOTS * (64 - 16) / 64


def open_loop(rate: float) -> dict:
    clock = Clock()
    engine = SimulatedEngine(clock)
    point = time_open_loop(engine, ["request"], rate, WINDOW, seed=3, clock=clock, sleep=clock.sleep)
    assert not engine.has_work  # the running ones finished, the waiting ones were dropped
    return point


def test_a_light_open_loop_serves_each_request_as_it_arrives():
    """Far below the engine's capacity (SLOTS per TOKENS steps, 48 a second) a request waits at most the step
    under way, then runs its TOKENS steps; nothing is left waiting."""
    point = open_loop(rate=6.0)
    assert point["requests"] > 0 and point["waiting_at_end"] == 0
    assert TOKENS * STEP <= point["latency_p50_s"] <= point["latency_p99_s"] <= (TOKENS + 1) * STEP
    assert point["mean_batch"] <= SLOTS


def test_a_flooded_open_loop_serves_its_capacity_and_queues_the_rest():
    """At 1,000 arrivals a second the engine ends at most SLOTS requests every TOKENS steps; the rest of the
    three seconds' arrivals are still waiting when the window closes, and latencies grow with the queue."""
    point = open_loop(rate=1000.0)
    capacity = SLOTS / (TOKENS * STEP)
    assert point["images_per_s"] <= capacity
    assert point["requests"] >= capacity * WINDOW - 2 * SLOTS  # busy all the time: whole turns but the edges
    arrived_about = 1000 * (OPEN_LOOP_WARMUP_S + WINDOW)
    assert point["waiting_at_end"] > arrived_about / 2
    assert point["latency_p50_s"] > OPEN_LOOP_WARMUP_S  # the backlog of the warm-up is ahead of them
    assert point["mean_batch"] == pytest.approx(SLOTS * (TOKENS - 1) / TOKENS, abs=0.05)
