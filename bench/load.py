"""The send schedule: closed-loop, open-loop and shaped load against the service, one record per request.

One dispatcher serves every mode. It takes the next arrival time (none in a closed loop: the next request
goes as soon as one of ``concurrency`` slots frees), waits for it and for a free slot (the in-flight cap),
and sends the next workload item through ``serve.app.client.KosmosClient``. The modes differ only in their
arrivals:

- closed loop (``--concurrency 1,4,16,64``): no arrival times, ``concurrency`` slots;
- open loop (``--rate R``): Poisson arrivals at ``R``/s, or gamma arrivals with ``--burstiness`` (the gamma
  shape: below 1 burstier than Poisson, above 1 more regular), at most ``--max-in-flight`` at once;
- shaped (``--shape 2:60,2-20:120,20:60,2:60``: rate:seconds segments, ``a-b`` a linear ramp), for
  autoscaling runs, with Serve's replica counts polled alongside (``bench.replicas``).

No catch-up: when the dispatcher falls behind (the in-flight cap was reached, or the loop stalled), arrivals
more than ``max_lag_s`` late are dropped in favour of newer due ones and counted as ``skipped``, so a stall
never turns into a burst the schedule did not ask for (arrivals a few milliseconds late still go: that is
jitter, and a Poisson schedule has close pairs). Each point warms up (``warmup_s`` seconds and/or ``warmup_requests``
requests, excluded from statistics), then sends for ``duration_s`` seconds (a shape: to its end), then waits
up to ``grace_s`` for the requests in flight, and cancels the rest (recorded as ``cancelled``).

    >>> [round(t, 3) for t in arrival_times([(0.0, 2.0, 2.0)], 1.0, np.random.default_rng(0))]
    [0.34, 0.85, 0.86, 0.861, 1.136, 1.951]
"""

from __future__ import annotations

import asyncio
import gc
import math
import multiprocessing
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from multiprocessing.synchronize import Barrier
from typing import Literal

import numpy as np
from tqdm import tqdm

from bench.records import CANCELLED, TIMEOUT, RequestRecord
from bench.replicas import ReplicaPoller, ReplicaSample
from bench.workload import WorkItem
from serve.app.client import APIError, KosmosClient

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


async def acquire_before(slots: asyncio.Semaphore, deadline: float, clock: Callable[[], float]) -> bool:
    """Take a slot if one frees before ``deadline`` (run time); False, holding none, if not."""
    if math.isinf(deadline):
        await slots.acquire()
        return True
    try:
        await asyncio.wait_for(slots.acquire(), max(0.0, deadline - clock()))
    except asyncio.TimeoutError:
        return False
    if clock() >= deadline:
        slots.release()
        return False
    return True


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
                    f"got --warmup-s {self.warmup_s:g} --warmup-requests {self.warmup_requests}"
                )


@dataclass
class PointResult:
    """When one point ran (seconds from the run's start), its steady window, and what it sent and skipped."""

    index: int
    label: str
    mode: str
    concurrency: int | None
    rate: float | None
    x: float | None
    start_s: float
    window_start_s: float
    window_end_s: float
    end_s: float
    sent: int
    skipped: int
    schedule: list[Step]
    """The arrival-rate steps as run, in run time (empty in a closed loop)."""
    sender_cpu_s: float = 0.0
    """CPU seconds the sending process (or processes, summed) spent from the point's start to its end: the load
    generator's own cost, without its start-up and the workload's encoding."""


@dataclass
class LoadRun:
    """Everything a run measured, before any statistics."""

    started_at: str
    points: list[PointResult]
    records: list[RequestRecord]
    replicas: list[ReplicaSample] = field(default_factory=list)
    replica_poll_failures: int = 0


