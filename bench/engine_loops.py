"""Continuous loads at the engine itself, as a service drives it: closed loops (requests kept in it) and open loops
(requests arriving at a rate), stepping the engine on this thread.

Both take any object with the engine's stepping interface (``submit``, ``step``, ``cancel``, ``waiting``,
``has_work``, ``running_count``: ``serve.engine.base.Engine``) and a clock and a sleep (the real ones by default),
so the same loops run a real engine on the bench and a simulated one in the tests.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from typing import Any

from bench.metrics import percentile
from serve.engine.requests import GenerationRequest, GenerationResult

Clock = Callable[[], float]
Sleep = Callable[[float], None]

OPEN_LOOP_WARMUP_S = 2.0
"""Untimed seconds of an open loop before its timed window: the engine's backlog and batch settle first."""


class Timed:
    """A sink that records when its request was submitted and when it finished."""

    streaming = False

    def __init__(self, finished: list[tuple[float, float, int]], clock: Clock, submitted: float | None = None) -> None:
        self.finished = finished
        self.clock = clock
        self.submitted = clock() if submitted is None else submitted

    def tokens(self, token_ids: list[int]) -> None:
        pass

    def finish(self, result: GenerationResult) -> None:
        self.finished.append((self.submitted, self.clock(), result.completion_tokens))

    def fail(self, error: BaseException) -> None:
        raise error


def time_closed_loop(
    engine: Any,
    requests: Sequence[GenerationRequest],
    concurrency: int,
    seconds: float,
    clock: Clock = time.perf_counter,
    sleep: Sleep = time.sleep,
) -> dict[str, Any]:
    """Keep ``concurrency`` requests in the engine for one turnover, then ``seconds`` timed; the figures of the
    requests that finished in the timed window (:func:`window_figures`)."""
    finished: list[tuple[float, float, int]] = []
    sent = 0

    def advance() -> None:
        if wait := engine.step():
            sleep(wait)

    def top_up() -> None:
        nonlocal sent
        while sent - len(finished) < concurrency:
            engine.submit(requests[sent % len(requests)], Timed(finished, clock))
            sent += 1

    top_up()
    while len(finished) < concurrency:  # warm-up: every first request has finished
        advance()
        top_up()
    start, steps, rows = clock(), 0, 0
    while clock() - start < seconds:
        advance()
        steps, rows = steps + 1, rows + engine.running_count
        top_up()
    end = clock()
    while engine.has_work:  # drain, untimed
        advance()
    return {"concurrency": concurrency, **window_figures(finished, start, end, steps, rows)}


def time_open_loop(
    engine: Any,
    requests: Sequence[GenerationRequest],
    rate: float,
    seconds: float,
    seed: int = 0,
    clock: Clock = time.perf_counter,
    sleep: Sleep = time.sleep,
) -> dict[str, Any]:
    """Submit requests at Poisson arrival times, ``rate`` a second, for ``OPEN_LOOP_WARMUP_S`` then ``seconds``
    timed, stepping the engine between arrivals; the figures of the requests that finished in the timed window
    (latency from each one's arrival time), and ``waiting_at_end``, the requests still queued when it closed.
    Then those are dropped and the running ones finish, untimed."""
    arrivals = random.Random(seed)
    finished: list[tuple[float, float, int]] = []
    sent, steps, rows = 0, 0, 0
    begin = clock()
    start, end, arrival = begin + OPEN_LOOP_WARMUP_S, begin + OPEN_LOOP_WARMUP_S + seconds, begin
    while (now := clock()) < end:
        while arrival <= now:
            engine.submit(requests[sent % len(requests)], Timed(finished, clock, submitted=arrival))
            sent += 1
            arrival += arrivals.expovariate(rate)
        if not engine.has_work:
            sleep(max(arrival - now, 0.0))
            continue
        if wait := engine.step():
            sleep(min(wait, max(arrival - clock(), 0.0)))
        if now >= start:
            steps, rows = steps + 1, rows + engine.running_count
    waiting = len(engine.waiting)
    engine.cancel(*(pending.id for pending in engine.waiting))  # an overload's backlog is not worth draining
    while engine.has_work:  # the running ones, untimed
        if wait := engine.step():
            sleep(wait)
    return {"rate": rate, **window_figures(finished, start, end, steps, rows), "waiting_at_end": waiting}


def window_figures(
    finished: Sequence[tuple[float, float, int]], start: float, end: float, steps: int, rows: int
) -> dict[str, Any]:
    """Throughput and latencies of the requests that finished in ``(start, end]``, the window's steps a second and
    its mean batch (``rows``: the sequences running after each of its ``steps``, summed). A request that ended at
    ``start`` ended in the warm-up's last step; one that ended at ``end``, in the window's last.

    >>> figures = window_figures([(0.0, 0.5, 6), (0.2, 1.5, 6), (1.0, 3.0, 6)], 1.0, 2.0, steps=10, rows=25)
    >>> figures["requests"], figures["images_per_s"], figures["latency_mean_s"], figures["mean_batch"]
    (1, 1.0, 1.3, 2.5)
    """
    timed = [(began, ended, tokens) for began, ended, tokens in finished if start < ended <= end]
    latencies = [ended - began for began, ended, _ in timed]
    window = end - start
    return {
        "requests": len(timed),
        "images_per_s": len(timed) / window,
        "tokens_per_s": sum(tokens for _, _, tokens in timed) / window,
        "latency_mean_s": sum(latencies) / len(latencies) if latencies else None,
        "latency_p50_s": percentile(latencies, 50),
        "latency_p99_s": percentile(latencies, 99),
        "mean_batch": rows / max(steps, 1),
        "steps_per_s": steps / window,
    }
