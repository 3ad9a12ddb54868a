"""The send schedule: when each request of a load point goes, in a closed loop, an open loop or a rate shape.

The modes differ only in their arrivals:

- closed loop (``--concurrency 1,4,16,64``): no arrival times, ``concurrency`` slots: the next request goes as
  soon as one frees;
- open loop (``--rate R``): Poisson arrivals at ``R``/s, or gamma arrivals with ``--burstiness`` (the gamma
  shape: below 1 burstier than Poisson, above 1 more regular), at most ``--max-in-flight`` at once;
- shaped (``--shape 2:60,2-20:120,20:60,2:60``: rate:seconds segments, ``a-b`` a linear ramp), for
  autoscaling runs, with Serve's replica counts polled alongside (``bench.replicas``).

No catch-up: when the sender falls behind (the in-flight cap was reached, or the loop stalled), arrivals
more than ``max_lag_s`` late are dropped in favour of newer due ones and counted as ``skipped``, so a stall
never turns into a burst the schedule did not ask for (arrivals a few milliseconds late still go: that is
jitter, and a Poisson schedule has close pairs). Each point warms up (``warmup_s`` seconds and/or ``warmup_requests``
requests, excluded from statistics), then sends for ``duration_s`` seconds (a shape: to its end), then waits
up to ``grace_s`` for the requests in flight, and cancels the rest (recorded as ``cancelled``): ``LoadConfig``.

    >>> [round(t, 3) for t in arrival_times([(0.0, 2.0, 2.0)], 1.0, np.random.default_rng(0))]
    [0.34, 0.85, 0.86, 0.861, 1.136, 1.951]
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np

Step = tuple[float, float, float]
"""A stretch of constant arrival rate: (start_s, end_s, requests per second)."""


@dataclass(frozen=True)
class RateSegment:
    """``duration_s`` seconds whose rate goes linearly from ``start_rate`` to ``end_rate`` requests/s."""

    duration_s: float
    start_rate: float
    end_rate: float


def parse_shape(text: str) -> tuple[RateSegment, ...]:
    """``RATE:SECONDS`` segments, comma-separated; ``A-B:SECONDS`` ramps from A to B.

    >>> [(s.duration_s, s.start_rate, s.end_rate) for s in parse_shape("2:30, 2-20:60")]
    [(30.0, 2.0, 2.0), (60.0, 2.0, 20.0)]
    """
    segments = []
    for part in text.split(","):
        rates, sep, seconds = part.strip().partition(":")
        low, _, high = rates.partition("-")
        try:
            segment = RateSegment(float(seconds), float(low), float(high or low))
        except ValueError:
            raise ValueError(
                f"a shape is RATE:SECONDS or FROM-TO:SECONDS segments, e.g. 2:30,2-20:60; got {part!r}"
            ) from None
        if not sep or segment.duration_s <= 0 or min(segment.start_rate, segment.end_rate) < 0:
            raise ValueError(f"each shape segment needs a positive duration and rates >= 0; got {part!r}")
        segments.append(segment)
    return tuple(segments)


def shape_steps(segments: Iterable[RateSegment], step_s: float = 1.0) -> list[Step]:
    """Constant-rate steps of at most ``step_s`` following the segments (a ramp takes each step's mid rate).

    >>> shape_steps([RateSegment(1.0, 5.0, 5.0), RateSegment(2.0, 0.0, 4.0)])
    [(0.0, 1.0, 5.0), (1.0, 2.0, 1.0), (2.0, 3.0, 3.0)]
    """
    steps: list[Step] = []
    start = 0.0
    for segment in segments:
        count = 1 if segment.start_rate == segment.end_rate else max(1, math.ceil(segment.duration_s / step_s))
        width = segment.duration_s / count
        for i in range(count):
            mid = (i + 0.5) / count
            rate = segment.start_rate + (segment.end_rate - segment.start_rate) * mid
            steps.append((start + i * width, start + (i + 1) * width, rate))
        start += segment.duration_s
    return steps


def arrival_times(steps: Iterable[Step], burstiness: float, rng: np.random.Generator) -> Iterator[float]:
    """Arrival times of a gamma renewal process (Poisson when ``burstiness`` is 1) whose rate follows
    ``steps``, by time rescaling: unit-mean gamma gaps in "expected arrivals", spent at each step's rate."""
    if burstiness <= 0:
        raise ValueError(f"burstiness must be positive, got {burstiness}")
    budget = rng.gamma(burstiness, 1 / burstiness)
    for start, end, rate in steps:
        t = start
        if rate <= 0:
            continue
        while budget <= (end - t) * rate:
            t += budget / rate
            yield t
            budget = rng.gamma(burstiness, 1 / burstiness)
        budget -= (end - t) * rate


class Lookahead:
    """An iterator of arrival times that can show its next value without taking it (None at the end)."""

    def __init__(self, times: Iterator[float]) -> None:
        self.times = times
        self.head = next(times, None)

    def take(self) -> float | None:
        value, self.head = self.head, next(self.times, None)
        return value


def latest_due(arrivals: Lookahead, first: float, now: float, max_lag_s: float) -> tuple[float, int]:
    """The arrival to send now, starting from ``first`` (already taken), and how many were skipped: an arrival
    more than ``max_lag_s`` late is skipped when a newer one is also due (a stall), else it goes (jitter).

    >>> arrivals = Lookahead(iter([1.0, 1.5, 1.96, 4.0]))
    >>> latest_due(arrivals, arrivals.take(), now=2.0, max_lag_s=0.05), arrivals.head
    ((1.96, 2), 4.0)
    >>> arrivals = Lookahead(iter([1.0, 1.01]))
    >>> latest_due(arrivals, arrivals.take(), now=1.02, max_lag_s=0.05), arrivals.head
    ((1.0, 0), 1.01)
    """
    due, skipped = first, 0
    while arrivals.head is not None and arrivals.head <= now and now - due > max_lag_s:
        due, skipped = arrivals.take(), skipped + 1
    return due, skipped


@dataclass(frozen=True)
class LoadPoint:
    """One load level: a closed loop at ``concurrency``, an open loop at ``rate``, or a rate ``shape``."""

    label: str
    mode: Literal["closed", "open", "shape"]
    concurrency: int | None = None
    rate: float | None = None
    shape: tuple[RateSegment, ...] = ()

    @property
    def x(self) -> float | None:
        """The point's place on a sweep's axis: its concurrency or its offered rate."""
        return float(self.concurrency) if self.mode == "closed" else self.rate

    @property
    def shape_duration_s(self) -> float:
        return sum(s.duration_s for s in self.shape)

    def steps(self) -> Iterable[Step] | None:
        """Arrival-rate steps (None in a closed loop, where completions pace the sends)."""
        if self.mode == "closed":
            return None
        if self.mode == "open":
            return [(0.0, math.inf, float(self.rate or 0.0))]
        return shape_steps(self.shape)


def sweep(concurrency: Iterable[int] = (), rates: Iterable[float] = (), shape: str | None = None) -> list[LoadPoint]:
    """The load points of a run: a concurrency sweep, a rate sweep, or one shape.

    >>> [p.label for p in sweep(concurrency=[1, 4])], [p.label for p in sweep(rates=[0.5])]
    (['concurrency=1', 'concurrency=4'], ['rate=0.5/s'])
    """
    points = [LoadPoint(f"concurrency={c}", "closed", concurrency=int(c)) for c in concurrency]
    points += [LoadPoint(f"rate={r:g}/s", "open", rate=float(r)) for r in rates]
    if shape:
        segments = parse_shape(shape)
        mean = sum(s.duration_s * (s.start_rate + s.end_rate) / 2 for s in segments) / sum(
            s.duration_s for s in segments
        )
        points.append(LoadPoint(f"shape {shape}", "shape", rate=mean, shape=segments))
    if any(p.mode == "closed" and (p.concurrency or 0) < 1 for p in points):
        raise ValueError("concurrency levels must be at least 1")
    if any(p.mode == "open" and (p.rate or 0) <= 0 for p in points):
        raise ValueError("rates must be positive")
    if not points:
        raise ValueError("give concurrency levels, rates, or a shape")
    return points


@dataclass(frozen=True)
class LoadConfig:
    """How each point runs: warm-up, steady duration, drain, request deadline, arrivals and streaming."""

    duration_s: float = 30.0
    warmup_s: float = 2.0
    warmup_requests: int = 0
    grace_s: float = 30.0
    timeout_s: float = 120.0
    burstiness: float = 1.0
    max_in_flight: int = 256
    stream: bool = False
    seed: int = 0
    ready_timeout_s: float = 60.0
    max_lag_s: float = 0.05
    """Open loop: an arrival this late is skipped when a newer one is due (a stall, not jitter)."""

    def check(self, points: Iterable[LoadPoint]) -> None:
        """Refuse settings that cannot give a steady window."""
        if self.duration_s <= 0 or self.warmup_s < 0 or self.warmup_requests < 0 or self.grace_s < 0:
            raise ValueError("duration must be positive; warm-up and grace cannot be negative")
        for point in points:
            if point.mode == "shape" and (self.warmup_requests or self.warmup_s >= point.shape_duration_s):
                raise ValueError(
                    f"a shape warms up by seconds only, shorter than the shape ({point.shape_duration_s:g} s); "
                    f"got --warmup {self.warmup_s:g} --warmup-requests {self.warmup_requests}"
                )