class LoadGenerator:
    """Sends a workload to one service; ``run_point`` for each load point, records in ``records``."""

    def __init__(
        self,
        client: KosmosClient,
        workload: list[WorkItem],
        config: LoadConfig,
        clock: Callable[[], float],
        progress: bool = True,
    ) -> None:
        self.client = client
        self.workload = workload
        self.config = config
        self.clock = clock
        self.progress = progress
        self.records: list[RequestRecord] = []

    async def run_point(self, index: int, point: LoadPoint) -> PointResult:
        config, clock = self.config, self.clock
        start, cpu = clock(), time.process_time()
        steps = point.steps()
        rng = np.random.default_rng([config.seed, index])
        arrivals = None if steps is None else Lookahead(start + t for t in arrival_times(steps, config.burstiness, rng))
        slots = asyncio.Semaphore(point.concurrency if point.mode == "closed" else config.max_in_flight)
        by_count = config.warmup_requests > 0
        window_start = math.inf if by_count else start + config.warmup_s
        window_end = start + (point.shape_duration_s if point.mode == "shape" else config.warmup_s + config.duration_s)
        if by_count:
            window_end = math.inf
        in_flight: set[asyncio.Task[None]] = set()
        sent = skipped = 0
        bar = tqdm(desc=point.label, unit="req", disable=not self.progress, leave=True)
        while True:
            due = None
            if arrivals is not None:
                due = arrivals.take()
                if due is None or due >= window_end:
                    break
                await asyncio.sleep(max(0.0, due - clock()))
            if not await acquire_before(slots, window_end, clock):
                if arrivals is not None:  # this arrival and the rest of the window's never got a slot
                    skipped += 1
                    while arrivals.head is not None and arrivals.head < window_end:
                        arrivals.take()
                        skipped += 1
                break
            now = clock()
            if arrivals is not None and due is not None:
                due, dropped = latest_due(arrivals, due, now, config.max_lag_s)
                skipped += dropped
            warm = sent < config.warmup_requests or now < start + config.warmup_s
            if by_count and not warm and math.isinf(window_start):
                window_start = now
                window_end = now + config.duration_s
            item = self.workload[sent % len(self.workload)]
            task = asyncio.create_task(self.issue(index, sent, item, now if due is None else due, warm))
            in_flight.add(task)
            task.add_done_callback(lambda t: (slots.release(), in_flight.discard(t), bar.update()))
            sent += 1
        if arrivals is not None and math.isfinite(window_end):
            await asyncio.sleep(max(0.0, window_end - clock()))  # an open loop's window lasts to its end
        if in_flight:
            _, late = await asyncio.wait(set(in_flight), timeout=config.grace_s)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        bar.close()
        schedule = [
            (start + a, min(start + b, window_end), rate) for a, b, rate in steps or [] if start + a < window_end
        ]
        return PointResult(
            index=index,
            label=point.label,
            mode=point.mode,
            concurrency=point.concurrency,
            rate=point.rate,
            x=point.x,
            start_s=start,
            window_start_s=window_start,
            window_end_s=window_end,
            end_s=clock(),
            sent=sent,
            skipped=skipped,
            schedule=schedule,
            sender_cpu_s=time.process_time() - cpu,
        )

    async def issue(self, point: int, index: int, item: WorkItem, scheduled: float, warm: bool) -> None:
        """Send one request and fill its record (appended at once, so a cancelled request is recorded too)."""
        start = self.clock()
        record = RequestRecord(
            point=point,
            index=index,
            item=item.index,
            task=item.task,
            image_width=item.width,
            image_height=item.height,
            image_bytes=len(item.image),
            warmup=warm,
            scheduled_s=scheduled,
            start_s=start,
            end_s=start,
            status=0,
        )
        self.records.append(record)
        try:
            await asyncio.wait_for(self._call(item, record), self.config.timeout_s)
            record.status = 200
        except APIError as exc:
            record.status = exc.status
            record.error_type = exc.type or "error"  # "timeout": the server's 504, or the client's deadline
            record.error = exc.message[:300]
        except asyncio.TimeoutError:
            record.error_type, record.error = TIMEOUT, f"no answer within {self.config.timeout_s:g} s"
        except asyncio.CancelledError:
            record.error_type, record.error = CANCELLED, "still in flight when the drain's grace period ended"
            raise
        finally:
            record.end_s = self.clock()

    async def _call(self, item: WorkItem, record: RequestRecord) -> None:
        if not self.config.stream:
            completion = await self.client.complete(item.image, **item.request_fields())
            usage = completion.usage
        else:
            usage = {}
            async for chunk in self.client.stream(item.image, **item.request_fields()):
                if any(choice.get("delta", {}).get("content") for choice in chunk.get("choices", [])):
                    record.chunk_times_s.append(self.clock())
                usage = chunk.get("usage") or usage
            record.first_token_s = record.chunk_times_s[0] if record.chunk_times_s else None
        record.prompt_tokens = int(usage.get("prompt_tokens", 0))
        record.completion_tokens = int(usage.get("completion_tokens", 0))


async def run_load(
    url: str,
    points: list[LoadPoint],
    workload: list[WorkItem],
    config: LoadConfig,
    *,
    api_key: str | None = None,
    serve_api: str | None = None,
    serve_api_token: str | None = None,
    poll_interval_s: float = 1.0,
    progress: bool = True,
    processes: int = 1,
) -> LoadRun:
    """Run every point in turn against ``url`` (after ``/health`` answers), polling replicas if asked.

    With ``processes`` above 1, that many processes send, each a share of every point (its concurrency, rate
    and in-flight cap divided), starting each point together; their records are merged on one clock. One
    Python process tops out at a few hundred requests a second, below what one GPU replica serves.
    """
    config.check(points)
    if processes < 1:
        raise ValueError("processes must be at least 1")
    origin = time.perf_counter()

    def clock() -> float:
        return time.perf_counter() - origin

    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    poller = ReplicaPoller(serve_api, clock, poll_interval_s, serve_api_token) if serve_api else None
    polling = asyncio.create_task(poller.run()) if poller else None
    target = Target(url, api_key, workload, config, origin)
    try:
        if processes == 1:
            results, records = await send_points(target, points, progress)
        else:
            results, records = await send_in_processes(target, points, processes)
    finally:
        if polling is not None:
            polling.cancel()
            await asyncio.gather(polling, return_exceptions=True)
    return LoadRun(
        started_at,
        results,
        records,
        poller.samples if poller else [],
        poller.failures if poller else 0,
    )


@dataclass(frozen=True)
class Target:
    """What every sending process shares: the service, the workload, the settings and the run's clock origin."""

    url: str
    api_key: str | None
    workload: list[WorkItem]
    config: LoadConfig
    origin: float
    """``time.perf_counter()`` at the run's start: CLOCK_MONOTONIC, the same in every process of a machine."""


async def send_points(
    target: Target, points: list[LoadPoint], progress: bool, barrier: Barrier | None = None
) -> tuple[list[PointResult], list[RequestRecord]]:
    """One process's sending: every point in turn, each begun once all processes reach ``barrier``."""
    config = target.config

    def clock() -> float:
        return time.perf_counter() - target.origin

    connections = max([config.max_in_flight] + [p.concurrency or 0 for p in points])
    gc.freeze()  # what exists now (a large heap once torch is imported) stays out of collections during the run
    try:
        async with KosmosClient(
            target.url, api_key=target.api_key, timeout=config.timeout_s, max_connections=connections
        ) as client:
            await client.wait_ready(config.ready_timeout_s)
            generator = LoadGenerator(client, target.workload, config, clock, progress)
            results = []
            for index, point in enumerate(points):
                if barrier is not None:
                    await asyncio.to_thread(barrier.wait, config.ready_timeout_s + config.grace_s + 60)
                results.append(await generator.run_point(index, point))
    finally:
        gc.unfreeze()
    return results, generator.records


def share(point: LoadPoint, worker: int, workers: int) -> LoadPoint:
    """``worker``'s part of ``point`` among ``workers`` processes: concurrency split (a process may get none, and
    then only keeps time with the others), rates divided."""
    if point.mode == "closed":
        concurrency = point.concurrency or 0
        return replace(point, concurrency=concurrency // workers + (worker < concurrency % workers))
    shape = tuple(replace(s, start_rate=s.start_rate / workers, end_rate=s.end_rate / workers) for s in point.shape)
    return replace(point, rate=(point.rate or 0.0) / workers, shape=shape)


_barrier: Barrier | None = None
"""In a sending process: the barrier all senders meet at before each point (set when the process starts)."""


def _set_barrier(barrier: Barrier) -> None:
    global _barrier
    _barrier = barrier


def _send_share(target: Target, points: list[LoadPoint]) -> tuple[list[PointResult], list[RequestRecord]]:
    return asyncio.run(send_points(target, points, False, _barrier))


async def send_in_processes(
    target: Target, points: list[LoadPoint], workers: int
) -> tuple[list[PointResult], list[RequestRecord]]:
    """:func:`send_points` in ``workers`` processes, each with its share of every point; merged results."""
    config = target.config
    cap = -(-config.max_in_flight // workers)
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(workers)
    loop = asyncio.get_running_loop()
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_set_barrier, initargs=(barrier,)) as pool:
        shares = [
            loop.run_in_executor(
                pool,
                _send_share,
                replace(target, config=replace(config, seed=config.seed * workers + worker, max_in_flight=cap)),
                [share(p, worker, workers) for p in points],
            )
            for worker in range(workers)
        ]
        try:
            parts = await asyncio.gather(*shares)
        except BaseException:
            barrier.abort()  # the others stop at their next meeting rather than wait there for the one that failed
            raise
    results = [merge_points(point, [part[0][index] for part in parts]) for index, point in enumerate(points)]
    records = sorted((r for part in parts for r in part[1]), key=lambda r: (r.point, r.start_s))
    for point in range(len(points)):  # number each point's requests anew, in the order they were sent
        for index, record in enumerate(r for r in records if r.point == point):
            record.index = index
    return results, records


def merge_points(point: LoadPoint, parts: list[PointResult]) -> PointResult:
    """One point's result from its senders' parts: the window all of them were steady in, their sums."""
    first = parts[0]
    return replace(
        first,
        concurrency=point.concurrency,
        rate=point.rate,
        x=point.x,
        start_s=min(p.start_s for p in parts),
        window_start_s=max(p.window_start_s for p in parts),
        window_end_s=min(p.window_end_s for p in parts),
        end_s=max(p.end_s for p in parts),
        sent=sum(p.sent for p in parts),
        skipped=sum(p.skipped for p in parts),
        schedule=[(start, end, rate * len(parts)) for start, end, rate in first.schedule],
        sender_cpu_s=sum(p.sender_cpu_s for p in parts),
    )
